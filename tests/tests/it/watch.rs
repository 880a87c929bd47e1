//! WatchOrder streams wait without holding a database connection each:
//! hundreds of streams on a replica that follows the sagas by reading the
//! store leave its pool free for other requests, and the database never
//! sees more connections than the pools allow.

use std::time::Duration;

use harness::{ORCHESTRATOR_CONNECTIONS, delay, spawn_system_with};
use proto::saga::v1::order_service_client::OrderServiceClient;
use proto::saga::v1::{GetOrderStatusRequest, OrderStatus, WatchOrderRequest};
use tonic::transport::Endpoint;

/// Streams per HTTP/2 connection, well under any server's stream limit.
const STREAMS_PER_CONNECTION: usize = 50;

#[tokio::test]
async fn hundreds_of_watches_on_a_polling_replica_hold_no_connection_each() {
    const ORDERS: usize = 200;
    // Ship is held for 4 s, under the first replica's call deadline.
    let system = spawn_system_with(|s| s.step_timeout = Duration::from_secs(10))
        .await
        .unwrap();
    system.seed_product("widget", 10, 10_000).await.unwrap();
    system.seed_account("alice", 10_000_000).await.unwrap();
    // The other replica drives none of these sagas: its streams read the
    // store now and then.
    let other = system.spawn_replica().await.unwrap();
    system
        .fault("fulfillment", delay("Ship", 4_000))
        .await
        .unwrap();

    let mut ids = Vec::with_capacity(ORDERS);
    for _ in 0..ORDERS {
        ids.push(system.place("alice", &[("widget", 1)]).await.unwrap());
    }
    let mut clients = Vec::new();
    let mut streams = Vec::with_capacity(ORDERS);
    for (i, id) in ids.iter().enumerate() {
        if i % STREAMS_PER_CONNECTION == 0 {
            let channel = Endpoint::from_shared(other.endpoint().to_owned())
                .unwrap()
                .connect()
                .await
                .unwrap();
            clients.push(OrderServiceClient::new(channel));
        }
        let client = clients.last_mut().unwrap();
        let stream = client
            .watch_order(WatchOrderRequest {
                order_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        streams.push(tokio::spawn(async move {
            let mut stream = stream;
            let mut last = None;
            while let Some(update) = stream.message().await.unwrap() {
                last = Some(update.status());
            }
            last
        }));
    }

    // While every stream waits: the sagas are still shipping, the
    // database holds no more connections than the pools of the two
    // replicas and of the test, and the watching replica answers reads.
    let waiting = system.status(ids.last().unwrap()).await.unwrap();
    assert_ne!(
        waiting.status(),
        OrderStatus::Completed,
        "the streams must be open while this is measured"
    );
    let pools = 2 * (ORCHESTRATOR_CONNECTIONS + orchestrator::store::WRITER_CONNECTIONS) + 2;
    for id in ids.iter().take(20) {
        let connections: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()",
        )
        .fetch_one(&system.pool)
        .await
        .unwrap();
        assert!(
            connections <= i64::from(pools),
            "{connections} connections with {ORDERS} streams open; the pools allow {pools}"
        );
        let status = other
            .orders()
            .get_order_status(GetOrderStatusRequest {
                order_id: id.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("a read on the watching replica failed: {e}"));
        assert_eq!(status.into_inner().order_id, *id);
    }

    // And every stream ends with the outcome.
    for (id, stream) in ids.iter().zip(streams) {
        let last = tokio::time::timeout(Duration::from_secs(60), stream)
            .await
            .unwrap_or_else(|_| panic!("the watch of {id} did not end"))
            .unwrap();
        assert_eq!(last, Some(OrderStatus::Completed), "{id}");
    }
    system.clear_faults().await.unwrap();
    system.audit().await.unwrap();
    other.stop().await.unwrap();
}
