//! The gRPC services: `secretgate.v1.Secrets` and `secretgate.v1.Admin`.
//!
//! Each RPC follows the pipeline of DESIGN.md, one `Result`-returning step after another,
//! so a request that fails a step never reaches the next: the connection's identity (set by
//! the TLS acceptor) → parse the request into domain types (`SecretPath`, limits) →
//! authorize (a [`Permit`](crate::authz::Permit), or PERMISSION_DENIED) → the [`Vault`]
//! (seal/open and store, which demand the permit) → respond. Every error leaves through
//! [`ApiError`] and its single mapping to `tonic::Status`.

mod admin;
mod call;
mod control;
mod error;
mod rotation;
mod vault;
mod watch;

use tonic::{Request, Response, Status};
use tracing::Instrument;
use zeroize::Zeroizing;

pub use admin::AdminService;
pub use call::{REQUEST_ID_HEADER, code_name};
pub use control::{ControlService, MAX_CONTROL_REQUEST_BYTES};
pub use error::{ApiError, RESUME_REVISION_HEADER};
pub use rotation::{KeyUsage, RewrapCounts};
pub use vault::{KeyStatus, Opened, Vault};
pub use watch::{WatchStream, Watchers};

use self::call::Call;
use crate::{
    audit::AuditLog,
    authz::{Action, Authorizer, act},
    limits::{Class, RateLimiter},
    path::{PathPrefix, SecretPath},
    proto::v1::{self, secrets_server::Secrets},
    store::UnixMillis,
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
    audit: AuditLog,
    limiter: RateLimiter,
    max_value_bytes: u64,
    watchers: Watchers,
}

impl SecretsService {
    /// A service over `vault`, deciding with `authz`, recording to `audit`, admitting
    /// requests past `limiter`, refusing values larger than `max_value_bytes`, keeping its
    /// Watch streams within `watchers`.
    pub fn new(
        vault: Vault,
        authz: Authorizer,
        audit: AuditLog,
        limiter: RateLimiter,
        max_value_bytes: u64,
        watchers: Watchers,
    ) -> Self {
        Self { vault, authz, audit, limiter, max_value_bytes, watchers }
    }

    /// The context of one RPC, once admitted past the rate limits: `path` is the path or
    /// prefix as sent (for the record).
    fn call<T>(
        &self,
        method: &'static str,
        class: Class,
        request: &Request<T>,
        path: &str,
    ) -> Result<Call, Status> {
        Call::admit(&self.limiter, class, method, request, path, &self.audit)
    }

    async fn put_secret(
        &self,
        call: &mut Call,
        req: v1::PutRequest,
    ) -> Result<v1::PutResponse, ApiError> {
        let path = SecretPath::parse(&req.path)?;
        let value = Zeroizing::new(req.value);
        if value.len() as u64 > self.max_value_bytes {
            return Err(ApiError::ValueTooLarge { size: value.len(), limit: self.max_value_bytes });
        }
        let permit = call.authorize::<act::Write>(&self.authz, path)?;
        let intent = call.intent().await?;
        let (info, key_id) =
            self.vault.write(&permit, intent, req.expected_version, &value).await?;
        call.version(info.version);
        call.key_id(&key_id);
        Ok(v1::PutResponse { version: info.version, created_time: Some(timestamp(info.created)) })
    }

    async fn get_secret(
        &self,
        call: &mut Call,
        req: v1::GetRequest,
    ) -> Result<v1::GetResponse, ApiError> {
        let path = SecretPath::parse(&req.path)?;
        let permit = call.authorize::<act::Read>(&self.authz, path)?;
        let mut opened = self.vault.read(&permit, req.version.filter(|v| *v != 0)).await?;
        call.version(opened.entry.version);
        call.key_id(&opened.key_id);
        Ok(v1::GetResponse {
            path: permit.path().as_str().to_owned(),
            value: std::mem::take(&mut *opened.value),
            version: opened.entry.version,
            created_time: Some(timestamp(opened.entry.created)),
            current_version: opened.entry.current_version,
        })
    }

    async fn delete_secret(
        &self,
        call: &mut Call,
        req: v1::DeleteRequest,
    ) -> Result<v1::DeleteResponse, ApiError> {
        let path = SecretPath::parse(&req.path)?;
        let permit = call.authorize::<act::Delete>(&self.authz, path)?;
        let intent = call.intent().await?;
        let info = self.vault.delete(&permit, intent).await?;
        call.version(info.version);
        Ok(v1::DeleteResponse { version: info.version, deleted_time: info.deleted.map(timestamp) })
    }

    async fn undelete_secret(
        &self,
        call: &mut Call,
        req: v1::UndeleteRequest,
    ) -> Result<v1::UndeleteResponse, ApiError> {
        let path = SecretPath::parse(&req.path)?;
        let permit = call.authorize::<act::Delete>(&self.authz, path)?;
        let intent = call.intent().await?;
        let info = self.vault.undelete(&permit, intent, req.version).await?;
        call.version(info.version);
        Ok(v1::UndeleteResponse { version: info.version })
    }

    async fn destroy_secret(
        &self,
        call: &mut Call,
        req: v1::DestroyRequest,
    ) -> Result<v1::DestroyResponse, ApiError> {
        let path = SecretPath::parse(&req.path)?;
        let permit = call.authorize::<act::Destroy>(&self.authz, path)?;
        let intent = call.intent().await?;
        let info = self.vault.destroy(&permit, intent, req.version).await?;
        call.version(info.version);
        let destroyed_time = info.destroyed.map(timestamp);
        Ok(v1::DestroyResponse { version: info.version, destroyed_time })
    }

    async fn list_secrets(
        &self,
        call: &mut Call,
        req: v1::ListRequest,
    ) -> Result<v1::ListResponse, ApiError> {
        let prefix = PathPrefix::parse(&req.prefix)?;
        let id = call.identity()?;
        call.filtered(Action::List);
        let size = match req.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n > MAX_PAGE_SIZE => return Err(ApiError::InvalidPageSize(n)),
            n => n,
        } as usize;
        let principal = &id.principal;
        let mut after = match req.page_token.as_str() {
            "" => None,
            token => {
                // Another caller's token, or one for another prefix, opens as nothing: one
                // error for every mismatch, so a replay tells nothing about the cursor.
                let p = self
                    .vault
                    .open_page_token(principal, &prefix, token)
                    .filter(|p| p.starts_with(&prefix))
                    .ok_or(ApiError::InvalidPageToken)?;
                Some(p)
            }
        };
        // Where no rule could let the caller list or read anything, the answer is an empty
        // last page, whatever the store holds: not even a token says that hidden names exist.
        if !self.authz.may_list_under(principal, &prefix) {
            return Ok(v1::ListResponse { paths: Vec::new(), next_page_token: String::new() });
        }
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
                let keep = self.authz.allows_any(principal, &p, &[Action::List, Action::Read]);
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
            (Some(last), false) => self.vault.seal_page_token(principal, &prefix, last)?,
            _ => String::new(),
        };
        Ok(v1::ListResponse {
            paths: visible.into_iter().map(|p| p.as_str().to_owned()).collect(),
            next_page_token,
        })
    }

    async fn secret_versions(
        &self,
        call: &mut Call,
        req: v1::VersionsRequest,
    ) -> Result<v1::VersionsResponse, ApiError> {
        let path = SecretPath::parse(&req.path)?;
        let permit = call.authorize::<act::Read>(&self.authz, path)?;
        let meta = self.vault.versions(&permit).await?;
        call.version(meta.current_version);
        Ok(v1::VersionsResponse {
            current_version: meta.current_version,
            versions: meta
                .versions
                .iter()
                .map(|v| v1::VersionInfo {
                    version: v.version,
                    created_time: Some(timestamp(v.created)),
                    deleted_time: v.deleted.map(timestamp),
                    destroyed_time: v.destroyed.map(timestamp),
                })
                .collect(),
        })
    }

    async fn who_am_i(
        &self,
        call: &mut Call,
        _req: v1::WhoAmIRequest,
    ) -> Result<v1::WhoAmIResponse, ApiError> {
        let id = call.identity()?;
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

#[tonic::async_trait]
impl Secrets for SecretsService {
    async fn put(
        &self,
        request: Request<v1::PutRequest>,
    ) -> Result<Response<v1::PutResponse>, Status> {
        let mut call = self.call(
            "secretgate.v1.Secrets/Put",
            Class::Write,
            &request,
            &request.get_ref().path,
        )?;
        let span = call.span();
        async move {
            let result = self.put_secret(&mut call, request.into_inner()).await;
            call.finish(result).await
        }
        .instrument(span)
        .await
    }

    async fn get(
        &self,
        request: Request<v1::GetRequest>,
    ) -> Result<Response<v1::GetResponse>, Status> {
        let mut call =
            self.call("secretgate.v1.Secrets/Get", Class::Read, &request, &request.get_ref().path)?;
        let span = call.span();
        async move {
            let result = self.get_secret(&mut call, request.into_inner()).await;
            call.finish(result).await
        }
        .instrument(span)
        .await
    }

    async fn undelete(
        &self,
        request: Request<v1::UndeleteRequest>,
    ) -> Result<Response<v1::UndeleteResponse>, Status> {
        let path = &request.get_ref().path;
        let mut call = self.call("secretgate.v1.Secrets/Undelete", Class::Write, &request, path)?;
        let span = call.span();
        async move {
            let result = self.undelete_secret(&mut call, request.into_inner()).await;
            call.finish(result).await
        }
        .instrument(span)
        .await
    }

    async fn destroy(
        &self,
        request: Request<v1::DestroyRequest>,
    ) -> Result<Response<v1::DestroyResponse>, Status> {
        let path = &request.get_ref().path;
        let mut call = self.call("secretgate.v1.Secrets/Destroy", Class::Write, &request, path)?;
        let span = call.span();
        async move {
            let result = self.destroy_secret(&mut call, request.into_inner()).await;
            call.finish(result).await
        }
        .instrument(span)
        .await
    }

    async fn delete(
        &self,
        request: Request<v1::DeleteRequest>,
    ) -> Result<Response<v1::DeleteResponse>, Status> {
        let mut call = self.call(
            "secretgate.v1.Secrets/Delete",
            Class::Write,
            &request,
            &request.get_ref().path,
        )?;
        let span = call.span();
        async move {
            let result = self.delete_secret(&mut call, request.into_inner()).await;
            call.finish(result).await
        }
        .instrument(span)
        .await
    }

    async fn list(
        &self,
        request: Request<v1::ListRequest>,
    ) -> Result<Response<v1::ListResponse>, Status> {
        let mut call = self.call(
            "secretgate.v1.Secrets/List",
            Class::Read,
            &request,
            &request.get_ref().prefix,
        )?;
        let span = call.span();
        async move {
            let result = self.list_secrets(&mut call, request.into_inner()).await;
            call.finish(result).await
        }
        .instrument(span)
        .await
    }

    async fn versions(
        &self,
        request: Request<v1::VersionsRequest>,
    ) -> Result<Response<v1::VersionsResponse>, Status> {
        let mut call = self.call(
            "secretgate.v1.Secrets/Versions",
            Class::Read,
            &request,
            &request.get_ref().path,
        )?;
        let span = call.span();
        async move {
            let result = self.secret_versions(&mut call, request.into_inner()).await;
            call.finish(result).await
        }
        .instrument(span)
        .await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<v1::WatchRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let prefix = &request.get_ref().prefix;
        let mut call = self.call("secretgate.v1.Secrets/Watch", Class::Read, &request, prefix)?;
        let span = call.span();
        async move {
            let req = request.into_inner();
            let changes = self.vault.changes();
            let opened =
                watch::Watcher::open(&mut call, &self.watchers, &self.authz, changes, &req).await;
            let open = match opened {
                Ok(open) => open,
                Err(e) => return call.finish(Err(e)).await,
            };
            if let Err(e) = call.opened().await {
                return call.finish(Err(e)).await;
            }
            // The answer (headers) goes now; the outcome is recorded when the stream ends.
            let answer = call.stream_started(());
            let stream = open.start(call).into_stream();
            Ok(answer.map(|()| stream))
        }
        .instrument(span)
        .await
    }

    async fn who_am_i(
        &self,
        request: Request<v1::WhoAmIRequest>,
    ) -> Result<Response<v1::WhoAmIResponse>, Status> {
        let mut call = self.call("secretgate.v1.Secrets/WhoAmI", Class::Read, &request, "")?;
        let span = call.span();
        async move {
            let result = SecretsService::who_am_i(self, &mut call, request.into_inner()).await;
            call.finish(result).await
        }
        .instrument(span)
        .await
    }
}

fn timestamp(t: UnixMillis) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (t.0 / 1000) as i64,
        nanos: ((t.0 % 1000) * 1_000_000) as i32,
    }
}
