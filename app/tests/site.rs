//! The admin site in process: the real router (`tower::ServiceExt::oneshot`), a real migrated
//! PostgreSQL database and a real NATS with the pipeline's streams. Access control is checked
//! for every page route and every server function, as anonymous, non-admin and admin.

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response, StatusCode, header};
use bytes::Bytes;
use dataviz_app::{AppConfig, AppState, LiveConfig, api, pages};
use dataviz_core::message::{DeadLetter, RawMessage};
use dataviz_mercure::JwtKey;
use dataviz_testkit::{NatsServer, TestDb};
use http_body_util::BodyExt;
use std::time::{Duration, Instant};
use tower::ServiceExt;

const HOST: &str = "app.test";
const ORIGIN: &str = "http://app.test";
const ADMIN: &str = "admin@example.com";
const USER: &str = "user@example.com";
const PASSWORD: &str = "correct horse battery";

struct Site {
    router: Router,
    db: TestDb,
    js: async_nats::jetstream::Context,
    _nats: NatsServer,
    /// A gateway with one device, two tags and readings.
    gateway: i32,
    device: i64,
    /// A dead letter's sequence in DEAD.
    dead: u64,
}

impl Site {
    async fn start() -> Site {
        Site::start_with(AppConfig {
            login_delay: Duration::from_millis(1),
            login_max_delay: Duration::from_millis(5),
            ..AppConfig::default()
        })
        .await
    }

    async fn start_with(config: AppConfig) -> Site {
        let nats = NatsServer::start();
        let client = async_nats::connect(nats.url()).await.expect("NATS");
        let js = dataviz_core::config::jetstream(client.clone());
        dataviz_core::streams::ensure(&client, &js, &Default::default())
            .await
            .expect("streams");
        let db = TestDb::create().await;
        let mut admin = db.connect().await;
        dataviz_core::db::migrate(&mut admin)
            .await
            .expect("migrations");
        dataviz_app::users::create(&admin, ADMIN, PASSWORD, &["ROLE_ADMIN".to_owned()])
            .await
            .unwrap();
        dataviz_app::users::create(&admin, USER, PASSWORD, &[])
            .await
            .unwrap();
        admin
            .batch_execute(
                "INSERT INTO gateway (id, name) VALUES (7, 'Plant 7');
                 INSERT INTO device (gateway_id, code) VALUES (7, 'plc-1');
                 INSERT INTO tag (device_id, code, data_type)
                     SELECT id, 'AI.0', 'double precision' FROM device WHERE code = 'plc-1';
                 INSERT INTO tag (device_id, code, data_type)
                     SELECT id, 'DI.0', 'boolean' FROM device WHERE code = 'plc-1';
                 INSERT INTO tag_reading (time, device_id, tag_id, gateway_id, value_num, value_type)
                     SELECT now() - s * interval '1 minute', t.device_id, t.id, 7, s * 1.5, 'double precision'
                     FROM tag t, generate_series(1, 30) s WHERE t.code = 'AI.0';
                 INSERT INTO tag_reading (time, device_id, tag_id, gateway_id, value_bool, value_type)
                     SELECT now(), t.device_id, t.id, 7, true, 'boolean' FROM tag t WHERE t.code = 'DI.0';",
            )
            .await
            .unwrap();
        let device: i64 = admin
            .query_one("SELECT id FROM device WHERE code = 'plc-1'", &[])
            .await
            .unwrap()
            .get(0);
        let letter = DeadLetter {
            raw: RawMessage::received(
                "gateways/99/plc-9".into(),
                Bytes::from_static(b"{\"d\": []}"),
            ),
            stage: "processor".into(),
            reason: dataviz_core::message::DeadReason::UnknownGateway,
            error: "gateway 99 does not exist".into(),
            source_seq: None,
            whole_size: None,
        };
        let ack = js
            .publish_with_headers(
                letter.subject(),
                letter.headers(),
                letter.raw.payload.clone(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        let pool = dataviz_core::db::pool(db.url(), 4).unwrap();
        let live = LiveConfig {
            hub_url: format!("{ORIGIN}/.well-known/mercure"),
            topic_base: "https://dataviz.local".into(),
            subscriber_key: JwtKey::new("subscriber-key"),
            token_ttl: config.live_token_ttl,
            hub: None,
        };
        let state = AppState::new(pool, js.clone(), &config, Some(live));
        Site {
            router: dataviz_app::router(state),
            db,
            js,
            _nats: nats,
            gateway: 7,
            device,
            dead: ack.sequence,
        }
    }

    async fn send(&self, request: Request<Body>) -> Response<Body> {
        self.router.clone().oneshot(request).await.unwrap()
    }

    async fn get(&self, path: &str, cookie: Option<&str>) -> Response<Body> {
        let mut req = Request::get(path).header(header::HOST, HOST);
        if let Some(cookie) = cookie {
            req = req.header(header::COOKIE, cookie);
        }
        self.send(req.body(Body::empty()).unwrap()).await
    }

    /// A plain browser form post from the site's own page.
    async fn post(
        &self,
        path: &str,
        form: &[(&str, &str)],
        cookie: Option<&str>,
    ) -> Response<Body> {
        self.post_with(path, form, cookie, &[("origin", ORIGIN)])
            .await
    }

    async fn post_with(
        &self,
        path: &str,
        form: &[(&str, &str)],
        cookie: Option<&str>,
        extra: &[(&str, &str)],
    ) -> Response<Body> {
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let mut req = Request::post(path)
            .header(header::HOST, HOST)
            .header(header::ACCEPT, "text/html,application/xhtml+xml")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::REFERER, format!("{ORIGIN}/"));
        if let Some(cookie) = cookie {
            req = req.header(header::COOKIE, cookie);
        }
        let mut req = req.body(Body::from(body)).unwrap();
        for (k, v) in extra {
            let name = header::HeaderName::from_bytes(k.as_bytes()).unwrap();
            req.headers_mut().insert(name, v.parse().unwrap());
        }
        self.send(req).await
    }

    /// Logs in; the `name=value` of the session cookie.
    async fn login(&self, email: &str) -> String {
        let res = self
            .post(
                "/api/login",
                &[("email", email), ("password", PASSWORD), ("next", "/")],
                None,
            )
            .await;
        assert_eq!(location(&res), "/", "login of {email}");
        session_cookie(&res).expect("a session cookie")
    }

    async fn count(&self, sql: &str) -> i64 {
        self.db
            .connect()
            .await
            .query_one(sql, &[])
            .await
            .unwrap()
            .get(0)
    }

    fn route(&self, template: &str) -> String {
        template
            .replace("{gateway}", &self.gateway.to_string())
            .replace("{device}", &self.device.to_string())
            .replace("{dead}", &self.dead.to_string())
    }
}

fn location(res: &Response<Body>) -> String {
    res.headers()
        .get(header::LOCATION)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

fn set_cookies(res: &Response<Body>) -> Vec<String> {
    res.headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect()
}

fn session_cookie(res: &Response<Body>) -> Option<String> {
    set_cookies(res)
        .iter()
        .rev()
        .find(|c| c.starts_with("dataviz_session="))
        .map(|c| c.split(';').next().unwrap().to_owned())
}

async fn body(res: Response<Body>) -> String {
    String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

#[tokio::test]
async fn every_page_redirects_anonymous_forbids_non_admins_and_serves_admins() {
    let site = Site::start().await;
    let admin = site.login(ADMIN).await;
    let user = site.login(USER).await;
    for template in pages::ROUTES {
        let path = site.route(template);
        let res = site.get(&path, None).await;
        assert_eq!(res.status(), StatusCode::SEE_OTHER, "anonymous {path}");
        let to = location(&res);
        assert!(to.starts_with("/login"), "anonymous {path} → {to}");
        let res = site.get(&path, Some(&user)).await;
        assert_eq!(res.status(), StatusCode::FORBIDDEN, "non-admin {path}");
        let res = site.get(&path, Some(&admin)).await;
        assert_eq!(res.status(), StatusCode::OK, "admin {path}");
        let html = body(res).await;
        assert!(html.starts_with("<!DOCTYPE html>"), "{path}: {html}");
        assert!(html.contains(ADMIN), "{path} names the user");
    }
    // Unknown pages, the login page and the stylesheet.
    assert_eq!(
        site.get("/nowhere", None).await.status(),
        StatusCode::SEE_OTHER
    );
    assert_eq!(
        site.get("/nowhere", Some(&admin)).await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(site.get("/login", None).await.status(), StatusCode::OK);
    let css = site.get("/assets/app.css", None).await;
    assert_eq!(css.status(), StatusCode::OK);
    assert!(
        css.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/css")
    );
}

#[tokio::test]
async fn every_server_function_checks_the_admin_itself() {
    let site = Site::start().await;
    let admin = site.login(ADMIN).await;
    let user = site.login(USER).await;
    let dead = site.dead.to_string();
    let gw = site.gateway.to_string();
    // Each admin function, with arguments that would change something.
    let calls: Vec<(&str, Vec<(&str, &str)>)> = vec![
        (
            "/api/gateways/create",
            vec![("id", "500"), ("name", "New"), ("description", "")],
        ),
        (
            "/api/gateways/update",
            vec![
                ("id", gw.as_str()),
                ("name", "Renamed"),
                ("description", ""),
            ],
        ),
        ("/api/gateways/delete", vec![("id", "501")]),
        ("/api/dead-letters/requeue", vec![("seq", dead.as_str())]),
    ];
    site.db
        .connect()
        .await
        .execute(
            "INSERT INTO gateway (id, name) VALUES (501, 'to delete')",
            &[],
        )
        .await
        .unwrap();
    let state = || async {
        (
            site.count("SELECT count(*) FROM gateway").await,
            site.count("SELECT count(*) FROM gateway WHERE name = 'Renamed'")
                .await,
            site.js
                .get_stream("DEAD")
                .await
                .unwrap()
                .get_info()
                .await
                .unwrap()
                .state
                .messages,
        )
    };
    let before = state().await;
    for (path, form) in &calls {
        // Anonymous, as a browser: sent to the login page.
        let res = site.post(path, form, None).await;
        assert_eq!(res.status(), StatusCode::FOUND, "anonymous form {path}");
        assert_eq!(location(&res), "/login", "anonymous form {path}");
        // Anonymous, as a script: 401.
        let res = site
            .post_with(
                path,
                form,
                None,
                &[("origin", ORIGIN), ("accept", "application/json")],
            )
            .await;
        assert_eq!(
            res.status(),
            StatusCode::UNAUTHORIZED,
            "anonymous script {path}"
        );
        // Logged in, not an admin: 403.
        let res = site.post(path, form, Some(&user)).await;
        assert_eq!(res.status(), StatusCode::FORBIDDEN, "non-admin {path}");
        assert_eq!(
            state().await,
            before,
            "{path} changed something for a non-admin"
        );
    }
    let expected = [
        "/gateways?created=500",
        "/gateways?updated=7",
        "/gateways?deleted=501",
        "/dead-letters?requeued=",
    ];
    for ((path, form), to) in calls.iter().zip(expected) {
        let res = site.post(path, form, Some(&admin)).await;
        assert_eq!(res.status(), StatusCode::FOUND, "admin {path}");
        assert!(
            location(&res).starts_with(to),
            "admin {path} → {}",
            location(&res)
        );
    }
    let after = state().await;
    assert_eq!(
        after,
        (before.0, 1, before.2 - 1),
        "created 500, deleted 501, renamed, re-queued"
    );
    let raw = site
        .js
        .get_stream("RAW")
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap();
    assert_eq!(raw.state.messages, 1, "the dead letter went back to RAW");
    // Every server function was called above, or below (login, logout).
    for endpoint in api::ENDPOINTS {
        assert!(
            calls.iter().any(|(p, _)| p == endpoint)
                || ["/api/login", "/api/logout"].contains(endpoint),
            "{endpoint} not covered"
        );
    }
    // Logout needs no admin: anonymous, non-admin and admin all end at the login page.
    for cookie in [None, Some(user.as_str()), Some(admin.as_str())] {
        let res = site.post("/api/logout", &[], cookie).await;
        assert_eq!(location(&res), "/login");
    }
    assert_eq!(
        site.get("/", Some(&admin)).await.status(),
        StatusCode::SEE_OTHER,
        "logged out"
    );
}

#[tokio::test]
async fn login_sets_a_safe_cookie_and_logout_ends_the_session() {
    let site = Site::start().await;
    let res = site
        .post(
            "/api/login",
            &[
                ("email", ADMIN),
                ("password", "wrong"),
                ("next", "/devices"),
            ],
            None,
        )
        .await;
    assert_eq!(res.status(), StatusCode::FOUND);
    let to = location(&res);
    assert!(to.starts_with("/login?error=invalid"), "{to}");
    let page = body(site.get(&to, None).await).await;
    assert!(page.contains("Wrong email or password."), "{page}");

    let res = site
        .post(
            "/api/login",
            &[
                ("email", "ADMIN@example.com"),
                ("password", PASSWORD),
                ("next", "/devices?q=plc"),
            ],
            None,
        )
        .await;
    assert_eq!(
        location(&res),
        "/devices?q=plc",
        "back where the user was going"
    );
    let cookie = set_cookies(&res)
        .into_iter()
        .rev()
        .find(|c| c.starts_with("dataviz_session="))
        .expect("session cookie");
    for flag in ["HttpOnly", "SameSite=Lax", "Path=/"] {
        assert!(cookie.contains(flag), "{flag} missing: {cookie}");
    }
    assert!(!cookie.contains("Secure"), "plain http in tests: {cookie}");
    let session = cookie.split(';').next().unwrap().to_owned();
    assert_eq!(site.get("/", Some(&session)).await.status(), StatusCode::OK);
    // Another site's URL as `next` is ignored.
    let res = site
        .post(
            "/api/login",
            &[
                ("email", ADMIN),
                ("password", PASSWORD),
                ("next", "//evil.example/"),
            ],
            None,
        )
        .await;
    assert_eq!(location(&res), "/");

    let sessions = site.count("SELECT count(*) FROM app_session").await;
    let res = site.post("/api/logout", &[], Some(&session)).await;
    assert_eq!(location(&res), "/login");
    assert_eq!(
        site.count("SELECT count(*) FROM app_session").await,
        sessions - 1,
        "session deleted"
    );
    let res = site.get("/", Some(&session)).await;
    assert_eq!(
        res.status(),
        StatusCode::SEE_OTHER,
        "the old cookie no longer opens the site"
    );
}

/// Logging in always gives a new session id, even over a session that already had a user
/// (axum-login renews it only for a session without one): a session id planted in a browser
/// before the login is worth nothing after it, and the old id opens nothing.
#[tokio::test]
async fn every_login_renews_the_session_id() {
    let site = Site::start().await;
    let user = site.login(USER).await;
    let res = site
        .post(
            "/api/login",
            &[("email", ADMIN), ("password", PASSWORD), ("next", "/")],
            Some(&user),
        )
        .await;
    assert_eq!(location(&res), "/");
    let admin = session_cookie(&res).expect("a new session cookie at login");
    assert_ne!(admin, user, "the session id was kept across the login");
    assert_eq!(site.get("/", Some(&admin)).await.status(), StatusCode::OK);
    let old = site.get("/", Some(&user)).await;
    assert_eq!(
        old.status(),
        StatusCode::SEE_OTHER,
        "the id from before the login opens nothing"
    );
}

/// The attribute `name` of the `#live` element of a device page.
fn live_attribute(page: &str, name: &str) -> String {
    let live = page.split_once("id=\"live\"").expect("a #live element").1;
    let value = live
        .split_once(&format!("{name}=\""))
        .unwrap_or_else(|| panic!("no {name} in {live}"))
        .1;
    value.split_once('"').unwrap().0.replace("&amp;", "&")
}

/// A device page carries a token of its own, for its device's topic only (no cookie shared by
/// every page); the page renews it from its token URL with the admin session, and nothing
/// else gets one there. Every token of a session has the session's live id as `jti`; a new
/// login gives a new one.
#[tokio::test]
async fn live_tokens_are_per_page_renewed_with_the_session_only() {
    let site = Site::start().await;
    let admin = site.login(ADMIN).await;
    let key = JwtKey::new("subscriber-key");
    let res = site
        .get(&format!("/devices/{}", site.device), Some(&admin))
        .await;
    assert!(
        !set_cookies(&res)
            .iter()
            .any(|c| c.starts_with("mercureAuthorization")),
        "no shared subscriber cookie"
    );
    let page = body(res).await;
    let topic = format!("https://dataviz.local/gateways/7/devices/{}", site.device);
    assert_eq!(live_attribute(&page, "data-topic"), topic);
    let token = live_attribute(&page, "data-token");
    let claims = dataviz_mercure::jwt::verify(&token, &key).expect("a valid token");
    assert_eq!(claims.subscribe_selectors(), Some(&[topic.clone()][..]));
    let live_id = claims.jti.clone().expect("a jti");
    let ttl: u64 = live_attribute(&page, "data-ttl").parse().unwrap();
    assert_eq!(ttl, AppConfig::default().live_token_ttl.as_secs());

    let renew = live_attribute(&page, "data-token-url");
    assert_eq!(renew, format!("/devices/{}/live-token", site.device));
    let res = site.get(&renew, Some(&admin)).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()[header::CACHE_CONTROL], "no-store");
    let fresh: serde_json::Value = serde_json::from_str(&body(res).await).unwrap();
    assert_eq!(fresh["expires_in"], ttl);
    let claims = dataviz_mercure::jwt::verify(fresh["token"].as_str().unwrap(), &key).unwrap();
    assert_eq!(claims.subscribe_selectors(), Some(&[topic][..]));
    assert_eq!(
        claims.jti.as_deref(),
        Some(live_id.as_str()),
        "one live id per session"
    );

    // No token without the admin session.
    let anonymous = site.get(&renew, None).await;
    assert_eq!(anonymous.status(), StatusCode::SEE_OTHER);
    let user = site.login(USER).await;
    assert_eq!(
        site.get(&renew, Some(&user)).await.status(),
        StatusCode::FORBIDDEN
    );
    let missing = site.get("/devices/999999/live-token", Some(&admin)).await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);

    // Logged out: the old session renews nothing; a new login has a new live id.
    site.post("/api/logout", &[], Some(&admin)).await;
    assert_eq!(
        site.get(&renew, Some(&admin)).await.status(),
        StatusCode::SEE_OTHER
    );
    let again = site.login(ADMIN).await;
    let res = site.get(&renew, Some(&again)).await;
    let fresh: serde_json::Value = serde_json::from_str(&body(res).await).unwrap();
    let claims = dataviz_mercure::jwt::verify(fresh["token"].as_str().unwrap(), &key).unwrap();
    assert_ne!(claims.jti.as_deref(), Some(live_id.as_str()));
}

/// `next` after login, as an outsider would craft it: whatever it holds, the answer is a
/// redirect that a browser resolves to a page of this site, never another site, and never a
/// dropped connection. Browsers drop tabs and newlines from URLs and read `\` as `/`.
#[tokio::test]
async fn login_never_sends_a_browser_to_another_site() {
    let site = Site::start().await;
    let origin = url::Url::parse(ORIGIN).unwrap();
    for next in [
        "/\t/evil.example",
        "/\n/evil.example",
        "/\r\n/evil.example",
        "/\\evil.example",
        "/\t\\evil.example",
        "//evil.example",
        "/.//evil.example",
        "\t//evil.example",
        "https://evil.example/",
        "/%09/evil.example",
        "/devices\n\r",
    ] {
        for password in ["wrong", PASSWORD] {
            let res = site
                .post(
                    "/api/login",
                    &[("email", ADMIN), ("password", password), ("next", next)],
                    None,
                )
                .await;
            assert!(
                res.status().is_redirection(),
                "{next:?}: {} instead of a redirect",
                res.status()
            );
            let to = res
                .headers()
                .get(header::LOCATION)
                .expect("a Location header")
                .to_str()
                .expect("a printable Location");
            let resolved = origin.join(to).expect("a URL a browser can follow");
            assert_eq!(
                resolved.origin(),
                origin.origin(),
                "{next:?} (password {password:?}) sent the browser to {resolved}"
            );
            // The login form carries `next` on to the next attempt: never a foreign one.
            if password == "wrong" {
                let page = body(site.get(to, None).await).await;
                let kept = page
                    .split_once(r#"name="next" value=""#)
                    .and_then(|(_, rest)| rest.split_once('"'))
                    .map(|(value, _)| value.replace("&amp;", "&"))
                    .unwrap_or_default();
                if !kept.is_empty() {
                    let resolved = origin.join(&kept).expect("a URL");
                    assert_eq!(
                        resolved.origin(),
                        origin.origin(),
                        "{next:?}: kept {kept:?}"
                    );
                }
            }
        }
    }
}

#[tokio::test]
async fn failed_logins_are_slowed_down() {
    let site = Site::start_with(AppConfig {
        login_delay: Duration::from_millis(300),
        login_max_delay: Duration::from_secs(2),
        ..AppConfig::default()
    })
    .await;
    let attempt = |password: &'static str| {
        let site = &site;
        async move {
            let started = Instant::now();
            let res = site
                .post(
                    "/api/login",
                    &[("email", ADMIN), ("password", password)],
                    None,
                )
                .await;
            (started.elapsed(), location(&res))
        }
    };
    let (_, to) = attempt("wrong").await;
    assert!(to.starts_with("/login?error"), "{to}");
    let (second, _) = attempt("wrong").await;
    assert!(
        second >= Duration::from_millis(300),
        "second failure after {second:?}"
    );
    let (third, _) = attempt("wrong").await;
    assert!(
        third >= Duration::from_millis(600),
        "third failure after {third:?}"
    );
    // The right password still works, after the wait.
    let (_, to) = attempt(PASSWORD).await;
    assert_eq!(to, "/");
}

#[tokio::test]
async fn cross_site_posts_are_refused_before_anything_runs() {
    let site = Site::start().await;
    let admin = site.login(ADMIN).await;
    let form = [("id", "600"), ("name", "Forged"), ("description", "")];
    let forged: [&[(&str, &str)]; 4] = [
        &[("origin", "http://evil.example")],
        &[("origin", "null")],
        &[("sec-fetch-site", "cross-site"), ("origin", ORIGIN)],
        &[],
    ];
    for headers in forged {
        let mut req = Request::post("/api/gateways/create")
            .header(header::HOST, HOST)
            .header(header::COOKIE, &admin)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let res = site.send(req.body(Body::from(body)).unwrap()).await;
        assert_eq!(res.status(), StatusCode::FORBIDDEN, "{headers:?}");
    }
    // A forged login (login CSRF) is refused too.
    let res = site
        .post_with(
            "/api/login",
            &[("email", ADMIN), ("password", PASSWORD)],
            None,
            &[("origin", "http://evil.example")],
        )
        .await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        site.count("SELECT count(*) FROM gateway WHERE id = 600")
            .await,
        0
    );
    // The same post from the site itself goes through.
    let res = site.post("/api/gateways/create", &form, Some(&admin)).await;
    assert_eq!(location(&res), "/gateways?created=600");
}

#[tokio::test]
async fn gateways_are_created_edited_and_deleted_unless_devices_hang_on_them() {
    let site = Site::start().await;
    let admin = site.login(ADMIN).await;
    let cookie = Some(admin.as_str());

    // Validation errors come back next to their field, with what was typed.
    let res = site
        .post(
            "/api/gateways/create",
            &[("id", "abc"), ("name", " "), ("description", "kept")],
            cookie,
        )
        .await;
    let back = location(&res);
    assert!(back.starts_with("/gateways/new?"), "{back}");
    let res = site.get(&back, cookie).await;
    assert_eq!(res.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let page = body(res).await;
    assert!(page.contains("A name is required."), "{page}");
    assert!(page.contains("a whole number above 0"), "{page}");
    assert!(
        page.contains(">kept</textarea>"),
        "typed values kept: {page}"
    );

    // Created with the id its devices use; the next generated id follows it.
    let res = site
        .post(
            "/api/gateways/create",
            &[("id", "42"), ("name", "Plant 42"), ("description", "North")],
            cookie,
        )
        .await;
    assert_eq!(location(&res), "/gateways?created=42");
    let page = body(site.get("/gateways?created=42", cookie).await).await;
    assert!(
        page.contains("Gateway 42 created.") && page.contains("Plant 42"),
        "{page}"
    );
    let res = site
        .post(
            "/api/gateways/create",
            &[("id", ""), ("name", "Auto"), ("description", "")],
            cookie,
        )
        .await;
    assert_eq!(location(&res), "/gateways?created=43");
    // An id already taken.
    let res = site
        .post(
            "/api/gateways/create",
            &[("id", "42"), ("name", "Again"), ("description", "")],
            cookie,
        )
        .await;
    let page = body(site.get(&location(&res), cookie).await).await;
    assert!(page.contains("Gateway 42 already exists."), "{page}");

    // Edited.
    let page = body(site.get("/gateways/42/edit", cookie).await).await;
    assert!(page.contains("value=\"Plant 42\""), "{page}");
    let res = site
        .post(
            "/api/gateways/update",
            &[("id", "42"), ("name", "Plant 42b"), ("description", "")],
            cookie,
        )
        .await;
    assert_eq!(location(&res), "/gateways?updated=42");
    assert_eq!(
        site.count("SELECT count(*) FROM gateway WHERE name = 'Plant 42b'")
            .await,
        1
    );
    let res = site
        .post(
            "/api/gateways/update",
            &[("id", "42"), ("name", ""), ("description", "")],
            cookie,
        )
        .await;
    assert!(
        location(&res).starts_with("/gateways/42/edit?"),
        "{}",
        location(&res)
    );

    // Search by name or id.
    let page = body(site.get("/gateways?q=plant+42", cookie).await).await;
    assert!(
        page.contains("Plant 42b") && !page.contains("Auto"),
        "{page}"
    );

    // A gateway with devices: the confirmation page says why it cannot go, and so does the
    // server function if posted anyway.
    let page = body(site.get("/gateways/7/delete", cookie).await).await;
    assert!(
        page.contains("cannot be deleted: 1 device(s) still hang on it"),
        "{page}"
    );
    let res = site
        .post("/api/gateways/delete", &[("id", "7")], cookie)
        .await;
    assert_eq!(location(&res), "/gateways/7/delete?refused=1");
    let res = site.get("/gateways/7/delete?refused=1", cookie).await;
    assert_eq!(res.status(), StatusCode::CONFLICT);
    assert_eq!(
        site.count("SELECT count(*) FROM gateway WHERE id = 7")
            .await,
        1
    );

    // Without devices: confirmed, then deleted.
    let page = body(site.get("/gateways/42/delete", cookie).await).await;
    assert!(
        page.contains("This cannot be undone.") && page.contains("action=\"/api/gateways/delete\""),
        "{page}"
    );
    let res = site
        .post("/api/gateways/delete", &[("id", "42")], cookie)
        .await;
    assert_eq!(location(&res), "/gateways?deleted=42");
    assert_eq!(
        site.count("SELECT count(*) FROM gateway WHERE id = 42")
            .await,
        0
    );
    assert_eq!(
        site.get("/gateways/42/edit", cookie).await.status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn device_pages_list_search_and_show_tags_charts_and_live_values() {
    let site = Site::start().await;
    let admin = site.login(ADMIN).await;
    let cookie = Some(admin.as_str());
    site.db
        .connect()
        .await
        .batch_execute(
            "INSERT INTO gateway (id, name) VALUES (8, 'Plant 8');
             INSERT INTO device (gateway_id, code) SELECT 8, 'dev-' || lpad(n::text, 3, '0') FROM generate_series(1, 120) n;",
        )
        .await
        .unwrap();
    let page = body(site.get("/devices", cookie).await).await;
    assert!(page.contains("Page 1 of 3 · 121 in all"), "{page}");
    let page = body(site.get("/devices?q=DEV-11", cookie).await).await;
    assert!(
        page.contains("dev-110") && page.contains("dev-119") && !page.contains("dev-120"),
        "{page}"
    );
    assert!(page.contains("Page 1 of 1 · 10 in all"), "{page}");
    let page = body(site.get("/devices?page=3", cookie).await).await;
    assert!(
        page.contains("Page 3 of 3") && page.contains("dev-120"),
        "{page}"
    );
    let page = body(site.get("/devices/gateway/7", cookie).await).await;
    assert!(
        page.contains("plc-1") && page.contains("1 in all"),
        "{page}"
    );
    assert_eq!(
        site.get("/devices/gateway/999", cookie).await.status(),
        StatusCode::NOT_FOUND
    );

    let res = site.get(&format!("/devices/{}", site.device), cookie).await;
    assert_eq!(res.status(), StatusCode::OK);
    let page = body(res).await;
    assert!(page.contains("data-tag=\"AI.0\""), "{page}");
    assert!(
        page.contains("<td class=\"value\">1.5</td>"),
        "last AI.0 value: {page}"
    );
    assert!(
        page.contains("<td class=\"value\">true</td>"),
        "last DI.0 value: {page}"
    );
    assert_eq!(
        page.matches("<svg").count(),
        1,
        "one chart, for the numeric tag"
    );
    assert!(page.contains("<polyline"), "{page}");
    assert!(page.contains(&format!(
        "https://dataviz.local/gateways/7/devices/{}",
        site.device
    )));
    assert!(page.contains("new EventSource"));
    let page = body(
        site.get(&format!("/devices/{}?range=30d", site.device), cookie)
            .await,
    )
    .await;
    assert!(page.contains("class=\"current\">30 days"), "{page}");
}

#[tokio::test]
async fn home_shows_the_pipeline_and_dead_letters_can_be_read() {
    let site = Site::start().await;
    let admin = site.login(ADMIN).await;
    let cookie = Some(admin.as_str());
    let page = body(site.get("/", cookie).await).await;
    assert!(page.contains("href=\"/gateways\"") && page.contains("href=\"/devices\""));
    assert!(page.contains("Last message received"), "{page}");
    assert!(
        page.contains(
            "<dd id=\"dead-letters\"><a href=\"/dead-letters\"><span class=\"figure\">1</span>"
        ),
        "{page}"
    );
    assert!(
        page.contains("<dd id=\"raw-pending\"><span class=\"figure\">0</span>"),
        "{page}"
    );
    let page = body(site.get("/dead-letters", cookie).await).await;
    assert!(
        page.contains("processor/unknown_gateway") && page.contains("gateways/99/plc-9"),
        "{page}"
    );
    let page = body(
        site.get(&format!("/dead-letters/{}", site.dead), cookie)
            .await,
    )
    .await;
    assert!(page.contains("gateway 99 does not exist"), "{page}");
    assert!(
        page.contains("{&quot;d&quot;: []}") || page.contains("{\"d\": []}"),
        "{page}"
    );
    assert!(
        page.contains("action=\"/api/dead-letters/requeue\""),
        "{page}"
    );
    assert_eq!(
        site.get("/dead-letters/999", cookie).await.status(),
        StatusCode::NOT_FOUND
    );
}
