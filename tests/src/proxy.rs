//! A TCP proxy that breaks big downloads: between agents and the controller it forwards bytes
//! untouched (TLS passes through), and when a connection carries a burst of more than
//! `threshold` bytes towards the client (a bundle download: manifests and heartbeat answers are
//! a few hundred bytes) it injects a fault into the first `faults` such bursts, in turn:
//! - [`Fault::Reset`]: both sides are closed with a TCP reset, mid-transfer;
//! - [`Fault::Stall`]: nothing more is forwarded either way, and the sockets stay open, as a
//!   dead path or a hung controller looks to the client.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Reset,
    Stall,
}

/// Bytes closer together than this belong to one burst.
const BURST_GAP: Duration = Duration::from_millis(200);

pub struct FaultyProxy {
    pub addr: SocketAddr,
    /// The faults still to inject, in order.
    plan: Arc<Mutex<Vec<Fault>>>,
    injected: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultyProxy {
    /// Listens on `listen` (a `127.0.0.1` port) and forwards to `upstream`.
    pub async fn start(
        listen: SocketAddr,
        upstream: SocketAddr,
        threshold: usize,
        faults: Vec<Fault>,
    ) -> FaultyProxy {
        let listener = TcpListener::bind(listen).await.expect("proxy bind");
        let addr = listener.local_addr().unwrap();
        let plan = Arc::new(Mutex::new(faults.into_iter().rev().collect::<Vec<_>>()));
        let injected = Arc::new(AtomicUsize::new(0));
        let (p, inj) = (plan.clone(), injected.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let (p, inj) = (p.clone(), inj.clone());
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        relay(client, server, threshold, p, inj).await;
                    }
                });
            }
        });
        FaultyProxy {
            addr,
            plan,
            injected,
            task,
        }
    }

    /// How many faults were injected so far.
    pub fn injected(&self) -> usize {
        self.injected.load(Ordering::SeqCst)
    }

    /// How many planned faults are left.
    pub fn remaining(&self) -> usize {
        self.plan.lock().unwrap().len()
    }
}

impl Drop for FaultyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(
    client: TcpStream,
    server: TcpStream,
    threshold: usize,
    plan: Arc<Mutex<Vec<Fault>>>,
    injected: Arc<AtomicUsize>,
) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = async {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            match cr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if sw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let down = async {
        let mut buf = vec![0u8; 16 << 10];
        let (mut burst, mut last) = (0usize, Instant::now());
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => n,
            };
            if last.elapsed() > BURST_GAP {
                burst = 0;
            }
            last = Instant::now();
            burst += n;
            if burst > threshold {
                if let Some(f) = plan.lock().unwrap().pop() {
                    injected.fetch_add(1, Ordering::SeqCst);
                    return Some(f);
                }
            }
            if cw.write_all(&buf[..n]).await.is_err() {
                return None;
            }
        }
    };
    // Whichever direction ends first ends the relay, unless a fault says otherwise.
    let fault = tokio::select! {
        _ = up => None,
        f = down => f,
    };
    match fault {
        Some(Fault::Reset) => {
            let client = cr.reunite(cw).expect("halves of one stream");
            let server = sr.reunite(sw).expect("halves of one stream");
            // A zero linger makes the close a reset; only a non-zero one would block the
            // thread on drop, which is what tokio's deprecation warns about.
            #[allow(deprecated)]
            {
                let _ = client.set_linger(Some(Duration::ZERO));
                let _ = server.set_linger(Some(Duration::ZERO));
            }
        }
        Some(Fault::Stall) => {
            // Hold both sockets, forwarding nothing, until the client gives up.
            let mut buf = [0u8; 4096];
            let deadline = tokio::time::sleep(Duration::from_secs(600));
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    r = cr.read(&mut buf) => if matches!(r, Ok(0) | Err(_)) { break },
                    _ = &mut deadline => break,
                }
            }
        }
        None => {}
    }
}
