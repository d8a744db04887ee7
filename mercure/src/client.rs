//! The publisher client: POSTs updates to a hub (ours or the reference one) with a JWT it signs
//! itself, and says whether a failure is worth retrying.
//!
//! Failures are sorted in one place, [`PublishError`]: no connection, a timeout, a 5xx or a 429
//! are [`PublishError::Unavailable`] (retry later); any other refusal (401, 403, 400...) is
//! [`PublishError::Refused`]: retrying the same request cannot help until someone changes the
//! configuration or the update.

use crate::hub::PublishRefused;
use crate::jwt::{self, Claims, JwtKey};
use crate::update::Update;
use reqwest::{StatusCode, Url};
use std::time::Duration;
use thiserror::Error;

/// How long each signed token is valid; a fresh one is signed for every request.
const TOKEN_TTL: Duration = Duration::from_secs(300);

/// Posts updates to one hub.
#[derive(Debug, Clone)]
pub struct MercurePublisher {
    client: reqwest::Client,
    url: Url,
    key: JwtKey,
    /// The `mercure.publish` claim of the tokens it signs.
    selectors: Vec<String>,
}

#[derive(Debug, Error)]
pub enum PublishError {
    /// The hub could not take it now: retry with backoff.
    #[error("hub unavailable: {0}")]
    Unavailable(String),
    /// The hub refused it: retrying the same request cannot help.
    #[error("hub refused the update: {status}: {body}")]
    Refused { status: StatusCode, body: String },
}

impl PublishError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, PublishError::Unavailable(_))
    }
}

#[derive(Debug, Error)]
#[error("MERCURE_URL {url:?}: {problem}")]
pub struct UrlError {
    pub url: String,
    pub problem: String,
}

impl MercurePublisher {
    /// A publisher to the hub at `url` (e.g. `https://example.com/.well-known/mercure`),
    /// signing with `key` tokens allowed to publish everywhere (`mercure.publish: ["*"]`).
    ///
    /// Installs ring as the process's rustls provider when none is installed yet (the only one
    /// this workspace builds).
    pub fn new(url: &str, key: JwtKey) -> Result<MercurePublisher, UrlError> {
        let parsed = Url::parse(url).map_err(|e| UrlError {
            url: url.to_owned(),
            problem: e.to_string(),
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(UrlError {
                url: url.to_owned(),
                problem: "not an http(s) URL".into(),
            });
        }
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .user_agent(concat!("dataviz-mercure/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| UrlError {
                url: url.to_owned(),
                problem: format!("HTTP client: {e}"),
            })?;
        Ok(MercurePublisher {
            client,
            url: parsed,
            key,
            selectors: vec!["*".into()],
        })
    }

    /// Signs tokens with these `mercure.publish` selectors instead of `*`.
    pub fn with_publish_selectors(mut self, selectors: Vec<String>) -> MercurePublisher {
        self.selectors = selectors;
        self
    }

    pub fn url(&self) -> &Url {
        &self.url
    }

    /// Posts `update`; returns the id the hub gave it.
    pub async fn publish(&self, update: &Update) -> Result<String, PublishError> {
        let token = jwt::sign(
            &Claims::publisher(self.selectors.clone(), Some(TOKEN_TTL)),
            &self.key,
        );
        let response = self
            .client
            .post(self.url.clone())
            .bearer_auth(token)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(update.to_form())
            .send()
            .await
            .map_err(|e| PublishError::Unavailable(error_chain(&e)))?;
        let status = response.status();
        let body = response
            .text()
            .await
            .map_err(|e| PublishError::Unavailable(error_chain(&e)))?;
        if status.is_success() {
            return Ok(body.trim_end().to_owned());
        }
        let body: String = body.trim_end().chars().take(500).collect();
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            Err(PublishError::Unavailable(format!("{status}: {body}")))
        } else {
            Err(PublishError::Refused { status, body })
        }
    }
}

/// The error and its causes on one line (reqwest's own message hides the cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The embedded hub's refusal as a hub over HTTP gives it: an invalid update is a 400.
impl From<PublishRefused> for PublishError {
    fn from(e: PublishRefused) -> PublishError {
        match e {
            PublishRefused::Invalid(e) => PublishError::Refused {
                status: StatusCode::BAD_REQUEST,
                body: e.to_string(),
            },
            e @ PublishRefused::Unconfirmed { .. } => PublishError::Unavailable(e.to_string()),
            PublishRefused::Unavailable(e) => PublishError::Unavailable(e),
        }
    }
}

/// Where a publisher sends its updates: a hub over HTTP (any hub, at `MERCURE_URL`), or the hub
/// embedded in this process (`dataviz all`), handed the updates directly, a batch at a time
/// ([`crate::Hub::publish_many`]): no request and no token per update, which were most of the
/// publisher's work.
#[derive(Debug, Clone)]
pub enum UpdateSink {
    Http(MercurePublisher),
    Embedded(crate::Hub),
}

impl UpdateSink {
    /// Publishes `update`; returns its id. The embedded hub refuses an invalid update, as a hub
    /// over HTTP would with a 400, and is unavailable while its stream does not take updates.
    pub async fn publish(&self, update: Update) -> Result<String, PublishError> {
        match self {
            UpdateSink::Http(publisher) => publisher.publish(&update).await,
            UpdateSink::Embedded(hub) => hub.publish(update).await.map_err(PublishError::from),
        }
    }

    /// Where updates go, for logs.
    pub fn describe(&self) -> String {
        match self {
            UpdateSink::Http(publisher) => publisher.url().to_string(),
            UpdateSink::Embedded(_) => "the embedded hub".to_owned(),
        }
    }
}
