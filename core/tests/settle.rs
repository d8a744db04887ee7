//! The settle contract against a real JetStream: whatever a stage decides, the consume loop
//! stores the dead letters, acknowledges what is done or dead and hands back what must be
//! retried; a message whose letter DEAD does not store is not acknowledged.

use async_nats::jetstream;
use bytes::Bytes;
use dataviz_core::{
    consume::{self, Failure, Settle, Stage},
    message::{DeadLetter, DeadReason, RawMessage},
    ops::Progress,
    shutdown::Shutdown,
    streams::{self, StreamSettings},
};
use dataviz_testkit::NatsServer;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

mod common;

/// Settles each message as its payload says: `done`, `dead`, or `retry-N` (retried until its
/// N-th delivery, then done). Counts what it was handed (by the payload's first 16 bytes), and
/// the most payload bytes one fetch handed it; takes `pause` over each fetch.
#[derive(Default)]
struct Scripted {
    handled: Mutex<HashMap<String, u32>>,
    largest_fetch: Mutex<usize>,
    pause: Duration,
}

impl Stage for Scripted {
    const NAME: &'static str = "scripted";

    async fn handle(&self, messages: &[jetstream::Message]) -> Vec<Settle> {
        let bytes = messages.iter().map(|m| m.payload.len()).sum();
        {
            let mut largest = self.largest_fetch.lock().unwrap();
            *largest = (*largest).max(bytes);
        }
        tokio::time::sleep(self.pause).await;
        messages
            .iter()
            .map(|message| {
                let raw = RawMessage::from_parts(message.headers.as_ref(), message.payload.clone())
                    .expect("a raw message");
                let what = String::from_utf8(raw.payload.to_vec()).unwrap();
                let what: String = what.chars().take(16).collect();
                *self
                    .handled
                    .lock()
                    .unwrap()
                    .entry(what.clone())
                    .or_default() += 1;
                let delivered = message.info().unwrap().delivered;
                if let Some(n) = what.strip_prefix("retry-") {
                    if delivered < n.parse::<i64>().unwrap() {
                        return Settle::retry(Failure::Database, "not yet");
                    }
                    return Settle::Done;
                }
                if what.starts_with("done") {
                    return Settle::Done;
                }
                Settle::dead(DeadLetter {
                    raw,
                    stage: Self::NAME.into(),
                    reason: DeadReason::BadPayload,
                    error: format!("{what} is refused"),
                    source_seq: None,
                    whole_size: None,
                })
            })
            .collect()
    }
}

impl AsRef<Scripted> for Scripted {
    fn as_ref(&self) -> &Scripted {
        self
    }
}

struct Setup {
    _nats: NatsServer,
    js: jetstream::Context,
    settings: StreamSettings,
}

async fn setup() -> Setup {
    let (nats, js) = common::with_streams().await;
    Setup {
        _nats: nats,
        js,
        settings: StreamSettings::default(),
    }
}

async fn publish<P: AsRef<str>>(js: &jetstream::Context, payloads: &[P]) {
    for payload in payloads {
        let raw = RawMessage::received(
            "gateways/1/plc".into(),
            Bytes::from(payload.as_ref().as_bytes().to_vec()),
        );
        streams::publish_stored(js, raw.subject(), raw.headers(None), raw.payload)
            .await
            .unwrap();
    }
}

/// The dead letters in DEAD: (payload, topic, reason, stage).
async fn dead_letters(js: &jetstream::Context) -> Vec<(String, String, DeadReason, String)> {
    let stream = js.get_stream(streams::DEAD_STREAM).await.unwrap();
    let count = stream.get_info().await.unwrap().state.messages;
    let mut letters = Vec::new();
    for seq in 1..=count {
        let stored = stream.get_raw_message(seq).await.unwrap();
        let letter = DeadLetter::from_parts(Some(&stored.headers), stored.payload).unwrap();
        letters.push((
            String::from_utf8(letter.raw.payload.to_vec()).unwrap(),
            letter.raw.topic,
            letter.reason,
            letter.stage,
        ));
    }
    letters
}

/// Runs the loop over RAW, 10 messages a fetch, until `done` says so (checked every 50 ms, at
/// most 30 s).
async fn run_until<F, Fut>(setup: &Setup, stage: &Scripted, done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    run_until_batch(setup, stage, 10, done).await;
}

async fn run_until_batch<S, F, Fut>(setup: &Setup, stage: &S, batch: usize, mut done: F)
where
    S: Stage + AsRef<Scripted>,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let shutdown = Shutdown::new();
    let progress = Progress::new(S::NAME);
    let run = consume::run(
        stage,
        &setup.js,
        streams::RAW_STREAM,
        setup.settings.processor_consumer(),
        batch,
        &progress,
        &shutdown,
    );
    let watch = async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !done().await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "not settled in 30 s: {:?}",
                stage.as_ref().handled.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        shutdown.cancel();
    };
    let (ran, ()) = tokio::join!(run, watch);
    ran.unwrap();
}

/// The durable consumer the loop reads RAW with.
async fn consumer(js: &jetstream::Context) -> jetstream::consumer::PullConsumer {
    js.get_stream(streams::RAW_STREAM)
        .await
        .unwrap()
        .get_consumer(streams::PROCESSOR_CONSUMER)
        .await
        .unwrap()
}

async fn consumer_idle(js: &jetstream::Context) -> bool {
    let info = consumer(js).await.info().await.unwrap().clone();
    info.num_pending == 0 && info.num_ack_pending == 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_message_is_settled_as_its_stage_decided() {
    let setup = setup().await;
    publish(
        &setup.js,
        &["done-a", "dead-b", "retry-3", "done-c", "dead-d"],
    )
    .await;
    let stage = Scripted::default();
    run_until(&setup, &stage, || async {
        consumer_idle(&setup.js).await && dead_letters(&setup.js).await.len() == 2
    })
    .await;
    let handled = stage.handled.lock().unwrap().clone();
    assert_eq!(handled["done-a"], 1, "a done message is acknowledged");
    assert_eq!(handled["done-c"], 1);
    assert_eq!(handled["dead-b"], 1, "a dead message is acknowledged");
    assert_eq!(
        handled["retry-3"], 3,
        "retried until it passed, then acknowledged"
    );
    let letters = dead_letters(&setup.js).await;
    let mut payloads: Vec<_> = letters.iter().map(|l| l.0.as_str()).collect();
    payloads.sort();
    assert_eq!(payloads, ["dead-b", "dead-d"]);
    for (_, topic, reason, stage) in &letters {
        assert_eq!(
            (topic.as_str(), *reason, stage.as_str()),
            ("gateways/1/plc", DeadReason::BadPayload, "scripted"),
            "a letter keeps the original topic and payload"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_letter_dead_refuses_is_handed_back_not_acknowledged() {
    let setup = setup().await;
    // DEAD away: a letter cannot be stored, so its message must come back.
    setup.js.delete_stream(streams::DEAD_STREAM).await.unwrap();
    publish(&setup.js, &["done-a", "dead-b"]).await;
    let stage = Scripted::default();
    run_until(&setup, &stage, || async {
        stage.handled.lock().unwrap().get("dead-b").copied() >= Some(2)
    })
    .await;
    let handled = stage.handled.lock().unwrap().clone();
    assert_eq!(handled["done-a"], 1);
    // DEAD back: the next delivery's letter is stored, and the message acknowledged.
    setup.js.create_stream(setup.settings.dead()).await.unwrap();
    run_until(&setup, &stage, || async {
        consumer_idle(&setup.js).await && dead_letters(&setup.js).await.len() == 1
    })
    .await;
    assert_eq!(dead_letters(&setup.js).await[0].0, "dead-b");
    assert_eq!(stage.handled.lock().unwrap()["done-a"], 1, "never again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_handed_back_whole_is_no_progress_and_comes_back() {
    let setup = setup().await;
    publish(&setup.js, &["retry-2"]).await;
    let stage = Scripted::default();
    let settled = consume::handle(&stage, &setup.js, &take_one(&setup).await).await;
    assert_eq!((settled.done, settled.dead, settled.retried), (0, 0, 1));
    assert!(!settled.progressed());
    // Handed back with a delay, not left to ack_wait (30 s): it comes again within seconds.
    let again = take_one(&setup).await;
    assert_eq!(again[0].info().unwrap().delivered, 2);
    let settled = consume::handle(&stage, &setup.js, &again).await;
    assert_eq!((settled.done, settled.retried), (1, 0));
    assert!(settled.progressed());
}

/// Large messages: a fetch is bounded by bytes as well as by count, and a message as large as
/// the server takes still goes through (a pull's byte limit under it would stop the consumer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_is_bounded_by_bytes_and_the_largest_message_passes() {
    let setup = setup().await;
    let max_payload = setup.js.client().server_info().max_payload;
    let mib = |n: usize| format!("done-{n:04}-{}", "x".repeat(1024 * 1024));
    let mut payloads: Vec<String> = (0..60).map(mib).collect();
    // The largest a message can be here, headers and all.
    payloads.push(format!("done-big-{}", "y".repeat(max_payload - 4096)));
    publish(&setup.js, &payloads).await;
    let stage = Scripted {
        pause: Duration::from_millis(300),
        ..Default::default()
    };
    run_until_batch(&setup, &stage, 500, || async {
        consumer_idle(&setup.js).await
    })
    .await;
    assert_eq!(
        stage.handled.lock().unwrap().len(),
        61,
        "every message handled"
    );
    let largest = *stage.largest_fetch.lock().unwrap();
    let limit = consume::fetch_bytes(max_payload);
    assert!(
        largest <= 2 * limit,
        "a fetch of {largest} bytes: over twice the pull's limit of {limit} (61 MiB were waiting)"
    );
}

async fn take_one(setup: &Setup) -> Vec<jetstream::Message> {
    let mut batch = consumer(&setup.js)
        .await
        .fetch()
        .max_messages(1)
        .expires(Duration::from_secs(5))
        .messages()
        .await
        .unwrap();
    vec![batch.next().await.unwrap().unwrap()]
}

/// The loop's pull, lost with its connection (the server killed, then started again), is made
/// again as soon as the client is back: a message stored then is handled within seconds, not
/// once the lost pull would have expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loop_pulls_again_as_soon_as_the_server_is_back() {
    let Setup {
        _nats: mut nats,
        js,
        settings,
    } = setup().await;
    publish(&js, &["done-before"]).await;
    let stage = Scripted::default();
    let shutdown = Shutdown::new();
    let progress = Progress::new(Scripted::NAME);
    let handled = |what: &'static str| {
        let stage = &stage;
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !stage.handled.lock().unwrap().contains_key(what) {
                assert!(Instant::now() < deadline, "{what} not handled in 30 s");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Instant::now()
        }
    };
    let run = consume::run(
        &stage,
        &js,
        streams::RAW_STREAM,
        settings.processor_consumer(),
        10,
        &progress,
        &shutdown,
    );
    let script = async {
        handled("done-before").await;
        // The loop's pull is now waiting on the server.
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Killed, so that it ends no pull itself.
        nats.kill();
        nats.restart();
        publish(&js, &["done-after"]).await;
        let stored = Instant::now();
        let took = handled("done-after").await - stored;
        shutdown.cancel();
        took
    };
    let (ran, took) = tokio::join!(run, script);
    ran.unwrap();
    assert!(
        took < Duration::from_secs(4),
        "a message stored after the restart was handled {took:?} later"
    );
}

/// [`Scripted`], handed at most [`Small::BATCH_BYTES`] of payload at once.
struct Small(Scripted);

impl Stage for Small {
    const NAME: &'static str = "small";
    const BATCH_BYTES: usize = 1024;

    async fn handle(&self, messages: &[jetstream::Message]) -> Vec<Settle> {
        self.0.handle(messages).await
    }
}

impl AsRef<Scripted> for Small {
    fn as_ref(&self) -> &Scripted {
        &self.0
    }
}

/// Publishes `payloads` to RAW and runs a [`Small`] stage over them, 10 messages a fetch, until
/// every one is settled.
async fn run_small(setup: &Setup, payloads: &[String]) -> Small {
    publish(&setup.js, payloads).await;
    let stage = Small(Scripted {
        pause: Duration::from_millis(50),
        ..Default::default()
    });
    run_until_batch(setup, &stage, 10, || consumer_idle(&setup.js)).await;
    stage
}

/// A stage's `BATCH_BYTES` bounds what it is handed at once, whatever has arrived: the message
/// that reaches the bound is the last of its batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_is_handed_no_more_than_its_batch_bytes() {
    let setup = setup().await;
    let payloads: Vec<String> = (0..20)
        .map(|n| format!("done-{n:02}-{}", "x".repeat(600)))
        .collect();
    let stage = run_small(&setup, &payloads).await;
    assert_eq!(
        stage.0.handled.lock().unwrap().len(),
        20,
        "every message handled"
    );
    let largest = *stage.0.largest_fetch.lock().unwrap();
    assert!(
        (1024..1024 + 610).contains(&largest),
        "handed {largest} bytes at once: two messages of 608 bytes, the second reaching the bound"
    );
}

/// A message larger than a stage's `BATCH_BYTES` is not held back: it ends the batch it reaches,
/// and the messages after it go on in batches of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_larger_than_a_stage_s_batch_bytes_still_goes_through() {
    let setup = setup().await;
    let big = format!("done-big-{}", "y".repeat(4096));
    let payloads = [
        "done-before".to_owned(),
        big.clone(),
        "done-after-1".to_owned(),
        "done-after-2".to_owned(),
    ];
    let stage = run_small(&setup, &payloads).await;
    assert_eq!(
        stage.0.handled.lock().unwrap().len(),
        4,
        "every message handled, the large one too"
    );
    let largest = *stage.0.largest_fetch.lock().unwrap();
    // At most the one before it and the large one: past the bound, nothing follows it.
    let most = payloads[0].len() + big.len();
    assert!(
        largest <= most,
        "handed {largest} bytes at once, more than {most}: a message followed the large one"
    );
}
