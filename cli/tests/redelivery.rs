//! Redelivery at each hop: a stage that stored its output but died before acknowledging its
//! input gets the input again; the rows are the same as if it had been delivered once.

mod common;

use async_nats::jetstream::{self, consumer::PullConsumer};
use bytes::Bytes;
use dataviz_core::{
    message::{RawMessage, TagReadingsBatch},
    payload::PayloadLimits,
    streams::{self, StreamSettings},
};
use dataviz_processor::Processor;
use dataviz_testkit::{NatsServer, TestDb};
use futures::StreamExt;
use std::time::Duration;

struct Hop {
    _nats: NatsServer,
    db: TestDb,
    js: jetstream::Context,
    settings: StreamSettings,
    pool: deadpool_postgres::Pool,
}

async fn hop() -> Hop {
    let nats = NatsServer::start();
    let db = TestDb::create().await;
    dataviz_core::db::migrate(&mut db.connect().await)
        .await
        .unwrap();
    db.connect()
        .await
        .execute("INSERT INTO gateway (id, name) VALUES (1, 'g')", &[])
        .await
        .unwrap();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = dataviz_core::config::jetstream(client.clone());
    let settings = StreamSettings {
        ack_wait: Duration::from_secs(1),
        ..Default::default()
    };
    streams::ensure(&client, &js, &settings).await.unwrap();
    let pool = dataviz_core::db::pool(db.url(), 2).unwrap();
    Hop {
        _nats: nats,
        db,
        js,
        settings,
        pool,
    }
}

/// Takes exactly `n` messages from a durable consumer.
async fn take(consumer: &PullConsumer, n: usize) -> Vec<jetstream::Message> {
    let mut out = Vec::new();
    while out.len() < n {
        let mut batch = consumer
            .fetch()
            .max_messages(n - out.len())
            .expires(Duration::from_secs(5))
            .messages()
            .await
            .unwrap();
        while let Some(message) = batch.next().await {
            out.push(message.unwrap());
        }
    }
    out
}

async fn consumer(
    hop: &Hop,
    stream: &str,
    config: jetstream::consumer::pull::Config,
) -> PullConsumer {
    hop.js
        .get_stream(stream)
        .await
        .unwrap()
        .create_consumer(config)
        .await
        .unwrap()
}

async fn pending(consumer: &mut PullConsumer) -> (u64, usize) {
    let info = consumer.info().await.unwrap();
    (info.num_pending, info.num_ack_pending)
}

const MESSAGES: usize = 20;

async fn publish_raw(hop: &Hop) {
    for i in 0..MESSAGES {
        let raw = RawMessage::received(
            format!("gateways/1/dev-{}", i % 3),
            Bytes::from(format!(
                r#"{{"d": [{{"tag": "seq", "value": {i}}}, {{"tag": "AI.0", "value": 1.5}}]}}"#
            )),
        );
        hop.js
            .publish_with_headers(raw.subject(), raw.headers(None), raw.payload.clone())
            .await
            .unwrap()
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_dying_before_its_ack_publishes_each_batch_once() {
    let hop = hop().await;
    publish_raw(&hop).await;
    let processor = Processor::new(hop.pool.clone(), PayloadLimits::default());
    let mut raw = consumer(&hop, streams::RAW_STREAM, hop.settings.processor_consumer()).await;

    // First delivery: READINGS stored, then the "crash": no ack.
    let first = take(&raw, MESSAGES).await;
    let stored = processor.process(&hop.js, &first).await;
    assert!(stored.iter().all(Result::is_ok), "{stored:?}");
    drop(first);

    // After ack_wait, every message comes again; handled normally this time.
    let again = take(&raw, MESSAGES).await;
    assert!(again.iter().all(|m| m.info().unwrap().delivered == 2));
    processor.handle_messages(&hop.js, again).await;

    let readings = hop
        .js
        .get_stream(streams::READINGS_STREAM)
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap();
    assert_eq!(
        readings.state.messages as usize, MESSAGES,
        "each batch once in READINGS"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        pending(&mut raw).await,
        (0, 0),
        "every raw message acknowledged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_dying_before_its_ack_stores_each_row_once() {
    let hop = hop().await;
    publish_raw(&hop).await;
    let processor = Processor::new(hop.pool.clone(), PayloadLimits::default());
    let raw = consumer(&hop, streams::RAW_STREAM, hop.settings.processor_consumer()).await;
    processor
        .handle_messages(&hop.js, take(&raw, MESSAGES).await)
        .await;

    let mut readings = consumer(
        &hop,
        streams::READINGS_STREAM,
        hop.settings.writer_consumer(),
    )
    .await;
    let first = take(&readings, MESSAGES).await;
    let batches: Vec<TagReadingsBatch> = first
        .iter()
        .map(|m| serde_json::from_slice(&m.payload).unwrap())
        .collect();
    // Committed, then the "crash": no ack.
    let written = dataviz_writer::write(&hop.pool, &batches).await.unwrap();
    assert_eq!(
        (written.messages, written.rows),
        (MESSAGES, 2 * MESSAGES as u64)
    );
    drop(first);

    let again = take(&readings, MESSAGES).await;
    assert!(again.iter().all(|m| m.info().unwrap().delivered == 2));
    dataviz_writer::handle_messages(&hop.js, &hop.pool, again).await;

    let client = hop.db.connect().await;
    let count = |sql: &'static str| {
        let client = &client;
        async move { client.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    assert_eq!(
        count("SELECT count(*) FROM tag_reading").await,
        2 * MESSAGES as i64
    );
    assert_eq!(
        count("SELECT count(DISTINCT value_num)::bigint FROM tag_reading r JOIN tag t ON t.id = r.tag_id WHERE t.code = 'seq'").await,
        MESSAGES as i64
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        pending(&mut readings).await,
        (0, 0),
        "every batch acknowledged"
    );

    // A replay long after, past JetStream's duplicate window: still no new row.
    let again = dataviz_writer::write(&hop.pool, &batches).await.unwrap();
    assert_eq!(
        (again.messages, again.duplicates, again.rows),
        (0, MESSAGES, 0)
    );
    assert_eq!(
        count("SELECT count(*) FROM tag_reading").await,
        2 * MESSAGES as i64
    );
}
