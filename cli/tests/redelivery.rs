//! Redelivery at each hop: a stage that stored its output but died before acknowledging its
//! input gets the input again; the rows are the same as if it had been delivered once. And the
//! writer's refusals: a unit PostgreSQL cannot store, or that cannot be read, goes to DEAD alone,
//! with the original message, which can be re-queued. And the processor's order within a fetch:
//! each device's messages decided in order, a bad one alone.

mod common;

use async_nats::jetstream::{self, consumer::PullConsumer};
use bytes::Bytes;
use dataviz_core::{
    consume::{self, Settle, Stage},
    message::{DeadLetter, RawMessage, ReadingsMessage},
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
        let mut fetched = consumer
            .fetch()
            .max_messages(n - out.len())
            .expires(Duration::from_secs(5))
            .messages()
            .await
            .unwrap();
        while let Some(message) = fetched.next().await {
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

/// Every message stored in READINGS, in order.
async fn readings_in_stream(hop: &Hop) -> Vec<bytes::Bytes> {
    let stream = hop.js.get_stream(streams::READINGS_STREAM).await.unwrap();
    let last = stream.get_info().await.unwrap().state.last_sequence;
    let mut out = Vec::new();
    for sequence in 1..=last {
        if let Ok(message) = stream.get_raw_message(sequence).await {
            out.push(message.payload);
        }
    }
    out
}

/// The batch ids of a READINGS message, each once.
fn ids(payload: &[u8]) -> std::collections::BTreeSet<uuid::Uuid> {
    ReadingsMessage::parse(payload)
        .unwrap()
        .iter()
        .map(|b| b.id)
        .collect()
}

const MESSAGES: usize = 20;

fn writer_stage(hop: &Hop) -> dataviz_writer::Writer {
    dataviz_writer::Writer::new(hop.pool.clone(), hop.js.clone())
}

async fn publish_raw(hop: &Hop) {
    publish_each(hop, |i| {
        format!(r#"{{"d": [{{"tag": "seq", "value": {i}}}, {{"tag": "AI.0", "value": 1.5}}]}}"#)
    })
    .await;
}

/// Stores [`MESSAGES`] raw messages in RAW, message `i` of `payload(i)`, for three devices.
async fn publish_each(hop: &Hop, payload: impl Fn(usize) -> String) {
    for i in 0..MESSAGES {
        let raw =
            RawMessage::received(format!("gateways/1/dev-{}", i % 3), Bytes::from(payload(i)));
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
    let processor = Processor::new(hop.pool.clone(), hop.js.clone(), PayloadLimits::default());
    let mut raw = consumer(&hop, streams::RAW_STREAM, hop.settings.processor_consumer()).await;

    // First delivery: READINGS stored, then the "crash": no ack.
    let first = take(&raw, MESSAGES).await;
    let settles = processor.handle(&first).await;
    assert!(
        settles.iter().all(|s| matches!(s, Settle::Done)),
        "{settles:?}"
    );
    drop(first);

    // After ack_wait, every message comes again; handled normally this time.
    let again = take(&raw, MESSAGES).await;
    assert!(again.iter().all(|m| m.info().unwrap().delivered == 2));
    consume::handle(&processor, &hop.js, &again).await;

    // The same batches packed alike: the second READINGS message is JetStream's duplicate.
    let readings = readings_in_stream(&hop).await;
    assert_eq!(readings.len(), 1, "one READINGS message, stored once");
    assert_eq!(ids(&readings[0]).len(), MESSAGES, "each unit once");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        pending(&mut raw).await,
        (0, 0),
        "every raw message acknowledged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_packing_its_redelivery_otherwise_still_stores_each_row_once() {
    let hop = hop().await;
    publish_raw(&hop).await;
    let processor = Processor::new(hop.pool.clone(), hop.js.clone(), PayloadLimits::default());
    let raw = consumer(&hop, streams::RAW_STREAM, hop.settings.processor_consumer()).await;

    // First delivery handled in two halves, stored, then the "crash": no ack.
    let first = take(&raw, MESSAGES).await;
    for half in first.chunks(MESSAGES / 2) {
        let settles = processor.handle(half).await;
        assert!(
            settles.iter().all(|s| matches!(s, Settle::Done)),
            "{settles:?}"
        );
    }
    drop(first);
    // The redelivery comes whole: packed otherwise, not JetStream's duplicate.
    consume::handle(&processor, &hop.js, &take(&raw, MESSAGES).await).await;
    let readings = readings_in_stream(&hop).await;
    assert_eq!(readings.len(), 3);
    let units: usize = readings.iter().map(|r| ids(r).len()).sum();
    assert_eq!(units, 2 * MESSAGES, "every unit twice in READINGS");

    let writer = consumer(
        &hop,
        streams::READINGS_STREAM,
        hop.settings.writer_consumer(),
    )
    .await;
    consume::handle(&writer_stage(&hop), &hop.js, &take(&writer, 3).await).await;
    let rows = common::count_on(&hop.db, "SELECT count(*) FROM tag_reading").await;
    assert_eq!(rows, 2 * MESSAGES as i64, "each reading once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_dying_before_its_ack_stores_each_row_once() {
    let hop = hop().await;
    publish_raw(&hop).await;
    let processor = Processor::new(hop.pool.clone(), hop.js.clone(), PayloadLimits::default());
    let raw = consumer(&hop, streams::RAW_STREAM, hop.settings.processor_consumer()).await;
    consume::handle(&processor, &hop.js, &take(&raw, MESSAGES).await).await;

    let mut readings = consumer(
        &hop,
        streams::READINGS_STREAM,
        hop.settings.writer_consumer(),
    )
    .await;
    let first = take(&readings, 1).await;
    let units = ReadingsMessage::parse(&first[0].payload).unwrap();
    // Committed, then the "crash": no ack.
    let written = dataviz_writer::write(&hop.pool, &Default::default(), &units)
        .await
        .unwrap();
    assert_eq!(
        (written.messages, written.rows),
        (MESSAGES, 2 * MESSAGES as u64)
    );
    drop(first);

    let again = take(&readings, 1).await;
    assert_eq!(again[0].info().unwrap().delivered, 2);
    consume::handle(&writer_stage(&hop), &hop.js, &again).await;

    let count = |sql| common::count_on(&hop.db, sql);
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
        "every unit acknowledged"
    );

    // A replay long after, past JetStream's duplicate window: still no new row.
    let again = dataviz_writer::write(&hop.pool, &Default::default(), &units)
        .await
        .unwrap();
    assert_eq!(
        (again.messages, again.duplicates, again.rows),
        (0, MESSAGES, 0)
    );
    assert_eq!(
        count("SELECT count(*) FROM tag_reading").await,
        2 * MESSAGES as i64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_postgresql_refuses_goes_to_dead_alone_and_its_neighbours_are_stored() {
    use dataviz_core::message::{DeadLetter, MessageReadings, TagReading};
    use dataviz_core::value::Value;
    let hop = hop().await;
    let unit = |device: i64, value: Value| MessageReadings {
        raw_seq: None,
        id: uuid::Uuid::now_v7(),
        gateway_id: 1,
        device_id: device,
        device_code: format!("dev-{device}"),
        time: chrono::Utc::now(),
        received_at: chrono::Utc::now(),
        readings: vec![TagReading {
            tag_id: device,
            tag: "t".into(),
            value,
        }],
    };
    // PostgreSQL text cannot hold NUL: a batch only a hand-made message can carry.
    let refused = unit(2, Value::Text("a\0b".into()));
    let first = [
        unit(1, Value::Integer(1)),
        refused.clone(),
        unit(3, Value::Integer(3)),
    ];
    let second = [unit(4, Value::Integer(4))];
    for units in [&first[..], &second[..]] {
        for m in ReadingsMessage::pack(units).0 {
            streams::publish_readings(&hop.js, &m).await.unwrap();
        }
    }
    let mut writer = consumer(
        &hop,
        streams::READINGS_STREAM,
        hop.settings.writer_consumer(),
    )
    .await;
    let settled = consume::handle(&writer_stage(&hop), &hop.js, &take(&writer, 2).await).await;
    assert_eq!((settled.done, settled.dead, settled.retried), (1, 1, 0));

    let client = hop.db.connect().await;
    let devices: Vec<i64> = client
        .query("SELECT device_id FROM tag_reading ORDER BY device_id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(devices, [1, 3, 4], "the other units stored");
    let dead = hop.js.get_stream(streams::DEAD_STREAM).await.unwrap();
    assert_eq!(dead.get_info().await.unwrap().state.messages, 1);
    let stored = dead.get_raw_message(1).await.unwrap();
    let letter = DeadLetter::from_parts(Some(&stored.headers), stored.payload).unwrap();
    assert_eq!(
        (letter.stage.as_str(), letter.reason.name()),
        ("writer", "unstorable")
    );
    assert_eq!(letter.raw.id, refused.id);
    // No original in RAW for a hand-made unit: a payload the processor reads back into it.
    assert_eq!(letter.raw.topic, "gateways/1/dev-2");
    let payload = dataviz_core::payload::parse(&letter.raw.payload, &PayloadLimits::default())
        .expect("a device payload");
    assert_eq!(payload.ts, Some(refused.time), "the unit's time");
    assert_eq!(
        payload.readings,
        [("t".to_owned(), refused.readings[0].value.clone())],
        "the refused unit's readings alone"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        pending(&mut writer).await,
        (0, 0),
        "both messages acknowledged"
    );
}

/// Publishes a raw message to RAW as the bridge does; returns its sequence there.
async fn publish_to_raw(hop: &Hop, raw: &RawMessage) -> u64 {
    streams::publish_stored(
        &hop.js,
        raw.subject(),
        raw.headers(None),
        raw.payload.clone(),
    )
    .await
    .unwrap()
    .sequence
}

/// The dead letters in DEAD, with their sequences.
async fn dead_letters(hop: &Hop) -> Vec<(u64, DeadLetter)> {
    let stream = hop.js.get_stream(streams::DEAD_STREAM).await.unwrap();
    let last = stream.get_info().await.unwrap().state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        if let Ok(m) = stream.get_raw_message(seq).await {
            out.push((
                seq,
                DeadLetter::from_parts(Some(&m.headers), m.payload).unwrap(),
            ));
        }
    }
    out
}

async fn rows_of(hop: &Hop, tag: &str) -> i64 {
    hop.db
        .connect()
        .await
        .query_one(
            "SELECT count(*) FROM tag_reading r JOIN tag t ON t.id = r.tag_id WHERE t.code = $1",
            &[&tag],
        )
        .await
        .unwrap()
        .get(0)
}

/// One fetch of RAW, with devices the registry's cache knows: a message changing a tag's type
/// waits on the database, and the later message of the same device with the old type, which
/// the cache alone could answer, waits behind it, so the tag takes the latest message's type;
/// another known device, a new one and a message that cannot be read, in the middle of the
/// fetch, are each decided alone; the units reach READINGS in the fetch's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_keeps_each_devices_order_and_a_bad_message_in_it_goes_alone() {
    let hop = hop().await;
    let processor = Processor::new(hop.pool.clone(), hop.js.clone(), PayloadLimits::default());
    let raw = consumer(&hop, streams::RAW_STREAM, hop.settings.processor_consumer()).await;
    let message = |device: &str, value: &str| {
        let payload = format!(r#"{{"d": [{{"tag": "T", "value": {value}}}]}}"#);
        RawMessage::received(format!("gateways/1/{device}"), Bytes::from(payload))
    };
    // dev-a and dev-b known, their tag T an integer.
    for device in ["dev-a", "dev-b"] {
        publish_to_raw(&hop, &message(device, "1")).await;
    }
    let known = take(&raw, 2).await;
    consume::handle(&processor, &hop.js, &known).await;

    let fetch = [
        ("dev-a", r#""on""#),
        ("dev-b", "2"),
        ("dev-a", "not json"),
        ("dev-a", "3"),
        ("dev-c", "4"),
    ];
    for (device, value) in fetch {
        publish_to_raw(&hop, &message(device, value)).await;
    }
    let fetched = take(&raw, fetch.len()).await;
    let settles = processor.handle(&fetched).await;
    assert!(
        matches!(
            settles[..],
            [
                Settle::Done,
                Settle::Done,
                Settle::Dead(_),
                Settle::Done,
                Settle::Done
            ]
        ),
        "{settles:?}"
    );
    let types: Vec<(String, String)> = hop
        .db
        .connect()
        .await
        .query(
            "SELECT d.code, t.data_type FROM tag t JOIN device d ON d.id = t.device_id
             WHERE t.code = 'T' ORDER BY d.code",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let owned = |d: &str, t: &str| (d.to_owned(), t.to_owned());
    assert_eq!(
        types,
        [
            owned("dev-a", "integer"),
            owned("dev-b", "integer"),
            owned("dev-c", "integer")
        ],
        "dev-a's tag takes its latest message's type"
    );
    let readings = readings_in_stream(&hop).await;
    let last = ReadingsMessage::parse(readings.last().expect("a READINGS message")).unwrap();
    let order: Vec<(&str, String)> = last
        .iter()
        .map(|unit| {
            (
                unit.device_code.as_str(),
                format!("{:?}", unit.readings[0].value),
            )
        })
        .collect();
    assert_eq!(
        order,
        [
            ("dev-a", r#"Text("on")"#.to_owned()),
            ("dev-b", "Integer(2)".to_owned()),
            ("dev-a", "Integer(3)".to_owned()),
            ("dev-c", "Integer(4)".to_owned()),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_letter_the_writer_makes_carries_the_original_and_requeues_into_rows() {
    use dataviz_core::message::{MessageReadings, TagReading};
    use dataviz_core::value::Value;
    let hop = hop().await;
    let original = RawMessage::received(
        "gateways/1/plc-9".into(),
        Bytes::from_static(br#"{"d": [{"tag": "kept", "value": 7}]}"#),
    );
    let raw_seq = publish_to_raw(&hop, &original).await;
    // A unit of that message PostgreSQL refuses (NUL in text: only a hand-made unit has it).
    let refused = MessageReadings {
        raw_seq: Some(raw_seq),
        id: original.id,
        gateway_id: 1,
        device_id: 1,
        device_code: "plc-9".into(),
        time: chrono::Utc::now(),
        received_at: original.received_at,
        readings: vec![TagReading {
            tag_id: 1,
            tag: "kept".into(),
            value: Value::Text("a\0b".into()),
        }],
    };
    for m in ReadingsMessage::pack([&refused]).0 {
        streams::publish_readings(&hop.js, &m).await.unwrap();
    }
    let writer = consumer(
        &hop,
        streams::READINGS_STREAM,
        hop.settings.writer_consumer(),
    )
    .await;
    let settled = consume::handle(&writer_stage(&hop), &hop.js, &take(&writer, 1).await).await;
    assert_eq!((settled.done, settled.dead), (0, 1));
    let letters = dead_letters(&hop).await;
    assert_eq!(letters.len(), 1);
    let (seq, letter) = &letters[0];
    assert_eq!(letter.stage, "writer");
    assert_eq!(letter.reason.name(), "unstorable");
    assert_eq!(
        letter.raw, original,
        "the original topic, payload, id and time"
    );

    // Re-queued: the processor reads the original again, and the writer stores its reading.
    dataviz_core::dead::requeue(&hop.js, *seq).await.unwrap();
    let processor = Processor::new(hop.pool.clone(), hop.js.clone(), PayloadLimits::default());
    let raw = consumer(&hop, streams::RAW_STREAM, hop.settings.processor_consumer()).await;
    // The original and its re-queued copy: one unit id, stored once.
    let settled = consume::handle(&processor, &hop.js, &take(&raw, 2).await).await;
    assert_eq!(settled.done, 2);
    consume::handle(&writer_stage(&hop), &hop.js, &take(&writer, 1).await).await;
    assert_eq!(rows_of(&hop, "kept").await, 1);
    assert!(dead_letters(&hop).await.is_empty(), "the letter left DEAD");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_that_cannot_be_read_takes_no_neighbour_with_it() {
    unit_that_cannot_be_read(|units| ReadingsMessage::pack(units).0[0].payload()).await;
}

/// The same with a message in the JSON form that READINGS carried before the binary encoding
/// (what an earlier processor left in the stream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_of_the_json_form_that_cannot_be_read_takes_no_neighbour_with_it() {
    unit_that_cannot_be_read(|units| serde_json::to_vec(units).unwrap().into()).await;
}

/// A READINGS message (made by `payload_of`) of a unit too deep for serde_json to read back
/// (its JSON value) between two good ones, written.
async fn unit_that_cannot_be_read(
    payload_of: impl Fn(&[dataviz_core::message::MessageReadings]) -> Bytes,
) {
    use dataviz_core::message::{MessageReadings, TagReading};
    use dataviz_core::value::Value;
    let hop = hop().await;
    let original = RawMessage::received(
        "gateways/1/plc-deep".into(),
        Bytes::from_static(br#"{"d": [{"tag": "deep", "value": 1}]}"#),
    );
    let raw_seq = publish_to_raw(&hop, &original).await;
    let unit = |device_id: i64, value: Value| MessageReadings {
        raw_seq: None,
        id: uuid::Uuid::now_v7(),
        gateway_id: 1,
        device_id,
        device_code: "plc-good".into(),
        time: chrono::Utc::now(),
        received_at: chrono::Utc::now(),
        readings: vec![TagReading {
            tag_id: 1,
            tag: "good".into(),
            value,
        }],
    };
    let mut deep_value = serde_json::json!(1);
    for _ in 0..130 {
        deep_value = serde_json::json!([deep_value]);
    }
    let deep = MessageReadings {
        raw_seq: Some(raw_seq),
        id: original.id,
        device_code: "plc-deep".into(),
        ..unit(1, Value::Json(deep_value))
    };
    let units = [
        unit(101, Value::Integer(1)),
        deep,
        unit(102, Value::Integer(1)),
    ];
    let payload = payload_of(&units);
    assert!(ReadingsMessage::parse(&payload).is_err());
    hop.js
        .publish(streams::readings_subject(1), payload)
        .await
        .unwrap()
        .await
        .unwrap();
    let writer = consumer(
        &hop,
        streams::READINGS_STREAM,
        hop.settings.writer_consumer(),
    )
    .await;
    let settled = consume::handle(&writer_stage(&hop), &hop.js, &take(&writer, 1).await).await;
    assert_eq!(settled.dead, 1, "acknowledged once its letter is stored");
    let client = hop.db.connect().await;
    let devices: Vec<i64> = client
        .query("SELECT device_id FROM tag_reading ORDER BY device_id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(devices, [101, 102], "the units around it are stored");
    let letters = dead_letters(&hop).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].1.reason.name(), "bad_batch");
    assert_eq!(
        letters[0].1.raw, original,
        "the letter carries the original message"
    );
}

/// Writers racing on the same units (the writer's loops, or several writers, holding a unit
/// and its redelivery at once), each in its own order: every write succeeds, no deadlock
/// between them, and each unit is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_racing_on_the_same_units_store_each_once() {
    use dataviz_core::ingested::EarlierIds;
    use dataviz_core::message::{MessageReadings, TagReading};
    use dataviz_core::value::Value;
    const UNITS: usize = 3000;
    const WRITERS: usize = 4;
    // Rounds of their own units: a deadlock between orders is a race, not a certainty.
    const ROUNDS: usize = 3;
    let hop = hop().await;
    let earlier = EarlierIds::default();
    for round in 0..ROUNDS {
        let units: Vec<MessageReadings> = (0..UNITS)
            .map(|i| MessageReadings {
                raw_seq: None,
                id: uuid::Uuid::now_v7(),
                gateway_id: 1,
                device_id: i as i64,
                device_code: format!("dev-{i}"),
                time: chrono::Utc::now(),
                received_at: chrono::Utc::now(),
                readings: vec![TagReading {
                    tag_id: 1,
                    tag: "t".into(),
                    value: Value::Integer(i as i64),
                }],
            })
            .collect();
        let writes = (0..WRITERS).map(|w| {
            // Each writer its own order of the same units.
            let mut mine = units.clone();
            mine.rotate_left(w * UNITS / WRITERS);
            if w % 2 == 1 {
                mine.reverse();
            }
            let (pool, earlier) = (hop.pool.clone(), earlier.clone());
            tokio::spawn(async move { dataviz_writer::write(&pool, &earlier, &mine).await })
        });
        let written: Vec<_> = futures::future::join_all(writes)
            .await
            .into_iter()
            .map(|w| w.unwrap().expect("every write succeeds"))
            .collect();
        assert_eq!(written.iter().map(|w| w.messages).sum::<usize>(), UNITS);
        assert_eq!(
            written.iter().map(|w| w.duplicates).sum::<usize>(),
            UNITS * (WRITERS - 1)
        );
        let rows = common::count_on(&hop.db, "SELECT count(*) FROM tag_reading").await;
        assert_eq!(rows, (UNITS * (round + 1)) as i64);
    }
}

/// An upgrade from a version that stored message ids as they were, not under their keys:
/// copies of the messages it stored are still recognised (by the id itself) while such ids
/// remain, and not looked for once the retention forgot them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_stored_before_the_keys_are_stored_once_after_the_upgrade() {
    use dataviz_core::ingested::{self, EarlierIds};
    let hop = hop().await;
    // Half with `ts` (their ids derived from their content), half without (the raw ids).
    publish_each(&hop, |i| {
        let ts = match i % 2 {
            0 => format!(r#", "ts": "2026-01-01T00:00:{i:02}.5Z""#),
            _ => String::new(),
        };
        format!(r#"{{"d": [{{"tag": "seq", "value": {i}}}]{ts}}}"#)
    })
    .await;
    let processor = Processor::new(hop.pool.clone(), hop.js.clone(), PayloadLimits::default());
    let raw = consumer(&hop, streams::RAW_STREAM, hop.settings.processor_consumer()).await;
    consume::handle(&processor, &hop.js, &take(&raw, MESSAGES).await).await;
    let readings = consumer(
        &hop,
        streams::READINGS_STREAM,
        hop.settings.writer_consumer(),
    )
    .await;
    let message = take(&readings, 1).await.remove(0);
    let units = ReadingsMessage::parse(&message.payload).unwrap();
    assert_eq!(units.len(), MESSAGES);
    let (earlier, later) = units.split_at(MESSAGES / 2);

    // The database as the earlier version left it: migration 5 not applied, and the first
    // half stored with their ids as they are.
    let mut admin = hop.db.connect().await;
    admin
        .batch_execute(
            "DROP TABLE ingested_message_keyed; DELETE FROM schema_migration WHERE version = 5",
        )
        .await
        .unwrap();
    let earlier_ids: Vec<uuid::Uuid> = earlier.iter().map(|u| u.id).collect();
    {
        let tx = admin.transaction().await.unwrap();
        tx.execute(
            "INSERT INTO ingested_message (id, ingested_at)
             SELECT unnest($1::uuid[]), now() - interval '1 hour'",
            &[&earlier_ids],
        )
        .await
        .unwrap();
        dataviz_writer::copy_rows(&tx, "tag_reading", earlier.iter())
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    assert!(
        earlier
            .iter()
            .filter(|u| u.time != u.received_at)
            .all(|u| ingested::key(u) != u.id),
        "a content id is not its key"
    );
    let report = dataviz_core::db::migrate(&mut admin).await.unwrap();
    assert_eq!(report.applied, ["0005_ingested_keys"]);

    // The upgraded writer gets every unit: the earlier half again (a redelivery, a replay),
    // the later half for the first time.
    let writer = writer_stage(&hop);
    let client = hop.pool.get().await.unwrap();
    assert_eq!(
        ingested::stored(&client, &writer.earlier, &units)
            .await
            .unwrap(),
        earlier_ids.iter().copied().collect(),
        "found by their ids"
    );
    let written = dataviz_writer::write(&hop.pool, &writer.earlier, &units)
        .await
        .unwrap();
    assert_eq!(
        (written.messages, written.duplicates, written.rows),
        (later.len(), earlier.len(), later.len() as u64)
    );
    let count = |sql| common::count_on(&hop.db, sql);
    assert_eq!(
        count("SELECT count(*) FROM tag_reading").await,
        MESSAGES as i64
    );
    // Every unit is now stored under its key too: later copies meet their key.
    let keys: Vec<uuid::Uuid> = units.iter().map(ingested::key).collect();
    assert_eq!(
        ingested::stored_keys(&client, &keys).await.unwrap().len(),
        MESSAGES
    );
    let again = dataviz_writer::write(&hop.pool, &writer.earlier, &units)
        .await
        .unwrap();
    assert_eq!((again.messages, again.rows), (0, 0));

    // Past the id retention the ids from before the keys are gone. What remains is looked
    // for while any of it was stored up to a day after the keys began (a writer of an earlier
    // version stopped late), and no longer once all of it is later than that.
    admin
        .batch_execute(
            "DELETE FROM ingested_message WHERE ingested_at < now() - interval '30 minutes';
             UPDATE ingested_message_keyed SET since = now() - interval '1 day' + interval '1 minute'",
        )
        .await
        .unwrap();
    assert!(EarlierIds::default().held(&client).await.unwrap());
    admin
        .batch_execute(
            "UPDATE ingested_message_keyed SET since = now() - interval '1 day' - interval '1 minute'",
        )
        .await
        .unwrap();
    let fresh = EarlierIds::default();
    assert!(!fresh.held(&client).await.unwrap());
    assert!(
        writer.earlier.held(&client).await.unwrap(),
        "known for ten minutes"
    );
    assert_eq!(
        count("SELECT count(*) FROM tag_reading").await,
        MESSAGES as i64
    );
}

/// A database that never held an id before the keys has nothing to look for.
#[tokio::test]
async fn a_new_database_looks_for_no_earlier_id() {
    let db = TestDb::create().await;
    dataviz_core::db::migrate(&mut db.connect().await)
        .await
        .unwrap();
    let marks = common::count_on(&db, "SELECT count(*) FROM ingested_message_keyed").await;
    assert_eq!(marks, 0);
    let client = db.connect().await;
    assert!(
        !dataviz_core::ingested::EarlierIds::default()
            .held(&client)
            .await
            .unwrap()
    );
}
