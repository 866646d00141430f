//! A `qemu-nbd` serving a raw image on a unix socket as export `e`, killed on drop.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub(crate) struct QemuNbd(pub Child);

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Serves `image` to up to 4 clients at once.
pub(crate) fn serve(image: &Path, socket: &Path) -> std::io::Result<QemuNbd> {
    serve_shared(image, socket, 4)
}

/// `qemu-nbd -e CLIENTS`: at most that many clients at once.
pub(crate) fn serve_shared(image: &Path, socket: &Path, clients: u32) -> std::io::Result<QemuNbd> {
    let child = Command::new("qemu-nbd")
        .args([
            "-f",
            "raw",
            "-x",
            "e",
            "-t",
            "-e",
            &clients.to_string(),
            "-k",
        ])
        .arg(socket)
        .arg(image)
        .stdout(Stdio::null())
        .spawn()?;
    let server = QemuNbd(child);
    for _ in 0..500 {
        if UnixStream::connect(socket).is_ok() {
            return Ok(server);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(std::io::Error::other("qemu-nbd did not start"))
}
