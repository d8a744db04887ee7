//! Dead letters against a real JetStream: what `dlq purge` removes with them.

use dataviz_core::dead::{self, DeadFilter};
use dataviz_core::message::{DeadLetter, DeadReason, RawMessage};
use dataviz_core::streams;
use futures::StreamExt as _;

mod common;
use common::with_streams;

/// A letter of `stage` whose payload is too large for DEAD with its headers, as read at
/// `source_seq`: `dead::store` keeps its beginning in DEAD and the whole beside it. Its payload
/// fits in RAW, where the letter's error does not go. Says the whole payload's name.
async fn store_cut(
    js: &async_nats::jetstream::Context,
    raw: &RawMessage,
    stage: &str,
    reason: DeadReason,
    source_seq: Option<u64>,
) -> String {
    let mut letter = DeadLetter {
        raw: raw.clone(),
        stage: stage.into(),
        reason,
        error: "refused ".repeat(125),
        source_seq,
        whole_size: None,
    };
    dead::store(js, &mut letter).await.unwrap();
    assert!(letter.whole_size.is_some(), "the letter is cut to fit");
    letter.whole_name()
}

/// A message whose payload fits in RAW (`max_payload` less 4 KiB, less its topic) but not
/// beside a letter's error.
fn large(js: &async_nats::jetstream::Context) -> RawMessage {
    let max_payload = js.client().server_info().max_payload;
    let size = max_payload - 4096 - "gateways/1/d".len() - 500;
    RawMessage::received("gateways/1/d".into(), vec![b'x'; size].into())
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
    let (_nats, js) = with_streams().await;

    let bad_json = store_cut(&js, &large(&js), "processor", DeadReason::BadJson, Some(3)).await;
    let unstorable = store_cut(&js, &large(&js), "writer", DeadReason::Unstorable, Some(8)).await;
    let oversized = store_cut(&js, &large(&js), "bridge", DeadReason::Oversized, None).await;
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

/// A re-queued message keeps its raw id. Refused again, its payload cut again, its new letter's
/// whole payload is not the one the re-queue removes, even when the new letter is made before
/// the re-queue removes the first's (the processor takes the message as soon as RAW has it).
#[tokio::test]
async fn a_message_refused_again_keeps_its_whole_payload_while_its_first_letter_is_requeued() {
    let (_nats, js) = with_streams().await;
    let raw = large(&js);
    store_cut(&js, &raw, "processor", DeadReason::BadJson, Some(3)).await;
    let first = dead::list(&js, &DeadFilter::default(), usize::MAX)
        .await
        .unwrap()[0]
        .seq;
    // The re-queued copy, at RAW's next sequence, refused again.
    let again = store_cut(&js, &raw, "processor", DeadReason::BadJson, Some(4)).await;

    dead::requeue(&js, first).await.unwrap();

    let letters = dead::list(&js, &DeadFilter::default(), usize::MAX)
        .await
        .unwrap();
    assert_eq!(
        letters.len(),
        1,
        "the re-queued letter is gone, the new one stays"
    );
    let letter = letters[0].letter.as_ref().unwrap();
    assert_eq!(letter.whole_name(), again);
    let whole = dead::whole_payload(&js, letter).await.unwrap();
    assert_eq!(whole, raw.payload, "the new letter's whole payload is kept");
    assert_eq!(whole_payloads(&js).await, vec![again]);
}
