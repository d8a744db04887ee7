//! Topic selectors: which topics a subscription, a publisher claim or a subscriber claim covers.
//!
//! A selector matches a topic when it is `*`, when it is the topic itself, or when it is a URI
//! template (RFC 6570) the topic is an expansion of. Templates are compiled to regular
//! expressions once and cached ([`TopicSelectorStore`]), as the reference hub does. The
//! compiler covers what topic selectors use in practice:
//! - `{var}` matches unreserved characters and percent-escapes, so it never crosses `/`;
//! - `{+var}` and `{#var}` also match reserved characters (`/`, `:`, `?`, ...);
//! - `{.var}`, `{/var}`, `{;var}`, `{?var}`, `{&var}` match their prefixed forms;
//! - several variables in one expression (`{x,y}`), prefix (`:3`) and explode (`*`) modifiers
//!   are accepted; an exploded variable matches a list.
//!
//! A selector containing `{` that is not a valid template is only matched exactly.
//!
//! # Cost
//! A subscription compiles its selectors once, into a [`SelectorSet`] it owns: what other
//! requests do to the shared cache never makes it compile again. A template is at most
//! [`MAX_TEMPLATE_LENGTH`] bytes and its compiled form at most [`TEMPLATE_SIZE_LIMIT`] bytes;
//! a longer one is refused, a larger one only matched exactly. A [`TopicMemo`] remembers, per
//! subscription, which topics matched, so that a topic seen again costs one hash lookup
//! whatever the number of templates.

use regex::{Regex, RegexBuilder, RegexSet, RegexSetBuilder};
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::{Arc, RwLock};

/// Compiled templates kept at most (the cache is emptied when full; recompiling is cheap).
pub const DEFAULT_TEMPLATE_CACHE_SIZE: usize = 10_000;
/// The longest template (a selector with `{`) a subscription may name, in bytes.
pub const MAX_TEMPLATE_LENGTH: usize = 2048;
/// The most memory one compiled template may take; a template needing more only matches
/// exactly. Real topic templates take a few KiB.
pub const TEMPLATE_SIZE_LIMIT: usize = 64 * 1024;
/// Topics a [`TopicMemo`] remembers before it starts over.
pub const MEMO_CAPACITY: usize = 4096;

/// Matches topics against selectors, caching compiled templates.
#[derive(Debug)]
pub struct TopicSelectorStore {
    /// `None` for a selector with `{` that is not a valid template.
    templates: RwLock<HashMap<String, Option<Arc<Regex>>>>,
    capacity: usize,
}

impl Default for TopicSelectorStore {
    fn default() -> Self {
        TopicSelectorStore::new(DEFAULT_TEMPLATE_CACHE_SIZE)
    }
}

impl TopicSelectorStore {
    pub fn new(capacity: usize) -> TopicSelectorStore {
        TopicSelectorStore {
            templates: RwLock::new(HashMap::new()),
            capacity: capacity.max(1),
        }
    }

    /// Does `selector` cover `topic`?
    pub fn matches(&self, topic: &str, selector: &str) -> bool {
        if selector == "*" || selector == topic {
            return true;
        }
        if !selector.contains('{') {
            return false;
        }
        self.template(selector).is_some_and(|re| re.is_match(topic))
    }

    /// Does any selector cover any topic? (What a subscriber needs to receive an update.)
    pub fn any_matches(&self, topics: &[String], selectors: &[String]) -> bool {
        topics
            .iter()
            .any(|t| selectors.iter().any(|s| self.matches(t, s)))
    }

    /// Is every topic covered by some selector? (What a publisher needs to publish an update.)
    pub fn all_match(&self, topics: &[String], selectors: &[String]) -> bool {
        if selectors.iter().any(|s| s == "*") {
            return true;
        }
        topics
            .iter()
            .all(|t| selectors.iter().any(|s| self.matches(t, s)))
    }

    /// Compiles `selectors` once, for a subscription to keep (see [`SelectorSet`]).
    pub fn compile(&self, selectors: &[String]) -> SelectorSet {
        let mut set = SelectorSet::default();
        for selector in selectors {
            if selector == "*" {
                set.any = true;
            } else if let Some(template) = selector
                .contains('{')
                .then(|| self.template(selector))
                .flatten()
            {
                set.templates.push(template);
            } else {
                set.exact.insert(selector.clone());
            }
        }
        set
    }

    fn template(&self, selector: &str) -> Option<Arc<Regex>> {
        let read = self.templates.read().unwrap_or_else(|e| e.into_inner());
        if let Some(cached) = read.get(selector) {
            return cached.clone();
        }
        drop(read);
        let compiled = compile_template(selector).map(Arc::new);
        let mut write = self.templates.write().unwrap_or_else(|e| e.into_inner());
        if write.len() >= self.capacity {
            write.clear();
        }
        write.insert(selector.to_owned(), compiled.clone());
        compiled
    }
}

/// Selectors compiled for one subscription: `*`, exact topics, templates. Owned by the
/// subscription, so its cost is paid once, when it starts.
#[derive(Debug, Default, Clone)]
pub struct SelectorSet {
    any: bool,
    exact: HashSet<String>,
    templates: Vec<Arc<Regex>>,
    /// The templates as one automaton ([`SelectorSet::in_one_pass`]), when built.
    one_pass: Option<Arc<RegexSet>>,
}

/// The largest automaton [`SelectorSet::in_one_pass`] builds (a thousand real templates take
/// a few MiB); past it, the templates are tried one by one.
pub const ONE_PASS_SIZE_LIMIT: usize = 32 * 1024 * 1024;

impl SelectorSet {
    /// Does any selector cover `topic`?
    pub fn matches(&self, topic: &str) -> bool {
        self.any
            || self.exact.contains(topic)
            || match &self.one_pass {
                Some(set) => set.is_match(topic),
                None => self.templates.iter().any(|t| t.is_match(topic)),
            }
    }

    /// The same selectors, with the templates compiled again into one automaton that tries
    /// them all in a single pass over a topic. With a thousand templates, matching a topic
    /// costs about what one template does instead of a thousand, but the automaton is this
    /// set's alone (several MiB, where templates are shared through the cache): for a one-off
    /// read of many topics, such as a history replay. Unchanged when the automaton would
    /// exceed [`ONE_PASS_SIZE_LIMIT`].
    pub fn in_one_pass(&self) -> SelectorSet {
        let mut set = self.clone();
        if self.templates.len() > 1 {
            set.one_pass = RegexSetBuilder::new(self.templates.iter().map(|t| t.as_str()))
                .size_limit(ONE_PASS_SIZE_LIMIT)
                .dfa_size_limit(ONE_PASS_SIZE_LIMIT)
                .build()
                .ok()
                .map(Arc::new);
        }
        set
    }

    /// How many templates a topic is tried against, at most.
    pub fn templates(&self) -> usize {
        self.templates.len()
    }

    /// The topics it names, when it names exact topics only (no `*`, no template): then no
    /// other topic can match it.
    pub fn exact_topics(&self) -> Option<impl Iterator<Item = &String>> {
        (!self.any && self.templates.is_empty()).then(|| self.exact.iter())
    }
}

/// What a subscription decided for the topics it saw: `(subscribed, private allowed)` per
/// topic, computed once each. Topics repeat (one per device), templates may be many.
#[derive(Debug, Default)]
pub struct TopicMemo {
    seen: HashMap<String, (bool, bool)>,
}

impl TopicMemo {
    /// Whether `topics` contains one `subscribed` covers and, when `private`, one `allowed`
    /// covers: the reference hub's rule for who receives an update.
    pub fn can_receive(
        &mut self,
        topics: &[String],
        private: bool,
        subscribed: &SelectorSet,
        allowed: &SelectorSet,
    ) -> bool {
        let mut any_subscribed = false;
        let mut any_allowed = false;
        for topic in topics {
            let (s, a) = self.decide(topic, subscribed, allowed);
            any_subscribed |= s;
            any_allowed |= a;
        }
        any_subscribed && (!private || any_allowed)
    }

    fn decide(
        &mut self,
        topic: &str,
        subscribed: &SelectorSet,
        allowed: &SelectorSet,
    ) -> (bool, bool) {
        if let Some(known) = self.seen.get(topic) {
            return *known;
        }
        let decided = (subscribed.matches(topic), allowed.matches(topic));
        // Remembering is only worth it when deciding costs more than a lookup.
        if subscribed.templates() + allowed.templates() > 0 {
            if self.seen.len() >= MEMO_CAPACITY {
                self.seen.clear();
            }
            self.seen.insert(topic.to_owned(), decided);
        }
        decided
    }
}

/// Characters a simple expansion leaves as they are (RFC 6570 "unreserved").
const UNRESERVED: &str = r"(?:[A-Za-z0-9\-._~]|%[0-9A-Fa-f]{2})";
/// Characters a reserved expansion (`+`, `#`) leaves as they are: unreserved and reserved.
const RESERVED: &str = r"(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})";

/// Compiles a URI template to an anchored regular expression matching its expansions, or
/// `None` when `template` is not a valid template.
pub fn compile_template(template: &str) -> Option<Regex> {
    if template.len() > MAX_TEMPLATE_LENGTH {
        return None;
    }
    let mut pattern = String::from("^");
    let mut rest = template;
    while let Some(open) = rest.find(['{', '}']) {
        if rest.as_bytes()[open] == b'}' {
            return None;
        }
        pattern.push_str(&regex::escape(&rest[..open]));
        let close = open + rest[open..].find('}')?;
        expression(&rest[open + 1..close], &mut pattern)?;
        rest = &rest[close + 1..];
    }
    pattern.push_str(&regex::escape(rest));
    pattern.push('$');
    RegexBuilder::new(&pattern)
        .size_limit(TEMPLATE_SIZE_LIMIT)
        .dfa_size_limit(TEMPLATE_SIZE_LIMIT)
        .build()
        .ok()
}

/// Appends the pattern of one `{...}` expression (without the braces).
fn expression(expr: &str, pattern: &mut String) -> Option<()> {
    let (operator, list) = match expr.chars().next()? {
        c @ ('+' | '#' | '.' | '/' | ';' | '?' | '&') => (Some(c), &expr[1..]),
        _ => (None, expr),
    };
    let (first, separator, named, chars) = match operator {
        None => ("", ",", false, UNRESERVED),
        Some('+') => ("", ",", false, RESERVED),
        Some('#') => ("#", ",", false, RESERVED),
        Some('.') => (".", ".", false, UNRESERVED),
        Some('/') => ("/", "/", false, UNRESERVED),
        Some(';') => (";", ";", true, UNRESERVED),
        Some('?') => ("?", "&", true, UNRESERVED),
        Some('&') => ("&", "&", true, UNRESERVED),
        Some(_) => unreachable!("operators listed above"),
    };
    let mut values = Vec::new();
    for spec in list.split(',') {
        let (name, explode) = match spec.strip_suffix('*') {
            Some(name) => (name, true),
            None => (spec.split(':').next().unwrap_or(spec), false),
        };
        let valid = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '%');
        if !valid {
            return None;
        }
        let one = if named {
            // `;x=1` (`;x` when empty), `?x=1`, `&x=1`; exploded: `k=v` pairs.
            let key = if explode {
                format!("{UNRESERVED}+")
            } else {
                regex::escape(name)
            };
            format!("{key}(?:={chars}*)?")
        } else {
            format!("{chars}*")
        };
        let item = if explode {
            format!("{one}(?:(?:{}|,){one})*", regex::escape(separator))
        } else {
            one
        };
        values.push(item);
    }
    // Undefined variables are left out of an expansion, so every value is optional; their
    // separators go with them.
    let _ = write!(pattern, "(?:{}", regex::escape(first));
    for (i, value) in values.iter().enumerate() {
        if i == 0 {
            let _ = write!(pattern, "(?:{value})?");
        } else {
            let _ = write!(pattern, "(?:{}?{value})?", regex::escape(separator));
        }
    }
    pattern.push_str(")?");
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(topic: &str, selector: &str) -> bool {
        TopicSelectorStore::default().matches(topic, selector)
    }

    #[test]
    fn exact_and_wildcard() {
        assert!(m("foo", "foo"));
        assert!(m("https://example.com/a", "*"));
        assert!(!m("foo", "bar"));
        assert!(!m("foo", "fo"));
        // A `*` inside a selector is not a wildcard.
        assert!(!m("https://example.com/a", "https://example.com/*"));
    }

    #[test]
    fn simple_variables_stay_within_a_segment() {
        let s = "https://example.com/books/{id}";
        assert!(m("https://example.com/books/1", s));
        assert!(m("https://example.com/books/a-b_c.d~e%20", s));
        assert!(!m("https://example.com/books/1/reviews", s));
        assert!(!m("https://example.com/reviews/1", s));
        assert!(!m("https://example.com/books/1?x=y", s));
        assert!(m(
            "https://example.com/books/1/reviews/2",
            "https://example.com/books/{book}/reviews/{review}"
        ));
        // The conformance suite's non-matching template.
        assert!(!m(
            "https://example.net/foo/will-not-match}",
            "https://example.net/bar/{var}"
        ));
    }

    #[test]
    fn reserved_expansion_crosses_segments() {
        let s = "https://example.com/{+path}";
        assert!(m("https://example.com/a/b/c", s));
        assert!(m("https://example.com/a/b?c=d#e", s));
        assert!(m("https://example.com/", s));
        assert!(m(
            "https://example.com/x#y/z",
            "https://example.com/x{#frag}"
        ));
    }

    #[test]
    fn other_operators() {
        assert!(m("https://e.com/a/b", "https://e.com{/x,y}"));
        assert!(m("https://e.com/file.json", "https://e.com/file{.ext}"));
        assert!(m("https://e.com/s?q=1&lang=fr", "https://e.com/s{?q,lang}"));
        assert!(m("https://e.com/s?q=1", "https://e.com/s{?q,lang}"));
        assert!(m("https://e.com/m;x=1;y", "https://e.com/m{;x,y}"));
        assert!(m("https://e.com/l/1,2,3", "https://e.com/l/{list*}"));
        assert!(m("https://e.com/p/abc", "https://e.com/p/{v:3}"));
    }

    #[test]
    fn invalid_templates_only_match_exactly() {
        for bad in [
            "https://e.com/{",
            "https://e.com/}{x}",
            "https://e.com/{}",
            "{a b}",
        ] {
            assert!(compile_template(bad).is_none(), "{bad}");
            assert!(m(bad, bad));
            assert!(!m("https://e.com/x", bad));
        }
    }

    #[test]
    fn literal_parts_are_not_patterns() {
        assert!(!m("https://exampleXcom/1", "https://example.com/{id}"));
        assert!(m("https://e.com/(a)/1", "https://e.com/(a)/{id}"));
    }

    #[test]
    fn a_compiled_set_matches_as_the_store_does_and_outlives_its_cache() {
        let store = TopicSelectorStore::new(2);
        let selectors: Vec<String> = [
            "exact",
            "https://e.com/{id}",
            "bad{",
            "https://e.com/x/{+p}",
        ]
        .map(String::from)
        .into();
        let set = store.compile(&selectors);
        // Flushing the shared cache (more templates than it holds) leaves the set as it was.
        for i in 0..10 {
            store.matches("t", &format!("t/{{x{i}}}"));
        }
        for topic in [
            "exact",
            "bad{",
            "https://e.com/1",
            "https://e.com/x/a/b",
            "https://e.com/1/2",
            "other",
        ] {
            let expected = selectors.iter().any(|s| store.matches(topic, s));
            assert_eq!(set.matches(topic), expected, "{topic}");
        }
        assert_eq!(set.templates(), 2);
        assert!(store.compile(&["*".to_owned()]).matches("anything"));
    }

    #[test]
    fn templates_past_the_length_limit_are_not_compiled_and_the_longest_compile_fast() {
        let long = format!("https://e.com/{}/{{id}}", "x".repeat(MAX_TEMPLATE_LENGTH));
        assert!(compile_template(&long).is_none());
        // The most expressions a template can hold: refused by the compiled size limit, and
        // quickly (the compiler stops at the limit).
        let mut many = String::new();
        let mut i = 0;
        while many.len() + 10 < MAX_TEMPLATE_LENGTH {
            let _ = write!(many, "{{+v{i}*}}");
            i += 1;
        }
        let started = std::time::Instant::now();
        assert!(
            compile_template(&many).is_none(),
            "{i} expressions: over TEMPLATE_SIZE_LIMIT"
        );
        let few: String = (0..8).map(|i| format!("{{+v{i}*}}")).collect();
        assert!(compile_template(&few).is_some());
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn the_memo_decides_as_the_selectors_and_stays_bounded() {
        let store = TopicSelectorStore::default();
        let subscribed = store.compile(&["https://e.com/{id}".to_owned()]);
        let allowed = store.compile(&["https://e.com/1".to_owned()]);
        let mut memo = TopicMemo::default();
        let t = |s: &str| vec![s.to_owned()];
        for _ in 0..2 {
            assert!(memo.can_receive(&t("https://e.com/1"), true, &subscribed, &allowed));
            assert!(!memo.can_receive(&t("https://e.com/2"), true, &subscribed, &allowed));
            assert!(memo.can_receive(&t("https://e.com/2"), false, &subscribed, &allowed));
            assert!(!memo.can_receive(&t("https://f.com/2"), false, &subscribed, &allowed));
        }
        // Allowed by one topic, subscribed by another: the reference rule.
        let both = vec!["https://e.com/2".to_owned(), "https://e.com/1".to_owned()];
        assert!(memo.can_receive(&both, true, &subscribed, &allowed));
        for i in 0..MEMO_CAPACITY * 2 {
            memo.can_receive(
                &t(&format!("https://e.com/n{i}")),
                false,
                &subscribed,
                &allowed,
            );
        }
        assert!(memo.seen.len() <= MEMO_CAPACITY);
    }

    #[test]
    fn publishers_need_every_topic_subscribers_any() {
        let s = TopicSelectorStore::new(2);
        let topics = vec!["foo".to_owned(), "bar".to_owned()];
        let sel = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(s.all_match(&topics, &sel(&["foo", "bar"])));
        assert!(s.all_match(&topics, &sel(&["*"])));
        assert!(!s.all_match(&topics, &sel(&[])));
        assert!(!s.all_match(&topics, &sel(&["foo"])));
        assert!(s.any_matches(&topics, &sel(&["bar"])));
        assert!(s.any_matches(&topics, &sel(&["*"])));
        assert!(!s.any_matches(&topics, &sel(&[])));
        assert!(!s.any_matches(&topics, &sel(&["baz", "bat"])));
        // The cache keeps working past its capacity.
        for i in 0..10 {
            assert!(s.matches(&format!("t/{i}"), &format!("t/{{x{i}}}")));
        }
    }
    #[test]
    fn one_pass_decides_as_the_templates_one_by_one() {
        let store = TopicSelectorStore::default();
        let mut selectors: Vec<String> = [
            "https://e.com/{a}/devices/{b}",
            "https://e.com/{+rest}",
            "https://e.com/books{?q,lang}",
            "https://e.com/x{/path*}",
            "https://e.com/exact",
            "https://e.com/{unclosed",
        ]
        .map(str::to_owned)
        .into();
        selectors.extend((0..200).map(|i| format!("https://filler.example/{{a}}/{i}")));
        let topics = [
            "https://e.com/1/devices/2",
            "https://e.com/1/devices/2/3",
            "https://e.com/books?q=x&lang=fr",
            "https://e.com/x/a/b",
            "https://e.com/exact",
            "https://e.com/{unclosed",
            "https://filler.example/7/199",
            "https://filler.example/7/200",
            "https://filler.example/7",
            "https://elsewhere.example/",
        ];
        let one_by_one = store.compile(&selectors);
        let one_pass = one_by_one.in_one_pass();
        assert!(one_pass.one_pass.is_some());
        for topic in topics {
            assert_eq!(
                one_pass.matches(topic),
                one_by_one.matches(topic),
                "{topic}"
            );
        }
        // Both answer yes somewhere and no somewhere, so the comparison says something.
        assert!(one_pass.matches("https://filler.example/7/199"));
        assert!(!one_pass.matches("https://filler.example/7/200"));
        assert!(!one_pass.matches("https://filler.example/7"));
        assert!(!one_pass.matches("https://e.com/1/devices/2/3/../x y"));
    }

    /// Templates whose one automaton would pass [`ONE_PASS_SIZE_LIMIT`] are tried one by one,
    /// with the same answers. A subscriber may send that: 1,000 templates (the default
    /// `MERCURE_MAX_TOPICS`) of 80 variables each, every one under [`TEMPLATE_SIZE_LIMIT`]
    /// (40 variables fit in one automaton together, 120 no longer compile alone).
    #[test]
    fn past_the_size_limit_the_templates_are_tried_one_by_one() {
        const VARIABLES: usize = 80;
        let store = TopicSelectorStore::default();
        let path: String = (0..VARIABLES).map(|v| format!("/{{v{v}}}")).collect();
        let selectors: Vec<String> = (0..1000)
            .map(|i| format!("https://e.com/{i}{path}"))
            .collect();
        let one_by_one = store.compile(&selectors);
        assert_eq!(one_by_one.templates(), 1000);
        let fallback = one_by_one.in_one_pass();
        assert!(
            fallback.one_pass.is_none(),
            "these templates fit in one automaton: the test no longer crosses the limit"
        );
        let segments: String = (0..VARIABLES).map(|v| format!("/s{v}")).collect();
        for (topic, expected) in [
            (format!("https://e.com/999{segments}"), true),
            (format!("https://e.com/0{segments}"), true),
            (format!("https://e.com/1000{segments}"), false),
            (format!("https://e.com/7{segments}/extra"), false),
            ("https://e.com/7/s0".to_owned(), false),
        ] {
            assert_eq!(fallback.matches(&topic), expected, "{topic}");
            assert_eq!(one_by_one.matches(&topic), expected, "{topic}");
        }
    }
}
