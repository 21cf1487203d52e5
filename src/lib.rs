//! secretgate: a security-hardened mTLS gRPC gateway in front of a secrets store.
//!
//! Every caller is authenticated by its client certificate ([`tls`], [`Principal`]); every
//! request is parsed into checked domain types ([`SecretPath`], [`Target`]) and authorized
//! ([`authz`]: a [`Permit`](authz::Permit) for exactly one action on one target) before it
//! reaches the [`Vault`], the only way to the store and the keyring: it takes the path from
//! the permit and, for a change, the durable audit record of its intent ([`audit`]). The
//! store and the keys themselves are not reachable from outside the crate (but through the
//! `testing` feature, for this crate's own integration tests). The request pipeline and the
//! architecture are described in `DESIGN.md`; the threat model in `SECURITY.md`.
//!
//! The binary (`src/main.rs`) only parses the command line and calls [`run_cli`].

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod audit;
pub mod authz;
pub mod config;
pub mod metrics;
pub mod proto;
pub mod tls;

mod api;
mod cli;
mod clock;
pub mod control;
mod crypto;
mod fs;
mod health;
mod identity;
mod limits;
mod log;
mod path;
mod registry;
mod reload;
mod server;
mod store;
mod text;
#[cfg(test)]
mod text_edits;

#[cfg(feature = "testing")]
pub mod testing;

pub use api::{
    AdminService, ApiError, KeyStatus, KeyUsage, Opened, REQUEST_ID_HEADER, RewrapCounts,
    SecretsService, Vault, code_name,
};
pub use cli::{Cli, run as run_cli};
pub use config::{Config, ValidConfig};
pub use health::{LIVENESS, READINESS};
pub use identity::{PeerIdentity, Principal};
pub use path::{MAX_PATH_BYTES, MAX_SEGMENTS, PathError, PathPrefix, SecretPath, Target};
pub use server::{Gateway, Reloaded, StartError};
pub use store::{
    ChangeEvent, ChangeKind, Changes, SecretMeta, Since, StoreError, StoredValue, UnixMillis,
    VersionMeta,
};
