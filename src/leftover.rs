//! Bytes held only while they wait for a reader: a buffer with a read cursor that gives its
//! memory back as soon as it has been drained, so idle connections do not keep it.

use tokio::io::ReadBuf;

/// Pending bytes and how many of them were already handed out.
#[derive(Debug, Default)]
pub(crate) struct Leftover {
    bytes: Vec<u8>,
    pos: usize,
}

impl Leftover {
    /// True when nothing is pending.
    pub(crate) fn is_empty(&self) -> bool {
        self.pos >= self.bytes.len()
    }

    /// Appends bytes behind those pending.
    pub(crate) fn extend(&mut self, more: &[u8]) {
        self.bytes.extend_from_slice(more);
    }

    /// Copies as much as fits into `buf`; frees the buffer once everything is handed out.
    pub(crate) fn put_into(&mut self, buf: &mut ReadBuf<'_>) {
        let n = (self.bytes.len() - self.pos).min(buf.remaining());
        buf.put_slice(&self.bytes[self.pos..self.pos + n]);
        self.pos += n;
        if self.pos == self.bytes.len() {
            *self = Leftover::default();
        }
    }
}
