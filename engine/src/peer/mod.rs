//! ferry daemons talking to each other: the control protocol's framing shared by every
//! client and the daemon ([`control_protocol`]), where a daemon is ([`address`]), the byte
//! streams with their TLS handshakes ([`transport`]), and a link that calls another
//! daemon's commands ([`link`]).

pub mod address;
pub mod control_protocol;
pub mod link;
pub mod transport;

pub use address::{ControlAddress, FerryUrl};
pub use link::{LinkOptions, PeerError, PeerLink};
