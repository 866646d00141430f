//! `ferry journal init|status|retrieve|seal|clear|mark`: a running daemon's journal, through
//! its control socket or TCP listener. The status is read into the daemon's own [`JournalStatus`], so a field
//! the daemon renames is an error here, not a silent 0.

use std::io::Write;

use anyhow::Context;
use ferry_engine::journal::format::GapInfo;
use ferry_engine::journal::options::Committer;
use ferry_engine::journal::writer::AppendPath;
use ferry_engine::journal::{JournalState, JournalStatus};
use serde_json::json;

use super::EntryFormat;
use crate::control::journal_commands::RETRIEVE_PAGE_MAX;
use crate::control_client::{daemon_error, ControlClient};

pub fn init(control: &ControlClient, label: &str) -> anyhow::Result<()> {
    print_reply(control, "journal-init", json!({ "label": label }))
}

pub fn seal(control: &ControlClient) -> anyhow::Result<()> {
    print_reply(control, "journal-seal", json!({}))
}

pub fn clear(control: &ControlClient) -> anyhow::Result<()> {
    print_reply(control, "journal-clear", json!({}))
}

pub fn mark(control: &ControlClient, label: &str) -> anyhow::Result<()> {
    print_reply(control, "journal-mark", json!({ "label": label }))
}

/// Sends `command` and prints the daemon's reply as it is (pretty JSON).
fn print_reply(
    control: &ControlClient,
    command: &str,
    arguments: serde_json::Value,
) -> anyhow::Result<()> {
    let reply = control.request(command, arguments)?;
    println!("{}", serde_json::to_string_pretty(&reply)?);
    Ok(())
}

/// `ferry journal status`: the reply as it is with `--json`, else for a person.
pub fn status(control: &ControlClient, json: bool) -> anyhow::Result<()> {
    let reply = control.request("journal-status", json!({}))?;
    if json {
        println!("{}", serde_json::to_string(&reply)?);
    } else {
        let status: JournalStatus = serde_json::from_value(reply)
            .context("journal-status sent a status this ferry cannot read")?;
        print!("{}", describe_status(&status));
    }
    Ok(())
}

/// The name the daemon's JSON gives `value` (the same words as `--json`).
fn wire_name(value: impl serde::Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        _ => "?".into(),
    }
}

/// `journal-status` for a person: the state first, loudly when writes go unjournaled.
fn describe_status(s: &JournalStatus) -> String {
    let mut out = String::new();
    let reason = s.reason.as_deref().unwrap_or("");
    match s.state {
        JournalState::Running => out.push_str(&format!(
            "journal: running, {} mode, in {}\n",
            wire_name(s.mode),
            s.dir
        )),
        JournalState::Paused => out.push_str(&format!(
            "journal: PAUSED, guest writes are held: {reason}\n"
        )),
        JournalState::Stopped => out.push_str(&format!(
            "journal: {}, guest writes are NOT being journaled: {reason}\n",
            wire_name(s.state).to_uppercase()
        )),
    }
    match s.medium {
        Some(m) => out.push_str(&format!(
            "  medium {m}, append point at {} bytes{}\n",
            s.position_bytes,
            if s.medium_direct == Some(true) {
                " (O_DIRECT)"
            } else {
                ""
            }
        )),
        None => out.push_str("  no medium open (the next write opens one)\n"),
    }
    if s.appends_io_uring == Some(false) {
        out.push_str("  appends use pwritev + fdatasync: the kernel refused io_uring\n");
    }
    if s.appends == Some(AppendPath::Mapped) {
        out.push_str(&format!(
            "  {} records appended by the queue threads straight onto the mapped medium\n",
            s.mapped_records
        ));
    }
    if s.committer == Committer::Queue {
        out.push_str(&format!(
            "  group commits made by the queue threads ({} so far)\n",
            s.queue_commits
        ));
    }
    describe_progress(s, &mut out);
    out
}

/// The durable progress, the in-memory log, the gaps and the torn tail cut at start.
fn describe_progress(s: &JournalStatus, out: &mut String) {
    out.push_str(&format!(
        "  records durable since start: {} in {} group commits; next seq {}, durable seq {}, lag {} bytes\n",
        s.records, s.group_commits, s.next_seq, s.durable_seq, s.lag_bytes
    ));
    out.push_str(&format!(
        "  log {} \"{}\", {} entries in memory; spares taken: {}\n",
        s.log_id, s.label, s.log_entries, s.spares_taken
    ));
    if s.log_dropped > 0 {
        out.push_str(&format!(
            "  in-memory log full (log-memory= keeps {} entries): {} older entries dropped, \
             oldest held seq {} (the media keep them all)\n",
            s.log_max_entries,
            s.log_dropped,
            s.log_first_seq.unwrap_or(0)
        ));
    }
    let gap = |g: &GapInfo| format!("seq {} (+{})", g.first_missing_seq, g.missing_count);
    let gaps: Vec<String> = s.gaps.iter().map(gap).collect();
    if !gaps.is_empty() {
        out.push_str(&format!("  gaps: {}\n", gaps.join(", ")));
    }
    if let Some(g) = &s.open_gap {
        out.push_str(&format!(
            "  OPEN GAP (writes not journaled so far): {}\n",
            gap(g)
        ));
    }
    if let Some(t) = &s.recovered_torn_tail {
        out.push_str(&format!(
            "  at start, a torn tail of {} bytes was cut on medium {}\n",
            t.torn_bytes, t.medium
        ));
    }
}

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
pub fn retrieve(
    control: &ControlClient,
    since: u64,
    format: EntryFormat,
    page: usize,
) -> anyhow::Result<()> {
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
        let line = control.exchange("journal-retrieve", arguments)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_engine::journal::options::JournalMode;
    use ferry_engine::journal::{Journal, JournalOptions};

    /// The status of a journal that has made a mark, as the daemon has it.
    fn live_status() -> anyhow::Result<JournalStatus> {
        let dir = tempfile::tempdir()?;
        let journal = Journal::open(JournalOptions::new(dir.path().join("j")))?;
        journal.mark("point")?;
        let status = journal.status();
        journal.close();
        Ok(status)
    }

    /// The JSON the daemon sends (`journal-status` serializes the engine's status) reads back
    /// into the same status.
    #[test]
    fn a_status_reply_reads_back_into_the_status() -> anyhow::Result<()> {
        let status = live_status()?;
        assert!(status.medium.is_some() && status.records > 0, "{status:?}");
        let reply = serde_json::to_value(&status)?;
        let back: JournalStatus = serde_json::from_value(reply)?;
        assert_eq!(back, status);
        Ok(())
    }

    /// A reply without a field this ferry reads (renamed or dropped by the daemon) is an
    /// error, for optional fields too, instead of a silent 0 or "unknown".
    #[test]
    fn a_status_reply_without_a_field_is_an_error() -> anyhow::Result<()> {
        let reply = serde_json::to_value(live_status()?)?;
        for field in ["records", "medium", "appends", "recovered_torn_tail"] {
            let mut renamed = reply.clone();
            let value = renamed
                .as_object_mut()
                .and_then(|o| o.remove(field))
                .ok_or_else(|| anyhow::anyhow!("no {field} in {reply}"))?;
            renamed[format!("{field}_renamed")] = value;
            let read = serde_json::from_value::<JournalStatus>(renamed);
            assert!(read.is_err(), "{field}: {read:?}");
        }
        Ok(())
    }

    fn running_status() -> JournalStatus {
        JournalStatus {
            state: JournalState::Running,
            reason: None,
            mode: JournalMode::Sync,
            dir: "/j".into(),
            medium: None,
            position_bytes: 0,
            records: 0,
            group_commits: 0,
            next_seq: 1,
            durable_seq: 0,
            lag_bytes: 0,
            gaps: Vec::new(),
            open_gap: None,
            log_id: 1,
            label: "initial".into(),
            log_entries: 8192,
            log_first_seq: Some(1),
            log_dropped: 0,
            log_max_entries: 8192,
            recovered_torn_tail: None,
            spares_taken: 0,
            medium_direct: None,
            appends_io_uring: None,
            appends: None,
            committer: Committer::Writer,
            queue_commits: 0,
            mapped_records: 0,
        }
    }

    #[test]
    fn status_says_when_the_in_memory_log_dropped_entries() {
        let mut status = running_status();
        assert!(!describe_status(&status).contains("in-memory log full"));
        status.log_dropped = 4096;
        status.log_first_seq = Some(4097);
        let text = describe_status(&status);
        assert!(
            text.contains("in-memory log full (log-memory= keeps 8192 entries): 4096 older entries dropped, oldest held seq 4097"),
            "{text}"
        );
    }

    /// The whole text for a running and a stopped journal, word for word.
    #[test]
    fn status_text_for_a_person() {
        let mut status = running_status();
        assert_eq!(
            describe_status(&status),
            "journal: running, sync mode, in /j\n  \
             no medium open (the next write opens one)\n  \
             records durable since start: 0 in 0 group commits; next seq 1, durable seq 0, lag 0 bytes\n  \
             log 1 \"initial\", 8192 entries in memory; spares taken: 0\n"
        );
        status.state = JournalState::Stopped;
        status.reason = Some("medium full".into());
        status.medium = Some(3);
        status.position_bytes = 8192;
        status.medium_direct = Some(true);
        status.appends_io_uring = Some(false);
        status.committer = Committer::Queue;
        status.queue_commits = 5;
        status.gaps = vec![GapInfo {
            first_missing_seq: 10,
            missing_count: 2,
        }];
        status.open_gap = Some(GapInfo {
            first_missing_seq: 20,
            missing_count: 1,
        });
        assert_eq!(
            describe_status(&status),
            "journal: STOPPED, guest writes are NOT being journaled: medium full\n  \
             medium 3, append point at 8192 bytes (O_DIRECT)\n  \
             appends use pwritev + fdatasync: the kernel refused io_uring\n  \
             group commits made by the queue threads (5 so far)\n  \
             records durable since start: 0 in 0 group commits; next seq 1, durable seq 0, lag 0 bytes\n  \
             log 1 \"initial\", 8192 entries in memory; spares taken: 0\n  \
             gaps: seq 10 (+2)\n  \
             OPEN GAP (writes not journaled so far): seq 20 (+1)\n"
        );
    }
}
