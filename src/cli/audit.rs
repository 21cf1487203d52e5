//! `secretgate audit …`: the auditor's tools: offline over the log files, except `checkpoint`,
//! which asks the gateway.
//!
//! `keygen` makes the checkpoint signing key; `verify` checks the chain and the signatures;
//! `query` and `tail` pick records out. `verify` exits 1 when the log was tampered with and
//! 2 when it could not be checked (a usage or I/O error), so scripts can tell them apart.

use crate::text::escaped;
use std::{
    fs::File,
    io::{ErrorKind::BrokenPipe, Read, Seek, SeekFrom, Write},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::json;

use super::Output;
use crate::audit::{
    Kind, Record, SigningKey, VerifyingKey,
    query::{self, Filter, Match},
    signing::pub_path,
    verify::{self, Problem},
};

/// Prints the stored checkpoint line on stdout; the log's id and any failure on stderr.
async fn checkpoint(conn: &super::ClientArgs) -> anyhow::Result<()> {
    let channel = super::client::channel(conn).await?;
    let mut admin = crate::proto::v1::admin_client::AdminClient::new(channel);
    let status = admin
        .audit_status(crate::proto::v1::AuditStatusRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{}: {}", crate::api::code_name(s.code()), s.message()))?
        .into_inner();
    if !status.enabled {
        bail!("the gateway runs with audit.enabled = false: it records nothing");
    }
    eprintln!("audit log {}", escaped(&status.log_id));
    if !status.failure.is_empty() {
        eprintln!("warning: the audit log is failing: {}", escaped(&status.failure));
    }
    if status.checkpoint.is_empty() {
        bail!("no checkpoint stored yet for log {}", status.log_id);
    }
    match conn.output {
        super::Output::Human => println!("{}", escaped(&status.checkpoint)),
        // The line as a string, byte for byte: `jq -r .checkpoint` gives a file for
        // `verify --checkpoint`.
        super::Output::Json => println!(
            "{}",
            serde_json::json!({
                "log_id": status.log_id,
                "failure": (!status.failure.is_empty()).then_some(&status.failure),
                "records_written": status.records_written,
                "syncs": status.syncs,
                "sync_micros": status.sync_micros,
                "checkpoint": status.checkpoint,
            })
        ),
    }
    Ok(())
}

/// How often `tail` looks for new lines.
const POLL: Duration = Duration::from_millis(200);

/// `secretgate audit` subcommands.
#[derive(Debug, Subcommand)]
pub(super) enum AuditCommand {
    /// Generate a checkpoint signing key (mode 0600) and its public key (FILE.pub).
    Keygen {
        /// Where to write the private key. Refuses to overwrite.
        #[arg(long, default_value = "audit.key")]
        out: PathBuf,
    },
    /// Check the hash chain and checkpoint signatures; report OK or the first bad record.
    ///
    /// Exit code 1 when the log was tampered with, 2 when it could not be checked.
    Verify {
        /// The audit public key (`audit.key.pub`). Without it, signatures are checked with the
        /// key named in the log itself, which proves consistency but not authenticity.
        #[arg(long, value_name = "FILE")]
        pubkey: Option<PathBuf>,
        /// The gateway's stored checkpoint (from `secretgate audit checkpoint`): detects
        /// records cut off the end.
        #[arg(long, value_name = "FILE")]
        checkpoint: Option<PathBuf>,
        /// Output format.
        #[arg(long, short, env = "SECRETGATE_OUTPUT", value_enum, default_value_t = Output::Human)]
        output: Output,
        /// Accept a chain that starts at a `continue` record: the oldest files were removed on
        /// purpose (retention). Without it, a log whose start is missing fails verification.
        #[arg(long)]
        from_continue: bool,
        /// The log files, in any order (e.g. audit/audit.log*).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Ask the gateway for its audit log's state and print the latest signed checkpoint it
    /// keeps in the store (for `verify --checkpoint`). Needs `admin` on `/`. With `-o json`:
    /// an object with log_id, failure, records_written, syncs, sync_micros and the checkpoint
    /// line.
    Checkpoint {
        #[command(flatten)]
        conn: super::ClientArgs,
    },
    /// Print the records that match the filters, from files in log order.
    Query {
        #[command(flatten)]
        filter: FilterArgs,
        /// Output format: a table, or the matching lines as written.
        #[arg(long, short, env = "SECRETGATE_OUTPUT", value_enum, default_value_t = Output::Human)]
        output: Output,
        /// The log files, in any order (e.g. audit/audit.log*).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print the last matching records of the log, then follow it (across rotation).
    Tail {
        #[command(flatten)]
        filter: FilterArgs,
        /// How many matching records to print first.
        #[arg(short = 'n', long = "lines", value_name = "N", default_value_t = 10)]
        lines: usize,
        /// Print the last records and stop.
        #[arg(long)]
        no_follow: bool,
        /// Output format: a table, or the matching lines as written.
        #[arg(long, short, env = "SECRETGATE_OUTPUT", value_enum, default_value_t = Output::Human)]
        output: Output,
        /// The active log file.
        file: PathBuf,
    },
}

/// Filters of `query` and `tail`.
#[derive(Debug, Clone, Args)]
pub(super) struct FilterArgs {
    /// Principal, exactly (spiffe://…, dns:…, cn:…).
    #[arg(long)]
    principal: Option<String>,
    /// Path prefix, segment-wise: /a matches /a and /a/b, not /ab.
    #[arg(long)]
    path: Option<String>,
    /// read, write, delete, destroy, list or admin.
    #[arg(long)]
    action: Option<String>,
    /// allow or deny.
    #[arg(long)]
    decision: Option<String>,
    /// gRPC status code name, e.g. OK or PERMISSION_DENIED.
    #[arg(long)]
    status: Option<String>,
    /// Records at or after this time (RFC 3339, e.g. 2026-01-31T12:00:00Z).
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// Records before this time (RFC 3339).
    #[arg(long, value_name = "TIME")]
    until: Option<String>,
    /// Record kind: request, handshake, checkpoint, outage, genesis or continue.
    #[arg(long)]
    kind: Option<String>,
}

/// The log failed verification (exit code 1); the report is already printed.
#[derive(Debug, thiserror::Error)]
#[error("the audit log failed verification")]
struct Tampered;

/// The exit code of a failed audit command: 1 for tampering, 2 for anything else.
pub(super) fn exit_code(error: &anyhow::Error) -> ExitCode {
    ExitCode::from(if error.is::<Tampered>() { 1 } else { 2 })
}

pub(super) async fn run(command: AuditCommand) -> anyhow::Result<()> {
    match command {
        AuditCommand::Keygen { out } => keygen(&out),
        AuditCommand::Verify { pubkey, checkpoint, output, from_continue, files } => {
            verify(pubkey.as_deref(), checkpoint.as_deref(), output, from_continue, &files)
        }
        AuditCommand::Checkpoint { conn } => checkpoint(&conn).await,
        AuditCommand::Query { filter, output, files } => {
            quiet_pipe(query(&filter.parse()?, output, &files))
        }
        AuditCommand::Tail { filter, lines, no_follow, output, file } => {
            quiet_pipe(tail(&file, &filter.parse()?, lines, !no_follow, output).await)
        }
    }
}

/// A closed pipe (`… | head`) ends the output quietly, as in other Unix tools.
fn quiet_pipe(result: anyhow::Result<()>) -> anyhow::Result<()> {
    match result {
        Err(e) if e.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == BrokenPipe) => {
            Ok(())
        }
        other => other,
    }
}

fn query(filter: &Filter, output: Output, files: &[PathBuf]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if output == Output::Human {
        writeln!(out, "{}", header())?;
    }
    for item in query::query_files(files, filter)? {
        match item {
            Ok(entry) => print(&mut out, &entry, output)?,
            Err(e @ query::QueryError::Malformed { .. }) => {
                eprintln!("warning: {}", escaped(&e.to_string()));
            }
            Err(e) => return Err(e.into()),
        }
    }
    out.flush()?;
    Ok(())
}

fn keygen(out: &Path) -> anyhow::Result<()> {
    let public = pub_path(out);
    for path in [out, public.as_path()] {
        if path.exists() {
            bail!("{} already exists; refusing to overwrite an audit key", path.display());
        }
    }
    SigningKey::generate()?.save(out)?;
    println!("wrote the audit signing key to {} (mode 0600)", out.display());
    println!(
        "wrote its public key to {}: give it to auditors (secretgate audit verify --pubkey {} …)",
        public.display(),
        public.display()
    );
    Ok(())
}

fn verify(
    pubkey: Option<&Path>,
    checkpoint: Option<&Path>,
    output: Output,
    from_continue: bool,
    files: &[PathBuf],
) -> anyhow::Result<()> {
    let key = pubkey.map(VerifyingKey::load).transpose()?;
    let stored = checkpoint
        .map(|p| std::fs::read(p).with_context(|| format!("cannot read {}", p.display())))
        .transpose()?;
    match verify::verify_files(files, key.as_ref(), stored.as_deref()) {
        // The oldest files are missing: whoever removed them could have removed records with
        // them, so this fails unless the auditor says the removal was on purpose.
        Ok(v) if v.starts_after_genesis && !from_continue => {
            let why = format!(
                "the chain starts at seq {} (a continue record): the files before it are \
                 missing, with every record before seq {}; pass --from-continue if they were \
                 removed on purpose",
                v.first_seq, v.first_seq
            );
            match output {
                Output::Human => println!("INCOMPLETE: {why}"),
                Output::Json => {
                    println!("{}", json!({ "ok": false, "incomplete": why, "verified": v }));
                }
            }
            Err(Tampered.into())
        }
        Ok(v) => {
            match output {
                Output::Human => {
                    let signed = v.last_signed_seq.map_or("none".into(), |s| format!("seq {s}"));
                    println!(
                        "OK: {} records, seq {}..{}, {} checkpoints, signed through {signed}",
                        v.records, v.first_seq, v.last_seq, v.checkpoints
                    );
                    for note in &v.notes {
                        println!("note: {}", escaped(note));
                    }
                }
                Output::Json => println!("{}", json!({ "ok": true, "verified": v })),
            }
            Ok(())
        }
        Err(Problem::Tampered(t)) => {
            match output {
                Output::Human => println!("TAMPERED: {}", escaped(&t.to_string())),
                Output::Json => println!("{}", json!({ "ok": false, "tampered": t })),
            }
            Err(Tampered.into())
        }
        Err(e) => Err(e.into()),
    }
}

/// Prints the last `n` matching records of `path`, then (with `follow`) new ones as they are
/// written, reopening the file when it is rotated or replaced.
async fn tail(
    path: &Path,
    filter: &Filter,
    n: usize,
    follow: bool,
    output: Output,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if output == Output::Human {
        writeln!(out, "{}", header())?;
    }
    let open = || File::open(path).with_context(|| format!("cannot open {}", path.display()));
    // One read of one open file for the last records, so that following picks up exactly
    // where it ended.
    let mut file = open()?;
    let mut pending = Vec::new();
    let mut pos = file.read_to_end(&mut pending)? as u64;
    let end = pending.iter().rposition(|b| *b == b'\n').map_or(0, |e| e + 1);
    for entry in query::last_matching(path, &pending[..end], filter, n)? {
        print(&mut out, &entry, output)?;
    }
    pending.drain(..end);
    out.flush()?;
    if !follow {
        return Ok(());
    }
    loop {
        pos += read_new(&mut file, pos, &mut pending)?;
        emit(&mut out, path, &mut pending, filter, output)?;
        tokio::time::sleep(POLL).await;
        let Ok(now) = std::fs::metadata(path) else { continue };
        if now.ino() != file.metadata()?.ino() || now.len() < pos {
            // Rotated or replaced: finish the old file, then start the new one from the top.
            read_new(&mut file, pos, &mut pending)?;
            emit(&mut out, path, &mut pending, filter, output)?;
            pending.clear();
            (file, pos) = (open()?, 0);
        }
    }
}

/// Appends the bytes of `file` after `pos` to `pending`; how many.
fn read_new(file: &mut File, pos: u64, pending: &mut Vec<u8>) -> anyhow::Result<u64> {
    file.seek(SeekFrom::Start(pos))?;
    Ok(file.read_to_end(pending)? as u64)
}

/// Prints the complete lines in `pending` that match, keeping a partial last line.
fn emit(
    out: &mut impl Write,
    path: &Path,
    pending: &mut Vec<u8>,
    filter: &Filter,
    output: Output,
) -> anyhow::Result<()> {
    let Some(end) = pending.iter().rposition(|b| *b == b'\n') else { return Ok(()) };
    for line in pending[..end].split(|b| *b == b'\n') {
        match Record::parse(line) {
            Ok(record) if filter.matches(&record) => {
                let text = String::from_utf8_lossy(line).into_owned();
                print(out, &Match { file: path.to_owned(), line: 0, text, record }, output)?;
            }
            Ok(_) => {}
            Err(e) => {
                let what = format!("{}: not an audit record: {e}", path.display());
                eprintln!("warning: {}", escaped(&what));
            }
        }
    }
    pending.drain(..=end);
    out.flush()?;
    Ok(())
}

fn header() -> String {
    row(&["seq", "ts", "principal", "method", "path", "action", "decision", "status", "version"])
}

fn print(out: &mut impl Write, entry: &Match, output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        writeln!(out, "{}", entry.text)?;
        return Ok(());
    }
    let r = &entry.record;
    let text = |v: &Option<String>| v.as_deref().unwrap_or("-").to_owned();
    let (who, what, target) = match r.kind() {
        Kind::Request => (text(&r.principal), text(&r.method), text(&r.path)),
        kind => {
            let why = r.reason.as_ref().or(r.message.as_ref());
            (text(&r.peer), format!("[{}]", kind.as_str()), text(&why.cloned()))
        }
    };
    let (seq, version) = (r.seq.to_string(), r.version.map_or("-".into(), |v| v.to_string()));
    let action = r.action.map_or("-", |a| a.as_str()).to_owned();
    let decision = r.decision.map_or("-", |d| d.as_str()).to_owned();
    let status = text(&r.status);
    // Every cell is attacker-influenced text (a path as sent, a peer's reason): escaped, so a
    // record can neither drive the terminal nor forge a row.
    let cells = [&seq, &r.ts, &who, &what, &target, &action, &decision, &status, &version];
    writeln!(out, "{}", row(&cells.map(|c| escaped(c))))?;
    Ok(())
}

/// One table row: fixed minimum widths, two spaces apart.
fn row(cells: &[impl AsRef<str>]) -> String {
    const WIDTHS: [usize; 9] = [8, 24, 28, 32, 24, 7, 8, 18, 7];
    let padded: Vec<String> =
        cells.iter().zip(WIDTHS).map(|(c, w)| format!("{:<w$}", c.as_ref())).collect();
    padded.join("  ").trim_end().to_owned()
}

impl FilterArgs {
    fn parse(self) -> anyhow::Result<Filter> {
        Ok(Filter {
            principal: self.principal,
            path: self.path,
            action: self.action.as_deref().map(query::parse_action).transpose()?,
            decision: self.decision.as_deref().map(query::parse_decision).transpose()?,
            status: self.status,
            since: self.since.as_deref().map(query::parse_time).transpose()?,
            until: self.until.as_deref().map(query::parse_time).transpose()?,
            kind: self.kind.as_deref().map(query::parse_kind).transpose()?,
        })
    }
}
