//! `ferry journal list|verify|restore|demux|export|format`: offline tools that read (or
//! prepare) media on disk, with progress bars on a terminal; no daemon involved.

use std::path::{Path, PathBuf};

use ferry_engine::journal::demux::demux;
use ferry_engine::journal::device::register_device;
use ferry_engine::journal::export::export_dm_log_writes;
use ferry_engine::journal::format::StopInfo;
use ferry_engine::journal::media::{MediaSet, Phase};
use ferry_engine::journal::restore::{restore, RestoreOptions};
use ferry_engine::journal::spares::format_spares;
use ferry_engine::journal::verify::{verify, VerifyReport};
use serde_json::json;

/// `ferry journal demux`: one journal per stream (volume + queue) in `out_dir`.
pub fn demux_streams(media: &[PathBuf], out_dir: &Path, json: bool) -> anyhow::Result<()> {
    let set = open_media(media, json)?;
    let outputs = demux(&set, out_dir)?;
    if json {
        println!("{}", serde_json::to_string(&outputs)?);
    } else {
        for o in outputs {
            println!(
                "stream {} ({} queue {}): {} records -> {}",
                o.stream_id,
                o.volume,
                o.queue_index,
                o.records,
                o.path.display()
            );
        }
    }
    Ok(())
}

/// `ferry journal export --format dm-log-writes`: one volume's writes as a dm-log-writes log.
pub fn export_volume(
    media: &[PathBuf],
    volume: &str,
    out: &Path,
    json: bool,
) -> anyhow::Result<()> {
    let set = open_media(media, json)?;
    let report = export_dm_log_writes(&set, volume, out)?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{}: {} entries, {} bytes -> {}",
            volume,
            report.entries,
            report.bytes,
            out.display()
        );
    }
    Ok(())
}

/// `ferry journal format`: registers `devices` as media, then formats spares when asked.
pub fn format(
    dir: &Path,
    spares: Option<u32>,
    capacity: Option<&str>,
    devices: &[PathBuf],
    json: bool,
) -> anyhow::Result<()> {
    for d in devices {
        run_register_device(dir, d, json)?;
    }
    match (spares, capacity) {
        (Some(spares), Some(capacity)) => run_format(dir, spares, capacity, json),
        _ => Ok(()),
    }
}

fn run_register_device(dir: &Path, device: &Path, json: bool) -> anyhow::Result<()> {
    let message = format!("zeroing {}", device.display());
    let report = with_byte_progress(json, message, |progress| {
        register_device(dir, device, progress)
    })?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{}: registered {} as a medium of {} bytes",
            dir.display(),
            report.device.display(),
            report.capacity_bytes
        );
    }
    Ok(())
}

fn run_format(dir: &Path, spares: u32, capacity: &str, json: bool) -> anyhow::Result<()> {
    let capacity_bytes = ferry_engine::journal::options::parse_size("--capacity", capacity)?;
    anyhow::ensure!(
        capacity_bytes >= ferry_engine::journal::options::CAPACITY_MIN_BYTES,
        "--capacity must be at least 256K"
    );
    let message = format!("formatting spares in {}", dir.display());
    let report = with_byte_progress(json, message, |progress| {
        format_spares(dir, spares, capacity_bytes, progress)
    })?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{}: {} spare(s) of {} bytes ({} created, {} bytes written)",
            report.dir.display(),
            report.spares,
            report.capacity_bytes,
            report.created,
            report.bytes_written
        );
    }
    Ok(())
}

/// `ferry journal list`: every record of the media (of one volume with `stream`), a line each.
pub fn list(media: &[PathBuf], stream: Option<&str>, json: bool) -> anyhow::Result<()> {
    let set = open_media(media, json)?;
    let only = stream.map(|v| set.streams_of(v));
    if let (Some(v), Some(ids)) = (stream, &only) {
        anyhow::ensure!(!ids.is_empty(), "volume {v:?} is not in the journal");
    }
    for (mi, m) in set.media.iter().enumerate() {
        for r in m.live_records() {
            let r = r?;
            let h = r.header;
            if let Some(ids) = &only {
                if h.stream_id != 0 && !ids.contains(&h.stream_id) {
                    continue;
                }
            }
            let def = set.streams.get(&h.stream_id);
            let label = match h.op.name() {
                "mark" | "log-init" => Some(String::from_utf8_lossy(&m.payload(&r)?).into_owned()),
                "stop" => StopInfo::decode(&m.payload(&r)?).ok().map(|s| {
                    format!(
                        "{}: {} (writes from seq {} not journaled)",
                        s.cause.name(),
                        s.reason,
                        s.first_unjournaled_seq
                    )
                }),
                _ => None,
            };
            if json {
                let line = json!({
                    "seq": h.seq, "sequenced": h.is_sequenced(), "op": h.op, "stream_id": h.stream_id,
                    "volume": def.map(|d| d.volume.clone()), "queue": def.map(|d| d.queue_index),
                    "log_id": h.log_id, "timestamp_ns": h.timestamp_ns, "offset_bytes": h.offset_bytes,
                    "len_bytes": h.len_bytes, "medium": m.index(), "file": mi, "path": m.path,
                    "position_bytes": r.position_bytes, "label": label,
                });
                println!("{line}");
            } else {
                let who =
                    def.map_or_else(String::new, |d| format!("{}/q{}", d.volume, d.queue_index));
                let seq = if h.is_sequenced() {
                    h.seq.to_string()
                } else {
                    "-".into()
                };
                println!(
                    "{seq:>8} {:<13} {who:<12} off={:<10} len={:<8} log={} @{}:{}{}",
                    h.op.name(),
                    h.offset_bytes,
                    h.len_bytes,
                    h.log_id,
                    m.path.display(),
                    r.position_bytes,
                    label.map(|l| format!(" {l:?}")).unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}

/// `ferry journal verify`: checksums, sequence breaks, torn tails and stops; an error when
/// any problem is found.
pub fn verify_media(media: &[PathBuf], json: bool) -> anyhow::Result<()> {
    let set = open_media(media, json)?;
    let report = verify(&set);
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_verify_report(&report);
    }
    anyhow::ensure!(report.ok(), "{} problem(s) found", report.problems);
    Ok(())
}

/// The verify report for a person: each medium, then the breaks, stops and errors.
fn print_verify_report(report: &VerifyReport) {
    for m in &report.media {
        println!(
            "{}: medium {:?}, {} records, {} bytes, valid to {}{}",
            m.path.display(),
            m.medium_index,
            m.records,
            m.len_bytes,
            m.valid_end_bytes,
            if m.sealed { ", sealed" } else { "" }
        );
        if let Some(end) = m.recovered_end_bytes {
            println!("  torn tail after offset {end} was cut on recovery (ok)");
        }
        for b in &m.bad_records {
            println!(
                "  BAD RECORD at offset {}: {} ({} bytes skipped)",
                b.offset_bytes, b.error, b.skipped_bytes
            );
        }
        if let Some(t) = &m.torn_tail {
            println!(
                "  TORN TAIL at offset {}: {} ({} bytes)",
                t.offset_bytes, t.error, t.skipped_bytes
            );
        }
    }
    for b in &report.sequence_breaks {
        let why = if b.duplicate {
            "duplicate sequence number"
        } else if b.recorded_gap {
            "gap recorded by the journal (journaling was stopped)"
        } else {
            "records missing"
        };
        println!(
            "  SEQUENCE BREAK after {} comes {}: {why}",
            b.after_seq, b.next_seq
        );
    }
    for st in &report.stops {
        let what = if !st.cause.loses_writes() {
            "closed (ok)"
        } else if st.resolved {
            "stopped; the gap is recorded"
        } else {
            "STOPPED and never restarted: later guest writes are NOT journaled"
        };
        println!(
            "  STOP after seq {} ({}: {}): {what} [{}]",
            st.after_seq,
            st.cause.name(),
            st.reason,
            st.source.display()
        );
    }
    for e in [&report.stops_error, &report.read_error]
        .into_iter()
        .flatten()
    {
        println!("  ERROR: {e}");
    }
    println!(
        "seq {:?}..{:?}, {} problem(s)",
        report.first_seq, report.last_seq, report.problems
    );
}

/// Opens a set of media with a progress bar over the bytes scanned (hidden with `--json` or
/// when stderr is not a terminal).
fn open_media(media: &[PathBuf], json: bool) -> anyhow::Result<MediaSet> {
    let bar = progress_bar(json, BYTES_TEMPLATE);
    let set = MediaSet::open_with_progress(media, &mut |p| {
        bar.set_length(p.total);
        bar.set_position(p.done);
        if bar.message().is_empty() {
            bar.set_message("scanning media");
        }
    });
    bar.finish_and_clear();
    Ok(set?)
}

const BYTES_TEMPLATE: &str = "{msg} [{bar:40}] {bytes}/{total_bytes} ({eta})";
const RECORDS_TEMPLATE: &str = "{msg} [{bar:40}] {pos}/{len} records ({eta})";

/// `ferry journal restore`: a volume's image rebuilt from a base image and the journal.
pub fn restore_volume(media: &[PathBuf], opts: &RestoreOptions, json: bool) -> anyhow::Result<()> {
    let set = open_media(media, json)?;
    let bar = progress_bar(json, RECORDS_TEMPLATE);
    let mut shown = None;
    let report = restore(&set, opts, &mut |p| {
        let first = shown != Some(p.phase);
        if first {
            shown = Some(p.phase);
            bar.reset();
        }
        bar.set_length(p.total);
        bar.set_position(p.done);
        if first {
            bar.set_message(match p.phase {
                Phase::Checking => "checking the range".to_string(),
                Phase::Scanning | Phase::Applying => format!("restoring {}", opts.volume),
            });
        }
    })?;
    bar.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{} restored to seq {}: {} records, {} bytes applied -> {}",
            report.volume,
            report.until_seq,
            report.records_applied,
            report.bytes_applied,
            report.out.display()
        );
        for w in &report.warnings {
            eprintln!("warning: {w}");
        }
        if !report.gaps.is_empty() {
            println!(
                "warning: {} sequence break(s) in the range (--allow-gaps)",
                report.gaps.len()
            );
        }
    }
    Ok(())
}

/// Runs `work` with a byte progress bar on stderr (hidden with `--json` or no terminal);
/// `work` reports (done, total) bytes.
fn with_byte_progress<T>(
    json: bool,
    message: String,
    work: impl FnOnce(&mut dyn FnMut(u64, u64)) -> T,
) -> T {
    let bar = progress_bar(json, "{msg} [{bar:40}] {bytes}/{total_bytes} ({eta})");
    bar.set_message(message);
    let result = work(&mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    result
}

/// A progress bar on stderr drawn with `template`, hidden for `--json` or when stderr is not a
/// terminal.
fn progress_bar(json: bool, template: &str) -> indicatif::ProgressBar {
    let bar = if json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(0)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}
