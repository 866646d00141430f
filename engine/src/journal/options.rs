//! The journal's settings and their `key=value,...` syntax.

use std::path::PathBuf;

use super::error::JournalError;

/// When the guest waits for the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JournalMode {
    /// A guest write completes only when its record is durable on the medium.
    Sync,
    /// A guest write completes at once; the journal trails by at most `lag_max_bytes`.
    Async,
}

/// What happens when the last allowed medium is full or the medium cannot be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFull {
    /// Stop journaling, count the lost writes as a gap, keep the guest running (default).
    Stop,
    /// Hold guest writes (sync and async alike) until room appears: the writer retries
    /// once a second, counting the media files present in the directory against
    /// `media_max`, so moving archived media away lets the journal go on.
    Pause,
}

/// How media are written relative to the host page cache (`cache=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MediumCache {
    /// Direct I/O (`O_DIRECT`) where the filesystem or device supports it, except on tmpfs,
    /// where the page cache is the medium (default).
    Auto,
    /// Direct I/O, and an error when a medium cannot be opened that way.
    None,
    /// Through the page cache.
    Writeback,
}

/// Which thread makes the journal's group commits (`committer=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Committer {
    /// For a `sync` journal, `queue` when the journal directory is on tmpfs or ramfs (and no
    /// block device is registered as a medium), else `writer`; `writer` for `async` (default).
    Auto,
    /// The journal's writer thread, woken by the queues: the commit overlaps the queues'
    /// work, at the price of a wake-up each way (right for media that take a flush).
    Writer,
    /// The queue thread that submitted the writes, at the end of its batch, inline: no
    /// wake-ups, the queue waits for the append (right for memory-backed media).
    Queue,
}

/// Whether records go straight into a mapping of memory-backed media (`mapped=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MappedAppends {
    /// `on` for a `sync` journal, `off` for an `async` one, whose writer thread copies the
    /// records beside the queues instead of on the guest's path (default).
    Auto,
    /// On tmpfs/ramfs media the observing threads encode records into a shared mapping of
    /// the medium, durable at once (see `journal::mapped`).
    On,
    /// Every record goes through the writer's group commits.
    Off,
}

/// The journal's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalOptions {
    pub dir: PathBuf,
    /// Bytes per medium file; a medium is sealed before it would grow past this.
    pub capacity_bytes: u64,
    /// How many media may exist in the directory at once.
    pub media_max: u32,
    pub mode: JournalMode,
    /// In async mode: bytes observed but not yet durable before guest writes are held.
    pub lag_max_bytes: u64,
    pub on_full: OnFull,
    /// The label of the log started when a new journal is created.
    pub label: String,
    /// Zero-filled spare media kept formatted in the directory for the writer to take
    /// and overwrite in place (0: media are created empty and grow as written).
    pub spares: u32,
    /// Direct or buffered appends.
    pub cache: MediumCache,
    /// Who makes group commits.
    pub committer: Committer,
    /// Memory the running journal's in-memory log may take; past it the oldest entries are
    /// dropped from memory (the media keep them).
    pub log_memory_bytes: u64,
    /// Whether records go straight into a mapping of memory-backed media.
    pub mapped: MappedAppends,
}

/// The smallest medium capacity accepted.
pub const CAPACITY_MIN_BYTES: u64 = 256 * 1024;

impl JournalOptions {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            capacity_bytes: 1 << 30,
            media_max: 1024,
            mode: JournalMode::Sync,
            lag_max_bytes: 64 << 20,
            on_full: OnFull::Stop,
            label: String::from("initial"),
            spares: 0,
            cache: MediumCache::Auto,
            committer: Committer::Auto,
            log_memory_bytes: 256 << 20,
            mapped: MappedAppends::Auto,
        }
    }

    /// Parses `dir=DIR,capacity=1G,media-max=N,mode=sync|async,lag-max=64M,on-full=stop|pause,label=L,spares=N,cache=auto|none|writeback,committer=auto|writer|queue,log-memory=256M,mapped=auto|on|off`.
    /// Sizes take the suffixes K, M, G, T (powers of 1024).
    pub fn parse(spec: &str) -> Result<Self, JournalError> {
        let mut dir = None;
        let mut o = Self::new("");
        for part in spec.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| bad(part, "expected key=value"))?;
            match key {
                "dir" => dir = Some(PathBuf::from(value)),
                "capacity" => o.capacity_bytes = parse_size(part, value)?,
                "media-max" => {
                    o.media_max = value.parse().map_err(|_| bad(part, "expected a number"))?
                }
                "mode" => {
                    o.mode = match value {
                        "sync" => JournalMode::Sync,
                        "async" => JournalMode::Async,
                        _ => return Err(bad(part, "expected sync or async")),
                    }
                }
                "lag-max" => o.lag_max_bytes = parse_size(part, value)?,
                "on-full" => {
                    o.on_full = match value {
                        "stop" => OnFull::Stop,
                        "pause" => OnFull::Pause,
                        _ => return Err(bad(part, "expected stop or pause")),
                    }
                }
                "label" => o.label = value.to_string(),
                "cache" => {
                    o.cache = match value {
                        "auto" => MediumCache::Auto,
                        "none" => MediumCache::None,
                        "writeback" => MediumCache::Writeback,
                        _ => return Err(bad(part, "expected auto, none or writeback")),
                    }
                }
                "committer" => {
                    o.committer = match value {
                        "auto" => Committer::Auto,
                        "writer" => Committer::Writer,
                        "queue" => Committer::Queue,
                        _ => return Err(bad(part, "expected auto, writer or queue")),
                    }
                }
                "log-memory" => o.log_memory_bytes = parse_size(part, value)?,
                "mapped" => {
                    o.mapped = match value {
                        "auto" => MappedAppends::Auto,
                        "on" => MappedAppends::On,
                        "off" => MappedAppends::Off,
                        _ => return Err(bad(part, "expected auto, on or off")),
                    }
                }
                "spares" => o.spares = value.parse().map_err(|_| bad(part, "expected a number"))?,
                _ => return Err(bad(part, "unknown key")),
            }
        }
        o.dir = dir.ok_or_else(|| bad(spec, "dir= is required"))?;
        o.validate()?;
        Ok(o)
    }

    /// `mapped=` resolved: whether memory-backed media are lent to the observing threads.
    pub fn maps_media(&self) -> bool {
        match self.mapped {
            MappedAppends::Auto => self.mode == JournalMode::Sync,
            MappedAppends::On => true,
            MappedAppends::Off => false,
        }
    }

    pub fn validate(&self) -> Result<(), JournalError> {
        if self.capacity_bytes < CAPACITY_MIN_BYTES {
            return Err(bad("capacity", "must be at least 256K"));
        }
        if self.media_max == 0 {
            return Err(bad("media-max", "must be at least 1"));
        }
        Ok(())
    }
}

fn bad(option: &str, reason: &str) -> JournalError {
    JournalError::BadOption {
        option: option.to_string(),
        reason: reason.to_string(),
    }
}

/// Parses a size option's value (see [`crate::units::parse_size`]).
pub fn parse_size(option: &str, value: &str) -> Result<u64, JournalError> {
    crate::units::parse_size(value).map_err(|reason| bad(option, &reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_spec() -> Result<(), JournalError> {
        let o = JournalOptions::parse(
            "dir=/j,capacity=1M,media-max=3,mode=async,lag-max=4K,on-full=pause,spares=2,cache=none,committer=queue,log-memory=1M,mapped=off",
        )?;
        assert_eq!(o.dir, PathBuf::from("/j"));
        assert_eq!(o.capacity_bytes, 1 << 20);
        assert_eq!(o.media_max, 3);
        assert_eq!(o.mode, JournalMode::Async);
        assert_eq!(o.lag_max_bytes, 4096);
        assert_eq!(o.on_full, OnFull::Pause);
        assert_eq!(o.spares, 2);
        assert_eq!(o.cache, MediumCache::None);
        assert_eq!(o.committer, Committer::Queue);
        assert_eq!(o.log_memory_bytes, 1 << 20);
        assert_eq!(o.mapped, MappedAppends::Off);
        assert!(!o.maps_media());
        assert_eq!(JournalOptions::parse("dir=/j")?.log_memory_bytes, 256 << 20);
        assert!(JournalOptions::parse("dir=/j")?.maps_media());
        assert!(!JournalOptions::parse("dir=/j,mode=async")?.maps_media());
        assert!(JournalOptions::parse("dir=/j,mode=async,mapped=on")?.maps_media());
        Ok(())
    }

    #[test]
    fn refuses_bad_specs() {
        assert!(JournalOptions::parse("capacity=1M").is_err());
        assert!(JournalOptions::parse("dir=/j,capacity=1").is_err());
        assert!(JournalOptions::parse("dir=/j,mode=maybe").is_err());
        assert!(JournalOptions::parse("dir=/j,colour=red").is_err());
        assert!(JournalOptions::parse("dir=/j,capacity=99999999999T").is_err());
        assert!(JournalOptions::parse("dir=/j,log-memory=lots").is_err());
        assert!(JournalOptions::parse("dir=/j,mapped=yes").is_err());
    }
}
