//! Dead letters against a real JetStream: what `dlq purge` removes with them.

use dataviz_core::dead::{self, DeadFilter};
use dataviz_core::message::{DeadLetter, DeadReason, RawMessage};
use dataviz_core::streams::{self, StreamSettings};
use dataviz_testkit::NatsServer;
use futures::StreamExt as _;

/// A letter of `stage` whose payload is too large for DEAD with headers: `dead::store` keeps its
/// beginning in DEAD and the whole beside it.
async fn store_cut(js: &async_nats::jetstream::Context, stage: &str, reason: DeadReason) -> String {
    let max_payload = js.client().server_info().max_payload;
    let raw = RawMessage::received("gateways/1/d".into(), vec![b'x'; max_payload - 1024].into());
    let mut letter = DeadLetter {
        raw,
        stage: stage.into(),
        reason,
        error: "refused".into(),
        source_seq: None,
        whole_size: None,
    };
    dead::store(js, &mut letter).await.unwrap();
    assert!(letter.whole_size.is_some(), "the letter is cut to fit");
    letter.raw.id.to_string()
}

async fn whole_payloads(js: &async_nats::jetstream::Context) -> Vec<String> {
    let store = js
        .get_object_store(streams::DEAD_PAYLOADS_BUCKET)
        .await
        .unwrap();
    let mut names: Vec<String> = store
        .list()
        .await
        .unwrap()
        .map(|object| object.unwrap().name)
        .collect()
        .await;
    names.sort();
    names
}

/// Any stage's letter cut to fit DEAD has its whole payload kept beside it; purging the letter
/// removes that too, and only that: the whole payloads of the letters left stay.
#[tokio::test]
async fn purging_letters_removes_their_whole_payloads_and_no_other() {
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = dataviz_core::config::jetstream(client.clone());
    streams::ensure(&client, &js, &StreamSettings::default())
        .await
        .unwrap();

    let bad_json = store_cut(&js, "processor", DeadReason::BadJson).await;
    let unstorable = store_cut(&js, "writer", DeadReason::Unstorable).await;
    let oversized = store_cut(&js, "bridge", DeadReason::Oversized).await;
    let mut all = vec![bad_json.clone(), unstorable.clone(), oversized.clone()];
    all.sort();
    assert_eq!(whole_payloads(&js).await, all);

    let purged = dead::purge(
        &js,
        &DeadFilter {
            reason: Some(DeadReason::BadJson),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(purged, 1);
    let mut left = vec![unstorable.clone(), oversized.clone()];
    left.sort();
    assert_eq!(
        whole_payloads(&js).await,
        left,
        "the purged letter's whole payload is gone, the others' are kept"
    );
    let letters = dead::list(&js, &DeadFilter::default(), usize::MAX)
        .await
        .unwrap();
    for entry in &letters {
        let letter = entry.letter.as_ref().unwrap();
        let whole = dead::whole_payload(&js, letter).await.unwrap();
        assert_eq!(Some(whole.len() as u64), letter.whole_size);
    }

    let purged = dead::purge(&js, &DeadFilter::default()).await.unwrap();
    assert_eq!(purged, 2);
    assert!(whole_payloads(&js).await.is_empty());
}
