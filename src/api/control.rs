//! The `secretgate.v1.Control` service: the policy and the keyring kept in the store (push,
//! rollback, history; add, promote, retire a key). Every call needs `admin` on `/` and is
//! audited; a change records its intent durably before it writes the store, and its outcome
//! names the version stored and the replicas that did not follow in time.

use std::{future::Future, sync::Arc, time::Duration};

use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::{ApiError, Call, Vault};
use crate::{
    audit::AuditLog,
    authz::{Authorizer, Permit, PolicyFiles, WholeStore, act},
    control::{ControlError, Pushed, StoredKeyring, StoredPolicy, StoredTrust, trust::TrustFiles},
    limits::{Class, RateLimiter},
    proto::v1::{self, control_server::Control},
};

/// Largest request this service decodes: a policy of about 100,000 rules with its tests.
pub const MAX_CONTROL_REQUEST_BYTES: usize = 16 << 20;
/// How long a change waits for the tier by default, and at most.
const DEFAULT_WAIT: Duration = Duration::from_secs(10);
/// A promote waits longer by default: past a registry lease, so a dead replica drops out.
const DEFAULT_PROMOTE_WAIT: Duration = Duration::from_secs(30);
const MAX_WAIT: Duration = Duration::from_secs(60);

/// The control objects a gateway keeps in the store (each `None` when from files).
pub(crate) type Stored =
    (Option<Arc<StoredPolicy>>, Option<Arc<StoredKeyring>>, Option<Arc<StoredTrust>>);

/// The `Control` service.
#[derive(Clone)]
pub struct ControlService {
    policy: Option<Arc<StoredPolicy>>,
    keyring: Option<Arc<StoredKeyring>>,
    trust: Option<Arc<StoredTrust>>,
    vault: Vault,
    authz: Authorizer,
    audit: AuditLog,
    limiter: RateLimiter,
}

impl ControlService {
    /// The service over the stored policy, keyring and client trust (`None`: from files on
    /// this gateway).
    pub(crate) fn new(
        (policy, keyring, trust): Stored,
        vault: Vault,
        authz: Authorizer,
        audit: AuditLog,
        limiter: RateLimiter,
    ) -> Self {
        Self { policy, keyring, trust, vault, authz, audit, limiter }
    }

    fn trust(&self) -> Result<&StoredTrust, ApiError> {
        let not =
            ControlError::NotInStore { what: "client trust", setting: "tls.client_trust_source" };
        self.trust.as_deref().ok_or(ApiError::Control(not))
    }

    fn policy(&self) -> Result<&StoredPolicy, ApiError> {
        let not = ControlError::NotInStore { what: "policy", setting: "authz.source" };
        self.policy.as_deref().ok_or(ApiError::Control(not))
    }

    fn keyring(&self) -> Result<&StoredKeyring, ApiError> {
        let not = ControlError::NotInStore { what: "keyring", setting: "crypto.source" };
        self.keyring.as_deref().ok_or(ApiError::Control(not))
    }

    /// Runs one call: admitted past the rate limits, authorized (`admin` on `/`), `ready`
    /// checked (the object is in the store), for a change its intent recorded, then `body`;
    /// the outcome recorded.
    async fn run<T, R, F>(
        &self,
        method: &'static str,
        request: Request<R>,
        changes: bool,
        ready: impl FnOnce(&Self) -> Result<(), ApiError>,
        body: impl FnOnce(R, Permit<act::Admin>, String) -> F,
    ) -> Result<Response<T>, Status>
    where
        F: Future<Output = Result<(T, Option<Outcome>), ApiError>>,
    {
        let mut call =
            Call::admit(&self.limiter, Class::Admin, method, &request, "/", &self.audit)?;
        let span = call.span();
        let request = request.into_inner();
        async move {
            let result = async {
                let permit = call.authorize::<act::Admin>(&self.authz, WholeStore)?;
                ready(self)?;
                if changes {
                    // Recorded durably; the store write follows in this request.
                    let _intent = call.intent().await?;
                }
                let author = call.principal();
                let (answer, pushed) = body(request, permit, author).await?;
                if let Some(o) = pushed {
                    if let Some(v) = o.version {
                        call.version(v);
                    }
                    call.summary(o.summary);
                }
                Ok(answer)
            }
            .await;
            call.finish(result).await
        }
        .instrument(span)
        .await
    }
}

fn wait(ms: u32, default: Duration) -> Duration {
    match ms {
        0 => default,
        ms => Duration::from_millis(u64::from(ms)).min(MAX_WAIT),
    }
}

/// What a change did, for its outcome record.
struct Outcome {
    version: Option<u64>,
    summary: String,
}

fn behind(p: &Pushed) -> String {
    match p.behind.is_empty() {
        true => String::new(),
        false => format!("; not following in time: {}", p.behind.join(", ")),
    }
}

fn outcome(p: &Pushed) -> Option<Outcome> {
    let summary = format!(
        "version {} stored; {} live replicas following{}",
        p.version,
        p.enforcing.len(),
        behind(p)
    );
    Some(Outcome { version: Some(p.version), summary })
}

fn push_response(p: Pushed) -> v1::PushResponse {
    v1::PushResponse { version: p.version, enforcing: p.enforcing, behind: p.behind }
}

fn key_response(id: String, p: Pushed) -> v1::KeyChangeResponse {
    v1::KeyChangeResponse { id, version: p.version, enforcing: p.enforcing, behind: p.behind }
}

#[tonic::async_trait]
impl Control for ControlService {
    async fn push_policy(
        &self,
        request: Request<v1::PushPolicyRequest>,
    ) -> Result<Response<v1::PushResponse>, Status> {
        let ready = |s: &Self| s.policy().map(|_| ());
        self.run(
            "secretgate.v1.Control/PushPolicy",
            request,
            true,
            ready,
            |r, _, author| async move {
                let files = PolicyFiles::from_map(r.files.into_iter().collect())
                    .map_err(ControlError::Invalid)?;
                let base = Some(r.base_version).filter(|b| *b > 0);
                let wait = wait(r.wait_ms, DEFAULT_WAIT);
                let pushed = self.policy()?.push(files, base, &author, "push".into(), wait).await?;
                Ok((push_response(pushed.clone()), outcome(&pushed)))
            },
        )
        .await
    }

    async fn rollback_policy(
        &self,
        request: Request<v1::RollbackPolicyRequest>,
    ) -> Result<Response<v1::PushResponse>, Status> {
        let ready = |s: &Self| s.policy().map(|_| ());
        let method = "secretgate.v1.Control/RollbackPolicy";
        self.run(method, request, true, ready, |r, _, author| async move {
            let stored = self.policy()?;
            let old = stored.version(r.version).await?;
            let note = format!("rollback to version {}", r.version);
            let pushed = stored
                .push(old.content, None, &author, note, wait(r.wait_ms, DEFAULT_WAIT))
                .await?;
            Ok((push_response(pushed.clone()), outcome(&pushed)))
        })
        .await
    }

    async fn policy_history(
        &self,
        request: Request<v1::PolicyHistoryRequest>,
    ) -> Result<Response<v1::PolicyHistoryResponse>, Status> {
        let ready = |s: &Self| s.policy().map(|_| ());
        let method = "secretgate.v1.Control/PolicyHistory";
        self.run(method, request, false, ready, |r, _, _| async move {
            let limit = match r.limit {
                0 => 20,
                n => n.min(1000) as usize,
            };
            let stored = self.policy()?;
            let versions = stored.history(limit).await?.into_iter().map(|e| match e.content {
                Ok(body) => {
                    let parsed = crate::authz::Policy::from_files_untested(&body.content, "");
                    v1::PolicyVersionInfo {
                        version: e.version,
                        created: body.created,
                        author: body.author,
                        note: body.note,
                        fingerprint: parsed
                            .as_ref()
                            .map(|p| p.version().to_owned())
                            .unwrap_or_default(),
                        rules: parsed.as_ref().map_or(0, |p| p.rule_count() as u64),
                        problem: parsed.err().map(|e| e.to_string()).unwrap_or_default(),
                    }
                }
                Err(problem) => {
                    v1::PolicyVersionInfo { version: e.version, problem, ..Default::default() }
                }
            });
            let answer = v1::PolicyHistoryResponse {
                versions: versions.collect(),
                in_force: stored.accepted(),
            };
            Ok((answer, None))
        })
        .await
    }

    async fn add_key(
        &self,
        request: Request<v1::AddKeyRequest>,
    ) -> Result<Response<v1::KeyChangeResponse>, Status> {
        let ready = |s: &Self| s.keyring().map(|_| ());
        self.run("secretgate.v1.Control/AddKey", request, true, ready, |r, _, author| async move {
            let (id, pushed) = self.keyring()?.add(&author, wait(r.wait_ms, DEFAULT_WAIT)).await?;
            Ok((key_response(id, pushed.clone()), outcome(&pushed)))
        })
        .await
    }

    async fn promote_key(
        &self,
        request: Request<v1::KeyRequest>,
    ) -> Result<Response<v1::KeyChangeResponse>, Status> {
        let ready = |s: &Self| s.keyring().map(|_| ());
        let method = "secretgate.v1.Control/PromoteKey";
        self.run(method, request, true, ready, |r, _, author| async move {
            let wait = wait(r.wait_ms, DEFAULT_PROMOTE_WAIT);
            let pushed = self.keyring()?.promote(&r.id, &author, wait).await?;
            Ok((key_response(r.id, pushed.clone()), outcome(&pushed)))
        })
        .await
    }

    async fn push_trust(
        &self,
        request: Request<v1::PushTrustRequest>,
    ) -> Result<Response<v1::PushResponse>, Status> {
        let ready = |s: &Self| s.trust().map(|_| ());
        self.run(
            "secretgate.v1.Control/PushTrust",
            request,
            true,
            ready,
            |r, _, author| async move {
                let files = TrustFiles { client_ca: r.client_ca, client_crl: r.client_crl };
                let wait = wait(r.wait_ms, DEFAULT_WAIT);
                let pushed = self.trust()?.push(files, None, &author, "push".into(), wait).await?;
                Ok((push_response(pushed.clone()), outcome(&pushed)))
            },
        )
        .await
    }

    async fn reseal_control_state(
        &self,
        request: Request<v1::ResealRequest>,
    ) -> Result<Response<v1::ResealResponse>, Status> {
        let ready = |s: &Self| match (&s.policy, &s.keyring, &s.trust) {
            (None, None, None) => Err(ApiError::Control(ControlError::NotInStore {
                what: "control state",
                setting: "authz.source, crypto.source and tls.client_trust_source",
            })),
            _ => Ok(()),
        };
        let method = "secretgate.v1.Control/ResealControlState";
        self.run(method, request, true, ready, |r, _, author| async move {
            let wait = wait(r.wait_ms, DEFAULT_WAIT);
            let mut objects = Vec::new();
            let mut kek_id = String::new();
            let object = |kind: &str, p: Pushed| v1::ResealedObject {
                kind: kind.into(),
                version: p.version,
                enforcing: p.enforcing,
                behind: p.behind,
            };
            // The keyring first: values stay readable whatever happens after.
            if let Some(k) = &self.keyring {
                objects.push(object("keyring", k.reseal(&author, wait).await?));
                kek_id = k.kek_id().to_owned();
            }
            if let Some(p) = &self.policy {
                objects.push(object("policy", p.reseal(&author, wait).await?));
                kek_id = p.kek_id().to_owned();
            }
            if let Some(t) = &self.trust {
                objects.push(object("trust", t.reseal(&author, wait).await?));
                kek_id = t.kek_id().to_owned();
            }
            let done: Vec<String> =
                objects.iter().map(|o| format!("{} version {}", o.kind, o.version)).collect();
            let summary = format!("sealed again under KEK {kek_id}: {}", done.join(", "));
            let outcome = Outcome { version: None, summary };
            Ok((v1::ResealResponse { objects, kek_id }, Some(outcome)))
        })
        .await
    }

    async fn retire_key(
        &self,
        request: Request<v1::KeyRequest>,
    ) -> Result<Response<v1::KeyChangeResponse>, Status> {
        let ready = |s: &Self| s.keyring().map(|_| ());
        let method = "secretgate.v1.Control/RetireKey";
        self.run(method, request, true, ready, |r, permit, author| async move {
            let usage = self.vault.key_status(&permit).await?.usage;
            let records = usage.records.get(r.id.as_str()).copied().unwrap_or(0);
            let wait = wait(r.wait_ms, DEFAULT_WAIT);
            let pushed = self.keyring()?.retire(&r.id, records, &author, wait).await?;
            Ok((key_response(r.id, pushed.clone()), outcome(&pushed)))
        })
        .await
    }
}
