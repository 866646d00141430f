//! The journaled backend: a file volume observed by a write journal, `sync`, `async`, or
//! `sync` with its records encoded straight into a mapping of tmpfs media (`mapped=on`).
//! After the case the journal must have seen every write: it verifies clean, and the image
//! restored from the volume's starting content through the journal equals the volume.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{ensure, Context as _, Result};
use ferry_engine::journal::media::MediaSet;
use ferry_engine::journal::restore::{restore, RestoreOptions, Until};
use ferry_engine::journal::verify::verify;
use ferry_engine::journal::writer::AppendPath;
use ferry_engine::journal::{Journal, JournalMode, JournalOptions, JournalState, MappedAppends};
use ferry_engine::CacheMode;
use tempfile::TempDir;

use super::file::{filled_image, open_volume, scratch_on, Place};
use crate::fixture::{Access, Beside, Fixture, FixtureIo, VOLUME_BYTES};
use ferry_test_support::compare_bytes;

/// How the journal runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A guest write completes once its record is durable; media in the build directory.
    Sync,
    /// A guest write completes at once, the journal trails; media in the build directory.
    Async,
    /// `sync` on tmpfs media with `mapped=on`: the queue threads encode records into the
    /// medium's mapping.
    Mapped,
}

/// Bytes per medium: small enough that the larger cases fill media and the journal moves on
/// to the next, as a long-running one does.
const MEDIUM_CAPACITY_BYTES: u64 = 8 << 20;

/// A file volume in the build directory observed by a fresh journal of `kind`; `None` when
/// a prerequisite (tmpfs for mapped media) is missing.
pub fn open(kind: Kind, access: Access) -> Result<Option<Fixture>> {
    let Some(dir) = scratch_on(Place::BuildDir)? else {
        return Ok(None);
    };
    let media = match kind {
        Kind::Sync | Kind::Async => None,
        Kind::Mapped => match scratch_on(Place::Tmpfs)? {
            Some(memory) => Some(memory),
            None => return Ok(None),
        },
    };
    let journal_dir = media.as_ref().map_or(dir.path(), TempDir::path).join("j");
    let mut options = JournalOptions::new(&journal_dir);
    options.capacity_bytes = MEDIUM_CAPACITY_BYTES;
    options.mode = match kind {
        Kind::Sync | Kind::Mapped => JournalMode::Sync,
        Kind::Async => JournalMode::Async,
    };
    if kind == Kind::Mapped {
        options.mapped = MappedAppends::On;
    }
    let journal = Journal::open(options).context("open the journal")?;
    let image = filled_image(dir.path(), "v.img", VOLUME_BYTES)?;
    // What a restore starts from: the volume as the journal first saw it.
    let base = filled_image(dir.path(), "v.base", VOLUME_BYTES)?;
    let volume = open_volume(&image, CacheMode::Writeback, access)?;
    volume.add_observer(journal.observer());
    let observed = Observed {
        journal,
        kind,
        journal_dir,
        image,
        base,
        _media: media,
        _dir: dir,
    };
    Ok(Some(Fixture::new(FixtureIo::new(volume)?, observed)))
}

/// The journal and the files a restore needs.
struct Observed {
    journal: Arc<Journal>,
    kind: Kind,
    journal_dir: PathBuf,
    image: PathBuf,
    base: PathBuf,
    _media: Option<TempDir>,
    _dir: TempDir,
}

impl Beside for Observed {
    fn check_after(&mut self, _: &mut FixtureIo, content: &[u8]) -> Result<()> {
        let status = self.journal.status();
        ensure!(
            status.state == JournalState::Running && status.gaps.is_empty(),
            "the journal did not keep up with the case: {status:#?}"
        );
        ensure!(status.open_gap.is_none(), "{status:#?}");
        // The flush before the read-back is a record of every case's, mapped ones included.
        if self.kind == Kind::Mapped {
            ensure!(
                status.appends == Some(AppendPath::Mapped) && status.mapped_records > 0,
                "no record went through the mapping: {status:#?}"
            );
        }
        self.journal.close();
        let image = std::fs::read(&self.image).context("read the image")?;
        compare_bytes("the image after the case", &image, content)?;
        let restored = verify_and_restore(&self.journal_dir, &self.base)?;
        compare_bytes("the image restored from the journal", &restored, content)
    }
}

/// Verifies the journal in `journal_dir` and restores volume `v` through it from `base`;
/// returns the restored image (`base` itself when the journal holds no write of `v`).
fn verify_and_restore(journal_dir: &Path, base: &Path) -> Result<Vec<u8>> {
    let set = MediaSet::open(&[journal_dir.to_path_buf()]).context("open the journal's media")?;
    let report = verify(&set);
    ensure!(report.ok(), "the journal does not verify: {report:#?}");
    if set.streams_of("v").is_empty() {
        return std::fs::read(base).context("read the base image");
    }
    let out = base.with_extension("restored");
    let options = RestoreOptions {
        volume: "v".into(),
        base: base.to_path_buf(),
        out: out.clone(),
        until: Until::End,
        allow_gaps: false,
    };
    restore(&set, &options, &mut |_| {}).context("restore the volume from the journal")?;
    let restored = std::fs::read(&out).context("read the restored image")?;
    Ok(restored)
}
