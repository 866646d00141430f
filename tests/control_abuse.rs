//! The control protocol under abuse, on the unix socket and on the TCP listener (mutual
//! TLS): malformed requests, lines of megabytes, thousands of connections, clients that
//! never read. Each gets an error reply or a closed connection; a libblkio client doing I/O
//! on the daemon's volume is served throughout, other control clients are served, and the
//! daemon's memory stays bounded.

#[path = "support/mod.rs"]
mod support;

use anyhow::{bail, ensure, Context as _, Result};
use ferry_engine::peer::control_protocol::{LineDeadlines, LineReader, REQUEST_BYTES_MAX};
use ferry_engine::peer::transport::ClientStream;
use ferry_engine::peer::ControlAddress;
use ferry_engine::tls::TlsCredentials;
use serde_json::Value;
use std::io::{ErrorKind, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use support::blkio_client::{BlkioClient, BlkioOpts};
use support::daemon::{Daemon, START_TIMEOUT};
use support::ferry;
use support::pki::{Pki, Subject};
use support::wait::{wait_until, HANG_TIMEOUT};

/// Connections opened at once by the floods.
const FLOOD_CONNECTIONS: usize = 2000;
/// The daemon's connection bound on each listener (docs/control.md).
const CONNECTIONS_MAX: usize = 64;

struct Served {
    daemon: Daemon,
    control: PathBuf,
    tcp: ControlAddress,
    tls: Arc<rustls::ClientConfig>,
    blkio: BlkioClient,
    /// What the blkio client wrote, to check the volume at the end.
    written: Vec<u8>,
    _pki: Pki,
    _dir: tempfile::TempDir,
}

impl Served {
    fn start() -> Result<Self> {
        let pki = Pki::new("ferry test CA")?;
        let creds = pki.credentials("daemon", &Subject::named("daemon"))?;
        let client_creds = pki.client_credentials("operator", "operator")?;
        let dir = support::scratch_dir()?;
        let socket = dir.path().join("vm1.sock");
        let control = dir.path().join("ctl.sock");
        let volume = format!(
            "name=vm1,path={},socket={},size=16M",
            dir.path().join("vm1.img").display(),
            socket.display()
        );
        let mut command = Command::new(support::ferry_bin());
        command
            .args(["serve", "--volume", &volume, "--control"])
            .arg(&control)
            .args(["--control-listen", "127.0.0.1:0", "--tls-creds"])
            .arg(&creds);
        let mut daemon = Daemon::spawn_listening("ferry-serve", command, &socket)?;
        daemon.wait_listening(&control, START_TIMEOUT)?;
        let mut port = None;
        wait_until("the control listener's line", START_TIMEOUT, || {
            port = ferry::announced_port(&daemon.log(), "ferry: control protocol on ferry://");
            Ok(port.is_some())
        })?;
        let blkio = BlkioClient::connect(&socket, &BlkioOpts::default())?;
        Ok(Self {
            daemon,
            control,
            tcp: ControlAddress::Tcp {
                host: "127.0.0.1".into(),
                port: port.context("no port")?,
            },
            tls: TlsCredentials::load(&client_creds)?.client_config()?,
            blkio,
            written: vec![0; 16 << 20],
            _pki: pki,
            _dir: dir,
        })
    }

    fn port(&self) -> u16 {
        match self.tcp {
            ControlAddress::Tcp { port, .. } => port,
            ControlAddress::Unix(_) => 0,
        }
    }

    fn unix(&self) -> Result<ClientStream> {
        let stream = UnixStream::connect(&self.control).context("connect control socket")?;
        stream.set_write_timeout(Some(HANG_TIMEOUT))?;
        Ok(ClientStream::Unix(stream))
    }

    fn tls(&self) -> Result<ClientStream> {
        let stream = ClientStream::connect(&self.tcp, Some(&self.tls), HANG_TIMEOUT, HANG_TIMEOUT)?;
        stream.set_write_timeout(Some(HANG_TIMEOUT))?;
        Ok(stream)
    }

    /// One 64 KiB write and its read back through the blkio client: the guest's path works.
    fn io_round(&mut self, round: u64) -> Result<()> {
        let data = support::pattern(round, 65536);
        let offset = (round % 256) * 65536;
        self.blkio.write_all(offset, &data, 65536)?;
        let back = self.blkio.read_all(offset, data.len(), 65536)?;
        ensure!(
            back == data,
            "round {round}: the volume read back other bytes"
        );
        self.written[offset as usize..][..data.len()].copy_from_slice(&data);
        Ok(())
    }

    /// A well-behaved client on each listener is answered.
    fn others_served(&self) -> Result<()> {
        for mut stream in [self.unix()?, self.tls()?] {
            let reply = request(&mut stream, r#"{"command":"query-version","id":1}"#)?;
            ensure!(reply["return"]["version"].is_string(), "{reply}");
        }
        Ok(())
    }

    fn rss_kib(&self) -> Result<u64> {
        self.daemon.rss_kib()
    }
}

/// The next reply line, `None` at the end of the stream (or a reset, how a TCP connection
/// closed with bytes unread may end).
fn read_reply(stream: &mut ClientStream) -> Result<Option<Value>> {
    let deadlines = LineDeadlines {
        first_byte: Some(HANG_TIMEOUT),
        whole_line: Some(HANG_TIMEOUT),
    };
    match LineReader::new(1 << 20).read_line(stream, deadlines) {
        Ok(Some(line)) => Ok(Some(serde_json::from_str(&line)?)),
        Ok(None) => Ok(None),
        Err(ferry_engine::peer::control_protocol::LineError::Io(e))
            if e.kind() == ErrorKind::ConnectionReset =>
        {
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

fn request(stream: &mut ClientStream, line: &str) -> Result<Value> {
    stream.write_all(format!("{line}\n").as_bytes())?;
    stream.flush()?;
    read_reply(stream)?.context("the daemon closed the connection")
}

/// The error reply's class and description.
fn error_of(reply: &Value) -> Result<(String, String)> {
    let text = |field: &str| reply["error"][field].as_str().map(str::to_string);
    match (text("class"), text("desc")) {
        (Some(class), Some(desc)) => Ok((class, desc)),
        _ => bail!("not an error reply: {reply}"),
    }
}

/// Malformed requests get a `GenericError` naming what is wrong, and the connection goes
/// on: the next request on it is answered.
fn malformed(stream: &mut ClientStream) -> Result<()> {
    let zeros = vec!["0"; 40_000].join(",");
    let cases = [
        ("{\"command\": ", "invalid JSON"),
        ("\u{1}\u{2}garbage", "invalid JSON"),
        ("[1,2,3]", "must be a JSON object"),
        ("{\"id\": 5}", "missing \"command\""),
        ("{\"command\": {\"a\": 1}}", "\"command\" must be a string"),
        (
            "{\"command\": \"query-version\", \"arguments\": 3}",
            "must be a JSON object",
        ),
        (
            &*format!(
                "{{\"command\": \"query-version\", \"arguments\": {{\"a\": [{zeros},{zeros}]}}}}"
            ),
            "longer than",
        ),
        (
            &*format!("{{\"command\": \"x\", \"id\": \"{}\"}}", "i".repeat(300)),
            "\"id\" longer",
        ),
        (&*"[".repeat(10_000), "invalid JSON"),
        (
            "{\"command\": \"no-such-command\", \"id\": 9}",
            "unknown command",
        ),
    ];
    for (line, expect) in cases {
        let reply = request(stream, line)?;
        let (_, desc) = error_of(&reply)?;
        ensure!(
            desc.contains(expect),
            "{:.60}: {desc:?} lacks {expect:?}",
            line
        );
    }
    let reply = request(stream, r#"{"command":"query-version","id":"after"}"#)?;
    ensure!(
        reply["id"] == "after" && reply["return"].is_object(),
        "{reply}"
    );
    Ok(())
}

/// A line past the bound is refused in one reply, then the connection ends.
fn too_long(mut stream: ClientStream, len: usize) -> Result<()> {
    let line = vec![b' '; len];
    // The daemon stops reading past its bound: a write of the rest may fail.
    let _ = stream.write_all(&line).and_then(|()| stream.flush());
    let reply = read_reply(&mut stream)?.context("no reply to a line too long")?;
    let (class, desc) = error_of(&reply)?;
    ensure!(
        class == "GenericError" && desc.contains("request too long"),
        "{reply}"
    );
    ensure!(read_reply(&mut stream)?.is_none(), "the connection went on");
    Ok(())
}

/// A line of non-UTF-8 bytes is refused and the connection ends.
fn not_utf8(mut stream: ClientStream) -> Result<()> {
    stream.write_all(b"{\"command\": \"\xff\xfe\"}\n")?;
    stream.flush()?;
    let reply = read_reply(&mut stream)?.context("no reply to bytes that are not UTF-8")?;
    ensure!(error_of(&reply)?.1.contains("not UTF-8"), "{reply}");
    ensure!(read_reply(&mut stream)?.is_none(), "the connection went on");
    Ok(())
}

/// Sends requests without ever reading a reply, until the daemon's replies fill the socket
/// buffers both ways (a write that does not go through within a short bound).
fn never_reader(mut stream: ClientStream) -> Result<ClientStream> {
    stream.set_write_timeout(Some(Duration::from_millis(300)))?;
    let line = b"{\"command\":\"query-commands\"}\n";
    let mut sent = 0u64;
    while stream.write_all(line).and_then(|()| stream.flush()).is_ok() {
        sent += 1;
        ensure!(
            sent < 10_000_000,
            "the daemon reads from a client that never reads"
        );
    }
    Ok(stream)
}

/// `FLOOD_CONNECTIONS` unix connections at once, each sending one request: at most
/// `CONNECTIONS_MAX` are served, every other one is told `Busy` and closed.
fn unix_flood(served: &Served) -> Result<Vec<ClientStream>> {
    let mut streams = Vec::with_capacity(FLOOD_CONNECTIONS);
    for _ in 0..FLOOD_CONNECTIONS {
        streams.push(served.unix()?);
    }
    let (mut answered, mut busy) = (0, 0);
    for stream in &mut streams {
        // A refused client's socket is closed already: its request may not go out.
        let _ = stream.write_all(b"{\"command\":\"query-version\"}\n");
        match read_reply(stream)? {
            Some(reply) if reply["return"].is_object() => answered += 1,
            Some(reply) if error_of(&reply)?.0 == "Busy" => busy += 1,
            other => bail!("a flooding client got {other:?}"),
        }
    }
    ensure!(
        answered <= CONNECTIONS_MAX && answered + busy == FLOOD_CONNECTIONS,
        "{answered} answered, {busy} busy of {FLOOD_CONNECTIONS}"
    );
    Ok(streams)
}

/// `FLOOD_CONNECTIONS` TCP connections at once that never start TLS: each is closed by the
/// daemon (at once beyond the bound, at the handshake bound within it).
fn tcp_flood(port: u16) -> Result<Vec<TcpStream>> {
    let mut streams = Vec::with_capacity(FLOOD_CONNECTIONS);
    for _ in 0..FLOOD_CONNECTIONS {
        streams.push(TcpStream::connect(("127.0.0.1", port))?);
    }
    Ok(streams)
}

#[test]
fn abusive_control_clients_leave_the_daemon_and_its_guest_served() -> Result<()> {
    let files = support::limits::raise_open_files_limit()?;
    let enough = format!("{} open files (ulimit -n)", 2 * FLOOD_CONNECTIONS + 256);
    if !support::require(&enough, files >= 2 * FLOOD_CONNECTIONS as u64 + 256) {
        return Ok(());
    }
    let mut served = Served::start()?;
    served.io_round(0)?;
    let rss_before = served.rss_kib()?;

    malformed(&mut served.unix()?)?;
    malformed(&mut served.tls()?)?;
    served.io_round(1)?;

    too_long(served.unix()?, REQUEST_BYTES_MAX + 100)?;
    too_long(served.unix()?, 16 * REQUEST_BYTES_MAX)?;
    too_long(served.tls()?, REQUEST_BYTES_MAX + 100)?;
    not_utf8(served.unix()?)?;
    not_utf8(served.tls()?)?;
    served.io_round(2)?;

    // Megabyte requests on every slot at once: what the daemon builds from them is bounded.
    let big = format!(
        "{{\"command\":\"query-version\",\"arguments\":{{\"a\":[{}]}}}}\n",
        vec!["0"; REQUEST_BYTES_MAX / 2 - 64].join(",")
    );
    let mut heavy = Vec::new();
    for _ in 0..CONNECTIONS_MAX - 8 {
        let mut stream = served.unix()?;
        stream.write_all(big.as_bytes())?;
        heavy.push(stream);
    }
    for stream in &mut heavy {
        let reply = read_reply(stream)?.context("no reply to a megabyte request")?;
        ensure!(error_of(&reply)?.1.contains("longer than"), "{reply}");
    }
    drop(heavy);
    served.io_round(3)?;

    let stuck = [never_reader(served.unix()?)?, never_reader(served.tls()?)?];
    served.others_served()?;
    served.io_round(4)?;

    let tcp_flooded = tcp_flood(served.port())?;
    served.io_round(5)?;
    let unix_flooded = unix_flood(&served)?;
    served.io_round(6)?;
    let rss_during = served.rss_kib()?;
    ensure!(
        rss_during < rss_before + 256 * 1024,
        "the daemon grew from {rss_before} KiB to {rss_during} KiB under abusive clients"
    );
    drop((stuck, tcp_flooded, unix_flooded));
    // Once the abusive connections are gone, new clients get in again on both listeners.
    wait_until("new control clients served", HANG_TIMEOUT, || {
        Ok(served.others_served().is_ok())
    })?;
    served.io_round(7)?;
    served.blkio.flush()?;
    let image = std::fs::read(served._dir.path().join("vm1.img"))?;
    ensure!(
        image == served.written,
        "the volume holds other bytes than the client wrote"
    );
    eprintln!(
        "control abuse: RSS {rss_before} KiB before, {rss_during} KiB under abuse; log:\n{}",
        served
            .daemon
            .log()
            .lines()
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok(())
}
