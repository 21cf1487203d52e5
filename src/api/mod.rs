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
mod error;
mod vault;

use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

pub use admin::AdminService;
pub use call::{REQUEST_ID_HEADER, code_name};
pub use error::ApiError;
pub use vault::Vault;

use self::call::Call;
use crate::{
    audit::AuditLog,
    authz::{Action, Authorizer},
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
    max_value_bytes: u64,
}

impl SecretsService {
    /// A service over `vault`, deciding with `authz`, recording to `audit`, refusing values
    /// larger than `max_value_bytes`.
    pub fn new(vault: Vault, authz: Authorizer, audit: AuditLog, max_value_bytes: u64) -> Self {
        Self { vault, authz, audit, max_value_bytes }
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
        let permit = call.authorize(&self.authz, path.as_str(), Action::Write)?;
        call.intent().await?;
        let (info, key_id) = self.vault.write(&permit, &path, req.expected_version, &value).await?;
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
        let permit = call.authorize(&self.authz, path.as_str(), Action::Read)?;
        let mut opened = self.vault.read(&permit, &path, req.version.filter(|v| *v != 0)).await?;
        call.version(opened.entry.version);
        call.key_id(&opened.key_id);
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
        call: &mut Call,
        req: v1::DeleteRequest,
    ) -> Result<v1::DeleteResponse, ApiError> {
        let path = SecretPath::parse(&req.path)?;
        let permit = call.authorize(&self.authz, path.as_str(), Action::Delete)?;
        call.intent().await?;
        let info = self.vault.delete(&permit, &path).await?;
        call.version(info.version);
        Ok(v1::DeleteResponse { version: info.version, deleted_time: info.deleted.map(timestamp) })
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
        let mut after = match req.page_token.as_str() {
            "" => None,
            token => {
                let p = self.open_page_token(token).ok_or(ApiError::InvalidPageToken)?;
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
            (Some(last), false) => self.seal_page_token(last)?,
            _ => String::new(),
        };
        Ok(v1::ListResponse {
            paths: visible.into_iter().map(|p| p.as_str().to_owned()).collect(),
            next_page_token,
        })
    }

    /// A page token: the last path a List looked at, which may be one the caller may not
    /// see, so it is sealed (encrypted and authenticated) under the primary key: opaque to
    /// the client, and a forged or altered token is refused.
    fn seal_page_token(&self, last: &SecretPath) -> Result<String, ApiError> {
        use base64::Engine;
        let keys = self.vault.keys().current();
        let sealed =
            crate::crypto::seal(keys.primary(), &page_token_path(), 0, last.as_str().as_bytes())
                .map_err(|e| {
                    tracing::error!(error = %e, "cannot seal a page token");
                    ApiError::Internal
                })?;
        Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sealed))
    }

    /// The path inside a page token from [`Self::seal_page_token`], if it is one.
    fn open_page_token(&self, token: &str) -> Option<SecretPath> {
        use base64::Engine;
        let sealed = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token).ok()?;
        let keys = self.vault.keys().current();
        let path = crate::crypto::open(&keys, &page_token_path(), 0, &sealed).ok()?;
        SecretPath::parse(std::str::from_utf8(&path).ok()?).ok()
    }

    async fn secret_versions(
        &self,
        call: &mut Call,
        req: v1::VersionsRequest,
    ) -> Result<v1::VersionsResponse, ApiError> {
        let path = SecretPath::parse(&req.path)?;
        let permit = call.authorize(&self.authz, path.as_str(), Action::Read)?;
        let meta = self.vault.versions(&permit, &path).await?;
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

macro_rules! rpc {
    ($self:ident, $name:literal, $request:ident, $inner:ident, $path:expr) => {{
        let path: String = $path(&$request);
        let mut call =
            Call::new(concat!("secretgate.v1.Secrets/", $name), &$request, &path, &$self.audit);
        let result = $self.$inner(&mut call, $request.into_inner()).await;
        call.finish(result).await
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

/// The associated-data path page tokens are sealed for: version 0 is never a stored
/// version, so no stored envelope opens as a token or the other way round.
fn page_token_path() -> SecretPath {
    // A constant canonical path: parsing cannot fail.
    SecretPath::parse("/.page-token").unwrap_or_else(|_| unreachable!("canonical constant"))
}

fn timestamp(t: UnixMillis) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (t.0 / 1000) as i64,
        nanos: ((t.0 % 1000) * 1_000_000) as i32,
    }
}
