//! Every request error, and its one mapping to a gRPC status.
//!
//! Messages tell the client precisely what *it* did wrong (bad path, not found, version
//! conflict, too large). Faults inside the gateway or its store reach the client as a
//! generic message; their detail goes to the internal log only, which never holds values.

use tonic::{Code, Status};

use crate::{
    limits::Throttled,
    path::{PathError, SecretPath},
    store::StoreError,
};

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The path (or list prefix) is not canonical.
    #[error("invalid path: {0}")]
    InvalidPath(#[from] PathError),
    /// The value is over `limits.max_value_bytes`.
    #[error("value is {size} bytes; the limit is {limit} bytes")]
    ValueTooLarge {
        /// Size sent.
        size: usize,
        /// Configured limit.
        limit: u64,
    },
    /// A page size outside 0..=1000.
    #[error("page_size {0} is too large; the maximum is {max}", max = super::MAX_PAGE_SIZE)]
    InvalidPageSize(u32),
    /// A page token that did not come from a List over the same prefix.
    #[error("page_token is not valid for this prefix")]
    InvalidPageToken,
    /// Over a rate limit of the policy (`rate_limits.toml`).
    #[error(
        "rate limit: {principal} is over its limit of {rate}/s (burst {burst}) for {class} \
         requests on this gateway replica{shared}; retry in {wait} ms",
        rate = .throttled.rate.per_second,
        burst = .throttled.rate.burst,
        class = .throttled.class.as_str(),
        shared = .throttled.role.as_ref().map(|r| format!(" (shared by role {r})")).unwrap_or_default(),
        wait = .throttled.retry_after.as_millis().max(1),
    )]
    RateLimited {
        /// The caller.
        principal: String,
        /// The limit and when to retry.
        throttled: Throttled,
    },
    /// The policy does not allow it. Names the action and path, never the policy.
    #[error(transparent)]
    Denied(#[from] crate::authz::Denied),
    /// No such secret, or its current version is deleted.
    #[error("secret {0} not found")]
    NotFound(SecretPath),
    /// The version was never written or has been pruned.
    #[error("secret {path} has no version {version}")]
    VersionNotFound {
        /// The secret.
        path: SecretPath,
        /// The version asked for.
        version: u64,
    },
    /// The version was soft-deleted.
    #[error("version {version} of secret {path} was deleted")]
    VersionDeleted {
        /// The secret.
        path: SecretPath,
        /// The version asked for.
        version: u64,
    },
    /// The version was destroyed: its value is gone for good.
    #[error("version {version} of secret {path} was destroyed")]
    VersionDestroyed {
        /// The secret.
        path: SecretPath,
        /// The version asked for.
        version: u64,
    },
    /// Compare-and-set failed.
    #[error(
        "version conflict on {path}: expected version {expected}, current version is {current}"
    )]
    Conflict {
        /// The secret.
        path: SecretPath,
        /// What the client expected.
        expected: u64,
        /// What is current.
        current: u64,
    },
    /// An unconditional write kept losing races with other writers.
    #[error("secret {0} is being written concurrently; retry")]
    Contended(SecretPath),
    /// The stored value does not decrypt: altered, moved, or its key is gone.
    #[error(
        "stored value of {path} version {version} cannot be decrypted; it was altered or its key is unavailable"
    )]
    Undecryptable {
        /// The secret.
        path: SecretPath,
        /// The version read.
        version: u64,
    },
    /// Another rewrap is already running on this gateway.
    #[error("a rewrap is already running on this gateway")]
    RewrapRunning,
    /// The caller closed the stream before the rewrap finished; running it again resumes.
    #[error("rewrap cancelled by the caller; run it again to resume")]
    RewrapCancelled,
    /// Watch: the changes after `from` are gone from the history the gateway can replay.
    #[error(
        "resync required: changes after revision {from} are no longer available (this \
         gateway's history starts after revision {start}); list, then watch from revision 0"
    )]
    ResyncRequired {
        /// The revision the client asked to resume from.
        from: u64,
        /// The oldest revision that can still be resumed from.
        start: u64,
    },
    /// Watch: the caller reads so slowly that it fell too far behind.
    #[error(
        "watch stream too slow: more than {limit} changes behind; resume from revision {resume}"
    )]
    WatcherTooSlow {
        /// `watch.max_lag_events`.
        limit: usize,
        /// Where the caller got to.
        resume: u64,
    },
    /// Watch: the caller has as many watch streams open on this replica as it may.
    #[error(
        "{principal} has {limit} watch streams open on this gateway replica, its limit \
         (watch.max_per_principal); close one first"
    )]
    TooManyWatchers {
        /// The caller.
        principal: String,
        /// `watch.max_per_principal`.
        limit: usize,
    },
    /// Watch: the policy in force lets the caller read nothing under the prefix.
    #[error("permission denied: {principal} may not read anything at or below {prefix}")]
    NothingToWatch {
        /// The caller.
        principal: String,
        /// The prefix watched.
        prefix: String,
    },
    /// Watch: the gateway is shutting down.
    #[error("the gateway is shutting down; watch again (any replica) from revision {resume}")]
    ShuttingDown {
        /// Where the caller got to.
        resume: u64,
    },
    /// A long-lived stream (Watch) found the connection's certificate no longer trusted.
    #[error("{why}; resume from revision {resume} with a trusted certificate")]
    WatchUntrusted {
        /// Why the certificate is no longer accepted.
        why: crate::tls::Untrusted,
        /// Where the caller got to.
        resume: u64,
    },
    /// The client closed a stream (Watch) before it ended.
    #[error("the client closed the stream")]
    StreamClosed,
    /// The store cannot answer now.
    #[error("secret store unavailable")]
    Unavailable,
    /// The replicated store has lost its quorum: nothing can be read or written until enough
    /// of its members return.
    #[error("secret store unavailable: it has no quorum (too few store members reachable)")]
    NoQuorum,
    /// A write was sent to the store but not confirmed in time; it may still take effect.
    #[error(
        "secret store did not confirm the write in time: its outcome is unknown (it may still \
         take effect); read the secret before retrying"
    )]
    OutcomeUnknown,
    /// The audit log cannot record the request, so it is refused (fail closed). The
    /// reason is in the gateway log and health, not in the message.
    #[error("audit log unavailable: the request was refused and not carried out")]
    AuditUnavailable,
    /// The write was carried out (its intent is recorded) but its outcome record cannot be
    /// made durable, so the answer is withheld: the client must read before retrying.
    #[error(
        "audit log unavailable after the write was applied: its outcome is unknown to the \
         client; read the secret before retrying"
    )]
    AuditAfterWrite,
    /// A control-state request (Control service) that cannot be carried out.
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    /// A fault inside the gateway. Detail is logged, not returned.
    #[error("internal error")]
    Internal,
    /// The client certificate of this connection is no longer accepted: revoked, its CA
    /// removed from the bundle, or expired since the connection was made; the connection can
    /// no longer be used.
    #[error("{0}")]
    CertificateNotAccepted(#[from] crate::tls::Untrusted),
    /// The request arrived without connection identity (a wiring fault, never a client's).
    #[error("no authenticated identity on this connection")]
    NoIdentity,
}

impl ApiError {
    /// Translates a store error on `path`, logging the internal detail of faults.
    pub fn from_store(err: StoreError, path: &SecretPath) -> Self {
        match err {
            StoreError::NotFound => Self::NotFound(path.clone()),
            StoreError::VersionNotFound(version) => {
                Self::VersionNotFound { path: path.clone(), version }
            }
            StoreError::VersionDeleted(version) => {
                Self::VersionDeleted { path: path.clone(), version }
            }
            StoreError::VersionDestroyed(version) => {
                Self::VersionDestroyed { path: path.clone(), version }
            }
            StoreError::Conflict { expected, current } => {
                Self::Conflict { path: path.clone(), expected, current }
            }
            fault => {
                tracing::warn!(%path, "store fault on this path");
                Self::from_store_fault(fault)
            }
        }
    }

    /// Translates a store error that is not about one secret, logging its internal detail.
    pub fn from_store_fault(err: StoreError) -> Self {
        match err {
            StoreError::Unavailable(detail) => {
                tracing::warn!(%detail, "store unavailable");
                Self::Unavailable
            }
            StoreError::NoQuorum(detail) => {
                tracing::warn!(%detail, "store has no quorum");
                Self::NoQuorum
            }
            StoreError::OutcomeUnknown(detail) => {
                tracing::warn!(%detail, "store write outcome unknown");
                Self::OutcomeUnknown
            }
            StoreError::Fenced { kind, version } => {
                // Still fenced after following the store: its newer version cannot be used
                // (refused: see reload-status), so no write may be sealed under the old one.
                tracing::error!(%kind, version, "write refused: the store holds a newer keyring version this replica cannot use; see secretgate keys status --store");
                Self::Unavailable
            }
            other => {
                tracing::error!(error = %other, "store failure");
                Self::Internal
            }
        }
    }

    /// The gRPC code for this error.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidPath(_)
            | Self::ValueTooLarge { .. }
            | Self::InvalidPageSize(_)
            | Self::InvalidPageToken => Code::InvalidArgument,
            Self::NotFound(_)
            | Self::VersionNotFound { .. }
            | Self::VersionDeleted { .. }
            | Self::VersionDestroyed { .. } => Code::NotFound,
            Self::Denied(_) | Self::NothingToWatch { .. } => Code::PermissionDenied,
            Self::RateLimited { .. }
            | Self::WatcherTooSlow { .. }
            | Self::TooManyWatchers { .. } => Code::ResourceExhausted,
            Self::CertificateNotAccepted(_) | Self::WatchUntrusted { .. } => Code::Unauthenticated,
            Self::ResyncRequired { .. } => Code::OutOfRange,
            Self::RewrapCancelled | Self::StreamClosed => Code::Cancelled,
            Self::Conflict { .. } | Self::RewrapRunning => Code::FailedPrecondition,
            Self::Undecryptable { .. } => Code::DataLoss,
            Self::Contended(_) => Code::Aborted,
            Self::Unavailable
            | Self::NoQuorum
            | Self::OutcomeUnknown
            | Self::AuditUnavailable
            | Self::AuditAfterWrite
            | Self::ShuttingDown { .. } => Code::Unavailable,
            Self::Internal | Self::NoIdentity => Code::Internal,
            Self::Control(e) => control_code(e),
        }
    }
}

fn control_code(e: &crate::control::ControlError) -> Code {
    use crate::control::ControlError as E;
    match e {
        E::Invalid(_) | E::Refused(_) | E::TooLarge { .. } => Code::InvalidArgument,
        E::Raced { .. }
        | E::NotInStore { .. }
        | E::TierNotReady(_)
        | E::Keyring(_)
        | E::RolledBack { .. } => Code::FailedPrecondition,
        E::Version { .. } => Code::NotFound,
        E::Store(StoreError::NoQuorum(_) | StoreError::Unavailable(_)) => Code::Unavailable,
        E::Store(StoreError::OutcomeUnknown(_)) => Code::Unavailable,
        E::Store(_) => Code::Internal,
    }
}

impl From<&ApiError> for Status {
    fn from(err: &ApiError) -> Self {
        match err {
            // The standard detail tells gRPC clients when to retry.
            ApiError::RateLimited { throttled, .. } => {
                use tonic_types::{ErrorDetails, StatusExt};
                let details = ErrorDetails::with_retry_info(Some(throttled.retry_after));
                Status::with_error_details(err.code(), err.to_string(), details)
            }
            ApiError::WatcherTooSlow { resume, .. }
            | ApiError::ShuttingDown { resume }
            | ApiError::WatchUntrusted { resume, .. } => {
                let mut status = Status::new(err.code(), err.to_string());
                status.metadata_mut().insert(RESUME_REVISION_HEADER, (*resume).into());
                status
            }
            _ => Status::new(err.code(), err.to_string()),
        }
    }
}

/// The trailer of a Watch stream's ending that says which revision to resume from.
pub const RESUME_REVISION_HEADER: &str = "x-resume-revision";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_faults_do_not_reach_the_client() {
        let path = SecretPath::parse("/a").unwrap();
        let err = ApiError::from_store(StoreError::Backend("/var/lib/x.redb: EIO".into()), &path);
        let status = Status::from(&err);
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("redb"), "{}", status.message());
        let err =
            ApiError::from_store(StoreError::Unavailable("10.0.0.1:2379 refused".into()), &path);
        assert!(!Status::from(&err).message().contains("10.0.0.1"));
    }

    #[test]
    fn denials_name_action_and_path_but_not_the_rule() {
        let err = ApiError::from(crate::authz::Denied {
            principal: "spiffe://x/app".into(),
            action: crate::authz::Action::Write,
            target: "/apps/x".into(),
            rule_line: Some(42),
        });
        let status = Status::from(&err);
        assert_eq!(status.code(), Code::PermissionDenied);
        assert_eq!(status.message(), "permission denied: spiffe://x/app may not write /apps/x");
    }

    #[test]
    fn quorum_loss_and_unknown_outcomes_are_unavailable_and_say_so() {
        let path = SecretPath::parse("/a").unwrap();
        let status = Status::from(&ApiError::from_store(
            StoreError::NoQuorum("https://10.0.0.1:2379: no leader".into()),
            &path,
        ));
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().contains("no quorum"), "{}", status.message());
        assert!(!status.message().contains("10.0.0.1"));
        let status = Status::from(&ApiError::from_store(
            StoreError::OutcomeUnknown("timed out".into()),
            &path,
        ));
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().contains("outcome is unknown"), "{}", status.message());
    }

    #[test]
    fn client_mistakes_are_precise() {
        let path = SecretPath::parse("/a").unwrap();
        let err = ApiError::from_store(StoreError::Conflict { expected: 0, current: 3 }, &path);
        let status = Status::from(&err);
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert!(status.message().contains("current version is 3"));
        let status = Status::from(&ApiError::from(SecretPath::parse("/a//b").unwrap_err()));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("empty segment"));
    }
}
