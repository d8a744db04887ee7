//! Cross-site request forgery: a request that changes anything (any method but GET, HEAD and
//! OPTIONS) must come from the site itself, or it is refused with 403 before any handler runs.
//!
//! Leptos does no CSRF checking by design. The session cookie is SameSite=Lax, and on top of
//! it, as Go's `CrossOriginProtection` does: `Sec-Fetch-Site` (sent by every current browser)
//! must say `same-origin` (or `none`, typed by the user); without it, `Origin` must name the
//! request's own host or a trusted origin; without `Origin`, `Referer` must; a request that
//! says nothing about where it comes from is refused.

use crate::AppState;
use crate::config::origin_of;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// The middleware.
pub async fn same_origin_only(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(req).await;
    }
    match verdict(req.headers(), &state.settings.trusted_origins) {
        Ok(()) => next.run(req).await,
        Err(why) => {
            tracing::warn!(path = %req.uri().path(), why, "cross-site request refused");
            (
                StatusCode::FORBIDDEN,
                format!("Refused: {why}. Forms of this site must be sent from this site.\n"),
            )
                .into_response()
        }
    }
}

/// `Ok` when the request comes from the site itself, else why not.
pub fn verdict(headers: &HeaderMap, trusted: &[String]) -> Result<(), &'static str> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let origin = get(header::ORIGIN.as_str()).filter(|o| *o != "null");
    if let Some(origin) = origin
        && trusted.iter().any(|t| t.eq_ignore_ascii_case(origin))
    {
        return Ok(());
    }
    match get("sec-fetch-site") {
        Some("same-origin" | "none") => return Ok(()),
        Some(_) => return Err("cross-site request (Sec-Fetch-Site)"),
        None => {}
    }
    let host = get(header::HOST.as_str()).ok_or("no Host header")?;
    let from = match origin {
        Some(origin) => origin.to_owned(),
        None => get(header::REFERER.as_str())
            .and_then(origin_of)
            .ok_or("no Origin or Referer header")?,
    };
    let authority = from.split_once("://").map_or("", |(_, a)| a);
    if authority.eq_ignore_ascii_case(host) || trusted.iter().any(|t| t.eq_ignore_ascii_case(&from))
    {
        Ok(())
    } else {
        Err("Origin is another site")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn same_origin_passes_and_cross_site_does_not() {
        let none: &[String] = &[];
        let host = ("host", "app.local:8080");
        assert!(verdict(&headers(&[host, ("origin", "http://app.local:8080")]), none).is_ok());
        assert!(verdict(&headers(&[host, ("origin", "http://evil.example")]), none).is_err());
        assert!(verdict(&headers(&[host, ("origin", "null")]), none).is_err());
        assert!(
            verdict(
                &headers(&[host, ("referer", "http://app.local:8080/gateways/new")]),
                none
            )
            .is_ok()
        );
        assert!(
            verdict(
                &headers(&[host, ("referer", "http://evil.example/x")]),
                none
            )
            .is_err()
        );
        assert!(verdict(&headers(&[host]), none).is_err(), "no evidence");
        assert!(verdict(&headers(&[host, ("sec-fetch-site", "same-origin")]), none).is_ok());
        assert!(
            verdict(
                &headers(&[
                    host,
                    ("sec-fetch-site", "cross-site"),
                    ("origin", "http://app.local:8080")
                ]),
                none
            )
            .is_err()
        );
        let trusted = vec!["https://dataviz.example.com".to_owned()];
        assert!(
            verdict(
                &headers(&[
                    host,
                    ("sec-fetch-site", "cross-site"),
                    ("origin", "https://dataviz.example.com")
                ]),
                &trusted
            )
            .is_ok()
        );
    }
}
