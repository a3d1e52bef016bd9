//! Relay properties over in-memory streams that hand out bytes in arbitrary cuts: what a peer
//! sends arrives unchanged and whole, frame counts match a reference encoder, violations close.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use proptest::prelude::*;

use tokio::io::ReadBuf;

use super::frame::{self, Tracker, encode_header, parse_header};
use super::*;

/// Reads out `chunks` one per read (then EOF, or nothing ever again when held open);
/// records what is written.
struct Mock {
    chunks: std::collections::VecDeque<Vec<u8>>,
    written: Vec<u8>,
    shut: bool,
    hold_open: bool,
}

impl Mock {
    fn new(chunks: Vec<Vec<u8>>) -> Self {
        Mock {
            chunks: chunks.into(),
            written: Vec::new(),
            shut: false,
            hold_open: false,
        }
    }

    /// A peer that sends `chunks` and then stays connected without a word.
    fn open(chunks: Vec<Vec<u8>>) -> Self {
        Mock {
            hold_open: true,
            ..Mock::new(chunks)
        }
    }
}

impl AsyncRead for Mock {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(mut c) = self.chunks.pop_front() {
            let n = c.len().min(buf.remaining());
            buf.put_slice(&c[..n]);
            if n < c.len() {
                c.drain(..n);
                self.chunks.push_front(c);
            }
        } else if self.hold_open {
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Mock {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // Accept at most 7 bytes at a time so partial writes and pending buffers are exercised.
        let n = buf.len().min(7);
        self.written.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.shut = true;
        Poll::Ready(Ok(()))
    }
}

/// No orders ever come.
struct NoDrain;

impl Orders for NoDrain {
    fn poll_order(&self, _: &mut Context<'_>) -> Poll<Order> {
        Poll::Pending
    }
}

fn settings(max: u64) -> Settings {
    Settings {
        ping_interval: Duration::ZERO,
        pong_timeout: Duration::from_secs(1),
        idle_timeout: Duration::ZERO,
        max_frame_size: max,
        max_lifetime: Duration::ZERO,
        max_lifetime_jitter: Duration::ZERO,
        limits: policy::Limits::default(),
        expires: None,
    }
}

/// One frame of a reference stream.
#[derive(Debug, Clone)]
struct Spec {
    fin: bool,
    rsv: u8,
    opcode: u8,
    payload: Vec<u8>,
}

/// The reference encoder.
fn encode(frames: &[Spec], mask: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        let key = mask.then(|| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes());
        let mut h = [0u8; frame::MAX_HEADER];
        let n = encode_header(&mut h, f.fin, f.opcode, key, f.payload.len() as u64);
        h[0] |= f.rsv << 4;
        out.extend_from_slice(&h[..n]);
        let mut p = f.payload.clone();
        if let Some(k) = key {
            frame::apply_mask(&mut p, k, 0);
        }
        out.extend_from_slice(&p);
    }
    out
}

/// Valid message sequences: whole or fragmented data messages with control frames between
/// fragments, payloads from empty to past the 16-bit length.
fn messages() -> impl Strategy<Value = Vec<Spec>> {
    let payload = prop_oneof![
        8 => proptest::collection::vec(any::<u8>(), 0..200),
        1 => proptest::collection::vec(any::<u8>(), 65_530..65_600),
    ];
    let control = (
        prop_oneof![Just(frame::OP_PING), Just(frame::OP_PONG)],
        proptest::collection::vec(any::<u8>(), 0..126),
    )
        .prop_map(|(opcode, payload)| Spec {
            fin: true,
            rsv: 0,
            opcode,
            payload,
        });
    let message = (
        prop_oneof![Just(frame::OP_TEXT), Just(frame::OP_BINARY)],
        0u8..8,
        proptest::collection::vec((payload, proptest::option::of(control)), 1..4),
    )
        .prop_map(|(opcode, rsv, parts)| {
            let n = parts.len();
            let mut out = Vec::new();
            for (i, (payload, ctl)) in parts.into_iter().enumerate() {
                out.push(Spec {
                    fin: i + 1 == n,
                    rsv: if i == 0 { rsv } else { 0 },
                    opcode: if i == 0 {
                        opcode
                    } else {
                        frame::OP_CONTINUATION
                    },
                    payload,
                });
                if i + 1 < n
                    && let Some(c) = ctl
                {
                    out.push(c);
                }
            }
            out
        });
    proptest::collection::vec(message, 0..6).prop_map(|m| m.into_iter().flatten().collect())
}

fn cut(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = bytes;
    for &c in cuts.iter().cycle().take(bytes.len() + 1) {
        if rest.is_empty() {
            break;
        }
        let n = c.clamp(1, rest.len());
        out.push(rest[..n].to_vec());
        rest = &rest[n..];
    }
    if !rest.is_empty() {
        out.push(rest.to_vec());
    }
    out
}

/// Sums what a tunnel reports, to hold it against the tunnel's own totals.
#[derive(Default)]
struct Recorder {
    sum: std::cell::Cell<Traffic>,
}

impl Tally for Recorder {
    fn add(&self, d: &Traffic) {
        let mut t = self.sum.get();
        t.bytes_up += d.bytes_up;
        t.bytes_down += d.bytes_down;
        t.frames_up += d.frames_up;
        t.frames_down += d.frames_down;
        t.pings_sent += d.pings_sent;
        t.pongs_received += d.pongs_received;
        t.throttled += d.throttled;
        self.sum.set(t);
    }
}

fn relay(client: Vec<Vec<u8>>, backend: Vec<Vec<u8>>, s: &Settings) -> (Mock, Mock, Summary) {
    relay_mocks(Mock::new(client), Mock::new(backend), s)
}

/// Runs a tunnel between two mocks under paused time (timers fire as soon as all is idle).
fn relay_mocks(mut c: Mock, mut b: Mock, s: &Settings) -> (Mock, Mock, Summary) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let tally = Recorder::default();
        let peers = Peers {
            client: &mut c,
            client_prefix: Bytes::new(),
            backend: &mut b,
            backend_prefix: Bytes::new(),
        };
        let sum = run(peers, s, &NoDrain, &tally, 1).await;
        // Every test also checks that the live reports add up to the tunnel's totals.
        assert_eq!(tally.sum.get(), sum.traffic);
        (c, b, sum)
    })
}

/// Headers found by walking a whole stream with the parser and tracker, the way the relay does.
fn boundaries(chunks: &[Vec<u8>], sender: Sender) -> Vec<(usize, u8, u64)> {
    let mut t = Tracker::new(sender, u64::MAX >> 1);
    let mut carry: Vec<u8> = Vec::new();
    let mut offset = 0;
    let mut found = Vec::new();
    for c in chunks {
        let mut buf = std::mem::take(&mut carry);
        let base = offset - buf.len();
        buf.extend_from_slice(c);
        offset += c.len();
        let mut r = 0;
        while r < buf.len() {
            if !t.at_boundary() {
                r += t.take_payload(buf.len() - r);
                continue;
            }
            let Some(h) = parse_header(&buf[r..]) else {
                carry = buf[r..].to_vec();
                break;
            };
            t.begin(&h).unwrap();
            found.push((base + r, h.opcode, h.len));
            r += h.header_len;
        }
    }
    found
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn client_frames_arrive_unchanged_whatever_the_cuts(frames in messages(), cuts in proptest::collection::vec(1usize..40, 1..20)) {
        let bytes = encode(&frames, true);
        let (_, b, sum) = relay(cut(&bytes, &cuts), vec![], &settings(1 << 20));
        prop_assert_eq!(b.written, bytes);
        prop_assert_eq!(sum.traffic.frames_up, frames.len() as u64);
        prop_assert!(b.shut, "the client's EOF reaches the backend as a half-close");
    }

    #[test]
    fn backend_frames_arrive_unchanged_whatever_the_cuts(frames in messages(), cuts in proptest::collection::vec(1usize..40, 1..20)) {
        let bytes = encode(&frames, false);
        let (c, _, sum) = relay(vec![], cut(&bytes, &cuts), &settings(1 << 20));
        prop_assert_eq!(c.written, bytes);
        prop_assert_eq!(sum.traffic.frames_down, frames.len() as u64);
    }

    #[test]
    fn parser_boundaries_match_the_reference_encoder(frames in messages(), cuts in proptest::collection::vec(1usize..40, 1..20)) {
        let bytes = encode(&frames, true);
        let mut expected = Vec::new();
        let mut off = 0;
        for (i, f) in frames.iter().enumerate() {
            expected.push((off, f.opcode, f.payload.len() as u64));
            off += encode(std::slice::from_ref(f), true).len();
            let _ = i;
        }
        prop_assert_eq!(boundaries(&cut(&bytes, &cuts), Sender::Client), expected);
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_forward_a_prefix(data in proptest::collection::vec(any::<u8>(), 0..400), cuts in proptest::collection::vec(1usize..40, 1..20)) {
        let (_, b, _) = relay(cut(&data, &cuts), vec![], &settings(300));
        // Whatever is forwarded is a prefix of the input, then possibly exactly one masked
        // Close frame of the gateway's (which may itself start like the input does).
        let w = &b.written;
        let ok = (0..=w.len().min(data.len())).rev().any(|k| {
            w[..k] == data[..k]
                && (k == w.len()
                    || parse_header(&w[k..]).is_some_and(|h| {
                        h.opcode == frame::OP_CLOSE && h.mask.is_some() && h.header_len as u64 + h.len == (w.len() - k) as u64
                    }))
        });
        prop_assert!(ok, "forwarded {:?} for input {:?}", w, data);
    }
}

proptest! {
    #[test]
    fn fuzz_entry_holds_on_random_input(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        fuzz_frames(&data);
    }
}

fn close_code(bytes: &[u8]) -> Option<u16> {
    let h = parse_header(bytes)?;
    (h.opcode == frame::OP_CLOSE).then(|| {
        let mut c = [bytes[h.header_len], bytes[h.header_len + 1]];
        if let Some(m) = h.mask {
            frame::apply_mask(&mut c, m, 0);
        }
        u16::from_be_bytes(c)
    })
}

#[test]
fn unmasked_client_frame_gets_1002_and_backend_gets_masked_1001() {
    let bytes = encode(
        &[Spec {
            fin: true,
            rsv: 0,
            opcode: frame::OP_TEXT,
            payload: b"hi".to_vec(),
        }],
        false,
    );
    let (c, b, sum) = relay_mocks(Mock::new(vec![bytes]), Mock::open(vec![]), &settings(1024));
    assert_eq!(close_code(&c.written), Some(1002));
    assert_eq!(close_code(&b.written), Some(1001));
    assert!(parse_header(&b.written).unwrap().mask.is_some());
    assert_eq!(sum.closed_by, Side::Gateway);
}

#[test]
fn oversized_client_frame_is_refused_before_its_payload() {
    let big = Spec {
        fin: true,
        rsv: 0,
        opcode: frame::OP_BINARY,
        payload: vec![7; 2000],
    };
    let small = Spec {
        fin: true,
        rsv: 0,
        opcode: frame::OP_TEXT,
        payload: b"ok".to_vec(),
    };
    let first = encode(std::slice::from_ref(&small), true);
    let mut bytes = first.clone();
    bytes.extend(encode(&[big], true));
    let (c, b, _) = relay_mocks(Mock::new(vec![bytes]), Mock::open(vec![]), &settings(1000));
    assert_eq!(close_code(&c.written), Some(1009));
    assert!(
        b.written.starts_with(&first),
        "frames before the oversized one are relayed"
    );
    assert_eq!(close_code(&b.written[first.len()..]), Some(1001));
}

#[test]
fn headers_split_across_reads_are_carried_over() {
    let frames = [Spec {
        fin: true,
        rsv: 0,
        opcode: frame::OP_BINARY,
        payload: vec![1; 70_000],
    }];
    let bytes = encode(&frames, true);
    let chunks: Vec<Vec<u8>> = bytes
        .chunks(1)
        .take(20)
        .map(|c| c.to_vec())
        .chain([bytes[20..].to_vec()])
        .collect();
    let (_, b, sum) = relay(chunks, vec![], &settings(1 << 20));
    assert_eq!(b.written, bytes);
    assert_eq!(sum.traffic.frames_up, 1);
}

fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
    encode(
        &[Spec {
            fin: true,
            rsv: 0,
            opcode,
            payload: payload.to_vec(),
        }],
        true,
    )
}

#[test]
fn a_backed_up_backend_gets_the_rest_after_a_short_write_and_a_pending_one() {
    let first = masked(frame::OP_TEXT, b"first message");
    let second = masked(frame::OP_BINARY, &[9; 300]);
    let mut both = first.clone();
    both.extend_from_slice(&second);
    // The backend takes three bytes, then blocks for a second, then takes everything else.
    let backend = tokio_test::io::Builder::new()
        .write(&both[..3])
        .wait(Duration::from_secs(1))
        .write(&both[3..])
        .build();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let started = Instant::now();
        let mut client = Mock::new(vec![both.clone()]);
        let peers = Peers {
            client: &mut client,
            client_prefix: Bytes::new(),
            backend,
            backend_prefix: Bytes::new(),
        };
        let sum = run(peers, &settings(1 << 20), &NoDrain, &NoTally, 1).await;
        assert_eq!(sum.traffic.bytes_up, both.len() as u64);
        assert_eq!(sum.traffic.frames_up, 2);
        assert!(
            started.elapsed() >= Duration::from_secs(1),
            "the rest waited for the backend"
        );
        assert_eq!(sum.closed_by, Side::Client);
    });
}

#[test]
fn activity_pushes_the_idle_deadline_without_an_early_close() {
    let s = Settings {
        idle_timeout: Duration::from_secs(10),
        ..settings(1 << 20)
    };
    let close = frame::ControlFrame::close(1001, "idle timeout", None);
    let message = masked(frame::OP_TEXT, b"still here");
    // The client sends a message at 6 s; the tunnel must stay up until 16 s, then close.
    let client = tokio_test::io::Builder::new()
        .wait(Duration::from_secs(6))
        .read(&message)
        .write(close.bytes())
        .build();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let started = Instant::now();
        let mut backend = Mock::open(vec![]);
        let peers = Peers {
            client,
            client_prefix: Bytes::new(),
            backend: &mut backend,
            backend_prefix: Bytes::new(),
        };
        let sum = run(peers, &s, &NoDrain, &NoTally, 1).await;
        let closed_at = started.elapsed();
        assert_eq!(sum.gateway_close, Some(GatewayClose::Idle));
        assert!(
            closed_at >= Duration::from_secs(16) && closed_at < Duration::from_secs(19),
            "closed {closed_at:?} after the start"
        );
        assert!(backend.written.starts_with(&message));
        assert_eq!(close_code(&backend.written[message.len()..]), Some(1001));
    });
}

struct NoTally;

impl Tally for NoTally {
    fn add(&self, _: &Traffic) {}
}

/// Where a reference that sums payload lengths per message says the first message over `max`
/// starts to exceed it: the index of the frame that crosses, if any. Control frames between
/// fragments do not count.
fn first_frame_over(frames: &[Spec], max: u64) -> Option<usize> {
    let mut sum = 0u64;
    for (i, f) in frames.iter().enumerate() {
        match f.opcode {
            frame::OP_TEXT | frame::OP_BINARY => sum = f.payload.len() as u64,
            frame::OP_CONTINUATION => sum += f.payload.len() as u64,
            _ => continue,
        }
        if sum > max {
            return Some(i);
        }
    }
    None
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn the_message_size_check_decides_as_a_reference_summing_each_message(
        frames in messages(),
        cuts in proptest::collection::vec(1usize..40, 1..20),
        max in 0u64..600,
    ) {
        let s = Settings {
            limits: policy::Limits {
                max_message_size: max,
                ..policy::Limits::default()
            },
            ..settings(1 << 20)
        };
        let bytes = encode(&frames, true);
        let (_, b, sum) = relay(cut(&bytes, &cuts), vec![], &s);
        // A max of 0 is "off".
        let cross = if max == 0 { None } else { first_frame_over(&frames, max) };
        match cross {
            None => {
                prop_assert_eq!(&b.written, &bytes);
                prop_assert_eq!(sum.gateway_close, None);
            }
            Some(k) => {
                let before = encode(&frames[..k], true);
                prop_assert!(b.written.starts_with(&before), "the whole frames before it pass");
                let rest = &b.written[before.len()..];
                prop_assert_eq!(close_code(rest), Some(1001), "then the gateway's Close, nothing of the frame");
                let h = parse_header(rest).unwrap();
                prop_assert_eq!(h.header_len + h.len as usize, rest.len());
                prop_assert_eq!(sum.gateway_close, Some(GatewayClose::Policy(policy::Limit::MessageSize)));
            }
        }
    }
}

#[test]
fn a_throttled_client_is_not_read_until_its_bucket_refills_and_nothing_is_lost() {
    let s = Settings {
        limits: policy::Limits {
            message_rate: 10,
            message_burst: 2,
            ..policy::Limits::default()
        },
        ..settings(1 << 20)
    };
    let frames: Vec<Spec> = (0..6)
        .map(|i| Spec {
            fin: true,
            rsv: 0,
            opcode: frame::OP_TEXT,
            payload: format!("m{i}").into_bytes(),
        })
        .collect();
    let bytes = encode(&frames, true);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let started = Instant::now();
        let mut c = Mock::new(vec![bytes.clone()]);
        let mut b = Mock::new(vec![]);
        let peers = Peers {
            client: &mut c,
            client_prefix: Bytes::new(),
            backend: &mut b,
            backend_prefix: Bytes::new(),
        };
        let tally = Recorder::default();
        let sum = run(peers, &s, &NoDrain, &tally, 1).await;
        // Two at once, then one every 100 ms: the sixth waits 400 ms.
        assert_eq!(b.written, bytes, "everything arrives, in order");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(400) && took < Duration::from_millis(500),
            "{took:?}"
        );
        assert_eq!(sum.gateway_close, None);
        assert!(
            sum.traffic.throttled >= Duration::from_millis(300),
            "{sum:?}"
        );
        assert_eq!(tally.sum.get(), sum.traffic);
    });
}
