//! [`NatsCluster`]: three real nats-servers forming one JetStream cluster on loopback.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::nats::{info_line, nats_binary};
use crate::net::free_port;
use crate::process::{ServerProcess, write_file};

/// Nodes in the cluster: the smallest that keeps a JetStream quorum (2 of 3) when one is lost.
pub const CLUSTER_SIZE: usize = 3;

/// How long the cluster gets to elect its JetStream meta leader, or a restarted node to catch
/// up. Generous: tests run beside compilation on 2 cores.
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(60);

/// Three nats-servers (2.12 or newer, the binary found as for [`crate::NatsServer`]) on
/// `127.0.0.1`, routed to each other as cluster `dataviz-test`, JetStream on, each with its own
/// store in one temporary directory. Clients reach every node through [`urls`](Self::urls).
///
/// Each node can be killed (SIGKILL, a crash), stopped (SIGTERM) and restarted on the same
/// ports with the same store, independently of the others. Dropping the fixture kills every
/// node and deletes the directory.
pub struct NatsCluster {
    binary: PathBuf,
    dir: TempDir,
    nodes: Vec<Node>,
}

struct Node {
    name: String,
    port: u16,
    cluster_port: u16,
    http_port: u16,
    process: ServerProcess,
}

impl NatsCluster {
    /// Starts the three nodes and blocks until each answers its health check, JetStream
    /// included (a meta leader is elected). Panics with the nodes' logs otherwise.
    pub fn start() -> Self {
        let binary = nats_binary().to_path_buf();
        // Ports are taken by others between our probe and the server's bind only rarely; on a
        // failure, start over with fresh ports.
        let mut errors = Vec::new();
        for _ in 0..3 {
            let dir = tempfile::Builder::new()
                .prefix("dataviz-nats-cluster-")
                .tempdir()
                .expect("create temp dir");
            let nodes = (1..=CLUSTER_SIZE)
                .map(|i| Node {
                    name: format!("dataviz-test-{i}"),
                    port: free_port(),
                    cluster_port: free_port(),
                    http_port: free_port(),
                    process: ServerProcess::new(
                        "nats-server",
                        dir.path().join(format!("node{i}.log")),
                    ),
                })
                .collect();
            let mut cluster = Self {
                binary: binary.clone(),
                dir,
                nodes,
            };
            cluster.write_configs();
            let launched: Result<(), String> =
                (0..CLUSTER_SIZE).try_for_each(|i| cluster.launch(i));
            match launched.and_then(|()| cluster.wait_all_healthy()) {
                Ok(()) => return cluster,
                Err(e) => errors.push(e),
            }
        }
        panic!(
            "the NATS cluster did not start:\n{}",
            errors.join("\n---\n")
        );
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Never true: the cluster always has [`CLUSTER_SIZE`] nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Every node's client URL, comma separated: `nats://127.0.0.1:P1,nats://...`, the form of
    /// `NATS_URL` for a cluster.
    pub fn urls(&self) -> String {
        (0..self.len())
            .map(|i| self.url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Node `i`'s client URL (`i` from 0).
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].port)
    }

    pub fn port(&self, i: usize) -> u16 {
        self.nodes[i].port
    }

    /// Node `i`'s monitoring port (`/healthz`, `/varz`, `/jsz`, `/routez`).
    pub fn http_port(&self, i: usize) -> u16 {
        self.nodes[i].http_port
    }

    /// Node `i`'s `server_name`, as JetStream reports it (e.g. a stream's cluster leader).
    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// The index of the node called `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// Node `i`'s JetStream store directory (survives [`kill`](Self::kill) and
    /// [`restart`](Self::restart)).
    pub fn store_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("node{}", i + 1))
    }

    /// Everything node `i` logged so far, across restarts.
    pub fn log(&self, i: usize) -> String {
        self.nodes[i].process.log()
    }

    /// Every node's log, each under a header: for assertion messages.
    pub fn logs(&self) -> String {
        (0..self.len())
            .map(|i| format!("--- {} ---\n{}", self.name(i), self.log(i)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn is_running(&mut self, i: usize) -> bool {
        self.nodes[i].process.is_running()
    }

    /// SIGKILL node `i` and wait: a crash. What it had written to its files survives.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].process.kill();
    }

    /// SIGTERM node `i` and wait: a clean shutdown.
    pub fn stop(&mut self, i: usize) {
        self.nodes[i].process.stop();
    }

    /// Stops node `i` cleanly if it runs, starts it again on the same ports with the same store,
    /// and blocks until it answers its health check (it has caught up with the cluster).
    pub fn restart(&mut self, i: usize) {
        self.nodes[i].process.stop();
        let mut errors = Vec::new();
        for _ in 0..3 {
            match self.launch(i).and_then(|()| self.wait_healthy(i)) {
                Ok(()) => return,
                Err(e) => errors.push(e),
            }
            self.nodes[i].process.kill();
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "{} did not restart:\n{}",
            self.name(i),
            errors.join("\n---\n")
        );
    }

    /// The HTTP status of node `i`'s `/healthz` (200 once it serves clients and JetStream is
    /// current), or `None` when nothing answers.
    pub fn healthz(&self, i: usize) -> Option<u16> {
        http_status(self.nodes[i].http_port, "/healthz")
    }

    /// Blocks until node `i` answers 200 on `/healthz`.
    pub fn wait_healthy(&self, i: usize) -> Result<(), String> {
        let deadline = Instant::now() + HEALTHY_TIMEOUT;
        loop {
            let status = self.healthz(i);
            if status == Some(200) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} not healthy after {HEALTHY_TIMEOUT:?} (/healthz: {status:?}):\n{}",
                    self.name(i),
                    tail(&self.log(i))
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_all_healthy(&self) -> Result<(), String> {
        (0..self.len()).try_for_each(|i| self.wait_healthy(i))
    }

    fn write_configs(&self) {
        let routes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("    nats-route://127.0.0.1:{}", n.cluster_port))
            .collect();
        for (i, node) in self.nodes.iter().enumerate() {
            // As nats/cluster/node*.conf, with this machine's ports and directories. Same
            // payload limit as production, so that tests see production's limits.
            let config = format!(
                "server_name: {name}\n\
                 listen: 127.0.0.1:{port}\n\
                 http: 127.0.0.1:{http}\n\
                 max_payload: 4MB\n\
                 jetstream {{\n  store_dir: \"{store}\"\n}}\n\
                 cluster {{\n  name: dataviz-test\n  listen: 127.0.0.1:{cluster}\n  routes: [\n{routes}\n  ]\n}}\n",
                name = node.name,
                port = node.port,
                http = node.http_port,
                store = self.store_dir(i).display(),
                cluster = node.cluster_port,
                routes = routes.join("\n"),
            );
            write_file(&self.config_path(i), &config);
        }
    }

    fn config_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("node{}.conf", i + 1))
    }

    /// Starts node `i` and waits for its INFO line (JetStream health comes later: the caller
    /// waits for it when the whole cluster is up).
    fn launch(&mut self, i: usize) -> Result<(), String> {
        let mut command = Command::new(&self.binary);
        command.arg("-c").arg(self.config_path(i));
        let port = self.nodes[i].port;
        self.nodes[i]
            .process
            .spawn(command, || info_line(port).is_some())
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        // Kill before `dir` is removed (fields drop after this body).
        for node in &mut self.nodes {
            node.process.kill();
        }
    }
}

/// `GET path` on `127.0.0.1:port` with HTTP/1.0; the status code, or `None` when nothing
/// answers (no HTTP client dependency for one status line).
fn http_status(port: u16, path: &str) -> Option<u16> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .ok()?;
    let mut head = [0u8; 16];
    let mut read = 0;
    while read < head.len() {
        match stream.read(&mut head[read..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => read += n,
        }
    }
    // "HTTP/1.0 200 OK"
    std::str::from_utf8(&head[..read])
        .ok()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_nodes_form_a_cluster_that_survives_the_loss_of_one() {
        let mut cluster = NatsCluster::start();
        assert_eq!(cluster.len(), 3);
        let urls = cluster.urls();
        assert_eq!(urls.split(',').count(), 3, "{urls}");
        for i in 0..3 {
            let info = info_line(cluster.port(i)).expect("INFO line");
            assert!(info.contains("\"jetstream\":true"), "{info}");
            assert!(info.contains(cluster.name(i)), "{info}");
            // Each node advertises the others to clients (how a client finds them all).
            assert!(info.contains("\"connect_urls\""), "{info}");
        }

        // One node down: the other two keep a JetStream quorum.
        cluster.kill(1);
        assert!(!cluster.is_running(1));
        assert_eq!(cluster.healthz(1), None);
        for i in [0, 2] {
            cluster.wait_healthy(i).expect("survivors healthy");
        }
        cluster.restart(1);
        assert_eq!(cluster.healthz(1), Some(200));
        assert!(cluster.store_dir(1).join("jetstream").is_dir());
        assert_eq!(cluster.index_of("dataviz-test-3"), Some(2));

        let dir = cluster.dir.path().to_owned();
        drop(cluster);
        assert!(!dir.exists(), "directory removed on drop");
    }
}
