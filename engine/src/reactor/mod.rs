//! The io_uring reactor: one ring per worker thread, never shared.
//!
//! [`ring::Ring`] owns the io_uring instance and the eventfd it signals; it pushes
//! prepared submission entries (draining by submitting when the submission queue is
//! full) and hands back completions as `(user_data, result)` pairs. It knows nothing
//! of requests, volumes or buffers: ownership of in-flight memory lies with the caller,
//! who keys it by `user_data`.

pub mod ring;

pub use ring::Ring;
