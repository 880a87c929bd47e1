//! PostgreSQL for the chaos suite: a private instance for the orchestrator
//! (made with `initdb`, crashed with `pg_ctl stop -m immediate`, copied
//! with `pg_basebackup`), databases of their own for the participants on
//! the machine's server, and the restart of that server, which is always
//! left running.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use sqlx::{Connection, PgConnection};

/// Where the PostgreSQL server programs are (`initdb`, `pg_ctl`,
/// `pg_basebackup`).
#[derive(Debug, Clone)]
pub struct PgTools {
    bindir: PathBuf,
}

impl PgTools {
    /// Finds them: `$PG_BINDIR`, then `pg_config --bindir`, then the newest
    /// `/usr/lib/postgresql/*/bin`.
    pub fn find() -> Result<Self> {
        let has_tools = |dir: &Path| {
            ["initdb", "pg_ctl", "pg_basebackup"]
                .iter()
                .all(|tool| dir.join(tool).is_file())
        };
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(dir) = std::env::var_os("PG_BINDIR") {
            candidates.push(dir.into());
        }
        if let Ok(output) = Command::new("pg_config").arg("--bindir").output()
            && output.status.success()
        {
            candidates.push(String::from_utf8_lossy(&output.stdout).trim().into());
        }
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
                Some((version, entry.path().join("bin")))
            })
            .collect();
        versions.sort();
        candidates.extend(versions.into_iter().rev().map(|(_, dir)| dir));
        candidates
            .into_iter()
            .find(|dir| has_tools(dir))
            .map(|bindir| Self { bindir })
            .context(
                "initdb, pg_ctl and pg_basebackup not found (looked at $PG_BINDIR, \
                 pg_config --bindir and /usr/lib/postgresql/*/bin); install the PostgreSQL \
                 server package (e.g. apt-get install postgresql-15) or set PG_BINDIR",
            )
    }

    /// The directory.
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// `tool` run as the database's owner: the `postgres` user when we are
    /// root (initdb refuses root), ourselves otherwise.
    fn command(&self, tool: &str) -> Command {
        let program = self.bindir.join(tool);
        let mut command = if is_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            Command::new(program)
        };
        command.stdin(Stdio::null());
        command
    }
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("Uid:"))
                .and_then(|line| line.split_whitespace().nth(2).map(|uid| uid == "0"))
        })
        .unwrap_or(false)
}

/// Runs `command`; the error carries its stderr.
fn run(mut command: Command, what: &str) -> Result<Output> {
    let output = command
        .output()
        .with_context(|| format!("{what}: cannot run {:?}", command.get_program()))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

/// A directory of our own under the system's temp dir, writable by the
/// database's owner.
pub fn temp_dir(label: &str) -> Result<PathBuf> {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
    let dir = std::env::temp_dir().join(format!(
        "saga-{label}-{}-{}",
        std::process::id(),
        nanos % 1_000_000_000
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    if is_root() {
        let mut chown = Command::new("chown");
        chown.arg("postgres:postgres").arg(&dir);
        run(chown, "handing the temp dir to the postgres user")?;
    }
    Ok(dir)
}

/// A PostgreSQL instance of our own, in a temp dir, on a free port; stopped
/// and removed when dropped (unless kept).
#[derive(Debug)]
pub struct Instance {
    tools: PgTools,
    root: PathBuf,
    data: PathBuf,
    port: u16,
    keep: bool,
    restores: u32,
    running: bool,
}

impl Instance {
    /// `initdb`, configured for replication (so `pg_basebackup` works) with
    /// fsync on, then started.
    pub fn create(tools: &PgTools, keep: bool) -> Result<Self> {
        let root = temp_dir("chaos-pg")?;
        let data = root.join("data");
        let port = crate::process::free_port();
        let mut instance = Self {
            tools: tools.clone(),
            root,
            data,
            port,
            keep,
            restores: 0,
            running: false,
        };
        let mut initdb = instance.tools.command("initdb");
        initdb.arg("-D").arg(&instance.data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
        ]);
        run(initdb, "initdb")?;
        let conf = format!(
            "\n# chaos suite\nport = {port}\nlisten_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\nmax_connections = 200\n\
             wal_level = replica\nmax_wal_senders = 10\nfsync = on\n\
             synchronous_commit = on\nfull_page_writes = on\n\
             shared_buffers = 64MB\nlogging_collector = off\n",
            instance.root.display()
        );
        append(&instance.data.join("postgresql.conf"), &conf)?;
        append(
            &instance.data.join("pg_hba.conf"),
            "\nhost replication all 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 trust\n",
        )?;
        instance.start()?;
        Ok(instance)
    }

    /// Whether it was started and not crashed since.
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its temp dir (data, log, snapshots).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The URL of database `name` on it.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Starts it and waits until it accepts connections.
    pub fn start(&mut self) -> Result<()> {
        let mut start = self.tools.command("pg_ctl");
        start
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(self.root.join("postgres.log"))
            .args(["-w", "-t", "120", "start"])
            .stdout(Stdio::null());
        run(start, "starting the orchestrator's PostgreSQL")
            .with_context(|| format!("its log: {}", self.root.join("postgres.log").display()))?;
        self.running = true;
        Ok(())
    }

    /// A power loss: `pg_ctl stop -m immediate` (no checkpoint, WAL not yet
    /// written is gone).
    pub fn crash(&mut self) -> Result<()> {
        let mut stop = self.tools.command("pg_ctl");
        stop.arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null());
        run(stop, "crashing the orchestrator's PostgreSQL")?;
        self.running = false;
        Ok(())
    }

    /// A base backup into a new directory under its root, as the design's
    /// operators would take one: `pg_basebackup -X stream -c fast`.
    pub fn snapshot(&self, name: &str) -> Result<PathBuf> {
        let dir = self.root.join(name);
        let mut backup = self.tools.command("pg_basebackup");
        backup
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .arg("-D")
            .arg(&dir)
            .args(["-X", "stream", "-c", "fast"]);
        run(backup, "pg_basebackup")?;
        Ok(dir)
    }

    /// Replaces the (stopped) data directory with `snapshot`; the crashed
    /// one is kept beside it.
    pub fn restore(&mut self, snapshot: &Path) -> Result<()> {
        ensure!(!self.running, "restore needs the instance stopped");
        self.restores += 1;
        let aside = self
            .root
            .join(format!("data-before-restore-{}", self.restores));
        std::fs::rename(&self.data, &aside)
            .with_context(|| format!("moving {} aside", self.data.display()))?;
        std::fs::rename(snapshot, &self.data)
            .with_context(|| format!("moving {} into place", snapshot.display()))?;
        Ok(())
    }

    /// Waits until a connection to database `name` succeeds.
    pub async fn wait_ready(&self, name: &str, timeout: Duration) -> Result<()> {
        wait_connectable(&self.url(name), timeout).await
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if self.running {
            let mut stop = self.tools.command("pg_ctl");
            stop.arg("-D")
                .arg(&self.data)
                .args(["-m", "immediate", "-w", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let _ = stop.status();
        }
        if self.keep {
            eprintln!(
                "chaos: kept the orchestrator's PostgreSQL data in {}",
                self.root.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

fn append(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// Polls until a connection to `url` succeeds.
pub async fn wait_connectable(url: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let error = match PgConnection::connect(url).await {
            Ok(connection) => {
                let _ = connection.close().await;
                return Ok(());
            }
            Err(error) => error,
        };
        if Instant::now() > deadline {
            bail!("PostgreSQL at {url} not reachable within {timeout:?}: {error}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Databases of their own on the machine's server (`crate::server_url()`),
/// named `chaos_<unix seconds>_<pid>_<label>`; dropped when this is
/// dropped (unless kept).
#[derive(Debug)]
pub struct MachineDatabases {
    names: Vec<String>,
    keep: bool,
}

/// Databases left by killed runs are dropped once older than this.
const STALE_AFTER: Duration = Duration::from_secs(6 * 3600);

impl MachineDatabases {
    /// Creates one database per label.
    pub async fn create(labels: &[&str], keep: bool) -> Result<Self> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let mut admin = PgConnection::connect(&crate::server_url())
            .await
            .with_context(|| {
                format!(
                    "connecting to the machine's PostgreSQL at {} (set DATABASE_URL)",
                    crate::server_url()
                )
            })?;
        let stale: Vec<String> =
            sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'chaos\\_%'")
                .fetch_all(&mut admin)
                .await
                .unwrap_or_default();
        for name in stale {
            let created = name.split('_').nth(1).and_then(|s| s.parse::<u64>().ok());
            if created.is_some_and(|created| now.saturating_sub(created) > STALE_AFTER.as_secs()) {
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                )))
                .execute(&mut admin)
                .await;
            }
        }
        let mut databases = Self {
            names: Vec::new(),
            keep,
        };
        for label in labels {
            let name = format!("chaos_{now}_{}_{label}", std::process::id());
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
                .execute(&mut admin)
                .await
                .with_context(|| format!("creating database {name}"))?;
            databases.names.push(name);
        }
        let _ = admin.close().await;
        Ok(databases)
    }

    /// The URL of the database made for `label`.
    pub fn url(&self, label: &str) -> Result<String> {
        let name = self
            .names
            .iter()
            .find(|name| name.ends_with(&format!("_{label}")))
            .with_context(|| format!("no database for {label}"))?;
        crate::replace_database(&crate::server_url(), name)
    }
}

impl Drop for MachineDatabases {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("chaos: kept the participants' databases {:?}", self.names);
            return;
        }
        let names = std::mem::take(&mut self.names);
        // Drop runs synchronously, possibly inside a runtime: do the async
        // work on a thread with a runtime of its own. The server may be
        // restarting (a fault, or the guard bringing it back): retry a bit.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                wait_connectable(&crate::server_url(), Duration::from_secs(60)).await?;
                let mut admin = PgConnection::connect(&crate::server_url()).await?;
                for name in names {
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                    )))
                    .execute(&mut admin)
                    .await?;
                }
                let _ = admin.close().await;
                anyhow::Ok(())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("chaos: warning: could not drop the participants' databases: {dropped:?}");
        }
    }
}

/// The machine's PostgreSQL cluster (`pg_ctlcluster VERSION main`), which
/// the suite restarts as a fault. Whatever happens, it is started again
/// when this is dropped, and at most one exists at a time.
#[derive(Debug)]
pub struct MachineServer {
    version: String,
}

static MACHINE_SERVER_TAKEN: AtomicBool = AtomicBool::new(false);

impl MachineServer {
    /// The cluster under `/etc/postgresql` (the only one, or the first).
    pub fn find() -> Result<Self> {
        let mut versions: Vec<String> = std::fs::read_dir("/etc/postgresql")
            .context("no /etc/postgresql: the machine's PostgreSQL cluster is not managed by pg_ctlcluster")?
            .flatten()
            .filter_map(|entry| entry.file_name().to_str().map(str::to_owned))
            .filter(|name| Path::new("/etc/postgresql").join(name).join("main").is_dir())
            .collect();
        versions.sort();
        let version = versions
            .into_iter()
            .next()
            .context("no cluster /etc/postgresql/*/main")?;
        ensure!(
            !MACHINE_SERVER_TAKEN.swap(true, Ordering::SeqCst),
            "the machine's server is already controlled by this process"
        );
        Ok(Self { version })
    }

    fn pg_ctlcluster(&self, action: &str) -> Result<()> {
        let mut command = Command::new("pg_ctlcluster");
        command
            .args(["--skip-systemctl-redirect", &self.version, "main", action])
            .stdin(Stdio::null());
        run(
            command,
            &format!("pg_ctlcluster {} main {action}", self.version),
        )
        .map(|_| ())
    }

    /// Stops the server (pg_ctlcluster's default, fast: sessions are
    /// disconnected).
    pub fn stop(&self) -> Result<()> {
        self.pg_ctlcluster("stop")
    }

    /// Starts it, unless it runs.
    pub fn start(&self) -> Result<()> {
        if self.is_up() {
            return Ok(());
        }
        self.pg_ctlcluster("start")
    }

    /// Whether it accepts connections (`pg_isready`).
    pub fn is_up(&self) -> bool {
        Command::new("pg_isready")
            .args(["-h", "127.0.0.1", "-p", "5432", "-q"])
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }
}

impl Drop for MachineServer {
    fn drop(&mut self) {
        for _ in 0..5 {
            if self.is_up() || self.start().is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        if !self.is_up() {
            eprintln!(
                "chaos: WARNING: the machine's PostgreSQL is not running; start it with: \
                 pg_ctlcluster --skip-systemctl-redirect {} main start",
                self.version
            );
        }
        MACHINE_SERVER_TAKEN.store(false, Ordering::SeqCst);
    }
}
