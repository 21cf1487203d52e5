//! The gRPC services: `secretgate.v1.Secrets` and `secretgate.v1.Admin`.
//!
//! Each RPC follows the pipeline of DESIGN.md, one `Result`-returning step after another,
//! so a request that fails a step never reaches the next: the connection's identity (set by
//! the TLS acceptor) → parse the request into domain types (`SecretPath`, limits) →
//! authorize (a [`Permit`](crate::authz::Permit), or PERMISSION_DENIED) → the [`Vault`]
//! (seal/open and store, which demand the permit) → respond. Every error leaves through
//! [`ApiError`] and its single mapping to `tonic::Status`.

mod admin;
mod error;
mod vault;

use std::{sync::Arc, time::Instant};

use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

pub use admin::AdminService;
pub use error::ApiError;
pub use vault::Vault;

use crate::{
    authz::{Action, Authorizer},
    identity::PeerIdentity,
    path::{PathPrefix, SecretPath},
    proto::v1::{self, secrets_server::Secrets},
    store::UnixMillis,
    tls::ConnInfo,
};

/// Largest `page_size` a List accepts.
pub const MAX_PAGE_SIZE: u32 = 1000;
/// `page_size` used when a List asks for 0.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// Paths a List looks at per call, as a multiple of the page size, before it returns a
/// short page: bounds the work one request can cause when most paths are hidden from it.
const LIST_SCAN_FACTOR: usize = 10;

/// The `Secrets` service.
#[derive(Clone)]
pub struct SecretsService {
    vault: Vault,
    authz: Authorizer,
    max_value_bytes: u64,
}

impl SecretsService {
    /// A service over `vault`, deciding with `authz`, refusing values larger than
    /// `max_value_bytes`.
    pub fn new(vault: Vault, authz: Authorizer, max_value_bytes: u64) -> Self {
        Self { vault, authz, max_value_bytes }
    }

    async fn put_secret(
        &self,
        id: &PeerIdentity,
        req: v1::PutRequest,
    ) -> Result<v1::PutResponse, ApiError> {
        let path = SecretPath::parse(&req.path)?;
        let value = Zeroizing::new(req.value);
        if value.len() as u64 > self.max_value_bytes {
            return Err(ApiError::ValueTooLarge { size: value.len(), limit: self.max_value_bytes });
        }
        let permit = self.authz.authorize(&id.principal, path.as_str(), Action::Write)?;
        let info = self.vault.write(&permit, &path, req.expected_version, &value).await?;
        Ok(v1::PutResponse { version: info.version, created_time: Some(timestamp(info.created)) })
    }

    async fn get_secret(
        &self,
        id: &PeerIdentity,
        req: v1::GetRequest,
    ) -> Result<v1::GetResponse, ApiError> {
        let path = SecretPath::parse(&req.path)?;
        let permit = self.authz.authorize(&id.principal, path.as_str(), Action::Read)?;
        let mut opened = self.vault.read(&permit, &path, req.version.filter(|v| *v != 0)).await?;
        Ok(v1::GetResponse {
            path: path.as_str().to_owned(),
            value: std::mem::take(&mut *opened.value),
            version: opened.entry.version,
            created_time: Some(timestamp(opened.entry.created)),
            current_version: opened.entry.current_version,
        })
    }

    async fn delete_secret(
        &self,
        id: &PeerIdentity,
        req: v1::DeleteRequest,
    ) -> Result<v1::DeleteResponse, ApiError> {
        let path = SecretPath::parse(&req.path)?;
        let permit = self.authz.authorize(&id.principal, path.as_str(), Action::Delete)?;
        let info = self.vault.delete(&permit, &path).await?;
        Ok(v1::DeleteResponse { version: info.version, deleted_time: info.deleted.map(timestamp) })
    }

    async fn list_secrets(
        &self,
        id: &PeerIdentity,
        req: v1::ListRequest,
    ) -> Result<v1::ListResponse, ApiError> {
        let prefix = PathPrefix::parse(&req.prefix)?;
        let size = match req.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n > MAX_PAGE_SIZE => return Err(ApiError::InvalidPageSize(n)),
            n => n,
        } as usize;
        let mut after = match req.page_token.as_str() {
            "" => None,
            token => {
                let p = SecretPath::parse(token).map_err(|_| ApiError::InvalidPageToken)?;
                if !p.starts_with(&prefix) {
                    return Err(ApiError::InvalidPageToken);
                }
                Some(p)
            }
        };
        // Only names the caller may list or read leave the gateway. Hidden names are
        // skipped; after scanning a bounded number, return what we have and a token.
        let mut visible = Vec::with_capacity(size);
        let mut scanned = 0;
        let budget = size * LIST_SCAN_FACTOR;
        let exhausted = loop {
            let batch = self.vault.list_names(&prefix, after.as_ref(), size).await?;
            let done = batch.len() < size;
            for p in batch {
                scanned += 1;
                let keep =
                    self.authz.allows_any(&id.principal, p.as_str(), &[Action::List, Action::Read]);
                after = Some(p.clone());
                if keep {
                    visible.push(p);
                    if visible.len() == size {
                        break;
                    }
                }
            }
            if done && visible.len() < size {
                break true;
            }
            if visible.len() == size || scanned >= budget {
                break false;
            }
        };
        let next_page_token = match (&after, exhausted) {
            (Some(last), false) => last.as_str().to_owned(),
            _ => String::new(),
        };
        Ok(v1::ListResponse {
            paths: visible.into_iter().map(|p| p.as_str().to_owned()).collect(),
            next_page_token,
        })
    }

    async fn secret_versions(
        &self,
        id: &PeerIdentity,
        req: v1::VersionsRequest,
    ) -> Result<v1::VersionsResponse, ApiError> {
        let path = SecretPath::parse(&req.path)?;
        let permit = self.authz.authorize(&id.principal, path.as_str(), Action::Read)?;
        let meta = self.vault.versions(&permit, &path).await?;
        Ok(v1::VersionsResponse {
            current_version: meta.current_version,
            versions: meta
                .versions
                .iter()
                .map(|v| v1::VersionInfo {
                    version: v.version,
                    created_time: Some(timestamp(v.created)),
                    deleted_time: v.deleted.map(timestamp),
                })
                .collect(),
        })
    }

    async fn who_am_i(
        &self,
        id: &PeerIdentity,
        _req: v1::WhoAmIRequest,
    ) -> Result<v1::WhoAmIResponse, ApiError> {
        let (roles, policy_version) = self.authz.roles(&id.principal);
        Ok(v1::WhoAmIResponse {
            principal: id.principal.to_string(),
            roles,
            certificate_fingerprint: id.fingerprint.clone(),
            certificate_serial: id.serial.clone(),
            policy_version,
        })
    }
}

/// Per-request context: who, what, when — for the log line every request ends with.
pub(crate) struct Call {
    method: &'static str,
    conn: Option<ConnInfo>,
    path: String,
    started: Instant,
}

impl Call {
    pub(crate) fn new<T>(method: &'static str, req: &Request<T>, path: &str) -> Self {
        // Paths are attacker-controlled text: keep a bounded excerpt for the log.
        let path = path.chars().take(600).collect();
        Self {
            method,
            conn: req.extensions().get::<ConnInfo>().cloned(),
            path,
            started: Instant::now(),
        }
    }

    /// The caller's verified identity.
    pub(crate) fn identity(&self) -> Result<Arc<PeerIdentity>, ApiError> {
        self.conn.as_ref().map(|c| Arc::clone(&c.identity)).ok_or(ApiError::NoIdentity)
    }

    pub(crate) fn finish<T>(self, result: Result<T, ApiError>) -> Result<Response<T>, Status> {
        let principal =
            self.conn.as_ref().map(|c| c.identity.principal.to_string()).unwrap_or_default();
        let peer = self.conn.as_ref().map(|c| c.peer_addr.to_string()).unwrap_or_default();
        let latency_us = self.started.elapsed().as_micros() as u64;
        match result {
            Ok(resp) => {
                tracing::info!(method = self.method, %principal, %peer, path = ?self.path, latency_us, "ok");
                Ok(Response::new(resp))
            }
            Err(err) => {
                let status = Status::from(&err);
                let rule = match &err {
                    ApiError::Denied(d) => d
                        .rule_line
                        .map(|l| format!("policy.csv:{l}"))
                        .unwrap_or_else(|| "no rule (default deny)".into()),
                    _ => String::new(),
                };
                tracing::info!(
                    method = self.method, %principal, %peer, path = ?self.path, latency_us,
                    code = ?status.code(), error = %err, %rule, "refused"
                );
                Err(status)
            }
        }
    }
}

macro_rules! rpc {
    ($self:ident, $name:literal, $request:ident, $inner:ident, $path:expr) => {{
        let path: String = $path(&$request);
        let call = Call::new($name, &$request, &path);
        let result = match call.identity() {
            Ok(id) => $self.$inner(&id, $request.into_inner()).await,
            Err(e) => Err(e),
        };
        call.finish(result)
    }};
}

#[tonic::async_trait]
impl Secrets for SecretsService {
    async fn put(
        &self,
        request: Request<v1::PutRequest>,
    ) -> Result<Response<v1::PutResponse>, Status> {
        rpc!(self, "Put", request, put_secret, |r: &Request<v1::PutRequest>| r
            .get_ref()
            .path
            .clone())
    }

    async fn get(
        &self,
        request: Request<v1::GetRequest>,
    ) -> Result<Response<v1::GetResponse>, Status> {
        rpc!(self, "Get", request, get_secret, |r: &Request<v1::GetRequest>| r
            .get_ref()
            .path
            .clone())
    }

    async fn delete(
        &self,
        request: Request<v1::DeleteRequest>,
    ) -> Result<Response<v1::DeleteResponse>, Status> {
        rpc!(self, "Delete", request, delete_secret, |r: &Request<v1::DeleteRequest>| r
            .get_ref()
            .path
            .clone())
    }

    async fn list(
        &self,
        request: Request<v1::ListRequest>,
    ) -> Result<Response<v1::ListResponse>, Status> {
        rpc!(self, "List", request, list_secrets, |r: &Request<v1::ListRequest>| r
            .get_ref()
            .prefix
            .clone())
    }

    async fn versions(
        &self,
        request: Request<v1::VersionsRequest>,
    ) -> Result<Response<v1::VersionsResponse>, Status> {
        rpc!(self, "Versions", request, secret_versions, |r: &Request<v1::VersionsRequest>| r
            .get_ref()
            .path
            .clone())
    }

    async fn who_am_i(
        &self,
        request: Request<v1::WhoAmIRequest>,
    ) -> Result<Response<v1::WhoAmIResponse>, Status> {
        rpc!(self, "WhoAmI", request, who_am_i, |_: &Request<v1::WhoAmIRequest>| String::new())
    }
}

fn timestamp(t: UnixMillis) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (t.0 / 1000) as i64,
        nanos: ((t.0 % 1000) * 1_000_000) as i32,
    }
}
