//! NBD, the network block device protocol: its wire format, shared by every side that
//! speaks it.
//!
//! [`protocol`] holds the constants and the messages, each with pure encode and decode
//! functions for both directions.

pub mod protocol;

#[cfg(test)]
mod tests;
