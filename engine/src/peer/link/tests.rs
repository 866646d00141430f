//! Tests of the link against fake daemons over TLS: replies with ids on one reused
//! connection, the daemon's refusals, and a peer that answers garbage, a wrong id or too
//! much, never answers, disappears, or holds a certificate of another CA. (The link against
//! a real `ferry serve --control-listen` is tested in `tests/control_tcp.rs`.)

use super::*;
use crate::peer::control_protocol::{error_reply, LineReader, REQUEST_BYTES_MAX};
use crate::peer::transport::accept_tls;
use ferry_test_support::pki::{Pki, Subject};
use serde_json::json;
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const BOUND: Duration = Duration::from_secs(10);

/// What a fake daemon does with a request.
enum Answer {
    Line(String),
    /// Reads on and never answers.
    Silence,
    /// Closes the connection.
    Close,
}

/// How a fake daemon answers each request.
type Behaviour = fn(&Value) -> Answer;

/// A daemon's TLS listener answering requests with `answer`; counts its connections.
struct FakePeer {
    address: ControlAddress,
    connections: Arc<AtomicUsize>,
}

fn fake_peer(
    credentials: &TlsCredentials,
    answer: Behaviour,
) -> Result<FakePeer, Box<dyn std::error::Error>> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let config = credentials.server_config()?;
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    std::thread::spawn(move || {
        for socket in listener.incoming().flatten() {
            counted.fetch_add(1, Ordering::SeqCst);
            let config = config.clone();
            std::thread::spawn(move || {
                let Ok((mut stream, _)) = accept_tls(socket, config, BOUND) else {
                    return;
                };
                let mut reader = LineReader::new(REQUEST_BYTES_MAX);
                while let Ok(Some(line)) = reader.read_line(&mut stream, LineDeadlines::default()) {
                    let request: Value = serde_json::from_str(&line).unwrap_or_default();
                    match answer(&request) {
                        Answer::Line(mut reply) => {
                            reply.push('\n');
                            if stream.write_all(reply.as_bytes()).is_err() {
                                return;
                            }
                        }
                        Answer::Silence => {}
                        Answer::Close => return,
                    }
                }
            });
        }
    });
    Ok(FakePeer {
        address: ControlAddress::Tcp {
            host: "127.0.0.1".into(),
            port,
        },
        connections,
    })
}

fn echo(request: &Value) -> Answer {
    if request["command"] == "fail" {
        return Answer::Line(error_reply(
            "NotFound",
            "no such thing",
            Some(&request["id"]),
        ));
    }
    Answer::Line(
        json!({ "return": { "echo": request["arguments"] }, "id": request["id"] }).to_string(),
    )
}

struct Fixture {
    _pki: Pki,
    _other: Pki,
    daemon: TlsCredentials,
    client: TlsCredentials,
    foreign_client: TlsCredentials,
}

fn fixture() -> Result<Fixture, Box<dyn std::error::Error>> {
    let pki = Pki::new("ferry test CA")?;
    let other = Pki::new("another CA")?;
    let daemon = pki.credentials("daemon", &Subject::named("daemon-b"))?;
    let client = pki.credentials("client", &Subject::named("daemon-a"))?;
    let foreign = other.credentials("foreign", &Subject::named("daemon-a"))?;
    pki.trust_in(&foreign)?;
    Ok(Fixture {
        daemon: TlsCredentials::load(&daemon)?,
        client: TlsCredentials::load(&client)?,
        foreign_client: TlsCredentials::load(&foreign)?,
        _pki: pki,
        _other: other,
    })
}

fn link(fx: &Fixture, peer: &FakePeer, options: LinkOptions) -> Result<PeerLink, PeerError> {
    PeerLink::new(
        "peer hostb",
        peer.address.clone(),
        Some(&fx.client),
        options,
    )
}

#[test]
fn calls_reuse_one_connection_and_keep_it_through_refusals() -> TestResult {
    let fx = fixture()?;
    let peer = fake_peer(&fx.daemon, echo)?;
    let link = link(&fx, &peer, LinkOptions::default())?;
    for n in 0..3 {
        let reply = link.call("echo", &json!({ "n": n }))?;
        assert_eq!(reply, json!({ "echo": { "n": n } }));
    }
    match link.call("fail", &json!({})) {
        Err(PeerError::Refused {
            peer, class, desc, ..
        }) => {
            assert_eq!(
                (peer.as_str(), class.as_str(), desc.as_str()),
                ("peer hostb", "NotFound", "no such thing")
            )
        }
        other => return Err(format!("expected a refusal, got {other:?}").into()),
    }
    link.call("echo", &json!({}))?;
    assert_eq!(
        peer.connections.load(Ordering::SeqCst),
        1,
        "one connection for every call"
    );
    Ok(())
}

#[test]
fn a_peer_that_misbehaves_fails_the_call_with_its_name() -> TestResult {
    let fx = fixture()?;
    let options = LinkOptions {
        reply_timeout: Some(Duration::from_millis(200)),
        reply_bytes_max: 1024,
        ..LinkOptions::default()
    };
    let cases: [(Behaviour, &str); 6] = [
        (
            |_| Answer::Line("this is not JSON".into()),
            "invalid reply to probe: not a JSON object",
        ),
        (
            |_| Answer::Line("{\"return\": 1, \"id\": 999}".into()),
            "id 999 answers request 1",
        ),
        (
            |_| Answer::Line("{\"id\": 1}".into()),
            "neither \"return\" nor \"error\"",
        ),
        (
            |_| {
                Answer::Line(format!(
                    "{{\"return\": \"{}\", \"id\": 1}}",
                    "x".repeat(2000)
                ))
            },
            "longer than 1024 bytes",
        ),
        (|_| Answer::Silence, "no reply to probe within 200ms"),
        (|_| Answer::Close, "connection lost during probe"),
    ];
    for (answer, expected) in cases {
        let peer = fake_peer(&fx.daemon, answer)?;
        let link = link(&fx, &peer, options)?;
        match link.call("probe", &json!({})) {
            Err(e) => {
                let text = e.to_string();
                assert!(text.starts_with("peer hostb: "), "{text}");
                assert!(text.contains(expected), "{text:?} lacks {expected:?}");
            }
            Ok(value) => return Err(format!("{expected}: the call returned {value}").into()),
        }
    }
    Ok(())
}

#[test]
fn after_a_failure_or_a_connection_error_the_next_call_connects_afresh() -> TestResult {
    let fx = fixture()?;
    // The first request on each connection gets a connection-level error (no id), as a
    // daemon with every slot taken answers; later ones are served.
    let peer = fake_peer(&fx.daemon, |request| {
        if request["arguments"]["first"] == true {
            Answer::Line(error_reply("Busy", "too many control connections", None))
        } else {
            echo(request)
        }
    })?;
    let link = link(&fx, &peer, LinkOptions::default())?;
    match link.call("echo", &json!({ "first": true })) {
        Err(PeerError::Refused { class, .. }) => assert_eq!(class, "Busy"),
        other => return Err(format!("expected Busy, got {other:?}").into()),
    }
    link.call("echo", &json!({}))?;
    assert_eq!(peer.connections.load(Ordering::SeqCst), 2);
    Ok(())
}

#[test]
fn wrong_certificates_and_absent_peers_are_named() -> TestResult {
    let fx = fixture()?;
    let peer = fake_peer(&fx.daemon, echo)?;
    let foreign = PeerLink::new(
        "peer hostb",
        peer.address.clone(),
        Some(&fx.foreign_client),
        LinkOptions::default(),
    )?;
    match foreign.call("echo", &json!({})) {
        Err(e) => {
            let text = e.to_string();
            assert!(text.starts_with("peer hostb: "), "{text}");
            assert!(text.contains("refused our certificate"), "{text}");
        }
        Ok(_) => return Err("a certificate of another CA was served".into()),
    }
    let closed = TcpListener::bind("127.0.0.1:0")?;
    let port = closed.local_addr()?.port();
    drop(closed);
    let nobody = ControlAddress::Tcp {
        host: "127.0.0.1".into(),
        port,
    };
    let absent = PeerLink::new(
        "peer hostc",
        nobody,
        Some(&fx.client),
        LinkOptions::default(),
    )?;
    match absent.call("echo", &json!({})) {
        Err(PeerError::Transport {
            peer,
            source: TransportError::Connect { .. },
        }) => {
            assert_eq!(peer, "peer hostc")
        }
        other => return Err(format!("expected a connect error, got {other:?}").into()),
    }
    let plain = PeerLink::new(
        "peer hostb",
        peer.address.clone(),
        None,
        LinkOptions::default(),
    );
    assert!(
        matches!(plain, Err(PeerError::Setup { .. })),
        "TCP without credentials"
    );
    Ok(())
}
