//! A TCP proxy in front of the test server, to cut the network or freeze it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Forwards connections from its own loopback port to `127.0.0.1:target`.
pub struct Proxy {
    pub port: u16,
    frozen: watch::Sender<bool>,
    connections: Arc<Mutex<Vec<Connection>>>,
    accept: JoinHandle<()>,
}

struct Connection {
    task: JoinHandle<()>,
    /// Never delivers again (a connection lost in a network cut).
    dead: Arc<AtomicBool>,
}

impl Proxy {
    pub async fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().unwrap().port();
        let (frozen, frozen_rx) = watch::channel(false);
        let connections: Arc<Mutex<Vec<Connection>>> = Arc::default();
        let accept = tokio::spawn({
            let connections = connections.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let frozen = frozen_rx.clone();
                    let dead = Arc::new(AtomicBool::new(false));
                    let pumps_dead = dead.clone();
                    let task = tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
                            return;
                        };
                        // Closed by a cut, either end sees a reset, as when a firewall or a
                        // proxy on the way drops the connection.
                        let _ = client.set_zero_linger();
                        let _ = server.set_zero_linger();
                        let (client_read, client_write) = client.into_split();
                        let (server_read, server_write) = server.into_split();
                        tokio::join!(
                            pump(
                                client_read,
                                server_write,
                                frozen.clone(),
                                pumps_dead.clone()
                            ),
                            pump(server_read, client_write, frozen, pumps_dead),
                        );
                    });
                    connections.lock().unwrap().push(Connection { task, dead });
                }
            }
        });
        Proxy {
            port,
            frozen,
            connections,
            accept,
        }
    }

    /// A URL of the test database through the proxy.
    pub fn url(&self, db: &super::TestDb) -> String {
        db.cluster.url(&db.db).replace(
            &format!(":{}/", db.cluster.port()),
            &format!(":{}/", self.port),
        )
    }

    /// Resets every open connection.
    pub fn cut(&self) {
        for c in self.connections.lock().unwrap().drain(..) {
            c.task.abort();
        }
    }

    /// Delivers nothing more, in either direction, of open connections and of new ones:
    /// a network that stopped delivering, and no end hears of it.
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// The network delivers again, to new connections: the open ones (also those made
    /// while it was frozen) stay silent for good, as connections whose state a firewall
    /// or NAT on the way forgot, until [`Proxy::cut`].
    pub fn thaw(&self) {
        for c in self.connections.lock().unwrap().iter() {
            c.dead.store(true, Ordering::SeqCst);
        }
        self.frozen.send_replace(false);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
    dead: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if !deliverable(&mut frozen, &dead).await || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
    // An end that closed is passed on too, if the network delivers it.
    if deliverable(&mut frozen, &dead).await {
        let _ = to.shutdown().await;
    }
}

/// Waits until the network delivers; for a dead connection, for ever (holding its ends
/// open).
async fn deliverable(frozen: &mut watch::Receiver<bool>, dead: &AtomicBool) -> bool {
    if frozen.wait_for(|f| !*f).await.is_err() {
        return false;
    }
    if dead.load(Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
    true
}
