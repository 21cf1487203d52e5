//! Application-layer encryption: every secret value is sealed by the gateway before it
//! reaches the store, so the store (and its backups, and anyone who can read etcd) never
//! holds a plaintext value.
//!
//! - [`keyring`]: the keys and their lifecycle (primary / active / retired);
//! - [`envelope`]: the sealed format and its associated data (path, version, key id);

pub mod envelope;
pub mod keyring;

pub use envelope::{EnvelopeError, open, parse_header, seal};
pub use keyring::{KeyState, Keyring, KeyringError};

/// The keyring in force in a running gateway, reloaded when its file changes.
pub type KeyringHandle = std::sync::Arc<crate::reload::Reloadable<Keyring>>;
