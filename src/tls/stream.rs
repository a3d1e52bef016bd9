//! TLS on client connections through rustls' unbuffered API. Records are read into a
//! per-thread buffer and decrypted in place there, and application data is encrypted into
//! another per-thread buffer and written straight to the socket. A connection keeps bytes of
//! its own only while they exist: a record cut by a read, plaintext its reader has not taken,
//! ciphertext the socket has not accepted. The buffered API keeps a 4 KiB receive buffer per
//! connection for good, which would be most of an idle tunnel's memory.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, WriteTraffic};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::leftover::Leftover;

/// The largest plaintext taken per write: whole records fit the output buffer.
const MAX_WRITE: usize = 48 * 1024;
/// Room for MAX_WRITE as TLS records (a few bytes of header and tag per 16 KiB record).
const OUT_SCRATCH: usize = MAX_WRITE + 1024;
/// Read buffer: several records per read, plus a partial one carried from the last read.
const IN_SCRATCH: usize = 96 * 1024;

thread_local! {
    static TLS_IN: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; IN_SCRATCH].into_boxed_slice());
    static TLS_OUT: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; OUT_SCRATCH].into_boxed_slice());
}

/// A server-side TLS connection over TCP.
pub(crate) struct ServerTls {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    /// TLS bytes received but not yet processed (a partial record, or records that arrived
    /// with the handshake); empty and unallocated most of the time.
    partial: Vec<u8>,
    /// Decrypted bytes the reader has not taken yet.
    plain: Leftover,
    /// Encrypted bytes the socket has not accepted yet.
    out: Vec<u8>,
    out_pos: usize,
    /// The peer sent close_notify or closed its side.
    peer_closed: bool,
    /// We sent close_notify.
    closed: bool,
}

/// Where processing the received bytes left the connection.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// More bytes from the peer are needed.
    NeedData,
    /// The handshake is done (application data may be pending in the input).
    Established,
    /// The peer closed.
    PeerClosed,
}

/// Something to encrypt once the connection is in its traffic state.
enum Send<'a> {
    Nothing,
    Data(&'a [u8], &'a mut [u8], &'a mut usize),
    CloseNotify,
}

impl ServerTls {
    /// Completes the handshake on `tcp`, the configuration picked by the client's SNI when
    /// it depends on it. A handshake that fails on this side sends the peer rustls' alert
    /// (a bad client certificate's, say) before the error is returned.
    /// Also returns the configuration used when it depended on the SNI. `failed` sees the
    /// error first (before the alert goes out, so it is counted by the time the peer reads it).
    /// `Ok(None)`: the client was an ACME validator, answered and closed.
    pub(crate) async fn accept(
        mut tcp: TcpStream,
        configs: &crate::tls::TlsConfigs,
        failed: impl FnOnce(&io::Error),
    ) -> io::Result<Option<Handshaken>> {
        let (config, partial, used) = if configs.by_name() {
            let hello = match read_client_hello(&mut tcp).await {
                Ok(x) => x,
                Err(e) => {
                    failed(&e);
                    return Err(e);
                }
            };
            let sni = hello.name.as_deref();
            if hello.acme_alpn
                && let Some(answer) = configs.challenge(sni)
            {
                let mut s = ServerTls::new(tcp, answer, hello.bytes)?;
                // The validator checks the certificate in the handshake; nothing follows.
                let answered = tokio::time::timeout(std::time::Duration::from_secs(10), async {
                    std::future::poll_fn(|cx| s.poll_handshake(cx)).await?;
                    tokio::io::AsyncWriteExt::shutdown(&mut s).await
                })
                .await;
                tracing::debug!(
                    name = sni.unwrap_or(""),
                    ok = matches!(answered, Ok(Ok(()))),
                    "TLS-ALPN-01 challenge answered"
                );
                return Ok(None);
            }
            if !configs.can_serve(sni) {
                let e = io::Error::new(
                    io::ErrorKind::InvalidData,
                    "no certificate for the name the client asked for",
                );
                failed(&e);
                refuse_name(&mut tcp).await;
                return Err(e);
            }
            let c = configs.pick(sni).clone();
            (c.clone(), hello.bytes, Some(c))
        } else {
            (configs.any().clone(), Vec::new(), None)
        };
        let mut s = ServerTls::new(tcp, config, partial)?;
        if let Err(e) = std::future::poll_fn(|cx| s.poll_handshake(cx)).await {
            failed(&e);
            s.send_alert().await;
            return Err(e);
        }
        Ok(Some((s, used)))
    }

    fn new(
        tcp: TcpStream,
        config: std::sync::Arc<rustls::ServerConfig>,
        partial: Vec<u8>,
    ) -> io::Result<ServerTls> {
        let conn = UnbufferedServerConnection::new(config).map_err(io::Error::other)?;
        Ok(ServerTls {
            tcp,
            conn,
            partial,
            plain: Leftover::default(),
            out: Vec::new(),
            out_pos: 0,
            peer_closed: false,
            closed: false,
        })
    }

    /// The client chose HTTP/2 by ALPN.
    pub(crate) fn alpn_h2(&self) -> bool {
        self.conn.alpn_protocol() == Some(b"h2")
    }

    /// The peer's certificate chain, once verified (also on a resumed session: rustls keeps
    /// it in the session).
    pub(crate) fn peer_leaf(&self) -> Option<&[u8]> {
        self.conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.as_ref())
    }

    /// After a failed handshake: the alert rustls queued, written if the socket takes it.
    /// One call: with the alert taken, rustls would go back to the records it failed on.
    async fn send_alert(&mut self) {
        let mut alert = Vec::new();
        let status = self.conn.process_tls_records(&mut self.partial);
        if let Ok(ConnectionState::EncodeTlsData(mut e)) = status.state {
            let _ = encode_into(&mut alert, |buf| e.encode(buf));
        }
        if alert.is_empty() {
            return;
        }
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // After whatever was queued before it, whole; then a short linger reading what the
        // client already sent (its request after Finished, in TLS 1.3), so the close does not
        // turn into a reset that destroys the alert in flight.
        let pending = self.out.split_off(self.out_pos.min(self.out.len()));
        let _ = tokio::time::timeout(std::time::Duration::from_millis(500), async {
            self.tcp.write_all(&pending).await?;
            self.tcp.write_all(&alert).await?;
            self.tcp.shutdown().await?;
            let mut sink = [0u8; 4096];
            let mut total = 0;
            while total < 64 * 1024 {
                match self.tcp.read(&mut sink).await? {
                    0 => break,
                    n => total += n,
                }
            }
            Ok::<_, io::Error>(())
        })
        .await;
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.poll_flush_out(cx))?;
            let outcome = self.process_partial(None, Send::Nothing, true)?;
            match outcome {
                Outcome::Established => {
                    ready!(self.poll_flush_out(cx))?;
                    return Poll::Ready(Ok(()));
                }
                Outcome::PeerClosed => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "closed during the TLS handshake",
                    )));
                }
                Outcome::NeedData => {
                    if !self.out.is_empty() {
                        continue;
                    }
                    // Handshake messages are few: they collect in the connection's own buffer.
                    let mut chunk = [0u8; 4096];
                    let mut rb = ReadBuf::new(&mut chunk);
                    ready!(Pin::new(&mut self.tcp).poll_read(cx, &mut rb))?;
                    let n = rb.filled().len();
                    if n == 0 {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "closed during the TLS handshake",
                        )));
                    }
                    self.partial.extend_from_slice(&chunk[..n]);
                }
            }
        }
    }

    /// Processes `self.partial`, delivering plaintext to `sink` (or `self.plain`).
    fn process_partial(
        &mut self,
        sink: Option<&mut ReadBuf<'_>>,
        send: Send<'_>,
        handshake: bool,
    ) -> io::Result<Outcome> {
        let mut partial = std::mem::take(&mut self.partial);
        let mut failed_at = 0;
        let result = process(
            &mut self.conn,
            &mut partial,
            sink,
            &mut self.plain,
            &mut self.out,
            send,
            handshake,
            &mut failed_at,
        );
        let (consumed, outcome) = match result {
            Ok(r) => r,
            Err(e) => {
                // What rustls consumed before the error goes: a later call (for the alert)
                // must see the buffer as rustls left it.
                partial.drain(..failed_at.min(partial.len()));
                self.partial = partial;
                return Err(e);
            }
        };
        partial.drain(..consumed);
        if partial.is_empty() {
            partial = Vec::new();
        }
        self.partial = partial;
        if outcome == Outcome::PeerClosed {
            self.peer_closed = true;
        }
        Ok(outcome)
    }

    fn poll_flush_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_pos < self.out.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.out[self.out_pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_pos += n;
        }
        if !self.out.is_empty() {
            self.out = Vec::new();
            self.out_pos = 0;
        }
        Poll::Ready(Ok(()))
    }
}

/// An established connection and the configuration picked for it when that depended on the
/// SNI.
pub(crate) type Handshaken = (ServerTls, Option<std::sync::Arc<rustls::ServerConfig>>);

/// What the ClientHello said, and every byte read for it.
struct Hello {
    name: Option<String>,
    /// The client offers ALPN `acme-tls/1` (a TLS-ALPN-01 validator).
    acme_alpn: bool,
    bytes: Vec<u8>,
}

/// Answers a ClientHello naming something no certificate covers with the fatal
/// `unrecognized_name` alert (a plaintext record: no handshake keys exist yet), and closes.
async fn refuse_name(tcp: &mut TcpStream) {
    use tokio::io::AsyncWriteExt;
    // Record: alert, TLS 1.2 framing, length 2; alert: fatal (2), unrecognized_name (112).
    const ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70];
    let _ = tokio::time::timeout(std::time::Duration::from_millis(500), async {
        tcp.write_all(&ALERT).await?;
        tcp.shutdown().await
    })
    .await;
}

/// The largest ClientHello read to find the server name before the handshake.
const MAX_CLIENT_HELLO: usize = 32 * 1024;

/// Reads the ClientHello (rustls' `Acceptor` parses it) and returns its server name and every
/// byte read, which the handshake then starts from.
async fn read_client_hello(tcp: &mut TcpStream) -> io::Result<Hello> {
    use tokio::io::AsyncReadExt;
    let mut acceptor = rustls::server::Acceptor::default();
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tcp.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed during the TLS handshake",
            ));
        }
        seen.extend_from_slice(&chunk[..n]);
        let mut fed = &chunk[..n];
        while !fed.is_empty() {
            if acceptor.read_tls(&mut fed)? == 0 {
                break;
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let hello = accepted.client_hello();
                let name = hello.server_name().map(str::to_string);
                let acme_alpn = hello
                    .alpn()
                    .is_some_and(|mut a| a.any(|p| p == crate::acme::ACME_TLS_ALPN));
                return Ok(Hello {
                    name,
                    acme_alpn,
                    bytes: seen,
                });
            }
            Ok(None) if seen.len() < MAX_CLIENT_HELLO => {}
            Ok(None) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "ClientHello too large",
                ));
            }
            Err((e, _)) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
    }
}

/// Runs the TLS state machine over `input`. Decrypted data goes to `sink` while it has room,
/// then to `plain`; handshake records are encoded into `out`; `send` is encrypted once the
/// connection is in its traffic state. Returns how many input bytes were consumed; when
/// rustls fails, `failed_at` says how many it had consumed by then.
#[allow(clippy::too_many_arguments)]
fn process(
    conn: &mut UnbufferedServerConnection,
    input: &mut [u8],
    mut sink: Option<&mut ReadBuf<'_>>,
    plain: &mut Leftover,
    out: &mut Vec<u8>,
    mut send: Send<'_>,
    handshake: bool,
    failed_at: &mut usize,
) -> io::Result<(usize, Outcome)> {
    let mut offset = 0;
    // rustls reports the peer's close once, then moves on to the next state.
    let mut peer_closed = false;
    loop {
        let status = conn.process_tls_records(&mut input[offset..]);
        let mut discard = status.discard;
        let state = status.state.map_err(|e| {
            *failed_at = offset + discard;
            io::Error::new(io::ErrorKind::InvalidData, e)
        })?;
        let outcome = match state {
            ConnectionState::ReadTraffic(mut r) => {
                // Records must be taken now: their bytes are already counted in `discard`.
                // Application data right behind the handshake lands in `plain` for the first read.
                while let Some(record) = r.next_record() {
                    let record =
                        record.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    discard += record.discard;
                    let mut payload = record.payload;
                    if let Some(s) = sink.as_deref_mut() {
                        let n = payload.len().min(s.remaining());
                        s.put_slice(&payload[..n]);
                        payload = &payload[n..];
                    }
                    plain.extend(payload);
                }
                None
            }
            ConnectionState::EncodeTlsData(mut e) => {
                encode_into(out, |buf| e.encode(buf))?;
                None
            }
            ConnectionState::TransmitTlsData(t) => {
                // The records wait in `out`, which is always flushed before anything newer.
                t.done();
                None
            }
            ConnectionState::BlockedHandshake => Some(Outcome::NeedData),
            ConnectionState::WriteTraffic(mut w) => {
                match std::mem::replace(&mut send, Send::Nothing) {
                    Send::Nothing => {}
                    Send::Data(data, buf, written) => {
                        *written = w.encrypt(data, buf).map_err(encrypt_error)?;
                    }
                    Send::CloseNotify => encrypt_close_notify(&mut w, out)?,
                }
                Some(if peer_closed {
                    Outcome::PeerClosed
                } else if handshake {
                    Outcome::Established
                } else {
                    Outcome::NeedData
                })
            }
            ConnectionState::PeerClosed => {
                peer_closed = true;
                None
            }
            ConnectionState::Closed => Some(Outcome::PeerClosed),
            _ => Some(Outcome::NeedData),
        };
        offset += discard;
        if let Some(o) = outcome {
            return Ok((offset, o));
        }
    }
}

fn encode_into(
    out: &mut Vec<u8>,
    mut f: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>,
) -> io::Result<()> {
    let used = out.len();
    out.resize(used + 4096, 0);
    let n = match f(&mut out[used..]) {
        Ok(n) => n,
        Err(EncodeError::InsufficientSize(s)) => {
            out.resize(used + s.required_size, 0);
            f(&mut out[used..]).map_err(io::Error::other)?
        }
        Err(e) => return Err(io::Error::other(e)),
    };
    out.truncate(used + n);
    Ok(())
}

fn encrypt_close_notify(
    w: &mut WriteTraffic<'_, ServerConnectionData>,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    let used = out.len();
    out.resize(used + 64, 0);
    let n = match w.queue_close_notify(&mut out[used..]) {
        Ok(n) => n,
        Err(EncryptError::InsufficientSize(s)) => {
            out.resize(used + s.required_size, 0);
            w.queue_close_notify(&mut out[used..])
                .map_err(encrypt_error)?
        }
        Err(e) => return Err(encrypt_error(e)),
    };
    out.truncate(used + n);
    Ok(())
}

fn encrypt_error(e: EncryptError) -> io::Error {
    io::Error::other(e)
}

/// Returns from `poll_read` once it has delivered data or reached the end; loops otherwise.
macro_rules! continue_or_return {
    ($this:ident, $buf:ident, $start:ident) => {
        if $buf.filled().len() > $start {
            return Poll::Ready(Ok(()));
        }
        if $this.peer_closed && $this.plain.is_empty() {
            return Poll::Ready(Ok(()));
        }
        continue;
    };
}

impl AsyncRead for ServerTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let start = buf.filled().len();
        loop {
            if !this.plain.is_empty() {
                this.plain.put_into(buf);
                return Poll::Ready(Ok(()));
            }
            if this.peer_closed {
                return Poll::Ready(Ok(()));
            }
            if !this.partial.is_empty() {
                let outcome = this.process_partial(Some(buf), Send::Nothing, false)?;
                // Post-handshake messages (tickets, key updates) go out when the socket allows.
                let _ = this.poll_flush_out(cx);
                if buf.filled().len() > start
                    || !this.plain.is_empty()
                    || outcome == Outcome::PeerClosed
                {
                    continue_or_return!(this, buf, start);
                }
            }
            let read = TLS_IN.with(|cell| -> Poll<io::Result<Outcome>> {
                let mut scratch = cell.borrow_mut();
                let p = this.partial.len();
                if p >= scratch.len() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "TLS record too large",
                    )));
                }
                scratch[..p].copy_from_slice(&this.partial);
                let mut rb = ReadBuf::new(&mut scratch[p..]);
                match Pin::new(&mut this.tcp).poll_read(cx, &mut rb) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(())) => {}
                }
                let n = rb.filled().len();
                if n == 0 {
                    // A TCP close without close_notify is taken as the end of the stream.
                    this.peer_closed = true;
                    return Poll::Ready(Ok(Outcome::PeerClosed));
                }
                let end = p + n;
                let (consumed, outcome) = process(
                    &mut this.conn,
                    &mut scratch[..end],
                    Some(buf),
                    &mut this.plain,
                    &mut this.out,
                    Send::Nothing,
                    false,
                    &mut 0,
                )?;
                this.partial.clear();
                if consumed < end {
                    this.partial.extend_from_slice(&scratch[consumed..end]);
                } else {
                    this.partial = Vec::new();
                }
                if outcome == Outcome::PeerClosed {
                    this.peer_closed = true;
                }
                Poll::Ready(Ok(outcome))
            });
            ready!(read)?;
            let _ = this.poll_flush_out(cx);
            continue_or_return!(this, buf, start);
        }
    }
}

impl AsyncWrite for ServerTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // Older ciphertext first: nothing new is encrypted while the socket is backed up.
        ready!(this.poll_flush_out(cx))?;
        if this.closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let take = data.len().min(MAX_WRITE);
        TLS_OUT.with(|cell| {
            let mut scratch = cell.borrow_mut();
            let mut written = 0;
            this.process_partial(
                None,
                Send::Data(&data[..take], &mut scratch[..], &mut written),
                false,
            )?;
            if written == 0 {
                return Poll::Ready(Err(io::Error::other("TLS connection cannot send data yet")));
            }
            if !this.out.is_empty() {
                // Processing queued TLS messages of its own (a key update answer, say): the
                // new records must follow them on the wire.
                this.out.extend_from_slice(&scratch[..written]);
                if let Poll::Ready(Err(e)) = this.poll_flush_out(cx) {
                    return Poll::Ready(Err(e));
                }
                return Poll::Ready(Ok(take));
            }
            let mut sent = 0;
            while sent < written {
                match Pin::new(&mut this.tcp).poll_write(cx, &scratch[sent..written]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => sent += n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => break,
                }
            }
            if sent < written {
                this.out.extend_from_slice(&scratch[sent..written]);
            }
            Poll::Ready(Ok(take))
        })
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_flush_out(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.closed {
            ready!(this.poll_flush_out(cx))?;
            this.process_partial(None, Send::CloseNotify, false)?;
            this.closed = true;
        }
        ready!(this.poll_flush_out(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}
