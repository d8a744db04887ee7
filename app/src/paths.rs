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
    match next
        .and_then(local_target)
        .filter(|n| n != HOME && !n.starts_with(LOGIN))
    {
        Some(next) => format!("{LOGIN}?next={}", encode(&next)),
        None => LOGIN.to_owned(),
    }
}

/// `target` as a path on this site, written the way a browser resolves it; `None` when a
/// browser would leave the site with it.
///
/// Browsers drop tabs and newlines anywhere in a URL, read `\` as `/` and trim control
/// characters and spaces at its ends, so `/\t/evil.example` is `//evil.example`, another host.
/// The check is the browser's own resolution (WHATWG URL parsing, as the `url` crate does it)
/// against this site, and the answer is the resolved path, percent-encoded: it has no control
/// character left, so it is always a valid `Location` header.
pub fn local_target(target: &str) -> Option<String> {
    // Only what starts as a path: a scheme or a bare name is not where the site sends anyone.
    if !target.starts_with('/') {
        return None;
    }
    let site = url::Url::parse("http://site.invalid/").expect("a valid URL");
    let resolved = site.join(target).ok()?;
    if resolved.origin() != site.origin() {
        return None;
    }
    let mut local = resolved.path().to_owned();
    if let Some(query) = resolved.query() {
        local.push('?');
        local.push_str(query);
    }
    if let Some(fragment) = resolved.fragment() {
        local.push('#');
        local.push_str(fragment);
    }
    // Alone in a Location header, `//x` would name a host (`/.//x` resolves to it).
    let stays = !local.starts_with("//") && site.join(&local).ok()? == resolved;
    stays.then_some(local)
}

/// A path with one parameter, written once: axum routes its template (`/devices/{id}`), and
/// links are made by filling it in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Template(&'static str);

impl Template {
    /// The template, as axum's router reads it.
    pub const fn route(self) -> &'static str {
        self.0
    }

    /// The path with its parameter set to `value`.
    pub fn at(self, value: impl std::fmt::Display) -> String {
        let (start, rest) = self.0.split_once('{').expect("a template has a parameter");
        let (_, end) = rest
            .split_once('}')
            .expect("a template's parameter is closed");
        format!("{start}{value}{end}")
    }
}

pub const GATEWAY_EDIT: Template = Template("/gateways/{id}/edit");
pub const GATEWAY_DELETE: Template = Template("/gateways/{id}/delete");
pub const GATEWAY_DEVICES: Template = Template("/devices/gateway/{id}");
pub const DEVICE: Template = Template("/devices/{id}");
pub const LIVE_TOKEN: Template = Template("/devices/{id}/live-token");
pub const DEAD_LETTER: Template = Template("/dead-letters/{seq}");

pub fn gateway_edit(id: i32) -> String {
    GATEWAY_EDIT.at(id)
}

pub fn gateway_delete(id: i32) -> String {
    GATEWAY_DELETE.at(id)
}

pub fn gateway_devices(id: i32) -> String {
    GATEWAY_DEVICES.at(id)
}

pub fn device(id: i64) -> String {
    DEVICE.at(id)
}

pub fn dead_letter(seq: u64) -> String {
    DEAD_LETTER.at(seq)
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
    fn templates_route_and_fill_the_same_path() {
        assert_eq!(DEVICE.route(), "/devices/{id}");
        assert_eq!(device(12), "/devices/12");
        assert_eq!(gateway_edit(7), "/gateways/7/edit");
        assert_eq!(LIVE_TOKEN.at(3), "/devices/3/live-token");
        assert_eq!(dead_letter(42), "/dead-letters/42");
    }

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
        assert_eq!(login(Some("/\t/evil.example")), "/login");
    }

    #[test]
    fn targets_a_browser_would_take_elsewhere_are_refused() {
        for elsewhere in [
            "//evil.example",
            "/\\evil.example",
            "\\\\evil.example",
            "/\t/evil.example",
            "/\n/evil.example",
            "/\r\n/evil.example",
            "\t//evil.example",
            " //evil.example",
            "/\t\\evil.example",
            // On this site (`http://site//evil.example`), but not sendable as a bare path.
            "/.//evil.example",
            "https://evil.example/",
            "http://site.invalid/",
            "javascript:alert(1)",
            "evil.example",
            "",
        ] {
            assert_eq!(local_target(elsewhere), None, "{elsewhere:?}");
        }
    }

    #[test]
    fn local_targets_come_back_as_browsers_read_them() {
        for (target, local) in [
            ("/devices", "/devices"),
            ("/devices?q=a b", "/devices?q=a%20b"),
            ("/devices/\t1", "/devices/1"),
            ("/a/../gateways", "/gateways"),
            ("/%2F%2Fevil.example", "/%2F%2Fevil.example"),
            ("/%09/evil.example", "/%09/evil.example"),
            ("/x#top", "/x#top"),
            ("/é", "/%C3%A9"),
        ] {
            assert_eq!(local_target(target).as_deref(), Some(local), "{target:?}");
        }
    }

    #[test]
    fn queries_skip_empty_values() {
        assert_eq!(with_query("/d", &[("q", ""), ("page", "2")]), "/d?page=2");
        assert_eq!(with_query("/d", &[("q", "a b")]), "/d?q=a+b");
        assert_eq!(with_query("/d", &[]), "/d");
    }
}
