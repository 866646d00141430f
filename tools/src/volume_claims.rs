//! What a served volume holds for itself alone (its name, its vhost-user socket, its image
//! or a slice of it), and the check that two volumes, or a volume and the control socket,
//! do not hold the same thing. Used on the command line's volumes before anything is
//! created, and on every volume added while the daemon runs.

use std::path::{Path, PathBuf};

use crate::volume_spec::VolumeSpec;

/// A volume's exclusive holdings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub name: String,
    pub socket: PathBuf,
    pub image: PathBuf,
    /// The volume is the whole image (no `length=`): no other volume may use any of it.
    pub whole_image: bool,
}

impl Claims {
    pub fn of_spec(spec: &VolumeSpec) -> Self {
        Self {
            name: spec.engine.name.clone(),
            socket: spec.socket.clone(),
            image: spec.engine.path.clone(),
            whole_image: spec.engine.length_bytes.is_none(),
        }
    }

    /// Why `self` and `other` cannot both be served, if they cannot.
    pub fn conflict(&self, other: &Self) -> Option<String> {
        if self.name == other.name {
            return Some(format!("two volumes are named {}", self.name));
        }
        if same_path(&self.socket, &other.socket) {
            return Some(format!(
                "volumes {} and {} use the same socket {}",
                self.name,
                other.name,
                self.socket.display()
            ));
        }
        if same_path(&self.image, &other.image) && (self.whole_image || other.whole_image) {
            return Some(format!(
                "volumes {} and {} use the same image {}",
                self.name,
                other.name,
                self.image.display()
            ));
        }
        None
    }

    /// Why this volume cannot be served beside a control socket at `control`, if it cannot.
    pub fn conflict_with_control(&self, control: &Path) -> Option<String> {
        same_path(&self.socket, control).then(|| {
            format!(
                "volume {} and --control use the same socket {}",
                self.name,
                control.display()
            )
        })
    }
}

/// True when both paths name the same file; paths that do not exist yet are compared
/// after making them absolute.
pub fn same_path(a: &Path, b: &Path) -> bool {
    let canon = |p: &Path| {
        p.canonicalize().unwrap_or_else(|_| {
            std::env::current_dir()
                .map(|d| d.join(p))
                .unwrap_or_else(|_| p.to_path_buf())
        })
    };
    canon(a) == canon(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(name: &str, socket: &str, image: &str, whole_image: bool) -> Claims {
        Claims {
            name: name.into(),
            socket: socket.into(),
            image: image.into(),
            whole_image,
        }
    }

    #[test]
    fn names_sockets_and_whole_images_are_exclusive() {
        let a = claims("a", "/tmp/a.sock", "/tmp/a.img", true);
        assert_eq!(
            a.conflict(&claims("b", "/tmp/b.sock", "/tmp/b.img", true)),
            None
        );
        let same_name = a.conflict(&claims("a", "/tmp/b.sock", "/tmp/b.img", true));
        assert_eq!(same_name.as_deref(), Some("two volumes are named a"));
        let same_socket = a.conflict(&claims("b", "/tmp/a.sock", "/tmp/b.img", true));
        assert!(same_socket.is_some_and(|m| m.contains("same socket")));
        let same_image = a.conflict(&claims("b", "/tmp/b.sock", "/tmp/a.img", false));
        assert!(same_image.is_some_and(|m| m.contains("same image")));
        let slices = claims("s1", "/tmp/s1.sock", "/tmp/disk", false);
        assert_eq!(
            slices.conflict(&claims("s2", "/tmp/s2.sock", "/tmp/disk", false)),
            None,
            "two slices of one image may be served (their ranges are the operator's choice)"
        );
        assert!(a.conflict_with_control(Path::new("/tmp/a.sock")).is_some());
        assert!(a.conflict_with_control(Path::new("/tmp/ctl")).is_none());
    }
}
