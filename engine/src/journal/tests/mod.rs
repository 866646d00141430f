//! Tests of the journal: format golden bytes, decoder robustness, the writer driven through
//! real volumes and queues, restore/verify/demux/export, and crash recovery.

mod crash;
mod devices;
mod direct;
mod failures;
mod format_golden;
mod guest_races;
mod long_trailer;
mod mapped;
mod memory_bound;
mod queue_commits;
mod robustness;
mod spares;
mod stops;
mod streaming;
mod support;
mod trail;
mod writer_restore;
