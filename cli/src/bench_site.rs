//! `dataviz bench-site`: the admin site's page timings on a realistic amount of data.
//!
//! It makes a scratch database on the PostgreSQL of `DATABASE_URL` (dropped at the end) and a
//! nats-server of its own, migrates, fills it with `--devices` devices of `--tags` tags each and
//! `--readings` readings (`INSERT ... SELECT generate_series`: half spread over every tag, half
//! on the numeric tags of one "hot" device over the last 30 days), creates an admin and serves
//! the site in process (`dataviz_app::router`, as `dataviz all` does, behind a layer that adds
//! a `Server-Timing` header). It logs in over HTTP like a browser, then requests each page
//! `--requests` times, one at a time, and prints the p50 and p99 of the server time (handler
//! and rendering, without the network) per page.

use anyhow::Context as _;
use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use dataviz_app::{AppConfig, AppState, LiveConfig};
use dataviz_mercure::JwtKey;
use dataviz_testkit::{NatsServer, TestDb};
use std::io::{IsTerminal, Write as _};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, clap::Args)]
pub struct BenchSiteArgs {
    /// Devices (spread over 10 gateways).
    #[arg(long, default_value_t = 10_000)]
    devices: i64,
    /// Tags per device (the last one boolean, the others numeric).
    #[arg(long, default_value_t = 5)]
    tags: i64,
    /// Readings in all.
    #[arg(long, default_value_t = 1_000_000)]
    readings: i64,
    /// Timed requests per page.
    #[arg(long, default_value_t = 200)]
    requests: usize,
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

const GATEWAYS: i64 = 10;
const ADMIN: &str = "bench@example.com";
const PASSWORD: &str = "bench-site-password";
/// Rows per `INSERT`, so that the progress line moves.
const CHUNK: i64 = 100_000;

pub async fn run(args: BenchSiteArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.devices > 0 && args.tags > 0 && args.readings >= 0 && args.requests > 0,
        "--devices, --tags and --requests must be at least 1"
    );
    let db = TestDb::create_on(args.database_url.clone()).await;
    let nats = NatsServer::start();
    let mut client = db.connect().await;
    dataviz_core::db::migrate(&mut client).await?;
    let storage = dataviz_core::db::describe(&client).await?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "dataviz bench-site: {} devices × {} tags, {} readings; {cores} cores; {storage}",
        args.devices, args.tags, args.readings
    );

    let started = Instant::now();
    let fill = fill(&client, &args).await?;
    progress_done(&format!(
        "filled: {} devices, {} tags, {} readings in {:.1} s (hot device {}: {} readings)",
        fill.devices,
        fill.tags,
        fill.readings,
        started.elapsed().as_secs_f64(),
        fill.hot_device,
        fill.hot_readings
    ));
    dataviz_app::users::create(
        &client,
        ADMIN,
        PASSWORD,
        &[dataviz_app::users::ROLE_ADMIN.to_owned()],
    )
    .await?;

    // The site, as `dataviz all` builds it (live values on: the device page signs a token).
    let nats_client = async_nats::connect(nats.url()).await.context("NATS")?;
    let js = dataviz_core::config::jetstream(nats_client.clone());
    dataviz_core::streams::ensure(&nats_client, &js, &Default::default()).await?;
    let pool = dataviz_core::db::pool(db.url(), 8)?;
    let live = LiveConfig {
        hub_url: dataviz_mercure::HUB_PATH.to_owned(),
        topic_base: dataviz_app::live::DEFAULT_TOPIC_BASE.to_owned(),
        subscriber_key: JwtKey::new("bench-site-subscriber-key-0123456789"),
        token_ttl: dataviz_app::config::AppConfig::default().live_token_ttl,
        hub: None,
    };
    let site = dataviz_app::router(AppState::new(pool, js, &AppConfig::default(), Some(live)))
        .layer(axum::middleware::from_fn(server_timing));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        axum::serve(
            listener,
            site.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
    });

    let cookie = login(addr).await?;
    let last_page =
        (args.devices + dataviz_app::data::PAGE_SIZE - 1) / dataviz_app::data::PAGE_SIZE;
    let hot = fill.hot_device;
    let pages = [
        ("/devices".to_owned(), "devices, first page"),
        (format!("/devices?page={last_page}"), "devices, last page"),
        ("/devices?q=dev-012".to_owned(), "devices, search"),
        (format!("/devices/{hot}?range=1h"), "hot device, 1 h"),
        (format!("/devices/{hot}?range=24h"), "hot device, 24 h"),
        (format!("/devices/{hot}?range=30d"), "hot device, 30 d"),
    ];
    println!(
        "\n{} requests per page, one at a time; server time = handler and rendering (Server-Timing)\n",
        args.requests
    );
    println!(
        "{:<32} {:<20} {:>9} {:>9} {:>9} {:>8}",
        "page", "what", "p50 ms", "p99 ms", "max ms", "KiB"
    );
    for (path, what) in &pages {
        // Warm-up: the first requests fill PostgreSQL's and the pool's caches.
        for _ in 0..5 {
            get(addr, path, &cookie).await?;
        }
        let mut times = Vec::with_capacity(args.requests);
        let mut size = 0;
        for _ in 0..args.requests {
            let (server_ms, bytes) = get(addr, path, &cookie).await?;
            times.push(server_ms);
            size = bytes;
        }
        times.sort_by(f64::total_cmp);
        println!(
            "{:<32} {:<20} {:>9.2} {:>9.2} {:>9.2} {:>8.1}",
            path,
            what,
            percentile(&times, 50.0),
            percentile(&times, 99.0),
            times.last().copied().unwrap_or_default(),
            size as f64 / 1024.0
        );
    }
    server.abort();
    Ok(())
}

/// Adds `Server-Timing: app;dur=<ms>`: the time from the request to the response being ready.
async fn server_timing(request: Request, next: Next) -> Response {
    let start = Instant::now();
    let mut response = next.run(request).await;
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    if let Ok(value) = HeaderValue::from_str(&format!("app;dur={ms:.3}")) {
        response.headers_mut().insert("server-timing", value);
    }
    response
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

struct Filled {
    devices: i64,
    tags: i64,
    readings: i64,
    hot_device: i64,
    hot_readings: i64,
}

/// One line that rewrites itself on a terminal; plain lines otherwise.
fn progress(line: &str) {
    let mut err = std::io::stderr();
    if err.is_terminal() {
        let _ = write!(err, "\r\x1b[2K{line}");
        let _ = err.flush();
    } else {
        let _ = writeln!(err, "{line}");
    }
}

fn progress_done(line: &str) {
    if std::io::stderr().is_terminal() {
        eprint!("\r\x1b[2K");
    }
    println!("{line}");
}

async fn fill(db: &tokio_postgres::Client, args: &BenchSiteArgs) -> anyhow::Result<Filled> {
    progress("filling: gateways and devices");
    db.execute(
        "INSERT INTO gateway (id, name) SELECT g, 'Gateway ' || g FROM generate_series(1, $1::int) g",
        &[&(GATEWAYS as i32)],
    )
    .await?;
    let devices = db
        .execute(
            "INSERT INTO device (gateway_id, code, name, first_seen_at, last_seen_at)
             SELECT 1 + (n - 1) % $2::int, 'dev-' || lpad(n::text, 5, '0'), 'Device ' || n,
                    now() - interval '30 days', now() - (n % 3600) * interval '1 second'
             FROM generate_series(1, $1::bigint) n",
            &[&args.devices, &(GATEWAYS as i32)],
        )
        .await? as i64;
    progress("filling: tags");
    let tags = db
        .execute(
            "INSERT INTO tag (device_id, code, data_type)
             SELECT d.id,
                    CASE WHEN k < $1 - 1 OR $1 = 1 THEN 'AI.' || k ELSE 'DI.0' END,
                    CASE WHEN k < $1 - 1 OR $1 = 1 THEN 'double precision' ELSE 'boolean' END
             FROM device d, generate_series(0, $1::bigint - 1) k",
            &[&args.tags],
        )
        .await? as i64;
    // The first device gets the hot half of the readings.
    let hot_device: i64 = db
        .query_one("SELECT id FROM device WHERE code = 'dev-00001'", &[])
        .await?
        .get(0);
    let hot_tags: i64 = db
        .query_one(
            "SELECT count(*) FROM tag WHERE device_id = $1 AND data_type = 'double precision'",
            &[&hot_device],
        )
        .await?
        .get(0);

    // Half (rounded down to whole rows per tag) over every tag of every device, the last day,
    // one reading every 6 minutes per tag; by ranges of devices for the progress line.
    let per_tag = args.readings / 2 / tags.max(1);
    let mut readings = 0i64;
    let devices_per_chunk = (CHUNK / (per_tag * args.tags).max(1)).max(1);
    let mut lo = 1i64;
    while per_tag > 0 && lo <= devices {
        let hi = (lo + devices_per_chunk - 1).min(devices);
        readings += db
            .execute(
                "INSERT INTO tag_reading (time, device_id, tag_id, gateway_id, value_num, value_bool, value_type)
                 SELECT now() - s * interval '6 minutes' - (t.id % 300) * interval '1 second',
                        t.device_id, t.id, d.gateway_id,
                        CASE WHEN t.data_type = 'double precision' THEN 20 + 10 * random() END,
                        CASE WHEN t.data_type = 'boolean' THEN s % 2 = 0 END,
                        t.data_type
                 FROM device d JOIN tag t ON t.device_id = d.id, generate_series(0, $3::bigint - 1) s
                 WHERE d.id BETWEEN $1 AND $2",
                &[&lo, &hi, &per_tag],
            )
            .await? as i64;
        progress(&format!(
            "filling: {readings} / {} readings (all devices)",
            args.readings
        ));
        lo = hi + 1;
    }

    // The rest on the hot device's numeric tags, round robin, evenly over the last 30 days.
    let hot_readings = if hot_tags > 0 {
        args.readings - readings
    } else {
        0
    };
    let step_us = if hot_readings > 0 {
        30 * 86_400 * 1_000_000 / (hot_readings / hot_tags).max(1)
    } else {
        0
    };
    let mut done = 0i64;
    while done < hot_readings {
        let hi = (done + CHUNK).min(hot_readings) - 1;
        readings += db
            .execute(
                "WITH hot AS (
                     SELECT t.id, d.gateway_id, row_number() OVER (ORDER BY t.id) - 1 AS i
                     FROM tag t JOIN device d ON d.id = t.device_id
                     WHERE t.device_id = $1 AND t.data_type = 'double precision')
                 INSERT INTO tag_reading (time, device_id, tag_id, gateway_id, value_num, value_type)
                 SELECT now() - (s / $4) * $5 * interval '1 microsecond', $1, hot.id, hot.gateway_id,
                        20 + 5 * sin(s / 5000.0) + random(), 'double precision'
                 FROM generate_series($2::bigint, $3::bigint) s JOIN hot ON hot.i = s % $4",
                &[&hot_device, &done, &hi, &hot_tags, &step_us],
            )
            .await? as i64;
        done = hi + 1;
        progress(&format!(
            "filling: {readings} / {} readings (hot device)",
            args.readings
        ));
    }
    // As autovacuum would have done by then: statistics and the visibility map.
    progress("filling: VACUUM ANALYZE");
    db.batch_execute("VACUUM ANALYZE").await?;
    Ok(Filled {
        devices,
        tags,
        readings,
        hot_device,
        hot_readings: done,
    })
}

/// A response of the site: status, headers (lowercase names), body.
pub(crate) struct Reply {
    pub(crate) status: u16,
    headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> impl Iterator<Item = &str> {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on a connection of its own (`Connection: close`).
pub(crate) async fn send(addr: SocketAddr, head: &str, body: &[u8]) -> anyhow::Result<Reply> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut raw))
        .await
        .context("no answer within 60 s")??;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of headers")?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .context("no status line")?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(Reply {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    })
}

/// Logs in with the login form's post; the `Cookie` header value of the session.
async fn login(addr: SocketAddr) -> anyhow::Result<String> {
    let form = format!(
        "email={}&password={}&next=%2F",
        ADMIN.replace('@', "%40"),
        PASSWORD
    );
    let head = format!(
        "POST /api/login HTTP/1.1\r\nHost: {addr}\r\nOrigin: http://{addr}\r\n\
         Referer: http://{addr}/login\r\nAccept: text/html\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        form.len()
    );
    let reply = send(addr, &head, form.as_bytes()).await?;
    let location = reply.header("location").next().unwrap_or_default();
    anyhow::ensure!(
        (300..400).contains(&reply.status) && location == "/",
        "login refused: {} to {location:?}: {}",
        reply.status,
        String::from_utf8_lossy(&reply.body)
    );
    let cookies: Vec<&str> = reply
        .header("set-cookie")
        .filter_map(|c| c.split(';').next())
        .collect();
    anyhow::ensure!(
        cookies
            .iter()
            .any(|c| c.starts_with(&format!("{}=", dataviz_app::auth::SESSION_COOKIE))),
        "no session cookie after logging in"
    );
    Ok(cookies.join("; "))
}

/// GETs `path` as the logged-in admin; the server time (ms) and the body's size.
async fn get(addr: SocketAddr, path: &str, cookie: &str) -> anyhow::Result<(f64, usize)> {
    let head = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nCookie: {cookie}\r\nAccept: text/html\r\n\
         Connection: close\r\n\r\n"
    );
    let reply = send(addr, &head, b"").await?;
    anyhow::ensure!(
        reply.status == 200,
        "GET {path}: {} {}",
        reply.status,
        String::from_utf8_lossy(&reply.body)
    );
    let ms = reply
        .header("server-timing")
        .find_map(|v| v.strip_prefix("app;dur="))
        .and_then(|v| v.parse().ok())
        .context("no Server-Timing header")?;
    Ok((ms, reply.body.len()))
}
