//! Control state in the embedded store: a `control` table, (kind, version) → sealed record,
//! with the same create-only rule as etcd (see [`crate::store::Store::put_control`]).

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::{EmbeddedStore, backend};
use crate::store::StoreError;

const CONTROL: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("control");

/// `Fenced` if the control version `fence` names exists (see
/// [`crate::store::Store::fence_writes`]); read in the write's own transaction.
pub(super) fn check_fence(
    txn: &redb::WriteTransaction,
    fence: Option<&(String, u64)>,
) -> Result<(), StoreError> {
    let Some((kind, version)) = fence else { return Ok(()) };
    let table = txn.open_table(CONTROL).map_err(backend)?;
    match table.get((kind.as_str(), *version)).map_err(backend)? {
        Some(_) => Err(StoreError::Fenced { kind: kind.clone(), version: *version }),
        None => Ok(()),
    }
}

impl EmbeddedStore {
    /// The write fence in force.
    pub(super) fn fence(&self) -> Option<std::sync::Arc<(String, u64)>> {
        self.fence.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// See [`crate::store::Store::put_control`].
    pub(super) async fn create_control(
        &self,
        kind: &str,
        version: u64,
        record: &[u8],
    ) -> Result<(), StoreError> {
        let (kind, record) = (kind.to_owned(), record.to_vec());
        let changed = std::sync::Arc::clone(&self.control);
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            {
                let mut table = txn.open_table(CONTROL).map_err(backend)?;
                if let Some(mine) = table.get((kind.as_str(), version)).map_err(backend)? {
                    // A retried try whose first one committed finds its own record.
                    if mine.value() == record.as_slice() {
                        return Ok(());
                    }
                }
                let newest = table
                    .range((kind.as_str(), 0)..=(kind.as_str(), u64::MAX))
                    .map_err(backend)?
                    .next_back()
                    .transpose()
                    .map_err(backend)?
                    .map_or(0, |(k, _)| k.value().1);
                if newest + 1 != version {
                    return Err(StoreError::Conflict {
                        expected: version.saturating_sub(1),
                        current: newest,
                    });
                }
                table.insert((kind.as_str(), version), record.as_slice()).map_err(backend)?;
            }
            txn.commit().map_err(backend)?;
            changed.send_modify(|n| *n += 1);
            Ok(())
        })
        .await
    }

    /// See [`crate::store::Store::control_versions`].
    pub(super) async fn read_control(
        &self,
        kind: &str,
        below: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let kind = kind.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = match txn.open_table(CONTROL) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(backend(e)),
            };
            let end = below.unwrap_or(u64::MAX);
            let mut out = Vec::new();
            for entry in
                table.range((kind.as_str(), 0)..(kind.as_str(), end)).map_err(backend)?.rev()
            {
                if out.len() >= limit {
                    break;
                }
                let (k, v) = entry.map_err(backend)?;
                out.push((k.value().1, v.value().to_vec()));
            }
            Ok(out)
        })
        .await
    }
}
