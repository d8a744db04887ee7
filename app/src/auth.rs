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
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Backend")
    }
}

impl Backend {
    pub fn new(pool: deadpool_postgres::Pool) -> Backend {
        Backend { pool }
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
}

impl AuthnBackend for Backend {
    type User = User;
    type Credentials = Credentials;
    type Error = BackendError;

    async fn authenticate(&self, creds: Credentials) -> Result<Option<User>, BackendError> {
        let client = self.pool.get().await?;
        let user = users::by_email(&client, &creds.email).await?;
        drop(client);
        // Argon2 is deliberately slow: off the async threads.
        let ok = tokio::task::spawn_blocking(move || match user {
            Some(user) if users::verify_password(&creds.password, &user.password_hash) => {
                Some(user)
            }
            Some(_) => None,
            None => {
                users::verify_nothing(&creds.password);
                None
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

/// Slows failed logins down: each failure for an account or from an address doubles the wait
/// before the next attempt for it is even checked, from `base` up to `max`. A success clears
/// the account's count; counts are forgotten after `forget_after` without a failure.
#[derive(Debug)]
pub struct LoginThrottle {
    base: Duration,
    max: Duration,
    forget_after: Duration,
    failures: Mutex<HashMap<String, (u32, Instant)>>,
}

impl LoginThrottle {
    pub fn new(base: Duration, max: Duration) -> LoginThrottle {
        LoginThrottle {
            base,
            max,
            forget_after: Duration::from_secs(15 * 60),
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn keys(email: &str, ip: Option<IpAddr>) -> [String; 2] {
        [
            format!("account:{}", email.trim().to_lowercase()),
            format!(
                "ip:{}",
                ip.map_or("unknown".to_owned(), |ip| ip.to_string())
            ),
        ]
    }

    /// How long to wait before checking this attempt.
    pub fn delay(&self, email: &str, ip: Option<IpAddr>) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        failures.retain(|_, (_, last)| now.duration_since(*last) < self.forget_after);
        let worst = Self::keys(email, ip)
            .iter()
            .filter_map(|k| failures.get(k).map(|(n, _)| *n))
            .max()
            .unwrap_or(0);
        if worst == 0 {
            return Duration::ZERO;
        }
        self.base
            .saturating_mul(1 << (worst - 1).min(16))
            .min(self.max)
    }

    pub fn failed(&self, email: &str, ip: Option<IpAddr>) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        for key in Self::keys(email, ip) {
            let entry = failures.entry(key).or_insert((0, Instant::now()));
            entry.0 = entry.0.saturating_add(1);
            entry.1 = Instant::now();
        }
    }

    pub fn succeeded(&self, email: &str) {
        let [account, _] = Self::keys(email, None);
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&account);
    }
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

    #[test]
    fn failures_double_the_delay_per_account_and_per_address() {
        let t = LoginThrottle::new(Duration::from_millis(100), Duration::from_secs(1));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!(t.delay("a@x", Some(ip)), Duration::ZERO);
        t.failed("a@x", Some(ip));
        assert_eq!(t.delay("a@x", Some(ip)), Duration::from_millis(100));
        t.failed("a@x", Some(ip));
        assert_eq!(
            t.delay("A@X", Some(other)),
            Duration::from_millis(200),
            "per account"
        );
        assert_eq!(
            t.delay("b@x", Some(ip)),
            Duration::from_millis(200),
            "per address"
        );
        assert_eq!(t.delay("b@x", Some(other)), Duration::ZERO);
        for _ in 0..10 {
            t.failed("a@x", Some(ip));
        }
        assert_eq!(t.delay("a@x", None), Duration::from_secs(1), "capped");
        t.succeeded("a@x");
        assert_eq!(t.delay("a@x", None), Duration::ZERO);
    }
}
