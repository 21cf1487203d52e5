//! One RPC's context: who called, what was decided, and its audit records.
//!
//! Every RPC goes through a [`Call`]: it carries the connection's identity and a request id
//! (returned to the client in the `x-request-id` header of the response or error),
//! collects the facts the audit record needs as the pipeline runs (action, decision and
//! rule, version, key id), records the *intent* of a write before the store is touched, and
//! records the *outcome* before the client hears it. If a record cannot be made durable
//! the client gets UNAVAILABLE instead of the answer.

use std::{sync::Arc, time::Instant};

use tonic::{Code, Request, Response, Status, metadata::MetadataValue};

use super::ApiError;
use crate::{
    audit::{AuditLog, InFlight, Intent, Kind, Phase, Record, Writing},
    authz::{Act, Action, Authorizer, Decision, Effect, Permit},
    identity::PeerIdentity,
    limits::{Class, RateLimiter},
    tls::ConnInfo,
};

/// The response header that carries the request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The rule an audit record names for a List, whose results are filtered path by path.
const FILTERED: &str = "filtered per path";

/// How authorization decided a request.
enum Decided {
    /// The policy decided (and, when it allowed, which policy version).
    Policy(Decision, Option<String>),
    /// Allowed, with its results filtered path by path (List).
    Filtered,
}

/// Per-request context; see the module docs.
pub(crate) struct Call {
    method: &'static str,
    conn: Option<ConnInfo>,
    path: String,
    started: Instant,
    request_id: String,
    audit: AuditLog,
    action: Option<Action>,
    decision: Option<Decided>,
    version: Option<u64>,
    key_id: Option<String>,
    /// Set once the intent of a write is durable, until its outcome is handed over (the
    /// audit writer's group commit window waits for writes in progress).
    writing: Option<Writing>,
    /// True once the intent of a write is durable.
    intent_recorded: bool,
    /// What a long-running request did, for its outcome record (`reason`).
    summary: Option<String>,
    /// Tells the audit writer this request is in progress (its group commit window).
    in_flight: Option<InFlight>,
    /// The request's span: every log line within it names the request id.
    span: tracing::Span,
}

impl Call {
    /// Admits a `class` request past the caller's rate limits, then starts its context
    /// ([`Call::new`]). A refusal is RESOURCE_EXHAUSTED with a `google.rpc.RetryInfo`
    /// detail; it is not recorded one by one but counted by the limiter (its module docs).
    pub(crate) fn admit<T>(
        limiter: &RateLimiter,
        class: Class,
        method: &'static str,
        req: &Request<T>,
        path: &str,
        audit: &AuditLog,
    ) -> Result<Self, Status> {
        if let Some(conn) = req.extensions().get::<ConnInfo>() {
            let principal = conn.identity.principal.as_str();
            if let Err(throttled) = limiter.admit(principal, class) {
                crate::metrics::rate_limited(class.as_str());
                crate::metrics::rpc(method, Code::ResourceExhausted, std::time::Duration::ZERO);
                let principal = principal.to_owned();
                return Err(Status::from(&ApiError::RateLimited { principal, throttled }));
            }
        }
        Ok(Self::new(method, req, path, audit))
    }

    fn new<T>(method: &'static str, req: &Request<T>, path: &str, audit: &AuditLog) -> Self {
        // Paths are attacker-controlled text: keep a bounded excerpt for the logs.
        let path = path.chars().take(600).collect();
        let request_id = request_id();
        let span = tracing::info_span!("request", request_id = %request_id, method);
        Self {
            method,
            conn: req.extensions().get::<ConnInfo>().cloned(),
            path,
            started: Instant::now(),
            request_id,
            audit: audit.clone(),
            action: None,
            decision: None,
            version: None,
            key_id: None,
            writing: None,
            intent_recorded: false,
            summary: None,
            in_flight: Some(audit.begin()),
            span,
        }
    }

    /// The request's span, to run its handler in.
    pub(crate) fn span(&self) -> tracing::Span {
        self.span.clone()
    }

    /// The caller's verified identity, unless the client trust in force no longer accepts its
    /// certificate (the connection may predate a revocation, the removal of its CA, or the
    /// certificate's expiry).
    pub(crate) fn identity(&self) -> Result<Arc<PeerIdentity>, ApiError> {
        let conn = self.conn.as_ref().ok_or(ApiError::NoIdentity)?;
        conn.check()?;
        Ok(Arc::clone(&conn.identity))
    }

    /// Authorizes `A` on `on` for the caller, noting the decision for the record.
    pub(crate) fn authorize<A: Act>(
        &mut self,
        authz: &Authorizer,
        on: A::On,
    ) -> Result<Permit<A>, ApiError> {
        let id = self.identity()?;
        self.action = Some(A::ACTION);
        match authz.authorize::<A>(&id.principal, on) {
            Ok(permit) => {
                crate::metrics::decision(A::ACTION.as_str(), "allow");
                let decision = Decision::Allow { rule_line: permit.rule_line() };
                self.decision =
                    Some(Decided::Policy(decision, Some(permit.policy_version().to_owned())));
                Ok(permit)
            }
            Err(denied) => {
                crate::metrics::decision(A::ACTION.as_str(), "deny");
                let decision = Decision::Deny { rule_line: denied.rule_line };
                self.decision = Some(Decided::Policy(decision, None));
                Err(denied.into())
            }
        }
    }

    /// Notes that the request's results are filtered path by path for `action` (List).
    pub(crate) fn filtered(&mut self, action: Action) {
        crate::metrics::decision(action.as_str(), "filtered");
        self.action = Some(action);
        self.decision = Some(Decided::Filtered);
    }

    /// The caller's principal (empty without connection identity).
    pub(crate) fn principal(&self) -> String {
        self.conn.as_ref().map(|c| c.identity.principal.to_string()).unwrap_or_default()
    }

    /// Notes the secret version the request wrote, read or deleted.
    pub(crate) fn version(&mut self, version: u64) {
        self.version = Some(version);
    }

    /// Notes the key that sealed or opened the value.
    pub(crate) fn key_id(&mut self, key_id: &str) {
        self.key_id = Some(key_id.to_owned());
    }

    /// Records the intent of a write, durably, before the store is touched: the [`Intent`]
    /// the vault's writing methods require.
    pub(crate) async fn intent(&mut self) -> Result<Intent, ApiError> {
        let record = self.record(Phase::Intent, None);
        let intent = self.audit.append_intent(record).await.map_err(|e| {
            tracing::error!(request_id = %self.request_id, error = %e, "write refused: its intent cannot be recorded");
            ApiError::AuditUnavailable
        })?;
        self.writing = Some(self.audit.writing());
        self.intent_recorded = true;
        Ok(intent)
    }

    /// Records, durably, that a long-lived stream (Watch) was authorized and opens; its
    /// outcome follows when it ends.
    pub(crate) async fn opened(&mut self) -> Result<(), ApiError> {
        let record = self.record(Phase::Open, None);
        self.audit.append(record).await.map_err(|e| {
            tracing::error!(request_id = %self.request_id, error = %e, "stream refused: its opening cannot be recorded");
            ApiError::AuditUnavailable
        })?;
        Ok(())
    }

    /// Notes what a long-running request did (Rewrap's counts), for its outcome record.
    pub(crate) fn summary(&mut self, summary: String) {
        self.summary = Some(summary);
    }

    /// Answers a streaming request at its start, with the request id; its outcome is recorded
    /// later by [`Call::finish`], before the stream's last message. The stream may run for
    /// minutes: it stops counting as a request in progress for the audit writer's group
    /// commit window, so other requests are not held for it.
    pub(crate) fn stream_started<T>(&mut self, stream: T) -> Response<T> {
        self.writing = None;
        self.in_flight = None;
        self.answer(stream)
    }

    /// Records the outcome and answers: the response, or the error as a status, both with
    /// the request id. UNAVAILABLE if the outcome record cannot be made durable.
    pub(crate) async fn finish<T>(
        mut self,
        result: Result<T, ApiError>,
    ) -> Result<Response<T>, Status> {
        let status = result.as_ref().err().map(Status::from);
        let record = self.record(Phase::Outcome, status.as_ref());
        let result = if matches!(result, Err(ApiError::AuditUnavailable)) {
            // The log already failed this request; the record goes in when it recovers.
            self.audit.note(record);
            result
        } else {
            let intent_recorded = self.intent_recorded;
            let appended = match self.writing.take() {
                Some(writing) => self.audit.append_outcome(record, writing).await,
                None => self.audit.append(record).await,
            };
            match appended {
                Ok(_) => result,
                Err(e) => {
                    tracing::error!(request_id = %self.request_id, error = %e, "answer withheld: its audit record cannot be made durable");
                    // After a recorded intent the store call ran (if it returned Ok): the
                    // client must not be told the write was not carried out.
                    Err(if intent_recorded && result.is_ok() {
                        ApiError::AuditAfterWrite
                    } else {
                        ApiError::AuditUnavailable
                    })
                }
            }
        };
        self.log(&result);
        self.respond(result)
    }

    /// Like [`Call::finish`] but answers without waiting for the record: only for the
    /// read-only diagnostics that must work while the audit log is failing (AuditStatus,
    /// which reports why). The record is still written when the log can take it.
    pub(crate) fn finish_unwaited<T>(
        self,
        result: Result<T, ApiError>,
    ) -> Result<Response<T>, Status> {
        let status = result.as_ref().err().map(Status::from);
        self.audit.note(self.record(Phase::Outcome, status.as_ref()));
        self.log(&result);
        self.respond(result)
    }

    fn respond<T>(&self, result: Result<T, ApiError>) -> Result<Response<T>, Status> {
        let elapsed = self.started.elapsed();
        match result {
            Ok(body) => {
                crate::metrics::rpc(self.method, Code::Ok, elapsed);
                Ok(self.answer(body))
            }
            Err(err) => {
                let mut status = Status::from(&err);
                crate::metrics::rpc(self.method, status.code(), elapsed);
                if let Some(id) = self.request_id_value() {
                    status.metadata_mut().insert(REQUEST_ID_HEADER, id);
                }
                Err(status)
            }
        }
    }

    /// `body` as a response carrying the request id.
    fn answer<T>(&self, body: T) -> Response<T> {
        let mut resp = Response::new(body);
        if let Some(id) = self.request_id_value() {
            resp.metadata_mut().insert(REQUEST_ID_HEADER, id);
        }
        resp
    }

    fn request_id_value(&self) -> Option<MetadataValue<tonic::metadata::Ascii>> {
        MetadataValue::try_from(self.request_id.as_str()).ok()
    }

    fn record(&self, phase: Phase, status: Option<&Status>) -> Record {
        let mut r = Record::new(Kind::Request);
        r.request_id = Some(self.request_id.clone());
        r.phase = Some(phase);
        if let Some(c) = &self.conn {
            r.principal = Some(c.identity.principal.to_string());
            r.cert_fingerprint = Some(c.identity.fingerprint.clone());
            r.cert_serial = Some(c.identity.serial.clone());
            r.peer = Some(c.peer_addr.to_string());
        }
        r.method = Some(self.method.to_owned());
        r.path = (!self.path.is_empty()).then(|| self.path.clone());
        r.action = self.action;
        match &self.decision {
            Some(Decided::Policy(d, policy)) => {
                (r.decision, r.rule, r.policy_version) =
                    (Some(d.effect()), Some(d.rule()), policy.clone());
            }
            Some(Decided::Filtered) => {
                (r.decision, r.rule) = (Some(Effect::Allow), Some(FILTERED.to_owned()));
            }
            None => {}
        }
        if phase == Phase::Outcome {
            r.status = Some(code_name(status.map_or(Code::Ok, Status::code)).to_owned());
            r.message = status.map(|s| s.message().to_owned());
        }
        r.version = self.version;
        r.key_id = self.key_id.clone();
        r.latency_us = Some(self.started.elapsed().as_micros() as u64);
        if phase == Phase::Outcome {
            r.reason.clone_from(&self.summary);
        }
        r
    }

    fn log<T>(&self, result: &Result<T, ApiError>) {
        let principal =
            self.conn.as_ref().map(|c| c.identity.principal.to_string()).unwrap_or_default();
        let peer = self.conn.as_ref().map(|c| c.peer_addr.to_string()).unwrap_or_default();
        let latency_us = self.started.elapsed().as_micros() as u64;
        let request_id = &self.request_id;
        match result {
            Ok(_) => {
                tracing::debug!(method = self.method, %request_id, %principal, %peer, path = ?self.path, latency_us, "ok");
            }
            Err(err) => {
                let rule = match &self.decision {
                    Some(Decided::Policy(d, _)) => d.rule(),
                    Some(Decided::Filtered) => FILTERED.to_owned(),
                    None => String::new(),
                };
                tracing::info!(
                    method = self.method, %request_id, %principal, %peer, path = ?self.path,
                    latency_us, code = ?err.code(), error = %err, %rule, "refused"
                );
            }
        }
    }
}

/// A fresh request id: 96 random bits in hex.
fn request_id() -> String {
    let mut id = [0u8; 12];
    if getrandom::fill(&mut id).is_err() {
        // No randomness: fall back to a clock-based id (unique enough to correlate).
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        return format!("t{nanos:x}");
    }
    hex::encode(id)
}

/// The canonical name of a gRPC status code, as in the gRPC spec.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
