//! `secretgate policy …`: check, test and explain the policies in a directory, offline.

use std::path::Path;

use anyhow::bail;
use clap::Subcommand;

use super::ClientArgs;
use crate::{
    authz::{Action, Policy, reference},
    path::Target,
};

/// `secretgate policy` subcommands.
#[derive(Debug, Subcommand)]
pub(super) enum PolicyCommand {
    /// Parse model.conf and policy.csv (here and in casbin itself); report errors by file and line.
    Check,
    /// Run the table tests in tests/*.toml; exit non-zero on any failure.
    Test,
    /// Check and test the directory, then store it in the gateway tier's store as the next
    /// policy version (authz.source = "store"; needs `admin` on `/`). Exits 1 if a live
    /// replica did not enforce it within --wait-secs.
    Push {
        /// The version this push builds on (refused if another push got there first);
        /// 0: the newest stored.
        #[arg(long, default_value_t = 0)]
        base_version: u64,
        /// Seconds to wait for every live replica to enforce it (at most 60).
        #[arg(long, default_value_t = 10)]
        wait_secs: u32,
        #[command(flatten)]
        conn: ClientArgs,
    },
    /// List the newest stored policy versions (authz.source = "store").
    History {
        /// Versions to show.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[command(flatten)]
        conn: ClientArgs,
    },
    /// Store the content of an earlier version again, as a new, higher version.
    Rollback {
        /// The stored version to go back to.
        version: u64,
        /// Seconds to wait for every live replica to enforce it (at most 60).
        #[arg(long, default_value_t = 10)]
        wait_secs: u32,
        #[command(flatten)]
        conn: ClientArgs,
    },
    /// Show the decision for SUBJECT doing ACTION on PATH, and the rule that decided it.
    Explain {
        /// Principal (spiffe://…, dns:…, cn:…) or role.
        subject: String,
        /// Secret path, or / for whole-store actions.
        path: String,
        /// read, write, delete, destroy, list or admin.
        action: String,
    },
}

pub(super) async fn run(dir: &Path, command: PolicyCommand) -> anyhow::Result<()> {
    match command {
        PolicyCommand::Push { base_version, wait_secs, conn } => {
            return super::policy_store::push(dir, base_version, wait_secs, &conn).await;
        }
        PolicyCommand::History { limit, conn } => {
            return super::policy_store::history(limit, &conn).await;
        }
        PolicyCommand::Rollback { version, wait_secs, conn } => {
            return super::policy_store::rollback(version, wait_secs, &conn).await;
        }
        _ => {}
    }
    let policy = Policy::load_untested(dir)?;
    match command {
        PolicyCommand::Push { .. }
        | PolicyCommand::History { .. }
        | PolicyCommand::Rollback { .. } => {}
        PolicyCommand::Check => {
            let csv = std::fs::read_to_string(dir.join("policy.csv"))?;
            reference::enforcer(&csv).await.map_err(|e| {
                anyhow::anyhow!("casbin refuses {}: {e}", dir.join("policy.csv").display())
            })?;
            println!(
                "{}: OK — {} rules, {} role links, {} tests, version {}",
                dir.display(),
                policy.rule_count(),
                policy.link_count(),
                policy.test_count(),
                policy.version()
            );
        }
        PolicyCommand::Test => {
            let failures = policy.run_tests();
            for f in &failures {
                println!("FAIL {}", crate::text::escaped(f));
            }
            if !failures.is_empty() {
                bail!("{} of {} policy tests failed", failures.len(), policy.test_count());
            }
            if policy.test_count() == 0 {
                bail!("no tests found in {}", dir.join("tests").display());
            }
            println!(
                "{} policy tests passed (policy version {})",
                policy.test_count(),
                policy.version()
            );
        }
        PolicyCommand::Explain { subject, path, action } => {
            let Some(act) = Action::parse(&action) else {
                bail!("unknown action {action:?}; use read, write, delete, destroy, list or admin");
            };
            let target = Target::parse(&path)?;
            let d = policy.decide(&subject, &target, act);
            let roles = policy.roles_of(&subject);
            println!(
                "{} {subject} {action} {}",
                if d.is_allow() { "ALLOW" } else { "DENY" },
                target.as_str()
            );
            if roles.is_empty() {
                println!("roles: (none)");
            } else {
                println!("roles: {}", roles.join(", "));
            }
            match d.rule_line() {
                Some(line) => println!(
                    "decided by policy.csv:{line}: {}",
                    crate::text::escaped(policy.line_text(line).unwrap_or_default())
                ),
                None => println!("decided by: no matching rule (deny by default)"),
            }
        }
    }
    Ok(())
}
