//! The transmission phase: data in and out through ferry's own client and a raw one,
//! structured replies, block status, FUA, refused requests, pipelining and back-pressure,
//! a paused volume.

use std::io::Write;
use std::time::Duration;

use super::raw_client::TestResult;
use super::{fixture, is_closed, MIB};
use crate::nbd::protocol::*;
use crate::nbd::server::ServerOptions;
use crate::nbd::{ClientOptions, ExportUri, NbdAddress, NbdClient};

#[test]
fn ferrys_own_client_reads_writes_trims_and_zeroes() -> TestResult {
    let f = fixture(8 * MIB, false, ServerOptions::default())?;
    let uri = ExportUri {
        address: NbdAddress::Unix {
            socket: f.socket.clone(),
        },
        export: "v".into(),
        tls: false,
    };
    let c = NbdClient::connect(&uri, &ClientOptions::default())?;
    assert_eq!(c.size_bytes(), 8 * MIB);
    let data: Vec<u8> = (0..3 * MIB as usize).map(|i| (i % 251) as u8).collect();
    c.write_at(MIB, &data)?;
    c.flush()?;
    let mut back = vec![0u8; data.len()];
    c.read_at(MIB, &mut back)?;
    assert_eq!(back, data);
    c.write_zeroes(MIB, 4096, false)?;
    c.trim(2 * MIB, 8192)?;
    c.flush()?;
    drop(c);
    let image = f.image_bytes()?;
    let at = MIB as usize;
    assert!(image[at..at + 4096].iter().all(|&b| b == 0));
    assert_eq!(image[at + 4096..2 * at], data[4096..at]);
    assert!(image[2 * at..2 * at + 8192].iter().all(|&b| b == 0));
    assert_eq!(image[2 * at + 8192..4 * at], data[at + 8192..]);
    let stats = f.volume.stats.snapshot();
    assert!(
        stats.write_ops > 0 && stats.read_ops > 0 && stats.flush_ops > 0,
        "{stats:?}"
    );
    Ok(())
}

#[test]
fn structured_reads_fua_writes_and_block_status() -> TestResult {
    let f = fixture(4 * MIB, false, ServerOptions::default())?;
    let mut c = f.session(true)?;
    let data = vec![0x5au8; 4096];
    c.write(1, MIB, &data, NBD_CMD_FLAG_FUA)?;
    assert_eq!(c.structured_reply()?, (1, 0, vec![]));
    c.request(NBD_CMD_READ, NBD_CMD_FLAG_DF, 2, MIB, 4096)?;
    assert_eq!(c.structured_reply()?, (2, 0, data));
    c.request(NBD_CMD_BLOCK_STATUS, 0, 3, 0, (4 * MIB) as u32)?;
    let (header, payload) = c.chunk()?;
    assert_eq!(header.reply_type, NBD_REPLY_TYPE_BLOCK_STATUS);
    assert_eq!(header.cookie, 3);
    let descriptors: Vec<BlockDescriptor> = payload[4..]
        .chunks_exact(8)
        .map(BlockDescriptor::decode)
        .collect::<Result<_, _>>()?;
    let total: u64 = descriptors.iter().map(|d| u64::from(d.len_bytes)).sum();
    assert_eq!(total, 4 * MIB, "{descriptors:?}");
    let hole = NBD_STATE_HOLE | NBD_STATE_ZERO;
    assert_eq!(descriptors.first().map(|d| d.flags), Some(hole));
    assert!(descriptors.iter().any(|d| d.flags == 0), "{descriptors:?}");
    c.request(NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_REQ_ONE, 4, MIB, 4096)?;
    let (_, payload) = c.chunk()?;
    assert_eq!(payload.len(), 4 + 8);
    assert_eq!(BlockDescriptor::decode(&payload[4..])?.flags, 0);
    c.request(NBD_CMD_DISC, 0, 5, 0, 0)?;
    assert!(is_closed(&mut c.s));
    Ok(())
}

#[test]
fn refused_requests_get_the_protocols_errors_and_change_nothing() -> TestResult {
    let f = fixture(MIB, true, ServerOptions::default())?;
    let mut c = f.session(false)?;
    // A refused write's payload is read and dropped: the next request is understood.
    c.write(1, 0, &[0xffu8; 4096], 0)?;
    assert_eq!(c.simple_reply()?.error, NBD_EPERM);
    c.request(NBD_CMD_TRIM, 0, 2, 0, 4096)?;
    assert_eq!(c.simple_reply()?.error, NBD_EPERM);
    c.request(NBD_CMD_READ, 0, 3, MIB - 512, 1024)?;
    assert_eq!(c.simple_reply()?.error, NBD_EINVAL);
    c.request(NBD_CMD_READ, 0, 4, 100, 512)?;
    assert_eq!(c.simple_reply()?.error, NBD_EINVAL);
    c.request(77, 0, 5, 0, 512)?;
    assert_eq!(c.simple_reply()?.error, NBD_EINVAL);
    c.request(NBD_CMD_BLOCK_STATUS, 0, 6, 0, 512)?;
    assert_eq!(c.simple_reply()?.error, NBD_EINVAL);
    c.request(NBD_CMD_READ, 0, 7, 0, 512)?;
    let reply = c.simple_reply()?;
    assert_eq!((reply.cookie, reply.error), (7, 0));
    let mut data = [1u8; 512];
    std::io::Read::read_exact(&mut c.s, &mut data)?;
    assert!(data.iter().all(|&b| b == 0));
    assert!(f.image_bytes()?.iter().all(|&b| b == 0));

    let w = fixture(MIB, false, ServerOptions::default())?;
    let mut c = w.session(true)?;
    c.write(8, MIB, &[1u8; 512], 0)?;
    assert_eq!(c.structured_reply()?, (8, NBD_ENOSPC, vec![]));
    c.request(NBD_CMD_READ, 0, 9, MIB, 512)?;
    assert_eq!(c.structured_reply()?, (9, NBD_EINVAL, vec![]));
    assert!(w.image_bytes()?.iter().all(|&b| b == 0));
    Ok(())
}

#[test]
fn a_broken_stream_closes_only_its_connection() -> TestResult {
    let f = fixture(MIB, false, ServerOptions::default())?;
    let mut oversized = f.session(false)?;
    oversized.request(NBD_CMD_WRITE, 0, 1, 0, (64 * MIB) as u32)?;
    assert!(is_closed(&mut oversized.s));
    let mut garbage = f.session(false)?;
    garbage.s.write_all(&[0xa5u8; 28])?;
    assert!(is_closed(&mut garbage.s));
    let mut good = f.session(false)?;
    good.write(2, 0, &[3u8; 512], 0)?;
    assert_eq!(good.simple_reply()?.error, 0);
    assert_eq!(f.image_bytes()?[..512], [3u8; 512]);
    Ok(())
}

#[test]
fn pipelined_requests_are_all_answered() -> TestResult {
    let f = fixture(4 * MIB, false, ServerOptions::default())?;
    let mut c = f.session(true)?;
    let count = 500u64;
    let mut writer = c.s.try_clone()?;
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        for i in 0..count {
            let header = RequestHeader {
                flags: 0,
                command: NBD_CMD_WRITE,
                cookie: i,
                offset_bytes: (i % 1024) * 4096,
                len_bytes: 4096,
            };
            writer.write_all(&header.encode())?;
            writer.write_all(&[(i % 256) as u8; 4096])?;
        }
        Ok(())
    });
    let mut seen = vec![false; count as usize];
    for _ in 0..count {
        let (cookie, error, _) = c.structured_reply()?;
        assert_eq!(error, 0);
        seen[cookie as usize] = true;
    }
    sender.join().map_err(|_| "sender panicked")??;
    assert!(seen.iter().all(|&s| s));
    Ok(())
}

/// A client that sends reads and never reads the replies holds only its own slots: the
/// server stops reading from it, and another client is served meanwhile.
#[test]
fn a_client_that_never_reads_stalls_only_itself() -> TestResult {
    let f = fixture(64 * MIB, false, ServerOptions::default())?;
    let mut hog = f.session(false)?;
    hog.s.set_write_timeout(Some(Duration::from_millis(500)))?;
    let mut sent = 0u64;
    while sent < 100_000 {
        if hog.request(NBD_CMD_READ, 0, sent, 0, MIB as u32).is_err() {
            break;
        }
        sent += 1;
    }
    assert!(
        sent < 100_000,
        "the server kept reading from a client that never reads"
    );
    let mut other = f.session(false)?;
    other.request(NBD_CMD_READ, 0, 1, 0, 512)?;
    assert_eq!(other.simple_reply()?.error, 0);
    Ok(())
}

#[test]
fn a_paused_volume_holds_requests_until_it_resumes() -> TestResult {
    let f = fixture(MIB, false, ServerOptions::default())?;
    let mut c = f.session(false)?;
    c.s.set_read_timeout(Some(Duration::from_millis(300)))?;
    let guard = f.volume.pause(Duration::from_secs(5)).ok_or("pause")?;
    c.write(1, 0, &[9u8; 512], 0)?;
    assert!(
        c.simple_reply().is_err(),
        "a reply while the volume is paused"
    );
    assert!(f.image_bytes()?[..512].iter().all(|&b| b == 0));
    drop(guard);
    c.s.set_read_timeout(Some(Duration::from_secs(10)))?;
    assert_eq!(c.simple_reply()?.error, 0);
    assert_eq!(f.image_bytes()?[..512], [9u8; 512]);
    Ok(())
}
