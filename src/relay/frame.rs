//! RFC 6455 frame boundaries: a header parser that needs the whole header in one slice (an
//! incomplete header is a state, not an error: the caller carries those few bytes over), and a
//! per-direction [`Tracker`] that validates each header against section 5 and counts payload
//! bytes down to the next boundary. Payload is never copied, unmasked or buffered here.

/// Continuation frame.
pub(crate) const OP_CONTINUATION: u8 = 0x0;
/// Text frame.
pub(crate) const OP_TEXT: u8 = 0x1;
/// Binary frame.
pub(crate) const OP_BINARY: u8 = 0x2;
/// Close frame.
pub(crate) const OP_CLOSE: u8 = 0x8;
/// Ping frame.
pub(crate) const OP_PING: u8 = 0x9;
/// Pong frame.
pub(crate) const OP_PONG: u8 = 0xA;

/// The longest possible frame header: 2 + 8 (64-bit length) + 4 (mask).
pub(crate) const MAX_HEADER: usize = 14;

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    /// FIN bit.
    pub(crate) fin: bool,
    /// RSV1..3 as the top three bits of a nibble; left alone (extensions own them).
    pub(crate) rsv: u8,
    /// Opcode nibble.
    pub(crate) opcode: u8,
    /// Mask key when the MASK bit is set.
    pub(crate) mask: Option<[u8; 4]>,
    /// Declared payload length (may have the top bit set; the tracker refuses that).
    pub(crate) len: u64,
    /// Header size in bytes (2 to 14).
    pub(crate) header_len: usize,
}

impl Header {
    /// True for text, binary and continuation frames.
    pub(crate) fn is_data(&self) -> bool {
        self.opcode <= OP_BINARY
    }
}

/// Parses the header at the start of `buf`; `None` means more bytes are needed.
pub(crate) fn parse_header(buf: &[u8]) -> Option<Header> {
    let [b0, b1, ..] = *buf else { return None };
    let masked = b1 & 0x80 != 0;
    let (len, len_bytes) = match b1 & 0x7f {
        126 => {
            let b = buf.get(2..4)?;
            (u16::from_be_bytes([b[0], b[1]]) as u64, 2)
        }
        127 => {
            let b = buf.get(2..10)?;
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            (u64::from_be_bytes(a), 8)
        }
        n => (n as u64, 0),
    };
    let header_len = 2 + len_bytes + if masked { 4 } else { 0 };
    let mask = if masked {
        let m = buf.get(2 + len_bytes..header_len)?;
        Some([m[0], m[1], m[2], m[3]])
    } else {
        None
    };
    Some(Header {
        fin: b0 & 0x80 != 0,
        rsv: (b0 >> 4) & 0x7,
        opcode: b0 & 0x0f,
        mask,
        len,
        header_len,
    })
}

/// Which peer sends the frames a tracker sees; it decides the masking rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sender {
    /// Client frames: must be masked, and are bounded by `max_frame_size`.
    Client,
    /// Backend frames: must not be masked.
    Backend,
}

/// Something RFC 6455 section 5 forbids, or a frame over the size limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Violation {
    /// Opcodes 3-7 and 11-15.
    ReservedOpcode,
    /// A control frame without FIN.
    FragmentedControl,
    /// A control frame with more than 125 bytes of payload.
    ControlTooLong,
    /// A 64-bit length with the most significant bit set.
    LengthTopBit,
    /// A client frame without the MASK bit.
    Unmasked,
    /// A backend frame with the MASK bit.
    Masked,
    /// A continuation frame with no message in progress.
    UnexpectedContinuation,
    /// A new text or binary frame while a fragmented message is in progress.
    ExpectedContinuation,
    /// A client frame declaring more than `max_frame_size`.
    TooLarge,
}

impl Violation {
    /// The close code to send the peer that caused it (1009 for size, 1002 otherwise).
    pub(crate) fn close_code(self) -> u16 {
        match self {
            Violation::TooLarge => 1009,
            _ => 1002,
        }
    }

    /// A short reason for Close frames and logs.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Violation::ReservedOpcode => "reserved opcode",
            Violation::FragmentedControl => "fragmented control frame",
            Violation::ControlTooLong => "control frame too long",
            Violation::LengthTopBit => "bad frame length",
            Violation::Unmasked => "unmasked client frame",
            Violation::Masked => "masked server frame",
            Violation::UnexpectedContinuation => "unexpected continuation",
            Violation::ExpectedContinuation => "expected continuation",
            Violation::TooLarge => "frame too large",
        }
    }

    /// The reason told to the backend when the client committed it.
    pub(crate) fn client_reason(self) -> &'static str {
        match self {
            Violation::ReservedOpcode => "client protocol error: reserved opcode",
            Violation::FragmentedControl => "client protocol error: fragmented control frame",
            Violation::ControlTooLong => "client protocol error: control frame too long",
            Violation::LengthTopBit => "client protocol error: bad frame length",
            Violation::Unmasked => "client protocol error: unmasked frame",
            Violation::Masked => "client protocol error: masked frame",
            Violation::UnexpectedContinuation => "client protocol error: unexpected continuation",
            Violation::ExpectedContinuation => "client protocol error: expected continuation",
            Violation::TooLarge => "client frame too large",
        }
    }
}

/// Frame boundary state of one direction of a tunnel.
#[derive(Debug, Clone)]
pub(crate) struct Tracker {
    sender: Sender,
    max_len: u64,
    /// Payload bytes of the current frame still to pass; 0 means "at a frame boundary".
    remaining: u64,
    /// Whether the payload now passing belongs to a data frame.
    data_payload: bool,
    /// A text or binary message was started without FIN and awaits continuations.
    in_message: bool,
}

impl Tracker {
    /// A tracker for frames sent by `sender`; `max_len` bounds client frames.
    pub(crate) fn new(sender: Sender, max_len: u64) -> Self {
        Tracker {
            sender,
            max_len,
            remaining: 0,
            data_payload: false,
            in_message: false,
        }
    }

    /// True between frames, where the gateway may insert a frame of its own.
    pub(crate) fn at_boundary(&self) -> bool {
        self.remaining == 0
    }

    /// True while a data frame's payload is passing.
    pub(crate) fn in_data_payload(&self) -> bool {
        self.remaining > 0 && self.data_payload
    }

    /// Accounts for up to `avail` payload bytes; returns how many belong to the current frame.
    pub(crate) fn take_payload(&mut self, avail: usize) -> usize {
        let n = (avail as u64).min(self.remaining) as usize;
        self.remaining -= n as u64;
        n
    }

    /// Validates a header parsed at a boundary and starts its frame.
    #[cfg(test)]
    pub(crate) fn begin(&mut self, h: &Header) -> Result<(), Violation> {
        self.check(h)?;
        self.start(h);
        Ok(())
    }

    /// Validates a header parsed at a boundary without starting its frame.
    pub(crate) fn check(&self, h: &Header) -> Result<(), Violation> {
        debug_assert!(self.at_boundary());
        if h.len >> 63 != 0 {
            return Err(Violation::LengthTopBit);
        }
        match (self.sender, h.mask.is_some()) {
            (Sender::Client, false) => return Err(Violation::Unmasked),
            (Sender::Backend, true) => return Err(Violation::Masked),
            _ => {}
        }
        match h.opcode {
            OP_CLOSE | OP_PING | OP_PONG => {
                if !h.fin {
                    return Err(Violation::FragmentedControl);
                }
                if h.len > 125 {
                    return Err(Violation::ControlTooLong);
                }
            }
            OP_CONTINUATION => {
                if !self.in_message {
                    return Err(Violation::UnexpectedContinuation);
                }
            }
            OP_TEXT | OP_BINARY => {
                if self.in_message {
                    return Err(Violation::ExpectedContinuation);
                }
            }
            _ => return Err(Violation::ReservedOpcode),
        }
        if self.sender == Sender::Client && h.len > self.max_len {
            return Err(Violation::TooLarge);
        }
        Ok(())
    }

    /// Starts the frame of a header [`Tracker::check`] accepted.
    pub(crate) fn start(&mut self, h: &Header) {
        if h.is_data() {
            self.in_message = !h.fin;
        }
        self.data_payload = h.is_data();
        self.remaining = h.len;
    }
}

/// Writes a frame header for `len` payload bytes into `out`; returns its length.
pub(crate) fn encode_header(
    out: &mut [u8; MAX_HEADER],
    fin: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    len: u64,
) -> usize {
    out[0] = (if fin { 0x80 } else { 0 }) | (opcode & 0x0f);
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let mut n = if len < 126 {
        out[1] = mask_bit | len as u8;
        2
    } else if len <= u16::MAX as u64 {
        out[1] = mask_bit | 126;
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        out[1] = mask_bit | 127;
        out[2..10].copy_from_slice(&len.to_be_bytes());
        10
    };
    if let Some(m) = mask {
        out[n..n + 4].copy_from_slice(&m);
        n += 4;
    }
    n
}

/// A whole control frame (at most 125 bytes of payload) built on the stack.
#[derive(Clone, Copy)]
pub(crate) struct ControlFrame {
    buf: [u8; MAX_HEADER + 125],
    len: usize,
}

impl ControlFrame {
    /// A frame with `payload` (cut to 125 bytes), masked with `mask` when given.
    pub(crate) fn new(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Self {
        let payload = &payload[..payload.len().min(125)];
        let mut hdr = [0u8; MAX_HEADER];
        let h = encode_header(&mut hdr, true, opcode, mask, payload.len() as u64);
        let mut buf = [0u8; MAX_HEADER + 125];
        buf[..h].copy_from_slice(&hdr[..h]);
        buf[h..h + payload.len()].copy_from_slice(payload);
        if let Some(m) = mask {
            apply_mask(&mut buf[h..h + payload.len()], m, 0);
        }
        ControlFrame {
            buf,
            len: h + payload.len(),
        }
    }

    /// A Close frame with a code and a reason (the reason is cut to fit 125 bytes).
    pub(crate) fn close(code: u16, reason: &str, mask: Option<[u8; 4]>) -> Self {
        let mut p = [0u8; 125];
        p[..2].copy_from_slice(&code.to_be_bytes());
        let mut r = reason.len().min(123);
        while !reason.is_char_boundary(r) {
            r -= 1;
        }
        p[2..2 + r].copy_from_slice(&reason.as_bytes()[..r]);
        ControlFrame::new(OP_CLOSE, &p[..2 + r], mask)
    }

    /// The encoded bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// XORs `data` with the mask, `offset` bytes into the payload.
pub(crate) fn apply_mask(data: &mut [u8], mask: [u8; 4], offset: usize) {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= mask[(offset + i) & 3];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(bytes: &[u8]) -> Header {
        parse_header(bytes).expect("complete header")
    }

    #[test]
    fn lengths_of_each_width_parse() {
        assert_eq!(header(&[0x81, 5]).len, 5);
        let h = header(&[0x82, 126, 1, 0]);
        assert_eq!((h.len, h.header_len), (256, 4));
        let h = header(&[0x82, 0xff, 0, 0, 0, 1, 0, 0, 0, 0, 1, 2, 3, 4]);
        assert_eq!(
            (h.len, h.header_len, h.mask),
            (1 << 32, 14, Some([1, 2, 3, 4]))
        );
    }

    #[test]
    fn every_proper_prefix_of_a_header_is_incomplete() {
        let full = [0x82u8, 0xff, 0, 0, 0, 1, 0, 0, 0, 0, 1, 2, 3, 4];
        for n in 0..full.len() {
            assert!(parse_header(&full[..n]).is_none(), "prefix {n}");
        }
    }

    #[test]
    fn section_five_violations_are_refused() {
        let mut t = Tracker::new(Sender::Client, 1 << 20);
        let m = |b0: u8, b1: u8| header(&[b0, b1 | 0x80, 0, 0, 0, 0]);
        assert_eq!(t.begin(&m(0x83, 0)), Err(Violation::ReservedOpcode));
        assert_eq!(t.begin(&m(0x09, 0)), Err(Violation::FragmentedControl));
        assert_eq!(
            t.begin(&header(&[0x89, 0x80 | 126, 0, 126, 0, 0, 0, 0])),
            Err(Violation::ControlTooLong)
        );
        assert_eq!(t.begin(&header(&[0x81, 5])), Err(Violation::Unmasked));
        assert_eq!(t.begin(&m(0x80, 0)), Err(Violation::UnexpectedContinuation));
        let top = header(&[0x82, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]);
        assert_eq!(t.begin(&top), Err(Violation::LengthTopBit));
        let big = header(&[0x82, 0xff, 0, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 0, 0]);
        assert_eq!(t.begin(&big), Err(Violation::TooLarge));
        let mut b = Tracker::new(Sender::Backend, 0);
        assert_eq!(b.begin(&m(0x81, 1)), Err(Violation::Masked));
    }

    #[test]
    fn control_frames_may_interleave_fragments() {
        let mut t = Tracker::new(Sender::Backend, 0);
        t.begin(&header(&[0x01, 3])).unwrap();
        assert_eq!(t.take_payload(10), 3);
        t.begin(&header(&[0x89, 0])).unwrap();
        assert!(t.at_boundary());
        assert_eq!(
            t.begin(&header(&[0x81, 0])),
            Err(Violation::ExpectedContinuation)
        );
        t.begin(&header(&[0x80, 0])).unwrap();
        t.begin(&header(&[0x82, 0])).unwrap();
    }

    #[test]
    fn rsv_bits_are_not_refused() {
        let mut t = Tracker::new(Sender::Backend, 0);
        t.begin(&header(&[0xC1, 0])).unwrap();
        assert_eq!(header(&[0xC1, 0]).rsv, 0b100);
    }

    #[test]
    fn close_frame_encodes_code_and_masks() {
        let f = ControlFrame::close(1001, "going away", Some([1, 2, 3, 4]));
        let h = header(f.bytes());
        assert_eq!((h.opcode, h.len, h.header_len), (OP_CLOSE, 12, 6));
        let mut p = f.bytes()[6..].to_vec();
        apply_mask(&mut p, [1, 2, 3, 4], 0);
        assert_eq!(&p[..2], &1001u16.to_be_bytes());
        assert_eq!(&p[2..], b"going away");
    }
}
