//! Bad input is refused at the edge with INVALID_ARGUMENT, never INTERNAL,
//! writes nothing, and the same request with the input fixed then applies.

use harness::{delay, expect_code, place_request, spawn_system};
use proto::saga::v1::{
    AbortSagaRequest, CancelOrderRequest, ListOrdersRequest, ListSagasRequest, OrderStatus,
};
use tonic::Code;

const SETTLE: std::time::Duration = std::time::Duration::from_secs(20);

#[tokio::test]
async fn nul_bytes_and_bidi_controls_are_invalid_and_the_fixed_request_applies() {
    let system = spawn_system().await.unwrap();
    system.seed_product("widget", 100, 10).await.unwrap();
    system.seed_account("alice", 5_000).await.unwrap();
    let mut orders = system.orders();
    let mut admin = system.admin();

    for (customer, key) in [
        ("alice", "key\u{0}1"),
        ("alice", "key\u{202E}1"),
        ("al\u{202E}ice", "k"),
        ("alice\u{200B}", "k"),
    ] {
        let message = expect_code(
            orders
                .place_order(place_request(customer, &[("widget", 1)], key))
                .await,
            Code::InvalidArgument,
        );
        assert!(message.contains("character"), "{message}");
    }
    assert_eq!(system.saga_count().await.unwrap(), 0, "nothing written");

    system
        .fault("inventory", delay("Reserve", 1_500))
        .await
        .unwrap();
    let cancelled = system.place("alice", &[("widget", 1)]).await.unwrap();
    let cancel = |reason: &str| CancelOrderRequest {
        order_id: cancelled.clone(),
        reason: reason.into(),
    };
    expect_code(
        orders.cancel_order(cancel("no\u{0}thanks")).await,
        Code::InvalidArgument,
    );
    let reply = orders.cancel_order(cancel("no thanks")).await.unwrap();
    assert_eq!(reply.into_inner().status(), OrderStatus::Cancelling);

    let aborted = system.place("alice", &[("widget", 1)]).await.unwrap();
    let abort = |reason: &str| AbortSagaRequest {
        saga_id: aborted.clone(),
        reason: reason.into(),
        operator: "ops".into(),
    };
    expect_code(
        admin.abort_saga(abort("stop\u{0}it")).await,
        Code::InvalidArgument,
    );
    expect_code(
        admin.abort_saga(abort("stop \u{202E}ti")).await,
        Code::InvalidArgument,
    );
    admin.abort_saga(abort("stop it")).await.unwrap();

    system.clear_faults().await.unwrap();
    let order = system.wait_settled(&cancelled, SETTLE).await.unwrap();
    assert_eq!(order.status(), OrderStatus::Cancelled);
    let order = system.wait_settled(&aborted, SETTLE).await.unwrap();
    assert_eq!(order.status(), OrderStatus::Failed);
    assert!(
        order.failure_reason.contains("stop it"),
        "{}",
        order.failure_reason
    );
}

#[tokio::test]
async fn garbage_page_tokens_and_bad_durations_are_invalid() {
    let system = spawn_system().await.unwrap();
    let mut orders = system.orders();
    let mut admin = system.admin();
    for token in ["zzz", "ord_xyz", "ord_01a2337a62bc0001f31c94253c45283"] {
        expect_code(
            orders
                .list_orders(ListOrdersRequest {
                    page_token: token.into(),
                    ..Default::default()
                })
                .await,
            Code::InvalidArgument,
        );
        expect_code(
            admin
                .list_sagas(ListSagasRequest {
                    page_token: token.into(),
                    ..Default::default()
                })
                .await,
            Code::InvalidArgument,
        );
    }
    let bad = [
        prost_types::Duration {
            seconds: 1,
            nanos: -5,
        },
        prost_types::Duration {
            seconds: 1,
            nanos: 1_000_000_000,
        },
        prost_types::Duration {
            seconds: -1,
            nanos: 0,
        },
        prost_types::Duration {
            seconds: i64::MAX,
            nanos: 0,
        },
    ];
    for duration in bad {
        for request in [
            ListSagasRequest {
                older_than: Some(duration),
                ..Default::default()
            },
            ListSagasRequest {
                stuck_only: true,
                stuck_after: Some(duration),
                ..Default::default()
            },
        ] {
            let message = expect_code(admin.list_sagas(request).await, Code::InvalidArgument);
            assert!(
                message.contains("duration") || message.contains("limit"),
                "{message}"
            );
        }
    }
    // A real token and a sane duration still work.
    let page = admin
        .list_sagas(ListSagasRequest {
            older_than: Some(prost_types::Duration {
                seconds: 60,
                nanos: 500,
            }),
            page_token: "ord_01a2337a62bc0001f31c94253c45283b".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(page.into_inner().sagas.is_empty());
}
