//! The PROXY protocol header (v1 text and v2 binary) that L4 load balancers put in front of a
//! connection. It is read without reading past it, since TLS follows, and refused as soon as
//! the first bytes cannot start one.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

const V2_SIG: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
const V1_MAX: usize = 107;

/// Reads a PROXY header and returns the client address it carries (`fallback`, the socket's
/// own peer, for v1 `UNKNOWN` and v2 `LOCAL`).
pub async fn read_header<S: AsyncRead + Unpin>(
    io: &mut S,
    fallback: SocketAddr,
) -> io::Result<SocketAddr> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    let mut first = [0u8; 1];
    io.read_exact(&mut first).await?;
    match first[0] {
        b'P' => {
            let mut line = Vec::with_capacity(V1_MAX);
            line.push(b'P');
            while !line.ends_with(b"\r\n") {
                if line.len() >= V1_MAX {
                    return Err(bad("PROXY v1 header too long"));
                }
                let mut b = [0u8; 1];
                io.read_exact(&mut b).await?;
                line.push(b[0]);
                if line.len() <= 6 && !b"PROXY ".starts_with(&line) {
                    return Err(bad("not a PROXY header"));
                }
            }
            parse_v1(&line[..line.len() - 2], fallback)
                .ok_or_else(|| bad("malformed PROXY v1 header"))
        }
        b'\r' => {
            let mut head = [0u8; 16];
            head[0] = b'\r';
            io.read_exact(&mut head[1..12]).await?;
            if head[..12] != V2_SIG {
                return Err(bad("not a PROXY header"));
            }
            io.read_exact(&mut head[12..16]).await?;
            let len = u16::from_be_bytes([head[14], head[15]]) as usize;
            let mut body = vec![0u8; len];
            io.read_exact(&mut body).await?;
            parse_v2(head[12], head[13], &body, fallback)
                .ok_or_else(|| bad("malformed PROXY v2 header"))
        }
        _ => Err(bad("not a PROXY header")),
    }
}

fn parse_v1(line: &[u8], fallback: SocketAddr) -> Option<SocketAddr> {
    let text = std::str::from_utf8(line).ok()?;
    let mut parts = text.split(' ');
    if parts.next()? != "PROXY" {
        return None;
    }
    match parts.next()? {
        "UNKNOWN" => Some(fallback),
        "TCP4" | "TCP6" => {
            let src: IpAddr = parts.next()?.parse().ok()?;
            let _dst: IpAddr = parts.next()?.parse().ok()?;
            let sport: u16 = parts.next()?.parse().ok()?;
            let _dport: u16 = parts.next()?.parse().ok()?;
            if parts.next().is_some() {
                return None;
            }
            Some(SocketAddr::new(src, sport))
        }
        _ => None,
    }
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
        // AF_UNIX and others carry no IP: use the socket's own peer.
        _ => Some(fallback),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fallback() -> SocketAddr {
        "127.0.0.1:1".parse().unwrap()
    }

    async fn read(bytes: &[u8]) -> io::Result<(SocketAddr, usize)> {
        let mut c = std::io::Cursor::new(bytes.to_vec());
        let a = read_header(&mut c, fallback()).await?;
        Ok((a, c.position() as usize))
    }

    #[tokio::test]
    async fn v1_tcp4_and_unknown() {
        let h = b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 443\r\n\x16\x03";
        let (a, used) = read(h).await.unwrap();
        assert_eq!(a, "203.0.113.7:51000".parse().unwrap());
        assert_eq!(used, h.len() - 2, "nothing past the header is read");
        assert_eq!(read(b"PROXY UNKNOWN\r\n").await.unwrap().0, fallback());
    }

    #[tokio::test]
    async fn v2_inet6_and_local() {
        let mut h = V2_SIG.to_vec();
        h.extend_from_slice(&[0x21, 0x21, 0, 36]);
        let src: Ipv6Addr = "2001:db8::7".parse().unwrap();
        h.extend_from_slice(&src.octets());
        h.extend_from_slice(&[0u8; 16]);
        h.extend_from_slice(&4242u16.to_be_bytes());
        h.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(
            read(&h).await.unwrap().0,
            "[2001:db8::7]:4242".parse().unwrap()
        );
        let mut local = V2_SIG.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(read(&local).await.unwrap().0, fallback());
    }

    #[tokio::test]
    async fn garbage_is_refused_at_the_first_byte() {
        let mut c = std::io::Cursor::new(b"GET / HTTP/1.1\r\n".to_vec());
        assert!(read_header(&mut c, fallback()).await.is_err());
        assert_eq!(c.position(), 1);
        assert!(read(b"PROXZ TCP4").await.is_err());
        assert!(read(b"PROXY TCP4 1.2.3.4 5.6.7.8 x 1\r\n").await.is_err());
    }
}
