//! `AdminService/Reconcile` against real participants and real PostgreSQL:
//! a clean system reconciles clean; every kind of discrepancy, made behind
//! the orchestrator's back (direct participant calls, SQL), is reported
//! with the right kind; repair compensates the orphans only and journals
//! it; a live system under load never gets a false report. Also the
//! participants' listings over the wire.

use std::collections::BTreeSet;
use std::time::Duration;

use harness::{System, delay, expect_code, fault, spawn_system, spawn_system_with};
use orchestrator::auth::AdminTokens;
use proto::fulfillment::v1 as fulfillment;
use proto::inventory::v1 as inventory;
use proto::payment::v1 as payment;
use proto::saga::v1::{
    Discrepancy, DiscrepancyKind, GetSagaRequest, OrderStatus, Participant, ReconcileRequest,
    ReconcileResponse, StepKind, StepOutcome,
};
use tonic::Code;

const SETTLE: Duration = Duration::from_secs(20);

/// Reconciles with pages of `page_size` (small, so that the join crosses
/// page boundaries on every side).
async fn reconcile(system: &System, repair: bool, page_size: i32) -> ReconcileResponse {
    system
        .admin()
        .reconcile(ReconcileRequest {
            repair,
            operator: "alice-ops".into(),
            limit: 0,
            page_size,
        })
        .await
        .expect("reconcile")
        .into_inner()
}

/// (saga, participant, kind) of each discrepancy.
fn found(reply: &ReconcileResponse) -> BTreeSet<(String, Participant, DiscrepancyKind)> {
    reply
        .discrepancies
        .iter()
        .map(|d| (d.saga_id.clone(), d.participant(), d.kind()))
        .collect()
}

fn one<'a>(
    reply: &'a ReconcileResponse,
    saga_id: &str,
    participant: Participant,
) -> &'a Discrepancy {
    let matching: Vec<&Discrepancy> = reply
        .discrepancies
        .iter()
        .filter(|d| d.saga_id == saga_id && d.participant() == participant)
        .collect();
    assert_eq!(matching.len(), 1, "{saga_id} {participant:?}: {reply:#?}");
    matching[0]
}

async fn reservation_state(system: &System, saga_id: &str) -> inventory::ReservationState {
    system
        .participants
        .inventory
        .inventory()
        .get_reservation(inventory::GetReservationRequest {
            saga_id: saga_id.into(),
        })
        .await
        .expect("reservation")
        .into_inner()
        .state()
}

async fn charge_state(system: &System, saga_id: &str) -> payment::ChargeState {
    system
        .participants
        .payment
        .payment()
        .get_charge(payment::GetChargeRequest {
            saga_id: saga_id.into(),
        })
        .await
        .expect("charge")
        .into_inner()
        .state()
}

async fn shipment_state(system: &System, saga_id: &str) -> fulfillment::ShipmentState {
    system
        .participants
        .fulfillment
        .fulfillment()
        .get_shipment(fulfillment::GetShipmentRequest {
            saga_id: saga_id.into(),
        })
        .await
        .expect("shipment")
        .into_inner()
        .state()
}

/// Places an order and waits for it to settle; returns its id.
async fn settled_order(
    system: &System,
    customer: &str,
    items: &[(&str, i32)],
) -> (String, OrderStatus) {
    let id = system.place(customer, items).await.expect("place");
    let order = system.wait_settled(&id, SETTLE).await.expect("settled");
    (id, order.status())
}

#[tokio::test]
async fn every_kind_of_discrepancy_is_reported_and_only_orphans_are_repaired() {
    let system = spawn_system().await.unwrap();
    system.seed_product("widget", 250, 100).await.unwrap();
    system.seed_product("gizmo", 1000, 1).await.unwrap();
    system.seed_account("alice", 100_000).await.unwrap();

    let (c1, s1) = settled_order(&system, "alice", &[("widget", 2)]).await;
    let (c2, s2) = settled_order(&system, "alice", &[("widget", 1)]).await;
    let (c3, s3) = settled_order(&system, "alice", &[("widget", 3), ("gizmo", 1)]).await;
    // Out of stock: rejected at the reservation, which is compensated (a
    // tombstone); payment and fulfillment never hear of it.
    let (f1, s4) = settled_order(&system, "alice", &[("gizmo", 5)]).await;
    assert_eq!(
        [s1, s2, s3, s4],
        [
            OrderStatus::Completed,
            OrderStatus::Completed,
            OrderStatus::Completed,
            OrderStatus::Failed
        ]
    );

    let clean = reconcile(&system, false, 2).await;
    assert_eq!(clean.discrepancies, vec![], "{clean:#?}");
    assert_eq!(clean.discrepancies_found, 0);
    assert_eq!((clean.sagas_checked, clean.sagas_skipped), (4, 0));
    assert_eq!(
        (
            clean.reservations_checked,
            clean.charges_checked,
            clean.shipments_checked
        ),
        (4, 3, 3),
        "three reservations and a tombstone, three charges, three shipments"
    );

    // Behind the orchestrator's back. Orphans: a reservation and a charge
    // for a saga the orchestrator never heard of, a charge and a shipment
    // for the FAILED saga.
    let ghost = "ghost-1";
    let (widget_before, _) = system.stock("widget").await.unwrap();
    let balance_before = system.balance("alice").await.unwrap();
    let inventory = system.participants.inventory.inventory();
    let payment = system.participants.payment.payment();
    let fulfillment = system.participants.fulfillment.fulfillment();
    inventory
        .clone()
        .reserve(inventory::ReserveRequest {
            saga_id: ghost.into(),
            items: vec![inventory::Item {
                product_id: "widget".into(),
                quantity: 4,
            }],
        })
        .await
        .unwrap();
    for (saga_id, amount_cents) in [(ghost, 1000), (f1.as_str(), 5000)] {
        payment
            .clone()
            .charge(payment::ChargeRequest {
                saga_id: saga_id.into(),
                customer_id: "alice".into(),
                amount_cents,
            })
            .await
            .unwrap();
    }
    fulfillment
        .clone()
        .ship(fulfillment::ShipRequest {
            saga_id: f1.clone(),
            items: vec![fulfillment::Item {
                product_id: "gizmo".into(),
                quantity: 5,
            }],
        })
        .await
        .unwrap();
    // Missing: a COMPLETED saga's charge refunded, another's reservation
    // released.
    payment
        .clone()
        .refund(payment::RefundRequest {
            saga_id: c1.clone(),
        })
        .await
        .unwrap();
    inventory
        .clone()
        .release(inventory::ReleaseRequest {
            saga_id: c2.clone(),
        })
        .await
        .unwrap();
    // Mismatches: a COMPLETED saga's charge amount, shipment quantity and
    // reservation total changed in the participants' databases.
    sqlx::query("UPDATE charges SET amount_cents = amount_cents + 1 WHERE saga_id = $1")
        .bind(&c3)
        .execute(system.participants.payment.pool())
        .await
        .unwrap();
    sqlx::query(
        "UPDATE shipment_items SET quantity = 7 WHERE saga_id = $1 AND product_id = 'widget'",
    )
    .bind(&c3)
    .execute(system.participants.fulfillment.pool())
    .await
    .unwrap();
    sqlx::query("UPDATE reservations SET total_amount_cents = 1 WHERE saga_id = $1")
        .bind(&c3)
        .execute(system.participants.inventory.pool())
        .await
        .unwrap();

    use DiscrepancyKind::{Mismatch, Missing, Orphan};
    use Participant::{Fulfillment, Inventory, Payment};
    let expected: BTreeSet<(String, Participant, DiscrepancyKind)> = [
        (ghost, Inventory, Orphan),
        (ghost, Payment, Orphan),
        (&f1, Payment, Orphan),
        (&f1, Fulfillment, Orphan),
        (&c1, Payment, Missing),
        (&c2, Inventory, Missing),
        (&c3, Inventory, Mismatch),
        (&c3, Payment, Mismatch),
        (&c3, Fulfillment, Mismatch),
    ]
    .into_iter()
    .map(|(saga, participant, kind)| (saga.to_string(), participant, kind))
    .collect();

    let report = reconcile(&system, false, 2).await;
    assert_eq!(found(&report), expected, "{report:#?}");
    assert_eq!(report.discrepancies_found, 9);
    assert_eq!((report.repaired, report.repair_failed), (0, 0));
    assert!(
        report
            .discrepancies
            .iter()
            .all(|d| !d.repaired && d.repair.is_empty())
    );
    // In saga-id order, as the join met them.
    let ids: Vec<&str> = report
        .discrepancies
        .iter()
        .map(|d| d.saga_id.as_str())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] <= w[1]), "{ids:?}");
    let ghost_charge = one(&report, ghost, Payment);
    assert_eq!(ghost_charge.saga_status(), OrderStatus::Unspecified);
    assert!(ghost_charge.detail.contains("unknown"), "{ghost_charge:?}");
    assert!(
        ghost_charge.found.contains("1000 cents"),
        "{ghost_charge:?}"
    );
    let failed_charge = one(&report, &f1, Payment);
    assert_eq!(failed_charge.saga_status(), OrderStatus::Failed);
    let refunded = one(&report, &c1, Payment);
    assert_eq!(refunded.saga_status(), OrderStatus::Completed);
    assert_eq!(refunded.expected, "CHARGED");
    assert!(refunded.found.starts_with("REFUNDED"), "{refunded:?}");
    let amount = one(&report, &c3, Payment);
    assert_eq!(
        (amount.expected.as_str(), amount.found.as_str()),
        ("1750 cents", "1751 cents")
    );
    let items = one(&report, &c3, Fulfillment);
    assert_eq!(
        (items.expected.as_str(), items.found.as_str()),
        ("gizmo x1, widget x3", "gizmo x1, widget x7")
    );
    // Reporting changed nothing.
    assert_eq!(
        reservation_state(&system, ghost).await,
        inventory::ReservationState::Active
    );
    assert_eq!(
        charge_state(&system, &f1).await,
        payment::ChargeState::Charged
    );

    // Repair: the four orphans are compensated, the rest only reported.
    let repaired = reconcile(&system, true, 3).await;
    assert_eq!(found(&repaired), expected, "{repaired:#?}");
    assert_eq!((repaired.repaired, repaired.repair_failed), (4, 0));
    for d in &repaired.discrepancies {
        assert_eq!(d.repaired, d.kind() == Orphan, "{d:?}");
        assert_eq!(d.repair.is_empty(), d.kind() != Orphan, "{d:?}");
    }
    assert!(
        one(&repaired, &f1, Fulfillment)
            .repair
            .contains("CancelShipment: CANCEL_OUTCOME_CANCELLED"),
        "{repaired:#?}"
    );
    assert_eq!(
        reservation_state(&system, ghost).await,
        inventory::ReservationState::Released
    );
    assert_eq!(
        charge_state(&system, ghost).await,
        payment::ChargeState::Refunded
    );
    assert_eq!(
        charge_state(&system, &f1).await,
        payment::ChargeState::Refunded
    );
    assert_eq!(
        shipment_state(&system, &f1).await,
        fulfillment::ShipmentState::Cancelled
    );
    // The orphans' units and money are back; what is left over is the
    // COMPLETED sagas' records undone behind the orchestrator's back (one
    // widget of c2, the 500 cents of c1).
    assert_eq!(system.stock("widget").await.unwrap().0, widget_before + 1);
    assert_eq!(system.balance("alice").await.unwrap(), balance_before + 500);
    // The COMPLETED sagas' records were left as they were.
    assert_eq!(
        charge_state(&system, &c1).await,
        payment::ChargeState::Refunded
    );
    assert_eq!(
        reservation_state(&system, &c2).await,
        inventory::ReservationState::Released
    );

    // The FAILED saga's journal says who repaired what; the ghost has no
    // saga to journal on, and the COMPLETED sagas got nothing.
    let journal = system
        .admin()
        .get_saga(GetSagaRequest {
            saga_id: f1.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .journal;
    let control: Vec<_> = journal
        .iter()
        .filter(|e| e.kind() == StepKind::Control)
        .collect();
    assert_eq!(control.len(), 2, "{journal:#?}");
    let rpcs: BTreeSet<&str> = control.iter().map(|e| e.rpc.as_str()).collect();
    assert_eq!(
        rpcs,
        BTreeSet::from([
            "fulfillment.v1.FulfillmentService/CancelShipment",
            "payment.v1.PaymentService/Refund"
        ])
    );
    for entry in &control {
        assert_eq!(entry.step, "reconcile");
        assert_eq!(entry.actor, "operator alice-ops");
        assert_eq!(entry.outcome(), StepOutcome::Succeeded);
        assert!(entry.detail.contains("FAILED saga"), "{entry:?}");
    }
    for saga_id in [&c1, &c2, &c3] {
        let journal = system
            .admin()
            .get_saga(GetSagaRequest {
                saga_id: saga_id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .journal;
        assert!(journal.iter().all(|e| e.kind() != StepKind::Control));
    }

    // Again: only what cannot be repaired is left.
    let after = reconcile(&system, true, 1000).await;
    let left: BTreeSet<_> = expected
        .iter()
        .filter(|(_, _, kind)| *kind != Orphan)
        .cloned()
        .collect();
    assert_eq!(found(&after), left, "{after:#?}");
    assert_eq!((after.repaired, after.repair_failed), (0, 0));

    // The limit cuts the list, not the count.
    let cut = system
        .admin()
        .reconcile(ReconcileRequest {
            limit: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cut.discrepancies.len(), 2);
    assert_eq!(cut.discrepancies_found, 5);
}

#[tokio::test]
async fn a_live_system_under_load_gets_no_false_report() {
    let system = spawn_system().await.unwrap();
    system.seed_product("widget", 250, 1000).await.unwrap();
    system.seed_account("alice", 1_000_000).await.unwrap();
    // Bob cannot pay for most orders: those fail and compensate.
    system.seed_account("bob", 600).await.unwrap();

    let placing = {
        let orders = system.orders();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for round in 0..10 {
                let placed = harness::join_all((0..4).map(|i| {
                    let mut orders = orders.clone();
                    let customer = if (round + i) % 3 == 0 { "bob" } else { "alice" };
                    async move {
                        orders
                            .place_order(harness::place_request(customer, &[("widget", 1)], ""))
                            .await
                            .map(|reply| reply.into_inner().order_id)
                    }
                }))
                .await;
                for id in placed {
                    ids.push(id.expect("placed"));
                }
            }
            ids
        })
    };
    // Reconcile over and over while the orders run, in tiny pages, so that
    // sagas finish between the pages of the join.
    let mut runs = 0;
    let mut skipped = 0;
    while !placing.is_finished() || runs < 3 {
        let report = reconcile(&system, false, 3).await;
        assert_eq!(report.discrepancies, vec![], "false report: {report:#?}");
        skipped += report.sagas_skipped;
        runs += 1;
    }
    let ids = placing.await.unwrap();
    assert_eq!(ids.len(), 40);
    system.wait_all_settled(SETTLE).await.unwrap();
    let last = reconcile(&system, false, 3).await;
    assert_eq!(last.discrepancies, vec![], "{last:#?}");
    assert_eq!((last.sagas_checked, last.sagas_skipped), (40, 0));
    let audit = system.audit().await.unwrap();
    assert!(
        audit.count("FAILED") > 0 && audit.count("COMPLETED") > 0,
        "{audit:?}"
    );
    eprintln!("{runs} reconciles during the load skipped {skipped} sagas in flight");
}

/// The race the second read is for, made on purpose with delays: the join
/// reads the shipments page while saga X is still shipping, then (held up
/// by a slow re-check of another saga) the sagas page after X has
/// completed. Without the second read, X would be reported as missing its
/// shipment.
#[tokio::test]
async fn a_saga_that_finishes_between_pages_is_not_reported() {
    let system = spawn_system().await.unwrap();
    system.seed_product("widget", 250, 100).await.unwrap();
    system.seed_product("gizmo", 1000, 0).await.unwrap();
    system.seed_account("alice", 100_000).await.unwrap();
    let (a, _) = settled_order(&system, "alice", &[("widget", 1)]).await;
    let (f, status) = settled_order(&system, "alice", &[("gizmo", 1)]).await;
    assert_eq!(status, OrderStatus::Failed);
    // A real orphan on F, whose re-check is slow.
    system
        .participants
        .payment
        .payment()
        .charge(payment::ChargeRequest {
            saga_id: f.clone(),
            customer_id: "alice".into(),
            amount_cents: 100,
        })
        .await
        .unwrap();
    system
        .fault("payment", delay("GetCharge", 1200))
        .await
        .unwrap();
    system
        .fault("fulfillment", delay("Ship", 600))
        .await
        .unwrap();
    let x = system.place("alice", &[("widget", 2)]).await.unwrap();
    system
        .wait_for(&x, SETTLE, |o| o.status() == OrderStatus::Shipping)
        .await
        .unwrap();

    // Pages of one: A; then F (the shipments page after A is read now,
    // while X ships: empty, the last); then X, completed by now.
    let report = reconcile(&system, false, 1).await;
    let x_status = system.status(&x).await.unwrap().status();
    assert_eq!(
        x_status,
        OrderStatus::Completed,
        "X finished during the run"
    );
    assert_eq!(
        found(&report),
        BTreeSet::from([(f.clone(), Participant::Payment, DiscrepancyKind::Orphan)]),
        "{report:#?}"
    );
    assert!(a < f && f < x, "ids in placing order");
    assert_eq!(report.sagas_checked, 3, "{report:#?}");
    assert_eq!(
        report.shipments_checked, 1,
        "X's shipment was not there yet"
    );
}

#[tokio::test]
async fn listings_page_by_saga_id_and_refuse_bad_pages() {
    let system = spawn_system().await.unwrap();
    let inventory = system.participants.inventory.inventory();
    // Tombstones are records too: five, written out of order.
    for saga_id in ["s3", "s1", "s5", "s2", "s4"] {
        inventory
            .clone()
            .release(inventory::ReleaseRequest {
                saga_id: saga_id.into(),
            })
            .await
            .unwrap();
    }
    let mut token = String::new();
    let mut pages = Vec::new();
    loop {
        let page = inventory
            .clone()
            .list_reservations(inventory::ListReservationsRequest {
                page_size: 2,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        pages.push(
            page.reservations
                .iter()
                .map(|r| r.saga_id.clone())
                .collect::<Vec<_>>(),
        );
        assert!(page.reservations.iter().all(|r| {
            r.state() == inventory::ReservationState::Tombstone
                && r.created_at.is_some()
                && r.released_at.is_none()
        }));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, [vec!["s1", "s2"], vec!["s3", "s4"], vec!["s5"]]);

    let bad = |page_size: i32, page_token: &str| inventory::ListReservationsRequest {
        page_size,
        page_token: page_token.into(),
    };
    for (page_size, token) in [(-1, ""), (1001, ""), (0, " s1"), (0, "tab\tbed")] {
        expect_code(
            inventory
                .clone()
                .list_reservations(bad(page_size, token))
                .await,
            Code::InvalidArgument,
        );
    }
    expect_code(
        system
            .participants
            .payment
            .payment()
            .list_charges(payment::ListChargesRequest {
                page_size: 5000,
                page_token: String::new(),
            })
            .await,
        Code::InvalidArgument,
    );
    expect_code(
        system
            .participants
            .fulfillment
            .fulfillment()
            .list_shipments(fulfillment::ListShipmentsRequest {
                page_size: 0,
                page_token: "x".repeat(200),
            })
            .await,
        Code::InvalidArgument,
    );

    // Reconcile's own input.
    for request in [
        ReconcileRequest {
            limit: -1,
            ..Default::default()
        },
        ReconcileRequest {
            page_size: 1001,
            ..Default::default()
        },
        ReconcileRequest {
            operator: "x".repeat(129),
            ..Default::default()
        },
    ] {
        expect_code(
            system.admin().reconcile(request).await,
            Code::InvalidArgument,
        );
    }
    // Five tombstones and no saga: nothing to report.
    let report = reconcile(&system, true, 0).await;
    assert_eq!(report.discrepancies_found, 0, "{report:#?}");
    assert_eq!(report.reservations_checked, 5);
}

#[tokio::test]
async fn reconcile_needs_the_admin_token_and_a_reachable_participant() {
    let system = spawn_system_with(|s| s.admin = AdminTokens::new(Some("s3cret"), None))
        .await
        .unwrap();
    expect_code(
        system.admin().reconcile(ReconcileRequest::default()).await,
        Code::Unauthenticated,
    );
    let mut request = tonic::Request::new(ReconcileRequest::default());
    request
        .metadata_mut()
        .insert("authorization", "Bearer s3cret".parse().unwrap());
    let report = system
        .admin()
        .reconcile(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.discrepancies_found, 0);

    // A participant that cannot be read fails the call, saying which.
    system
        .fault(
            "payment",
            fault("ListCharges", "FAIL_BEFORE", Code::Unavailable, 0),
        )
        .await
        .unwrap();
    let mut request = tonic::Request::new(ReconcileRequest::default());
    request
        .metadata_mut()
        .insert("authorization", "Bearer s3cret".parse().unwrap());
    let message = expect_code(system.admin().reconcile(request).await, Code::Unavailable);
    assert!(message.contains("payment"), "{message}");
}
