//! Microbenchmarks: the pure state machine (transitions per second) and one
//! store transition (a commit of the saga row and its journal row) against
//! PostgreSQL. Run with `cargo bench -p orchestrator`; the PostgreSQL part
//! uses DATABASE_URL (default postgres://postgres@127.0.0.1:5432/postgres)
//! and a database of its own, dropped afterwards.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use orchestrator::saga::{Event, Kind, ORDER_SAGA, Outcome, Policy, SagaState};
use orchestrator::store::{Commit, JournalEntry, LeaseChange, NewSaga, NextAttempt, OrderItem};

const POLICY: Policy = Policy {
    action_attempts: 5,
    compensation_attempts: 20,
};

fn succeeded(step: usize) -> Event {
    Event::CallFinished {
        step,
        kind: Kind::Action,
        attempt: 1,
        outcome: Outcome::Succeeded(vec![("total_amount_cents".into(), "500".into())]),
    }
}

fn state_machine(c: &mut Criterion) {
    let mut group = c.benchmark_group("state_machine");
    // One happy saga: three transitions.
    group.throughput(Throughput::Elements(3));
    group.bench_function("happy_saga_3_transitions", |b| {
        b.iter(|| {
            let mut state = SagaState::new(&ORDER_SAGA);
            for step in 0..3 {
                state = state
                    .apply(&ORDER_SAGA, &POLICY, black_box(&succeeded(step)))
                    .unwrap();
            }
            black_box(state)
        })
    });
    group.throughput(Throughput::Elements(1));
    let charging = SagaState::new(&ORDER_SAGA)
        .apply(&ORDER_SAGA, &POLICY, &succeeded(0))
        .unwrap();
    group.bench_function("one_transition", |b| {
        b.iter(|| {
            black_box(&charging)
                .apply(&ORDER_SAGA, &POLICY, black_box(&succeeded(1)))
                .unwrap()
        })
    });
    group.bench_function("serialize_state_json", |b| {
        b.iter(|| serde_json::to_vec(black_box(&charging)).unwrap())
    });
    group.finish();
}

fn store_transition(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let db = match runtime.block_on(harness::TestDb::create("bench")) {
        Ok(db) => db,
        Err(error) => {
            eprintln!("skipping the store benchmark: no PostgreSQL ({error})");
            return;
        }
    };
    let store = runtime
        .block_on(orchestrator::server::connect(
            db.url(),
            4,
            Duration::from_secs(5),
        ))
        .expect("store");
    let mut group = c.benchmark_group("store");
    group.throughput(Throughput::Elements(1));
    let mut n = 0u64;
    group.bench_function("create_and_one_commit", |b| {
        b.to_async(&runtime).iter(|| {
            n += 1;
            let store = store.clone();
            let saga_id = format!("bench-{n}");
            async move {
                let (saga, _) = store
                    .create(
                        &NewSaga {
                            saga_id: saga_id.clone(),
                            idempotency_key: None,
                            customer_id: "alice".into(),
                            items: vec![OrderItem {
                                product_id: "widget".into(),
                                quantity: 1,
                            }],
                            definition: &ORDER_SAGA,
                            state: SagaState::new(&ORDER_SAGA),
                            trace_parent: None,
                        },
                        "bench",
                        Duration::from_secs(30),
                    )
                    .await
                    .unwrap();
                let next = saga
                    .state
                    .apply(&ORDER_SAGA, &POLICY, &succeeded(0))
                    .unwrap();
                let journal = [JournalEntry {
                    step: "reserve_inventory".into(),
                    kind: orchestrator::store::JournalKind::Action,
                    attempt: 1,
                    outcome: orchestrator::store::JournalOutcome::Succeeded,
                    detail: String::new(),
                    rpc: "inventory.v1.InventoryService/Reserve".into(),
                    actor: "bench".into(),
                    started_at: 1.0,
                    finished_at: Some(2.0),
                }];
                store
                    .commit(Commit {
                        saga_id: &saga_id,
                        expected_version: saga.version,
                        state: &next,
                        definition: &ORDER_SAGA,
                        journal: &journal,
                        next_attempt: NextAttempt::Clear,
                        lease: LeaseChange::Extend {
                            owner: "bench",
                            ttl: Duration::from_secs(30),
                        },
                        durable: true,
                        wake: false,
                    })
                    .await
                    .unwrap()
                    .expect("applied")
            }
        })
    });
    group.finish();
    drop(store);
    drop(db);
}

criterion_group!(benches, state_machine, store_transition);
criterion_main!(benches);
