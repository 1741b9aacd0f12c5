//! A TCP proxy for tests: a WAN link between two "regions" on one machine.
//!
//! It listens on an ephemeral loopback port and forwards every connection to a target. Each
//! direction has its own one-way latency: every chunk read from one side is stamped "due at
//! now + latency" and queued; a writer task writes the chunks in order once they are due. The
//! reader keeps reading while earlier chunks wait, so the link has latency, not a bandwidth cap
//! of one chunk per latency (the in-flight window is `WINDOW` chunks of up to 16 KiB).
//!
//! The link can be cut and healed:
//! - `Cut::Refuse`: open connections are reset; new ones are accepted and reset at once.
//! - `Cut::Blackhole`: open connections are reset; new ones are accepted and then never
//!   answered (what they send is read and dropped), as a peer behind a partition would look
//!   once its handshake completed; they are reset when the link heals, so a client that has no
//!   timeout of its own hangs exactly as long as the cut lasts.
//! - `Cut::Silent`: open connections go silent instead: the target side is reset and the client
//!   side is kept open and never hears anything again, even after the heal — the half-open
//!   connection a partition leaves behind when the far end gives up or restarts meanwhile and
//!   its reset is lost. Only a client-side keepalive or idle timeout notices it. New connections
//!   are black-holed until the heal, as with `Blackhole`.
//!
//! Tasks run on the caller's tokio runtime; dropping the `Proxy` stops accepting and resets
//! every connection it holds.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Chunks in flight per direction before the reader waits for the writer.
const WINDOW: usize = 4096;
const CHUNK: usize = 16 * 1024;

/// How a cut link treats new connections (open ones are always reset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Accept and reset at once (the client sees a connection error immediately).
    Refuse,
    /// Accept and never answer until the link heals (then reset).
    Blackhole,
    /// Like `Blackhole` for new connections; open ones become half-open for good.
    Silent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Up,
    Cut(Cut),
    /// The proxy was dropped.
    Gone,
}

/// What went through the proxy so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Connections forwarded to the target.
    pub forwarded: u64,
    /// Open connections reset by a cut.
    pub reset_by_cut: u64,
    /// Connections refused while cut (`Cut::Refuse`).
    pub refused: u64,
    /// Connections held unanswered while cut (`Cut::Blackhole`, `Cut::Silent`).
    pub blackholed: u64,
    /// Open connections left half-open by `Cut::Silent`.
    pub silenced: u64,
    /// Bytes from clients to the target, and back.
    pub bytes_up: u64,
    pub bytes_down: u64,
}

#[derive(Default)]
struct Counters {
    forwarded: AtomicU64,
    reset_by_cut: AtomicU64,
    refused: AtomicU64,
    blackholed: AtomicU64,
    silenced: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
}

struct Shared {
    target: SocketAddr,
    /// One-way latency in nanoseconds: [client → target, target → client].
    latency: [AtomicU64; 2],
    link: watch::Sender<Link>,
    counters: Counters,
}

impl Shared {
    fn latency(&self, dir: usize) -> Duration {
        Duration::from_nanos(self.latency[dir].load(Ordering::Relaxed))
    }
}

/// A latency-adding, cuttable TCP proxy on 127.0.0.1.
pub struct Proxy {
    pub port: u16,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Forward `127.0.0.1:<port>` to `target`, adding `one_way` latency in each direction.
    pub async fn start(target: SocketAddr, one_way: Duration) -> Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (link, _) = watch::channel(Link::Up);
        let ns = one_way.as_nanos() as u64;
        let shared = Arc::new(Shared {
            target,
            latency: [AtomicU64::new(ns), AtomicU64::new(ns)],
            link,
            counters: Counters::default(),
        });
        let sh = shared.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let link = *sh.link.borrow();
                match link {
                    Link::Up => {
                        tokio::spawn(forward(client, sh.clone()));
                    }
                    Link::Cut(Cut::Refuse) | Link::Gone => {
                        sh.counters.refused.fetch_add(1, Ordering::Relaxed);
                        reset(client);
                    }
                    Link::Cut(Cut::Blackhole | Cut::Silent) => {
                        sh.counters.blackholed.fetch_add(1, Ordering::Relaxed);
                        tokio::spawn(blackhole(client, sh.link.subscribe()));
                    }
                }
            }
        });
        Ok(Proxy {
            port,
            shared,
            accept,
        })
    }

    /// `127.0.0.1:<port>`, for a client's configuration.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Change the one-way latency of each direction (applies to chunks read from now on).
    pub fn set_latency(&self, client_to_target: Duration, target_to_client: Duration) {
        self.shared.latency[0].store(client_to_target.as_nanos() as u64, Ordering::Relaxed);
        self.shared.latency[1].store(target_to_client.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Cut the link: reset every open connection; new ones are refused or black-holed.
    pub fn cut(&self, how: Cut) {
        self.shared.link.send_replace(Link::Cut(how));
    }

    /// Heal the link: new connections are forwarded again (black-holed ones are reset).
    pub fn heal(&self) {
        self.shared.link.send_replace(Link::Up);
    }

    pub fn stats(&self) -> ProxyStats {
        let c = &self.shared.counters;
        ProxyStats {
            forwarded: c.forwarded.load(Ordering::Relaxed),
            reset_by_cut: c.reset_by_cut.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            blackholed: c.blackholed.load(Ordering::Relaxed),
            silenced: c.silenced.load(Ordering::Relaxed),
            bytes_up: c.bytes_up.load(Ordering::Relaxed),
            bytes_down: c.bytes_down.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.shared.link.send_replace(Link::Gone);
    }
}

/// Close with a reset (SO_LINGER 0), as a broken link looks to the peer.
fn reset(s: TcpStream) {
    let _ = s.set_zero_linger();
    drop(s);
}

async fn blackhole(mut client: TcpStream, mut link: watch::Receiver<Link>) {
    let mut sink = vec![0u8; CHUNK];
    let drain = async {
        loop {
            match client.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::select! {
        _ = drain => {}
        _ = link.wait_for(|l| !matches!(l, Link::Cut(_))) => {}
    }
    reset(client);
}

/// Keep a client connection open and silent until the client closes it or the proxy goes.
async fn hold_silent(mut client: TcpStream, mut link: watch::Receiver<Link>) {
    let mut sink = vec![0u8; CHUNK];
    let drain = async {
        loop {
            match client.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::select! {
        _ = drain => {}
        _ = link.wait_for(|l| *l == Link::Gone) => {}
    }
    reset(client);
}

async fn forward(client: TcpStream, sh: Arc<Shared>) {
    let mut link = sh.link.subscribe();
    let server = tokio::select! {
        r = TcpStream::connect(sh.target) => match r {
            Ok(s) => s,
            Err(_) => return reset(client),
        },
        _ = link.wait_for(|l| *l != Link::Up) => return reset(client),
    };
    sh.counters.forwarded.fetch_add(1, Ordering::Relaxed);
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client, mut server) = (client, server);
    let cut = {
        let (cr, cw) = client.split();
        let (sr, sw) = server.split();
        let both = async {
            tokio::try_join!(
                pipe(cr, sw, &sh, 0, &sh.counters.bytes_up),
                pipe(sr, cw, &sh, 1, &sh.counters.bytes_down),
            )
        };
        tokio::select! {
            _ = both => false,
            _ = link.wait_for(|l| *l != Link::Up) => true,
        }
    };
    if cut && *link.borrow() == Link::Cut(Cut::Silent) {
        sh.counters.silenced.fetch_add(1, Ordering::Relaxed);
        reset(server);
        hold_silent(client, link).await;
    } else if cut {
        sh.counters.reset_by_cut.fetch_add(1, Ordering::Relaxed);
        reset(client);
        reset(server);
    } else {
        let _ = client.shutdown().await;
        let _ = server.shutdown().await;
    }
}

/// Copy `r` to `w`, each chunk delayed by the direction's latency, in order. An EOF is passed
/// on (as a write shutdown) after the same delay.
async fn pipe<R, W>(
    mut r: R,
    mut w: W,
    sh: &Shared,
    dir: usize,
    bytes: &AtomicU64,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (tx, mut rx) = mpsc::channel::<(Instant, Option<Vec<u8>>)>(WINDOW);
    let reader = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = r.read(&mut buf).await?;
            let due = Instant::now() + sh.latency(dir);
            let chunk = (n > 0).then(|| buf[..n].to_vec());
            if tx.send((due, chunk)).await.is_err() || n == 0 {
                return Ok::<_, std::io::Error>(());
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            match chunk {
                Some(c) => {
                    w.write_all(&c).await?;
                    bytes.fetch_add(c.len() as u64, Ordering::Relaxed);
                }
                None => {
                    w.shutdown().await?;
                    break;
                }
            }
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::try_join!(reader, writer).map(|_| ())
}
