//! The `secretgate.v1.Control` service: the policy kept in the store (push, rollback,
//! history). Every call needs `admin` on `/` and is audited; a push or rollback records its
//! intent durably before it writes the store, and its outcome names the version stored and
//! the replicas that did not enforce it in time.

use std::{sync::Arc, time::Duration};

use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::{ApiError, Call};
use crate::{
    audit::AuditLog,
    authz::{Authorizer, Permit, PolicyFiles, WholeStore, act},
    control::{ControlError, StoredPolicy, policy::Pushed},
    limits::{Class, RateLimiter},
    proto::v1::{self, control_server::Control},
};

/// Largest request this service decodes: a policy of about 100,000 rules with its tests.
pub const MAX_CONTROL_REQUEST_BYTES: usize = 16 << 20;
/// How long a push waits for the tier by default, and at most.
const DEFAULT_WAIT: Duration = Duration::from_secs(10);
const MAX_WAIT: Duration = Duration::from_secs(60);

/// The `Control` service.
#[derive(Clone)]
pub struct ControlService {
    policy: Option<Arc<StoredPolicy>>,
    authz: Authorizer,
    audit: AuditLog,
    limiter: RateLimiter,
}

impl ControlService {
    /// The service over the stored policy (`None`: this gateway's policy comes from files).
    pub(crate) fn new(
        policy: Option<Arc<StoredPolicy>>,
        authz: Authorizer,
        audit: AuditLog,
        limiter: RateLimiter,
    ) -> Self {
        Self { policy, authz, audit, limiter }
    }

    fn call<T>(&self, method: &'static str, request: &Request<T>) -> Result<Call, Status> {
        Call::admit(&self.limiter, Class::Admin, method, request, "/", &self.audit)
    }

    fn stored(&self) -> Result<&StoredPolicy, ApiError> {
        self.policy.as_deref().ok_or(ApiError::Control(ControlError::NotInStore))
    }

    /// Authorizes the call, then (for a write) records its intent.
    async fn admitted(
        &self,
        call: &mut Call,
        writes: bool,
    ) -> Result<Permit<act::Admin>, ApiError> {
        let permit = call.authorize::<act::Admin>(&self.authz, WholeStore)?;
        self.stored()?;
        if writes {
            // The intent is recorded durably; the store write follows in this request.
            let _intent = call.intent().await?;
        }
        Ok(permit)
    }
}

fn wait(ms: u32) -> Duration {
    match ms {
        0 => DEFAULT_WAIT,
        ms => Duration::from_millis(u64::from(ms)).min(MAX_WAIT),
    }
}

fn answer(call: &mut Call, pushed: Pushed) -> v1::PushPolicyResponse {
    call.version(pushed.version);
    let behind = match pushed.behind.is_empty() {
        true => String::new(),
        false => format!("; not enforcing it in time: {}", pushed.behind.join(", ")),
    };
    call.summary(format!(
        "policy version {} stored; {} live replicas enforcing it{behind}",
        pushed.version,
        pushed.enforcing.len()
    ));
    v1::PushPolicyResponse {
        version: pushed.version,
        enforcing: pushed.enforcing,
        behind: pushed.behind,
    }
}

#[tonic::async_trait]
impl Control for ControlService {
    async fn push_policy(
        &self,
        request: Request<v1::PushPolicyRequest>,
    ) -> Result<Response<v1::PushPolicyResponse>, Status> {
        let mut call = self.call("secretgate.v1.Control/PushPolicy", &request)?;
        let span = call.span();
        let request = request.into_inner();
        async move {
            let result = async {
                let _permit = self.admitted(&mut call, true).await?;
                let files = PolicyFiles::from_map(request.files.into_iter().collect())
                    .map_err(ControlError::Invalid)?;
                let base = Some(request.base_version).filter(|b| *b > 0);
                let author = call.principal();
                let pushed = self
                    .stored()?
                    .push(files, base, &author, "push".into(), wait(request.wait_ms))
                    .await?;
                Ok(answer(&mut call, pushed))
            }
            .await;
            call.finish(result).await
        }
        .instrument(span)
        .await
    }

    async fn rollback_policy(
        &self,
        request: Request<v1::RollbackPolicyRequest>,
    ) -> Result<Response<v1::PushPolicyResponse>, Status> {
        let mut call = self.call("secretgate.v1.Control/RollbackPolicy", &request)?;
        let span = call.span();
        let request = request.into_inner();
        async move {
            let result = async {
                let _permit = self.admitted(&mut call, true).await?;
                let author = call.principal();
                let pushed = self
                    .stored()?
                    .rollback(request.version, &author, wait(request.wait_ms))
                    .await?;
                Ok(answer(&mut call, pushed))
            }
            .await;
            call.finish(result).await
        }
        .instrument(span)
        .await
    }

    async fn policy_history(
        &self,
        request: Request<v1::PolicyHistoryRequest>,
    ) -> Result<Response<v1::PolicyHistoryResponse>, Status> {
        let mut call = self.call("secretgate.v1.Control/PolicyHistory", &request)?;
        let span = call.span();
        let limit = match request.get_ref().limit {
            0 => 20,
            n => n.min(1000) as usize,
        };
        async move {
            let result = async {
                let _permit = self.admitted(&mut call, false).await?;
                let stored = self.stored()?;
                let versions = stored.history(limit).await?.into_iter().map(|e| match e.content {
                    Ok(body) => {
                        let parsed = crate::authz::Policy::from_files_untested(&body.files, "");
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
                Ok(v1::PolicyHistoryResponse {
                    versions: versions.collect(),
                    in_force: stored.accepted(),
                })
            }
            .await;
            call.finish(result).await
        }
        .instrument(span)
        .await
    }
}
