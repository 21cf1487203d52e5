//! `secretgate trust push`: the client trust kept in the store
//! (`tls.client_trust_source = "store"`), through the gateway's Control service.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;

use super::{ClientArgs, client, policy_store};
use crate::{
    proto::v1,
    tls::{ClientCas, ClientCrl},
};

/// `secretgate trust` subcommands.
#[derive(Debug, Subcommand)]
pub(super) enum TrustCommand {
    /// Check a client CA bundle and CRLs as the gateway does, then store them as the next
    /// client trust version (tls.client_trust_source = "store"; needs `admin` on `/`). Every
    /// replica follows it; exits 1 if a live replica did not within --wait-secs.
    Push {
        /// PEM file: the client CA bundle.
        #[arg(long)]
        ca: PathBuf,
        /// PEM file: the CRLs, one from each client CA (none without it).
        #[arg(long)]
        crl: Option<PathBuf>,
        /// Seconds to wait for every live replica to enforce it (at most 60).
        #[arg(long, default_value_t = 10)]
        wait_secs: u32,
        #[command(flatten)]
        conn: ClientArgs,
    },
}

pub(super) async fn run(command: TrustCommand) -> anyhow::Result<()> {
    let TrustCommand::Push { ca, crl, wait_secs, conn } = command;
    // The same checks as the gateway's, here first, with the files' names in the errors.
    let cas = ClientCas::read(&ca)?;
    if let Some(crl) = &crl {
        ClientCrl::load(crl, &cas)?;
    }
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
    };
    let request = v1::PushTrustRequest {
        client_ca: read(&ca)?,
        client_crl: crl.as_ref().map(read).transpose()?.unwrap_or_default(),
        wait_ms: wait_secs.saturating_mul(1000),
    };
    let mut control = client::control(&conn).await?;
    let pushed = control.push_trust(request).await.map_err(client::rpc_error)?.into_inner();
    policy_store::report(&pushed, "client trust stored", &conn)
}
