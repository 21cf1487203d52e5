//! `secretgate policy push | history | rollback`: the policy kept in the store
//! (`authz.source = "store"`), through the gateway's Control service.

use std::path::Path;

use anyhow::bail;
use serde_json::json;

use super::{ClientArgs, Output, client};
use crate::{
    authz::{Policy, PolicyFiles, reference},
    proto::v1,
    text::escaped,
};

/// Checks `dir` as `policy check` and `policy test` do, then sends it.
pub(super) async fn push(
    dir: &Path,
    base_version: u64,
    wait_secs: u32,
    conn: &ClientArgs,
) -> anyhow::Result<()> {
    let files = PolicyFiles::read_dir(dir)?;
    let policy = Policy::from_files_untested(&files, &dir.display().to_string())?;
    let csv = files.iter().find(|(n, _)| *n == "policy.csv").map(|(_, t)| t).unwrap_or_default();
    reference::enforcer(csv)
        .await
        .map_err(|e| anyhow::anyhow!("casbin refuses {}: {e}", dir.join("policy.csv").display()))?;
    let failures = policy.run_tests();
    for f in &failures {
        println!("FAIL {}", escaped(f));
    }
    if !failures.is_empty() {
        bail!("{} of {} policy tests failed; nothing pushed", failures.len(), policy.test_count());
    }
    if policy.test_count() == 0 {
        bail!("no tests found in {}; nothing pushed", dir.join("tests").display());
    }
    let request = v1::PushPolicyRequest {
        files: files.into_map().into_iter().collect(),
        base_version,
        wait_ms: wait_secs.saturating_mul(1000),
    };
    let pushed = client::control(conn)
        .await?
        .push_policy(request)
        .await
        .map_err(client::rpc_error)?
        .into_inner();
    report(&pushed, &format!("policy {} stored", policy.version()), conn)
}

pub(super) async fn rollback(
    version: u64,
    wait_secs: u32,
    conn: &ClientArgs,
) -> anyhow::Result<()> {
    let request = v1::RollbackPolicyRequest { version, wait_ms: wait_secs.saturating_mul(1000) };
    let pushed = client::control(conn)
        .await?
        .rollback_policy(request)
        .await
        .map_err(client::rpc_error)?
        .into_inner();
    report(&pushed, &format!("the content of version {version} stored again"), conn)
}

pub(super) fn report(
    pushed: &v1::PushResponse,
    what: &str,
    conn: &ClientArgs,
) -> anyhow::Result<()> {
    let human = format!(
        "{what} as version {}; {} live replica(s) enforcing it",
        pushed.version,
        pushed.enforcing.len()
    );
    let json = json!({
        "version": pushed.version, "enforcing": pushed.enforcing, "behind": pushed.behind,
    });
    client::followed(conn, (human, json), pushed.version, &pushed.behind)
}

pub(super) async fn history(limit: u32, conn: &ClientArgs) -> anyhow::Result<()> {
    let request = v1::PolicyHistoryRequest { limit };
    let h = client::control(conn)
        .await?
        .policy_history(request)
        .await
        .map_err(client::rpc_error)?
        .into_inner();
    match conn.output {
        Output::Human => {
            println!(
                "{:>7}  {:<20}  {:<20}  {:>6}  AUTHOR / NOTE",
                "VERSION", "CREATED", "FINGERPRINT", "RULES"
            );
            for v in &h.versions {
                let mark = if v.version == h.in_force { "*" } else { " " };
                // Stored text: escaped before it reaches a terminal.
                println!(
                    "{mark}{:>6}  {:<20}  {:<20}  {:>6}  {} / {}",
                    v.version,
                    escaped(&v.created),
                    escaped(&v.fingerprint),
                    v.rules,
                    escaped(&v.author),
                    escaped(&v.note)
                );
                if !v.problem.is_empty() {
                    println!("         UNUSABLE: {}", escaped(&v.problem));
                }
            }
            println!("* in force on the replica that answered");
        }
        Output::Json => {
            let versions: Vec<_> = h
                .versions
                .iter()
                .map(|v| {
                    json!({
                        "version": v.version, "created": v.created, "author": v.author,
                        "note": v.note, "fingerprint": v.fingerprint, "rules": v.rules,
                        "problem": v.problem,
                    })
                })
                .collect();
            client::print_json(&json!({ "versions": versions, "in_force": h.in_force }));
        }
    }
    Ok(())
}
