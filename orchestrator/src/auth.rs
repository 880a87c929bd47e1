//! Who may call `saga.v1.AdminService`: the admin tokens, their flags, and
//! the one table of which RPC needs which role.
//!
//! Two tokens, each optional:
//! - the *operator* token (`--admin-token-file`, or `ADMIN_TOKEN`; the old
//!   `--admin-token` flag still works but shows the token to every user of
//!   the machine, so a warning is logged): every RPC;
//! - the *read-only* token (`--read-only-token-file`): the RPCs that only
//!   read (ListSagas, GetSaga, Stats, and Reconcile without repair).
//!
//! With neither, AdminService is open, as before tokens existed. With only
//! the read-only token, the operator RPCs are refused to everyone.
//!
//! A call without a valid token is UNAUTHENTICATED; a valid read-only token
//! on an operator RPC is PERMISSION_DENIED, naming the RPC. [`AdminAuth`],
//! the interceptor, authenticates (token → [`Role`], put in the request's
//! extensions); each handler's first line, [`authorize`], looks the RPC up
//! in [`AdminRpc::needs`]. Tokens are compared as SHA-256 digests, in
//! constant time (the length of a guess tells nothing either), and only the
//! digests are kept; `Debug` of everything here shows no token.

use std::fmt;
use std::path::PathBuf;

use common::cli::{Secret, check_token, read_token_file};
use sha2::{Digest, Sha256};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::error::Error;

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Read: list, show, stats, reconcile without repair.
    ReadOnly,
    /// Everything, including what changes sagas.
    Operator,
}

/// The AdminService RPCs, as the role table distinguishes them (Reconcile
/// with repair changes sagas; without, it only reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminRpc {
    /// `ListSagas`.
    ListSagas,
    /// `GetSaga`.
    GetSaga,
    /// `Stats`.
    Stats,
    /// `Reconcile` with `repair` false.
    Reconcile,
    /// `Reconcile` with `repair` true: compensates orphans.
    ReconcileRepair,
    /// `RetrySaga`.
    RetrySaga,
    /// `AbortSaga`.
    AbortSaga,
    /// `ExportSagas`.
    ExportSagas,
}

impl AdminRpc {
    /// Every RPC of the table.
    pub const ALL: [AdminRpc; 8] = [
        Self::ListSagas,
        Self::GetSaga,
        Self::Stats,
        Self::Reconcile,
        Self::ReconcileRepair,
        Self::RetrySaga,
        Self::AbortSaga,
        Self::ExportSagas,
    ];

    /// The role each RPC needs: the one place this is decided.
    pub fn needs(self) -> Role {
        match self {
            Self::ListSagas | Self::GetSaga | Self::Stats | Self::Reconcile | Self::ExportSagas => {
                Role::ReadOnly
            }
            Self::RetrySaga | Self::AbortSaga | Self::ReconcileRepair => Role::Operator,
        }
    }

    /// The RPC's method name in `saga.v1.AdminService`.
    pub fn method(self) -> &'static str {
        match self {
            Self::ListSagas => "ListSagas",
            Self::GetSaga => "GetSaga",
            Self::Stats => "Stats",
            Self::Reconcile | Self::ReconcileRepair => "Reconcile",
            Self::RetrySaga => "RetrySaga",
            Self::AbortSaga => "AbortSaga",
            Self::ExportSagas => "ExportSagas",
        }
    }

    /// How messages name it.
    fn describe(self) -> &'static str {
        match self {
            Self::ReconcileRepair => "Reconcile with repair",
            other => other.method(),
        }
    }
}

/// A token's digest: what is kept and compared.
type Digest32 = [u8; 32];

fn digest(token: &str) -> Digest32 {
    Sha256::digest(token.as_bytes()).into()
}

/// Equal digests, without stopping at the first difference: the time taken
/// does not tell how much of a guess was right. Digests have one length,
/// so a guess's length tells nothing either.
fn same_digest(a: &Digest32, b: &Digest32) -> bool {
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

/// The tokens AdminService accepts, as digests.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AdminTokens {
    operator: Option<Digest32>,
    read_only: Option<Digest32>,
}

impl fmt::Debug for AdminTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = |token: &Option<Digest32>| token.map(|_| "<redacted>");
        f.debug_struct("AdminTokens")
            .field("operator", &shown(&self.operator))
            .field("read_only", &shown(&self.read_only))
            .finish()
    }
}

impl AdminTokens {
    /// No token: AdminService is open.
    pub fn open() -> Self {
        Self::default()
    }

    /// The operator token and the read-only token, either optional.
    pub fn new(operator: Option<&str>, read_only: Option<&str>) -> Self {
        Self {
            operator: operator.map(digest),
            read_only: read_only.map(digest),
        }
    }

    /// Whether no token is configured.
    pub fn is_open(&self) -> bool {
        self.operator.is_none() && self.read_only.is_none()
    }

    /// The role `presented` grants, or None if it is no token of these.
    /// Both digests are compared whatever the first comparison says.
    fn role_of(&self, presented: &str) -> Option<Role> {
        let presented = digest(presented);
        let matches = |token: &Option<Digest32>| {
            token
                .as_ref()
                .is_some_and(|token| same_digest(token, &presented))
        };
        let (operator, read_only) = (matches(&self.operator), matches(&self.read_only));
        if operator {
            Some(Role::Operator)
        } else if read_only {
            Some(Role::ReadOnly)
        } else {
            None
        }
    }
}

/// The admin token flags (`orchestrator serve` and `dev`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AdminTokenArgs {
    /// File holding the operator token AdminService then requires of every
    /// call ("authorization: Bearer <token>"; one line, a trailing newline
    /// is ignored). With no token at all AdminService is open.
    #[arg(long, env = "ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// The operator token itself, for compatibility. Prefer
    /// --admin-token-file or the ADMIN_TOKEN environment variable: a flag's
    /// value is visible to every user of the machine (ps), so a warning is
    /// logged when it comes on the command line.
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<Secret>,

    /// File holding a read-only token: it may call ListSagas, GetSaga,
    /// Stats and Reconcile without repair; RetrySaga, AbortSaga and
    /// Reconcile with repair need the operator token (PERMISSION_DENIED).
    /// With only a read-only token configured, those operator RPCs are
    /// refused to everyone.
    #[arg(long, env = "READ_ONLY_TOKEN_FILE")]
    pub read_only_token_file: Option<PathBuf>,

    /// Whether --admin-token came on the command line (set by the binary,
    /// which knows where each value came from), for the warning.
    #[arg(skip)]
    pub admin_token_on_command_line: bool,
}

impl AdminTokenArgs {
    /// Reads the token files and checks the tokens; the error names the
    /// flag and never shows a token.
    pub fn tokens(&self) -> Result<AdminTokens, Error> {
        let invalid = |message: String| Error::invalid(message);
        let operator = match (&self.admin_token_file, &self.admin_token) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "give the operator token once: --admin-token-file (ADMIN_TOKEN_FILE) or \
                     --admin-token (ADMIN_TOKEN), not both"
                        .to_owned(),
                ));
            }
            (Some(path), None) => {
                Some(read_token_file("--admin-token-file", path).map_err(invalid)?)
            }
            (None, Some(token)) => {
                check_token("--admin-token", token.expose()).map_err(invalid)?;
                if self.admin_token_on_command_line {
                    tracing::warn!(
                        "the admin token came on the command line (--admin-token), where every \
                         user of this machine can read it; use --admin-token-file or ADMIN_TOKEN"
                    );
                }
                Some(token.clone())
            }
            (None, None) => None,
        };
        let read_only = self
            .read_only_token_file
            .as_deref()
            .map(|path| read_token_file("--read-only-token-file", path))
            .transpose()
            .map_err(invalid)?;
        if let (Some(operator), Some(read_only)) = (&operator, &read_only)
            && operator == read_only
        {
            return Err(invalid(
                "the read-only token must differ from the operator token".to_owned(),
            ));
        }
        Ok(AdminTokens::new(
            operator.as_ref().map(Secret::expose),
            read_only.as_ref().map(Secret::expose),
        ))
    }
}

/// The interceptor of AdminService: checks `authorization: Bearer <token>`
/// when a token is configured and records the caller's [`Role`] for
/// [`authorize`].
#[derive(Debug, Clone)]
pub struct AdminAuth {
    tokens: AdminTokens,
}

impl AdminAuth {
    /// Accepts `tokens` (everyone, as an operator, when there are none).
    pub fn new(tokens: AdminTokens) -> Self {
        Self { tokens }
    }
}

impl Interceptor for AdminAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let role = if self.tokens.is_open() {
            Role::Operator
        } else {
            let presented = request
                .metadata()
                .get("authorization")
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.strip_prefix("Bearer "));
            match presented.map(|token| self.tokens.role_of(token)) {
                Some(Some(role)) => role,
                Some(None) => return Err(Status::unauthenticated("wrong admin token")),
                None => {
                    return Err(Status::unauthenticated(
                        "AdminService needs the metadata \"authorization: Bearer <token>\" \
                         (sagactl --token-file or --token)",
                    ));
                }
            }
        };
        request.extensions_mut().insert(Granted {
            role,
            operator_configured: self.tokens.is_open() || self.tokens.operator.is_some(),
        });
        Ok(request)
    }
}

/// What [`AdminAuth`] found out about a call.
#[derive(Debug, Clone, Copy)]
struct Granted {
    role: Role,
    operator_configured: bool,
}

/// Lets the call through if its caller's role suffices for `rpc`; else
/// PERMISSION_DENIED naming the RPC. A call that did not pass
/// [`AdminAuth`] is refused.
pub fn authorize<T>(request: &Request<T>, rpc: AdminRpc) -> Result<(), Status> {
    let Some(granted) = request.extensions().get::<Granted>() else {
        return Err(Status::permission_denied(
            "AdminService calls must pass the admin token check",
        ));
    };
    if granted.role >= rpc.needs() {
        return Ok(());
    }
    let rpc = rpc.describe();
    Err(Status::permission_denied(if granted.operator_configured {
        format!("{rpc} needs the operator token; this token is read-only")
    } else {
        format!(
            "{rpc} needs the operator token, and this orchestrator has none configured \
             (--admin-token-file); the read-only token may only read"
        )
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(auth: &mut AdminAuth, token: Option<&str>) -> Result<Request<()>, Status> {
        let mut request = Request::new(());
        if let Some(value) = token {
            request
                .metadata_mut()
                .insert("authorization", value.parse().unwrap());
        }
        auth.call(request)
    }

    /// The code of calling `rpc` with `token` (Ok for allowed).
    fn outcome(auth: &mut AdminAuth, token: Option<&str>, rpc: AdminRpc) -> tonic::Code {
        match call(auth, token).and_then(|request| authorize(&request, rpc)) {
            Ok(()) => tonic::Code::Ok,
            Err(status) => status.code(),
        }
    }

    #[test]
    fn the_role_table_lets_readers_read_and_only_operators_change() {
        use AdminRpc::*;
        let reads = [ListSagas, GetSaga, Stats, Reconcile, ExportSagas];
        let changes = [RetrySaga, AbortSaga, ReconcileRepair];
        assert_eq!(reads.len() + changes.len(), AdminRpc::ALL.len());
        for rpc in reads {
            assert_eq!(rpc.needs(), Role::ReadOnly, "{rpc:?}");
        }
        for rpc in changes {
            assert_eq!(rpc.needs(), Role::Operator, "{rpc:?}");
        }
    }

    #[test]
    fn the_table_names_every_admin_service_method() {
        use prost::Message;
        let set = prost_types::FileDescriptorSet::decode(proto::FILE_DESCRIPTOR_SET).unwrap();
        let service = set
            .file
            .iter()
            .flat_map(|file| {
                file.service
                    .iter()
                    .map(move |service| (file.package(), service))
            })
            .find(|(package, service)| *package == "saga.v1" && service.name() == "AdminService")
            .map(|(_, service)| service)
            .expect("saga.v1.AdminService");
        let mut methods: Vec<&str> = service.method.iter().map(|m| m.name()).collect();
        methods.sort_unstable();
        let mut table: Vec<&str> = AdminRpc::ALL.iter().map(|rpc| rpc.method()).collect();
        table.sort_unstable();
        table.dedup();
        assert_eq!(
            table, methods,
            "a new AdminService RPC needs a row in the role table"
        );
    }

    #[test]
    fn each_token_gets_its_role_and_a_wrong_one_none() {
        let mut auth = AdminAuth::new(AdminTokens::new(Some("op3rator"), Some("r3ader")));
        for rpc in AdminRpc::ALL {
            assert_eq!(
                outcome(&mut auth, Some("Bearer op3rator"), rpc),
                tonic::Code::Ok
            );
            let expected = match rpc.needs() {
                Role::ReadOnly => tonic::Code::Ok,
                Role::Operator => tonic::Code::PermissionDenied,
            };
            assert_eq!(
                outcome(&mut auth, Some("Bearer r3ader"), rpc),
                expected,
                "{rpc:?}"
            );
            for wrong in [
                None,
                Some("Bearer op3rato"),
                Some("Bearer op3rator2"),
                Some("Bearer r3ade"),
                Some("op3rator"),
                Some("Basic op3rator"),
                Some("Bearer "),
            ] {
                assert_eq!(
                    outcome(&mut auth, wrong, rpc),
                    tonic::Code::Unauthenticated,
                    "{wrong:?} on {rpc:?}"
                );
            }
        }
        let denied = call(&mut auth, Some("Bearer r3ader"))
            .and_then(|request| authorize(&request, AdminRpc::RetrySaga))
            .unwrap_err();
        assert_eq!(
            denied.message(),
            "RetrySaga needs the operator token; this token is read-only"
        );
    }

    #[test]
    fn with_only_a_read_only_token_nobody_operates_and_with_none_everybody_does() {
        let mut auth = AdminAuth::new(AdminTokens::new(None, Some("r3ader")));
        assert_eq!(
            outcome(&mut auth, Some("Bearer r3ader"), AdminRpc::Stats),
            tonic::Code::Ok
        );
        assert_eq!(
            outcome(&mut auth, None, AdminRpc::Stats),
            tonic::Code::Unauthenticated
        );
        let denied = call(&mut auth, Some("Bearer r3ader"))
            .and_then(|request| authorize(&request, AdminRpc::ReconcileRepair))
            .unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(
            denied.message().contains("Reconcile with repair")
                && denied.message().contains("none configured"),
            "{}",
            denied.message()
        );

        let mut open = AdminAuth::new(AdminTokens::open());
        for rpc in AdminRpc::ALL {
            assert_eq!(outcome(&mut open, None, rpc), tonic::Code::Ok, "{rpc:?}");
            assert_eq!(
                outcome(&mut open, Some("Bearer anything"), rpc),
                tonic::Code::Ok
            );
        }
        // A call that skipped the interceptor is refused.
        let status = authorize(&Request::new(()), AdminRpc::Stats).unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn digests_compare_whole() {
        let a = digest("s3cret");
        assert!(same_digest(&a, &digest("s3cret")));
        assert!(!same_digest(&a, &digest("s3cret ")));
        assert!(!same_digest(&a, &digest("")));
        let mut b = a;
        b[31] ^= 1;
        assert!(!same_digest(&a, &b));
    }

    fn temp_file(name: &str, content: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("auth-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        path
    }

    #[test]
    fn token_flags_read_files_and_refuse_what_is_ambiguous() {
        let operator = temp_file("operator", "op3rator\n");
        let reader = temp_file("reader", "r3ader\n");
        let empty = temp_file("empty", "\n");
        let args = |file: Option<&PathBuf>, flag: Option<&str>, read_only: Option<&PathBuf>| {
            AdminTokenArgs {
                admin_token_file: file.cloned(),
                admin_token: flag.map(Secret::from),
                read_only_token_file: read_only.cloned(),
                admin_token_on_command_line: flag.is_some(),
            }
        };
        assert_eq!(
            args(Some(&operator), None, Some(&reader)).tokens().unwrap(),
            AdminTokens::new(Some("op3rator"), Some("r3ader"))
        );
        assert_eq!(
            args(None, Some("op3rator"), None).tokens().unwrap(),
            AdminTokens::new(Some("op3rator"), None)
        );
        assert!(args(None, None, None).tokens().unwrap().is_open());
        for (args, says) in [
            (args(Some(&operator), Some("x"), None), "not both"),
            (args(Some(&empty), None, None), "--admin-token-file"),
            (args(None, None, Some(&empty)), "--read-only-token-file"),
            (args(None, Some(""), None), "--admin-token is empty"),
            (args(Some(&operator), None, Some(&operator)), "must differ"),
        ] {
            let error = args.tokens().unwrap_err().to_string();
            assert!(error.contains(says), "{error}");
            assert!(!error.contains("op3rator"), "{error}");
        }
    }

    #[test]
    fn debug_shows_no_token() {
        let tokens = AdminTokens::new(Some("op3rator"), Some("r3ader"));
        let args = AdminTokenArgs {
            admin_token: Some(Secret::from("op3rator")),
            ..AdminTokenArgs::default()
        };
        for shown in [
            format!("{tokens:?}"),
            format!("{:?}", AdminAuth::new(tokens.clone())),
            format!("{args:?}"),
        ] {
            assert!(
                !shown.contains("op3rator") && !shown.contains("r3ader"),
                "{shown}"
            );
        }
        assert_eq!(
            format!("{tokens:?}"),
            "AdminTokens { operator: Some(\"<redacted>\"), read_only: Some(\"<redacted>\") }"
        );
    }
}
