//! A receive low-water mark on the replication connection while a backlog streams in.
//!
//! The WAL sender writes every pgoutput message with its own `send()`. Over loopback or a
//! fast network, each one wakes the reader, and PostgreSQL's side of those wake-ups is
//! what bounds a catch-up (the sender is at 100% of a core, mostly in the kernel). With a
//! low-water mark on our socket the kernel wakes us once per `HIGH_WATER` bytes instead:
//! the sender's writes become cheap copies into the socket and a backlog drains markedly
//! faster (`weir bench capture`).
//!
//! A low-water mark delays small amounts of data until more arrive, so it is raised only
//! while we are behind the server (the transaction being decoded committed a while ago)
//! and events come in fast; it is lowered when a transaction arrives close to its commit
//! time, and whenever a tick passes without an event; lowering it wakes the reader at once
//! if any data is waiting (Linux re-checks readiness then). Live traffic therefore never
//! waits on it, and the tail of a burst waits at most a tick or two.
//!
//! The transport owns its socket; we find it by its two ends: the server reports the
//! client address and port of our replication connection, and the file descriptor with
//! that local address and the server's port is ours. Every change re-checks both ends,
//! so a descriptor that was closed and reused is never touched.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// Bytes the kernel collects before it wakes the reader, while raised.
const HIGH_WATER: i32 = 64 * 1024;
/// Events counted between two rate checks.
const RATE_WINDOW: u32 = 256;
/// A rate window filled faster than this raises the mark (256 events in 2 ms: ~128,000
/// events/s, a backlog rather than live traffic).
const RAISE_WITHIN: Duration = Duration::from_millis(2);
/// A transaction that committed longer ago than this when it arrives means a backlog (or
/// one large transaction, which PostgreSQL sends only once it has committed).
const BEHIND: Duration = Duration::from_millis(500);
/// How long a raised mark may go without an event before it is lowered.
pub const IDLE_TICK: Duration = Duration::from_millis(1);

/// The low-water mark of one replication socket.
pub struct LowWater {
    socket: Socket,
    raised: bool,
    /// Events since the window started.
    events: u32,
    window_start: Instant,
    /// Events since the last idle tick.
    since_tick: u32,
    /// The mark could not be changed: leave it alone from then on.
    broken: bool,
    /// When the transaction being received committed (Unix ms, the server's clock).
    committed_ms: Option<i64>,
}

impl LowWater {
    /// Finds the socket connected from `local` to the server's `server_port`.
    pub fn find(local: SocketAddr, server_port: u16) -> Option<LowWater> {
        Socket::find(local, server_port).map(|socket| LowWater {
            socket,
            raised: false,
            events: 0,
            window_start: Instant::now(),
            since_tick: 0,
            broken: false,
            committed_ms: None,
        })
    }

    /// Whether the mark is raised (and the idle tick must run).
    pub fn raised(&self) -> bool {
        self.raised
    }

    /// A transaction begins that committed at `committed_ms` (Unix ms, server clock): one
    /// that arrives close to live brings the mark down.
    pub fn on_transaction(&mut self, committed_ms: i64) {
        self.committed_ms = Some(committed_ms);
        if self.raised && !self.behind() {
            self.set(false);
        }
    }

    /// Whether the transaction being received committed `BEHIND` ago or more (by our clock
    /// against the server's). Asked again as it goes: a large transaction is sent only
    /// after its commit and falls behind while it streams.
    fn behind(&self) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        self.committed_ms
            .is_some_and(|c| now.saturating_sub(c) >= BEHIND.as_millis() as i64)
    }

    /// Counts one event; raises the mark when events come in at backlog speed.
    pub fn on_event(&mut self) {
        self.since_tick = self.since_tick.saturating_add(1);
        self.events += 1;
        if self.events < RATE_WINDOW || self.broken {
            return;
        }
        let now = Instant::now();
        if !self.raised && now.duration_since(self.window_start) < RAISE_WITHIN && self.behind() {
            self.set(true);
        }
        self.events = 0;
        self.window_start = now;
    }

    /// The idle tick: lowers the mark when no event came since the last one.
    pub fn on_tick(&mut self) {
        if self.since_tick == 0 && self.raised {
            self.set(false);
        }
        self.since_tick = 0;
    }

    fn set(&mut self, raised: bool) {
        let value = if raised { HIGH_WATER } else { 1 };
        match self.socket.set_low_water(value) {
            Ok(()) => self.raised = raised,
            Err(e) => {
                // Stay lowered for good: correctness never depends on the mark.
                tracing::debug!(error = %e, "cannot change the replication socket's low-water mark");
                self.raised = false;
                self.broken = true;
            }
        }
    }
}

impl Drop for LowWater {
    fn drop(&mut self) {
        if self.raised {
            let _ = self.socket.set_low_water(1);
        }
    }
}

/// Where our end of the replication connection is, as the server reports it: `None` when
/// the server does not tell (a Unix socket, or no permission to see the row).
pub async fn local_end(client: &tokio_postgres::Client, slot: &str) -> Option<(SocketAddr, u16)> {
    let row = client
        .query_opt(
            "SELECT host(r.client_addr), r.client_port, inet_server_port() \
             FROM pg_stat_replication r JOIN pg_replication_slots s ON s.active_pid = r.pid \
             WHERE s.slot_name = $1",
            &[&slot],
        )
        .await
        .ok()??;
    let addr: Option<String> = row.get(0);
    let port: Option<i32> = row.get(1);
    let server_port: Option<i32> = row.get(2);
    let ip: IpAddr = addr?.parse().ok()?;
    Some((
        SocketAddr::new(ip, u16::try_from(port?).ok()?),
        u16::try_from(server_port?).ok()?,
    ))
}

#[cfg(target_os = "linux")]
struct Socket {
    fd: libc::c_int,
    local: SocketAddr,
    server_port: u16,
}

#[cfg(target_os = "linux")]
impl Socket {
    fn find(local: SocketAddr, server_port: u16) -> Option<Socket> {
        let dir = std::fs::read_dir("/proc/self/fd").ok()?;
        dir.flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<libc::c_int>().ok())
            .map(|fd| Socket {
                fd,
                local,
                server_port,
            })
            .find(|s| s.is_ours())
    }

    /// Whether the descriptor is still the connection from `local` to the server.
    fn is_ours(&self) -> bool {
        let ends = (
            address(self.fd, libc::getsockname),
            address(self.fd, libc::getpeername),
        );
        matches!(ends, (Some(l), Some(p)) if same_end(l, self.local) && p.port() == self.server_port)
    }

    fn set_low_water(&self, value: i32) -> std::io::Result<()> {
        if !self.is_ours() {
            return Err(std::io::Error::other(
                "the replication socket is gone (descriptor closed or reused)",
            ));
        }
        // SAFETY: setsockopt with a pointer to a live c_int and its size.
        let rc = unsafe {
            libc::setsockopt(
                self.fd,
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&value as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

/// Compares two ends, seeing an IPv4-mapped IPv6 address as the IPv4 one.
#[cfg(target_os = "linux")]
fn same_end(a: SocketAddr, b: SocketAddr) -> bool {
    let canon = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    a.port() == b.port() && canon(a.ip()) == canon(b.ip())
}

#[cfg(target_os = "linux")]
type NameFn =
    unsafe extern "C" fn(libc::c_int, *mut libc::sockaddr, *mut libc::socklen_t) -> libc::c_int;

/// One end of a TCP socket (`getsockname` or `getpeername`); `None` for anything else.
#[cfg(target_os = "linux")]
fn address(fd: libc::c_int, name: NameFn) -> Option<SocketAddr> {
    // SAFETY: a zeroed sockaddr_storage is valid; the call writes at most `len` bytes, and
    // the casts below read the family the kernel reported.
    unsafe {
        let mut storage: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        if name(
            fd,
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        ) != 0
        {
            return None;
        }
        match storage.ss_family as libc::c_int {
            libc::AF_INET => {
                let a = &*(&storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>();
                let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
                Some(SocketAddr::new(ip.into(), u16::from_be(a.sin_port)))
            }
            libc::AF_INET6 => {
                let a = &*(&storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>();
                let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
                Some(SocketAddr::new(ip.into(), u16::from_be(a.sin6_port)))
            }
            _ => None,
        }
    }
}

/// Elsewhere the mark is not used.
#[cfg(not(target_os = "linux"))]
struct Socket;

#[cfg(not(target_os = "linux"))]
impl Socket {
    fn find(_: SocketAddr, _: u16) -> Option<Socket> {
        None
    }

    fn set_low_water(&self, _: i32) -> std::io::Result<()> {
        Err(std::io::Error::other("unsupported"))
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The mark is found by the connection's ends, raised by a burst, lowered by an idle
    /// tick, and a lowered mark wakes a reader whose data is below the raised one.
    #[test]
    fn raised_by_a_burst_and_lowered_when_idle() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server_port = listener.local_addr().unwrap().port();
        let client = std::net::TcpStream::connect(("127.0.0.1", server_port)).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let local = client.local_addr().unwrap();

        let mut mark = LowWater::find(local, server_port).expect("the socket is found");
        assert!(LowWater::find(local, server_port.wrapping_add(1)).is_none());
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        // Fast, but live: stays down.
        mark.on_transaction(now_ms - 3);
        for _ in 0..RATE_WINDOW {
            mark.on_event();
        }
        assert!(!mark.raised());
        // Fast and behind: up.
        mark.on_transaction(now_ms - 3_000);
        for _ in 0..RATE_WINDOW {
            mark.on_event();
        }
        assert!(mark.raised());
        // A live transaction brings it down, the next backlog up again.
        mark.on_transaction(now_ms);
        assert!(!mark.raised());
        mark.on_transaction(now_ms - 3_000);
        for _ in 0..RATE_WINDOW {
            mark.on_event();
        }
        assert!(mark.raised());

        // Raised: a few bytes do not make the socket readable.
        server.write_all(b"hello").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let mut poll = libc::pollfd {
            fd: mark.socket.fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        assert_eq!(
            unsafe { libc::poll(&mut poll, 1, 0) },
            0,
            "raised mark: not readable"
        );

        mark.on_tick(); // counts the burst's events
        assert!(mark.raised());
        mark.on_tick(); // a tick with no event
        assert!(!mark.raised());
        poll.revents = 0;
        // SAFETY: as above.
        assert_eq!(
            unsafe { libc::poll(&mut poll, 1, 0) },
            1,
            "lowered mark: readable"
        );
        let mut buf = [0u8; 5];
        (&client).read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
    }
}
