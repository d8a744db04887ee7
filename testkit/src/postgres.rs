//! [`PostgresServer`]: a private PostgreSQL server, for tests that crash it.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::net::free_port;
use crate::process::{ServerProcess, TIMEOUT, three_tries};

/// The superuser `initdb` creates, named in [`PostgresServer::url`].
const SUPERUSER: &str = "postgres";

/// How long [`PostgresServer::restart`] keeps trying after a crash: the backends of a killed
/// postmaster hold its shared memory until they notice it is gone, and a new postmaster refuses
/// to start on the same data directory until then.
const RESTART_TIMEOUT: Duration = Duration::from_secs(30);

/// A PostgreSQL server of its own on `127.0.0.1:<free port>`, its data directory (`initdb`) and
/// its unix socket in a temporary directory, trust authentication, and the durability settings
/// that matter for crash recovery at their defaults, stated on the command line so that nothing
/// turns them off: `fsync`, `synchronous_commit` and `full_page_writes` on. Unlike [`TestDb`]
/// on the machine's shared server, this one can be crashed: [`kill`](Self::kill) SIGKILLs the
/// postmaster, [`restart`](Self::restart) recovers from the WAL on the same port and data.
///
/// The binaries (`initdb`, `postgres`, `pg_isready`) come from `DATAVIZ_PG_BINDIR`, else
/// `pg_config --bindir` (Debian's `postgresql-15`: `/usr/lib/postgresql/15/bin`). PostgreSQL
/// refuses to run as root: when the tests do, `initdb` and the server run as the `postgres`
/// system user, which then owns the temporary directory.
///
/// Dropping it shuts the server down (immediate shutdown, the data is thrown away anyway) and
/// deletes the directory. After a [`kill`](Self::kill) with no restart, the killed server's
/// backends exit on their own once they notice their postmaster is gone.
///
/// [`start_with`](Self::start_with) adds settings, files and a `pg_hba.conf` of the test's
/// choosing (e.g. TLS only): see [`PostgresConfig`].
///
/// [`TestDb`]: crate::TestDb
pub struct PostgresServer {
    bindir: PathBuf,
    port: u16,
    config: PostgresConfig,
    /// The `postgres` user's uid and gid when the tests run as root.
    run_as: Option<(u32, u32)>,
    dir: TempDir,
    process: ServerProcess,
}

/// What a test adds to a [`PostgresServer`]: settings, files in the data directory, and the
/// client authentication rules.
///
/// ```no_run
/// # let (cert_pem, key_pem) = (Vec::new(), Vec::new());
/// // TLS only: plain TCP connections are refused.
/// let server = dataviz_testkit::PostgresServer::start_with(
///     dataviz_testkit::PostgresConfig::default()
///         .file("server.crt", cert_pem)
///         .file("server.key", key_pem)
///         .setting("ssl", "on")
///         .setting("ssl_cert_file", "server.crt")
///         .setting("ssl_key_file", "server.key")
///         .hba("hostssl all all 127.0.0.1/32 trust\n"),
/// );
/// ```
#[derive(Debug, Clone, Default)]
pub struct PostgresConfig {
    settings: Vec<(String, String)>,
    files: Vec<(String, Vec<u8>)>,
    hba: Option<String>,
}

impl PostgresConfig {
    /// A `-c name=value` on the server's command line, at every start.
    pub fn setting(mut self, name: &str, value: &str) -> Self {
        self.settings.push((name.to_owned(), value.to_owned()));
        self
    }

    /// A file written into the data directory after `initdb`, owned by the server's user with
    /// mode 0600 (PostgreSQL refuses a private key others can read). Settings name it by its
    /// bare name: PostgreSQL reads relative paths from the data directory.
    pub fn file(mut self, name: &str, contents: impl Into<Vec<u8>>) -> Self {
        self.files.push((name.to_owned(), contents.into()));
        self
    }

    /// The whole `pg_hba.conf`, instead of initdb's (trust for every local connection).
    pub fn hba(mut self, rules: &str) -> Self {
        self.hba = Some(rules.to_owned());
        self
    }
}

impl PostgresServer {
    /// Runs `initdb` and starts the server; blocks until it accepts connections. Panics, naming
    /// the fix, when the PostgreSQL binaries cannot be found or `initdb` fails.
    pub fn start() -> Self {
        Self::start_with(PostgresConfig::default())
    }

    /// [`start`](Self::start), with `config`'s files and `pg_hba.conf` in place before the
    /// first start and its settings at every start (restarts included).
    pub fn start_with(config: PostgresConfig) -> Self {
        let bindir = pg_bindir().to_path_buf();
        let run_as = run_as();
        let dir = tempfile::Builder::new()
            .prefix("dataviz-postgres-")
            .tempdir()
            .expect("create temp dir");
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap_or_else(|e| {
                panic!(
                    "cannot give {} to the postgres user: {e}",
                    dir.path().display()
                )
            });
        }
        let process = ServerProcess::new("postgres", dir.path().join("postgres.log"));
        let server = Self {
            bindir,
            port: 0,
            config,
            run_as,
            dir,
            process,
        };
        server.initdb();
        server.write_config_files();
        server.first_launch()
    }

    fn first_launch(mut self) -> Self {
        // A free port can be taken by someone else before the server binds it: try another.
        three_tries("postgres did not start", || {
            self.port = free_port();
            self.launch()
        });
        self
    }

    /// A superuser URL, `postgres://postgres@127.0.0.1:PORT/postgres`: what
    /// [`TestDb::create_on`](crate::TestDb::create_on) takes.
    pub fn url(&self) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/postgres", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The data directory (survives [`kill`](Self::kill) and [`restart`](Self::restart)).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Everything the server logged so far, across restarts.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// The postmaster's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// SIGKILL of the postmaster, and wait for it: a crash. Its backends live on until they
    /// notice (closing their connections), and `postmaster.pid` stays behind; what was
    /// committed is in the WAL, replayed by [`restart`](Self::restart).
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Fast shutdown (SIGINT: sessions are ended, a checkpoint is written), and wait.
    pub fn stop(&mut self) {
        self.signal_and_wait("-INT");
    }

    /// Stops the server (fast shutdown) if it runs, then starts it again on the same port with
    /// the same data directory, and blocks until it accepts connections, crash recovery done.
    /// After [`kill`](Self::kill) it keeps trying for up to 30 s while the old backends still
    /// hold the shared memory.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + RESTART_TIMEOUT;
        let mut errors = Vec::new();
        loop {
            match self.launch() {
                Ok(()) => return,
                Err(e) => errors.push(e),
            }
            if Instant::now() >= deadline {
                let last = errors.len().saturating_sub(3);
                panic!(
                    "postgres did not restart within {RESTART_TIMEOUT:?} ({} attempts); the last \
                     ones:\n{}",
                    errors.len(),
                    errors[last..].join("\n---\n")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Sends `signal` (a kill(1) option) to the postmaster and waits up to [`TIMEOUT`] for it
    /// to exit, then SIGKILLs it.
    fn signal_and_wait(&mut self, signal: &str) {
        let Some(pid) = self.process.pid() else {
            return;
        };
        if self.process.is_running() {
            // std only sends SIGKILL and the workspace forbids `unsafe` (so no libc::kill).
            let _ = Command::new("kill")
                .args([signal, &pid.to_string()])
                .status();
            let deadline = Instant::now() + TIMEOUT;
            while self.process.is_running() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // Reaps it (and SIGKILLs it if it is still there).
        self.process.kill();
    }

    fn initdb(&self) {
        let mut command = self.command("initdb");
        command.arg("-D").arg(self.data_dir()).args([
            "--username",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
        ]);
        let output = command
            .output()
            .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", command.get_program()));
        assert!(
            output.status.success(),
            "initdb -D {} failed ({}):\n{}{}",
            self.data_dir().display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// The config's files and `pg_hba.conf`, into the data directory, the server's own, 0600.
    fn write_config_files(&self) {
        use std::os::unix::fs::PermissionsExt;
        let hba = self
            .config
            .hba
            .as_ref()
            .map(|h| ("pg_hba.conf", h.as_bytes()));
        let files = self
            .config
            .files
            .iter()
            .map(|(n, c)| (n.as_str(), c.as_slice()));
        for (name, contents) in files.chain(hba) {
            let path = self.data_dir().join(name);
            std::fs::write(&path, contents)
                .and_then(|()| std::fs::set_permissions(&path, PermissionsExt::from_mode(0o600)))
                .and_then(|()| match self.run_as {
                    Some((uid, gid)) => std::os::unix::fs::chown(&path, Some(uid), Some(gid)),
                    None => Ok(()),
                })
                .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        }
    }

    fn launch(&mut self) -> Result<(), String> {
        let mut command = self.command("postgres");
        command
            .arg("-D")
            .arg(self.data_dir())
            .arg("-c")
            .arg("listen_addresses=127.0.0.1")
            .arg("-c")
            .arg(format!("port={}", self.port))
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.dir.path().display()
            ))
            // The defaults, said out loud: the tests that use this server are about crashes.
            .args(["-c", "fsync=on"])
            .args(["-c", "synchronous_commit=on"])
            .args(["-c", "full_page_writes=on"]);
        for (name, value) in &self.config.settings {
            command.arg("-c").arg(format!("{name}={value}"));
        }
        let isready = self.bindir.join("pg_isready");
        let port = self.port.to_string();
        // Ready when it accepts connections: after crash recovery, not when the port opens.
        self.process
            .spawn(command, || accepting_connections(&isready, &port))
    }

    /// `bindir/program`, as the `postgres` user when the tests run as root, in the temporary
    /// directory (the test's own may not be readable by that user), without the `PG*`
    /// variables of the environment (a `PGDATA` or `PGPORT` must not redirect it).
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bindir.join(program));
        command.current_dir(self.dir.path());
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                command.env_remove(key);
            }
        }
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid).gid(gid);
        }
        command
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        // Immediate shutdown (SIGQUIT): the postmaster takes its backends with it, which a
        // SIGKILL would not; no checkpoint, the data is deleted next. Before `dir` is removed
        // (fields drop after this body).
        self.signal_and_wait("-QUIT");
    }
}

/// `pg_isready` says the server on 127.0.0.1:`port` accepts connections.
fn accepting_connections(isready: &Path, port: &str) -> bool {
    Command::new(isready)
        .args(["-q", "-h", "127.0.0.1", "-p", port, "-t", "1"])
        .args(["-U", SUPERUSER, "-d", "postgres"])
        .status()
        .is_ok_and(|s| s.success())
}

/// The `postgres` user's uid and gid if this process runs as root, else `None` (the server runs
/// as whoever runs the tests).
fn run_as() -> Option<(u32, u32)> {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    if effective_uid(&status) != Some(0) {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    Some(passwd_ids(&passwd, "postgres").unwrap_or_else(|| {
        panic!(
            "the tests run as root, which PostgreSQL refuses, and there is no postgres user in \
             /etc/passwd to run it as: install Debian's postgresql package (scripts/setup) or \
             run the tests as another user"
        )
    }))
}

/// The effective uid in the text of `/proc/<pid>/status` (`Uid: real effective saved fs`).
fn effective_uid(status: &str) -> Option<u32> {
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// `user`'s uid and gid in the text of `/etc/passwd`.
fn passwd_ids(passwd: &str, user: &str) -> Option<(u32, u32)> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != user {
            return None;
        }
        let _password = fields.next()?;
        Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
    })
}

/// The directory of the PostgreSQL server binaries, found once per test process.
fn pg_bindir() -> &'static Path {
    static BINDIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BINDIR.get_or_init(find_pg_bindir) {
        Ok(path) => path,
        Err(message) => panic!("{message}"),
    }
}

fn find_pg_bindir() -> Result<PathBuf, String> {
    const FIX: &str = "run scripts/setup (it installs Debian's postgresql-15), or point \
                       DATAVIZ_PG_BINDIR at the directory holding initdb and postgres \
                       (e.g. /usr/lib/postgresql/15/bin)";
    let bindir = match std::env::var_os("DATAVIZ_PG_BINDIR").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => {
            let output = Command::new("pg_config")
                .arg("--bindir")
                .output()
                .map_err(|e| format!("DATAVIZ_PG_BINDIR is not set and pg_config: {e}; {FIX}"))?;
            if !output.status.success() {
                return Err(format!(
                    "DATAVIZ_PG_BINDIR is not set and pg_config --bindir failed ({}): {FIX}",
                    output.status
                ));
            }
            PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
        }
    };
    for program in ["initdb", "postgres", "pg_isready"] {
        if !bindir.join(program).is_file() {
            return Err(format!(
                "no {program} in {} (the PostgreSQL binaries): {FIX}",
                bindir.display()
            ));
        }
    }
    Ok(bindir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestDb;

    #[test]
    fn reads_the_effective_uid_and_passwd_entries() {
        let status = "Name:\tx\nUid:\t1000\t0\t0\t0\nGid:\t5\t5\t5\t5\n";
        assert_eq!(effective_uid(status), Some(0));
        assert_eq!(effective_uid("Name: x\n"), None);
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      postgres:x:101:104:PostgreSQL administrator,,,:/var/lib/postgresql:/bin/bash\n";
        assert_eq!(passwd_ids(passwd, "postgres"), Some((101, 104)));
        assert_eq!(passwd_ids(passwd, "root"), Some((0, 0)));
        assert_eq!(passwd_ids(passwd, "post"), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn starts_with_the_settings_files_and_hba_rules_given() {
        let server = PostgresServer::start_with(
            PostgresConfig::default()
                .setting("work_mem", "7MB")
                .file("note.txt", "written before the start")
                .hba("# one rule\nhost all postgres 127.0.0.1/32 trust\n"),
        );
        let db = TestDb::create_on(server.url()).await;
        let client = db.connect().await;
        let row = client
            .query_one(
                "SELECT current_setting('work_mem'), pg_read_file('note.txt'),
                        (pg_stat_file('note.txt')).size,
                        (SELECT count(*) FROM pg_hba_file_rules)",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "7MB");
        assert_eq!(row.get::<_, String>(1), "written before the start");
        assert_eq!(row.get::<_, i64>(3), 1, "initdb's rules replaced");
        let mode = std::fs::metadata(server.data_dir().join("note.txt"))
            .unwrap()
            .permissions();
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(mode.mode() & 0o777, 0o600);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keeps_committed_rows_across_a_sigkill_and_restarts_on_the_same_port() {
        let mut server = PostgresServer::start();
        let port = server.port();
        assert_eq!(
            server.url(),
            format!("postgres://postgres@127.0.0.1:{port}/postgres")
        );
        let db = TestDb::create_on(server.url()).await;
        let client = db.connect().await;
        client
            .batch_execute(
                "CREATE TABLE t (i int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 1000)",
            )
            .await
            .unwrap();
        let settings: Vec<String> = client
            .query(
                "SELECT name || '=' || setting FROM pg_settings
                 WHERE name IN ('fsync', 'synchronous_commit', 'full_page_writes') ORDER BY name",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(
            settings,
            ["fsync=on", "full_page_writes=on", "synchronous_commit=on"]
        );

        let old_pid = server.pid().expect("running");
        server.kill();
        assert!(!server.is_running());
        // The connection ends: its backend notices that its postmaster is gone.
        let deadline = Instant::now() + Duration::from_secs(10);
        while client.query_one("SELECT 1", &[]).await.is_ok() {
            assert!(Instant::now() < deadline, "backend outlived its postmaster");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server.restart();
        assert_eq!(server.port(), port);
        assert_ne!(server.pid(), Some(old_pid));
        assert!(
            server.log().contains("not properly shut down"),
            "{}",
            server.log()
        );

        let client = db.connect().await;
        let count: i64 = client
            .query_one("SELECT count(*) FROM t", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(count, 1000);

        // restart() of a running server shuts it down cleanly first.
        server.restart();
        assert!(server.is_running());
        drop(client);
        drop(db);

        let dir = server.data_dir();
        drop(server);
        assert!(!dir.exists(), "data dir removed on drop");
    }
}
