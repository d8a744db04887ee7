//! The Dataviz admin site: Leptos server-side rendering on axum, for administrators only.
//!
//! Every page is HTML rendered on the server from Leptos components; every change is a Leptos
//! server function posted by a plain `<form>` (`ActionForm`) and answered with a redirect, so
//! the site works with JavaScript off. The only script adds live values on a device's page
//! (Mercure `EventSource`). No WASM, no CDN: the stylesheet is served by the app itself.
//!
//! # Layout
//! - [`config`]: `APP_ADDR`, `APP_PUBLIC_URL`, the hub's public URL and the login throttle.
//! - [`users`]: users, roles and Argon2id password hashes (`app_user`).
//! - [`auth`]: axum-login backend, the PostgreSQL session store, the admin checks for pages
//!   ([`auth::Admin`]) and server functions ([`auth::require_admin`]), the login throttle.
//! - [`csrf`]: every state-changing request must come from the site itself.
//! - [`data`]: the queries behind the pages (gateways, devices, tags, chart series).
//! - [`pipeline`]: the pipeline's state from JetStream (RAW, its consumer, DEAD).
//! - [`api`]: the server functions (login, logout, gateway CRUD, dead-letter re-queue).
//! - [`pages`]: the page handlers, one per route.
//! - [`views`]: the Leptos components the pages are made of.
//! - [`chart`]: server-side SVG charts.
//! - [`live`]: the Mercure subscriber cookie and the live-values script.
//!
//! # Security
//! Pages take an [`auth::Admin`] (anonymous → `/login`, non-admin → 403); every server function
//! but `login` starts with [`auth::require_admin`]. The session cookie is HttpOnly and
//! SameSite=Lax (Secure when `APP_PUBLIC_URL` is https); POSTs are refused unless they come
//! from the site's own origin ([`csrf`]). Login attempts are paced per account and per client address, and bounded in number
//! ([`auth::LoginThrottle`]).
//! Where to go after login (`next`) is kept only when a browser would resolve it to a path on
//! this site ([`paths::local_target`]).
//!
//! # Error policy
//! Page handlers answer a database failure with a 500 page and a log line; server functions
//! return `ServerFnError`, which a plain form post shows on the page it came from.

pub mod api;
pub mod auth;
pub mod chart;
pub mod config;
pub mod csrf;
pub mod data;
pub mod live;
pub mod pages;
pub mod paths;
pub mod pipeline;
pub mod users;
pub mod views;

use anyhow::Context as _;
use axum::Router;
use axum::routing::{get, post};
use axum_login::AuthManagerLayerBuilder;
use axum_login::tower_sessions::cookie::SameSite;
use axum_login::tower_sessions::{Expiry, SessionManagerLayer};
use std::net::SocketAddr;
use std::sync::Arc;

pub use config::AppConfig;
pub use live::LiveConfig;

/// What every page and server function reaches: the database, JetStream, the settings.
#[derive(Clone)]
pub struct AppState {
    pub pool: deadpool_postgres::Pool,
    /// For the pipeline state on the home page and the dead letters.
    pub js: async_nats::jetstream::Context,
    pub settings: Arc<Settings>,
    pub throttle: Arc<auth::LoginThrottle>,
    pub device_cookies: Arc<auth::DeviceCookies>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Settings resolved once at start.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Origins (scheme://host[:port]) trusted for POSTs besides the request's own host.
    pub trusted_origins: Vec<String>,
    /// Session and Mercure cookies carry `Secure`.
    pub secure_cookies: bool,
    /// Live values through Mercure; `None`: the device page shows no live values.
    pub live: Option<LiveConfig>,
    /// Proxies whose X-Forwarded-For names the client (`TRUSTED_PROXIES`).
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

impl AppState {
    pub fn new(
        pool: deadpool_postgres::Pool,
        js: async_nats::jetstream::Context,
        config: &AppConfig,
        live: Option<LiveConfig>,
    ) -> AppState {
        AppState {
            pool,
            js,
            settings: Arc::new(Settings {
                trusted_origins: config.trusted_origins(),
                secure_cookies: config.secure_cookies(),
                live,
                trusted_proxies: config.trusted_proxies.0.clone(),
            }),
            throttle: Arc::new(auth::LoginThrottle::new(
                config.login_delay,
                config.login_max_delay,
                config.login_concurrency,
                config.login_tracked,
            )),
            device_cookies: Arc::new(auth::DeviceCookies::default()),
        }
    }
}

/// The whole site as one router: pages, server functions under `/api`, the stylesheet.
/// Serve it with [`serve`], or merge it beside other routes (e.g. the Mercure hub).
pub fn router(state: AppState) -> Router {
    let session_layer = SessionManagerLayer::new(auth::PgSessionStore::new(state.pool.clone()))
        .with_name(auth::SESSION_COOKIE)
        .with_http_only(true)
        .with_same_site(SameSite::Lax)
        .with_secure(state.settings.secure_cookies)
        .with_path("/")
        .with_expiry(Expiry::OnInactivity(time::Duration::hours(12)));
    let backend = auth::Backend::new(state.pool.clone(), state.throttle.checks());
    let auth_layer = AuthManagerLayerBuilder::new(backend, session_layer).build();
    let server_fns = {
        let state = state.clone();
        move |req: axum::extract::Request| {
            let state = state.clone();
            async move {
                leptos_axum::handle_server_fns_with_context(
                    move || leptos::prelude::provide_context(state.clone()),
                    req,
                )
                .await
            }
        }
    };
    let site = pages::routes()
        .route("/api/{*fn_name}", post(server_fns))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            csrf::same_origin_only,
        ))
        .layer(auth_layer)
        .with_state(state);
    // The stylesheet needs no session: no database work for it.
    Router::new()
        .route(paths::STYLESHEET, get(pages::stylesheet))
        .merge(site)
        // A panic in a handler (a bug) answers 500 and is logged, instead of dropping the
        // connection with no answer.
        .layer(tower_http::catch_panic::CatchPanicLayer::new())
}

/// Serves [`router`] on `addr` until `shutdown` resolves; returns once the server stopped.
pub async fn serve(
    state: AppState,
    addr: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("APP_ADDR {addr}: cannot listen"))?;
    tracing::info!(addr = %listener.local_addr()?, "admin site listening");
    axum::serve(
        dataviz_mercure::without_delay(listener),
        router(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
    .context("serving the admin site")
}
