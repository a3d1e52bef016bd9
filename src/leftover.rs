//! Bytes held only while they wait for a reader: a buffer with a read cursor that gives its
//! memory back as soon as it has been drained, so idle connections do not keep it.

use tokio::io::ReadBuf;

/// Pending bytes and how many of them were already handed out.
#[derive(Debug, Default)]
pub struct Leftover {
    bytes: Vec<u8>,
    pos: usize,
}

impl Leftover {
    /// Pending bytes, to hand out from the start.
    pub fn new(bytes: Vec<u8>) -> Self {
        Leftover { bytes, pos: 0 }
    }

    /// True when nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.pos >= self.bytes.len()
    }

    /// Appends bytes behind those pending.
    pub fn extend(&mut self, more: &[u8]) {
        self.bytes.extend_from_slice(more);
    }

    /// Copies as much as fits into `buf`; frees the buffer once everything is handed out.
    pub fn put_into(&mut self, buf: &mut ReadBuf<'_>) {
        let n = (self.bytes.len() - self.pos).min(buf.remaining());
        buf.put_slice(&self.bytes[self.pos..self.pos + n]);
        self.pos += n;
        if self.pos == self.bytes.len() {
            *self = Leftover::default();
        }
    }

    /// The bytes not yet handed out.
    pub fn into_remaining(mut self) -> Vec<u8> {
        self.bytes.drain(..self.pos.min(self.bytes.len()));
        self.bytes
    }
}
