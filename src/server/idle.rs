//! `--grpc-max-connection-idle-duration`: a connection on which the client has started no call
//! for that long is closed, as grpc-go's server does (tonic has no such setting). The stream is
//! wrapped so that its reads are scanned for HTTP/2 frame headers: HEADERS, DATA, RST_STREAM and
//! CONTINUATION frames from the client are activity; PING, SETTINGS and WINDOW_UPDATE (keepalive
//! and flow control) are not. An idle connection carries no call, so closing it fails nothing;
//! the client connects again on its next call.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tonic::transport::server::Connected;

/// The client's connection preface, which precedes the first frame.
const PREFACE_LEN: usize = 24;

/// Finds frame boundaries in the bytes a client sends.
#[derive(Debug)]
pub struct FrameScanner {
    preface_left: usize,
    header: [u8; 9],
    header_len: usize,
    payload_left: usize,
}

impl Default for FrameScanner {
    fn default() -> Self {
        FrameScanner { preface_left: PREFACE_LEN, header: [0; 9], header_len: 0, payload_left: 0 }
    }
}

impl FrameScanner {
    /// Consumes `bytes`; returns whether they completed the header of a frame that is activity.
    pub fn scan(&mut self, mut bytes: &[u8]) -> bool {
        let mut active = false;
        while !bytes.is_empty() {
            if self.preface_left > 0 {
                let n = self.preface_left.min(bytes.len());
                self.preface_left -= n;
                bytes = &bytes[n..];
            } else if self.payload_left > 0 {
                let n = self.payload_left.min(bytes.len());
                self.payload_left -= n;
                bytes = &bytes[n..];
            } else {
                let n = (9 - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
                self.header_len += n;
                bytes = &bytes[n..];
                if self.header_len == 9 {
                    self.header_len = 0;
                    let h = self.header;
                    self.payload_left =
                        (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
                    // DATA, HEADERS, RST_STREAM, CONTINUATION.
                    active |= matches!(h[3], 0x0 | 0x1 | 0x3 | 0x9);
                }
            }
        }
        active
    }
}

#[derive(Debug)]
struct Shared {
    last_activity: Instant,
    closed: bool,
    reader: Option<Waker>,
}

/// A server-side stream that ends itself after `idle` without client activity.
pub struct IdleStream<S> {
    inner: S,
    scanner: FrameScanner,
    shared: Arc<Mutex<Shared>>,
}

impl<S> IdleStream<S> {
    /// Wraps `inner` and, with an `idle` limit, starts its watchdog, which stops when the
    /// connection ends or at `shutdown`; `on_close` runs when it is closed for idleness. Without
    /// a limit nothing is spawned.
    pub fn new(
        inner: S,
        idle: Option<Duration>,
        on_close: impl FnOnce() + Send + 'static,
        shutdown: &CancellationToken,
    ) -> IdleStream<S> {
        let shared =
            Arc::new(Mutex::new(Shared { last_activity: Instant::now(), closed: false, reader: None }));
        let Some(idle) = idle else {
            return IdleStream { inner, scanner: FrameScanner::default(), shared };
        };
        let watched = Arc::downgrade(&shared);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            loop {
                let Some(shared) = watched.upgrade() else { return };
                let deadline = shared.lock().unwrap_or_else(PoisonError::into_inner).last_activity + idle;
                drop(shared);
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep_until(deadline) => {}
                }
                let Some(shared) = watched.upgrade() else { return };
                let mut s = shared.lock().unwrap_or_else(PoisonError::into_inner);
                if s.last_activity + idle <= Instant::now() {
                    s.closed = true;
                    if let Some(waker) = s.reader.take() {
                        waker.wake();
                    }
                    drop(s);
                    on_close();
                    return;
                }
            }
        });
        IdleStream { inner, scanner: FrameScanner::default(), shared }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for IdleStream<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        {
            let mut s = this.lock();
            if s.closed {
                return Poll::Ready(Ok(())); // end of stream: hyper closes the connection
            }
            s.reader = Some(cx.waker().clone());
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result
            && this.scanner.scan(&buf.filled()[before..])
        {
            this.lock().last_activity = Instant::now();
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for IdleStream<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: Connected> Connected for IdleStream<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, payload: usize) -> Vec<u8> {
        let mut f = vec![(payload >> 16) as u8, (payload >> 8) as u8, payload as u8, kind, 0, 0, 0, 0, 1];
        f.extend(std::iter::repeat_n(0xab, payload));
        f
    }

    #[test]
    fn calls_are_activity_and_pings_are_not() {
        let mut s = FrameScanner::default();
        assert!(!s.scan(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
        assert!(!s.scan(&frame(0x4, 6)), "SETTINGS");
        assert!(!s.scan(&frame(0x6, 8)), "PING");
        assert!(!s.scan(&frame(0x8, 4)), "WINDOW_UPDATE");
        assert!(s.scan(&frame(0x1, 40)), "HEADERS");
        assert!(s.scan(&frame(0x0, 10)), "DATA");
    }

    #[test]
    fn frames_split_across_reads_are_followed() {
        let mut s = FrameScanner::default();
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend(frame(0x6, 8));
        bytes.extend(frame(0x1, 300));
        let mut seen = false;
        for chunk in bytes.chunks(7) {
            seen |= s.scan(chunk);
        }
        assert!(seen, "the HEADERS frame behind a PING is found");
        // A payload that looks like a header is not mistaken for one.
        let mut s = FrameScanner { preface_left: 0, ..FrameScanner::default() };
        assert!(!s.scan(&frame(0x6, 9)[..9]));
        assert!(!s.scan(&[0, 0, 0, 1, 0, 0, 0, 0, 1]), "payload bytes, not a HEADERS frame");
    }
}
