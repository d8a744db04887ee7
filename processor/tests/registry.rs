//! The registry against a real PostgreSQL, in process, with tokio's paused time where its
//! behaviour depends on time.

use chrono::Utc;
use dataviz_core::value::Value;
use dataviz_processor::registry::{Registry, RegistryError};
use dataviz_testkit::TestDb;
use std::time::Duration;

async fn registry(db: &TestDb) -> Registry {
    registry_within(db, dataviz_processor::registry::CACHE_BYTES).await
}

/// A registry on a migrated `db` whose devices and tags cache weighs at most `limit` bytes.
async fn registry_within(db: &TestDb, limit: usize) -> Registry {
    dataviz_core::db::migrate(&mut db.connect().await)
        .await
        .unwrap();
    Registry::with_cache_bytes(dataviz_core::db::pool(db.url(), 2).unwrap(), limit)
}

fn readings() -> Vec<(String, Value)> {
    vec![("AI.0".into(), Value::Double(1.5))]
}

/// A double and a boolean, as one message of device `plc-1` carries them.
fn two_readings() -> Vec<(String, Value)> {
    vec![
        ("AI.0".to_owned(), Value::Double(1.5)),
        ("DI.0".to_owned(), Value::Boolean(true)),
    ]
}

/// Creates gateway 1 in the migrated `db`; a connection to it.
async fn gateway_one(db: &TestDb) -> tokio_postgres::Client {
    let client = db.connect().await;
    client
        .execute("INSERT INTO gateway (id, name) VALUES (1, 'g')", &[])
        .await
        .unwrap();
    client
}

#[tokio::test(start_paused = true)]
async fn an_unknown_gateway_is_believed_for_a_second_then_asked_again() {
    let db = TestDb::create().await;
    let registry = registry(&db).await;
    let readings = readings();
    let resolve = || registry.resolve(99, "plc-1", &readings, Utc::now());
    assert!(matches!(
        resolve().await,
        Err(RegistryError::UnknownGateway(99))
    ));
    db.connect()
        .await
        .execute("INSERT INTO gateway (id, name) VALUES (99, 'late')", &[])
        .await
        .unwrap();
    // Within the second: the answer is the cached one (a flood costs no query per message).
    tokio::time::advance(Duration::from_millis(999)).await;
    assert!(matches!(
        resolve().await,
        Err(RegistryError::UnknownGateway(99))
    ));
    // Past it: asked again, and found.
    tokio::time::advance(Duration::from_millis(2)).await;
    let resolved = resolve().await.expect("the gateway exists now");
    assert_eq!(resolved.tag_ids.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_tag_code_postgresql_cannot_index_is_a_permanent_error() {
    let db = TestDb::create().await;
    let registry = registry(&db).await;
    db.connect()
        .await
        .execute("INSERT INTO gateway (id, name) VALUES (1, 'g')", &[])
        .await
        .unwrap();
    // 8 KB of random hex: compressed, still over the row limit of PostgreSQL's B-tree index.
    let code: String = (0..512)
        .map(|_| format!("{:016x}", rand::random::<u64>()))
        .collect();
    let huge = vec![(code, Value::Integer(1))];
    match registry.resolve(1, "plc-1", &huge, Utc::now()).await {
        Err(RegistryError::Database(e)) => assert_eq!(
            e.kind(),
            dataviz_core::db::ErrorKind::Permanent,
            "{e} (SQLSTATE {:?})",
            e.code()
        ),
        other => panic!("expected a permanent database error, got {other:?}"),
    }
    // The next message of the device, with a sane tag, is not held back.
    registry
        .resolve(1, "plc-1", &readings(), Utc::now())
        .await
        .expect("a sane tag is created");
}

#[tokio::test(start_paused = true)]
async fn a_flood_of_made_up_gateways_keeps_the_cache_bounded() {
    let db = TestDb::create().await;
    let registry = registry(&db).await;
    for gateway in 1_000..13_000 {
        let _ = registry.check_gateway(gateway).await;
    }
    let kept = registry.unknown_gateways_kept();
    assert!(kept <= 10_000, "{kept} unknown gateways remembered");
}

/// The devices and tags cache is bounded by bytes: 300 devices with codes of 200 bytes and
/// three tags each weigh far more than the 32 KiB allowed here; the cache stays within it, and
/// what it forgot resolves again to the same ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_of_devices_and_tags_is_bounded_by_bytes() {
    let db = TestDb::create().await;
    let limit = 32 * 1024;
    let registry = registry_within(&db, limit).await;
    db.connect()
        .await
        .execute("INSERT INTO gateway (id, name) VALUES (1, 'g')", &[])
        .await
        .unwrap();
    let readings: Vec<(String, Value)> = (0..3)
        .map(|t| (format!("tag-{t}-{}", "t".repeat(150)), Value::Integer(t)))
        .collect();
    let code = |d: usize| format!("{d:04}-{}", "d".repeat(195));
    let mut first = Vec::new();
    for d in 0..300 {
        let resolved = registry
            .resolve(1, &code(d), &readings, Utc::now())
            .await
            .unwrap();
        assert!(
            registry.cache_bytes() <= limit,
            "{} bytes",
            registry.cache_bytes()
        );
        first.push(resolved);
    }
    for (d, resolved) in first.iter().enumerate() {
        let again = registry
            .resolve(1, &code(d), &readings, Utc::now())
            .await
            .unwrap();
        assert_eq!(&again, resolved, "device {d} resolves to the same ids");
        assert!(registry.cache_bytes() <= limit);
    }
    let rows: i64 = db
        .connect()
        .await
        .query_one("SELECT count(*) FROM device", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 300, "nothing registered twice");
}

/// A registry starting cold (a restart) finds the devices and tags that exist by reading them:
/// no row is written again, so no commit waits for the WAL (what made a restart with a
/// thousand devices cost seconds). New tags of a known device are still created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_registry_reads_what_exists_and_writes_only_what_is_new() {
    let db = TestDb::create().await;
    let first = registry(&db).await;
    let client = gateway_one(&db).await;
    let readings = two_readings();
    let known = first
        .resolve(1, "plc-1", &readings, Utc::now())
        .await
        .unwrap();
    // Row versions: an upsert that finds its row still writes a new version of it.
    let versions = || async {
        let rows = client
            .query(
                "SELECT xmin::text FROM device UNION ALL (SELECT xmin::text FROM tag ORDER BY id)",
                &[],
            )
            .await
            .unwrap();
        rows.iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
    };
    let before = versions().await;

    let cold = registry(&db).await;
    let again = cold
        .resolve(1, "plc-1", &readings, Utc::now())
        .await
        .unwrap();
    assert_eq!(again, known);
    assert_eq!(
        versions().await,
        before,
        "a known device or tag was written again"
    );

    // A new tag of the known device is created beside the others.
    let mut more = readings.clone();
    more.push(("AI.1".to_owned(), Value::Double(2.0)));
    let grown = registry(&db)
        .await
        .resolve(1, "plc-1", &more, Utc::now())
        .await
        .unwrap();
    assert_eq!(grown.device_id, known.device_id);
    assert_eq!(grown.tag_ids[..2], known.tag_ids[..]);
    let tags: i64 = client
        .query_one("SELECT count(*) FROM tag", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(tags, 3);
}

/// The cache alone answers a message the way the database would, or says it cannot: a known
/// device and tags give the same ids, and mark the device seen; a new device or tag, a type
/// change or a gateway never asked about are left to the database; an unknown gateway is
/// believed as `resolve` believes it.
#[tokio::test(start_paused = true)]
async fn the_cache_alone_answers_as_the_database_would_or_not_at_all() {
    let db = TestDb::create().await;
    let registry = registry(&db).await;
    let client = gateway_one(&db).await;
    let readings = two_readings();
    let cached = |code: &str, readings: &[(String, Value)], at| {
        registry.resolve_cached(1, code, readings, at)
    };
    assert!(
        cached("plc-1", &readings, Utc::now()).is_none(),
        "nothing cached yet"
    );
    // Past the row's default (its creation time), so that each sighting moves it on.
    let first = Utc::now() + chrono::Duration::hours(1);
    let known = registry
        .resolve(1, "plc-1", &readings, first)
        .await
        .unwrap();
    registry.flush_last_seen().await.unwrap();

    let later = first + chrono::Duration::minutes(30);
    let again = cached("plc-1", &readings, later).expect("known").unwrap();
    assert_eq!(again, known);
    // An integer into a double tag keeps its type: still the cache's to answer.
    let integer = vec![("AI.0".to_owned(), Value::Integer(2))];
    let ids = cached("plc-1", &integer, later).expect("known").unwrap();
    assert_eq!(ids.tag_ids, known.tag_ids[..1]);
    // Seen, as through `resolve`: the device's last sighting moves on.
    registry.flush_last_seen().await.unwrap();
    let seen: chrono::DateTime<Utc> = client
        .query_one(
            "SELECT last_seen_at FROM device WHERE id = $1",
            &[&known.device_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(seen.timestamp_micros(), later.timestamp_micros());

    // What only the database can answer.
    let mut more = readings.clone();
    more.push(("AI.1".to_owned(), Value::Double(2.0)));
    assert!(cached("plc-1", &more, later).is_none(), "a new tag");
    let text = vec![("AI.0".to_owned(), Value::Text("on".into()))];
    assert!(cached("plc-1", &text, later).is_none(), "a type change");
    assert!(cached("plc-2", &readings, later).is_none(), "a new device");
    assert!(
        registry
            .resolve_cached(2, "plc-1", &readings, later)
            .is_none(),
        "a gateway never asked about"
    );

    // An unknown gateway, as `resolve` believes it: for a second.
    assert!(matches!(
        registry.resolve(99, "plc-1", &readings, later).await,
        Err(RegistryError::UnknownGateway(99))
    ));
    assert!(matches!(
        registry.resolve_cached(99, "plc-1", &readings, later),
        Some(Err(RegistryError::UnknownGateway(99)))
    ));
    tokio::time::advance(Duration::from_millis(1001)).await;
    assert!(
        registry
            .resolve_cached(99, "plc-1", &readings, later)
            .is_none()
    );
}
