//! Who receives an update: subscriptions indexed by the topics they name, so that an update
//! wakes only the subscribers that may want it.
//!
//! A subscription naming exact topics only is found through those topics; one with a URI
//! template or `*` may want any topic, and is handed every update. Either way its own task
//! then decides ([`crate::selector::TopicMemo`]): private updates, alternate topics. With 40,000
//! subscribers on ten topics, an update wakes 4,000 tasks instead of 40,000.
//!
//! Each subscriber has a bounded channel; one that falls [`CHANNEL_CAPACITY`] updates behind is
//! dropped from the index, its stream ends, and its client reconnects with `Last-Event-ID`
//! to catch up from the history.

use crate::selector::SelectorSet;
use crate::update::Update;
use bytes::Bytes;
use std::collections::HashMap;
use tokio::sync::mpsc;

/// Updates a subscriber may lag behind before it is disconnected (and catches up from the
/// history on reconnection).
pub const CHANNEL_CAPACITY: usize = 8192;

/// An update as the hub keeps it: its sequence, what decides who receives it, and its
/// server-sent event, encoded once for every subscriber.
#[derive(Debug)]
pub(crate) struct Entry {
    /// Its place in the order of updates ([`crate::transport::position`]).
    pub(crate) position: u64,
    /// When the stream stored it (`local`: when it was published), for the age limit.
    pub(crate) published: std::time::SystemTime,
    /// The update without its data, which is in `frame` only (kept once).
    pub(crate) update: Update,
    pub(crate) frame: Bytes,
}

impl Entry {
    pub(crate) fn new(
        position: u64,
        mut update: Update,
        published: std::time::SystemTime,
    ) -> Entry {
        let frame = update.to_frame();
        update.data = String::new();
        Entry {
            position,
            published,
            update,
            frame,
        }
    }

    /// What it weighs in the history: its topics and id, and its encoded event.
    pub(crate) fn weight(&self) -> usize {
        self.update.weight() + self.frame.len()
    }
}

pub(crate) type Receiver = mpsc::Receiver<std::sync::Arc<Entry>>;
type Sender = mpsc::Sender<std::sync::Arc<Entry>>;

/// A subscription's place in the index, to take it out when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Registration(u64);

#[derive(Debug, Default)]
pub(crate) struct Dispatch {
    next_id: u64,
    by_topic: HashMap<String, HashMap<u64, Sender>>,
    /// The exact topics of each subscription in `by_topic`.
    topics_of: HashMap<u64, Vec<String>>,
    /// Subscriptions with a template or `*`: every update.
    every: HashMap<u64, Sender>,
}

impl Dispatch {
    /// Adds a subscription to the index; returns where it is and its receiver.
    pub(crate) fn register(&mut self, subscribed: &SelectorSet) -> (Registration, Receiver) {
        let (sender, receiver) = mpsc::channel(CHANNEL_CAPACITY);
        self.next_id += 1;
        let id = self.next_id;
        match subscribed.exact_topics() {
            Some(topics) => {
                let topics: Vec<String> = topics.cloned().collect();
                for topic in &topics {
                    self.by_topic
                        .entry(topic.clone())
                        .or_default()
                        .insert(id, sender.clone());
                }
                self.topics_of.insert(id, topics);
            }
            None => {
                self.every.insert(id, sender);
            }
        }
        (Registration(id), receiver)
    }

    /// Takes a subscription out of the index (nothing if it is out already): its channel
    /// closes.
    pub(crate) fn unregister(&mut self, Registration(id): Registration) {
        self.every.remove(&id);
        for topic in self.topics_of.remove(&id).unwrap_or_default() {
            if let Some(senders) = self.by_topic.get_mut(&topic) {
                senders.remove(&id);
                if senders.is_empty() {
                    self.by_topic.remove(&topic);
                }
            }
        }
    }

    /// Subscriptions in the index.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.every.len() + self.topics_of.len()
    }

    /// Hands `entry` to every subscription that may want it. One whose channel is full (too
    /// slow) or closed (gone) is taken out of the index: its stream ends once it has read what
    /// its channel holds.
    pub(crate) fn send(&mut self, entry: &std::sync::Arc<Entry>) {
        let mut dropped = Vec::new();
        let mut offer = |id: u64, sender: &Sender| {
            if let Err(e) = sender.try_send(entry.clone()) {
                if matches!(e, mpsc::error::TrySendError::Full(_)) {
                    tracing::info!(
                        behind = CHANNEL_CAPACITY,
                        "subscriber too slow; disconnected (it catches up from the history)"
                    );
                }
                dropped.push(id);
            }
        };
        for topic in &entry.update.topics {
            for (id, sender) in self.by_topic.get(topic).into_iter().flatten() {
                offer(*id, sender);
            }
        }
        for (id, sender) in &self.every {
            offer(*id, sender);
        }
        for id in dropped {
            self.unregister(Registration(id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selector::TopicSelectorStore;
    use std::sync::Arc;

    fn entry(sequence: u64, topics: &[&str]) -> Arc<Entry> {
        let update = Update {
            id: Some(sequence.to_string()),
            ..Update::new(topics.iter().map(|t| t.to_string()).collect(), "x")
        };
        Arc::new(Entry::new(sequence, update, std::time::SystemTime::now()))
    }

    fn selectors(selectors: &[&str]) -> SelectorSet {
        TopicSelectorStore::new(10)
            .compile(&selectors.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    fn received(receiver: &mut Receiver) -> Vec<u64> {
        std::iter::from_fn(|| receiver.try_recv().ok())
            .map(|e| e.position)
            .collect()
    }

    #[test]
    fn exact_subscriptions_get_their_topics_only_templates_get_everything() {
        let mut dispatch = Dispatch::default();
        let (_, mut a) = dispatch.register(&selectors(&["t/a"]));
        let (_, mut ab) = dispatch.register(&selectors(&["t/a", "t/b"]));
        let (_, mut template) = dispatch.register(&selectors(&["t/{x}"]));
        let (_, mut any) = dispatch.register(&selectors(&["*"]));
        dispatch.send(&entry(1, &["t/a"]));
        dispatch.send(&entry(2, &["t/b"]));
        dispatch.send(&entry(3, &["t/c"]));
        // On two topics of one subscription: handed twice (its task drops the second).
        dispatch.send(&entry(4, &["t/a", "t/b"]));
        assert_eq!(received(&mut a), [1, 4]);
        assert_eq!(received(&mut ab), [1, 2, 4, 4]);
        assert_eq!(received(&mut template), [1, 2, 3, 4]);
        assert_eq!(received(&mut any), [1, 2, 3, 4]);
    }

    #[test]
    fn a_subscriber_too_far_behind_is_dropped_from_every_topic_and_its_stream_ends() {
        let mut dispatch = Dispatch::default();
        let (_, mut slow) = dispatch.register(&selectors(&["t/a", "t/b"]));
        let (kept, mut fast) = dispatch.register(&selectors(&["t/a"]));
        for sequence in 1..=CHANNEL_CAPACITY as u64 + 1 {
            dispatch.send(&entry(sequence, &["t/a"]));
            received(&mut fast);
        }
        assert_eq!(dispatch.len(), 1, "the slow one is out of the index");
        assert_eq!(received(&mut slow).len(), CHANNEL_CAPACITY);
        assert!(slow.is_closed() || slow.try_recv().is_err());
        dispatch.send(&entry(CHANNEL_CAPACITY as u64 + 2, &["t/b"]));
        assert_eq!(
            slow.try_recv().unwrap_err(),
            mpsc::error::TryRecvError::Disconnected,
            "no sender is left anywhere: the stream ends"
        );
        dispatch.unregister(kept);
        assert_eq!(dispatch.len(), 0);
        assert!(dispatch.by_topic.is_empty(), "no empty topic is kept");
    }
}
