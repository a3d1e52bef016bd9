//! The PROXY protocol header (v1 text and v2 binary) that L4 load balancers put in front of a
//! connection. The socket is peeked, the header parsed from what arrived, and exactly the
//! header's bytes are then read (TLS follows, so nothing past it may be taken): two system
//! calls for a header that arrives in one segment, as load balancers send it. A header is
//! refused at the first byte that cannot belong to one.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

const V2_SIG: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 line, CRLF included (the specification's bound).
const V1_MAX: usize = 107;
/// The longest v2 header accepted: the fixed 16 bytes plus addresses and TLVs.
const V2_MAX: usize = 16 + 2048;
/// How much is peeked at once; longer v2 headers are taken in several steps.
const PEEK: usize = 256;

/// Reads a PROXY header and returns the client address it carries (`fallback`, the socket's
/// own peer, for v1 `UNKNOWN` and v2 `LOCAL`).
pub(crate) async fn read_header(
    tcp: &mut TcpStream,
    fallback: SocketAddr,
) -> io::Result<SocketAddr> {
    let bad = |m: &'static str| io::Error::new(io::ErrorKind::InvalidData, m);
    // Header bytes already taken off the socket (only when the header came in pieces).
    let mut taken: Vec<u8> = Vec::new();
    let mut peeked = [0u8; PEEK];
    loop {
        let n = tcp.peek(&mut peeked).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let parsed = if taken.is_empty() {
            parse(&peeked[..n], fallback)
        } else {
            let mut all = taken.clone();
            all.extend_from_slice(&peeked[..n]);
            parse(&all, fallback)
        };
        match parsed.map_err(bad)? {
            Some((addr, len)) => {
                let mut rest = vec![0u8; len - taken.len()];
                tcp.read_exact(&mut rest).await?;
                return Ok(addr);
            }
            None => {
                // Incomplete: every byte that arrived belongs to the header (parse guarantees
                // it), so taking them all is safe, and the next peek waits for new bytes.
                let at = taken.len();
                taken.resize(at + n, 0);
                tcp.read_exact(&mut taken[at..]).await?;
            }
        }
    }
}

/// Parses a header at the start of `buf`: the address and the header's length, `None` when the
/// bytes so far are a proper prefix of a valid header (every byte of them is header).
pub(crate) fn parse(
    buf: &[u8],
    fallback: SocketAddr,
) -> Result<Option<(SocketAddr, usize)>, &'static str> {
    match buf.first() {
        None => Ok(None),
        Some(b'P') => {
            let sig = b"PROXY ";
            let k = buf.len().min(sig.len());
            if buf[..k] != sig[..k] {
                return Err("not a PROXY header");
            }
            let window = &buf[..buf.len().min(V1_MAX)];
            match window.windows(2).position(|w| w == b"\r\n") {
                // No CR or LF inside the line, even after UNKNOWN: what a proper prefix of
                // a header may hold must be decidable without its end.
                Some(i) if buf[..i].iter().any(|&b| b == b'\r' || b == b'\n') => {
                    Err("malformed PROXY v1 header")
                }
                Some(i) => parse_v1(&buf[..i], fallback)
                    .map(|a| Some((a, i + 2)))
                    .ok_or("malformed PROXY v1 header"),
                None if buf.len() >= V1_MAX => Err("PROXY v1 header too long"),
                // A lone LF or CR in the middle can never become the CRLF that ends it.
                None if window[..window.len().saturating_sub(1)].contains(&b'\r')
                    || window.contains(&b'\n') =>
                {
                    Err("malformed PROXY v1 header")
                }
                None => Ok(None),
            }
        }
        Some(b'\r') => {
            let k = buf.len().min(V2_SIG.len());
            if buf[..k] != V2_SIG[..k] {
                return Err("not a PROXY header");
            }
            if buf.len() < 16 {
                return Ok(None);
            }
            let total = 16 + u16::from_be_bytes([buf[14], buf[15]]) as usize;
            if total > V2_MAX {
                return Err("PROXY v2 header too long");
            }
            if buf.len() < total {
                return Ok(None);
            }
            parse_v2(buf[12], buf[13], &buf[16..total], fallback)
                .map(|a| Some((a, total)))
                .ok_or("malformed PROXY v2 header")
        }
        Some(_) => Err("not a PROXY header"),
    }
}

fn parse_v1(line: &[u8], fallback: SocketAddr) -> Option<SocketAddr> {
    let text = std::str::from_utf8(line).ok()?;
    let mut parts = text.split(' ');
    if parts.next()? != "PROXY" {
        return None;
    }
    let family = parts.next()?;
    if family == "UNKNOWN" {
        return Some(fallback);
    }
    let (src, dst) = (parts.next()?, parts.next()?);
    let (sport, dport) = (port(parts.next()?)?, port(parts.next()?)?);
    if parts.next().is_some() {
        return None;
    }
    let _ = dport;
    // The family names the address kind: TCP4 with IPv6 addresses (or the reverse) is invalid.
    let src: IpAddr = match family {
        "TCP4" => {
            dst.parse::<Ipv4Addr>().ok()?;
            src.parse::<Ipv4Addr>().ok()?.into()
        }
        "TCP6" => {
            dst.parse::<Ipv6Addr>().ok()?;
            src.parse::<Ipv6Addr>().ok()?.into()
        }
        _ => return None,
    };
    Some(SocketAddr::new(src, sport))
}

fn port(s: &str) -> Option<u16> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn parse_v2(ver_cmd: u8, fam: u8, body: &[u8], fallback: SocketAddr) -> Option<SocketAddr> {
    if ver_cmd >> 4 != 2 {
        return None;
    }
    match ver_cmd & 0x0f {
        0 => return Some(fallback),
        1 => {}
        _ => return None,
    }
    match fam >> 4 {
        0 => Some(fallback),
        1 => {
            let b = body.get(..12)?;
            let ip = Ipv4Addr::new(b[0], b[1], b[2], b[3]);
            Some(SocketAddr::new(ip.into(), u16::from_be_bytes([b[8], b[9]])))
        }
        2 => {
            let b = body.get(..36)?;
            let mut a = [0u8; 16];
            a.copy_from_slice(&b[..16]);
            Some(SocketAddr::new(
                Ipv6Addr::from(a).into(),
                u16::from_be_bytes([b[32], b[33]]),
            ))
        }
        // AF_UNIX carries no IP: use the socket's own peer.
        3 => Some(fallback),
        _ => None,
    }
}

/// A PROXY v2 header (`PROXY` command, TCP) naming `client` as the source and `local` as the
/// destination; mixed families are sent as IPv6 (an IPv4 address mapped).
pub(crate) fn encode_v2(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let mut out = V2_SIG.to_vec();
    out.push(0x21);
    match (client.ip(), local.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.extend_from_slice(&[0x11, 0, 12]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.extend_from_slice(&[0x21, 0, 36]);
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
        }
    }
    out.extend_from_slice(&client.port().to_be_bytes());
    out.extend_from_slice(&local.port().to_be_bytes());
    out
}

/// A PROXY v2 `LOCAL` header: a connection of the gateway's own, no client behind it.
pub(crate) fn encode_v2_local() -> Vec<u8> {
    let mut out = V2_SIG.to_vec();
    out.extend_from_slice(&[0x20, 0x00, 0, 0]);
    out
}

/// Fuzz entry: the parser never panics, never claims more bytes than it was given, and every
/// proper prefix of an accepted header is "incomplete" (so the reader may take it whole).
#[doc(hidden)]
pub fn fuzz_proxy_header(data: &[u8]) {
    let fallback: SocketAddr = ([127, 0, 0, 1], 1).into();
    if let Ok(Some((addr, len))) = parse(data, fallback) {
        assert!(len <= data.len());
        for k in [0, 1, len / 2, len.saturating_sub(1)] {
            if k < len {
                assert_eq!(parse(&data[..k], fallback), Ok(None), "prefix {k} of {len}");
            }
        }
        assert_eq!(parse(&data[..len], fallback), Ok(Some((addr, len))));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn fallback() -> SocketAddr {
        "127.0.0.1:1".parse().unwrap()
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        let h = b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 443\r\n\x16\x03";
        assert_eq!(
            parse(h, fallback()),
            Ok(Some(("203.0.113.7:51000".parse().unwrap(), h.len() - 2)))
        );
        let h6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 4242 443\r\n";
        assert_eq!(
            parse(h6, fallback()).unwrap().unwrap().0,
            "[2001:db8::7]:4242".parse().unwrap()
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n", fallback()),
            Ok(Some((fallback(), 15)))
        );
    }

    #[test]
    fn a_family_that_does_not_match_its_addresses_is_refused() {
        for h in [
            &b"PROXY TCP4 2001:db8::7 2001:db8::1 4242 443\r\n"[..],
            b"PROXY TCP6 203.0.113.7 10.0.0.1 51000 443\r\n",
            b"PROXY TCP4 203.0.113.7 2001:db8::1 51000 443\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 1\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 70000 1\r\n",
        ] {
            assert!(
                parse(h, fallback()).is_err(),
                "{}",
                String::from_utf8_lossy(h)
            );
        }
    }

    #[test]
    fn v2_inet6_and_local() {
        let mut h = V2_SIG.to_vec();
        h.extend_from_slice(&[0x21, 0x21, 0, 36]);
        let src: Ipv6Addr = "2001:db8::7".parse().unwrap();
        h.extend_from_slice(&src.octets());
        h.extend_from_slice(&[0u8; 16]);
        h.extend_from_slice(&4242u16.to_be_bytes());
        h.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(
            parse(&h, fallback()),
            Ok(Some(("[2001:db8::7]:4242".parse().unwrap(), 52)))
        );
        let mut local = V2_SIG.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(parse(&local, fallback()), Ok(Some((fallback(), 16))));
    }

    #[test]
    fn encoded_headers_parse_back() {
        let c: SocketAddr = "203.0.113.7:51000".parse().unwrap();
        let l: SocketAddr = "10.0.0.1:443".parse().unwrap();
        let h = encode_v2(c, l);
        assert_eq!(parse(&h, fallback()), Ok(Some((c, h.len()))));
        let c6: SocketAddr = "[2001:db8::7]:4242".parse().unwrap();
        let h = encode_v2(c6, l);
        assert_eq!(parse(&h, fallback()), Ok(Some((c6, h.len()))));
        let h = encode_v2_local();
        assert_eq!(parse(&h, fallback()), Ok(Some((fallback(), 16))));
    }

    #[test]
    fn garbage_is_refused_at_the_first_byte_and_prefixes_wait() {
        assert!(parse(b"G", fallback()).is_err());
        assert!(parse(b"PROXZ", fallback()).is_err());
        assert_eq!(parse(b"PROX", fallback()), Ok(None));
        assert_eq!(parse(b"PROXY TCP4 1.2", fallback()), Ok(None));
        assert!(parse(b"PROXY TCP4 1.2\n", fallback()).is_err());
        assert_eq!(parse(&V2_SIG[..5], fallback()), Ok(None));
        fuzz_proxy_header(b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 443\r\nrest");
        // Found by the fuzzer: a CR inside an UNKNOWN line made a prefix invalid.
        assert!(parse(b"PROXY UNKNOWN a\rb\r\n", fallback()).is_err());
        fuzz_proxy_header(b"PROXY UNKNOWN a\rb\r\n");
    }

    #[tokio::test]
    async fn a_header_in_pieces_is_read_exactly_and_what_follows_is_left() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.set_nodelay(true).unwrap();
            for piece in [
                &b"PROXY TCP4 203.0"[..],
                b".113.7 10.0.0.1 ",
                b"51000 443\r\nTLS",
            ] {
                c.write_all(piece).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            c
        });
        let (mut s, peer) = l.accept().await.unwrap();
        let got = read_header(&mut s, peer).await.unwrap();
        assert_eq!(got, "203.0.113.7:51000".parse().unwrap());
        let mut rest = [0u8; 3];
        s.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"TLS");
        drop(client.await.unwrap());
    }
}
