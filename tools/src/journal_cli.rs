//! `ferry journal ...`: control of a running daemon's journal (through the control socket)
//! and offline tools on media (list, verify, restore, demux, export, format spares).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use ferry_engine::journal::demux::demux;
use ferry_engine::journal::device::register_device;
use ferry_engine::journal::export::export_dm_log_writes;
use ferry_engine::journal::format::StopInfo;
use ferry_engine::journal::media::{MediaSet, Phase};
use ferry_engine::journal::restore::{restore, RestoreOptions, Until};
use ferry_engine::journal::spares::format_spares;
use ferry_engine::journal::verify::verify;
use serde_json::json;

use crate::control::journal_commands::{RETRIEVE_PAGE_DEFAULT, RETRIEVE_PAGE_MAX};
use crate::control_client::{daemon_error, exchange, request};

/// Formats `export` can write.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// The Linux dm-log-writes log format (replayable with `replay-log`).
    DmLogWrites,
}

/// Renderings of `retrieve`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryFormat {
    Jsonl,
    Csv,
}

/// The `ferry journal` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum JournalCommand {
    /// List the records of media (files or journal directories).
    List {
        #[arg(required = true)]
        media: Vec<PathBuf>,
        /// Only records of this volume (and journal-wide marks).
        #[arg(long)]
        stream: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Check media: checksums, sequence gaps, torn tail. Exits non-zero on problems.
    Verify {
        #[arg(required = true)]
        media: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Rebuild a volume's image from a base image and the journal.
    Restore {
        #[arg(required = true)]
        media: Vec<PathBuf>,
        #[arg(long)]
        volume: String,
        #[arg(long)]
        base: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// SEQ, seq:N, time:NANOS, time:YYYY-MM-DDTHH:MM:SSZ, mark:LABEL (default: the end).
        #[arg(long)]
        until: Option<String>,
        /// Restore even if the range has sequence gaps, damaged records, or reaches past a
        /// stop of the journal after which guest writes were not journaled.
        #[arg(long)]
        allow_gaps: bool,
        #[arg(long)]
        json: bool,
    },
    /// Split a journal into one journal per stream (volume + queue).
    Demux {
        #[arg(required = true)]
        media: Vec<PathBuf>,
        #[arg(long)]
        out_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Export one volume's writes in another log format.
    Export {
        #[arg(required = true)]
        media: Vec<PathBuf>,
        #[arg(long)]
        volume: String,
        #[arg(long, value_enum)]
        format: ExportFormat,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Pre-format spare media in a journal directory (zero-filled files of exactly
    /// CAPACITY bytes) for a journal run with `spares=N`, like labelling tapes; or register
    /// block devices as media (`--device`, zeroed; the journal takes them first).
    Format {
        dir: PathBuf,
        /// How many spare files should exist when done.
        #[arg(long, requires = "capacity", required_unless_present = "device")]
        spares: Option<u32>,
        /// Bytes per spare file (suffixes K, M, G, T): the journal's `capacity=`.
        #[arg(long, requires = "spares")]
        capacity: Option<String>,
        /// A block device to zero and register as a medium (repeatable). All its data is lost.
        #[arg(long, value_name = "PATH")]
        device: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Start a new log on a running daemon's journal.
    Init {
        #[arg(long)]
        control: PathBuf,
        #[arg(long)]
        label: String,
    },
    /// Show a running daemon's journal status.
    Status {
        #[arg(long)]
        control: PathBuf,
        /// The control socket's JSON reply, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Fetch log entries from a running daemon's journal.
    Retrieve {
        #[arg(long)]
        control: PathBuf,
        #[arg(long, default_value_t = 0)]
        since: u64,
        #[arg(long, value_enum, default_value = "jsonl")]
        format: EntryFormat,
        /// Entries asked for per request (1-65536); the whole log is read in pages.
        #[arg(long, default_value_t = RETRIEVE_PAGE_DEFAULT)]
        page: usize,
    },
    /// Seal the current medium (write its trailer) and continue on the next.
    Seal {
        #[arg(long)]
        control: PathBuf,
    },
    /// Drop the daemon's in-memory log.
    Clear {
        #[arg(long)]
        control: PathBuf,
    },
    /// Record a named point in the journal.
    Mark {
        #[arg(long)]
        control: PathBuf,
        #[arg(long)]
        label: String,
    },
}

pub fn run(cmd: JournalCommand) -> anyhow::Result<()> {
    match cmd {
        JournalCommand::List {
            media,
            stream,
            json,
        } => list(&media, stream.as_deref(), json),
        JournalCommand::Verify { media, json } => run_verify(&media, json),
        JournalCommand::Restore {
            media,
            volume,
            base,
            out,
            until,
            allow_gaps,
            json,
        } => {
            let until = match until {
                Some(u) => Until::parse(&u)?,
                None => Until::End,
            };
            let opts = RestoreOptions {
                volume,
                base,
                out,
                until,
                allow_gaps,
            };
            run_restore(&media, &opts, json)
        }
        JournalCommand::Demux {
            media,
            out_dir,
            json,
        } => {
            let set = open_media(&media, json)?;
            let outputs = demux(&set, &out_dir)?;
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
        JournalCommand::Export {
            media,
            volume,
            format: ExportFormat::DmLogWrites,
            out,
            json,
        } => {
            let set = open_media(&media, json)?;
            let report = export_dm_log_writes(&set, &volume, &out)?;
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
        JournalCommand::Format {
            dir,
            spares,
            capacity,
            device,
            json,
        } => {
            for d in &device {
                run_register_device(&dir, d, json)?;
            }
            match (spares, capacity) {
                (Some(spares), Some(capacity)) => run_format(&dir, spares, &capacity, json),
                _ => Ok(()),
            }
        }
        other => run_control(other),
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

fn run_control(cmd: JournalCommand) -> anyhow::Result<()> {
    let (control, command, arguments) = match cmd {
        JournalCommand::Init { control, label } => {
            (control, "journal-init", json!({ "label": label }))
        }
        JournalCommand::Status { control, json } => {
            let reply = request(&control, "journal-status", json!({}))?;
            if json {
                println!("{}", serde_json::to_string(&reply)?);
            } else {
                print!("{}", describe_status(&reply));
            }
            return Ok(());
        }
        JournalCommand::Retrieve {
            control,
            since,
            format,
            page,
        } => {
            return retrieve(&control, since, format, page);
        }
        JournalCommand::Seal { control } => (control, "journal-seal", json!({})),
        JournalCommand::Clear { control } => (control, "journal-clear", json!({})),
        JournalCommand::Mark { control, label } => {
            (control, "journal-mark", json!({ "label": label }))
        }
        _ => anyhow::bail!("not a control command"),
    };
    let reply = request(&control, command, arguments)?;
    println!("{}", serde_json::to_string_pretty(&reply)?);
    Ok(())
}

/// `journal-status` for a person: the state first, loudly when writes go unjournaled.
fn describe_status(s: &serde_json::Value) -> String {
    let num = |k: &str| s[k].as_u64().unwrap_or(0);
    let text = |k: &str| s[k].as_str().unwrap_or("?").to_string();
    let mut out = String::new();
    let state = text("state");
    let reason = s["reason"].as_str().unwrap_or("");
    match state.as_str() {
        "running" => out.push_str(&format!(
            "journal: running, {} mode, in {}\n",
            text("mode"),
            text("dir")
        )),
        "paused" => out.push_str(&format!(
            "journal: PAUSED, guest writes are held: {reason}\n"
        )),
        _ => out.push_str(&format!(
            "journal: {}, guest writes are NOT being journaled: {reason}\n",
            state.to_uppercase()
        )),
    }
    match s["medium"].as_u64() {
        Some(m) => out.push_str(&format!(
            "  medium {m}, append point at {} bytes{}\n",
            num("position_bytes"),
            if s["medium_direct"] == true {
                " (O_DIRECT)"
            } else {
                ""
            }
        )),
        None => out.push_str("  no medium open (the next write opens one)\n"),
    }
    if s["appends_io_uring"] == false {
        out.push_str("  appends use pwritev + fdatasync: the kernel refused io_uring\n");
    }
    if s["appends"] == "mapped" {
        out.push_str(&format!(
            "  {} records appended by the queue threads straight onto the mapped medium\n",
            num("mapped_records")
        ));
    }
    if s["committer"] == "queue" {
        out.push_str(&format!(
            "  group commits made by the queue threads ({} so far)\n",
            num("queue_commits")
        ));
    }
    out.push_str(&format!(
        "  records durable since start: {} in {} group commits; next seq {}, durable seq {}, lag {} bytes\n",
        num("records"),
        num("group_commits"),
        num("next_seq"),
        num("durable_seq"),
        num("lag_bytes")
    ));
    out.push_str(&format!(
        "  log {} \"{}\", {} entries in memory; spares taken: {}\n",
        num("log_id"),
        text("label"),
        num("log_entries"),
        num("spares_taken")
    ));
    if num("log_dropped") > 0 {
        out.push_str(&format!(
            "  in-memory log full (log-memory= keeps {} entries): {} older entries dropped, \
             oldest held seq {} (the media keep them all)\n",
            num("log_max_entries"),
            num("log_dropped"),
            num("log_first_seq")
        ));
    }
    let gap = |g: &serde_json::Value| {
        format!(
            "seq {} (+{})",
            g["first_missing_seq"].as_u64().unwrap_or(0),
            g["missing_count"].as_u64().unwrap_or(0)
        )
    };
    let gaps: Vec<String> = s["gaps"]
        .as_array()
        .map_or(Vec::new(), |g| g.iter().map(gap).collect());
    if !gaps.is_empty() {
        out.push_str(&format!("  gaps: {}\n", gaps.join(", ")));
    }
    if !s["open_gap"].is_null() {
        out.push_str(&format!(
            "  OPEN GAP (writes not journaled so far): {}\n",
            gap(&s["open_gap"])
        ));
    }
    if let Some(t) = s["recovered_torn_tail"].as_object() {
        out.push_str(&format!(
            "  at start, a torn tail of {} bytes was cut on medium {}\n",
            t.get("torn_bytes").and_then(|v| v.as_u64()).unwrap_or(0),
            t.get("medium").and_then(|v| v.as_u64()).unwrap_or(0)
        ));
    }
    out
}

/// Prints `journal-retrieve`'s reply (an array of entries, or `{"entries": [...]}`).
/// A `journal-retrieve` reply page as the CLI reads it: entries kept as the daemon's JSON
/// text (printed as they are for `jsonl`, parsed one by one for `csv`).
#[derive(serde::Deserialize)]
struct RetrievePage<'a> {
    #[serde(borrow)]
    entries: Vec<&'a serde_json::value::RawValue>,
    next_seq: Option<u64>,
    log_first_seq: Option<u64>,
    log_last_seq: Option<u64>,
    dropped_from_seq: Option<u64>,
}

/// One log entry as the daemon sends it (see `docs/journal.md`).
#[derive(serde::Deserialize)]
struct WireEntry<'a> {
    seq: u64,
    stream_id: u32,
    log_id: u32,
    timestamp_ns: u64,
    op: &'a str,
    offset_bytes: u64,
    len_bytes: u64,
    medium: u32,
    position_bytes: u64,
}

fn print_entries(
    out: &mut impl Write,
    entries: &[&serde_json::value::RawValue],
    format: EntryFormat,
) -> anyhow::Result<()> {
    for raw in entries {
        match format {
            EntryFormat::Jsonl => writeln!(out, "{}", raw.get())?,
            EntryFormat::Csv => {
                let e: WireEntry = serde_json::from_str(raw.get())
                    .with_context(|| format!("journal-retrieve sent a bad entry: {}", raw.get()))?;
                writeln!(
                    out,
                    "{},{},{},{},{},{},{},{},{}",
                    e.seq,
                    e.stream_id,
                    e.log_id,
                    e.timestamp_ns,
                    e.op,
                    e.offset_bytes,
                    e.len_bytes,
                    e.medium,
                    e.position_bytes
                )?;
            }
        }
    }
    Ok(())
}

/// `ferry journal retrieve`: asks for the log in pages of `page` entries from `since`, up to
/// the newest entry the daemon held when the first page was taken, and prints them as they
/// come (a log of millions of entries never sits whole in either process).
fn retrieve(control: &Path, since: u64, format: EntryFormat, page: usize) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=RETRIEVE_PAGE_MAX).contains(&page),
        "--page must be from 1 to {RETRIEVE_PAGE_MAX} entries"
    );
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if format == EntryFormat::Csv {
        writeln!(out, "{}", ferry_engine::journal::entry::CSV_HEADER)?;
    }
    let mut since = since;
    let mut newest_at_start = None;
    let mut warned = false;
    loop {
        let arguments = json!({ "since_seq": since, "limit": page });
        let line = exchange(control, "journal-retrieve", arguments)?;
        #[derive(serde::Deserialize)]
        struct Reply<'a> {
            #[serde(borrow, rename = "return")]
            page: Option<RetrievePage<'a>>,
        }
        let reply: Reply = serde_json::from_str(&line).context("daemon sent invalid JSON")?;
        let Some(reply) = reply.page else {
            let error = serde_json::from_str(&line).context("daemon sent invalid JSON")?;
            return Err(daemon_error("journal-retrieve", &error));
        };
        if let (false, Some(from)) = (warned, reply.dropped_from_seq) {
            eprintln!(
                "ferry: journal entries from seq {from} to {} are no longer in the daemon's \
                 memory (its log-memory= bound); `ferry journal list DIR` reads them from \
                 the media",
                reply
                    .log_first_seq
                    .map_or_else(|| "now".to_string(), |f| (f.saturating_sub(1)).to_string())
            );
            warned = true;
        }
        print_entries(&mut out, &reply.entries, format)?;
        let newest = *newest_at_start.get_or_insert(reply.log_last_seq.unwrap_or(0));
        match reply.next_seq {
            Some(next) if next <= newest => since = next,
            _ => break,
        }
    }
    out.flush()?;
    Ok(())
}

fn list(media: &[PathBuf], stream: Option<&str>, json: bool) -> anyhow::Result<()> {
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

fn run_verify(media: &[PathBuf], json: bool) -> anyhow::Result<()> {
    let set = open_media(media, json)?;
    let report = verify(&set);
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
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
    anyhow::ensure!(report.ok(), "{} problem(s) found", report.problems);
    Ok(())
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

fn run_restore(media: &[PathBuf], opts: &RestoreOptions, json: bool) -> anyhow::Result<()> {
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

/// A progress bar on stderr drawn with `template`, hidden for `--json` or when stderr is not a
/// terminal.
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

#[cfg(test)]
mod tests {
    use super::describe_status;

    #[test]
    fn status_says_when_the_in_memory_log_dropped_entries() {
        let mut status = serde_json::json!({
            "state": "running", "mode": "sync", "dir": "/j", "log_id": 1, "label": "initial",
            "log_entries": 8192, "log_dropped": 0, "log_first_seq": 1, "log_max_entries": 8192,
        });
        assert!(!describe_status(&status).contains("in-memory log full"));
        status["log_dropped"] = 4096.into();
        status["log_first_seq"] = 4097.into();
        let text = describe_status(&status);
        assert!(
            text.contains("in-memory log full (log-memory= keeps 8192 entries): 4096 older entries dropped, oldest held seq 4097"),
            "{text}"
        );
    }
}
