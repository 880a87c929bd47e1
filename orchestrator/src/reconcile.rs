//! Reconciliation: the orchestrator's sagas against each participant's own
//! records, for `AdminService/Reconcile` and `sagactl reconcile`.
//!
//! A merge join by saga id over four sorted streams, each read a page at a
//! time: the sagas (`SagaStore::sagas_by_id`) and the three participants'
//! listings (ListReservations, ListCharges, ListShipments). At every step
//! the smallest saga id at the head of any stream is taken off every stream
//! holding it, and [`check`] (pure) compares what each side says of it.
//! Memory is a page per stream, whatever the number of sagas.
//!
//! The streams are read at different moments of a live system, so a
//! finding is only a *candidate*: the saga and that participant's record
//! are read again, and [`check`] run on the fresh pair, before anything is
//! reported. Sagas in flight or NEEDS_ATTENTION are skipped (their
//! compensation is unfinished by definition; `sagactl stuck` reports them).
//!
//! Repair compensates orphans only (a record still active for a saga that
//! is FAILED, CANCELLED or unknown): the compensations are idempotent and
//! tombstone-safe, so repairing twice, or racing a driver, is harmless. A
//! COMPLETED saga's missing or different record is reported, never
//! changed: what to do about it is a business decision.
//!
//! The join compares saga ids as bytes. SQLite sorts them that way; on
//! PostgreSQL the keyset scans follow the database's collation, which
//! agrees for `C` / `C.UTF-8` databases (and for the generated ids under
//! any collation). A stream that is not in byte order is refused with
//! `FAILED_PRECONDITION` rather than joined wrongly.

use std::collections::VecDeque;

use proto::fulfillment::v1 as fulfillment;
use proto::inventory::v1 as inventory;
use proto::payment::v1 as payment;
use tonic::Status;

use crate::clients::{RecordClients, classify, code_name};
use crate::error::Error;
use crate::executor::now_epoch;
use crate::saga::{Outcome, Status as SagaStatus};
use crate::store::{JournalEntry, JournalKind, JournalOutcome, OrderItem, SagaBrief, SagaStore};

/// A participant, as Reconcile names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Party {
    /// The inventory's reservations.
    Inventory,
    /// The payment participant's charges.
    Payment,
    /// The fulfillment participant's shipments.
    Fulfillment,
}

impl Party {
    /// Every participant, in step order.
    pub const ALL: [Party; 3] = [Self::Inventory, Self::Payment, Self::Fulfillment];

    /// Its position in [`Party::ALL`] (and in per-party arrays).
    pub fn index(self) -> usize {
        match self {
            Self::Inventory => 0,
            Self::Payment => 1,
            Self::Fulfillment => 2,
        }
    }

    /// `inventory`, `payment`, `fulfillment`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Inventory => "inventory",
            Self::Payment => "payment",
            Self::Fulfillment => "fulfillment",
        }
    }

    /// What its record is called: `reservation`, `charge`, `shipment`.
    pub fn record(self) -> &'static str {
        match self {
            Self::Inventory => "reservation",
            Self::Payment => "charge",
            Self::Fulfillment => "shipment",
        }
    }

    /// The state of its record while the step's effect holds.
    pub fn active_state(self) -> &'static str {
        match self {
            Self::Inventory => "ACTIVE",
            Self::Payment => "CHARGED",
            Self::Fulfillment => "SHIPPED",
        }
    }

    /// The full name of the RPC that undoes its record (what repair
    /// calls through [`RecordClients`], and journals).
    pub fn compensation(self) -> &'static str {
        match self {
            Self::Inventory => "inventory.v1.InventoryService/Release",
            Self::Payment => "payment.v1.PaymentService/Refund",
            Self::Fulfillment => "fulfillment.v1.FulfillmentService/CancelShipment",
        }
    }
}

/// A participant's record of one saga, as Reconcile compares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The saga.
    pub saga_id: String,
    /// The state's name (`ACTIVE`, `RELEASED`, `CHARGED`, `TOMBSTONE`, ...).
    pub state: String,
    /// Whether the step's effect holds (reservation ACTIVE, charge CHARGED,
    /// shipment SHIPPED).
    pub active: bool,
    /// Products and quantities, sorted by product; empty for charges.
    pub items: Vec<(String, i64)>,
    /// The reservation's total or the charge's amount; 0 for shipments.
    pub amount_cents: i64,
    /// The account charged; empty for the other records.
    pub customer_id: String,
}

/// What is wrong between a saga and a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Active, but the saga is FAILED, CANCELLED or unknown.
    Orphan,
    /// The saga is COMPLETED; the record is absent or not active.
    Missing,
    /// The saga is COMPLETED and the record active, but a value differs.
    Mismatch,
}

/// One thing [`check`] found wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Whose record.
    pub party: Party,
    /// What is wrong.
    pub kind: Kind,
    /// What the saga says.
    pub expected: String,
    /// What the participant has.
    pub found: String,
    /// One sentence.
    pub detail: String,
}

fn items_text(items: &[(String, i64)]) -> String {
    if items.is_empty() {
        return "no items".to_owned();
    }
    items
        .iter()
        .map(|(product, quantity)| format!("{product} x{quantity}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// An order's items in a record's shape: sorted by product.
fn order_items(items: &[OrderItem]) -> Vec<(String, i64)> {
    let mut sorted: Vec<(String, i64)> = items
        .iter()
        .map(|i| (i.product_id.clone(), i64::from(i.quantity)))
        .collect();
    sorted.sort();
    sorted
}

/// What a record holds, in a few words.
fn describe(party: Party, record: &Record) -> String {
    match party {
        Party::Inventory => format!(
            "{} {} ({} cents)",
            record.state,
            items_text(&record.items),
            record.amount_cents
        ),
        Party::Payment => format!(
            "{} {} cents to {}",
            record.state, record.amount_cents, record.customer_id
        ),
        Party::Fulfillment => format!("{} {}", record.state, items_text(&record.items)),
    }
}

/// Compares what the orchestrator says of one saga (None: it has no such
/// saga) with one participant's record of it (None: it has none). Sagas in
/// flight or NEEDS_ATTENTION give nothing: they are not checked.
pub fn check(party: Party, saga: Option<&SagaBrief>, record: Option<&Record>) -> Vec<Finding> {
    let finding = |kind, expected: String, found: String, detail: String| Finding {
        party,
        kind,
        expected,
        found,
        detail,
    };
    let what = party.record();
    let gone = match saga {
        None => Some("a saga unknown to the orchestrator".to_owned()),
        Some(saga) if matches!(saga.status, SagaStatus::Failed | SagaStatus::Cancelled) => {
            Some(format!("a {} saga", saga.status))
        }
        Some(_) => None,
    };
    if let Some(whose) = gone {
        let Some(record) = record.filter(|r| r.active) else {
            return Vec::new();
        };
        return vec![finding(
            Kind::Orphan,
            format!("no {} {what}", party.active_state()),
            describe(party, record),
            format!("{what} still {} for {whose}", record.state),
        )];
    }
    match saga {
        Some(saga) if saga.status == SagaStatus::Completed => {
            let Some(record) = record.filter(|r| r.active) else {
                let found = record.map_or_else(|| "none".to_owned(), |r| describe(party, r));
                let how = record.map_or_else(
                    || format!("has no {what}"),
                    |r| format!("has its {what} {}", r.state),
                );
                return vec![finding(
                    Kind::Missing,
                    party.active_state().to_owned(),
                    found,
                    format!("COMPLETED saga {how}"),
                )];
            };
            let mut findings = Vec::new();
            let items = order_items(&saga.items);
            if party != Party::Payment && record.items != items {
                findings.push(finding(
                    Kind::Mismatch,
                    items_text(&items),
                    items_text(&record.items),
                    format!("{what} items differ from the order's"),
                ));
            }
            if party != Party::Fulfillment && record.amount_cents != saga.total_amount_cents {
                findings.push(finding(
                    Kind::Mismatch,
                    format!("{} cents", saga.total_amount_cents),
                    format!("{} cents", record.amount_cents),
                    match party {
                        Party::Inventory => "reservation total differs from the saga's total",
                        _ => "charge amount differs from the saga's total",
                    }
                    .to_owned(),
                ));
            }
            if party == Party::Payment && record.customer_id != saga.customer_id {
                findings.push(finding(
                    Kind::Mismatch,
                    saga.customer_id.clone(),
                    record.customer_id.clone(),
                    "charge is to another customer than the order's".to_owned(),
                ));
            }
            findings
        }
        // In flight, or NEEDS_ATTENTION: not checked.
        _ => Vec::new(),
    }
}

/// How a run behaves.
#[derive(Debug, Clone)]
pub struct Options {
    /// Compensate orphans (and journal it).
    pub repair: bool,
    /// The journal's actor for repairs, e.g. `operator alice`.
    pub actor: String,
    /// Most discrepancies kept in the report (all are counted).
    pub limit: usize,
    /// Rows per page read from each stream.
    pub page_size: i32,
}

/// What a repair did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    /// Whether the compensation succeeded.
    pub succeeded: bool,
    /// The compensation and its outcome, or why it failed.
    pub detail: String,
}

/// A confirmed finding about one saga.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discrepancy {
    /// The saga.
    pub saga_id: String,
    /// Its status; None when the orchestrator has no such saga.
    pub saga_status: Option<SagaStatus>,
    /// What is wrong.
    pub finding: Finding,
    /// What a repair did, if one was made.
    pub repair: Option<Repair>,
}

/// The outcome of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// The first `limit` discrepancies, by saga id.
    pub discrepancies: Vec<Discrepancy>,
    /// Discrepancies found in all.
    pub found: i64,
    /// Sagas compared.
    pub sagas_checked: i64,
    /// Sagas skipped (in flight, NEEDS_ATTENTION).
    pub sagas_skipped: i64,
    /// Records read per participant, in [`Party::ALL`] order.
    pub records_checked: [i64; 3],
    /// Orphans compensated.
    pub repaired: i64,
    /// Orphans whose compensation failed.
    pub repair_failed: i64,
}

/// Something with a saga id, in a sorted stream.
trait Keyed {
    fn key(&self) -> &str;
}

impl Keyed for SagaBrief {
    fn key(&self) -> &str {
        &self.saga_id
    }
}

impl Keyed for Record {
    fn key(&self) -> &str {
        &self.saga_id
    }
}

/// One stream of the join: the page being consumed and where the next one
/// starts.
#[derive(Debug)]
struct Cursor<T> {
    source: &'static str,
    buffer: VecDeque<T>,
    /// The token of the next page; None once the stream is exhausted.
    next: Option<String>,
    /// The last key taken in, to check the order.
    last: Option<String>,
}

impl<T: Keyed> Cursor<T> {
    fn new(source: &'static str) -> Self {
        Self {
            source,
            buffer: VecDeque::new(),
            next: Some(String::new()),
            last: None,
        }
    }

    /// The token of the page to read now, if the buffer is empty and the
    /// stream is not exhausted.
    fn wants(&self) -> Option<String> {
        if self.buffer.is_empty() {
            self.next.clone()
        } else {
            None
        }
    }

    /// Takes in a page and the token of the next one (None: the last page).
    /// Refuses keys out of byte order, and a page that is empty but says
    /// more follow (which would never end).
    fn push(&mut self, rows: Vec<T>, next: Option<String>) -> Result<(), Error> {
        if rows.is_empty() && next.is_some() {
            return Err(Error::FailedPrecondition(format!(
                "{} answered an empty page that is not the last",
                self.source
            )));
        }
        for row in rows {
            if let Some(last) = &self.last
                && row.key() <= last.as_str()
            {
                return Err(Error::FailedPrecondition(format!(
                    "{} listed saga {:?} after {last:?}: not in byte order of saga ids (is its database's collation C?); Reconcile's merge join needs byte order",
                    self.source,
                    row.key()
                )));
            }
            self.last = Some(row.key().to_owned());
            self.buffer.push_back(row);
        }
        self.next = next;
        Ok(())
    }

    fn head(&self) -> Option<&str> {
        self.buffer.front().map(Keyed::key)
    }

    /// The head, if it is `saga_id`'s.
    fn take(&mut self, saga_id: &str) -> Option<T> {
        if self.head() == Some(saga_id) {
            self.buffer.pop_front()
        } else {
            None
        }
    }
}

fn unreachable_participant(party: Party, status: &Status) -> Error {
    Error::Unavailable(format!(
        "cannot read the {}'s records: {}: {}",
        party.name(),
        code_name(status.code()),
        status.message()
    ))
}

fn state_name(name: &str, prefix: &str) -> String {
    name.trim_start_matches(prefix).to_owned()
}

fn sorted_items(items: impl IntoIterator<Item = (String, i32)>) -> Vec<(String, i64)> {
    let mut items: Vec<(String, i64)> = items
        .into_iter()
        .map(|(product, quantity)| (product, i64::from(quantity)))
        .collect();
    items.sort();
    items
}

fn reservation(
    saga_id: String,
    state: i32,
    items: Vec<inventory::Item>,
    total_amount_cents: i64,
) -> Record {
    let state = inventory::ReservationState::try_from(state)
        .unwrap_or(inventory::ReservationState::Unspecified);
    Record {
        saga_id,
        active: state == inventory::ReservationState::Active,
        state: state_name(state.as_str_name(), "RESERVATION_STATE_"),
        items: sorted_items(items.into_iter().map(|i| (i.product_id, i.quantity))),
        amount_cents: total_amount_cents,
        customer_id: String::new(),
    }
}

fn charge(saga_id: String, state: i32, customer_id: String, amount_cents: i64) -> Record {
    let state = payment::ChargeState::try_from(state).unwrap_or(payment::ChargeState::Unspecified);
    Record {
        saga_id,
        active: state == payment::ChargeState::Charged,
        state: state_name(state.as_str_name(), "CHARGE_STATE_"),
        items: Vec::new(),
        amount_cents,
        customer_id,
    }
}

fn shipment(saga_id: String, state: i32, items: Vec<fulfillment::Item>) -> Record {
    let state = fulfillment::ShipmentState::try_from(state)
        .unwrap_or(fulfillment::ShipmentState::Unspecified);
    Record {
        saga_id,
        active: state == fulfillment::ShipmentState::Shipped,
        state: state_name(state.as_str_name(), "SHIPMENT_STATE_"),
        items: sorted_items(items.into_iter().map(|i| (i.product_id, i.quantity))),
        amount_cents: 0,
        customer_id: String::new(),
    }
}

/// One page of a participant's records, and the next page's token.
async fn list(
    clients: &RecordClients,
    party: Party,
    token: String,
    page_size: i32,
) -> Result<(Vec<Record>, Option<String>), Error> {
    let fail = |status: Status| unreachable_participant(party, &status);
    let (records, next): (Vec<Record>, String) = match party {
        Party::Inventory => {
            let page = clients
                .list_reservations(token, page_size)
                .await
                .map_err(fail)?;
            let records = page
                .reservations
                .into_iter()
                .map(|r| reservation(r.saga_id, r.state, r.items, r.total_amount_cents))
                .collect();
            (records, page.next_page_token)
        }
        Party::Payment => {
            let page = clients.list_charges(token, page_size).await.map_err(fail)?;
            let records = page
                .charges
                .into_iter()
                .map(|c| charge(c.saga_id, c.state, c.customer_id, c.amount_cents))
                .collect();
            (records, page.next_page_token)
        }
        Party::Fulfillment => {
            let page = clients
                .list_shipments(token, page_size)
                .await
                .map_err(fail)?;
            let records = page
                .shipments
                .into_iter()
                .map(|s| shipment(s.saga_id, s.state, s.items))
                .collect();
            (records, page.next_page_token)
        }
    };
    Ok((records, (!next.is_empty()).then_some(next)))
}

/// A participant's record of one saga, read now.
async fn read(
    clients: &RecordClients,
    party: Party,
    saga_id: &str,
) -> Result<Option<Record>, Error> {
    let fail = |status: Status| unreachable_participant(party, &status);
    Ok(match party {
        Party::Inventory => clients
            .reservation(saga_id)
            .await
            .map_err(fail)?
            .map(|r| reservation(r.saga_id, r.state, r.items, r.total_amount_cents)),
        Party::Payment => clients
            .charge(saga_id)
            .await
            .map_err(fail)?
            .map(|c| charge(c.saga_id, c.state, c.customer_id, c.amount_cents)),
        Party::Fulfillment => clients
            .shipment(saga_id)
            .await
            .map_err(fail)?
            .map(|s| shipment(s.saga_id, s.state, s.items)),
    })
}

/// Sends the compensation of `party` for the saga; the outcome's name.
async fn compensate(
    clients: &RecordClients,
    party: Party,
    saga_id: &str,
) -> Result<String, Status> {
    Ok(match party {
        Party::Inventory => clients.release(saga_id).await?.as_str_name().to_owned(),
        Party::Payment => clients.refund(saga_id).await?.as_str_name().to_owned(),
        Party::Fulfillment => clients
            .cancel_shipment(saga_id)
            .await?
            .as_str_name()
            .to_owned(),
    })
}

/// Runs the merge join over every saga and every record (see the module
/// docs); with `options.repair`, compensates the orphans.
pub async fn run(
    store: &dyn SagaStore,
    clients: &RecordClients,
    options: &Options,
) -> Result<Report, Error> {
    let page_size = options.page_size.max(1);
    let mut report = Report::default();
    let mut sagas: Cursor<SagaBrief> = Cursor::new("the orchestrator");
    let mut records: [Cursor<Record>; 3] = [
        Cursor::new("the inventory"),
        Cursor::new("the payment participant"),
        Cursor::new("the fulfillment participant"),
    ];
    loop {
        if let Some(after) = sagas.wants() {
            let page = store.sagas_by_id(&after, i64::from(page_size)).await?;
            let next = (page.len() >= page_size as usize)
                .then(|| page.last().map(|s| s.saga_id.clone()))
                .flatten();
            sagas.push(page, next)?;
        }
        for party in Party::ALL {
            let cursor = &mut records[party.index()];
            if let Some(token) = cursor.wants() {
                let (page, next) = list(clients, party, token, page_size).await?;
                cursor.push(page, next)?;
            }
        }
        let Some(saga_id) = std::iter::once(sagas.head())
            .chain(records.iter().map(Cursor::head))
            .flatten()
            .min()
            .map(str::to_owned)
        else {
            break;
        };
        let saga = sagas.take(&saga_id);
        let found: Vec<Option<Record>> = records.iter_mut().map(|c| c.take(&saga_id)).collect();
        for (count, record) in report.records_checked.iter_mut().zip(&found) {
            *count += i64::from(record.is_some());
        }
        match &saga {
            Some(saga) if !saga.status.is_terminal() => {
                report.sagas_skipped += 1;
                continue;
            }
            Some(_) => report.sagas_checked += 1,
            None => {}
        }
        let suspects: Vec<Party> = Party::ALL
            .into_iter()
            .filter(|party| !check(*party, saga.as_ref(), found[party.index()].as_ref()).is_empty())
            .collect();
        if !suspects.is_empty() {
            confirm(store, clients, options, &saga_id, &suspects, &mut report).await?;
        }
    }
    Ok(report)
}

/// Reads the saga and the suspected records again and reports (and
/// repairs) what is still wrong.
async fn confirm(
    store: &dyn SagaStore,
    clients: &RecordClients,
    options: &Options,
    saga_id: &str,
    suspects: &[Party],
    report: &mut Report,
) -> Result<(), Error> {
    let saga = store.load(saga_id).await?.map(|s| SagaBrief::from(&s));
    for &party in suspects {
        let record = read(clients, party, saga_id).await?;
        for finding in check(party, saga.as_ref(), record.as_ref()) {
            let repair = if options.repair && finding.kind == Kind::Orphan {
                let repair = repair(store, clients, options, saga.as_ref(), saga_id, party).await;
                if repair.succeeded {
                    report.repaired += 1;
                } else {
                    report.repair_failed += 1;
                }
                Some(repair)
            } else {
                None
            };
            tracing::warn!(
                saga_id,
                participant = party.name(),
                kind = ?finding.kind,
                expected = %finding.expected,
                found = %finding.found,
                repaired = ?repair.as_ref().map(|r| r.succeeded),
                "reconcile: {}",
                finding.detail
            );
            report.found += 1;
            if report.discrepancies.len() < options.limit {
                report.discrepancies.push(Discrepancy {
                    saga_id: saga_id.to_owned(),
                    saga_status: saga.as_ref().map(|s| s.status),
                    finding,
                    repair,
                });
            }
        }
    }
    Ok(())
}

/// Compensates an orphan and journals it on its saga, when there is one.
async fn repair(
    store: &dyn SagaStore,
    clients: &RecordClients,
    options: &Options,
    saga: Option<&SagaBrief>,
    saga_id: &str,
    party: Party,
) -> Repair {
    let rpc = party.compensation();
    let started_at = now_epoch();
    let result = compensate(clients, party, saga_id).await;
    let finished_at = now_epoch();
    let (mut repair, outcome) = match result {
        Ok(outcome) => (
            Repair {
                succeeded: true,
                detail: format!("{rpc}: {outcome}"),
            },
            JournalOutcome::Succeeded,
        ),
        Err(status) => (
            Repair {
                succeeded: false,
                detail: format!(
                    "{rpc} failed: {}: {}",
                    code_name(status.code()),
                    status.message()
                ),
            },
            match classify(&status) {
                Outcome::Retryable(_) => JournalOutcome::RetryableFailure,
                _ => JournalOutcome::Rejected,
            },
        ),
    };
    if let Some(saga) = saga {
        let entry = JournalEntry {
            step: "reconcile".to_owned(),
            kind: JournalKind::Control,
            attempt: 0,
            outcome,
            detail: format!(
                "reconcile repair: {} left {} for a {} saga; {}",
                party.record(),
                party.active_state(),
                saga.status,
                repair.detail
            ),
            rpc: rpc.to_owned(),
            actor: options.actor.clone(),
            started_at,
            finished_at: Some(finished_at),
        };
        if let Err(error) = store.append_journal(saga_id, &[entry]).await {
            tracing::warn!(%error, saga_id, "reconcile: the repair could not be journalled");
            repair
                .detail
                .push_str(&format!(" (not journalled: {error})"));
        }
    }
    repair
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saga(status: SagaStatus) -> SagaBrief {
        SagaBrief {
            saga_id: "s1".into(),
            status,
            customer_id: "alice".into(),
            items: vec![
                OrderItem {
                    product_id: "widget".into(),
                    quantity: 2,
                },
                OrderItem {
                    product_id: "gadget".into(),
                    quantity: 1,
                },
            ],
            total_amount_cents: 600,
        }
    }

    /// The record a COMPLETED `saga(..)` should have at `party`.
    fn good(party: Party) -> Record {
        Record {
            saga_id: "s1".into(),
            state: party.active_state().into(),
            active: true,
            items: match party {
                Party::Payment => vec![],
                _ => vec![("gadget".into(), 1), ("widget".into(), 2)],
            },
            amount_cents: match party {
                Party::Fulfillment => 0,
                _ => 600,
            },
            customer_id: match party {
                Party::Payment => "alice".into(),
                _ => String::new(),
            },
        }
    }

    fn inactive(party: Party, state: &str) -> Record {
        Record {
            state: state.into(),
            active: false,
            ..good(party)
        }
    }

    fn kinds(findings: &[Finding]) -> Vec<Kind> {
        findings.iter().map(|f| f.kind).collect()
    }

    #[test]
    fn a_completed_saga_with_matching_records_is_clean() {
        for party in Party::ALL {
            assert_eq!(
                check(
                    party,
                    Some(&saga(SagaStatus::Completed)),
                    Some(&good(party))
                ),
                vec![],
                "{party:?}"
            );
        }
    }

    #[test]
    fn active_records_of_failed_cancelled_or_unknown_sagas_are_orphans() {
        for party in Party::ALL {
            for status in [Some(SagaStatus::Failed), Some(SagaStatus::Cancelled), None] {
                let saga = status.map(saga);
                let findings = check(party, saga.as_ref(), Some(&good(party)));
                assert_eq!(kinds(&findings), [Kind::Orphan], "{party:?} {status:?}");
                let detail = &findings[0].detail;
                assert!(detail.contains(party.record()), "{detail}");
                match status {
                    Some(status) => assert!(detail.contains(status.as_str()), "{detail}"),
                    None => assert!(detail.contains("unknown"), "{detail}"),
                }
                // Released, refunded, cancelled or tombstoned: nothing wrong.
                for state in ["RELEASED", "TOMBSTONE"] {
                    let record = inactive(party, state);
                    assert_eq!(check(party, saga.as_ref(), Some(&record)), vec![]);
                }
                assert_eq!(check(party, saga.as_ref(), None), vec![]);
            }
        }
    }

    #[test]
    fn a_completed_saga_without_an_active_record_is_missing_it() {
        let completed = saga(SagaStatus::Completed);
        for party in Party::ALL {
            let findings = check(party, Some(&completed), None);
            assert_eq!(kinds(&findings), [Kind::Missing]);
            assert_eq!(
                (findings[0].expected.as_str(), findings[0].found.as_str()),
                (party.active_state(), "none")
            );
            let findings = check(party, Some(&completed), Some(&inactive(party, "TOMBSTONE")));
            assert_eq!(kinds(&findings), [Kind::Missing]);
            assert!(findings[0].found.starts_with("TOMBSTONE"), "{findings:?}");
        }
    }

    #[test]
    fn differing_items_amounts_and_customers_are_mismatches() {
        let completed = saga(SagaStatus::Completed);
        let more = |party| Record {
            items: vec![("gadget".into(), 1), ("widget".into(), 3)],
            ..good(party)
        };
        let findings = check(
            Party::Inventory,
            Some(&completed),
            Some(&more(Party::Inventory)),
        );
        assert_eq!(kinds(&findings), [Kind::Mismatch]);
        assert_eq!(findings[0].expected, "gadget x1, widget x2");
        assert_eq!(findings[0].found, "gadget x1, widget x3");
        let findings = check(
            Party::Fulfillment,
            Some(&completed),
            Some(&more(Party::Fulfillment)),
        );
        assert_eq!(kinds(&findings), [Kind::Mismatch]);

        let dearer = |party| Record {
            amount_cents: 700,
            ..good(party)
        };
        for party in [Party::Inventory, Party::Payment] {
            let findings = check(party, Some(&completed), Some(&dearer(party)));
            assert_eq!(kinds(&findings), [Kind::Mismatch], "{party:?}");
            assert_eq!(
                (findings[0].expected.as_str(), findings[0].found.as_str()),
                ("600 cents", "700 cents")
            );
        }
        let bob = Record {
            customer_id: "bob".into(),
            amount_cents: 1,
            ..good(Party::Payment)
        };
        let findings = check(Party::Payment, Some(&completed), Some(&bob));
        assert_eq!(kinds(&findings), [Kind::Mismatch, Kind::Mismatch]);
        assert_eq!(findings[1].found, "bob");
    }

    #[test]
    fn sagas_in_flight_or_needing_attention_are_not_checked() {
        for status in SagaStatus::ALL.into_iter().filter(|s| !s.is_terminal()) {
            for party in Party::ALL {
                let saga = saga(status);
                assert_eq!(check(party, Some(&saga), Some(&good(party))), vec![]);
                assert_eq!(check(party, Some(&saga), None), vec![]);
            }
        }
    }

    fn keyed(ids: &[&str]) -> Vec<Record> {
        ids.iter()
            .map(|id| Record {
                saga_id: (*id).into(),
                ..good(Party::Inventory)
            })
            .collect()
    }

    #[test]
    fn cursors_take_pages_in_byte_order_and_refuse_anything_else() {
        let mut cursor = Cursor::new("test");
        assert_eq!(cursor.wants(), Some(String::new()));
        cursor.push(keyed(&["a", "b"]), Some("b".into())).unwrap();
        assert_eq!(cursor.wants(), None, "a page is buffered");
        assert_eq!(cursor.take("b"), None, "only the head is taken");
        assert!(cursor.take("a").is_some());
        assert!(cursor.take("b").is_some());
        assert_eq!(cursor.wants(), Some("b".into()));
        cursor.push(keyed(&["c"]), None).unwrap();
        assert!(cursor.take("c").is_some());
        assert_eq!(cursor.wants(), None, "exhausted");
        assert_eq!(cursor.head(), None);

        // Uppercase sorts before lowercase in bytes, not in most locales.
        let mut cursor = Cursor::new("test");
        let error = cursor.push(keyed(&["b", "B"]), None).unwrap_err();
        assert!(error.to_string().contains("byte order"), "{error}");
        let mut cursor = Cursor::new("test");
        cursor.push(keyed(&["a"]), Some("a".into())).unwrap();
        cursor.take("a");
        assert!(cursor.push(keyed(&["a"]), None).is_err(), "a repeated key");
        let mut cursor = Cursor::<Record>::new("test");
        assert!(
            cursor.push(vec![], Some("x".into())).is_err(),
            "an empty page that is not the last would loop forever"
        );
    }
}
