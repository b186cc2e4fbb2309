//! A TCP proxy in front of a real server that breaks the network on demand: it cuts every
//! open connection once a given number of bytes has gone one way (client to server, or
//! back), and then either carries on (a blip), closes every new connection at once (a
//! server that is gone), or accepts them and never answers (a link that hangs). The server
//! itself is never touched.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with connections, after the cut if there is one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Fault {
    /// Forwards everything.
    None = 0,
    /// Closes each new connection as soon as it is accepted.
    Down = 1,
    /// Accepts each new connection, reads what it sends and never answers.
    Hang = 2,
}

impl Fault {
    fn from_u8(value: u8) -> Self {
        match value {
            1 => Fault::Down,
            2 => Fault::Hang,
            _ => Fault::None,
        }
    }
}

/// Which way bytes go through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client to server (requests, uploads).
    Sent,
    /// Server to client (responses, downloads, a replication stream).
    Received,
}

struct State {
    upstream: SocketAddr,
    /// The current [`Fault`].
    fault: AtomicU8,
    /// Byte counts by [`Direction`].
    counts: [AtomicU64; 2],
    /// By [`Direction`]: the count at which open connections are cut (u64::MAX: never).
    cut_at: [AtomicU64; 2],
    /// The fault in force after the cut.
    after_cut: AtomicU8,
    cuts: AtomicU64,
    /// Bumped by a cut: connections opened before it close.
    epoch: watch::Sender<u64>,
}

impl State {
    /// Counts `n` more bytes going `direction`; true when that reaches a cut, which is
    /// then made: the fault switches and every open connection closes.
    fn count(&self, direction: Direction, n: usize) -> bool {
        let i = direction as usize;
        let total = self.counts[i].fetch_add(n as u64, Ordering::SeqCst) + n as u64;
        let cut_at = self.cut_at[i].load(Ordering::SeqCst);
        if total < cut_at
            || self.cut_at[i]
                .compare_exchange(cut_at, u64::MAX, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
        {
            return false;
        }
        self.cuts.fetch_add(1, Ordering::SeqCst);
        let then = self.after_cut.load(Ordering::SeqCst);
        self.fault.store(then, Ordering::SeqCst);
        self.epoch.send_modify(|epoch| *epoch += 1);
        true
    }
}

/// The proxy; it stops when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy on a free loopback port in front of `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Self {
        let upstream = tokio::net::lookup_host(upstream)
            .await
            .expect("upstream address resolves")
            .next()
            .expect("upstream has an address");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            upstream,
            fault: AtomicU8::new(Fault::None as u8),
            counts: [AtomicU64::new(0), AtomicU64::new(0)],
            cut_at: [AtomicU64::new(u64::MAX), AtomicU64::new(u64::MAX)],
            after_cut: AtomicU8::new(Fault::None as u8),
            cuts: AtomicU64::new(0),
            epoch: watch::channel(0).0,
        });
        let task = tokio::spawn(accept(listener, state.clone()));
        FaultProxy { addr, state, task }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Once `bytes` more bytes have gone `direction`, cuts every open connection and
    /// switches to `then`.
    pub fn cut_after(&self, direction: Direction, bytes: u64, then: Fault) {
        let i = direction as usize;
        self.state.after_cut.store(then as u8, Ordering::SeqCst);
        let so_far = self.state.counts[i].load(Ordering::SeqCst);
        self.state.cut_at[i].store(so_far + bytes, Ordering::SeqCst);
    }

    /// Switches to `fault` now (open connections are left as they are).
    pub fn set(&self, fault: Fault) {
        self.state.fault.store(fault as u8, Ordering::SeqCst);
    }

    /// Cuts made so far by [`FaultProxy::cut_after`].
    pub fn cuts(&self) -> u64 {
        self.state.cuts.load(Ordering::SeqCst)
    }

    /// Bytes that have gone `direction` through the proxy.
    pub fn bytes(&self, direction: Direction) -> u64 {
        self.state.counts[direction as usize].load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.state.epoch.send_modify(|epoch| *epoch += 1);
    }
}

async fn accept(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            match Fault::from_u8(state.fault.load(Ordering::SeqCst)) {
                Fault::Down => drop(client),
                Fault::Hang => swallow(client, &state).await,
                Fault::None => forward(client, &state).await,
            }
        });
    }
}

/// Reads and discards until the client gives up or a cut (or the proxy's end) comes.
async fn swallow(mut client: TcpStream, state: &State) {
    let mut epoch = state.epoch.subscribe();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            read = client.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
            _ = epoch.changed() => return,
        }
    }
}

async fn forward(client: TcpStream, state: &State) {
    let Ok(server) = TcpStream::connect(state.upstream).await else {
        return;
    };
    let mut epoch = state.epoch.subscribe();
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // Whichever way ends first ends the connection: both sockets close when dropped.
    tokio::select! {
        _ = pump(client_read, server_write, Direction::Sent, state) => {}
        _ = pump(server_read, client_write, Direction::Received, state) => {}
        _ = epoch.changed() => {}
    }
}

/// Copies one way until either side closes or a cut is reached.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    direction: Direction,
    state: &State,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if state.count(direction, n) || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
