//! Fault injection on participants: FAIL_BEFORE, FAIL_AFTER_COMMIT (the lost
//! reply), DELAY, count and percent budgets, and SetFault validation.

use std::time::{Duration, Instant};

use harness::{SpawnedParticipant, expect_code, join_all, spawn_participant};
use participants::{Participant, ServeOptions};
use proto::fault::v1::{
    ClearFaultsRequest, FaultMode, ListFaultsRequest, ListFaultsResponse, SetFaultRequest,
};
use proto::fulfillment::v1::{GetShipmentRequest, Item as ShipItem, ShipRequest};
use proto::google::rpc::Code as RpcCode;
use proto::inventory::v1::{GetStockRequest, Item, ReserveRequest, UpsertProductRequest};
use proto::payment::v1::{
    ChargeRequest, ChargeState, GetAccountRequest, GetChargeRequest, UpsertAccountRequest,
};
use tonic::{Code, Request};

async fn with_faults(participant: Participant) -> SpawnedParticipant {
    spawn_participant(
        participant,
        ServeOptions {
            fault_injection: true,
            ..ServeOptions::default()
        },
    )
    .await
    .expect("participant starts")
}

fn fault(rpc: &str, mode: FaultMode, code: RpcCode) -> SetFaultRequest {
    SetFaultRequest {
        rpc: rpc.into(),
        mode: mode.into(),
        code: code.into(),
        ..Default::default()
    }
}

async fn arm(svc: &SpawnedParticipant, request: SetFaultRequest) {
    svc.faults()
        .set_fault(request)
        .await
        .expect("fault is armed");
}

async fn list(svc: &SpawnedParticipant) -> ListFaultsResponse {
    svc.faults()
        .list_faults(ListFaultsRequest {})
        .await
        .expect("list faults")
        .into_inner()
}

async fn upsert_product(svc: &SpawnedParticipant, product_id: &str, stock: i64) {
    svc.inventory()
        .upsert_product(UpsertProductRequest {
            product_id: product_id.into(),
            name: format!("Product {product_id}"),
            price_cents: 100,
            stock,
        })
        .await
        .expect("upsert product");
}

fn reserve(saga_id: &str, product_id: &str, quantity: i32) -> ReserveRequest {
    ReserveRequest {
        saga_id: saga_id.into(),
        items: vec![Item {
            product_id: product_id.into(),
            quantity,
        }],
    }
}

fn get_stock(product_id: &str) -> GetStockRequest {
    GetStockRequest {
        product_id: product_id.into(),
    }
}

/// (stock, reserved) of a product.
async fn stock(svc: &SpawnedParticipant, product_id: &str) -> (i64, i64) {
    let s = svc
        .inventory()
        .get_stock(get_stock(product_id))
        .await
        .expect("get stock")
        .into_inner();
    (s.stock, s.reserved)
}

async fn count_rows(svc: &SpawnedParticipant, table: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
        .fetch_one(svc.pool())
        .await
        .unwrap()
}

async fn balance(svc: &SpawnedParticipant, customer_id: &str) -> i64 {
    svc.payment()
        .get_account(GetAccountRequest {
            customer_id: customer_id.into(),
        })
        .await
        .expect("get account")
        .into_inner()
        .balance_cents
}

#[tokio::test]
async fn without_fault_injection_the_control_service_is_not_served() {
    let svc = spawn_participant(Participant::Inventory, ServeOptions::default())
        .await
        .expect("inventory starts");
    expect_code(
        svc.faults()
            .set_fault(fault(
                "Reserve",
                FaultMode::FailBefore,
                RpcCode::Unavailable,
            ))
            .await,
        Code::Unimplemented,
    );
    expect_code(
        svc.faults().list_faults(ListFaultsRequest {}).await,
        Code::Unimplemented,
    );
    expect_code(
        svc.faults().clear_faults(ClearFaultsRequest {}).await,
        Code::Unimplemented,
    );
    // The participant itself still works.
    upsert_product(&svc, "apple", 3).await;
    assert_eq!(stock(&svc, "apple").await, (3, 0));
}

#[tokio::test]
async fn fail_before_with_a_count_fails_that_many_calls_and_writes_nothing() {
    let svc = with_faults(Participant::Inventory).await;
    upsert_product(&svc, "apple", 10).await;
    arm(
        &svc,
        SetFaultRequest {
            count: 2,
            ..fault("Reserve", FaultMode::FailBefore, RpcCode::Unavailable)
        },
    )
    .await;

    let message = expect_code(
        svc.inventory().reserve(reserve("saga-1", "apple", 1)).await,
        Code::Unavailable,
    );
    assert!(message.contains("injected"), "{message}");
    // Other RPCs are unaffected and do not use up the budget.
    assert_eq!(stock(&svc, "apple").await, (10, 0), "nothing written");
    let armed = list(&svc).await.faults;
    assert_eq!(armed.len(), 1, "{armed:?}");
    assert_eq!(armed[0].rpc, "Reserve");
    assert_eq!(armed[0].count, 1, "one call of the budget left");

    expect_code(
        svc.inventory().reserve(reserve("saga-1", "apple", 1)).await,
        Code::Unavailable,
    );
    assert_eq!(stock(&svc, "apple").await, (10, 0), "nothing written");
    assert_eq!(count_rows(&svc, "reservations").await, 0);
    assert!(list(&svc).await.faults.is_empty(), "the count is used up");

    svc.inventory()
        .reserve(reserve("saga-1", "apple", 1))
        .await
        .expect("the third call goes through");
    assert_eq!(stock(&svc, "apple").await, (9, 1));
    assert_eq!(count_rows(&svc, "reservations").await, 1);
}

#[tokio::test]
async fn fail_after_commit_on_charge_loses_the_reply_and_the_replay_does_not_debit_again() {
    let svc = with_faults(Participant::Payment).await;
    svc.payment()
        .upsert_account(UpsertAccountRequest {
            customer_id: "alice".into(),
            balance_cents: 1000,
        })
        .await
        .expect("upsert account");
    arm(
        &svc,
        SetFaultRequest {
            count: 1,
            ..fault("Charge", FaultMode::FailAfterCommit, RpcCode::Unavailable)
        },
    )
    .await;
    let charge = || ChargeRequest {
        saga_id: "saga-1".into(),
        customer_id: "alice".into(),
        amount_cents: 300,
    };

    let message = expect_code(svc.payment().charge(charge()).await, Code::Unavailable);
    assert!(message.contains("injected"), "{message}");
    // The work was committed although the caller saw a failure.
    assert_eq!(balance(&svc, "alice").await, 700);
    let record = svc
        .payment()
        .get_charge(GetChargeRequest {
            saga_id: "saga-1".into(),
        })
        .await
        .expect("the charge exists")
        .into_inner();
    assert_eq!(record.state(), ChargeState::Charged);
    assert_eq!(record.amount_cents, 300);
    assert!(!record.charge_id.is_empty());

    // The orchestrator's retry: same answer, no second debit.
    let replay = svc
        .payment()
        .charge(charge())
        .await
        .expect("the replay succeeds")
        .into_inner();
    assert_eq!(replay.charge_id, record.charge_id);
    assert_eq!(balance(&svc, "alice").await, 700, "debited once");
    assert_eq!(count_rows(&svc, "charges").await, 1);
}

#[tokio::test]
async fn fail_after_commit_does_not_mask_a_real_error() {
    let svc = with_faults(Participant::Inventory).await;
    upsert_product(&svc, "apple", 10).await;
    // No count: armed for every call.
    arm(
        &svc,
        fault(
            "Reserve",
            FaultMode::FailAfterCommit,
            RpcCode::ResourceExhausted,
        ),
    )
    .await;

    let message = expect_code(
        svc.inventory().reserve(reserve("saga-1", "ghost", 1)).await,
        Code::NotFound,
    );
    assert!(message.contains("ghost"), "{message}");
    assert_eq!(count_rows(&svc, "reservations").await, 0);

    // The fault is armed: a call that succeeds loses its reply.
    expect_code(
        svc.inventory().reserve(reserve("saga-2", "apple", 1)).await,
        Code::ResourceExhausted,
    );
    assert_eq!(stock(&svc, "apple").await, (9, 1), "but it was committed");
}

#[tokio::test]
async fn delay_makes_a_call_miss_its_deadline_until_cleared() {
    let svc = with_faults(Participant::Inventory).await;
    upsert_product(&svc, "apple", 10).await;
    arm(
        &svc,
        SetFaultRequest {
            latency_ms: 2000,
            ..fault("GetStock", FaultMode::Delay, RpcCode::Ok)
        },
    )
    .await;
    let with_deadline = || {
        let mut request = Request::new(get_stock("apple"));
        request.set_timeout(Duration::from_millis(200));
        request
    };

    // gRPC says DEADLINE_EXCEEDED; a tonic server whose grpc-timeout expires
    // answers CANCELLED "Timeout expired" instead (tonic's TimeoutExpired), so
    // callers must treat both as the deadline passing.
    match svc.inventory().get_stock(with_deadline()).await {
        Err(status) if status.code() == Code::DeadlineExceeded => {}
        Err(status) if status.code() == Code::Cancelled => {
            assert!(status.message().contains("Timeout"), "{status:?}");
        }
        other => panic!("expected the deadline to pass, got {other:?}"),
    }
    // Without a deadline the call waits out the latency, then succeeds.
    let started = Instant::now();
    svc.inventory()
        .get_stock(get_stock("apple"))
        .await
        .expect("a delayed call still succeeds");
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "the latency was added: {:?}",
        started.elapsed()
    );

    let cleared = svc
        .faults()
        .clear_faults(ClearFaultsRequest {})
        .await
        .expect("clear faults")
        .into_inner()
        .cleared;
    assert_eq!(cleared, 1);
    let reply = svc
        .inventory()
        .get_stock(with_deadline())
        .await
        .expect("no delay once cleared")
        .into_inner();
    assert_eq!(reply.stock, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percent_affects_only_a_share_of_calls() {
    let svc = with_faults(Participant::Inventory).await;
    upsert_product(&svc, "apple", 10).await;
    arm(
        &svc,
        SetFaultRequest {
            percent: 50,
            ..fault("GetStock", FaultMode::FailBefore, RpcCode::Unavailable)
        },
    )
    .await;

    let calls = (0..200).map(|_| {
        let mut client = svc.inventory();
        async move { client.get_stock(get_stock("apple")).await }
    });
    let replies = join_all(calls).await;
    let failed = replies
        .iter()
        .filter(|r| matches!(r, Err(s) if s.code() == Code::Unavailable))
        .count();
    let succeeded = replies
        .iter()
        .filter(|r| matches!(r, Ok(s) if s.get_ref().stock == 10))
        .count();
    // 100 expected; the bounds are many standard deviations wide.
    assert!((40..=160).contains(&failed), "{failed} of 200 failed");
    assert_eq!(failed + succeeded, 200, "every other call succeeds");
    assert_eq!(list(&svc).await.faults.len(), 1, "no count: still armed");
}

#[tokio::test]
async fn a_business_rejection_can_be_injected_on_ship() {
    let svc = with_faults(Participant::Fulfillment).await;
    arm(
        &svc,
        fault("ship", FaultMode::FailBefore, RpcCode::FailedPrecondition),
    )
    .await;
    let message = expect_code(
        svc.fulfillment()
            .ship(ShipRequest {
                saga_id: "saga-1".into(),
                items: vec![ShipItem {
                    product_id: "apple".into(),
                    quantity: 1,
                }],
            })
            .await,
        Code::FailedPrecondition,
    );
    assert!(message.contains("injected"), "{message}");
    expect_code(
        svc.fulfillment()
            .get_shipment(GetShipmentRequest {
                saga_id: "saga-1".into(),
            })
            .await,
        Code::NotFound,
    );
}

#[tokio::test]
async fn set_fault_rejects_bad_requests() {
    let svc = with_faults(Participant::Payment).await;
    let unavailable = |rpc: &str, mode| fault(rpc, mode, RpcCode::Unavailable);

    let message = expect_code(
        svc.faults()
            .set_fault(unavailable("Reserve", FaultMode::FailBefore))
            .await,
        Code::InvalidArgument,
    );
    for known in [
        "Charge",
        "Refund",
        "GetAccount",
        "UpsertAccount",
        "GetCharge",
    ] {
        assert!(message.contains(known), "lists {known}: {message}");
    }
    expect_code(
        svc.faults()
            .set_fault(unavailable(
                "/inventory.v1.InventoryService/Charge",
                FaultMode::FailBefore,
            ))
            .await,
        Code::InvalidArgument,
    );
    expect_code(
        svc.faults()
            .set_fault(unavailable("Charge", FaultMode::Unspecified))
            .await,
        Code::InvalidArgument,
    );
    expect_code(
        svc.faults()
            .set_fault(fault("Charge", FaultMode::FailBefore, RpcCode::Ok))
            .await,
        Code::InvalidArgument,
    );
    expect_code(
        svc.faults()
            .set_fault(fault("Charge", FaultMode::FailAfterCommit, RpcCode::Ok))
            .await,
        Code::InvalidArgument,
    );
    expect_code(
        svc.faults()
            .set_fault(SetFaultRequest {
                percent: 101,
                ..unavailable("Charge", FaultMode::FailBefore)
            })
            .await,
        Code::InvalidArgument,
    );
    expect_code(
        svc.faults()
            .set_fault(fault("Charge", FaultMode::Delay, RpcCode::Ok))
            .await,
        Code::InvalidArgument,
    );
    assert!(
        list(&svc).await.faults.is_empty(),
        "nothing armed by a rejected request"
    );

    // Names are case-insensitive and may be full method paths.
    for (rpc, canonical) in [
        ("charge", "Charge"),
        ("GETACCOUNT", "GetAccount"),
        ("/payment.v1.PaymentService/Refund", "Refund"),
        ("payment.v1.PaymentService/GetCharge", "GetCharge"),
    ] {
        let armed = svc
            .faults()
            .set_fault(unavailable(rpc, FaultMode::FailBefore))
            .await
            .unwrap_or_else(|s| panic!("{rpc}: {s:?}"))
            .into_inner()
            .fault
            .expect("the armed fault");
        assert_eq!(armed.rpc, canonical);
    }
    let armed: Vec<String> = list(&svc).await.faults.into_iter().map(|f| f.rpc).collect();
    assert_eq!(armed.len(), 4, "{armed:?}");
}

#[tokio::test]
async fn full_path_names_arm_the_fault_on_that_rpc() {
    let svc = with_faults(Participant::Inventory).await;
    upsert_product(&svc, "apple", 10).await;
    arm(
        &svc,
        fault(
            "/inventory.v1.InventoryService/Reserve",
            FaultMode::FailBefore,
            RpcCode::Aborted,
        ),
    )
    .await;
    expect_code(
        svc.inventory().reserve(reserve("saga-1", "apple", 1)).await,
        Code::Aborted,
    );
    assert_eq!(stock(&svc, "apple").await, (10, 0));
}

#[tokio::test]
async fn clear_faults_counts_and_disarms_them() {
    let svc = with_faults(Participant::Inventory).await;
    upsert_product(&svc, "apple", 10).await;
    arm(
        &svc,
        fault("Reserve", FaultMode::FailBefore, RpcCode::Unavailable),
    )
    .await;
    arm(
        &svc,
        fault("GetStock", FaultMode::FailBefore, RpcCode::Internal),
    )
    .await;
    // Arming an RPC again replaces its fault.
    arm(
        &svc,
        fault("getstock", FaultMode::FailBefore, RpcCode::Unavailable),
    )
    .await;
    assert_eq!(list(&svc).await.faults.len(), 2);
    expect_code(
        svc.inventory().get_stock(get_stock("apple")).await,
        Code::Unavailable,
    );

    let cleared = svc
        .faults()
        .clear_faults(ClearFaultsRequest {})
        .await
        .expect("clear faults")
        .into_inner()
        .cleared;
    assert_eq!(cleared, 2);
    assert!(list(&svc).await.faults.is_empty());
    svc.inventory()
        .reserve(reserve("saga-1", "apple", 1))
        .await
        .expect("Reserve is disarmed");
    assert_eq!(stock(&svc, "apple").await, (9, 1), "GetStock is disarmed");

    let again = svc
        .faults()
        .clear_faults(ClearFaultsRequest {})
        .await
        .expect("clear faults")
        .into_inner()
        .cleared;
    assert_eq!(again, 0);
}
