//! The web console (`/ui` on the orchestrator's HTTP port): its JSON over
//! raw HTTP, with the admin roles and every refusal, and the page itself in
//! a real headless Chromium (`tests/browser/console.mjs`, playwright-core).

use std::path::PathBuf;
use std::time::Duration;

use harness::{System, spawn_system_with};
use harness::{http_raw, wait_http};
use orchestrator::auth::AdminTokens;
use proto::saga::v1::OrderStatus;
use serde_json::Value;

const OPERATOR: &str = "console-operator-token";
const READER: &str = "console-reader-token";
const SETTLE: Duration = Duration::from_secs(30);

/// A system whose orchestrator has both tokens and gives up on a failing
/// compensation after two attempts, with three settled orders: one
/// COMPLETED (alice, widget), one compensated (bob cannot pay for the
/// gadget: FAILED), one NEEDS_ATTENTION (carol's gizmo: payment refuses and
/// the release keeps failing; the faults are cleared afterwards, so a retry
/// finishes it).
async fn three_orders() -> (System, [String; 3]) {
    let system = spawn_system_with(|s| {
        s.admin = AdminTokens::new(Some(OPERATOR), Some(READER));
        s.executor.policy.compensation_attempts = 2;
    })
    .await
    .unwrap();
    system.seed_product("widget", 250, 100).await.unwrap();
    system.seed_product("gadget", 1299, 100).await.unwrap();
    system.seed_product("gizmo", 4999, 100).await.unwrap();
    system.seed_account("alice", 100_000).await.unwrap();
    system.seed_account("bob", 500).await.unwrap();
    system.seed_account("carol", 100_000).await.unwrap();

    let completed = system.place("alice", &[("widget", 2)]).await.unwrap();
    let compensated = system.place("bob", &[("gadget", 1)]).await.unwrap();
    for (id, want) in [
        (&completed, OrderStatus::Completed),
        (&compensated, OrderStatus::Failed),
    ] {
        assert_eq!(
            system.wait_settled(id, SETTLE).await.unwrap().status(),
            want
        );
    }
    system.fail_compensations().await.unwrap();
    let stuck = system.place("carol", &[("gizmo", 1)]).await.unwrap();
    assert_eq!(
        system.wait_settled(&stuck, SETTLE).await.unwrap().status(),
        OrderStatus::NeedsAttention
    );
    system.clear_faults().await.unwrap();
    (system, [completed, compensated, stuck])
}

fn http(system: &System) -> std::net::SocketAddr {
    system
        .orchestrator
        .as_ref()
        .expect("the orchestrator runs")
        .http_address()
}

/// One request to the console: method, path, bearer token, extra header
/// lines and body; the code and the body parsed as JSON (Null if not).
async fn call(
    system: &System,
    method: &str,
    path: &str,
    token: Option<&str>,
    extra: &str,
    body: &str,
) -> (u16, Value, String) {
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: {}\r\n", http(system));
    if let Some(token) = token {
        head.push_str(&format!("authorization: Bearer {token}\r\n"));
    }
    head.push_str(extra);
    if !body.is_empty() || method == "POST" {
        head.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    let (code, answer) = http_raw(http(system), &format!("{head}\r\n{body}")).await;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    (
        code,
        serde_json::from_str(body).unwrap_or(Value::Null),
        head.to_owned(),
    )
}

/// `GET path` with `token`: the code and the JSON.
async fn get(system: &System, path: &str, token: &str) -> (u16, Value) {
    let (code, body, _) = call(system, "GET", path, Some(token), "", "").await;
    (code, body)
}

const JSON: &str = "content-type: application/json\r\n";

fn ids_of(page: &Value) -> Vec<String> {
    page["sagas"]
        .as_array()
        .unwrap_or_else(|| panic!("not a page: {page}"))
        .iter()
        .map(|s| s["saga_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn the_console_json_answers_as_admin_service_does_with_its_roles_and_refuses_what_it_cannot_take()
 {
    let (system, [completed, compensated, stuck]) = three_orders().await;
    let all = |ids: &[String]| {
        let mut ids = ids.to_vec();
        ids.sort();
        ids
    };

    // The page and its assets, with a policy that loads nothing else.
    let (code, _, head) = call(&system, "GET", "/ui", None, "", "").await;
    assert_eq!(code, 200, "{head}");
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(
        head.contains("content-security-policy: default-src 'self'"),
        "{head}"
    );
    let (_, page) = http_raw(http(&system), "GET /ui HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(page.contains("/ui/app.js") && page.contains("id=\"timeline\""));
    let (code, _, head) = call(&system, "GET", "/ui/app.js", None, "", "").await;
    assert_eq!(code, 200);
    assert!(head.contains("text/javascript"), "{head}");
    // The probes are still there, and unknown paths are 404.
    wait_http(http(&system), "/healthz", SETTLE, |code, _| code == 200)
        .await
        .unwrap();
    let (code, _, _) = call(&system, "GET", "/nothing-here", None, "", "").await;
    assert_eq!(code, 404);

    // Reads need a token, as AdminService does; the read-only one reads.
    let (code, body, _) = call(&system, "GET", "/ui/api/sagas", None, "", "").await;
    assert_eq!(
        (code, &body["error"]["status"]),
        (401, &"UNAUTHENTICATED".into())
    );
    let (code, body, _) = call(&system, "GET", "/ui/api/sagas", Some("wrong"), "", "").await;
    assert_eq!(
        (code, &body["error"]["status"]),
        (401, &"UNAUTHENTICATED".into())
    );
    let (code, body, head) = call(&system, "GET", "/ui/api/sagas", Some(READER), "", "").await;
    assert_eq!(code, 200, "{head}{body}");
    assert!(head.contains("cache-control: no-store"), "{head}");
    assert_eq!(
        all(&ids_of(&body)),
        all(&[completed.clone(), compensated.clone(), stuck.clone()])
    );

    // Each filter alone, and paging.
    for (query, want) in [
        ("customer_id=alice", vec![completed.clone()]),
        ("product_id=gizmo", vec![stuck.clone()]),
        ("status=FAILED", vec![compensated.clone()]),
        ("status=NEEDS_ATTENTION", vec![stuck.clone()]),
        ("stuck=true", vec![stuck.clone()]),
        ("customer_id=bob&product_id=widget", vec![]),
    ] {
        let (code, body) = get(&system, &format!("/ui/api/sagas?{query}"), READER).await;
        assert_eq!(code, 200, "{query}: {body}");
        assert_eq!(ids_of(&body), want, "{query}");
    }
    let (_, stuck_page) = get(&system, "/ui/api/sagas?stuck=true", READER).await;
    assert!(
        !stuck_page["sagas"][0]["stuck_reason"]
            .as_str()
            .unwrap()
            .is_empty(),
        "the stuck view says why: {stuck_page}"
    );
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let (code, body) = get(
            &system,
            &format!("/ui/api/sagas?page_size=1&page_token={token}"),
            READER,
        )
        .await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(ids_of(&body).len(), 1, "{body}");
        seen.extend(ids_of(&body));
        token = body["next_page_token"].as_str().unwrap().to_owned();
        if token.is_empty() {
            break;
        }
        assert!(seen.len() < 3, "more pages than sagas: {seen:?}");
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(
        seen.windows(2).all(|w| w[0] > w[1]),
        "newest first: {seen:?}"
    );
    for (query, field) in [
        ("status=BOGUS", "status"),
        ("page_size=many", "page_size"),
        ("page_size=5000", "page size"),
        ("stuck=maybe", "stuck"),
        ("page_token=zzz", "page_token"),
    ] {
        let (code, body) = get(&system, &format!("/ui/api/sagas?{query}"), READER).await;
        assert_eq!(code, 400, "{query}: {body}");
        assert_eq!(body["error"]["status"], "INVALID_ARGUMENT", "{query}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(field),
            "{query}: {body}"
        );
    }

    // One saga: its journal as the timeline draws it.
    let (code, saga) = get(&system, &format!("/ui/api/sagas/{compensated}"), READER).await;
    assert_eq!(code, 200, "{saga}");
    assert_eq!(saga["saga"]["status"], "FAILED");
    assert_eq!(saga["saga"]["customer_id"], "bob");
    let journal: Vec<(String, String, String, String)> = saga["journal"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert!(e["started_at_ms"].as_i64().unwrap() > 0, "{e}");
            assert!(
                e["finished_at_ms"].as_i64().unwrap() >= e["started_at_ms"].as_i64().unwrap(),
                "{e}"
            );
            let field = |name: &str| e[name].as_str().unwrap().to_owned();
            (
                field("step"),
                field("kind"),
                field("outcome"),
                field("code"),
            )
        })
        .collect();
    let expected = [
        ("reserve_inventory", "ACTION", "SUCCEEDED", "OK"),
        (
            "charge_payment",
            "ACTION",
            "REJECTED",
            "FAILED_PRECONDITION",
        ),
        // Every attempted step is compensated, the rejected one too (its
        // refund is tombstone-safe), newest first.
        ("charge_payment", "COMPENSATION", "SUCCEEDED", "OK"),
        ("reserve_inventory", "COMPENSATION", "SUCCEEDED", "OK"),
    ];
    assert_eq!(
        journal,
        expected.map(|(a, b, c, d)| (a.into(), b.into(), c.into(), d.into())),
        "{saga}"
    );
    let (code, body) = get(&system, "/ui/api/sagas/ord_nothing", READER).await;
    assert_eq!((code, &body["error"]["status"]), (404, &"NOT_FOUND".into()));
    let (code, _) = get(
        &system,
        &format!("/ui/api/sagas/{}", "x".repeat(300)),
        READER,
    )
    .await;
    assert_eq!(code, 400);
    let (code, stats) = get(&system, "/ui/api/stats", READER).await;
    assert_eq!(code, 200, "{stats}");
    assert_eq!(stats["counts"]["NEEDS_ATTENTION"], 1, "{stats}");

    // What changes a saga: the operator token, JSON, this host only; and
    // every refusal writes nothing.
    let rows = system.journal_rows(&stuck).await.unwrap();
    let retry = format!("/ui/api/sagas/{stuck}/retry");
    let body = r#"{"operator": "ops", "reason": "release fixed"}"#;
    let refusals: [(&str, Option<&str>, String, &str, u16); 6] = [
        ("read-only token", Some(READER), JSON.to_owned(), body, 403),
        ("no token", None, JSON.to_owned(), body, 401),
        (
            "not JSON",
            Some(OPERATOR),
            "content-type: text/plain\r\n".to_owned(),
            body,
            415,
        ),
        (
            "malformed JSON",
            Some(OPERATOR),
            JSON.to_owned(),
            "{\"reason\": ",
            400,
        ),
        (
            "another site's page",
            Some(OPERATOR),
            format!("{JSON}origin: http://evil.example\r\n"),
            body,
            403,
        ),
        (
            "no abort reason",
            Some(OPERATOR),
            JSON.to_owned(),
            "{}",
            400,
        ),
    ];
    for (what, token, extra, body, want) in refusals {
        let path = if what == "no abort reason" {
            format!("/ui/api/sagas/{stuck}/abort")
        } else {
            retry.clone()
        };
        let (code, answer, _) = call(&system, "POST", &path, token, &extra, body).await;
        assert_eq!(code, want, "{what}: {answer}");
        assert!(answer["error"]["message"].is_string(), "{what}: {answer}");
    }
    // Bodies the port does not take: too large, or chunked.
    let (code, _) = http_raw(
        http(&system),
        &format!(
            "POST {retry} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {OPERATOR}\r\n{JSON}content-length: {}\r\n\r\n",
            common::limits::MAX_HTTP_BODY_BYTES + 1
        ),
    )
    .await;
    assert_eq!(code, 413);
    let (code, _) = http_raw(
        http(&system),
        &format!(
            "POST {retry} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {OPERATOR}\r\n{JSON}transfer-encoding: chunked\r\n\r\n0\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(code, 411);
    assert_eq!(system.journal_rows(&stuck).await.unwrap(), rows);
    assert_eq!(
        system.status(&stuck).await.unwrap().status(),
        OrderStatus::NeedsAttention
    );

    // The operator's retry, from this host's page: the saga finishes, and
    // the journal says who and why.
    let (code, reply, _) = call(
        &system,
        "POST",
        &retry,
        Some(OPERATOR),
        &format!("{JSON}origin: http://{}\r\n", http(&system)),
        body,
    )
    .await;
    assert_eq!(code, 200, "{reply}");
    assert!(
        reply["message"].as_str().unwrap().contains("retry"),
        "{reply}"
    );
    assert_eq!(
        system.wait_settled(&stuck, SETTLE).await.unwrap().status(),
        OrderStatus::Failed
    );
    let (_, saga) = get(&system, &format!("/ui/api/sagas/{stuck}"), OPERATOR).await;
    let control: Vec<&Value> = saga["journal"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "CONTROL")
        .collect();
    assert_eq!(control.len(), 1, "{saga}");
    assert_eq!(control[0]["step"], "retry");
    assert_eq!(control[0]["actor"], "operator ops (console)");
    assert!(
        control[0]["detail"]
            .as_str()
            .unwrap()
            .contains("release fixed"),
        "{saga}"
    );
    assert_eq!(system.stock("gizmo").await.unwrap().0, 100, "released");
}

/// Node, playwright-core (`npm ci` in `tests/browser`) and Chromium, or
/// why not.
fn browser() -> Result<(PathBuf, PathBuf), String> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("browser");
    if !dir.join("node_modules/playwright-core").is_dir() {
        return Err(format!(
            "playwright-core is not installed (npm ci --prefix {})",
            dir.display()
        ));
    }
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/usr/bin/chromium".into());
    if !chromium.is_file() {
        return Err(format!(
            "no browser at {} (apt-get install -y chromium, or set CHROMIUM)",
            chromium.display()
        ));
    }
    let node = std::process::Command::new("node").arg("--version").output();
    if !node.is_ok_and(|o| o.status.success()) {
        return Err("node is not on PATH".into());
    }
    Ok((dir, chromium))
}

#[tokio::test]
async fn in_a_real_browser_the_console_finds_each_saga_draws_its_timeline_and_retries_a_stuck_one()
{
    let (dir, chromium) = match browser() {
        Ok(found) => found,
        Err(missing) if std::env::var_os("CI_REQUIRE_BROWSER").is_some() => {
            panic!("CI_REQUIRE_BROWSER is set and {missing}")
        }
        Err(missing) => {
            eprintln!("skipped: {missing}; .ci/run installs it");
            return;
        }
    };
    let (system, [completed, compensated, stuck]) = three_orders().await;
    let screenshots =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/console-screenshots");
    std::fs::create_dir_all(&screenshots).unwrap();
    for old in [
        "console-timeline.png",
        "console-retried.png",
        "console-list.png",
    ] {
        let _ = std::fs::remove_file(screenshots.join(old));
    }

    let run = tokio::process::Command::new("node")
        .arg(dir.join("console.mjs"))
        .env("CONSOLE_URL", format!("http://{}/ui", http(&system)))
        .env("CONSOLE_TOKEN", OPERATOR)
        .env("COMPLETED", &completed)
        .env("COMPENSATED", &compensated)
        .env("STUCK", &stuck)
        .env("STUCK_PRODUCT", "gizmo")
        .env("SCREENSHOT_DIR", &screenshots)
        .env("CHROMIUM", &chromium)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the browser run ended within 2 minutes")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the browser checks failed:\n{stdout}\n{stderr}"
    );
    // What the page did, seen from the databases: the retry the button
    // sent finished the saga and released its stock.
    assert_eq!(
        system.wait_settled(&stuck, SETTLE).await.unwrap().status(),
        OrderStatus::Failed
    );
    assert_eq!(system.stock("gizmo").await.unwrap().0, 100);
    let (_, saga) = get(&system, &format!("/ui/api/sagas/{stuck}"), READER).await;
    assert!(
        saga["journal"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["step"] == "retry" && e["actor"] == "operator tester (console)"),
        "{saga}"
    );
    for shot in [
        "console-timeline.png",
        "console-retried.png",
        "console-list.png",
    ] {
        let bytes = std::fs::read(screenshots.join(shot)).unwrap();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "{shot} is a PNG");
    }
    println!("{stdout}");
}
