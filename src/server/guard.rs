//! Deadlines for slow clients that hyper does not cover by itself.
//!
//! - Protocol detection on the plain listener: the client's first bytes decide
//!   HTTP/1.1 or HTTP/2 (prior knowledge). They are read here, within
//!   `header_read_timeout`, and replayed to the chosen protocol (`Replay`); a
//!   client that sends `P` or half the preface and stops is cut off.
//! - HTTP/2 (`HeaderDeadline`): the connection preface and every header block
//!   (a HEADERS frame and its CONTINUATIONs up to END_HEADERS), and any frame
//!   header, must arrive within `header_read_timeout` of their first byte, else
//!   the connection fails with `TimedOut`. Only the 9-byte frame headers are
//!   looked at (length, type, flags); payloads are skipped, and the frames
//!   themselves are still parsed by hyper's `h2`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

pub const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the first bytes of a plain connection said.
pub enum Detected {
    /// The stream as it was (the bytes read so far are replayed by the caller).
    Http1(TcpStream, Bytes),
    Http2(Replay<TcpStream>),
    /// Closed, failed, or too slow to say anything.
    Nothing,
}

/// Reads until the bytes either differ from the HTTP/2 preface (HTTP/1.1) or
/// complete it (HTTP/2), within `timeout`.
pub async fn detect(mut stream: TcpStream, timeout: Duration) -> Detected {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 24];
    let mut n = 0;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf[n..])).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Detected::Nothing,
            Ok(Ok(m)) => n += m,
        }
        if buf[..n] != H2_PREFACE[..n] {
            return Detected::Http1(stream, Bytes::copy_from_slice(&buf[..n]));
        }
        if n == H2_PREFACE.len() {
            return Detected::Http2(Replay::new(stream, Bytes::copy_from_slice(&buf[..n])));
        }
    }
}

// === impl Replay ===

/// An IO that first yields bytes already read from it.
pub struct Replay<IO> {
    io: IO,
    head: Bytes,
}

impl<IO> Replay<IO> {
    pub fn new(io: IO, head: Bytes) -> Self {
        Self { io, head }
    }

    /// The same IO, now replaying `more` after whatever it had not yet replayed.
    pub fn with_prefix(mut self, more: Bytes) -> Self {
        self.head = if self.head.is_empty() {
            more
        } else {
            let mut joined = bytes::BytesMut::with_capacity(self.head.len() + more.len());
            joined.extend_from_slice(&self.head);
            joined.extend_from_slice(&more);
            joined.freeze()
        };
        self
    }

    pub fn has_prefix(&self) -> bool {
        !self.head.is_empty()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Replay<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.head.is_empty() {
            let n = self.head.len().min(buf.remaining());
            let chunk = self.head.split_to(n);
            buf.put_slice(&chunk);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Replay<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

// === impl HeaderDeadline ===

const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;

/// Where the reader is in the HTTP/2 byte stream.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FrameScan {
    /// Preface bytes still to come.
    preface_left: u8,
    /// Bytes of the current frame header seen so far (0 = between frames).
    header: [u8; 9],
    header_len: u8,
    /// Payload bytes of the current frame still to skip.
    payload_left: u32,
    /// Inside a header block: HEADERS seen, END_HEADERS not yet.
    in_block: bool,
    /// The current frame is a HEADERS or CONTINUATION frame.
    block_frame: bool,
}

impl FrameScan {
    pub fn new() -> Self {
        Self { preface_left: H2_PREFACE.len() as u8, ..Self::default() }
    }

    /// Whether a preface, a frame header or a header block is half-received.
    pub fn pending(&self) -> bool {
        self.preface_left > 0
            || self.header_len > 0
            || self.in_block
            || (self.block_frame && self.payload_left > 0)
    }

    /// Advances over `bytes` just read.
    pub fn scan(&mut self, mut bytes: &[u8]) {
        let skip = usize::from(self.preface_left).min(bytes.len());
        self.preface_left -= skip as u8;
        bytes = &bytes[skip..];
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let n = (self.payload_left as usize).min(bytes.len());
                self.payload_left -= n as u32;
                bytes = &bytes[n..];
                continue;
            }
            let have = usize::from(self.header_len);
            let n = (9 - have).min(bytes.len());
            self.header[have..have + n].copy_from_slice(&bytes[..n]);
            self.header_len += n as u8;
            bytes = &bytes[n..];
            if self.header_len == 9 {
                let h = self.header;
                self.header_len = 0;
                self.payload_left = u32::from_be_bytes([0, h[0], h[1], h[2]]);
                let (kind, flags) = (h[3], h[4]);
                self.block_frame = kind == HEADERS || kind == CONTINUATION;
                if self.block_frame {
                    self.in_block = flags & END_HEADERS == 0;
                }
            }
        }
    }
}

/// An HTTP/2 server IO whose reads fail with `TimedOut` when a preface, frame
/// header or header block takes longer than `timeout` from its first byte.
pub struct HeaderDeadline<IO> {
    io: IO,
    timeout: Duration,
    scan: FrameScan,
    /// Armed while something is half-received.
    deadline: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl<IO> HeaderDeadline<IO> {
    pub fn new(io: IO, timeout: Duration) -> Self {
        let mut me = Self { io, timeout, scan: FrameScan::new(), deadline: None, armed: false };
        me.rearm();
        me
    }

    /// Starts the clock when something became pending, stops it when nothing is.
    fn rearm(&mut self) {
        match (self.scan.pending(), self.armed) {
            (true, false) => {
                let at = Instant::now() + self.timeout;
                match &mut self.deadline {
                    Some(s) => s.as_mut().reset(at),
                    None => self.deadline = Some(Box::pin(tokio::time::sleep_until(at))),
                }
                self.armed = true;
            }
            (false, true) => self.armed = false,
            _ => {}
        }
    }

    fn expired(&self) -> bool {
        self.armed && self.deadline.as_ref().is_some_and(|d| d.deadline() <= Instant::now())
    }
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "HTTP/2 header block not received within header_read_timeout")
}

impl<IO: AsyncRead + Unpin> AsyncRead for HeaderDeadline<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut me.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                me.scan.scan(&buf.filled()[before..]);
                me.rearm();
                // A client trickling a header block byte by byte is still too slow.
                if me.expired() {
                    return Poll::Ready(Err(timed_out()));
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if me.armed {
                    if let Some(d) = &mut me.deadline {
                        ready!(d.as_mut().poll(cx));
                        return Poll::Ready(Err(timed_out()));
                    }
                }
                Poll::Pending
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for HeaderDeadline<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, len: u32) -> Vec<u8> {
        let l = len.to_be_bytes();
        let mut f = vec![l[1], l[2], l[3], kind, flags, 0, 0, 0, 1];
        f.resize(9 + len as usize, 0xAA);
        f
    }

    #[test]
    fn scan_tracks_preface_frames_and_header_blocks() {
        let mut s = FrameScan::new();
        assert!(s.pending(), "the preface is awaited");
        s.scan(&H2_PREFACE[..10]);
        assert!(s.pending());
        s.scan(&H2_PREFACE[10..]);
        assert!(!s.pending());
        s.scan(&frame(0x4, 0, 6)); // SETTINGS
        assert!(!s.pending());
        let headers = frame(HEADERS, 0, 5);
        s.scan(&headers[..4]);
        assert!(s.pending(), "half a frame header");
        s.scan(&headers[4..]);
        assert!(s.pending(), "HEADERS without END_HEADERS opens a block");
        s.scan(&frame(0x0, 0, 100)); // (a DATA frame here is a protocol error; the scan just moves on)
        s.scan(&frame(CONTINUATION, END_HEADERS, 3));
        assert!(!s.pending(), "END_HEADERS closes it");
        let big = frame(0x0, 1, 40_000);
        for chunk in big.chunks(777) {
            s.scan(chunk);
        }
        assert!(!s.pending(), "a slow DATA frame is not a header block");
        let single = frame(HEADERS, END_HEADERS | 0x1, 7);
        s.scan(&single[..12]);
        assert!(s.pending(), "a header block frame whose payload is still coming");
        s.scan(&single[12..]);
        assert!(!s.pending());
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

        /// However the bytes are split into reads, the scan ends in the same state.
        #[test]
        fn scanning_is_independent_of_read_boundaries(
            bytes in proptest::collection::vec(any::<u8>(), 0..400),
            cuts in proptest::collection::vec(0usize..400, 0..8),
        ) {
            let mut whole = FrameScan::new();
            whole.scan(&bytes);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            cuts.sort();
            let mut pieces = FrameScan::new();
            let mut at = 0;
            for c in cuts.into_iter().chain([bytes.len()]) {
                pieces.scan(&bytes[at..c]);
                at = c;
            }
            prop_assert_eq!(whole, pieces);
        }
    }
}
