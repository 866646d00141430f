//! The `SIGSYS` handler: a call a seccomp filter traps (`SECCOMP_RET_TRAP`) is reported on
//! stderr with its number, its name and the thread's kind and name, then the process ends.
//!
//! It runs inside a signal handler, on the thread that made the call: it neither allocates
//! nor locks, formats into a buffer on its stack, and makes only calls every filter allows
//! (`write`, `prctl`, `exit_group`).

use std::io;

/// The exit status after a denied call: 128 + SIGSYS, as a shell reports a process killed
/// by that signal.
const EXIT_DENIED: libc::c_int = 128 + libc::SIGSYS;

/// The report's buffer; longer reports are cut.
const REPORT_BYTES_MAX: usize = 256;

pub(super) fn install_handler() -> io::Result<()> {
    // SAFETY: a zeroed sigaction is valid (empty mask, no flags); the handler is set below
    // and is a plain function that lives for the whole process.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = handle as *const () as libc::sighandler_t;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `action` is fully initialised and outlives the call; the old action is not
    // asked for.
    let rc = unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The offset of `si_syscall` in a `siginfo_t` of a seccomp `SIGSYS` on 64-bit Linux
/// (`si_signo`, `si_errno`, `si_code`, padding, then `_sigsys { _call_addr, _syscall,
/// _arch }`), which the libc crate does not expose.
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn handle(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    let number = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passes a full siginfo_t for a SA_SIGINFO handler; for a seccomp
        // SIGSYS the int at this offset is the call's number.
        i64::from(unsafe {
            info.cast::<u8>()
                .add(SI_SYSCALL_OFFSET)
                .cast::<i32>()
                .read()
        })
    };
    let mut thread_name = [0u8; 17];
    // SAFETY: PR_GET_NAME writes at most 16 bytes and a NUL into the 17-byte buffer.
    unsafe { libc::prctl(libc::PR_GET_NAME, thread_name.as_mut_ptr()) };
    let name_len = thread_name.iter().position(|&b| b == 0).unwrap_or(16);

    let mut report = Report::default();
    report.push(b"ferry: seccomp: a ");
    report.push(super::current_kind().as_bytes());
    report.push(b" thread (");
    report.push(&thread_name[..name_len]);
    report.push(b") made system call ");
    report.push_number(number);
    report.push(b" (");
    report.push(super::syscall_name(number).unwrap_or("unknown").as_bytes());
    report.push(b"), which its filter forbids; stopping the daemon\n");
    // SAFETY: the buffer is on this stack and `len` bytes of it are initialised.
    unsafe {
        libc::write(
            libc::STDERR_FILENO,
            report.bytes.as_ptr().cast(),
            report.len,
        )
    };
    // SAFETY: ends the process at once, which is the point: the thread may be compromised.
    unsafe { libc::_exit(EXIT_DENIED) };
}

/// A fixed buffer the handler formats into.
struct Report {
    bytes: [u8; REPORT_BYTES_MAX],
    len: usize,
}

impl Default for Report {
    fn default() -> Self {
        Self {
            bytes: [0; REPORT_BYTES_MAX],
            len: 0,
        }
    }
}

impl Report {
    fn push(&mut self, text: &[u8]) {
        let room = REPORT_BYTES_MAX - self.len;
        let n = text.len().min(room);
        self.bytes[self.len..self.len + n].copy_from_slice(&text[..n]);
        self.len += n;
    }

    fn push_number(&mut self, number: i64) {
        if number < 0 {
            self.push(b"-");
        }
        let mut digits = [0u8; 20];
        let mut n = number.unsigned_abs();
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

#[cfg(test)]
mod tests {
    use super::Report;

    #[test]
    fn report_formats_numbers_and_cuts_long_text() {
        let mut r = Report::default();
        r.push(b"call ");
        r.push_number(99);
        r.push(b" ");
        r.push_number(0);
        r.push(b" ");
        r.push_number(-1);
        assert_eq!(&r.bytes[..r.len], b"call 99 0 -1");
        r.push(&[b'x'; 400]);
        assert_eq!(r.len, super::REPORT_BYTES_MAX);
    }
}
