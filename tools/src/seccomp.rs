//! The system calls of the daemon's own threads (see `ferry_engine::confine`; the engine's
//! and the device's threads declare theirs beside the code that starts them).

use ferry_engine::confine::{self, Allowlist};

/// The main thread, once everything is bound and started, waits for a signal, then shuts
/// down: pauses and flushes the volumes, stops the NBD server (waking its accept loop),
/// removes the sockets and closes the journal. The final flush of a volume on an NBD
/// export (served from one, or cut over to one by a migration) opens a side connection,
/// whose reader is a thread of its own (it installs the NBD reader's filter): hence `SPAWN`.
pub const MAIN_SYSCALLS: Allowlist = Allowlist {
    kind: "main",
    groups: &[
        confine::RUNTIME,
        confine::SPAWN,
        confine::FILE_IO,
        confine::FILE_PATHS,
        confine::NET,
        confine::URING_USE,
    ],
    extra: &[libc::SYS_rt_sigtimedwait],
};

/// The control threads carry out every control command: adding volumes (creating and
/// opening images, binding their sockets, starting their threads), migrations and moves to
/// other daemons (connecting to them, setting up rings), journal and replication commands.
/// Every thread they start inherits this filter, so it is the widest: what it leaves out is
/// what no ferry thread may do (start programs, trace, mount, load kernel code).
pub const CONTROL_SYSCALLS: Allowlist = Allowlist {
    kind: "control",
    groups: &[
        confine::RUNTIME,
        confine::SPAWN,
        confine::FILE_IO,
        confine::FILE_PATHS,
        confine::NET,
        confine::URING_SETUP,
    ],
    extra: &[
        libc::SYS_memfd_create,
        libc::SYS_sched_setscheduler,
        libc::SYS_ioprio_set,
    ],
};

/// The metrics listener accepts scrapes and answers each on a thread of its own.
pub const METRICS_SYSCALLS: Allowlist = Allowlist {
    kind: "metrics",
    groups: &[confine::RUNTIME, confine::SPAWN, confine::NET],
    extra: &[],
};

/// The lease keeper abandons incoming volumes whose source went quiet: it stops their
/// devices and deletes their images.
pub const LEASES_SYSCALLS: Allowlist = Allowlist {
    kind: "leases",
    groups: &[
        confine::RUNTIME,
        confine::FILE_IO,
        confine::FILE_PATHS,
        confine::NET,
    ],
    extra: &[],
};
