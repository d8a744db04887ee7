//! `dataviz simulate`: devices publishing realistic readings over MQTT at a chosen rate.
//!
//! Each simulated device has `--tags` tags of the kinds seen in the field: analog inputs
//! (`AI.n`, floats drifting around a set point), digital inputs (`DI.n`, booleans), counters
//! (`CNT.n`, growing integers) and a status (`ST.0`, text). `--without-ts` percent of the
//! messages carry no `ts`; the others rotate through the `ts` formats devices send. With
//! `--wait-db`, it then waits until every reading is in `tag_reading` and reports the
//! end-to-end rate.

use anyhow::Context as _;
use dataviz_bridge::config::MqttConnection;
use rand::{Rng, SeedableRng, rngs::SmallRng};
use rumqttc::{AsyncClient, Event, Outgoing, Packet, QoS};
use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    #[command(flatten)]
    mqtt: MqttConnection,
    /// Gateways, with ids from --first-gateway on.
    #[arg(long, default_value_t = 2)]
    gateways: u32,
    /// Devices per gateway.
    #[arg(long, default_value_t = 5)]
    devices: u32,
    /// Tags per device.
    #[arg(long, default_value_t = 10)]
    tags: u32,
    /// Messages per second over all devices (0: as fast as the broker takes them).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Stop after this many messages.
    #[arg(long)]
    count: Option<u64>,
    /// Stop after this long (e.g. 30s, 5m).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Percent of messages sent without `ts` (their time is the bridge's receive time).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u8).range(0..=100))]
    without_ts: u8,
    /// Id of the first gateway.
    #[arg(long, default_value_t = 1)]
    first_gateway: i32,
    /// Publish QoS.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    qos: u8,
    /// Create the gateways in the database when missing (needs DATABASE_URL).
    #[arg(long)]
    create_gateways: bool,
    /// After publishing, wait until every reading is stored and report the end-to-end rate
    /// (needs DATABASE_URL).
    #[arg(long)]
    wait_db: bool,
    /// Give up waiting for the database after this long.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    wait_timeout: Duration,
    /// PostgreSQL URL, for --create-gateways and --wait-db.
    #[arg(
        long,
        env = "DATABASE_URL",
        value_name = "DATABASE_URL",
        hide_env_values = true
    )]
    database_url: Option<String>,
    /// Seed of the random values (same seed, same readings).
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

/// One simulated device's state.
struct Device {
    topic: String,
    counter: i64,
    set_points: Vec<f64>,
}

pub async fn run(args: SimulateArgs) -> anyhow::Result<()> {
    if args.count.is_none() && args.duration.is_none() && args.wait_db {
        anyhow::bail!(
            "--wait-db needs --count or --duration: it waits for a known number of readings"
        );
    }
    let db = match (&args.database_url, args.create_gateways || args.wait_db) {
        (Some(url), true) => Some(dataviz_core::db::connect(url).await?),
        (None, true) => anyhow::bail!("--create-gateways and --wait-db need DATABASE_URL"),
        _ => None,
    };
    if args.create_gateways
        && let Some(db) = &db
    {
        let created = db
            .execute(
                "INSERT INTO gateway (id, name, description)
                 SELECT id, 'Simulated gateway ' || id, 'created by dataviz simulate'
                 FROM generate_series($1::int, $1::int + $2::int - 1) AS id
                 ON CONFLICT (id) DO NOTHING",
                &[&args.first_gateway, &(args.gateways as i32)],
            )
            .await
            .context("creating the simulated gateways")?;
        // Explicit ids leave the identity behind; move it past them for gateways made by hand.
        db.execute(
            "SELECT setval(pg_get_serial_sequence('gateway', 'id'), greatest((SELECT max(id) FROM gateway), 1))",
            &[],
        )
        .await?;
        println!(
            "gateways: {created} created, {} already there",
            args.gateways as u64 - created
        );
    }
    let stored_before = match &db {
        Some(db) if args.wait_db => readings_stored(db).await?,
        _ => 0,
    };

    let qos = dataviz_bridge::config::qos(args.qos);
    let client_id = format!("dataviz-simulate-{}", std::process::id());
    let mut options = args.mqtt.options(&client_id)?;
    options.set_inflight(1000);
    let (client, mut eventloop) = AsyncClient::new(options, 4096);
    let acked = Arc::new(AtomicU64::new(0));
    let connected = Arc::new(tokio::sync::Notify::new());
    let poller = {
        let (acked, connected) = (acked.clone(), connected.clone());
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => connected.notify_one(),
                    Ok(Event::Incoming(Packet::PubAck(_) | Packet::PubComp(_))) => {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("simulate: MQTT connection: {e}; reconnecting");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        })
    };
    tokio::time::timeout(Duration::from_secs(10), connected.notified())
        .await
        .with_context(|| {
            format!(
                "no MQTT connection to {}:{} after 10 s",
                args.mqtt.mqtt_host, args.mqtt.mqtt_port
            )
        })?;

    let mut rng = SmallRng::seed_from_u64(args.seed);
    let mut devices: Vec<Device> = (0..args.gateways)
        .flat_map(|g| (0..args.devices).map(move |d| (g, d)))
        .map(|(g, d)| Device {
            topic: format!("gateways/{}/sim-{:05}", args.first_gateway + g as i32, d),
            counter: 0,
            set_points: (0..args.tags).map(|_| 0.0).collect(),
        })
        .collect();
    for device in &mut devices {
        for sp in &mut device.set_points {
            *sp = rng.random_range(10.0..90.0);
        }
    }
    if devices.is_empty() {
        anyhow::bail!("nothing to simulate: --gateways and --devices must be at least 1");
    }
    println!(
        "simulating {} devices ({} gateways × {}) with {} tags each, {} → {}:{}",
        devices.len(),
        args.gateways,
        args.devices,
        args.tags,
        if args.rate > 0.0 {
            format!("{} msg/s", args.rate)
        } else {
            "as fast as possible".into()
        },
        args.mqtt.mqtt_host,
        args.mqtt.mqtt_port
    );

    let start = Instant::now();
    let deadline = args.duration.map(|d| start + d);
    let mut sent: u64 = 0;
    let mut next_report = start + Duration::from_secs(1);
    let tick = Duration::from_millis(10);
    let interactive = std::io::stderr().is_terminal();
    let mut stop = Box::pin(tokio::signal::ctrl_c());
    'publish: loop {
        // Paced on the clock, not on ticks: a late tick sends more, so the rate holds.
        let burst = if args.rate > 0.0 {
            ((args.rate * start.elapsed().as_secs_f64()) as u64).saturating_sub(sent)
        } else {
            1000
        };
        for _ in 0..burst {
            if args.count.is_some_and(|c| sent >= c)
                || deadline.is_some_and(|d| Instant::now() >= d)
            {
                break 'publish;
            }
            let index = (sent % devices.len() as u64) as usize;
            let device = &mut devices[index];
            let with_ts = rng.random_range(0..100) >= args.without_ts;
            let payload = payload(device, &mut rng, with_ts.then_some(sent));
            client
                .publish(device.topic.clone(), qos, false, payload)
                .await?;
            sent += 1;
        }
        if Instant::now() >= next_report {
            next_report += Duration::from_secs(1);
            report(
                interactive,
                "published",
                sent,
                acked.load(Ordering::Relaxed),
                start.elapsed(),
            );
        }
        if args.rate > 0.0 {
            tokio::select! {
                _ = &mut stop => break 'publish,
                _ = tokio::time::sleep(tick) => {}
            }
        } else {
            tokio::task::yield_now().await;
        }
    }
    // Every message acknowledged by the broker, then disconnect.
    let ack_deadline = Instant::now() + Duration::from_secs(60);
    while qos != QoS::AtMostOnce
        && acked.load(Ordering::Relaxed) < sent
        && Instant::now() < ack_deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let published_in = start.elapsed();
    let acked_count = acked.load(Ordering::Relaxed);
    client.disconnect().await.ok();
    let _ = tokio::time::timeout(Duration::from_secs(5), poller).await;
    if interactive {
        eprintln!();
    }
    println!(
        "published {sent} messages ({} readings) in {:.1} s: {:.0} msg/s; broker acknowledged {acked_count}",
        sent * u64::from(args.tags),
        published_in.as_secs_f64(),
        sent as f64 / published_in.as_secs_f64()
    );

    if args.wait_db
        && let Some(db) = &db
    {
        let expected = stored_before + sent as i64 * i64::from(args.tags);
        let wait_until = Instant::now() + args.wait_timeout;
        loop {
            let stored = readings_stored(db).await?;
            if stored >= expected {
                let elapsed = start.elapsed().as_secs_f64();
                println!(
                    "stored {} readings of {sent} messages in {elapsed:.1} s end to end: {:.0} msg/s, {:.0} readings/s into tag_reading",
                    stored - stored_before,
                    sent as f64 / elapsed,
                    (stored - stored_before) as f64 / elapsed
                );
                break;
            }
            if Instant::now() > wait_until {
                anyhow::bail!(
                    "only {} of {} readings stored after {:?}",
                    stored - stored_before,
                    expected - stored_before,
                    args.wait_timeout
                );
            }
            report(
                interactive,
                "stored",
                (stored - stored_before) as u64,
                (expected - stored_before) as u64,
                start.elapsed(),
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    Ok(())
}

async fn readings_stored(db: &tokio_postgres::Client) -> anyhow::Result<i64> {
    Ok(db
        .query_one("SELECT count(*) FROM tag_reading", &[])
        .await
        .context("counting tag_reading rows (is the database migrated?)")?
        .get(0))
}

fn report(interactive: bool, what: &str, done: u64, of: u64, elapsed: Duration) {
    let line = format!(
        "{what} {done} ({of}) after {:.0} s, {:.0}/s",
        elapsed.as_secs_f64(),
        done as f64 / elapsed.as_secs_f64().max(0.001)
    );
    if interactive {
        eprint!("\r{line}    ");
    } else {
        eprintln!("{line}");
    }
}

/// One message of a device: its tags, values moving a little each time.
fn payload(device: &mut Device, rng: &mut SmallRng, ts_format: Option<u64>) -> Vec<u8> {
    device.counter += 1;
    let mut entries = Vec::with_capacity(device.set_points.len());
    for (i, set_point) in device.set_points.iter_mut().enumerate() {
        let value = match i % 10 {
            0..=5 => {
                *set_point += rng.random_range(-0.5..0.5);
                // serde_json writes every f64 with a fraction (50.0), so the type stays a float.
                serde_json::json!((*set_point * 100.0).round() / 100.0)
            }
            6 | 7 => serde_json::json!(rng.random_bool(0.5)),
            8 => serde_json::json!(device.counter),
            _ => serde_json::json!(if rng.random_bool(0.95) {
                "RUN"
            } else {
                "ALARM"
            }),
        };
        let kind = match i % 10 {
            0..=5 => "AI",
            6 | 7 => "DI",
            8 => "CNT",
            _ => "ST",
        };
        entries.push(serde_json::json!({"tag": format!("{kind}.{i}"), "value": value}));
    }
    let mut message = serde_json::json!({ "d": entries });
    if let Some(n) = ts_format {
        let now = chrono::Utc::now();
        let ts = match n % 4 {
            0 => now.format("%Y-%m-%dT%H:%M:%S%.3f+0000").to_string(),
            1 => now.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
            2 => now.format("%Y-%m-%dT%H:%M:%S%.3f+00:00").to_string(),
            _ => now.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
        };
        message["ts"] = ts.into();
    }
    serde_json::to_vec(&message).expect("JSON values serialize")
}
