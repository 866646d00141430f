//! Tests of the volume table: volumes added and removed while the daemon runs are served
//! and unserved like volumes of the command line, and never share a name, socket or image.

use super::*;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::volume_spec::parse_volume;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Bound on a wait for the serving thread; only a hang reaches it.
const HANG_TIMEOUT: Duration = Duration::from_secs(10);

fn spec(dir: &Path, name: &str, extra: &str) -> Result<VolumeSpec, String> {
    parse_volume(&format!(
        "name={name},path={},socket={},size=1M{extra}",
        dir.join(format!("{name}.img")).display(),
        dir.join(format!("{name}.sock")).display()
    ))
}

/// An ordinary volume's admission: its gate open, its export open to every client.
fn open(daemon: &Daemon) -> Admission {
    Admission {
        gate: daemon.open_gate(),
        nbd_clients: None,
    }
}

fn wait_for(what: &str, condition: impl Fn() -> bool) -> TestResult {
    let deadline = Instant::now() + HANG_TIMEOUT;
    while !condition() {
        if Instant::now() >= deadline {
            return Err(format!("timed out waiting until {what}").into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

#[test]
fn a_volume_added_at_run_time_is_served_and_removed_cleanly() -> TestResult {
    let dir = tempfile::tempdir()?;
    let daemon = Daemon::new(None, None, None);
    let a = spec(dir.path(), "a", "")?;
    let served = daemon.add_volume(&a, open(&daemon))?;
    assert_eq!(daemon.volumes().len(), 1);
    assert!(daemon.volume("a").is_some());
    assert_eq!(served.volume.size_bytes(), 1 << 20);

    // A frontend is accepted, and the removal disconnects it.
    let mut frontend = UnixStream::connect(&a.socket)?;
    wait_for("the frontend is accepted", || {
        served.connection.connected.load(Ordering::SeqCst)
    })?;
    let removed = daemon.remove_volume("a")?;
    assert!(Arc::ptr_eq(&removed, &served));
    assert!(daemon.volume("a").is_none() && daemon.volumes().is_empty());
    assert!(!a.socket.exists(), "the socket file is removed");
    assert!(a.engine.path.exists(), "the image stays");
    frontend.set_read_timeout(Some(HANG_TIMEOUT))?;
    let mut byte = [0u8; 1];
    assert_eq!(std::io::Read::read(&mut frontend, &mut byte)?, 0);

    // The name, socket and image are free again.
    daemon.add_volume(&a, open(&daemon))?;
    UnixStream::connect(&a.socket)?;
    assert!(matches!(
        daemon.remove_volume("nope"),
        Err(VolumeTableError::NotFound(name)) if name == "nope"
    ));
    Ok(())
}

#[test]
fn names_sockets_and_images_stay_distinct() -> TestResult {
    let dir = tempfile::tempdir()?;
    let control = dir.path().join("ctl");
    let daemon = Daemon::new(None, Some(control.clone()), None);
    let a = spec(dir.path(), "a", "")?;
    daemon.add_volume(&a, open(&daemon))?;
    let mut same_name = spec(dir.path(), "b", "")?;
    same_name.engine.name = "a".into();
    let mut same_socket = spec(dir.path(), "c", "")?;
    same_socket.socket = a.socket.clone();
    let mut same_image = spec(dir.path(), "d", "")?;
    same_image.engine.path = a.engine.path.clone();
    let mut on_control = spec(dir.path(), "e", "")?;
    on_control.socket = control;
    // The served image through a hard link, a slice of it: the same bytes.
    let link = dir.path().join("link.img");
    std::fs::hard_link(&a.engine.path, &link)?;
    let mut via_link = spec(dir.path(), "f", "")?;
    via_link.engine.path = link.clone();
    via_link.engine.size_bytes = None;
    let mut slice = via_link.clone();
    slice.engine.name = "g".into();
    slice.socket = dir.path().join("g.sock");
    slice.engine.offset_bytes = 4096;
    slice.engine.length_bytes = Some(4096);
    for (spec, needle) in [
        (&same_name, "two volumes are named a"),
        (&same_socket, "same socket"),
        (&same_image, "same image"),
        (&on_control, "--control"),
        (&via_link, "overlapping"),
        (&slice, "overlapping"),
    ] {
        match daemon.add_volume(spec, open(&daemon)) {
            Err(VolumeTableError::Conflict(message)) => {
                assert!(message.contains(needle), "{message:?} lacks {needle:?}")
            }
            Err(e) => return Err(format!("{}: unexpected error {e}", spec.engine.name).into()),
            Ok(_) => return Err(format!("{} was added", spec.engine.name).into()),
        }
        if spec.engine.path != a.engine.path && spec.engine.path != link {
            assert!(
                !spec.engine.path.exists(),
                "a refused volume creates no image"
            );
        }
    }
    assert_eq!(daemon.volumes().len(), 1);
    Ok(())
}

#[test]
fn a_volume_that_fails_to_start_leaves_nothing_behind() -> TestResult {
    let dir = tempfile::tempdir()?;
    let daemon = Daemon::new(None, None, None);
    // The image is created, then the device settings are refused: its size is not a
    // whole number of the guest's logical blocks (a spec built in code, which the command
    // line's parser would have refused before).
    let mut bad = spec(dir.path(), "bad", "")?;
    bad.engine.size_bytes = Some((1 << 20) + 512);
    bad.logical_block_bytes = 4096;
    let error = match daemon.add_volume(&bad, open(&daemon)) {
        Err(VolumeTableError::Start { volume, reason }) if volume == "bad" => reason,
        Err(e) => return Err(format!("unexpected error {e}").into()),
        Ok(_) => return Err("a volume with a bad block size was added".into()),
    };
    assert!(
        !bad.engine.path.exists(),
        "the image it created is removed ({error})"
    );
    assert!(!bad.socket.exists());
    let mut missing_dir = spec(dir.path(), "m", "")?;
    missing_dir.socket = dir.path().join("no-such-dir/m.sock");
    assert!(matches!(
        daemon.add_volume(&missing_dir, open(&daemon)),
        Err(VolumeTableError::Start { .. })
    ));
    assert!(!missing_dir.engine.path.exists());
    // Neither failure keeps its name reserved.
    daemon.add_volume(&spec(dir.path(), "bad", "")?, open(&daemon))?;
    daemon.add_volume(&spec(dir.path(), "m", "")?, open(&daemon))?;
    assert_eq!(daemon.volumes().len(), 2);
    Ok(())
}

#[test]
fn a_volume_in_a_running_migration_is_not_removed() -> TestResult {
    let dir = tempfile::tempdir()?;
    let daemon = Daemon::new(None, None, None);
    let a = daemon.add_volume(&spec(dir.path(), "a", "")?, open(&daemon))?;
    let target = ferry_engine::mirror::DestinationSpec::parse(
        &dir.path().join("target.img").display().to_string(),
    )?;
    let job = daemon.migrations.start(
        vec![a.volume.clone()],
        target,
        ferry_engine::mirror::MigrationOptions::default(),
    )?;
    match daemon.remove_volume("a") {
        Err(VolumeTableError::Migrating { volume, job: id }) => {
            assert_eq!((volume.as_str(), id), ("a", job.id()))
        }
        other => return Err(format!("expected a refusal, got {:?}", other.err()).into()),
    }
    job.cancel()?;
    wait_for("the job ends", || job.state().is_terminal())?;
    daemon.remove_volume("a")?;
    Ok(())
}
