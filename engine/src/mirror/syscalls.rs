//! The system calls each thread of a migration job may make: the seccomp allow-lists its
//! threads install when they start (see [`crate::confine`]).

use crate::confine::{self, Allowlist};

/// What every thread of a job needs: the source and a target that is a file (opened,
/// Landlock limiting which) or an NBD export (connected), and its own ring for file I/O.
const TARGET_ACCESS: &[&[libc::c_long]] = &[
    confine::RUNTIME,
    confine::FILE_IO,
    confine::FILE_PATHS,
    confine::NET_CLIENT,
    confine::URING_SETUP,
];

/// A mirror worker sends the guest's writes to the target: a file it opens (Landlock
/// limits which) or an NBD export it (re)connects to.
pub(crate) const MIRROR_SYSCALLS: Allowlist = Allowlist {
    kind: "mirror-worker",
    groups: TARGET_ACCESS,
    extra: &[],
};

/// A copier reads the source and writes the target, like a mirror worker.
pub(crate) const COPIER_SYSCALLS: Allowlist = Allowlist {
    kind: "mirror-copier",
    groups: TARGET_ACCESS,
    extra: &[],
};

/// The supervisor ends the job: the cut-over flushes both sides, may hand the volume to a
/// new backing (opening it) and tells the target's daemon over the control protocol.
pub(crate) const SUPERVISOR_SYSCALLS: Allowlist = Allowlist {
    kind: "mirror-supervisor",
    groups: TARGET_ACCESS,
    extra: &[],
};

/// The job file's writer rewrites the file beside the image (create, fsync, rename, fsync
/// of the directory) after flushing the target, which may be a file or an NBD export.
pub(crate) const JOB_FILE_SYSCALLS: Allowlist = Allowlist {
    kind: "mirror-job-file",
    groups: TARGET_ACCESS,
    extra: &[],
};
