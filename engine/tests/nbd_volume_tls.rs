//! A volume on an NBD export reached over TLS (`nbds://`, or `nbd://` with credentials),
//! served by real servers that require TLS (`qemu-nbd --tls-creds`, `qemu-storage-daemon
//! --nbd-server ...,tls-creds=`), through a `VolumeQueue`'s own non-blocking connection:
//! reads, writes (many large ones in flight at once, so that the TLS session's output waits
//! for room in the socket), flushes, write-zeroes and discards land byte for byte; the
//! server dying is a connection failure the queue recovers from; a wrong CA and a server
//! without TLS are refused at open with one line.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferry_engine::testing::{read_at as read, run_op, write_at as write};
use ferry_engine::tls::TlsCredentials;
use ferry_engine::{BlockOp, IoFailure, Volume, VolumeConfig, VolumeQueue};
use ferry_test_support::nbd::{NbdAddr, NbdServer, QemuNbdOpts, QsdOpts};
use ferry_test_support::pki::{Pki, Subject};
use ferry_test_support::{compare_image, create_image, pattern, wait_until, HANG_TIMEOUT};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const MIB: u64 = 1 << 20;

fn open(uri: &str, credentials: &Path) -> Result<Arc<Volume>, Box<dyn std::error::Error>> {
    Ok(Volume::open(VolumeConfig {
        name: "n".into(),
        path: PathBuf::from(uri),
        nbd_tls: Some(Arc::new(TlsCredentials::load(credentials)?)),
        ..Default::default()
    })?)
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

/// 32 writes of 256 KiB in flight at once (8 MiB: more than the socket and the session
/// buffer hold), then each read back, a flush, write-zeroes and a discard.
fn exercise(queue: &mut VolumeQueue, image: &Path) -> TestResult {
    let data = pattern(3, 8 * MIB as usize);
    let iovs: Vec<[libc::iovec; 1]> = data
        .chunks(256 << 10)
        .map(|chunk| {
            [libc::iovec {
                iov_base: chunk.as_ptr() as *mut libc::c_void,
                iov_len: chunk.len(),
            }]
        })
        .collect();
    for (i, iov) in iovs.iter().enumerate() {
        let op = BlockOp::Write {
            offset_bytes: i as u64 * (256 << 10),
            iovecs: iov,
        };
        // SAFETY: `data` outlives the drain below.
        unsafe { queue.submit(op, i as u64) }.map_err(|e| format!("{e:?}"))?;
    }
    queue.commit()?;
    let mut done = Vec::new();
    assert!(queue.drain(&mut done, HANG_TIMEOUT), "writes hang");
    assert_eq!(done.len(), iovs.len());
    assert!(done.iter().all(|c| c.result == Ok(256 << 10)), "{done:?}");
    let mut back = vec![0u8; data.len()];
    for (i, chunk) in back.chunks_mut(MIB as usize).enumerate() {
        assert_eq!(read(queue, i as u64 * MIB, chunk), Ok(MIB));
    }
    assert!(back == data, "read back differs from what was written");
    assert_eq!(run_op(queue, BlockOp::Flush), Ok(0));
    let zeroes = BlockOp::WriteZeroes {
        offset_bytes: MIB,
        len_bytes: 8192,
        unmap: false,
    };
    assert_eq!(run_op(queue, zeroes), Ok(8192));
    let discard = BlockOp::Discard {
        offset_bytes: 2 * MIB,
        len_bytes: 65536,
    };
    assert_eq!(run_op(queue, discard), Ok(65536));
    assert_eq!(run_op(queue, BlockOp::Flush), Ok(0));
    let mut expected = data;
    expected[MIB as usize..MIB as usize + 8192].fill(0);
    expected[2 * MIB as usize..2 * MIB as usize + 65536].fill(0);
    compare_image(image, 0, &expected)?;
    Ok(())
}

#[test]
fn a_volume_over_tls_on_qemu_nbd() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (_pki, creds) = credentials("ferry test CA")?;
    let image = dir.path().join("e.img");
    create_image(&image, 16 * MIB)?;
    let server = qemu_nbd_tls(&image, &NbdAddr::free_tcp()?, &creds)?;
    let volume = open(&server.uri(), &creds)?;
    assert_eq!(volume.backing().path, PathBuf::from(server.uri()));
    assert!(volume.backing().nbd().is_some_and(|e| e.uses_tls()));
    let mut queue = VolumeQueue::new(volume, 0, 64, 4)?;
    exercise(&mut queue, &image)
}

/// `nbd://` with credentials: the queues upgrade with `NBD_OPT_STARTTLS` too.
#[test]
fn a_volume_over_tls_on_qemu_storage_daemon_by_starttls() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (_pki, creds) = credentials("ferry test CA")?;
    let image = dir.path().join("e.img");
    create_image(&image, 16 * MIB)?;
    let opts = QsdOpts {
        tls_creds: Some(creds.clone()),
    };
    let addr = NbdAddr::Unix(dir.path().join("nbd.sock"));
    let server = NbdServer::qsd_with(&image, "e", &addr, opts)?;
    let volume = open(&server.plain_uri(), &creds)?;
    assert!(volume.backing().nbd().is_some_and(|e| e.uses_tls()));
    let mut queue = VolumeQueue::new(volume, 0, 64, 4)?;
    exercise(&mut queue, &image)
}

/// The TLS server dies with requests in flight: they fail, none hangs; once it is back the
/// same queue reconnects over TLS and serves with the data intact.
#[test]
fn a_tls_server_killed_while_serving_then_back() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (_pki, creds) = credentials("ferry test CA")?;
    let image = dir.path().join("e.img");
    create_image(&image, 8 * MIB)?;
    let addr = NbdAddr::free_tcp()?;
    let mut server = qemu_nbd_tls(&image, &addr, &creds)?;
    let volume = open(&server.uri(), &creds)?;
    let mut queue = VolumeQueue::new(volume, 0, 64, 4)?;
    assert_eq!(write(&mut queue, 4096, &[0x5a; 8192]), Ok(8192));

    let bufs: Vec<Vec<u8>> = (0..16).map(|_| vec![0u8; 256 << 10]).collect();
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
            offset_bytes: i as u64 * (256 << 10),
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
    assert_eq!(out.len(), iovs.len());

    let _server = qemu_nbd_tls(&image, &addr, &creds)?;
    let mut back = vec![0u8; 8192];
    wait_until("the queue serving again", HANG_TIMEOUT, || {
        match read(&mut queue, 4096, &mut back) {
            Ok(8192) => Ok(true),
            Err(IoFailure::Os(_)) => Ok(false),
            other => anyhow::bail!("a read once the server is back: {other:?}"),
        }
    })?;
    assert!(back.iter().all(|&b| b == 0x5a));
    assert_eq!(write(&mut queue, 0, &[7; 512]), Ok(512));
    Ok(())
}

/// Why opening a volume on `uri` failed; an error of the test when it did not.
fn open_refusal(uri: &str, credentials: &Path) -> Result<String, Box<dyn std::error::Error>> {
    match open(uri, credentials) {
        Ok(_) => Err(format!("{uri} opened").into()),
        Err(e) => {
            let text = e.to_string();
            assert!(!text.contains('\n'), "not one line: {text:?}");
            Ok(text)
        }
    }
}

#[test]
fn a_wrong_ca_and_a_server_without_tls_are_refused_at_open() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (_pki, creds) = credentials("ferry test CA")?;
    let (_foreign_pki, foreign) = credentials("another CA")?;
    let image = dir.path().join("e.img");
    create_image(&image, MIB)?;
    let server = qemu_nbd_tls(&image, &NbdAddr::free_tcp()?, &creds)?;
    let reason = open_refusal(&server.uri(), &foreign)?;
    assert!(
        reason.contains("TLS handshake: invalid peer certificate"),
        "{reason}"
    );
    drop(server);

    let addr = NbdAddr::free_tcp()?;
    let _plain = NbdServer::qemu_nbd(&image, "e", &addr)?;
    let reason = open_refusal(&addr.uri_with_scheme("e", true), &creds)?;
    assert!(
        reason.contains("the server does not offer TLS: it refused NBD_OPT_STARTTLS"),
        "{reason}"
    );
    Ok(())
}
