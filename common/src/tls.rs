//! TLS and mTLS on every hop, with rustls and its `ring` provider.
//!
//! - Servers: [`ServerArgs`] (`--tls-cert`, `--tls-key`, `--tls-client-ca`)
//!   load into a [`Server`]: the certificate chain and key every port of the
//!   server presents (gRPC and `--http-listen`), and with a client CA, the
//!   demand that every client present a certificate that CA signed (mTLS).
//!   [`incoming`] is [`crate::listen::incoming`] with a TLS handshake per
//!   connection, each in a task of its own under [`HANDSHAKE_TIMEOUT`], so a
//!   slow or silent client never holds up the accept loop. gRPC ports
//!   negotiate ALPN `h2`, the HTTP port `http/1.1`. Without TLS nothing here
//!   runs: the plaintext ports accept exactly as before.
//! - Reload: [`Server::reload`] re-reads the three files and swaps the
//!   configuration new handshakes use; connections already open keep the
//!   one they started with. [`reload_on_sighup`] does it on every SIGHUP. A
//!   file that does not load is logged and the old configuration kept.
//! - Clients: [`Client`] (a CA to trust, and optionally a certificate and
//!   key to present) and [`endpoint`], the tonic endpoint of an `http://` or
//!   `https://` URL. https needs a CA, named explicitly: the system's roots
//!   are never used, so a certificate that verifies is one the operator
//!   chose to trust.
//! - [`dev`] (feature `dev-certs`): a development CA with a server and a
//!   client certificate, for `orchestrator dev --tls` and the tests.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::error::Error;
use crate::listen::IdleClose;

pub use tokio_rustls::server::TlsStream;

/// Longest a client may take over its TLS handshake before the
/// connection is closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The crypto provider every TLS configuration here is built with: ring,
/// installed as the process default on first use (tonic's clients build
/// theirs from the process default).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            // Err means a provider was installed already: use that one.
            let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
            CryptoProvider::get_default()
                .cloned()
                .unwrap_or_else(|| Arc::new(tokio_rustls::rustls::crypto::ring::default_provider()))
        })
        .clone()
}

/// The TLS flags of every server: `--tls-cert`, `--tls-key` and
/// `--tls-client-ca`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServerArgs {
    /// PEM certificate chain (the server's certificate first) presented on
    /// every port, gRPC and --http-listen; with --tls-key, those ports speak
    /// TLS only. Re-read on SIGHUP.
    #[arg(long, env = "TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1). Re-read on
    /// SIGHUP.
    #[arg(long, env = "TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificate(s): every client must present a certificate one
    /// of them signed (mTLS); others are refused in the handshake. Needs
    /// --tls-cert. Re-read on SIGHUP.
    #[arg(long, env = "TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
}

impl ServerArgs {
    /// The server's TLS, or None for plaintext; an error (saying which flag)
    /// when the flags do not go together or a file does not load.
    pub fn load(&self) -> Result<Option<Arc<Server>>, Error> {
        match (&self.tls_cert, &self.tls_key) {
            (None, None) if self.tls_client_ca.is_some() => Err(Error::invalid(
                "--tls-client-ca needs --tls-cert and --tls-key (mTLS is TLS first)",
            )),
            (None, None) => Ok(None),
            (Some(_), None) => Err(Error::invalid(
                "--tls-cert needs --tls-key (give both, or neither for plaintext)",
            )),
            (None, Some(_)) => Err(Error::invalid(
                "--tls-key needs --tls-cert (give both, or neither for plaintext)",
            )),
            (Some(cert), Some(key)) => Server::load(ServerFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls_client_ca.clone(),
            })
            .map(Some),
        }
    }
}

/// Where a server's TLS material is read from (and re-read on reload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFiles {
    /// The certificate chain, PEM.
    pub cert: PathBuf,
    /// Its private key, PEM.
    pub key: PathBuf,
    /// The CA(s) client certificates must chain to; None: no client
    /// certificate asked for.
    pub client_ca: Option<PathBuf>,
}

/// Which port a handshake is for: it picks the ALPN protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// gRPC: HTTP/2 (`h2`).
    Grpc,
    /// The probes and metrics: HTTP/1.1.
    Http,
}

#[derive(Clone)]
struct Configs {
    grpc: Arc<ServerConfig>,
    http: Arc<ServerConfig>,
}

/// A server's TLS: the configuration new handshakes use, replaced whole by
/// [`Server::reload`]. Handshakes in progress and connections already open
/// keep the configuration they started with.
pub struct Server {
    files: ServerFiles,
    current: RwLock<Configs>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Loads `files`; the error names the flag and file that failed.
    pub fn load(files: ServerFiles) -> Result<Arc<Self>, Error> {
        let configs = build(&files)?;
        Ok(Arc::new(Self {
            files,
            current: RwLock::new(configs),
        }))
    }

    /// Where it reads its files.
    pub fn files(&self) -> &ServerFiles {
        &self.files
    }

    /// Whether clients must present a certificate (mTLS).
    pub fn requires_client_certificate(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// Re-reads the files; on success new handshakes use them, on failure
    /// the configuration in use stays and the error says why.
    pub fn reload(&self) -> Result<(), Error> {
        let configs = build(&self.files)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = configs;
        Ok(())
    }

    /// The acceptor for the next handshake on `port`.
    pub fn acceptor(&self, port: Port) -> TlsAcceptor {
        let configs = self.current.read().unwrap_or_else(|e| e.into_inner());
        TlsAcceptor::from(match port {
            Port::Grpc => configs.grpc.clone(),
            Port::Http => configs.http.clone(),
        })
    }

    fn describe(&self) -> String {
        let mut text = format!(
            "certificate {}, key {}",
            self.files.cert.display(),
            self.files.key.display()
        );
        if let Some(ca) = &self.files.client_ca {
            text.push_str(&format!(", client CA {}", ca.display()));
        }
        text
    }
}

fn read(path: &Path, flag: &str) -> Result<Vec<u8>, Error> {
    std::fs::read(path)
        .map_err(|e| Error::invalid(format!("cannot read {flag} {}: {e}", path.display())))
}

/// Every certificate in a PEM file (at least one).
fn certificates(path: &Path, flag: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let pem = read(path, flag)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::invalid(format!("{flag} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::invalid(format!(
            "{flag} {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    Ok(certs)
}

/// The first private key in a PEM file.
fn private_key(path: &Path, flag: &str) -> Result<PrivateKeyDer<'static>, Error> {
    let pem = read(path, flag)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        Error::invalid(format!(
            "{flag} {} holds no usable PEM private key: {e}",
            path.display()
        ))
    })
}

/// A certificate chain and its key, checked to belong together.
fn identity(
    (cert, cert_flag): (&Path, &str),
    (key, key_flag): (&Path, &str),
) -> Result<CertifiedKey, Error> {
    let chain = certificates(cert, cert_flag)?;
    let key_der = private_key(key, key_flag)?;
    CertifiedKey::from_der(chain, key_der, &provider()).map_err(|e| {
        Error::invalid(format!(
            "{key_flag} {} does not fit {cert_flag} {}: {e}",
            key.display(),
            cert.display()
        ))
    })
}

/// A root store of every certificate in a PEM file.
fn roots(path: &Path, flag: &str) -> Result<Arc<RootCertStore>, Error> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(path, flag)? {
        roots
            .add(cert)
            .map_err(|e| Error::invalid(format!("{flag} {}: {e}", path.display())))?;
    }
    Ok(Arc::new(roots))
}

fn build(files: &ServerFiles) -> Result<Configs, Error> {
    let provider = provider();
    let certified = identity((&files.cert, "--tls-cert"), (&files.key, "--tls-key"))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::invalid(format!("TLS: {e}")))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(
                roots(ca, "--tls-client-ca")?,
                provider,
            )
            .build()
            .map_err(|e| Error::invalid(format!("--tls-client-ca {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut grpc = builder.with_cert_resolver(Arc::new(Single(Arc::new(certified))));
    let mut http = grpc.clone();
    grpc.alpn_protocols = vec![b"h2".to_vec()];
    http.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Configs {
        grpc: Arc::new(grpc),
        http: Arc::new(http),
    })
}

/// One certificate for every handshake, whatever name the client asked for.
#[derive(Debug)]
struct Single(Arc<CertifiedKey>);

impl tokio_rustls::rustls::server::ResolvesServerCert for Single {
    fn resolve(
        &self,
        _: tokio_rustls::rustls::server::ClientHello<'_>,
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// The TLS handshake of one accepted connection, within
/// [`HANDSHAKE_TIMEOUT`].
pub async fn handshake<S>(acceptor: &TlsAcceptor, stream: S) -> io::Result<TlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no TLS handshake within {HANDSHAKE_TIMEOUT:?}"),
        )),
    }
}

/// [`crate::listen::incoming`] over TLS: each accepted connection's
/// handshake runs in a task of its own (a client that never finishes it
/// costs a task until [`HANDSHAKE_TIMEOUT`], not the accept loop), and
/// only connections whose handshake succeeded reach the server. A failed
/// handshake (a plaintext client, an untrusted or missing client
/// certificate) is logged at debug level and the connection closed.
pub fn incoming(
    listener: TcpListener,
    idle: Duration,
    tls: Arc<Server>,
) -> ReceiverStream<Result<TlsStream<IdleClose<TcpStream>>, io::Error>> {
    crate::listen::accepting(listener, idle, move |stream, sender| {
        let acceptor = tls.acceptor(Port::Grpc);
        tokio::spawn(async move {
            match handshake(&acceptor, stream).await {
                Ok(stream) => {
                    let _ = sender.send(Ok(stream)).await;
                }
                Err(error) => tracing::debug!(port = "grpc", %error, "TLS handshake failed"),
            }
        });
        std::future::ready(true)
    })
}

/// Reloads `tls` on every SIGHUP until `stopping` turns true, logging one
/// line per reload: what was read, or why the configuration in use stays.
/// The signal is watched from the moment this returns (a SIGHUP before
/// then would end the process).
pub fn reload_on_sighup(
    tls: Arc<Server>,
    server: &'static str,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(hangup) => hangup,
            Err(error) => {
                tracing::warn!(%error, server, "cannot watch SIGHUP; TLS files are not reloaded");
                return;
            }
        };
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    received = hangup.recv() => {
                        if received.is_none() {
                            return;
                        }
                    }
                    _ = stopping.wait_for(|stopping| *stopping) => return,
                }
                match tls.reload() {
                    Ok(()) => tracing::info!(
                        server,
                        "SIGHUP: reloaded TLS {}; new connections use them, open ones keep theirs",
                        tls.describe()
                    ),
                    Err(error) => tracing::error!(
                        server,
                        %error,
                        "SIGHUP: TLS reload failed; keeping the configuration in use"
                    ),
                }
            }
        });
    }
    #[cfg(not(unix))]
    {
        let _ = (tls, stopping);
        tracing::info!(
            server,
            "no SIGHUP on this platform; TLS files are not reloaded"
        );
    }
}

/// What a client trusts and presents: the CA that signed the servers'
/// certificates, and optionally a certificate of its own (for servers that
/// require one). Cheap to clone.
#[derive(Clone)]
pub struct Client {
    config: ClientTlsConfig,
    ca: PathBuf,
    identity: Option<PathBuf>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("ca", &self.ca)
            .field("certificate", &self.identity)
            .finish_non_exhaustive()
    }
}

/// The names of a client's three TLS flags, for its error messages.
#[derive(Debug, Clone, Copy)]
pub struct ClientFlags {
    /// The CA flag, e.g. `--participant-ca`.
    pub ca: &'static str,
    /// The certificate flag, e.g. `--client-cert`.
    pub cert: &'static str,
    /// The key flag, e.g. `--client-key`.
    pub key: &'static str,
}

impl Client {
    /// Trusts the CA(s) in `ca` and, with `identity` (certificate chain and
    /// key files), presents that certificate; checked now, so a bad file is
    /// an error at start, not at the first call.
    pub fn load(
        ca: &Path,
        identity: Option<(&Path, &Path)>,
        flags: ClientFlags,
    ) -> Result<Self, Error> {
        provider();
        roots(ca, flags.ca)?;
        let mut config =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca, flags.ca)?));
        if let Some((cert, key)) = identity {
            self::identity((cert, flags.cert), (key, flags.key))?;
            config = config.identity(Identity::from_pem(
                read(cert, flags.cert)?,
                read(key, flags.key)?,
            ));
        }
        Ok(Self {
            config,
            ca: ca.to_owned(),
            identity: identity.map(|(cert, _)| cert.to_owned()),
        })
    }

    /// The client's TLS from its three flags: None when none is given; an
    /// error when a certificate comes without its key (or the reverse) or
    /// without a CA.
    pub fn from_flags(
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
        flags: ClientFlags,
    ) -> Result<Option<Self>, Error> {
        let identity = match (cert, key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(Error::invalid(format!(
                    "{} needs {}",
                    flags.cert, flags.key
                )));
            }
            (None, Some(_)) => {
                return Err(Error::invalid(format!(
                    "{} needs {}",
                    flags.key, flags.cert
                )));
            }
        };
        match ca {
            Some(ca) => Self::load(ca, identity, flags).map(Some),
            None if identity.is_some() => Err(Error::invalid(format!(
                "{} is for https:// servers and needs {} (the CA that signed their certificates)",
                flags.cert, flags.ca
            ))),
            None => Ok(None),
        }
    }

    /// Whether it presents a certificate of its own.
    pub fn has_identity(&self) -> bool {
        self.identity.is_some()
    }
}

/// The endpoint of `url`: `http://` plaintext, `https://` TLS with
/// `tls` (an https URL without one is an error naming `ca_flag`). The
/// error is one line, without the flag naming the URL: the caller adds it.
pub fn endpoint(url: &str, tls: Option<&Client>, ca_flag: &str) -> Result<Endpoint, String> {
    let endpoint =
        Endpoint::from_shared(url.to_owned()).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    let https = endpoint.uri().scheme_str() == Some("https");
    match (https, tls) {
        (false, _) => Ok(endpoint),
        (true, None) => Err(format!(
            "{url} is https:// and needs {ca_flag} (the CA that signed its certificate)"
        )),
        (true, Some(tls)) => endpoint
            .tls_config(tls.config.clone())
            .map_err(|e| format!("TLS for {url}: {}", error_chain(&e))),
    }
}

/// An error and its sources on one line (`transport error: ...: invalid
/// peer certificate: UnknownIssuer`): tonic's errors say little at the top.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(feature = "dev-certs")]
pub mod dev;

#[cfg(all(test, feature = "dev-certs"))]
mod tests;
