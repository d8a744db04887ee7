//! Who may do what: logins (axum-login), sessions (stored in PostgreSQL), the admin check for
//! pages and for server functions, and the slowing of failed logins.
//!
//! Sessions live in table `app_session` through [`PgSessionStore`], a small tower-sessions
//! store on our own deadpool pool: tower-sessions' PostgreSQL store is built on sqlx, and a
//! second PostgreSQL driver and pool beside tokio-postgres is not worth one table.

use crate::users::{self, User};
use crate::{AppState, paths};
use async_trait::async_trait;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum_login::tower_sessions::session::{Id, Record};
use axum_login::tower_sessions::{SessionStore, session_store};
use axum_login::{AuthUser, AuthnBackend};
use leptos::prelude::ServerFnError;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// The login session, as handlers and server functions extract it.
pub type AuthSession = axum_login::AuthSession<Backend>;

/// Name of the session cookie.
pub const SESSION_COOKIE: &str = "dataviz_session";

impl AuthUser for User {
    type Id = i64;

    fn id(&self) -> i64 {
        self.id
    }

    fn session_auth_hash(&self) -> &[u8] {
        self.password_hash.as_bytes()
    }
}

/// What the login form sends.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub email: String,
    pub password: String,
}

/// Users from `app_user`, passwords checked with Argon2.
#[derive(Clone)]
pub struct Backend {
    pool: deadpool_postgres::Pool,
    /// Password checks at once ([`LoginThrottle::checks`]): a check holds its permit on the
    /// blocking thread until it ends, even when its client has gone.
    checks: Arc<Semaphore>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Backend")
    }
}

impl Backend {
    pub fn new(pool: deadpool_postgres::Pool, checks: Arc<Semaphore>) -> Backend {
        Backend { pool, checks }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("database: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error(transparent)]
    User(#[from] users::UserError),
    #[error("password check: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("password checks closed")]
    Closed(#[from] tokio::sync::AcquireError),
}

impl AuthnBackend for Backend {
    type User = User;
    type Credentials = Credentials;
    type Error = BackendError;

    async fn authenticate(&self, creds: Credentials) -> Result<Option<User>, BackendError> {
        let client = self.pool.get().await?;
        let user = users::by_email(&client, &creds.email).await?;
        drop(client);
        // Argon2 is deliberately slow: off the async threads, and at most as many at once as
        // there are permits. The permit goes with the work, so a client that hangs up does not
        // free it before the work ends.
        let permit = self.checks.clone().acquire_owned().await?;
        let ok = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            match user {
                Some(user) if users::verify_password(&creds.password, &user.password_hash) => {
                    Some(user)
                }
                Some(_) => None,
                None => {
                    users::verify_nothing(&creds.password);
                    None
                }
            }
        })
        .await?;
        Ok(ok)
    }

    async fn get_user(&self, id: &i64) -> Result<Option<User>, BackendError> {
        let client = self.pool.get().await?;
        Ok(users::by_id(&client, *id).await?)
    }
}

/// tower-sessions records in `app_session` (id, data as jsonb, expiry).
#[derive(Clone)]
pub struct PgSessionStore {
    pool: deadpool_postgres::Pool,
}

impl std::fmt::Debug for PgSessionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PgSessionStore")
    }
}

impl PgSessionStore {
    pub fn new(pool: deadpool_postgres::Pool) -> PgSessionStore {
        PgSessionStore { pool }
    }

    async fn client(&self) -> session_store::Result<deadpool_postgres::Object> {
        self.pool
            .get()
            .await
            .map_err(|e| session_store::Error::Backend(e.to_string()))
    }
}

fn backend_error(e: tokio_postgres::Error) -> session_store::Error {
    session_store::Error::Backend(e.to_string())
}

fn encode(record: &Record) -> session_store::Result<(String, serde_json::Value, f64)> {
    let data = serde_json::to_value(&record.data)
        .map_err(|e| session_store::Error::Encode(e.to_string()))?;
    Ok((
        record.id.to_string(),
        data,
        record.expiry_date.unix_timestamp() as f64,
    ))
}

#[async_trait]
impl SessionStore for PgSessionStore {
    async fn create(&self, record: &mut Record) -> session_store::Result<()> {
        let client = self.client().await?;
        // Logins are rare: a good moment to forget expired sessions.
        client
            .execute("DELETE FROM app_session WHERE expires_at < now()", &[])
            .await
            .map_err(backend_error)?;
        loop {
            let (id, data, expiry) = encode(record)?;
            let inserted = client
                .execute(
                    "INSERT INTO app_session (id, data, expires_at) VALUES ($1, $2, to_timestamp($3))
                     ON CONFLICT (id) DO NOTHING",
                    &[&id, &data, &expiry],
                )
                .await
                .map_err(backend_error)?;
            if inserted == 1 {
                return Ok(());
            }
            // An id collision (2^-128): draw another.
            record.id = Id::default();
        }
    }

    async fn save(&self, record: &Record) -> session_store::Result<()> {
        let (id, data, expiry) = encode(record)?;
        self.client()
            .await?
            .execute(
                "INSERT INTO app_session (id, data, expires_at) VALUES ($1, $2, to_timestamp($3))
                 ON CONFLICT (id) DO UPDATE SET data = EXCLUDED.data, expires_at = EXCLUDED.expires_at",
                &[&id, &data, &expiry],
            )
            .await
            .map_err(backend_error)?;
        Ok(())
    }

    async fn load(&self, id: &Id) -> session_store::Result<Option<Record>> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT data, extract(epoch FROM expires_at)::float8 FROM app_session
                 WHERE id = $1 AND expires_at > now()",
                &[&id.to_string()],
            )
            .await
            .map_err(backend_error)?;
        let Some(row) = row else { return Ok(None) };
        let data: serde_json::Value = row.get(0);
        let expiry: f64 = row.get(1);
        Ok(Some(Record {
            id: *id,
            data: serde_json::from_value(data)
                .map_err(|e| session_store::Error::Decode(e.to_string()))?,
            expiry_date: time::OffsetDateTime::from_unix_timestamp(expiry as i64)
                .map_err(|e| session_store::Error::Decode(e.to_string()))?,
        }))
    }

    async fn delete(&self, id: &Id) -> session_store::Result<()> {
        self.client()
            .await?
            .execute("DELETE FROM app_session WHERE id = $1", &[&id.to_string()])
            .await
            .map_err(backend_error)?;
        Ok(())
    }
}

/// Login attempts, bounded in number, pace and memory.
///
/// - **Pace.** Each account and each client address (an IPv6 address by its /64) has a time
///   before which no attempt for it is checked. An attempt takes the next free time of both,
///   and moves them on by the current delay: `base` after a success or for a first attempt,
///   doubling with each failure up to `max`. So parallel attempts queue one behind the other
///   instead of all waiting out the same delay: one guess per delay, however many are sent.
///   An attempt whose turn is more than `max` away is refused at once ([`LoginRefused::TooMany`]).
/// - **Work.** At most `concurrency` passwords are checked at once (Argon2id takes 19 MiB each;
///   [`Backend`] holds a permit of [`LoginThrottle::checks`] for each), and at most
///   `concurrency * QUEUE_PER_CHECK` attempts are admitted at once, waiting or checked; one
///   more is refused at once ([`LoginRefused::Busy`]).
/// - **Memory.** At most `tracked` accounts and addresses are remembered; an entry idle for
///   [`FORGET_AFTER`] starts afresh, and when the table is full the longest idle goes first.
#[derive(Debug)]
pub struct LoginThrottle {
    base: Duration,
    max: Duration,
    tracked: usize,
    pace: Mutex<HashMap<String, Pace>>,
    /// Attempts admitted: waiting for their turn or being checked.
    admitted: Arc<Semaphore>,
    /// Password checks running (taken by [`Backend`]).
    checks: Arc<Semaphore>,
    concurrency: usize,
}

/// Attempts that may wait for a turn, per password check allowed at once.
pub const QUEUE_PER_CHECK: usize = 16;
/// How long an account or address without attempts is remembered.
pub const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, Clone, Copy)]
struct Pace {
    failures: u32,
    /// No attempt for this key is checked before then.
    next: Instant,
    last_seen: Instant,
}

impl Pace {
    /// No attempt for [`FORGET_AFTER`] and none waiting: nothing worth remembering.
    fn idle(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_seen) >= FORGET_AFTER && self.next <= now
    }
}

/// Why an attempt was not even checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LoginRefused {
    #[error("too many login attempts for this account or address; retry in {0:?}")]
    TooMany(Duration),
    #[error("too many login attempts at once")]
    Busy,
}

/// An admitted attempt, checked when its turn came; say how it went with
/// [`LoginAttempt::failed`] or [`LoginAttempt::succeeded`] (dropping it counts as neither).
#[derive(Debug)]
pub struct LoginAttempt {
    throttle: Arc<LoginThrottle>,
    keys: [String; 2],
    _admitted: OwnedSemaphorePermit,
}

impl LoginThrottle {
    pub fn new(base: Duration, max: Duration, concurrency: usize, tracked: usize) -> LoginThrottle {
        let concurrency = concurrency.max(1);
        LoginThrottle {
            base,
            max: max.max(base),
            tracked: tracked.max(2),
            pace: Mutex::new(HashMap::new()),
            admitted: Arc::new(Semaphore::new(concurrency * QUEUE_PER_CHECK)),
            checks: Arc::new(Semaphore::new(concurrency)),
            concurrency,
        }
    }

    fn keys(email: &str, ip: Option<IpAddr>, device: Option<&str>) -> [String; 2] {
        let address = match ip {
            // One host holds a whole /64: count it as one address.
            Some(IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_none() => {
                let net = ipnet::Ipv6Net::new(v6, 64).map(|n| n.trunc());
                net.map_or_else(|_| v6.to_string(), |n| n.to_string())
            }
            Some(ip) => ip.to_canonical().to_string(),
            None => "unknown".to_owned(),
        };
        let account = match device {
            // A browser that logged in to this account before: a lane of its own.
            Some(nonce) => format!("device:{nonce}"),
            None => format!("account:{}", email.trim().to_lowercase()),
        };
        [account, format!("ip:{address}")]
    }

    fn delay(&self, failures: u32) -> Duration {
        match failures {
            0 => self.base,
            n => self.base.saturating_mul(1 << (n - 1).min(16)).min(self.max),
        }
    }

    /// Waits for this attempt's turn and a free password check; refuses it at once when its
    /// turn is too far away or too many attempts are waiting.
    pub async fn admit(
        self: &Arc<Self>,
        email: &str,
        ip: Option<IpAddr>,
        device: Option<&str>,
    ) -> Result<LoginAttempt, LoginRefused> {
        let admitted = self
            .admitted
            .clone()
            .try_acquire_owned()
            .map_err(|_| LoginRefused::Busy)?;
        let keys = Self::keys(email, ip, device);
        let turn = {
            let mut pace = self.pace.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            for key in &keys {
                // Idle long enough: its failures are forgotten.
                if pace.get(key).is_some_and(|p| p.idle(now)) {
                    pace.remove(key);
                }
            }
            let turn = keys
                .iter()
                .filter_map(|k| pace.get(k).map(|p| p.next))
                .fold(now, Instant::max);
            if turn.duration_since(now) > self.max {
                return Err(LoginRefused::TooMany(turn.duration_since(now)));
            }
            for key in &keys {
                self.make_room(&mut pace, now);
                let entry = pace.entry(key.clone()).or_insert(Pace {
                    failures: 0,
                    next: now,
                    last_seen: now,
                });
                // Until this attempt is settled, the next one waits as if it fails.
                entry.next = turn.max(entry.next) + self.delay(entry.failures);
                entry.last_seen = now;
            }
            turn
        };
        tracing::debug!(wait = ?turn.saturating_duration_since(Instant::now()), "login attempt admitted");
        tokio::time::sleep_until(turn).await;
        Ok(LoginAttempt {
            throttle: self.clone(),
            keys,
            _admitted: admitted,
        })
    }

    /// The permits of password checks, one per check running ([`Backend`] takes them).
    pub fn checks(&self) -> Arc<Semaphore> {
        self.checks.clone()
    }

    /// Forgets idle entries and, when the table is still full, the longest idle one.
    fn make_room(&self, pace: &mut HashMap<String, Pace>, now: Instant) {
        if pace.len() < self.tracked {
            return;
        }
        pace.retain(|_, p| !p.idle(now));
        while pace.len() >= self.tracked {
            let Some(oldest) = pace
                .iter()
                .min_by_key(|(_, p)| p.last_seen)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            pace.remove(&oldest);
        }
    }

    /// Attempts admitted now: waiting for their turn or being checked.
    pub fn attempts(&self) -> usize {
        self.concurrency * QUEUE_PER_CHECK - self.admitted.available_permits()
    }

    /// Accounts and addresses remembered now.
    pub fn tracked(&self) -> usize {
        self.pace.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl LoginAttempt {
    /// A wrong password: the account and the address wait longer before their next attempt.
    pub fn failed(self) {
        let throttle = &self.throttle;
        let mut pace = throttle.pace.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        for key in &self.keys {
            if let Some(entry) = pace.get_mut(key) {
                entry.failures = entry.failures.saturating_add(1);
                entry.next = entry.next.max(now + throttle.delay(entry.failures));
                entry.last_seen = now;
            }
        }
    }

    /// The right password: the account and the address start afresh.
    pub fn succeeded(self) {
        let mut pace = self.throttle.pace.lock().unwrap_or_else(|p| p.into_inner());
        for key in &self.keys {
            pace.remove(key);
        }
    }
}

/// The cookie a browser gets at a successful login: proof that it logged in to that account
/// before ([`DeviceCookies`]).
pub const DEVICE_COOKIE: &str = "dataviz_device";

/// Device cookies, as OWASP describes them against lockout: a browser that once logged in to
/// an account carries a signed cookie naming the account, and its attempts for that account
/// queue in a lane of their own (the cookie's) instead of the account's. So an attacker who
/// keeps an account's queue full, without such a cookie, does not keep its owner out; a
/// stolen cookie's lane is paced like any other. The key is made at start: after a restart,
/// a browser gets a new cookie at its next login.
pub struct DeviceCookies {
    key: [u8; 32],
}

impl std::fmt::Debug for DeviceCookies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceCookies")
    }
}

impl Default for DeviceCookies {
    fn default() -> Self {
        DeviceCookies {
            key: rand::random(),
        }
    }
}

impl DeviceCookies {
    fn mac(&self, email: &str, nonce: &str) -> hmac::Hmac<sha2::Sha256> {
        use hmac::Mac as _;
        let mut mac = <hmac::Hmac<sha2::Sha256>>::new_from_slice(&self.key)
            .expect("HMAC takes a key of any length");
        mac.update(email.trim().to_lowercase().as_bytes());
        mac.update(b"\n");
        mac.update(nonce.as_bytes());
        mac
    }

    /// A cookie value for `email`: `<nonce>.<signature>`, both hex.
    pub fn issue(&self, email: &str) -> String {
        use hmac::Mac as _;
        let nonce: [u8; 16] = rand::random();
        let nonce = hex(&nonce);
        let signature = hex(&self.mac(email, &nonce).finalize().into_bytes());
        format!("{nonce}.{signature}")
    }

    /// The cookie's nonce when `value` is a cookie this process issued for `email`.
    pub fn verify(&self, email: &str, value: &str) -> Option<String> {
        use hmac::Mac as _;
        let (nonce, signature) = value.split_once('.')?;
        let signature = unhex(signature)?;
        self.mac(email, nonce)
            .verify_slice(&signature)
            .ok()
            .map(|()| nonce.to_owned())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || text.len() > 128 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The client's address: the peer's, or, when the peer is a trusted proxy, the first address
/// of `X-Forwarded-For` (read from the right) that is not a trusted proxy. A client cannot
/// choose its address by sending the header itself: only what trusted proxies added counts.
pub fn client_address(
    peer: Option<IpAddr>,
    headers: &axum::http::HeaderMap,
    trusted: &[ipnet::IpNet],
) -> Option<IpAddr> {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(&ip.to_canonical()));
    let mut client = peer?;
    if !is_trusted(&client) {
        return Some(client);
    }
    let forwarded = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect::<Vec<_>>();
    for hop in forwarded.iter().rev() {
        let Ok(ip) = hop.parse::<IpAddr>() else {
            // A hop we cannot read: stop at what we know.
            break;
        };
        client = ip;
        if !is_trusted(&ip) {
            break;
        }
    }
    Some(client)
}

/// An admin, for page handlers: extracting it answers anonymous visitors with a redirect to
/// the login page and logged-in non-admins with 403.
#[derive(Debug, Clone)]
pub struct Admin(pub User);

impl FromRequestParts<AppState> for Admin {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _state: &AppState) -> Result<Admin, Response> {
        let session = parts.extensions.get::<AuthSession>().cloned();
        match session.and_then(|s| s.user) {
            Some(user) if user.is_admin() => Ok(Admin(user)),
            Some(user) => Err(forbidden_page(&user)),
            None => {
                let next = parts
                    .uri
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .to_owned();
                Err(Redirect::to(&paths::login(Some(&next))).into_response())
            }
        }
    }
}

fn forbidden_page(user: &User) -> Response {
    let page = crate::views::forbidden(&user.email);
    (StatusCode::FORBIDDEN, page).into_response()
}

/// The check every admin server function starts with. Anonymous: 401, or a redirect to the
/// login page for a plain form post. Logged in without `ROLE_ADMIN`: 403.
pub async fn require_admin() -> Result<User, ServerFnError> {
    let session: AuthSession = leptos_axum::extract()
        .await
        .map_err(|e| ServerFnError::new(format!("no session: {e}")))?;
    match session.user {
        Some(user) if user.is_admin() => Ok(user),
        Some(_) => {
            set_status(StatusCode::FORBIDDEN);
            Err(ServerFnError::new("forbidden: administrators only"))
        }
        None => {
            if accepts_html() {
                leptos_axum::redirect(&paths::login(None));
            } else {
                set_status(StatusCode::UNAUTHORIZED);
            }
            Err(ServerFnError::new("login required"))
        }
    }
}

/// Sets the status of the server function's response.
pub fn set_status(status: StatusCode) {
    if let Some(res) = leptos::prelude::use_context::<leptos_axum::ResponseOptions>() {
        res.set_status(status);
    }
}

/// True for a plain browser form post (as opposed to a script's request).
pub fn accepts_html() -> bool {
    leptos::prelude::use_context::<Parts>().is_some_and(|parts| {
        parts
            .headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("text/html"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use axum::http::HeaderMap;

    fn throttle() -> Arc<LoginThrottle> {
        Arc::new(LoginThrottle::new(
            Duration::from_millis(100),
            Duration::from_secs(1),
            2,
            1000,
        ))
    }

    async fn fail(t: &Arc<LoginThrottle>, email: &str, ip: Option<IpAddr>) {
        t.admit(email, ip, None).await.expect("admitted").failed();
    }

    #[tokio::test(start_paused = true)]
    async fn failures_double_the_delay_per_account_and_per_address() {
        let t = throttle();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let third: IpAddr = "192.0.2.3".parse().unwrap();
        let started = Instant::now();
        fail(&t, "a@x", Some(ip)).await;
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "a first attempt waits for nothing"
        );
        let started = Instant::now();
        fail(&t, "a@x", Some(ip)).await;
        assert_eq!(started.elapsed(), Duration::from_millis(100));
        // Two failures: the account and the address each wait 200 ms.
        let started = Instant::now();
        let timed = |email: &'static str, ip: IpAddr| {
            let t = &t;
            async move {
                fail(t, email, Some(ip)).await;
                started.elapsed()
            }
        };
        let (account, address, neither) =
            tokio::join!(timed("A@X", other), timed("b@x", ip), timed("c@x", third));
        assert_eq!(account, Duration::from_millis(200), "per account");
        assert_eq!(address, Duration::from_millis(200), "per address");
        assert_eq!(neither, Duration::ZERO);
        for _ in 0..6 {
            fail(&t, "a@x", Some(other)).await;
        }
        let started = Instant::now();
        fail(&t, "a@x", Some(third)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(1), "capped at max");
        tokio::time::sleep(Duration::from_secs(2)).await;
        t.admit("a@x", Some(third), None).await.unwrap().succeeded();
        let started = Instant::now();
        fail(&t, "a@x", "192.0.2.9".parse().ok()).await;
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "a success starts the account afresh"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn parallel_attempts_queue_one_guess_per_delay_and_the_rest_are_refused() {
        let t = throttle();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        fail(&t, "a@x", Some(ip)).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        // Twenty at once for one account from twenty addresses.
        let started = Instant::now();
        let attempts = (0..20).map(|i| {
            let t = &t;
            async move {
                let ip: IpAddr = format!("198.51.100.{i}").parse().unwrap();
                match t.admit("a@x", Some(ip), None).await {
                    Ok(attempt) => {
                        let at = started.elapsed();
                        attempt.failed();
                        Ok(at)
                    }
                    Err(e) => Err(e),
                }
            }
        });
        let results = futures::future::join_all(attempts).await;
        let mut checked: Vec<Duration> = results.iter().filter_map(|r| r.ok()).collect();
        checked.sort();
        // One second of turns at 100 ms apart, at most; the rest refused at once.
        assert!(checked.len() <= 11, "{results:?}");
        assert!(
            results
                .iter()
                .any(|r| matches!(r, Err(LoginRefused::TooMany(_)))),
            "{results:?}"
        );
        for pair in checked.windows(2) {
            assert!(
                pair[1] - pair[0] >= Duration::from_millis(100),
                "{checked:?}"
            );
        }
    }

    #[tokio::test]
    async fn checks_and_waiting_attempts_are_bounded() {
        let t = Arc::new(LoginThrottle::new(
            Duration::from_millis(1),
            Duration::from_secs(60),
            2,
            10_000,
        ));
        let (release, released) = tokio::sync::watch::channel(false);
        let queue = 2 * QUEUE_PER_CHECK;
        let holders: Vec<_> = (0..queue)
            .map(|i| {
                let (t, mut released) = (t.clone(), released.clone());
                tokio::spawn(async move {
                    let ip: IpAddr = format!("10.0.{}.{}", i / 250, i % 250).parse().unwrap();
                    let attempt = t.admit(&format!("u{i}@x"), Some(ip), None).await.unwrap();
                    let _ = released.wait_for(|r| *r).await;
                    attempt.failed();
                })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while t.attempts() < queue {
            assert!(Instant::now() < deadline, "{} admitted", t.attempts());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let late = t.admit("late@x", "10.9.9.9".parse().ok(), None).await;
        assert_eq!(late.unwrap_err(), LoginRefused::Busy, "the queue is full");
        release.send(true).unwrap();
        for holder in holders {
            holder.await.unwrap();
        }
        assert_eq!(t.attempts(), 0);
        assert!(
            t.admit("late@x", "10.9.9.9".parse().ok(), None)
                .await
                .is_ok()
        );
        assert_eq!(t.checks().available_permits(), 2, "two checks at once");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_entries_start_afresh_and_a_success_clears_the_address() {
        let t = throttle();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..8 {
            fail(&t, "a@x", Some(ip)).await;
        }
        tokio::time::sleep(FORGET_AFTER + Duration::from_secs(1)).await;
        fail(&t, "a@x", Some(ip)).await;
        let started = Instant::now();
        fail(&t, "b@x", Some(ip)).await;
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(100),
            "one failure since the address was idle: the base delay, not the cap"
        );
        t.admit("c@x", Some(ip), None).await.unwrap().succeeded();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        fail(&t, "d@x", Some(ip)).await;
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "the address starts afresh"
        );
    }

    #[tokio::test]
    async fn the_table_is_bounded() {
        let t = Arc::new(LoginThrottle::new(
            Duration::ZERO,
            Duration::from_secs(1),
            2,
            100,
        ));
        for i in 0..1000 {
            let ip: IpAddr = format!("10.1.{}.{}", i / 250, i % 250).parse().unwrap();
            fail(&t, &format!("u{i}@x"), Some(ip)).await;
        }
        assert!(t.tracked() <= 100, "{}", t.tracked());
    }

    #[test]
    fn device_cookies_name_one_account_and_cannot_be_forged() {
        let cookies = DeviceCookies::default();
        let value = cookies.issue("Admin@Example.com");
        let nonce = cookies.verify("admin@example.com", &value).expect("valid");
        assert!(value.starts_with(&nonce));
        assert_eq!(cookies.verify("other@example.com", &value), None);
        assert_eq!(
            DeviceCookies::default().verify("admin@example.com", &value),
            None
        );
        let (n, sig) = value.split_once('.').unwrap();
        let forged = format!(
            "{n}.{}",
            sig.replace(&sig[..1], if &sig[..1] == "0" { "1" } else { "0" })
        );
        assert_eq!(cookies.verify("admin@example.com", &forged), None);
        assert_eq!(cookies.verify("admin@example.com", "garbage"), None);
        assert_ne!(
            cookies.issue("a@x"),
            cookies.issue("a@x"),
            "a nonce each time"
        );
        let [lane, _] = LoginThrottle::keys("a@x", None, Some(&nonce));
        assert_eq!(lane, format!("device:{nonce}"));
    }

    #[test]
    fn addresses_behind_trusted_proxies() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let headers = |xff: &str| {
            let mut h = HeaderMap::new();
            h.insert("x-forwarded-for", xff.parse().unwrap());
            h
        };
        let proxy: Option<IpAddr> = "10.0.0.5".parse().ok();
        let outsider: Option<IpAddr> = "203.0.113.9".parse().ok();
        let ip = |s: &str| s.parse::<IpAddr>().ok();
        // The header counts only from a trusted proxy, and only its untrusted part.
        assert_eq!(
            client_address(outsider, &headers("1.2.3.4"), &trusted),
            outsider
        );
        assert_eq!(
            client_address(proxy, &headers("1.2.3.4"), &trusted),
            ip("1.2.3.4")
        );
        assert_eq!(
            client_address(proxy, &headers("6.6.6.6, 1.2.3.4, 10.0.0.7"), &trusted),
            ip("1.2.3.4"),
            "a client's own header before the proxy's is not believed"
        );
        assert_eq!(client_address(proxy, &HeaderMap::new(), &trusted), proxy);
        assert_eq!(client_address(proxy, &headers("garbage"), &trusted), proxy);
        assert_eq!(
            client_address(proxy, &headers("1.2.3.4"), &[]),
            proxy,
            "none trusted"
        );
        assert_eq!(client_address(None, &headers("1.2.3.4"), &trusted), None);
    }

    #[test]
    fn an_ipv6_host_counts_by_its_64() {
        let [_, a] = LoginThrottle::keys("a", "2001:db8:1:2::1".parse().ok(), None);
        let [_, b] = LoginThrottle::keys("a", "2001:db8:1:2:ffff::9".parse().ok(), None);
        let [_, c] = LoginThrottle::keys("a", "2001:db8:1:3::1".parse().ok(), None);
        let [_, v4] = LoginThrottle::keys("a", "::ffff:192.0.2.1".parse().ok(), None);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(v4, "ip:192.0.2.1");
    }
}
