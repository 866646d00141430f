//! The TLS leg of a queue's NBD path: queued requests go into the connection's TLS session
//! and its ciphertext to the socket; ciphertext from the socket goes through the session and
//! its plaintext to the same reply parser as on a plain connection. The polls, the reply
//! timeout and the failure handling are the plain path's (`mod.rs`): `POLLOUT` is armed
//! while ciphertext waits for room in the socket, progress is a byte moved on the socket,
//! and a TLS error or the server's `close_notify` ends the connection like a broken socket.

use std::time::Instant;

use nix::errno::Errno;
use nix::sys::socket::{recv, MsgFlags};

use super::link::{Decrypted, Link};
use super::{NbdPath, OP_POLL_OUT, RECV_ROUNDS_MAX};
use crate::reactor::Ring;
use crate::volume::queue::slot::Slot;

impl NbdPath {
    /// [`NbdPath::send`] on a TLS connection: the session's pending ciphertext first, then
    /// as much of the send queue as the session takes, until the socket is full.
    pub(super) fn send_tls(&mut self, ring: &mut Ring, slots: &mut [Slot]) {
        while !self.poll_out_armed {
            let Some(link) = self.conn.as_mut() else {
                return;
            };
            match link.flush_tls(|| self.last_progress = Instant::now()) {
                Ok(true) => {}
                Ok(false) => return self.arm_poll(ring, OP_POLL_OUT),
                Err(e) => return self.fail_connection(ring, &format!("sending: {e}")),
            }
            if self.send_queue.is_empty() {
                return;
            }
            self.gather_send_iovecs(slots);
            let Some(link) = self.conn.as_mut() else {
                return;
            };
            // SAFETY: the iovecs point to request headers owned by `self.cmds` and to write
            // payloads valid until their requests complete (`submit`'s contract); the call
            // is synchronous and copies what it takes into the session.
            let taken = match unsafe { link.write_plaintext(&self.send_iovecs) } {
                Ok(0) => return self.fail_connection(ring, "the TLS session takes no more data"),
                Ok(taken) => taken,
                Err(e) => return self.fail_connection(ring, &format!("sending: {e}")),
            };
            self.consume_sent(taken as u64, slots);
        }
    }

    /// [`NbdPath::receive`] on a TLS connection: reads what the socket holds, decrypts it,
    /// and handles every complete reply in the plaintext.
    pub(super) fn receive_tls(&mut self, slots: &mut [Slot]) -> Result<(), String> {
        // Out of `self` while the parser (which borrows all of `self`) runs on the
        // session's plaintext; back before anything else can look at it.
        let Some(mut link) = self.conn.take() else {
            return Ok(());
        };
        let mut rx = std::mem::take(&mut self.rx);
        let result = self.receive_tls_rounds(&mut link, &mut rx, slots);
        self.rx = rx;
        self.conn = Some(link);
        result
    }

    fn receive_tls_rounds(
        &mut self,
        link: &mut Link,
        rx: &mut [u8],
        slots: &mut [Slot],
    ) -> Result<(), String> {
        for _ in 0..RECV_ROUNDS_MAX {
            let n = match recv(link.fd(), rx, MsgFlags::MSG_DONTWAIT) {
                Ok(0) => return Err("the server closed the connection".to_string()),
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Ok(()),
                Err(e) => return Err(format!("receiving: {}", std::io::Error::from(e))),
            };
            self.last_progress = Instant::now();
            match link.decrypt(&rx[..n], |plaintext| self.parse(plaintext, slots))? {
                Decrypted::Taken => {}
                Decrypted::Closed => return Err("the server ended the TLS session".to_string()),
            }
        }
        Ok(())
    }
}
