//! [`Mosquitto`]: Debian's broker running the project's config.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use crate::net::{free_port, wait_for_port};
use crate::process::{ServerProcess, three_tries, write_file};

/// A Mosquitto broker on `127.0.0.1:<free port>` running `mosquitto/mosquitto.conf` with its
/// listener, data directory and log rewritten into a temporary directory. Dropping it kills the
/// broker and deletes the directory.
pub struct Mosquitto {
    binary: PathBuf,
    port: u16,
    dir: TempDir,
    process: ServerProcess,
}

impl Mosquitto {
    /// Starts the broker and blocks until it accepts connections. The binary is
    /// `DATAVIZ_MOSQUITTO` if set, else `/usr/sbin/mosquitto`.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// Like [`start`](Self::start), but with the project's access control as it is: no
    /// anonymous client, `users` (name, password) in the password file, the project's ACL
    /// (`mosquitto/acl`), client id = username.
    pub fn start_with_users(users: &[(&str, &str)]) -> Self {
        Self::start_with(Some(users))
    }

    fn start_with(users: Option<&[(&str, &str)]>) -> Self {
        let binary = std::env::var_os("DATAVIZ_MOSQUITTO")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/usr/sbin/mosquitto"));
        assert!(
            binary.is_file(),
            "{} not found: run scripts/setup (it installs Debian's mosquitto)",
            binary.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("dataviz-mosquitto-")
            .tempdir()
            .expect("create temp dir");
        std::fs::create_dir(dir.path().join("data")).expect("create data dir");
        let process = ServerProcess::new("mosquitto", dir.path().join("mosquitto.log"));
        let mut broker = Self {
            binary,
            port: 0,
            dir,
            process,
        };
        let auth = users.map(|users| {
            let passwd = broker.dir.path().join("passwd");
            for (i, (user, password)) in users.iter().enumerate() {
                let mut command = Command::new("mosquitto_passwd");
                if i == 0 {
                    command.arg("-c");
                }
                let status = command
                    .arg("-b")
                    .arg(&passwd)
                    .args([user, password])
                    .status()
                    .expect("mosquitto_passwd runs (Debian's mosquitto package)");
                assert!(status.success(), "mosquitto_passwd for {user}: {status}");
            }
            Auth {
                passwd,
                acl: crate::workspace_root().join("mosquitto/acl"),
            }
        });
        three_tries("mosquitto did not start", || {
            broker.port = free_port();
            let config = test_config(
                &project_config(),
                broker.port,
                &broker.data_dir(),
                auth.as_ref(),
            );
            write_file(&broker.config_path(), &config);
            broker.launch()
        });
        broker
    }

    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Where the broker keeps `mosquitto.db`.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The generated config the broker runs with.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("mosquitto.conf")
    }

    /// Everything the broker logged so far, across restarts.
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

    /// SIGKILL and wait: a crash. Mosquitto loses what changed since its last autosave.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// SIGTERM and wait: a clean shutdown, which writes the persistence file.
    pub fn stop(&mut self) {
        self.process.stop();
    }

    /// Stops the broker cleanly if it runs (saving its state), then starts it again on the same
    /// port with the same data directory, and blocks until it accepts connections.
    pub fn restart(&mut self) {
        self.process.stop();
        three_tries("mosquitto did not restart", || {
            self.launch()
                .inspect_err(|_| std::thread::sleep(Duration::from_millis(200)))
        });
    }

    fn launch(&mut self) -> Result<(), String> {
        let mut command = Command::new(&self.binary);
        command.arg("-c").arg(self.config_path());
        let port = self.port;
        self.process
            .spawn(command, || wait_for_port(port, Duration::ZERO))
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.process.kill();
    }
}

fn project_config() -> String {
    let path = crate::workspace_root().join("mosquitto/mosquitto.conf");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read the project's {}: {e}", path.display()))
}

/// Where the access control files are, for a broker run with the project's access control.
struct Auth {
    passwd: PathBuf,
    acl: PathBuf,
}

/// The project's config with the settings that name places on this machine replaced; without
/// `auth`, anonymous clients are let in (what most tests use).
fn test_config(
    project: &str,
    port: u16,
    data_dir: &std::path::Path,
    auth: Option<&Auth>,
) -> String {
    const REPLACED: [&str; 9] = [
        "listener",
        "persistence_location",
        "pid_file",
        "user",
        "log_dest",
        "allow_anonymous",
        "password_file",
        "acl_file",
        "use_username_as_clientid",
    ];
    let mut config: String = project
        .lines()
        .filter(|line| {
            let key = line.split_whitespace().next().unwrap_or("");
            !REPLACED.contains(&key)
        })
        .map(|line| format!("{line}\n"))
        .collect();
    config.push_str(&format!(
        "\n# --- rewritten by dataviz-testkit ---\n\
         listener {port} 127.0.0.1\n\
         persistence_location {}/\n\
         # As root, Mosquitto would switch to the `mosquitto` user, which cannot write our temp\n\
         # dir; as any other user this line has no effect.\n\
         user root\n\
         log_dest stderr\n",
        data_dir.display()
    ));
    match auth {
        None => config.push_str("allow_anonymous true\n"),
        Some(auth) => {
            let kept = |key: &str| {
                project
                    .lines()
                    .find(|l| l.split_whitespace().next() == Some(key))
                    .map(|l| format!("{l}\n"))
                    .unwrap_or_default()
            };
            config.push_str(&kept("allow_anonymous"));
            config.push_str(&kept("use_username_as_clientid"));
            config.push_str(&format!(
                "password_file {}\nacl_file {}\n",
                auth.passwd.display(),
                auth.acl.display()
            ));
        }
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_only_the_machine_specific_lines() {
        let project = "persistence true\npersistence_location /mosquitto/data/\nlistener 1883\n\
                       max_queued_messages 1000000\nlog_dest stderr\n";
        let config = test_config(project, 1234, std::path::Path::new("/tmp/x"), None);
        assert!(config.contains("persistence true\n"));
        assert!(config.contains("max_queued_messages 1000000\n"));
        assert!(config.contains("listener 1234 127.0.0.1\n"));
        assert!(config.contains("persistence_location /tmp/x/\n"));
        assert!(!config.contains("1883"));
        assert!(!config.contains("/mosquitto/data"));
    }

    #[test]
    fn starts_and_restarts_on_the_same_port() {
        let mut broker = Mosquitto::start();
        let port = broker.port();
        assert!(wait_for_port(port, Duration::from_secs(1)));
        assert!(
            broker.log().contains("mosquitto version"),
            "{}",
            broker.log()
        );

        broker.kill();
        assert!(!wait_for_port(port, Duration::from_millis(100)));
        broker.restart();
        assert_eq!(broker.port(), port);
        assert!(wait_for_port(port, Duration::from_secs(1)));

        let dir = broker.data_dir();
        drop(broker);
        assert!(!dir.exists(), "data dir removed on drop");
    }

    /// The project config's persistence, with the rewritten data dir: a retained QoS 1 message
    /// survives a clean restart.
    #[tokio::test]
    async fn persistence_survives_a_restart() {
        use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

        let mut broker = Mosquitto::start();
        let (host, port) = (broker.host(), broker.port());
        let options = |id: &str| MqttOptions::new(id, host, port);

        let (client, mut events) = AsyncClient::new(options("testkit-pub"), 10);
        client
            .publish("testkit/retained", QoS::AtLeastOnce, true, "kept")
            .await
            .unwrap();
        loop {
            if let Event::Incoming(Packet::PubAck(_)) = events.poll().await.unwrap() {
                break;
            }
        }
        drop((client, events));

        broker.restart();
        assert!(broker.data_dir().join("mosquitto.db").is_file());

        let (client, mut events) = AsyncClient::new(options("testkit-sub"), 10);
        client
            .subscribe("testkit/retained", QoS::AtLeastOnce)
            .await
            .unwrap();
        let payload = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Event::Incoming(Packet::Publish(p)) = events.poll().await.unwrap() {
                    return p.payload;
                }
            }
        })
        .await
        .expect("retained message after restart");
        assert_eq!(&payload[..], b"kept");
    }
}
