//! The blocking client against the fake server (what it sends, how it splits and refuses)
//! and against a real `qemu-nbd` (data, concurrency, a lost or stalled server).

use std::sync::Arc;
use std::time::Duration;

use super::super::protocol::{
    NBD_CMD_DISC, NBD_CMD_READ, NBD_CMD_TRIM, NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES,
};
use super::super::{BlockSizes, ClientError, ClientOptions, ExportUri, NbdAddress, NbdClient};
use super::fake_server::{block_size_info, fake_server, served};
use super::qemu_nbd::{serve, serve_shared};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn unix_uri(socket: &std::path::Path, export: &str) -> ExportUri {
    ExportUri {
        address: NbdAddress::Unix {
            socket: socket.to_path_buf(),
        },
        export: export.to_string(),
        tls: false,
    }
}

fn connect(uri: &ExportUri) -> Result<NbdClient, ClientError> {
    NbdClient::connect(uri, &ClientOptions::default())
}

/// `NBD_OPT_GO` asks for `NBD_INFO_BLOCK_SIZE`; the advertised sizes are kept, reads and
/// writes are split at the maximum payload, write-zeroes at 32 MiB.
#[test]
fn negotiates_block_sizes_and_splits_at_the_maximum_payload() -> TestResult {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("s");
    let server = fake_server(&socket, 64 << 20, vec![block_size_info(512, 4096, 1 << 20)])?;
    let c = connect(&unix_uri(&socket, "e"))?;
    let sizes = c.block_sizes();
    assert_eq!(
        (
            sizes.block_bytes_min,
            sizes.block_bytes_preferred,
            sizes.payload_bytes_max
        ),
        (512, 4096, 1 << 20)
    );
    assert!(sizes.advertised);
    c.write_at(4096, &vec![7u8; (3 << 20) + 512])?;
    let mut buf = vec![1u8; 2 << 20];
    c.read_at(1 << 20, &mut buf)?;
    assert!(buf.iter().all(|&b| b == 0));
    c.write_zeroes(0, 40 << 20, true)?;
    c.trim(0, 33 << 20)?;
    drop(c);
    let log = served(server)?;
    let mut go = 1u32.to_be_bytes().to_vec(); // name length, name, 1 request: BLOCK_SIZE
    go.extend_from_slice(b"e");
    go.extend_from_slice(&[0, 1, 0, 3]);
    assert_eq!(log.go_data, go);
    let mib = 1u32 << 20;
    assert_eq!(
        log.requests,
        vec![
            (NBD_CMD_WRITE, 4096, mib),
            (NBD_CMD_WRITE, 4096 + (1 << 20), mib),
            (NBD_CMD_WRITE, 4096 + (2 << 20), mib),
            (NBD_CMD_WRITE, 4096 + (3 << 20), 512),
            (NBD_CMD_READ, 1 << 20, mib),
            (NBD_CMD_READ, 2 << 20, mib),
            (NBD_CMD_WRITE_ZEROES, 0, 32 * mib),
            (NBD_CMD_WRITE_ZEROES, 32 << 20, 8 * mib),
            (NBD_CMD_TRIM, 0, 32 * mib),
            (NBD_CMD_TRIM, 32 << 20, mib),
            (NBD_CMD_DISC, 0, 0),
        ]
    );
    Ok(())
}

/// A server that sends no `NBD_INFO_BLOCK_SIZE`: the protocol's defaults (1, 4096,
/// 32 MiB), so payloads are split at 32 MiB.
#[test]
fn a_server_without_block_sizes_gets_the_defaults() -> TestResult {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("s");
    let server = fake_server(&socket, 64 << 20, vec![])?;
    let c = connect(&unix_uri(&socket, "e"))?;
    assert_eq!(c.block_sizes(), BlockSizes::DEFAULT);
    c.write_at(0, &vec![7u8; 33 << 20])?;
    drop(c);
    let log = served(server)?;
    assert_eq!(
        log.requests,
        vec![
            (NBD_CMD_WRITE, 0, 32 << 20),
            (NBD_CMD_WRITE, 32 << 20, 1 << 20),
            (NBD_CMD_DISC, 0, 0),
        ]
    );
    Ok(())
}

/// A minimum block size above what the requests are multiples of is refused at connect
/// with both sizes named; the session ends with NBD_CMD_DISC and no request (the client
/// committed to the sizes).
#[test]
fn a_minimum_block_size_above_the_request_block_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("s");
    let server = fake_server(&socket, 1 << 20, vec![block_size_info(4096, 4096, 1 << 20)])?;
    let refused = connect(&unix_uri(&socket, "e"));
    let Err(ClientError::Unusable { reason }) = refused else {
        return Err(format!("not refused as unusable: {:?}", refused.err()).into());
    };
    assert_eq!(
        reason,
        "the export's minimum block size is 4096 bytes; ferry's volumes take 512-byte requests"
    );
    assert_eq!(served(server)?.requests, vec![(NBD_CMD_DISC, 0, 0)]);
    // Requests of 4 KiB blocks take it.
    std::fs::remove_file(&socket)?;
    let server = fake_server(&socket, 1 << 20, vec![block_size_info(4096, 4096, 1 << 20)])?;
    let options = ClientOptions {
        request_block_bytes: 4096,
        ..ClientOptions::default()
    };
    let c = NbdClient::connect(&unix_uri(&socket, "e"), &options)?;
    assert_eq!(c.block_sizes().block_bytes_min, 4096);
    drop(c);
    served(server)?;
    Ok(())
}

/// Sizes against the protocol fail the handshake with the reason.
#[test]
fn invalid_block_sizes_fail_the_handshake() -> TestResult {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("s");
    let _server = fake_server(&socket, 1 << 20, vec![block_size_info(512, 256, 1 << 20)])?;
    let outcome = connect(&unix_uri(&socket, "e"));
    let Err(ClientError::Handshake { reason }) = outcome else {
        return Err(format!("not a handshake failure: {:?}", outcome.err()).into());
    };
    assert!(reason.contains("preferred block size 256"), "{reason}");
    Ok(())
}

/// A range not aligned to the minimum block size is refused before it is sent.
#[test]
fn an_unaligned_range_is_not_sent() -> TestResult {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("s");
    let server = fake_server(&socket, 1 << 20, vec![block_size_info(512, 4096, 1 << 20)])?;
    let c = connect(&unix_uri(&socket, "e"))?;
    let unaligned = c.write_at(100, &[1u8; 512]);
    assert!(
        matches!(&unaligned, Err(ClientError::Unusable { reason }) if reason.contains("not aligned")),
        "{unaligned:?}"
    );
    assert!(c.write_zeroes(512, 100, true).is_err());
    drop(c);
    assert_eq!(served(server)?.requests, vec![(NBD_CMD_DISC, 0, 0)]);
    Ok(())
}

/// A server that stops reading (here: SIGSTOPped) with writes queued behind a blocked
/// send: every writer gets an error within a few request timeouts, none waits forever
/// (a blocked send holds the send lock, and the others queue behind it).
#[test]
fn a_server_that_stops_reading_fails_every_writer() -> TestResult {
    use std::sync::mpsc::channel;
    let dir = tempfile::tempdir()?;
    let (image, socket) = (dir.path().join("e.img"), dir.path().join("s"));
    std::fs::write(&image, vec![0u8; 64 << 20])?;
    let server = serve(&image, &socket)?;
    let options = ClientOptions {
        request_timeout: Duration::from_secs(1),
        ..ClientOptions::default()
    };
    let c = Arc::new(NbdClient::connect(&unix_uri(&socket, "e"), &options)?);
    let pid = nix::unistd::Pid::from_raw(i32::try_from(server.daemon.pid())?);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP)?;
    let (done_tx, done_rx) = channel();
    for i in 0..4u64 {
        let (c, done_tx) = (c.clone(), done_tx.clone());
        std::thread::spawn(move || {
            let result = c.write_at(i * (16 << 20), &vec![1u8; 16 << 20]);
            let _ = done_tx.send(result.is_err());
        });
    }
    let mut failed = 0;
    for _ in 0..4 {
        match done_rx.recv_timeout(Duration::from_secs(20)) {
            Ok(true) => failed += 1,
            Ok(false) => {}
            Err(_) => break,
        }
    }
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT)?;
    assert_eq!(failed, 4, "writers still blocked (or succeeded) after 20 s");
    Ok(())
}

/// A server at its connection limit accepts the connection and says nothing: the error
/// says so instead of only "Resource temporarily unavailable".
#[test]
fn a_server_at_its_connection_limit_is_named_as_such() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (image, socket) = (dir.path().join("e.img"), dir.path().join("s"));
    std::fs::write(&image, vec![0u8; 1 << 20])?;
    let _server = serve_shared(&image, &socket, 1)?;
    let uri = unix_uri(&socket, "e");
    let first = connect(&uri)?;
    let options = ClientOptions {
        request_timeout: Duration::from_millis(500),
        ..ClientOptions::default()
    };
    let second = NbdClient::connect(&uri, &options);
    let Err(ClientError::Handshake { reason }) = second else {
        return Err(format!("a second client was served: {:?}", second.is_ok()).into());
    };
    assert!(reason.contains("connection limit"), "{reason}");
    assert!(reason.contains("-e N"), "{reason}");
    drop(first);
    Ok(())
}

#[test]
fn talks_to_qemu_nbd() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (image, socket) = (dir.path().join("e.img"), dir.path().join("s"));
    std::fs::write(&image, vec![0x55u8; 4 << 20])?;
    let server = serve(&image, &socket)?;
    let refused = connect(&unix_uri(&socket, "no-such-export"));
    assert!(matches!(refused, Err(ClientError::Handshake { .. })));
    let c = Arc::new(connect(&unix_uri(&socket, "e"))?);
    assert_eq!(c.size_bytes(), 4 << 20);
    // qemu-nbd answers the NBD_INFO_BLOCK_SIZE request: a raw file takes any alignment.
    let sizes = c.block_sizes();
    assert!(sizes.advertised, "{sizes}");
    assert_eq!(sizes.block_bytes_min, 1, "{sizes}");
    assert_eq!(sizes.payload_bytes_max, 32 << 20, "{sizes}");
    let writers: Vec<_> = (0..4u8)
        .map(|i| {
            let c = c.clone();
            std::thread::spawn(move || c.write_at(u64::from(i) << 20, &vec![i + 1; 1 << 20]))
        })
        .collect();
    for w in writers {
        w.join().map_err(|_| "writer panicked")??;
    }
    c.write_zeroes(4096, 8192, false)?;
    c.write_zeroes(3 << 20, 4096, true)?;
    c.flush()?;
    let mut buf = vec![0u8; 4 << 20];
    c.read_at(0, &mut buf)?;
    assert_eq!(buf[0], 1);
    assert!(buf[4096..12288].iter().all(|&b| b == 0));
    assert_eq!(buf[12288], 1);
    assert_eq!(buf[(2 << 20) + 7], 3);
    assert!(buf[3 << 20..(3 << 20) + 4096].iter().all(|&b| b == 0));
    assert_eq!(buf[(4 << 20) - 1], 4);
    let beyond = c.write_at(4 << 20, &[1u8; 512]);
    assert!(
        matches!(beyond, Err(ClientError::Refused { .. })),
        "{beyond:?}"
    );
    drop(server);
    let lost = c.write_at(0, &[9u8; 512]);
    assert!(
        matches!(lost, Err(ClientError::Disconnected { .. })),
        "{lost:?}"
    );
    assert!(c.is_dead());
    assert_eq!(std::fs::read(&image)?[(1 << 20) + 1], 2);
    Ok(())
}

/// Pipelined writes: one batch, each write's callback told of its own reply (a write past
/// the end refused by the server, the others written).
#[test]
fn pipelined_writes_each_hear_their_reply() -> TestResult {
    use super::super::PipelinedWrite;
    use std::sync::mpsc::channel;
    let dir = tempfile::tempdir()?;
    let (image, socket) = (dir.path().join("e.img"), dir.path().join("s"));
    std::fs::write(&image, vec![0u8; 1 << 20])?;
    let _server = serve(&image, &socket)?;
    let c = connect(&unix_uri(&socket, "e"))?;
    let (tx, rx) = channel();
    let data: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i + 1; 4096]).collect();
    let mut writes: Vec<PipelinedWrite<'_>> = data
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let tx = tx.clone();
            PipelinedWrite {
                offset_bytes: i as u64 * 8192,
                data: d,
                done: Box::new(move |r: Result<(), ClientError>| {
                    let _ = tx.send((i, r.map_err(|e| e.to_string())));
                }),
            }
        })
        .collect();
    let past_end = vec![9u8; 512];
    writes.push(PipelinedWrite {
        offset_bytes: 1 << 20,
        data: &past_end,
        done: Box::new(move |r: Result<(), ClientError>| {
            let _ = tx.send((99, r.map_err(|e| e.to_string())));
        }),
    });
    c.send_writes(&mut writes);
    assert!(writes.is_empty());
    let mut results: Vec<_> = (0..9)
        .map(|_| rx.recv_timeout(ferry_test_support::wait::HANG_TIMEOUT))
        .collect::<Result<_, _>>()?;
    results.sort_by_key(|r| r.0);
    for (i, result) in results.iter().take(8).enumerate() {
        assert_eq!(result, &(i, Ok(())));
    }
    let (tag, refused) = &results[8];
    assert_eq!(*tag, 99);
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("refused write")),
        "{refused:?}"
    );
    c.flush()?;
    let image = std::fs::read(&image)?;
    for (i, d) in data.iter().enumerate() {
        assert_eq!(&image[i * 8192..i * 8192 + 4096], &d[..]);
    }
    Ok(())
}

/// A pipelined write whose reply never comes (the server SIGSTOPped) fails the connection
/// once its sender looks for overdue writes after the request timeout; its callback hears
/// of the lost connection.
#[test]
fn an_overdue_pipelined_write_fails_the_connection() -> TestResult {
    use super::super::PipelinedWrite;
    use std::sync::mpsc::channel;
    let dir = tempfile::tempdir()?;
    let (image, socket) = (dir.path().join("e.img"), dir.path().join("s"));
    std::fs::write(&image, vec![0u8; 1 << 20])?;
    let server = serve(&image, &socket)?;
    let options = ClientOptions {
        request_timeout: Duration::from_millis(200),
        ..ClientOptions::default()
    };
    let c = NbdClient::connect(&unix_uri(&socket, "e"), &options)?;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(server.daemon.pid())?);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP)?;
    let (tx, rx) = channel();
    let data = vec![1u8; 4096];
    c.send_writes(&mut vec![PipelinedWrite {
        offset_bytes: 0,
        data: &data,
        done: Box::new(move |r: Result<(), ClientError>| {
            let _ = tx.send(r);
        }),
    }]);
    let mut outcome = None;
    let waited = ferry_test_support::wait::wait_until(
        "the overdue write's callback",
        ferry_test_support::wait::HANG_TIMEOUT,
        || {
            c.expire_overdue();
            outcome = rx.try_recv().ok();
            Ok(outcome.is_some())
        },
    );
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT)?;
    waited?;
    assert!(
        matches!(outcome, Some(Err(ClientError::Disconnected { .. }))),
        "{outcome:?}"
    );
    assert!(c.is_dead());
    Ok(())
}
