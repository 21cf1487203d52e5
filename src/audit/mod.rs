//! The tamper-evident audit log: one JSON record per request and per refused handshake,
//! hash-chained, with signed checkpoints, group-committed, failing closed.
//!
//! - [`record`]: the record format and the hash chain.
//! - [`signing`]: the Ed25519 checkpoint signing key.
//! - [`writer`]: the log writer: group commit (one fsync for every record that arrived
//!   meanwhile), rotation, fail-closed with a bounded wait, outage records, checkpoints.
//!
//! The promise: a request is answered only after its record is durable, and a write (Put,
//! Delete, Rewrap) is applied to the store only after its *intent* record is durable; its
//! *outcome* record follows before the client gets the answer.

pub mod query;
pub mod record;
pub mod signing;
pub mod verify;
pub mod writer;

pub use record::{Kind, Phase, Record};
pub use signing::{SigningKey, VerifyingKey};
pub use writer::{AuditError, AuditLog, AuditStats, InFlight, Intent, Writing};
