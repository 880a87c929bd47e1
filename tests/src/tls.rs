//! Certificates for the TLS tests, made with rcgen in a temporary folder:
//! a CA with a server certificate (localhost, 127.0.0.1) and a client
//! certificate, and a second, unrelated CA with its own pair. Also an HTTPS
//! GET for the probes port over TLS.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use common::tls::dev::{Pki, PkiFiles};
use common::tls::{Client, Server};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

/// The names the test server certificates are valid for.
pub fn server_names() -> Vec<String> {
    vec!["localhost".into(), "127.0.0.1".into()]
}

/// Two unrelated CAs, each with a server and a client certificate, as
/// files in a folder removed when this is dropped.
#[derive(Debug)]
pub struct TestCerts {
    dir: PathBuf,
    /// The CA the servers and clients of a test use.
    pub ca: PkiFiles,
    /// Another CA nobody trusts.
    pub other: PkiFiles,
}

impl TestCerts {
    /// Makes both CAs and their certificates.
    pub fn new() -> Result<Self> {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "saga-test-tls-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let ca = Pki::generate("test", &server_names())?.write(&dir.join("ca"))?;
        let other = Pki::generate("other", &server_names())?.write(&dir.join("other"))?;
        Ok(Self { dir, ca, other })
    }

    /// The folder the files are in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A server presenting the first CA's server certificate; with
    /// `mtls`, requiring client certificates from the first CA.
    pub fn server(&self, mtls: bool) -> Result<Arc<Server>> {
        Ok(Server::load(self.ca.server(mtls))?)
    }

    /// A client trusting the first CA; with `identity`, presenting its
    /// client certificate.
    pub fn client(&self, identity: bool) -> Result<Client> {
        Ok(self.ca.client(identity)?)
    }
}

impl Drop for TestCerts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `GET path` over TLS on an HTTP port, trusting the CA in `ca`: the
/// status code and the body (code 0 when the exchange failed).
pub async fn https_get(address: SocketAddr, path: &str, ca: &Path) -> Result<(u16, String)> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).context("reading the CA")? {
        roots.add(cert.context("parsing the CA")?)?;
    }
    let mut config = ClientConfig::builder_with_provider(common::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = TlsConnector::from(Arc::new(config));
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(address).await?;
        let name = ServerName::from(address.ip());
        connector.connect(name, tcp).await
    };
    match tokio::time::timeout(Duration::from_secs(10), exchange).await {
        Ok(Ok(stream)) => Ok(crate::http_exchange(stream, path).await),
        _ => Ok((0, String::new())),
    }
}
