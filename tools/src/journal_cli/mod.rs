//! `ferry journal ...`: the subcommands, split into `control` of a running daemon's journal
//! (through its control socket or TCP listener: init, status, retrieve, seal, clear, mark) and `offline`
//! tools on media (list, verify, restore, demux, export, format spares).

mod control;
mod offline;

use std::path::PathBuf;

use ferry_engine::journal::restore::{RestoreOptions, Until};

use crate::control::journal_commands::RETRIEVE_PAGE_DEFAULT;
use crate::control_client::ControlArgs;

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
        #[command(flatten)]
        control: ControlArgs,
        #[arg(long)]
        label: String,
    },
    /// Show a running daemon's journal status.
    Status {
        #[command(flatten)]
        control: ControlArgs,
        /// The control socket's JSON reply, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Fetch log entries from a running daemon's journal.
    Retrieve {
        #[command(flatten)]
        control: ControlArgs,
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
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Drop the daemon's in-memory log.
    Clear {
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Record a named point in the journal.
    Mark {
        #[command(flatten)]
        control: ControlArgs,
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
        } => offline::list(&media, stream.as_deref(), json),
        JournalCommand::Verify { media, json } => offline::verify_media(&media, json),
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
            offline::restore_volume(&media, &opts, json)
        }
        JournalCommand::Demux {
            media,
            out_dir,
            json,
        } => offline::demux_streams(&media, &out_dir, json),
        JournalCommand::Export {
            media,
            volume,
            format: ExportFormat::DmLogWrites,
            out,
            json,
        } => offline::export_volume(&media, &volume, &out, json),
        JournalCommand::Format {
            dir,
            spares,
            capacity,
            device,
            json,
        } => offline::format(&dir, spares, capacity.as_deref(), &device, json),
        JournalCommand::Init { control: c, label } => control::init(&c.client()?, &label),
        JournalCommand::Status { control: c, json } => control::status(&c.client()?, json),
        JournalCommand::Retrieve {
            control: c,
            since,
            format,
            page,
        } => control::retrieve(&c.client()?, since, format, page),
        JournalCommand::Seal { control: c } => control::seal(&c.client()?),
        JournalCommand::Clear { control: c } => control::clear(&c.client()?),
        JournalCommand::Mark { control: c, label } => control::mark(&c.client()?, &label),
    }
}
