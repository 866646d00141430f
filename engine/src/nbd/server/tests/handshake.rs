//! Option haggling: what each option answers, what ends a session, and the bounds on
//! option data, the number of connections and the handshake's time.

use std::io::{Read, Write};
use std::time::Duration;

use ferry_test_support::HANG_TIMEOUT;

use super::raw_client::{RawClient, TestResult};
use super::{fixture, is_closed, MIB};
use crate::nbd::protocol::*;
use crate::nbd::server::{ServerOptions, OPTION_DATA_BYTES_MAX};

#[test]
fn lists_describes_and_refuses_unknown_exports_and_options() -> TestResult {
    let f = fixture(MIB, true, ServerOptions::default())?;
    let mut c = f.client()?;
    let list = c.option(NBD_OPT_LIST, &[])?;
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].0, NBD_REP_SERVER);
    let entry = ExportListEntry::decode(&list[0].1)?;
    assert_eq!(
        (entry.name.as_str(), entry.description.as_str()),
        ("v", "a test volume")
    );
    assert_eq!(c.option_result(NBD_OPT_LIST, &[1])?, NBD_REP_ERR_INVALID);
    let info = ExportRequest {
        export_name: "v".into(),
        info_types: vec![NBD_INFO_NAME, NBD_INFO_DESCRIPTION, NBD_INFO_BLOCK_SIZE],
    };
    let replies = c.option(NBD_OPT_INFO, &info.encode()?)?;
    let mut saw = Vec::new();
    for (reply_type, data) in &replies[..replies.len() - 1] {
        assert_eq!(*reply_type, NBD_REP_INFO);
        match Info::decode(data)? {
            Info::Export(e) => {
                assert_eq!(e.size_bytes, MIB);
                let flags = e.transmission_flags;
                assert!(flags & NBD_FLAG_READ_ONLY != 0 && flags & NBD_FLAG_SEND_TRIM == 0);
                assert!(flags & NBD_FLAG_CAN_MULTI_CONN != 0);
                saw.push("export");
            }
            Info::BlockSize(b) => {
                assert_eq!((b.block_bytes_min, b.block_bytes_preferred), (512, 4096));
                assert_eq!(b.payload_bytes_max, 32 << 20);
                saw.push("block size");
            }
            Info::Other { .. } => saw.push(if InfoText::decode(data)?.text == "v" {
                "name"
            } else {
                "description"
            }),
        }
    }
    assert_eq!(saw, ["export", "block size", "name", "description"]);
    let missing = ExportRequest {
        export_name: "nope".into(),
        info_types: vec![],
    };
    assert_eq!(
        c.option_result(NBD_OPT_GO, &missing.encode()?)?,
        NBD_REP_ERR_UNKNOWN
    );
    assert_eq!(c.option_result(NBD_OPT_GO, &[0, 0])?, NBD_REP_ERR_INVALID);
    assert_eq!(c.option_result(99, &[1, 2, 3])?, NBD_REP_ERR_UNSUP);
    assert_eq!(c.option_result(NBD_OPT_STARTTLS, &[])?, NBD_REP_ERR_POLICY);
    let meta = MetaContextRequest {
        export_name: "v".into(),
        queries: vec![],
    };
    // Metadata contexts need structured replies first.
    assert_eq!(
        c.option_result(NBD_OPT_LIST_META_CONTEXT, &meta.encode()?)?,
        NBD_REP_ERR_INVALID
    );
    assert_eq!(c.option_result(NBD_OPT_STRUCTURED_REPLY, &[])?, NBD_REP_ACK);
    let listed = c.option(NBD_OPT_LIST_META_CONTEXT, &meta.encode()?)?;
    assert_eq!(
        MetaContextReply::decode(&listed[0].1)?.name,
        "base:allocation"
    );
    assert_eq!(c.option_result(NBD_OPT_ABORT, &[])?, NBD_REP_ACK);
    assert!(is_closed(&mut c.s));
    Ok(())
}

/// The empty name selects the only export; `NBD_OPT_EXPORT_NAME` enters transmission
/// without an option reply (no zeroes: the client asked for none).
#[test]
fn export_name_and_the_default_export() -> TestResult {
    let f = fixture(MIB, false, ServerOptions::default())?;
    let mut c = f.client()?;
    c.send_option(NBD_OPT_EXPORT_NAME, b"")?;
    let mut reply = [0u8; EXPORT_NAME_REPLY_BYTES];
    c.s.read_exact(&mut reply)?;
    let reply = ExportNameReply::decode(&reply)?;
    assert_eq!(reply.size_bytes, MIB);
    c.request(NBD_CMD_FLUSH, 0, 7, 0, 0)?;
    assert_eq!((c.simple_reply()?.cookie, 0), (7, 0));
    let mut unknown = f.client()?;
    unknown.send_option(NBD_OPT_EXPORT_NAME, b"nope")?;
    assert!(is_closed(&mut unknown.s));
    Ok(())
}

#[test]
fn oversized_option_data_ends_the_session() -> TestResult {
    let f = fixture(MIB, false, ServerOptions::default())?;
    let mut c = f.client()?;
    let header = OptionHeader {
        option: NBD_OPT_GO,
        len_bytes: OPTION_DATA_BYTES_MAX + 1,
    };
    c.s.write_all(&header.encode())?;
    assert!(is_closed(&mut c.s));
    let mut bad = f.client()?;
    bad.s.write_all(&[0u8; OPTION_HEADER_BYTES])?;
    assert!(is_closed(&mut bad.s));
    Ok(())
}

/// A client that stops halfway through the handshake is dropped when the handshake's
/// time is up; it holds a place among the connections only that long.
#[test]
fn a_stalled_handshake_is_dropped_after_the_timeout() -> TestResult {
    let options = ServerOptions {
        handshake_timeout: Duration::from_millis(300),
        ..ServerOptions::default()
    };
    let f = fixture(MIB, false, options)?;
    let mut c = f.client()?;
    c.s.write_all(
        &OptionHeader {
            option: NBD_OPT_GO,
            len_bytes: 100,
        }
        .encode(),
    )?;
    c.s.write_all(&[0u8; 10])?;
    // The client's read timeout (a hang) is far beyond the handshake's.
    assert!(is_closed(&mut c.s));
    let mut silent = f.stream()?;
    let mut greeting = [0u8; GREETING_BYTES];
    silent.read_exact(&mut greeting)?;
    assert!(is_closed(&mut silent));
    Ok(())
}

#[test]
fn connections_beyond_the_limit_are_closed_at_once() -> TestResult {
    let options = ServerOptions {
        connections_max: 3,
        ..ServerOptions::default()
    };
    let f = fixture(MIB, false, options)?;
    let held: Vec<_> = (0..3).map(|_| f.client()).collect::<Result<_, _>>()?;
    let mut refused = f.stream()?;
    assert!(is_closed(&mut refused));
    drop(held);
    ferry_test_support::wait_until("the held connections end", HANG_TIMEOUT, || {
        Ok(f.server.connections() == 0)
    })?;
    let mut c = f.session(false)?;
    c.request(NBD_CMD_FLUSH, 0, 1, 0, 0)?;
    assert_eq!(c.simple_reply()?.error, 0);
    assert!(RawClient::greet(f.stream()?).is_ok());
    Ok(())
}
