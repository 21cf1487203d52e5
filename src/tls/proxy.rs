//! The PROXY protocol, version 2 (HAProxy's binary header), from trusted load balancers.
//!
//! Behind a TCP load balancer every connection comes from the balancer's address, so the
//! per-source handshake cap, the logs and the audit log would all name it instead of the
//! client. A balancer listed in `proxy_protocol_from` sends a PROXY v2 header before the
//! TLS ClientHello, naming the client's address; the gateway reads it first and uses that
//! address from then on. Only listed addresses may send one: from anyone else the header is
//! not read (the handshake then fails on it), so a client cannot claim another's address.
//! A listed balancer must send it on every connection (a `LOCAL` header for its own health
//! checks): a connection from it without one is refused. Version 1 (the text header) is
//! refused: it is ambiguous to parse and every balancer that speaks it also speaks v2.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

/// The 12 bytes every v2 header starts with.
const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Largest address block (with its TLVs) accepted; a v2 header for TCP over IPv6 needs 36.
const MAX_BLOCK: usize = 1024;

/// A PROXY header's word on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proxied {
    /// The connection carries a client from this address.
    Client(SocketAddr),
    /// The balancer's own connection (`LOCAL`, or an address family it does not name):
    /// it stands for itself.
    Local,
}

/// Reads one PROXY v2 header from `io`, and not a byte more.
pub async fn read_header(io: &mut (impl AsyncRead + Unpin)) -> Result<Proxied, String> {
    let mut fixed = [0u8; 16];
    io.read_exact(&mut fixed).await.map_err(|e| format!("no PROXY protocol header: {e}"))?;
    let len = check_fixed(&fixed)?;
    let mut block = vec![0u8; len];
    io.read_exact(&mut block).await.map_err(|e| format!("PROXY protocol header cut short: {e}"))?;
    addresses(fixed[12], fixed[13], &block)
}

/// Checks the fixed 16 bytes; the length of the address block that follows.
fn check_fixed(fixed: &[u8; 16]) -> Result<usize, String> {
    if fixed[..12] != SIGNATURE {
        let why = if fixed.starts_with(b"PROXY ") {
            "a PROXY protocol v1 (text) header; only v2 is accepted"
        } else {
            "no PROXY protocol v2 header from a load balancer listed in proxy_protocol_from"
        };
        return Err(why.into());
    }
    if fixed[12] >> 4 != 2 {
        return Err(format!("PROXY protocol version {} is not 2", fixed[12] >> 4));
    }
    let len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    if len > MAX_BLOCK {
        return Err(format!("PROXY protocol header of {len} bytes; the limit is {MAX_BLOCK}"));
    }
    Ok(len)
}

fn addresses(ver_cmd: u8, family: u8, block: &[u8]) -> Result<Proxied, String> {
    match ver_cmd & 0x0f {
        0 => return Ok(Proxied::Local),
        1 => {}
        c => return Err(format!("PROXY protocol command {c} is neither LOCAL nor PROXY")),
    }
    let short = || format!("PROXY protocol address block of {} bytes is too short", block.len());
    match family {
        // UNSPEC: the balancer does not say; the connection stands for itself.
        0x00 => Ok(Proxied::Local),
        // TCP over IPv4: source, destination, source port, destination port.
        0x11 => {
            let b: &[u8; 12] = block.get(..12).and_then(|b| b.try_into().ok()).ok_or_else(short)?;
            let ip = Ipv4Addr::new(b[0], b[1], b[2], b[3]);
            let port = u16::from_be_bytes([b[8], b[9]]);
            Ok(Proxied::Client(SocketAddr::new(IpAddr::V4(ip), port)))
        }
        // TCP over IPv6.
        0x21 => {
            let b: &[u8; 36] = block.get(..36).and_then(|b| b.try_into().ok()).ok_or_else(short)?;
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&b[..16]);
            let port = u16::from_be_bytes([b[32], b[33]]);
            Ok(Proxied::Client(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port)))
        }
        f => Err(format!("PROXY protocol family/protocol {f:#04x} is not TCP over IPv4 or IPv6")),
    }
}

/// A v2 header for `client` (as a load balancer sends it), for tests.
#[cfg(any(test, feature = "testing"))]
pub fn header(client: Option<SocketAddr>, server: SocketAddr) -> Vec<u8> {
    let mut h = SIGNATURE.to_vec();
    match (client, server) {
        (None, _) => h.extend([0x20, 0x00, 0, 0]),
        (Some(SocketAddr::V4(c)), SocketAddr::V4(s)) => {
            h.extend([0x21, 0x11, 0, 12]);
            h.extend(c.ip().octets());
            h.extend(s.ip().octets());
            h.extend(c.port().to_be_bytes());
            h.extend(s.port().to_be_bytes());
        }
        (Some(c), s) => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            h.extend([0x21, 0x21, 0, 36]);
            h.extend(v6(c).octets());
            h.extend(v6(s).octets());
            h.extend(c.port().to_be_bytes());
            h.extend(s.port().to_be_bytes());
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read(bytes: &[u8]) -> (Result<Proxied, String>, Vec<u8>) {
        let mut io = bytes;
        let r = read_header(&mut io).await;
        (r, io.to_vec())
    }

    #[tokio::test]
    async fn client_addresses_are_read_and_nothing_after_the_header() {
        let server: SocketAddr = "10.0.0.1:7443".parse().unwrap();
        for client in ["192.0.2.9:40000", "[2001:db8::7]:5555"] {
            let client: SocketAddr = client.parse().unwrap();
            let mut bytes = header(Some(client), server);
            bytes.extend(b"\x16\x03\x01");
            let (r, rest) = read(&bytes).await;
            assert_eq!(r, Ok(Proxied::Client(client)));
            assert_eq!(rest, b"\x16\x03\x01", "the ClientHello is left for TLS");
        }
        assert_eq!(read(&header(None, server)).await.0, Ok(Proxied::Local));
    }

    #[tokio::test]
    async fn anything_but_a_well_formed_v2_header_is_refused_with_a_reason() {
        let server: SocketAddr = "10.0.0.1:7443".parse().unwrap();
        let good = header(Some("192.0.2.9:1".parse().unwrap()), server);
        let mut v1 = b"PROXY TCP4 192.0.2.9 10.0.0.1 1 7443\r\n".to_vec();
        v1.resize(40, b' ');
        let mut version3 = good.clone();
        version3[12] = 0x31;
        let mut long = good.clone();
        long[14..16].copy_from_slice(&2000u16.to_be_bytes());
        let mut unix = good.clone();
        unix[13] = 0x31;
        let mut short = good[..16].to_vec();
        short[15] = 4;
        short.extend([1, 2, 3, 4]);
        let cases: [(&[u8], &str); 7] = [
            (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03abcdef", "no PROXY protocol v2 header"),
            (&v1, "v1 (text)"),
            (&version3, "version 3"),
            (&long, "2000 bytes"),
            (&unix, "0x31"),
            (&short, "too short"),
            (&good[..20], "cut short"),
        ];
        for (bytes, says) in cases {
            let err = read(bytes).await.0.unwrap_err();
            assert!(err.contains(says), "{err:?} should say {says:?}");
        }
    }
}
