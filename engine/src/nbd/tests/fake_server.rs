//! An in-process NBD server for one client, built on the protocol module's server side:
//! it answers `NBD_OPT_GO` with what a test chooses, serves every request with success
//! (reads as zeros), and logs what the client sent.

use std::io::{Read, Write};
use std::path::Path;
use std::thread::JoinHandle;

use super::super::protocol::{
    Greeting, InfoBlockSize, InfoExport, OptionHeader, OptionReplyHeader, RequestHeader,
    SimpleReply, CLIENT_FLAGS_BYTES, NBD_CMD_DISC, NBD_CMD_READ, NBD_CMD_WRITE,
    NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_HAS_FLAGS, NBD_FLAG_NO_ZEROES, NBD_FLAG_SEND_FLUSH,
    NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES, NBD_OPT_GO, NBD_REP_ACK, NBD_REP_INFO,
    OPTION_HEADER_BYTES, REQUEST_HEADER_BYTES,
};

/// What the fake server saw: the data of the client's `NBD_OPT_GO` as sent, then every
/// request as (command, offset, length).
#[derive(Debug, Default)]
pub(crate) struct FakeLog {
    pub go_data: Vec<u8>,
    pub requests: Vec<(u16, u64, u32)>,
}

/// Serves one client on `socket`: answers `NBD_OPT_GO` with an `NBD_INFO_EXPORT` for
/// `size_bytes` (flush, trim and write-zeroes offered), then `infos` (the data of further
/// `NBD_REP_INFO` replies), then an ACK; then serves every request until the client
/// disconnects.
pub(crate) fn fake_server(
    socket: &Path,
    size_bytes: u64,
    infos: Vec<Vec<u8>>,
) -> std::io::Result<JoinHandle<std::io::Result<FakeLog>>> {
    let listener = std::os::unix::net::UnixListener::bind(socket)?;
    Ok(std::thread::spawn(move || {
        let (mut s, _) = listener.accept()?;
        let go_data = negotiate(&mut s, size_bytes, infos)?;
        let requests = serve_requests(&mut s)?;
        Ok(FakeLog { go_data, requests })
    }))
}

/// The handshake; returns the data of the client's `NBD_OPT_GO`.
fn negotiate(
    s: &mut std::os::unix::net::UnixStream,
    size_bytes: u64,
    infos: Vec<Vec<u8>>,
) -> std::io::Result<Vec<u8>> {
    let greeting = Greeting {
        handshake_flags: NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES,
    };
    s.write_all(&greeting.encode())?;
    let mut head = [0u8; CLIENT_FLAGS_BYTES + OPTION_HEADER_BYTES];
    s.read_exact(&mut head)?;
    let option =
        OptionHeader::decode(&head[CLIENT_FLAGS_BYTES..]).map_err(std::io::Error::other)?;
    if option.option != NBD_OPT_GO {
        return Err(std::io::Error::other(format!("option {}", option.option)));
    }
    let mut go_data = vec![0u8; option.len_bytes as usize];
    s.read_exact(&mut go_data)?;
    let export = InfoExport {
        size_bytes,
        transmission_flags: NBD_FLAG_HAS_FLAGS
            | NBD_FLAG_SEND_FLUSH
            | NBD_FLAG_SEND_TRIM
            | NBD_FLAG_SEND_WRITE_ZEROES,
    };
    let replies = std::iter::once((NBD_REP_INFO, export.encode().to_vec()))
        .chain(infos.into_iter().map(|info| (NBD_REP_INFO, info)))
        .chain(std::iter::once((NBD_REP_ACK, Vec::new())));
    for (reply_type, data) in replies {
        let header = OptionReplyHeader {
            option: NBD_OPT_GO,
            reply_type,
            len_bytes: data.len() as u32,
        };
        s.write_all(&header.encode())?;
        s.write_all(&data)?;
    }
    Ok(go_data)
}

/// Answers requests with success until the client disconnects; returns what came.
fn serve_requests(s: &mut std::os::unix::net::UnixStream) -> std::io::Result<Vec<(u16, u64, u32)>> {
    let mut requests = Vec::new();
    loop {
        let mut bytes = [0u8; REQUEST_HEADER_BYTES];
        if s.read_exact(&mut bytes).is_err() {
            return Ok(requests); // the client hung up
        }
        let request = RequestHeader::decode(&bytes).map_err(std::io::Error::other)?;
        requests.push((request.command, request.offset_bytes, request.len_bytes));
        if request.command == NBD_CMD_DISC {
            return Ok(requests);
        }
        if request.command == NBD_CMD_WRITE {
            std::io::copy(
                &mut (&mut *s).take(u64::from(request.len_bytes)),
                &mut std::io::sink(),
            )?;
        }
        let reply = SimpleReply {
            error: 0,
            cookie: request.cookie,
        };
        let mut out = reply.encode().to_vec();
        if request.command == NBD_CMD_READ {
            out.resize(out.len() + request.len_bytes as usize, 0);
        }
        s.write_all(&out)?;
    }
}

/// The data of an `NBD_REP_INFO` carrying `NBD_INFO_BLOCK_SIZE`.
pub(crate) fn block_size_info(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    InfoBlockSize {
        block_bytes_min: min,
        block_bytes_preferred: preferred,
        payload_bytes_max: max,
    }
    .encode()
    .to_vec()
}

/// What the server logged, once its client is gone.
pub(crate) fn served(
    server: JoinHandle<std::io::Result<FakeLog>>,
) -> Result<FakeLog, Box<dyn std::error::Error>> {
    Ok(server.join().map_err(|_| "the fake server panicked")??)
}
