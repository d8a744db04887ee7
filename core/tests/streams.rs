//! Stream and consumer settings against a real JetStream: what `streams::ensure` makes of what
//! an earlier version left.

use async_nats::jetstream::{self, consumer};
use dataviz_core::message::RawMessage;
use dataviz_core::streams::{self, StreamSettings};
use dataviz_testkit::NatsServer;

mod common;

/// An earlier version's processor consumer read all of RAW. `ensure` narrows it to the subjects
/// to process (not the copies `MQTT_INTAKE=nats` keeps there), and what it had not taken yet is
/// still its own.
#[tokio::test]
async fn the_processor_consumer_of_an_earlier_version_is_narrowed_and_keeps_its_backlog() {
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = dataviz_core::config::jetstream(client.clone());
    let settings = StreamSettings::default();
    let raw = js.create_stream(settings.raw()).await.unwrap();
    let earlier = consumer::pull::Config {
        filter_subject: String::new(),
        ..settings.processor_consumer()
    };
    raw.create_consumer(earlier).await.unwrap();
    let waiting = RawMessage::received("gateways/1/d".into(), r#"{"d": []}"#.into());
    streams::publish_stored(
        &js,
        waiting.subject(),
        waiting.headers(None),
        waiting.payload,
    )
    .await
    .unwrap();

    streams::ensure(&client, &js, &settings).await.unwrap();

    let info = js
        .get_stream(streams::RAW_STREAM)
        .await
        .unwrap()
        .consumer_info(streams::PROCESSOR_CONSUMER)
        .await
        .unwrap()
        .clone();
    assert_eq!(info.config.filter_subject, streams::RAW_TO_PROCESS);
    assert_eq!(
        info.num_pending, 1,
        "the waiting message is still the consumer's"
    );
    let copy = streams::raw_intake_subject(Some(1));
    streams::publish_stored(&js, copy, Default::default(), "copy".into())
        .await
        .unwrap();
    let mut processor: jetstream::consumer::PullConsumer = js
        .get_stream(streams::RAW_STREAM)
        .await
        .unwrap()
        .get_consumer(streams::PROCESSOR_CONSUMER)
        .await
        .unwrap();
    assert_eq!(
        processor.info().await.unwrap().num_pending,
        1,
        "a copy kept for replay is not the processor's"
    );
}

/// A unit a later stage refuses is traced back to its original by its id: in a pack, the
/// member of that id (or whose readings have it), not the pack.
#[tokio::test]
async fn the_original_of_a_pack_member_is_that_member() {
    use dataviz_core::pack;
    let (_nats, js) = common::with_streams().await;
    let members = [
        RawMessage::received("gateways/1/a".into(), r#"{"d": []}"#.into()),
        RawMessage::received(
            "gateways/2/b".into(),
            r#"{"d": [{"tag": "t", "value": 1}], "ts": "2024-01-01T00:00:00Z"}"#.into(),
        ),
    ];
    let seq = streams::publish_stored(
        &js,
        streams::RAW_PACK_SUBJECT.into(),
        pack::headers(),
        pack::encode(&members),
    )
    .await
    .unwrap()
    .sequence;

    for member in &members {
        let found = streams::raw_original(&js, seq, member.id).await;
        assert_eq!(found.as_ref(), Some(member));
    }
    let readings_id = members[1].readings_id().unwrap();
    assert_ne!(
        readings_id, members[1].id,
        "a message with `ts` is named by its content"
    );
    assert_eq!(
        streams::raw_original(&js, seq, readings_id).await.as_ref(),
        Some(&members[1])
    );
    assert_eq!(
        streams::raw_original(&js, seq, uuid::Uuid::now_v7()).await,
        None
    );
}
