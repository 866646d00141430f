//! The journal driven through real volumes and queues (two volumes, two queues each):
//! writes, marks, rotation over several media; then verify, restore to every mark and to the
//! end, demux, and export to dm-log-writes read back by an independent decoder.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::super::export::export_dm_log_writes;
use super::super::media::MediaSet;
use super::super::options::Committer;
use super::super::restore::{restore, RestoreOptions, Until};
use super::super::verify::verify;
use super::super::{demux::demux, Journal, JournalMode, JournalOptions, JournalState};
use super::support::{open_volume, pattern, run_op, write, Rng, TestResult};
use crate::{BlockOp, Volume, VolumeQueue};

const VOLUME_BYTES: u64 = 1 << 20;

struct Rig {
    volumes: Vec<Arc<Volume>>,
    queues: Vec<VolumeQueue>,
    expected: Vec<Vec<u8>>,
}

impl Rig {
    fn new(dir: &Path, journal: &Arc<Journal>) -> Result<Self, Box<dyn std::error::Error>> {
        let mut volumes = Vec::new();
        let mut expected = Vec::new();
        for (i, name) in ["va", "vb"].iter().enumerate() {
            let v = open_volume(dir, name, VOLUME_BYTES)?;
            let initial = pattern(100 + i as u64, VOLUME_BYTES as usize);
            std::fs::write(dir.join(format!("{name}.img")), &initial)?;
            std::fs::copy(
                dir.join(format!("{name}.img")),
                dir.join(format!("{name}.base")),
            )?;
            v.add_observer(journal.observer_for(name));
            volumes.push(v);
            expected.push(initial);
        }
        let mut queues = Vec::new();
        for v in &volumes {
            for q in 0..2u16 {
                queues.push(VolumeQueue::new(v.clone(), q, 8, 4)?);
            }
        }
        Ok(Self {
            volumes,
            queues,
            expected,
        })
    }

    /// One random operation on a random queue, mirrored in `expected`.
    fn step(&mut self, rng: &mut Rng, seed: u64) -> TestResult {
        let qi = rng.below(4) as usize;
        let vi = qi / 2;
        let len = 512 * (1 + rng.below(24));
        let offset = 512 * rng.below((VOLUME_BYTES - len) / 512);
        let q = &mut self.queues[qi];
        match rng.below(10) {
            0 => {
                run_op(
                    q,
                    BlockOp::Discard {
                        offset_bytes: offset,
                        len_bytes: len,
                    },
                )?;
                self.expected[vi][offset as usize..(offset + len) as usize].fill(0);
            }
            1 => {
                run_op(
                    q,
                    BlockOp::WriteZeroes {
                        offset_bytes: offset,
                        len_bytes: len,
                        unmap: false,
                    },
                )?;
                self.expected[vi][offset as usize..(offset + len) as usize].fill(0);
            }
            2 => {
                run_op(q, BlockOp::Flush)?;
            }
            _ => {
                let data = pattern(seed, len as usize);
                write(q, offset, &data)?;
                self.expected[vi][offset as usize..(offset + len) as usize].copy_from_slice(&data);
            }
        }
        Ok(())
    }
}

fn restore_to(
    set: &MediaSet,
    dir: &Path,
    volume: &str,
    until: Until,
) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    let out = dir.join(format!("{volume}.restored"));
    let _ = std::fs::remove_file(&out);
    let opts = RestoreOptions {
        volume: volume.into(),
        base: dir.join(format!("{volume}.base")),
        out: out.clone(),
        until,
        allow_gaps: false,
    };
    restore(set, &opts, &mut |_| {})?;
    Ok(std::fs::read(out)?)
}

/// Writes, marks after each phase; returns the expected images at each mark.
fn run_phases(
    rig: &mut Rig,
    journal: &Journal,
    phases: u64,
    ops: u64,
) -> Result<Vec<Vec<Vec<u8>>>, Box<dyn std::error::Error>> {
    let mut rng = Rng::new(42);
    let mut at_marks = Vec::new();
    for phase in 0..phases {
        for i in 0..ops {
            rig.step(&mut rng, phase * 1000 + i)?;
        }
        journal.mark(&format!("m{phase}"))?;
        at_marks.push(rig.expected.clone());
    }
    for i in 0..ops {
        rig.step(&mut rng, 99_000 + i)?;
    }
    Ok(at_marks)
}

fn journal_options(dir: &Path, mode: JournalMode) -> JournalOptions {
    let mut o = JournalOptions::new(dir.join("j"));
    o.capacity_bytes = 256 * 1024;
    o.mode = mode;
    o.lag_max_bytes = 64 * 1024;
    o
}

fn check_everything(dir: &Path, rig: &Rig, at_marks: &[Vec<Vec<u8>>]) -> TestResult {
    let set = MediaSet::open(&[dir.join("j")])?;
    assert!(
        set.media.len() > 2,
        "rotation expected, got {} media",
        set.media.len()
    );
    let report = verify(&set);
    assert!(report.ok(), "{report:#?}");
    for (vi, name) in ["va", "vb"].iter().enumerate() {
        for (k, images) in at_marks.iter().enumerate() {
            let got = restore_to(&set, dir, name, Until::Mark(format!("m{k}")))?;
            assert!(got == images[vi], "{name} restored to m{k} differs");
        }
        let end = restore_to(&set, dir, name, Until::End)?;
        let live = std::fs::read(dir.join(format!("{name}.img")))?;
        assert!(
            end == rig.expected[vi],
            "{name} restored to the end differs from what was written"
        );
        assert!(
            end == live,
            "{name} restored to the end differs from the live image"
        );
    }
    Ok(())
}

#[test]
fn sync_journal_restores_every_mark_and_the_end() -> TestResult {
    sync_case(Committer::Writer)
}

/// The same with the group commits made by the queue threads (as on memory-backed media).
#[test]
fn sync_journal_committed_by_queues_restores_every_mark_and_the_end() -> TestResult {
    sync_case(Committer::Queue)
}

fn sync_case(committer: Committer) -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let mut options = journal_options(dir, JournalMode::Sync);
    options.committer = committer;
    let journal = Journal::open(options)?;
    let mut rig = Rig::new(dir, &journal)?;
    let at_marks = run_phases(&mut rig, &journal, 3, 40)?;
    let status = journal.status();
    assert_eq!(status.state, JournalState::Running);
    assert_eq!(status.committer, committer);
    if committer == Committer::Queue {
        assert!(status.queue_commits > 0, "{status:#?}");
    } else {
        assert_eq!(status.queue_commits, 0, "{status:#?}");
    }
    assert_eq!(status.lag_bytes, 0);
    let entries = journal.retrieve(0, usize::MAX).to_vec();
    assert_eq!(
        entries.len() as u64,
        status.durable_seq,
        "one entry per sequenced record"
    );
    assert!(
        journal
            .retrieve(status.durable_seq, usize::MAX)
            .to_vec()
            .len()
            == 1
    );
    let sealed = journal.seal()?;
    assert!(sealed.sealed_medium.is_some());
    assert_eq!(journal.clear(), entries.len());
    for v in &rig.volumes {
        v.backing().sync()?;
    }
    journal.close();
    check_everything(dir, &rig, &at_marks)?;
    export_and_decode(dir, &rig)?;
    demux_and_restore(dir, &rig)
}

#[test]
fn async_journal_restores_every_mark_and_the_end() -> TestResult {
    async_case(Committer::Auto)
}

/// The same with the trail appended by the queue threads at the end of every batch.
#[test]
fn async_journal_committed_by_queues_restores_every_mark_and_the_end() -> TestResult {
    async_case(Committer::Queue)
}

fn async_case(committer: Committer) -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let mut options = journal_options(dir, JournalMode::Async);
    options.committer = committer;
    let journal = Journal::open(options)?;
    let expected = if committer == Committer::Queue {
        Committer::Queue
    } else {
        Committer::Writer
    };
    assert_eq!(journal.status().committer, expected);
    let mut rig = Rig::new(dir, &journal)?;
    let at_marks = run_phases(&mut rig, &journal, 2, 40)?;
    journal.close();
    check_everything(dir, &rig, &at_marks)
}

#[test]
fn reopen_continues_the_sequence_on_a_new_medium() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let journal = Journal::open(journal_options(dir, JournalMode::Sync))?;
    let mut rig = Rig::new(dir, &journal)?;
    let first = run_phases(&mut rig, &journal, 1, 10)?;
    let before = journal.status();
    journal.close();
    drop(rig);
    drop(journal);
    let journal = Journal::open(journal_options(dir, JournalMode::Sync))?;
    assert_eq!(journal.status().next_seq, before.next_seq);
    let mark = journal.mark("after-reopen")?;
    assert_eq!(mark.seq, before.next_seq);
    journal.close();
    let set = MediaSet::open(&[dir.join("j")])?;
    assert!(verify(&set).ok());
    let got = restore_to(&set, dir, "va", Until::Mark("m0".into()))?;
    assert!(got == first[0][0]);
    Ok(())
}

fn export_and_decode(dir: &Path, rig: &Rig) -> TestResult {
    let set = MediaSet::open(&[dir.join("j")])?;
    let log = dir.join("va.dmlog");
    let report = export_dm_log_writes(&set, "va", &log)?;
    let mut image = std::fs::read(dir.join("va.base"))?;
    let marks = replay_dm_log_writes(&std::fs::read(&log)?, &mut image)?;
    assert_eq!(marks, vec!["m0", "m1", "m2"]);
    assert!(report.entries > 0);
    assert!(image == rig.expected[0], "dm-log-writes replay differs");
    Ok(())
}

/// An independent reader of the dm-log-writes format (as documented in the kernel):
/// replays writes and discards onto `image`, returns the mark labels.
fn replay_dm_log_writes(
    log: &[u8],
    image: &mut [u8],
) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let u64_at = |at: usize| -> Result<u64, Box<dyn std::error::Error>> {
        Ok(u64::from_le_bytes(
            log.get(at..at + 8).ok_or("short log")?.try_into()?,
        ))
    };
    assert_eq!(u64_at(0)?, 0x6a736677736872, "magic");
    assert_eq!(u64_at(8)?, 1, "version");
    let nr_entries = u64_at(16)?;
    let sectorsize = u32::from_le_bytes(log.get(24..28).ok_or("short")?.try_into()?) as usize;
    let mut pos = sectorsize;
    let mut marks = Vec::new();
    for _ in 0..nr_entries {
        let (sector, nr, flags, data_len) = (
            u64_at(pos)?,
            u64_at(pos + 8)?,
            u64_at(pos + 16)?,
            u64_at(pos + 24)? as usize,
        );
        let start = sector as usize * sectorsize;
        let len = nr as usize * sectorsize;
        if flags & 8 != 0 {
            marks.push(String::from_utf8(
                log[pos + 32..pos + 32 + data_len].to_vec(),
            )?);
            pos += sectorsize;
        } else if flags & 4 != 0 {
            image[start..start + len].fill(0);
            pos += sectorsize;
        } else if flags & 1 != 0 && nr == 0 {
            pos += sectorsize;
        } else {
            pos += sectorsize;
            image[start..start + len].copy_from_slice(&log[pos..pos + len]);
            pos += len;
        }
    }
    assert_eq!(pos, log.len(), "entries account for the whole log");
    Ok(marks)
}

fn demux_and_restore(dir: &Path, rig: &Rig) -> TestResult {
    let set = MediaSet::open(&[dir.join("j")])?;
    let out = dir.join("demuxed");
    let outputs = demux(&set, &out)?;
    assert_eq!(outputs.len(), 4, "two volumes, two queues each");
    let inputs: Vec<PathBuf> = vec![out.join("vb.q0"), out.join("vb.q1")];
    let demuxed = MediaSet::open(&inputs)?;
    assert!(verify(&demuxed).ok());
    let got = restore_to(&demuxed, dir, "vb", Until::End)?;
    assert!(
        got == rig.expected[1],
        "restore from demuxed streams differs"
    );
    Ok(())
}
