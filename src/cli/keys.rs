//! `secretgate keys …`: the key rotation lifecycle.
//!
//! `init`, `add` and `promote` edit the keyring file (running gateways reload it within
//! `crypto.reload_interval_secs`, or at once on SIGHUP). `status`, `rewrap` and `retire`
//! also ask a running gateway about the store, because only the gateway may touch it. With
//! `--store`, `add`, `promote`, `retire` and `status` work on the keyring kept in the store
//! (`crypto.source = "store"`), through the gateway's Control service ([`super::keys_store`]).

use std::path::Path;

use anyhow::{Context, bail};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::{ClientArgs, Output, client};
use crate::{
    crypto::{KeyState, Keyring},
    proto::v1::{self, admin_client::AdminClient},
};

/// `secretgate keys` subcommands.
#[derive(Debug, Subcommand)]
pub(super) enum KeysCommand {
    /// Create a new keyring with one primary key (mode 0600). Refuses to overwrite.
    Init,
    /// Add a new active key (it opens, but does not yet seal new writes).
    Add {
        /// Change the keyring kept in the store (crypto.source = "store") through the
        /// gateway, not the file.
        #[arg(long)]
        store: bool,
        #[command(flatten)]
        conn: ClientArgs,
    },
    /// Make a key primary: new writes are sealed with it; the old primary becomes active.
    /// With --store: refused until every live replica holds the key.
    Promote {
        /// Key id.
        id: String,
        /// Change the keyring kept in the store, through the gateway.
        #[arg(long)]
        store: bool,
        #[command(flatten)]
        conn: ClientArgs,
    },
    /// Show each key's state and how many stored records it seals (asks the gateway).
    Status {
        /// The keyring is kept in the store: do not compare it with a file.
        #[arg(long)]
        store: bool,
        #[command(flatten)]
        conn: ClientArgs,
    },
    /// Re-seal every stored record not under the primary key, online (asks the gateway).
    Rewrap {
        #[command(flatten)]
        conn: ClientArgs,
    },
    /// Retire a key: it is no longer loaded. Refused while any record still uses it (and,
    /// with --store, while a live replica still seals with it).
    Retire {
        /// Key id.
        id: String,
        /// Change the keyring kept in the store, through the gateway.
        #[arg(long)]
        store: bool,
        #[command(flatten)]
        conn: ClientArgs,
    },
}

pub(super) async fn run(keyring: &Path, command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Init => {
            if keyring.exists() {
                bail!("{} already exists; refusing to overwrite a keyring", keyring.display());
            }
            if let Some(dir) = keyring.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            let ring = Keyring::generate()?;
            ring.save(keyring)?;
            println!("created {} with primary key {}", keyring.display(), ring.primary().id);
            println!("back this file up securely: losing a key loses every value sealed under it");
        }
        KeysCommand::Add { store: true, conn } => super::keys_store::add(&conn).await?,
        KeysCommand::Promote { id, store: true, conn } => {
            super::keys_store::promote(&id, &conn).await?
        }
        KeysCommand::Retire { id, store: true, conn } => {
            super::keys_store::retire(&id, &conn).await?
        }
        KeysCommand::Status { store: true, conn } => status(None, &conn).await?,
        KeysCommand::Add { .. } => {
            let mut ring = Keyring::load(keyring)?;
            let id = ring.add()?;
            ring.save(keyring)?;
            println!(
                "added active key {id}; once every gateway has reloaded, run: secretgate keys promote {id}"
            );
        }
        KeysCommand::Promote { id, .. } => {
            let mut ring = Keyring::load(keyring)?;
            ring.promote(&id)?;
            ring.save(keyring)?;
            println!(
                "{id} is now primary; once every gateway has reloaded, run: secretgate keys rewrap"
            );
        }
        KeysCommand::Status { conn, .. } => status(Some(keyring), &conn).await?,
        KeysCommand::Rewrap { conn } => rewrap(&conn).await?,
        KeysCommand::Retire { id, conn, .. } => retire(keyring, &id, &conn).await?,
    }
    Ok(())
}

pub(super) async fn admin(
    conn: &ClientArgs,
) -> anyhow::Result<AdminClient<tonic::transport::Channel>> {
    Ok(AdminClient::new(client::channel(conn).await?))
}

/// Each key's state and record count, from the gateway; compared with the keyring file, or
/// (`keyring` = `None`) the keyring kept in the store.
async fn status(keyring: Option<&Path>, conn: &ClientArgs) -> anyhow::Result<()> {
    let file = keyring.map(Keyring::load).transpose()?;
    let resp = admin(conn)
        .await?
        .key_status(v1::KeyStatusRequest {})
        .await
        .map_err(client::rpc_error)?
        .into_inner();
    let in_sync = file.as_ref().is_none_or(|f| resp.keyring_version == f.version());
    match conn.output {
        Output::Human => {
            println!("{:<24} {:<8} {:<22} RECORDS", "KEY", "STATE", "CREATED");
            for k in &resp.keys {
                println!("{:<24} {:<8} {:<22} {}", k.id, k.state, k.created, k.records);
            }
            let compared = match (&file, in_sync) {
                (None, _) => "kept in the store",
                (Some(_), true) => "same as the file",
                (Some(_), false) => "DIFFERS from the file: not reloaded yet",
            };
            println!(
                "records: {} total, {} unreadable; gateway keyring {} ({compared})",
                resp.total_records, resp.unreadable_records, resp.keyring_version,
            );
            if file.is_none() && !resp.reload_error.is_empty() {
                let why = crate::text::escaped(&resp.reload_error);
                println!("REFUSED a newer stored version: {why}");
            }
        }
        Output::Json => {
            let keys: Vec<_> = resp
                .keys
                .iter()
                .map(|k| json!({"id": k.id, "state": k.state, "created": k.created, "records": k.records}))
                .collect();
            println!(
                "{}",
                json!({
                    "keyring_version": resp.keyring_version,
                    "file_version": file.as_ref().map(|f| f.version()),
                    "in_sync": in_sync, "keys": keys, "total_records": resp.total_records,
                    "unreadable_records": resp.unreadable_records, "reload_error": resp.reload_error,
                })
            );
        }
    }
    Ok(())
}

async fn rewrap(conn: &ClientArgs) -> anyhow::Result<()> {
    let mut stream = admin(conn)
        .await?
        .rewrap(v1::RewrapRequest {})
        .await
        .map_err(client::rpc_error)?
        .into_inner();
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} records {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut last = v1::RewrapProgress::default();
    while let Some(p) = stream.message().await.map_err(client::rpc_error)? {
        bar.set_length(p.to_rewrap);
        bar.set_position((p.rewrapped + p.skipped + p.failed).min(p.to_rewrap));
        bar.set_message(format!("(scanned {})", p.scanned));
        last = p;
    }
    bar.finish_and_clear();
    match conn.output {
        Output::Human => println!(
            "rewrap {}: {} rewrapped, {} already under the primary key, {} skipped (changed concurrently), {} failed",
            if last.done { "complete" } else { "INTERRUPTED" },
            last.rewrapped,
            last.current,
            last.skipped,
            last.failed
        ),
        Output::Json => println!(
            "{}",
            json!({"done": last.done, "scanned": last.scanned, "rewrapped": last.rewrapped,
                   "current": last.current, "skipped": last.skipped, "failed": last.failed})
        ),
    }
    if !last.done {
        bail!("rewrap did not finish; run it again to resume");
    }
    if last.failed > 0 {
        bail!("{} records could not be opened; see the gateway log", last.failed);
    }
    Ok(())
}

async fn retire(keyring: &Path, id: &str, conn: &ClientArgs) -> anyhow::Result<()> {
    let mut ring = Keyring::load(keyring)?;
    let Some(key) = ring.keys().iter().find(|k| k.id.as_str() == id) else {
        bail!("no key {id} in {}", keyring.display());
    };
    if key.state == KeyState::Retired {
        println!("{id} is already retired");
        return Ok(());
    }
    let resp = admin(conn)
        .await?
        .key_status(v1::KeyStatusRequest {})
        .await
        .map_err(client::rpc_error)?
        .into_inner();
    if resp.keyring_version != ring.version() {
        bail!(
            "the gateway runs keyring {} but the file is {}: wait for it to reload (or send SIGHUP), then retry",
            resp.keyring_version,
            ring.version()
        );
    }
    let used = resp.keys.iter().find(|k| k.id == id).map_or(0, |k| k.records);
    if used > 0 {
        bail!(
            "refusing to retire {id}: {used} stored records are still sealed under it; run `secretgate keys rewrap` first"
        );
    }
    ring.retire(id)?;
    ring.save(keyring)?;
    println!("retired {id}; it stays in the file but gateways no longer load it");
    Ok(())
}
