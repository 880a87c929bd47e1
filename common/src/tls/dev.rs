//! A development CA and the certificates signed by it, made with rcgen:
//! one server certificate (for the names and addresses the servers are
//! reached at) and one client certificate (for mTLS). For `orchestrator dev
//! --tls`, which keeps them in its data directory, and for the tests;
//! production certificates come from the operator's own CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tokio_rustls::rustls::client::WebPkiServerVerifier;
use tokio_rustls::rustls::client::danger::ServerCertVerifier;
use tokio_rustls::rustls::pki_types::{ServerName, UnixTime};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::server::danger::ClientCertVerifier;

use super::{Client, ClientFlags, ServerFiles, identity, roots};
use crate::error::Error;

/// A CA and the two certificates it signed, as PEM text.
#[derive(Clone)]
pub struct Pki {
    /// The CA's certificate: what clients and mTLS servers trust.
    pub ca_cert: String,
    /// The CA's private key.
    pub ca_key: String,
    /// The servers' certificate.
    pub server_cert: String,
    /// Its private key.
    pub server_key: String,
    /// The client certificate.
    pub client_cert: String,
    /// Its private key.
    pub client_key: String,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki").finish_non_exhaustive()
    }
}

fn rcgen_error(e: rcgen::Error) -> Error {
    Error::invalid(format!("making a development certificate: {e}"))
}

impl Pki {
    /// A new CA named after `name` and, signed by it, a server certificate
    /// for `server_names` (DNS names or IP addresses) and a client
    /// certificate.
    pub fn generate(name: &str, server_names: &[String]) -> Result<Self, Error> {
        let ca_key = KeyPair::generate().map_err(rcgen_error)?;
        let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(rcgen_error)?;
        ca.distinguished_name
            .push(DnType::CommonName, format!("{name} development CA"));
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key).map_err(rcgen_error)?;
        let issuer = Issuer::new(ca, &ca_key);
        let leaf = |names: Vec<String>, common_name: String, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().map_err(rcgen_error)?;
            let mut params = CertificateParams::new(names).map_err(rcgen_error)?;
            params
                .distinguished_name
                .push(DnType::CommonName, common_name);
            params.is_ca = IsCa::ExplicitNoCa;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![usage];
            params.use_authority_key_identifier_extension = true;
            let cert = params.signed_by(&key, &issuer).map_err(rcgen_error)?;
            Ok::<_, Error>((cert.pem(), key.serialize_pem()))
        };
        let (server_cert, server_key) = leaf(
            server_names.to_vec(),
            format!("{name} server"),
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        let (client_cert, client_key) = leaf(
            Vec::new(),
            format!("{name} client"),
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        Ok(Self {
            ca_cert: ca_cert.pem(),
            ca_key: ca_key.serialize_pem(),
            server_cert,
            server_key,
            client_cert,
            client_key,
        })
    }

    /// Writes the six files into `dir` (created if missing); the keys
    /// readable by their owner only.
    pub fn write(&self, dir: &Path) -> Result<PkiFiles, Error> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::invalid(format!("cannot create {}: {e}", dir.display())))?;
        let files = PkiFiles::in_dir(dir);
        for (path, text, secret) in [
            (&files.ca_cert, &self.ca_cert, false),
            (&files.ca_key, &self.ca_key, true),
            (&files.server_cert, &self.server_cert, false),
            (&files.server_key, &self.server_key, true),
            (&files.client_cert, &self.client_cert, false),
            (&files.client_key, &self.client_key, true),
        ] {
            write_file(path, text, secret)?;
        }
        Ok(files)
    }
}

/// Writes `text` to `path` through a temporary file and a rename, so a
/// server re-reading it never sees half a file.
fn write_file(path: &Path, text: &str, secret: bool) -> Result<(), Error> {
    let failed =
        |e: std::io::Error| Error::invalid(format!("cannot write {}: {e}", path.display()));
    let partial = path.with_extension("partial");
    std::fs::write(&partial, text).map_err(failed)?;
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o600))
            .map_err(failed)?;
    }
    #[cfg(not(unix))]
    let _ = secret;
    std::fs::rename(&partial, path).map_err(failed)
}

/// Where a development CA's files are, in one directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PkiFiles {
    /// `ca.pem`.
    pub ca_cert: PathBuf,
    /// `ca-key.pem`.
    pub ca_key: PathBuf,
    /// `server.pem`.
    pub server_cert: PathBuf,
    /// `server-key.pem`.
    pub server_key: PathBuf,
    /// `client.pem`.
    pub client_cert: PathBuf,
    /// `client-key.pem`.
    pub client_key: PathBuf,
}

/// The flags of a client made from [`PkiFiles`], for its error messages.
const FLAGS: ClientFlags = ClientFlags {
    ca: "the CA certificate",
    cert: "the client certificate",
    key: "the client key",
};

impl PkiFiles {
    /// The file names in `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca-key.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server-key.pem"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client-key.pem"),
        }
    }

    /// A server presenting the server certificate; with `mtls`, requiring
    /// client certificates signed by this CA.
    pub fn server(&self, mtls: bool) -> ServerFiles {
        ServerFiles {
            cert: self.server_cert.clone(),
            key: self.server_key.clone(),
            client_ca: mtls.then(|| self.ca_cert.clone()),
        }
    }

    /// A client trusting this CA; with `identity`, presenting the client
    /// certificate.
    pub fn client(&self, identity: bool) -> Result<Client, Error> {
        Client::load(
            &self.ca_cert,
            identity.then_some((self.client_cert.as_path(), self.client_key.as_path())),
            FLAGS,
        )
    }

    /// Whether the files load, belong together, and will still verify a
    /// day from now: the server certificate for each of `server_names`,
    /// the client certificate as a client's, both against the CA.
    pub fn check(&self, server_names: &[String]) -> Result<(), Error> {
        let provider = super::provider();
        let roots = roots(&self.ca_cert, "the CA certificate")?;
        let server = identity(
            (&self.server_cert, "the server certificate"),
            (&self.server_key, "the server key"),
        )?;
        let client = identity(
            (&self.client_cert, "the client certificate"),
            (&self.client_key, "the client key"),
        )?;
        let tomorrow = UnixTime::since_unix_epoch(Duration::from_secs(
            UnixTime::now().as_secs().saturating_add(86_400),
        ));
        let servers = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| Error::invalid(format!("the CA certificate: {e}")))?;
        for name in server_names {
            let server_name = ServerName::try_from(name.as_str())
                .map_err(|e| Error::invalid(format!("server name {name:?}: {e}")))?;
            servers
                .verify_server_cert(
                    &server.cert[0],
                    &server.cert[1..],
                    &server_name,
                    &[],
                    tomorrow,
                )
                .map_err(|e| Error::invalid(format!("the server certificate for {name}: {e}")))?;
        }
        let clients: Arc<dyn ClientCertVerifier> =
            WebPkiClientVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| Error::invalid(format!("the CA certificate: {e}")))?;
        clients
            .verify_client_cert(&client.cert[0], &client.cert[1..], tomorrow)
            .map_err(|e| Error::invalid(format!("the client certificate: {e}")))?;
        Ok(())
    }
}

/// The development CA's files in `dir`: the ones already there when they
/// pass [`PkiFiles::check`] for `server_names`, or a new CA and
/// certificates written over them. Returns the files and whether they were
/// made now.
pub fn ensure(dir: &Path, name: &str, server_names: &[String]) -> Result<(PkiFiles, bool), Error> {
    let files = PkiFiles::in_dir(dir);
    match files.check(server_names) {
        Ok(()) => Ok((files, false)),
        Err(why) => {
            if files.ca_cert.exists() {
                tracing::info!(%why, dir = %dir.display(), "making new development certificates");
            }
            Ok((Pki::generate(name, server_names)?.write(dir)?, true))
        }
    }
}
