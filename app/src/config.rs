//! The admin site's settings, read once from the environment.

use std::net::SocketAddr;
use std::time::Duration;

/// `dataviz app` settings (and the site's part of `dataviz all`).
#[derive(Debug, Clone, clap::Args)]
pub struct AppConfig {
    /// Address the admin site listens on.
    #[arg(
        long,
        env = "APP_ADDR",
        value_name = "APP_ADDR",
        default_value = "127.0.0.1:8080"
    )]
    pub app_addr: SocketAddr,
    /// The site's public URL (e.g. https://dataviz.example.com) when it is served behind a
    /// proxy: its origin is trusted for form posts, and https makes every cookie Secure.
    #[arg(long, env = "APP_PUBLIC_URL", value_name = "APP_PUBLIC_URL")]
    pub app_public_url: Option<String>,
    /// The Mercure hub URL as browsers reach it, for live values (e.g.
    /// http://127.0.0.1:8080/.well-known/mercure). Unset: no live values.
    #[arg(long, env = "MERCURE_PUBLIC_URL", value_name = "MERCURE_PUBLIC_URL")]
    pub mercure_public_url: Option<String>,
    /// Wait after the first failed login for an account or from an address; it doubles with
    /// each further failure.
    #[arg(long, env = "LOGIN_DELAY", value_name = "LOGIN_DELAY", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub login_delay: Duration,
    /// Longest wait before a login attempt is checked.
    #[arg(long, env = "LOGIN_MAX_DELAY", value_name = "LOGIN_MAX_DELAY", default_value = "10s", value_parser = humantime::parse_duration)]
    pub login_max_delay: Duration,
}

impl Default for AppConfig {
    fn default() -> Self {
        AppConfig {
            app_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            app_public_url: None,
            mercure_public_url: None,
            login_delay: Duration::from_millis(500),
            login_max_delay: Duration::from_secs(10),
        }
    }
}

impl AppConfig {
    /// The origin of `APP_PUBLIC_URL`, if set.
    pub fn trusted_origins(&self) -> Vec<String> {
        self.app_public_url
            .as_deref()
            .and_then(origin_of)
            .into_iter()
            .collect()
    }

    pub fn secure_cookies(&self) -> bool {
        self.app_public_url
            .as_deref()
            .is_some_and(|u| u.starts_with("https://"))
    }
}

/// `scheme://host[:port]` of a URL, lowercased; `None` when it has no scheme.
pub fn origin_of(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if scheme.is_empty() || authority.is_empty() {
        return None;
    }
    Some(format!("{}://{}", scheme, authority).to_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_of_urls() {
        assert_eq!(
            origin_of("https://Dataviz.example.com/x?y").as_deref(),
            Some("https://dataviz.example.com")
        );
        assert_eq!(
            origin_of("http://127.0.0.1:8080").as_deref(),
            Some("http://127.0.0.1:8080")
        );
        assert_eq!(origin_of("/relative"), None);
    }
}
