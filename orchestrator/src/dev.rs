//! `orchestrator dev`, the embedded mode: the orchestrator and the three
//! participants in one process, each a real gRPC server on its own loopback
//! port, each on its own SQLite database (files under a data directory, or
//! in memory). Seeds demo data on first start and prints what to try.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use participants::{Participant, ServeOptions};
use proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use proto::inventory::v1::{ListProductsRequest, UpsertProductRequest};
use proto::payment::v1::UpsertAccountRequest;
use proto::payment::v1::payment_service_client::PaymentServiceClient;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::clients::{GrpcParticipants, ParticipantUrls};
use crate::config::Settings;
use crate::error::Error;
use crate::executor::ExecutorConfig;
use crate::saga::Registry;

/// Flags of `orchestrator dev`.
#[derive(Debug, Clone, clap::Args)]
pub struct DevArgs {
    /// Address of the orchestrator; inventory, payment and fulfillment listen
    /// on the next three ports.
    #[arg(long, env = "ORCHESTRATOR_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Folder of the SQLite files (created if missing); they survive
    /// restarts.
    #[arg(long, default_value = "saga-dev-data", conflicts_with = "in_memory")]
    pub data_dir: PathBuf,

    /// Keep everything in memory: nothing survives the process.
    #[arg(long)]
    pub in_memory: bool,

    /// Serve fault.v1.FaultInjection on the participants, to watch
    /// retries and compensations happen.
    #[arg(long)]
    pub fault_injection: bool,

    /// Deadline of one participant call.
    #[arg(long, default_value = "5s", value_parser = common::cli::parse_duration)]
    pub step_timeout: Duration,

    /// Address of the HTTP port: the web console (/ui), probes and
    /// metrics (/healthz, /readyz, /metrics; the metrics of the
    /// participants in this process too). Default: the port after the
    /// participants' (50055 with the default --listen).
    #[arg(long, env = "ORCHESTRATOR_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,

    /// No HTTP port: no console, probes or metrics.
    #[arg(long, conflicts_with = "http_listen")]
    pub no_http: bool,

    /// AdminService's tokens (--admin-token-file, --read-only-token-file).
    #[command(flatten)]
    pub tokens: crate::auth::AdminTokenArgs,

    /// Retention of finished sagas (--retention, --prune-batch,
    /// --prune-interval), as on `orchestrator serve`.
    #[command(flatten)]
    pub retention: crate::prune::RetentionArgs,

    /// Limits on what clients send, the same on all four servers
    /// (--max-message-bytes, --max-concurrent-streams, --request-timeout,
    /// --http-header-timeout).
    #[command(flatten)]
    pub limits: common::limits::Limits,

    /// Logs and traces (--log-format, --otlp-endpoint); every service of
    /// this process reports as one (`orchestrator` by default).
    #[command(flatten)]
    pub telemetry: common::telemetry::TelemetryArgs,

    /// Serve every port over TLS, the participants with mTLS (they require
    /// the orchestrator's client certificate). A development CA and its
    /// certificates are made in DATA_DIR/tls and reused while valid (with
    /// --in-memory, in a temporary folder removed at exit); the grpcurl
    /// and sagactl commands to use are printed.
    #[arg(long)]
    pub tls: bool,
}

/// The embedded mode's TLS: the development CA's files, and what each
/// side uses.
struct DevTls {
    files: common::tls::dev::PkiFiles,
    /// Made now (not reused).
    made: bool,
    /// Removed at exit (--in-memory).
    temporary: Option<PathBuf>,
    /// The orchestrator's ports: TLS.
    orchestrator: Arc<common::tls::Server>,
    /// The participants' ports: mTLS.
    participants: Arc<common::tls::Server>,
    /// The orchestrator's calls to the participants.
    client: common::tls::Client,
}

impl DevTls {
    /// The development CA in `data_dir`/tls (or a temporary folder), with
    /// a server certificate for `listen`'s address and localhost.
    fn prepare(data_dir: Option<&Path>, listen: SocketAddr) -> Result<Self, Error> {
        let (dir, temporary) = match data_dir {
            Some(dir) => (dir.join("tls"), None),
            None => {
                let dir = std::env::temp_dir().join(format!("saga-dev-tls-{}", std::process::id()));
                (dir.clone(), Some(dir))
            }
        };
        let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
        let ip = listen.ip().to_string();
        if !listen.ip().is_unspecified() && !names.contains(&ip) {
            names.push(ip);
        }
        let (files, made) = common::tls::dev::ensure(&dir, "saga orchestrator dev", &names)?;
        Ok(Self {
            orchestrator: common::tls::Server::load(files.server(false))?,
            participants: common::tls::Server::load(files.server(true))?,
            client: files.client(true)?,
            files,
            made,
            temporary,
        })
    }
}

/// Demo products: id, name, price in cents, stock.
const PRODUCTS: &[(&str, &str, i64, i64)] = &[
    ("widget", "Widget", 250, 100),
    ("gadget", "Gadget", 1299, 20),
    ("gizmo", "Gizmo", 4999, 3),
    ("sprocket", "Sprocket", 75, 1000),
];

/// Demo customers: id, balance in cents.
const ACCOUNTS: &[(&str, i64)] = &[("alice", 100_000), ("bob", 500), ("carol", 25_000)];

fn cents(amount: i64) -> String {
    format!("{}.{:02}", amount / 100, amount % 100)
}

/// The address `offset` ports after `base`.
fn next_port(base: SocketAddr, offset: u16) -> Result<SocketAddr, Error> {
    let port = base.port().checked_add(offset).ok_or_else(|| {
        Error::invalid(format!(
            "--listen port {} leaves no room for the participants",
            base.port()
        ))
    })?;
    Ok(SocketAddr::new(base.ip(), port))
}

async fn bind(address: SocketAddr, what: &str) -> Result<TcpListener, Error> {
    TcpListener::bind(address).await.map_err(|e| {
        Error::invalid(format!(
            "cannot listen on {address} for {what}: {e} (the embedded mode needs --listen and the four ports after it free: the participants and the HTTP port, which --http-listen moves and --no-http turns off)"
        ))
    })
}

fn database_url(data_dir: Option<&Path>, name: &str) -> String {
    match data_dir {
        Some(dir) => format!("sqlite://{}", dir.join(format!("{name}.db")).display()),
        None => "sqlite::memory:".to_owned(),
    }
}

/// Runs the embedded system until `shutdown` completes.
pub async fn run(
    args: DevArgs,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    args.limits.validate().map_err(Error::invalid)?;
    let admin = args.tokens.tokens()?;
    let data_dir = (!args.in_memory).then_some(args.data_dir.as_path());
    if let Some(dir) = data_dir {
        std::fs::create_dir_all(dir).map_err(|e| {
            Error::invalid(format!(
                "cannot create the data directory {}: {e}",
                dir.display()
            ))
        })?;
    }
    let tls = match args.tls {
        true => Some(DevTls::prepare(data_dir, args.listen)?),
        false => None,
    };
    let orchestrator_listener = bind(args.listen, "the orchestrator").await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let registry = Arc::new(Registry::default());
    // Each participant the definitions name, in the order their steps
    // first use it, on the next port: inventory, payment, fulfillment.
    let mut named: Vec<&'static str> = Vec::new();
    for step in registry.definitions().flat_map(|d| d.steps) {
        if !named.contains(&step.participant) {
            named.push(step.participant);
        }
    }
    let mut addresses: HashMap<&'static str, SocketAddr> = HashMap::new();
    let mut participant_tasks = Vec::new();
    for (offset, name) in (1..).zip(named) {
        let participant = Participant::ALL
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "the embedded mode has no participant {name:?} to serve"
                ))
            })?;
        let address = next_port(args.listen, offset)?;
        let listener = bind(address, participant.name()).await?;
        let backend = participants::connect(
            participant,
            &database_url(data_dir, participant.name()),
            1,
            Duration::from_secs(5),
        )
        .await?;
        let mut stop = stop_rx.clone();
        participant_tasks.push(tokio::spawn(participants::serve(
            participant,
            backend,
            listener,
            ServeOptions {
                fault_injection: args.fault_injection,
                tls: tls.as_ref().map(|tls| tls.participants.clone()),
                limits: args.limits,
            },
            async move {
                let _ = stop.wait_for(|stopped| *stopped).await;
            },
        )));
        addresses.insert(name, address);
    }
    let http_address = match (args.no_http, args.http_listen) {
        (true, _) => None,
        (false, Some(address)) => Some(address),
        (false, None) => Some(next_port(args.listen, addresses.len() as u16 + 1)?),
    };
    let http_listener = match http_address {
        Some(address) => Some(bind(address, "the HTTP port (--http-listen)").await?),
        None => None,
    };
    let address_of = |name: &str| {
        addresses.get(name).copied().ok_or_else(|| {
            Error::invalid(format!("no saga definition names the participant {name}"))
        })
    };
    let (inventory, payment, fulfillment) = (
        address_of("inventory")?,
        address_of("payment")?,
        address_of("fulfillment")?,
    );
    let scheme = if tls.is_some() { "https" } else { "http" };
    let urls = ParticipantUrls {
        inventory: format!("{scheme}://{inventory}"),
        payment: format!("{scheme}://{payment}"),
        fulfillment: format!("{scheme}://{fulfillment}"),
        tls: tls.as_ref().map(|tls| tls.client.clone()),
    };
    let store = crate::server::connect(
        &database_url(data_dir, "orchestrator"),
        1,
        Duration::from_secs(5),
    )
    .await?;
    let calls = GrpcParticipants::new(&urls, args.step_timeout)?;
    let seeded = seed(&urls).await?;
    print_banner(
        &args,
        data_dir,
        tls.as_ref(),
        [inventory, payment, fulfillment],
        http_address,
        seeded,
    );
    tracing::info!(
        orchestrator = %args.listen,
        %inventory,
        %payment,
        %fulfillment,
        in_memory = args.in_memory,
        "embedded system listening"
    );

    let settings = Settings {
        executor: ExecutorConfig {
            // Fixed: a restarted dev process resumes its sagas at once.
            replica_id: "dev".to_owned(),
            policy: crate::config::default_policy(),
            backoff_base: crate::config::DEFAULT_BACKOFF_BASE,
            backoff_cap: crate::config::DEFAULT_BACKOFF_CAP,
            lease_ttl: Duration::from_secs(10),
            poll_interval: Duration::from_millis(500),
            max_in_flight: 10_000,
            max_watches: crate::config::DEFAULT_MAX_WATCHES,
            registry,
        },
        participants: urls,
        step_timeout: args.step_timeout,
        max_participant_calls: crate::clients::DEFAULT_MAX_CALLS,
        admin,
        limits: args.limits,
        reconcile_timeout: crate::config::DEFAULT_RECONCILE_TIMEOUT,
        stuck_after: Duration::from_secs(60),
        retention: args.retention.retention()?,
        shutdown_grace: Duration::from_secs(10),
        connection_idle_timeout: common::listen::DEFAULT_IDLE_TIMEOUT,
        tls: tls.as_ref().map(|tls| tls.orchestrator.clone()),
    };
    let served = crate::server::serve(
        store,
        Arc::new(calls),
        settings,
        orchestrator_listener,
        http_listener,
        shutdown,
    )
    .await;
    // The orchestrator has drained: now the participants may stop.
    stop_tx.send_replace(true);
    for task in participant_tasks {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "a participant stopped with an error"),
            Err(error) => tracing::warn!(%error, "a participant task failed"),
        }
    }
    if let Some(dir) = tls.and_then(|tls| tls.temporary) {
        let _ = std::fs::remove_dir_all(dir);
    }
    served
}

/// Seeds the demo products and accounts if the inventory is empty; returns
/// whether it did.
async fn seed(urls: &ParticipantUrls) -> Result<bool, Error> {
    let channel = |name: &str, url: &str| -> Result<tonic::transport::Channel, Error> {
        Ok(urls.endpoint(name, url)?.connect_lazy())
    };
    let failed =
        |e: tonic::Status| Error::Unavailable(format!("seeding the demo data failed: {e}"));
    let mut inventory = InventoryServiceClient::new(channel("inventory", &urls.inventory)?);
    let existing = inventory
        .list_products(ListProductsRequest {
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .map_err(failed)?
        .into_inner();
    if !existing.products.is_empty() {
        return Ok(false);
    }
    for (product_id, name, price_cents, stock) in PRODUCTS {
        inventory
            .upsert_product(UpsertProductRequest {
                product_id: (*product_id).into(),
                name: (*name).into(),
                price_cents: *price_cents,
                stock: *stock,
            })
            .await
            .map_err(failed)?;
    }
    let mut payment = PaymentServiceClient::new(channel("payment", &urls.payment)?);
    for (customer_id, balance_cents) in ACCOUNTS {
        payment
            .upsert_account(UpsertAccountRequest {
                customer_id: (*customer_id).into(),
                balance_cents: *balance_cents,
            })
            .await
            .map_err(failed)?;
    }
    Ok(true)
}

fn print_banner(
    args: &DevArgs,
    data_dir: Option<&Path>,
    tls: Option<&DevTls>,
    [inventory, payment, fulfillment]: [SocketAddr; 3],
    http: Option<SocketAddr>,
    seeded: bool,
) {
    let o = args.listen;
    // How grpcurl and sagactl reach the servers: plaintext, or the
    // development CA and client certificate (the participants require it;
    // the orchestrator only needs the CA).
    let (grpcurl, sagactl, scheme) = match tls {
        None => (
            "grpcurl -plaintext".to_owned(),
            "sagactl".to_owned(),
            "http",
        ),
        Some(tls) => (
            format!(
                "grpcurl -cacert {} -cert {} -key {}",
                shell_path(&tls.files.ca_cert),
                shell_path(&tls.files.client_cert),
                shell_path(&tls.files.client_key)
            ),
            format!("sagactl --ca-cert {}", shell_path(&tls.files.ca_cert)),
            "https",
        ),
    };
    let storage = match data_dir {
        Some(dir) => format!("SQLite files in {} (they survive restarts)", dir.display()),
        None => "in memory (nothing survives this process)".to_owned(),
    };
    let products: Vec<String> = PRODUCTS
        .iter()
        .map(|(id, _, price, stock)| format!("{id} ({} each, {stock} in stock)", cents(*price)))
        .collect();
    let accounts: Vec<String> = ACCOUNTS
        .iter()
        .map(|(id, balance)| format!("{id} ({})", cents(*balance)))
        .collect();
    let mut text = format!(
        "\nSaga orchestrator, embedded mode. Storage: {storage}.\n\
         \n  orchestrator  {o}   saga.v1.OrderService, saga.v1.AdminService\
         \n  inventory     {inventory}\
         \n  payment       {payment}\
         \n  fulfillment   {fulfillment}\
         \n  fault injection: {}\n{}\
         \nDemo data{}:\n  products:  {}\n  customers: {}\n\
         \nTry:\n\
         \n  {grpcurl} -d '{{\"customer_id\":\"alice\",\"items\":[{{\"product_id\":\"widget\",\"quantity\":2}}]}}' {o} saga.v1.OrderService/PlaceOrder\
         \n  {grpcurl} -d '{{\"order_id\":\"ORDER_ID\"}}' {o} saga.v1.OrderService/GetOrderStatus\
         \n  {grpcurl} -d '{{\"customer_id\":\"bob\",\"items\":[{{\"product_id\":\"gadget\",\"quantity\":1}}]}}' {o} saga.v1.OrderService/PlaceOrder   # bob cannot pay: released\
         \n  {sagactl} --endpoint {scheme}://{o} list\
         \n  {sagactl} --endpoint {scheme}://{o} show ORDER_ID\n",
        if args.fault_injection {
            "on"
        } else {
            "off (start with --fault-injection to make steps fail)"
        },
        match http {
            Some(http) => {
                // A browser reaches an unspecified address as loopback.
                let host = if http.ip().is_unspecified() {
                    SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), http.port())
                } else {
                    http
                };
                format!(
                    "\n  console       {scheme}://{host}/ui   (probes and metrics: /healthz, /readyz, /metrics)\n"
                )
            }
            None => String::new(),
        },
        if seeded {
            " (seeded now)"
        } else {
            " (seeded on first start)"
        },
        products.join(", "),
        accounts.join(", "),
    );
    if args.fault_injection {
        text.push_str(&format!(
            "\nMake payment fail after charging (every reply lost) and watch the refund and the release:\
             \n  {grpcurl} -d '{{\"rpc\":\"Charge\",\"mode\":\"FAIL_AFTER_COMMIT\",\"code\":\"UNAVAILABLE\"}}' {payment} fault.v1.FaultInjection/SetFault\
             \n  {grpcurl} -d '{{\"customer_id\":\"alice\",\"items\":[{{\"product_id\":\"widget\",\"quantity\":1}}]}}' {o} saga.v1.OrderService/PlaceOrder\
             \n  {grpcurl} -d '{{\"order_id\":\"ORDER_ID\"}}' {o} saga.v1.OrderService/WatchOrder\
             \n  {grpcurl} {payment} fault.v1.FaultInjection/ClearFaults\n"
        ));
    }
    if let Some(tls) = tls {
        text.push_str(&format!(
            "\nTLS: every port; the participants require a client certificate (mTLS).\
             \n  CA {} and certificates {} ({}); re-read on SIGHUP.\
             \n  Load generator: {sagactl} --cert {} --key {} --endpoint https://{o} bench \\\
             \n      --inventory-url https://{inventory} --payment-url https://{payment}\n",
            shell_path(&tls.files.ca_cert),
            tls.files
                .ca_cert
                .parent()
                .map_or_else(String::new, shell_path),
            if tls.made { "made now" } else { "reused" },
            shell_path(&tls.files.client_cert),
            shell_path(&tls.files.client_key),
        ));
    }
    println!("{text}");
}

/// A path as a shell word: quoted when it holds anything but plain
/// characters.
fn shell_path(path: &Path) -> String {
    let text = path.display().to_string();
    if text
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+:,@".contains(c))
    {
        text
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}
