//! The design's invariants, checked from the databases themselves (the
//! orchestrator's and each participant's), not through any API:
//!
//! 1. every order the client got an id for exists and is settled
//!    (COMPLETED, FAILED, CANCELLED or NEEDS_ATTENTION): none lost;
//! 2. stock is conserved: initial = current + quantities of COMPLETED orders;
//! 3. money is conserved per customer: the balance dropped by exactly the
//!    totals of the customer's COMPLETED orders, and by the charges the
//!    payment service holds (no double charge, no refund without a charge);
//! 4. a COMPLETED order has exactly one active reservation, charge and
//!    shipment; FAILED and CANCELLED ones have none; no participant holds
//!    active work for a saga that is not COMPLETED (or that it never had);
//! 5. no saga was driven by two replicas at once: no two journalled calls of
//!    one saga by different replicas overlap in time.
//!
//! Sagas left in NEEDS_ATTENTION are reported; the products and customers
//! they touch are left out of the conservation checks (their compensation
//! is unfinished by definition).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use anyhow::{Context, Result};
use participants::Participant;
use serde::Serialize;
use sqlx::PgPool;

use super::workload::{Initial, OrderRecord};

/// What the audit found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AuditReport {
    /// Sagas per status, every saga in the orchestrator's database.
    pub by_status: BTreeMap<String, usize>,
    /// Order ids the client got that the orchestrator does not have.
    pub lost: Vec<String>,
    /// Sagas left in NEEDS_ATTENTION.
    pub needs_attention: Vec<String>,
    /// Every broken invariant, one line each, prefixed with its number.
    pub violations: Vec<String>,
    /// Attempts journalled twice (same step, kind and attempt), overlapping
    /// or not: a lost update worth a look, not by itself a violation.
    pub attempts_journalled_twice: usize,
    /// A few of them: saga, step/kind, attempt, actors, outcomes.
    pub journalled_twice: Vec<String>,
    /// Products and customers left out of the conservation checks.
    pub unchecked: Vec<String>,
}

#[derive(Debug, sqlx::FromRow)]
struct SagaRow {
    saga_id: String,
    customer_id: String,
    items: sqlx::types::Json<Vec<ItemRow>>,
    status: String,
    total_amount_cents: i64,
}

#[derive(Debug, Clone, serde::Deserialize)]
struct ItemRow {
    product_id: String,
    quantity: i32,
}

/// A violation: its invariant's number and what broke.
fn violation(report: &mut AuditReport, invariant: u8, text: String) {
    report.violations.push(format!("({invariant}) {text}"));
}

async fn states(pool: &PgPool, table: &str) -> Result<HashMap<String, String>> {
    Ok(
        sqlx::query_as::<_, (String, String)>(sqlx::AssertSqlSafe(format!(
            "SELECT saga_id, state FROM {table}"
        )))
        .fetch_all(pool)
        .await
        .with_context(|| format!("reading {table}"))?
        .into_iter()
        .collect(),
    )
}

/// The databases an audit reads.
#[derive(Debug, Clone, Copy)]
pub struct Databases<'a> {
    /// The orchestrator's.
    pub orchestrator: &'a PgPool,
    /// Inventory's.
    pub inventory: &'a PgPool,
    /// Payment's.
    pub payment: &'a PgPool,
    /// Fulfillment's.
    pub fulfillment: &'a PgPool,
}

impl<'a> Databases<'a> {
    /// The databases of a cluster.
    pub fn of(cluster: &'a super::cluster::Cluster) -> Self {
        Self {
            orchestrator: &cluster.orchestrator_pool,
            inventory: cluster.pool(Participant::Inventory),
            payment: cluster.pool(Participant::Payment),
            fulfillment: cluster.pool(Participant::Fulfillment),
        }
    }
}

/// Checks invariants 1-5 over every saga and every seeded product and
/// account.
pub async fn audit(
    db: Databases<'_>,
    initial: &Initial,
    records: &[OrderRecord],
) -> Result<AuditReport> {
    let mut report = AuditReport::default();
    let sagas: Vec<SagaRow> =
        sqlx::query_as("SELECT saga_id, customer_id, items, status, total_amount_cents FROM sagas")
            .fetch_all(db.orchestrator)
            .await
            .context("reading the orchestrator's sagas")?;
    let by_id: HashMap<&str, &SagaRow> = sagas.iter().map(|s| (s.saga_id.as_str(), s)).collect();

    // (1) None lost, every one settled.
    for record in records {
        if let Some(id) = &record.order_id
            && !by_id.contains_key(id.as_str())
        {
            report.lost.push(id.clone());
            violation(
                &mut report,
                1,
                format!(
                    "order {id} (key {}) was answered but does not exist",
                    record.key
                ),
            );
        }
    }

    let reservations = states(db.inventory, "reservations").await?;
    let shipments = states(db.fulfillment, "shipments").await?;
    let charges: HashMap<String, (String, String, i64)> = sqlx::query_as::<
        _,
        (String, Option<String>, String, i64),
    >(
        "SELECT saga_id, customer_id, state, amount_cents FROM charges",
    )
    .fetch_all(db.payment)
    .await
    .context("reading charges")?
    .into_iter()
    .map(|(saga, customer, state, amount)| (saga, (customer.unwrap_or_default(), state, amount)))
    .collect();

    let mut sold: HashMap<String, i64> = HashMap::new();
    let mut spent: HashMap<String, i64> = HashMap::new();
    let mut unchecked_products: BTreeSet<String> = BTreeSet::new();
    let mut unchecked_customers: BTreeSet<String> = BTreeSet::new();
    for saga in &sagas {
        *report.by_status.entry(saga.status.clone()).or_default() += 1;
        let id = saga.saga_id.as_str();
        let reservation = reservations.get(id).map(String::as_str);
        let charge = charges.get(id);
        let shipment = shipments.get(id).map(String::as_str);
        match saga.status.as_str() {
            "COMPLETED" => {
                if reservation != Some("ACTIVE") {
                    violation(
                        &mut report,
                        4,
                        format!("COMPLETED {id}: reservation {reservation:?}"),
                    );
                }
                if !matches!(charge, Some((_, state, amount)) if state == "CHARGED" && *amount == saga.total_amount_cents)
                {
                    violation(
                        &mut report,
                        4,
                        format!(
                            "COMPLETED {id} (total {}): charge {charge:?}",
                            saga.total_amount_cents
                        ),
                    );
                }
                if shipment != Some("SHIPPED") {
                    violation(
                        &mut report,
                        4,
                        format!("COMPLETED {id}: shipment {shipment:?}"),
                    );
                }
                for item in &saga.items.0 {
                    *sold.entry(item.product_id.clone()).or_default() += i64::from(item.quantity);
                }
                *spent.entry(saga.customer_id.clone()).or_default() += saga.total_amount_cents;
            }
            "FAILED" | "CANCELLED" => {
                let status = &saga.status;
                if reservation == Some("ACTIVE") {
                    violation(
                        &mut report,
                        4,
                        format!("{status} {id} still holds a reservation"),
                    );
                }
                if let Some((_, state, amount)) = charge
                    && state == "CHARGED"
                {
                    violation(
                        &mut report,
                        4,
                        format!("{status} {id} is still charged {amount} cents (never refunded)"),
                    );
                }
                if shipment == Some("SHIPPED") {
                    violation(
                        &mut report,
                        4,
                        format!("{status} {id} still has a shipment"),
                    );
                }
            }
            "NEEDS_ATTENTION" => {
                report.needs_attention.push(id.to_owned());
                unchecked_customers.insert(saga.customer_id.clone());
                unchecked_products.extend(saga.items.0.iter().map(|i| i.product_id.clone()));
            }
            other => violation(&mut report, 1, format!("saga {id} is not settled: {other}")),
        }
    }

    // (4) Active work the orchestrator does not know of.
    let orphan =
        |table: &str, active: &str, states: &HashMap<String, String>, report: &mut AuditReport| {
            for (saga, state) in states {
                if state == active && !by_id.contains_key(saga.as_str()) {
                    violation(
                        report,
                        4,
                        format!("{table}: {active} for unknown saga {saga}"),
                    );
                }
            }
        };
    orphan("inventory", "ACTIVE", &reservations, &mut report);
    orphan("fulfillment", "SHIPPED", &shipments, &mut report);
    for (saga, (_, state, amount)) in &charges {
        if state == "CHARGED" && !by_id.contains_key(saga.as_str()) {
            violation(
                &mut report,
                4,
                format!("payment: {amount} cents CHARGED for unknown saga {saga}"),
            );
        }
    }

    // (2) Stock.
    let products: Vec<(String, i64, i64)> =
        sqlx::query_as("SELECT product_id, stock, reserved FROM products")
            .fetch_all(db.inventory)
            .await
            .context("reading products")?;
    let products: HashMap<String, (i64, i64)> = products
        .into_iter()
        .map(|(p, stock, reserved)| (p, (stock, reserved)))
        .collect();
    for (product, initial) in &initial.stock {
        if unchecked_products.contains(product) {
            continue;
        }
        let Some((stock, reserved)) = products.get(product) else {
            violation(&mut report, 2, format!("product {product} vanished"));
            continue;
        };
        let sold = sold.get(product).copied().unwrap_or(0);
        if stock + sold != *initial || *reserved != sold {
            violation(
                &mut report,
                2,
                format!(
                    "stock of {product} not conserved: initial {initial}, now {stock} available + \
                     {reserved} reserved, COMPLETED orders hold {sold}"
                ),
            );
        }
    }

    // (3) Money.
    let balances: HashMap<String, i64> =
        sqlx::query_as::<_, (String, i64)>("SELECT customer_id, balance_cents FROM accounts")
            .fetch_all(db.payment)
            .await
            .context("reading accounts")?
            .into_iter()
            .collect();
    let mut charged: HashMap<&str, i64> = HashMap::new();
    for (customer, state, amount) in charges.values() {
        if state == "CHARGED" {
            *charged.entry(customer.as_str()).or_default() += amount;
        }
    }
    for (customer, initial) in &initial.balance {
        if unchecked_customers.contains(customer) {
            continue;
        }
        let Some(balance) = balances.get(customer) else {
            violation(&mut report, 3, format!("account {customer} vanished"));
            continue;
        };
        let spent = spent.get(customer).copied().unwrap_or(0);
        let held = charged.get(customer.as_str()).copied().unwrap_or(0);
        if initial - balance != spent {
            violation(
                &mut report,
                3,
                format!(
                    "money of {customer} not conserved: initial {initial}, now {balance} \
                     (down {}), COMPLETED orders total {spent}",
                    initial - balance
                ),
            );
        }
        if initial - balance != held {
            violation(
                &mut report,
                3,
                format!(
                    "payments of {customer} do not add up: the balance is down {} but the \
                     active charges total {held} (a double charge or a refund without a charge)",
                    initial - balance
                ),
            );
        }
    }
    report.unchecked = unchecked_products
        .into_iter()
        .chain(unchecked_customers)
        .collect();

    // (5) Two drivers at once.
    let overlaps: Vec<(String, String, String, i32, String, String, f64)> = sqlx::query_as(
        "SELECT a.saga_id, a.step || '/' || a.kind, b.step || '/' || b.kind, a.attempt,
                a.actor, b.actor,
                extract(epoch FROM least(a.finished_at, b.finished_at)
                                 - greatest(a.started_at, b.started_at))::float8
         FROM saga_journal a
         JOIN saga_journal b ON b.saga_id = a.saga_id AND b.entry_id > a.entry_id
         WHERE a.kind IN ('ACTION', 'COMPENSATION') AND b.kind IN ('ACTION', 'COMPENSATION')
           AND a.actor <> b.actor
           AND a.started_at < coalesce(b.finished_at, 'infinity')
           AND b.started_at < coalesce(a.finished_at, 'infinity')
         LIMIT 50",
    )
    .fetch_all(db.orchestrator)
    .await
    .context("reading the journal")?;
    for (saga, a, b, attempt, actor_a, actor_b, seconds) in overlaps {
        violation(
            &mut report,
            5,
            format!(
                "saga {saga} driven by two replicas at once: {a} (attempt {attempt}) by \
                 {actor_a} and {b} by {actor_b} overlap by {:.0} ms",
                seconds * 1000.0
            ),
        );
    }
    let twice: Vec<(String, String, i32, String, String, i64)> = sqlx::query_as(
        "SELECT saga_id, step || '/' || kind, attempt,
                string_agg(actor, ',' ORDER BY entry_id), string_agg(outcome, ',' ORDER BY entry_id),
                count(*) OVER ()
         FROM saga_journal WHERE kind IN ('ACTION', 'COMPENSATION')
           -- A late reply and the replay of the same attempt number after
           -- the database lost the write that counted it are two calls.
           AND detail NOT LIKE 'late reply%'
         GROUP BY saga_id, step, kind, attempt HAVING count(*) > 1
         ORDER BY saga_id LIMIT 5",
    )
    .fetch_all(db.orchestrator)
    .await
    .context("reading the journal")?;
    report.attempts_journalled_twice = twice.first().map_or(0, |row| row.5 as usize);
    report.journalled_twice = twice
        .into_iter()
        .map(|(saga, step, attempt, actors, outcomes, _)| {
            format!("{saga} {step} attempt {attempt}: by {actors}, outcomes {outcomes}")
        })
        .collect();
    Ok(report)
}
