//! Live values on a device's page, through the Mercure hub.
//!
//! The device page carries a subscriber JWT of its own (signed with
//! `MERCURE_SUBSCRIBER_JWT_KEY`) whose `mercure.subscribe` claim names that device's topic only
//! (`{MERCURE_TOPIC_BASE}/gateways/{gateway id}/devices/{device id}`), valid for
//! `LIVE_TOKEN_TTL`. A small inline script opens an `EventSource` on the hub with the token in
//! the `authorization` query parameter (so that two pages never share or replace each other's
//! token, as one cookie would), renews it from [`token_path`] halfway through its life and
//! reconnects with the last event id it saw. Updates are best effort past the hub's history and
//! the `LIVE_MAX_AGE` horizon, so each time the stream opens again after it failed, the script
//! also reads the page again (from the database) and takes each tag's newer value and time: what
//! the page missed while it was away is shown at reconnection. The renewal needs the
//! admin session: after logout, or once the user is no longer an admin, no token is renewed.
//! Every token of a session has the session's live id as its `jti`; at logout the hub of the
//! same process (`dataviz all`) revokes it at once and ends the subscriptions opened with it.
//! With a hub elsewhere, a token outlives the logout by at most `LIVE_TOKEN_TTL`. The page is
//! complete without the script.

use dataviz_mercure::Hub;
use dataviz_mercure::jwt::{self, Claims, JwtKey};
use std::time::{Duration, SystemTime};

/// The session key holding the session's live id (the `jti` of its tokens).
pub const LIVE_ID: &str = "live_id";

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
    /// How long a token lasts (`LIVE_TOKEN_TTL`).
    pub token_ttl: Duration,
    /// The hub of this process, if it serves one: logout revokes the session's tokens there.
    pub hub: Option<Hub>,
}

impl LiveConfig {
    /// A device's topic, as the publisher names it.
    pub fn device_topic(&self, gateway_id: i32, device_id: i64) -> String {
        format!(
            "{}/gateways/{gateway_id}/devices/{device_id}",
            self.topic_base.trim_end_matches('/')
        )
    }

    /// A token for `topic` only, with the session's live id as its `jti`.
    pub fn token(&self, topic: &str, live_id: &str) -> String {
        let claims = Claims {
            jti: Some(live_id.to_owned()),
            ..Claims::subscriber(vec![topic.to_owned()], Some(self.token_ttl))
        };
        jwt::sign(&claims, &self.subscriber_key)
    }

    /// Ends what the tokens of `live_id` can do, at once where the hub is ours.
    pub fn revoke(&self, live_id: &str) {
        if let Some(hub) = &self.hub {
            // A token signed at the moment of the logout expires up to a second later.
            hub.revoke(
                live_id,
                SystemTime::now() + self.token_ttl + Duration::from_secs(5),
            );
        }
    }
}

/// Where a device page renews its token.
pub fn token_path(device_id: i64) -> String {
    crate::paths::LIVE_TOKEN.at(device_id)
}

/// A new live id for a session.
pub fn new_live_id() -> String {
    use rand::Rng;
    let bytes: [u8; 16] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The live-values script: reads `data-hub`, `data-topic`, `data-token`, `data-ttl` and
/// `data-token-url` from `#live`, and updates the rows
/// `tr[data-tag]` of the tags table. Updates are the publisher's JSON:
/// `{"time": ..., "readings": [{"tag": code, "type": ..., "value": ...}]}`; an update older than
/// the time a row shows is not applied. After a failed
/// connection, the rows are read again from the page itself (`window.location`), keeping the
/// newer of the two times for each tag.
pub const SCRIPT: &str = r#"(function () {
  var el = document.getElementById('live');
  if (!el || !window.EventSource || !window.fetch) return;
  var token = el.dataset.token, ttl = Number(el.dataset.ttl) * 1000;
  var source = null, timer = null, lastId = null, failures = 0, missed = false;
  function status(text, on) { el.textContent = text; el.className = on ? 'live on' : 'live off'; }
  function later(ms, what) { clearTimeout(timer); timer = setTimeout(what, ms); }
  // After a failure, 2 s, doubling up to a minute: a hub or site in trouble is not hammered.
  function backoff() { failures += 1; return Math.min(2000 * Math.pow(2, failures - 1), 60000); }
  function open() {
    if (source) source.close();
    var url = new URL(el.dataset.hub, window.location.href);
    url.searchParams.append('topic', el.dataset.topic);
    url.searchParams.append('authorization', token);
    if (lastId) url.searchParams.append('lastEventID', lastId);
    source = new EventSource(url.toString());
    source.onopen = function () {
      failures = 0;
      status('Live: values update as they arrive.', true);
      if (missed) { missed = false; reread(); }
    };
    source.onerror = function () {
      missed = true;
      status('Live values unavailable; retrying.', false);
      if (source.readyState === EventSource.CLOSED) later(backoff(), renew);
    };
    source.onmessage = show;
    later(Math.max(ttl / 2, 5000), renew);
  }
  function renew() {
    fetch(el.dataset.tokenUrl, { credentials: 'same-origin', redirect: 'error',
                                 headers: { 'Accept': 'application/json' } })
      .then(function (r) { if (!r.ok) throw new Error(r.status); return r.json(); })
      .then(function (t) { token = t.token; ttl = t.expires_in * 1000; open(); })
      .catch(function () {
        missed = true;
        if (source) source.close();
        status('Live values stopped (logged out?); retrying.', false);
        later(backoff(), renew);
      });
  }
  // What the database holds now, for what the stream may have missed while it was away.
  function reread() {
    fetch(window.location.href, { credentials: 'same-origin', redirect: 'error',
                                  headers: { 'Accept': 'text/html' } })
      .then(function (r) { if (!r.ok) throw new Error(r.status); return r.text(); })
      .then(function (html) {
        var page = new DOMParser().parseFromString(html, 'text/html');
        page.querySelectorAll('tr[data-tag]').forEach(function (fresh) {
          var row = document.querySelector('tr[data-tag="' + CSS.escape(fresh.dataset.tag) + '"]');
          if (!row) return;
          var time = fresh.querySelector('.time').textContent;
          // Times read 'YYYY-MM-DD HH:MM:SS UTC': as text, the later is the greater.
          if (time && time >= row.querySelector('.time').textContent) {
            row.querySelector('.value').textContent = fresh.querySelector('.value').textContent;
            row.querySelector('.time').textContent = time;
          }
        });
      })
      .catch(function () { missed = true; });
  }
  function show(event) {
    if (event.lastEventId) lastId = event.lastEventId;
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
      // An older update (redelivered after an outage, or replayed) never hides a newer value.
      if (shown && shown < row.querySelector('.time').textContent) return;
      var value = reading.value;
      row.querySelector('.value').textContent =
        (value !== null && typeof value === 'object') ? JSON.stringify(value) : String(value);
      if (shown) row.querySelector('.time').textContent = shown;
      row.classList.remove('flash');
      void row.offsetWidth;
      row.classList.add('flash');
    });
  }
  open();
})();"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> LiveConfig {
        LiveConfig {
            hub_url: "http://127.0.0.1:8080/.well-known/mercure".into(),
            topic_base: "https://dataviz.local/".into(),
            subscriber_key: JwtKey::new("k"),
            token_ttl: Duration::from_secs(300),
            hub: None,
        }
    }

    #[test]
    fn a_token_names_the_device_topic_only_and_the_session() {
        let c = config();
        let topic = c.device_topic(7, 12);
        assert_eq!(topic, "https://dataviz.local/gateways/7/devices/12");
        let claims = jwt::verify(&c.token(&topic, "abc"), &JwtKey::new("k")).unwrap();
        assert_eq!(claims.subscribe_selectors(), Some(&[topic][..]));
        assert_eq!(claims.publish_selectors(), None);
        assert_eq!(claims.jti.as_deref(), Some("abc"));
        let left = claims
            .expires_at()
            .unwrap()
            .duration_since(SystemTime::now())
            .unwrap();
        assert!(left <= Duration::from_secs(300) && left > Duration::from_secs(290));
        assert_eq!(token_path(12), "/devices/12/live-token");
        assert_ne!(new_live_id(), new_live_id());
        assert_eq!(new_live_id().len(), 32);
    }
}
