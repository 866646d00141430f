//! The io_uring reactor: one ring per worker thread, never shared.
//!
//! [`ring::Ring`] owns the io_uring instance and the eventfd it signals; it pushes
//! prepared submission entries (submitting when the submission queue is full, and taking
//! completions off a full completion queue so that the kernel can go on) and hands back
//! completions as `(user_data, result)` pairs, never acting on them itself. It knows
//! nothing of requests, volumes or buffers: ownership of in-flight memory, and of the
//! descriptors the entries name, lies with the caller, who keys it by `user_data`.

pub mod ring;

pub use ring::Ring;
