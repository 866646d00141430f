//! What a test needs from the machine (root, loop devices, a tmpfs mount, a filesystem that
//! takes `O_DIRECT`, a tool): where it is missing the test skips itself and says so, unless
//! `FERRY_REQUIRE_ALL=1` (set by `.ci/run`) makes every missing prerequisite a failure, so
//! that CI runs every test or fails.

use std::fmt::Display;
use std::io::Write as _;
use std::process::{Command, Stdio};

/// The switch: set to anything but `0` or nothing, a missing prerequisite fails the test.
pub const REQUIRE_ALL_ENV: &str = "FERRY_REQUIRE_ALL";

/// True when [`REQUIRE_ALL_ENV`] is set.
pub fn require_all() -> bool {
    std::env::var_os(REQUIRE_ALL_ENV).is_some_and(|v| !v.is_empty() && v != "0")
}

/// Returns `available`. When it is false: panics under [`REQUIRE_ALL_ENV`], and otherwise
/// prints a line naming the test and `what` is missing (straight to stderr, past the test
/// harness's capture, so that a skip shows in the run's output). Use as
/// `if !require("qemu-storage-daemon", command_available("qemu-storage-daemon")) { return Ok(()); }`.
pub fn require(what: &str, available: bool) -> bool {
    if available {
        return true;
    }
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    assert!(
        !require_all(),
        "{test}: {what} is missing, and {REQUIRE_ALL_ENV} is set: every test must run"
    );
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: {what} is missing (with {REQUIRE_ALL_ENV}=1 this fails)"
    );
    false
}

/// `Some` of the value of `result`; on an error, [`require`] with `what` and the error, then
/// `None`. For prerequisites found by trying them (`LoopDevice::attach`, a mount).
pub fn require_ok<T, E: Display>(what: &str, result: Result<T, E>) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(e) => {
            require(&format!("{what} ({e:#})"), false);
            None
        }
    }
}

/// True when `program --version` runs and succeeds.
pub fn command_available(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_there_is_never_a_skip() {
        assert!(require("nothing", true));
        assert_eq!(require_ok::<_, String>("nothing", Ok(3)), Some(3));
        assert!(!command_available("no-such-program-here"));
    }

    #[test]
    fn a_missing_prerequisite_skips_or_fails_as_the_switch_says() {
        let outcome =
            std::panic::catch_unwind(|| require("a unicorn (a self-test of `require`)", false));
        match outcome {
            Ok(ran) => assert!(!ran && !require_all()),
            Err(_) => assert!(require_all()),
        }
    }
}
