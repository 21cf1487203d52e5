//! A `Secrets.Watch` stream as tests read it, and helpers that wait on conditions.

use std::time::Duration;

use secretgate::{
    audit::Record,
    proto::v1::{
        GetRequest, WatchEvent, WatchRequest, WatchResponse, secrets_client::SecretsClient,
    },
};
use tokio::time::Instant;
use tonic::{Code, Status, Streaming, transport::Channel};

use crate::{TestGateway, audit::read_log};

/// An open Watch stream and the revision its last message said to resume from.
#[derive(Debug)]
pub struct Watch {
    stream: Streaming<WatchResponse>,
    /// The `revision` of the last message received.
    pub revision: u64,
}

impl Watch {
    /// Opens a stream on `prefix` from `from`; the gateway's refusal, if it refuses.
    pub async fn open(
        client: &mut SecretsClient<Channel>,
        prefix: &str,
        from: u64,
    ) -> Result<Self, Status> {
        let req = WatchRequest { prefix: prefix.into(), from_revision: from };
        let stream = client.watch(req).await?.into_inner();
        Ok(Self { stream, revision: from })
    }

    /// The next message within `within`: `Ok(None)` on a timeout, `Err` when the stream
    /// ended with an error. Panics if it ended without one.
    pub async fn try_message(&mut self, within: Duration) -> Result<Option<WatchResponse>, Status> {
        match tokio::time::timeout(within, self.stream.message()).await {
            Err(_) => Ok(None),
            Ok(Ok(Some(m))) => {
                self.revision = m.revision;
                Ok(Some(m))
            }
            Ok(Ok(None)) => panic!("the watch stream ended without a status"),
            Ok(Err(status)) => Err(status),
        }
    }

    /// The next message within `within`, or `None`.
    pub async fn message(&mut self, within: Duration) -> Option<WatchResponse> {
        self.try_message(within).await.unwrap_or_else(|s| panic!("the stream ended: {s:?}"))
    }

    /// Exactly the next `n` events (heartbeats skipped), all within `within`.
    pub async fn events(&mut self, n: usize, within: Duration) -> Vec<WatchEvent> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.message(left).await {
                Some(m) => out.extend(m.events),
                None => panic!("{} of {n} events within {within:?}: {out:?}", out.len()),
            }
        }
        assert_eq!(out.len(), n, "more events than expected: {out:?}");
        out
    }

    /// Asserts that no event comes for `time` (heartbeats may).
    pub async fn quiet(&mut self, time: Duration) {
        let deadline = Instant::now() + time;
        while let Some(m) = self.message(deadline.saturating_duration_since(Instant::now())).await {
            assert!(m.events.is_empty(), "unexpected events: {:?}", m.events);
        }
    }

    /// The status the stream ends with, within `within` (events before it are dropped).
    pub async fn end(&mut self, within: Duration) -> Status {
        self.drain(within).await.1
    }

    /// Every event until the stream ends, and the status it ends with, within `within`.
    pub async fn drain(&mut self, within: Duration) -> (Vec<WatchEvent>, Status) {
        let deadline = Instant::now() + within;
        let mut events = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "the stream did not end within {within:?}");
            match self.try_message(left).await {
                Ok(Some(m)) => events.extend(m.events),
                Ok(None) => {}
                Err(status) => return (events, status),
            }
        }
    }
}

/// A client whose HTTP/2 windows (connection and stream) are only `window` bytes, so that
/// not reading stops the gateway sending after that much (hyper's own default is 2 MiB per
/// stream).
pub async fn small_window_client(
    gw: &TestGateway,
    spiffe: &str,
    window: u32,
) -> SecretsClient<Channel> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let identity = gw.ca.client(spiffe);
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&gw.ca.cert_pem))
        .identity(Identity::from_pem(&identity.cert, &identity.key));
    let channel = Endpoint::from_shared(format!("https://{}", gw.addr()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .initial_stream_window_size(window)
        .initial_connection_window_size(window)
        .connect()
        .await
        .unwrap();
    SecretsClient::new(channel)
}

/// The `x-resume-revision` trailer of a stream's ending.
pub fn resume_revision(status: &Status) -> Option<u64> {
    status.metadata().get("x-resume-revision")?.to_str().ok()?.parse().ok()
}

/// The Watch records of `principal` in the log, once its stream's outcome is there.
pub async fn records_of(gw: &TestGateway, principal: &str) -> Vec<Record> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let records: Vec<Record> = read_log(&gw.config.audit.path)
            .into_iter()
            .map(|(_, r)| r)
            .filter(|r| {
                r.principal.as_deref() == Some(principal)
                    && r.method.as_deref() == Some("secretgate.v1.Secrets/Watch")
            })
            .collect();
        if records.iter().any(|r| r.phase == Some(secretgate::audit::Phase::Outcome)) {
            return records;
        }
        assert!(Instant::now() < deadline, "no Watch outcome for {principal}: {records:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (10 s at most) until a Get of `path` is answered with `code` (a policy reload
/// took effect).
pub async fn until_decided(client: &mut SecretsClient<Channel>, path: &str, code: Code) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = client.get(GetRequest { path: path.into(), version: None }).await;
        let now = match got {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        };
        if now == code {
            return;
        }
        assert!(Instant::now() < deadline, "{path} still answers {now:?}, not {code:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (10 s at most) until a Watch on `prefix` opens (a slot was given back).
pub async fn until_opens(client: &mut SecretsClient<Channel>, prefix: &str) -> Watch {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Watch::open(client, prefix, 0).await {
            Ok(w) => return w,
            Err(s) => {
                assert!(Instant::now() < deadline, "no Watch on {prefix} opened: {s:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
