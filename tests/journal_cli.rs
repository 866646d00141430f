//! `ferry journal ...` end to end: a journal made by the engine through a real volume, then
//! the CLI's list, verify (clean, corrupted, foreign), restore, demux and export, their
//! memory on a million records, and the control subcommands against a small line-delimited
//! JSON socket server.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::Command;

use ferry_engine::journal::{Journal, JournalOptions};
use ferry_engine::testing::write_at;
use ferry_engine::{Volume, VolumeConfig, VolumeQueue};
use ferry_test_support::loop_device::LoopDevice;
use ferry_test_support::require_ok;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn ferry(args: &[&str]) -> Result<std::process::Output, std::io::Error> {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .output()
}

fn write(q: &mut VolumeQueue, offset: u64, data: &[u8]) -> TestResult {
    write_at(q, offset, data).map_err(|e| e.to_string())?;
    Ok(())
}

/// Volume `vx` of `size` bytes in `dir` (its base copied to `vx.base`), observed by a journal
/// in `dir/j` with the options `spec`; returns the journal and a queue on the volume.
fn journaled_vx(
    dir: &Path,
    size: u64,
    spec: &str,
) -> Result<(std::sync::Arc<Journal>, VolumeQueue), Box<dyn std::error::Error>> {
    let v = Volume::open(VolumeConfig {
        name: "vx".into(),
        path: dir.join("vx.img"),
        size_bytes: Some(size),
        ..Default::default()
    })?;
    std::fs::copy(dir.join("vx.img"), dir.join("vx.base"))?;
    let journal = Journal::open(JournalOptions::parse(&format!(
        "dir={},{spec}",
        dir.join("j").display()
    ))?)?;
    v.add_observer(journal.observer());
    Ok((journal, VolumeQueue::new(v, 0, 4, 4)?))
}

/// Makes a journal in `dir/j` of volume `vx`: three writes, a mark, one more write.
fn make_journal(dir: &Path) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    let (journal, mut q) = journaled_vx(dir, 64 * 1024, "capacity=256K")?;
    for i in 0..3u8 {
        write(&mut q, u64::from(i) * 4096, &[i + 1; 4096])?;
    }
    journal.mark("three")?;
    let at_mark = std::fs::read(dir.join("vx.img"))?;
    write(&mut q, 0, &[9; 4096])?;
    journal.close();
    Ok(at_mark)
}

#[test]
fn offline_tools_work_on_a_real_journal() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let at_mark = make_journal(dir)?;
    let j = dir.join("j");
    let js = j.to_str().ok_or("path")?;

    let out = ferry(&["journal", "verify", js])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let out = ferry(&["journal", "list", js, "--stream", "vx", "--json"])?;
    assert!(out.status.success());
    let writes = String::from_utf8(out.stdout)?
        .lines()
        .filter(|l| l.contains("\"op\":\"write\""))
        .count();
    assert_eq!(writes, 4);

    let restored = dir.join("vx.restored");
    let out = ferry(&[
        "journal",
        "restore",
        js,
        "--volume",
        "vx",
        "--base",
        dir.join("vx.base").to_str().ok_or("path")?,
        "--out",
        restored.to_str().ok_or("path")?,
        "--until",
        "mark:three",
        "--json",
    ])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::read(&restored)? == at_mark);

    let out = ferry(&[
        "journal",
        "demux",
        js,
        "--out-dir",
        dir.join("dm").to_str().ok_or("path")?,
    ])?;
    assert!(out.status.success());
    let log = dir.join("vx.log");
    let out = ferry(&[
        "journal",
        "export",
        js,
        "--volume",
        "vx",
        "--format",
        "dm-log-writes",
        "--out",
        log.to_str().ok_or("path")?,
    ])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        &std::fs::read(&log)?[..8],
        &0x6a736677736872u64.to_le_bytes()
    );
    Ok(())
}

#[test]
fn verify_names_the_offset_of_damage_and_foreign_files_are_refused() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    make_journal(dir)?;
    let medium = dir.join("j").join("medium-000000.fj");
    let mut bytes = std::fs::read(&medium)?;
    // Flip a byte inside the first write's data (record at 4096-aligned batch after prologue).
    let at = bytes.len() / 2;
    bytes[at] ^= 0x55;
    std::fs::write(&medium, &bytes)?;
    let out = ferry(&["journal", "verify", medium.to_str().ok_or("path")?])?;
    assert!(!out.status.success());
    let text = String::from_utf8(out.stdout)?;
    assert!(text.contains("at offset"), "{text}");

    let foreign = dir.join("foreign.fj");
    std::fs::write(&foreign, b"this is not a journal at all, just some text")?;
    let out = ferry(&["journal", "verify", foreign.to_str().ok_or("path")?])?;
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr)?;
    assert!(
        err.contains("not a ferry journal medium") && err.contains("offset 0"),
        "{err}"
    );
    assert!(!err.contains("panicked"));
    Ok(())
}

#[test]
fn control_subcommands_speak_line_delimited_json() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let sock = tmp.path().join("control.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock)?;
    let server = std::thread::spawn(move || -> Vec<serde_json::Value> {
        let mut seen = Vec::new();
        for _ in 0..3 {
            let Ok((stream, _)) = listener.accept() else {
                break;
            };
            let mut line = String::new();
            let _ = BufReader::new(&stream).read_line(&mut line);
            let req: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            let reply = match req["command"].as_str() {
                Some("journal-mark") => {
                    serde_json::json!({"return": {"seq": 5, "label": req["arguments"]["label"]}})
                }
                Some("journal-retrieve") => {
                    // The daemon's in-memory log dropped seqs 1-8 to its log-memory= bound.
                    serde_json::json!({"return": {"entries": [{"seq": 9, "stream_id": 0, "log_id": 1,
                    "timestamp_ns": 2, "op": "log-init", "offset_bytes": 0, "len_bytes": 0, "medium": 0, "position_bytes": 64}],
                    "log_first_seq": 9, "log_dropped": 8, "dropped_from_seq": 1}})
                }
                _ => {
                    serde_json::json!({"error": {"class": "GenericError", "desc": "journal is stopped"}})
                }
            };
            let mut w = &stream;
            let _ = writeln!(w, "{reply}");
            seen.push(req);
        }
        seen
    });
    let s = sock.to_str().ok_or("path")?;
    let out = ferry(&[
        "journal",
        "mark",
        "--control",
        s,
        "--label",
        "before-upgrade",
    ])?;
    assert!(out.status.success());
    assert!(String::from_utf8(out.stdout)?.contains("\"seq\": 5"));
    let out = ferry(&[
        "journal",
        "retrieve",
        "--control",
        s,
        "--since",
        "1",
        "--format",
        "csv",
    ])?;
    assert!(out.status.success());
    assert!(String::from_utf8(out.stdout)?.contains("9,0,1,2,log-init,0,0,0,64"));
    let warning = String::from_utf8(out.stderr)?;
    assert!(
        warning.contains("from seq 1 to 8 are no longer in the daemon's memory"),
        "{warning}"
    );
    let out = ferry(&["journal", "seal", "--control", s])?;
    assert!(!out.status.success());
    assert!(String::from_utf8(out.stderr)?.contains("GenericError: journal is stopped"));
    let seen = server.join().map_err(|_| "server panicked")?;
    assert_eq!(seen[0]["command"], "journal-mark");
    assert_eq!(seen[0]["arguments"]["label"], "before-upgrade");
    assert_eq!(seen[1]["arguments"]["since_seq"], 1);
    assert_eq!(seen[1]["arguments"]["limit"], 16384);
    assert_eq!(seen[2]["command"], "journal-seal");
    Ok(())
}

/// A journal that stopped (last medium full) and was closed without `journal-init`: `list`
/// shows the stop, `verify` fails naming it, `restore` refuses the end without `--allow-gaps`
/// and restores it with the flag, warning.
#[test]
fn a_stopped_journal_is_seen_by_list_verify_and_restore() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let (journal, mut q) = journaled_vx(dir, 256 * 1024, "capacity=256K,media-max=1,on-full=stop")?;
    for i in 0..40u64 {
        write(&mut q, (i % 16) * 16384, &[i as u8; 16384])?;
    }
    journal.close();
    let js = dir.join("j");
    let js = js.to_str().ok_or("path")?;
    let list = ferry(&["journal", "list", js])?;
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(text.contains("stop") && text.contains("full"), "{text}");
    let verify = ferry(&["journal", "verify", js])?;
    let text = String::from_utf8_lossy(&verify.stdout);
    assert!(!verify.status.success());
    assert!(text.contains("STOPPED and never restarted"), "{text}");
    let out = dir.join("vx.out");
    let (base, out) = (dir.join("vx.base"), out.to_str().ok_or("path")?.to_string());
    let base = base.to_str().ok_or("path")?;
    let args = [
        "journal", "restore", js, "--volume", "vx", "--base", base, "--out", &out,
    ];
    let refused = ferry(&args)?;
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("journaling stopped"), "{err}");
    let mut forced = args.to_vec();
    forced.push("--allow-gaps");
    let restored = ferry(&forced)?;
    assert!(restored.status.success(), "{restored:?}");
    let err = String::from_utf8_lossy(&restored.stderr);
    assert!(err.contains("warning: journaling stopped"), "{err}");
    Ok(())
}

#[test]
fn format_makes_spares_and_the_tools_read_an_unsealed_formatted_medium() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let j = dir.join("j");
    let j_arg = j.to_str().ok_or("path")?;
    let args = [
        "journal",
        "format",
        j_arg,
        "--spares",
        "2",
        "--capacity",
        "256K",
    ];
    let out = ferry(&[&args[..], &["--json"]].concat())?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["spares"], 2);
    assert_eq!(report["created"], 2);
    for k in 0..2 {
        let spare = std::fs::read(j.join(format!("spare-{k}.fjs")))?;
        assert_eq!(spare.len(), 256 * 1024);
        assert!(spare.iter().all(|b| *b == 0));
    }
    let again: serde_json::Value =
        serde_json::from_slice(&ferry(&[&args[..], &["--json"]].concat())?.stdout)?;
    assert_eq!(again["created"], 0);

    // A journal on those spares that dies without sealing: its medium keeps a zero tail.
    let (journal, mut q) = journaled_vx(dir, 64 * 1024, "capacity=256K,spares=2")?;
    for i in 0..3u8 {
        write(&mut q, u64::from(i) * 4096, &[i + 1; 4096])?;
    }
    journal.crash_for_test();
    assert_eq!(journal.status().spares_taken, 1);
    assert_eq!(
        std::fs::metadata(j.join("medium-000000.fj"))?.len(),
        256 * 1024
    );

    let verify = ferry(&["journal", "verify", j_arg, "--json"])?;
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    let list = ferry(&["journal", "list", j_arg])?;
    assert!(list.status.success());
    assert_eq!(
        String::from_utf8_lossy(&list.stdout)
            .matches("write")
            .count(),
        3
    );
    let out_img = dir.join("vx.restored");
    let base = dir.join("vx.base");
    let restore = ferry(&[
        "journal",
        "restore",
        j_arg,
        "--volume",
        "vx",
        "--base",
        base.to_str().ok_or("path")?,
        "--out",
        out_img.to_str().ok_or("path")?,
    ])?;
    assert!(
        restore.status.success(),
        "{}",
        String::from_utf8_lossy(&restore.stderr)
    );
    assert_eq!(std::fs::read(out_img)?, std::fs::read(dir.join("vx.img"))?);
    Ok(())
}

#[test]
fn format_registers_a_block_device_and_refuses_what_is_not_one() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let j = dir.join("j");
    let j_arg = j.to_str().ok_or("path")?;
    let file = dir.join("not-a-device");
    std::fs::write(&file, vec![1u8; 2 << 20])?;
    let out = ferry(&[
        "journal",
        "format",
        j_arg,
        "--device",
        file.to_str().ok_or("path")?,
    ])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.lines().count() == 1 && stderr.contains("not a block device"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(&file)?,
        vec![1u8; 2 << 20],
        "a file was written"
    );

    let Some(loop_device) = require_ok("a loop device", LoopDevice::attach(&file)) else {
        return Ok(());
    };
    let device = loop_device.path().display().to_string();
    // A device someone holds exclusively (as a mount does) is refused, untouched.
    let held = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL)
            .open(&device)
    };
    if let Ok(held) = held {
        let busy = ferry(&["journal", "format", j_arg, "--device", &device])?;
        drop(held);
        let stderr = String::from_utf8_lossy(&busy.stderr);
        assert!(!busy.status.success(), "a held device was registered");
        assert!(stderr.contains("open exclusively"), "{stderr}");
        assert_eq!(
            std::fs::read(&file)?,
            vec![1u8; 2 << 20],
            "a held device was written"
        );
    }
    let out = ferry(&["journal", "format", j_arg, "--device", &device, "--json"]);
    drop(loop_device);
    let out = out?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["capacity_bytes"], 2 << 20);
    assert_eq!(report["device"], device.as_str());
    let link = std::fs::read_link(j.join("spare-0.fjs"))?;
    assert_eq!(link.to_str(), Some(device.as_str()));
    assert!(std::fs::read(&file)?.iter().all(|b| *b == 0), "not zeroed");
    Ok(())
}

/// Writes a medium of `records` flush records (64 bytes each, no payload) of one stream of
/// volume "vm": many records in few bytes.
fn write_many_records(path: &Path, records: u64) -> TestResult {
    use ferry_engine::journal::format::{
        encode_record, MediumHeader, Op, RecordHeader, StreamDef, FLAG_UNSEQUENCED,
    };
    let mut h = RecordHeader {
        op: Op::MediumHeader,
        flags: FLAG_UNSEQUENCED,
        seq: 0,
        stream_id: 1,
        log_id: 0,
        timestamp_ns: 1,
        offset_bytes: 0,
        len_bytes: 0,
        payload_len_bytes: 0,
        payload_crc: 0,
    };
    let medium = MediumHeader {
        journal_id: 9,
        medium_index: 0,
        flags: 0,
        capacity_bytes: 1 << 40,
        prev_valid_end_bytes: u64::MAX,
    };
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut buf = Vec::new();
    encode_record(&mut buf, h, &medium.encode());
    h.op = Op::StreamDef;
    let def = StreamDef {
        volume: "vm".into(),
        queue_index: 0,
    };
    encode_record(&mut buf, h, &def.encode());
    out.write_all(&buf)?;
    h.op = Op::Flush;
    h.flags = 0;
    for seq in 1..=records {
        h.seq = seq;
        h.timestamp_ns = seq;
        buf.clear();
        encode_record(&mut buf, h, &[]);
        out.write_all(&buf)?;
    }
    out.flush()?;
    Ok(())
}

/// Runs `ferry ARGS` (output discarded) and returns whether it succeeded and its own peak
/// resident memory in bytes.
fn ferry_peak_memory(args: &[&str]) -> Result<(bool, u64), Box<dyn std::error::Error>> {
    let child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our child, not yet waited for (`child` is never waited on: dropping a
    // Child neither waits nor kills); `status` and `usage` are valid for writes.
    let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if reaped != pid {
        return Err(std::io::Error::last_os_error().into());
    }
    let succeeded = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    Ok((succeeded, usage.ru_maxrss as u64 * 1024))
}

/// The offline tools hold no per-record state: on a medium of a million records `verify`,
/// `restore` and `export` stay within a bound that an index of every record in memory would
/// exceed (docs/journal.md, *Offline tools*).
#[test]
fn offline_tools_memory_does_not_grow_with_the_records() -> TestResult {
    const RECORDS: u64 = 1_000_000;
    const MEMORY_MAX_BYTES: u64 = 64 << 20;
    let dir = tempfile::tempdir()?;
    let j = dir.path().join("j");
    std::fs::create_dir(&j)?;
    write_many_records(&j.join("medium-000000.fj"), RECORDS)?;
    let base = dir.path().join("base.img");
    std::fs::write(&base, vec![0u8; 4096])?;
    let (j, base) = (j.to_string_lossy(), base.to_string_lossy());
    let out = dir.path().join("out.img");
    let log = dir.path().join("out.log");
    let (out, log) = (out.to_string_lossy(), log.to_string_lossy());
    for args in [
        vec!["journal", "verify", &j, "--json"],
        vec![
            "journal", "restore", &j, "--volume", "vm", "--base", &base, "--out", &out, "--json",
        ],
        vec![
            "journal",
            "export",
            &j,
            "--volume",
            "vm",
            "--format",
            "dm-log-writes",
            "--out",
            &log,
            "--json",
        ],
    ] {
        let (ok, peak) = ferry_peak_memory(&args)?;
        assert!(ok, "ferry {args:?} failed");
        assert!(
            peak < MEMORY_MAX_BYTES,
            "ferry {args:?} peaked at {} MiB over {RECORDS} records",
            peak >> 20
        );
    }
    Ok(())
}
