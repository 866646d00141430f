//! Tests of the NBD module, and the servers they (and the tests of the module's users) run:
//! an in-process fake server and `qemu-nbd`.

mod client;
pub(crate) mod fake_server;
mod handshake;
mod protocol_golden;
pub(crate) mod qemu_nbd;
mod server_messages_golden;
