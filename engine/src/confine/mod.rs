//! Confinement of the daemon's threads: each thread, once set up, installs a seccomp filter
//! that allows only the system calls its kind of work needs ([`Allowlist`], declared beside
//! the code that starts the thread), and the process as a whole is limited by Landlock to
//! the paths it was configured with ([`landlock`]).
//!
//! Filters are off until [`enable`] is called (`ferry serve` does, unless `--seccomp=off`),
//! so that library users, tests and the client-side commands are never confined. A denied
//! call is never silent: the filter traps it (`SECCOMP_RET_TRAP`), and the `SIGSYS` handler
//! ([`sigsys`]) writes the call's name and the thread's kind to stderr and ends the process.
//!
//! A filter is inherited by every thread its thread starts, and stacks with theirs: a thread
//! that starts others must allow what they need before installing their own.

mod groups;
pub mod landlock;
#[cfg(target_arch = "x86_64")]
mod names_x86_64;
mod sigsys;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

pub use groups::{FILE_IO, FILE_PATHS, NET, NET_CLIENT, RUNTIME, SPAWN, URING_SETUP, URING_USE};

/// The system calls one kind of thread may make.
#[derive(Debug, Clone, Copy)]
pub struct Allowlist {
    /// The thread kind named when a call is denied, e.g. `vhost-queue`.
    pub kind: &'static str,
    /// Groups of calls from [`groups`](self), all allowed.
    pub groups: &'static [&'static [libc::c_long]],
    /// Calls of this kind alone.
    pub extra: &'static [libc::c_long],
}

impl Allowlist {
    /// Every call this list allows, sorted and without repeats.
    pub fn syscalls(&self) -> Vec<libc::c_long> {
        let mut all: Vec<libc::c_long> = self
            .groups
            .iter()
            .flat_map(|g| g.iter())
            .chain(self.extra.iter())
            .copied()
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }
}

/// Whether [`enter`] installs filters; set once by [`enable`].
static ENABLED: AtomicBool = AtomicBool::new(false);

/// The uid and gid `ferry serve --user` drops to, once every thread is started: glibc makes
/// every thread call `setresuid`/`setresgid`/`setgroups` itself, so each filter allows
/// exactly those calls with exactly these ids (a drop to that user, nothing else).
static IDENTITY_DROP: OnceLock<(u32, u32)> = OnceLock::new();

/// Lets the filters installed from now on allow the drop to `uid` and `gid` (see
/// [`IDENTITY_DROP`]). Call before [`enable`].
pub fn plan_identity_drop(uid: u32, gid: u32) {
    let _ = IDENTITY_DROP.set((uid, gid));
}

/// The thread kind whose threads make a forbidden call right after confining themselves
/// (`FERRY_SECCOMP_PROBE=KIND`), so that a test can see the filter stop and report it.
static PROBE: OnceLock<Option<String>> = OnceLock::new();

thread_local! {
    /// The kind of the current thread's last filter, read by the `SIGSYS` handler (a
    /// const-initialized thread-local without destructor: a plain load, safe there).
    static KIND: Cell<&'static str> = const { Cell::new("not yet confined") };
    /// Whether this thread installed a filter already ([`enter_once`]).
    static ENTERED: Cell<bool> = const { Cell::new(false) };
}

/// Errors installing the confinement.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(#[source] std::io::Error),
    #[error("seccomp filter for {kind} threads: {source}")]
    Filter {
        kind: &'static str,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("cannot install the seccomp filter of {kind} threads: {source}")]
    Install {
        kind: &'static str,
        #[source]
        source: seccompiler::Error,
    },
}

/// Turns filters on for the rest of the process's life: installs the `SIGSYS` handler and
/// reads `FERRY_SECCOMP_PROBE`. Call from the main thread before starting any thread.
pub fn enable() -> Result<(), ConfineError> {
    sigsys::install_handler().map_err(ConfineError::Handler)?;
    let _ = PROBE.set(std::env::var("FERRY_SECCOMP_PROBE").ok());
    ENABLED.store(true, Ordering::SeqCst);
    Ok(())
}

/// Whether filters are on.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Confines the calling thread to `list` if filters are on. A thread calls it once its setup
/// (opening, binding, mapping) is done. A failure is logged and the thread goes on
/// unconfined: the filter is a second line of defence, not a condition to serve.
pub fn enter(list: &Allowlist) {
    if !enabled() {
        return;
    }
    ENTERED.with(|e| e.set(true));
    match install(list) {
        Ok(()) => {
            KIND.with(|k| k.set(list.kind));
            log::debug!("seccomp: {} thread confined", list.kind);
            probe(list.kind);
        }
        Err(e) => log::error!("{e}; the thread runs unconfined"),
    }
}

/// [`enter`] on a thread's first call only: for threads started by a library (the
/// vhost-user backend's workers), confined at the first callback they run.
pub fn enter_once(list: &Allowlist) {
    if enabled() && !ENTERED.with(|e| e.get()) {
        enter(list);
    }
}

/// The calls that start a thread: a kind without [`groups::SPAWN`] gets `EPERM` for them
/// rather than the trap. glibc blocks every signal around `clone3`, so a trapped one kills
/// the process before the SIGSYS handler can name it; `EPERM` instead fails the spawn, and
/// the caller's error path says which thread it could not start.
const THREAD_STARTS: [libc::c_long; 2] = [libc::SYS_clone, libc::SYS_clone3];

fn install(list: &Allowlist) -> Result<(), ConfineError> {
    let filter_error = |source| ConfineError::Filter {
        kind: list.kind,
        source,
    };
    let arch: seccompiler::TargetArch = std::env::consts::ARCH.try_into().map_err(filter_error)?;
    let allowed = list.syscalls();
    if !THREAD_STARTS.iter().all(|nr| allowed.contains(nr)) {
        // Installed first, while the thread may still call seccomp: filters stack, and the
        // kernel takes the strictest answer, so EPERM here beats the main filter's allow.
        let refusals = THREAD_STARTS.iter().map(|&nr| (nr, Vec::new())).collect();
        apply(
            list.kind,
            seccompiler::SeccompFilter::new(
                refusals,
                // (seccompiler takes the action for other calls first, then for these)
                seccompiler::SeccompAction::Allow,
                seccompiler::SeccompAction::Errno(libc::EPERM as u32),
                arch,
            )
            .map_err(filter_error)?,
        )?;
    }
    let mut rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = allowed
        .into_iter()
        .chain(THREAD_STARTS)
        .map(|nr| (nr, Vec::new()))
        .collect();
    if let Some(&(uid, gid)) = IDENTITY_DROP.get() {
        rules.insert(
            libc::SYS_setresuid,
            vec![all_args_equal(3, uid).map_err(filter_error)?],
        );
        rules.insert(
            libc::SYS_setresgid,
            vec![all_args_equal(3, gid).map_err(filter_error)?],
        );
        // One supplementary group, the one given (the list itself is not visible to seccomp;
        // after the drop setgroups needs a capability the process no longer has).
        rules.insert(
            libc::SYS_setgroups,
            vec![all_args_equal(1, 1).map_err(filter_error)?],
        );
    }
    let filter = seccompiler::SeccompFilter::new(
        rules,
        seccompiler::SeccompAction::Trap,
        seccompiler::SeccompAction::Allow,
        arch,
    )
    .map_err(filter_error)?;
    apply(list.kind, filter)
}

/// Compiles `filter` and installs it on the calling thread.
fn apply(kind: &'static str, filter: seccompiler::SeccompFilter) -> Result<(), ConfineError> {
    let program: seccompiler::BpfProgram = filter
        .try_into()
        .map_err(|source| ConfineError::Filter { kind, source })?;
    seccompiler::apply_filter(&program).map_err(|source| ConfineError::Install { kind, source })
}

/// A rule matching a call whose first `count` arguments all equal `value` (32-bit ids).
fn all_args_equal(
    count: u8,
    value: u32,
) -> Result<seccompiler::SeccompRule, seccompiler::BackendError> {
    let conditions = (0..count)
        .map(|arg| {
            seccompiler::SeccompCondition::new(
                arg,
                seccompiler::SeccompCmpArgLen::Dword,
                seccompiler::SeccompCmpOp::Eq,
                u64::from(value),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    seccompiler::SeccompRule::new(conditions)
}

/// The test hook: a thread of the probed kind makes a call no list allows (`sysinfo`,
/// harmless where it is allowed), which the filter must stop and report.
fn probe(kind: &str) {
    let probed = PROBE.get().and_then(|p| p.as_deref());
    if probed == Some(kind) {
        log::warn!("seccomp probe: a {kind} thread calls sysinfo, which it may not");
        let mut info = std::mem::MaybeUninit::<libc::sysinfo>::uninit();
        // SAFETY: sysinfo writes into the struct it is given, which lives on this stack
        // for the whole call.
        let rc = unsafe { libc::sysinfo(info.as_mut_ptr()) };
        log::error!("seccomp probe: sysinfo returned {rc}: the filter did not stop it");
    }
}

/// The name of system call `number` on this architecture, if known.
pub(crate) fn syscall_name(number: i64) -> Option<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        names_x86_64::name(number)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = number;
        None
    }
}

/// The current thread's kind, for the `SIGSYS` handler.
fn current_kind() -> &'static str {
    KIND.with(|k| k.get())
}

#[cfg(test)]
mod tests;
