//! `ferry bench --nbd`: one NBD connection of the load generator. The handshake (blocking:
//! `NBD_OPT_STARTTLS` first with `--tls-creds`, then `NBD_OPT_GO` asking for the block
//! sizes, simple replies), then the non-blocking byte stream the workload pipelines its
//! requests over, plain or TLS (rustls).
//!
//! The client is the same for every server measured (ferry, qemu-nbd,
//! qemu-storage-daemon): one connection per queue, structured replies not asked for, so
//! that only the servers differ.

use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use ferry_engine::nbd::protocol::*;
use ferry_engine::nbd::tls_intake::TlsIntake;
use ferry_engine::nbd::{ExportUri, NbdAddress};
use ferry_engine::tls::{server_name, TlsCredentials};
use rustls::{ClientConfig, ClientConnection};

/// Bound on each step of the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where to connect: the export, and whether TLS is used (`nbds://`, `nbds+unix://`).
#[derive(Debug, Clone)]
pub struct Target {
    pub uri: ExportUri,
    pub tls: bool,
}

impl Target {
    /// Parses `nbd://`, `nbd+unix://`, `nbds://` or `nbds+unix://`.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let uri = ExportUri::parse(text).map_err(|e| anyhow::anyhow!("--nbd {text}: {e}"))?;
        Ok(Self { tls: uri.tls, uri })
    }
}

enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Socket {
    fn fd(&self) -> RawFd {
        match self {
            Self::Tcp(s) => s.as_raw_fd(),
            Self::Unix(s) => s.as_raw_fd(),
        }
    }

    fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Tcp(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)
            }
            Self::Unix(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)
            }
        }
    }

    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_nonblocking(true),
            Self::Unix(s) => s.set_nonblocking(true),
        }
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Unix(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write_vectored(bufs),
            Self::Unix(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A connection in the transmission phase.
pub struct NbdStream {
    socket: Socket,
    tls: Option<Box<ClientConnection>>,
    tls_in: TlsIntake,
    pub size_bytes: u64,
    pub block_bytes_min: u32,
}

/// Connects and negotiates `target`'s export.
pub fn connect(target: &Target, tls_creds: Option<&Path>) -> anyhow::Result<NbdStream> {
    let socket = match &target.uri.address {
        NbdAddress::Tcp { host, port } => {
            let s = TcpStream::connect((host.as_str(), *port))
                .with_context(|| format!("connect to {}", target.uri))?;
            s.set_nodelay(true)?;
            Socket::Tcp(s)
        }
        NbdAddress::Unix { socket } => Socket::Unix(
            UnixStream::connect(socket).with_context(|| format!("connect to {}", target.uri))?,
        ),
    };
    socket.set_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let mut stream = NbdStream {
        socket,
        tls: None,
        tls_in: TlsIntake::default(),
        size_bytes: 0,
        block_bytes_min: 1,
    };
    stream.handshake(target, tls_creds)?;
    stream.socket.set_timeout(None)?;
    stream.socket.set_nonblocking()?;
    Ok(stream)
}

impl NbdStream {
    fn handshake(&mut self, target: &Target, tls_creds: Option<&Path>) -> anyhow::Result<()> {
        let mut greeting = [0u8; GREETING_BYTES];
        self.read_exact(&mut greeting)?;
        let flags = Greeting::decode(&greeting)?.handshake_flags;
        ensure!(
            flags & NBD_FLAG_FIXED_NEWSTYLE != 0,
            "not a fixed-newstyle NBD server"
        );
        let mut client = NBD_FLAG_C_FIXED_NEWSTYLE;
        if flags & NBD_FLAG_NO_ZEROES != 0 {
            client |= NBD_FLAG_C_NO_ZEROES;
        }
        self.write_all(&ClientFlags { flags: client }.encode())?;
        if target.tls {
            let dir = tls_creds.context("an nbds:// target needs --tls-creds DIR")?;
            let config = TlsCredentials::load(dir)?.client_config()?;
            let host = match &target.uri.address {
                NbdAddress::Tcp { host, .. } => host.clone(),
                NbdAddress::Unix { .. } => "localhost".to_string(),
            };
            self.start_tls(config, &host)?;
        }
        let go = ExportRequest {
            export_name: target.uri.export.clone(),
            info_types: vec![NBD_INFO_BLOCK_SIZE],
        }
        .encode()?;
        self.write_all(
            &OptionHeader {
                option: NBD_OPT_GO,
                len_bytes: go.len() as u32,
            }
            .encode(),
        )?;
        self.write_all(&go)?;
        loop {
            let (reply_type, data) = self.option_reply()?;
            match reply_type {
                NBD_REP_ACK => break,
                NBD_REP_INFO => match Info::decode(&data)? {
                    Info::Export(e) => self.size_bytes = e.size_bytes,
                    Info::BlockSize(b) => self.block_bytes_min = b.block_bytes_min,
                    Info::Other { .. } => {}
                },
                other => bail!(
                    "NBD_OPT_GO refused ({other:#x}): {}",
                    String::from_utf8_lossy(&data)
                ),
            }
        }
        ensure!(self.size_bytes > 0, "the server sent no export size");
        Ok(())
    }

    fn start_tls(&mut self, config: Arc<ClientConfig>, host: &str) -> anyhow::Result<()> {
        self.write_all(
            &OptionHeader {
                option: NBD_OPT_STARTTLS,
                len_bytes: 0,
            }
            .encode(),
        )?;
        let (reply_type, data) = self.option_reply()?;
        ensure!(
            reply_type == NBD_REP_ACK,
            "NBD_OPT_STARTTLS refused: {}",
            String::from_utf8_lossy(&data)
        );
        let mut tls = ClientConnection::new(config, server_name(host)?)?;
        while tls.is_handshaking() {
            tls.complete_io(&mut self.socket).context("TLS handshake")?;
        }
        self.tls = Some(Box::new(tls));
        Ok(())
    }

    fn option_reply(&mut self) -> anyhow::Result<(u32, Vec<u8>)> {
        let mut head = [0u8; OPTION_REPLY_HEADER_BYTES];
        self.read_exact(&mut head)?;
        let head = OptionReplyHeader::decode(&head)?;
        ensure!(
            head.len_bytes <= OPTION_REPLY_BYTES_MAX,
            "option reply too long"
        );
        let mut data = vec![0u8; head.len_bytes as usize];
        self.read_exact(&mut data)?;
        Ok((head.reply_type, data))
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        match &mut self.tls {
            None => self.socket.read_exact(buf),
            Some(tls) => rustls::Stream::new(tls.as_mut(), &mut self.socket).read_exact(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match &mut self.tls {
            None => self.socket.write_all(buf),
            Some(tls) => rustls::Stream::new(tls.as_mut(), &mut self.socket).write_all(buf),
        }
    }

    pub fn fd(&self) -> RawFd {
        self.socket.fd()
    }

    /// Reads what is available without blocking (`WouldBlock` when nothing is).
    pub fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = &mut self.tls else {
            return self.socket.read(buf);
        };
        self.tls_in.recv(tls.as_mut(), &mut self.socket, buf)
    }

    /// Sends what the socket (or rustls) takes now; `WouldBlock` when nothing.
    pub fn send(&mut self, parts: &[IoSlice<'_>]) -> io::Result<usize> {
        let Some(tls) = &mut self.tls else {
            return self.socket.write_vectored(parts);
        };
        let taken = tls.writer().write_vectored(parts)?;
        self.flush()?;
        if taken == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(taken)
    }

    /// Writes what rustls holds for the socket, until it is empty or the socket is full.
    pub fn flush(&mut self) -> io::Result<()> {
        if let Some(tls) = &mut self.tls {
            while tls.wants_write() {
                match tls.write_tls(&mut self.socket) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    pub fn has_pending_output(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.wants_write())
    }
}
