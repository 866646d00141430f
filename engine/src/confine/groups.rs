//! The system calls ferry's threads make, gathered by what they are for. A thread's
//! allow-list (an [`Allowlist`](super::Allowlist) declared beside the code that starts the
//! thread) is a union of these groups and a few calls of its own.
//!
//! Nothing here may start a program (`execve`), trace or change another process
//! (`ptrace`, `process_vm_writev`, `kill` of another pid), load code into the kernel
//! (`bpf`, `init_module`), change mounts or namespaces, or change the process's identity:
//! those calls are on no list.

use libc::c_long;

/// What every Rust thread needs once it runs: memory, locks, time, its own signals,
/// logging to stderr, reading and writing descriptors it already holds, and exiting
/// (including `abort` after a panic, which is `tgkill` of itself).
pub const RUNTIME: &[c_long] = &[
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_lseek,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_getcpu,
    libc::SYS_membarrier,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_gettimeofday,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_tgkill,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_epoll_ctl,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_eventfd2,
];

/// Starting threads (`std::thread::spawn`: glibc's `pthread_create` maps the stack and
/// guard page, then `clone3`, falling back to `clone`). A thread started by a confined
/// thread inherits its filter, so only threads that start others have this group; and since
/// those threads then install their own filter on top, it allows `seccomp` too (a filter
/// can only take calls away).
pub const SPAWN: &[c_long] = &[
    libc::SYS_seccomp,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_getrlimit,
    libc::SYS_prlimit64,
];

/// Reading and writing at offsets and flushing descriptors already open: the buffered
/// engines, the journal's media, the mirror's copies into files.
pub const FILE_IO: &[c_long] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_sync_file_range,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_fadvise64,
    libc::SYS_fstatfs,
    libc::SYS_copy_file_range,
];

/// Opening, creating, renaming and removing files and directories: images created by
/// control commands, journal media and their spares, sockets removed at shutdown. Landlock
/// (see [`super::landlock`]) limits which paths these reach.
pub const FILE_PATHS: &[c_long] = &[
    libc::SYS_openat,
    libc::SYS_open,
    libc::SYS_mkdirat,
    libc::SYS_mkdir,
    libc::SYS_unlinkat,
    libc::SYS_unlink,
    libc::SYS_rmdir,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_rename,
    libc::SYS_linkat,
    libc::SYS_getdents64,
    libc::SYS_readlinkat,
    libc::SYS_readlink,
    libc::SYS_statfs,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_flock,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_chmod,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_chown,
    libc::SYS_lchown,
    libc::SYS_utimensat,
    libc::SYS_getcwd,
    libc::SYS_memfd_create,
    // BLKGETSIZE64 and BLKSSZGET on block-device images, FIONBIO on sockets.
    libc::SYS_ioctl,
];

/// Sockets: listening, accepting, connecting (NBD targets, peers, the control protocol
/// over TCP) and passing descriptors (vhost-user carries guest memory and eventfds in
/// `SCM_RIGHTS`).
pub const NET: &[c_long] = &[
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_shutdown,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendmmsg,
    libc::SYS_recvmmsg,
    libc::SYS_ioctl,
    libc::SYS_epoll_create1,
    libc::SYS_pipe2,
];

/// Connecting out and talking over sockets, without listening: a queue whose volume is an
/// NBD export (re)connects from its own thread.
pub const NET_CLIENT: &[c_long] = &[
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_shutdown,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_ioctl,
];

/// Using an io_uring already set up: submitting and reaping.
pub const URING_USE: &[c_long] = &[libc::SYS_io_uring_enter];

/// Setting an io_uring up (a volume's queues, the journal's ring) and registering its
/// files and buffers.
pub const URING_SETUP: &[c_long] = &[
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
];
