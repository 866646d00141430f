//! Hostile NBD clients against `ferry serve`, written by hand on raw sockets: malformed
//! and oversized requests and options, requests past the end, writes to a read-only
//! export, clients that send and never read, handshakes that stop halfway, and 2000
//! connections at once. Each gets the protocol's error or a closed connection; a client
//! connected before them is served throughout, the daemon's memory stays bounded, and
//! nothing changes in the volumes but what the well-behaved client wrote.

use anyhow::{ensure, Context as _, Result};
use ferry_engine::nbd::protocol::*;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::rig::{run, write_at, Ferry, MIB};
use crate::support;
use support::wait::{wait_until, HANG_TIMEOUT};

/// A hand-written client over TCP.
pub struct Raw {
    s: TcpStream,
}

impl Raw {
    /// Connects and reads the greeting; `None` when the server closed the connection first.
    fn connect(port: u16) -> Result<Option<Self>> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(HANG_TIMEOUT))?;
        s.set_write_timeout(Some(HANG_TIMEOUT))?;
        let mut raw = Self { s };
        let mut greeting = [0u8; GREETING_BYTES];
        match raw.s.read_exact(&mut greeting) {
            Ok(()) => {
                Greeting::decode(&greeting)?;
                Ok(Some(raw))
            }
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => Ok(None),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Past the greeting and `NBD_OPT_GO` on `export`: in the transmission phase.
    pub fn session(port: u16, export: &str) -> Result<Self> {
        let mut raw = Self::connect(port)?.context("refused")?;
        let flags = ClientFlags {
            flags: NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES,
        };
        raw.s.write_all(&flags.encode())?;
        let go = ExportRequest {
            export_name: export.into(),
            info_types: vec![NBD_INFO_BLOCK_SIZE],
        }
        .encode()?;
        let header = OptionHeader {
            option: NBD_OPT_GO,
            len_bytes: go.len() as u32,
        };
        raw.s.write_all(&header.encode())?;
        raw.s.write_all(&go)?;
        loop {
            let mut head = [0u8; OPTION_REPLY_HEADER_BYTES];
            raw.s.read_exact(&mut head)?;
            let head = OptionReplyHeader::decode(&head)?;
            let mut data = vec![0u8; head.len_bytes as usize];
            raw.s.read_exact(&mut data)?;
            ensure!(!head.is_error(), "NBD_OPT_GO refused: {head:?}");
            if head.reply_type == NBD_REP_ACK {
                return Ok(raw);
            }
        }
    }

    fn request(&mut self, command: u16, cookie: u64, offset: u64, len: u32) -> std::io::Result<()> {
        let header = RequestHeader {
            flags: 0,
            command,
            cookie,
            offset_bytes: offset,
            len_bytes: len,
        };
        self.s.write_all(&header.encode())
    }

    /// A simple reply's error, and the data of a successful read of `read_len` bytes.
    fn reply(&mut self, read_len: usize) -> Result<(u64, u32, Vec<u8>)> {
        let mut b = [0u8; SIMPLE_REPLY_BYTES];
        self.s.read_exact(&mut b)?;
        let reply = SimpleReply::decode(&b)?;
        let mut data = vec![0u8; if reply.error == 0 { read_len } else { 0 }];
        self.s.read_exact(&mut data)?;
        Ok((reply.cookie, reply.error, data))
    }

    /// Writes then reads back `data` at `offset`: the server serves this client.
    pub fn round_trip(&mut self, cookie: u64, offset: u64, data: &[u8]) -> Result<()> {
        self.request(NBD_CMD_WRITE, cookie, offset, data.len() as u32)?;
        self.s.write_all(data)?;
        ensure!(self.reply(0)? == (cookie, 0, vec![]), "write refused");
        self.request(NBD_CMD_READ, cookie + 1, offset, data.len() as u32)?;
        let (c, error, back) = self.reply(data.len())?;
        ensure!(
            c == cookie + 1 && error == 0 && back == data,
            "read back differs"
        );
        Ok(())
    }

    /// True once the server closed this connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(n) => n == 0,
            Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        }
    }
}

/// Requests that break the protocol close their connection; requests that only ask for
/// what may not be done get the protocol's error, and the connection goes on.
fn malformed_requests(port: u16) -> Result<()> {
    let mut bad_magic = Raw::session(port, "rw")?;
    bad_magic.s.write_all(&[0x5au8; REQUEST_HEADER_BYTES])?;
    ensure!(bad_magic.closed(), "a request with a bad magic was taken");
    let mut oversized = Raw::session(port, "rw")?;
    oversized.request(NBD_CMD_WRITE, 1, 0, (64 * MIB) as u32)?;
    ensure!(oversized.closed(), "a 64 MiB write payload was taken");
    let mut c = Raw::session(port, "rw")?;
    c.request(NBD_CMD_WRITE, 2, 16 * MIB - 512, 4096)?;
    c.s.write_all(&[0xeeu8; 4096])?;
    ensure!(c.reply(0)?.1 == NBD_ENOSPC, "a write past the end");
    c.request(NBD_CMD_READ, 3, u64::MAX - 511, 512)?;
    ensure!(c.reply(512)?.1 == NBD_EINVAL, "a read past the end");
    c.request(NBD_CMD_TRIM, 4, 7, 512)?;
    ensure!(c.reply(0)?.1 == NBD_EINVAL, "a misaligned trim");
    c.request(200, 5, 0, 512)?;
    ensure!(c.reply(0)?.1 == NBD_EINVAL, "an unknown command");
    let mut ro = Raw::session(port, "ro")?;
    ro.request(NBD_CMD_WRITE, 6, 0, 4096)?;
    ro.s.write_all(&[0xeeu8; 4096])?;
    ensure!(ro.reply(0)?.1 == NBD_EPERM, "a write to a read-only export");
    ro.request(NBD_CMD_WRITE_ZEROES, 7, 0, 4096)?;
    ensure!(
        ro.reply(0)?.1 == NBD_EPERM,
        "write-zeroes on a read-only export"
    );
    ro.request(NBD_CMD_READ, 8, 0, 512)?;
    ensure!(
        ro.reply(512)?.1 == 0,
        "the read-only client is served after its refusals"
    );
    Ok(())
}

/// Options that break the handshake end it.
fn malformed_options(port: u16) -> Result<()> {
    let mut huge = Raw::connect(port)?.context("refused")?;
    huge.s.write_all(&ClientFlags { flags: 1 }.encode())?;
    let header = OptionHeader {
        option: NBD_OPT_GO,
        len_bytes: u32::MAX,
    };
    huge.s.write_all(&header.encode())?;
    ensure!(huge.closed(), "a 4 GiB option was taken");
    let mut garbage = Raw::connect(port)?.context("refused")?;
    garbage.s.write_all(&[0xffu8; 64])?;
    ensure!(garbage.closed(), "unknown client flags were taken");
    Ok(())
}

/// Clients that stop after the greeting, or halfway through an option.
fn half_handshakes(port: u16, count: usize) -> Result<Vec<Raw>> {
    let mut held = Vec::new();
    for i in 0..count {
        let mut c = Raw::connect(port)?.context("refused")?;
        if i % 2 == 0 {
            c.s.write_all(&ClientFlags { flags: 1 }.encode())?;
            c.s.write_all(
                &OptionHeader {
                    option: NBD_OPT_GO,
                    len_bytes: 64,
                }
                .encode()[..10],
            )?;
        }
        held.push(c);
    }
    Ok(held)
}

/// Clients that send 1 MiB reads until the server stops taking them, and never read.
fn never_readers(port: u16, count: usize) -> Result<Vec<Raw>> {
    let mut held = Vec::new();
    for _ in 0..count {
        let mut c = Raw::session(port, "rw")?;
        c.s.set_write_timeout(Some(Duration::from_millis(300)))?;
        let mut cookie = 0;
        while c.request(NBD_CMD_READ, cookie, 0, MIB as u32).is_ok() {
            cookie += 1;
            ensure!(
                cookie < 10_000_000,
                "the server reads from a client that never reads"
            );
        }
        held.push(c);
    }
    Ok(held)
}

/// Connections opened at once by the flood.
const FLOOD_CONNECTIONS: u64 = 2000;

/// Opens `count` connections at once; returns them and how many were served a greeting.
fn flood(port: u16, count: usize) -> Result<(Vec<TcpStream>, usize)> {
    let mut streams = Vec::with_capacity(count);
    for _ in 0..count {
        streams.push(TcpStream::connect(("127.0.0.1", port))?);
    }
    let mut greeted = 0;
    for s in &mut streams {
        s.set_read_timeout(Some(HANG_TIMEOUT))?;
        let mut greeting = [0u8; GREETING_BYTES];
        if s.read_exact(&mut greeting).is_ok() {
            greeted += 1;
        }
    }
    Ok((streams, greeted))
}

#[test]
fn hostile_clients_change_nothing_and_leave_others_served() -> Result<()> {
    let files = support::limits::raise_open_files_limit()?;
    let enough = format!("{} open files (ulimit -n)", FLOOD_CONNECTIONS + 256);
    if !support::require(&enough, files >= FLOOD_CONNECTIONS + 256) {
        return Ok(());
    }
    let dir = support::scratch_dir()?;
    let ro_image = dir.path().join("ro.img");
    support::create_image(&ro_image, 16 * MIB)?;
    write_at(&ro_image, MIB, &support::pattern(9, MIB as usize))?;
    let rw_image = dir.path().join("rw.img");
    support::create_image(&rw_image, 16 * MIB)?;
    let spec = |name: &str, mode: &str| {
        format!(
            "name={name},path={},socket={},nbd={mode}",
            dir.path().join(format!("{name}.img")).display(),
            dir.path().join(format!("{name}.sock")).display()
        )
    };
    let ferry = Ferry::start(dir.path(), &[spec("ro", "ro"), spec("rw", "rw")], &[])?;
    let ro_before = std::fs::read(&ro_image)?;
    let rss_before = ferry.rss_kib()?;
    let mut good = Raw::session(ferry.port, "rw")?;
    let mut written = vec![0u8; (16 * MIB) as usize];
    let mut good_write = |round: u64, good: &mut Raw| -> Result<()> {
        let data = support::pattern(100 + round, 65536);
        let offset = round * 65536;
        good.round_trip(round * 2, offset, &data)?;
        written[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        Ok(())
    };
    malformed_requests(ferry.port)?;
    good_write(0, &mut good)?;
    malformed_options(ferry.port)?;
    good_write(1, &mut good)?;
    let half = half_handshakes(ferry.port, 20)?;
    let stuck = never_readers(ferry.port, 4)?;
    good_write(2, &mut good)?;
    let (flooded, greeted) = flood(ferry.port, 2000)?;
    ensure!(
        greeted < 128,
        "{greeted} of 2000 connections at once were served"
    );
    good_write(3, &mut good)?;
    let rss_during = ferry.rss_kib()?;
    ensure!(
        rss_during < rss_before + 256 * 1024,
        "the daemon grew from {rss_before} KiB to {rss_during} KiB under hostile clients"
    );
    drop((flooded, half, stuck));
    good_write(4, &mut good)?;
    // Once the hostile connections are gone, new clients get in again.
    wait_until("a new client served", HANG_TIMEOUT, || {
        Ok(run("nbdinfo", &[&ferry.uri("rw", false)])?.success)
    })?;
    drop(good);
    ensure!(
        std::fs::read(&ro_image)? == ro_before,
        "the read-only volume changed"
    );
    ensure!(
        std::fs::read(&rw_image)? == written,
        "the writable volume holds more than the good client wrote"
    );
    ensure!(ferry.volume_info("rw")?["nbd"]["fenced"] == false);
    Ok(())
}
