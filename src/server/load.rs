//! Loading the control state a gateway starts with: the client trust, the keyring and the
//! policy, each from this replica's files or (with a `"store"` source) the newest usable
//! version kept in the store, which the replica then follows.

use std::{path::Path, sync::Arc};

use super::StartError;
use crate::{
    authz::Authorizer,
    config::{Source, ValidConfig},
    control::{
        ControlError, HighWater, Kek, StoredKeyring, StoredPolicy, StoredTrust,
        keyring::{KeyringKind, SealedKeyring},
        policy::PolicyKind,
        stored::{Kind, Stored},
        trust,
    },
    crypto::{Keyring, KeyringHandle},
    reload::Reloadable,
    store::Store,
    tls::{self, ClientTrust, Loader, ServerCertHandle, TrustHandle},
};

/// What following control state in the store needs: the store, the KEK (none without a
/// `"store"` source), the notice for the registry, and the versions enforced before.
pub(super) struct Follow<'a> {
    pub(super) store: &'a Arc<dyn Store>,
    pub(super) kek: Option<&'a Arc<Kek>>,
    pub(super) applied: &'a Arc<tokio::sync::Notify>,
    pub(super) marks: &'a Arc<HighWater>,
}

impl Follow<'_> {
    /// Starts following `K` in the store: its newest usable version (`seed` fills an empty
    /// store) in force in a handle named `what` after `path`, and the follower.
    async fn start<K: Kind>(
        &self,
        kek: &Arc<Kek>,
        ctx: K::Context,
        (path, what): (&Path, &'static str),
        seed: impl Fn() -> Result<(K::Content, String), ControlError>,
    ) -> Result<(Arc<Reloadable<K::Value>>, Arc<Stored<K>>), StartError> {
        let (value, version, digest) =
            Stored::<K>::initial(self.store, (kek, self.marks), &ctx, seed).await?;
        let handle = Reloadable::new(value, path, what);
        let stored = Stored::new(
            Arc::clone(self.store),
            (Arc::clone(kek), ctx),
            Arc::clone(&handle),
            (version, digest),
            (Arc::clone(self.applied), Arc::clone(self.marks)),
        );
        Ok((handle, stored))
    }
}

/// Loads the client trust: `tls.client_ca` and `tls.client_crl` (with the loader that
/// reloads them), or the newest usable version in the store, seeded from those files once.
pub(super) async fn load_trust(
    config: &ValidConfig,
    cert: &ServerCertHandle,
    f: &Follow<'_>,
) -> Result<(TrustHandle, Option<Loader<ClientTrust>>, Option<Arc<StoredTrust>>), StartError> {
    let tls = &config.tls;
    let Some(kek) = f.kek.filter(|_| tls.client_trust_source == Source::Store) else {
        let (handle, load) = tls::client_trust(tls, cert)?;
        return Ok((handle, Some(load), None));
    };
    let read = |path: &std::path::Path| match path.as_os_str().is_empty() {
        true => Ok(String::new()),
        false => std::fs::read_to_string(path)
            .map_err(|e| ControlError::Refused(format!("{}: {e}", path.display()))),
    };
    let seed = || {
        let files = trust::TrustFiles {
            client_ca: read(&tls.client_ca)?,
            client_crl: read(&tls.client_crl)?,
        };
        Ok((files, format!("import from {}", tls.client_ca.display())))
    };
    let ctx = trust::context(tls, cert);
    let (handle, stored) = f.start(kek, ctx, (&tls.client_ca, "client trust"), seed).await?;
    Ok((handle, None, Some(stored)))
}

/// The policy in force at start: from `authz.policies` (`authz.source = "files"`), or the
/// newest usable version in the store, followed from then on.
pub(super) async fn load_policy(
    config: &ValidConfig,
    f: &Follow<'_>,
) -> Result<(Authorizer, Option<Arc<StoredPolicy>>), StartError> {
    let dir = &config.authz.policies;
    let Some(kek) = f.kek.filter(|_| config.authz.source == Source::Store) else {
        return Ok((Authorizer::load(dir)?, None));
    };
    let seed = || {
        let files = crate::authz::PolicyFiles::read_dir(dir)?;
        Ok((files, format!("import from {}", dir.display())))
    };
    let (handle, stored) = f.start::<PolicyKind>(kek, (), (dir, "policy"), seed).await?;
    let authz = Authorizer::from_handle(handle);
    Ok((authz, Some(stored)))
}

/// Loads the keyring: the file `crypto.keyring` (watched for changes once the gateway is
/// up), or the newest usable version in the store (followed), seeded from that file once.
pub(super) async fn load_keyring(
    config: &ValidConfig,
    f: &Follow<'_>,
) -> Result<(KeyringHandle, Option<Arc<StoredKeyring>>), StartError> {
    let path = &config.crypto.keyring;
    let Some(kek) = f.kek.filter(|_| config.crypto.source == Source::Store) else {
        let ring = Keyring::load(path)?;
        tracing::info!(keyring = %path.display(), version = ring.version(), primary = %ring.primary().id, "keyring loaded");
        return Ok((Reloadable::new(ring, path, "keyring"), None));
    };
    let seed = || {
        let ring = Keyring::load(path).map_err(|e| ControlError::Keyring(e.to_string()))?;
        Ok((SealedKeyring::seal(kek, 1, &ring)?, format!("import from {}", path.display())))
    };
    let (handle, stored) = f.start::<KeyringKind>(kek, (), (path, "keyring"), seed).await?;
    let ring = handle.current();
    tracing::info!(version = ring.version(), primary = %ring.primary().id, "keyring loaded from the store");
    Ok((handle, Some(stored)))
}
