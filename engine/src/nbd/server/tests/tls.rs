//! FORCEDTLS: options before TLS are refused, STARTTLS upgrades the session (rustls on
//! both ends, mutual certificates from `openssl`), and `--tls-authz` refuses a client
//! whose certificate name is not listed.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;

use ferry_test_support::pki::{Pki, Subject};
use rustls::{ClientConnection, StreamOwned};

use super::raw_client::{RawClient, Res, TestResult};
use super::{fixture, is_closed, MIB};
use crate::nbd::protocol::*;
use crate::nbd::server::ServerOptions;
use crate::tls::{server_name, TlsAuthz, TlsCredentials};

/// Credentials for both ends (a server pair and a client pair named `client1`, one CA),
/// and server options requiring them with `authz` (comma-separated; empty: everyone).
fn tls_options(authz: &str) -> Res<(Pki, PathBuf, ServerOptions)> {
    let pki = Pki::new("ferry test CA")?;
    let dir = pki.credentials("both", &Subject::named("client1"))?;
    let options = ServerOptions {
        tls: Some(Arc::new(TlsCredentials::load(&dir)?)),
        authz: if authz.is_empty() {
            TlsAuthz::default()
        } else {
            TlsAuthz::parse(authz)?
        },
        ..ServerOptions::default()
    };
    Ok((pki, dir, options))
}

/// STARTTLS on a raw client, then the rest of the session over TLS.
fn upgrade(
    mut c: RawClient<UnixStream>,
    creds: &std::path::Path,
) -> Res<RawClient<StreamOwned<ClientConnection, UnixStream>>> {
    assert_eq!(c.option_result(NBD_OPT_STARTTLS, &[])?, NBD_REP_ACK);
    let config = TlsCredentials::load(creds)?.client_config()?;
    let tls = ClientConnection::new(config, server_name("localhost")?)?;
    Ok(RawClient {
        s: StreamOwned::new(tls, c.s),
    })
}

#[test]
fn forced_tls_refuses_options_before_starttls_then_serves() -> TestResult {
    let (_pki, creds, options) = tls_options("")?;
    let f = fixture(MIB, false, options)?;
    let mut c = f.client()?;
    assert_eq!(c.option_result(NBD_OPT_LIST, &[])?, NBD_REP_ERR_TLS_REQD);
    let go = ExportRequest {
        export_name: "v".into(),
        info_types: vec![],
    };
    assert_eq!(
        c.option_result(NBD_OPT_GO, &go.encode()?)?,
        NBD_REP_ERR_TLS_REQD
    );
    let mut c = upgrade(c, &creds)?;
    assert_eq!(c.option_result(NBD_OPT_STARTTLS, &[])?, NBD_REP_ERR_INVALID);
    c.go("v", true)?;
    c.write(1, 4096, &[6u8; 4096], NBD_CMD_FLAG_FUA)?;
    assert_eq!(c.structured_reply()?, (1, 0, vec![]));
    c.request(NBD_CMD_READ, 0, 2, 4096, 4096)?;
    assert_eq!(c.structured_reply()?, (2, 0, vec![6u8; 4096]));
    assert_eq!(f.image_bytes()?[4096..8192], [6u8; 4096]);
    Ok(())
}

#[test]
fn export_name_before_tls_ends_the_session() -> TestResult {
    let (_pki, _creds, options) = tls_options("")?;
    let f = fixture(MIB, false, options)?;
    let mut c = f.client()?;
    c.send_option(NBD_OPT_EXPORT_NAME, b"v")?;
    assert!(is_closed(&mut c.s));
    Ok(())
}

#[test]
fn a_client_not_in_tls_authz_is_dropped() -> TestResult {
    let (_pki, creds, options) = tls_options("someone-else")?;
    let f = fixture(MIB, false, options)?;
    let c = f.client()?;
    let mut c = upgrade(c, &creds)?;
    assert!(
        c.option(NBD_OPT_LIST, &[]).is_err(),
        "the server answered a refused client"
    );
    Ok(())
}

#[test]
fn a_client_in_tls_authz_is_served() -> TestResult {
    let (_pki, creds, options) = tls_options("nobody,client1")?;
    let f = fixture(MIB, false, options)?;
    let mut c = upgrade(f.client()?, &creds)?;
    c.go("v", false)?;
    c.request(NBD_CMD_FLUSH, 0, 3, 0, 0)?;
    assert_eq!(c.simple_reply()?.error, 0);
    Ok(())
}
