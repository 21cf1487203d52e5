//! `secretgate watch`: follow changes under a prefix, one line per change, resuming by itself
//! after a gateway restart or a network break.

use std::{io::Write, time::Duration};

use anyhow::bail;
use serde_json::json;
use tonic::Code;

use super::{
    ClientArgs, Output,
    client::{channel, rfc3339, rpc_error},
};
use crate::{
    api::RESUME_REVISION_HEADER,
    proto::v1::{self, secrets_client::SecretsClient},
    text::escaped,
};

/// Longest pause between tries to reach the gateway again.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Watches `prefix` from `from` (0: from now) until interrupted or refused for good.
pub(super) async fn watch(args: &ClientArgs, prefix: String, mut from: u64) -> anyhow::Result<()> {
    let mut backoff = Duration::from_millis(200);
    let mut first = true;
    loop {
        let ended = match follow(args, &prefix, &mut from, &mut backoff).await {
            Ok(()) => bail!("the gateway ended the stream without a status"),
            Err(Ended::Final(e)) => return Err(e),
            Err(Ended::Again(why)) => why,
        };
        if first || from > 0 {
            eprintln!("watch: {}; resuming from revision {from}", escaped(&ended));
        }
        first = false;
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// How one stream ended.
enum Ended {
    /// For good: the error to exit with.
    Final(anyhow::Error),
    /// Worth resuming (the gateway restarted or is unreachable, the watcher fell behind).
    Again(String),
}

/// One connection and stream, printing each change and moving `from` past it.
async fn follow(
    args: &ClientArgs,
    prefix: &str,
    from: &mut u64,
    backoff: &mut Duration,
) -> Result<(), Ended> {
    let channel = channel(args).await.map_err(|e| Ended::Again(format!("{e:#}")))?;
    let mut client = SecretsClient::new(channel);
    let request = v1::WatchRequest { prefix: prefix.to_owned(), from_revision: *from };
    let mut stream = client.watch(request).await.map_err(|s| ending(s, from))?.into_inner();
    *backoff = Duration::from_millis(200);
    loop {
        let message = stream.message().await.map_err(|s| ending(s, from))?;
        let Some(message) = message else { return Ok(()) };
        let mut out = std::io::stdout().lock();
        for e in &message.events {
            // A closed stdout (a pipe to `head`) ends the command.
            if writeln!(out, "{}", line(e, args.output)).is_err() {
                std::process::exit(0);
            }
        }
        let _ = out.flush();
        *from = message.revision;
    }
}

/// What a stream's status means for the watch: resume (moving `from` to the gateway's
/// resume revision, if it gave one) or stop.
fn ending(status: tonic::Status, from: &mut u64) -> Ended {
    let resume = status
        .metadata()
        .get(RESUME_REVISION_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    match status.code() {
        Code::Unavailable
        | Code::ResourceExhausted
        | Code::Cancelled
        | Code::Unknown
        | Code::Internal => {
            if let Some(r) = resume {
                *from = (*from).max(r);
            }
            Ended::Again(format!("{:?}: {}", status.code(), status.message()))
        }
        _ => Ended::Final(rpc_error(status)),
    }
}

/// One change as a line: `REVISION KIND PATH vVERSION TIME`, escaped for a terminal, or a
/// JSON object.
fn line(e: &v1::WatchEvent, output: Output) -> String {
    let kind = match e.kind() {
        v1::ChangeKind::Written => "written",
        v1::ChangeKind::Deleted => "deleted",
        v1::ChangeKind::Undeleted => "undeleted",
        v1::ChangeKind::Destroyed => "destroyed",
        v1::ChangeKind::Unspecified => "unknown",
    };
    let time = rfc3339(e.time.as_ref());
    match output {
        Output::Json => json!({
            "revision": e.revision,
            "kind": kind,
            "path": e.path,
            "version": e.version,
            "time": time,
        })
        .to_string(),
        Output::Human => {
            format!("{} {kind} {} v{} {time}", e.revision, escaped(&e.path), e.version)
        }
    }
}
