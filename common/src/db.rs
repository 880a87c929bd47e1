//! Database connections of every service: PostgreSQL pools that fail fast
//! and say why (a probe connection first, bounded waits, idle connections
//! closed, stale ones replaced before use, sequential scans off), pools for
//! the batch writers that plan their statements once, and the one-connection
//! SQLite pool of the embedded mode.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{Connection, PgPool, SqlitePool};

use crate::error::{Error, Transient, transient};

/// How long a SQLite connection waits for another process's write lock
/// before answering "database is locked" (mapped to `ABORTED`).
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens a SQLite database (`sqlite:PATH`, `sqlite://PATH` or
/// `sqlite::memory:`), creating the file if it is missing, in WAL mode with
/// foreign keys on and a 5 s busy timeout.
///
/// The pool holds exactly one connection, kept open for the pool's life:
/// every statement is serialized, which is what makes the SQLite stores
/// simple and correct, and `sqlite::memory:` stays one database.
pub async fn connect_sqlite(url: &str) -> Result<SqlitePool, Error> {
    let options = SqliteConnectOptions::from_str(url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .foreign_keys(true)
        .busy_timeout(SQLITE_BUSY_TIMEOUT);
    Ok(SqlitePoolOptions::new()
        .min_connections(1)
        .max_connections(1)
        .idle_timeout(None)
        .max_lifetime(None)
        .connect_with(options)
        .await?)
}

/// The longest a statement waits for a pooled connection (or for a new one
/// to be made) before it fails with `PoolTimedOut`, answered as
/// UNAVAILABLE. Well under the deadlines of the callers (a participant call
/// has 5 s by default, a client of the orchestrator more), so that in a
/// database outage callers hear "database unavailable, try again" instead
/// of waiting out their deadline, and requests do not pile up in memory.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);

/// A pooled connection unused for this long is closed; the pool shrinks
/// back after a burst instead of holding its maximum forever (see
/// [`PARTICIPANT_MAX_CONNECTIONS`]).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// A pooled connection unused for this long is pinged before it is handed
/// out: one round trip, paid only after a quiet second, and a connection
/// the server closed meanwhile (restart, `pg_terminate_backend`, an idle
/// timeout of a proxy) is replaced instead of failing the statement. A busy
/// connection is never idle that long, so the hot path pays nothing.
pub const STALE_CHECK_AFTER: Duration = Duration::from_secs(1);

/// Default pool maximum of a participant (`--max-connections`).
///
/// The default maxima of every service share one PostgreSQL server: a
/// default server allows `max_connections = 100`, of which
/// `superuser_reserved_connections = 3` are kept for superusers, 97 for
/// everyone else. Two orchestrator replicas and the three participants,
/// all on one server, must fit with room for an operator (psql, a
/// migration, a backup, a replica starting while another stops):
///
/// | who | pool | batch writers | each | count | total |
/// |---|---|---|---|---|---|
/// | orchestrator replica | 24 | 3 | 27 | 2 | 54 |
/// | participant | 10 | 1 | 11 | 3 | 33 |
/// | operator room | | | | | 10 |
///
/// 54 + 33 + 10 = 97 (checked by a test of the orchestrator's `config`).
/// Pools grow to these maxima only under load and shrink back after
/// [`IDLE_TIMEOUT`]; the sizes stay flags for servers configured otherwise.
pub const PARTICIPANT_MAX_CONNECTIONS: u32 = 10;

/// Connections of a participant's batch writers, beside its pool (one
/// writer per store, see [`generic_plan_pool`]).
pub const PARTICIPANT_WRITER_CONNECTIONS: u32 = 1;

/// Opens a pool of up to `max_connections` on `database_url`.
///
/// One connection is made first, so that an unreachable server or a missing
/// database reports its real cause ("connection refused", "database does not
/// exist") instead of a pool timeout. A server that is starting, refuses
/// connections or has too many clients (SQLSTATE 53300) is tried again until
/// `connect_timeout`: a service starting beside a busy one waits its turn.
pub async fn connect_pool(
    database_url: &str,
    max_connections: u32,
    connect_timeout: Duration,
) -> Result<PgPool, Error> {
    let options = PgConnectOptions::from_str(database_url)?;
    probe(&options, connect_timeout).await?;
    // Every statement of the services looks rows up by key, and the batch
    // statements do it by arrays of keys. PostgreSQL caches a generic plan
    // after five runs, chosen on the statistics of that moment: a fresh
    // table looks empty, a sequential scan looks cheapest, and the plan
    // would keep scanning the whole table long after it has grown (until
    // autovacuum next analyzes it). Without sequential scans the cached plans
    // use the indexes whatever the table's size; a query with no usable
    // index still scans.
    let options = options.options([("enable_seqscan", "off")]);
    Ok(
        pool_options(max_connections, connect_timeout.min(ACQUIRE_TIMEOUT))
            .connect_lazy_with(options),
    )
}

/// Connects once to check the server is there, retrying what passes with
/// time (refused, starting up, too many clients) until `connect_timeout`.
async fn probe(options: &PgConnectOptions, connect_timeout: Duration) -> Result<(), Error> {
    let server = format!("{}:{}", options.get_host(), options.get_port());
    let deadline = tokio::time::Instant::now() + connect_timeout;
    let mut backoff = Duration::from_millis(50);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let error = match tokio::time::timeout(left, PgConnection::connect_with(options)).await {
            Ok(Ok(probe)) => return Ok(probe.close().await?),
            Ok(Err(error)) => error,
            Err(_) => {
                return Err(Error::Database(sqlx::Error::Protocol(format!(
                    "no answer from {server} within {connect_timeout:?}"
                ))));
            }
        };
        let passing = matches!(
            transient(&error),
            Some(Transient::Unavailable | Transient::TooManyClients | Transient::ConnectionLost)
        );
        if !passing || tokio::time::Instant::now() + backoff >= deadline {
            return Err(Error::Database(error));
        }
        tracing::debug!(%error, %server, "database not ready; trying again");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// The pool settings every PostgreSQL pool of the system shares: bounded
/// waits, idle connections closed, stale ones replaced before use.
fn pool_options(max_connections: u32, acquire_timeout: Duration) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .min_connections(0)
        .acquire_timeout(acquire_timeout)
        .idle_timeout(IDLE_TIMEOUT)
        // No ping before every checkout: it is a round trip per statement.
        // A connection that died while in use is found out by its
        // statement, which fails as UNAVAILABLE; the pool then drops it
        // (sqlx tests each connection as it comes back). One that died
        // while idle is found out by the ping after a quiet second.
        .test_before_acquire(false)
        .before_acquire(|connection, meta| {
            Box::pin(async move {
                if meta.idle_for >= STALE_CHECK_AFTER {
                    connection.ping().await?;
                }
                Ok(true)
            })
        })
}

/// A pool of `connections` on the same database as `pool`, for statements
/// that run many times with the same shape (the batch writers): their plan
/// is made once per connection and reused, instead of being made again for
/// every run's arguments (PostgreSQL keeps re-planning a statement whose
/// generic plan looks costlier than its custom plans, and planning a large
/// batch statement costs more than running it). With sequential scans off
/// (see [`connect_pool`]) the generic plans use the keys' indexes.
pub fn generic_plan_pool(pool: &PgPool, connections: u32) -> PgPool {
    let options = (*pool.connect_options())
        .clone()
        .options([("plan_cache_mode", "force_generic_plan")]);
    pool_options(connections, pool.options().get_acquire_timeout()).connect_lazy_with(options)
}
