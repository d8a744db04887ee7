//! Retention on plain PostgreSQL against a real server: old readings go, recent ones stay, and a
//! pass reads the pages that may hold old readings and those written since the last pass, not
//! the whole table (it runs hourly on a table that only grows).

use dataviz_core::{
    db,
    retention::{self, Period},
};
use dataviz_testkit::TestDb;
use std::time::Duration;

const KEEP: Period = Period(Some(Duration::from_secs(365 * 86_400)));

/// Inserts `recent` readings of the last hour, with `old` readings two years old in their midst.
async fn insert(client: &tokio_postgres::Client, recent: i64, old: i64) {
    client
        .execute(
            "INSERT INTO tag_reading (time, device_id, tag_id, gateway_id, value_num, value_type)
             SELECT CASE WHEN i % (n / o) = 0 AND i / (n / o) < o
                         THEN now() - interval '730 days'
                         ELSE now() - interval '1 hour' + i * interval '1 ms' END,
                    i % 100, i % 1000, 1, i, 'double precision'
               FROM (SELECT $1::bigint AS n, $2::bigint AS o) AS counts,
                    generate_series(0, n - 1) i",
            &[&recent, &old],
        )
        .await
        .unwrap();
}

/// Heap pages of `tag_reading` read so far (from the cache or not), as the statistics say.
async fn pages_read(client: &tokio_postgres::Client) -> i64 {
    pages_read_of(client, "tag_reading").await
}

/// Heap pages of `table` read so far, as the statistics say.
async fn pages_read_of(client: &tokio_postgres::Client, table: &str) -> i64 {
    // Make this backend's counters visible, then read them afresh.
    client
        .batch_execute("SELECT pg_stat_force_next_flush()")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    client
        .batch_execute("SELECT pg_stat_clear_snapshot()")
        .await
        .unwrap();
    client
        .query_one(
            "SELECT coalesce(heap_blks_read, 0) + coalesce(heap_blks_hit, 0)
               FROM pg_statio_user_tables WHERE relname = $1",
            &[&table],
        )
        .await
        .unwrap()
        .get(0)
}

/// Waits until every transaction that had begun, in any database, has ended.
async fn transactions_begun_before_now_ended(client: &tokio_postgres::Client) {
    let snapshot = |bound: &'static str| async move {
        let sql = format!("SELECT txid_snapshot_{bound}(txid_current_snapshot())");
        client.query_one(&sql, &[]).await.unwrap().get::<_, i64>(0)
    };
    let now = snapshot("xmax").await;
    for _ in 0..3000 {
        if snapshot("xmin").await >= now {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("transactions begun 30 s ago still run");
}

async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn a_retention_pass_deletes_old_readings_without_reading_the_whole_table() {
    let test_db = TestDb::create().await;
    let mut client = test_db.connect().await;
    db::migrate(&mut client).await.unwrap();

    // A table of some thousands of pages, with no statistics (as before its first ANALYZE).
    insert(&client, 500_000, 20).await;
    // A transaction running through the first pass, begun before it deletes: the summaries
    // made again after the deletion keep the deleted times, which it may still see.
    let other = test_db.connect().await;
    other
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1")
        .await
        .unwrap();
    let prune = async |client: &mut tokio_postgres::Client| {
        retention::prune(client, KEEP, None).await.unwrap()
    };
    assert_eq!(prune(&mut client).await, 20, "the old readings go");
    other.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        count(&client, "SELECT count(*) FROM tag_reading").await,
        500_000 - 20
    );
    // So the next pass summarizes those ranges again, once no transaction of the time is left
    // (of this test's database, or of the tests beside it, which write too): the next pass of
    // any writer, here one restarted in between.
    transactions_begun_before_now_ended(&client).await;
    drop(client);
    let mut client = test_db.connect().await;
    assert_eq!(prune(&mut client).await, 0);

    // A later pass, after more readings: what it reads is what came since, not the table, nor
    // the ranges deleted from before.
    insert(&client, 20_000, 5).await;
    let table_pages = count(
        &client,
        "SELECT pg_relation_size('tag_reading') / current_setting('block_size')::bigint",
    )
    .await;
    let before = pages_read(&client).await;
    let pruned = prune(&mut client).await;
    let read = pages_read(&client).await - before;
    assert_eq!(pruned, 5);
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM tag_reading WHERE time < now() - interval '365 days'"
        )
        .await,
        0
    );
    // 20,000 rows fill about 250 pages; a BRIN range is 128 pages. The 20 ranges deleted from
    // first are 2,560 pages.
    assert!(
        read < table_pages / 4,
        "a pass read {read} of the table's {table_pages} pages"
    );
    eprintln!("a pass read {read} of the table's {table_pages} pages");

    // Retention off deletes nothing and reads nothing.
    let before = pages_read(&client).await;
    assert_eq!(
        retention::prune(&mut client, Period(None), None)
            .await
            .unwrap(),
        0
    );
    assert_eq!(pages_read(&client).await, before);
}

/// Old message ids are found through the index on `ingested_at`, with or without statistics:
/// a pass that reads the whole table finds nothing there in the common case, and it holds a
/// month of ids.
#[tokio::test]
async fn a_retention_pass_deletes_old_ids_without_reading_the_whole_table() {
    let test_db = TestDb::create().await;
    let mut client = test_db.connect().await;
    db::migrate(&mut client).await.unwrap();
    // Recent ids, then a few of two months ago: a scan from the table's start meets them last.
    client
        .execute(
            "INSERT INTO ingested_message (id, ingested_at)
             SELECT gen_random_uuid(), now() - i * interval '1 ms' FROM generate_series(1, 200000) i",
            &[],
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO ingested_message (id, ingested_at)
             SELECT gen_random_uuid(), now() - interval '60 days' FROM generate_series(1, 7)",
            &[],
        )
        .await
        .unwrap();
    let table_pages = count(
        &client,
        "SELECT pg_relation_size('ingested_message') / current_setting('block_size')::bigint",
    )
    .await;
    const IDS: Option<Duration> = Some(Duration::from_secs(31 * 86_400));
    // With no statistics (as before the table's first ANALYZE), then with them.
    for analyzed in [false, true] {
        if analyzed {
            client
                .batch_execute("ANALYZE ingested_message")
                .await
                .unwrap();
        }
        let before = pages_read_of(&client, "ingested_message").await;
        let pruned = retention::prune(&mut client, Period(None), IDS)
            .await
            .unwrap();
        let read = pages_read_of(&client, "ingested_message").await - before;
        assert_eq!(pruned, if analyzed { 0 } else { 7 }, "the old ids go");
        assert!(
            read < table_pages / 10,
            "a pass read {read} of the table's {table_pages} pages (statistics: {analyzed})"
        );
        eprintln!("a pass read {read} of the table's {table_pages} pages (statistics: {analyzed})");
    }
    assert_eq!(
        count(&client, "SELECT count(*) FROM ingested_message").await,
        200_000
    );
}

/// The index's summaries need its owner; a writer running as another role still deletes.
#[tokio::test]
async fn a_writer_that_does_not_own_the_table_still_deletes_old_readings() {
    let test_db = TestDb::create().await;
    let mut admin = test_db.connect().await;
    db::migrate(&mut admin).await.unwrap();
    insert(&admin, 50_000, 10).await;
    let role = format!("dataviz_writer_{}", uuid::Uuid::now_v7().simple());
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN;
             GRANT SELECT, DELETE ON tag_reading, ingested_message TO {role}"
        ))
        .await
        .unwrap();
    let mut config: tokio_postgres::Config = test_db.url().parse().unwrap();
    let (mut writer, connection) = config
        .user(&role)
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let pruned = retention::prune(&mut writer, KEEP, None).await.unwrap();
    assert_eq!(pruned, 10);
    assert_eq!(
        count(
            &admin,
            "SELECT count(*) FROM tag_reading WHERE time < now() - interval '365 days'"
        )
        .await,
        0
    );
    drop(writer);
    admin
        .batch_execute(&format!(
            "REVOKE ALL ON tag_reading, ingested_message FROM {role}; DROP ROLE {role}"
        ))
        .await
        .unwrap();
}
