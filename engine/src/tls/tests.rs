//! Tests of credential loading and of the allow-list, with certificates made by `openssl`
//! (`ferry_test_support::pki`).

use super::*;
use ferry_test_support::pki::{Pki, Subject};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// The message of an expected error; an error of the test when there is none.
fn error_text<T, E: std::fmt::Display>(result: Result<T, E>) -> Result<String, String> {
    match result {
        Ok(_) => Err("expected an error".into()),
        Err(e) => Ok(e.to_string()),
    }
}

/// Makes a CA, a server pair (`localhost`, `127.0.0.1`) and a client pair named `client_cn`
/// (also its DNS name) in `dir` in QEMU's layout, with the shared test support's [`Pki`].
/// Each call makes a CA of its own.
pub(crate) fn make_credentials(dir: &Path, client_cn: &str) -> TestResult {
    let pki = Pki::new("ferry test CA")?;
    let server = pki.server_credentials("server", &Subject::named("localhost"))?;
    let client_subject = Subject {
        common_name: client_cn,
        dns_names: &[client_cn],
        ip_addresses: &[],
    };
    let client = pki.credentials("client", &client_subject)?;
    for (from, file) in [
        (&server, CA_CERT_FILE),
        (&server, SERVER_CERT_FILE),
        (&server, SERVER_KEY_FILE),
        (&client, CLIENT_CERT_FILE),
        (&client, CLIENT_KEY_FILE),
    ] {
        std::fs::copy(from.join(file), dir.join(file))?;
    }
    Ok(())
}

#[test]
fn loads_qemu_layout_and_builds_both_configurations() -> TestResult {
    let dir = tempfile::tempdir()?;
    make_credentials(dir.path(), "client1")?;
    let creds = TlsCredentials::load(dir.path())?;
    assert!(creds.can_serve() && creds.can_connect());
    creds.server_config()?;
    creds.client_config()?;
    Ok(())
}

#[test]
fn missing_files_are_named() -> TestResult {
    let dir = tempfile::tempdir()?;
    let err = error_text(TlsCredentials::load(dir.path()))?;
    assert!(err.contains("ca-cert.pem is missing"), "{err}");
    make_credentials(dir.path(), "client1")?;
    std::fs::remove_file(dir.path().join("client-key.pem"))?;
    let err = error_text(TlsCredentials::load(dir.path()))?;
    assert!(err.contains("client-key.pem is missing"), "{err}");
    std::fs::remove_file(dir.path().join("client-cert.pem"))?;
    let creds = TlsCredentials::load(dir.path())?;
    assert!(creds.can_serve() && !creds.can_connect());
    let err = error_text(creds.client_config())?;
    assert!(err.contains("client-cert.pem is missing"), "{err}");
    Ok(())
}

#[test]
fn a_key_of_another_certificate_is_refused_at_load() -> TestResult {
    let dir = tempfile::tempdir()?;
    make_credentials(dir.path(), "client1")?;
    std::fs::copy(
        dir.path().join("client-key.pem"),
        dir.path().join("server-key.pem"),
    )?;
    let err = error_text(TlsCredentials::load(dir.path()))?;
    assert!(err.contains("server-cert.pem/server-key.pem"), "{err}");
    Ok(())
}

#[test]
fn garbage_pem_is_refused_in_one_line() -> TestResult {
    let dir = tempfile::tempdir()?;
    make_credentials(dir.path(), "client1")?;
    std::fs::write(dir.path().join("ca-cert.pem"), b"not a certificate\n")?;
    let err = error_text(TlsCredentials::load(dir.path()))?;
    assert!(err.contains("ca-cert.pem") && !err.contains('\n'), "{err}");
    Ok(())
}

#[test]
fn peer_identity_and_allow_list() -> TestResult {
    let dir = tempfile::tempdir()?;
    make_credentials(dir.path(), "client1.example")?;
    let pem = std::fs::read(dir.path().join("client-cert.pem"))?;
    let cert = CertificateDer::from_pem_slice(&pem)?;
    let peer = PeerIdentity::of(&cert).ok_or("unparsable certificate")?;
    assert_eq!(peer.common_names, vec!["client1.example".to_string()]);
    // The test CA gives every certificate `localhost` too.
    assert_eq!(peer.dns_names, vec!["localhost", "client1.example"]);
    assert_eq!(peer.distinguished_name, "CN=client1.example,O=ferry tests");
    assert_eq!(peer.display_name(), "client1.example");

    assert!(TlsAuthz::default().check(&peer).is_ok());
    assert!(TlsAuthz::parse("other,client1.example")?
        .check(&peer)
        .is_ok());
    let err = TlsAuthz::parse("other")?
        .check(&peer)
        .err()
        .ok_or("expected a refusal")?;
    assert!(err.contains("CN=client1.example,O=ferry tests"), "{err}");
    let mut by_dn = TlsAuthz::default();
    by_dn.add("CN=client1.example,O=ferry tests")?;
    assert!(by_dn.check(&peer).is_ok());
    assert!(TlsAuthz::parse("a,,b").is_err());
    Ok(())
}

#[test]
fn repeated_options_take_lists_and_whole_distinguished_names() -> TestResult {
    let peer = PeerIdentity {
        distinguished_name: "CN=b,O=Example, Inc.".into(),
        common_names: vec!["b".into()],
        dns_names: Vec::new(),
    };
    let values = ["a,c".to_string(), "CN=b,O=Example, Inc.".to_string()];
    let authz = TlsAuthz::from_options(&values)?;
    assert!(authz.check(&peer).is_ok(), "the whole DN is one name");
    let only_list = TlsAuthz::from_options(&values[..1])?;
    assert!(only_list.check(&peer).is_err());
    assert!(TlsAuthz::from_options(&[]).map(|a| a.allows_all())?);
    assert!(TlsAuthz::from_options(&["a,".to_string()]).is_err());
    Ok(())
}

#[test]
fn server_names_take_hosts_and_addresses() -> TestResult {
    assert!(server_name("localhost").is_ok());
    assert!(server_name("10.0.0.1").is_ok());
    assert!(server_name("[::1]").is_ok());
    assert!(server_name("bad name!").is_err());
    Ok(())
}

#[test]
fn dn_values_are_escaped() -> TestResult {
    assert_eq!(escape_dn_value("a,b"), "a\\,b");
    assert_eq!(escape_dn_value(" x"), "\\ x");
    assert_eq!(escape_dn_value("plain"), "plain");
    Ok(())
}

/// What the server saw of the client, and how the client fared.
type HandshakeResults = (Result<PeerIdentity, String>, Result<(), String>);

/// Runs one TLS 1.3 handshake over a socket pair: a server with `server` credentials and a
/// client with `client` credentials; the server's result, then the client's.
fn handshake(
    server: &TlsCredentials,
    client: &TlsCredentials,
) -> Result<HandshakeResults, Box<dyn std::error::Error>> {
    use std::io::{Read, Write};
    let (a, b) = std::os::unix::net::UnixStream::pair()?;
    let server_config = server.server_config()?;
    let server_side = std::thread::spawn(move || {
        let conn = rustls::ServerConnection::new(server_config).map_err(|e| e.to_string())?;
        let mut tls = rustls::StreamOwned::new(conn, a);
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).map_err(|e| e.to_string())?;
        tls.write_all(&byte).map_err(|e| e.to_string())?;
        let certs = tls
            .conn
            .peer_certificates()
            .ok_or("no client certificate")?;
        PeerIdentity::of(&certs[0]).ok_or_else(|| "unparsable".to_string())
    });
    let client_config = client.client_config()?;
    let conn = rustls::ClientConnection::new(client_config, server_name("localhost")?)?;
    let mut tls = rustls::StreamOwned::new(conn, b);
    let client_result = tls
        .write_all(b"x")
        .and_then(|()| {
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte)
        })
        .map_err(|e| e.to_string());
    drop(tls);
    let server_result = server_side.join().map_err(|_| "server thread panicked")?;
    Ok((server_result, client_result))
}

#[test]
fn mutual_tls_handshake_and_wrong_ca() -> TestResult {
    let good = tempfile::tempdir()?;
    make_credentials(good.path(), "client1")?;
    let other = tempfile::tempdir()?;
    make_credentials(other.path(), "client1")?;
    let good = TlsCredentials::load(good.path())?;
    let other = TlsCredentials::load(other.path())?;

    let (server, client) = handshake(&good, &good)?;
    assert_eq!(server?.display_name(), "client1");
    client?;

    // A client whose certificate another CA signed, and which does not trust this server.
    let (server, client) = handshake(&good, &other)?;
    assert!(server.is_err() && client.is_err(), "{server:?} {client:?}");
    Ok(())
}
