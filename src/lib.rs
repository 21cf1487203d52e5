//! secretgate: a security-hardened mTLS gRPC gateway in front of a secrets store.
//!
//! Every caller is authenticated by its client certificate ([`tls`], [`identity`]); every
//! request is parsed into checked domain types ([`SecretPath`]) before it reaches the
//! [`Store`]. The request pipeline and the architecture are described in `DESIGN.md`; the
//! threat model in `SECURITY.md`.
//!
//! The binary (`src/main.rs`) only parses the command line and calls [`cli::run`].

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod api;
pub mod audit;
pub mod authz;
pub mod cli;
mod clock;
pub mod config;
pub mod crypto;
mod fs;
pub mod identity;
pub mod path;
pub mod proto;
pub mod reload;
pub mod server;
pub mod store;
mod text;
pub mod tls;

#[cfg(test)]
mod testing;

pub use api::{ApiError, SecretsService, Vault};
pub use config::{Config, ValidConfig};
pub use identity::{PeerIdentity, Principal};
pub use path::{PathPrefix, SecretPath, Target};
pub use server::{Gateway, Reloaded, StartError};
pub use store::{EmbeddedStore, Store, StoreError};
