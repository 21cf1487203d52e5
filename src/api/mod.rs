//! The gRPC services: `secretgate.v1.Secrets`, in front of the store.
//!
//! Each RPC follows the pipeline of DESIGN.md: the connection's identity (set by the TLS
//! acceptor) → parse the request into domain types (`SecretPath`, limits) → store → respond.
//! Authorization, audit and encryption slot in between parse and store; each is a step that
//! returns `Result`, so a request that fails one never reaches the next. Every error leaves
//! through [`ApiError`] and its single mapping to `tonic::Status`.

mod admin;
mod error;

use std::{sync::Arc, time::Instant};

use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

pub use admin::AdminService;
pub use error::ApiError;

use crate::{
    crypto::{self, KeyringHandle},
    path::{PathPrefix, SecretPath},
    proto::v1::{self, secrets_server::Secrets},
    store::{Store, StoreError, UnixMillis, VersionInfo},
    tls::ConnInfo,
};

/// Largest `page_size` a List accepts.
pub const MAX_PAGE_SIZE: u32 = 1000;
/// `page_size` used when a List asks for 0.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// How often an unconditional Put retries after losing a race to another writer.
const PUT_RETRIES: usize = 16;

/// The `Secrets` service.
#[derive(Clone)]
pub struct SecretsService {
    store: Arc<dyn Store>,
    keys: KeyringHandle,
    max_value_bytes: u64,
}

impl SecretsService {
    /// A service over `store`, sealing values with `keys`, refusing values larger than
    /// `max_value_bytes`.
    pub fn new(store: Arc<dyn Store>, keys: KeyringHandle, max_value_bytes: u64) -> Self {
        Self { store, keys, max_value_bytes }
    }

    /// Seals `value` for `path` at `version` under the primary key in force.
    fn seal(&self, path: &SecretPath, version: u64, value: &[u8]) -> Result<Vec<u8>, ApiError> {
        crypto::seal(self.keys.current().primary(), path, version, value).map_err(|e| {
            tracing::error!(%path, version, error = %e, "cannot seal a value");
            ApiError::Internal
        })
    }

    async fn put_secret(&self, req: v1::PutRequest) -> Result<v1::PutResponse, ApiError> {
        let path = SecretPath::parse(&req.path)?;
        let value = Zeroizing::new(req.value);
        if value.len() as u64 > self.max_value_bytes {
            return Err(ApiError::ValueTooLarge { size: value.len(), limit: self.max_value_bytes });
        }
        let info = match req.expected_version {
            Some(expected) => {
                let sealed = self.seal(&path, expected.saturating_add(1), &value)?;
                self.store
                    .put(&path, expected, &sealed)
                    .await
                    .map_err(|e| ApiError::from_store(e, &path))?
            }
            None => self.put_unconditional(&path, &value).await?,
        };
        Ok(v1::PutResponse { version: info.version, created_time: Some(timestamp(info.created)) })
    }

    /// A write without a version guard is still compare-and-set underneath, so the version
    /// is known before the write; losing a race to another writer just means trying again.
    async fn put_unconditional(
        &self,
        path: &SecretPath,
        value: &[u8],
    ) -> Result<VersionInfo, ApiError> {
        let store_err = |e| ApiError::from_store(e, path);
        for _ in 0..PUT_RETRIES {
            let current = self.store.current_version(path).await.map_err(store_err)?;
            let sealed = self.seal(path, current + 1, value)?;
            match self.store.put(path, current, &sealed).await {
                Err(StoreError::Conflict { .. }) => continue,
                other => return other.map_err(store_err),
            }
        }
        Err(ApiError::Contended(path.clone()))
    }

    async fn get_secret(&self, req: v1::GetRequest) -> Result<v1::GetResponse, ApiError> {
        let path = SecretPath::parse(&req.path)?;
        let version = req.version.filter(|v| *v != 0);
        let entry =
            self.store.get(&path, version).await.map_err(|e| ApiError::from_store(e, &path))?;
        let mut value = crypto::open(&self.keys.current(), &path, entry.version, &entry.value)
            .map_err(|e| {
                tracing::error!(%path, version = entry.version, error = %e, "stored value does not open");
                ApiError::Undecryptable { path: path.clone(), version: entry.version }
            })?;
        Ok(v1::GetResponse {
            path: path.as_str().to_owned(),
            value: std::mem::take(&mut *value),
            version: entry.version,
            created_time: Some(timestamp(entry.created)),
            current_version: entry.current_version,
        })
    }

    async fn delete_secret(&self, req: v1::DeleteRequest) -> Result<v1::DeleteResponse, ApiError> {
        let path = SecretPath::parse(&req.path)?;
        let info = self.store.delete(&path).await.map_err(|e| ApiError::from_store(e, &path))?;
        Ok(v1::DeleteResponse { version: info.version, deleted_time: info.deleted.map(timestamp) })
    }

    async fn list_secrets(&self, req: v1::ListRequest) -> Result<v1::ListResponse, ApiError> {
        let prefix = PathPrefix::parse(&req.prefix)?;
        let size = match req.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n > MAX_PAGE_SIZE => return Err(ApiError::InvalidPageSize(n)),
            n => n,
        } as usize;
        let after = match req.page_token.as_str() {
            "" => None,
            token => {
                let p = SecretPath::parse(token).map_err(|_| ApiError::InvalidPageToken)?;
                if !p.starts_with(&prefix) {
                    return Err(ApiError::InvalidPageToken);
                }
                Some(p)
            }
        };
        let mut paths = self
            .store
            .list(&prefix, after.as_ref(), size + 1)
            .await
            .map_err(ApiError::from_store_fault)?;
        let more = paths.len() > size;
        paths.truncate(size);
        let next_page_token = match paths.last() {
            Some(last) if more => last.as_str().to_owned(),
            _ => String::new(),
        };
        Ok(v1::ListResponse {
            paths: paths.into_iter().map(|p| p.as_str().to_owned()).collect(),
            next_page_token,
        })
    }

    async fn secret_versions(
        &self,
        req: v1::VersionsRequest,
    ) -> Result<v1::VersionsResponse, ApiError> {
        let path = SecretPath::parse(&req.path)?;
        let meta = self.store.versions(&path).await.map_err(|e| ApiError::from_store(e, &path))?;
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
}

/// Per-request context: who, what, when — for the log line every request ends with.
pub(crate) struct Call {
    method: &'static str,
    conn: Option<ConnInfo>,
    path: String,
    started: Instant,
}

impl Call {
    fn new<T>(method: &'static str, req: &Request<T>, path: &str) -> Self {
        // Paths are attacker-controlled text: keep a bounded excerpt for the log.
        let path = path.chars().take(600).collect();
        Self {
            method,
            conn: req.extensions().get::<ConnInfo>().cloned(),
            path,
            started: Instant::now(),
        }
    }

    fn identity(&self) -> Result<(), ApiError> {
        self.conn.as_ref().map(|_| ()).ok_or(ApiError::NoIdentity)
    }

    fn finish<T>(self, result: Result<T, ApiError>) -> Result<Response<T>, Status> {
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
                tracing::info!(
                    method = self.method, %principal, %peer, path = ?self.path, latency_us,
                    code = ?status.code(), error = %err, "refused"
                );
                Err(status)
            }
        }
    }
}

macro_rules! rpc {
    ($self:ident, $name:literal, $request:ident, $inner:ident, $path:ident) => {{
        let call = Call::new($name, &$request, &$request.get_ref().$path);
        let result = match call.identity() {
            Ok(()) => $self.$inner($request.into_inner()).await,
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
        rpc!(self, "Put", request, put_secret, path)
    }

    async fn get(
        &self,
        request: Request<v1::GetRequest>,
    ) -> Result<Response<v1::GetResponse>, Status> {
        rpc!(self, "Get", request, get_secret, path)
    }

    async fn delete(
        &self,
        request: Request<v1::DeleteRequest>,
    ) -> Result<Response<v1::DeleteResponse>, Status> {
        rpc!(self, "Delete", request, delete_secret, path)
    }

    async fn list(
        &self,
        request: Request<v1::ListRequest>,
    ) -> Result<Response<v1::ListResponse>, Status> {
        rpc!(self, "List", request, list_secrets, prefix)
    }

    async fn versions(
        &self,
        request: Request<v1::VersionsRequest>,
    ) -> Result<Response<v1::VersionsResponse>, Status> {
        rpc!(self, "Versions", request, secret_versions, path)
    }
}

fn timestamp(t: UnixMillis) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (t.0 / 1000) as i64,
        nanos: ((t.0 % 1000) * 1_000_000) as i32,
    }
}
