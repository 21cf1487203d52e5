//! A raw HTTP/2 gRPC client over real mTLS, for attacks a well-behaved client cannot make:
//! streams left unfinished, a PROXY protocol header before the TLS handshake.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use bytes::Bytes;
use tokio::{io::AsyncWriteExt, task::JoinHandle};

use crate::Pem;

/// One HTTP/2 connection: the handle that opens streams, and the task driving it (ends
/// when the server closes the connection).
pub struct H2 {
    pub send: h2::client::SendRequest<Bytes>,
    pub conn: JoinHandle<Result<(), h2::Error>>,
}

/// Connects to `addr` over mTLS as `identity`, sending `preamble` (a PROXY header, or
/// nothing) on the TCP connection before the TLS ClientHello.
pub async fn connect(
    addr: SocketAddr,
    ca_pem: &str,
    identity: &Pem,
    preamble: &[u8],
) -> Result<H2, String> {
    connect_from("127.0.0.1".parse().unwrap(), addr, ca_pem, identity, preamble).await
}

/// Like [`connect`], from the local address `from` (127.0.0.2, …: another source).
pub async fn connect_from(
    from: IpAddr,
    addr: SocketAddr,
    ca_pem: &str,
    identity: &Pem,
    preamble: &[u8],
) -> Result<H2, String> {
    let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
    socket.bind(SocketAddr::new(from, 0)).map_err(|e| e.to_string())?;
    let mut tcp = socket.connect(addr).await.map_err(|e| e.to_string())?;
    tcp.write_all(preamble).await.map_err(|e| e.to_string())?;
    let tls = crate::tls_over(tcp, crate::client_tls(ca_pem, Some(identity), false)).await?;
    let (send, conn) = h2::client::handshake(tls).await.map_err(|e| e.to_string())?;
    let conn = tokio::spawn(conn);
    let send = send.ready().await.map_err(|e| e.to_string())?;
    Ok(H2 { send, conn })
}

/// The request headers of a gRPC call to `method` (`/package.Service/Method`).
pub fn request(method: &str) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!("https://localhost{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// Sends a whole unary call of `method` with the encoded `message` on `conn`.
pub fn unary(conn: &mut H2, method: &str, message: &[u8]) -> h2::client::ResponseFuture {
    let (response, mut body) = conn.send.send_request(request(method), false).unwrap();
    body.send_data(frame(message, message.len() as u32), true).unwrap();
    response
}

/// `message` framed as one gRPC message (uncompressed), whose header claims `claimed` bytes.
pub fn frame(message: &[u8], claimed: u32) -> Bytes {
    let mut out = Vec::with_capacity(5 + message.len());
    out.push(0);
    out.extend(claimed.to_be_bytes());
    out.extend_from_slice(message);
    out.into()
}

/// The gRPC status of a response (from its headers, trailers-only, or its trailers), or
/// `None` if none comes within `wait`.
pub async fn status(
    response: h2::client::ResponseFuture,
    wait: Duration,
) -> Option<(i32, String, Bytes)> {
    tokio::time::timeout(wait, async {
        let response = response.await.ok()?;
        let read = |h: &http::HeaderMap| {
            let code = h.get("grpc-status")?.to_str().ok()?.parse().ok()?;
            let message = h.get("grpc-message").and_then(|m| m.to_str().ok()).unwrap_or("");
            Some((code, message.to_owned()))
        };
        if let Some((code, message)) = read(response.headers()) {
            return Some((code, message, Bytes::new()));
        }
        let mut body = response.into_body();
        let mut data = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.ok()?;
            let _ = body.flow_control().release_capacity(chunk.len());
            data.extend_from_slice(&chunk);
        }
        let trailers = body.trailers().await.ok()??;
        read(&trailers).map(|(c, m)| (c, m, data.into()))
    })
    .await
    .ok()
    .flatten()
}
