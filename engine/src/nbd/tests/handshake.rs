//! The client's handshake against servers that misbehave, and how a server's text is shown.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::super::connection::Connection;
use super::super::handshake::{handshake, server_text};
use super::super::protocol::{
    Greeting, OptionReplyHeader, NBD_FLAG_FIXED_NEWSTYLE, NBD_OPT_GO, NBD_REP_INFO,
};

/// A server that keeps the handshake going with an option reply every 100 ms (an
/// information block the client does not use): the handshake still ends at its timeout.
#[test]
fn a_trickling_server_cannot_stretch_the_handshake() -> Result<(), Box<dyn std::error::Error>> {
    let (ours, mut server) = UnixStream::pair()?;
    std::thread::spawn(move || {
        let greeting = Greeting {
            handshake_flags: NBD_FLAG_FIXED_NEWSTYLE,
        };
        let mut reply = OptionReplyHeader {
            option: NBD_OPT_GO,
            reply_type: NBD_REP_INFO,
            len_bytes: 2,
        }
        .encode()
        .to_vec();
        reply.extend_from_slice(&99u16.to_be_bytes()); // an unknown info type
        if server.write_all(&greeting.encode()).is_err() {
            return;
        }
        while server.write_all(&reply).is_ok() {
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    // The server trickles for ever: only the handshake's own deadline ends it.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let conn = Connection::Unix(ours);
        let _ = done_tx.send(handshake(conn, "e", Duration::from_secs(1), None).is_err());
    });
    let failed = done_rx
        .recv_timeout(ferry_test_support::HANG_TIMEOUT)
        .map_err(|_| "the handshake outlasted its deadline")?;
    assert!(failed, "the handshake succeeded");
    Ok(())
}

#[test]
fn server_text_is_bounded_and_escaped() {
    assert_eq!(server_text(b"no such export"), "no such export");
    assert_eq!(server_text(b"a\nb\x1b[31m"), "a\\nb\\u{1b}[31m");
    let long = server_text(&[b'x'; 10_000]);
    assert_eq!(long.len(), 4096 + 3);
}
