//! One kind of control object kept in the store (the policy, the keyring), as this replica
//! follows it: versions 1, 2, 3, … each a sealed record ([`super::record`]); a new version is
//! stored by compare-and-set on the one it builds on; every replica puts in force the newest
//! authenticated version it can use. A replica refuses (and reports, keeping the version in
//! force): a record that does not verify, one whose content it cannot use, one from a newer
//! record schema, and any version not higher than the one in force (a replayed older
//! record, or newer versions deleted behind its back).

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::{sync::Notify, task::JoinHandle, time::Instant};

use super::{ControlError, HighWater, Kek, record};
use crate::{
    registry::ReplicaRecord,
    reload::Reloadable,
    store::{Store, StoreError},
};

/// Versions looked at, newest first, when following or starting.
const SCAN: usize = 16;
/// Largest sealed record: a policy of about 100,000 rules with its tests (the Control
/// service decodes requests of up to 16 MiB). On etcd a record over 1 MiB is stored in
/// parts (see the etcd backend).
pub const MAX_RECORD_BYTES: usize = 20 << 20;
/// How often the follower looks at the store even without a change event.
const RECHECK: Duration = Duration::from_secs(30);

/// A kind of control object.
pub trait Kind: Send + Sync + 'static {
    /// Its name in the store and in messages: `policy`, `keyring`.
    const NAME: &'static str;
    /// What a replica puts in force.
    type Value: Send + Sync + 'static;
    /// What a stored version holds.
    type Content: Serialize + DeserializeOwned + Clone + Send + Sync + 'static;
    /// What building a value needs besides the content (the TLS settings, for client trust).
    type Context: Send + Sync + 'static;
    /// The value of verified content stored as `version` (parsed, checked, labelled
    /// `version:FINGERPRINT`), or why it cannot be used.
    fn build(
        ctx: &Self::Context,
        kek: &Kek,
        version: u64,
        content: &Self::Content,
    ) -> Result<Self::Value, String>;
    /// The version of this kind a replica's registry record says it enforces.
    fn reported(record: &ReplicaRecord) -> Option<u64>;
    /// Whether sealed writes are fenced on this kind's next version (the keyring: see
    /// [`Store::fence_writes`]).
    const FENCES_WRITES: bool = false;
    /// Stored version `from`'s content as content for version `to` (sealed under the KEK in
    /// force): the same content, unless it is bound to its version or encrypted.
    fn rebind(
        _ctx: &Self::Context,
        _kek: &Kek,
        content: &Self::Content,
        _from: u64,
        _to: u64,
    ) -> Result<Self::Content, ControlError> {
        Ok(content.clone())
    }
}

/// One stored version (the record's body, JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Versioned<C> {
    /// Its number (also in the record's authenticated header).
    pub version: u64,
    /// When it was stored (RFC 3339).
    pub created: String,
    /// Who stored it (the principal, or `import`).
    pub author: String,
    /// Why: `push`, `rollback to version N`, `import from FILE`, `add key K`, ….
    pub note: String,
    /// The content.
    pub content: C,
}

/// A stored version's outcome: the version stored, and the live replicas that did or did
/// not report enforcing it (or a later one) before the deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    /// The version stored.
    pub version: u64,
    /// Live replicas enforcing it (or a later one).
    pub enforcing: Vec<String>,
    /// Live replicas that did not within the deadline.
    pub behind: Vec<String>,
}

/// One entry of a history.
#[derive(Debug, Clone)]
pub struct HistoryEntry<C> {
    /// The version.
    pub version: u64,
    /// Its content, when it verifies and parses.
    pub content: Result<Versioned<C>, String>,
}

/// See the module docs.
pub struct Stored<K: Kind> {
    store: Arc<dyn Store>,
    kek: Arc<Kek>,
    ctx: K::Context,
    handle: Arc<Reloadable<K::Value>>,
    /// The version in force and the digest of its record.
    accepted: Mutex<(u64, [u8; 32])>,
    /// Poked when a new version is in force (the registry then writes this replica's record).
    applied: Arc<Notify>,
    /// The versions put in force, kept across restarts.
    marks: Arc<HighWater>,
    /// The last refusal reported: the same one found again (each change event, every 30 s)
    /// is not logged and counted again.
    reported: Mutex<Option<String>>,
    /// Serializes this replica's read-modify-write changes (keyring steps).
    pub(super) changing: tokio::sync::Mutex<()>,
}

impl<K: Kind> std::fmt::Debug for Stored<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stored")
            .field("kind", &K::NAME)
            .field("accepted", &self.accepted())
            .finish_non_exhaustive()
    }
}

impl<K: Kind> Stored<K> {
    /// The newest usable stored version at start: the value to put in force, its version and
    /// its record's digest. When the store holds none, `seed` gives version 1's content and
    /// note (once: of replicas starting together, one stores it and the others take it).
    pub async fn initial(
        store: &Arc<dyn Store>,
        (kek, marks): (&Kek, &HighWater),
        ctx: &K::Context,
        seed: impl Fn() -> Result<(K::Content, String), ControlError>,
    ) -> Result<(K::Value, u64, [u8; 32]), ControlError> {
        loop {
            // The newest alone first (records can be large); older ones only when it is
            // unusable.
            let newest = store.control_versions(K::NAME, None, 1).await?;
            let Some((top, _)) = newest.first() else {
                let (content, note) = seed()?;
                let body = Versioned {
                    version: 1,
                    created: crate::clock::now_rfc3339_secs(),
                    author: "import".into(),
                    note: note.clone(),
                    content,
                };
                K::build(ctx, kek, 1, &body.content)
                    .map_err(|why| ControlError::Version { version: 1, why })?;
                match store.put_control(K::NAME, 1, &seal::<K>(kek, &body)?).await {
                    Ok(()) => {
                        tracing::info!(kind = K::NAME, %note, "the store held none: stored as version 1")
                    }
                    Err(StoreError::Conflict { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                continue;
            };
            let top = *top;
            let mut refused = Vec::new();
            let mut found = first_usable::<K>(ctx, kek, newest, &mut refused);
            if found.is_none() {
                let older = store.control_versions(K::NAME, Some(top), SCAN - 1).await?;
                found = first_usable::<K>(ctx, kek, older, &mut refused);
            }
            if let Some((value, version, digest)) = found {
                for why in &refused {
                    tracing::error!(kind = K::NAME, %why, "stored version refused");
                }
                let mark = marks.mark(K::NAME);
                if version < mark {
                    return Err(ControlError::RolledBack { kind: K::NAME, newest: version, mark });
                }
                return Ok((value, version, digest));
            }
            return Err(ControlError::Version {
                version: top,
                why: format!(
                    "no usable {} among the newest stored: {}",
                    K::NAME,
                    refused.join("; ")
                ),
            });
        }
    }

    /// Follows the store from the version in force (`version`, its record's `digest`).
    pub fn new(
        store: Arc<dyn Store>,
        (kek, ctx): (Arc<Kek>, K::Context),
        handle: Arc<Reloadable<K::Value>>,
        (version, digest): (u64, [u8; 32]),
        (applied, marks): (Arc<Notify>, Arc<HighWater>),
    ) -> Arc<Self> {
        marks.raise(K::NAME, version);
        if K::FENCES_WRITES {
            store.fence_writes(K::NAME, version + 1);
        }
        Arc::new(Self {
            store,
            kek,
            ctx,
            handle,
            accepted: Mutex::new((version, digest)),
            applied,
            marks,
            reported: Mutex::new(None),
            changing: tokio::sync::Mutex::new(()),
        })
    }

    /// The version in force.
    pub fn accepted(&self) -> u64 {
        self.accepted.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    /// The value in force.
    pub fn current(&self) -> Arc<K::Value> {
        self.handle.current()
    }

    /// The KEK.
    pub(super) fn kek(&self) -> &Kek {
        &self.kek
    }

    /// The id of the KEK new versions are sealed under.
    pub fn kek_id(&self) -> &str {
        self.kek.id()
    }

    /// Spawns the follower: a new look at the store on each control change the store's feed
    /// reports (and every 30 s).
    pub fn follow(self: &Arc<Self>) -> JoinHandle<()> {
        let this = Arc::clone(self);
        let mut changes = self.store.control_changes();
        tokio::spawn(async move {
            loop {
                if let Err(e) = this.refresh().await {
                    tracing::warn!(kind = K::NAME, error = %e, "cannot read the store; the version in force stays");
                }
                tokio::select! {
                    r = changes.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep(RECHECK) => {}
                }
            }
        })
    }

    /// Reads the newest stored versions and puts the newest usable one above the version in
    /// force in force; reports what it refuses.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let (accepted, accepted_digest) = *self.accepted.lock().unwrap_or_else(|e| e.into_inner());
        // The newest alone first: in the steady state it is the one in force, and records can
        // be large (a policy of many rules).
        let mut stored = self.store.control_versions(K::NAME, None, 1).await?;
        let newest = stored.first().map_or(0, |(v, _)| *v);
        if newest > accepted + 1 {
            let more = usize::try_from(newest - accepted).unwrap_or(SCAN).min(SCAN);
            stored = self.store.control_versions(K::NAME, None, more).await?;
        }
        let name = K::NAME;
        let mut refused: Option<String> = None;
        if newest < accepted {
            refused = Some(format!(
                "the store's newest {name} version is {newest}, older than version {accepted} in \
                 force (versions removed outside the gateway?); version {accepted} stays"
            ));
        } else if newest == accepted && digest(&stored[0].1) != accepted_digest {
            refused = Some(format!(
                "{name} version {accepted} was changed in the store after this replica accepted \
                 it; the version accepted stays"
            ));
        }
        for (version, bytes) in stored.iter().filter(|(v, _)| *v > accepted) {
            match open::<K>(&self.ctx, &self.kek, *version, bytes) {
                Ok((value, _)) => {
                    self.accept(*version, value, bytes);
                    break;
                }
                Err(why) => {
                    refused.get_or_insert(format!("{name} version {version} refused: {why}"));
                }
            }
        }
        let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        match refused {
            Some(why) => {
                if reported.as_ref() != Some(&why) {
                    crate::metrics::reload_failed(self.handle.what());
                    tracing::error!(%why, "stored control state refused; the version in force stays");
                    *reported = Some(why.clone());
                }
                self.handle.refuse(why);
            }
            None => {
                if reported.take().is_some() {
                    self.handle.clear_error();
                }
            }
        }
        Ok(())
    }

    /// Puts `value`, stored as `version` in the record `bytes`, in force, unless this replica
    /// already got as far (another refresh, or a push).
    fn accept(&self, version: u64, value: K::Value, bytes: &[u8]) {
        let mut slot = self.accepted.lock().unwrap_or_else(|e| e.into_inner());
        if slot.0 >= version {
            return;
        }
        *slot = (version, digest(bytes));
        self.handle.replace(value);
        self.marks.raise(K::NAME, version);
        if K::FENCES_WRITES {
            self.store.fence_writes(K::NAME, version + 1);
        }
        drop(slot);
        tracing::info!(kind = K::NAME, version, "stored version in force");
        self.applied.notify_one();
    }

    /// Stores `content` as the version after `base` (the newest stored, when `None`) once
    /// `check` accepts it, puts it in force here, then waits up to `wait` until every live
    /// replica reports enforcing it.
    pub async fn push(
        &self,
        content: K::Content,
        base: Option<u64>,
        author: &str,
        note: String,
        wait: Duration,
    ) -> Result<Pushed, ControlError> {
        let base = match base {
            Some(b) => b,
            None => self.store.control_versions(K::NAME, None, 1).await?.first().map_or(0, |v| v.0),
        };
        let body = Versioned {
            version: base + 1,
            created: crate::clock::now_rfc3339_secs(),
            author: author.to_owned(),
            note,
            content,
        };
        let value = K::build(&self.ctx, &self.kek, body.version, &body.content)
            .map_err(ControlError::Refused)?;
        let sealed = seal::<K>(&self.kek, &body)?;
        match self.store.put_control(K::NAME, body.version, &sealed).await {
            Ok(()) => {}
            Err(StoreError::Conflict { expected, current }) => {
                return Err(ControlError::Raced { kind: K::NAME, expected, current });
            }
            Err(e) => return Err(e.into()),
        }
        // In force here at once, as built (not read back and built again).
        let version = body.version;
        self.accept(version, value, &sealed);
        Ok(self
            .wait_for_tier(wait, |r| K::reported(r).is_some_and(|n| n >= version))
            .await?
            .into_pushed(version))
    }

    /// Stores the version in force again, unchanged, as the next version sealed under the
    /// KEK in force: the step of a KEK rotation after which the previous KEK can go.
    pub async fn reseal(&self, author: &str, wait: Duration) -> Result<Pushed, ControlError> {
        let _one = self.changing.lock().await;
        self.refresh().await?;
        let base = self.accepted();
        let body = self.version(base).await?;
        let content = K::rebind(&self.ctx, &self.kek, &body.content, base, base + 1)?;
        let note = format!("version {base} sealed again under KEK {}", self.kek.id());
        self.push(content, Some(base), author, note, wait).await
    }

    /// Stored version `version`, verified.
    pub async fn version(&self, version: u64) -> Result<Versioned<K::Content>, ControlError> {
        let found = self.store.control_versions(K::NAME, Some(version + 1), 1).await?;
        let bytes = match found.first() {
            Some((v, bytes)) if *v == version => bytes,
            _ => return Err(ControlError::Version { version, why: "not stored".into() }),
        };
        open::<K>(&self.ctx, &self.kek, version, bytes)
            .map(|(_, body)| body)
            .map_err(|why| ControlError::Version { version, why })
    }

    /// The newest `limit` stored versions, newest first.
    pub async fn history(
        &self,
        limit: usize,
    ) -> Result<Vec<HistoryEntry<K::Content>>, ControlError> {
        let stored = self.store.control_versions(K::NAME, None, limit).await?;
        Ok(stored
            .into_iter()
            .map(|(version, bytes)| HistoryEntry {
                version,
                content: open_body::<K>(&self.kek, version, &bytes),
            })
            .collect())
    }

    /// Waits (up to `wait`) until every live replica's registry record satisfies `ready`;
    /// the replicas that do and do not.
    pub async fn wait_for_tier(
        &self,
        wait: Duration,
        ready: impl Fn(&ReplicaRecord) -> bool,
    ) -> Result<Tier, StoreError> {
        let deadline = Instant::now() + wait;
        loop {
            let mut tier = Tier::default();
            for (id, bytes) in self.store.replicas().await? {
                let record = serde_json::from_slice::<ReplicaRecord>(&bytes).ok();
                if record.as_ref().is_some_and(&ready) {
                    tier.ready.push(id);
                } else {
                    tier.waiting.push(id);
                }
            }
            if tier.waiting.is_empty() || Instant::now() >= deadline {
                return Ok(tier);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A control object a replica must bring up to date before it serves again after its
/// registry lease lapsed (see [`crate::registry::Standing`]).
#[async_trait::async_trait]
pub trait CatchUp: Send + Sync {
    /// Reads the store and puts the newest usable version in force.
    async fn catch_up(&self) -> Result<(), StoreError>;
}

#[async_trait::async_trait]
impl<K: Kind> CatchUp for Stored<K> {
    async fn catch_up(&self) -> Result<(), StoreError> {
        self.refresh().await
    }
}

/// The live replicas, split by a condition.
#[derive(Debug, Default)]
pub struct Tier {
    /// Those that satisfy it.
    pub ready: Vec<String>,
    /// Those that do not (yet).
    pub waiting: Vec<String>,
}

impl Tier {
    fn into_pushed(self, version: u64) -> Pushed {
        Pushed { version, enforcing: self.ready, behind: self.waiting }
    }
}

/// The stored version number in a version label (`7:3fa2…`), if it has one.
pub fn number(label: &str) -> Option<u64> {
    label.split_once(':')?.0.parse().ok()
}

fn seal<K: Kind>(kek: &Kek, body: &Versioned<K::Content>) -> Result<Vec<u8>, ControlError> {
    let json = zeroize::Zeroizing::new(
        serde_json::to_vec(body).map_err(|e| StoreError::Backend(e.to_string()))?,
    );
    let sealed = record::seal(kek, K::NAME, body.version, &json);
    if sealed.len() > MAX_RECORD_BYTES {
        return Err(ControlError::TooLarge { size: sealed.len(), limit: MAX_RECORD_BYTES });
    }
    Ok(sealed)
}

fn open_body<K: Kind>(
    kek: &Kek,
    version: u64,
    bytes: &[u8],
) -> Result<Versioned<K::Content>, String> {
    let body = record::open(kek, K::NAME, version, bytes).map_err(|e| e.to_string())?;
    let content: Versioned<K::Content> =
        serde_json::from_slice(body).map_err(|e| format!("does not parse: {e}"))?;
    if content.version != version {
        return Err(format!("its content says version {}", content.version));
    }
    Ok(content)
}

/// Verifies, parses and checks stored version `version`.
fn open<K: Kind>(
    ctx: &K::Context,
    kek: &Kek,
    version: u64,
    bytes: &[u8],
) -> Result<(K::Value, Versioned<K::Content>), String> {
    let body = open_body::<K>(kek, version, bytes)?;
    Ok((K::build(ctx, kek, version, &body.content)?, body))
}

/// The first of `versions` (newest first) that opens: its value, version and record digest;
/// why each before it did not, in `refused`.
fn first_usable<K: Kind>(
    ctx: &K::Context,
    kek: &Kek,
    versions: Vec<(u64, Vec<u8>)>,
    refused: &mut Vec<String>,
) -> Option<(K::Value, u64, [u8; 32])> {
    for (version, bytes) in versions {
        match open::<K>(ctx, kek, version, &bytes) {
            Ok((value, _)) => return Some((value, version, digest(&bytes))),
            Err(why) => refused.push(format!("version {version}: {why}")),
        }
    }
    None
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}
