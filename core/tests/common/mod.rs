//! What several of core's test files share.

use dataviz_core::streams::{self, StreamSettings};
use dataviz_testkit::NatsServer;

/// A nats-server with the streams every role relies on, and a JetStream context on it.
pub async fn with_streams() -> (NatsServer, async_nats::jetstream::Context) {
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = dataviz_core::config::jetstream(client.clone());
    streams::ensure(&client, &js, &StreamSettings::default())
        .await
        .unwrap();
    (nats, js)
}
