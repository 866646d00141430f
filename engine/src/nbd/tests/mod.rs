//! Tests of the NBD module, and the servers they (and the tests of the module's users) run:
//! an in-process fake server and `qemu-nbd`; the client over TLS against `qemu-nbd` and
//! `qemu-storage-daemon`.

mod client;
pub(crate) mod fake_server;
mod handshake;
mod protocol_golden;
pub(crate) mod qemu_nbd;
mod server_messages_golden;
mod tls;
