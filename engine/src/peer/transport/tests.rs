//! Tests of the TLS streams: both handshakes, the names in a client certificate, and each
//! refusal said in words (another CA on either side, a name the certificate does not carry,
//! a plaintext client, a silent one, a server that does not speak TLS).

use super::*;
use crate::tls::TlsCredentials;
use ferry_test_support::pki::{Pki, Subject};
use std::net::TcpListener;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const BOUND: Duration = Duration::from_secs(10);

/// A server thread accepting one connection: the client's names, or why it was refused.
type Server = std::thread::JoinHandle<Result<PeerIdentity, AcceptError>>;

struct Fixture {
    _pki: Pki,
    _other: Pki,
    daemon: TlsCredentials,
    client: TlsCredentials,
    /// A client whose certificate another CA signed (it trusts ours).
    foreign_client: TlsCredentials,
    /// A daemon whose certificate another CA signed.
    foreign_daemon: TlsCredentials,
}

fn fixture() -> Result<Fixture, Box<dyn std::error::Error>> {
    let pki = Pki::new("ferry test CA")?;
    let other = Pki::new("another CA")?;
    let daemon = pki.credentials("daemon", &Subject::named("daemon-a"))?;
    let client = pki.client_credentials("client", "operator")?;
    let foreign_client = other.client_credentials("foreign-client", "operator")?;
    pki.trust_in(&foreign_client)?;
    let foreign_daemon = other.credentials("foreign-daemon", &Subject::named("daemon-a"))?;
    pki.trust_in(&foreign_daemon)?;
    Ok(Fixture {
        daemon: TlsCredentials::load(&daemon)?,
        client: TlsCredentials::load(&client)?,
        foreign_client: TlsCredentials::load(&foreign_client)?,
        foreign_daemon: TlsCredentials::load(&foreign_daemon)?,
        _pki: pki,
        _other: other,
    })
}

/// Accepts one connection on `host` with `server` credentials on a thread; returns the
/// address to connect to and the outcome of `accept_tls` (the stream echoes 5 bytes back).
fn accept_on(
    host: &str,
    server: &TlsCredentials,
) -> Result<(ControlAddress, Server), Box<dyn std::error::Error>> {
    let listener = TcpListener::bind((host, 0))?;
    let port = listener.local_addr()?.port();
    let config = server.server_config()?;
    let thread = std::thread::spawn(move || {
        let (socket, _) = listener
            .accept()
            .map_err(|e| AcceptError::Handshake(e.to_string()))?;
        let (mut stream, identity) = accept_tls(socket, config, BOUND)?;
        let mut line = [0u8; 5];
        if stream.read_exact(&mut line).is_ok() {
            let _ = stream.write_all(&line);
        }
        Ok(identity)
    });
    let address = ControlAddress::Tcp {
        host: host.into(),
        port,
    };
    Ok((address, thread))
}

fn accept_one(
    server: &TlsCredentials,
) -> Result<(ControlAddress, Server), Box<dyn std::error::Error>> {
    accept_on("127.0.0.1", server)
}

fn join<T>(thread: std::thread::JoinHandle<T>) -> Result<T, Box<dyn std::error::Error>> {
    thread
        .join()
        .map_err(|_| "the server thread panicked".into())
}

#[test]
fn both_ends_verify_each_other_and_the_client_is_named() -> TestResult {
    let fx = fixture()?;
    let (address, server) = accept_one(&fx.daemon)?;
    let config = fx.client.client_config()?;
    let mut stream = ClientStream::connect(&address, Some(&config), BOUND, BOUND)?;
    stream.write_all(b"ping\n")?;
    let mut echo = [0u8; 5];
    stream.read_exact(&mut echo)?;
    assert_eq!(&echo, b"ping\n");
    let identity = join(server)??;
    assert_eq!(identity.common_names, ["operator"]);
    assert_eq!(identity.distinguished_name, "CN=operator,O=ferry tests");
    Ok(())
}

#[test]
fn a_client_certificate_of_another_ca_is_refused_at_both_ends() -> TestResult {
    let fx = fixture()?;
    let (address, server) = accept_one(&fx.daemon)?;
    let config = fx.foreign_client.client_config()?;
    // TLS 1.3: the client's handshake ends before the server has checked its certificate,
    // so the client learns of the refusal at its first read.
    let outcome = ClientStream::connect(&address, Some(&config), BOUND, BOUND).and_then(|mut s| {
        let _ = s.write_all(b"ping\n");
        let mut byte = [0u8; 1];
        match s.read_exact(&mut byte) {
            Ok(()) => Ok(()),
            Err(e) => Err(TransportError::Handshake {
                address: address.to_string(),
                reason: describe_io_error(&e),
            }),
        }
    });
    match outcome {
        Err(e) => assert!(e.to_string().contains("refused our certificate"), "{e}"),
        Ok(()) => return Err("the client was served".into()),
    }
    match join(server)? {
        Err(AcceptError::Handshake(reason)) => {
            assert!(reason.contains("not signed by our CA"), "{reason}")
        }
        other => return Err(format!("the server accepted: {other:?}").into()),
    }
    Ok(())
}

#[test]
fn a_daemon_certificate_of_another_ca_or_name_is_refused_by_the_client() -> TestResult {
    let fx = fixture()?;
    let config = fx.client.client_config()?;
    let (address, server) = accept_one(&fx.foreign_daemon)?;
    match ClientStream::connect(&address, Some(&config), BOUND, BOUND) {
        Err(e @ TransportError::Handshake { .. }) => {
            assert!(e.to_string().contains("not signed by our CA"), "{e}")
        }
        Err(e) => return Err(format!("unexpected error {e}").into()),
        Ok(_) => return Err("a daemon of another CA was trusted".into()),
    }
    let _ = join(server)?;

    // 127.0.0.2 is loopback too, but not among the certificate's names.
    let (address, server) = accept_on("127.0.0.2", &fx.daemon)?;
    match ClientStream::connect(&address, Some(&config), BOUND, BOUND) {
        Err(e @ TransportError::Handshake { .. }) => {
            assert!(e.to_string().contains("not valid for the address"), "{e}")
        }
        Err(e) => return Err(format!("unexpected error {e}").into()),
        Ok(_) => return Err("a certificate without the address was trusted".into()),
    }
    let _ = join(server)?;
    Ok(())
}

#[test]
fn plaintext_and_silent_clients_are_told_apart_and_bounded() -> TestResult {
    let fx = fixture()?;
    let config = fx.daemon.server_config()?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let address = listener.local_addr()?;
    let mut plaintext = TcpStream::connect(address)?;
    plaintext.write_all(b"{\"command\": \"query-version\"}\n")?;
    let (socket, _) = listener.accept()?;
    assert_eq!(
        accept_tls(socket, config.clone(), BOUND).err(),
        Some(AcceptError::Plaintext)
    );
    let _silent = TcpStream::connect(address)?;
    let (socket, _) = listener.accept()?;
    match accept_tls(socket, config, Duration::from_millis(50)) {
        Err(AcceptError::Handshake(reason)) => assert!(reason.contains("sent nothing"), "{reason}"),
        other => return Err(format!("a silent client gave {:?}", other.err()).into()),
    }
    Ok(())
}

#[test]
fn a_server_that_does_not_speak_tls_and_a_missing_config_are_reported() -> TestResult {
    let fx = fixture()?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let garbage = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut socket, _) = listener.accept()?;
        socket.write_all(b"{\"error\": \"this is not TLS\"}\n")?;
        let mut sink = [0u8; 512];
        let _ = socket.read(&mut sink);
        Ok(())
    });
    let address = ControlAddress::Tcp {
        host: "127.0.0.1".into(),
        port,
    };
    let config = fx.client.client_config()?;
    match ClientStream::connect(&address, Some(&config), BOUND, BOUND) {
        Err(e) => assert!(e.to_string().contains("does not speak TLS"), "{e}"),
        Ok(_) => return Err("a plaintext server passed the handshake".into()),
    }
    let _ = join(garbage)?;
    match ClientStream::connect(&address, None, BOUND, BOUND) {
        Err(e) => assert!(e.to_string().contains("--tls-creds"), "{e}"),
        Ok(_) => return Err("TCP without TLS was allowed".into()),
    }
    Ok(())
}
