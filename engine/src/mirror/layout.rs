//! Where each volume of a migration lies in the target, and the `TARGET.layout.json` file
//! that records it for a merge (several volumes into one target). See `docs/migration.md`.

use std::path::{Path, PathBuf};

/// Every volume of a merge starts at a multiple of this in the target.
pub const PLACEMENT_ALIGNMENT_BYTES: u64 = 1 << 20;
/// The `magic` field of a layout file.
pub const LAYOUT_MAGIC: &str = "ferry-layout";
/// The `version` field this code writes and reads.
pub const LAYOUT_VERSION: u32 = 1;

/// One volume's slice of the target.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Placement {
    pub name: String,
    pub offset_bytes: u64,
    pub length_bytes: u64,
}

/// The placement of all volumes of a job, as written to the layout file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Layout {
    pub magic: String,
    pub version: u32,
    pub alignment_bytes: u64,
    /// The bytes of the target in use: the end of the last slice.
    pub total_bytes: u64,
    pub volumes: Vec<Placement>,
}

/// Why a layout file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("layout {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("layout {path}: not a ferry layout file: {reason}")]
    Format { path: PathBuf, reason: String },
}

impl Layout {
    /// Places `volumes` (name, length) one after another, each at the next aligned offset.
    /// A single volume lies at offset 0 and the target needs exactly its length.
    pub fn place(volumes: &[(String, u64)]) -> Self {
        let mut offset = 0u64;
        let mut placed = Vec::with_capacity(volumes.len());
        let mut total = 0;
        for (name, len) in volumes {
            placed.push(Placement {
                name: name.clone(),
                offset_bytes: offset,
                length_bytes: *len,
            });
            total = offset + len;
            offset = total.next_multiple_of(PLACEMENT_ALIGNMENT_BYTES);
        }
        Self {
            magic: LAYOUT_MAGIC.to_string(),
            version: LAYOUT_VERSION,
            alignment_bytes: PLACEMENT_ALIGNMENT_BYTES,
            total_bytes: total,
            volumes: placed,
        }
    }

    /// The layout file that belongs to a file target: `TARGET.layout.json`.
    pub fn path_for(target: &Path) -> PathBuf {
        let mut name = target.as_os_str().to_os_string();
        name.push(".layout.json");
        PathBuf::from(name)
    }

    /// The JSON text of the file (pretty, with a trailing newline).
    pub fn encode(&self) -> String {
        let mut text = serde_json::to_string_pretty(self).unwrap_or_default();
        text.push('\n');
        text
    }

    /// Parses and checks a layout file's text.
    pub fn decode(path: &Path, text: &str) -> Result<Self, LayoutError> {
        let bad = |reason: String| LayoutError::Format {
            path: path.to_path_buf(),
            reason,
        };
        let layout: Self = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        if layout.magic != LAYOUT_MAGIC {
            return Err(bad(format!("magic is {:?}", layout.magic)));
        }
        if layout.version != LAYOUT_VERSION {
            return Err(bad(format!("version {} is not supported", layout.version)));
        }
        Ok(layout)
    }

    /// Writes the file atomically (a temporary file renamed over it) and durably.
    pub fn write(&self, path: &Path) -> Result<(), LayoutError> {
        let io = |source| LayoutError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut tmp_name = path.as_os_str().to_os_string();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        {
            use std::io::Write;
            let mut file = std::fs::File::create(&tmp).map_err(io)?;
            file.write_all(self.encode().as_bytes()).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, path).map_err(io)
    }

    pub fn read(path: &Path) -> Result<Self, LayoutError> {
        let text = std::fs::read_to_string(path).map_err(|source| LayoutError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::decode(path, &text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_volumes_at_aligned_offsets() {
        let layout = Layout::place(&[
            ("a".into(), 3 << 19),
            ("b".into(), 4096),
            ("c".into(), 1 << 20),
        ]);
        let offsets: Vec<u64> = layout.volumes.iter().map(|p| p.offset_bytes).collect();
        assert_eq!(offsets, vec![0, 2 << 20, 3 << 20]);
        assert_eq!(layout.total_bytes, 4 << 20);
        assert_eq!(
            Layout::place(&[("x".into(), 12345 * 512)]).total_bytes,
            12345 * 512
        );
    }

    #[test]
    fn golden_layout_text() -> Result<(), LayoutError> {
        let layout = Layout::place(&[("vda".into(), 1 << 20), ("vdb".into(), 512)]);
        let golden = r#"{
  "magic": "ferry-layout",
  "version": 1,
  "alignment_bytes": 1048576,
  "total_bytes": 1049088,
  "volumes": [
    {
      "name": "vda",
      "offset_bytes": 0,
      "length_bytes": 1048576
    },
    {
      "name": "vdb",
      "offset_bytes": 1048576,
      "length_bytes": 512
    }
  ]
}
"#;
        assert_eq!(layout.encode(), golden);
        assert_eq!(Layout::decode(Path::new("x"), golden)?, layout);
        let wrong = golden.replace("ferry-layout", "other");
        assert!(Layout::decode(Path::new("x"), &wrong).is_err());
        let newer = golden.replace("\"version\": 1", "\"version\": 2");
        assert!(Layout::decode(Path::new("x"), &newer).is_err());
        Ok(())
    }

    #[test]
    fn writes_next_to_the_target() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = Layout::path_for(&dir.path().join("t.img"));
        assert!(path.ends_with("t.img.layout.json"));
        let layout = Layout::place(&[("a".into(), 512)]);
        layout.write(&path)?;
        assert_eq!(Layout::read(&path)?, layout);
        Ok(())
    }
}
