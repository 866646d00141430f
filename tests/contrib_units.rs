//! The example systemd unit in `contrib/` is one systemd accepts: `systemd-analyze verify`
//! on an instance of it, its `ExecStart=` pointed at the `ferry` built for this test run
//! (verify checks that the program exists).

#[path = "support/mod.rs"]
mod support;

use anyhow::{ensure, Context as _, Result};
use std::process::Command;

const UNIT: &str = include_str!("../contrib/ferry@.service");

#[test]
fn the_example_unit_passes_systemd_analyze_verify() -> Result<()> {
    if !support::require(
        "systemd-analyze (Debian package systemd)",
        support::require::command_available("systemd-analyze"),
    ) {
        return Ok(());
    }
    ensure!(
        UNIT.contains("ExecStart=/usr/local/bin/ferry serve"),
        "the unit's ExecStart changed; update this test"
    );
    for option in [
        "Type=notify",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
    ] {
        ensure!(UNIT.lines().any(|l| l == option), "the unit lacks {option}");
    }
    let dir = support::scratch_dir()?;
    let unit = dir.path().join("ferry@demo.service");
    std::fs::write(
        &unit,
        UNIT.replace("/usr/local/bin/ferry", support::ferry_bin()),
    )
    .context("write the unit")?;
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .context("run systemd-analyze verify")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
    Ok(())
}
