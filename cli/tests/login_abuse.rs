//! Login attempts as an outsider sends them, against `dataviz all` over HTTP: hundreds at once
//! (each password check is Argon2id, 19 MiB), and many at once on one account. The process
//! stays within a bounded memory, and an account gets one guess per delay however many
//! attempts run in parallel. Clients are told apart by X-Forwarded-For from a trusted proxy
//! (TRUSTED_PROXIES), as behind a reverse proxy.

mod common;

use common::{Stack, add_admin, http_request, spawn_logged};
use dataviz_testkit::free_port;
use std::time::{Duration, Instant};

const ADMIN: &str = "admin@example.com";

/// `dataviz all` on a port of its own, trusting 127.0.0.1 as a proxy, with `extra` settings.
async fn site(stack: &Stack, extra: &[(&str, &str)]) -> (common::LoggedRole, u16) {
    let port = free_port();
    let mut env = stack.env();
    env.push(("APP_ADDR".to_owned(), format!("127.0.0.1:{port}")));
    env.push(("TRUSTED_PROXIES".to_owned(), "127.0.0.1".to_owned()));
    let all = spawn_logged("all", &env, extra);
    common::wait_for_site(port).await;
    add_admin(&env, ADMIN, "the-admin-password-5e1c");
    (all, port)
}

/// One login attempt as if from `client` behind the proxy; where it was sent back to.
async fn attempt(port: u16, email: &str, password: &str, client: &str) -> String {
    let form = format!(
        "email={}&password={password}&next=%2F",
        email.replace('@', "%40")
    );
    let (status, head) = http_request(
        port,
        "POST",
        "/api/login",
        Some(&form),
        &[("X-Forwarded-For", client)],
    )
    .await;
    assert!(status == 302 || status == 303, "{head}");
    head.lines()
        .find_map(|l| {
            l.strip_prefix("location: ")
                .or_else(|| l.strip_prefix("Location: "))
        })
        .unwrap_or_default()
        .to_owned()
}

/// 300 attempts at once, each for an account of its own from an address of its own: each one
/// would otherwise run Argon2id (19 MiB) at the same time. The process's peak memory grows by
/// less than 150 MiB; the attempts past what it waits for are refused at once ("busy"), the
/// others checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_parallel_logins_are_bounded_in_memory() {
    let stack = Stack::start().await;
    let (all, port) = site(&stack, &[]).await;
    // Warm: one check done, so that the baseline holds one hash's memory.
    let first = attempt(port, ADMIN, "wrong", "192.0.2.1").await;
    assert!(first.contains("error=invalid"), "{first}");
    let before = all.peak_memory_kib();
    let answers = futures::future::join_all((0..300).map(|i| async move {
        let email = format!("user{i}@example.com");
        let client = format!("198.51.{}.{}", i / 200, i % 200 + 1);
        attempt(port, &email, "guess", &client).await
    }))
    .await;
    let grown = all.peak_memory_kib().saturating_sub(before);
    let busy = answers.iter().filter(|a| a.contains("error=busy")).count();
    let checked = answers
        .iter()
        .filter(|a| a.contains("error=invalid"))
        .count();
    eprintln!("300 attempts: {checked} checked, {busy} refused at once; peak memory +{grown} KiB");
    assert_eq!(busy + checked, 300, "{answers:?}");
    assert!(busy > 0, "none refused: the queue is unbounded");
    assert!(
        grown < 150 * 1024,
        "peak memory grew by {grown} KiB under 300 parallel logins"
    );
}

/// One account, one earlier failure, then ten attempts at once from ten addresses: they are
/// checked one delay apart, not all together after the same wait (one guess per delay), and the
/// right password still gets in afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_attempts_on_one_account_get_one_guess_per_delay() {
    let stack = Stack::start().await;
    let delay = Duration::from_millis(400);
    let (_all, port) = site(
        &stack,
        &[("LOGIN_DELAY", "400ms"), ("LOGIN_MAX_DELAY", "3s")],
    )
    .await;
    let first = attempt(port, ADMIN, "wrong", "192.0.2.1").await;
    assert!(first.contains("error=invalid"), "{first}");
    let started = Instant::now();
    let answers = futures::future::join_all((0..10).map(|i| async move {
        let answer = attempt(port, ADMIN, "guess", &format!("203.0.113.{}", i + 1)).await;
        (started.elapsed(), answer)
    }))
    .await;
    let mut checked: Vec<Duration> = answers
        .iter()
        .filter(|(_, a)| a.contains("error=invalid"))
        .map(|(at, _)| *at)
        .collect();
    checked.sort();
    eprintln!("checked at {checked:?}; answers {answers:?}");
    assert!(!checked.is_empty(), "{answers:?}");
    // One delay apart at the server; an answer also waits for its Argon2id check (tens of
    // milliseconds), hence the margin.
    for pair in checked.windows(2) {
        assert!(
            pair[1] - pair[0] >= delay / 2,
            "two guesses {:?} apart: {checked:?}",
            pair[1] - pair[0]
        );
    }
    // Once the queue has drained, the right password still opens the site.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let ok = attempt(port, ADMIN, "the-admin-password-5e1c", "192.0.2.50").await;
    assert_eq!(ok, "/", "the admin logs in");
}

/// An attacker keeps one account's queue full from many addresses; its owner, whose browser
/// logged in before (it carries the device cookie it got then), still gets in at once, while
/// the same attempt without the cookie is refused or queued behind the attacker's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_with_a_device_cookie_gets_in_while_the_account_is_attacked() {
    let stack = Stack::start().await;
    let password = "the-admin-password-5e1c";
    let (_all, port) = site(&stack, &[("LOGIN_DELAY", "1s"), ("LOGIN_MAX_DELAY", "8s")]).await;
    let form = |password: &str| format!("email=admin%40example.com&password={password}&next=%2F");
    let (_, head) = http_request(
        port,
        "POST",
        "/api/login",
        Some(&form(password)),
        &[("X-Forwarded-For", "192.0.2.50")],
    )
    .await;
    let device = common::set_cookie(&head, "dataviz_device")
        .unwrap_or_else(|| panic!("no device cookie at login: {head}"));

    // The attack: wrong passwords for the account from twenty addresses, all at once, while
    // the owner tries with and without the cookie.
    let attack = futures::future::join_all((0..20).map(|i| async move {
        attempt(port, ADMIN, "guess", &format!("203.0.113.{}", i + 1)).await
    }));
    let owner = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = Instant::now();
        let (_, head) = http_request(
            port,
            "POST",
            "/api/login",
            Some(&form(password)),
            &[("X-Forwarded-For", "192.0.2.50"), ("Cookie", &device)],
        )
        .await;
        let with_cookie = started.elapsed();
        let started = Instant::now();
        let without = attempt(port, ADMIN, password, "198.51.100.77").await;
        (head, with_cookie, without, started.elapsed())
    };
    let (answers, (head, with_cookie, without, waited)) = tokio::join!(attack, owner);
    eprintln!(
        "owner with the cookie answered in {with_cookie:?}; without it {without:?} in {waited:?}"
    );
    assert!(
        head.lines().any(|l| l.eq_ignore_ascii_case("location: /")),
        "the owner with the cookie did not get in: {head}"
    );
    assert!(with_cookie < Duration::from_secs(2), "{with_cookie:?}");
    assert!(
        without.contains("error=busy") || waited >= Duration::from_secs(3),
        "without the cookie the owner is in the attacked queue: {without} after {waited:?}"
    );
    assert!(
        answers.iter().any(|a| a.contains("error=busy")),
        "the attack filled the account's queue: {answers:?}"
    );
}
