//! Continuous replication of a group of volumes to a DR site: the wire format of the
//! replication stream ([`frame`], read from streams by [`stream`]), and the DR side that makes
//! each record durable in its log ([`dr_log`]) before acknowledging it, then applies records to
//! the replica images strictly in sequence order ([`replica`], [`checkpoint`], [`receiver`]),
//! so the replicas always equal the primary after some sequence number N.
//!
//! `docs/replication.md` describes the formats byte by byte and the procedure.

pub mod checkpoint;
pub mod dr_log;
pub mod frame;
pub mod primary;
pub mod primary_observer;
pub mod receiver;
pub mod replica;
pub mod stream;

pub use frame::{Ack, Frame, FrameError, Record, RecordOp};
pub use receiver::{PromotePoint, Receiver, ReceiverError, ReceiverStatus};
pub use replica::ReplicaSpec;

#[cfg(test)]
mod tests;
