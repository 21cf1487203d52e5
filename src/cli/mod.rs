//! The `secretgate` command line: one file per command group.
//!
//! - `serve`, `dev` ([`serve`]): run a gateway;
//! - `put`, `get`, `ls`, `rm`, `versions` ([`client`]): talk to one over mTLS;
//! - `watch` ([`watch`]): follow changes, resuming by itself;
//! - `keys …` ([`keys`]): the key rotation lifecycle;
//! - `policy …` ([`policy`]): check, test and explain policies; `whoami` asks the gateway;
//! - `audit …` ([`audit`]): the auditor's tools: keygen, verify, query, tail.

mod audit;
mod client;
mod dev;
mod keys;
mod keys_store;
mod policy;
mod policy_store;
mod serve;
mod trust;
mod watch;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand, ValueEnum};

/// secretgate: the mTLS gateway in front of your secrets store.
#[derive(Debug, Parser)]
#[command(name = "secretgate", version, about, max_term_width = 100)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway with a configuration file.
    Serve {
        /// The configuration file (TOML).
        #[arg(long, short, env = "SECRETGATE_CONFIG", default_value = "secretgate.toml")]
        config: PathBuf,
        /// For this start only: begin a new audit log although the store keeps checkpoints
        /// of another (the old log was moved aside on purpose, or the signing key changes).
        #[arg(long)]
        new_audit_log: bool,
    },
    /// Run a development gateway: creates a dev PKI in certs-dev/ and a config and store in
    /// .secretgate-dev/ when missing, then serves on 127.0.0.1:7443.
    Dev {
        /// Address to listen on (default: the dev config's, 127.0.0.1:7443).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Directory holding certs-dev/ and .secretgate-dev/.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Write a new version of a secret.
    Put {
        /// Secret path, e.g. /payments/db/password.
        path: String,
        /// The value; `-` reads it from standard input. Prefer --file or `-`: a value on the
        /// command line is visible to other local users and kept in shell history.
        value: Option<String>,
        /// Read the value from this file.
        #[arg(long, conflicts_with = "value")]
        file: Option<PathBuf>,
        /// Compare-and-set: write only if the current version is N (0 = create only).
        #[arg(long, value_name = "N")]
        expected_version: Option<u64>,
        #[command(flatten)]
        conn: ClientArgs,
    },
    /// Read a secret (its current version, or --version N).
    Get {
        /// Secret path.
        path: String,
        /// Version to read.
        #[arg(long, value_name = "N")]
        version: Option<u64>,
        #[command(flatten)]
        conn: ClientArgs,
    },
    /// List live secrets at or below a prefix.
    Ls {
        /// Prefix, e.g. /payments (default: everything).
        #[arg(default_value = "/")]
        prefix: String,
        #[command(flatten)]
        conn: ClientArgs,
    },
    /// Soft-delete the current version of a secret.
    Rm {
        /// Secret path.
        path: String,
        #[command(flatten)]
        conn: ClientArgs,
    },
    /// Restore a soft-deleted version of a secret (needs `delete`).
    Undelete {
        /// Secret path.
        path: String,
        /// The version to restore.
        version: u64,
        #[command(flatten)]
        conn: ClientArgs,
    },
    /// Remove a version's value for good; it cannot be undone (needs `destroy`).
    Destroy {
        /// Secret path.
        path: String,
        /// The version to destroy.
        version: u64,
        #[command(flatten)]
        conn: ClientArgs,
    },
    /// Follow changes at or below a prefix, one line per change (never a value), until
    /// interrupted; resumes by itself after a gateway restart or a network break.
    Watch {
        /// Prefix, e.g. /payments (default: everything the caller may read).
        #[arg(default_value = "/")]
        prefix: String,
        /// Start after this store revision (the first column of a line seen before); 0
        /// follows from now.
        #[arg(long, value_name = "N", default_value_t = 0)]
        from_revision: u64,
        #[command(flatten)]
        conn: ClientArgs,
    },
    /// Show the kept versions of a secret.
    Versions {
        /// Secret path.
        path: String,
        #[command(flatten)]
        conn: ClientArgs,
    },
    /// Show who the gateway thinks you are: principal, roles, certificate, policy version.
    Whoami {
        #[command(flatten)]
        conn: ClientArgs,
    },
    /// Show the tier's live gateway replicas and the keyring, policy and client trust each
    /// enforces; exits 1 when they disagree (needs `admin` on `/`).
    Status {
        #[command(flatten)]
        conn: ClientArgs,
    },
    /// Show the gateway's store backend and its read cache (needs `admin` on `/`).
    StoreStatus {
        #[command(flatten)]
        conn: ClientArgs,
    },
    /// Show the version in force of the keyring, policy, server certificate and client
    /// trust, and why newer files were refused, if they were (needs `admin` on `/`).
    ReloadStatus {
        #[command(flatten)]
        conn: ClientArgs,
    },
    /// Probe a gateway for exec probes: exit 0 if it is live (or, with --ready, ready to
    /// serve: audit log writable, store reachable), 1 if not.
    Health {
        /// Check readiness instead of liveness.
        #[arg(long)]
        ready: bool,
        #[command(flatten)]
        conn: ClientArgs,
    },
    /// Check, test and explain authorization policies (offline, from the policy directory).
    Policy {
        /// The policy directory.
        #[arg(long, global = true, env = "SECRETGATE_POLICIES", default_value = "policies")]
        dir: PathBuf,
        #[command(subcommand)]
        command: policy::PolicyCommand,
    },
    /// Manage encryption keys: init, add, promote, status, rewrap, retire.
    Keys {
        /// The keyring file.
        #[arg(
            long,
            global = true,
            env = "SECRETGATE_KEYRING",
            default_value = ".secretgate-dev/keyring.toml"
        )]
        keyring: PathBuf,
        #[command(subcommand)]
        command: keys::KeysCommand,
    },
    /// The client trust (CA bundle and CRLs) kept in the store: `trust push`.
    Trust {
        #[command(subcommand)]
        command: trust::TrustCommand,
    },
    /// Make a key-encryption key (KEK): 32 random bytes in a new file of mode 0600. Every
    /// replica of a tier needs the same one (`crypto.kek`); it authenticates the control
    /// state in the store. An existing file is never replaced.
    KekInit {
        /// The file to create.
        path: PathBuf,
    },
    /// KEK rotation: store every control object kept in the store again, unchanged, sealed
    /// under the gateway's current KEK (`crypto.kek`), so that `crypto.previous_kek` can be
    /// removed (needs `admin` on `/`).
    KekReseal {
        #[command(flatten)]
        conn: ClientArgs,
    },
    /// Audit log tools: make the signing key; verify, query and follow the log files
    /// (offline); fetch the gateway's stored checkpoint (`audit checkpoint`, online).
    Audit {
        #[command(subcommand)]
        command: audit::AuditCommand,
    },
}

/// How client commands reach a gateway. Defaults point at `secretgate dev`.
#[derive(Debug, Clone, Args)]
struct ClientArgs {
    /// Gateway address (https://host:port or host:port).
    #[arg(long, env = "SECRETGATE_ADDR", default_value = "https://127.0.0.1:7443")]
    addr: String,
    /// CA certificate (PEM) that signed the gateway's certificate.
    #[arg(long, env = "SECRETGATE_CA", default_value = "certs-dev/ca.pem")]
    ca: PathBuf,
    /// Client certificate (PEM).
    #[arg(long, env = "SECRETGATE_CERT", default_value = "certs-dev/admin.pem")]
    cert: PathBuf,
    /// Client private key (PEM).
    #[arg(long, env = "SECRETGATE_KEY", default_value = "certs-dev/admin-key.pem")]
    key: PathBuf,
    /// Output format.
    #[arg(long, short, env = "SECRETGATE_OUTPUT", value_enum, default_value_t = Output::Human)]
    output: Output,
    /// Seconds to wait for an answer.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Plain text for people.
    Human,
    /// One JSON object, for scripts.
    Json,
}

/// Runs a parsed command line and returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    let server = matches!(cli.command, Command::Serve { .. } | Command::Dev { .. });
    let audit = matches!(cli.command, Command::Audit { .. });
    crate::log::init(if server { "info" } else { "warn" });
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", crate::text::escaped(&error_chain(&e)));
            if audit { audit::exit_code(&e) } else { ExitCode::FAILURE }
        }
    }
}

/// The error and its causes, `: `-separated, leaving out a cause whose text the message
/// before it already ends with (most of our errors put their OS error in their own message).
fn error_chain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let cause = cause.to_string();
        if text.is_empty() {
            text = cause;
        } else if !text.ends_with(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve { config, new_audit_log } => serve::serve(&config, new_audit_log).await,
        Command::Dev { listen, dir } => serve::dev(&dir, listen).await,
        Command::Put { path, value, file, expected_version, conn } => {
            client::put(&conn, path, value, file, expected_version).await
        }
        Command::Get { path, version, conn } => client::get(&conn, path, version).await,
        Command::Ls { prefix, conn } => client::ls(&conn, prefix).await,
        Command::Rm { path, conn } => client::rm(&conn, path).await,
        Command::Versions { path, conn } => client::versions(&conn, path).await,
        Command::Watch { prefix, from_revision, conn } => {
            watch::watch(&conn, prefix, from_revision).await
        }
        Command::Undelete { path, version, conn } => client::undelete(&conn, path, version).await,
        Command::Destroy { path, version, conn } => client::destroy(&conn, path, version).await,
        Command::Keys { keyring, command } => keys::run(&keyring, command).await,
        Command::Whoami { conn } => client::whoami(&conn).await,
        Command::Health { ready, conn } => client::health(&conn, ready).await,
        Command::StoreStatus { conn } => client::store_status(&conn).await,
        Command::Status { conn } => client::tier_status(&conn).await,
        Command::ReloadStatus { conn } => client::reload_status(&conn).await,
        Command::Policy { dir, command } => policy::run(&dir, command).await,
        Command::Audit { command } => audit::run(command).await,
        Command::Trust { command } => trust::run(command).await,
        Command::KekReseal { conn } => keys_store::reseal(&conn).await,
        Command::KekInit { path } => {
            crate::control::Kek::generate(&path)
                .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
            println!(
                "created {} (mode 0600); copy it to every gateway host of the tier, and keep a backup apart from the store: without it the stored control state cannot be opened",
                path.display()
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_already_in_the_message_is_printed_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = anyhow::Error::new(crate::config::ConfigError::Read {
            path: "/x.toml".into(),
            source: io,
        });
        assert_eq!(error_chain(&e), "cannot read config file /x.toml: no such file");
        // Context that does not repeat its cause keeps the cause.
        let e = anyhow::anyhow!("inner cause").context("outer step");
        assert_eq!(error_chain(&e), "outer step: inner cause");
    }
}
