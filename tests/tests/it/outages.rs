//! Ordinary outages answered right: a participant restarting rides out
//! under the default retry policy, every backend of a database terminated
//! (as after a PostgreSQL restart) costs at most a retryable UNAVAILABLE,
//! and the orchestrator's database going away makes PlaceOrder fail fast
//! with UNAVAILABLE instead of hanging.

use std::time::{Duration, Instant};

use harness::chaos::postgres::{Instance, PgTools};
use harness::{
    fault, place_request, spawn_orchestrator, spawn_participants, spawn_system_with, test_settings,
};
use participants::ServeOptions;
use proto::inventory::v1::GetStockRequest;
use proto::saga::v1::{GetOrderStatusRequest, OrderStatus};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_default_retries_a_participant_away_for_seconds_fails_no_order() {
    let system = spawn_system_with(|settings| {
        settings.executor.policy = orchestrator::config::default_policy();
        settings.executor.backoff_base = orchestrator::config::DEFAULT_BACKOFF_BASE;
        settings.executor.backoff_cap = orchestrator::config::DEFAULT_BACKOFF_CAP;
    })
    .await
    .expect("system");
    system.seed_product("widget", 250, 10).await.unwrap();
    system.seed_account("alice", 10_000).await.unwrap();
    // Payment is away: every Charge answers UNAVAILABLE, as a restarting
    // server's refused connections do.
    system
        .fault(
            "payment",
            fault("Charge", "FAIL_BEFORE", Code::Unavailable, 0),
        )
        .await
        .unwrap();
    let order = system.place("alice", &[("widget", 2)]).await.unwrap();
    // The outage: longer than the old defaults' 1.5 s of waits at most.
    tokio::time::sleep(Duration::from_secs(4)).await;
    system.clear_faults().await.unwrap();
    let settled = system
        .wait_settled(&order, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        settled.status(),
        OrderStatus::Completed,
        "{:?}",
        settled.failure_reason
    );
    system.audit().await.unwrap();
}

/// Terminates every connection to database `name` but this one.
async fn terminate_backends(name: &str) -> i64 {
    let admin = sqlx::PgPool::connect(&harness::server_url())
        .await
        .expect("admin connection");
    let terminated: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = $1 AND pid <> pg_backend_pid()) t",
    )
    .bind(name)
    .fetch_one(&admin)
    .await
    .expect("terminating backends");
    admin.close().await;
    terminated
}

/// A burst of calls on both databases at once: stock reads on the
/// inventory, orders placed and read on the orchestrator. Returns each
/// call's code.
async fn burst(system: &harness::System, orders: &mut Vec<String>) -> Vec<(String, Code)> {
    let mut calls = Vec::new();
    for _ in 0..6 {
        let mut inventory = system.participants.inventory.inventory();
        calls.push(tokio::spawn(async move {
            let reply = inventory
                .get_stock(GetStockRequest {
                    product_id: "widget".into(),
                })
                .await;
            ("GetStock".to_owned(), reply.map(|_| String::new()))
        }));
        let mut orders = system.orders();
        calls.push(tokio::spawn(async move {
            let reply = orders
                .place_order(place_request("alice", &[("widget", 1)], ""))
                .await;
            (
                "PlaceOrder".to_owned(),
                reply.map(|r| r.into_inner().order_id),
            )
        }));
    }
    let mut codes = Vec::new();
    for call in calls {
        let (name, reply) = call.await.expect("call task");
        match reply {
            Ok(order_id) => {
                if !order_id.is_empty() {
                    orders.push(order_id);
                }
                codes.push((name, Code::Ok));
            }
            Err(status) => {
                assert_eq!(
                    status.code(),
                    Code::Unavailable,
                    "{name} after the backends were terminated: {status:?}"
                );
                codes.push((name, status.code()));
            }
        }
    }
    codes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_database_connections_cost_at_most_an_unavailable() {
    let system = spawn_system_with(|_| {}).await.expect("system");
    system.seed_product("widget", 100, 1_000).await.unwrap();
    system.seed_account("alice", 1_000_000).await.unwrap();
    let mut orders = Vec::new();
    // Warm both pools up to several connections each.
    let warm = burst(&system, &mut orders).await;
    assert!(warm.iter().all(|(_, code)| *code == Code::Ok), "{warm:?}");
    let databases = [
        system.participants.inventory.db().name().to_owned(),
        system.participants.payment.db().name().to_owned(),
        system.participants.fulfillment.db().name().to_owned(),
        system.database_url().rsplit('/').next().unwrap().to_owned(),
    ];

    // Every pooled connection dies while idle, as in a restart: a moment
    // later, calls find no stale connection.
    for name in &databases {
        assert!(terminate_backends(name).await > 0, "{name} had connections");
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = burst(&system, &mut orders).await;
    assert!(
        later.iter().all(|(_, code)| *code == Code::Ok),
        "a moment after the connections were cut: {later:?}"
    );

    // Cut again and call at once: UNAVAILABLE at worst (checked in
    // `burst`), never INTERNAL or ABORTED; then calls succeed again.
    for name in &databases {
        terminate_backends(name).await;
    }
    burst(&system, &mut orders).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = burst(&system, &mut orders).await;
    assert!(after.iter().all(|(_, code)| *code == Code::Ok), "{after:?}");
    for order in &orders {
        let settled = system
            .wait_settled(order, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(settled.status(), OrderStatus::Completed, "{order}");
    }
    system.audit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placing_an_order_fails_fast_while_the_database_is_away() {
    let tools = PgTools::find().expect("PostgreSQL server programs");
    let mut database = Instance::create(&tools, false).expect("a PostgreSQL of our own");
    database
        .wait_ready("postgres", Duration::from_secs(60))
        .await
        .expect("it starts");
    let participants = spawn_participants(ServeOptions::default())
        .await
        .expect("participants");
    let orchestrator = spawn_orchestrator(&database.url("postgres"), test_settings(&participants))
        .await
        .expect("orchestrator");
    let order = orchestrator
        .orders()
        .place_order(place_request("alice", &[("widget", 1)], ""))
        .await
        .expect("an order while the database is up")
        .into_inner()
        .order_id;

    database.crash().expect("stopping its database");
    // Clients with a deadline of 8 s: the answer must come before it, and
    // say why. Many at once, so that a queue of waiting writes shows.
    let started = Instant::now();
    let calls: Vec<_> = (0..16)
        .map(|i| {
            let mut orders = orchestrator.orders();
            tokio::spawn(async move {
                let mut request =
                    tonic::Request::new(place_request(&format!("c{i}"), &[("widget", 1)], ""));
                request.set_timeout(Duration::from_secs(8));
                orders.place_order(request).await
            })
        })
        .collect();
    for call in calls {
        let status = call.await.unwrap().expect_err("no database, no order");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains("try again"), "{status:?}");
    }
    let mut request = tonic::Request::new(GetOrderStatusRequest {
        order_id: order.clone(),
    });
    request.set_timeout(Duration::from_secs(8));
    let status = orchestrator
        .orders()
        .get_order_status(request)
        .await
        .expect_err("no database, no status");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    eprintln!("answered UNAVAILABLE after {:?}", started.elapsed());

    // Back: orders are taken again.
    database.start().expect("restarting its database");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let placed = orchestrator
            .orders()
            .place_order(place_request("alice", &[("widget", 1)], ""))
            .await;
        match placed {
            Ok(_) => break,
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                assert!(Instant::now() < deadline, "still {status:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    orchestrator.stop().await.expect("orchestrator stops");
}
