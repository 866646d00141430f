//! `ferry serve` as an operator meets it: refused settings (a one-line error, a non-zero exit,
//! nothing created or truncated), the control socket's `query-volumes`, `--config` files with
//! flags overriding them, and the no-argument demo.

#[path = "support/mod.rs"]
mod support;

use anyhow::{bail, ensure, Context as _, Result};
use nix::sys::signal::Signal;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::blkio_client::{BlkioClient, BlkioOpts, Op};
use support::ferry;

/// Bound on `connected` following a client's arrival or departure.
const STATE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on the daemon's clean exit after SIGTERM.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

use support::ferry::{refused, vol};

#[test]
fn refuses_missing_image_without_size() -> Result<()> {
    let dir = support::scratch_dir()?;
    refused(
        dir.path(),
        &vol(dir.path(), "a", "a.img", "a.sock", ""),
        "does not exist",
    )?;
    Ok(())
}

#[test]
fn refuses_bad_sizes() -> Result<()> {
    let dir = support::scratch_dir()?;
    let d = dir.path();
    refused(d, &vol(d, "a", "a.img", "a.sock", ",size=12Q"), "12Q")?;
    refused(d, &vol(d, "a", "a.img", "a.sock", ",size=0"), "size")?;
    refused(d, &vol(d, "a", "a.img", "a.sock", ",size=1000"), "size")?;
    Ok(())
}

/// `logical-block-size=` must be a power of two from 512 to 64K, and the volume whole
/// blocks: a size= that is not is refused before any image is made, an existing image that
/// is not when it is opened.
#[test]
fn refuses_volumes_not_in_whole_logical_blocks() -> Result<()> {
    let dir = support::scratch_dir()?;
    let d = dir.path();
    refused(
        d,
        &vol(d, "a", "a.img", "a.sock", ",logical-block-size=1000"),
        "logical-block-size=1000",
    )?;
    refused(
        d,
        &vol(
            d,
            "a",
            "a.img",
            "a.sock",
            ",size=1026K,logical-block-size=4K",
        ),
        "size=1050624 is not a multiple of logical-block-size=4096",
    )?;
    support::create_image(&d.join("b.img"), (1 << 20) + 512)?;
    refused(
        d,
        &vol(d, "b", "b.img", "b.sock", ",logical-block-size=4K"),
        "is not a multiple of logical-block-size=4096",
    )?;
    Ok(())
}

/// A socket another ferry serves is refused (and the first ferry keeps serving); so is a
/// socket in a directory that does not exist.
#[test]
fn refuses_socket_in_use_or_in_missing_directory() -> Result<()> {
    let dir = support::scratch_dir()?;
    let d = dir.path();
    let socket = d.join("a.sock");
    let _first = ferry::serve(&vol(d, "a", "a.img", "a.sock", ",size=4M"), &[&socket])?;
    refused(d, &vol(d, "b", "b.img", "a.sock", ",size=4M"), "in use")?;
    let client = BlkioClient::connect(&socket, &BlkioOpts::default())?;
    ensure!(client.capacity_bytes() == 4 << 20, "first ferry disturbed");
    refused(
        d,
        &vol(d, "c", "c.img", "missing/c.sock", ",size=4M"),
        "does not exist",
    )?;
    Ok(())
}

#[test]
fn refuses_two_volumes_on_one_socket_or_one_image() -> Result<()> {
    let dir = support::scratch_dir()?;
    let d = dir.path();
    let mut args = vol(d, "a", "a.img", "s.sock", ",size=4M").to_vec();
    args.extend(vol(d, "b", "b.img", "s.sock", ",size=4M"));
    refused(d, &args, "same socket")?;
    let mut args = vol(d, "a", "x.img", "a.sock", ",size=4M").to_vec();
    args.extend(vol(d, "b", "x.img", "b.sock", ",size=4M"));
    refused(d, &args, "same image")?;
    let mut args = vol(d, "a", "a.img", "s.sock", ",size=4M").to_vec();
    args.extend([
        "--control".to_string(),
        d.join("s.sock").display().to_string(),
    ]);
    refused(d, &args, "volume a and --control use the same socket")?;
    Ok(())
}

/// An existing image with another size= is refused; its bytes and length stay.
#[test]
fn refuses_existing_image_of_another_size() -> Result<()> {
    let dir = support::scratch_dir()?;
    let d = dir.path();
    let image = d.join("a.img");
    let content = support::pattern(3, 1 << 20);
    std::fs::write(&image, &content).context("write image")?;
    let mtime = std::fs::metadata(&image).context("stat")?.modified()?;
    refused(d, &vol(d, "a", "a.img", "a.sock", ",size=2M"), "size=")?;
    refused(d, &vol(d, "a", "a.img", "a.sock", ",size=512K"), "size=")?;
    ensure!(std::fs::read(&image)? == content, "image content changed");
    ensure!(
        std::fs::metadata(&image)?.modified()? == mtime,
        "image touched"
    );
    Ok(())
}

/// Polls `query-volumes` until volume `name` reports `connected == want`.
fn wait_connected(control: &Path, name: &str, want: bool) -> Result<serde_json::Value> {
    let deadline = Instant::now() + STATE_TIMEOUT;
    loop {
        let v = ferry::query_volume(control, name)?;
        if v["connected"] == want {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("volume {name} never reported connected={want}: {v}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The QEMU options printed at start match the volume (its queue count).
#[test]
fn the_printed_qemu_options_match_the_volume() -> Result<()> {
    let dir = support::scratch_dir()?;
    let d = dir.path();
    let socket = d.join("a.sock");
    let daemon = ferry::serve(
        &vol(d, "a", "a.img", "a.sock", ",size=4M,queues=2"),
        &[&socket],
    )?;
    // Printed once the socket listens: wait for the line rather than read the log at once.
    let options = "-device vhost-user-blk-pci,chardev=ferry-a,num-queues=2";
    let printed = support::wait::wait_until("the QEMU options printed", STATE_TIMEOUT, || {
        Ok(daemon.log().contains(options))
    });
    ensure!(printed.is_ok(), "{}", daemon.log());
    Ok(())
}

/// `ferry query --control PATH query-volumes`: name, path, size, socket, connected and
/// counters that follow a libblkio client's I/O.
#[test]
fn control_socket_reports_volumes_and_counters() -> Result<()> {
    let dir = support::scratch_dir()?;
    let d = dir.path();
    let control = d.join("ctl.sock");
    let socket = d.join("a.sock");
    let mut args = vol(d, "a", "a.img", "a.sock", ",size=8M").to_vec();
    args.extend(["--control".to_string(), control.display().to_string()]);
    let mut daemon = ferry::serve(&args, &[&socket, &control])?;
    let v = ferry::query_volume(&control, "a")?;
    ensure!(
        v["path"] == ferry::path_str(d, "a.img")
            && v["size"] == 8 << 20
            && v["socket"] == socket.display().to_string()
            && v["connected"] == false,
        "query-volumes before any client: {v}"
    );
    ensure!(
        v["stats"]["write_ops"] == 0 && v["stats"]["read_ops"] == 0,
        "counters before I/O: {v}"
    );
    let mut client = BlkioClient::connect(&socket, &BlkioOpts::default())?;
    wait_connected(&control, "a", true)?;
    let writes: Vec<Op> = (0..10)
        .map(|i| Op::Write {
            offset_bytes: i * 4096,
            len_bytes: 4096,
            buf_offset: 0,
            fua: false,
        })
        .collect();
    client.run_batch_ok(0, &writes)?;
    client.read_all(0, 5 * 8192, 8192)?;
    client.flush()?;
    let v = wait_connected(&control, "a", true)?;
    let s = &v["stats"];
    ensure!(
        s["write_ops"] == 10
            && s["write_bytes"] == 40960
            && s["read_ops"] == 5
            && s["read_bytes"] == 40960
            && s["flush_ops"] == 1
            && s["errors"] == 0,
        "counters after I/O: {s}"
    );
    drop(client);
    let v = wait_connected(&control, "a", false)?;
    ensure!(v["connections"] == 1, "connections: {v}");
    let bogus = ferry::run(
        &[
            "query".into(),
            "--control".into(),
            control.display().to_string(),
            "no-such-command".into(),
        ],
        None,
        ferry::COMMAND_TIMEOUT,
    )?;
    ensure!(
        !bogus.status.success() && bogus.stderr.contains("unknown command"),
        "unknown command: {bogus:?}"
    );
    let status = daemon.terminate(EXIT_TIMEOUT)?;
    ensure!(status.success(), "ferry exited {status}");
    ensure!(!control.exists(), "control socket left behind");
    Ok(())
}

/// `--config FILE` with a control socket and two volumes; a `--volume` flag replaces the
/// config's volume of the same name.
#[test]
fn config_file_with_flag_override() -> Result<()> {
    let dir = support::scratch_dir()?;
    let d = dir.path();
    let p = |name: &str| ferry::path_str(d, name);
    let config = d.join("ferry.toml");
    let text = format!(
        r#"control = "{}"

[[volume]]
name = "vm1"
path = "{}"
socket = "{}"
size = "64M"
queues = 2

[[volume]]
name = "vm2"
path = "{}"
socket = "{}"
size = "32M"
"#,
        p("ctl.sock"),
        p("vm1.img"),
        p("vm1.sock"),
        p("vm2.img"),
        p("vm2.sock")
    );
    std::fs::write(&config, text).context("write config")?;
    let mut args = vec!["--config".to_string(), config.display().to_string()];
    args.extend(vol(
        d,
        "vm2",
        "other.img",
        "other.sock",
        ",size=16M,read-only=off",
    ));
    let control = d.join("ctl.sock");
    let vm1_sock = d.join("vm1.sock");
    let other_sock = d.join("other.sock");
    let mut daemon = ferry::serve(&args, &[&vm1_sock, &other_sock, &control])?;
    let vm1 = ferry::query_volume(&control, "vm1")?;
    ensure!(
        vm1["size"] == 64 << 20 && vm1["queues"] == 2 && vm1["path"] == p("vm1.img"),
        "vm1 from the config: {vm1}"
    );
    let vm2 = ferry::query_volume(&control, "vm2")?;
    ensure!(
        vm2["size"] == 16 << 20
            && vm2["path"] == p("other.img")
            && vm2["socket"] == p("other.sock"),
        "vm2 overridden by the flag: {vm2}"
    );
    let volumes = ferry::query(&control, "query-volumes")?;
    ensure!(
        volumes.as_array().map(Vec::len) == Some(2),
        "expected 2 volumes: {volumes}"
    );
    ensure!(
        !d.join("vm2.img").exists() && !d.join("vm2.sock").exists(),
        "the overridden config volume was created"
    );
    let c1 = BlkioClient::connect(
        &vm1_sock,
        &BlkioOpts {
            num_queues: 2,
            ..BlkioOpts::default()
        },
    )?;
    ensure!(c1.capacity_bytes() == 64 << 20, "vm1 capacity");
    let c2 = BlkioClient::connect(&other_sock, &BlkioOpts::default())?;
    ensure!(c2.capacity_bytes() == 16 << 20, "vm2 capacity");
    drop((c1, c2));
    let status = daemon.terminate(EXIT_TIMEOUT)?;
    ensure!(status.success(), "ferry exited {status}");
    Ok(())
}

/// A child whose stdout and stderr go to separate files; killed on drop.
struct SplitChild {
    child: Child,
    stdout: PathBuf,
}

impl Drop for SplitChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ferry serve` with no arguments in an empty directory: a 1 GiB sparse ferry-demo.img on
/// ferry-demo.sock, QEMU options on stdout, usable by a client, clean exit on SIGTERM.
#[test]
fn demo_without_arguments() -> Result<()> {
    let dir = support::scratch_dir()?;
    let d = dir.path();
    let logs = tempfile::tempdir().context("log dir")?;
    let stdout = logs.path().join("stdout");
    let stderr = logs.path().join("stderr");
    let child = Command::new(support::ferry_bin())
        .arg("serve")
        .current_dir(d)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout)?)
        .stderr(std::fs::File::create(&stderr)?)
        .spawn()
        .context("spawn ferry serve")?;
    let mut demo = SplitChild { child, stdout };
    let socket = d.join("ferry-demo.sock");
    support::wait::wait_for_socket_file(&socket, support::daemon::START_TIMEOUT)
        .with_context(|| std::fs::read_to_string(&stderr).unwrap_or_default())?;
    let image = d.join("ferry-demo.img");
    let meta = std::fs::metadata(&image).context("demo image")?;
    ensure!(meta.len() == 1 << 30, "demo image is {} bytes", meta.len());
    use std::os::unix::fs::MetadataExt as _;
    ensure!(
        meta.blocks() * 512 < 16 << 20,
        "demo image is not sparse: {} blocks",
        meta.blocks()
    );
    let mut client = BlkioClient::connect(&socket, &BlkioOpts::default())?;
    ensure!(client.capacity_bytes() == 1 << 30, "demo capacity");
    let data = support::pattern(9, 1 << 20);
    client.write_all((1 << 30) - (1 << 20), &data, 64 << 10)?;
    ensure!(
        client.read_all((1 << 30) - (1 << 20), 1 << 20, 128 << 10)? == data,
        "demo read-back"
    );
    drop(client);
    let canonical = std::fs::canonicalize(&socket)?;
    let printed = || std::fs::read_to_string(&demo.stdout).unwrap_or_default();
    let found = support::wait::wait_until("the QEMU options on stdout", STATE_TIMEOUT, || {
        let text = printed();
        Ok(text.contains("vhost-user-blk-pci") && text.contains(&*canonical.to_string_lossy()))
    });
    ensure!(
        found.is_ok(),
        "stdout lacks the QEMU options for {}:\n{}",
        canonical.display(),
        printed()
    );
    let pid = nix::unistd::Pid::from_raw(i32::try_from(demo.child.id())?);
    nix::sys::signal::kill(pid, Signal::SIGTERM).context("SIGTERM")?;
    let deadline = Instant::now() + EXIT_TIMEOUT;
    let status = loop {
        if let Some(status) = demo.child.try_wait()? {
            break status;
        }
        ensure!(Instant::now() < deadline, "demo did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    ensure!(status.success(), "demo exited {status}");
    ensure!(!socket.exists(), "demo socket left behind");
    let host = support::images::read_range(&image, (1 << 30) - (1 << 20), 1 << 20)?;
    ensure!(host == data, "demo image lacks the client's data");
    Ok(())
}
