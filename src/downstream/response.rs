//! Responses to the client over HTTP/1.1: the head (status line, the backend's headers with the
//! hop-by-hop ones replaced, the framing this hop needs) and the body, streamed frame by frame
//! as the backend produces it (a Server-Sent Events stream arrives event by event).

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::{Method, StatusCode, Version};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::upstream::headers::{has_token, strip_hop_by_hop};

/// How the body of a response is delimited toward the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OutFraming {
    /// No body may follow (HEAD, 1xx, 204, 304).
    None,
    /// The backend's Content-Length, passed on.
    Length,
    /// Chunked, for a body of unknown length to an HTTP/1.1 client.
    Chunked,
    /// Until the connection closes, for a body of unknown length to an HTTP/1.0 client.
    UntilClose,
}

/// What the response to one request looks like on this hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Plan {
    pub(crate) framing: OutFraming,
    /// The connection stays open for the next request.
    pub(crate) keep_alive: bool,
}

/// Whether the client wants its connection kept after this request (RFC 9112 section 9.3).
pub(crate) fn wants_keep_alive(req: &http::request::Parts) -> bool {
    let close = has_token(&req.headers, &header::CONNECTION, "close");
    match req.version {
        Version::HTTP_10 => !close && has_token(&req.headers, &header::CONNECTION, "keep-alive"),
        _ => !close,
    }
}

/// Chooses the framing and connection handling for a response to `req`.
pub(crate) fn plan(
    method: &Method,
    version: Version,
    keep_alive: bool,
    status: StatusCode,
    headers: &HeaderMap,
) -> Plan {
    let bodiless = *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let chunked_upstream = has_token(headers, &header::TRANSFER_ENCODING, "chunked");
    let framing = if bodiless {
        OutFraming::None
    } else if headers.contains_key(header::CONTENT_LENGTH) && !chunked_upstream {
        OutFraming::Length
    } else if version == Version::HTTP_11 {
        OutFraming::Chunked
    } else {
        OutFraming::UntilClose
    };
    Plan {
        framing,
        keep_alive: keep_alive && framing != OutFraming::UntilClose,
    }
}

/// Encodes a response head: the status line, `headers` without hop-by-hop fields, then the
/// framing and connection fields of `plan`.
pub(crate) fn encode_head(
    status: StatusCode,
    version: Version,
    headers: &HeaderMap,
    plan: Plan,
    out: &mut Vec<u8>,
) {
    let mut h = headers.clone();
    strip_hop_by_hop(&mut h);
    if plan.framing == OutFraming::Chunked || plan.framing == OutFraming::UntilClose {
        h.remove(header::CONTENT_LENGTH);
    }
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    encode_fields(&h, out);
    if plan.framing == OutFraming::Chunked {
        out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
    }
    match (plan.keep_alive, version) {
        (false, _) => out.extend_from_slice(b"Connection: close\r\n"),
        (true, Version::HTTP_10) => out.extend_from_slice(b"Connection: keep-alive\r\n"),
        (true, _) => {}
    }
    out.extend_from_slice(b"\r\n");
}

/// The head of a 101 the gateway sends after the backend's was checked.
pub(crate) fn encode_switching(headers: &HeaderMap, out: &mut Vec<u8>) {
    let mut h = headers.clone();
    strip_hop_by_hop(&mut h);
    h.remove(header::CONTENT_LENGTH);
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
    );
    encode_fields(&h, out);
    out.extend_from_slice(b"\r\n");
}

/// Header fields, names in the conventional title case (`Content-Type`).
fn encode_fields(h: &HeaderMap, out: &mut Vec<u8>) {
    for (name, value) in h {
        let mut upper = true;
        for &b in name.as_str().as_bytes() {
            out.push(if upper { b.to_ascii_uppercase() } else { b });
            upper = b == b'-';
        }
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// How streaming a body ended when it did not end well.
#[derive(Debug)]
pub(crate) enum BodyEnd {
    /// The backend's body broke off (reset, bad framing): the client cannot be told but by
    /// closing.
    Backend,
    /// Writing to the client failed.
    Client,
}

/// Streams `body` to `w` with `framing`, flushing after every frame.
pub(crate) async fn write_body<W, B>(w: &mut W, body: B, framing: OutFraming) -> Result<(), BodyEnd>
where
    W: AsyncWrite + Unpin,
    B: Body<Data = Bytes> + Unpin,
{
    let mut body = body;
    if framing == OutFraming::None {
        return Ok(());
    }
    let mut frame_buf: Vec<u8> = Vec::new();
    let mut trailers: Option<HeaderMap> = None;
    loop {
        let Some(frame) = body.frame().await else {
            break;
        };
        let frame = frame.map_err(|_| BodyEnd::Backend)?;
        let data = match frame.into_data() {
            Ok(d) => d,
            Err(f) => {
                if let Ok(t) = f.into_trailers() {
                    trailers = Some(t);
                }
                continue;
            }
        };
        if data.is_empty() {
            continue;
        }
        if framing == OutFraming::Chunked {
            frame_buf.clear();
            frame_buf.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
            // Small frames go out as one write (one TLS record); large ones without a copy.
            if data.len() <= 16 * 1024 {
                frame_buf.extend_from_slice(&data);
                frame_buf.extend_from_slice(b"\r\n");
                w.write_all(&frame_buf).await.map_err(|_| BodyEnd::Client)?;
            } else {
                w.write_all(&frame_buf).await.map_err(|_| BodyEnd::Client)?;
                w.write_all(&data).await.map_err(|_| BodyEnd::Client)?;
                w.write_all(b"\r\n").await.map_err(|_| BodyEnd::Client)?;
            }
        } else {
            w.write_all(&data).await.map_err(|_| BodyEnd::Client)?;
        }
        w.flush().await.map_err(|_| BodyEnd::Client)?;
    }
    if framing == OutFraming::Chunked {
        frame_buf.clear();
        frame_buf.extend_from_slice(b"0\r\n");
        if let Some(t) = &trailers {
            encode_fields(t, &mut frame_buf);
        }
        frame_buf.extend_from_slice(b"\r\n");
        w.write_all(&frame_buf).await.map_err(|_| BodyEnd::Client)?;
        w.flush().await.map_err(|_| BodyEnd::Client)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hm(lines: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in lines {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn framing_follows_method_status_and_version() {
        let cl = hm(&[("content-length", "5")]);
        let none = HeaderMap::new();
        let p = |m: Method, v, s: u16, h: &HeaderMap| {
            plan(&m, v, true, StatusCode::from_u16(s).unwrap(), h)
        };
        assert_eq!(
            p(Method::GET, Version::HTTP_11, 200, &cl).framing,
            OutFraming::Length
        );
        assert_eq!(
            p(Method::HEAD, Version::HTTP_11, 200, &none).framing,
            OutFraming::None
        );
        assert_eq!(
            p(Method::GET, Version::HTTP_11, 304, &none).framing,
            OutFraming::None
        );
        assert_eq!(
            p(Method::GET, Version::HTTP_11, 200, &none).framing,
            OutFraming::Chunked
        );
        let old = p(Method::GET, Version::HTTP_10, 200, &none);
        assert_eq!(
            (old.framing, old.keep_alive),
            (OutFraming::UntilClose, false)
        );
    }

    #[test]
    fn head_drops_hop_by_hop_fields_and_title_cases_names() {
        let h = hm(&[
            ("content-type", "text/plain"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
            ("transfer-encoding", "chunked"),
        ]);
        let plan = plan(&Method::GET, Version::HTTP_11, false, StatusCode::OK, &h);
        let mut out = Vec::new();
        encode_head(StatusCode::OK, Version::HTTP_11, &h, plan, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        );
    }
}
