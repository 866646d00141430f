//! Failures of a volume that lives on an NBD export: the server dies while serving (requests
//! fail, none hangs, and the queue reconnects once the server is back: real `qemu-nbd`), and
//! a server that breaks the protocol (bad reply magic, unknown handle, short read reply: a
//! small misbehaving server in this file, since no real one misbehaves on demand).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ferry_engine::testing::{read_at as read, write_at as write};
use ferry_engine::{BlockOp, IoFailure, Volume, VolumeConfig, VolumeQueue};
use ferry_test_support::nbd::{free_port, NbdAddr, NbdServer};
use ferry_test_support::{create_image, wait_until, HANG_TIMEOUT};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const MIB: u64 = 1 << 20;

fn open(uri: &str) -> Result<Arc<Volume>, ferry_engine::EngineError> {
    Volume::open(VolumeConfig {
        name: "n".into(),
        path: PathBuf::from(uri),
        ..Default::default()
    })
}

/// qemu-nbd dies with requests in flight: they fail, later ones fail fast while it is
/// down, and once it is back the same queue serves again with the data intact.
#[test]
fn server_killed_while_serving_then_back() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (image, socket) = (dir.path().join("e.img"), dir.path().join("nbd.sock"));
    create_image(&image, 8 * MIB)?;
    let addr = NbdAddr::Unix(socket);
    let mut server = NbdServer::qemu_nbd(&image, "e", &addr)?;
    let volume = open(&server.uri())?;
    let mut queue = VolumeQueue::new(volume.clone(), 0, 64, 4)?;
    assert_eq!(write(&mut queue, 4096, &[0x5a; 8192]), Ok(8192));

    // Many reads in flight, then the server dies.
    let bufs: Vec<Vec<u8>> = (0..32).map(|_| vec![0u8; 256 << 10]).collect();
    let iovs: Vec<[libc::iovec; 1]> = bufs
        .iter()
        .map(|b| {
            [libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            }]
        })
        .collect();
    for (i, iov) in iovs.iter().enumerate() {
        let op = BlockOp::Read {
            offset_bytes: (i as u64 % 24) * (256 << 10),
            iovecs: iov,
        };
        // SAFETY: `bufs` outlive the drain below.
        unsafe { queue.submit(op, i as u64) }.map_err(|e| format!("{e:?}"))?;
    }
    queue.commit()?;
    server.kill();
    let mut out = Vec::new();
    assert!(
        queue.drain(&mut out, Duration::from_secs(20)),
        "requests hang"
    );
    assert_eq!(out.len(), 32);

    let mut buf = vec![0u8; 4096];
    let down = read(&mut queue, 0, &mut buf);
    assert!(matches!(down, Err(IoFailure::Os(_))), "{down:?}");
    // Within the back-off after a failed connection a request fails at once, untried.
    let again = read(&mut queue, 0, &mut buf);
    assert_eq!(again, Err(IoFailure::Os(libc::ENOTCONN)));

    let _server = NbdServer::qemu_nbd(&image, "e", &addr)?;
    // Requests fail with ENOTCONN until the back-off ends; the next one reconnects.
    let mut back = vec![0u8; 8192];
    wait_until("the queue serving again", HANG_TIMEOUT, || {
        match read(&mut queue, 4096, &mut back) {
            Ok(8192) => Ok(true),
            Err(IoFailure::Os(libc::ENOTCONN)) => Ok(false),
            other => anyhow::bail!("a read once the server is back: {other:?}"),
        }
    })?;
    assert!(back.iter().all(|&b| b == 0x5a));
    assert_eq!(write(&mut queue, 0, &[7; 512]), Ok(512));
    Ok(())
}

/// What the misbehaving server does with the first request of a connection.
#[derive(Clone, Copy, Debug)]
enum Misbehaviour {
    BadMagic,
    UnknownHandle,
    /// A read reply with only part of its data, then the connection closes.
    ShortRead,
}

/// Serves the fixed-newstyle handshake for one 1 MiB export; `None` once the client left.
fn handshake(stream: &mut TcpStream) -> Option<()> {
    let mut greeting = Vec::new();
    greeting.extend_from_slice(b"NBDMAGIC");
    greeting.extend_from_slice(b"IHAVEOPT");
    greeting.extend_from_slice(&3u16.to_be_bytes()); // fixed newstyle, no zeroes
    stream.write_all(&greeting).ok()?;
    let mut client_flags = [0u8; 4];
    stream.read_exact(&mut client_flags).ok()?;
    let mut option = [0u8; 16];
    stream.read_exact(&mut option).ok()?;
    let len = u32::from_be_bytes([option[12], option[13], option[14], option[15]]);
    let mut data = vec![0u8; len as usize];
    stream.read_exact(&mut data).ok()?;
    let reply = |kind: u32, payload: &[u8]| {
        let mut r = Vec::new();
        r.extend_from_slice(&0x0003_e889_0455_65a9u64.to_be_bytes());
        r.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        r.extend_from_slice(payload);
        r
    };
    let mut info = vec![0u8, 0];
    info.extend_from_slice(&MIB.to_be_bytes());
    info.extend_from_slice(&(1u16 | 1 << 2).to_be_bytes()); // HAS_FLAGS, SEND_FLUSH
    stream.write_all(&reply(3, &info)).ok()?;
    stream.write_all(&reply(1, &[])).ok()?;
    Some(())
}

/// Answers the first request of every connection as `how` says.
fn misbehave(stream: &mut TcpStream, how: Misbehaviour) -> Option<()> {
    handshake(stream)?;
    let mut request = [0u8; 28];
    stream.read_exact(&mut request).ok()?;
    let mut handle = [0u8; 8];
    handle.copy_from_slice(&request[8..16]);
    let mut reply = Vec::new();
    match how {
        Misbehaviour::BadMagic => reply.extend_from_slice(&0xdead_beefu32.to_be_bytes()),
        _ => reply.extend_from_slice(&0x6744_6698u32.to_be_bytes()),
    }
    reply.extend_from_slice(&0u32.to_be_bytes());
    match how {
        Misbehaviour::UnknownHandle => reply.extend_from_slice(&9999u64.to_be_bytes()),
        _ => reply.extend_from_slice(&handle),
    }
    if let Misbehaviour::ShortRead = how {
        reply.extend_from_slice(&[1u8; 100]);
    }
    stream.write_all(&reply).ok()?;
    if !matches!(how, Misbehaviour::ShortRead) {
        // Open until the client drops the connection: it must fail on the reply itself, not
        // on a closed connection.
        std::io::copy(stream, &mut std::io::sink()).ok()?;
    }
    Some(())
}

fn misbehaving_server(how: Misbehaviour) -> std::io::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || misbehave(&mut stream, how));
        }
    });
    Ok(format!("nbd://127.0.0.1:{port}/x"))
}

#[test]
fn protocol_violations_fail_the_request_without_hanging() -> TestResult {
    for how in [
        Misbehaviour::BadMagic,
        Misbehaviour::UnknownHandle,
        Misbehaviour::ShortRead,
    ] {
        let volume = open(&misbehaving_server(how)?)?;
        assert_eq!(volume.size_bytes(), MIB);
        let mut queue = VolumeQueue::new(volume, 0, 8, 1)?;
        let mut buf = vec![0u8; 4096];
        for _ in 0..3 {
            // Each request gets a new connection, which misbehaves again.
            let result = read(&mut queue, 0, &mut buf);
            assert!(
                matches!(result, Err(IoFailure::Os(_))),
                "{how:?}: {result:?}"
            );
        }
    }
    Ok(())
}

#[test]
fn a_missing_server_is_an_open_error() -> TestResult {
    let port = free_port()?;
    let err = open(&format!("nbd://127.0.0.1:{port}/x")).err();
    assert!(
        matches!(err, Some(ferry_engine::EngineError::Nbd { .. })),
        "{err:?}"
    );
    let err = open("nbd+unix:///x?socket=/nonexistent/s").err();
    assert!(
        matches!(err, Some(ferry_engine::EngineError::Nbd { .. })),
        "{err:?}"
    );
    let err = open("nbd+unix:///x").err();
    assert!(
        matches!(err, Some(ferry_engine::EngineError::Nbd { .. })),
        "{err:?}"
    );
    Ok(())
}

/// A queue connected to an NBD export follows its volume onto a file and back onto the
/// export (cutovers, with the volume paused and idle): each request reaches the backing of
/// its time, and nothing hangs when the connection the queue left still has a poll armed.
#[test]
fn a_connected_queue_follows_its_volume_off_the_export_and_back() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (image, socket) = (dir.path().join("e.img"), dir.path().join("nbd.sock"));
    create_image(&image, 8 * MIB)?;
    let file = dir.path().join("f.img");
    std::fs::write(&file, vec![0x33u8; 8 * MIB as usize])?;
    let server = NbdServer::qemu_nbd(&image, "e", &NbdAddr::Unix(socket))?;
    let volume = open(&server.uri())?;
    let mut queue = VolumeQueue::new(volume.clone(), 0, 8, 4)?;
    assert_eq!(write(&mut queue, 0, &[0x5a; 4096]), Ok(4096));

    let cutover = |to: &std::path::Path| -> TestResult {
        let config = VolumeConfig {
            path: to.to_path_buf(),
            ..volume.config().clone()
        };
        let backing = ferry_engine::volume::open::open_backing(&config)?;
        let guard = volume
            .pause(Duration::from_secs(5))
            .ok_or("the volume did not go idle")?;
        drop(volume.replace_backing(backing));
        drop(guard);
        Ok(())
    };
    let mut buf = vec![0u8; 4096];
    cutover(&file)?;
    assert_eq!(read(&mut queue, 0, &mut buf), Ok(4096));
    assert!(buf.iter().all(|&b| b == 0x33));
    cutover(std::path::Path::new(&server.uri()))?;
    assert_eq!(read(&mut queue, 0, &mut buf), Ok(4096));
    assert!(buf.iter().all(|&b| b == 0x5a));
    Ok(())
}
