//! A private PostgreSQL cluster from the installed server binaries, for tests, the demo and
//! benchmarks: `initdb` into a temporary folder, logical replication on, a free loopback
//! port, run as the `postgres` user when we are root. Dropping it stops the server and
//! removes the folder.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result, bail};

/// Password of the `postgres` superuser in a local cluster (it listens on loopback only).
pub const SUPERUSER_PASSWORD: &str = "weir-local";

const SEARCH_PATHS: &[&str] = &[
    "/usr/lib/postgresql/17/bin",
    "/usr/lib/postgresql/16/bin",
    "/usr/lib/postgresql/15/bin",
    "/usr/lib/postgresql/14/bin",
    "/usr/local/pgsql/bin",
];

/// A running private cluster.
pub struct LocalPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    run_as: Option<String>,
}

/// `postgresql.conf` lines for latency measurements: commits are flushed (and so
/// streamed) at once, as on a production server.
pub const SYNCHRONOUS_COMMIT: &str = "synchronous_commit = on\n";

impl LocalPostgres {
    /// Finds the server binaries: `$WEIR_PG_BIN`, then the usual Debian/Ubuntu places.
    pub fn find_binaries() -> Result<PathBuf> {
        if let Ok(dir) = std::env::var("WEIR_PG_BIN") {
            let dir = PathBuf::from(dir);
            if dir.join("initdb").exists() {
                return Ok(dir);
            }
            bail!("WEIR_PG_BIN={} has no initdb", dir.display());
        }
        for p in SEARCH_PATHS {
            if Path::new(p).join("initdb").exists() {
                return Ok(PathBuf::from(p));
            }
        }
        bail!(
            "PostgreSQL server binaries (initdb, pg_ctl) not found in {}. Install them \
             (Debian/Ubuntu: `apt-get install postgresql`) or set WEIR_PG_BIN to their folder",
            SEARCH_PATHS.join(", ")
        )
    }

    /// Creates and starts a cluster.
    pub fn start() -> Result<LocalPostgres> {
        Self::start_with("")
    }

    /// Creates and starts a cluster with extra `postgresql.conf` lines (they win over ours).
    /// Our defaults favour speed (`fsync = off`, `synchronous_commit = off`); latency
    /// measurements add [`SYNCHRONOUS_COMMIT`], since an asynchronous commit reaches the
    /// WAL senders only when the WAL writer flushes it (every 200 ms).
    pub fn start_with(extra_conf: &str) -> Result<LocalPostgres> {
        let bin = Self::find_binaries()?;
        let root = unsafe { libc::geteuid() } == 0;
        let dir = tempfile::Builder::new().prefix("weir-pg-").tempdir()?;
        let run_as = root.then(|| "postgres".to_string());
        if root {
            chown_to_postgres(dir.path())?;
        }
        let port = free_port()?;
        let pg = LocalPostgres {
            dir,
            bin,
            port,
            run_as,
        };
        let data = pg.data_dir();
        let pwfile = pg.dir.path().join("pwfile");
        std::fs::write(&pwfile, SUPERUSER_PASSWORD)?;
        if root {
            chown_to_postgres(&pwfile)?;
        }
        pg.run(
            "initdb",
            &[
                "-D",
                path_str(&data)?,
                "-U",
                "postgres",
                "--pwfile",
                path_str(&pwfile)?,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        )?;
        let conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
             wal_level = logical\nmax_replication_slots = 40\nmax_wal_senders = 40\n\
             max_connections = 200\nfsync = off\nfull_page_writes = off\nsynchronous_commit = off\n\
             wal_sender_timeout = 60s\nshared_buffers = 128MB\n",
            pg.dir.path().display()
        ) + extra_conf
            + "\n";
        let conf_path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path)?;
        text.push_str(&conf);
        std::fs::write(&conf_path, text)?;
        // Replication connections over TCP with a password, as a real deployment has them.
        let hba = data.join("pg_hba.conf");
        let mut text = std::fs::read_to_string(&hba)?;
        text.push_str("\nhost replication all 127.0.0.1/32 scram-sha-256\n");
        std::fs::write(&hba, text)?;
        pg.ctl(&["start", "-w", "-t", "60"])?;
        Ok(pg)
    }

    /// A file holding the superuser's password (for `source.password_file`).
    pub fn password_file(&self) -> PathBuf {
        self.dir.path().join("pwfile")
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's data folder.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The server binaries' folder.
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// URL of `database` as the superuser, without the password.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Connection URL with the password in it (for clients in tests and the demo only).
    pub fn url_with_password(&self, database: &str) -> String {
        format!(
            "postgres://postgres:{SUPERUSER_PASSWORD}@127.0.0.1:{}/{database}",
            self.port
        )
    }

    /// Writes a file into the data folder, owned by the server's user, mode 0600 (for
    /// TLS keys and certificates).
    pub fn install_file(&self, name: &str, contents: &[u8]) -> Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let path = self.data_dir().join(name);
        std::fs::write(&path, contents)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        if self.run_as.is_some() {
            chown_to_postgres(&path)?;
        }
        Ok(path)
    }

    /// Creates a database.
    pub fn create_database(&self, name: &str) -> Result<()> {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""))?;
        Ok(())
    }

    /// Runs SQL with psql over the Unix socket; returns its unaligned output.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String> {
        let out = self.run(
            "psql",
            &[
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                path_str(self.dir.path())?,
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                database,
                "-c",
                sql,
            ],
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
    }

    /// Restarts the server (fast shutdown).
    pub fn restart(&self) -> Result<()> {
        self.ctl(&["restart", "-m", "fast", "-w", "-t", "60"])
    }

    /// Stops the server (immediate shutdown) and leaves it stopped.
    pub fn stop(&self) -> Result<()> {
        self.ctl(&["stop", "-m", "immediate", "-w"])
    }

    /// Starts a stopped server.
    pub fn start_again(&self) -> Result<()> {
        self.ctl(&["start", "-w", "-t", "60"])
    }

    /// A command line for a server binary, run as the right user.
    pub fn command(&self, program: &str) -> Command {
        let exe = self.bin.join(program);
        match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(exe);
                c
            }
            None => Command::new(exe),
        }
    }

    fn ctl(&self, args: &[&str]) -> Result<()> {
        let data = self.data_dir();
        let log = self.dir.path().join("server.log");
        let mut full = vec!["-D", path_str(&data)?, "-l", path_str(&log)?];
        full.extend_from_slice(args);
        self.run("pg_ctl", &full).map(|_| ()).with_context(|| {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(15).collect();
            format!(
                "server log:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<Output> {
        let out = self
            .command(program)
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .with_context(|| format!("running {program}"))?;
        if !out.status.success() {
            bail!(
                "{program} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(out)
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("temporary path is not UTF-8")
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn chown_to_postgres(path: &Path) -> Result<()> {
    let name = std::ffi::CString::new("postgres")?;
    // SAFETY: getpwnam returns a pointer to static storage or null; we read two fields
    // immediately, on one thread of ours, before any other getpw* call.
    let (uid, gid) = unsafe {
        let pw = libc::getpwnam(name.as_ptr());
        if pw.is_null() {
            bail!("running as root, but there is no `postgres` user to run the server as");
        }
        ((*pw).pw_uid, (*pw).pw_gid)
    };
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .with_context(|| format!("giving {} to the postgres user", path.display()))
}
