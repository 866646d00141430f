//! NBD, the network block device protocol: the wire format, one connection's byte stream,
//! the client's handshake and a blocking client.
//!
//! - [`protocol`]: every constant and message, with pure encode and decode functions for
//!   both directions, so that a client and a server share one encoder.
//! - [`sizes`]: an export's size constraints and the request sizes derived from them.
//! - [`address`]: where an export is, and the `nbd://` / `nbd+unix://` URIs that name it
//!   (`nbds://` / `nbds+unix://` with TLS).
//! - `connection`: the byte stream (TCP or a unix socket, plain or under TLS), timeouts and
//!   shutdown.
//! - `tls_stream`: the client's TLS: credentials and server name per export, the TLS
//!   handshake, and the blocking TLS stream a sender and a reader thread share.
//! - `handshake`: the client side of the fixed-newstyle handshake (`NBD_OPT_STARTTLS`,
//!   `NBD_OPT_GO`).
//! - [`client`]: a blocking client that many threads share over one connection.
//! - [`server`]: ferry's NBD server, exporting volumes (TLS, structured replies,
//!   `base:allocation`, several connections per export).
//!
//! The non-blocking per-queue client of an NBD-backed volume lives with the volume
//! (`volume/nbd_queue.rs`) and uses [`protocol`], `connection` and `handshake`.

pub mod address;
pub mod client;
pub(crate) mod connection;
pub(crate) mod handshake;
pub mod protocol;
pub mod server;
pub mod sizes;
pub mod tls_intake;
pub(crate) mod tls_stream;

pub use address::{ExportUri, NbdAddress, UriError, NBD_DEFAULT_PORT};
pub use client::{
    ClientError, ClientOptions, NbdClient, PipelinedWrite, WriteDone, REQUEST_TIMEOUT_DEFAULT,
};
pub use server::{ExportConfig, ListenAddress, NbdServer, ServerOptions};
pub use sizes::BlockSizes;

#[cfg(test)]
pub(crate) mod tests;
