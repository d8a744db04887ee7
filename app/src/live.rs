//! Live values on a device's page, through the Mercure hub.
//!
//! The device page sets the `mercureAuthorization` cookie (HttpOnly, SameSite=Strict, scoped
//! to the hub's path) holding a subscriber JWT signed with `MERCURE_SUBSCRIBER_JWT_KEY`, whose
//! `mercure.subscribe` claim names that device's topic only
//! (`{MERCURE_TOPIC_BASE}/gateways/{gateway id}/devices/{device id}`). A small inline script
//! opens an `EventSource` on the hub and writes each update's values into the tags table: the
//! page is complete without it. The cookie is host-only: the hub must be on the site's host
//! (any port), e.g. served beside it by `dataviz all`.

use dataviz_mercure::jwt::{self, Claims, JwtKey};
use std::time::Duration;

/// The cookie the hub reads a subscriber's JWT from.
pub const COOKIE: &str = "mercureAuthorization";

/// How long a subscriber token lasts (a subscription ends at its expiry; the script's
/// reconnection then needs a page load).
pub const TOKEN_TTL: Duration = Duration::from_secs(12 * 3600);

/// The default topic base (as the publisher's `MERCURE_TOPIC_BASE`).
pub const DEFAULT_TOPIC_BASE: &str = "https://dataviz.local";

/// Where browsers reach the hub and how to sign their tokens.
#[derive(Debug, Clone)]
pub struct LiveConfig {
    /// The hub URL as browsers reach it (`MERCURE_PUBLIC_URL`).
    pub hub_url: String,
    /// The topics' base (`MERCURE_TOPIC_BASE`).
    pub topic_base: String,
    /// The subscribers' JWT key.
    pub subscriber_key: JwtKey,
}

impl LiveConfig {
    /// A device's topic, as the publisher names it.
    pub fn device_topic(&self, gateway_id: i32, device_id: i64) -> String {
        format!(
            "{}/gateways/{gateway_id}/devices/{device_id}",
            self.topic_base.trim_end_matches('/')
        )
    }

    /// The `Set-Cookie` value giving the browser a token for `topic`.
    pub fn cookie(&self, topic: &str, secure: bool) -> String {
        let token = jwt::sign(
            &Claims::subscriber(vec![topic.to_owned()], Some(TOKEN_TTL)),
            &self.subscriber_key,
        );
        let path = hub_path(&self.hub_url);
        format!(
            "{COOKIE}={token}; Path={path}; Max-Age={}; HttpOnly; SameSite=Strict{}",
            TOKEN_TTL.as_secs(),
            if secure { "; Secure" } else { "" }
        )
    }
}

/// The path part of the hub URL (`/.well-known/mercure`).
fn hub_path(url: &str) -> &str {
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    match after_scheme.find('/') {
        Some(i) => {
            let path = &after_scheme[i..];
            path.split(['?', '#']).next().unwrap_or("/")
        }
        None => "/",
    }
}

/// The live-values script: reads `data-hub` and `data-topic` from `#live`, and updates the rows
/// `tr[data-tag]` of the tags table. Updates are the publisher's JSON:
/// `{"time": ..., "readings": [{"tag": code, "type": ..., "value": ...}]}`.
pub const SCRIPT: &str = r#"(function () {
  var el = document.getElementById('live');
  if (!el || !window.EventSource) return;
  var url = new URL(el.dataset.hub, window.location.href);
  url.searchParams.append('topic', el.dataset.topic);
  var source = new EventSource(url.toString(), { withCredentials: true });
  source.onopen = function () { el.textContent = 'Live: values update as they arrive.'; el.className = 'live on'; };
  source.onerror = function () { el.textContent = 'Live values unavailable; retrying.'; el.className = 'live off'; };
  source.onmessage = function (event) {
    var update;
    try { update = JSON.parse(event.data); } catch (e) { return; }
    var time = update.time || update.ts;
    var shown = time ? new Date(time).toISOString().replace('T', ' ').slice(0, 19) + ' UTC' : '';
    (update.readings || []).forEach(function (reading) {
      var code = reading.tag;
      if (code !== null && typeof code === 'object') code = code.code;
      if (code === undefined) code = reading.code;
      var row = document.querySelector('tr[data-tag="' + CSS.escape(String(code)) + '"]');
      if (!row) return;
      var value = reading.value;
      row.querySelector('.value').textContent =
        (value !== null && typeof value === 'object') ? JSON.stringify(value) : String(value);
      if (shown) row.querySelector('.time').textContent = shown;
      row.classList.remove('flash');
      void row.offsetWidth;
      row.classList.add('flash');
    });
  };
})();"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> LiveConfig {
        LiveConfig {
            hub_url: "http://127.0.0.1:8080/.well-known/mercure".into(),
            topic_base: "https://dataviz.local/".into(),
            subscriber_key: JwtKey::new("k"),
        }
    }

    #[test]
    fn the_cookie_holds_a_token_for_the_device_topic_only() {
        let c = config();
        let topic = c.device_topic(7, 12);
        assert_eq!(topic, "https://dataviz.local/gateways/7/devices/12");
        let cookie = c.cookie(&topic, true);
        assert!(cookie.starts_with("mercureAuthorization="), "{cookie}");
        assert!(cookie.contains("; Path=/.well-known/mercure;"), "{cookie}");
        assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
        assert!(cookie.ends_with("; Secure"));
        let token = cookie["mercureAuthorization=".len()..]
            .split(';')
            .next()
            .unwrap();
        let claims = jwt::verify(token, &JwtKey::new("k")).unwrap();
        assert_eq!(claims.subscribe_selectors(), Some(&[topic][..]));
        assert_eq!(claims.publish_selectors(), None);
        assert!(claims.exp.is_some());
    }

    #[test]
    fn hub_paths() {
        assert_eq!(
            hub_path("http://h:1/.well-known/mercure?x"),
            "/.well-known/mercure"
        );
        assert_eq!(hub_path("http://h:1"), "/");
        assert_eq!(hub_path("/.well-known/mercure"), "/.well-known/mercure");
    }
}
