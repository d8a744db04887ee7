//! The embeddable hub: an `axum::Router` serving [`HUB_PATH`], publish (POST) and subscribe
//! (GET, server-sent events), with the behaviour of the reference hub's 0.x releases.
//!
//! # Transports
//! - `jetstream` (the default of `dataviz hub` and `dataviz all`): a published update is
//!   stored in a JetStream stream before the publisher gets its answer, and every hub following
//!   that stream applies it, in the stream's order (module `transport`). A hub killed after
//!   answering loses nothing; a restarted hub reads the history back before it serves; any
//!   number of hubs serve the same updates with the same ids.
//! - `local`: the update is applied in this process only (one hub; history lost at a stop).
//!
//! # Delivery
//! Every applied update goes into a bounded in-memory history and to the subscribers that may
//! want it (indexed by topic: module `dispatch`), both under one lock, so a subscriber that
//! takes its history snapshot and joins the index under the same lock sees every update exactly
//! once, history first. The update's event is encoded once; every subscriber writes the same
//! bytes. A subscriber too slow to keep up ([`CHANNEL_CAPACITY`] updates behind) is
//! disconnected; its client reconnects with `Last-Event-ID` and catches up from the history.
//!
//! # Cost of a subscriber
//! No subscriber can hold up publishing. The lock is held only to copy pointers to the part of
//! the history asked for; which of those updates the subscriber may see is decided after, off
//! the async runtime, so that neither the publishers nor other subscribers wait for it. Those of
//! subscriptions with many templates run one at a time ([`REPLAY_CONCURRENCY`]), on a thread at
//! the lowest CPU priority (module `background`): they take only the CPU the pipeline leaves.
//! Each subscription compiles its selectors once and remembers which topics matched
//! ([`crate::selector`]). The limits
//! (subscribers held, topics per subscription, the template cache) are in [`HubConfig`]; past
//! the subscriber limit a new subscriber is answered 503 with `Retry-After`.
//!
//! # Reconnection
//! `Last-Event-ID` (header) or `lastEventID` (query): the updates after that id in the history
//! are sent first; `earliest` sends the whole history. The response then carries a
//! `Last-Event-ID` header: the id asked for when found; otherwise the last id in the history
//! the subscriber may see (`earliest` when none), and nothing from the history is sent, as the
//! reference hub does.
//!
//! # Repeated ids
//! An update whose id is still in the history is not dispatched again; the publish request
//! answers its id as for a new one. This makes a publisher's redelivery (same id) invisible
//! to subscribers. (An addition to the reference hub, which dispatches it again.) On the
//! `jetstream` transport the stream's duplicate window (2 minutes, at most the age limit)
//! also catches a copy racing the first one, or published to another hub.
//!
//! # Authorization
//! The JWT comes from the `Authorization: Bearer` header, else the `authorization` query
//! parameter, else the `mercureAuthorization` cookie; publishing with the cookie also needs an
//! `Origin` (or `Referer`) listed in the publish origins. Any refusal is 401, as in the
//! reference. A subscription ends when its JWT expires, or when its JWT's `jti` is revoked
//! ([`Hub::revoke`]: the admin site of the same process revokes a session's tokens at logout).

use crate::background::Background;
use crate::config::HubConfig;
use crate::config::KeyError;
use crate::dispatch::{Dispatch, Entry, Registration};
use crate::jwt::{self, Claims, JwtKey};
use crate::selector::{MAX_TEMPLATE_LENGTH, SelectorSet, TopicMemo, TopicSelectorStore};
use crate::transport::{self, PublishFailure};
use crate::update::{Update, UpdateError};
use async_nats::jetstream;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::{Stream, StreamExt, stream};
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tower_http::cors::{AllowOrigin, CorsLayer};

/// Where the hub is mounted.
pub const HUB_PATH: &str = "/.well-known/mercure";
/// The `lastEventID` value asking for the whole history.
pub const EARLIEST: &str = "earliest";
/// The cookie a browser may carry its JWT in.
pub const AUTHORIZATION_COOKIE: &str = "mercureAuthorization";
pub use crate::dispatch::CHANNEL_CAPACITY;
/// History readings and selector compilations of subscriptions with many templates done at
/// once; the others wait their turn without holding a thread.
pub const REPLAY_CONCURRENCY: usize = 1;
/// Templates a subscription may compile on the request's own thread; more go to the blocking
/// pool (and wait their turn like a history reading).
const INLINE_TEMPLATES: usize = 16;
/// Seconds a subscriber refused for lack of room is told to wait.
const RETRY_AFTER_SECONDS: &str = "10";
/// Seconds a publisher is told to wait when the stream did not take its update.
const UNAVAILABLE_RETRY_AFTER_SECONDS: &str = "1";

/// The hub. Cheap to clone; every clone is the same hub.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").finish_non_exhaustive()
    }
}

struct HubInner {
    publisher_key: JwtKey,
    subscriber_key: JwtKey,
    anonymous: bool,
    heartbeat: Option<Duration>,
    cors_origins: Vec<String>,
    publish_origins: Vec<String>,
    history_size: usize,
    history_bytes: usize,
    history_max_age: Option<Duration>,
    max_topics: usize,
    max_subscribers: usize,
    selectors: TopicSelectorStore,
    /// One permit per subscriber held; a subscription keeps its own until it ends.
    subscribers: Arc<Semaphore>,
    /// Turns at large history readings and compilations (see the module doc); a turn is
    /// held by the blocking work itself, so a subscriber that hangs up does not free it early.
    replays: Arc<Semaphore>,
    /// Where those run (module `background`), started at the first; `None` if it could not
    /// start (they run on the blocking pool then).
    background: OnceLock<Option<Background>>,
    /// History and channel, changed together (see the module doc).
    log: Mutex<Log>,
    /// The sequence of the last update applied to `log`, for publishers waiting for theirs.
    applied: tokio::sync::watch::Sender<u64>,
    /// The stream updates go through; `None` on the `local` transport.
    transport: Option<transport::Transport>,
    /// Fired by [`Hub::close`]: every subscription ends, so that a server can stop.
    closed: CancellationToken,
    /// Revoked token ids, each until the expiry of the tokens it names.
    revoked: Mutex<HashMap<String, SystemTime>>,
    /// Bumped at each revocation: running subscriptions check whether it names them.
    revocations: tokio::sync::watch::Sender<u64>,
}

/// How much history a hub keeps (its settings).
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// Updates; 0: none.
    size: usize,
    bytes: usize,
    max_age: Option<Duration>,
}

struct Log {
    /// The updates kept, with their position (from the stream's sequence, or a counter of this
    /// process's).
    history: VecDeque<Arc<Entry>>,
    /// The bytes of `history` ([`Update::weight`]).
    bytes: usize,
    /// The ids in `history` and their positions: repeated updates are skipped, and a
    /// `Last-Event-ID` is found without a scan.
    ids: HashMap<String, u64>,
    /// The sequence of the last message applied; sequences only grow.
    applied: u64,
    /// The subscribers, by the topics they name.
    dispatch: Dispatch,
}

impl HubInner {
    fn new(config: &HubConfig, transport: Option<transport::Transport>) -> Result<Self, KeyError> {
        let keys = config.keys.keys()?;
        Ok(HubInner {
            publisher_key: keys.publisher,
            subscriber_key: keys.subscriber,
            anonymous: config.mercure_anonymous,
            heartbeat: config.heartbeat(),
            cors_origins: config.cors_origins(),
            publish_origins: config.publish_origins(),
            history_size: config.mercure_history_size,
            history_bytes: config.mercure_history_bytes,
            history_max_age: Some(config.mercure_history_max_age).filter(|a| !a.is_zero()),
            max_topics: config.mercure_max_topics,
            max_subscribers: config.mercure_max_subscribers,
            selectors: TopicSelectorStore::new(config.mercure_template_cache_size),
            subscribers: Arc::new(Semaphore::new(config.mercure_max_subscribers)),
            replays: Arc::new(Semaphore::new(REPLAY_CONCURRENCY)),
            background: OnceLock::new(),
            log: Mutex::new(Log {
                history: VecDeque::new(),
                bytes: 0,
                ids: HashMap::new(),
                applied: 0,
                dispatch: Dispatch::default(),
            }),
            applied: tokio::sync::watch::Sender::new(0),
            transport,
            closed: CancellationToken::new(),
            revoked: Mutex::new(HashMap::new()),
            revocations: tokio::sync::watch::Sender::new(0),
        })
    }

    fn background(&self) -> Option<&Background> {
        self.background
            .get_or_init(|| {
                Background::start("mercure-replay")
                    .inspect_err(|error| {
                        tracing::warn!(%error, "no background thread for large subscriptions")
                    })
                    .ok()
            })
            .as_ref()
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The history's limits.
    fn limits(&self) -> Limits {
        Limits {
            size: self.history_size,
            bytes: self.history_bytes,
            max_age: self.history_max_age,
        }
    }

    /// Applies what the stream delivers, in its order, until the hub closes or is dropped.
    fn follow(self: &Arc<Self>) {
        let Some(transport) = &self.transport else {
            return;
        };
        let hub = Arc::downgrade(self);
        let closed = self.closed.clone();
        let transport = transport.clone();
        tokio::spawn(async move {
            let apply = |sequence: u64, updates: Vec<Update>, published: SystemTime| {
                // Gone: nobody to deliver to any more.
                let Some(hub) = hub.upgrade() else {
                    return false;
                };
                let mut log = hub.log();
                log.apply(sequence, updates, published, hub.limits());
                let applied = log.applied;
                drop(log);
                hub.applied.send_replace(applied);
                true
            };
            let from =
                |hub: &std::sync::Weak<HubInner>| hub.upgrade().map(|hub| hub.log().applied + 1);
            tokio::select! {
                _ = transport.follow(|| from(&hub), apply) => {}
                _ = closed.cancelled() => {}
            }
        });
    }
}

impl Log {
    /// The updates after `asked` (`None`: every one), as shared pointers: all the lock is held
    /// for.
    fn after(&self, asked: Option<&str>) -> Option<Vec<Arc<Entry>>> {
        let from = match asked {
            None => 0,
            Some(id) => {
                let position = *self.ids.get(id)?;
                self.history.partition_point(|e| e.position <= position)
            }
        };
        Some(self.history.range(from..).cloned().collect())
    }

    /// Drops the updates past the age limit, as the stream does.
    fn expire(&mut self, limits: Limits) {
        let Some(oldest) = limits
            .max_age
            .and_then(|age| SystemTime::now().checked_sub(age))
        else {
            return;
        };
        while self.history.front().is_some_and(|e| e.published < oldest) {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some(old) = self.history.pop_front() {
            // The same id may be in the history twice only if applied twice: never.
            self.ids
                .remove(old.update.id.as_deref().unwrap_or_default());
            self.bytes -= old.weight();
        }
    }

    /// Keeps and dispatches the updates of the message of `sequence` (one, or a pack's), unless
    /// that sequence was applied already (a consumer's redelivery); an update whose id is still
    /// in the history (a publisher's redelivery) is skipped. Returns how many were dispatched.
    fn apply(
        &mut self,
        sequence: u64,
        updates: Vec<Update>,
        published: SystemTime,
        limits: Limits,
    ) -> usize {
        if sequence <= self.applied {
            return 0;
        }
        self.applied = sequence;
        let mut dispatched = 0;
        for (index, update) in updates.into_iter().enumerate() {
            let id = update.id.as_deref().unwrap_or_default();
            if self.ids.contains_key(id) {
                tracing::debug!(id, "update already dispatched; not sent again");
                continue;
            }
            let position = transport::position(sequence, index);
            let entry = Arc::new(Entry::new(position, update, published));
            if limits.size > 0 {
                let weight = entry.weight();
                self.expire(limits);
                // The oldest go until the new one fits, by count and by bytes.
                while !self.history.is_empty()
                    && (self.history.len() >= limits.size || self.bytes + weight > limits.bytes)
                {
                    self.pop_oldest();
                }
                let id = entry.update.id.clone().unwrap_or_default();
                self.ids.insert(id, position);
                self.bytes += weight;
                self.history.push_back(entry.clone());
            }
            self.dispatch.send(&entry);
            dispatched += 1;
        }
        dispatched
    }
}

/// Why a publish was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishRefused {
    /// The update itself is wrong: sending it again cannot help.
    #[error(transparent)]
    Invalid(#[from] UpdateError),
    /// The stream did not take it (NATS unreachable, JetStream refusing): retry later.
    #[error("the hub's stream did not take the update: {0}")]
    Unavailable(String),
    /// The update was sent to the stream and no acknowledgement came back (NATS went away
    /// mid-publish): it may still be stored and dispatched. Sent again with the same id within
    /// the stream's duplicate window, it is dispatched once either way.
    #[error(
        "the hub's stream did not acknowledge update {id} ({reason}); it may still be \
         dispatched: send it again with id {id}, and it is dispatched once"
    )]
    Unconfirmed { id: String, reason: String },
}

/// Why a hub could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error("MERCURE_STREAM {stream:?}: {problem}")]
    Stream { stream: String, problem: String },
}

impl Hub {
    /// A hub with the `local` transport: updates live in this process's memory only.
    pub fn new(config: &HubConfig) -> Result<Hub, KeyError> {
        Ok(Hub {
            inner: Arc::new(HubInner::new(config, None)?),
        })
    }

    /// A hub on the `jetstream` transport: updates go through the stream
    /// [`HubConfig::mercure_stream`] (created, or its limits updated, here), which every hub
    /// naming it follows. Returns once this hub has read the history the stream holds, so that
    /// a reconnecting subscriber finds its `Last-Event-ID` from the first request.
    pub async fn with_jetstream(
        config: &HubConfig,
        js: jetstream::Context,
    ) -> Result<Hub, StartError> {
        let stream_error = |problem: String| StartError::Stream {
            stream: config.mercure_stream.clone(),
            problem,
        };
        let transport = transport::Transport::open(config, js)
            .await
            .map_err(|e| stream_error(format!("{e:#}")))?;
        let last = transport.last_sequence;
        let hub = Hub {
            inner: Arc::new(HubInner::new(config, Some(transport))?),
        };
        hub.inner.follow();
        let started = std::time::Instant::now();
        let mut applied = hub.inner.applied.subscribe();
        let read = tokio::time::timeout(
            transport::CATCH_UP_TIMEOUT,
            applied.wait_for(|a| *a >= last),
        )
        .await;
        match read {
            Ok(_) => tracing::info!(
                stream = config.mercure_stream,
                history = hub.history_len(),
                took = ?started.elapsed(),
                "history read from the stream"
            ),
            Err(_) => {
                return Err(stream_error(format!(
                    "reading the history back took more than {:?}",
                    transport::CATCH_UP_TIMEOUT
                )));
            }
        }
        Ok(hub)
    }

    /// The routes: [`HUB_PATH`] for GET (subscribe) and POST (publish), with CORS when
    /// origins are configured and the reference hub's security headers.
    pub fn router(&self) -> Router {
        let router = Router::new()
            .route(HUB_PATH, get(subscribe).post(publish))
            .with_state(self.clone())
            .layer(axum::middleware::map_response(security_headers))
            // A bug's panic answers 500 (and is logged) instead of dropping the connection.
            .layer(tower_http::catch_panic::CatchPanicLayer::new());
        if self.inner.cors_origins.is_empty() {
            return router;
        }
        let origins = if self.inner.cors_origins.iter().any(|o| o == "*") {
            AllowOrigin::mirror_request()
        } else {
            AllowOrigin::list(
                self.inner
                    .cors_origins
                    .iter()
                    .filter_map(|o| HeaderValue::from_str(o).ok()),
            )
        };
        router.layer(
            CorsLayer::new()
                .allow_origin(origins)
                .allow_credentials(true)
                .allow_methods([Method::GET, Method::POST])
                .allow_headers([
                    header::AUTHORIZATION,
                    header::CACHE_CONTROL,
                    HeaderName::from_static("last-event-id"),
                ]),
        )
    }

    /// Publishes an update from inside the process (no JWT): validates it, gives it an id when
    /// it has none, dispatches it, and returns its id. On the `jetstream` transport it returns
    /// once the stream has stored the update (a hub killed after that loses nothing) and this
    /// hub has dispatched it, [`PublishRefused::Unavailable`] when the stream did not take it,
    /// or [`PublishRefused::Unconfirmed`] when it may have.
    pub async fn publish(&self, update: Update) -> Result<String, PublishRefused> {
        let mut results = self.publish_many(vec![update]).await;
        results.pop().expect("one result per update")
    }

    /// Publishes `updates` in their order, each as [`Hub::publish`] does, but in as few stream
    /// messages as they fit (packs, see [`transport`]): what a publisher inside the process
    /// uses for a batch. One result per update, in order. An invalid update, or one larger
    /// than NATS takes, is refused alone; from the first message the stream did not take
    /// otherwise, that message's updates and every later one are refused with its failure, so
    /// that none overtakes an earlier one.
    pub async fn publish_many(&self, updates: Vec<Update>) -> Vec<Result<String, PublishRefused>> {
        let mut results = Vec::with_capacity(updates.len());
        // The valid updates, with the index of their result.
        let mut valid = Vec::with_capacity(updates.len());
        for mut update in updates {
            if let Err(e) = update.validate() {
                results.push(Err(e.into()));
                continue;
            }
            let id = update
                .id
                .get_or_insert_with(|| format!("urn:uuid:{}", uuid::Uuid::now_v7()))
                .clone();
            valid.push((results.len(), update));
            results.push(Ok(id));
        }
        if valid.is_empty() {
            return results;
        }
        let Some(transport) = &self.inner.transport else {
            let mut log = self.inner.log();
            let mut updates = valid.into_iter().map(|(_, u)| u).peekable();
            // In packs as on the stream, so that positions keep their order.
            while updates.peek().is_some() {
                let pack = updates.by_ref().take(transport::PACK_UPDATES).collect();
                let sequence = log.applied + 1;
                log.apply(sequence, pack, SystemTime::now(), self.inner.limits());
            }
            let applied = log.applied;
            drop(log);
            self.inner.applied.send_replace(applied);
            return results;
        };
        // A redelivery of an update this hub holds: not even a round trip. One it no longer
        // holds, or one racing its first copy, is caught by the stream's duplicate window.
        {
            let log = self.inner.log();
            valid.retain(|(_, update)| {
                let id = update.id.as_deref().unwrap_or_default();
                let held = log.ids.contains_key(id);
                if held {
                    tracing::debug!(id, "update already dispatched; not sent again");
                }
                !held
            });
        }
        let stored: Vec<Vec<u8>> = valid.iter().map(|(_, u)| u.to_stored()).collect();
        let id = |i: usize| valid[i].1.id.as_deref().unwrap_or_default();
        let budget = transport.pack_bytes();
        let (mut start, mut last_sequence) = (0, None);
        while start < valid.len() {
            // The first update always goes: alone, one too large is refused for its size.
            let mut end = start + 1;
            let frame = |i: usize| transport::FRAME_BYTES + stored[i].len();
            let mut bytes = frame(start);
            while end < valid.len()
                && end - start < transport::PACK_UPDATES
                && bytes + frame(end) <= budget
            {
                bytes += frame(end);
                end += 1;
            }
            let published = transport
                .publish((start..end).map(id), &stored[start..end])
                .await;
            match published {
                Ok(sequence) => last_sequence = Some(sequence),
                // Larger than NATS takes, alone in its message: refused for its size, as an
                // invalid update is; the others go on.
                Err(PublishFailure::TooLarge(e)) if end - start == 1 => {
                    results[valid[start].0] = Err(UpdateError::TooLarge(e).into());
                }
                Err(failure) => {
                    for (position, (index, _)) in valid.iter().enumerate().skip(start) {
                        let id = id(position).to_owned();
                        results[*index] = Err(match &failure {
                            _ if position >= end => PublishRefused::Unavailable(format!(
                                "not sent: an earlier update was not stored ({failure})"
                            )),
                            PublishFailure::TooLarge(e) => UpdateError::TooLarge(e.clone()).into(),
                            PublishFailure::Unavailable(e) => {
                                PublishRefused::Unavailable(e.clone())
                            }
                            PublishFailure::Unconfirmed(reason) => PublishRefused::Unconfirmed {
                                id,
                                reason: reason.clone(),
                            },
                        });
                    }
                    break;
                }
            }
            start = end;
        }
        // Stored: from here on the updates are delivered whatever happens to this hub. Waiting
        // for this hub's own copy makes them visible to a subscriber arriving after the answer.
        if let Some(sequence) = last_sequence {
            let mut applied = self.inner.applied.subscribe();
            let dispatched = tokio::time::timeout(
                transport::DISPATCH_WAIT,
                applied.wait_for(|a| *a >= sequence),
            )
            .await;
            if dispatched.is_err() {
                tracing::warn!(
                    sequence,
                    "updates stored but not read back yet from the stream; subscribers get them \
                     once this hub catches up"
                );
            }
        }
        results
    }

    /// Refuses the tokens whose `jti` is `jti` until `until` (their expiry), and ends the
    /// subscriptions opened with them.
    pub fn revoke(&self, jti: &str, until: SystemTime) {
        {
            let mut revoked = self.inner.revoked.lock().unwrap_or_else(|e| e.into_inner());
            let now = SystemTime::now();
            // Tokens past their expiry are refused anyway: forget them.
            revoked.retain(|_, until| *until > now);
            revoked.insert(jti.to_owned(), until);
        }
        self.inner.revocations.send_modify(|n| *n += 1);
        tracing::info!(jti, "subscriber tokens revoked");
    }

    fn is_revoked(&self, jti: &str) -> bool {
        let revoked = self.inner.revoked.lock().unwrap_or_else(|e| e.into_inner());
        revoked
            .get(jti)
            .is_some_and(|until| *until > SystemTime::now())
    }

    /// Ends every subscription (a server's graceful shutdown waits for open responses).
    pub fn close(&self) {
        self.inner.closed.cancel();
    }

    /// How many updates the history holds now.
    pub fn history_len(&self) -> usize {
        self.inner
            .log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .history
            .len()
    }

    /// Subscribers held now.
    pub fn subscribers(&self) -> usize {
        let inner = &self.inner;
        inner
            .max_subscribers
            .saturating_sub(inner.subscribers.available_permits())
    }

    /// Compiles the subscription's selectors, takes its receiver and the part of the history
    /// it asked for, and keeps of that what it may see. Runs on the blocking pool when the
    /// work is large (see the module doc).
    fn prepare(&self, request: SubscriptionRequest) -> Prepared {
        let store = &self.inner.selectors;
        let mut sub = Subscription {
            subscribed: store.compile(&request.topics),
            allowed: store.compile(&request.private_selectors),
            memo: TopicMemo::default(),
        };
        // Pointers only under the lock; the matching comes after.
        let (registered, after, all) = {
            let mut log = self.inner.log();
            log.expire(self.inner.limits());
            let (registration, receiver) = log.dispatch.register(&sub.subscribed);
            let registered = Registered {
                hub: Arc::downgrade(&self.inner),
                registration,
                receiver,
            };
            match request.last_event_id.as_deref() {
                None => (registered, None, None),
                Some(EARLIEST) => (registered, log.after(None), None),
                Some(asked) => match log.after(Some(asked)) {
                    Some(after) => (registered, Some(after), None),
                    None => (registered, None, log.after(None)),
                },
            }
        };
        // Many templates over many updates: matched in one pass each (selector module).
        let mut one_pass = (request.last_event_id.is_some() && sub.templates() > INLINE_TEMPLATES)
            .then(|| sub.in_one_pass());
        let reader = one_pass.as_mut().unwrap_or(&mut sub);
        let (backlog, answered_id) = match (request.last_event_id, after, all) {
            (None, ..) => (Vec::new(), None),
            (Some(asked), Some(after), _) => {
                let visible = after
                    .into_iter()
                    .filter(|e| reader.can_receive(&e.update))
                    .collect();
                (visible, Some(asked))
            }
            (Some(asked), None, all) => {
                tracing::info!(
                    last_event_id = asked,
                    "Last-Event-ID not in the history; nothing replayed"
                );
                // Only ids the subscriber may see are disclosed.
                let last_visible = all
                    .unwrap_or_default()
                    .iter()
                    .rev()
                    .find(|e| reader.can_receive(&e.update))
                    .and_then(|e| e.update.id.clone())
                    .unwrap_or_else(|| EARLIEST.to_owned());
                (Vec::new(), Some(last_visible))
            }
        };
        Prepared {
            sub,
            backlog,
            registered,
            answered_id,
        }
    }
}

/// What a subscriber asked for.
struct SubscriptionRequest {
    topics: Vec<String>,
    /// The `mercure.subscribe` selectors of its JWT.
    private_selectors: Vec<String>,
    last_event_id: Option<String>,
}

/// A subscription's selectors, compiled once, and what it decided for each topic so far.
struct Subscription {
    subscribed: SelectorSet,
    allowed: SelectorSet,
    memo: TopicMemo,
}

impl Subscription {
    /// The templates it is tried against, at most.
    fn templates(&self) -> usize {
        self.subscribed.templates() + self.allowed.templates()
    }

    /// The same subscription with its templates in one automaton, for reading the history.
    fn in_one_pass(&self) -> Subscription {
        Subscription {
            subscribed: self.subscribed.in_one_pass(),
            allowed: self.allowed.in_one_pass(),
            memo: TopicMemo::default(),
        }
    }

    /// Who may receive `update` (see the reference `MatchTopics`): one topic of the update
    /// must match the subscription, and, for a private update, one topic must match a private
    /// selector of the JWT.
    fn can_receive(&mut self, update: &Update) -> bool {
        self.memo.can_receive(
            &update.topics,
            update.private,
            &self.subscribed,
            &self.allowed,
        )
    }
}

/// A subscription ready to stream: its backlog, its receiver of live updates, and the
/// `Last-Event-ID` to answer.
struct Prepared {
    sub: Subscription,
    backlog: Vec<Arc<Entry>>,
    registered: Registered,
    answered_id: Option<String>,
}

/// `listener` with Nagle's algorithm off on every connection it accepts.
///
/// An event stream writes one small frame per update and its client never answers: with Nagle
/// on, each frame after the first waits for the client's delayed acknowledgement (40 ms on
/// Linux), so events went out in bursts up to 40 ms late. Serve the hub with this.
pub fn without_delay(
    listener: tokio::net::TcpListener,
) -> axum::serve::TapIo<tokio::net::TcpListener, fn(&mut tokio::net::TcpStream)> {
    fn no_delay(stream: &mut tokio::net::TcpStream) {
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set on a connection");
        }
    }
    axum::serve::ListenerExt::tap_io(listener, no_delay as fn(&mut tokio::net::TcpStream))
}

/// Serves `hub` on `listener` until `shutdown`, then ends the subscriptions and stops.
pub async fn serve(
    listener: tokio::net::TcpListener,
    hub: Hub,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let router = hub.router();
    axum::serve(without_delay(listener), router)
        .with_graceful_shutdown(async move {
            shutdown.cancelled().await;
            hub.close();
        })
        .await
}

async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'"),
    );
    response
}

fn plain(status: StatusCode, text: impl Into<String>) -> Response {
    let mut text = text.into();
    text.push('\n');
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        text,
    )
        .into_response()
}

fn unauthorized(reason: impl std::fmt::Display) -> Response {
    tracing::debug!(%reason, "Mercure request refused");
    plain(StatusCode::UNAUTHORIZED, "Unauthorized")
}

/// Query parameters with repeated keys kept.
fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .into_owned()
        .collect()
}

fn query_all<'a>(pairs: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    pairs
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// The value of cookie `name` in a request's headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.trim_matches('"'))
}

/// Where a request's JWT was found, and whether it is there at all.
#[derive(Debug)]
enum AuthError {
    Header,
    Query,
    NoOrigin,
    OriginNotAllowed(String),
    Jwt(jwt::JwtError),
}

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthError::Header => f.write_str("invalid \"Authorization\" HTTP header"),
            AuthError::Query => f.write_str("invalid \"authorization\" query parameter"),
            AuthError::NoOrigin => {
                f.write_str("an Origin or Referer header is needed with the cookie")
            }
            AuthError::OriginNotAllowed(o) => write!(f, "{o:?}: origin not allowed to publish"),
            AuthError::Jwt(e) => e.fmt(f),
        }
    }
}

impl Hub {
    /// The request's claims, `None` for an anonymous request. The length floors are the
    /// reference hub's (shorter cannot be a JWT).
    fn authorize(
        &self,
        method: &Method,
        headers: &HeaderMap,
        query: &[(String, String)],
        key: &JwtKey,
    ) -> Result<Option<Claims>, AuthError> {
        let verify = |token: &str| jwt::verify(token, key).map(Some).map_err(AuthError::Jwt);
        let authorization: Vec<_> = headers.get_all(header::AUTHORIZATION).iter().collect();
        if !authorization.is_empty() {
            let value = match authorization.as_slice() {
                [one] => one.to_str().map_err(|_| AuthError::Header)?,
                _ => return Err(AuthError::Header),
            };
            return match value.strip_prefix("Bearer ") {
                Some(token) if value.len() >= 48 => verify(token),
                _ => Err(AuthError::Header),
            };
        }
        let from_query = query_all(query, "authorization");
        if !from_query.is_empty() {
            return match from_query.as_slice() {
                [token] if token.len() >= 41 => verify(token),
                _ => Err(AuthError::Query),
            };
        }
        let Some(token) = cookie(headers, AUTHORIZATION_COOKIE) else {
            return Ok(None);
        };
        // A cookie travels with cross-site requests: a POST with it must come from an allowed
        // origin (CSRF). Safe methods need no check.
        if method != Method::POST {
            return verify(token);
        }
        let origin = match headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) {
            Some(origin) => origin.to_owned(),
            None => {
                let referer = headers
                    .get(header::REFERER)
                    .and_then(|r| r.to_str().ok())
                    .ok_or(AuthError::NoOrigin)?;
                let url = reqwest::Url::parse(referer).map_err(|_| AuthError::NoOrigin)?;
                url.origin().ascii_serialization()
            }
        };
        let allowed = &self.inner.publish_origins;
        if allowed.iter().any(|o| o == "*" || *o == origin) {
            verify(token)
        } else {
            Err(AuthError::OriginNotAllowed(origin))
        }
    }
}

async fn publish(
    State(hub): State<Hub>,
    method: Method,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    let query = query_pairs(query.as_deref());
    let claims = match hub.authorize(&method, &headers, &query, &hub.inner.publisher_key) {
        Ok(Some(claims)) => claims,
        Ok(None) => return unauthorized("no JWT"),
        Err(e) => return unauthorized(e),
    };
    let Some(selectors) = claims.publish_selectors() else {
        return unauthorized("no mercure.publish claim");
    };
    // A body of another type is an empty form, as Go's ParseForm reads it: no topic, 400.
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    let update = match Update::from_form(if is_form { &body } else { b"" }) {
        Ok(update) => update,
        Err(e) => return plain(StatusCode::BAD_REQUEST, e.to_string()),
    };
    if !hub.inner.selectors.all_match(&update.topics, selectors) {
        return unauthorized("a topic matches no mercure.publish selector");
    }
    match hub.publish(update).await {
        Ok(id) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            id,
        )
            .into_response(),
        Err(PublishRefused::Invalid(e)) if e.forbidden() => {
            plain(StatusCode::FORBIDDEN, e.to_string())
        }
        Err(PublishRefused::Invalid(e)) => plain(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e @ (PublishRefused::Unavailable(_) | PublishRefused::Unconfirmed { .. })) => {
            tracing::warn!(error = %e, "update refused: the stream is unavailable");
            // The publisher is told whether the update may still come through, and under
            // which id to send it again (the hub gave one when it had none).
            let body = if matches!(e, PublishRefused::Unconfirmed { .. }) {
                e.to_string()
            } else {
                "Service Unavailable".to_owned()
            };
            let mut response = plain(StatusCode::SERVICE_UNAVAILABLE, body);
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(UNAVAILABLE_RETRY_AFTER_SECONDS),
            );
            response
        }
    }
}

async fn subscribe(
    State(hub): State<Hub>,
    method: Method,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let query = query_pairs(query.as_deref());
    let claims = match hub.authorize(&method, &headers, &query, &hub.inner.subscriber_key) {
        Ok(None) if !hub.inner.anonymous => return unauthorized("anonymous subscriber"),
        Ok(Some(claims)) if claims.jti.as_deref().is_some_and(|j| hub.is_revoked(j)) => {
            return unauthorized("revoked token");
        }
        Ok(claims) => claims,
        Err(e) => return unauthorized(e),
    };
    let topics: Vec<String> = query_all(&query, "topic")
        .into_iter()
        .map(str::to_owned)
        .collect();
    if topics.is_empty() {
        return plain(StatusCode::BAD_REQUEST, "Missing \"topic\" parameter.");
    }
    if topics.len() > hub.inner.max_topics {
        return plain(
            StatusCode::BAD_REQUEST,
            format!(
                "Too many \"topic\" parameters (at most {}).",
                hub.inner.max_topics
            ),
        );
    }
    if topics
        .iter()
        .any(|t| t.contains('{') && t.len() > MAX_TEMPLATE_LENGTH)
    {
        return plain(
            StatusCode::BAD_REQUEST,
            format!(
                "A topic selector is too long (templates: at most {MAX_TEMPLATE_LENGTH} bytes)."
            ),
        );
    }
    let Ok(slot) = hub.inner.subscribers.clone().try_acquire_owned() else {
        tracing::warn!(
            max = hub.inner.max_subscribers,
            "subscriber refused: MERCURE_MAX_SUBSCRIBERS reached"
        );
        let mut response = plain(StatusCode::SERVICE_UNAVAILABLE, "Too many subscribers.");
        response.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from_static(RETRY_AFTER_SECONDS),
        );
        return response;
    };
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
        .or_else(|| {
            query_all(&query, "lastEventID")
                .first()
                .filter(|v| !v.is_empty())
                .map(|v| v.to_string())
        });
    let request = SubscriptionRequest {
        topics,
        private_selectors: claims
            .as_ref()
            .and_then(|c| c.subscribe_selectors())
            .map(<[String]>::to_vec)
            .unwrap_or_default(),
        last_event_id,
    };
    let templates = (request.topics.iter())
        .chain(&request.private_selectors)
        .filter(|s| s.contains('{'))
        .count();
    let prepared = if request.last_event_id.is_none() && templates <= INLINE_TEMPLATES {
        hub.prepare(request)
    } else {
        // A large subscription waits its turn without a thread; a small one does not wait
        // behind large ones. Either reads on the blocking pool (module doc).
        let turn = if templates > INLINE_TEMPLATES {
            match hub.inner.replays.clone().acquire_owned().await {
                Ok(turn) => Some(turn),
                Err(_) => return plain(StatusCode::SERVICE_UNAVAILABLE, "The hub is closing."),
            }
        } else {
            None
        };
        let preparing = hub.clone();
        let large = turn.is_some();
        let work = move || {
            let _turn = turn;
            preparing.prepare(request)
        };
        let prepared = match hub.inner.background().filter(|_| large) {
            Some(background) => background.run(work).await.map_err(|e| e.to_string()),
            None => (tokio::task::spawn_blocking(work).await).map_err(|e| e.to_string()),
        };
        match prepared {
            Ok(prepared) => prepared,
            Err(error) => {
                tracing::error!(%error, "reading the history failed");
                return plain(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error");
            }
        }
    };
    let Prepared {
        sub,
        backlog,
        registered,
        answered_id,
    } = prepared;

    let expires = claims.as_ref().and_then(Claims::expires_at);
    let jti = claims.as_ref().and_then(|c| c.jti.clone());
    let events = subscription_events(sub, backlog, registered, slot);
    // Ends at the JWT's expiry, at its revocation and when the hub closes.
    let until = {
        let closed = hub.inner.closed.clone();
        let mut revocations = hub.inner.revocations.subscribe();
        let hub = hub.clone();
        async move {
            let expiry = async {
                match expires {
                    Some(at) => {
                        let left = at
                            .duration_since(SystemTime::now())
                            .unwrap_or(Duration::ZERO);
                        tokio::time::sleep(left).await;
                    }
                    None => std::future::pending().await,
                }
            };
            let revoked = async {
                let Some(jti) = jti else {
                    return std::future::pending().await;
                };
                // Revoked while this subscription was being prepared: the watch above was
                // taken after that revocation, so look first.
                if hub.is_revoked(&jti) {
                    return;
                }
                while revocations.changed().await.is_ok() {
                    if hub.is_revoked(&jti) {
                        return;
                    }
                }
                std::future::pending().await
            };
            tokio::select! {
                _ = expiry => {},
                _ = revoked => {},
                _ = closed.cancelled() => {},
            }
        }
    };
    // A first comment puts the headers and something on the wire at once, as the reference
    // hub's `:` line does.
    let events = stream::once(async { COMMENT })
        .chain(events)
        .take_until(until);
    let events = with_heartbeat(events, hub.inner.heartbeat);

    let mut response = Response::new(axum::body::Body::from_stream(
        events.map(Ok::<_, Infallible>),
    ));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-cache, no-store, must-revalidate, max-age=0"),
    );
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    headers.insert(header::EXPIRES, HeaderValue::from_static("0"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    if let Some(id) = answered_id.and_then(|id| HeaderValue::from_str(&id).ok()) {
        headers.insert("last-event-id", id);
    }
    response
}

/// An empty comment: the first line of every stream, and the heartbeat.
const COMMENT: Bytes = Bytes::from_static(b":\n\n");

/// The history backlog, then live updates, filtered for the subscriber, as encoded events;
/// ends when the subscriber falls too far behind. Holds the subscriber's `slot` and its place
/// in the index until it ends.
fn subscription_events(
    sub: Subscription,
    backlog: Vec<Arc<Entry>>,
    registered: Registered,
    slot: OwnedSemaphorePermit,
) -> impl Stream<Item = Bytes> {
    // An update on two topics of one subscription is handed to it twice; and it may be in the
    // backlog too. Positions only grow: one not past the last sent was sent.
    let last = backlog.last().map_or(0, |e| e.position);
    let backlog = stream::iter(backlog).map(|e| e.frame.clone());
    let live = stream::unfold(
        (sub, registered, slot, last),
        |(mut sub, mut registered, slot, mut last)| async move {
            while let Some(entry) = registered.receiver.recv().await {
                if entry.position > last && sub.can_receive(&entry.update) {
                    last = entry.position;
                    return Some((entry.frame.clone(), (sub, registered, slot, last)));
                }
            }
            None
        },
    );
    backlog.chain(live)
}

/// `events`, with a heartbeat comment after each `interval` without one.
fn with_heartbeat(
    events: impl Stream<Item = Bytes> + Send + 'static,
    interval: Option<Duration>,
) -> impl Stream<Item = Bytes> {
    stream::unfold(Box::pin(events), move |mut events| async move {
        let next = match interval {
            None => events.next().await,
            Some(interval) => tokio::time::timeout(interval, events.next())
                .await
                .unwrap_or(Some(COMMENT)),
        };
        next.map(|bytes| (bytes, events))
    })
}

/// A subscription's place in the index and its receiver; leaves the index when dropped.
struct Registered {
    hub: std::sync::Weak<HubInner>,
    registration: Registration,
    receiver: crate::dispatch::Receiver,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Some(hub) = self.hub.upgrade() {
            hub.log().dispatch.unregister(self.registration);
        }
    }
}
