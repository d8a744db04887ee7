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
    /// How long a device page's live token lasts; the page renews it halfway. After logout a
    /// token outlives the session by at most this much (not at all with `dataviz all`, whose
    /// hub revokes it at once).
    #[arg(long, env = "LIVE_TOKEN_TTL", value_name = "LIVE_TOKEN_TTL", default_value = "10m", value_parser = parse_token_ttl)]
    pub live_token_ttl: Duration,
    /// Wait after the first failed login for an account or from an address; it doubles with
    /// each further failure.
    #[arg(long, env = "LOGIN_DELAY", value_name = "LOGIN_DELAY", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub login_delay: Duration,
    /// Longest wait before a login attempt is checked; an attempt whose turn is further away
    /// is refused at once.
    #[arg(long, env = "LOGIN_MAX_DELAY", value_name = "LOGIN_MAX_DELAY", default_value = "10s", value_parser = humantime::parse_duration)]
    pub login_max_delay: Duration,
    /// Passwords checked at once (Argon2id takes 19 MiB each); 16 times as many attempts may
    /// wait for a turn, more are refused at once.
    #[arg(
        long,
        env = "LOGIN_CONCURRENCY",
        value_name = "LOGIN_CONCURRENCY",
        default_value_t = 2
    )]
    pub login_concurrency: usize,
    /// Accounts and client addresses whose login attempts are remembered, at most.
    #[arg(
        long,
        env = "LOGIN_TRACKED",
        value_name = "LOGIN_TRACKED",
        default_value_t = 100_000
    )]
    pub login_tracked: usize,
    /// Reverse proxies (addresses or CIDR networks, space or comma separated) whose
    /// X-Forwarded-For names the client. Empty: the connection's address is the client's.
    #[arg(long, env = "TRUSTED_PROXIES", value_name = "TRUSTED_PROXIES", default_value = "", value_parser = parse_networks)]
    pub trusted_proxies: Networks,
}

/// The shortest live token life: a page renews its token halfway through.
pub const MIN_LIVE_TOKEN_TTL: Duration = Duration::from_secs(30);

fn parse_token_ttl(s: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if ttl < MIN_LIVE_TOKEN_TTL {
        return Err(format!(
            "{s}: shorter than {} (pages renew their token halfway through)",
            humantime::format_duration(MIN_LIVE_TOKEN_TTL)
        ));
    }
    Ok(ttl)
}

/// A list of networks (a bare address is a /32 or /128).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Networks(pub Vec<ipnet::IpNet>);

fn parse_networks(s: &str) -> Result<Networks, String> {
    s.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<ipnet::IpNet>()
                .or_else(|_| p.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| format!("{p:?} is neither an address nor a network (a.b.c.d/n)"))
        })
        .collect::<Result<_, _>>()
        .map(Networks)
}

impl Default for AppConfig {
    /// The defaults `--help` shows.
    fn default() -> Self {
        dataviz_core::config::defaults()
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

    #[test]
    fn live_tokens_last_at_least_thirty_seconds() {
        assert_eq!(parse_token_ttl("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_token_ttl("30s"), Ok(MIN_LIVE_TOKEN_TTL));
        assert!(
            parse_token_ttl("29s")
                .unwrap_err()
                .contains("shorter than 30s")
        );
        assert!(parse_token_ttl("soon").is_err());
    }

    #[test]
    fn trusted_proxies_are_addresses_or_networks() {
        let nets = parse_networks("10.0.0.0/8, 192.0.2.1 2001:db8::/32").unwrap();
        assert_eq!(nets.0.len(), 3);
        assert_eq!(nets.0[1].to_string(), "192.0.2.1/32");
        assert_eq!(parse_networks("").unwrap(), Networks::default());
        let e = parse_networks("10.0.0.0/8,proxy.local").unwrap_err();
        assert!(e.contains("proxy.local"), "{e}");
    }
}
