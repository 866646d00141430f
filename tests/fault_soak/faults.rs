//! The faults the soak injects, each with the operator's documented response where one is
//! needed, so that the next fault starts from a serving daemon.

use crate::rig::{Counts, Rig};
use crate::support::guest::RunningGuest;
use anyhow::{ensure, Context as _, Result};
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// SIGKILL and restart of the daemon; the interrupted migration is resumed.
    Kill,
    /// Malformed and oversized requests, a flood of connections, a client that never
    /// reads, a request cut in the middle.
    ControlAbuse,
    /// The journal's tmpfs filled up (ENOSPC): journaling stops, the guest goes on; the
    /// operator archives the media and `journal init` restarts it with a recorded gap.
    JournalFull,
    /// The same, but the daemon is SIGKILLed while journaling is stopped, and restarted.
    JournalFullThenKill,
    /// Every request to the migration target fails (nbdkit's error filter): the job fails,
    /// held guest writes complete from the source; the test starts the migration again.
    TargetError,
    /// The target's server is killed and started again: the same.
    TargetGone,
}

/// The faults in the order they come round.
pub const ROTATION: &[Fault] = &[
    Fault::Kill,
    Fault::ControlAbuse,
    Fault::Kill,
    Fault::JournalFull,
    Fault::Kill,
    Fault::TargetError,
    Fault::Kill,
    Fault::TargetGone,
    Fault::Kill,
    Fault::JournalFullThenKill,
];

pub fn inject(
    fault: Fault,
    rig: &mut Rig,
    _guest: &RunningGuest,
    counts: &mut Counts,
) -> Result<()> {
    match fault {
        Fault::Kill => rig.kill_and_restart(counts),
        Fault::ControlAbuse => {
            abuse_control(rig)?;
            counts.control_abuses += 1;
            Ok(())
        }
        Fault::JournalFull | Fault::JournalFullThenKill => {
            fill_journal(rig, matches!(fault, Fault::JournalFullThenKill), counts)?;
            counts.journal_fulls += 1;
            Ok(())
        }
        Fault::TargetError => {
            std::fs::write(rig.trigger(), b"").context("create the error trigger")?;
            let failed = rig.wait_job_failed();
            std::fs::remove_file(rig.trigger()).context("remove the error trigger")?;
            eprintln!("soak: migration failed: {}", failed?["error"]);
            counts.target_errors += 1;
            Ok(())
        }
        Fault::TargetGone => {
            if let Some(mut nbd) = rig.nbd.take() {
                nbd.kill();
            }
            let failed = rig.wait_job_failed();
            rig.start_target()?;
            eprintln!("soak: migration failed: {}", failed?["error"]);
            counts.targets_gone += 1;
            Ok(())
        }
    }
}

/// How long the journal may take to stop once its medium is full: the guest's next write
/// meets it.
const STOP_WAIT: Duration = Duration::from_secs(60);
const FILL_CHUNK_BYTES: usize = 1 << 20;

/// Fills the journal's tmpfs with a file until ENOSPC, waits for the journal to stop on
/// it, frees the space and restarts it ([`Rig::restart_journal`]).
/// With `kill_while_stopped`, the daemon is killed instead while journaling is stopped:
/// the next start records the gap and journals again (`docs/journal.md`, *Stops*).
fn fill_journal(rig: &mut Rig, kill_while_stopped: bool, counts: &mut Counts) -> Result<()> {
    let filler_path = rig.tmpfs.path.join("filler");
    let mut filler = std::fs::File::create(&filler_path).context("create the filler")?;
    let chunk = vec![0x5a_u8; FILL_CHUNK_BYTES];
    loop {
        match filler.write_all(&chunk) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => return Err(e).context("fill the journal's tmpfs"),
        }
    }
    let deadline = Instant::now() + STOP_WAIT;
    let stopped = loop {
        let status = rig.journal_status()?;
        if status["state"] == "stopped" {
            break status;
        }
        ensure!(
            Instant::now() < deadline,
            "the journal did not stop on a full medium: {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("soak: journal stopped: {}", stopped["reason"]);
    drop(filler);
    std::fs::remove_file(&filler_path).context("remove the filler")?;
    rig.journal_gaps = true;
    if kill_while_stopped {
        rig.kill_and_restart(counts)
    } else {
        rig.restart_journal()
    }
}

/// Connections opened at once in the flood.
const FLOOD_CONNECTIONS: usize = 300;
/// A line far longer than any request.
const HUGE_LINE_BYTES: usize = 8 << 20;
/// Requests a client that never reads sends.
const UNREAD_REQUESTS: usize = 20_000;

/// Abuses the control socket in every way at once; what the daemon answers does not
/// matter (an error or a closed connection), only that it goes on serving and answering.
fn abuse_control(rig: &Rig) -> Result<()> {
    let control = rig.control();
    let connect = || UnixStream::connect(&control).context("connect to the control socket");
    let timeout = Some(Duration::from_secs(5));
    // Writes below may fail once the daemon closes the connection: that is an answer.
    let mut malformed = connect()?;
    malformed.set_read_timeout(timeout)?;
    let _ = malformed.write_all(b"{\"command\": \"query-volumes\"\n{]]\n\xff\xfe\n");
    let mut line = String::new();
    let _ = BufReader::new(&malformed).read_line(&mut line);

    let mut huge = connect()?;
    huge.set_write_timeout(timeout)?;
    let _ = huge.write_all(&vec![b'x'; HUGE_LINE_BYTES]);
    let _ = huge.write_all(b"\n");

    let mut never_reader = connect()?;
    never_reader.set_write_timeout(timeout)?;
    let request = b"{\"command\":\"query-volumes\"}\n".repeat(UNREAD_REQUESTS);
    let _ = never_reader.write_all(&request);

    let mut cut = connect()?;
    let _ = cut.write_all(b"{\"command\":\"migrate-sta");
    drop(cut);

    let flood: Vec<UnixStream> = (0..FLOOD_CONNECTIONS)
        .filter_map(|_| UnixStream::connect(&control).ok())
        .collect();
    // Past the 64 connections a listener serves at once a client gets `Busy` and is
    // closed (docs/control.md, *Limits*): the flood ends, and the daemon answers again.
    drop(flood);
    drop((malformed, huge, never_reader));
    wait_answering(rig)
}

/// How long the daemon may take to notice the abusive connections closed.
const ANSWER_AGAIN_WAIT: Duration = Duration::from_secs(20);

fn wait_answering(rig: &Rig) -> Result<()> {
    let deadline = Instant::now() + ANSWER_AGAIN_WAIT;
    loop {
        match rig.journal_status() {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context("the daemon does not answer after the abuse"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}
