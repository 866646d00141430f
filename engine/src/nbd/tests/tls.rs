//! The blocking client over TLS against real servers that require it (`qemu-nbd
//! --tls-creds`, `qemu-storage-daemon --nbd-server ...,tls-creds=`), with certificates made
//! by the test (`ferry_test_support::pki`): data round-trips; a wrong CA on either side, a
//! server without TLS asked for `nbds://`, and a TLS server reached in plaintext are refused
//! with one-line reasons.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_test_support::nbd::{NbdAddr, NbdServer, QemuNbdOpts, QsdOpts};
use ferry_test_support::pki::{Pki, Subject};

use super::super::{ClientError, ClientOptions, ExportUri, NbdClient};
use crate::tls::TlsCredentials;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const MIB: usize = 1 << 20;

/// A 4 MiB image of zeros in `dir`.
fn image(dir: &Path) -> std::io::Result<std::path::PathBuf> {
    let path = dir.join("e.img");
    std::fs::write(&path, vec![0u8; 4 * MIB])?;
    Ok(path)
}

/// A test CA and a directory with both pairs for `localhost` and 127.0.0.1 (a server's and
/// a client's credentials at once); the directory lives as long as the CA.
fn credentials(ca_name: &str) -> anyhow::Result<(Pki, PathBuf)> {
    let pki = Pki::new(ca_name)?;
    let dir = pki.credentials("both", &Subject::named("localhost"))?;
    Ok((pki, dir))
}

fn qemu_nbd_tls(image: &Path, addr: &NbdAddr, credentials: &Path) -> anyhow::Result<NbdServer> {
    let opts = QemuNbdOpts {
        tls_creds: Some(credentials.to_path_buf()),
        ..QemuNbdOpts::default()
    };
    NbdServer::qemu_nbd_with(image, "e", addr, opts)
}

fn options(credentials: Option<&Path>) -> Result<ClientOptions, Box<dyn std::error::Error>> {
    let tls = match credentials {
        Some(dir) => Some(Arc::new(TlsCredentials::load(dir)?)),
        None => None,
    };
    Ok(ClientOptions {
        tls,
        ..ClientOptions::default()
    })
}

fn connect(uri: &str, credentials: Option<&Path>) -> Result<NbdClient, Box<dyn std::error::Error>> {
    Ok(NbdClient::connect(
        &ExportUri::parse(uri)?,
        &options(credentials)?,
    )?)
}

/// Why a connection was refused; an error of the test when it was not.
fn refusal(uri: &str, credentials: Option<&Path>) -> Result<String, Box<dyn std::error::Error>> {
    let result = NbdClient::connect(&ExportUri::parse(uri)?, &options(credentials)?);
    match result {
        Ok(_) => Err(format!("{uri} was not refused").into()),
        Err(e) => {
            let text = e.to_string();
            eprintln!("{uri} refused: {text}");
            assert!(!text.contains('\n'), "not one line: {text:?}");
            Ok(text)
        }
    }
}

/// Writes, reads back, zeroes, trims and flushes through `client`, and checks the image.
fn round_trip(client: &NbdClient, image: &Path) -> TestResult {
    let data = ferry_test_support::pattern(5, 3 * MIB);
    client.write_at(4096, &data)?;
    let mut back = vec![0u8; data.len()];
    client.read_at(4096, &mut back)?;
    assert!(back == data, "read back differs from what was written");
    client.write_zeroes(MIB as u64, 8192, false)?;
    client.trim(2 * MIB as u64, 4096)?;
    client.flush()?;
    let mut expected = data;
    expected[MIB - 4096..MIB - 4096 + 8192].fill(0);
    ferry_test_support::compare_image(image, 4096, &expected[..MIB - 4096 + 8192])?;
    Ok(())
}

#[test]
fn round_trips_over_tls_with_qemu_nbd_on_tcp() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (_pki, creds) = credentials("ferry test CA")?;
    let image = image(dir.path())?;
    let server = qemu_nbd_tls(&image, &NbdAddr::free_tcp()?, &creds)?;
    assert!(server.uri().starts_with("nbds://127.0.0.1:"));
    let client = connect(&server.uri(), Some(&creds))?;
    round_trip(&client, &image)?;
    // `nbd://` with credentials upgrades with NBD_OPT_STARTTLS all the same.
    let client = connect(&server.plain_uri(), Some(&creds))?;
    let mut buf = vec![0u8; 4096];
    client.read_at(4096, &mut buf)?;
    assert_eq!(buf, ferry_test_support::pattern(5, 4096));
    Ok(())
}

#[test]
fn round_trips_over_tls_with_qemu_storage_daemon_on_a_unix_socket() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (pki, creds) = credentials("ferry test CA")?;
    let image = image(dir.path())?;
    let opts = QsdOpts {
        tls_creds: Some(creds.clone()),
    };
    let addr = NbdAddr::Unix(dir.path().join("nbd.sock"));
    let server = NbdServer::qsd_with(&image, "e", &addr, opts)?;
    assert!(server.uri().starts_with("nbds+unix:///e?socket="));
    // A client host holds only its own pair and the CA.
    let client_dir = pki.client_credentials("client", "client")?;
    let client = connect(&server.uri(), Some(&client_dir))?;
    round_trip(&client, &image)
}

/// A client that does not trust the server's CA refuses it; a server that does not trust the
/// client's CA refuses the client. Either way the client says why, in one line.
#[test]
fn a_wrong_ca_is_refused_on_either_side() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (pki, creds) = credentials("ferry test CA")?;
    let (foreign_pki, foreign) = credentials("another CA")?;
    let image = image(dir.path())?;
    let server = qemu_nbd_tls(&image, &NbdAddr::free_tcp()?, &creds)?;

    let reason = refusal(&server.uri(), Some(&foreign))?;
    assert!(
        reason.contains("NBD handshake failed: TLS handshake: invalid peer certificate"),
        "{reason}"
    );

    // Trusts the server, but presents a certificate of another CA.
    let mixed = foreign_pki.client_credentials("mixed", "client")?;
    pki.trust_in(&mixed)?;
    let reason = refusal(&server.uri(), Some(&mixed))?;
    assert!(
        reason.starts_with("NBD handshake failed") && reason.contains("client's certificate"),
        "{reason}"
    );
    // The server still serves a client it trusts.
    connect(&server.uri(), Some(&creds))?;
    Ok(())
}

/// `nbds://` to a server without TLS: refused by the server's answer to NBD_OPT_STARTTLS,
/// never continued in plaintext.
#[test]
fn a_server_without_tls_is_refused_when_tls_is_asked_for() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (_pki, creds) = credentials("ferry test CA")?;
    let image = image(dir.path())?;
    let addr = NbdAddr::free_tcp()?;
    let server = NbdServer::qemu_nbd(&image, "e", &addr)?;
    let uri = addr.uri_with_scheme("e", true);
    let reason = refusal(&uri, Some(&creds))?;
    assert!(
        reason.starts_with(
            "NBD handshake failed: the server does not offer TLS: it refused NBD_OPT_STARTTLS"
        ),
        "{reason}"
    );
    drop(server);
    Ok(())
}

/// A TLS server reached with `nbd://` and no credentials: the server refuses, and the
/// client shows the server's reason.
#[test]
fn a_tls_server_refuses_plaintext_with_its_reason() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (_pki, creds) = credentials("ferry test CA")?;
    let image = image(dir.path())?;
    let server = qemu_nbd_tls(&image, &NbdAddr::free_tcp()?, &creds)?;
    let reason = refusal(&server.plain_uri(), None)?;
    assert!(
        reason.starts_with("NBD handshake failed: the server requires TLS (connect with nbds://"),
        "{reason}"
    );
    assert!(reason.contains("TLS"), "{reason}");
    Ok(())
}

/// `nbds://` without credentials is refused before anything is sent.
#[test]
fn tls_without_credentials_is_refused_at_once() -> TestResult {
    let reason = refusal("nbds://127.0.0.1:1/e", None)?;
    assert!(
        matches!(
            NbdClient::connect(
                &ExportUri::parse("nbds://127.0.0.1:1/e")?,
                &ClientOptions::default()
            ),
            Err(ClientError::Unusable { .. })
        ),
        "{reason}"
    );
    assert!(
        reason.starts_with("TLS is required (nbds://) but no TLS credentials were given"),
        "{reason}"
    );
    Ok(())
}
