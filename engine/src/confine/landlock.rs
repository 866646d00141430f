//! Landlock: limits the whole process to the paths it was configured with.
//!
//! Landlock on this kernel (ABI up to 7) restricts only the calling thread and the threads it
//! starts afterwards, so [`restrict_process`] must run on the main thread before any other
//! thread exists. Descriptors opened before it stay usable; every later `open`, `mkdir`,
//! `unlink`, `rename` or socket `bind` by path is checked against the rules. A kernel
//! without Landlock is reported, not refused: the restriction is a second line of defence.

use std::path::PathBuf;

use landlock::{
    path_beneath_rules, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
    ABI,
};

/// The newest Landlock ABI whose file-system rights ferry asks for; older kernels get what
/// they support (the crate's best-effort compatibility).
const ABI_WANTED: ABI = ABI::V5;

/// The paths the process may reach after [`restrict_process`].
#[derive(Debug, Default, Clone)]
pub struct PathRules {
    /// Files and directories (with everything beneath) that may be read, written,
    /// created in and removed from.
    pub read_write: Vec<PathBuf>,
    /// Files and directories that may only be read.
    pub read_only: Vec<PathBuf>,
}

/// How far the kernel enforces the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforcement {
    Full,
    /// Some rights are not known to this kernel and stay unrestricted.
    Partial,
    /// The kernel has no Landlock (or it is disabled).
    None,
}

/// Errors building or applying the rules.
#[derive(Debug, thiserror::Error)]
#[error("Landlock: {0}")]
pub struct LandlockError(#[from] landlock::RulesetError);

/// Restricts the calling thread, and every thread it starts from now on, to `rules`.
pub fn restrict_process(rules: &PathRules) -> Result<Enforcement, LandlockError> {
    let all = AccessFs::from_all(ABI_WANTED);
    let read = AccessFs::from_read(ABI_WANTED);
    // Paths that do not exist are skipped by `path_beneath_rules`: a volume whose image is
    // created later lives in a directory that is on the list.
    let status = Ruleset::default()
        .handle_access(all)?
        .create()?
        .add_rules(path_beneath_rules(&rules.read_write, all))?
        .add_rules(path_beneath_rules(&rules.read_only, read))?
        .restrict_self()?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => Enforcement::Full,
        RulesetStatus::PartiallyEnforced => Enforcement::Partial,
        RulesetStatus::NotEnforced => Enforcement::None,
    })
}
