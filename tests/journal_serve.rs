//! The write journal end to end: `ferry serve --journal` under real libblkio clients (two
//! volumes, two queues each), `ferry journal mark/status/retrieve/init` on the control socket,
//! and the offline `ferry journal verify/restore/export/demux` on what the daemon wrote:
//! restores at marks equal the client's model, SIGKILL in sync mode loses no acknowledged
//! write, async mode catches up on close, a full medium never stops the guest, dm-log-writes
//! and demux agree with restore, and damaged or foreign media are refused with an offset.

#[path = "support/mod.rs"]
mod support;

#[path = "journal_serve/dm_log_writes.rs"]
mod dm_log_writes;
#[path = "journal_serve/rig.rs"]
mod rig;
#[path = "journal_serve/workload.rs"]
mod workload;

use anyhow::{ensure, Context as _, Result};
use rig::{fails, json_lines, ok, Rig};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use support::blkio_client::Op;
use workload::{same_bytes, Model, Phase, Worker};

/// Volume sizes of the two-volume journal.
const SIZES: [u64; 2] = [8 << 20, 6 << 20];
/// Buffer region of each client (holds one phase's data).
const BUF_BYTES: usize = 8 << 20;
/// Extents per random phase.
const PHASE_OPS: usize = 64;

/// What a finished two-volume journal should restore to.
struct Made {
    rig: Rig,
    /// Per volume: the model at mark m1, at mark m2, and at the end.
    at_m1: Vec<Model>,
    at_m2: Vec<Model>,
    at_end: Vec<Model>,
    /// Per volume: every op the client completed, with its queue.
    ops: Vec<Vec<(usize, Op)>>,
    /// `journal retrieve --format jsonl` and `journal status` taken before SIGTERM.
    retrieved: Vec<Value>,
    status: Value,
    mark_seqs: [u64; 2],
}

/// Runs one random phase on every volume at once and applies it to the models.
fn round(
    workers: &[Worker],
    rig: &Rig,
    seed: u64,
    models: &mut [Model],
    ops: &mut [Vec<(usize, Op)>],
) -> Result<()> {
    for (i, w) in workers.iter().enumerate() {
        let phase = Phase::random(seed * 10 + i as u64, rig.vols[i].size_bytes, PHASE_OPS, 2);
        w.start(phase, support::blkio_client::BATCH_TIMEOUT)?;
    }
    for (i, w) in workers.iter().enumerate() {
        let (phase, results) = w.finish()?;
        let done = models[i].apply_completed(&phase, &results)?;
        ensure!(
            done == phase.ops(),
            "volume {i}: {done} of {} ops",
            phase.ops()
        );
        for (q, list) in phase.per_queue.iter().enumerate() {
            ops[i].extend(list.iter().map(|op| (q, *op)));
        }
    }
    Ok(())
}

/// Two volumes with two queues each, sync journal: 2 rounds, mark m1, 2 rounds, mark m2,
/// 1 round; status and retrieve taken before SIGTERM.
fn make_journal() -> Result<Made> {
    make_journal_with("mode=sync")
}

/// The same with `options` for the journal (besides `dir=`).
fn make_journal_with(options: &str) -> Result<Made> {
    make_journal_on(Rig::new(&SIZES)?, options)
}

/// The same on `rig`.
fn make_journal_on(rig: Rig, options: &str) -> Result<Made> {
    let mut daemon = rig.serve(options, 2)?;
    let mut models: Vec<Model> = rig
        .vols
        .iter()
        .map(|v| Model::from_file(&v.base))
        .collect::<Result<_>>()?;
    let mut ops = vec![Vec::new(); rig.vols.len()];
    let workers: Vec<Worker> = rig
        .vols
        .iter()
        .map(|v| Worker::connect(&v.socket, 2, BUF_BYTES))
        .collect::<Result<_>>()?;
    for seed in 1..=2 {
        round(&workers, &rig, seed, &mut models, &mut ops)?;
    }
    let m1 = rig.mark("m1")?;
    let at_m1 = models.clone();
    for seed in 3..=4 {
        round(&workers, &rig, seed, &mut models, &mut ops)?;
    }
    let m2 = rig.mark("m2")?;
    let at_m2 = models.clone();
    round(&workers, &rig, 5, &mut models, &mut ops)?;
    let status = rig.status()?;
    let human = rig.control_cmd("status", &[])?;
    ensure!(
        human.starts_with("journal: running, sync mode")
            && human.contains(&format!("next seq {}", status["next_seq"]))
            && (status["committer"] != "queue" || human.contains("made by the queue threads")),
        "human status:\n{human}"
    );
    let retrieved = json_lines(&rig.control_cmd("retrieve", &["--format", "jsonl"])?)?;
    // The same log read in pages of 7 entries (the CLI follows next_seq).
    let paged = json_lines(&rig.control_cmd("retrieve", &["--format", "jsonl", "--page", "7"])?)?;
    ensure!(
        retrieved.len() > 7 && paged == retrieved,
        "paged retrieve: {} entries, one-page retrieve: {}",
        paged.len(),
        retrieved.len()
    );
    // Replies echo the request's id, whether built as a value or written as text.
    for command in ["journal-status", "journal-retrieve"] {
        let reply = rig::control_line(
            &rig.control,
            &serde_json::json!({ "command": command, "arguments": { "limit": 2 }, "id": "r7" }),
        )?;
        ensure!(
            reply["id"] == "r7" && reply["return"].is_object(),
            "{command}: {reply}"
        );
    }
    let page = rig::control_reply(
        &rig.control,
        "journal-retrieve",
        serde_json::json!({ "since_seq": 2, "limit": 3 }),
    )?;
    ensure!(
        page["return"]["entries"] == serde_json::json!(retrieved[1..4])
            && page["return"]["next_seq"] == 5
            && page["return"]["log_first_seq"] == 1,
        "a page of three from seq 2: {page}"
    );
    for bad in [0, 65537] {
        let reply = rig::control_reply(
            &rig.control,
            "journal-retrieve",
            serde_json::json!({ "limit": bad }),
        )?;
        ensure!(
            reply["error"]["class"] == "InvalidParameter",
            "limit {bad}: {reply}"
        );
    }
    drop(workers);
    rig::stop(&mut daemon)?;
    Ok(Made {
        rig,
        at_m1,
        at_m2,
        at_end: models,
        ops,
        retrieved,
        status,
        mark_seqs: [m1, m2],
    })
}

/// Stream id -> (volume, queue), from `ferry journal list DIR --json`.
fn stream_table(jdir: &Path) -> Result<BTreeMap<u64, (String, u64)>> {
    let list = ok(&["journal", "list", &jdir.display().to_string(), "--json"])?;
    let mut streams = BTreeMap::new();
    for r in json_lines(&list.stdout)? {
        if r["op"] == "stream-def" {
            let id = r["stream_id"].as_u64().context("stream id")?;
            let vol = r["volume"].as_str().context("volume")?.to_string();
            streams.insert(id, (vol, r["queue"].as_u64().context("queue")?));
        }
    }
    Ok(streams)
}

/// (queue, op name, offset, length) of a client op, as the journal's log names it.
fn op_key(queue: usize, op: &Op) -> (u64, &'static str, u64, u64) {
    let q = queue as u64;
    match *op {
        Op::Write {
            offset_bytes,
            len_bytes,
            ..
        } => (q, "write", offset_bytes, len_bytes as u64),
        Op::Discard {
            offset_bytes,
            len_bytes,
        } => (q, "discard", offset_bytes, len_bytes),
        Op::WriteZeroes {
            offset_bytes,
            len_bytes,
            ..
        } => (q, "write-zeroes", offset_bytes, len_bytes),
        Op::Flush => (q, "flush", 0, 0),
        Op::Read { .. } => (q, "read", 0, 0),
    }
}

#[test]
fn two_volumes_restore_at_marks_and_to_the_end() -> Result<()> {
    check_restores(&make_journal()?)
}

/// The same with the group commits made by the daemon's queue threads (the default on
/// tmpfs): four queues committing each other's records.
#[test]
fn two_volumes_committed_by_queue_threads_restore_at_marks_and_to_the_end() -> Result<()> {
    let made = make_journal_with("mode=sync,committer=queue")?;
    ensure!(
        made.status["committer"] == "queue" && made.status["queue_commits"].as_u64() > Some(0),
        "status: {}",
        made.status
    );
    check_restores(&made)
}

/// The same with the journal on tmpfs: the queue threads append records straight into a
/// mapping of the medium (`mapped=auto`), durable when the write is submitted.
#[test]
fn two_volumes_on_mapped_media_restore_at_marks_and_to_the_end() -> Result<()> {
    let made = make_journal_on(Rig::new(&SIZES)?.journal_in_memory()?, "mode=sync")?;
    ensure!(
        made.status["appends"] == "mapped" && made.status["mapped_records"].as_u64() > Some(0),
        "status: {}",
        made.status
    );
    check_restores(&made)
}

fn check_restores(made: &Made) -> Result<()> {
    let rig = &made.rig;
    let jdir = rig.jdir.display().to_string();
    let verify = ok(&["journal", "verify", &jdir])?;
    ensure!(
        verify.stdout.contains("0 problem(s)"),
        "verify: {}",
        verify.stdout
    );
    for (i, vol) in rig.vols.iter().enumerate() {
        let cases = [
            (Some("mark:m1"), &made.at_m1[i]),
            (Some("mark:m2"), &made.at_m2[i]),
            (None, &made.at_end[i]),
        ];
        for (n, (until, model)) in cases.into_iter().enumerate() {
            let out = rig.restore(&[&rig.jdir], vol, until, &format!("{}.r{n}", vol.name), &[])?;
            model.check_file(&out, &format!("{} restored until {until:?}", vol.name))?;
        }
        // The live image after SIGTERM is the end of the journal.
        made.at_end[i].check_file(&vol.image, &format!("{} live image", vol.name))?;
        // A sequence number between the marks is accepted as well.
        let seq = format!("seq:{}", made.mark_seqs[0]);
        let out = rig.restore(
            &[&rig.jdir],
            vol,
            Some(&seq),
            &format!("{}.rs", vol.name),
            &[],
        )?;
        made.at_m1[i].check_file(&out, "restore until the mark's seq")?;
    }
    Ok(())
}

#[test]
fn status_and_retrieve_describe_the_journal() -> Result<()> {
    let made = make_journal()?;
    let s = &made.status;
    ensure!(s["state"] == "running" && s["mode"] == "sync", "status {s}");
    ensure!(
        s["reason"].is_null() && s["open_gap"].is_null(),
        "status {s}"
    );
    ensure!(
        s["gaps"].as_array().is_some_and(Vec::is_empty),
        "status {s}"
    );
    ensure!(s["medium"] == 0 && s["label"] == "initial", "status {s}");
    ensure!(s["lag_bytes"] == 0, "sync mode has no lag: {s}");
    let next = s["next_seq"].as_u64().context("next_seq")?;
    ensure!(
        s["durable_seq"] == next - 1,
        "all durable in sync mode: {s}"
    );
    ensure!(
        s["log_entries"].as_u64() == Some(made.retrieved.len() as u64),
        "status counts {} entries, retrieve returned {}",
        s["log_entries"],
        made.retrieved.len()
    );
    ensure!(
        s["log_dropped"] == 0
            && s["log_first_seq"] == 1
            && s["log_max_entries"].as_u64() > Some(4_000_000),
        "the default log-memory=256M holds millions of entries and dropped none: {s}"
    );
    ensure!(
        s["records"].as_u64() >= Some(made.retrieved.len() as u64),
        "records {s}"
    );
    let commits = s["group_commits"].as_u64().unwrap_or(0);
    ensure!(
        commits >= 1 && Some(commits) <= s["records"].as_u64(),
        "group commits between 1 and the records: {s}"
    );
    // Every entry durable, consecutive, on medium 0, and marks where they were made.
    let seqs: Vec<u64> = made
        .retrieved
        .iter()
        .filter_map(|e| e["seq"].as_u64())
        .collect();
    ensure!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1) && seqs.len() == made.retrieved.len(),
        "retrieve: sequence numbers not consecutive"
    );
    ensure!(
        seqs.last() == Some(&(next - 1)),
        "last entry is not the last seq"
    );
    for (seq, label) in made.mark_seqs.iter().zip(["m1", "m2"]) {
        let e = &made.retrieved[(seq - seqs[0]) as usize];
        ensure!(e["op"] == "mark" && e["stream_id"] == 0, "{label}: {e}");
    }
    // The records of each (volume, queue) stream are exactly the ops the client completed
    // on that volume and queue.
    let streams = stream_table(&made.rig.jdir)?;
    for (i, vol) in made.rig.vols.iter().enumerate() {
        let ids: BTreeMap<u64, u64> = streams
            .iter()
            .filter(|(_, (v, _))| *v == vol.name)
            .map(|(id, (_, q))| (*id, *q))
            .collect();
        ensure!(
            ids.values().copied().collect::<Vec<_>>() == [0, 1],
            "{}: streams {ids:?} (want queues 0 and 1)",
            vol.name
        );
        let mut got: Vec<(u64, String, u64, u64)> = Vec::new();
        for e in &made.retrieved {
            if let Some(q) = e["stream_id"].as_u64().and_then(|id| ids.get(&id)) {
                if e["op"] == "stream-def" {
                    continue;
                }
                got.push((
                    *q,
                    e["op"].as_str().unwrap_or("?").to_string(),
                    e["offset_bytes"].as_u64().unwrap_or(u64::MAX),
                    e["len_bytes"].as_u64().unwrap_or(u64::MAX),
                ));
            }
        }
        let mut want: Vec<(u64, String, u64, u64)> = Vec::new();
        for (q, op) in &made.ops[i] {
            let (q, name, o, l) = op_key(*q, op);
            want.push((q, name.to_string(), o, l));
            // virtio-blk has no FUA: libblkio sends a flush after a FUA write.
            if matches!(op, Op::Write { fua: true, .. }) {
                want.push((q, "flush".into(), 0, 0));
            }
        }
        got.sort();
        want.sort();
        ensure!(
            got == want,
            "{}: the journal's records differ from the client's ops ({} vs {})",
            vol.name,
            got.len(),
            want.len()
        );
    }
    Ok(())
}

#[test]
fn dm_log_writes_export_replays_to_the_restore() -> Result<()> {
    let made = make_journal()?;
    let rig = &made.rig;
    let jdir = rig.jdir.display().to_string();
    for (i, vol) in rig.vols.iter().enumerate() {
        let log_path = rig.path(&format!("{}.dmlog", vol.name));
        let lp = log_path.display().to_string();
        ok(&[
            "journal",
            "export",
            &jdir,
            "--volume",
            &vol.name,
            "--format",
            "dm-log-writes",
            "--out",
            &lp,
        ])?;
        let log = dm_log_writes::decode(std::fs::read(&log_path)?)?;
        ensure!(log.sector_bytes == 512, "sector size {}", log.sector_bytes);
        let marks: Vec<&str> = log
            .entries
            .iter()
            .filter_map(|e| e.mark.as_deref())
            .collect();
        ensure!(marks == ["m1", "m2"], "marks in the log: {marks:?}");
        let count = |flag: u64| log.entries.iter().filter(|e| e.flags & flag != 0).count();
        let discards = made.ops[i]
            .iter()
            .filter(|(_, op)| matches!(op, Op::Discard { .. }))
            .count();
        // libblkio sends a flush after each FUA write (virtio-blk has no FUA).
        let flushes = made.ops[i]
            .iter()
            .filter(|(_, op)| matches!(op, Op::Flush | Op::Write { fua: true, .. }))
            .count();
        ensure!(count(dm_log_writes::DISCARD) == discards, "discard entries");
        ensure!(count(dm_log_writes::FLUSH) == flushes, "flush entries");
        let base = std::fs::read(&vol.base)?;
        let restored_end = std::fs::read(rig.restore(&[&rig.jdir], vol, None, "end", &[])?)?;
        let restored_m1 =
            std::fs::read(rig.restore(&[&rig.jdir], vol, Some("mark:m1"), "m1", &[])?)?;
        let mut image = base.clone();
        log.replay(&mut image, None)?;
        same_bytes(&image, &restored_end, "dm-log-writes replay vs restore")?;
        let mut image = base;
        log.replay(&mut image, Some("m1"))?;
        same_bytes(
            &image,
            &restored_m1,
            "dm-log-writes replay to m1 vs restore",
        )?;
    }
    Ok(())
}

#[test]
fn demuxed_streams_restore_like_the_journal() -> Result<()> {
    let made = make_journal()?;
    let rig = &made.rig;
    let out_dir = rig.path("demux");
    let demux = ok(&[
        "journal",
        "demux",
        &rig.jdir.display().to_string(),
        "--out-dir",
        &out_dir.display().to_string(),
        "--json",
    ])?;
    let outputs: Value = serde_json::from_str(&demux.stdout).context("demux --json")?;
    ensure!(
        outputs.as_array().map(Vec::len) == Some(4),
        "demux: {outputs}"
    );
    for vol in &rig.vols {
        let dirs: Vec<std::path::PathBuf> = (0..2)
            .map(|q| out_dir.join(format!("{}.q{q}", vol.name)))
            .collect();
        let inputs: Vec<&Path> = dirs.iter().map(|d| d.as_path()).collect();
        let shown: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        let mut args = vec!["journal", "verify"];
        args.extend(shown.iter().map(String::as_str));
        ok(&args)?;
        for until in [None, Some("mark:m1")] {
            let tag = until.map_or("end", |_| "m1");
            let whole = rig.restore(
                &[&rig.jdir],
                vol,
                until,
                &format!("{}.w{tag}", vol.name),
                &[],
            )?;
            let split = rig.restore(&inputs, vol, until, &format!("{}.d{tag}", vol.name), &[])?;
            same_bytes(
                &std::fs::read(split)?,
                &std::fs::read(whole)?,
                &format!("{}: demuxed restore until {until:?}", vol.name),
            )?;
        }
    }
    Ok(())
}

/// Positions of sequenced write records on medium 0, from `ferry journal list --json`.
fn write_positions(medium: &Path) -> Result<Vec<(u64, u64)>> {
    let list = ok(&["journal", "list", &medium.display().to_string(), "--json"])?;
    Ok(json_lines(&list.stdout)?
        .iter()
        .filter(|r| r["op"] == "write")
        .filter_map(|r| Some((r["position_bytes"].as_u64()?, r["len_bytes"].as_u64()?)))
        .collect())
}

#[test]
fn damaged_and_foreign_media_are_refused_with_the_offset() -> Result<()> {
    let made = make_journal()?;
    let rig = &made.rig;
    let medium = rig.jdir.join("medium-000000.fj");
    let bytes = std::fs::read(&medium)?;
    let writes = write_positions(&medium)?;
    ensure!(writes.len() > 10, "too few writes on the medium");
    let (pos_t, _) = writes[writes.len() / 2];
    let (pos_p, len_p) = writes[writes.len() / 3];
    let (pos_h, _) = writes[writes.len() / 4];
    let verify = |path: &Path| fails(&["journal", "verify", &path.display().to_string()]);

    // Truncated in the middle of a record: a torn tail at that record.
    let truncated = rig.path("truncated.fj");
    std::fs::write(&truncated, &bytes[..pos_t as usize + 64 + 100])?;
    let v = verify(&truncated)?;
    ensure!(
        v.stdout.contains(&format!("TORN TAIL at offset {pos_t}")),
        "truncated: {}",
        v.stdout
    );

    // One byte of a payload flipped: that record is bad, the ones after it are still read.
    let mut corrupt = bytes.clone();
    corrupt[(pos_p + 64 + len_p / 2) as usize] ^= 0x40;
    let payload_bad = rig.path("payload.fj");
    std::fs::write(&payload_bad, &corrupt)?;
    let v = verify(&payload_bad)?;
    ensure!(
        v.stdout
            .contains(&format!("BAD RECORD at offset {pos_p}: payload checksum")),
        "payload: {}",
        v.stdout
    );
    // ...and a restore across it refuses (a record is missing) unless told otherwise.
    let vol = &rig.vols[0];
    let out = rig.path("bad.out");
    let r = rig::restore_cmd(&[&payload_bad], vol, None, &out, &[])?;
    ensure!(
        r.status.code() == Some(1) && r.stderr.contains("--allow-gaps"),
        "restore across a bad record: {} {}",
        r.status,
        r.stderr
    );
    let r = rig::restore_cmd(&[&payload_bad], vol, None, &out, &["--allow-gaps"])?;
    ensure!(r.status.success(), "restore --allow-gaps: {}", r.stderr);

    // One byte of a header flipped.
    let mut corrupt = bytes.clone();
    corrupt[pos_h as usize + 20] ^= 0x01;
    let header_bad = rig.path("header.fj");
    std::fs::write(&header_bad, &corrupt)?;
    let v = verify(&header_bad)?;
    ensure!(
        v.stdout
            .contains(&format!("BAD RECORD at offset {pos_h}: header checksum")),
        "header: {}",
        v.stdout
    );

    // Foreign files: a disk image, and bytes that start with the record magic.
    let mut magic_junk = b"FJRN".to_vec();
    magic_junk.extend(support::pattern(77, 8192));
    let junk = rig.path("junk.fj");
    std::fs::write(&junk, &magic_junk)?;
    for foreign in [vol.base.as_path(), junk.as_path()] {
        let shown = foreign.display().to_string();
        for args in [
            vec!["journal", "verify", &shown],
            vec!["journal", "list", &shown],
            vec![
                "journal",
                "export",
                &shown,
                "--volume",
                "v0",
                "--format",
                "dm-log-writes",
                "--out",
                "/dev/null",
            ],
        ] {
            let f = fails(&args)?;
            ensure!(
                f.stderr.contains("not a ferry journal medium") && f.stderr.contains("at offset 0"),
                "{args:?}: {}",
                f.stderr
            );
        }
        let r = rig::restore_cmd(&[foreign], vol, None, &out, &[])?;
        ensure!(
            r.status.code() == Some(1) && r.stderr.contains("at offset 0"),
            "restore of a foreign file: {}",
            r.stderr
        );
    }
    let missing = rig.path("no-such-medium.fj");
    let f = verify(&missing)?;
    ensure!(
        f.stderr.contains("no-such-medium.fj"),
        "missing: {}",
        f.stderr
    );
    Ok(())
}

/// SIGKILL with many writes in flight in sync mode, then a restart on the same journal
/// directory: every write the client saw complete is in the journal; the journal goes on
/// on a new medium; verify is clean; restore to the end equals the live image.
#[test]
fn sigkill_in_sync_mode_loses_no_acknowledged_write() -> Result<()> {
    sigkill_case("mode=sync")
}

/// The same with the group commits made by the queue threads.
#[test]
fn sigkill_with_queue_commits_loses_no_acknowledged_write() -> Result<()> {
    sigkill_case("mode=sync,committer=queue")
}

/// The same with the journal on tmpfs, records appended through the mapped medium: the
/// killed daemon leaves a medium as long as its capacity, zeros after its last record.
#[test]
fn sigkill_on_mapped_media_loses_no_acknowledged_write() -> Result<()> {
    // Records are durable when their writes are submitted, before the image has them: wait
    // for more than the 128 the client keeps in flight, so that some are acknowledged.
    sigkill_case_on(
        Rig::new(&[KILL_VOLUME_BYTES])?.journal_in_memory()?,
        "mode=sync",
        192,
    )
}

/// The volume of the SIGKILL tests: room for the killed batch (2048 x 16 KiB).
const KILL_VOLUME_BYTES: u64 = 48 << 20;

fn sigkill_case(options: &str) -> Result<()> {
    sigkill_case_on(Rig::new(&[KILL_VOLUME_BYTES])?, options, 64)
}

/// SIGKILL once `durable_before_kill` writes of the killed batch are durable in the journal.
fn sigkill_case_on(rig: Rig, options: &str, durable_before_kill: u64) -> Result<()> {
    const BLOCK: usize = 16 << 10;
    // Long enough that the status polling below (a control request each, slow in a debug
    // build on a loaded machine) sees the threshold before the batch is over: with 512
    // writes the whole batch was once acknowledged before the kill.
    const KILL_WRITES: usize = 2048;
    let vol = &rig.vols[0];
    let mut daemon = rig.serve(options, 2)?;
    let mut model = Model::from_file(&vol.base)?;
    let worker = Worker::connect(&vol.socket, 2, BUF_BYTES)?;
    for seed in 1..=2 {
        let phase = worker.run_ok(Phase::random(seed, vol.size_bytes, PHASE_OPS, 2))?;
        model.apply_all(&phase);
    }
    // The killed batch: 2048 writes of 16 KiB on two queues; SIGKILL once some of them are
    // durable in the journal (so some are acknowledged and many are still in flight).
    let pid = nix::unistd::Pid::from_raw(i32::try_from(daemon.pid())?);
    let seq_of = |s: &Value, k: &str| s[k].as_u64().context("status without sequence numbers");
    let start_seq = seq_of(
        &rig::control_request(&rig.control, "journal-status")?,
        "next_seq",
    )?;
    worker.start(
        Phase::sequential(31, 0, KILL_WRITES, BLOCK, 128, 2),
        Duration::from_secs(5),
    )?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while seq_of(
        &rig::control_request(&rig.control, "journal-status")?,
        "durable_seq",
    )? < start_seq + durable_before_kill
    {
        ensure!(
            std::time::Instant::now() < deadline,
            "the batch made no progress"
        );
    }
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL)?;
    let (kill_phase, results) = worker.finish()?;
    // A request the daemon never answered (or that failed as it died) was not acknowledged.
    let results: workload::Results = results
        .into_iter()
        .map(|q| q.into_iter().map(|r| r.filter(|&r| r == 0)).collect())
        .collect();
    let status = daemon.wait_exit(rig::EXIT_TIMEOUT)?;
    ensure!(!status.success(), "the daemon survived SIGKILL");
    let before = model.clone();
    let acked = model.apply_completed(&kill_phase, &results)?;
    eprintln!("killed batch: {acked} of {KILL_WRITES} writes acknowledged");
    ensure!(acked < KILL_WRITES, "SIGKILL came after the whole batch");
    drop(worker);

    // Offline, before any restart: the journal holds every acknowledged write; a write
    // in flight is either wholly there or not at all.
    let pre = rig.restore(&[&rig.jdir], vol, None, "pre", &[])?;
    let pre_bytes = std::fs::read(&pre)?;
    let mut expect = model.clone();
    for (q, ops) in kill_phase.per_queue.iter().enumerate() {
        for (i, op) in ops.iter().enumerate() {
            let Op::Write {
                offset_bytes,
                len_bytes,
                buf_offset,
                ..
            } = *op
            else {
                continue;
            };
            if results[q][i] == Some(0) {
                continue;
            }
            let r = offset_bytes as usize..offset_bytes as usize + len_bytes;
            let new = &kill_phase.stage[buf_offset..buf_offset + len_bytes];
            ensure!(
                pre_bytes[r.clone()] == before.bytes[r.clone()] || pre_bytes[r.clone()] == *new,
                "a write in flight at the kill is torn in the journal (offset {offset_bytes})"
            );
            expect.bytes[r.clone()].copy_from_slice(&pre_bytes[r]);
        }
    }
    same_bytes(
        &pre_bytes,
        &expect.bytes,
        "restore after SIGKILL vs acknowledged writes",
    )?;
    let v = rig::run(&[
        "journal",
        "verify",
        &rig.jdir.display().to_string(),
        "--json",
    ])?;
    let report: Value = serde_json::from_str(&v.stdout).context("verify --json")?;
    let last_seq = report["last_seq"].as_u64().context("last_seq")?;

    // A crash can leave the file extended past the last durable append: simulate that torn
    // tail (a block that never got its data) so the recovery path is always taken.
    let medium0 = rig.jdir.join("medium-000000.fj");
    let valid_end = std::fs::metadata(&medium0)?.len();
    {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new().append(true).open(&medium0)?;
        f.write_all(&[0u8; 4096])?;
    }
    let v = rig::run(&["journal", "verify", &rig.jdir.display().to_string()])?;
    ensure!(
        !v.status.success() && v.stdout.contains("TORN TAIL"),
        "an unrecovered torn tail is a problem: {}",
        v.stdout
    );

    // Restart on the same directory; the journal continues on medium 1.
    let mut daemon = rig.serve(options, 2)?;
    let s = rig.status()?;
    ensure!(
        s["recovered_torn_tail"]["medium"] == 0
            && s["recovered_torn_tail"]["torn_bytes"].as_u64() >= Some(4096)
            && s["recovered_torn_tail"]["valid_end_bytes"].as_u64() <= Some(valid_end),
        "status after recovery: {s}"
    );
    ensure!(s["next_seq"] == last_seq + 1, "sequence continues: {s}");
    let worker = Worker::connect(&vol.socket, 2, BUF_BYTES)?;
    // Rewrite every block of the killed batch (in flight = undefined), then more.
    let phase = worker.run_ok(Phase::sequential(32, 0, KILL_WRITES, BLOCK, 128, 2))?;
    model.apply_all(&phase);
    let phase = worker.run_ok(Phase::random(33, vol.size_bytes, PHASE_OPS, 2))?;
    model.apply_all(&phase);
    ensure!(rig.status()?["medium"] == 1, "new medium");
    drop(worker);
    rig::stop(&mut daemon)?;

    model.check_file(&vol.image, "live image")?;
    let v = ok(&["journal", "verify", &rig.jdir.display().to_string()])?;
    ensure!(
        v.stdout.contains("cut on recovery (ok)") && v.stdout.contains("0 problem(s)"),
        "verify after recovery: {}",
        v.stdout
    );
    let end = rig.restore(&[&rig.jdir], vol, None, "end", &[])?;
    model.check_file(&end, "restore to the end after the restart")?;
    let until = format!("seq:{last_seq}");
    let again = rig.restore(&[&rig.jdir], vol, Some(&until), "again", &[])?;
    same_bytes(
        &std::fs::read(again)?,
        &pre_bytes,
        "restore to the pre-kill end",
    )?;
    Ok(())
}

/// Async mode: writes complete without waiting; status shows the lag while they run; the
/// close on SIGTERM writes the rest, so restore to the end equals the live image.
#[test]
fn async_mode_reports_lag_and_catches_up_on_close() -> Result<()> {
    let rig = Rig::new(&[16 << 20])?;
    let vol = &rig.vols[0];
    let mut daemon = rig.serve("mode=async,lag-max=1M", 2)?;
    let mut model = Model::from_file(&vol.base)?;
    let worker = Worker::connect(&vol.socket, 2, BUF_BYTES)?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let (control, stop) = (rig.control.clone(), stop.clone());
        std::thread::spawn(move || -> Result<u64> {
            let mut max_lag = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let s = rig::control_request(&control, "journal-status")?;
                ensure!(s["mode"] == "async", "status {s}");
                max_lag = max_lag.max(s["lag_bytes"].as_u64().context("lag_bytes")?);
            }
            Ok(max_lag)
        })
    };
    for seed in 0..3 {
        let phase = worker.run_ok(Phase::sequential(40 + seed, 0, 256, 64 << 10, 64, 2))?;
        model.apply_all(&phase);
        let phase = worker.run_ok(Phase::random(50 + seed, vol.size_bytes, PHASE_OPS, 2))?;
        model.apply_all(&phase);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let max_lag = poller
        .join()
        .map_err(|_| anyhow::anyhow!("poller panicked"))??;
    eprintln!("largest lag seen: {max_lag} bytes");
    ensure!(
        max_lag > 0,
        "status never showed a lag during 60 MiB of async writes"
    );
    let s = rig.status()?;
    ensure!(s["state"] == "running", "status {s}");
    drop(worker);
    rig::stop(&mut daemon)?;
    model.check_file(&vol.image, "live image")?;
    ok(&["journal", "verify", &rig.jdir.display().to_string()])?;
    let end = rig.restore(&[&rig.jdir], vol, None, "end", &[])?;
    model.check_file(&end, "async restore to the end")?;
    Ok(())
}

/// capacity=256K, media-max=1: the medium fills, journaling stops with an open gap, every
/// guest write still succeeds. After archiving the medium, `journal init` restarts it and
/// records the gap; restore across the gap is refused without --allow-gaps.
#[test]
fn a_full_medium_never_stops_the_guest() -> Result<()> {
    let rig = Rig::new(&[8 << 20])?;
    let vol = &rig.vols[0];
    let mut daemon = rig.serve("mode=sync,capacity=256K,media-max=1", 2)?;
    let mut model = Model::from_file(&vol.base)?;
    let worker = Worker::connect(&vol.socket, 2, BUF_BYTES)?;
    for seed in 0..4 {
        // 4 x 2 MiB: far more than the medium holds; run_ok: every write succeeds.
        let phase = worker.run_ok(Phase::sequential(60 + seed, 0, 128, 16 << 10, 128, 2))?;
        model.apply_all(&phase);
    }
    let s = rig.status()?;
    ensure!(s["state"] == "stopped", "status {s}");
    ensure!(
        s["reason"].as_str().is_some_and(|r| r.contains("full")),
        "reason {s}"
    );
    let gap_count = s["open_gap"]["missing_count"].as_u64().unwrap_or(0);
    ensure!(gap_count > 0, "open gap {s}");
    let f = fails(&[
        "journal",
        "mark",
        "--control",
        &rig.control.display().to_string(),
        "--label",
        "x",
    ])?;
    ensure!(
        f.stderr.contains("stopped"),
        "mark while stopped: {}",
        f.stderr
    );
    ensure!(
        std::fs::read_dir(&rig.jdir)?
            .filter(|e| e
                .as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".fj")))
            .count()
            == 1,
        "media-max=1 allows one medium file"
    );
    model.check_file(&vol.image, "live image while stopped")?;

    // Move the full medium away; init restarts the journal on a new medium with a gap record.
    let archive = rig.path("archive");
    std::fs::create_dir(&archive)?;
    std::fs::rename(
        rig.jdir.join("medium-000000.fj"),
        archive.join("medium-000000.fj"),
    )?;
    rig.control_cmd("init", &["--label", "after-gap"])?;
    let s = rig.status()?;
    ensure!(
        s["state"] == "running" && s["gaps"].as_array().map(Vec::len) == Some(1),
        "after init: {s}"
    );
    let phase = worker.run_ok(Phase::sequential(70, 16, 8, 4096, 8, 2))?;
    model.apply_all(&phase);
    drop(worker);
    rig::stop(&mut daemon)?;

    let inputs: [&Path; 2] = [&archive, &rig.jdir];
    let shown: Vec<String> = inputs.iter().map(|p| p.display().to_string()).collect();
    let v = fails(&["journal", "verify", &shown[0], &shown[1]])?;
    ensure!(
        v.stdout.contains("gap recorded by the journal"),
        "verify: {}",
        v.stdout
    );
    let out = rig.path("out");
    let r = rig::restore_cmd(&inputs, vol, None, &out, &[])?;
    ensure!(
        r.status.code() == Some(1) && r.stderr.contains("journaling was stopped"),
        "restore across the gap: {} {}",
        r.status,
        r.stderr
    );
    let out = rig.restore(&inputs, vol, None, "out", &["--allow-gaps"])?;
    // The writes after init are in the restore.
    let restored = std::fs::read(out)?;
    let r = 16 * 4096..24 * 4096;
    same_bytes(&restored[r.clone()], &model.bytes[r], "writes after init")?;
    Ok(())
}
