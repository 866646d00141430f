//! Process limits a test raises for itself (the floods of the hostile-client tests hold
//! thousands of sockets at once).

use anyhow::{ensure, Result};

/// Raises this process's soft limit on open files to its hard limit; returns the limit.
pub fn raise_open_files_limit() -> Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct on this stack frame.
    let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    ensure!(got == 0, "getrlimit: {}", std::io::Error::last_os_error());
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: setrlimit reads the struct on this stack frame.
    let set = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    ensure!(set == 0, "setrlimit: {}", std::io::Error::last_os_error());
    Ok(limit.rlim_cur)
}
