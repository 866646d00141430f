//! The control protocol over TCP with mutual TLS (`ferry serve --control-listen`): two
//! daemons, each in its own network namespace joined by a veth pair, query each other with
//! the `ferry` command line over `ferry://10.77.0.x:PORT`; the refusals (a certificate of
//! another CA on either side, a client name not in `--tls-authz`, plaintext) are one line
//! and a non-zero exit, and the daemon serves on after each; the engine's `PeerLink`
//! against a real daemon; the daemon's bound on a client that connects and says nothing;
//! and `serve`'s refusal of TCP control without TLS.

#[path = "support/mod.rs"]
mod support;

use anyhow::{bail, ensure, Context as _, Result};
use ferry_engine::peer::link::{LinkOptions, PeerError, PeerLink};
use ferry_engine::peer::ControlAddress;
use ferry_engine::tls::TlsCredentials;
use ferry_test_support::netns::{Host, Network};
use ferry_test_support::pki::{Pki, Subject};
use serde_json::{json, Value};
use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use support::daemon::{Daemon, START_TIMEOUT};
use support::ferry_cli::CliOutput;
use support::two_hosts::host_credentials;
use support::wait::{tcp_listening_in, HANG_TIMEOUT};

/// The TCP control port of the daemons in namespaces (each namespace has its own ports).
const PORT: u16 = 7000;

/// `ferry serve ARGS` run by `command` (in a namespace or not), once it listens on TCP
/// `port` in its own network namespace.
fn serve(command: Command, args: &[String], port: u16) -> Result<Daemon> {
    let mut command = command;
    command.arg("serve").args(args).env("RUST_LOG", "info");
    let mut daemon = Daemon::spawn("ferry-serve", command)?;
    let pid = daemon.pid();
    daemon.wait_ready(&format!("TCP port {port}"), START_TIMEOUT, || {
        tcp_listening_in(pid, port)
    })?;
    Ok(daemon)
}

/// `ferry ARGS` run in `host`, to its end.
fn ferry_in(host: &Host, args: &[&str]) -> Result<CliOutput> {
    let out = host
        .command(support::ferry_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run ferry {args:?} in {}", host.namespace))?;
    Ok(CliOutput {
        args: args.iter().map(|s| s.to_string()).collect(),
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// Two hosts, a CA, and a daemon on each: A serves volume `vm1` and allows `ferry-b` and
/// `operator`; B serves nothing up front and allows `ferry-a`.
struct TwoHosts {
    // Fields drop in order: the daemons before their network and their files.
    _daemon_a: Daemon,
    _daemon_b: Daemon,
    network: Network,
    pki: Pki,
    creds_a: PathBuf,
    creds_b: PathBuf,
    _dir: tempfile::TempDir,
}

impl TwoHosts {
    fn start() -> Result<Option<Self>> {
        let Some(network) =
            support::require_ok("network namespaces (root, iproute2)", Network::new(2))
        else {
            return Ok(None);
        };
        let pki = Pki::new("ferry test CA")?;
        let (a, b) = (network.host(0), network.host(1));
        let (address_a, address_b) = (a.address.to_string(), b.address.to_string());
        let (creds_a, creds_b) = host_credentials(&pki, &network)?;
        let dir = support::scratch_dir()?;
        let volume = format!(
            "name=vm1,path={},socket={},size=16M",
            dir.path().join("vm1.img").display(),
            dir.path().join("vm1.sock").display()
        );
        let args_a = [
            "--volume".to_string(),
            volume,
            "--control-listen".into(),
            format!("{address_a}:{PORT}"),
            "--tls-creds".into(),
            path_str(&creds_a)?.into(),
            "--tls-authz".into(),
            "ferry-b,operator".into(),
        ];
        let daemon_a = serve(a.command(support::ferry_bin()), &args_a, PORT)?;
        let args_b = [
            "--control-listen".to_string(),
            format!("{address_b}:{PORT}"),
            "--tls-creds".into(),
            path_str(&creds_b)?.into(),
            "--tls-authz".into(),
            "ferry-a".into(),
        ];
        let daemon_b = serve(b.command(support::ferry_bin()), &args_b, PORT)?;
        Ok(Some(Self {
            _daemon_a: daemon_a,
            _daemon_b: daemon_b,
            network,
            pki,
            creds_a,
            creds_b,
            _dir: dir,
        }))
    }

    fn url(&self, host: usize) -> String {
        format!("ferry://{}:{PORT}", self.network.host(host).address)
    }

    /// `ferry query --control ferry://HOST:PORT --tls-creds CREDS COMMAND` from `from`.
    fn query(&self, from: usize, to: usize, creds: &Path, command: &str) -> Result<CliOutput> {
        let url = self.url(to);
        ferry_in(
            self.network.host(from),
            &[
                "query",
                "--control",
                &url,
                "--tls-creds",
                path_str(creds)?,
                command,
            ],
        )
    }
}

#[test]
fn two_daemons_in_two_namespaces_query_each_other_over_mutual_tls() -> Result<()> {
    let Some(hosts) = TwoHosts::start()? else {
        return Ok(());
    };
    // A (with its own credentials, which B allows) asks B: B serves no volume yet.
    let volumes_b = hosts
        .query(0, 1, &hosts.creds_a, "query-volumes")?
        .ok()?
        .json()?;
    assert_eq!(volumes_b, json!([]));
    // B asks A, which serves vm1.
    let volumes_a = hosts
        .query(1, 0, &hosts.creds_b, "query-volumes")?
        .ok()?
        .json()?;
    let names: Vec<&str> = volumes_a
        .as_array()
        .context("query-volumes is a list")?
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(names, ["vm1"]);
    // The other subcommands take ferry:// too, and keep the daemon's errors as they were.
    let url_a = hosts.url(0);
    let creds_b = path_str(&hosts.creds_b)?;
    let status = ferry_in(
        hosts.network.host(1),
        &[
            "migrate",
            "status",
            "--control",
            &url_a,
            "--tls-creds",
            creds_b,
        ],
    )?
    .ok()?;
    assert_eq!(status.stdout.trim(), "no migration jobs");
    ferry_in(
        hosts.network.host(1),
        &[
            "journal",
            "status",
            "--control",
            &url_a,
            "--tls-creds",
            creds_b,
        ],
    )?
    .expect_error("journal-status: NotFound")?;
    Ok(())
}

#[test]
fn wrong_certificates_unlisted_names_and_plaintext_are_refused_in_one_line() -> Result<()> {
    let Some(hosts) = TwoHosts::start()? else {
        return Ok(());
    };
    let other = Pki::new("another CA")?;
    // Credentials wholly of another CA: B's certificate is not trusted.
    let stranger = other.credentials("stranger", &Subject::named("ferry-a"))?;
    hosts
        .query(0, 1, &stranger, "query-version")?
        .expect_error("not signed by our CA")?;
    // A client certificate of another CA, trusting B's: B refuses it.
    let forged = other.credentials("forged", &Subject::named("ferry-a"))?;
    hosts.pki.trust_in(&forged)?;
    hosts
        .query(0, 1, &forged, "query-version")?
        .expect_error("refused our certificate")?;
    // The right CA, a name B does not allow.
    let intruder = hosts.pki.client_credentials("intruder", "intruder")?;
    let denied = hosts
        .query(0, 1, &intruder, "query-version")?
        .expect_error("AccessDenied")?;
    assert!(denied.contains("CN=intruder"), "{denied}");
    // No credentials: the command line refuses before connecting.
    let url_b = hosts.url(1);
    ferry_in(
        hosts.network.host(0),
        &["query", "--control", &url_b, "query-version"],
    )?
    .expect_error("speaks TLS only")?;
    // A plaintext client is told so in the protocol's own framing.
    let script = format!(
        "exec 3<>/dev/tcp/{}/{PORT}; echo '{{\"command\": \"query-version\"}}' >&3; head -n 1 <&3",
        hosts.network.host(1).address
    );
    let plaintext = hosts
        .network
        .host(0)
        .run("timeout", &["30", "bash", "-c", &script])?;
    let reply: Value = serde_json::from_slice(&plaintext.stdout)
        .with_context(|| format!("{:?}", String::from_utf8_lossy(&plaintext.stdout)))?;
    assert_eq!(reply["error"]["class"], "TlsRequired", "{reply}");
    // B served on through all of it.
    let version = hosts
        .query(0, 1, &hosts.creds_a, "query-version")?
        .ok()?
        .json()?;
    assert!(version["version"].is_string(), "{version}");
    Ok(())
}

/// A daemon in the test's own namespace with its TCP control listener on a loopback port
/// the kernel picks (read from the line it prints), allowing `authz`.
struct Loopback {
    daemon: Daemon,
    address: ControlAddress,
    pki: Pki,
    _dir: tempfile::TempDir,
}

fn loopback(authz: &str) -> Result<Loopback> {
    let pki = Pki::new("ferry test CA")?;
    let creds = pki.credentials("daemon", &Subject::named("daemon"))?;
    let dir = support::scratch_dir()?;
    let volume = format!(
        "name=vm1,path={},socket={},size=16M",
        dir.path().join("vm1.img").display(),
        dir.path().join("vm1.sock").display()
    );
    let mut command = Command::new(support::ferry_bin());
    command
        .args([
            "serve",
            "--volume",
            &volume,
            "--control-listen",
            "127.0.0.1:0",
        ])
        .arg("--tls-creds")
        .arg(&creds)
        .args(["--tls-authz", authz])
        .env("RUST_LOG", "info");
    let daemon = Daemon::spawn("ferry-serve", command)?;
    let mut port = None;
    support::wait::wait_until("the control listener's line", START_TIMEOUT, || {
        port = support::ferry::announced_port(&daemon.log(), "ferry: control protocol on ferry://");
        Ok(port.is_some())
    })
    .with_context(|| format!("log of ferry serve:\n{}", daemon.log()))?;
    let port = port.context("no port")?;
    Ok(Loopback {
        daemon,
        address: ControlAddress::Tcp {
            host: "127.0.0.1".into(),
            port,
        },
        pki,
        _dir: dir,
    })
}

#[test]
fn a_peer_link_calls_a_real_daemon_and_names_it_in_errors() -> Result<()> {
    let served = loopback("peer-a")?;
    let creds = served
        .pki
        .credentials("peer-a", &Subject::named("peer-a"))?;
    let credentials = TlsCredentials::load(&creds)?;
    let link = PeerLink::new(
        "peer daemon",
        served.address.clone(),
        Some(&credentials),
        LinkOptions::default(),
    )?;
    let version = link.call("query-version", &json!({}))?;
    assert!(version["version"].is_string(), "{version}");
    let volumes = link.call("query-volumes", &json!({}))?;
    assert_eq!(volumes[0]["name"], "vm1", "{volumes}");
    match link.call("no-such-command", &json!({})) {
        Err(PeerError::Refused { peer, class, .. }) => {
            assert_eq!(
                (peer.as_str(), class.as_str()),
                ("peer daemon", "CommandNotFound")
            )
        }
        other => bail!("expected CommandNotFound, got {other:?}"),
    }
    // The connection outlived the refusal: the daemon logged one client.
    link.call("query-version", &json!({}))?;
    let connected = served.daemon.log().matches("peer-a at 127.0.0.1").count();
    ensure!(
        connected == 1,
        "{connected} connections:\n{}",
        served.daemon.log()
    );

    // A name the daemon does not allow is refused with the daemon's reason.
    let other = served
        .pki
        .credentials("peer-x", &Subject::named("peer-x"))?;
    let unlisted = PeerLink::new(
        "peer daemon",
        served.address.clone(),
        Some(&TlsCredentials::load(&other)?),
        LinkOptions::default(),
    )?;
    match unlisted.call("query-version", &json!({})) {
        Err(PeerError::Refused { class, desc, .. }) => {
            assert_eq!(class, "AccessDenied");
            assert!(desc.contains("CN=peer-x"), "{desc}");
        }
        other => bail!("expected AccessDenied, got {other:?}"),
    }
    Ok(())
}

#[test]
fn a_client_that_says_nothing_is_disconnected_and_holds_nobody_up() -> Result<()> {
    let served = loopback("peer-a")?;
    let ControlAddress::Tcp { port, .. } = served.address else {
        bail!("a TCP address was expected");
    };
    let mut silent = TcpStream::connect(("127.0.0.1", port))?;
    // Another client is served while the silent one holds its connection.
    let creds = served
        .pki
        .credentials("peer-a", &Subject::named("peer-a"))?;
    let link = PeerLink::new(
        "peer daemon",
        served.address.clone(),
        Some(&TlsCredentials::load(&creds)?),
        LinkOptions::default(),
    )?;
    link.call("query-version", &json!({}))?;
    // The daemon ends the silent connection at its handshake bound: the read sees the end
    // of the stream (the wait's own bound only catches a daemon that never does).
    silent.set_read_timeout(Some(HANG_TIMEOUT))?;
    let mut byte = [0u8; 1];
    // A signal for another thread of the test process may interrupt the wait; only the
    // daemon's answer (the end of the stream, or bytes) or the read timeout end it.
    let read = loop {
        match silent.read(&mut byte) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => break other,
        }
    };
    ensure!(
        matches!(read, Ok(0)),
        "the silent client got {read:?}, not the end of the stream"
    );
    ensure!(
        served.daemon.log().contains("sent nothing within"),
        "{}",
        served.daemon.log()
    );
    Ok(())
}

#[test]
fn serve_refuses_tcp_control_without_tls() -> Result<()> {
    let dir = support::scratch_dir()?;
    let pki = Pki::new("ferry test CA")?;
    let client_only = pki.client_credentials("client-only", "operator")?;
    let daemon = pki.credentials("daemon", &Subject::named("daemon"))?;
    let cases: [(Vec<&str>, &str); 4] = [
        (
            vec!["--control-listen", "127.0.0.1:0"],
            "--control-listen 127.0.0.1:0 needs --tls-creds DIR",
        ),
        (
            vec!["--control", "ctl", "--tls-authz", "operator"],
            "--tls-authz needs --tls-creds",
        ),
        (
            vec![
                "--control-listen",
                "127.0.0.1:0",
                "--tls-creds",
                path_str(&client_only)?,
            ],
            "server-cert.pem is missing",
        ),
        (
            vec![
                "--control-listen",
                "no-port-here",
                "--tls-creds",
                path_str(&daemon)?,
            ],
            "--control-listen no-port-here: expected HOST:PORT",
        ),
    ];
    for (args, expected) in cases {
        let mut all = vec!["serve".to_string()];
        all.extend(args.iter().map(|a| a.to_string()));
        let out = support::ferry::run(&all, Some(dir.path()), support::ferry::COMMAND_TIMEOUT)?;
        let output = CliOutput {
            args: all,
            status: out.status,
            stdout: out.stdout,
            stderr: out.stderr,
        };
        output.expect_error(expected)?;
    }
    Ok(())
}
