//! `dataviz bench`: the pipeline's throughput, latency and memory, beside the machine's limits
//! measured in the same run.
//!
//! It starts its own servers (a nats-server running the project's config, which is also the
//! devices' MQTT broker; a Mosquitto and a plain nats-server beside it; all on free ports) and a
//! scratch database on the PostgreSQL of `DATABASE_URL`, then measures, in order:
//!
//! 1. the limits: each broker alone (one QoS 1 publisher to one subscriber: Mosquitto, and
//!    nats-server's MQTT listener from a device's account to the bridge's), JetStream publishing
//!    alone (acks pipelined), PostgreSQL binary COPY alone into a table shaped like
//!    `tag_reading`, all with the same messages and rows the pipeline gets; and beside COPY
//!    alone, the writer's own transactions on those rows; each broker's CPU per message alone,
//!    and COPY's backend's;
//! 2. sustained throughput, once per broker: `dataviz all` (a child process) fed as fast as the
//!    broker takes messages, until every reading is committed; with nats-server (the default)
//!    it is both broker and JetStream, with Mosquitto the plain nats-server holds the streams;
//!    the cores each process used, and its CPU per message beside the budget the target leaves
//!    (the machine's cores at the target's share of the broker alone), and the floor no
//!    pipeline goes under (the broker alone, its clients and COPY alone, per message);
//! 3. latency at a fixed rate, on the default broker: MQTT publish → row committed and →
//!    Mercure event, p50 and p99;
//! 4. peak memory (VmHWM) of each process;
//! 5. peak memory of a second `dataviz all` fed payloads of 250 KiB (just under the processor's
//!    default limit), beside the volume it carried: what bounds memory is bytes, not counts;
//! 6. what RAW's duplicate window costs nats-server: its memory once a stream holds
//!    `--dedup-messages` deduplication ids in its window, beside the same messages without ids.
//!
//! Figures are printed with their ratio to the limit they stand beside: on a shared machine the
//! ratios are what compares from one run to the next.

use anyhow::Context as _;
use bytes::Bytes;
use dataviz_core::streams::Intake;
use dataviz_testkit::{BRIDGE_PASSWORD, DeviceUser, Mosquitto, NatsServer, Publisher, TestDb};
use futures::{StreamExt, stream::FuturesUnordered};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Messages for the throughput runs.
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    /// Simulated devices.
    #[arg(long, default_value_t = 1_000)]
    devices: u64,
    /// Readings (tags) per message.
    #[arg(long, default_value_t = 10)]
    tags: u64,
    /// Messages of the large-payload run (250 KiB each).
    #[arg(long, default_value_t = 1_000)]
    large_messages: u64,
    /// Messages of the duplicate-window run (each with its own deduplication id).
    #[arg(long, default_value_t = 200_000)]
    dedup_messages: u64,
    /// Rate of the latency run, messages per second.
    #[arg(long, default_value_t = 2_000)]
    latency_rate: u64,
    /// Length of the latency run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    latency_for: Duration,
    /// Writes each message of the latency run to this CSV file: when it was published (ms
    /// since the run's start), its latency to its row and to its Mercure event (ms). A tail
    /// is then seen as stalls or as spread.
    #[arg(long, value_name = "FILE")]
    latency_dump: Option<std::path::PathBuf>,
    /// Skip the runs with `dataviz all` pinned to one core, then to two (taskset).
    #[arg(long)]
    no_scaling: bool,
    /// How the pipeline on nats-server takes MQTT messages (MQTT_INTAKE): `nats`, the processor
    /// reading nats-server's MQTT stream (the default), or `bridge`, as on Mosquitto.
    #[arg(long, value_enum, default_value_t = Intake::Nats)]
    mqtt_intake: Intake,
    /// Message ids `ingested_message` holds before the runs, as the writer stores them, of
    /// messages spread over the past month (the writer keeps a month of ids by default): the
    /// index its transactions insert into is then as large as in a system long in service.
    #[arg(long, default_value_t = 0)]
    held_ids: u64,
    /// A PostgreSQL superuser URL: the bench creates (and drops) a database of its own there.
    #[arg(
        long,
        env = "DATABASE_URL",
        value_name = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres",
        hide_env_values = true
    )]
    database_url: String,
}

/// A realistic payload: `tags` readings of the kinds devices send, and a timestamp.
fn payload(seq: u64, tags: u64, ts: chrono::DateTime<chrono::Utc>) -> Vec<u8> {
    let mut d = String::with_capacity(40 * tags as usize + 60);
    for i in 0..tags {
        if !d.is_empty() {
            d.push(',');
        }
        let value = match i % 10 {
            0..=5 => format!("{}.{:02}", 20 + (seq + i) % 60, (seq * 7 + i) % 100),
            6 | 7 => (seq + i).is_multiple_of(2).to_string(),
            8 => seq.to_string(),
            _ => "\"RUN\"".to_owned(),
        };
        d.push_str(&format!(r#"{{"tag":"T.{i}","value":{value}}}"#));
    }
    format!(
        r#"{{"d":[{d}],"ts":"{}"}}"#,
        ts.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
    )
    .into_bytes()
}

fn topic(seq: u64, devices: u64) -> String {
    format!("gateways/1/bench-{:05}", seq % devices)
}

fn rate(count: u64, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// Peak resident memory of a process, in MiB.
fn peak_rss_mib(pid: u32) -> Option<f64> {
    proc_status_mib(pid, "VmHWM:")
}

/// A memory figure of `/proc/<pid>/status` (`VmHWM:`, `VmRSS:`), in MiB.
pub(crate) fn proc_status_mib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// An MQTT broker the pipeline runs on: where devices and the bridge connect, with what
/// credentials, and the JetStream server the roles use beside it.
struct Broker<'a> {
    name: &'static str,
    mqtt_port: u16,
    /// A device's user (every gateway), when the broker refuses anonymous clients.
    device: Option<(&'static str, &'static str)>,
    /// The bridge's user.
    bridge: Option<(&'static str, &'static str)>,
    nats: &'a NatsServer,
    /// The MQTT broker's process when it is not `nats`.
    mqtt_pid: Option<u32>,
    /// How `dataviz all` takes its messages.
    intake: Intake,
}

/// The device user of the bench's nats-server.
const BENCH_DEVICE: DeviceUser = DeviceUser {
    name: "bench-device",
    password: "bench-device-password",
    gateway: None,
};

impl Broker<'_> {
    /// A device connected to this broker as `client_id`.
    fn publisher(&self, client_id: &str) -> Publisher {
        match self.device {
            Some((user, password)) => {
                Publisher::connect_as(self.mqtt_port, client_id, user, password)
            }
            None => Publisher::connect(self.mqtt_port, client_id),
        }
    }

    /// The environment of a `dataviz` process on this broker.
    fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("NATS_URL", self.nats.url()),
            ("MQTT_HOST", "127.0.0.1".to_owned()),
            ("MQTT_PORT", self.mqtt_port.to_string()),
            ("MQTT_INTAKE", self.intake.name().to_owned()),
        ];
        if let Some((user, password)) = self.bridge {
            env.push(("MQTT_USERNAME", user.to_owned()));
            env.push(("MQTT_PASSWORD", password.to_owned()));
        }
        env
    }
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.messages > 0 && args.devices > 0 && args.tags > 0,
        "--messages, --devices and --tags must be at least 1"
    );
    let db = TestDb::create_on(args.database_url.clone()).await;
    let broker_nats = NatsServer::start_broker(&[BENCH_DEVICE]);
    let plain_nats = NatsServer::start();
    let mosquitto = Mosquitto::start();
    let default = Broker {
        name: "nats-server",
        mqtt_port: broker_nats.mqtt_port(),
        device: Some((BENCH_DEVICE.name, BENCH_DEVICE.password)),
        bridge: Some(("dataviz-bridge", BRIDGE_PASSWORD)),
        nats: &broker_nats,
        mqtt_pid: None,
        intake: args.mqtt_intake,
    };
    let other = Broker {
        name: "Mosquitto",
        mqtt_port: mosquitto.port(),
        device: None,
        bridge: None,
        nats: &plain_nats,
        mqtt_pid: mosquitto.pid(),
        intake: Intake::Bridge,
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "dataviz bench: {} messages × {} readings, {} devices; {cores} cores; nats-server, Mosquitto and PostgreSQL on this machine; MQTT_INTAKE={} on nats-server; {} message ids held before\n",
        args.messages,
        args.tags,
        args.devices,
        args.mqtt_intake.name(),
        args.held_ids
    );

    let mut client = db.connect().await;
    dataviz_core::db::migrate(&mut client).await?;
    hold_ids(&client, args.held_ids).await?;

    // 1. The limits, and the writer alone beside COPY alone.
    let nats_limits = broker_alone(&default, &args).await?;
    let mosquitto_limits = broker_alone(&other, &args).await?;
    let (nats_mqtt_alone, mosquitto_alone) = (nats_limits.rate, mosquitto_limits.rate);
    let js_alone = jetstream_alone(&plain_nats, &args).await?;
    let (
        Copied {
            rate: copy_alone,
            us: copy_us,
        },
        writer_alone,
    ) = copy_and_writer_alone(&db, &args).await?;

    // 2. The pipeline, flat out, on each broker: Mosquitto first, then the default, which
    // stays up for the latency and memory runs.
    client
        .execute("INSERT INTO gateway (id, name) VALUES (1, 'bench')", &[])
        .await?;
    let log_dir = tempfile::tempdir()?;
    let (mosquitto_run, mem_mosquitto_all) = {
        let app_addr = format!("127.0.0.1:{}", dataviz_testkit::free_port());
        let all = start_all(&other, &db, &app_addr, log_dir.path(), None)?;
        started().await;
        let run = pipeline(&other, &client, &all, &args).await?;
        (run, peak_rss_mib(all.pid()))
    };
    let app_addr = format!("127.0.0.1:{}", dataviz_testkit::free_port());
    let all = start_all(&default, &db, &app_addr, log_dir.path(), None)?;
    started().await;
    let hub = format!("http://{app_addr}{}", dataviz_mercure::HUB_PATH);
    let nats_run = pipeline(&default, &client, &all, &args).await?;
    let (pipeline_msgs, pipeline_readings) = (nats_run.messages, nats_run.readings);
    let (mosquitto_msgs, mosquitto_readings) = (mosquitto_run.messages, mosquitto_run.readings);

    // The publisher's backlog (updates for the hub) drains before the latency run.
    wait_publisher_drained(&broker_nats).await?;

    // 3. Latency at a fixed rate.
    let latency = latency(&default, &client, &hub, &args).await?;

    // 4. Memory.
    let mem_all = peak_rss_mib(all.pid());
    let mem_nats = broker_nats.pid().and_then(peak_rss_mib);
    let mem_mqtt = mosquitto.pid().and_then(peak_rss_mib);
    drop(all);

    // 4b. How the pipeline grows with cores.
    let scaling = if args.no_scaling || cores < 2 {
        None
    } else {
        Some(scaling(&default, &db, &client, log_dir.path(), &args).await?)
    };

    // 5. Memory under large payloads, in a `dataviz all` of its own.
    let large = large_payloads(&default, &db, &client, log_dir.path(), &args).await?;

    // 6. The duplicate window's memory.
    let id_bytes = dedup_window_bytes(&args).await?;

    println!("\n{:<58} {:>14} {:>10}", "measure", "figure", "ratio");
    let line =
        |what: &str, figure: String, ratio: String| println!("{what:<58} {figure:>14} {ratio:>10}");
    line(
        "nats-server MQTT alone, QoS 1, 1 device → the bridge's user",
        format!("{nats_mqtt_alone:.0} msg/s"),
        "1.00".into(),
    );
    line(
        "Mosquitto alone, QoS 1, 1 publisher → 1 subscriber",
        format!("{mosquitto_alone:.0} msg/s"),
        "1.00".into(),
    );
    for (broker, alone) in [
        ("nats-server", &nats_limits),
        ("Mosquitto", &mosquitto_limits),
    ] {
        line(
            &format!("  CPU per message, {broker} alone: the broker"),
            format!("{:.1} µs", alone.broker_us),
            String::new(),
        );
        line(
            &format!("  CPU per message, {broker} alone: the bench's clients"),
            format!("{:.1} µs", alone.clients_us),
            String::new(),
        );
    }
    line(
        "JetStream publish alone, acks pipelined",
        format!("{js_alone:.0} msg/s"),
        String::new(),
    );
    line(
        "PostgreSQL binary COPY alone",
        format!("{copy_alone:.0} rows/s"),
        "1.00".into(),
    );
    line(
        &format!(
            "  CPU per message, COPY alone: its backend ({} rows)",
            args.tags
        ),
        format!("{copy_us:.1} µs"),
        String::new(),
    );
    line(
        "writer alone: its transactions on the same rows (vs COPY alone)",
        format!("{writer_alone:.0} rows/s"),
        format!("{:.2}", writer_alone / copy_alone),
    );
    for (broker, msgs, readings, alone) in [
        (
            "nats-server",
            pipeline_msgs,
            pipeline_readings,
            nats_mqtt_alone,
        ),
        (
            "Mosquitto",
            mosquitto_msgs,
            mosquitto_readings,
            mosquitto_alone,
        ),
    ] {
        line(
            &format!("pipeline on {broker}: messages (vs {broker} alone)"),
            format!("{msgs:.0} msg/s"),
            format!("{:.2}", msgs / alone),
        );
        line(
            &format!("pipeline on {broker}: readings committed (vs COPY alone)"),
            format!("{readings:.0} rows/s"),
            format!("{:.2}", readings / copy_alone),
        );
    }
    line(
        "pipeline on nats-server vs on Mosquitto, messages",
        String::new(),
        format!("{:.2}", pipeline_msgs / mosquitto_msgs),
    );
    for (broker, run, limits, target) in [
        ("nats-server", &nats_run, &nats_limits, TARGET_OF_NATS),
        (
            "Mosquitto",
            &mosquitto_run,
            &mosquitto_limits,
            TARGET_OF_MOSQUITTO,
        ),
    ] {
        let alone = limits.rate;
        let total: f64 = run.cores.iter().map(|(_, c)| c).sum();
        for (process, used) in &run.cores {
            line(
                &format!("  cores used, pipeline on {broker}: {process}"),
                format!("{used:.2}"),
                format!("{:.2}", used / total.max(1e-9)),
            );
        }
        line(
            &format!("  cores used, pipeline on {broker}: all of these (of {cores})"),
            format!("{total:.2}"),
            String::new(),
        );
        // What each process spends per message. The budget is what the machine's cores allow
        // per message at the target's rate.
        let per_message = |used: f64| us_per_message(used, run.messages);
        for (process, used) in &run.cores {
            line(
                &format!("  CPU per message, pipeline on {broker}: {process}"),
                format!("{:.1} µs", per_message(*used)),
                String::new(),
            );
        }
        let budget = us_per_message(cores as f64, target * alone);
        line(
            &format!("  CPU per message, pipeline on {broker}: all (vs the target's budget)"),
            format!("{:.1} µs", per_message(total)),
            format!("{:.2}", per_message(total) / budget),
        );
        line(
            &format!("  the budget: {cores} cores at {target:.2} of {broker} alone"),
            format!("{budget:.1} µs"),
            String::new(),
        );
        // What no pipeline on this broker and this schema can spend less than: the broker
        // taking each message and delivering it once, the clients publishing and receiving
        // it, PostgreSQL writing its rows. What the budget leaves beyond it is all Dataviz and
        // JetStream may spend.
        let floor = limits.broker_us + limits.clients_us + copy_us;
        line(
            &format!("  the floor: {broker} alone, its clients, COPY alone (vs the budget)"),
            format!("{floor:.1} µs"),
            format!("{:.2}", floor / budget),
        );
        // What the servers and the devices spent in the pipeline itself, all but Dataviz's own
        // process: over the budget, no change to `dataviz all` alone meets the target here.
        let others: f64 = (run.cores.iter())
            .filter(|(process, _)| *process != ALL_PROCESS)
            .map(|(_, used)| used)
            .sum();
        line(
            &format!("  the pipeline on {broker} without dataviz all (vs the budget)"),
            format!("{:.1} µs", per_message(others)),
            format!("{:.2}", per_message(others) / budget),
        );
    }
    line(
        &format!(
            "latency MQTT publish → row committed, p50 at {} msg/s",
            args.latency_rate
        ),
        format!("{:.1} ms", latency.0),
        String::new(),
    );
    line(
        &format!(
            "latency MQTT publish → row committed, p99 at {} msg/s",
            args.latency_rate
        ),
        format!("{:.1} ms", latency.1),
        String::new(),
    );
    line(
        &format!(
            "latency MQTT publish → Mercure event, p50 at {} msg/s",
            args.latency_rate
        ),
        format!("{:.1} ms", latency.2),
        String::new(),
    );
    line(
        &format!(
            "latency MQTT publish → Mercure event, p99 at {} msg/s",
            args.latency_rate
        ),
        format!("{:.1} ms", latency.3),
        String::new(),
    );
    let mib = |m: Option<f64>| m.map_or("n/a".to_owned(), |m| format!("{m:.0} MiB"));
    line(
        "peak memory: dataviz all (nats-server)",
        mib(mem_all),
        String::new(),
    );
    line(
        "peak memory: dataviz all (Mosquitto)",
        mib(mem_mosquitto_all),
        String::new(),
    );
    line(
        "peak memory: nats-server (broker and JetStream)",
        mib(mem_nats),
        String::new(),
    );
    line("peak memory: mosquitto", mib(mem_mqtt), String::new());
    line(
        &format!(
            "peak memory: dataviz all, {} payloads of 250 KiB (vs volume)",
            args.large_messages
        ),
        mib(large.peak_mib),
        large
            .peak_mib
            .map_or(String::new(), |m| format!("{:.2}", m / large.volume_mib)),
    );
    line(
        "large payloads carried MQTT → tag_reading",
        format!(
            "{:.1} MiB/s",
            large.volume_mib / large.elapsed.as_secs_f64()
        ),
        String::new(),
    );
    line(
        "nats-server memory per id in a duplicate window",
        format!("{id_bytes:.0} bytes"),
        String::new(),
    );
    line(
        "  RAW_DUPLICATE_WINDOW 2m at 1,000 msg/s (120,000 ids)",
        format!("{:.1} MiB", id_bytes * 120_000.0 / (1024.0 * 1024.0)),
        String::new(),
    );
    if let Some((one, two)) = scaling {
        line(
            "pipeline on nats-server, dataviz all on 1 core",
            format!("{one:.0} msg/s"),
            "1.00".into(),
        );
        line(
            "pipeline on nats-server, dataviz all on 2 cores (vs 1)",
            format!("{two:.0} msg/s"),
            format!("{:.2}", two / one),
        );
    }

    // The targets, each beside its limit measured in this run.
    println!(
        "\n{:<58} {:>14} {:>10} {:>5}",
        "target", "figure", "limit", "met"
    );
    let target = |what: &str, figure: String, limit: String, met: bool| {
        println!(
            "{what:<58} {figure:>14} {limit:>10} {:>5}",
            if met { "yes" } else { "no" }
        )
    };
    target(
        "pipeline on nats-server, of nats-server alone",
        format!("{:.2}", pipeline_msgs / nats_mqtt_alone),
        format!(">= {TARGET_OF_NATS:.2}"),
        pipeline_msgs / nats_mqtt_alone >= TARGET_OF_NATS,
    );
    target(
        "pipeline on Mosquitto, of Mosquitto alone",
        format!("{:.2}", mosquitto_msgs / mosquitto_alone),
        format!(">= {TARGET_OF_MOSQUITTO:.2}"),
        mosquitto_msgs / mosquitto_alone >= TARGET_OF_MOSQUITTO,
    );
    for (what, p99) in [("row committed", latency.1), ("Mercure event", latency.3)] {
        target(
            &format!("MQTT publish → {what}, p99 at {} msg/s", args.latency_rate),
            format!("{p99:.1} ms"),
            format!("< {TARGET_P99_MS:.0} ms"),
            p99 < TARGET_P99_MS,
        );
    }
    let peak = [mem_all, mem_mosquitto_all]
        .into_iter()
        .flatten()
        .fold(0.0, f64::max);
    target(
        "peak memory of dataviz all, both pipeline runs",
        format!("{:.0} MB", peak * 1.048_576),
        format!("< {TARGET_MEMORY_MB:.0} MB"),
        peak * 1.048_576 < TARGET_MEMORY_MB,
    );
    target(
        "writer alone, of COPY alone",
        format!("{:.2}", writer_alone / copy_alone),
        format!(">= {TARGET_WRITER:.2}"),
        writer_alone / copy_alone >= TARGET_WRITER,
    );
    Ok(())
}

/// The pipeline on the default broker with `dataviz all` pinned to one core, then to two (its
/// roles only: the servers keep every core); messages/s of each.
async fn scaling(
    broker: &Broker<'_>,
    db: &TestDb,
    client: &tokio_postgres::Client,
    log_dir: &std::path::Path,
    args: &BenchArgs,
) -> anyhow::Result<(f64, f64)> {
    let mut rates = [0.0; 2];
    for (cpus, rate) in ["0", "0,1"].into_iter().zip(&mut rates) {
        eprintln!("scaling: dataviz all pinned to CPUs {cpus}…");
        let app_addr = format!("127.0.0.1:{}", dataviz_testkit::free_port());
        let all = start_all(broker, db, &app_addr, log_dir, Some(cpus))?;
        started().await;
        wait_publisher_drained(broker.nats).await?;
        *rate = pipeline(broker, client, &all, args).await?.messages;
    }
    Ok((rates[0], rates[1]))
}

/// The performance targets (BENCHMARKS.md, "Against the targets").
const TARGET_OF_NATS: f64 = 0.45;
const TARGET_OF_MOSQUITTO: f64 = 0.35;
const TARGET_P99_MS: f64 = 50.0;
const TARGET_MEMORY_MB: f64 = 150.0;
const TARGET_WRITER: f64 = 0.85;

/// What one deduplication id held in a stream's duplicate window costs nats-server, in bytes:
/// the growth of its resident memory while a stream with a one-hour window takes
/// `--dedup-messages` messages each with its own `Nats-Msg-Id`, less the growth for the same
/// messages without ids, each on a fresh server.
async fn dedup_window_bytes(args: &BenchArgs) -> anyhow::Result<f64> {
    eprintln!(
        "duplicate window: {} messages with ids, then without…",
        args.dedup_messages
    );
    let mut growth = [0.0; 2];
    for (with_ids, growth) in [true, false].into_iter().zip(&mut growth) {
        let nats = NatsServer::start();
        let pid = nats.pid().context("nats-server's pid")?;
        let js = dataviz_core::config::jetstream(async_nats::connect(nats.url()).await?);
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "DEDUP".into(),
            subjects: vec!["dedup.>".into()],
            storage: async_nats::jetstream::stream::StorageType::File,
            duplicate_window: Duration::from_secs(3600),
            ..Default::default()
        })
        .await?;
        let before = rss_mib(pid).context("nats-server's memory")?;
        let mut in_flight = FuturesUnordered::new();
        for seq in 0..args.dedup_messages {
            let mut headers = async_nats::HeaderMap::new();
            if with_ids {
                // As long as the bridge's: client id, packet id and a 64-bit hash.
                let id = format!("dataviz-bridge:{}:{seq:016x}", seq % 65_535);
                headers.insert(dataviz_core::message::HEADER_MSG_ID, id.as_str());
            }
            let ack = js
                .publish_with_headers(
                    format!("dedup.{}", seq % 100),
                    headers,
                    Bytes::from_static(b"{}"),
                )
                .await?;
            in_flight.push(ack.into_future());
            if in_flight.len() >= 4096 {
                in_flight.next().await.transpose()?;
            }
        }
        while let Some(ack) = in_flight.next().await {
            ack?;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        *growth = rss_mib(pid).context("nats-server's memory")? - before;
    }
    Ok((growth[0] - growth[1]).max(0.0) * 1024.0 * 1024.0 / args.dedup_messages as f64)
}

/// Resident memory of a process now, in MiB.
fn rss_mib(pid: u32) -> Option<f64> {
    proc_status_mib(pid, "VmRSS:")
}

/// A payload of 250 KiB: 100 text readings of 2,540 characters each.
fn large_payload(seq: u64, ts: chrono::DateTime<chrono::Utc>) -> Vec<u8> {
    let d: Vec<String> = (0..100)
        .map(|i| {
            let text: String = format!("{seq:010}{i:03}")
                .chars()
                .cycle()
                .take(2_540)
                .collect();
            format!(r#"{{"tag":"L.{i:02}","value":"{text}"}}"#)
        })
        .collect();
    format!(
        r#"{{"d":[{}],"ts":"{}"}}"#,
        d.join(","),
        ts.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
    )
    .into_bytes()
}

struct Large {
    peak_mib: Option<f64>,
    volume_mib: f64,
    elapsed: Duration,
}

/// A fresh `dataviz all` fed `--large-messages` payloads of 250 KiB as fast as the broker takes
/// them, until every one is stored and the publisher has posted what LIVE holds; its peak
/// resident memory then.
async fn large_payloads(
    broker: &Broker<'_>,
    db: &TestDb,
    client: &tokio_postgres::Client,
    log_dir: &std::path::Path,
    args: &BenchArgs,
) -> anyhow::Result<Large> {
    eprintln!(
        "memory: {} payloads of 250 KiB through a new dataviz all…",
        args.large_messages
    );
    let app_addr = format!("127.0.0.1:{}", dataviz_testkit::free_port());
    let all = start_all(broker, db, &app_addr, log_dir, None)?;
    started().await;
    let before = count(client).await?;
    let written = all.written().await;
    let mut publisher = broker.publisher("bench-large");
    let now = chrono::Utc::now() - chrono::Duration::hours(2);
    let mut bytes = 0;
    let start = Instant::now();
    for seq in 0..args.large_messages {
        let payload = large_payload(seq, now + chrono::Duration::milliseconds(seq as i64));
        bytes += payload.len();
        publisher
            .publish(format!("gateways/1/large-{:02}", seq % 10), payload)
            .await?;
    }
    let stored = Stored {
        before,
        written,
        messages: args.large_messages,
    };
    wait_stored(&mut publisher, client, &all, stored, "memory").await?;
    let elapsed = start.elapsed();
    wait_publisher_drained(broker.nats).await?;
    Ok(Large {
        peak_mib: peak_rss_mib(all.pid()),
        volume_mib: bytes as f64 / (1024.0 * 1024.0),
        elapsed,
    })
}

/// A broker alone: messages/s, and the CPU per message of the broker and of the bench's two
/// clients (publisher and subscriber), in µs.
struct Alone {
    rate: f64,
    broker_us: f64,
    clients_us: f64,
}

/// CPU per message in µs: CPU seconds over messages, or equally cores over messages/s.
fn us_per_message(cpu: f64, messages: f64) -> f64 {
    cpu / messages.max(1e-9) * 1e6
}

/// One QoS 1 publisher to one subscriber through `broker` (the device's user to the bridge's,
/// when it has users), nothing else: what the broker carries alone.
async fn broker_alone(broker: &Broker<'_>, args: &BenchArgs) -> anyhow::Result<Alone> {
    eprintln!("limits: {} alone…", broker.name);
    let broker_pid = broker.mqtt_pid.or_else(|| broker.nats.pid());
    let cpu = || {
        let of = |pid: Option<u32>| pid.and_then(crate::bench_hub::cpu_seconds).unwrap_or(0.0);
        (of(broker_pid), of(Some(std::process::id())))
    };
    let mut options = MqttOptions::new("bench-subscriber", "127.0.0.1", broker.mqtt_port);
    options.set_max_packet_size(1 << 20, 1 << 20);
    if let Some((user, password)) = broker.bridge {
        options.set_credentials(user, password);
    }
    let (sub, mut events) = AsyncClient::new(options, 1000);
    // Under gateways/, which the bridge's user may read; no gateway 0 exists.
    sub.subscribe("gateways/0/#", QoS::AtLeastOnce).await?;
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = events.poll().await? {
            break;
        }
    }
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let receiver = tokio::spawn(async move {
        while let Ok(event) = events.poll().await {
            if let Event::Incoming(Packet::Publish(_)) = event {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let mut publisher = broker.publisher("bench-limits");
    let now = chrono::Utc::now();
    let (broker_before, clients_before) = cpu();
    let start = Instant::now();
    for seq in 0..args.messages {
        publisher
            .publish(
                format!("gateways/0/limits-{}", seq % args.devices),
                payload(seq, args.tags, now),
            )
            .await?;
    }
    while received.load(Ordering::Relaxed) < args.messages {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = start.elapsed();
    let (broker_after, clients_after) = cpu();
    receiver.abort();
    let messages = args.messages as f64;
    Ok(Alone {
        rate: rate(args.messages, elapsed),
        broker_us: us_per_message(broker_after - broker_before, messages),
        clients_us: us_per_message(clients_after - clients_before, messages),
    })
}

async fn jetstream_alone(nats: &NatsServer, args: &BenchArgs) -> anyhow::Result<f64> {
    eprintln!("limits: JetStream alone…");
    let client = async_nats::connect(nats.url()).await?;
    let js = dataviz_core::config::jetstream(client);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "BENCH".into(),
        subjects: vec!["bench.>".into()],
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    let now = chrono::Utc::now();
    let start = Instant::now();
    let mut in_flight = FuturesUnordered::new();
    for seq in 0..args.messages {
        let ack = js
            .publish(
                format!("bench.{}", seq % args.devices),
                Bytes::from(payload(seq, args.tags, now)),
            )
            .await?;
        in_flight.push(ack.into_future());
        if in_flight.len() >= 4096 {
            in_flight.next().await.transpose()?;
        }
    }
    while let Some(ack) = in_flight.next().await {
        ack?;
    }
    let elapsed = start.elapsed();
    js.delete_stream("BENCH").await?;
    Ok(rate(args.messages, elapsed))
}

/// Rounds of [`copy_alone`] and [`writer_alone`], taken in turn: on a shared machine a burst
/// of noise then weighs on one round, not on one side.
const LIMIT_ROUNDS: usize = 3;

/// What binary COPY alone did: rows per second, and its backend's CPU per message (`tags` rows).
struct Copied {
    rate: f64,
    us: f64,
}

/// PostgreSQL binary COPY alone and the writer alone on the same rows, in alternating rounds
/// into emptied reading tables; the median of each (COPY's rate and CPU apart), rows per second.
async fn copy_and_writer_alone(db: &TestDb, args: &BenchArgs) -> anyhow::Result<(Copied, f64)> {
    let mut client = db.connect().await;
    client
        .batch_execute(
            // The same columns and indexes as `tag_reading` (migrated before).
            "CREATE TABLE bench_copy (LIKE tag_reading INCLUDING ALL)",
        )
        .await?;
    let pool = dataviz_core::db::pool(db.url(), 2)?;
    let (mut copies, mut copy_cpu, mut writes) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=LIMIT_ROUNDS {
        eprintln!(
            "limits: PostgreSQL binary COPY alone, then the writer alone (round {round} of {LIMIT_ROUNDS})…"
        );
        // Each round its own messages: the ids of the rounds before stay, as they do in
        // `ingested_message`'s month of ids.
        let units = writer_batches(args, round);
        let copied = copy_alone(&mut client, &units).await?;
        copies.push(copied.rate);
        copy_cpu.push(copied.us);
        writes.push(writer_alone(&pool, &units, args).await?);
        client
            .batch_execute("TRUNCATE bench_copy, tag_reading")
            .await?;
    }
    let copied = Copied {
        rate: median(copies),
        us: median(copy_cpu),
    };
    Ok((copied, median(writes)))
}

fn median(mut rates: Vec<f64>) -> f64 {
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

/// Binary COPY of the rows of `units` into `bench_copy` ([`dataviz_writer::copy_rows`], without
/// the writer's ids), 2,000 messages per transaction as the writer takes them.
async fn copy_alone(
    client: &mut tokio_postgres::Client,
    units: &[dataviz_core::message::MessageReadings],
) -> anyhow::Result<Copied> {
    let backend: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await?
        .get(0);
    let backend_cpu = || {
        u32::try_from(backend)
            .ok()
            .and_then(crate::bench_hub::cpu_seconds)
            .unwrap_or(0.0)
    };
    let cpu_before = backend_cpu();
    let start = Instant::now();
    let mut rows = 0;
    for chunk in units.chunks(2_000) {
        let tx = client.transaction().await?;
        rows += dataviz_writer::copy_rows(&tx, "bench_copy", chunk.iter()).await?;
        tx.commit().await?;
    }
    let elapsed = start.elapsed();
    Ok(Copied {
        rate: rate(rows, elapsed),
        us: us_per_message(backend_cpu() - cpu_before, units.len() as f64),
    })
}

/// The rows of the pipeline run as the processor hands them to the writer: each message its own
/// time, a microsecond apart (round `round` a second after the one before), the values of
/// [`payload`] (doubles, booleans, integers, text), and the id the processor gives a message
/// with `ts`. Rows of one time and one type would flatter PostgreSQL: equal keys share an
/// index entry.
fn writer_batches(args: &BenchArgs, round: usize) -> Vec<dataviz_core::message::MessageReadings> {
    let start =
        chrono::Utc::now() - chrono::Duration::hours(1) + chrono::Duration::seconds(round as i64);
    (0..args.messages)
        .map(|m| {
            let time = start + chrono::Duration::microseconds(m as i64);
            message_readings(m, args.devices, args.tags, time)
        })
        .collect()
}

/// Message `m` of [`writer_batches`], taken at `time`.
fn message_readings(
    m: u64,
    devices: u64,
    tags: u64,
    time: chrono::DateTime<chrono::Utc>,
) -> dataviz_core::message::MessageReadings {
    use dataviz_core::message::{MessageReadings, TagReading};
    use dataviz_core::value::Value;
    let device = m % devices;
    let readings: Vec<TagReading> = (0..tags)
        .map(|t| TagReading {
            tag_id: (device * tags + t) as i64,
            tag: format!("T.{t}"),
            value: match t % 10 {
                0..=5 => Value::Double((20 + (m + t) % 60) as f64 + 0.25),
                6 | 7 => Value::Boolean((m + t).is_multiple_of(2)),
                8 => Value::Integer(m as i64),
                _ => Value::Text("RUN".to_owned()),
            },
        })
        .collect();
    let device_code = format!("dev-{device}");
    let payload = dataviz_core::payload::Payload {
        readings: readings
            .iter()
            .map(|r| (r.tag.clone(), r.value.clone()))
            .collect(),
        ts: Some(time),
    };
    MessageReadings {
        raw_seq: None,
        id: dataviz_core::identity::readings_id(uuid::Uuid::now_v7(), 1, &device_code, &payload),
        gateway_id: 1,
        device_id: device as i64,
        device_code,
        time,
        received_at: time,
        readings,
    }
}

/// Fills `ingested_message` with the ids of `count` messages of [`message_readings`] spread
/// evenly over the 30 days before the runs' messages, as the writer stores them, with their
/// times as ingestion times, saying how far it is. Within the 31 days the writer keeps ids by
/// default: its retention deletes none of them during the runs.
async fn hold_ids(client: &tokio_postgres::Client, count: u64) -> anyhow::Result<()> {
    use tokio_postgres::{binary_copy::BinaryCopyInWriter, types::Type};
    if count == 0 {
        return Ok(());
    }
    let month = chrono::Duration::days(30);
    let start = chrono::Utc::now() - month - chrono::Duration::hours(2);
    let step_us = month.num_microseconds().unwrap_or(i64::MAX) / count as i64;
    let begun = Instant::now();
    let mut last = Instant::now();
    const CHUNK: u64 = 100_000;
    for first in (0..count).step_by(CHUNK as usize) {
        let sink = client
            .copy_in("COPY ingested_message (id, ingested_at) FROM STDIN BINARY")
            .await?;
        let mut writer = std::pin::pin!(BinaryCopyInWriter::new(
            sink,
            &[Type::UUID, Type::TIMESTAMPTZ]
        ));
        for m in first..(first + CHUNK).min(count) {
            let time = start + chrono::Duration::microseconds(step_us * m as i64);
            let unit = message_readings(m, 1_000, 10, time);
            let key = dataviz_core::ingested::key(&unit);
            writer.as_mut().write(&[&key, &time]).await?;
        }
        writer.as_mut().finish().await?;
        if last.elapsed() > Duration::from_secs(5) {
            eprintln!("held ids: {} of {count} stored…", first + CHUNK);
            last = Instant::now();
        }
    }
    client
        .batch_execute("VACUUM ANALYZE ingested_message")
        .await?;
    eprintln!(
        "held ids: {count} in ingested_message, stored in {:.0} s",
        begun.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The writer's own transactions ([`dataviz_writer::write`]: message ids into
/// `ingested_message`, then binary COPY) on the rows [`copy_alone`] writes, 2,000 messages per
/// transaction; READINGS and its JSON are left out.
async fn writer_alone(
    pool: &deadpool_postgres::Pool,
    units: &[dataviz_core::message::MessageReadings],
    args: &BenchArgs,
) -> anyhow::Result<f64> {
    // As a writer's: asked of the database once, not at each transaction.
    let earlier = dataviz_core::ingested::EarlierIds::default();
    let start = Instant::now();
    let mut rows = 0;
    for chunk in units.chunks(2_000) {
        rows += dataviz_writer::write(pool, &earlier, chunk).await?.rows;
    }
    let elapsed = start.elapsed();
    anyhow::ensure!(
        rows == args.messages * args.tags,
        "the writer wrote {rows} rows"
    );
    Ok(rate(rows, elapsed))
}

/// A child process killed with the bench, whatever way the bench ends.
/// A `dataviz all` of the bench's: killed when dropped.
struct All {
    child: Child,
    /// Its `HTTP_ADDR` port: `/metrics`.
    ops: u16,
}

impl All {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Messages its writer has committed (`dataviz_writer_messages_total`), read from its
    /// `/metrics`: a progress figure that costs the database nothing, where counting rows is a
    /// scan that grows with the table. `None` while it does not answer.
    async fn written(&self) -> Option<u64> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.ops));
        let head = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        let reply = crate::bench_site::send(addr, &head, b"").await.ok()?;
        (reply.status == 200).then_some(())?;
        Some(
            String::from_utf8_lossy(&reply.body)
                .lines()
                .find_map(|l| l.strip_prefix(dataviz_core::ops::metric::WRITER_MESSAGES))
                .and_then(|rest| rest.trim().parse::<f64>().ok())
                .map_or(0, |n| n as u64),
        )
    }
}

impl Drop for All {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The key `dataviz all` signs subscribers' tokens with, in the bench.
const SUBSCRIBER_KEY: &str = "dataviz-bench-subscriber-key";

/// Starts `dataviz all` on `broker`, after `dataviz migrate` made the bridge's session there
/// (the default broker keeps messages only for existing sessions); its log goes to `log_dir`.
fn start_all(
    broker: &Broker<'_>,
    db: &TestDb,
    app_addr: &str,
    log_dir: &std::path::Path,
    cpus: Option<&str>,
) -> anyhow::Result<All> {
    let ops = dataviz_testkit::free_port();
    let command = |role: &str| -> anyhow::Result<Command> {
        let mut command = match cpus {
            // taskset(1) (util-linux): std cannot set a child's affinity, and the workspace
            // forbids `unsafe`.
            Some(cpus) => {
                let mut taskset = Command::new("taskset");
                taskset
                    .args(["--cpu-list", cpus])
                    .arg(std::env::current_exe()?);
                taskset
            }
            None => Command::new(std::env::current_exe()?),
        };
        command
            .arg(role)
            .envs(broker.env())
            .env("APP_ADDR", app_addr)
            .env("MERCURE_PUBLISHER_JWT_KEY", "dataviz-bench-publisher-key")
            .env("MERCURE_SUBSCRIBER_JWT_KEY", SUBSCRIBER_KEY)
            .env("DATABASE_URL", db.url())
            .env("HTTP_ADDR", format!("127.0.0.1:{ops}"))
            .env("APP_ENV", "prod")
            .env("RUST_LOG", "warn")
            .env("LOG_DIR", log_dir)
            .stdin(Stdio::null());
        Ok(command)
    };
    let migrated = command("migrate")?
        .output()
        .context("running dataviz migrate")?;
    anyhow::ensure!(
        migrated.status.success(),
        "dataviz migrate on {}: {}",
        broker.name,
        String::from_utf8_lossy(&migrated.stderr)
    );
    let child = command("all")?
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log_dir.join("dataviz-all.log"))?)
        .spawn()
        .context("starting dataviz all")?;
    Ok(All { child, ops })
}

/// Gives a `dataviz all` just started the moment it takes to connect and subscribe, so that a
/// throughput run does not time its start (the broker would hold the messages meanwhile).
async fn started() {
    tokio::time::sleep(Duration::from_secs(2)).await;
}

async fn count(client: &tokio_postgres::Client) -> anyhow::Result<i64> {
    Ok(client
        .query_one("SELECT count(*) FROM ingested_message", &[])
        .await?
        .get(0))
}

/// A pipeline run: messages/s, readings/s, and the cores each process used meanwhile.
struct Run {
    messages: f64,
    readings: f64,
    cores: Vec<(&'static str, f64)>,
}

/// How [`cpu_use`] names Dataviz's own process.
const ALL_PROCESS: &str = "dataviz all";

/// The processes a pipeline run uses, by what they are, and the CPU seconds each has used:
/// `dataviz all`, the brokers, the PostgreSQL backends serving the bench's database, and
/// this process (the devices' load).
async fn cpu_use(
    broker: &Broker<'_>,
    client: &tokio_postgres::Client,
    all: &All,
) -> anyhow::Result<Vec<(&'static str, Vec<(u32, f64)>)>> {
    let backends: Vec<u32> = client
        .query(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()",
            &[],
        )
        .await?
        .iter()
        .filter_map(|row| u32::try_from(row.get::<_, i32>(0)).ok())
        .collect();
    let groups: [(&'static str, Vec<u32>); 5] = [
        (ALL_PROCESS, vec![all.pid()]),
        ("nats-server", broker.nats.pid().into_iter().collect()),
        ("Mosquitto", broker.mqtt_pid.into_iter().collect()),
        ("PostgreSQL backends", backends),
        ("the bench's devices", vec![std::process::id()]),
    ];
    Ok(groups
        .into_iter()
        .filter(|(_, pids)| !pids.is_empty())
        .map(|(name, pids)| {
            let used = pids
                .into_iter()
                .filter_map(|pid| Some((pid, crate::bench_hub::cpu_seconds(pid)?)))
                .collect();
            (name, used)
        })
        .collect())
}

/// The cores each group used between two [`cpu_use`] readings `elapsed` apart (a process
/// that appeared in between counts from its start).
fn cores(
    before: &[(&'static str, Vec<(u32, f64)>)],
    after: &[(&'static str, Vec<(u32, f64)>)],
    elapsed: Duration,
) -> Vec<(&'static str, f64)> {
    after
        .iter()
        .map(|(name, pids)| {
            let earlier = before.iter().find(|(n, _)| n == name).map(|(_, p)| p);
            let used: f64 = pids
                .iter()
                .map(|(pid, now)| {
                    let then = earlier
                        .and_then(|p| p.iter().find(|(q, _)| q == pid))
                        .map_or(0.0, |(_, t)| *t);
                    now - then
                })
                .sum();
            (*name, used / elapsed.as_secs_f64().max(1e-9))
        })
        .collect()
}

async fn pipeline(
    broker: &Broker<'_>,
    client: &tokio_postgres::Client,
    all: &All,
    args: &BenchArgs,
) -> anyhow::Result<Run> {
    eprintln!(
        "pipeline: {} messages as fast as {} takes them…",
        args.messages, broker.name
    );
    let before = count(client).await?;
    let written = all.written().await;
    let cpu_before = cpu_use(broker, client, all).await?;
    let mut publisher = broker.publisher("bench-pipeline");
    let now = chrono::Utc::now() - chrono::Duration::hours(1);
    let start = Instant::now();
    for seq in 0..args.messages {
        publisher
            .publish(
                topic(seq, args.devices),
                payload(
                    seq,
                    args.tags,
                    now + chrono::Duration::microseconds(seq as i64),
                ),
            )
            .await?;
    }
    let stored = Stored {
        before,
        written,
        messages: args.messages,
    };
    wait_stored(&mut publisher, client, all, stored, "pipeline").await?;
    let elapsed = start.elapsed();
    let cpu_after = cpu_use(broker, client, all).await?;
    Ok(Run {
        messages: rate(args.messages, elapsed),
        readings: rate(args.messages * args.tags, elapsed),
        cores: cores(&cpu_before, &cpu_after, elapsed),
    })
}

/// What a run waits to see stored: `messages` more rows in `ingested_message` than `before`,
/// and as many more messages counted by the writer than `written` (when its `/metrics`
/// answered).
struct Stored {
    before: i64,
    written: Option<u64>,
    messages: u64,
}

/// Waits until the broker acknowledged what `publisher` sent, then until the run's messages
/// are stored, saying how far it is every 5 s; at most 10 minutes. The writer's counter is
/// watched first (a run is timed to the end of its last write, and a `count(*)` every 50 ms,
/// a scan of a table of hundreds of thousands of rows, took a tenth of a core from the
/// pipeline it timed); the rows are counted once it says so.
async fn wait_stored(
    publisher: &mut Publisher,
    client: &tokio_postgres::Client,
    all: &All,
    run: Stored,
    phase: &str,
) -> anyhow::Result<()> {
    let Stored {
        before,
        written,
        messages,
    } = run;
    publisher
        .wait_acked(Duration::from_secs(600))
        .await
        .map_err(anyhow::Error::msg)?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut last = Instant::now();
    if let Some(written) = written {
        while let Some(now) = all.written().await {
            if now >= written + messages || Instant::now() >= deadline {
                break;
            }
            if last.elapsed() > Duration::from_secs(5) {
                eprintln!("{phase}: {} of {messages} messages written", now - written);
                last = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    loop {
        let stored = u64::try_from(count(client).await? - before).unwrap_or_default();
        if stored >= messages {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {stored} of {messages} messages stored after 10 minutes"
        );
        if last.elapsed() > Duration::from_secs(5) {
            eprintln!("{phase}: {stored} of {messages} messages stored");
            last = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the publisher has acknowledged everything in LIVE.
async fn wait_publisher_drained(nats: &NatsServer) -> anyhow::Result<()> {
    eprintln!("pipeline: waiting for the publisher's backlog to drain…");
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await?);
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
            .get_stream(dataviz_core::streams::LIVE_STREAM)
            .await?
            .get_consumer(dataviz_core::streams::PUBLISHER_CONSUMER)
            .await
            .map_err(|e| anyhow::anyhow!("the publisher's consumer: {e}"))?;
        let info = consumer.info().await?;
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the publisher did not drain in 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// p50 and p99, in milliseconds, of MQTT publish → row committed, then of MQTT publish →
/// Mercure event, at a fixed rate.
///
/// The messages go to 50 devices and carry their number in a `seq` tag; a watcher polls the
/// `(tag_id, time desc)` index every 2 ms and dates each number when its row appears, and a
/// subscriber holding a JWT dates each number when its event arrives.
async fn latency(
    broker: &Broker<'_>,
    client: &tokio_postgres::Client,
    hub: &str,
    args: &BenchArgs,
) -> anyhow::Result<(f64, f64, f64, f64)> {
    eprintln!(
        "latency: {} msg/s for {:?}…",
        args.latency_rate, args.latency_for
    );
    let mut publisher = broker.publisher("bench-latency");
    let total = (args.latency_rate as f64 * args.latency_for.as_secs_f64()).max(1.0) as usize;
    let message = |seq: usize, at: chrono::DateTime<chrono::Utc>| {
        format!(
            r#"{{"d":[{{"tag":"seq","value":{seq}}}],"ts":"{}"}}"#,
            at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        )
        .into_bytes()
    };
    // Spread over devices, as real traffic is (the publisher posts one device's updates in
    // order). A first message creates each device and its tag; the watcher needs the tags' ids.
    const DEVICES: usize = 50;
    let topic = |seq: usize| format!("gateways/1/latency-{:02}", seq % DEVICES);
    for device in 0..DEVICES {
        publisher
            .publish(topic(device), message(0, chrono::Utc::now()))
            .await?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let tag_ids: Vec<i64> = loop {
        let ids: Vec<i64> = client
            .query(
                "SELECT t.id FROM tag t JOIN device d ON d.id = t.device_id
                 WHERE d.code LIKE 'latency-%' AND t.code = 'seq'",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if ids.len() == DEVICES {
            break ids;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the latency devices never all appeared"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let token = dataviz_mercure::jwt::sign(
        &dataviz_mercure::Claims::subscriber(vec!["*".into()], Some(Duration::from_secs(3600))),
        &dataviz_mercure::JwtKey::new(SUBSCRIBER_KEY),
    );
    let mut events = dataviz_mercure::subscriber::EventStream::connect(
        hub,
        &dataviz_mercure::subscriber::SubscribeRequest {
            topics: vec!["https://dataviz.local/gateways/1/devices/{device}".into()],
            token: Some(token),
            last_event_id: None,
        },
    )
    .await
    .context("subscribing to the embedded hub")?;
    let (arrived_tx, mut arrived) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant)>();
    let subscriber = tokio::spawn(async move {
        while let Ok(Some(event)) = events.next().await {
            let at = Instant::now();
            let seq = serde_json::from_str::<serde_json::Value>(&event.data)
                .ok()
                .and_then(|d| d["readings"][0]["value"].as_u64());
            if let Some(seq) = seq
                && arrived_tx.send((seq as usize, at)).is_err()
            {
                break;
            }
        }
    });
    let mut sent: Vec<Option<Instant>> = vec![None; total + 1];
    let mut seen: Vec<Option<Instant>> = vec![None; total + 1];
    let start = Instant::now();
    let mut next = 1;
    // Rows commit out of order (workers, batches): each poll reads from the oldest message not
    // seen yet, by its `ts`, which is the time it was published.
    let mut published = vec![chrono::Utc::now(); total + 1];
    let mut oldest_unseen = 1;
    let mut poll = tokio::time::interval(Duration::from_millis(2));
    while seen[1..].iter().any(Option::is_none) {
        anyhow::ensure!(
            start.elapsed() < args.latency_for + Duration::from_secs(120),
            "latency run: rows missing after 2 minutes"
        );
        // Publish what is due, then look at what arrived.
        while next <= total
            && start.elapsed().as_secs_f64() >= (next - 1) as f64 / args.latency_rate as f64
        {
            sent[next] = Some(Instant::now());
            published[next] = chrono::Utc::now();
            publisher
                .publish(topic(next), message(next, published[next]))
                .await?;
            next += 1;
        }
        poll.tick().await;
        let rows = client
            .query(
                "SELECT value_num FROM tag_reading WHERE tag_id = ANY($1) AND time > $2",
                &[
                    &tag_ids,
                    &(published[oldest_unseen] - chrono::Duration::milliseconds(1)),
                ],
            )
            .await?;
        let now = Instant::now();
        for row in rows {
            let seq = row.get::<_, Option<f64>>(0).unwrap_or_default() as usize;
            if (1..=total).contains(&seq) && seen[seq].is_none() {
                seen[seq] = Some(now);
            }
        }
        while oldest_unseen < total && seen[oldest_unseen].is_some() {
            oldest_unseen += 1;
        }
    }
    // Every event too (the publisher follows the writer closely), then the percentiles.
    let mut evented: Vec<Option<Instant>> = vec![None; total + 1];
    let deadline = Instant::now() + Duration::from_secs(30);
    while evented[1..].iter().any(Option::is_none) && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(200), arrived.recv()).await {
            Ok(Some((seq, at))) if (1..=total).contains(&seq) => evented[seq] = Some(at),
            Ok(None) => break,
            _ => {}
        }
    }
    subscriber.abort();
    let missing = evented[1..].iter().filter(|e| e.is_none()).count();
    anyhow::ensure!(
        missing == 0,
        "latency run: {missing} Mercure events never arrived"
    );
    if let Some(path) = &args.latency_dump {
        let ms = |from: Instant, to: Option<Instant>| {
            to.map_or(String::new(), |to| {
                format!("{:.3}", to.duration_since(from).as_secs_f64() * 1000.0)
            })
        };
        let mut csv = String::from("published_ms,row_ms,event_ms\n");
        for seq in 1..=total {
            let Some(at) = sent[seq] else { continue };
            csv.push_str(&format!(
                "{},{},{}\n",
                ms(start, Some(at)),
                ms(at, seen[seq]),
                ms(at, evented[seq])
            ));
        }
        std::fs::write(path, csv)
            .with_context(|| format!("writing the latency dump {}", path.display()))?;
        eprintln!("latency: each message's latencies in {}", path.display());
    }
    let (row50, row99) = percentiles(&sent, &seen);
    let (event50, event99) = percentiles(&sent, &evented);
    Ok((row50, row99, event50, event99))
}

/// p50 and p99 of `to - from`, in milliseconds, over the messages numbered from 1.
fn percentiles(from: &[Option<Instant>], to: &[Option<Instant>]) -> (f64, f64) {
    let mut ms: Vec<f64> = from[1..]
        .iter()
        .zip(&to[1..])
        .filter_map(|(s, r)| Some(r.as_ref()?.duration_since(*s.as_ref()?).as_secs_f64() * 1000.0))
        .collect();
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() as f64 * q) as usize).min(ms.len() - 1)];
    (at(0.5), at(0.99))
}
