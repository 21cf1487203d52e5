//! The metrics listener: HTTP/1.1 `GET /metrics`, plain or TLS (`[metrics]`).
//!
//! Small and bounded on purpose: it has no client authentication, so anyone who reaches it
//! can connect. At most [`MAX_CONNECTIONS`] at once (more wait in the kernel's backlog),
//! each closed after [`CONNECTION_TIME`], any request body ignored.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::Semaphore, task::JoinHandle};
use tokio_rustls::TlsAcceptor;

use super::scrape::Sources;

/// Scrape connections served at once.
const MAX_CONNECTIONS: usize = 16;
/// How long one scrape connection may stay open.
const CONNECTION_TIME: Duration = Duration::from_secs(10);
/// The OpenMetrics text format, for a scraper that asks for it (Prometheus does).
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The Prometheus text format (0.0.4), for everyone else (promtool, curl).
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The running metrics listener; stops when dropped.
pub struct MetricsServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl MetricsServer {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `GET /metrics` from `sources` on `listener`, over TLS when `tls` is given.
pub fn serve(
    listener: TcpListener,
    sources: Sources,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> std::io::Result<MetricsServer> {
    let addr = listener.local_addr()?;
    let tls = tls.map(TlsAcceptor::from);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let task = tokio::spawn(async move {
        loop {
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else { return };
            let (tcp, _) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (sources, tls) = (sources.clone(), tls.clone());
            tokio::spawn(async move {
                let _slot = slot;
                let service = service_fn(move |req| {
                    let sources = sources.clone();
                    async move { Ok::<_, Infallible>(answer(&req, &sources)) }
                });
                let served = async {
                    match tls {
                        None => {
                            let io = TokioIo::new(tcp);
                            http1::Builder::new().serve_connection(io, service).await
                        }
                        Some(tls) => match tls.accept(tcp).await {
                            Ok(stream) => {
                                let io = TokioIo::new(stream);
                                http1::Builder::new().serve_connection(io, service).await
                            }
                            Err(e) => {
                                tracing::debug!(error = %e, "metrics: TLS handshake failed");
                                Ok(())
                            }
                        },
                    }
                };
                let _ = tokio::time::timeout(CONNECTION_TIME, served).await;
            });
        }
    });
    tracing::info!(%addr, "metrics serving on /metrics");
    Ok(MetricsServer { addr, task })
}

fn answer(req: &Request<Incoming>, sources: &Sources) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, kind: &'static str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(kind));
        r
    };
    let text = "text/plain; charset=utf-8";
    if req.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            text,
            "not found: the metrics are at /metrics\n".into(),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, text, "only GET\n".into());
    }
    let openmetrics = req
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.contains("application/openmetrics-text")));
    match sources.encode() {
        Ok(body) if openmetrics => reply(StatusCode::OK, OPENMETRICS, body),
        Ok(body) => reply(StatusCode::OK, PROMETHEUS_TEXT, prometheus_text(&body)),
        Err(_) => {
            reply(StatusCode::INTERNAL_SERVER_ERROR, text, "cannot encode the metrics\n".into())
        }
    }
}

/// The Prometheus text format of an OpenMetrics exposition: a counter family is named with
/// its `_total` (as its samples are), and the `# UNIT` and `# EOF` lines, which that format
/// does not have, are left out.
fn prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 64 * counters.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let comment = ["# HELP ", "# TYPE "].into_iter().find(|p| line.starts_with(p));
        if let Some(prefix) = comment {
            let rest = &line[prefix.len()..];
            let name = rest.split(' ').next().unwrap_or_default();
            if counters.contains(name) {
                out.push_str(prefix);
                out.push_str(name);
                out.push_str("_total");
                out.push_str(&rest[name.len()..]);
                out.push('\n');
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_prometheus_text_names_counters_with_their_total() {
        let om = "# HELP a_requests Requests.\n# TYPE a_requests counter\na_requests_total 1\n\
                  # HELP a_time Time.\n# TYPE a_time histogram\n# UNIT a_time seconds\n\
                  a_time_count 0\n# EOF\n";
        assert_eq!(
            super::prometheus_text(om),
            "# HELP a_requests_total Requests.\n# TYPE a_requests_total counter\n\
             a_requests_total 1\n# HELP a_time Time.\n# TYPE a_time histogram\na_time_count 0\n"
        );
    }
}
