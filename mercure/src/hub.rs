//! The embeddable hub: an `axum::Router` serving [`HUB_PATH`], publish (POST) and subscribe
//! (GET, server-sent events), with the behaviour of the reference hub's 0.x releases.
//!
//! # Delivery
//! Every accepted update goes into a bounded in-memory history and onto a broadcast channel,
//! both under one lock, so a subscriber that takes its history snapshot and its channel
//! receiver under the same lock sees every update exactly once, history first. A subscriber
//! too slow to keep up with the channel ([`CHANNEL_CAPACITY`] updates behind) is disconnected;
//! its client reconnects with `Last-Event-ID` and catches up from the history.
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
//! to subscribers. (An addition to the reference hub, which dispatches it again.)
//!
//! # Authorization
//! The JWT comes from the `Authorization: Bearer` header, else the `authorization` query
//! parameter, else the `mercureAuthorization` cookie; publishing with the cookie also needs an
//! `Origin` (or `Referer`) listed in the publish origins. Any refusal is 401, as in the
//! reference. A subscription ends when its JWT expires.

use crate::config::HubConfig;
use crate::config::KeyError;
use crate::jwt::{self, Claims, JwtKey};
use crate::selector::TopicSelectorStore;
use crate::update::{MAX_TOPICS, Update, UpdateError};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::{Stream, StreamExt, stream};
use std::collections::{HashSet, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tower_http::cors::{AllowOrigin, CorsLayer};

/// Where the hub is mounted.
pub const HUB_PATH: &str = "/.well-known/mercure";
/// The `lastEventID` value asking for the whole history.
pub const EARLIEST: &str = "earliest";
/// The cookie a browser may carry its JWT in.
pub const AUTHORIZATION_COOKIE: &str = "mercureAuthorization";
/// Updates a subscriber may lag behind before it is disconnected (and catches up from the
/// history on reconnection).
pub const CHANNEL_CAPACITY: usize = 8192;

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
    selectors: TopicSelectorStore,
    /// History and channel, changed together (see the module doc).
    log: Mutex<Log>,
    /// Fired by [`Hub::close`]: every subscription ends, so that a server can stop.
    closed: CancellationToken,
}

struct Log {
    history: VecDeque<Arc<Update>>,
    /// The ids in `history`, to skip repeated updates.
    ids: HashSet<String>,
    sender: broadcast::Sender<Arc<Update>>,
}

/// Why an in-process publish was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(transparent)]
pub struct PublishRefused(#[from] pub UpdateError);

impl Hub {
    pub fn new(config: &HubConfig) -> Result<Hub, KeyError> {
        let keys = config.keys.keys()?;
        Ok(Hub {
            inner: Arc::new(HubInner {
                publisher_key: keys.publisher,
                subscriber_key: keys.subscriber,
                anonymous: config.mercure_anonymous,
                heartbeat: config.heartbeat(),
                cors_origins: config.cors_origins(),
                publish_origins: config.publish_origins(),
                history_size: config.mercure_history_size,
                selectors: TopicSelectorStore::default(),
                log: Mutex::new(Log {
                    history: VecDeque::new(),
                    ids: HashSet::new(),
                    sender: broadcast::channel(CHANNEL_CAPACITY).0,
                }),
                closed: CancellationToken::new(),
            }),
        })
    }

    /// The routes: [`HUB_PATH`] for GET (subscribe) and POST (publish), with CORS when
    /// origins are configured and the reference hub's security headers.
    pub fn router(&self) -> Router {
        let router = Router::new()
            .route(HUB_PATH, get(subscribe).post(publish))
            .with_state(self.clone())
            .layer(axum::middleware::map_response(security_headers));
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
    /// it has none, dispatches it, and returns its id.
    pub fn publish(&self, mut update: Update) -> Result<String, PublishRefused> {
        update.validate()?;
        let id = update
            .id
            .get_or_insert_with(|| format!("urn:uuid:{}", uuid::Uuid::now_v7()))
            .clone();
        let update = Arc::new(update);
        let mut log = self.inner.log.lock().unwrap_or_else(|e| e.into_inner());
        if log.ids.contains(&id) {
            tracing::debug!(id, "update already dispatched; not sent again");
            return Ok(id);
        }
        if self.inner.history_size > 0 {
            if log.history.len() >= self.inner.history_size
                && let Some(old) = log.history.pop_front()
            {
                let old_id = old.id.as_deref().unwrap_or_default();
                // The same id may be in the history twice only if pushed twice: never.
                log.ids.remove(old_id);
            }
            log.ids.insert(id.clone());
            log.history.push_back(update.clone());
        }
        // No receiver is not an error: nobody is subscribed.
        let _ = log.sender.send(update);
        Ok(id)
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

    /// Who may receive `update`, given the subscription's topics and the private selectors of
    /// its JWT (see the reference `MatchTopics`): one topic of the update must match the
    /// subscription, and, for a private update, one topic must match a private selector.
    fn can_receive(&self, sub: &Subscription, update: &Update) -> bool {
        let store = &self.inner.selectors;
        if !store.any_matches(&update.topics, &sub.topics) {
            return false;
        }
        !update.private || store.any_matches(&update.topics, &sub.private_selectors)
    }
}

/// What a subscriber asked for and may see.
struct Subscription {
    topics: Vec<String>,
    private_selectors: Vec<String>,
}

/// Serves `hub` on `listener` until `shutdown`, then ends the subscriptions and stops.
pub async fn serve(
    listener: tokio::net::TcpListener,
    hub: Hub,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let router = hub.router();
    axum::serve(listener, router)
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

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
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
    match hub.publish(update) {
        Ok(id) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            id,
        )
            .into_response(),
        Err(PublishRefused(e)) if e.forbidden() => plain(StatusCode::FORBIDDEN, e.to_string()),
        Err(PublishRefused(e)) => plain(StatusCode::BAD_REQUEST, e.to_string()),
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
    if topics.len() > MAX_TOPICS {
        return plain(StatusCode::BAD_REQUEST, "Too many \"topic\" parameters.");
    }
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
    let subscription = Subscription {
        topics,
        private_selectors: claims
            .as_ref()
            .and_then(|c| c.subscribe_selectors())
            .map(<[String]>::to_vec)
            .unwrap_or_default(),
    };

    // History snapshot and live receiver under one lock: no gap, no duplicate.
    let (backlog, receiver, answered_id) = {
        let log = hub.inner.log.lock().unwrap_or_else(|e| e.into_inner());
        let receiver = log.sender.subscribe();
        match &last_event_id {
            None => (Vec::new(), receiver, None),
            Some(asked) => {
                let (backlog, answered) = history_after(&hub, &log.history, &subscription, asked);
                (backlog, receiver, Some(answered))
            }
        }
    };

    let expires = claims.as_ref().and_then(Claims::expires_at);
    let events = subscription_events(hub.clone(), subscription, backlog, receiver);
    // Ends at the JWT's expiry and when the hub closes.
    let until = {
        let closed = hub.inner.closed.clone();
        async move {
            match expires {
                Some(at) => {
                    let left = at
                        .duration_since(SystemTime::now())
                        .unwrap_or(Duration::ZERO);
                    tokio::select! {
                        _ = tokio::time::sleep(left) => {},
                        _ = closed.cancelled() => {},
                    }
                }
                None => closed.cancelled().await,
            }
        }
    };
    // A first comment puts the headers and something on the wire at once, as the reference
    // hub's `:` line does.
    let events = stream::once(async { Ok(Event::default().comment("")) })
        .chain(events)
        .take_until(until);

    let mut response = match hub.inner.heartbeat {
        Some(interval) => Sse::new(events)
            .keep_alive(KeepAlive::new().interval(interval).text(""))
            .into_response(),
        None => Sse::new(events).into_response(),
    };
    let headers = response.headers_mut();
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

/// The history after `asked` that the subscriber may see, and the `Last-Event-ID` to answer
/// (see the module doc).
fn history_after(
    hub: &Hub,
    history: &VecDeque<Arc<Update>>,
    sub: &Subscription,
    asked: &str,
) -> (Vec<Arc<Update>>, String) {
    if asked == EARLIEST {
        let all = history
            .iter()
            .filter(|u| hub.can_receive(sub, u))
            .cloned()
            .collect();
        return (all, EARLIEST.to_owned());
    }
    match history.iter().position(|u| u.id.as_deref() == Some(asked)) {
        Some(at) => {
            let after = history
                .iter()
                .skip(at + 1)
                .filter(|u| hub.can_receive(sub, u))
                .cloned()
                .collect();
            (after, asked.to_owned())
        }
        None => {
            tracing::info!(
                last_event_id = asked,
                "Last-Event-ID not in the history; nothing replayed"
            );
            // Only ids the subscriber may see are disclosed.
            let last_visible = history
                .iter()
                .rev()
                .find(|u| hub.can_receive(sub, u))
                .and_then(|u| u.id.clone())
                .unwrap_or_else(|| EARLIEST.to_owned());
            (Vec::new(), last_visible)
        }
    }
}

/// The history backlog, then live updates, filtered for the subscriber; ends when the
/// subscriber falls too far behind.
fn subscription_events(
    hub: Hub,
    sub: Subscription,
    backlog: Vec<Arc<Update>>,
    receiver: broadcast::Receiver<Arc<Update>>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let backlog = stream::iter(backlog).map(|u| Ok(u.to_event()));
    let live = stream::unfold(
        (hub, sub, receiver),
        |(hub, sub, mut receiver)| async move {
            loop {
                match receiver.recv().await {
                    Ok(update) if hub.can_receive(&sub, &update) => {
                        return Some((Ok(update.to_event()), (hub, sub, receiver)));
                    }
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::info!(
                            missed,
                            "subscriber too slow; disconnected (it catches up from the history)"
                        );
                        return None;
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        },
    );
    backlog.chain(live)
}
