//! The system calls of the device's threads (see `ferry_engine::confine`): the thread that
//! serves a volume's socket, the vhost-user protocol thread of a connected frontend, and
//! the queue workers. Each later one starts under the filter of the one before it.

use ferry_engine::confine::{self, Allowlist};

/// The volume's serving thread accepts a frontend, opens each queue's own descriptor of
/// the image (`openat`; Landlock limits which paths), sets up each worker's io_uring and
/// eventfds, and starts the protocol thread and the workers (the vhost-user backend library
/// spawns them), which inherit this filter.
pub(crate) const VOLUME_SERVER_SYSCALLS: Allowlist = Allowlist {
    kind: "vhost-volume",
    groups: &[
        confine::RUNTIME,
        confine::SPAWN,
        confine::NET,
        confine::FILE_IO,
        confine::FILE_PATHS,
        confine::URING_SETUP,
    ],
    extra: &[],
};

/// The protocol thread receives messages and descriptors (`recvmsg` with `SCM_RIGHTS`),
/// maps guest memory and the dirty log (`mmap` on the descriptors it was given), answers
/// (`sendmsg`), and stops rings (draining the workers' io_urings, which may commit the
/// journal like a queue worker does). The inflight area, when the frontend asks for one, is
/// a memfd.
pub(crate) const PROTOCOL_SYSCALLS: Allowlist = Allowlist {
    kind: "vhost-protocol",
    groups: &[
        confine::RUNTIME,
        confine::NET_CLIENT,
        confine::FILE_IO,
        confine::FILE_PATHS,
        confine::URING_SETUP,
    ],
    extra: &[libc::SYS_memfd_create],
};

/// A queue worker reads rings in guest memory, submits to and reaps from its own io_uring,
/// signals the guest through eventfds, and, for a volume backed by an NBD export (or one
/// handed to an export by a migration), (re)connects and talks to it. When it commits the
/// journal itself (`committer=queue`) it also moves the journal onto its next medium when
/// one fills, opening and creating files there (Landlock keeps that to the configured
/// directories), with an io_uring of the journal's that it sets up on its first commit. It
/// accepts no connection and starts no thread.
pub(crate) const QUEUE_WORKER_SYSCALLS: Allowlist = Allowlist {
    kind: "vhost-queue",
    groups: &[
        confine::RUNTIME,
        confine::NET_CLIENT,
        confine::FILE_IO,
        confine::FILE_PATHS,
        confine::URING_SETUP,
    ],
    extra: &[],
};
