//! The snapshot scenario of the chaos suite as a test: the orchestrator's
//! PostgreSQL loses the progress it committed asynchronously (a crash and a
//! restore of a base backup taken earlier, as after a power loss), then the
//! client cancels; every step the lost progress had attempted must still be
//! compensated. Runs the real binaries (built by `cargo test --workspace`
//! for the orchestrator's and participants' own tests; or set
//! `CHAOS_BIN_DIR`), on a PostgreSQL instance of its own made with initdb.

use harness::chaos::snapshot::{SnapshotOptions, run};
use harness::chaos::timeline::format_event;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_lost_in_a_power_loss_is_still_compensated_on_cancel() {
    let binaries = match harness::chaos::Binaries::find(None) {
        Ok(binaries) => binaries,
        Err(error) => panic!("the snapshot scenario needs the real binaries: {error:#}"),
    };
    let options = SnapshotOptions {
        binaries,
        keep: false,
        service_log: "warn".into(),
        echo: false,
    };
    let outcome = match run(&options).await {
        Ok(outcome) => outcome,
        Err(error) => panic!("the snapshot scenario could not be carried out: {error:#}"),
    };
    let timeline: Vec<String> = outcome.timeline.iter().map(format_event).collect();
    let violations = outcome.violations();
    assert!(
        violations.is_empty(),
        "after the power loss and the cancel:\n  {}\nscenario:\n{}",
        violations.join("\n  "),
        timeline.join("\n")
    );
}
