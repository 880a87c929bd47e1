//! One conformance suite for the participants' stores, run on both backends:
//! every test below is a function of the [`Kind`] of database, and the
//! `conformance!` macro instantiates it twice, as `postgres::NAME` (a fresh
//! PostgreSQL database from the harness) and `sqlite::NAME` (a fresh SQLite
//! file under the temp directory). Same calls, same expectations: the two
//! implementations must be indistinguishable through the store traits.
//!
//! The gRPC faces are covered over the wire in `tests/tests/it/`.

use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::Error;
use common::domain::{Cents, Id, Items, MAX_MONEY_CENTS, MAX_PRICE_OR_STOCK};
use harness::TestDb;
use participants::fulfillment::CancelOutcome;
use participants::inventory::{InventoryStore, ReleaseOutcome};
use participants::payment::RefundOutcome;
use participants::{Backend, Participant};

/// Which backend a test runs on.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Postgres,
    Sqlite,
}

/// A fresh database for one test; removed when dropped.
struct Db {
    backend: Backend,
    // Dropped after the pool.
    _postgres: Option<TestDb>,
    _sqlite: Option<TempFile>,
}

impl Db {
    async fn open(kind: Kind, participant: Participant) -> Self {
        match kind {
            Kind::Postgres => {
                let db = TestDb::create(participant.name())
                    .await
                    .expect("test database");
                let backend = connect(participant, db.url()).await;
                Self {
                    backend,
                    _postgres: Some(db),
                    _sqlite: None,
                }
            }
            Kind::Sqlite => {
                let file = TempFile::new(participant.name());
                let backend = connect(participant, &file.url()).await;
                Self {
                    backend,
                    _postgres: None,
                    _sqlite: Some(file),
                }
            }
        }
    }
}

async fn connect(participant: Participant, url: &str) -> Backend {
    participants::connect(participant, url, 4, Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"))
}

/// A SQLite database path under the temp directory, unique to this test;
/// the file and its WAL companions are removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(label: &str) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let test = std::thread::current()
            .name()
            .unwrap_or("test")
            .replace("::", "-");
        Self(std::env::temp_dir().join(format!(
            "participants-{test}-{label}-{}-{}.db",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        )))
    }

    fn url(&self) -> String {
        format!("sqlite:{}", self.0.display())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut path = self.0.clone().into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
    }
}

fn id(value: &str) -> Id {
    Id::parse("id", value.to_owned()).expect("valid id")
}

fn items(raw: &[(&str, i32)]) -> Items {
    Items::parse(raw.iter().map(|(p, q)| (p.to_string(), *q))).expect("valid items")
}

fn stock(value: i64) -> Cents {
    Cents::parse("stock", value, MAX_PRICE_OR_STOCK).expect("valid stock")
}

fn money(value: i64) -> Cents {
    Cents::parse("cents", value, MAX_MONEY_CENTS).expect("valid cents")
}

/// The message of an expected error variant.
macro_rules! rejected {
    ($result:expr, $variant:path) => {
        match $result {
            Err($variant(message)) => message,
            other => panic!("expected {}, got {other:?}", stringify!($variant)),
        }
    };
}

/// Runs the futures on tasks of their own, all at once.
async fn all<F>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut outputs = Vec::with_capacity(handles.len());
    for handle in handles {
        outputs.push(handle.await.expect("task panicked"));
    }
    outputs
}

#[track_caller]
fn assert_all_same<T: PartialEq + Debug>(values: &[T]) {
    assert!(values.windows(2).all(|w| w[0] == w[1]), "{values:?}");
}

/// Instantiates every test on both backends.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::Kind::Postgres).await
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::Kind::Sqlite).await
                }
            )*
        }
    };
}

conformance!(
    reserve_takes_stock_and_prices_it,
    reserve_replay_returns_the_first_result_and_writes_once,
    reserve_replay_with_other_items_is_refused,
    release_puts_stock_back_once_and_refuses_a_late_reserve,
    release_before_reserve_leaves_a_tombstone,
    reserve_rejections_name_the_cause_and_write_nothing,
    products_are_upserted_read_and_listed,
    concurrent_reserves_never_oversell,
    concurrent_replays_reserve_once,
    reserve_racing_release_ends_consistent,
    charge_debits_and_replays_the_first_result,
    charge_replay_with_other_parameters_is_refused,
    refund_credits_once_and_refuses_a_late_charge,
    refund_before_charge_leaves_a_tombstone,
    charge_rejections_name_the_cause_and_write_nothing,
    concurrent_charges_never_overdraw,
    concurrent_replays_charge_once,
    ship_records_the_shipment_and_replays_it,
    cancel_shipment_once_and_refuse_a_late_ship,
    cancel_before_ship_leaves_a_tombstone,
    concurrent_replays_ship_once,
    // Group commit: many calls of each kind at once, so that batches mix them.
    concurrent_multi_item_reserves_never_oversell,
    concurrent_new_sagas_and_replays_reserve_once,
    an_unknown_product_fails_only_its_own_reserve,
    tombstones_refuse_only_their_own_reserve,
    concurrent_conflicting_reserves_of_one_saga_keep_one,
    reserves_replays_and_releases_race_without_deadlock,
    concurrent_charges_of_mixed_amounts_never_overdraw,
    concurrent_new_sagas_and_replays_charge_once,
    an_unknown_account_fails_only_its_own_charge,
    tombstones_refuse_only_their_own_charge,
    concurrent_conflicting_charges_of_one_saga_keep_one,
    charges_replays_and_refunds_race_without_deadlock,
    concurrent_new_sagas_and_replays_ship_once,
    tombstones_refuse_only_their_own_ship,
    // Listings for reconciliation: every record, in saga-id pages.
    reservations_are_listed_in_saga_id_pages,
    charges_are_listed_in_saga_id_pages,
    shipments_are_listed_in_saga_id_pages,
);

// ---------------------------------------------------------------- inventory

/// An inventory store with products `p1` (250 cents, 10 units) and `p2`
/// (100 cents, 5 units).
async fn inventory(kind: Kind) -> (Db, Arc<dyn InventoryStore>) {
    let db = Db::open(kind, Participant::Inventory).await;
    let store = db.backend.inventory();
    store
        .upsert_product(&id("p1"), "Widget", money(250), stock(10))
        .await
        .expect("upsert p1");
    store
        .upsert_product(&id("p2"), "Gadget", money(100), stock(5))
        .await
        .expect("upsert p2");
    (db, store)
}

/// (stock, reserved) of a product.
async fn levels(store: &Arc<dyn InventoryStore>, product: &str) -> (i64, i64) {
    let p = store.product(&id(product)).await.expect("product");
    (p.stock, p.reserved)
}

async fn reserve_takes_stock_and_prices_it(kind: Kind) {
    let (_db, store) = inventory(kind).await;
    let reserved = store
        .reserve(&id("s1"), &items(&[("p2", 2), ("p1", 3)]))
        .await
        .expect("reserve");
    assert_eq!(reserved.total_amount_cents, 3 * 250 + 2 * 100);
    assert!(reserved.reservation_id.starts_with("rsv_"), "{reserved:?}");
    assert_eq!(levels(&store, "p1").await, (7, 3));
    assert_eq!(levels(&store, "p2").await, (3, 2));

    let record = store
        .reservation(&id("s1"))
        .await
        .expect("read")
        .expect("record");
    assert_eq!(record.state, "ACTIVE");
    assert_eq!(record.reservation_id, Some(reserved.reservation_id));
    assert_eq!(record.items, (vec!["p1".into(), "p2".into()], vec![3, 2]));
    assert_eq!(record.total_amount_cents, 950);
    assert_eq!(store.reservation(&id("s2")).await.expect("read"), None);
}

async fn reserve_replay_returns_the_first_result_and_writes_once(kind: Kind) {
    let (_db, store) = inventory(kind).await;
    let order = items(&[("p1", 3), ("p2", 1)]);
    let first = store.reserve(&id("s1"), &order).await.expect("reserve");
    // Same items in another order are the same request.
    let reordered = items(&[("p2", 1), ("p1", 3)]);
    for request in [&order, &reordered, &order] {
        let again = store.reserve(&id("s1"), request).await.expect("replay");
        assert_eq!(again, first);
    }
    assert_eq!(levels(&store, "p1").await, (7, 3));
    assert_eq!(levels(&store, "p2").await, (4, 1));
}

async fn reserve_replay_with_other_items_is_refused(kind: Kind) {
    let (_db, store) = inventory(kind).await;
    store
        .reserve(&id("s1"), &items(&[("p1", 3)]))
        .await
        .expect("reserve");
    for other in [items(&[("p1", 4)]), items(&[("p1", 3), ("p2", 1)])] {
        let message = rejected!(
            store.reserve(&id("s1"), &other).await,
            Error::InvalidArgument
        );
        assert!(message.contains("s1"), "{message}");
    }
    assert_eq!(levels(&store, "p1").await, (7, 3));
    assert_eq!(levels(&store, "p2").await, (5, 0));
}

async fn release_puts_stock_back_once_and_refuses_a_late_reserve(kind: Kind) {
    let (_db, store) = inventory(kind).await;
    let order = items(&[("p1", 3), ("p2", 2)]);
    let reserved = store.reserve(&id("s1"), &order).await.expect("reserve");
    assert_eq!(
        store.release(&id("s1")).await.expect("release"),
        ReleaseOutcome::Released
    );
    assert_eq!(levels(&store, "p1").await, (10, 0));
    assert_eq!(levels(&store, "p2").await, (5, 0));
    assert_eq!(
        store.release(&id("s1")).await.expect("release again"),
        ReleaseOutcome::AlreadyReleased
    );
    assert_eq!(levels(&store, "p1").await, (10, 0));

    let message = rejected!(
        store.reserve(&id("s1"), &order).await,
        Error::FailedPrecondition
    );
    assert!(message.contains("compensated"), "{message}");
    assert_eq!(levels(&store, "p1").await, (10, 0));
    let record = store
        .reservation(&id("s1"))
        .await
        .expect("read")
        .expect("record");
    assert_eq!(record.state, "RELEASED");
    assert_eq!(record.reservation_id, Some(reserved.reservation_id));
}

async fn release_before_reserve_leaves_a_tombstone(kind: Kind) {
    let (_db, store) = inventory(kind).await;
    assert_eq!(
        store.release(&id("s1")).await.expect("release"),
        ReleaseOutcome::Tombstoned
    );
    let record = store
        .reservation(&id("s1"))
        .await
        .expect("read")
        .expect("tombstone");
    assert_eq!(record.state, "TOMBSTONE");
    assert_eq!(record.reservation_id, None);
    assert_eq!(record.items, (vec![], vec![]));

    let message = rejected!(
        store.reserve(&id("s1"), &items(&[("p1", 1)])).await,
        Error::FailedPrecondition
    );
    assert!(message.contains("tombstone"), "{message}");
    assert_eq!(levels(&store, "p1").await, (10, 0));
    // A repeated compensation finds the tombstone and changes nothing.
    assert_eq!(
        store.release(&id("s1")).await.expect("release again"),
        ReleaseOutcome::Tombstoned
    );
}

async fn reserve_rejections_name_the_cause_and_write_nothing(kind: Kind) {
    let (_db, store) = inventory(kind).await;

    // p1 fits, p2 is short: all or nothing.
    let message = rejected!(
        store
            .reserve(&id("s1"), &items(&[("p1", 4), ("p2", 8)]))
            .await,
        Error::FailedPrecondition
    );
    assert!(message.contains("out of stock"), "{message}");
    assert!(message.contains("p2"), "{message}");
    assert!(message.contains("short by 3"), "{message}");
    assert!(!message.contains("p1"), "only the short product: {message}");

    // Every shortfall is named.
    let message = rejected!(
        store
            .reserve(&id("s1"), &items(&[("p1", 11), ("p2", 6)]))
            .await,
        Error::FailedPrecondition
    );
    assert!(
        message.contains("short by 1") && message.contains("p1") && message.contains("p2"),
        "{message}"
    );

    let message = rejected!(
        store
            .reserve(&id("s1"), &items(&[("p1", 1), ("ghost", 1)]))
            .await,
        Error::NotFound
    );
    assert!(message.contains("unknown product ghost"), "{message}");

    assert_eq!(levels(&store, "p1").await, (10, 0));
    assert_eq!(levels(&store, "p2").await, (5, 0));
    assert_eq!(store.reservation(&id("s1")).await.expect("read"), None);

    // Nothing was recorded, so the saga can still reserve.
    store
        .reserve(&id("s1"), &items(&[("p1", 10)]))
        .await
        .expect("reserve after rejections");
    assert_eq!(levels(&store, "p1").await, (0, 10));
}

async fn products_are_upserted_read_and_listed(kind: Kind) {
    let (_db, store) = inventory(kind).await;
    let message = rejected!(store.product(&id("ghost")).await, Error::NotFound);
    assert!(message.contains("unknown product ghost"), "{message}");

    store
        .reserve(&id("s1"), &items(&[("p1", 4)]))
        .await
        .expect("reserve");
    // An upsert replaces name, price and available stock, not what is held.
    let updated = store
        .upsert_product(&id("p1"), "Widget v2", money(300), stock(20))
        .await
        .expect("upsert");
    assert_eq!(
        (
            updated.name.as_str(),
            updated.price_cents,
            updated.stock,
            updated.reserved
        ),
        ("Widget v2", 300, 20, 4)
    );
    assert_eq!(store.product(&id("p1")).await.expect("read"), updated);

    store
        .upsert_product(&id("p3"), "", money(0), stock(0))
        .await
        .expect("upsert p3");
    let names = |products: Vec<participants::inventory::Product>| {
        products
            .into_iter()
            .map(|p| p.product_id)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(store.products("", 2).await.expect("page 1")),
        ["p1", "p2"]
    );
    assert_eq!(
        names(store.products("p2", 2).await.expect("page 2")),
        ["p3"]
    );
    assert!(store.products("p3", 2).await.expect("page 3").is_empty());
}

async fn concurrent_reserves_never_oversell(kind: Kind) {
    let (_db, store) = inventory(kind).await;
    let results = all((0..64).map(|i| {
        let store = Arc::clone(&store);
        async move {
            store
                .reserve(&id(&format!("s{i}")), &items(&[("p1", 1)]))
                .await
        }
    }))
    .await;
    let succeeded = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(succeeded, 10, "{results:?}");
    for result in results.into_iter().filter(Result::is_err) {
        let message = rejected!(result, Error::FailedPrecondition);
        assert!(message.contains("out of stock"), "{message}");
    }
    assert_eq!(levels(&store, "p1").await, (0, 10));
}

async fn concurrent_replays_reserve_once(kind: Kind) {
    let (_db, store) = inventory(kind).await;
    let results = all((0..16).map(|_| {
        let store = Arc::clone(&store);
        async move {
            store
                .reserve(&id("s1"), &items(&[("p1", 2), ("p2", 1)]))
                .await
                .expect("reserve or replay")
        }
    }))
    .await;
    assert_all_same(&results);
    assert_eq!(levels(&store, "p1").await, (8, 2));
    assert_eq!(levels(&store, "p2").await, (4, 1));
}

async fn reserve_racing_release_ends_consistent(kind: Kind) {
    let (_db, store) = inventory(kind).await;
    let results = all((0..20).map(|i| {
        let store = Arc::clone(&store);
        async move {
            let saga = id(&format!("s{i}"));
            let order = items(&[("p1", 1)]);
            let (reserved, released) =
                tokio::join!(store.reserve(&saga, &order), store.release(&saga));
            (reserved, released.expect("release"))
        }
    }))
    .await;
    for (reserved, released) in results {
        match released {
            // The reserve came first and was undone.
            ReleaseOutcome::Released => assert!(reserved.is_ok(), "{reserved:?}"),
            // The release came first; the late reserve is refused.
            ReleaseOutcome::Tombstoned => {
                let message = rejected!(reserved, Error::FailedPrecondition);
                assert!(message.contains("tombstone"), "{message}");
            }
            ReleaseOutcome::AlreadyReleased => panic!("released once only"),
        }
    }
    assert_eq!(levels(&store, "p1").await, (10, 0));
}

// ------------------------------------------------------------------ payment

/// A payment store with account `alice` holding `balance` cents.
async fn payment(kind: Kind, balance: i64) -> (Db, Arc<dyn participants::payment::PaymentStore>) {
    let db = Db::open(kind, Participant::Payment).await;
    let store = db.backend.payment();
    assert_eq!(
        store
            .upsert_account(&id("alice"), money(balance))
            .await
            .expect("upsert"),
        balance
    );
    (db, store)
}

async fn charge_debits_and_replays_the_first_result(kind: Kind) {
    let (_db, store) = payment(kind, 1000).await;
    let charge_id = store
        .charge(&id("s1"), &id("alice"), money(300))
        .await
        .expect("charge");
    assert!(charge_id.starts_with("chg_"), "{charge_id}");
    assert_eq!(store.balance(&id("alice")).await.expect("balance"), 700);
    for _ in 0..2 {
        let again = store
            .charge(&id("s1"), &id("alice"), money(300))
            .await
            .expect("replay");
        assert_eq!(again, charge_id);
    }
    assert_eq!(store.balance(&id("alice")).await.expect("balance"), 700);
    let record = store
        .charge_record(&id("s1"))
        .await
        .expect("read")
        .expect("record");
    assert_eq!(record.state, "CHARGED");
    assert_eq!(record.charge_id, Some(charge_id));
    assert_eq!(record.customer_id.as_deref(), Some("alice"));
    assert_eq!(record.amount_cents, 300);
}

async fn charge_replay_with_other_parameters_is_refused(kind: Kind) {
    let (_db, store) = payment(kind, 1000).await;
    store
        .upsert_account(&id("bob"), money(1000))
        .await
        .expect("upsert bob");
    store
        .charge(&id("s1"), &id("alice"), money(300))
        .await
        .expect("charge");
    for (customer, amount) in [("alice", 301), ("bob", 300)] {
        let message = rejected!(
            store.charge(&id("s1"), &id(customer), money(amount)).await,
            Error::InvalidArgument
        );
        assert!(message.contains("s1"), "{message}");
    }
    assert_eq!(store.balance(&id("alice")).await.expect("balance"), 700);
    assert_eq!(store.balance(&id("bob")).await.expect("balance"), 1000);
}

async fn refund_credits_once_and_refuses_a_late_charge(kind: Kind) {
    let (_db, store) = payment(kind, 1000).await;
    store
        .charge(&id("s1"), &id("alice"), money(300))
        .await
        .expect("charge");
    assert_eq!(
        store.refund(&id("s1")).await.expect("refund"),
        RefundOutcome::Refunded
    );
    assert_eq!(store.balance(&id("alice")).await.expect("balance"), 1000);
    assert_eq!(
        store.refund(&id("s1")).await.expect("refund again"),
        RefundOutcome::AlreadyRefunded
    );
    assert_eq!(store.balance(&id("alice")).await.expect("balance"), 1000);

    let message = rejected!(
        store.charge(&id("s1"), &id("alice"), money(300)).await,
        Error::FailedPrecondition
    );
    assert!(message.contains("compensated"), "{message}");
    assert_eq!(store.balance(&id("alice")).await.expect("balance"), 1000);
    let record = store
        .charge_record(&id("s1"))
        .await
        .expect("read")
        .expect("record");
    assert_eq!(record.state, "REFUNDED");
}

async fn refund_before_charge_leaves_a_tombstone(kind: Kind) {
    let (_db, store) = payment(kind, 1000).await;
    assert_eq!(
        store.refund(&id("s1")).await.expect("refund"),
        RefundOutcome::Tombstoned
    );
    let record = store
        .charge_record(&id("s1"))
        .await
        .expect("read")
        .expect("tombstone");
    assert_eq!(record.state, "TOMBSTONE");
    assert_eq!(
        (record.charge_id, record.customer_id, record.amount_cents),
        (None, None, 0)
    );

    let message = rejected!(
        store.charge(&id("s1"), &id("alice"), money(300)).await,
        Error::FailedPrecondition
    );
    assert!(message.contains("tombstone"), "{message}");
    assert_eq!(store.balance(&id("alice")).await.expect("balance"), 1000);
    assert_eq!(
        store.refund(&id("s1")).await.expect("refund again"),
        RefundOutcome::Tombstoned
    );
}

async fn charge_rejections_name_the_cause_and_write_nothing(kind: Kind) {
    let (_db, store) = payment(kind, 100).await;
    let message = rejected!(
        store.charge(&id("s1"), &id("alice"), money(250)).await,
        Error::FailedPrecondition
    );
    assert!(message.contains("insufficient funds"), "{message}");
    assert!(message.contains("alice"), "{message}");
    assert!(message.contains("short by 150"), "{message}");

    let message = rejected!(
        store.charge(&id("s2"), &id("ghost"), money(1)).await,
        Error::NotFound
    );
    assert!(message.contains("unknown account ghost"), "{message}");
    let message = rejected!(store.balance(&id("ghost")).await, Error::NotFound);
    assert!(message.contains("unknown account ghost"), "{message}");

    assert_eq!(store.balance(&id("alice")).await.expect("balance"), 100);
    assert_eq!(store.charge_record(&id("s1")).await.expect("read"), None);
    assert_eq!(store.charge_record(&id("s2")).await.expect("read"), None);

    // Nothing was recorded, so the saga can still charge.
    store
        .charge(&id("s1"), &id("alice"), money(100))
        .await
        .expect("charge after rejections");
    assert_eq!(store.balance(&id("alice")).await.expect("balance"), 0);
}

async fn concurrent_charges_never_overdraw(kind: Kind) {
    let (_db, store) = payment(kind, 1000).await;
    let results = all((0..50).map(|i| {
        let store = Arc::clone(&store);
        async move {
            store
                .charge(&id(&format!("s{i}")), &id("alice"), money(100))
                .await
        }
    }))
    .await;
    let succeeded = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(succeeded, 10, "{results:?}");
    for result in results.into_iter().filter(Result::is_err) {
        let message = rejected!(result, Error::FailedPrecondition);
        assert!(message.contains("insufficient funds"), "{message}");
    }
    assert_eq!(store.balance(&id("alice")).await.expect("balance"), 0);
}

async fn concurrent_replays_charge_once(kind: Kind) {
    let (_db, store) = payment(kind, 1000).await;
    let results = all((0..16).map(|_| {
        let store = Arc::clone(&store);
        async move {
            store
                .charge(&id("s1"), &id("alice"), money(300))
                .await
                .expect("charge or replay")
        }
    }))
    .await;
    assert_all_same(&results);
    assert_eq!(store.balance(&id("alice")).await.expect("balance"), 700);
}

// -------------------------------------------------------------- fulfillment

async fn fulfillment(kind: Kind) -> (Db, Arc<dyn participants::fulfillment::FulfillmentStore>) {
    let db = Db::open(kind, Participant::Fulfillment).await;
    let store = db.backend.fulfillment();
    (db, store)
}

async fn ship_records_the_shipment_and_replays_it(kind: Kind) {
    let (_db, store) = fulfillment(kind).await;
    assert_eq!(store.shipment(&id("s1")).await.expect("read"), None);
    let order = items(&[("p2", 1), ("p1", 2)]);
    let shipment_id = store.ship(&id("s1"), &order).await.expect("ship");
    assert!(shipment_id.starts_with("shp_"), "{shipment_id}");
    let again = store
        .ship(&id("s1"), &items(&[("p1", 2), ("p2", 1)]))
        .await
        .expect("replay");
    assert_eq!(again, shipment_id);

    let message = rejected!(
        store.ship(&id("s1"), &items(&[("p1", 2)])).await,
        Error::InvalidArgument
    );
    assert!(message.contains("s1"), "{message}");

    let record = store
        .shipment(&id("s1"))
        .await
        .expect("read")
        .expect("record");
    assert_eq!(record.state, "SHIPPED");
    assert_eq!(record.shipment_id, Some(shipment_id));
    assert_eq!(record.items, (vec!["p1".into(), "p2".into()], vec![2, 1]));
}

async fn cancel_shipment_once_and_refuse_a_late_ship(kind: Kind) {
    let (_db, store) = fulfillment(kind).await;
    let order = items(&[("p1", 2)]);
    store.ship(&id("s1"), &order).await.expect("ship");
    assert_eq!(
        store.cancel(&id("s1")).await.expect("cancel"),
        CancelOutcome::Cancelled
    );
    assert_eq!(
        store.cancel(&id("s1")).await.expect("cancel again"),
        CancelOutcome::AlreadyCancelled
    );
    let message = rejected!(
        store.ship(&id("s1"), &order).await,
        Error::FailedPrecondition
    );
    assert!(message.contains("compensated"), "{message}");
    let record = store
        .shipment(&id("s1"))
        .await
        .expect("read")
        .expect("record");
    assert_eq!(record.state, "CANCELLED");
}

async fn cancel_before_ship_leaves_a_tombstone(kind: Kind) {
    let (_db, store) = fulfillment(kind).await;
    assert_eq!(
        store.cancel(&id("s1")).await.expect("cancel"),
        CancelOutcome::Tombstoned
    );
    let message = rejected!(
        store.ship(&id("s1"), &items(&[("p1", 1)])).await,
        Error::FailedPrecondition
    );
    assert!(message.contains("tombstone"), "{message}");
    let record = store
        .shipment(&id("s1"))
        .await
        .expect("read")
        .expect("tombstone");
    assert_eq!(record.state, "TOMBSTONE");
    assert_eq!(record.shipment_id, None);
    assert_eq!(record.items, (vec![], vec![]));
    assert_eq!(
        store.cancel(&id("s1")).await.expect("cancel again"),
        CancelOutcome::Tombstoned
    );
}

async fn concurrent_replays_ship_once(kind: Kind) {
    let (_db, store) = fulfillment(kind).await;
    let results = all((0..16).map(|_| {
        let store = Arc::clone(&store);
        async move {
            store
                .ship(&id("s1"), &items(&[("p1", 1), ("p2", 3)]))
                .await
                .expect("ship or replay")
        }
    }))
    .await;
    assert_all_same(&results);
    let record = store
        .shipment(&id("s1"))
        .await
        .expect("read")
        .expect("record");
    assert_eq!(record.items, (vec!["p1".into(), "p2".into()], vec![1, 3]));
}

// ------------------------------------------------------------ group commit
//
// On PostgreSQL concurrent Reserves, Charges and Ships are written in
// batches, with every request the batch does not apply sent down the
// single-request path. These tests put many calls in flight at once so that
// batches mix the cases (new sagas, replays, tombstones, unknown products or
// accounts, shortfalls, a saga twice), and check the exact answers and
// totals, which must also hold on SQLite.

/// How many of the reserves succeeded.
fn reserved_ok(results: &[Result<participants::inventory::Reserved, Error>]) -> usize {
    results.iter().filter(|r| r.is_ok()).count()
}

async fn concurrent_multi_item_reserves_never_oversell(kind: Kind) {
    let db = Db::open(kind, Participant::Inventory).await;
    let store = db.backend.inventory();
    for (product, price, units) in [("hot", 300, 40), ("x", 20, 1000), ("y", 1, 1000)] {
        store
            .upsert_product(&id(product), "", money(price), stock(units))
            .await
            .expect("upsert");
    }
    // Every order takes one unit of `hot` (40 in stock), some also `x` or
    // `y`, each listing its items in its own order.
    let order = |i: usize| match i % 4 {
        0 => items(&[("hot", 1)]),
        1 => items(&[("x", 2), ("hot", 1)]),
        2 => items(&[("hot", 1), ("y", 3), ("x", 2)]),
        _ => items(&[("y", 3), ("hot", 1)]),
    };
    let price = |i: usize| match i % 4 {
        0 => 300,
        1 => 300 + 40,
        2 => 300 + 3 + 40,
        _ => 300 + 3,
    };
    let results = all((0..100).map(|i| {
        let store = Arc::clone(&store);
        async move { store.reserve(&id(&format!("s{i}")), &order(i)).await }
    }))
    .await;
    assert_eq!(reserved_ok(&results), 40, "{results:?}");

    let (mut x, mut y) = (0, 0);
    for (i, result) in results.into_iter().enumerate() {
        let record = store
            .reservation(&id(&format!("s{i}")))
            .await
            .expect("read");
        match result {
            Ok(reserved) => {
                assert_eq!(reserved.total_amount_cents, price(i), "s{i}");
                let record = record.expect("a record for every success");
                assert_eq!(record.state, "ACTIVE");
                assert_eq!(record.reservation_id, Some(reserved.reservation_id));
                assert_eq!(record.items, order(i).sorted_columns(), "s{i}");
                assert_eq!(record.total_amount_cents, price(i));
                x += if i % 4 == 1 || i % 4 == 2 { 2 } else { 0 };
                y += if i % 4 == 2 || i % 4 == 3 { 3 } else { 0 };
            }
            Err(_) => {
                let message = rejected!(result, Error::FailedPrecondition);
                assert!(message.contains("out of stock"), "{message}");
                assert!(message.contains("product hot"), "{message}");
                assert_eq!(record, None, "a rejection writes nothing");
            }
        }
    }
    assert_eq!(levels(&store, "hot").await, (0, 40));
    assert_eq!(levels(&store, "x").await, (1000 - x, x));
    assert_eq!(levels(&store, "y").await, (1000 - y, y));
}

async fn concurrent_new_sagas_and_replays_reserve_once(kind: Kind) {
    let (_db, store) = inventory(kind).await;
    for product in ["p1", "p2"] {
        store
            .upsert_product(&id(product), "", money(10), stock(100))
            .await
            .expect("upsert");
    }
    let order = |i: usize| {
        if i.is_multiple_of(2) {
            items(&[("p1", 1)])
        } else {
            items(&[("p2", 1), ("p1", 1)])
        }
    };
    // s0..s4 reserved before; s0..s19 then each called three times at once.
    let mut first = Vec::new();
    for i in 0..5 {
        first.push(
            store
                .reserve(&id(&format!("s{i}")), &order(i))
                .await
                .expect("reserve"),
        );
    }
    let results = all((0..60).map(|n| {
        let store = Arc::clone(&store);
        let i = n % 20;
        async move {
            let reserved = store.reserve(&id(&format!("s{i}")), &order(i)).await;
            (i, reserved.expect("reserve or replay"))
        }
    }))
    .await;
    for i in 0..20 {
        let answers: Vec<_> = results
            .iter()
            .filter(|(saga, _)| *saga == i)
            .map(|(_, reserved)| reserved.clone())
            .collect();
        assert_eq!(answers.len(), 3);
        assert_all_same(&answers);
        if let Some(earlier) = first.get(i) {
            assert_eq!(&answers[0], earlier, "s{i} replays its first result");
        }
        let record = store
            .reservation(&id(&format!("s{i}")))
            .await
            .expect("read")
            .expect("record");
        assert_eq!(
            record.reservation_id.as_deref(),
            Some(&*answers[0].reservation_id)
        );
        assert_eq!(record.items, order(i).sorted_columns());
    }
    // 20 sagas: every one takes a p1, the 10 odd ones a p2 too.
    assert_eq!(levels(&store, "p1").await, (80, 20));
    assert_eq!(levels(&store, "p2").await, (90, 10));
}

async fn an_unknown_product_fails_only_its_own_reserve(kind: Kind) {
    let (_db, store) = inventory(kind).await;
    for product in ["p1", "p2"] {
        store
            .upsert_product(&id(product), "", money(10), stock(100))
            .await
            .expect("upsert");
    }
    let results = all((0..30).map(|i| {
        let store = Arc::clone(&store);
        let order = if i % 5 == 0 {
            items(&[("p1", 1), ("ghost", 1)])
        } else {
            items(&[("p2", 1), ("p1", 2)])
        };
        async move { (i, store.reserve(&id(&format!("s{i}")), &order).await) }
    }))
    .await;
    for (i, result) in results {
        if i % 5 == 0 {
            let message = rejected!(result, Error::NotFound);
            assert!(message.contains("unknown product ghost"), "{message}");
            let record = store
                .reservation(&id(&format!("s{i}")))
                .await
                .expect("read");
            assert_eq!(record, None);
        } else {
            assert_eq!(result.expect("reserve").total_amount_cents, 30);
        }
    }
    assert_eq!(levels(&store, "p1").await, (100 - 48, 48));
    assert_eq!(levels(&store, "p2").await, (100 - 24, 24));
}

async fn tombstones_refuse_only_their_own_reserve(kind: Kind) {
    let (_db, store) = inventory(kind).await;
    for i in 0..5 {
        assert_eq!(
            store.release(&id(&format!("s{i}"))).await.expect("release"),
            ReleaseOutcome::Tombstoned
        );
    }
    let results = all((0..10).map(|i| {
        let store = Arc::clone(&store);
        async move {
            let result = store
                .reserve(&id(&format!("s{i}")), &items(&[("p1", 1)]))
                .await;
            (i, result)
        }
    }))
    .await;
    for (i, result) in results {
        if i < 5 {
            let message = rejected!(result, Error::FailedPrecondition);
            assert!(message.contains("tombstone"), "{message}");
        } else {
            assert_eq!(result.expect("reserve").total_amount_cents, 250);
        }
    }
    assert_eq!(levels(&store, "p1").await, (5, 5));
}

async fn concurrent_conflicting_reserves_of_one_saga_keep_one(kind: Kind) {
    let (_db, store) = inventory(kind).await;
    // The same saga, with two different orders, many times at once: one
    // order wins, its calls all get the same result, the other's are
    // refused, and the stock moves once.
    let results = all((0..16).map(|i| {
        let store = Arc::clone(&store);
        async move {
            let quantity = if i % 2 == 0 { 1 } else { 2 };
            let result = store.reserve(&id("s1"), &items(&[("p1", quantity)])).await;
            (quantity, result)
        }
    }))
    .await;
    let record = store
        .reservation(&id("s1"))
        .await
        .expect("read")
        .expect("record");
    let winner = record.items.1[0] as i32;
    for (quantity, result) in results {
        if quantity == winner {
            let reserved = result.expect("the winning order");
            assert_eq!(Some(reserved.reservation_id), record.reservation_id.clone());
            assert_eq!(reserved.total_amount_cents, 250 * i64::from(winner));
        } else {
            let message = rejected!(result, Error::InvalidArgument);
            assert!(message.contains("other items"), "{message}");
        }
    }
    let winner = i64::from(winner);
    assert_eq!(levels(&store, "p1").await, (10 - winner, winner));
}

async fn reserves_replays_and_releases_race_without_deadlock(kind: Kind) {
    let db = Db::open(kind, Participant::Inventory).await;
    let store = db.backend.inventory();
    for product in ["a", "b", "c"] {
        store
            .upsert_product(&id(product), "", money(1), stock(1000))
            .await
            .expect("upsert");
    }
    // Warm up (connections, prepared statements), so that the race below
    // is between calls rather than connection set-ups.
    all((0..8).map(|i| {
        let store = Arc::clone(&store);
        async move {
            let saga = id(&format!("warm{i}"));
            store
                .reserve(&saga, &items(&[("a", 1)]))
                .await
                .expect("reserve");
            store.release(&saga).await.expect("release")
        }
    }))
    .await;
    // Each saga: a Reserve, its replay and a Release, all at once, the
    // sagas' items over the same products in different orders.
    let results = all((0..40).map(|i| {
        let store = Arc::clone(&store);
        async move {
            let saga = id(&format!("s{i}"));
            let order = match i % 3 {
                0 => items(&[("a", 1), ("b", 2), ("c", 3)]),
                1 => items(&[("c", 3), ("b", 2), ("a", 1)]),
                _ => items(&[("b", 2), ("a", 1), ("c", 3)]),
            };
            let (reserved, replayed, released) = tokio::join!(
                store.reserve(&saga, &order),
                store.reserve(&saga, &order),
                async {
                    // Now and then a little later, to vary the interleavings.
                    tokio::time::sleep(Duration::from_millis(i % 4 * 5)).await;
                    store.release(&saga).await
                }
            );
            (reserved, replayed, released.expect("release"))
        }
    }))
    .await;
    for (reserved, replayed, released) in results {
        let mut ok = Vec::new();
        for result in [reserved, replayed] {
            match result {
                Ok(reserved) => ok.push(reserved),
                Err(_) => {
                    let message = rejected!(result, Error::FailedPrecondition);
                    assert!(
                        message.contains("tombstone") || message.contains("compensated"),
                        "{message}"
                    );
                }
            }
        }
        assert_all_same(&ok);
        match released {
            ReleaseOutcome::Released => assert!(!ok.is_empty(), "released what was reserved"),
            ReleaseOutcome::Tombstoned => assert!(ok.is_empty(), "{ok:?}"),
            ReleaseOutcome::AlreadyReleased => panic!("released once only"),
        }
    }
    for product in ["a", "b", "c"] {
        assert_eq!(levels(&store, product).await, (1000, 0), "{product}");
    }
}

async fn concurrent_charges_of_mixed_amounts_never_overdraw(kind: Kind) {
    let (_db, store) = payment(kind, 1000).await;
    store
        .upsert_account(&id("bob"), money(500))
        .await
        .expect("upsert bob");
    let charge = |i: usize| {
        let customer = if i.is_multiple_of(3) { "bob" } else { "alice" };
        (customer, (i as i64 * 37) % 97 + 1)
    };
    let results = all((0..90).map(|i| {
        let store = Arc::clone(&store);
        async move {
            let (customer, amount) = charge(i);
            let result = store
                .charge(&id(&format!("s{i}")), &id(customer), money(amount))
                .await;
            (i, result)
        }
    }))
    .await;
    for (customer, initial) in [("alice", 1000), ("bob", 500)] {
        let balance = store.balance(&id(customer)).await.expect("balance");
        let (mut charged, mut smallest_refused) = (0, i64::MAX);
        for (i, result) in results.iter().filter(|(i, _)| charge(*i).0 == customer) {
            let amount = charge(*i).1;
            let record = store
                .charge_record(&id(&format!("s{i}")))
                .await
                .expect("read");
            match result {
                Ok(charge_id) => {
                    charged += amount;
                    let record = record.expect("a record for every success");
                    assert_eq!(record.charge_id.as_ref(), Some(charge_id));
                    assert_eq!(record.amount_cents, amount);
                    assert_eq!(record.customer_id.as_deref(), Some(customer));
                }
                Err(Error::FailedPrecondition(message)) => {
                    assert!(message.contains("insufficient funds"), "{message}");
                    assert_eq!(record, None, "a refusal writes nothing");
                    smallest_refused = smallest_refused.min(amount);
                }
                Err(other) => panic!("s{i}: {other:?}"),
            }
        }
        assert!(balance >= 0, "{customer}: {balance}");
        assert_eq!(charged + balance, initial, "{customer}");
        // Balances only go down here: each refusal saw a balance below its
        // amount, so the final balance is below every refused amount.
        assert!(balance < smallest_refused, "{customer}: {balance}");
        assert!(smallest_refused < i64::MAX, "{customer} was never refused");
    }
}

async fn concurrent_new_sagas_and_replays_charge_once(kind: Kind) {
    let (_db, store) = payment(kind, 1000).await;
    let amount = |i: usize| money(10 + i as i64);
    let mut first = Vec::new();
    for i in 0..5 {
        first.push(
            store
                .charge(&id(&format!("s{i}")), &id("alice"), amount(i))
                .await
                .expect("charge"),
        );
    }
    let results = all((0..60).map(|n| {
        let store = Arc::clone(&store);
        let i = n % 20;
        async move {
            let charged = store
                .charge(&id(&format!("s{i}")), &id("alice"), amount(i))
                .await;
            (i, charged.expect("charge or replay"))
        }
    }))
    .await;
    for i in 0..20 {
        let answers: Vec<_> = results
            .iter()
            .filter(|(saga, _)| *saga == i)
            .map(|(_, charge_id)| charge_id.clone())
            .collect();
        assert_eq!(answers.len(), 3);
        assert_all_same(&answers);
        if let Some(earlier) = first.get(i) {
            assert_eq!(&answers[0], earlier, "s{i} replays its first result");
        }
        let record = store
            .charge_record(&id(&format!("s{i}")))
            .await
            .expect("read")
            .expect("record");
        assert_eq!(record.charge_id.as_deref(), Some(&*answers[0]));
    }
    let charged: i64 = (0..20).map(|i| amount(i).get()).sum();
    assert_eq!(
        store.balance(&id("alice")).await.expect("balance"),
        1000 - charged
    );
}

async fn an_unknown_account_fails_only_its_own_charge(kind: Kind) {
    let (_db, store) = payment(kind, 1000).await;
    let results = all((0..30).map(|i| {
        let store = Arc::clone(&store);
        let customer = if i % 5 == 0 { "ghost" } else { "alice" };
        async move {
            let result = store
                .charge(&id(&format!("s{i}")), &id(customer), money(10))
                .await;
            (i, result)
        }
    }))
    .await;
    for (i, result) in results {
        if i % 5 == 0 {
            let message = rejected!(result, Error::NotFound);
            assert!(message.contains("unknown account ghost"), "{message}");
            let record = store
                .charge_record(&id(&format!("s{i}")))
                .await
                .expect("read");
            assert_eq!(record, None);
        } else {
            result.expect("charge");
        }
    }
    assert_eq!(store.balance(&id("alice")).await.expect("balance"), 760);
}

async fn tombstones_refuse_only_their_own_charge(kind: Kind) {
    let (_db, store) = payment(kind, 1000).await;
    for i in 0..5 {
        assert_eq!(
            store.refund(&id(&format!("s{i}"))).await.expect("refund"),
            RefundOutcome::Tombstoned
        );
    }
    let results = all((0..10).map(|i| {
        let store = Arc::clone(&store);
        async move {
            let result = store
                .charge(&id(&format!("s{i}")), &id("alice"), money(100))
                .await;
            (i, result)
        }
    }))
    .await;
    for (i, result) in results {
        if i < 5 {
            let message = rejected!(result, Error::FailedPrecondition);
            assert!(message.contains("tombstone"), "{message}");
        } else {
            result.expect("charge");
        }
    }
    assert_eq!(store.balance(&id("alice")).await.expect("balance"), 500);
}

async fn concurrent_conflicting_charges_of_one_saga_keep_one(kind: Kind) {
    let (_db, store) = payment(kind, 1000).await;
    let results = all((0..16).map(|i| {
        let store = Arc::clone(&store);
        async move {
            let amount = if i % 2 == 0 { 100 } else { 200 };
            let result = store.charge(&id("s1"), &id("alice"), money(amount)).await;
            (amount, result)
        }
    }))
    .await;
    let record = store
        .charge_record(&id("s1"))
        .await
        .expect("read")
        .expect("record");
    for (amount, result) in results {
        if amount == record.amount_cents {
            assert_eq!(Some(result.expect("the winning charge")), record.charge_id);
        } else {
            let message = rejected!(result, Error::InvalidArgument);
            assert!(message.contains("another customer or amount"), "{message}");
        }
    }
    assert_eq!(
        store.balance(&id("alice")).await.expect("balance"),
        1000 - record.amount_cents
    );
}

async fn charges_replays_and_refunds_race_without_deadlock(kind: Kind) {
    let (_db, store) = payment(kind, 1000).await;
    store
        .upsert_account(&id("bob"), money(1000))
        .await
        .expect("upsert bob");
    // Warm up (connections, prepared statements), as for the reserves.
    all((0..8).map(|i| {
        let store = Arc::clone(&store);
        async move {
            let saga = id(&format!("warm{i}"));
            store
                .charge(&saga, &id("alice"), money(1))
                .await
                .expect("charge");
            store.refund(&saga).await.expect("refund")
        }
    }))
    .await;
    let results = all((0..40).map(|i| {
        let store = Arc::clone(&store);
        async move {
            let saga = id(&format!("s{i}"));
            let customer = id(if i % 2 == 0 { "alice" } else { "bob" });
            let (charged, replayed, refunded) = tokio::join!(
                store.charge(&saga, &customer, money(10)),
                store.charge(&saga, &customer, money(10)),
                async {
                    // Now and then a little later, to vary the interleavings.
                    tokio::time::sleep(Duration::from_millis(i % 4 * 5)).await;
                    store.refund(&saga).await
                }
            );
            (charged, replayed, refunded.expect("refund"))
        }
    }))
    .await;
    for (charged, replayed, refunded) in results {
        let mut ok = Vec::new();
        for result in [charged, replayed] {
            match result {
                Ok(charge_id) => ok.push(charge_id),
                Err(_) => {
                    let message = rejected!(result, Error::FailedPrecondition);
                    assert!(
                        message.contains("tombstone") || message.contains("compensated"),
                        "{message}"
                    );
                }
            }
        }
        assert_all_same(&ok);
        match refunded {
            RefundOutcome::Refunded => assert!(!ok.is_empty(), "refunded what was charged"),
            RefundOutcome::Tombstoned => assert!(ok.is_empty(), "{ok:?}"),
            RefundOutcome::AlreadyRefunded => panic!("refunded once only"),
        }
    }
    for customer in ["alice", "bob"] {
        assert_eq!(store.balance(&id(customer)).await.expect("balance"), 1000);
    }
}

async fn concurrent_new_sagas_and_replays_ship_once(kind: Kind) {
    let (_db, store) = fulfillment(kind).await;
    let order = |i: usize| {
        if i.is_multiple_of(2) {
            items(&[("p1", 1)])
        } else {
            items(&[("p2", 2), ("p1", 1)])
        }
    };
    let mut first = Vec::new();
    for i in 0..5 {
        first.push(
            store
                .ship(&id(&format!("s{i}")), &order(i))
                .await
                .expect("ship"),
        );
    }
    let results = all((0..60).map(|n| {
        let store = Arc::clone(&store);
        let i = n % 20;
        async move {
            let shipped = store.ship(&id(&format!("s{i}")), &order(i)).await;
            (i, shipped.expect("ship or replay"))
        }
    }))
    .await;
    for i in 0..20 {
        let answers: Vec<_> = results
            .iter()
            .filter(|(saga, _)| *saga == i)
            .map(|(_, shipment_id)| shipment_id.clone())
            .collect();
        assert_eq!(answers.len(), 3);
        assert_all_same(&answers);
        if let Some(earlier) = first.get(i) {
            assert_eq!(&answers[0], earlier, "s{i} replays its first result");
        }
        let record = store
            .shipment(&id(&format!("s{i}")))
            .await
            .expect("read")
            .expect("record");
        assert_eq!(record.shipment_id.as_deref(), Some(&*answers[0]));
        assert_eq!(record.items, order(i).sorted_columns());
    }
}

async fn tombstones_refuse_only_their_own_ship(kind: Kind) {
    let (_db, store) = fulfillment(kind).await;
    for i in 0..5 {
        assert_eq!(
            store.cancel(&id(&format!("s{i}"))).await.expect("cancel"),
            CancelOutcome::Tombstoned
        );
    }
    let results = all((0..10).map(|i| {
        let store = Arc::clone(&store);
        async move {
            let result = store
                .ship(&id(&format!("s{i}")), &items(&[("p1", 1)]))
                .await;
            (i, result)
        }
    }))
    .await;
    for (i, result) in results {
        let record = store
            .shipment(&id(&format!("s{i}")))
            .await
            .expect("read")
            .expect("record");
        if i < 5 {
            let message = rejected!(result, Error::FailedPrecondition);
            assert!(message.contains("tombstone"), "{message}");
            assert_eq!(record.state, "TOMBSTONE");
            assert_eq!(record.items, (vec![], vec![]));
        } else {
            assert_eq!(Some(result.expect("ship")), record.shipment_id);
            assert_eq!(record.items, (vec!["p1".into()], vec![1]));
        }
    }
}

// ------------------------------------------------------- backend selection

#[tokio::test]
async fn an_unsupported_url_scheme_is_invalid_argument_naming_the_supported_ones() {
    for url in ["mysql://root:secret@localhost/db", "inventory.db"] {
        let error = participants::connect(Participant::Inventory, url, 1, Duration::from_secs(1))
            .await
            .expect_err("refused");
        let message = rejected!(Err::<(), _>(error), Error::InvalidArgument);
        for scheme in ["postgres://", "postgresql://", "sqlite:"] {
            assert!(message.contains(scheme), "{message}");
        }
        assert!(!message.contains("secret"), "never echo the URL: {message}");
    }
}

#[tokio::test]
async fn sqlite_memory_is_one_database() {
    let backend = connect(Participant::Payment, "sqlite::memory:").await;
    assert!(backend.postgres().is_none());
    let store = backend.payment();
    store
        .upsert_account(&id("alice"), money(500))
        .await
        .expect("upsert");
    let charged = all((0..8).map(|i| {
        let store = Arc::clone(&store);
        async move {
            store
                .charge(&id(&format!("s{i}")), &id("alice"), money(100))
                .await
        }
    }))
    .await;
    assert_eq!(charged.iter().filter(|r| r.is_ok()).count(), 5);
    assert_eq!(store.balance(&id("alice")).await.expect("balance"), 0);
    backend.close().await;
}

#[tokio::test]
async fn a_sqlite_file_survives_a_restart() {
    let file = TempFile::new("restart");
    // Both spellings of a file URL name the same database.
    let urls = [file.url(), format!("sqlite://{}", file.0.display())];
    let order = items(&[("p1", 3)]);

    let backend = connect(Participant::Inventory, &urls[0]).await;
    let store = backend.inventory();
    store
        .upsert_product(&id("p1"), "Widget", money(250), stock(10))
        .await
        .expect("upsert");
    let reserved = store.reserve(&id("s1"), &order).await.expect("reserve");
    drop(store);
    backend.close().await;
    drop(backend);

    // Reopening runs the migrations again: they are already applied.
    let backend = connect(Participant::Inventory, &urls[1]).await;
    let pool = backend.sqlite().expect("a SQLite backend");
    let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(pool)
        .await
        .expect("journal_mode");
    assert_eq!(journal, "wal");
    let settings: (i64, i64) = sqlx::query_as(
        "SELECT foreign_keys, timeout FROM pragma_foreign_keys, pragma_busy_timeout",
    )
    .fetch_one(pool)
    .await
    .expect("pragmas");
    assert_eq!(settings, (1, 5000));
    let store = backend.inventory();
    assert_eq!(levels(&store, "p1").await, (7, 3));
    let record = store
        .reservation(&id("s1"))
        .await
        .expect("read")
        .expect("record");
    assert_eq!(
        record.reservation_id.as_deref(),
        Some(&*reserved.reservation_id)
    );
    assert_eq!(
        store.reserve(&id("s1"), &order).await.expect("replay"),
        reserved
    );
    assert_eq!(levels(&store, "p1").await, (7, 3));
    backend.close().await;
}

// ---------------------------------------------------------------- listings
//
// Reconcile reads every record of every participant a page at a time, by
// saga id: all states, tombstones included, items sorted by product, the
// keyset pages neither skipping nor repeating a record.

/// Seconds since the epoch, now.
fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// Asserts that a listed time is within a minute of now (both backends
/// store the database clock, in different types).
#[track_caller]
fn recent(at: f64) {
    assert!(
        (at - now()).abs() < 60.0,
        "time {at} is not now ({})",
        now()
    );
}

async fn reservations_are_listed_in_saga_id_pages(kind: Kind) {
    let (_db, store) = inventory(kind).await;
    assert_eq!(store.list_reservations("", 10).await.expect("list"), vec![]);
    // Written out of id order: the listing sorts.
    store
        .reserve(&id("s4"), &items(&[("p1", 1)]))
        .await
        .expect("reserve s4");
    store
        .reserve(&id("s2"), &items(&[("p2", 1), ("p1", 2)]))
        .await
        .expect("reserve s2");
    store.release(&id("s3")).await.expect("tombstone s3");
    store
        .reserve(&id("s1"), &items(&[("p1", 1)]))
        .await
        .expect("reserve s1");
    store.release(&id("s4")).await.expect("release s4");

    let all = store.list_reservations("", 10).await.expect("list");
    let ids: Vec<&str> = all.iter().map(|r| r.saga_id.as_str()).collect();
    assert_eq!(ids, ["s1", "s2", "s3", "s4"]);
    let states: Vec<&str> = all.iter().map(|r| r.record.state.as_str()).collect();
    assert_eq!(states, ["ACTIVE", "ACTIVE", "TOMBSTONE", "RELEASED"]);
    let s2 = &all[1].record;
    assert_eq!(s2.items, (vec!["p1".into(), "p2".into()], vec![2, 1]));
    assert_eq!(s2.total_amount_cents, 2 * 250 + 100);
    assert!(
        s2.reservation_id
            .as_deref()
            .is_some_and(|r| r.starts_with("rsv_"))
    );
    let tombstone = &all[2].record;
    assert_eq!(
        (tombstone.reservation_id.as_ref(), &tombstone.items),
        (None, &(vec![], vec![]))
    );
    assert_eq!(all[3].record.items, (vec!["p1".into()], vec![1]));
    for listed in &all {
        recent(listed.created_at);
    }
    assert_eq!(all[3].released_at.map(recent), Some(()));
    assert!(all[..3].iter().all(|r| r.released_at.is_none()));
    // Each listed record is what the point read returns.
    for listed in &all {
        let read = store.reservation(&id(&listed.saga_id)).await.expect("read");
        assert_eq!(read.as_ref(), Some(&listed.record));
    }

    let first = store.list_reservations("", 2).await.expect("page 1");
    let second = store.list_reservations("s2", 2).await.expect("page 2");
    let rest = store.list_reservations("s4", 2).await.expect("page 3");
    assert_eq!(
        [first, second].concat(),
        all,
        "two pages of two are the whole listing"
    );
    assert_eq!(rest, vec![]);
    // A key between records starts after it.
    let after = store.list_reservations("s1x", 10).await.expect("after");
    assert_eq!(after, all[1..]);
}

async fn charges_are_listed_in_saga_id_pages(kind: Kind) {
    let (_db, store) = payment(kind, 1000).await;
    assert_eq!(store.list_charges("", 10).await.expect("list"), vec![]);
    store
        .charge(&id("s3"), &id("alice"), money(300))
        .await
        .expect("charge s3");
    store
        .charge(&id("s1"), &id("alice"), money(100))
        .await
        .expect("charge s1");
    store.refund(&id("s2")).await.expect("tombstone s2");
    store.refund(&id("s3")).await.expect("refund s3");

    let all = store.list_charges("", 10).await.expect("list");
    let ids: Vec<&str> = all.iter().map(|c| c.saga_id.as_str()).collect();
    assert_eq!(ids, ["s1", "s2", "s3"]);
    let states: Vec<&str> = all.iter().map(|c| c.record.state.as_str()).collect();
    assert_eq!(states, ["CHARGED", "TOMBSTONE", "REFUNDED"]);
    assert_eq!(all[0].record.customer_id.as_deref(), Some("alice"));
    assert_eq!(all[0].record.amount_cents, 100);
    assert_eq!(
        (
            all[1].record.customer_id.as_ref(),
            all[1].record.amount_cents
        ),
        (None, 0)
    );
    assert_eq!(all[2].record.amount_cents, 300);
    for listed in &all {
        recent(listed.created_at);
        let read = store
            .charge_record(&id(&listed.saga_id))
            .await
            .expect("read");
        assert_eq!(read.as_ref(), Some(&listed.record));
    }
    assert_eq!(all[2].refunded_at.map(recent), Some(()));
    assert!(all[..2].iter().all(|c| c.refunded_at.is_none()));

    let first = store.list_charges("", 2).await.expect("page 1");
    let second = store.list_charges("s2", 2).await.expect("page 2");
    assert_eq!(first, all[..2]);
    assert_eq!(second, all[2..]);
}

async fn shipments_are_listed_in_saga_id_pages(kind: Kind) {
    let (_db, store) = fulfillment(kind).await;
    assert_eq!(store.list_shipments("", 10).await.expect("list"), vec![]);
    store
        .ship(&id("s2"), &items(&[("p2", 3), ("p1", 1)]))
        .await
        .expect("ship s2");
    store
        .ship(&id("s1"), &items(&[("p1", 1)]))
        .await
        .expect("ship s1");
    store.cancel(&id("s1")).await.expect("cancel s1");
    store.cancel(&id("s3")).await.expect("tombstone s3");

    let all = store.list_shipments("", 10).await.expect("list");
    let ids: Vec<&str> = all.iter().map(|s| s.saga_id.as_str()).collect();
    assert_eq!(ids, ["s1", "s2", "s3"]);
    let states: Vec<&str> = all.iter().map(|s| s.record.state.as_str()).collect();
    assert_eq!(states, ["CANCELLED", "SHIPPED", "TOMBSTONE"]);
    assert_eq!(
        all[1].record.items,
        (vec!["p1".into(), "p2".into()], vec![1, 3])
    );
    assert_eq!(all[2].record.items, (vec![], vec![]));
    for listed in &all {
        recent(listed.created_at);
        let read = store.shipment(&id(&listed.saga_id)).await.expect("read");
        assert_eq!(read.as_ref(), Some(&listed.record));
    }
    assert_eq!(all[0].cancelled_at.map(recent), Some(()));
    assert!(all[1..].iter().all(|s| s.cancelled_at.is_none()));

    let first = store.list_shipments("", 1).await.expect("page 1");
    let second = store.list_shipments("s1", 1).await.expect("page 2");
    let third = store.list_shipments("s2", 1).await.expect("page 3");
    assert_eq!([first, second, third].concat(), all);
}
