//! The receiving side of TLS on a non-blocking NBD socket: encrypted bytes read from the
//! socket in large pieces and handed to rustls from memory, plaintext out.
//!
//! rustls asks its reader for 4 KiB at a time; reading the socket in [`TLS_RECV_BYTES`]
//! pieces instead takes one `recv` for many records. Shared by the NBD server's connections
//! and `ferry bench --nbd`'s client connections.

use std::io::{self, Read};
use std::ops::DerefMut;

use rustls::ConnectionCommon;

/// Encrypted bytes read from the socket at once.
pub const TLS_RECV_BYTES: usize = 256 * 1024;

/// Encrypted bytes read from a socket and not yet given to rustls.
#[derive(Debug, Default)]
pub struct TlsIntake {
    /// Allocated at the first read over TLS (plain connections never need it).
    encrypted: Vec<u8>,
    /// The bytes from `start` to `end` of `encrypted` are rustls's still.
    start: usize,
    end: usize,
}

impl TlsIntake {
    /// Reads the plaintext available into `buf` without blocking: `WouldBlock` when none
    /// is (the socket is non-blocking), `Ok(0)` at the end of the stream.
    pub fn recv<C, D>(
        &mut self,
        tls: &mut C,
        socket: &mut impl Read,
        buf: &mut [u8],
    ) -> io::Result<usize>
    where
        C: DerefMut<Target = ConnectionCommon<D>>,
    {
        loop {
            match tls.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if self.start == self.end {
                if self.encrypted.is_empty() {
                    self.encrypted = vec![0; TLS_RECV_BYTES];
                }
                let n = socket.read(&mut self.encrypted)?;
                (self.start, self.end) = (0, n);
                if n == 0 {
                    return Ok(0);
                }
            }
            let mut pending = &self.encrypted[self.start..self.end];
            self.start += tls.read_tls(&mut pending)?;
            tls.process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        }
    }
}
