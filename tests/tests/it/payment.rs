//! The payment participant: accounts, charges, idempotency, tombstones,
//! concurrency and input validation.

use std::time::Duration;

use harness::{SpawnedParticipant, expect_code, join_all, spawn_participant};
use participants::{Participant, ServeOptions};
use proto::payment::v1::{
    ChargeRequest, ChargeState, GetAccountRequest, GetChargeRequest, RefundOutcome, RefundRequest,
    UpsertAccountRequest,
};
use tonic::Code;

async fn payment() -> SpawnedParticipant {
    spawn_participant(Participant::Payment, ServeOptions::default())
        .await
        .expect("payment starts")
}

async fn upsert(svc: &SpawnedParticipant, customer_id: &str, balance_cents: i64) {
    svc.payment()
        .upsert_account(UpsertAccountRequest {
            customer_id: customer_id.into(),
            balance_cents,
        })
        .await
        .expect("upsert account");
}

fn charge(saga_id: &str, customer_id: &str, amount_cents: i64) -> ChargeRequest {
    ChargeRequest {
        saga_id: saga_id.into(),
        customer_id: customer_id.into(),
        amount_cents,
    }
}

fn refund(saga_id: &str) -> RefundRequest {
    RefundRequest {
        saga_id: saga_id.into(),
    }
}

/// An account's balance in cents.
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

async fn charge_rows(svc: &SpawnedParticipant) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM charges")
        .fetch_one(svc.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn charge_debits_the_account_and_records_the_charge() {
    let svc = payment().await;
    upsert(&svc, "alice", 10_000).await;

    let reply = svc
        .payment()
        .charge(charge("saga-1", "alice", 2_500))
        .await
        .unwrap()
        .into_inner();

    assert!(reply.charge_id.starts_with("chg_"), "{}", reply.charge_id);
    assert_eq!(balance(&svc, "alice").await, 7_500);
    let record = svc
        .payment()
        .get_charge(GetChargeRequest {
            saga_id: "saga-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(record.state(), ChargeState::Charged);
    assert_eq!(record.saga_id, "saga-1");
    assert_eq!(record.charge_id, reply.charge_id);
    assert_eq!(record.customer_id, "alice");
    assert_eq!(record.amount_cents, 2_500);
}

#[tokio::test]
async fn a_replayed_charge_returns_the_first_charge_and_debits_once() {
    let svc = payment().await;
    upsert(&svc, "alice", 10_000).await;
    upsert(&svc, "bob", 10_000).await;
    let first = svc
        .payment()
        .charge(charge("saga-1", "alice", 3_000))
        .await
        .unwrap()
        .into_inner();
    let second = svc
        .payment()
        .charge(charge("saga-1", "alice", 3_000))
        .await
        .unwrap()
        .into_inner();

    assert_eq!(first, second);
    assert_eq!(balance(&svc, "alice").await, 7_000);
    assert_eq!(charge_rows(&svc).await, 1);

    // The same saga_id for another amount or another customer is refused.
    for (case, request) in [
        ("other amount", charge("saga-1", "alice", 4_000)),
        ("other customer", charge("saga-1", "bob", 3_000)),
    ] {
        let message = expect_code(svc.payment().charge(request).await, Code::InvalidArgument);
        assert!(message.contains("saga-1"), "{case}: {message}");
    }
    assert_eq!(balance(&svc, "alice").await, 7_000);
    assert_eq!(balance(&svc, "bob").await, 10_000);
    assert_eq!(charge_rows(&svc).await, 1);
    let record = svc
        .payment()
        .get_charge(GetChargeRequest {
            saga_id: "saga-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(record.charge_id, first.charge_id);
    assert_eq!(record.customer_id, "alice");
    assert_eq!(record.amount_cents, 3_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_replays_of_one_saga_charge_once() {
    let svc = payment().await;
    upsert(&svc, "alice", 10_000).await;
    let calls = (0..16).map(|_| {
        let mut client = svc.payment();
        async move { client.charge(charge("saga-1", "alice", 500)).await }
    });
    let replies = join_all(calls).await;
    let ids: std::collections::HashSet<String> = replies
        .into_iter()
        .map(|r| r.expect("every replay succeeds").into_inner().charge_id)
        .collect();
    assert_eq!(ids.len(), 1, "one charge id for one saga");
    assert_eq!(balance(&svc, "alice").await, 9_500);
    assert_eq!(charge_rows(&svc).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_charges_never_overdraw() {
    let svc = payment().await;
    upsert(&svc, "alice", 1_000).await;
    let calls = (0..50).map(|i| {
        let mut client = svc.payment();
        async move {
            client
                .charge(charge(&format!("saga-{i}"), "alice", 100))
                .await
        }
    });
    let replies = join_all(calls).await;

    let succeeded = replies.iter().filter(|r| r.is_ok()).count();
    let insufficient = replies
        .iter()
        .filter(|r| matches!(r, Err(s) if s.code() == Code::FailedPrecondition))
        .count();
    assert_eq!(succeeded, 10);
    assert_eq!(insufficient, 40, "every other call is a business rejection");
    assert_eq!(balance(&svc, "alice").await, 0);
    assert_eq!(charge_rows(&svc).await, 10, "rejected calls write nothing");
}

#[tokio::test]
async fn insufficient_funds_says_which_account_and_by_how_much_and_charges_nothing() {
    let svc = payment().await;
    upsert(&svc, "alice", 700).await;
    let message = expect_code(
        svc.payment().charge(charge("saga-1", "alice", 1_000)).await,
        Code::FailedPrecondition,
    );
    assert!(message.contains("alice"), "{message}");
    assert!(message.contains("short by 300"), "{message}");
    assert_eq!(balance(&svc, "alice").await, 700);
    assert_eq!(charge_rows(&svc).await, 0);

    // Nothing was recorded for the saga: once funded, the same saga charges.
    upsert(&svc, "alice", 1_000).await;
    svc.payment()
        .charge(charge("saga-1", "alice", 1_000))
        .await
        .expect("the rejected saga was not recorded");
    assert_eq!(balance(&svc, "alice").await, 0);
}

#[tokio::test]
async fn unknown_account_is_not_found_and_charges_nothing() {
    let svc = payment().await;
    upsert(&svc, "alice", 1_000).await;
    let message = expect_code(
        svc.payment().charge(charge("saga-1", "ghost", 100)).await,
        Code::NotFound,
    );
    assert!(message.contains("ghost"), "{message}");
    assert_eq!(charge_rows(&svc).await, 0);
    expect_code(
        svc.payment()
            .get_account(GetAccountRequest {
                customer_id: "ghost".into(),
            })
            .await,
        Code::NotFound,
    );
    expect_code(
        svc.payment()
            .get_charge(GetChargeRequest {
                saga_id: "saga-1".into(),
            })
            .await,
        Code::NotFound,
    );
    assert_eq!(balance(&svc, "alice").await, 1_000);
}

#[tokio::test]
async fn refund_credits_back_once() {
    let svc = payment().await;
    upsert(&svc, "alice", 1_000).await;
    svc.payment()
        .charge(charge("saga-1", "alice", 400))
        .await
        .unwrap();
    assert_eq!(balance(&svc, "alice").await, 600);
    let refund_once = || {
        let mut client = svc.payment();
        async move {
            client
                .refund(refund("saga-1"))
                .await
                .unwrap()
                .into_inner()
                .outcome()
        }
    };
    assert_eq!(refund_once().await, RefundOutcome::Refunded);
    assert_eq!(balance(&svc, "alice").await, 1_000);
    assert_eq!(refund_once().await, RefundOutcome::AlreadyRefunded);
    assert_eq!(balance(&svc, "alice").await, 1_000);
    let record = svc
        .payment()
        .get_charge(GetChargeRequest {
            saga_id: "saga-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(record.state(), ChargeState::Refunded);

    // The saga is compensated: Charge cannot bring it back.
    let message = expect_code(
        svc.payment().charge(charge("saga-1", "alice", 400)).await,
        Code::FailedPrecondition,
    );
    assert!(message.contains("compensated"), "{message}");
    assert_eq!(balance(&svc, "alice").await, 1_000);
    assert_eq!(charge_rows(&svc).await, 1);
}

#[tokio::test]
async fn refund_before_charge_leaves_a_tombstone_that_refuses_the_late_charge() {
    let svc = payment().await;
    upsert(&svc, "alice", 1_000).await;
    let outcome = svc
        .payment()
        .refund(refund("saga-late"))
        .await
        .unwrap()
        .into_inner()
        .outcome();
    assert_eq!(outcome, RefundOutcome::Tombstoned);

    let message = expect_code(
        svc.payment()
            .charge(charge("saga-late", "alice", 300))
            .await,
        Code::FailedPrecondition,
    );
    assert!(message.contains("tombstone"), "{message}");
    assert_eq!(
        balance(&svc, "alice").await,
        1_000,
        "the late Charge wrote nothing"
    );
    let record = svc
        .payment()
        .get_charge(GetChargeRequest {
            saga_id: "saga-late".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(record.state(), ChargeState::Tombstone);
    assert!(record.charge_id.is_empty());
    assert!(record.customer_id.is_empty());
    assert_eq!(record.amount_cents, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refund_racing_charge_never_leaks_money() {
    let svc = payment().await;
    upsert(&svc, "alice", 100_000).await;
    // Each saga's Charge and Refund race; whichever wins, no money may stay
    // debited once both have answered.
    let races = (0..30).map(|i| {
        let mut charger = svc.payment();
        let mut refunder = svc.payment();
        let saga_id = format!("saga-{i}");
        async move {
            let charge_call = charger.charge(charge(&saga_id, "alice", 250));
            // Stagger the Refunds so that some arrive before, some during and
            // some after their Charge.
            let delay = Duration::from_millis(2 * i);
            let refund_request = refund(&saga_id);
            let refund_call = async move {
                tokio::time::sleep(delay).await;
                refunder.refund(refund_request).await
            };
            let (charged, refunded) = tokio::join!(charge_call, refund_call);
            let outcome = refunded
                .expect("refund always succeeds")
                .into_inner()
                .outcome();
            // A Charge that succeeded was refunded; one that a tombstone beat
            // was refused.
            match (&charged, outcome) {
                (Ok(_), RefundOutcome::Refunded) => {}
                (Err(status), RefundOutcome::Tombstoned) => {
                    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
                }
                other => panic!("inconsistent race outcome: {other:?}"),
            }
        }
    });
    join_all(races).await;
    assert_eq!(balance(&svc, "alice").await, 100_000);
    let charged: i64 = sqlx::query_scalar("SELECT count(*) FROM charges WHERE state = 'CHARGED'")
        .fetch_one(svc.pool())
        .await
        .unwrap();
    assert_eq!(charged, 0, "every saga ends refunded or tombstoned");
}

#[tokio::test]
async fn bad_input_is_rejected_and_writes_nothing() {
    let svc = payment().await;
    upsert(&svc, "alice", 1_000).await;
    let long_id = "x".repeat(129);
    let cases: Vec<(&str, ChargeRequest)> = vec![
        ("missing saga_id", charge("", "alice", 1)),
        ("missing customer_id", charge("s", "", 1)),
        ("saga_id over 128 bytes", charge(&long_id, "alice", 1)),
        ("customer_id over 128 bytes", charge("s", &long_id, 1)),
        ("negative amount", charge("s", "alice", -1)),
        (
            "amount above 1e15",
            charge("s", "alice", 1_000_000_000_000_001),
        ),
    ];
    for (case, request) in cases {
        let message = expect_code(svc.payment().charge(request).await, Code::InvalidArgument);
        assert!(!message.is_empty(), "{case}: a message says what is wrong");
    }
    let bad_accounts = [
        ("negative balance", "bob", -1),
        ("balance above 1e15", "bob", 1_000_000_000_000_001),
        ("missing id", "", 1),
        ("id over 128 bytes", long_id.as_str(), 1),
    ];
    for (case, customer_id, balance_cents) in bad_accounts {
        let message = expect_code(
            svc.payment()
                .upsert_account(UpsertAccountRequest {
                    customer_id: customer_id.into(),
                    balance_cents,
                })
                .await,
            Code::InvalidArgument,
        );
        assert!(!message.is_empty(), "{case}: a message says what is wrong");
    }
    expect_code(
        svc.payment().refund(refund("")).await,
        Code::InvalidArgument,
    );
    expect_code(
        svc.payment()
            .get_account(GetAccountRequest {
                customer_id: String::new(),
            })
            .await,
        Code::InvalidArgument,
    );
    assert_eq!(charge_rows(&svc).await, 0);
    assert_eq!(balance(&svc, "alice").await, 1_000);
    let accounts: i64 = sqlx::query_scalar("SELECT count(*) FROM accounts")
        .fetch_one(svc.pool())
        .await
        .unwrap();
    assert_eq!(accounts, 1);
}
