//! [`Publisher`]: an MQTT client publishing at QoS 1 (or another) and counting the broker's
//! acks, the load generator of the tests and of `dataviz bench`.

use rumqttc::{AsyncClient, ClientError, Event, MqttOptions, Packet, QoS};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Publishes to a broker on 127.0.0.1 and counts its PUBACKs.
pub struct Publisher {
    pub client: AsyncClient,
    acked: Arc<AtomicU64>,
    sent: u64,
    /// The event loop's task: stopped with the publisher, so that a later publisher with the
    /// same client id is not taken over again and again by this one reconnecting.
    event_loop: tokio::task::JoinHandle<()>,
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.event_loop.abort();
    }
}

impl Publisher {
    /// Connects as `client_id` (clean session); the event loop runs on its own task.
    pub fn connect(port: u16, client_id: &str) -> Publisher {
        Self::start(port, client_id, true)
    }

    /// Connects with a persistent session: what it had in flight when the connection dropped
    /// is sent again on reconnection, as a device that must not lose readings does.
    pub fn connect_persistent(port: u16, client_id: &str) -> Publisher {
        Self::start(port, client_id, false)
    }

    /// Connects as `client_id` with a user and password (clean session).
    pub fn connect_as(port: u16, client_id: &str, user: &str, password: &str) -> Publisher {
        Self::start_with(port, client_id, true, Some((user, password)))
    }

    fn start(port: u16, client_id: &str, clean_session: bool) -> Publisher {
        Self::start_with(port, client_id, clean_session, None)
    }

    fn start_with(
        port: u16,
        client_id: &str,
        clean_session: bool,
        credentials: Option<(&str, &str)>,
    ) -> Publisher {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
        options.set_clean_session(clean_session);
        if let Some((user, password)) = credentials {
            options.set_credentials(user, password);
        }
        options.set_inflight(1000);
        options.set_max_packet_size(8 << 20, 8 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, 4096);
        let acked = Arc::new(AtomicU64::new(0));
        let counter = acked.clone();
        let event_loop = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_) | Packet::PubComp(_))) => {
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Publisher {
            client,
            acked,
            sent: 0,
            event_loop,
        }
    }

    /// Queues one QoS 1 message.
    pub async fn publish(
        &mut self,
        topic: impl Into<String>,
        payload: impl Into<Vec<u8>>,
    ) -> Result<(), ClientError> {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await?;
        self.sent += 1;
        Ok(())
    }

    /// Queues one message at `qos`; a QoS 2 message counts as acknowledged at its PUBCOMP, a
    /// QoS 0 message is never acknowledged.
    pub async fn publish_at(
        &mut self,
        qos: QoS,
        topic: impl Into<String>,
        payload: impl Into<Vec<u8>>,
    ) -> Result<(), ClientError> {
        self.client.publish(topic, qos, false, payload).await?;
        if qos != QoS::AtMostOnce {
            self.sent += 1;
        }
        Ok(())
    }

    /// Messages the broker acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::SeqCst)
    }

    /// Waits until the broker acknowledged everything published; says how far it got if not.
    pub async fn wait_acked(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while self.acked() < self.sent {
            if Instant::now() > deadline {
                return Err(format!(
                    "broker acked {} of {} messages",
                    self.acked(),
                    self.sent
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }
}
