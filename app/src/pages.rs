//! The page handlers, one per route. Each takes an [`Admin`] (so anonymous visitors go to the
//! login page and non-admins get 403), reads what it shows, and renders it with [`views`].

use crate::auth::{Admin, AuthSession};
use crate::data::{self, FieldErrors, GatewayForm};
use crate::views::{self, Live, TagChart};
use crate::{AppState, chart, paths, pipeline};
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use base64::Engine as _;
use chrono::Utc;
use leptos::server_fn::error::FromServerFnError;
use std::collections::HashMap;

/// Every page route.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route(paths::HOME, get(home))
        .route(paths::LOGIN, get(login))
        .route(paths::GATEWAYS, get(gateways))
        .route(paths::GATEWAY_NEW, get(gateway_new))
        .route(paths::GATEWAY_EDIT.route(), get(gateway_edit))
        .route(paths::GATEWAY_DELETE.route(), get(gateway_delete))
        .route(paths::DEVICES, get(devices))
        .route(paths::GATEWAY_DEVICES.route(), get(gateway_devices))
        .route(paths::DEVICE.route(), get(device))
        .route(paths::LIVE_TOKEN.route(), get(live_token))
        .route(paths::DEAD_LETTERS, get(dead_letters))
        .route(paths::DEAD_LETTER.route(), get(dead_letter))
        .fallback(not_found)
}

/// The page routes, as tests walk them (`{id}` filled in by the caller).
pub const ROUTES: &[&str] = &[
    "/",
    "/gateways",
    "/gateways/new",
    "/gateways/{gateway}/edit",
    "/gateways/{gateway}/delete",
    "/devices",
    "/devices/gateway/{gateway}",
    "/devices/{device}",
    "/dead-letters",
    "/dead-letters/{dead}",
];

type Params = Query<HashMap<String, String>>;

/// A page that could not be built: logged, and a 500 page.
pub struct PageError(anyhow::Error);

impl<E: Into<anyhow::Error>> From<E> for PageError {
    fn from(e: E) -> Self {
        PageError(e.into())
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        tracing::error!(error = format!("{:#}", self.0), "page failed");
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("The page could not be built: {:#}\n", self.0),
        )
            .into_response()
    }
}

type PageResult = Result<Response, PageError>;

fn param(params: &HashMap<String, String>, key: &str) -> String {
    params.get(key).cloned().unwrap_or_default()
}

fn page_number(params: &HashMap<String, String>) -> i64 {
    params
        .get("page")
        .and_then(|p| p.parse().ok())
        .unwrap_or(1)
        .clamp(1, 1_000_000)
}

/// The error a server function sent back in the URL (`__err`), as text.
fn server_fn_error(params: &HashMap<String, String>) -> Option<String> {
    let encoded = params.get("__err")?;
    let bytes = base64::engine::general_purpose::URL_SAFE
        .decode(encoded)
        .ok()?;
    let error: leptos::prelude::ServerFnError = FromServerFnError::de(bytes.into());
    Some(error.to_string())
}

fn missing(user: &Admin, what: String) -> Response {
    (
        StatusCode::NOT_FOUND,
        views::not_found(user.0.email.clone(), what),
    )
        .into_response()
}

async fn db(state: &AppState) -> Result<deadpool_postgres::Object, PageError> {
    Ok(state.pool.get().await?)
}

async fn home(admin: Admin, State(state): State<AppState>) -> PageResult {
    let pipeline = pipeline::state(&state.js).await;
    Ok(views::home(admin.0.email, pipeline).into_response())
}

async fn login(session: AuthSession, Query(params): Params) -> Response {
    if session.user.as_ref().is_some_and(|u| u.is_admin()) {
        return Redirect::to(paths::HOME).into_response();
    }
    let error = match params.get("error").map(String::as_str) {
        Some("invalid") => Some("Wrong email or password.".to_owned()),
        Some("busy") => {
            Some("Too many login attempts for now. Wait a few seconds and try again.".to_owned())
        }
        Some(_) => Some("Please log in again.".to_owned()),
        None => server_fn_error(&params),
    };
    let next = params
        .get("next")
        .and_then(|n| paths::local_target(n))
        .unwrap_or_default();
    views::login_page(error, param(&params, "email"), next).into_response()
}

async fn gateways(
    admin: Admin,
    State(state): State<AppState>,
    Query(params): Params,
) -> PageResult {
    let q = param(&params, "q");
    let listing = data::gateways(&*db(&state).await?, &q, page_number(&params)).await?;
    let ok = if let Some(id) = params.get("created") {
        Some(format!("Gateway {id} created."))
    } else if let Some(id) = params.get("updated") {
        Some(format!("Gateway {id} saved."))
    } else {
        params
            .get("deleted")
            .map(|id| format!("Gateway {id} deleted."))
    };
    Ok(views::gateways(admin.0.email, listing, q, ok).into_response())
}

/// The form and its errors as a server function sent them back.
fn form_from(params: &HashMap<String, String>) -> (GatewayForm, FieldErrors) {
    let form = GatewayForm {
        id: param(params, "id"),
        name: param(params, "name"),
        description: param(params, "description"),
    };
    let errors = ["id", "name", "description"]
        .into_iter()
        .filter_map(|f| params.get(&format!("error.{f}")).map(|m| (f, m.clone())))
        .collect();
    (form, errors)
}

async fn gateway_new(admin: Admin, Query(params): Params) -> Response {
    let (form, errors) = form_from(&params);
    let status = if errors.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::UNPROCESSABLE_ENTITY
    };
    (
        status,
        views::gateway_form(admin.0.email, None, form, errors, server_fn_error(&params)),
    )
        .into_response()
}

async fn gateway_edit(
    admin: Admin,
    State(state): State<AppState>,
    Path(id): Path<i32>,
    Query(params): Params,
) -> PageResult {
    let Some(gateway) = data::gateway(&*db(&state).await?, id).await? else {
        return Ok(missing(&admin, format!("There is no gateway {id}.")));
    };
    let (mut form, errors) = form_from(&params);
    if errors.is_empty() {
        form = GatewayForm {
            id: id.to_string(),
            name: gateway.name,
            description: gateway.description,
        };
    }
    Ok(views::gateway_form(
        admin.0.email,
        Some(id),
        form,
        errors,
        server_fn_error(&params),
    )
    .into_response())
}

async fn gateway_delete(
    admin: Admin,
    State(state): State<AppState>,
    Path(id): Path<i32>,
    Query(params): Params,
) -> PageResult {
    let Some(gateway) = data::gateway(&*db(&state).await?, id).await? else {
        return Ok(missing(&admin, format!("There is no gateway {id}.")));
    };
    let status = if params.contains_key("refused") {
        StatusCode::CONFLICT
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        views::gateway_delete(admin.0.email, gateway, server_fn_error(&params)),
    )
        .into_response())
}

async fn devices(admin: Admin, State(state): State<AppState>, Query(params): Params) -> PageResult {
    let q = param(&params, "q");
    let listing = data::devices(&*db(&state).await?, None, &q, page_number(&params)).await?;
    Ok(views::devices(admin.0.email, None, listing, q).into_response())
}

async fn gateway_devices(
    admin: Admin,
    State(state): State<AppState>,
    Path(id): Path<i32>,
    Query(params): Params,
) -> PageResult {
    let client = db(&state).await?;
    let Some(gateway) = data::gateway(&client, id).await? else {
        return Ok(missing(&admin, format!("There is no gateway {id}.")));
    };
    let q = param(&params, "q");
    let listing = data::devices(&client, Some(id), &q, page_number(&params)).await?;
    Ok(views::devices(admin.0.email, Some(gateway), listing, q).into_response())
}

async fn device(
    admin: Admin,
    session: AuthSession,
    State(state): State<AppState>,
    Path(id): Path<i64>,
    Query(params): Params,
) -> PageResult {
    let client = db(&state).await?;
    let Some(device) = data::device(&client, id).await? else {
        return Ok(missing(&admin, format!("There is no device {id}.")));
    };
    let tags = data::tags(&client, id).await?;
    let range = chart::Range::by_key(params.get("range").map(String::as_str));
    let to = Utc::now();
    let from = to - chrono::Duration::from_std(range.span)?;
    let numeric: Vec<i64> = tags
        .iter()
        .filter(|t| t.is_numeric())
        .map(|t| t.id)
        .collect();
    let mut series = if numeric.is_empty() {
        HashMap::new()
    } else {
        data::series(&client, &numeric, from, to, range.bucket()).await?
    };
    drop(client);
    let charts = tags
        .iter()
        .filter(|t| t.is_numeric())
        .map(|t| TagChart {
            code: t.code.clone(),
            svg: chart::svg(
                &t.code,
                &series.remove(&t.id).unwrap_or_default(),
                from,
                to,
                range.bucket(),
            ),
        })
        .collect();
    let live = match &state.settings.live {
        Some(live) => {
            let topic = live.device_topic(device.gateway_id, device.id);
            let token = live.token(&topic, &live_id(&session).await?);
            Some(Live {
                hub: live.hub_url.clone(),
                topic,
                token,
                ttl: live.token_ttl.as_secs(),
                token_url: crate::live::token_path(device.id),
            })
        }
        None => None,
    };
    Ok(views::device(admin.0.email, device, tags, range, charts, live).into_response())
}

/// The session's live id (the `jti` of its live tokens), made at login (here for a session
/// from before live ids).
async fn live_id(session: &AuthSession) -> Result<String, PageError> {
    let store = &session.session;
    if let Some(id) = store.get::<String>(crate::live::LIVE_ID).await? {
        return Ok(id);
    }
    let id = crate::live::new_live_id();
    store.insert(crate::live::LIVE_ID, &id).await?;
    Ok(id)
}

/// A fresh live token for a device page that is still open: JSON `{"token", "expires_in"}`.
/// Needs the admin session, like the page.
async fn live_token(
    _admin: Admin,
    session: AuthSession,
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> PageResult {
    let Some(live) = &state.settings.live else {
        return Ok((StatusCode::NOT_FOUND, "No live values here.\n").into_response());
    };
    let client = db(&state).await?;
    let Some(device) = data::device(&client, id).await? else {
        return Ok((StatusCode::NOT_FOUND, format!("There is no device {id}.\n")).into_response());
    };
    drop(client);
    let topic = live.device_topic(device.gateway_id, device.id);
    let body = serde_json::json!({
        "token": live.token(&topic, &live_id(&session).await?),
        "expires_in": live.token_ttl.as_secs(),
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body.to_string(),
    )
        .into_response())
}

/// Dead letters shown on the list, at most.
pub const DEAD_LETTERS_SHOWN: usize = 200;

async fn dead_letters(
    admin: Admin,
    State(state): State<AppState>,
    Query(params): Params,
) -> PageResult {
    let entries = dataviz_core::dead::list(
        &state.js,
        &dataviz_core::dead::DeadFilter::default(),
        DEAD_LETTERS_SHOWN,
    )
    .await?;
    let ok = params
        .get("requeued")
        .map(|seq| format!("Dead letter {seq} re-queued: the processor handles it again."));
    Ok(views::dead_letters(admin.0.email, entries, ok).into_response())
}

async fn dead_letter(
    admin: Admin,
    State(state): State<AppState>,
    Path(seq): Path<u64>,
    Query(params): Params,
) -> PageResult {
    let Ok(entry) = dataviz_core::dead::get(&state.js, seq).await else {
        return Ok(missing(&admin, format!("There is no dead letter {seq}.")));
    };
    let error = params
        .get("error")
        .cloned()
        .or_else(|| server_fn_error(&params));
    Ok(views::dead_letter(admin.0.email, entry, error).into_response())
}

async fn not_found(admin: Admin) -> Response {
    missing(&admin, "There is no such page.".to_owned())
}

/// The site's stylesheet, compiled into the binary.
pub async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        include_str!("../assets/app.css"),
    )
        .into_response()
}
