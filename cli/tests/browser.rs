//! The admin site end to end in a real headless Chromium, driven over WebDriver (chromedriver):
//! log in, create a gateway with the form, publish MQTT messages for it, see the device and its
//! tags appear, then see a value change live on the open page (through the Mercure hub of
//! `dataviz all`), without a reload; an older reading arriving later does not replace it.
//! Then the page's stream fails (`dataviz all` stopped) while a value is stored that no hub
//! ever sends: when the stream is back, the page shows it, read from the database, still
//! without a reload.
//!
//! Needs Debian's `chromium` and `chromium-driver` (installed by scripts/setup); the paths can
//! be overridden with `DATAVIZ_CHROMIUM` and `DATAVIZ_CHROMEDRIVER`. On failure a screenshot of
//! the page is written to the temp directory and its path printed.

mod common;

use anyhow::{Context as _, bail, ensure};
use common::{Publisher, Role, Stack};
use dataviz_testkit::free_port;
use fantoccini::{Client, ClientBuilder, Locator};
use std::future::Future;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ADMIN: &str = "admin@example.com";
const PASSWORD: &str = "browser test password";
const GATEWAY: i32 = 4242;
const DEVICE: &str = "plc-7";

fn tool(env: &str, default: &str) -> PathBuf {
    let path = std::env::var_os(env).map_or_else(|| PathBuf::from(default), PathBuf::from);
    assert!(
        path.is_file(),
        "{} not found ({env}): the browser test needs Debian's chromium and chromium-driver; \
         run scripts/setup (it installs both)",
        path.display()
    );
    path
}

/// chromedriver on a port of its own; killed when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn start(path: &PathBuf) -> Driver {
        let port = free_port();
        let child = Command::new(path)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", path.display()));
        let driver = Driver { child, port };
        assert!(
            dataviz_testkit::wait_for_port(port, Duration::from_secs(20)),
            "chromedriver did not listen on port {port}"
        );
        driver
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` until it gives a value, for at most `timeout`; the error names `what` and the
/// last failure.
async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => "not yet".to_owned(),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            bail!("{what}: not after {timeout:?} ({last})");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn text_of(browser: &Client, css: &str) -> anyhow::Result<String> {
    let element = browser
        .find(Locator::Css(css))
        .await
        .with_context(|| format!("finding {css}"))?;
    Ok(element.text().await?.trim().to_owned())
}

/// The scenario; any error is reported with a screenshot by the caller.
/// Whether the page's live status (`#live`) has the class `state` (`on` or `off`).
async fn live_is(browser: &Client, state: &str) -> anyhow::Result<bool> {
    let class = browser
        .find(Locator::Id("live"))
        .await?
        .attr("class")
        .await?
        .unwrap_or_default();
    Ok(class.split_whitespace().any(|c| c == state))
}

/// Whether the marker the scenario sets on the page is still there: no reload since.
async fn not_reloaded(browser: &Client) -> anyhow::Result<bool> {
    let marker = browser
        .execute("return window.__not_reloaded === true;", vec![])
        .await?;
    Ok(marker == serde_json::Value::Bool(true))
}

async fn scenario(
    browser: &Client,
    stack: &Stack,
    all: &mut Role,
    site: &str,
) -> anyhow::Result<()> {
    // Log in.
    browser.goto(&format!("{site}/login")).await?;
    browser
        .find(Locator::Css("input[name=email]"))
        .await?
        .send_keys(ADMIN)
        .await?;
    browser
        .find(Locator::Css("input[name=password]"))
        .await?
        .send_keys(PASSWORD)
        .await?;
    browser
        .find(Locator::Css("form[action$='/login'] button[type=submit]"))
        .await?
        .click()
        .await?;
    eventually(
        "the home page after logging in",
        Duration::from_secs(20),
        || async {
            let url = browser.current_url().await?;
            Ok((url.path() == "/"
                && browser
                    .find(Locator::Css("a[href='/gateways']"))
                    .await
                    .is_ok())
            .then_some(()))
        },
    )
    .await?;

    // Create the gateway through its form.
    browser.goto(&format!("{site}/gateways/new")).await?;
    browser
        .find(Locator::Css("input[name=id]"))
        .await?
        .send_keys(&GATEWAY.to_string())
        .await?;
    browser
        .find(Locator::Css("input[name=name]"))
        .await?
        .send_keys("Browser plant")
        .await?;
    browser
        .find(Locator::Css("textarea[name=description]"))
        .await?
        .send_keys("made by the browser test")
        .await?;
    browser
        .find(Locator::Css(
            "form[action$='/gateways/create'] button[type=submit]",
        ))
        .await?
        .click()
        .await?;
    eventually(
        "the gateway list after creating",
        Duration::from_secs(20),
        || async {
            let url = browser.current_url().await?;
            Ok((url.path() == "/gateways").then_some(()))
        },
    )
    .await?;
    let body = text_of(browser, "body").await?;
    ensure!(
        body.contains("Browser plant"),
        "the new gateway is not listed: {body}"
    );
    ensure!(
        stack
            .count(&format!(
                "SELECT count(*) FROM gateway WHERE id = {GATEWAY} AND name = 'Browser plant'"
            ))
            .await
            == 1,
        "the gateway is not in the database"
    );

    // Readings for a new device of that gateway.
    let topic = format!("gateways/{GATEWAY}/{DEVICE}");
    let mut mqtt = Publisher::connect(stack.mosquitto.port()).await;
    mqtt.publish(
        &topic,
        r#"{"d": [{"tag": "AI.0", "value": 21.5}, {"tag": "DI.0", "value": true}, {"tag": "ST", "value": "running"}]}"#,
    )
    .await;
    mqtt.wait_acked(Duration::from_secs(10)).await;

    // The device appears on /devices (a reload each time: the list is not live).
    let device_link = "a[href^='/devices/']:not([href^='/devices/gateway'])";
    let href = eventually(
        "the device on /devices",
        Duration::from_secs(30),
        || async {
            browser.goto(&format!("{site}/devices")).await?;
            for link in browser.find_all(Locator::Css(device_link)).await? {
                if link.text().await?.trim() == DEVICE {
                    return Ok(link.attr("href").await?);
                }
            }
            Ok(None)
        },
    )
    .await?;

    // Its tags, with their last values, on /devices/{id}.
    let row = |tag: &str| format!("tr[data-tag='{tag}'] td.value");
    eventually(
        "the device's tags and values",
        Duration::from_secs(30),
        || async {
            browser.goto(&format!("{site}{href}")).await?;
            let values = (
                text_of(browser, &row("AI.0")).await.ok(),
                text_of(browser, &row("DI.0")).await.ok(),
                text_of(browser, &row("ST")).await.ok(),
            );
            Ok(match values {
                (Some(ai), Some(di), Some(st))
                    if ai == "21.5" && di == "true" && st.contains("running") =>
                {
                    Some(())
                }
                _ => None,
            })
        },
    )
    .await?;

    // The page subscribes to the hub; a marker tells a reload apart from a live update.
    eventually("the live subscription", Duration::from_secs(20), || async {
        Ok(live_is(browser, "on").await?.then_some(()))
    })
    .await?;
    browser
        .execute("window.__not_reloaded = true; return true;", vec![])
        .await?;
    mqtt.publish(&topic, r#"{"d": [{"tag": "AI.0", "value": 77.25}]}"#)
        .await;
    mqtt.wait_acked(Duration::from_secs(10)).await;
    eventually("the live value 77.25", Duration::from_secs(30), || async {
        Ok((text_of(browser, &row("AI.0")).await? == "77.25").then_some(()))
    })
    .await?;
    ensure!(
        not_reloaded(browser).await?,
        "the page was reloaded: the value did not come live"
    );
    ensure!(
        text_of(browser, &row("DI.0")).await? == "true",
        "a tag not in the update changed"
    );

    // An older reading that arrives later (a device's late resend, a replay) does not hide the
    // newer value; the newer update behind it for another tag shows it went through.
    mqtt.publish(
        &topic,
        r#"{"d": [{"tag": "AI.0", "value": 11.0}], "ts": "2020-01-01T00:00:00Z"}"#,
    )
    .await;
    mqtt.publish(&topic, r#"{"d": [{"tag": "DI.0", "value": false}]}"#)
        .await;
    mqtt.wait_acked(Duration::from_secs(10)).await;
    eventually("the live value false", Duration::from_secs(30), || async {
        Ok((text_of(browser, &row("DI.0")).await? == "false").then_some(()))
    })
    .await?;
    ensure!(
        text_of(browser, &row("AI.0")).await? == "77.25",
        "an older reading replaced the newer value"
    );

    // What the stream missed is read from the database when it is back.
    all.kill();
    eventually(
        "the stream seen failing",
        Duration::from_secs(30),
        || async { Ok(live_is(browser, "off").await?.then_some(())) },
    )
    .await?;
    let stored = stack
        .count(&format!(
            "WITH stored AS (
                 INSERT INTO tag_reading (time, device_id, tag_id, gateway_id, value_num, value_type)
                 SELECT now(), t.device_id, t.id, {GATEWAY}, 88.5, 'double precision'
                 FROM tag t JOIN device d ON d.id = t.device_id
                 WHERE d.code = '{DEVICE}' AND t.code = 'AI.0'
                 RETURNING 1)
             SELECT count(*) FROM stored"
        ))
        .await;
    ensure!(stored == 1, "{stored} rows stored for AI.0");
    all.start_again();
    eventually(
        "the missed value 88.5, read from the database at reconnection",
        Duration::from_secs(60),
        || async { Ok((text_of(browser, &row("AI.0")).await? == "88.5").then_some(())) },
    )
    .await?;
    ensure!(
        not_reloaded(browser).await?,
        "the page was reloaded: the missed value was not read at reconnection"
    );
    ensure!(live_is(browser, "on").await?, "the stream is not back on");

    // And values come live again from the restarted hub, on the same page.
    mqtt.publish(&topic, r#"{"d": [{"tag": "AI.0", "value": 99.5}]}"#)
        .await;
    mqtt.wait_acked(Duration::from_secs(10)).await;
    eventually(
        "the live value 99.5 after the restart",
        Duration::from_secs(30),
        || async { Ok((text_of(browser, &row("AI.0")).await? == "99.5").then_some(())) },
    )
    .await?;
    ensure!(
        not_reloaded(browser).await?,
        "the page was reloaded: the value did not come live after the restart"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_logs_in_creates_a_gateway_and_sees_its_device_live() {
    // Missing browser tools fail the test (never a skip), naming scripts/setup.
    let chromium = tool("DATAVIZ_CHROMIUM", "/usr/bin/chromium");
    let chromedriver = tool("DATAVIZ_CHROMEDRIVER", "/usr/bin/chromedriver");

    let stack = Stack::start().await;
    let mut add = Command::new(env!("CARGO_BIN_EXE_dataviz"))
        .args(["user", "add", ADMIN, "--admin"])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(stack.env())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("dataviz user add runs");
    add.stdin
        .take()
        .expect("stdin")
        .write_all(format!("{PASSWORD}\n").as_bytes())
        .expect("password written");
    let out = add.wait_with_output().expect("dataviz user add ends");
    assert!(
        out.status.success(),
        "dataviz user add: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut all = stack.spawn(
        "all",
        &[
            ("APP_ADDR", &addr),
            (
                "MERCURE_PUBLISHER_JWT_KEY",
                "publisher-key-for-tests-0123456789",
            ),
            (
                "MERCURE_SUBSCRIBER_JWT_KEY",
                "subscriber-key-for-tests-0123456789",
            ),
        ],
    );
    common::wait_for_site(port).await;

    let driver = Driver::start(&chromedriver);
    let profile = tempfile::tempdir().expect("temp dir");
    let mut capabilities = fantoccini::wd::Capabilities::new();
    capabilities.insert(
        "goog:chromeOptions".to_owned(),
        serde_json::json!({
            "binary": chromium,
            "args": [
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--window-size=1280,1024",
                format!("--user-data-dir={}", profile.path().display()),
            ],
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let browser = ClientBuilder::new(connector)
        .capabilities(capabilities)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .unwrap_or_else(|e| panic!("starting {} through chromedriver: {e}", chromium.display()));

    let result = tokio::time::timeout(
        Duration::from_secs(180),
        scenario(&browser, &stack, &mut all, &format!("http://{addr}")),
    )
    .await
    .unwrap_or_else(|_| Err(anyhow::anyhow!("the scenario took more than 180 s")));
    if let Err(e) = &result {
        let path = std::env::temp_dir().join(format!(
            "dataviz-browser-{}.png",
            uuid::Uuid::now_v7().simple()
        ));
        let shot = match browser.screenshot().await {
            Ok(png) => match std::fs::write(&path, png) {
                Ok(()) => format!("screenshot: {}", path.display()),
                Err(w) => format!("screenshot not written to {}: {w}", path.display()),
            },
            Err(s) => format!("no screenshot: {s}"),
        };
        let url = browser
            .current_url()
            .await
            .map_or_else(|e| format!("unknown ({e})"), |u| u.to_string());
        eprintln!("browser test failed at {url}: {e:#}\n{shot}");
    }
    let _ = browser.close().await;
    drop(driver);
    if let Err(e) = result {
        panic!("{e:#}");
    }
}
