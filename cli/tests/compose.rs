//! compose.yaml against the binary and the repository: checked, not by eye.
//!
//! The file's shape is validated against the Compose Specification's JSON schema in
//! scripts/test (check-jsonschema). These tests check what a schema cannot know:
//! - every environment variable compose.yaml sets for a Dataviz role is one that
//!   `dataviz <role> --help` lists (`[env: NAME]`), and the settings whose defaults are wrong in
//!   a container (DATABASE_URL, NATS_URL, MQTT_HOST, ...) are set for every role that reads them;
//! - the stream settings, which every NATS role applies at start, are the same for all roles;
//! - each role's health check probes the port of its HTTP_ADDR;
//! - references resolve: `depends_on` services, named volumes, bind-mounted files;
//! - every `${VAR}` of compose.yaml is in .env.example with the same default;
//! - docs/CONFIGURATION.md names every variable of every subcommand.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use yaml_rust2::{Yaml, YamlLoader};

/// Compose service → `dataviz` subcommand, for every service built from the Dataviz image.
const ROLES: [(&str, &str); 8] = [
    ("migrate", "migrate"),
    ("mqtt-bridge", "bridge"),
    ("processor", "processor"),
    ("writer", "writer"),
    ("publisher", "publisher"),
    ("app", "app"),
    ("hub-1", "hub"),
    ("hub-2", "hub"),
];

/// Settings whose built-in defaults point at 127.0.0.1 or suit development only: compose.yaml
/// must set each one for every role that reads it.
const MUST_SET: [&str; 8] = [
    "DATABASE_URL",
    "NATS_URL",
    "NATS_REPLICAS",
    "MQTT_HOST",
    "APP_ENV",
    "HTTP_ADDR",
    "MERCURE_URL",
    "MERCURE_PUBLISHER_JWT_KEY",
];

/// Stream settings: every role that talks to NATS creates or updates the streams with its own
/// values at start, so roles with different values would keep changing the streams.
const STREAM_SETTINGS: [&str; 7] = [
    "NATS_REPLICAS",
    "RAW_RETENTION",
    "RAW_MAX_BYTES",
    "RAW_DUPLICATE_WINDOW",
    "READINGS_MAX_BYTES",
    "DEAD_RETENTION",
    "ACK_WAIT",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// compose.yaml with YAML merge keys (`<<: *anchor`, `<<: [*a, *b]`) applied, as Compose does.
fn compose() -> Yaml {
    let docs = YamlLoader::load_from_str(&read("compose.yaml")).expect("compose.yaml parses");
    assert_eq!(docs.len(), 1, "compose.yaml holds one document");
    merge_keys(&docs[0])
}

fn merge_keys(node: &Yaml) -> Yaml {
    match node {
        Yaml::Hash(hash) => {
            let merge = Yaml::String("<<".into());
            let mut out = yaml_rust2::yaml::Hash::new();
            // Merged mappings first, earlier ones winning; then the node's own keys win.
            let sources = match hash.get(&merge) {
                Some(Yaml::Array(list)) => list.clone(),
                Some(one) => vec![one.clone()],
                None => Vec::new(),
            };
            for source in sources {
                let Yaml::Hash(source) = merge_keys(&source) else {
                    panic!("`<<` merges a mapping, got {source:?}");
                };
                for (k, v) in source {
                    out.entry(k).or_insert(v);
                }
            }
            for (k, v) in hash {
                if *k != merge {
                    out.insert(k.clone(), merge_keys(v));
                }
            }
            Yaml::Hash(out)
        }
        Yaml::Array(items) => Yaml::Array(items.iter().map(merge_keys).collect()),
        other => other.clone(),
    }
}

fn keys(node: &Yaml) -> Vec<String> {
    node.as_hash()
        .map(|h| {
            h.keys()
                .filter_map(|k| k.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn scalar(node: &Yaml) -> Option<String> {
    match node {
        Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A service's `environment` as name → value (`None`: passed through from .env or the shell
/// when set there). Both the mapping and the list (`NAME=value`) forms.
fn environment(service: &Yaml) -> BTreeMap<String, Option<String>> {
    match &service["environment"] {
        Yaml::Hash(hash) => hash
            .iter()
            .map(|(k, v)| (k.as_str().expect("string key").to_owned(), scalar(v)))
            .collect(),
        Yaml::Array(items) => items
            .iter()
            .map(|item| {
                let item = item.as_str().expect("NAME=value");
                match item.split_once('=') {
                    Some((k, v)) => (k.to_owned(), Some(v.to_owned())),
                    None => (item.to_owned(), None),
                }
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

fn help(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_dataviz"))
        .args(args)
        .env_clear()
        .output()
        .expect("dataviz runs");
    assert!(output.status.success(), "dataviz {args:?} failed");
    String::from_utf8(output.stdout).expect("UTF-8 help")
}

/// The subcommands `dataviz --help` lists.
fn subcommands() -> BTreeSet<String> {
    help(&["--help"])
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|c| c != "help")
        .collect()
}

/// The variables `dataviz <subcommand> --help` names (`[env: NAME=...]`, wrapped or not).
fn variables_read(subcommand: &str) -> BTreeSet<String> {
    let text = help(&[subcommand, "--help"])
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    text.split("[env: ")
        .skip(1)
        .map(|rest| {
            rest.chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect::<String>()
        })
        .filter(|name| !name.is_empty())
        .collect()
}

fn service<'a>(compose: &'a Yaml, name: &str) -> &'a Yaml {
    let service = &compose["services"][name];
    assert!(
        !service.is_badvalue(),
        "compose.yaml has no service {name:?}"
    );
    service
}

#[test]
fn every_dataviz_service_is_a_known_role_running_its_subcommand() {
    let compose = compose();
    let image = scalar(&service(&compose, "migrate")["image"]).expect("migrate has an image");
    for name in keys(&compose["services"]) {
        let svc = service(&compose, &name);
        let is_dataviz =
            !svc["build"].is_badvalue() || scalar(&svc["image"]).as_deref() == Some(&image);
        let role = ROLES.iter().find(|(s, _)| *s == name);
        match (is_dataviz, role) {
            (true, Some((_, subcommand))) => {
                let command = scalar(&svc["command"][0]);
                assert_eq!(
                    command.as_deref(),
                    Some(*subcommand),
                    "service {name} runs `dataviz {subcommand}`"
                );
            }
            (true, None) => panic!(
                "compose.yaml service {name} is built from the Dataviz image but is not in \
                 ROLES (cli/tests/compose.rs): add it, with its subcommand"
            ),
            (false, Some(_)) => panic!("service {name} must use the Dataviz image ({image})"),
            (false, None) => {}
        }
    }
}

#[test]
fn roles_set_only_variables_the_binary_reads_and_all_it_needs() {
    let compose = compose();
    let existing = subcommands();
    let mut problems = Vec::new();
    for (name, subcommand) in ROLES {
        let env = environment(service(&compose, name));
        if !existing.contains(subcommand) {
            problems.push(format!(
                "compose.yaml runs `dataviz {subcommand}` (service {name}), but the binary has \
                 no such subcommand (it has: {existing:?})"
            ));
            continue;
        }
        let read = variables_read(subcommand);
        // The publisher key signs publications: only roles that publish (to MERCURE_URL) need
        // it; the admin site reads the key group for the subscriber key alone.
        let must: BTreeSet<String> = MUST_SET
            .iter()
            .filter(|v| read.contains(**v))
            .filter(|v| **v != "MERCURE_PUBLISHER_JWT_KEY" || read.contains("MERCURE_URL"))
            .map(|v| (*v).to_owned())
            .collect();
        for var in env.keys() {
            if !read.contains(var) {
                problems.push(format!(
                    "service {name} sets {var}, which `dataviz {subcommand}` does not read"
                ));
            }
        }
        for var in &must {
            if !env.contains_key(var) {
                problems.push(format!(
                    "service {name} does not set {var}, which `dataviz {subcommand}` reads \
                     (its default does not fit a container)"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_nats_role_has_the_same_stream_settings() {
    let compose = compose();
    let mut seen: Option<(String, BTreeMap<String, Option<String>>)> = None;
    for (name, subcommand) in ROLES {
        let env = environment(service(&compose, name));
        // Roles that create the streams read their settings; the admin site only reads NATS.
        if !variables_read(subcommand).contains("ACK_WAIT") {
            continue;
        }
        let settings: BTreeMap<String, Option<String>> = STREAM_SETTINGS
            .iter()
            .map(|s| ((*s).to_owned(), env.get(*s).cloned().flatten()))
            .collect();
        for (setting, value) in &settings {
            assert!(value.is_some(), "service {name} does not set {setting}");
        }
        match &seen {
            None => seen = Some((name.to_owned(), settings)),
            Some((first, expected)) => assert_eq!(
                &settings, expected,
                "stream settings of {name} differ from {first}'s"
            ),
        }
    }
    assert!(seen.is_some(), "no role talks to NATS?");
}

#[test]
fn health_checks_probe_each_roles_http_addr() {
    let compose = compose();
    for (name, _) in ROLES {
        let svc = service(&compose, name);
        let env = environment(svc);
        let Some(Some(addr)) = env.get("HTTP_ADDR") else {
            // A one-shot (migrate) has no health endpoint; then it must not be probed.
            assert_eq!(
                svc["healthcheck"]["disable"].as_bool(),
                Some(true),
                "service {name} has no HTTP_ADDR: disable its health check"
            );
            continue;
        };
        let port = addr.rsplit(':').next().expect("HOST:PORT");
        let test: Vec<String> = svc["healthcheck"]["test"]
            .as_vec()
            .unwrap_or_else(|| panic!("service {name} has a health check"))
            .iter()
            .filter_map(scalar)
            .collect();
        let url = format!("http://127.0.0.1:{port}/healthz");
        assert!(
            test.contains(&url),
            "service {name}: health check {test:?} should probe {url}"
        );
    }
}

#[test]
fn references_resolve() {
    let compose = compose();
    let services: BTreeSet<String> = keys(&compose["services"]).into_iter().collect();
    let volumes: BTreeSet<String> = keys(&compose["volumes"]).into_iter().collect();
    for name in &services {
        let svc = service(&compose, name);
        for dependency in keys(&svc["depends_on"]) {
            assert!(
                services.contains(&dependency),
                "{name} depends on {dependency}, which is not a service"
            );
        }
        for mount in svc["volumes"].as_vec().into_iter().flatten() {
            let mount = mount.as_str().expect("short volume syntax");
            let source = mount.split(':').next().expect("SOURCE:TARGET");
            if source.starts_with("./") {
                assert!(
                    root().join(source).is_file(),
                    "{name} mounts {source}, which is not a file of the repository"
                );
            } else {
                assert!(
                    volumes.contains(source),
                    "{name} mounts volume {source}, not declared under `volumes:`"
                );
            }
        }
    }
    for required in ["database_data", "mosquitto_data", "mosquitto_log"] {
        assert!(volumes.contains(required), "volume {required}");
    }
}

/// `${NAME}`, `${NAME:-default}`, `${NAME-default}`, `${NAME:?error}`, `${NAME?error}` in
/// compose.yaml: name → default (None when there is none).
fn interpolations(text: &str) -> BTreeMap<String, Option<String>> {
    let mut found = BTreeMap::new();
    for rest in text.split("${").skip(1) {
        let inner = rest.split('}').next().expect("closing brace");
        let name: String = inner
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let tail = &inner[name.len()..];
        let default = tail
            .strip_prefix(":-")
            .or_else(|| tail.strip_prefix('-'))
            .map(str::to_owned);
        found.insert(name, default);
    }
    found
}

#[test]
fn env_example_lists_every_variable_with_its_default() {
    let compose_text = read("compose.yaml");
    // Lines `NAME=value` or `# NAME=value`: the variable and the value shown.
    let example: BTreeMap<String, String> = read(".env.example")
        .lines()
        .map(|l| l.trim_start_matches('#').trim())
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| {
            !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        })
        .map(|(k, v)| (k.to_owned(), v.trim_matches('\'').to_owned()))
        .collect();
    let mut problems = Vec::new();
    for (name, default) in interpolations(&compose_text) {
        match (example.get(&name), default) {
            (None, _) => problems.push(format!("{name} is not in .env.example")),
            (Some(shown), Some(default)) if *shown != default => problems.push(format!(
                ".env.example shows {name}={shown}, compose.yaml's default is {default:?}"
            )),
            _ => {}
        }
    }
    // Variables passed through without a value (`NAME:`) come from .env too.
    let compose = compose();
    for (name, _) in ROLES {
        for (var, value) in environment(service(&compose, name)) {
            if value.is_none() && !example.contains_key(&var) {
                problems.push(format!(
                    "{var} (passed through to {name}) is not in .env.example"
                ));
            }
        }
    }
    assert!(
        example.contains_key("COMPOSE_PROFILES"),
        ".env.example picks a NATS profile"
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn configuration_reference_names_every_variable() {
    let reference = read("docs/CONFIGURATION.md");
    let mut missing = BTreeSet::new();
    for subcommand in subcommands() {
        for var in variables_read(&subcommand) {
            if !reference.contains(&format!("`{var}`")) {
                missing.insert(format!("{var} (dataviz {subcommand})"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/CONFIGURATION.md does not document: {missing:?}"
    );
}

#[test]
fn help_parsing_finds_wrapped_and_hidden_variables() {
    let read = variables_read("bridge");
    // Wrapped over two lines in the help, and shown without `=` (hide_env_values).
    for var in ["RAW_MAX_BYTES", "NATS_PASSWORD", "MQTT_TOPICS", "APP_ENV"] {
        assert!(read.contains(var), "{var} in {read:?}");
    }
    assert!(subcommands().contains("bridge"));
}
