//! The policy kept in the store: versions 1, 2, 3, … each holding a whole policy directory
//! ([`PolicyFiles`]), sealed under the KEK. `secretgate policy push` stores a new version by
//! compare-and-set on the one it builds on; every replica follows the newest authenticated
//! version that passes its own table tests. A replica refuses (and reports, keeping the
//! version in force): a record that does not verify, one that does not parse or fails its
//! tests, a record from a newer gateway schema, and any version not higher than the one in
//! force (a replayed older record, or newer versions deleted behind its back).

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{sync::Notify, task::JoinHandle, time::Instant};

use super::{Kek, record};
use crate::{
    authz::{Policy, PolicyError, PolicyFiles, PolicyHandle},
    registry::ReplicaRecord,
    store::{Store, StoreError},
};

/// The control object's kind in the store.
pub const KIND: &str = "policy";
/// Versions looked at, newest first, when following or starting.
const SCAN: usize = 16;
/// Largest sealed policy record: etcd refuses requests over `--max-request-bytes` (1.5 MiB
/// by default), and a transaction carries a little more than the record.
pub const MAX_RECORD_BYTES: usize = 1_400 * 1024;
/// How often the follower looks at the store even without a change event.
const RECHECK: Duration = Duration::from_secs(30);

/// One stored policy version's content (the record's body, JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyVersion {
    /// Its number (also in the record's authenticated header).
    pub version: u64,
    /// When it was stored (RFC 3339).
    pub created: String,
    /// Who stored it (the pushing principal, or `import` for the first version).
    pub author: String,
    /// Why: `push`, `rollback to version N`, `import from DIR`.
    pub note: String,
    /// The policy directory.
    pub files: PolicyFiles,
}

/// Why a control operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The pushed files are not a usable policy.
    #[error("the policy is refused: {0}")]
    Invalid(#[from] PolicyError),
    /// Another push stored a version first.
    #[error(
        "policy version {current} is the newest in the store, not {expected}: another push got \
         there first; look at `secretgate policy history` and push again"
    )]
    Raced {
        /// The version the push built on.
        expected: u64,
        /// The newest stored version.
        current: u64,
    },
    /// The sealed record would be too large for the store.
    #[error("the policy is {size} bytes stored; the limit is {limit} bytes")]
    TooLarge {
        /// The record's size.
        size: usize,
        /// [`MAX_RECORD_BYTES`].
        limit: usize,
    },
    /// No such stored version (never stored, or not authenticated).
    #[error("policy version {version} cannot be used: {why}")]
    Version {
        /// The version asked for.
        version: u64,
        /// Why.
        why: String,
    },
    /// This gateway takes its policy from files.
    #[error("this gateway's policy comes from its files (authz.source = \"files\"), not the store")]
    NotInStore,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A push's outcome: the version stored, and the live replicas that did not report
/// enforcing it (or a later one) before the deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    /// The version stored.
    pub version: u64,
    /// Live replicas enforcing it (or a later one).
    pub enforcing: Vec<String>,
    /// Live replicas that did not within the deadline.
    pub behind: Vec<String>,
}

/// One entry of `policy history`.
#[derive(Debug, Clone)]
pub struct HistoryEntry {
    /// The version.
    pub version: u64,
    /// Its content, when it verifies and parses.
    pub content: Result<PolicyVersion, String>,
}

/// The stored policy as this replica follows it.
pub struct StoredPolicy {
    store: Arc<dyn Store>,
    kek: Arc<Kek>,
    handle: PolicyHandle,
    /// The version in force and the digest of its record.
    accepted: Mutex<(u64, [u8; 32])>,
    /// Poked when a new version is in force (the registry then writes this replica's record).
    applied: Arc<Notify>,
}

impl std::fmt::Debug for StoredPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredPolicy").field("accepted", &self.accepted()).finish_non_exhaustive()
    }
}

impl StoredPolicy {
    /// The newest usable stored version at start, as a policy to put in force. When the store
    /// holds none, the files in `seed` become version 1 (once: of replicas starting together,
    /// one stores it and the others take it).
    pub async fn initial(
        store: &Arc<dyn Store>,
        kek: &Kek,
        seed: &std::path::Path,
    ) -> Result<(Policy, u64, [u8; 32]), ControlError> {
        loop {
            let stored = store.control_versions(KIND, None, SCAN).await?;
            if stored.is_empty() {
                let files = PolicyFiles::read_dir(seed)?;
                let body = PolicyVersion {
                    version: 1,
                    created: crate::clock::now_rfc3339_secs(),
                    author: "import".into(),
                    note: format!("import from {}", seed.display()),
                    files,
                };
                Policy::from_files(&body.files, &seed.display().to_string())?;
                match store.put_control(KIND, 1, &seal(kek, &body)?).await {
                    Ok(()) => {
                        tracing::info!(dir = %seed.display(), "the store held no policy: stored these files as version 1");
                    }
                    Err(StoreError::Conflict { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                continue;
            }
            let mut refused = Vec::new();
            for (version, bytes) in &stored {
                match open(kek, *version, bytes) {
                    Ok((policy, _)) => {
                        for why in &refused {
                            tracing::error!(%why, "stored policy version refused");
                        }
                        return Ok((policy, *version, digest(bytes)));
                    }
                    Err(why) => refused.push(format!("version {version}: {why}")),
                }
            }
            return Err(ControlError::Version {
                version: stored[0].0,
                why: format!("no usable policy among the newest stored: {}", refused.join("; ")),
            });
        }
    }

    /// Follows the store from the version in force (`version`, its record's `digest`).
    pub fn new(
        store: Arc<dyn Store>,
        kek: Arc<Kek>,
        handle: PolicyHandle,
        (version, digest): (u64, [u8; 32]),
        applied: Arc<Notify>,
    ) -> Arc<Self> {
        Arc::new(Self { store, kek, handle, accepted: Mutex::new((version, digest)), applied })
    }

    /// The version in force.
    pub fn accepted(&self) -> u64 {
        self.accepted.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    /// Spawns the follower: a new look at the store on each control change the store's feed
    /// reports (and every 30 s).
    pub fn follow(self: &Arc<Self>) -> JoinHandle<()> {
        let this = Arc::clone(self);
        let mut changes = self.store.control_changes();
        tokio::spawn(async move {
            loop {
                if let Err(e) = this.refresh().await {
                    tracing::warn!(error = %e, "cannot read the stored policy; the version in force stays");
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
        let stored = self.store.control_versions(KIND, None, SCAN).await?;
        let (accepted, accepted_digest) = *self.accepted.lock().unwrap_or_else(|e| e.into_inner());
        let newest = stored.first().map_or(0, |(v, _)| *v);
        let mut refused: Option<String> = None;
        if newest < accepted {
            refused = Some(format!(
                "the store's newest policy version is {newest}, older than version {accepted} in \
                 force (versions removed outside the gateway?); version {accepted} stays"
            ));
        } else if newest == accepted && digest(&stored[0].1) != accepted_digest {
            refused = Some(format!(
                "policy version {accepted} was changed in the store after this replica accepted \
                 it; the version accepted stays"
            ));
        }
        for (version, bytes) in stored.iter().filter(|(v, _)| *v > accepted) {
            match open(&self.kek, *version, bytes) {
                Ok((policy, _)) => {
                    let mut slot = self.accepted.lock().unwrap_or_else(|e| e.into_inner());
                    // Another refresh may have got further meanwhile.
                    if slot.0 >= *version {
                        break;
                    }
                    *slot = (*version, digest(bytes));
                    let rules = policy.rule_count();
                    let label = policy.version().to_owned();
                    self.handle.replace(policy);
                    drop(slot);
                    tracing::info!(version = %label, rules, "stored policy version in force");
                    self.applied.notify_one();
                    break;
                }
                Err(why) => {
                    refused.get_or_insert(format!("policy version {version} refused: {why}"));
                }
            }
        }
        if let Some(why) = refused {
            crate::metrics::reload_failed("policy");
            tracing::error!(%why, "stored policy refused; the version in force stays");
            self.handle.refuse(why);
        }
        Ok(())
    }

    /// Checks `files` and stores them as the version after `base` (the newest stored, when
    /// `None`), then waits up to `wait` until every live replica reports enforcing it.
    pub async fn push(
        &self,
        files: PolicyFiles,
        base: Option<u64>,
        author: &str,
        note: String,
        wait: Duration,
    ) -> Result<Pushed, ControlError> {
        Policy::from_files(&files, "pushed policy")?;
        let base = match base {
            Some(b) => b,
            None => self.store.control_versions(KIND, None, 1).await?.first().map_or(0, |v| v.0),
        };
        let body = PolicyVersion {
            version: base + 1,
            created: crate::clock::now_rfc3339_secs(),
            author: author.to_owned(),
            note,
            files,
        };
        let sealed = seal(&self.kek, &body)?;
        match self.store.put_control(KIND, body.version, &sealed).await {
            Ok(()) => {}
            Err(StoreError::Conflict { expected, current }) => {
                return Err(ControlError::Raced { expected, current });
            }
            Err(e) => return Err(e.into()),
        }
        self.refresh().await?;
        Ok(self.wait_for_tier(body.version, wait).await?)
    }

    /// Stores the content of stored version `version` again, as a new version.
    pub async fn rollback(
        &self,
        version: u64,
        author: &str,
        wait: Duration,
    ) -> Result<Pushed, ControlError> {
        let found = self.store.control_versions(KIND, Some(version + 1), 1).await?;
        let bytes = match found.first() {
            Some((v, bytes)) if *v == version => bytes,
            _ => return Err(ControlError::Version { version, why: "not stored".into() }),
        };
        let (_, body) = open(&self.kek, version, bytes)
            .map_err(|why| ControlError::Version { version, why })?;
        self.push(body.files, None, author, format!("rollback to version {version}"), wait).await
    }

    /// The newest `limit` stored versions, newest first.
    pub async fn history(&self, limit: usize) -> Result<Vec<HistoryEntry>, ControlError> {
        let stored = self.store.control_versions(KIND, None, limit).await?;
        Ok(stored
            .into_iter()
            .map(|(version, bytes)| HistoryEntry {
                version,
                content: open(&self.kek, version, &bytes).map(|(_, body)| body),
            })
            .collect())
    }

    /// Waits until every live replica's registry record names `version` or a later one.
    async fn wait_for_tier(&self, version: u64, wait: Duration) -> Result<Pushed, StoreError> {
        let deadline = Instant::now() + wait;
        loop {
            let mut enforcing = Vec::new();
            let mut behind = Vec::new();
            for (id, bytes) in self.store.replicas().await? {
                let at = serde_json::from_slice::<ReplicaRecord>(&bytes)
                    .ok()
                    .and_then(|r| number(&r.policy));
                if at.is_some_and(|n| n >= version) {
                    enforcing.push(id);
                } else {
                    behind.push(id);
                }
            }
            if behind.is_empty() || Instant::now() >= deadline {
                return Ok(Pushed { version, enforcing, behind });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The stored version number in a policy version label (`7:3fa2…`), if it has one.
pub fn number(label: &str) -> Option<u64> {
    label.split_once(':')?.0.parse().ok()
}

fn seal(kek: &Kek, body: &PolicyVersion) -> Result<Vec<u8>, ControlError> {
    let json = serde_json::to_vec(body).map_err(|e| StoreError::Backend(e.to_string()))?;
    let sealed = record::seal(kek, KIND, body.version, &json);
    if sealed.len() > MAX_RECORD_BYTES {
        return Err(ControlError::TooLarge { size: sealed.len(), limit: MAX_RECORD_BYTES });
    }
    Ok(sealed)
}

/// Verifies, parses and tests stored version `version`.
fn open(kek: &Kek, version: u64, bytes: &[u8]) -> Result<(Policy, PolicyVersion), String> {
    let body = record::open(kek, KIND, version, bytes).map_err(|e| e.to_string())?;
    let content: PolicyVersion =
        serde_json::from_slice(body).map_err(|e| format!("does not parse: {e}"))?;
    if content.version != version {
        return Err(format!("its content says version {}", content.version));
    }
    let files =
        PolicyFiles::from_map(content.files.clone().into_map()).map_err(|e| e.to_string())?;
    let policy = Policy::from_files(&files, &format!("policy version {version}"))
        .map_err(|e| e.to_string())?
        .numbered(version);
    Ok((policy, content))
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}
