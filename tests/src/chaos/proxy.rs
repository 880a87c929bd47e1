//! A TCP fault proxy: sits between the orchestrators and one participant and
//! can add latency, reset every connection, or black-hole the participant
//! for a while. The orchestrator sees what a real network does to it: slow
//! replies, `connection reset by peer`, and calls that hang until their
//! deadline.
//!
//! Each accepted connection gets a task that connects upstream and pumps
//! bytes both ways. The proxy's mode lives in a `watch` channel so that a
//! reset or the end of a black hole reaches every connection at once,
//! including the ones waiting mid-forward.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What a black hole ends with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterBlackhole {
    /// Forward what was held, as if the network had only stalled.
    Resume,
    /// Reset every connection that was held.
    Reset,
}

impl AfterBlackhole {
    /// `resume` or `reset`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Resume => "resume",
            Self::Reset => "reset",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Mode {
    /// Black holes in force (they nest): while any is, accept, hold,
    /// forward nothing.
    blackholes: u32,
    /// Bumped by every reset: a connection older than the current value is
    /// reset.
    resets: u64,
    /// The proxy was dropped: every connection ends.
    closed: bool,
}

#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    latency_ms: AtomicU64,
    mode: watch::Sender<Mode>,
    /// Connections held by a black hole right now.
    held: AtomicU64,
}

/// A running proxy; stops (and resets its connections) when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// A proxy to `upstream` listening on `listen` (port 0 for any).
    pub async fn start(listen: SocketAddr, upstream: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            latency_ms: AtomicU64::new(0),
            mode: watch::channel(Mode::default()).0,
            held: AtomicU64::new(0),
        });
        let accepting = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    // Out of file descriptors or similar: try again shortly.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                tokio::spawn(connection(inbound, accepting.clone()));
            }
        });
        Ok(Self { addr, shared, task })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Adds `latency` before every chunk forwarded, either way (zero: none).
    pub fn set_latency(&self, latency: Duration) {
        self.shared
            .latency_ms
            .store(latency.as_millis() as u64, Ordering::Relaxed);
    }

    /// Resets every open connection (RST, not FIN). New ones are accepted
    /// as usual.
    pub fn reset_all(&self) {
        self.shared.mode.send_modify(|mode| mode.resets += 1);
    }

    /// From now on, accepts connections but forwards nothing, on new and
    /// open connections alike, until [`FaultProxy::end_blackhole`]. Black
    /// holes nest: forwarding resumes when the last one ends.
    pub fn start_blackhole(&self) {
        self.shared.mode.send_modify(|mode| mode.blackholes += 1);
    }

    /// Ends a black hole: forwards what was held (once no other black hole
    /// is in force), or resets it.
    pub fn end_blackhole(&self, then: AfterBlackhole) {
        self.shared.mode.send_modify(|mode| {
            mode.blackholes = mode.blackholes.saturating_sub(1);
            if then == AfterBlackhole::Reset {
                mode.resets += 1;
            }
        });
    }

    /// How many connections a black hole holds right now.
    pub fn held(&self) -> u64 {
        self.shared.held.load(Ordering::Relaxed)
    }

    /// Back to plain forwarding: no latency, no black hole.
    pub fn heal(&self) {
        self.set_latency(Duration::ZERO);
        self.shared.mode.send_modify(|mode| mode.blackholes = 0);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.shared.mode.send_modify(|mode| mode.closed = true);
    }
}

/// Whether a connection that started at `resets` must end now.
fn must_end(mode: &Mode, resets: u64) -> bool {
    mode.closed || mode.resets != resets
}

async fn connection(inbound: TcpStream, shared: Arc<Shared>) {
    let mut mode = shared.mode.subscribe();
    let resets = mode.borrow().resets;
    // A black-holed participant accepts and then says nothing: not even
    // the upstream connection is made until the black hole ends.
    if !matches!(hold(&shared, &mut mode, resets).await, Forwarded::Done) {
        reset(&inbound, None);
        return;
    }
    let Ok(upstream) = TcpStream::connect(shared.upstream).await else {
        // The participant is down: the client sees a reset connection, as
        // it would see a refused one without the proxy.
        reset(&inbound, None);
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let mut inbound = inbound;
    let mut upstream = upstream;
    if pump(&mut inbound, &mut upstream, &shared, &mut mode, resets).await {
        reset(&inbound, Some(&upstream));
    }
}

/// SO_LINGER 0, then the caller drops the sockets: the peer gets an RST.
fn reset(inbound: &TcpStream, upstream: Option<&TcpStream>) {
    let _ = inbound.set_zero_linger();
    if let Some(upstream) = upstream {
        let _ = upstream.set_zero_linger();
    }
}

/// Pumps bytes both ways until one side closes (false) or a reset is
/// ordered (true).
async fn pump(
    a: &mut TcpStream,
    b: &mut TcpStream,
    shared: &Shared,
    mode: &mut watch::Receiver<Mode>,
    resets: u64,
) -> bool {
    let (mut a_read, mut a_write) = a.split();
    let (mut b_read, mut b_write) = b.split();
    let mut a_buf = vec![0u8; 16 * 1024];
    let mut b_buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            read = a_read.read(&mut a_buf) => match read {
                Ok(0) | Err(_) => return false,
                Ok(n) => {
                    match forward(&a_buf[..n], &mut b_write, shared, mode, resets).await {
                        Forwarded::Done => {}
                        Forwarded::Closed => return false,
                        Forwarded::Reset => return true,
                    }
                }
            },
            read = b_read.read(&mut b_buf) => match read {
                Ok(0) | Err(_) => return false,
                Ok(n) => {
                    match forward(&b_buf[..n], &mut a_write, shared, mode, resets).await {
                        Forwarded::Done => {}
                        Forwarded::Closed => return false,
                        Forwarded::Reset => return true,
                    }
                }
            },
            changed = mode.changed() => {
                if changed.is_err() || must_end(&mode.borrow_and_update(), resets) {
                    return true;
                }
            }
        }
    }
}

enum Forwarded {
    Done,
    Closed,
    Reset,
}

/// Writes `bytes` after the configured latency and once no black hole is
/// in force; a reset ordered meanwhile wins.
async fn forward(
    bytes: &[u8],
    to: &mut (impl AsyncWriteExt + Unpin),
    shared: &Shared,
    mode: &mut watch::Receiver<Mode>,
    resets: u64,
) -> Forwarded {
    let latency = Duration::from_millis(shared.latency_ms.load(Ordering::Relaxed));
    if !latency.is_zero() {
        let sleep = tokio::time::sleep(latency);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                changed = mode.changed() => {
                    if changed.is_err() || must_end(&mode.borrow_and_update(), resets) {
                        return Forwarded::Reset;
                    }
                }
            }
        }
    }
    if !matches!(hold(shared, mode, resets).await, Forwarded::Done) {
        return Forwarded::Reset;
    }
    match to.write_all(bytes).await {
        Ok(()) => Forwarded::Done,
        Err(_) => Forwarded::Closed,
    }
}

/// Waits while a black hole is in force: Done when it ended, Reset when a
/// reset was ordered (or the proxy dropped).
async fn hold(shared: &Shared, mode: &mut watch::Receiver<Mode>, resets: u64) -> Forwarded {
    let mut counted = false;
    let outcome = loop {
        let now = *mode.borrow_and_update();
        if must_end(&now, resets) {
            break Forwarded::Reset;
        }
        if now.blackholes == 0 {
            break Forwarded::Done;
        }
        if !counted {
            shared.held.fetch_add(1, Ordering::Relaxed);
            counted = true;
        }
        if mode.changed().await.is_err() {
            break Forwarded::Reset;
        }
    };
    if counted {
        shared.held.fetch_sub(1, Ordering::Relaxed);
    }
    outcome
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    /// An echo server on port 0.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn proxy() -> FaultProxy {
        FaultProxy::start("127.0.0.1:0".parse().unwrap(), echo_server().await)
            .await
            .unwrap()
    }

    async fn round_trip(client: &mut TcpStream, message: &[u8]) -> io::Result<Vec<u8>> {
        client.write_all(message).await?;
        let mut reply = vec![0u8; message.len()];
        client.read_exact(&mut reply).await?;
        Ok(reply)
    }

    #[tokio::test]
    async fn forwards_bytes_both_ways() {
        let proxy = proxy().await;
        let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
        for message in [&b"hello"[..], b"second message", &[7u8; 40_000]] {
            assert_eq!(round_trip(&mut client, message).await.unwrap(), message);
        }
    }

    #[tokio::test]
    async fn latency_delays_every_chunk() {
        let proxy = proxy().await;
        let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
        round_trip(&mut client, b"warm").await.unwrap();
        proxy.set_latency(Duration::from_millis(150));
        let started = Instant::now();
        round_trip(&mut client, b"slow").await.unwrap();
        // Once on the way there, once on the way back.
        assert!(started.elapsed() >= Duration::from_millis(300));
        proxy.set_latency(Duration::ZERO);
        let started = Instant::now();
        round_trip(&mut client, b"fast").await.unwrap();
        assert!(started.elapsed() < Duration::from_millis(150));
    }

    #[tokio::test]
    async fn reset_makes_the_client_see_an_error() {
        let proxy = proxy().await;
        let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
        round_trip(&mut client, b"before").await.unwrap();
        proxy.reset_all();
        let mut buf = [0u8; 8];
        let read = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
            .await
            .expect("the reset arrives");
        let error = read.expect_err("an RST, not a clean end of stream");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
        // New connections work again.
        let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut again, b"after").await.unwrap(), b"after");
    }

    #[tokio::test]
    async fn black_hole_holds_then_resumes_or_resets() {
        let proxy = proxy().await;
        let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
        round_trip(&mut open, b"warm").await.unwrap();
        proxy.start_blackhole();
        // An open connection and a new one both go silent.
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        for client in [&mut open, &mut fresh] {
            let held =
                tokio::time::timeout(Duration::from_millis(300), round_trip(client, b"held")).await;
            assert!(held.is_err(), "a black hole answers nothing");
        }
        proxy.end_blackhole(AfterBlackhole::Resume);
        for client in [&mut open, &mut fresh] {
            let mut reply = [0u8; 4];
            tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut reply))
                .await
                .expect("held bytes are forwarded after the black hole")
                .unwrap();
            assert_eq!(&reply, b"held");
        }

        proxy.start_blackhole();
        let mut held = TcpStream::connect(proxy.addr()).await.unwrap();
        held.write_all(b"lost").await.unwrap();
        // Reset only once the proxy holds it (it accepts asynchronously).
        let deadline = Instant::now() + Duration::from_secs(5);
        while proxy.held() == 0 {
            assert!(Instant::now() < deadline, "the proxy never accepted");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        proxy.end_blackhole(AfterBlackhole::Reset);
        let mut buf = [0u8; 4];
        let read = tokio::time::timeout(Duration::from_secs(5), held.read(&mut buf))
            .await
            .expect("the reset arrives");
        assert!(
            read.is_err(),
            "a reset black hole ends with an RST: {read:?}"
        );
    }
}
