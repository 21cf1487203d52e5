//! One audit record: the JSON object on one line of the log, and the hash chain over lines.
//!
//! A record's `prev` is the SHA-256 (hex) of the previous line's exact bytes (without the
//! newline), so changing, adding, removing or moving any line breaks the chain at the next
//! one. The first record of a log is a `genesis` record with `prev` all zeros; the first
//! record of every later file is a `continue` record whose `prev` links to the last line
//! of the file before it. `checkpoint` records carry an Ed25519 signature over
//! [`checkpoint_message`], which commits to every line before them.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::authz::{Action, Effect};

/// `prev` of a genesis record.
pub const GENESIS_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What a record records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The first record of a new log: names the log and the signing key.
    Genesis,
    /// The first record of a file that continues a log (after rotation or a lost file).
    Continue,
    /// One RPC (or, for writes, its intent before the store is touched).
    Request,
    /// A refused TLS handshake.
    Handshake,
    /// A signed statement of the chain head.
    Checkpoint,
    /// The log could not be written for a while; requests were refused meanwhile.
    Outage,
    /// The gateway started after a crash: the records after the last checkpoint it stored
    /// (`unattested_from`..=`unattested_to`) chain, but no stored checkpoint covered them.
    Resume,
    /// Requests of one principal refused by rate limits over an interval, as a count.
    RateLimit,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Self; 8] = [
        Self::Genesis,
        Self::Continue,
        Self::Request,
        Self::Handshake,
        Self::Checkpoint,
        Self::Outage,
        Self::Resume,
        Self::RateLimit,
    ];

    /// The name of the kind as it appears in the log.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Genesis => "genesis",
            Self::Continue => "continue",
            Self::Request => "request",
            Self::Handshake => "handshake",
            Self::Checkpoint => "checkpoint",
            Self::Outage => "outage",
            Self::Resume => "resume",
            Self::RateLimit => "rate_limit",
        }
    }
}

/// For writes: `intent` is recorded (durably) before the store is touched, `outcome` after.
/// For a Watch stream: `open` when it starts, `outcome` (with its counts) when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// About to write: the request was authorized and will now be applied.
    Intent,
    /// Done: the status says how it ended.
    Outcome,
    /// A long-lived stream (Watch) was opened; its outcome record follows when it ends.
    Open,
}

/// One line of the audit log. Field order is the order in the line. Fields that do not
/// apply to a kind are left out of the line.
///
/// A line is `seq`, `ts`, the record's [`Body`] (every other field but `prev`), then `prev`.
/// The body is serialized by whoever makes the record; the writer only adds the position in
/// the chain ([`write_line`]), so its one thread does as little as possible per record.
///
/// Unknown fields are accepted when parsing, so that auditors' tools keep verifying logs
/// from newer gateways (the chain covers the exact bytes of every line regardless).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Position in the log, from 0 (the genesis record), without gaps across files.
    #[serde(skip_serializing)]
    pub seq: u64,
    /// When the record was written (RFC 3339, UTC, milliseconds).
    #[serde(skip_serializing)]
    pub ts: String,
    /// What the record records.
    pub kind: Kind,
    /// The log's id (genesis, continue and checkpoint records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_id: Option<String>,
    /// Request id, also sent to the client in the `x-request-id` response header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Intent or outcome (requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The caller (`spiffe://…`, `dns:…`, `cn:…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    /// SHA-256 of the client certificate (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_fingerprint: Option<String>,
    /// Serial number of the client certificate (colon-separated hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_serial: Option<String>,
    /// The TCP peer, `ip:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// RPC method, e.g. `secretgate.v1.Secrets/Get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Secret path or List prefix, as sent (bounded to 600 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// `read`, `write`, `delete`, `destroy`, `list` or `admin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
    /// `allow` or `deny`, once authorization decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Effect>,
    /// The deciding rule: `policy.csv:LINE`, or `default deny`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The policy version that decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_version: Option<String>,
    /// gRPC status code name (`OK`, `PERMISSION_DENIED`, …) of an outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// The status message sent to the client (never a secret value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Secret version written, read or deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Key id that sealed (write) or opened (read) the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// Microseconds from the request's arrival to this record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<u64>,
    /// Why (handshake refusals, outages, continue records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Outage: when the log stopped being writable (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// Outage: records that could not be written (their requests were refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<u64>,
    /// Resume: the first record no stored checkpoint attested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unattested_from: Option<u64>,
    /// Resume: the last record no stored checkpoint attested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unattested_to: Option<u64>,
    /// Genesis: the Ed25519 public key that signs checkpoints (base64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pubkey: Option<String>,
    /// Checkpoint: Ed25519 signature over [`checkpoint_message`] (base64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sig: Option<String>,
    /// SHA-256 (hex) of the previous line's bytes.
    #[serde(skip_serializing)]
    pub prev: String,
}

/// A record's fields other than `seq`, `ts` and `prev`, serialized as a JSON object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Body(String);

impl Body {
    /// The serialized length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Never true: a body always names the record's kind.
    pub fn is_empty(&self) -> bool {
        self.0.len() <= 2
    }

    /// The fields without the object's braces.
    fn fields(&self) -> &str {
        self.0.strip_prefix('{').and_then(|b| b.strip_suffix('}')).unwrap_or_default()
    }
}

impl Record {
    /// A record of `kind` with every optional field empty.
    pub fn new(kind: Kind) -> Self {
        Self {
            seq: 0,
            ts: String::new(),
            kind,
            log_id: None,
            request_id: None,
            phase: None,
            principal: None,
            cert_fingerprint: None,
            cert_serial: None,
            peer: None,
            method: None,
            path: None,
            action: None,
            decision: None,
            rule: None,
            policy_version: None,
            status: None,
            message: None,
            version: None,
            key_id: None,
            latency_us: None,
            reason: None,
            since: None,
            refused: None,
            unattested_from: None,
            unattested_to: None,
            pubkey: None,
            sig: None,
            prev: String::new(),
        }
    }

    /// The line for this record (no newline).
    pub fn to_line(&self) -> String {
        let mut line = Vec::new();
        write_line(&mut line, self.seq, &self.ts, &self.body(), &self.prev);
        String::from_utf8(line).unwrap_or_default()
    }

    /// Every field but `seq`, `ts` and `prev`, serialized.
    pub fn body(&self) -> Body {
        // Serializing a struct of strings and integers cannot fail.
        let mut body = Vec::with_capacity(512);
        match serde_json::to_writer(&mut body, self) {
            Ok(()) => Body(String::from_utf8(body).unwrap_or_else(|_| "{}".into())),
            Err(_) => Body("{}".into()),
        }
    }

    /// Parses one line (without its newline).
    pub fn parse(line: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(line).map_err(|e| e.to_string())
    }

    /// The record's kind.
    pub fn kind(&self) -> Kind {
        self.kind
    }
}

/// Appends the line (no newline) of the record with `body` at position `seq`, written at
/// `ts`, after the line whose hash is `prev`.
pub fn write_line(out: &mut Vec<u8>, seq: u64, ts: &str, body: &Body, prev: &str) {
    use std::io::Write;
    // Writing JSON strings into a Vec cannot fail.
    let _ = write!(out, "{{\"seq\":{seq},\"ts\":");
    let _ = serde_json::to_writer(&mut *out, ts);
    let fields = body.fields();
    if !fields.is_empty() {
        out.push(b',');
        out.extend_from_slice(fields.as_bytes());
    }
    out.extend_from_slice(b",\"prev\":");
    let _ = serde_json::to_writer(&mut *out, prev);
    out.push(b'}');
}

/// SHA-256 (hex) of a line's bytes, without its newline: the next record's `prev`.
pub fn line_hash(line: &[u8]) -> String {
    hex::encode(Sha256::digest(line))
}

/// What a checkpoint signs: the log, its position, and the hash of everything before it.
pub fn checkpoint_message(log_id: &str, seq: u64, ts: &str, prev: &str) -> Vec<u8> {
    format!("secretgate audit checkpoint v1\n{log_id}\n{seq}\n{ts}\n{prev}\n").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_and_leave_out_empty_fields() {
        let mut r = Record::new(Kind::Request);
        r.seq = 7;
        r.ts = crate::clock::now_rfc3339_millis();
        r.path = Some("/a/b".into());
        r.version = Some(3);
        r.prev = line_hash(b"x");
        let line = r.to_line();
        assert!(!line.contains("principal"), "{line}");
        assert!(line.starts_with("{\"seq\":7,"), "{line}");
        assert!(line.ends_with(&format!("\"prev\":\"{}\"}}", r.prev)), "{line}");
        assert_eq!(Record::parse(line.as_bytes()).unwrap(), r);
        // The writer's way (body made apart, chained later) gives the same bytes.
        let mut written = Vec::new();
        write_line(&mut written, 7, &r.ts, &r.body(), &r.prev);
        assert_eq!(written, line.as_bytes());
        assert!(r.body().len() > 2 && !r.body().is_empty());
    }

    #[test]
    fn unknown_fields_are_accepted_and_a_missing_kind_is_refused() {
        assert!(Record::parse(br#"{"seq":1,"ts":"t","kind":"request","x":1,"prev":""}"#).is_ok());
        assert!(Record::parse(br#"{"seq":1,"ts":"t","prev":""}"#).is_err());
        assert!(Record::parse(b"not json").is_err());
    }

    #[test]
    fn timestamps_are_utc_with_milliseconds() {
        let ts = crate::clock::now_rfc3339_millis();
        assert!(ts.ends_with('Z') && ts.len() == "2026-11-24T12:00:00.123Z".len(), "{ts}");
    }
}
