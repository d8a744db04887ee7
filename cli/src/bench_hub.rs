//! `dataviz bench-hub`: how many server-sent-event subscribers the Mercure hub holds on this
//! machine, what each costs it, and how fast it fans updates out to them.
//!
//! What it starts: a nats-server (the test fixture) and `--hubs` child processes `dataviz hub`
//! on free loopback ports, anonymous subscribers allowed, `MERCURE_MAX_SUBSCRIBERS` above what
//! is asked, the default heartbeat, `MERCURE_TRANSPORT` from `--transport` (hubs share updates
//! through JetStream; with `local` there must be one hub).
//!
//! The subscribers: `--subscribers` raw HTTP/1.1 connections, each a hand-written
//! `GET /.well-known/mercure?topic=…` whose `200` status line is checked, then bytes read into
//! one buffer per process and scanned for `data:` lines (no HTTP client per connection: it would
//! weigh more than what is measured). They live in worker processes, this binary run again with
//! the hidden `--worker-first`, at most [`PER_WORKER`] connections each, since one process holds
//! at most `ulimit -n` sockets (20,000 here, the hard limit). Subscriber `i` asks for topic
//! `https://bench.example/t/{i % 10}` on hub `i % hubs` from source address `127.0.0.{1 + i % K}`
//! (the socket is bound there before it connects), K chosen so that no source address needs
//! more than half the ephemeral port range, at most [`PER_SOURCE_ADDRESS`]: `bind(addr:0)` picks
//! among half the range first (odd ports), and past it scans the whole range on every call (2–3
//! ms a bind, measured here past 14,000 ports on one address). Sockets close with a reset (zero
//! linger), so that no port stays in TIME_WAIT for the next run. They connect at
//! `--connect-rate`; a refusal, a reset, a 503 (the hub's `MERCURE_MAX_SUBSCRIBERS`), no answer
//! within [`ANSWER_TIMEOUT`], a shortage of source ports are counted and reported, never fatal.
//!
//! The updates: `--rate` per second for `--duration`, POSTed to the first hub on one keep-alive
//! client with a publisher JWT, topics round robin over the ten, so that each update goes to a
//! tenth of the subscribers. The client's connections are opened before the subscribers
//! connect: a hub at its descriptor limit accepts no new connection, a publisher's neither. An
//! update's data is its send time (nanoseconds since the epoch); a worker records now − send
//! time for each event it reads (same machine, same clock) in a histogram, sent to the bench at
//! the end with its counts of events per topic. Events expected: each update × the subscribers
//! of its topic held when publishing began; any missing one is reported, with the
//! subscriptions the hubs closed meanwhile.
//!
//! Memory: each hub's VmRSS before the subscribers connect and once they are all held (memory
//! per subscriber = the difference / the subscribers that hub holds), and its VmHWM at the end.
//! CPU: utime + stime from `/proc/<pid>/stat` over the publishing window, in % of one core, for
//! the hubs and for what shares the same cores with them (workers, nats-server, this process),
//! beside the whole machine's from `/proc/stat`: whether the cores were full, and whether
//! something else ran meanwhile. Each hub's warnings and errors are summed up at the end.
//!
//! Figures are printed beside the issue's targets (40,000 subscribers held, p99 publish → event
//! under 250 ms at 100 updates/s each fanned out to a tenth of them, the process under 1 GiB)
//! with their ratio; when fewer subscribers are held than asked, the reasons counted follow.

use crate::bench::proc_status_mib;
use anyhow::Context as _;
use dataviz_mercure::{HUB_PATH, JwtKey, MercurePublisher, Update};
use dataviz_testkit::NatsServer;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::io::IsTerminal as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

#[derive(Debug, clap::Args)]
pub struct BenchHubArgs {
    /// Subscribers to hold (spread evenly over the hubs).
    #[arg(long, default_value_t = 40_000)]
    subscribers: u64,
    /// Hub processes (`dataviz hub`); 0: one per 15,000 subscribers. One process holds at
    /// most `ulimit -n` sockets (~19,900 subscribers here); with more than one, updates reach
    /// the others through JetStream.
    #[arg(long, default_value_t = 0)]
    hubs: usize,
    /// Updates published per second, each to a tenth of the subscribers.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// How long updates are published.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// New subscriber connections per second while ramping up (all workers together).
    #[arg(long, default_value_t = 2_000.0)]
    connect_rate: f64,
    /// How updates travel between the hubs (`MERCURE_TRANSPORT`): `jetstream` or `local` (one
    /// hub only).
    #[arg(long, default_value = "jetstream", value_parser = ["jetstream", "local"])]
    transport: String,
    /// Internal: run as a worker holding subscribers numbered from this one.
    #[arg(long, hide = true, requires_all = ["worker_count", "hub_addr"])]
    worker_first: Option<u64>,
    /// Internal: how many subscribers the worker holds.
    #[arg(long, hide = true)]
    worker_count: Option<u64>,
    /// Internal: the hubs' addresses, in order.
    #[arg(long, hide = true)]
    hub_addr: Vec<SocketAddr>,
    /// Internal: source addresses 127.0.0.1 to 127.0.0.<sources>.
    #[arg(long, hide = true, default_value_t = 1)]
    sources: u64,
}

/// Subscribers get topic `TOPIC_BASE{i % TOPICS}`: an update goes to one subscriber in ten.
const TOPICS: usize = 10;
const TOPIC_BASE: &str = "https://bench.example/t/";
/// [`TOPIC_BASE`] as a query parameter value (percent-encoded).
const TOPIC_BASE_QUERY: &str = "https%3A%2F%2Fbench.example%2Ft%2F";
/// Connections one worker process holds at most, below the per-process descriptor limit.
const PER_WORKER: u64 = 15_000;
/// Ephemeral ports one source address is asked for at most (less when half the range is
/// smaller: see the module doc).
const PER_SOURCE_ADDRESS: u64 = 20_000;
/// From the start of a connection to the hub's status line; past it: "no answer".
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Status reports of a worker, and the bench's progress updates.
const STATUS_EVERY: Duration = Duration::from_millis(250);
/// After the last update, the bench waits until no event arrived for this long…
const DRAIN_QUIET: Duration = Duration::from_secs(2);
/// … or this long at most.
const DRAIN_MAX: Duration = Duration::from_secs(30);
/// Publisher connections opened before the subscribers (the most posts in flight at once
/// without a new connection).
const WARM_CONNECTIONS: usize = 64;
/// Distinct events of a hub's log shown at the end.
const LOG_EVENTS_SHOWN: usize = 5;
/// Descriptors a process needs besides its sockets (runtime, pipes, logs, listeners).
const FD_SPARE: u64 = 100;
/// `/proc/<pid>/stat` counts CPU time in USER_HZ ticks, 100 per second on Linux.
const TICKS_PER_SECOND: f64 = 100.0;

/// The issue's targets, on this 2-core machine.
const TARGET_SUBSCRIBERS: u64 = 40_000;
const TARGET_P99_MS: f64 = 250.0;
const TARGET_RSS_MIB: f64 = 1024.0;
/// The reference hub (dunglas/mercure) documents about this many concurrent subscribers on one
/// 2-vCPU t3.micro.
const REFERENCE_SUBSCRIBERS: u64 = 40_000;

pub async fn run(args: BenchHubArgs) -> anyhow::Result<()> {
    match (args.worker_first, args.worker_count) {
        (Some(first), Some(count)) => {
            worker::run(WorkerPlan {
                first,
                count,
                hubs: args.hub_addr,
                sources: args.sources.max(1),
                connect_rate: args.connect_rate,
            })
            .await
        }
        _ => bench(args).await,
    }
}

// ---------------------------------------------------------------------------------------------
// What a worker tells the bench: one JSON object per line on its stdout.

/// Where a worker's connections stand. Every attempt ends in exactly one of `held` (or `closed`
/// after being held), `refused`, `unavailable`, `no_answer`, `no_port`, `failed`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Status {
    attempted: u64,
    /// Held now (a 200, the stream open).
    held: u64,
    /// Held now, per hub.
    held_by_hub: Vec<u64>,
    /// Connection refused or reset, or closed before the status line.
    refused: u64,
    /// `503`: the hub's MERCURE_MAX_SUBSCRIBERS.
    unavailable: u64,
    /// No status line within [`ANSWER_TIMEOUT`] (left in the hub's accept queue).
    no_answer: u64,
    /// No source port left (`EADDRINUSE`, `EADDRNOTAVAIL`).
    no_port: u64,
    /// Anything else (another status, this process out of descriptors…).
    failed: u64,
    /// Held, then ended by the hub.
    closed: u64,
    /// Events read so far.
    received: u64,
}

impl Status {
    fn settled(&self) -> u64 {
        self.held
            + self.closed
            + self.refused
            + self.unavailable
            + self.no_answer
            + self.no_port
            + self.failed
    }

    fn add(&mut self, other: &Status) {
        self.attempted += other.attempted;
        self.held += other.held;
        if self.held_by_hub.len() < other.held_by_hub.len() {
            self.held_by_hub.resize(other.held_by_hub.len(), 0);
        }
        for (sum, n) in self.held_by_hub.iter_mut().zip(&other.held_by_hub) {
            *sum += n;
        }
        self.refused += other.refused;
        self.unavailable += other.unavailable;
        self.no_answer += other.no_answer;
        self.no_port += other.no_port;
        self.failed += other.failed;
        self.closed += other.closed;
        self.received += other.received;
    }
}

/// A worker's last word, after the bench said `stop`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct FinalReport {
    status: Status,
    /// Subscribers held per topic when the bench said `publish`.
    held_at_publish: Vec<u64>,
    /// Events read per topic.
    received_by_topic: Vec<u64>,
    /// Subscriptions the hubs ended after `publish`.
    closed_while_publishing: u64,
    /// Publish → event, microseconds: (value, count) pairs of the worker's histogram.
    latency_us: Vec<(u64, u64)>,
    /// The first few distinct failures, as text.
    errors: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Report {
    Status(Status),
    Final(FinalReport),
}

/// What the bench tells a worker, one word a line on its stdin.
const PUBLISH: &str = "publish";
const STOP: &str = "stop";

/// A histogram of microseconds up to an hour, three significant digits.
fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

// ---------------------------------------------------------------------------------------------
// The plan: who connects where, from where.

/// How the subscribers are spread, decided once from the arguments and the machine.
#[derive(Debug, Clone, PartialEq)]
struct Plan {
    /// `[first, first + count)` per worker process.
    workers: Vec<(u64, u64)>,
    /// Source addresses 127.0.0.1 to 127.0.0.`sources`.
    sources: u64,
    /// Subscribers sent to each hub.
    per_hub: Vec<u64>,
}

impl Plan {
    /// `per_address`: connections one source address may take ([`ports_per_address`]).
    fn new(subscribers: u64, hubs: usize, per_address: u64) -> Plan {
        let workers = subscribers.div_ceil(PER_WORKER).max(1);
        let ranges = (0..workers)
            .map(|w| {
                let first = w * subscribers / workers;
                (first, (w + 1) * subscribers / workers - first)
            })
            .collect();
        let hubs_u64 = hubs as u64;
        Plan {
            workers: ranges,
            sources: subscribers.div_ceil(per_address.max(1)).max(1),
            per_hub: (0..hubs_u64)
                .map(|h| subscribers / hubs_u64 + u64::from(h < subscribers % hubs_u64))
                .collect(),
        }
    }
}

/// Connections one source address may take: half the ephemeral range `(low, high)` less a
/// margin (other sockets), at most [`PER_SOURCE_ADDRESS`].
fn ports_per_address(range: Option<(u64, u64)>) -> u64 {
    range.map_or(PER_SOURCE_ADDRESS, |(low, high)| {
        let ports = high.saturating_sub(low) + 1;
        (ports / 2)
            .saturating_sub(1_000)
            .clamp(1_000, PER_SOURCE_ADDRESS)
    })
}

/// Subscriber `i`'s source address.
fn source_address(i: u64, sources: u64) -> Ipv4Addr {
    let k = 1 + i % sources.clamp(1, 254);
    Ipv4Addr::new(127, 0, 0, k as u8)
}

// ---------------------------------------------------------------------------------------------
// The bench.

/// A child process killed with the bench, whatever way the bench ends.
struct HubProcess {
    child: std::process::Child,
    addr: SocketAddr,
    log: std::path::PathBuf,
}

impl HubProcess {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it logged (warnings and errors: it runs with RUST_LOG=warn), each distinct event
    /// once with its count, in order of first appearance.
    fn log_summary(&self) -> Vec<(usize, String)> {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut seen: Vec<(usize, String)> = Vec::new();
        for line in log.lines() {
            // JSON lines (APP_ENV=prod): level, message and the fields, without the time.
            let text = match serde_json::from_str::<serde_json::Value>(line) {
                Ok(serde_json::Value::Object(mut event)) => {
                    event.remove("timestamp");
                    let level = event.remove("level").unwrap_or_default();
                    let message = event.remove("message").unwrap_or_default();
                    format!(
                        "{} {} {}",
                        level.as_str().unwrap_or_default(),
                        message.as_str().unwrap_or_default(),
                        serde_json::Value::Object(event)
                    )
                }
                _ => line.to_owned(),
            };
            match seen.iter_mut().find(|(_, t)| *t == text) {
                Some((count, _)) => *count += 1,
                None => seen.push((1, text)),
            }
        }
        seen
    }

    /// The last lines of its log.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// utime + stime of a process, in seconds.
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces: count fields after it (field 3 on).
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS_PER_SECOND)
}

/// CPU seconds the whole machine spent busy (every core, all but idle and iowait), and of
/// those, in interrupts (softirq: on loopback, the receiving half of every TCP write). A tick in
/// softirq is also charged to the task it interrupted, or to ksoftirqd.
fn machine_cpu_seconds() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<f64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .filter_map(|t| t.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user already).
    let [user, nice, system, _idle, _iowait, irq, softirq, steal] = ticks.get(..8)? else {
        return None;
    };
    Some((
        (user + nice + system + irq + softirq + steal) / TICKS_PER_SECOND,
        (irq + softirq) / TICKS_PER_SECOND,
    ))
}

/// The soft limit on open files of this process (the children inherit it).
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

/// The ephemeral port range, `(low, high)`.
fn ephemeral_ports() -> Option<(u64, u64)> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut parts = range.split_whitespace().map(str::parse);
    Some((parts.next()?.ok()?, parts.next()?.ok()?))
}

/// `12345` → `12,345`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A bar on a terminal, a line every 5 s otherwise.
struct Progress {
    bar: Option<ProgressBar>,
    what: &'static str,
    len: u64,
    last_line: Instant,
}

impl Progress {
    fn new(what: &'static str, len: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(len);
            bar.set_style(
                ProgressStyle::with_template("{prefix} [{bar:40}] {pos}/{len} {msg}")
                    .expect("static template")
                    .progress_chars("=> "),
            );
            bar.set_prefix(what);
            bar
        });
        Progress {
            bar,
            what,
            len,
            last_line: Instant::now(),
        }
    }

    fn set(&mut self, pos: u64, message: impl FnOnce() -> String) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(pos);
                bar.set_message(message());
            }
            None if self.last_line.elapsed() >= Duration::from_secs(5) => {
                self.last_line = Instant::now();
                eprintln!("{}: {pos}/{} {}", self.what, self.len, message());
            }
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// The worker processes, their stdin, and the last report of each.
struct Workers {
    children: Vec<Child>,
    stdins: Vec<ChildStdin>,
    reports: mpsc::UnboundedReceiver<(usize, anyhow::Result<Report>)>,
    status: Vec<Status>,
    finals: Vec<Option<FinalReport>>,
}

impl Workers {
    fn start(plan: &Plan, hubs: &[SocketAddr], args: &BenchHubArgs) -> anyhow::Result<Workers> {
        let exe = std::env::current_exe().context("the path of this binary")?;
        let (tx, reports) = mpsc::unbounded_channel();
        let mut children = Vec::new();
        let mut stdins = Vec::new();
        let rate = args.connect_rate / plan.workers.len() as f64;
        for (index, &(first, count)) in plan.workers.iter().enumerate() {
            let mut command = Command::new(&exe);
            command
                .arg("bench-hub")
                .arg(format!("--worker-first={first}"))
                .arg(format!("--worker-count={count}"))
                .arg(format!("--sources={}", plan.sources))
                .arg(format!("--connect-rate={rate}"))
                .env("APP_ENV", "prod")
                .env("RUST_LOG", "warn")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true);
            for hub in hubs {
                command.arg(format!("--hub-addr={hub}"));
            }
            let mut child = command.spawn().context("starting a worker")?;
            stdins.push(child.stdin.take().context("worker stdin")?);
            let stdout = child.stdout.take().context("worker stdout")?;
            let tx = tx.clone();
            // Read at once, always, so that a worker never blocks on a full pipe.
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                loop {
                    let report = match lines.next_line().await {
                        Ok(Some(line)) => serde_json::from_str(&line)
                            .with_context(|| format!("worker {index}: unreadable report {line:?}")),
                        Ok(None) => Err(anyhow::anyhow!("worker {index} exited")),
                        Err(e) => Err(anyhow::Error::new(e).context(format!("worker {index}"))),
                    };
                    let end = report.is_err();
                    if tx.send((index, report)).is_err() || end {
                        return;
                    }
                }
            });
            children.push(child);
        }
        let n = children.len();
        Ok(Workers {
            children,
            stdins,
            reports,
            status: vec![Status::default(); n],
            finals: vec![None; n],
        })
    }

    /// The next report, stored; an error when a worker died before its final report, or said
    /// nonsense.
    async fn next(&mut self) -> anyhow::Result<()> {
        let (index, report) = self.reports.recv().await.context("every worker is gone")?;
        if report.is_err() && self.finals[index].is_some() {
            // Its end, after its last word.
            return Ok(());
        }
        match report? {
            Report::Status(status) => self.status[index] = status,
            Report::Final(last) => {
                self.status[index] = last.status.clone();
                self.finals[index] = Some(last);
            }
        }
        Ok(())
    }

    /// Reports until `deadline` (none arriving is not an error).
    async fn until(&mut self, deadline: tokio::time::Instant) -> anyhow::Result<()> {
        while let Ok(next) = tokio::time::timeout_at(deadline, self.next()).await {
            next?;
        }
        Ok(())
    }

    fn total(&self) -> Status {
        let mut total = Status::default();
        for status in &self.status {
            total.add(status);
        }
        total
    }

    async fn tell(&mut self, word: &str) -> anyhow::Result<()> {
        for stdin in &mut self.stdins {
            stdin.write_all(format!("{word}\n").as_bytes()).await?;
            stdin.flush().await?;
        }
        Ok(())
    }

    fn pids(&self) -> Vec<u32> {
        self.children.iter().filter_map(Child::id).collect()
    }
}

/// CPU seconds of each process of interest, at one instant.
struct CpuSample {
    at: Instant,
    hubs: Vec<Option<f64>>,
    workers: Vec<Option<f64>>,
    nats: Option<f64>,
    this: Option<f64>,
    /// Busy, and in interrupts (see [`machine_cpu_seconds`]).
    machine: Option<(f64, f64)>,
}

impl CpuSample {
    fn take(hubs: &[HubProcess], workers: &[u32], nats: Option<u32>) -> CpuSample {
        CpuSample {
            at: Instant::now(),
            hubs: hubs.iter().map(|h| cpu_seconds(h.pid())).collect(),
            workers: workers.iter().map(|&pid| cpu_seconds(pid)).collect(),
            nats: nats.and_then(cpu_seconds),
            this: cpu_seconds(std::process::id()),
            machine: machine_cpu_seconds(),
        }
    }
}

/// % of one core between two samples.
fn cpu_percent(before: Option<f64>, after: Option<f64>, window: Duration) -> Option<f64> {
    Some((after? - before?) / window.as_secs_f64().max(1e-9) * 100.0)
}

/// What the publisher did.
struct Published {
    /// Updates the hub accepted, per topic.
    ok_by_topic: Vec<u64>,
    failed: u64,
    first_error: Option<String>,
    /// From the first update sent to the last one answered.
    elapsed: Duration,
}

/// Subscribers per hub when `--hubs` is left to the bench: well below the descriptor limit,
/// which a hub reaching it stops accepting any connection at (a publisher's neither).
const SUBSCRIBERS_PER_HUB: u64 = 15_000;

async fn bench(mut args: BenchHubArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.subscribers > 0, "--subscribers must be at least 1");
    if args.hubs == 0 {
        args.hubs = args.subscribers.div_ceil(SUBSCRIBERS_PER_HUB) as usize;
        if args.transport == "local" {
            args.hubs = 1;
        }
    }
    anyhow::ensure!(
        args.rate > 0.0 && args.connect_rate > 0.0 && !args.duration.is_zero(),
        "--rate, --connect-rate and --duration must be above 0"
    );
    anyhow::ensure!(
        args.transport != "local" || args.hubs == 1,
        "--transport local keeps updates in the first hub: use it with --hubs 1"
    );
    let wall = Instant::now();
    let ports = ephemeral_ports();
    let plan = Plan::new(args.subscribers, args.hubs, ports_per_address(ports));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let fd_limit = open_files_limit();
    println!(
        "dataviz bench-hub: {} SSE subscribers on {} hub process(es), {} updates/s for {:?}, \
         each to a tenth of them; {cores} cores shared by the hubs, the bench, its workers and \
         nats-server",
        thousands(args.subscribers),
        args.hubs,
        args.rate,
        args.duration,
    );
    println!(
        "subscribers held by {} worker process(es) (≤ {} each), from source addresses \
         127.0.0.1–127.0.0.{} (≤ {} connections each{}); ulimit -n {}",
        plan.workers.len(),
        thousands(PER_WORKER),
        plan.sources,
        thousands(args.subscribers.div_ceil(plan.sources)),
        ports.map_or(String::new(), |(lo, hi)| format!(
            " of {} ephemeral ports, {lo}–{hi}",
            thousands(hi - lo + 1)
        )),
        fd_limit.map_or("unknown".to_owned(), |n| n.to_string()),
    );
    if let Some(limit) = fd_limit {
        let most = plan.per_hub.iter().copied().max().unwrap_or_default();
        if most + FD_SPARE > limit {
            println!(
                "note: a hub is sent {} subscribers; one process holds at most ~{} sockets \
                 (ulimit -n {limit}): expect at most that many on it",
                thousands(most),
                thousands(limit.saturating_sub(FD_SPARE))
            );
        }
    }

    let nats = NatsServer::start();
    let logs = tempfile::tempdir()?;
    let key = JwtKey::random();
    let key_text = String::from_utf8(key.as_bytes().to_vec()).context("the random key")?;
    let mut hubs = Vec::with_capacity(args.hubs);
    for (index, asked) in plan.per_hub.iter().enumerate() {
        let port = dataviz_testkit::free_port();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let log = logs.path().join(format!("hub-{}.log", index + 1));
        let mut command = std::process::Command::new(std::env::current_exe()?);
        // Whatever MERCURE_* the bench was run with, the hubs run with the bench's settings.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("MERCURE_") {
                command.env_remove(&name);
            }
        }
        command
            .arg("hub")
            .env("MERCURE_ADDR", addr.to_string())
            .env("MERCURE_PUBLISHER_JWT_KEY", &key_text)
            .env("MERCURE_ANONYMOUS", "true")
            .env("MERCURE_MAX_SUBSCRIBERS", (asked + 1_000).to_string())
            .env("MERCURE_TRANSPORT", &args.transport)
            .env("NATS_URL", nats.url())
            .env(
                "HTTP_ADDR",
                format!("127.0.0.1:{}", dataviz_testkit::free_port()),
            )
            .env("APP_ENV", "prod")
            .env("RUST_LOG", "warn")
            .env("LOG_DIR", logs.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        let child = command.spawn().context("starting dataviz hub")?;
        hubs.push(HubProcess { child, addr, log });
    }
    for (index, hub) in hubs.iter_mut().enumerate() {
        let port = hub.addr.port();
        let up = tokio::task::spawn_blocking(move || {
            dataviz_testkit::wait_for_port(port, Duration::from_secs(20))
        })
        .await?;
        if !up || hub.child.try_wait()?.is_some() {
            anyhow::bail!(
                "hub {} did not start on {}:\n{}",
                index + 1,
                hub.addr,
                hub.log_tail()
            );
        }
    }
    // The hubs settle (NATS connection, stream, allocator) before the baseline.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before: Vec<Option<f64>> = hubs
        .iter()
        .map(|h| proc_status_mib(h.pid(), "VmRSS:"))
        .collect();

    // The publisher's connections first: a hub at its descriptor limit accepts none.
    let hub_url = format!("http://{}{HUB_PATH}", hubs[0].addr);
    let publisher = MercurePublisher::new(&hub_url, key.clone())?;
    warm_up(&publisher).await?;

    // Ramp up.
    let addrs: Vec<SocketAddr> = hubs.iter().map(|h| h.addr).collect();
    let mut workers = Workers::start(&plan, &addrs, &args)?;
    let ramp_start = Instant::now();
    let ramp_limit = Duration::from_secs_f64(args.subscribers as f64 / args.connect_rate)
        + ANSWER_TIMEOUT
        + Duration::from_secs(60);
    let mut progress = Progress::new("connecting", args.subscribers);
    loop {
        workers.next().await?;
        let total = workers.total();
        progress.set(total.settled(), || {
            format!(
                "held {}, refused {}, 503 {}, no answer {}, no port {}, failed {}, closed {}",
                total.held,
                total.refused,
                total.unavailable,
                total.no_answer,
                total.no_port,
                total.failed,
                total.closed
            )
        });
        if total.settled() >= args.subscribers {
            break;
        }
        anyhow::ensure!(
            ramp_start.elapsed() < ramp_limit,
            "connections still unsettled after {ramp_limit:?}: {total:?}"
        );
    }
    progress.finish();
    let ramp = ramp_start.elapsed();
    // The hubs' memory once the last subscriber settled in.
    workers
        .until(tokio::time::Instant::now() + Duration::from_secs(1))
        .await?;
    let held = workers.total();
    let rss_held: Vec<Option<f64>> = hubs
        .iter()
        .map(|h| proc_status_mib(h.pid(), "VmRSS:"))
        .collect();
    let worker_pids = workers.pids();
    let workers_rss: f64 = worker_pids
        .iter()
        .filter_map(|&pid| proc_status_mib(pid, "VmRSS:"))
        .sum();
    println!(
        "ramp: {} of {} subscribers held in {:.1} s",
        thousands(held.held),
        thousands(args.subscribers),
        ramp.as_secs_f64()
    );

    // Publish.
    workers.tell(PUBLISH).await?;
    let cpu_start = CpuSample::take(&hubs, &worker_pids, nats.pid());
    let publishing = tokio::spawn(publish(publisher, args.rate, args.duration));
    let mut progress = Progress::new("publishing", args.duration.as_secs());
    let publish_start = Instant::now();
    while !publishing.is_finished() {
        workers
            .until(tokio::time::Instant::now() + STATUS_EVERY)
            .await?;
        let total = workers.total();
        let at = publish_start
            .elapsed()
            .as_secs()
            .min(args.duration.as_secs());
        progress.set(at, || {
            format!(
                "s, {} events received, {} subscribers held",
                thousands(total.received),
                thousands(total.held)
            )
        });
    }
    progress.finish();
    let published = publishing.await??;
    let cpu_end = CpuSample::take(&hubs, &worker_pids, nats.pid());

    // Drain: until no event arrived for a while.
    let mut last = workers.total().received;
    let mut quiet_since = Instant::now();
    let drain_start = Instant::now();
    while quiet_since.elapsed() < DRAIN_QUIET && drain_start.elapsed() < DRAIN_MAX {
        workers
            .until(tokio::time::Instant::now() + STATUS_EVERY)
            .await?;
        let received = workers.total().received;
        if received != last {
            last = received;
            quiet_since = Instant::now();
        }
    }

    // The workers' last word.
    workers.tell(STOP).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while workers.finals.iter().any(Option::is_none) {
        match tokio::time::timeout_at(deadline, workers.next()).await {
            Ok(next) => next?,
            Err(_) => anyhow::bail!("a worker sent no final report within 60 s"),
        }
    }
    let hwm: Vec<Option<f64>> = hubs
        .iter()
        .map(|h| proc_status_mib(h.pid(), "VmHWM:"))
        .collect();
    let mut dead_hubs = Vec::new();
    for (index, hub) in hubs.iter_mut().enumerate() {
        if let Some(status) = hub.child.try_wait()? {
            dead_hubs.push(format!(
                "hub {} exited ({status}) during the run:\n{}",
                index + 1,
                hub.log_tail()
            ));
        }
    }
    let hub_logs: Vec<Vec<(usize, String)>> = hubs.iter().map(HubProcess::log_summary).collect();
    let finals: Vec<FinalReport> = workers.finals.iter().flatten().cloned().collect();
    workers.stdins.clear();
    for child in &mut workers.children {
        let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    }

    print_figures(&Figures {
        args: &args,
        plan: &plan,
        fd_limit,
        held: &held,
        finals: &finals,
        published: &published,
        rss_before: &rss_before,
        rss_held: &rss_held,
        hwm: &hwm,
        hub_logs: &hub_logs,
        workers_rss,
        cpu_start: &cpu_start,
        cpu_end: &cpu_end,
        ramp,
    });
    for dead in dead_hubs {
        println!("{dead}");
    }
    println!("\nwall time {:.1} s", wall.elapsed().as_secs_f64());
    Ok(())
}

/// Opens [`WARM_CONNECTIONS`] keep-alive connections of `publisher` (concurrent posts to a
/// topic nobody subscribes to), which its pool keeps for the run.
async fn warm_up(publisher: &MercurePublisher) -> anyhow::Result<()> {
    let update = Update::new(vec![format!("{TOPIC_BASE}warm-up")], "");
    let posts = (0..WARM_CONNECTIONS).map(|_| publisher.publish(&update));
    for posted in futures::future::join_all(posts).await {
        posted.context("publishing to hub 1 before the subscribers connect")?;
    }
    Ok(())
}

/// Posts `rate` updates a second for `duration`, each scheduled on its own instant (a slow
/// answer does not delay the next), topics round robin.
async fn publish(
    publisher: MercurePublisher,
    rate: f64,
    duration: Duration,
) -> anyhow::Result<Published> {
    let total = (rate * duration.as_secs_f64()).round().max(1.0) as u64;
    let ok: Arc<Vec<AtomicU64>> = Arc::new((0..TOPICS).map(|_| AtomicU64::new(0)).collect());
    let failed = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let mut sending = tokio::task::JoinSet::new();
    let start = tokio::time::Instant::now();
    for seq in 0..total {
        tokio::time::sleep_until(start + Duration::from_secs_f64(seq as f64 / rate)).await;
        let topic = seq as usize % TOPICS;
        // The data is the send time, taken last.
        let update = Update::new(vec![format!("{TOPIC_BASE}{topic}")], now_ns().to_string());
        let (publisher, ok, failed, first_error) = (
            publisher.clone(),
            ok.clone(),
            failed.clone(),
            first_error.clone(),
        );
        sending.spawn(async move {
            match publisher.publish(&update).await {
                Ok(_) => {
                    ok[topic].fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    first_error
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert_with(|| e.to_string());
                }
            }
        });
        while sending.try_join_next().is_some() {}
    }
    while sending.join_next().await.is_some() {}
    let first_error = first_error.lock().unwrap_or_else(|e| e.into_inner()).take();
    Ok(Published {
        ok_by_topic: ok.iter().map(|n| n.load(Ordering::Relaxed)).collect(),
        failed: failed.load(Ordering::Relaxed),
        first_error,
        elapsed: start.elapsed(),
    })
}

/// Everything measured, for the figures.
struct Figures<'a> {
    args: &'a BenchHubArgs,
    plan: &'a Plan,
    fd_limit: Option<u64>,
    /// Where the connections stood when the hubs' memory was read.
    held: &'a Status,
    finals: &'a [FinalReport],
    published: &'a Published,
    rss_before: &'a [Option<f64>],
    rss_held: &'a [Option<f64>],
    hwm: &'a [Option<f64>],
    /// What each hub logged: distinct events and their counts.
    hub_logs: &'a [Vec<(usize, String)>],
    workers_rss: f64,
    cpu_start: &'a CpuSample,
    cpu_end: &'a CpuSample,
    ramp: Duration,
}

fn print_figures(f: &Figures<'_>) {
    let args = f.args;
    let mut end = Status::default();
    let mut held_at_publish = [0u64; TOPICS];
    let mut received = [0u64; TOPICS];
    let mut closed_while_publishing = 0;
    let mut latency = latency_histogram();
    let mut errors: Vec<&str> = Vec::new();
    for last in f.finals {
        end.add(&last.status);
        for (sum, n) in held_at_publish.iter_mut().zip(&last.held_at_publish) {
            *sum += n;
        }
        for (sum, n) in received.iter_mut().zip(&last.received_by_topic) {
            *sum += n;
        }
        closed_while_publishing += last.closed_while_publishing;
        for &(value, count) in &last.latency_us {
            latency.saturating_record_n(value, count);
        }
        for e in &last.errors {
            if !errors.contains(&e.as_str()) {
                errors.push(e);
            }
        }
    }
    let published: u64 = f.published.ok_by_topic.iter().sum();
    let expected: u64 = (f.published.ok_by_topic.iter())
        .zip(&held_at_publish)
        .map(|(updates, subscribers)| updates * subscribers)
        .sum();
    let received_total: u64 = received.iter().sum();
    let asked_updates = (args.rate * args.duration.as_secs_f64()).round().max(1.0) as u64;
    let window = f.cpu_end.at - f.cpu_start.at;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;

    println!(
        "\n{:<58} {:>16} {:>12} {:>7}",
        "measure", "figure", "target", "ratio"
    );
    let line = |what: &str, figure: String, target: String, ratio: String| {
        println!("{what:<58} {figure:>16} {target:>12} {ratio:>7}")
    };
    let ratio = |a: f64, b: f64| format!("{:.2}", a / b);
    let mib = |m: Option<f64>| m.map_or("n/a".to_owned(), |m| format!("{m:.0} MiB"));

    line(
        &format!("subscribers held, of {} asked", thousands(args.subscribers)),
        thousands(f.held.held),
        thousands(TARGET_SUBSCRIBERS),
        ratio(f.held.held as f64, TARGET_SUBSCRIBERS as f64),
    );
    let ramp_asked = args.subscribers as f64 / args.connect_rate;
    line(
        &format!("  ramp, {} connections/s asked", args.connect_rate),
        format!("{:.1} s", f.ramp.as_secs_f64()),
        format!("{ramp_asked:.1} s"),
        ratio(f.ramp.as_secs_f64(), ramp_asked),
    );
    let held_by_hub = |index: usize| f.held.held_by_hub.get(index).copied().unwrap_or_default();
    for (index, asked) in f.plan.per_hub.iter().enumerate() {
        line(
            &format!(
                "  hub {}: held, of {} sent to it",
                index + 1,
                thousands(*asked)
            ),
            thousands(held_by_hub(index)),
            thousands(*asked),
            ratio(held_by_hub(index) as f64, *asked as f64),
        );
    }
    for index in 0..f.plan.per_hub.len() {
        let hub = index + 1;
        let held = held_by_hub(index);
        line(
            &format!("hub {hub} RSS before subscribers"),
            mib(f.rss_before[index]),
            String::new(),
            String::new(),
        );
        line(
            &format!("hub {hub} RSS with its subscribers held"),
            mib(f.rss_held[index]),
            format!("{TARGET_RSS_MIB:.0} MiB"),
            f.rss_held[index].map_or(String::new(), |m| ratio(m, TARGET_RSS_MIB)),
        );
        line(
            &format!("hub {hub} peak RSS (VmHWM), end of run"),
            mib(f.hwm[index]),
            format!("{TARGET_RSS_MIB:.0} MiB"),
            f.hwm[index].map_or(String::new(), |m| ratio(m, TARGET_RSS_MIB)),
        );
        if let (Some(before), Some(with), true) = (f.rss_before[index], f.rss_held[index], held > 0)
        {
            // What 40,000 subscribers may cost each, for the process to stay under 1 GiB.
            let per = (with - before) / held as f64;
            let budget = (TARGET_RSS_MIB - before) / TARGET_SUBSCRIBERS as f64;
            line(
                &format!("hub {hub} memory per 1,000 subscribers"),
                format!("{:.2} MiB", per * 1000.0),
                format!("{:.2} MiB", budget * 1000.0),
                ratio(per, budget),
            );
            line(
                &format!(
                    "  hub {hub}: {} subscribers at that cost",
                    thousands(TARGET_SUBSCRIBERS)
                ),
                format!("{:.0} MiB", before + per * TARGET_SUBSCRIBERS as f64),
                format!("{TARGET_RSS_MIB:.0} MiB"),
                ratio(before + per * TARGET_SUBSCRIBERS as f64, TARGET_RSS_MIB),
            );
        }
    }
    line(
        &format!(
            "updates published (asked {} at {}/s, to hub 1)",
            thousands(asked_updates),
            args.rate
        ),
        thousands(published),
        thousands(asked_updates),
        ratio(published as f64, asked_updates as f64),
    );
    line(
        "  publishing took (the schedule, plus the last answer)",
        format!("{:.1} s", f.published.elapsed.as_secs_f64()),
        format!("{:.1} s", args.duration.as_secs_f64()),
        ratio(
            f.published.elapsed.as_secs_f64(),
            args.duration.as_secs_f64(),
        ),
    );
    line(
        "events received, of expected (update × its topic's subs)",
        thousands(received_total),
        thousands(expected),
        if expected > 0 {
            ratio(received_total as f64, expected as f64)
        } else {
            String::new()
        },
    );
    line(
        "events missing",
        thousands(expected.saturating_sub(received_total)),
        "0".to_owned(),
        String::new(),
    );
    line(
        "events delivered per second (publishing window)",
        format!(
            "{}/s",
            thousands((received_total as f64 / f.published.elapsed.as_secs_f64().max(1e-9)) as u64)
        ),
        String::new(),
        String::new(),
    );
    let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
    if latency.is_empty() {
        line(
            "publish → event",
            "no event".to_owned(),
            String::new(),
            String::new(),
        );
    } else {
        line(
            "publish → event p50",
            format!("{:.1} ms", ms(0.5)),
            format!("{TARGET_P99_MS:.0} ms"),
            ratio(ms(0.5), TARGET_P99_MS),
        );
        line(
            "publish → event p99",
            format!("{:.1} ms", ms(0.99)),
            format!("{TARGET_P99_MS:.0} ms"),
            ratio(ms(0.99), TARGET_P99_MS),
        );
        line(
            "publish → event max",
            format!("{:.1} ms", latency.max() as f64 / 1000.0),
            String::new(),
            String::new(),
        );
    }
    let all_cores = format!("{:.0} %", cores * 100.0);
    // The bench's own processes, to tell what else ran meanwhile.
    let mut ours = 0.0;
    for (index, (before, after)) in f.cpu_start.hubs.iter().zip(&f.cpu_end.hubs).enumerate() {
        let cpu = cpu_percent(*before, *after, window);
        ours += cpu.unwrap_or_default();
        line(
            &format!("hub {} CPU while publishing (% of one core)", index + 1),
            cpu.map_or("n/a".to_owned(), |c| format!("{c:.0} %")),
            all_cores.clone(),
            cpu.map_or(String::new(), |c| ratio(c, cores * 100.0)),
        );
    }
    let workers_cpu: Option<f64> = (f.cpu_start.workers.iter())
        .zip(&f.cpu_end.workers)
        .map(|(b, a)| cpu_percent(*b, *a, window))
        .sum();
    ours += workers_cpu.unwrap_or_default();
    line(
        &format!(
            "workers' CPU, {} process(es), same cores (% of one core)",
            f.cpu_start.workers.len()
        ),
        workers_cpu.map_or("n/a".to_owned(), |c| format!("{c:.0} %")),
        all_cores.clone(),
        workers_cpu.map_or(String::new(), |c| ratio(c, cores * 100.0)),
    );
    for (what, before, after) in [
        ("nats-server CPU", f.cpu_start.nats, f.cpu_end.nats),
        (
            "this process's CPU (the publisher)",
            f.cpu_start.this,
            f.cpu_end.this,
        ),
    ] {
        let cpu = cpu_percent(before, after, window);
        ours += cpu.unwrap_or_default();
        line(
            &format!("{what} (% of one core)"),
            cpu.map_or("n/a".to_owned(), |c| format!("{c:.0} %")),
            String::new(),
            String::new(),
        );
    }
    // Whether the hubs had the cores to themselves, or the machine was full.
    let machine = |pick: fn((f64, f64)) -> f64| {
        cpu_percent(
            f.cpu_start.machine.map(pick),
            f.cpu_end.machine.map(pick),
            window,
        )
    };
    let (busy, interrupts) = (machine(|m| m.0), machine(|m| m.1));
    line(
        "the machine, everything (% of one core)",
        busy.map_or("n/a".to_owned(), |c| format!("{c:.0} %")),
        all_cores.clone(),
        busy.map_or(String::new(), |c| ratio(c, cores * 100.0)),
    );
    line(
        "  of which softirq (loopback receive; in the figures above)",
        interrupts.map_or("n/a".to_owned(), |c| format!("{c:.0} %")),
        String::new(),
        String::new(),
    );
    // A tick in softirq counts in the task it interrupted too: the rest is what ran besides.
    let others = busy.map(|b| (b - ours).max(0.0));
    line(
        "  of which other processes, kernel threads (ksoftirqd…)",
        others.map_or("n/a".to_owned(), |c| format!("{c:.0} %")),
        "0 %".to_owned(),
        String::new(),
    );
    line(
        "workers' RSS with the subscribers held (all of them)",
        format!("{:.0} MiB", f.workers_rss),
        String::new(),
        String::new(),
    );
    line(
        "held, beside the reference hub's on a 2-vCPU t3.micro",
        thousands(f.held.held),
        thousands(REFERENCE_SUBSCRIBERS),
        ratio(f.held.held as f64, REFERENCE_SUBSCRIBERS as f64),
    );

    // Why fewer than asked, and what went missing.
    let mut why = Vec::new();
    if let Some(others) = others.filter(|&o| o > 25.0) {
        why.push(format!(
            "processes other than the bench's (or the kernel's softirq threads) took {others:.0} % \
             of one core while publishing: if a build or a test ran meanwhile, these figures are \
             not this machine's best"
        ));
    }
    if let Some(limit) = f.fd_limit {
        for (index, asked) in f.plan.per_hub.iter().enumerate() {
            if asked + FD_SPARE > limit {
                why.push(format!(
                    "hub {} was sent {} subscribers, but one process holds at most ~{} sockets \
                     (ulimit -n {limit}, the hard limit here): spread them over more hubs \
                     (--hubs {})",
                    index + 1,
                    thousands(*asked),
                    thousands(limit.saturating_sub(FD_SPARE)),
                    args.subscribers
                        .div_ceil(limit.saturating_sub(FD_SPARE).max(1)),
                ));
            }
        }
    }
    for (index, events) in f.hub_logs.iter().enumerate() {
        if events.is_empty() {
            continue;
        }
        why.push(format!("hub {}'s log (RUST_LOG=warn):", index + 1));
        for (count, text) in events.iter().take(LOG_EVENTS_SHOWN) {
            let text: String = text.chars().take(300).collect();
            why.push(format!("  {count} × {text}"));
        }
        if events
            .iter()
            .any(|(_, t)| t.contains("Too many open files"))
        {
            why.push(
                "  (at its descriptor limit a hub accepts no connection at all: subscribers \
                 wait in its accept queue, a new publisher connection too)"
                    .to_owned(),
            );
        }
    }
    let counted = [
        (
            end.refused,
            "connection refused or reset (or closed before any answer)",
        ),
        (
            end.unavailable,
            "answered 503: the hub's MERCURE_MAX_SUBSCRIBERS reached",
        ),
        (
            end.no_answer,
            "no answer within 10 s: left in the accept queue of a hub at its fd limit or too busy",
        ),
        (
            end.no_port,
            "no source port left on their source address (EADDRINUSE/EADDRNOTAVAIL)",
        ),
        (end.failed, "failed otherwise (below)"),
    ];
    for (n, what) in counted {
        if n > 0 {
            why.push(format!("{} subscribers {what}", thousands(n)));
        }
    }
    if end.closed > 0 {
        why.push(format!(
            "{} subscriptions ended by the hub after being held ({} while publishing)",
            thousands(end.closed),
            thousands(closed_while_publishing)
        ));
    }
    if f.published.failed > 0 {
        why.push(format!(
            "{} updates refused or failed; first: {}",
            thousands(f.published.failed),
            f.published.first_error.as_deref().unwrap_or_default()
        ));
    }
    if received_total < expected && args.hubs > 1 {
        why.push(
            "events missing with several hubs: the updates are posted to hub 1 only; the others \
             get them through the JetStream transport (MERCURE_TRANSPORT=jetstream) or not at all"
                .to_owned(),
        );
    }
    for e in errors.iter().take(5) {
        why.push(format!("  e.g. {e}"));
    }
    if !why.is_empty() {
        println!();
        for w in why {
            println!("{w}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A worker: holds its subscribers, reads their events, reports.

/// A worker's share, from its hidden arguments.
struct WorkerPlan {
    first: u64,
    count: u64,
    hubs: Vec<SocketAddr>,
    sources: u64,
    connect_rate: f64,
}

mod worker {
    use super::*;

    /// Distinct failure texts kept for the report.
    const ERRORS_KEPT: usize = 5;
    /// Bytes of headers a hub may answer before its events; more is a failure.
    const MAX_HEAD: usize = 16 * 1024;
    /// A partial line longer than this is dropped (an event's data line is a number).
    const MAX_CARRY: usize = 4 * 1024;

    thread_local! {
        /// The one read buffer of the worker's thread: every connection reads into it, scans
        /// it and lets it go before its next await, so a held connection costs no buffer.
        static READ_BUFFER: RefCell<Vec<u8>> = RefCell::new(vec![0; 64 * 1024]);
    }

    /// Runs the worker on a current-thread runtime of its own, on a thread of the blocking
    /// pool: its connections share one thread, one read buffer and unsynchronized counters.
    pub(super) async fn run(plan: WorkerPlan) -> anyhow::Result<()> {
        anyhow::ensure!(!plan.hubs.is_empty(), "a worker needs --hub-addr");
        tokio::task::spawn_blocking(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            tokio::task::LocalSet::new().block_on(&runtime, work(plan))
        })
        .await?
    }

    /// The counters of the worker's connections (one thread: plain cells).
    struct State {
        status: Status,
        held_by_topic: [u64; TOPICS],
        received_by_topic: [u64; TOPICS],
        held_at_publish: Option<[u64; TOPICS]>,
        closed_while_publishing: u64,
        latency_us: Histogram<u64>,
        errors: Vec<String>,
    }

    /// How a connection attempt ended, when not held.
    enum Refusal {
        Refused,
        Unavailable,
        NoPort,
        Failed(String),
    }

    impl From<std::io::Error> for Refusal {
        fn from(e: std::io::Error) -> Refusal {
            use std::io::ErrorKind::*;
            match e.kind() {
                ConnectionRefused | ConnectionReset | ConnectionAborted | UnexpectedEof
                | BrokenPipe => Refusal::Refused,
                AddrInUse | AddrNotAvailable => Refusal::NoPort,
                _ => Refusal::Failed(e.to_string()),
            }
        }
    }

    impl State {
        fn refused(&mut self, refusal: Option<Refusal>) {
            match refusal {
                None => self.status.no_answer += 1,
                Some(Refusal::Refused) => self.status.refused += 1,
                Some(Refusal::Unavailable) => self.status.unavailable += 1,
                Some(Refusal::NoPort) => self.status.no_port += 1,
                Some(Refusal::Failed(e)) => {
                    self.status.failed += 1;
                    if self.errors.len() < ERRORS_KEPT && !self.errors.contains(&e) {
                        self.errors.push(e);
                    }
                }
            }
        }

        fn held(&mut self, hub: usize, topic: usize) {
            self.status.held += 1;
            self.status.held_by_hub[hub] += 1;
            self.held_by_topic[topic] += 1;
        }

        fn closed(&mut self, hub: usize, topic: usize) {
            self.status.held -= 1;
            self.status.held_by_hub[hub] -= 1;
            self.held_by_topic[topic] -= 1;
            self.status.closed += 1;
            if self.held_at_publish.is_some() {
                self.closed_while_publishing += 1;
            }
        }

        /// One `data:` value read at `now` (ns since the epoch).
        fn event(&mut self, topic: usize, now: u64, data: &[u8]) {
            self.status.received += 1;
            self.received_by_topic[topic] += 1;
            if let Some(sent) = std::str::from_utf8(data)
                .ok()
                .and_then(|d| d.trim().parse::<u64>().ok())
            {
                let us = now.saturating_sub(sent) / 1000;
                self.latency_us.saturating_record(us.max(1));
            }
        }

        fn final_report(&self) -> FinalReport {
            FinalReport {
                status: self.status.clone(),
                held_at_publish: self.held_at_publish.unwrap_or_default().to_vec(),
                received_by_topic: self.received_by_topic.to_vec(),
                closed_while_publishing: self.closed_while_publishing,
                latency_us: self
                    .latency_us
                    .iter_recorded()
                    .map(|v| (v.value_iterated_to(), v.count_at_value()))
                    .collect(),
                errors: self.errors.clone(),
            }
        }
    }

    fn say(report: &Report) -> anyhow::Result<()> {
        // stdout is line-buffered: one write per report.
        println!("{}", serde_json::to_string(report)?);
        Ok(())
    }

    async fn work(plan: WorkerPlan) -> anyhow::Result<()> {
        let plan = Rc::new(plan);
        let state = Rc::new(RefCell::new(State {
            status: Status {
                held_by_hub: vec![0; plan.hubs.len()],
                ..Status::default()
            },
            held_by_topic: [0; TOPICS],
            received_by_topic: [0; TOPICS],
            held_at_publish: None,
            closed_while_publishing: 0,
            latency_us: latency_histogram(),
            errors: Vec::new(),
        }));

        // The ramp: one connection every 1/rate s, each its own task.
        let ramp = {
            let (plan, state) = (plan.clone(), state.clone());
            tokio::task::spawn_local(async move {
                let start = tokio::time::Instant::now();
                for j in 0..plan.count {
                    tokio::time::sleep_until(
                        start + Duration::from_secs_f64(j as f64 / plan.connect_rate),
                    )
                    .await;
                    state.borrow_mut().status.attempted += 1;
                    tokio::task::spawn_local(subscriber(
                        plan.first + j,
                        plan.clone(),
                        state.clone(),
                    ));
                }
            })
        };

        // The bench's words, read on a thread of their own (blocking reads); the end of stdin
        // is a stop too.
        let (words_tx, mut words) = mpsc::unbounded_channel::<String>();
        std::thread::spawn(move || {
            for line in std::io::stdin().lines() {
                let Ok(line) = line else { return };
                if words_tx.send(line.trim().to_owned()).is_err() {
                    return;
                }
            }
        });

        let mut tick = tokio::time::interval(STATUS_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => say(&Report::Status(state.borrow().status.clone()))?,
                word = words.recv() => match word.as_deref() {
                    Some(PUBLISH) => {
                        let mut state = state.borrow_mut();
                        state.held_at_publish = Some(state.held_by_topic);
                    }
                    Some(STOP) | None => break,
                    Some(other) => anyhow::bail!("unknown word from the bench: {other:?}"),
                },
            }
        }
        ramp.abort();
        say(&Report::Final(state.borrow().final_report()))?;
        Ok(())
    }

    /// Subscriber `i`: connects, then reads events until the hub ends the stream.
    async fn subscriber(i: u64, plan: Rc<WorkerPlan>, state: Rc<RefCell<State>>) {
        let hub = (i % plan.hubs.len() as u64) as usize;
        let topic = (i % TOPICS as u64) as usize;
        let source = source_address(i, plan.sources);
        let opened = tokio::time::timeout(ANSWER_TIMEOUT, open(plan.hubs[hub], source, topic));
        let (stream, rest) = match opened.await {
            Ok(Ok(opened)) => opened,
            Ok(Err(refusal)) => {
                state.borrow_mut().refused(Some(refusal));
                return;
            }
            Err(_) => {
                state.borrow_mut().refused(None);
                return;
            }
        };
        state.borrow_mut().held(hub, topic);
        read_events(stream, &rest, topic, &state).await;
        state.borrow_mut().closed(hub, topic);
    }

    /// Connects from `source`, asks for `topic`, and checks the status line; the stream and
    /// the bytes read past the headers.
    async fn open(
        hub: SocketAddr,
        source: Ipv4Addr,
        topic: usize,
    ) -> Result<(TcpStream, Vec<u8>), Refusal> {
        let socket = TcpSocket::new_v4()?;
        // A reset at close: no TIME_WAIT keeping the port from the next run.
        socket.set_zero_linger()?;
        socket.bind(SocketAddr::from((source, 0)))?;
        let mut stream = socket.connect(hub).await?;
        let request = format!(
            "GET {HUB_PATH}?topic={TOPIC_BASE_QUERY}{topic} HTTP/1.1\r\nHost: {hub}\r\n\
             Accept: text/event-stream\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut head = Vec::with_capacity(1024);
        loop {
            if stream.read_buf(&mut head).await? == 0 {
                return Err(Refusal::Refused);
            }
            let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
                if head.len() > MAX_HEAD {
                    return Err(Refusal::Failed("headers too long".into()));
                }
                continue;
            };
            let status = std::str::from_utf8(&head[..end])
                .ok()
                .and_then(|h| h.split_whitespace().nth(1))
                .and_then(|s| s.parse::<u16>().ok());
            return match status {
                Some(200) => Ok((stream, head[end + 4..].to_vec())),
                Some(503) => Err(Refusal::Unavailable),
                Some(other) => Err(Refusal::Failed(format!("HTTP {other}"))),
                None => Err(Refusal::Failed("no status line".into())),
            };
        }
    }

    /// Reads events until the stream ends; each `data:` line is recorded.
    async fn read_events(stream: TcpStream, first: &[u8], topic: usize, state: &RefCell<State>) {
        let mut carry = Vec::new();
        {
            let now = now_ns();
            let mut state = state.borrow_mut();
            data_lines(&mut carry, first, |d| state.event(topic, now, d));
        }
        loop {
            if stream.readable().await.is_err() {
                return;
            }
            let ended = READ_BUFFER.with_borrow_mut(|buffer| match stream.try_read(buffer) {
                Ok(0) => true,
                Ok(n) => {
                    let now = now_ns();
                    let mut state = state.borrow_mut();
                    data_lines(&mut carry, &buffer[..n], |d| state.event(topic, now, d));
                    false
                }
                Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
            });
            if ended {
                return;
            }
        }
    }

    /// Calls `each` with the value of every complete `data:` line of `input` (the HTTP chunk
    /// framing around events is lines of their own, ignored like any other field); a partial
    /// last line waits in `carry` for the next read.
    pub(super) fn data_lines(carry: &mut Vec<u8>, input: &[u8], mut each: impl FnMut(&[u8])) {
        let mut line_of = |line: &[u8]| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if let Some(value) = line.strip_prefix(b"data:") {
                each(value.strip_prefix(b" ").unwrap_or(value));
            }
        };
        let mut rest = input;
        if !carry.is_empty() {
            match rest.iter().position(|&b| b == b'\n') {
                Some(end) => {
                    carry.extend_from_slice(&rest[..end]);
                    line_of(carry);
                    carry.clear();
                    rest = &rest[end + 1..];
                }
                None => {
                    carry.extend_from_slice(rest);
                    if carry.len() > MAX_CARRY {
                        carry.clear();
                    }
                    return;
                }
            }
        }
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            line_of(&rest[..end]);
            rest = &rest[end + 1..];
        }
        if rest.len() <= MAX_CARRY {
            carry.extend_from_slice(rest);
        }
        if carry.capacity() > MAX_CARRY && carry.is_empty() {
            *carry = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(reads: &[&[u8]]) -> Vec<String> {
        let mut carry = Vec::new();
        let mut out = Vec::new();
        for read in reads {
            worker::data_lines(&mut carry, read, |d| {
                out.push(String::from_utf8_lossy(d).into_owned())
            });
        }
        out
    }

    #[test]
    fn data_lines_survive_chunk_framing_and_split_reads() {
        let stream: &[u8] =
            b"3a\r\nid: urn:uuid:1\ndata: 123\n\n\r\n3a\r\nid: urn:uuid:2\ndata:456\n\n\r\n";
        assert_eq!(values(&[stream]), ["123", "456"]);
        for cut in 0..stream.len() {
            assert_eq!(
                values(&[&stream[..cut], &stream[cut..]]),
                ["123", "456"],
                "cut at {cut}"
            );
        }
        assert!(values(&[b":\n\n", b": heartbeat\n"]).is_empty());
    }

    #[test]
    fn the_plan_spreads_workers_sources_and_hubs() {
        let per_address = ports_per_address(Some((32_768, 60_999)));
        assert_eq!(per_address, 13_116);
        let plan = Plan::new(40_000, 2, per_address);
        assert_eq!(
            plan.workers,
            [(0, 13_333), (13_333, 13_333), (26_666, 13_334)]
        );
        assert_eq!(plan.sources, 4);
        assert_eq!(plan.per_hub, [20_000, 20_000]);
        let plan = Plan::new(2_001, 2, per_address);
        assert_eq!(plan.workers, [(0, 2_001)]);
        assert_eq!(plan.sources, 1);
        assert_eq!(plan.per_hub, [1_001, 1_000]);
        assert_eq!(source_address(3, 2), Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(thousands(40_000), "40,000");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
