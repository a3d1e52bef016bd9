//! Request heads as the client sends them: read within `max_request_head` (counted exactly:
//! request line, header lines and the blank line) and parsed once, by httparse, into
//! `http::request::Parts`. This is the only parser of client request heads; every request on a
//! connection, first or later, upgrade or not, passes through it.

use bytes::BytesMut;
use http::header::{HeaderName, HeaderValue};
use http::{Method, Version};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::reject::{Malformed, Refusal};

/// Most header lines accepted in one request head; more is answered 431.
pub(crate) const MAX_HEADERS: usize = 128;

/// Why reading a request head stopped.
#[derive(Debug)]
pub(crate) enum HeadError {
    /// The client closed (or sent nothing more) before a whole head arrived.
    Closed,
    /// The head is refused; answer with this.
    Refused(Refusal),
    /// The connection failed.
    Io,
}

/// Reads one request head from `io`, after the bytes `buf` already holds (pipelined or left
/// over from the previous request). On success the head is removed from the front of `buf`;
/// whatever followed it stays there.
pub(crate) async fn read_head<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    limit: usize,
) -> Result<http::request::Parts, HeadError> {
    let mut scanned: usize = 0;
    loop {
        // Only a blank line can end a head: parse only once one may have arrived.
        let from = scanned.saturating_sub(3);
        if buf.len() > from && (has_blank_line(&buf[from..]) || buf.len() > limit) {
            match parse_head(buf, limit).map_err(HeadError::Refused)? {
                Some((parts, len)) => {
                    let _ = buf.split_to(len);
                    return Ok(parts);
                }
                None if buf.len() > limit => return Err(HeadError::Refused(Refusal::HeadTooLarge)),
                None => {}
            }
        }
        scanned = buf.len();
        // Never read past the limit: a client streaming a huge head costs one buffer.
        let want = (limit + 1).saturating_sub(buf.len()).clamp(1, 4096);
        buf.reserve(want);
        let n = (&mut *io)
            .take(want as u64)
            .read_buf(buf)
            .await
            .map_err(|_| HeadError::Io)?;
        if n == 0 {
            return Err(HeadError::Closed);
        }
    }
}

fn has_blank_line(b: &[u8]) -> bool {
    b.windows(2).any(|w| w == b"\n\n") || b.windows(3).any(|w| w == b"\n\r\n")
}

/// Parses a complete head at the start of `buf`: the head and its length, `None` if it is not
/// complete yet.
pub(crate) fn parse_head(
    buf: &[u8],
    limit: usize,
) -> Result<Option<(http::request::Parts, usize)>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::HeadTooLarge),
        Err(_) => return Err(Refusal::Malformed(Malformed::Syntax)),
    };
    if len > limit {
        return Err(Refusal::HeadTooLarge);
    }
    let bad = Refusal::Malformed;
    let method = Method::from_bytes(req.method.unwrap_or("").as_bytes())
        .map_err(|_| bad(Malformed::Method))?;
    let uri: http::Uri = req
        .path
        .unwrap_or("")
        .parse()
        .map_err(|_| bad(Malformed::Target))?;
    let version = match req.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut builder = http::Request::builder()
        .method(method)
        .uri(uri)
        .version(version);
    let map = builder.headers_mut().ok_or(bad(Malformed::Syntax))?;
    map.reserve(req.headers.len());
    for h in req.headers.iter() {
        let name =
            HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| bad(Malformed::HeaderName))?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| bad(Malformed::HeaderValue))?;
        map.append(name, value);
    }
    let (parts, ()) = builder
        .body(())
        .map_err(|_| bad(Malformed::Syntax))?
        .into_parts();
    Ok(Some((parts, len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n";

    #[tokio::test]
    async fn head_limit_counts_request_line_headers_and_blank_line() {
        let raw = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(100)
        );
        let mut io = std::io::Cursor::new(raw.clone().into_bytes());
        let mut buf = BytesMut::new();
        assert!(read_head(&mut io, &mut buf, raw.len()).await.is_ok());
        let mut io = std::io::Cursor::new(raw.clone().into_bytes());
        let mut buf = BytesMut::new();
        let err = read_head(&mut io, &mut buf, raw.len() - 1)
            .await
            .unwrap_err();
        assert!(matches!(err, HeadError::Refused(Refusal::HeadTooLarge)));
    }

    #[tokio::test]
    async fn a_head_split_into_single_bytes_parses_and_leaves_what_follows() {
        let mut wire = GOOD.as_bytes().to_vec();
        wire.extend_from_slice(b"NEXT");
        let mut b = tokio_test::io::Builder::new();
        for byte in &wire {
            b.read(std::slice::from_ref(byte));
        }
        let mut io = b.build();
        let mut buf = BytesMut::new();
        let p = read_head(&mut io, &mut buf, 4096).await.unwrap();
        assert_eq!(p.uri.path(), "/chat");
        // Reads stop at the head: nothing past it has been taken yet.
        assert!(buf.is_empty());
        let mut rest = Vec::new();
        io.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"NEXT");
    }

    #[tokio::test]
    async fn pipelined_bytes_stay_in_the_buffer() {
        let two = format!("{GOOD}{GOOD}");
        let mut buf = BytesMut::from(two.as_bytes());
        let mut empty = tokio::io::empty();
        read_head(&mut empty, &mut buf, 4096).await.unwrap();
        assert_eq!(&buf[..], GOOD.as_bytes());
        read_head(&mut empty, &mut buf, 4096).await.unwrap();
        assert!(buf.is_empty());
    }

    #[test]
    fn repeated_headers_are_all_kept() {
        let raw = "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n";
        let (p, n) = parse_head(raw.as_bytes(), 1024).unwrap().unwrap();
        assert_eq!(n, raw.len());
        assert_eq!(p.headers.get_all("host").iter().count(), 2);
    }

    #[test]
    fn malformed_heads_are_named() {
        for (raw, want) in [
            (
                "GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
                Refusal::Malformed(Malformed::Syntax),
            ),
            (
                "G\x01T / HTTP/1.1\r\n\r\n",
                Refusal::Malformed(Malformed::Syntax),
            ),
        ] {
            assert_eq!(
                parse_head(raw.as_bytes(), 1024).unwrap_err(),
                want,
                "{raw:?}"
            );
        }
    }
}
