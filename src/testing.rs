//! The crate's internals its own integration tests need (the store conformance suite runs
//! the backends directly; the encryption tests read and forge sealed records). Only with the
//! `testing` feature, which `make test` turns on: a build of the gateway has no way around
//! the vault. Nothing else should enable it.

pub use crate::{
    crypto::{Keyring, KeyringHandle, open, parse_header, seal},
    limits::bypass as bypass_request_limits,
    store::{EmbeddedStore, EtcdStore, Store, StoredVersion},
    tls::proxy_header,
};
