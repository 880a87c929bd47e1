//! Connecting to PostgreSQL when the server is full: at start the probe
//! waits for a free connection (within the connect timeout) instead of
//! exiting with "too many clients", and at run time a full server answers
//! UNAVAILABLE quickly, not INTERNAL.

use std::time::Duration;

use harness::TestDb;
use sqlx::{Connection, PgConnection};

/// `url` with `user` as its user name.
fn as_user(url: &str, user: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{user}@{host}")
}

#[tokio::test]
async fn a_full_server_is_waited_for_at_start_and_unavailable_at_run_time() {
    let db = TestDb::create("too_many_clients").await.expect("test db");
    // Superusers are exempt from connection limits: a role of our own,
    // allowed one connection.
    let role = format!("sagatest_limited_{}", std::process::id());
    let mut admin = PgConnection::connect(db.url()).await.expect("admin");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN CONNECTION LIMIT 1; \
         GRANT ALL ON DATABASE \"{}\" TO {role}",
        db.name()
    )))
    .execute(&mut admin)
    .await
    .expect("a limited role");
    let url = as_user(db.url(), &role);

    let held = PgConnection::connect(&url)
        .await
        .expect("its one connection");
    let connecting = tokio::spawn({
        let url = url.clone();
        async move { common::db::connect_pool(&url, 2, Duration::from_secs(20)).await }
    });
    // The probe keeps getting 53300 until the held connection goes.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!connecting.is_finished(), "connect_pool gave up at once");
    held.close().await.expect("closing");
    let pool = connecting
        .await
        .unwrap()
        .expect("connected once a connection came free");
    assert_eq!(
        pool.options().get_idle_timeout(),
        Some(common::db::IDLE_TIMEOUT),
        "idle connections are closed"
    );

    // The server full at run time: the statement fails within the acquire
    // timeout, as UNAVAILABLE.
    let held = PgConnection::connect(&url)
        .await
        .expect("its one connection");
    let error = tokio::time::timeout(
        Duration::from_secs(10),
        sqlx::query("SELECT 1").execute(&pool),
    )
    .await
    .expect("no hang")
    .expect_err("no connection to be had");
    let status = tonic::Status::from(common::Error::Database(error));
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    held.close().await.expect("closing");
    sqlx::query("SELECT 1")
        .execute(&pool)
        .await
        .expect("served again");
    pool.close().await;

    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP OWNED BY {role}; REVOKE ALL ON DATABASE \"{}\" FROM {role}",
        db.name()
    )))
    .execute(&mut admin)
    .await
    .ok();
    admin.close().await.ok();
    drop(db);
    let mut admin = PgConnection::connect(&harness::server_url())
        .await
        .expect("admin");
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE IF EXISTS {role}")))
        .execute(&mut admin)
        .await
        .expect("dropping the role");
}
