//! Request body framing (RFC 9112 sections 6 and 7): which framing a request head declares,
//! refusing the ambiguous ones a smuggling attack relies on, and a sans-I/O decoder that takes
//! body bytes off the front of the connection buffer (zero-copy) and leaves whatever follows
//! the body, the next pipelined request, where it is.

use bytes::{Bytes, BytesMut};
use http::header;

use crate::reject::BodyError;

/// Longest chunk-size line (size and extensions) accepted.
const MAX_CHUNK_LINE: usize = 4096;

/// How a request's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
}

/// The framing a request head declares. Both Content-Length and Transfer-Encoding, several
/// differing Content-Lengths, or a coding other than a final `chunked` are refused: two
/// parties reading such a message differently is how requests are smuggled.
pub(crate) fn request_framing(h: &http::HeaderMap) -> Result<Framing, BodyError> {
    let te: Vec<&[u8]> = h
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(|t| t.trim_ascii())
        .filter(|t| !t.is_empty())
        .collect();
    let mut lengths = h.get_all(header::CONTENT_LENGTH).iter().peekable();
    if !te.is_empty() {
        if lengths.peek().is_some() {
            return Err(BodyError::LengthAndChunked);
        }
        // `chunked` must come last and only once (RFC 9112 section 6.3).
        let chunked = |t: &[u8]| t.eq_ignore_ascii_case(b"chunked");
        if te.len() != 1 || !chunked(te[0]) {
            return Err(BodyError::TransferCoding);
        }
        return Ok(Framing::Chunked);
    }
    let mut found: Option<u64> = None;
    for v in lengths {
        for part in v.as_bytes().split(|&b| b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || !part.iter().all(u8::is_ascii_digit) || part.len() > 19 {
                return Err(BodyError::ContentLength);
            }
            let n: u64 = std::str::from_utf8(part)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or(BodyError::ContentLength)?;
            if found.is_some_and(|f| f != n) {
                return Err(BodyError::ContentLength);
            }
            found = Some(n);
        }
    }
    Ok(match found {
        None | Some(0) => Framing::Empty,
        Some(n) => Framing::Length(n),
    })
}

/// What the decoder found at the front of the buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Body bytes to forward.
    Data(Bytes),
    /// The buffer holds no whole next piece: read more.
    NeedMore,
    /// The body is complete; the buffer now starts after it.
    Done,
}

/// Where a decoder is in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// This many bytes of a Content-Length body are left.
    Length(u64),
    /// At a chunk-size line.
    ChunkSize,
    /// This many bytes of the current chunk's data are left.
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    /// The trailer section after the last chunk; discarded.
    Trailers,
    Done,
}

/// Decodes one request body.
#[derive(Debug)]
pub(crate) struct Decoder {
    state: State,
    /// Some body bytes were handed out: the body can no longer be sent elsewhere.
    started: bool,
    /// Bound on the trailer section (the same as the request head's).
    trailer_limit: usize,
}

impl Decoder {
    pub(crate) fn new(framing: Framing, trailer_limit: usize) -> Decoder {
        let state = match framing {
            Framing::Empty => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::ChunkSize,
        };
        Decoder {
            state,
            started: false,
            trailer_limit,
        }
    }

    /// True once body bytes were handed out.
    pub(crate) fn started(&self) -> bool {
        self.started
    }

    /// Takes the next piece of body off the front of `buf`.
    pub(crate) fn decode(&mut self, buf: &mut BytesMut) -> Result<Step, BodyError> {
        loop {
            match self.state {
                State::Done => return Ok(Step::Done),
                State::Length(left) | State::ChunkData(left) => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    let n = (buf.len() as u64).min(left) as usize;
                    let rest = left - n as u64;
                    self.state = match self.state {
                        State::Length(_) if rest == 0 => State::Done,
                        State::Length(_) => State::Length(rest),
                        _ if rest == 0 => State::ChunkEnd,
                        _ => State::ChunkData(rest),
                    };
                    self.started = true;
                    return Ok(Step::Data(buf.split_to(n).freeze()));
                }
                State::ChunkSize => match httparse::parse_chunk_size(buf) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        let _ = buf.split_to(used);
                        self.state = if size == 0 {
                            State::Trailers
                        } else {
                            State::ChunkData(size)
                        };
                    }
                    Ok(httparse::Status::Partial) if buf.len() > MAX_CHUNK_LINE => {
                        return Err(BodyError::ChunkSize);
                    }
                    Ok(httparse::Status::Partial) => return Ok(Step::NeedMore),
                    Err(_) => return Err(BodyError::ChunkSize),
                },
                State::ChunkEnd => {
                    if buf.len() < 2 {
                        if buf.first().is_some_and(|&b| b != b'\r') {
                            return Err(BodyError::ChunkEnd);
                        }
                        return Ok(Step::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(BodyError::ChunkEnd);
                    }
                    let _ = buf.split_to(2);
                    self.state = State::ChunkSize;
                }
                State::Trailers => {
                    // Either the empty line right away, or field lines ending in one.
                    if buf.starts_with(b"\r\n") {
                        let _ = buf.split_to(2);
                        self.state = State::Done;
                        continue;
                    }
                    match find(buf, b"\r\n\r\n") {
                        Some(i) if i + 4 <= self.trailer_limit => {
                            check_trailers(&buf[..i + 2])?;
                            let _ = buf.split_to(i + 4);
                            self.state = State::Done;
                        }
                        Some(_) => return Err(BodyError::Trailers),
                        None if buf.len() > self.trailer_limit => {
                            return Err(BodyError::Trailers);
                        }
                        None => return Ok(Step::NeedMore),
                    }
                }
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Trailer field lines: `name: value` with a token name, CRLF-terminated.
fn check_trailers(lines: &[u8]) -> Result<(), BodyError> {
    for line in lines.split(|&b| b == b'\n') {
        let Some(line) = line.strip_suffix(b"\r") else {
            if line.is_empty() {
                continue;
            }
            return Err(BodyError::Trailers);
        };
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Err(BodyError::Trailers);
        };
        if colon == 0 || !line[..colon].iter().all(|&b| is_token(b)) {
            return Err(BodyError::Trailers);
        }
    }
    Ok(())
}

/// Fuzz entry: a framing and arbitrary bytes fed in arbitrary cuts; the decoder never panics,
/// never hands out more than it was given, and decodes the same whatever the cuts.
#[doc(hidden)]
pub fn fuzz_chunked(data: &[u8]) {
    let Some((&sel, data)) = data.split_first() else {
        return;
    };
    let framing = match sel % 3 {
        0 => Framing::Chunked,
        1 => Framing::Length(u64::from(sel)),
        _ => Framing::Empty,
    };
    let whole = run(framing, data, data.len().max(1));
    let cut = run(framing, data, 1 + (sel as usize >> 2));
    assert_eq!(whole, cut, "decoding depends on how the bytes were cut");
}

fn run(framing: Framing, data: &[u8], step: usize) -> (Vec<u8>, Result<usize, BodyError>) {
    let mut d = Decoder::new(framing, 1024);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut fed = 0;
    loop {
        match d.decode(&mut buf) {
            Ok(Step::Data(b)) => out.extend_from_slice(&b),
            Ok(Step::Done) => return (out, Ok(fed - buf.len())),
            Ok(Step::NeedMore) if fed < data.len() => {
                let end = (fed + step).min(data.len());
                buf.extend_from_slice(&data[fed..end]);
                fed = end;
            }
            Ok(Step::NeedMore) => return (out, Err(BodyError::Truncated)),
            Err(e) => return (out, Err(e)),
        }
        assert!(out.len() <= data.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(lines: &[(&str, &str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in lines {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn ambiguous_framings_are_refused() {
        let f = |l: &[(&str, &str)]| request_framing(&headers(l));
        assert_eq!(f(&[]), Ok(Framing::Empty));
        assert_eq!(f(&[("content-length", "12")]), Ok(Framing::Length(12)));
        assert_eq!(
            f(&[("content-length", "12"), ("content-length", "12")]),
            Ok(Framing::Length(12))
        );
        assert_eq!(f(&[("transfer-encoding", "Chunked")]), Ok(Framing::Chunked));
        for bad in [
            &[("content-length", "12"), ("content-length", "13")][..],
            &[("content-length", "-1")],
            &[("content-length", "1 2")],
            &[("content-length", "+5")],
            &[("content-length", "99999999999999999999")],
        ] {
            assert_eq!(f(bad), Err(BodyError::ContentLength), "{bad:?}");
        }
        assert_eq!(
            f(&[("transfer-encoding", "chunked"), ("content-length", "3")]),
            Err(BodyError::LengthAndChunked)
        );
        for bad in ["gzip", "chunked, gzip", "chunked, chunked", "identity"] {
            assert_eq!(
                f(&[("transfer-encoding", bad)]),
                Err(BodyError::TransferCoding),
                "{bad}"
            );
        }
    }

    #[test]
    fn chunked_body_decodes_and_stops_at_its_end() {
        let wire = b"4;ext=1\r\nWiki\r\n5\r\npedia\r\n0\r\nX-Trailer: t\r\n\r\nGET / HTTP/1.1";
        let (out, end) = run(Framing::Chunked, wire, 3);
        assert_eq!(out, b"Wikipedia");
        assert_eq!(end, Ok(wire.len() - b"GET / HTTP/1.1".len()));
    }

    #[test]
    fn malformed_chunks_are_client_errors() {
        for (wire, err) in [
            (&b"ffffffffffffffffff\r\n"[..], BodyError::ChunkSize),
            (b"zz\r\n", BodyError::ChunkSize),
            (b"3\r\nabcX", BodyError::ChunkEnd),
            (b"0\r\nno colon here\r\n\r\n", BodyError::Trailers),
        ] {
            assert_eq!(run(Framing::Chunked, wire, 1).1, Err(err), "{wire:?}");
        }
    }

    #[test]
    fn a_length_body_leaves_what_follows() {
        let (out, end) = run(Framing::Length(3), b"abcdef", 2);
        assert_eq!((out.as_slice(), end), (&b"abc"[..], Ok(3)));
    }
}
