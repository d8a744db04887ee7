//! The site's URLs, in one place: routes, links and redirects use these.

pub const HOME: &str = "/";
pub const LOGIN: &str = "/login";
pub const GATEWAYS: &str = "/gateways";
pub const GATEWAY_NEW: &str = "/gateways/new";
pub const DEVICES: &str = "/devices";
pub const DEAD_LETTERS: &str = "/dead-letters";
pub const STYLESHEET: &str = "/assets/app.css";

/// The login page, remembering where to go next (only a local path is kept).
pub fn login(next: Option<&str>) -> String {
    match next.filter(|n| is_local(n) && *n != HOME && !n.starts_with(LOGIN)) {
        Some(next) => format!("{LOGIN}?next={}", encode(next)),
        None => LOGIN.to_owned(),
    }
}

/// True for a path on this site (`/x`), never another site (`//evil`, `/\evil`, `https://`).
pub fn is_local(path: &str) -> bool {
    path.starts_with('/') && !path.starts_with("//") && !path.starts_with("/\\")
}

pub fn gateway_edit(id: i32) -> String {
    format!("/gateways/{id}/edit")
}

pub fn gateway_delete(id: i32) -> String {
    format!("/gateways/{id}/delete")
}

pub fn gateway_devices(id: i32) -> String {
    format!("/devices/gateway/{id}")
}

pub fn device(id: i64) -> String {
    format!("/devices/{id}")
}

pub fn dead_letter(seq: u64) -> String {
    format!("/dead-letters/{seq}")
}

/// Percent-encodes a query value.
pub fn encode(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// `path?k=v&...`, skipping empty values.
pub fn with_query(path: &str, pairs: &[(&str, &str)]) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    let mut any = false;
    for (k, v) in pairs.iter().filter(|(_, v)| !v.is_empty()) {
        query.append_pair(k, v);
        any = true;
    }
    if any {
        format!("{path}?{}", query.finish())
    } else {
        path.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_keeps_only_local_next_paths() {
        assert_eq!(login(None), "/login");
        assert_eq!(
            login(Some("/devices?q=a")),
            "/login?next=%2Fdevices%3Fq%3Da"
        );
        assert_eq!(login(Some("//evil.example")), "/login");
        assert_eq!(login(Some("https://evil.example")), "/login");
        assert_eq!(login(Some("/\\evil.example")), "/login");
        assert_eq!(login(Some("/")), "/login");
    }

    #[test]
    fn queries_skip_empty_values() {
        assert_eq!(with_query("/d", &[("q", ""), ("page", "2")]), "/d?page=2");
        assert_eq!(with_query("/d", &[("q", "a b")]), "/d?q=a+b");
        assert_eq!(with_query("/d", &[]), "/d");
    }
}
