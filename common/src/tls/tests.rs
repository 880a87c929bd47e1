//! The flags' rules, loading, reload keeping the old configuration on a
//! bad file, and the development certificates' reuse.

use std::sync::Arc;

use super::dev::{Pki, PkiFiles, ensure};
use super::*;

fn temp_dir(label: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!("saga-tls-{label}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn names() -> Vec<String> {
    vec!["localhost".into(), "127.0.0.1".into()]
}

#[test]
fn server_flags_go_together() {
    let args = |cert: Option<&str>, key: Option<&str>, ca: Option<&str>| ServerArgs {
        tls_cert: cert.map(PathBuf::from),
        tls_key: key.map(PathBuf::from),
        tls_client_ca: ca.map(PathBuf::from),
    };
    assert!(args(None, None, None).load().unwrap().is_none());
    let error = args(Some("c.pem"), None, None)
        .load()
        .unwrap_err()
        .to_string();
    assert!(error.contains("--tls-cert needs --tls-key"), "{error}");
    let error = args(None, Some("k.pem"), None)
        .load()
        .unwrap_err()
        .to_string();
    assert!(error.contains("--tls-key needs --tls-cert"), "{error}");
    let error = args(None, None, Some("ca.pem"))
        .load()
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("--tls-client-ca needs --tls-cert"),
        "{error}"
    );
    let error = args(Some("/nonexistent/c.pem"), Some("/nonexistent/k.pem"), None)
        .load()
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("cannot read --tls-cert /nonexistent/c.pem"),
        "{error}"
    );
}

#[test]
fn a_key_of_another_certificate_is_refused() {
    let dir = temp_dir("mismatch");
    let files = Pki::generate("test", &names())
        .unwrap()
        .write(&dir)
        .unwrap();
    let error = Server::load(ServerFiles {
        cert: files.server_cert.clone(),
        key: files.client_key.clone(),
        client_ca: None,
    })
    .unwrap_err()
    .to_string();
    assert!(error.contains("does not fit --tls-cert"), "{error}");
    std::fs::write(&files.ca_cert, "not a certificate").unwrap();
    let error = Server::load(files.server(true)).unwrap_err().to_string();
    assert!(error.contains("holds no PEM certificate"), "{error}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_bad_file_on_reload_keeps_the_configuration_in_use() {
    let dir = temp_dir("reload");
    let files = Pki::generate("first", &names())
        .unwrap()
        .write(&dir)
        .unwrap();
    let server = Server::load(files.server(true)).unwrap();
    let config = |server: &Server| server.current.read().unwrap().grpc.clone();
    let before = config(&server);
    assert!(server.requires_client_certificate());

    std::fs::write(&files.server_cert, "garbage").unwrap();
    let error = server.reload().unwrap_err().to_string();
    assert!(error.contains("--tls-cert"), "{error}");
    assert!(
        Arc::ptr_eq(&before, &config(&server)),
        "the old configuration stays"
    );

    Pki::generate("second", &names())
        .unwrap()
        .write(&dir)
        .unwrap();
    server.reload().unwrap();
    let after = config(&server);
    assert!(!Arc::ptr_eq(&before, &after), "a good reload swaps it");
    assert_eq!(after.alpn_protocols, vec![b"h2".to_vec()]);
    let http = server.current.read().unwrap().http.clone();
    assert_eq!(http.alpn_protocols, vec![b"http/1.1".to_vec()]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn client_flags_need_a_ca_and_both_halves_of_an_identity() {
    let flags = ClientFlags {
        ca: "--ca-cert",
        cert: "--cert",
        key: "--key",
    };
    let p = |s: &'static str| Some(Path::new(s));
    assert!(
        Client::from_flags(None, None, None, flags)
            .unwrap()
            .is_none()
    );
    let error = Client::from_flags(p("ca"), p("c"), None, flags)
        .unwrap_err()
        .to_string();
    assert_eq!(error, "--cert needs --key");
    let error = Client::from_flags(None, p("c"), p("k"), flags)
        .unwrap_err()
        .to_string();
    assert!(
        error.starts_with("--cert is for https:// servers and needs --ca-cert"),
        "{error}"
    );

    let dir = temp_dir("client");
    let files = Pki::generate("test", &names())
        .unwrap()
        .write(&dir)
        .unwrap();
    let client = Client::from_flags(
        Some(&files.ca_cert),
        Some(&files.client_cert),
        Some(&files.client_key),
        flags,
    )
    .unwrap()
    .unwrap();
    assert!(client.has_identity());
    let error = endpoint("https://127.0.0.1:1", None, "--ca-cert").unwrap_err();
    assert!(error.contains("is https:// and needs --ca-cert"), "{error}");
    assert!(endpoint("https://127.0.0.1:1", Some(&client), "--ca-cert").is_ok());
    assert!(endpoint("http://127.0.0.1:1", None, "--ca-cert").is_ok());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn development_certificates_are_reused_while_they_fit() {
    let dir = temp_dir("dev");
    let (files, made) = ensure(&dir, "dev", &names()).unwrap();
    assert!(made);
    assert_eq!(files, PkiFiles::in_dir(&dir));
    let ca = std::fs::read_to_string(&files.ca_cert).unwrap();
    let (_, made) = ensure(&dir, "dev", &names()).unwrap();
    assert!(!made, "valid files are kept");
    assert_eq!(std::fs::read_to_string(&files.ca_cert).unwrap(), ca);
    // A name the server certificate does not cover: made anew.
    let mut more = names();
    more.push("orders.example".into());
    let (_, made) = ensure(&dir, "dev", &more).unwrap();
    assert!(made);
    assert_ne!(std::fs::read_to_string(&files.ca_cert).unwrap(), ca);
    files.check(&more).unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}
