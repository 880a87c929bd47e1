//! Accepting connections without being taken down by them, for every port
//! of the system (the gRPC servers and the orchestrator's HTTP port).
//!
//! - An accept that fails (out of file descriptors, EMFILE/ENFILE, or any
//!   other error) is retried after a backoff, 10 ms doubling to 1 s, reset
//!   by the next success: a failing accept is not a busy loop, and the
//!   connections already open keep their share of the CPU.
//! - Accept errors are logged at most once a second, with the count since
//!   the last line: a descriptor shortage does not fill the disk.
//! - A connection from which nothing arrives for the idle timeout is
//!   closed ([`IdleClose`]): a socket that never sends a byte, or a peer
//!   that went away without a FIN, does not hold a descriptor forever. On
//!   the gRPC ports HTTP/2 keepalive pings (every third of the idle timeout,
//!   see [`keepalive`]) make every live peer send something, so a live
//!   connection, even one only receiving a long stream, is never idle.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::Sender;
use tokio::time::{Instant, Sleep};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// How long a connection may stay silent before it is closed, by default.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// First wait after a failed accept.
const BACKOFF_FIRST: Duration = Duration::from_millis(10);
/// Longest wait after failed accepts.
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one log line per this long about failing accepts.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// The state of one listener's accept loop: the backoff after failures and
/// the rate limit of their log lines.
#[derive(Debug)]
pub struct Acceptor {
    listener: TcpListener,
    port: &'static str,
    backoff: Duration,
    failures: u64,
    logged_at: Option<Instant>,
}

impl Acceptor {
    /// Accepts on `listener`; `port` names it in the log ("grpc", "http").
    pub fn new(listener: TcpListener, port: &'static str) -> Self {
        Self {
            listener,
            port,
            backoff: BACKOFF_FIRST,
            failures: 0,
            logged_at: None,
        }
    }

    /// The next connection, with Nagle's algorithm off. Failed accepts are
    /// waited out (see the module doc), never returned.
    pub async fn accept(&mut self) -> TcpStream {
        loop {
            match self.listener.accept().await {
                Ok((stream, _)) => {
                    if self.failures > 0 {
                        tracing::info!(
                            port = self.port,
                            failures = self.failures,
                            "accepting connections again"
                        );
                    }
                    self.backoff = BACKOFF_FIRST;
                    self.failures = 0;
                    self.logged_at = None;
                    // gRPC messages are small: Nagle plus delayed ACKs would
                    // add 40 ms to a reply that fits in one segment.
                    let _ = stream.set_nodelay(true);
                    return stream;
                }
                Err(error) => {
                    self.failures += 1;
                    let now = Instant::now();
                    if self.logged_at.is_none_or(|at| now - at >= LOG_EVERY) {
                        tracing::warn!(
                            port = self.port,
                            %error,
                            failures = self.failures,
                            retry_in = ?self.backoff,
                            "cannot accept connections (out of file descriptors?)"
                        );
                        self.logged_at = Some(now);
                    }
                    tokio::time::sleep(self.backoff).await;
                    self.backoff = next_backoff(self.backoff);
                }
            }
        }
    }
}

/// The wait after one more failed accept.
fn next_backoff(backoff: Duration) -> Duration {
    (backoff * 2).min(BACKOFF_MAX)
}

/// The HTTP/2 keepalive of a gRPC server whose connections are closed after
/// `idle` of silence: a ping every third of it, answered within a third.
pub fn keepalive(idle: Duration) -> (Duration, Duration) {
    (idle / 3, idle / 3)
}

/// Connections accepted on `listener` for a gRPC server: accept errors
/// backed off and logged at most once a second, Nagle off, and each
/// connection closed after `idle` without a byte from the peer.
///
/// The listener lives in a task that ends when the stream is dropped, so
/// the port is closed as soon as the server stops accepting.
pub fn incoming(
    listener: TcpListener,
    idle: Duration,
) -> ReceiverStream<Result<IdleClose<TcpStream>, io::Error>> {
    accepting(listener, idle, |stream, sender| async move {
        sender.send(Ok(stream)).await.is_ok()
    })
}

/// The accept loop of a gRPC port: each connection accepted on `listener`
/// (wrapped in [`IdleClose`]) goes to `handle` with the sender of the
/// stream returned, which the server reads its connections from; the loop
/// ends when `handle` answers false or the stream is dropped. Plaintext
/// sends the connection as it is ([`incoming`]); TLS hands it to a
/// handshake task ([`crate::tls::incoming`]).
pub(crate) fn accepting<T, F, Fut>(
    listener: TcpListener,
    idle: Duration,
    mut handle: F,
) -> ReceiverStream<Result<T, io::Error>>
where
    T: Send + 'static,
    F: FnMut(IdleClose<TcpStream>, Sender<Result<T, io::Error>>) -> Fut + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    let (sender, receiver) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        let mut acceptor = Acceptor::new(listener, "grpc");
        loop {
            tokio::select! {
                stream = acceptor.accept() => {
                    if !handle(IdleClose::new(stream, idle), sender.clone()).await {
                        return;
                    }
                }
                _ = sender.closed() => return,
            }
        }
    });
    ReceiverStream::new(receiver)
}

/// A connection that fails its reads (and so is closed by the server
/// driving it) once nothing has arrived from the peer for `idle`.
#[derive(Debug)]
pub struct IdleClose<S> {
    inner: S,
    idle: Duration,
    last_read: Instant,
    timer: Pin<Box<Sleep>>,
}

impl<S> IdleClose<S> {
    /// Wraps `inner`; its idle time starts now.
    pub fn new(inner: S, idle: Duration) -> Self {
        let now = Instant::now();
        Self {
            inner,
            idle,
            last_read: now,
            timer: Box::pin(tokio::time::sleep_until(now + idle)),
        }
    }

    /// Whether the idle time has run out (polling the timer, so the task is
    /// woken when it does).
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            // The timer is only moved on when it fires, not on every read.
            let deadline = self.last_read + self.idle;
            if deadline <= Instant::now() {
                return true;
            }
            self.timer.as_mut().reset(deadline);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for IdleClose<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    self.last_read = Instant::now();
                }
                Poll::Ready(result)
            }
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "nothing received for the idle timeout; connection closed",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for IdleClose<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl Connected for IdleClose<TcpStream> {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn accept_backoff_doubles_from_10ms_to_1s() {
        let mut backoff = BACKOFF_FIRST;
        let mut waits = vec![backoff];
        for _ in 0..10 {
            backoff = next_backoff(backoff);
            waits.push(backoff);
        }
        assert_eq!(waits[0], Duration::from_millis(10));
        assert_eq!(waits[1], Duration::from_millis(20));
        assert_eq!(waits[6], Duration::from_millis(640));
        assert_eq!(waits[7], Duration::from_secs(1));
        assert_eq!(waits[10], Duration::from_secs(1));
    }

    #[tokio::test]
    async fn a_silent_peer_is_cut_off_and_a_talking_one_is_not() {
        let idle = Duration::from_secs(1);
        let (mut client, server) = tokio::io::duplex(64);
        let mut server = IdleClose::new(server, idle);
        let mut byte = [0u8; 1];
        // Talking every 100 ms keeps it open past the idle timeout.
        let started = std::time::Instant::now();
        while started.elapsed() < 2 * idle {
            tokio::time::sleep(Duration::from_millis(100)).await;
            client.write_all(b"x").await.unwrap();
            server.read_exact(&mut byte).await.unwrap();
        }
        // Then silence: the read fails (a generous bound on a hang).
        let error = tokio::time::timeout(Duration::from_secs(10), server.read(&mut byte))
            .await
            .expect("cut off, not left hanging")
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
    }
}
