//! The server functions: every change the site makes, posted by a plain form to a fixed URL
//! under `/api` and answered with a redirect (see `paths` for where to).
//!
//! | function | URL | who |
//! |---|---|---|
//! | [`login`] | `/api/login` | anyone (slowed after failures) |
//! | [`logout`] | `/api/logout` | anyone (ends the session, if any) |
//! | [`create_gateway`] | `/api/gateways/create` | admins |
//! | [`update_gateway`] | `/api/gateways/update` | admins |
//! | [`delete_gateway`] | `/api/gateways/delete` | admins |
//! | [`requeue_dead_letter`] | `/api/dead-letters/requeue` | admins |
//!
//! Server functions are public HTTP endpoints: each admin function starts with
//! [`require_admin`](crate::auth::require_admin), whatever the pages do. Expected failures
//! (a field to fix, a gateway with devices) redirect back to the form with the reason;
//! unexpected ones return a `ServerFnError`, which the page the form came from shows.

use leptos::prelude::*;

/// Every URL of a server function, for tests and the docs.
pub const ENDPOINTS: &[&str] = &[
    "/api/login",
    "/api/logout",
    "/api/gateways/create",
    "/api/gateways/update",
    "/api/gateways/delete",
    "/api/dead-letters/requeue",
];

mod server {
    use crate::AppState;
    use leptos::prelude::*;

    pub fn state() -> Result<AppState, ServerFnError> {
        use_context::<AppState>().ok_or_else(|| ServerFnError::new("no AppState in context"))
    }

    pub async fn db(state: &AppState) -> Result<deadpool_postgres::Object, ServerFnError> {
        state
            .pool
            .get()
            .await
            .map_err(|e| ServerFnError::new(format!("database unavailable: {e}")))
    }

    pub fn failed(e: impl std::fmt::Display) -> ServerFnError {
        tracing::warn!(error = %e, "server function failed");
        ServerFnError::new(e.to_string())
    }

    /// `path?field=value&...&error.field=message`: a form sent back with what was typed and
    /// why it was refused.
    pub fn form_back(
        path: &str,
        form: &crate::data::GatewayForm,
        errors: &crate::data::FieldErrors,
    ) -> String {
        let mut pairs: Vec<(String, String)> = vec![
            ("id".into(), form.id.clone()),
            ("name".into(), form.name.clone()),
            ("description".into(), form.description.clone()),
        ];
        for (field, message) in errors {
            pairs.push((format!("error.{field}"), message.clone()));
        }
        let refs: Vec<(&str, &str)> = pairs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        crate::paths::with_query(path, &refs)
    }
}

/// Checks the credentials when the attempt's turn comes ([`crate::auth::LoginThrottle`]) and
/// opens a session with a new id; back to the login page with a message when they are wrong or
/// the attempt was refused unchecked.
#[server(endpoint = "login")]
pub async fn login(
    email: String,
    password: String,
    next: Option<String>,
) -> Result<(), ServerFnError> {
    use crate::auth::{AuthSession, Credentials};
    use crate::paths;
    let state = server::state()?;
    let mut session: AuthSession = leptos_axum::extract().await?;
    let peer = leptos_axum::extract::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .await
        .ok()
        .map(|c| c.0.ip());
    let headers: axum::http::HeaderMap = leptos_axum::extract().await?;
    let ip = crate::auth::client_address(peer, &headers, &state.settings.trusted_proxies);
    let next = next
        .as_deref()
        .and_then(paths::local_target)
        .filter(|n| !n.starts_with(paths::LOGIN))
        .unwrap_or_else(|| paths::HOME.to_owned());
    let back = |error: &str| {
        paths::with_query(
            paths::LOGIN,
            &[("error", error), ("email", &email), ("next", &next)],
        )
    };
    // A browser that logged in to this account before queues in a lane of its own.
    let device = dataviz_mercure::hub::cookie(&headers, crate::auth::DEVICE_COOKIE)
        .and_then(|value| state.device_cookies.verify(&email, value));
    let attempt = match state.throttle.admit(&email, ip, device.as_deref()).await {
        Ok(attempt) => attempt,
        Err(refused) => {
            tracing::warn!(email = %email, ip = ?ip, %refused, "login attempt refused unchecked");
            leptos_axum::redirect(&back("busy"));
            return Ok(());
        }
    };
    let user = session
        .authenticate(Credentials {
            email: email.clone(),
            password,
        })
        .await
        .map_err(server::failed)?;
    match user {
        Some(user) => {
            attempt.succeeded();
            // A new session id at every login, even over another user's session (axum-login
            // renews it only when the session had no user).
            revoke_live_tokens(&session).await;
            session.session.cycle_id().await.map_err(server::failed)?;
            session.login(&user).await.map_err(server::failed)?;
            // The session's live id, made once here: device pages opened at once all use it.
            session
                .session
                .insert(crate::live::LIVE_ID, crate::live::new_live_id())
                .await
                .map_err(server::failed)?;
            if device.is_none() {
                remember_device(&state, &email);
            }
            tracing::info!(user = %user.email, "logged in");
            leptos_axum::redirect(&next);
        }
        None => {
            attempt.failed();
            tracing::warn!(email = %email, ip = ?ip, "failed login");
            leptos_axum::redirect(&back("invalid"));
        }
    }
    Ok(())
}

/// Gives the browser a device cookie for `email` ([`crate::auth::DeviceCookies`]), sent back
/// with login attempts only.
fn remember_device(state: &crate::AppState, email: &str) {
    let value = state.device_cookies.issue(email);
    let cookie = format!(
        "{}={value}; Path=/api/login; Max-Age=31536000; HttpOnly; SameSite=Strict{}",
        crate::auth::DEVICE_COOKIE,
        if state.settings.secure_cookies {
            "; Secure"
        } else {
            ""
        }
    );
    if let (Some(response), Ok(cookie)) = (
        use_context::<leptos_axum::ResponseOptions>(),
        axum::http::HeaderValue::from_str(&cookie),
    ) {
        response.append_header(axum::http::header::SET_COOKIE, cookie);
    }
}

/// Revokes the live tokens of the session (their `jti` is its live id), and forgets the id.
async fn revoke_live_tokens(session: &crate::auth::AuthSession) {
    let Ok(state) = server::state() else { return };
    let Some(live) = &state.settings.live else {
        return;
    };
    match session.session.remove::<String>(crate::live::LIVE_ID).await {
        Ok(Some(id)) => live.revoke(&id),
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "live id of the session unreadable"),
    }
}

/// Ends the session (if any) and goes to the login page.
#[server(endpoint = "logout")]
pub async fn logout() -> Result<(), ServerFnError> {
    use crate::auth::AuthSession;
    let mut session: AuthSession = leptos_axum::extract().await?;
    revoke_live_tokens(&session).await;
    session.logout().await.map_err(server::failed)?;
    leptos_axum::redirect(crate::paths::LOGIN);
    Ok(())
}

/// Creates a gateway (with the id its devices already use, or the next free one).
#[server(endpoint = "gateways/create")]
pub async fn create_gateway(
    id: String,
    name: String,
    description: String,
) -> Result<(), ServerFnError> {
    use crate::{data, paths};
    crate::auth::require_admin().await?;
    let state = server::state()?;
    let form = data::GatewayForm {
        id,
        name,
        description,
    };
    let input = match form.check() {
        Ok(input) => input,
        Err(errors) => {
            leptos_axum::redirect(&server::form_back(paths::GATEWAY_NEW, &form, &errors));
            return Ok(());
        }
    };
    let db = server::db(&state).await?;
    match data::create_gateway(&db, &input)
        .await
        .map_err(server::failed)?
    {
        Ok(id) => leptos_axum::redirect(&format!("{}?created={id}", paths::GATEWAYS)),
        Err(errors) => {
            leptos_axum::redirect(&server::form_back(paths::GATEWAY_NEW, &form, &errors))
        }
    }
    Ok(())
}

/// Changes a gateway's name and description.
#[server(endpoint = "gateways/update")]
pub async fn update_gateway(
    id: i32,
    name: String,
    description: String,
) -> Result<(), ServerFnError> {
    use crate::{data, paths};
    crate::auth::require_admin().await?;
    let state = server::state()?;
    let form = data::GatewayForm {
        id: id.to_string(),
        name,
        description,
    };
    let input = match form.check() {
        Ok(input) => input,
        Err(errors) => {
            leptos_axum::redirect(&server::form_back(&paths::gateway_edit(id), &form, &errors));
            return Ok(());
        }
    };
    let db = server::db(&state).await?;
    if data::update_gateway(&db, id, &input)
        .await
        .map_err(server::failed)?
    {
        leptos_axum::redirect(&format!("{}?updated={id}", paths::GATEWAYS));
        Ok(())
    } else {
        crate::auth::set_status(axum::http::StatusCode::NOT_FOUND);
        Err(ServerFnError::new(format!("no gateway {id}")))
    }
}

/// Deletes a gateway, unless devices still hang on it: then back to the confirmation page,
/// which says so.
#[server(endpoint = "gateways/delete")]
pub async fn delete_gateway(id: i32) -> Result<(), ServerFnError> {
    use crate::data::{self, Deleted};
    use crate::paths;
    crate::auth::require_admin().await?;
    let state = server::state()?;
    let db = server::db(&state).await?;
    match data::delete_gateway(&db, id)
        .await
        .map_err(server::failed)?
    {
        Deleted::Yes => {
            tracing::info!(gateway = id, "gateway deleted");
            leptos_axum::redirect(&format!("{}?deleted={id}", paths::GATEWAYS));
            Ok(())
        }
        Deleted::HasDevices(n) => {
            crate::auth::set_status(axum::http::StatusCode::CONFLICT);
            leptos_axum::redirect(&format!("{}?refused={n}", paths::gateway_delete(id)));
            Ok(())
        }
        Deleted::NotFound => {
            crate::auth::set_status(axum::http::StatusCode::NOT_FOUND);
            Err(ServerFnError::new(format!("no gateway {id}")))
        }
    }
}

/// Publishes a dead letter's raw message to RAW again and removes the letter.
#[server(endpoint = "dead-letters/requeue")]
pub async fn requeue_dead_letter(seq: u64) -> Result<(), ServerFnError> {
    use crate::paths;
    crate::auth::require_admin().await?;
    let state = server::state()?;
    match dataviz_core::dead::requeue(&state.js, seq).await {
        Ok(()) => {
            tracing::info!(seq, "dead letter re-queued");
            leptos_axum::redirect(&format!("{}?requeued={seq}", paths::DEAD_LETTERS));
        }
        Err(e) => {
            let message = format!("{e:#}");
            leptos_axum::redirect(&paths::with_query(
                &paths::dead_letter(seq),
                &[("error", &message)],
            ));
        }
    }
    Ok(())
}
