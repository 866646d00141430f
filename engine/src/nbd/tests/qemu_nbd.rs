//! A `qemu-nbd` serving a raw image on a unix socket as export `e`, from the shared test
//! support (killed on drop).

use std::path::Path;

use ferry_test_support::nbd::{NbdAddr, NbdServer};

/// Serves `image` to up to 4 clients at once.
pub(crate) fn serve(image: &Path, socket: &Path) -> anyhow::Result<NbdServer> {
    serve_shared(image, socket, 4)
}

/// `qemu-nbd -e CLIENTS`: at most that many clients at once.
pub(crate) fn serve_shared(image: &Path, socket: &Path, clients: u32) -> anyhow::Result<NbdServer> {
    NbdServer::qemu_nbd_clients(image, "e", &NbdAddr::Unix(socket.to_path_buf()), clients)
}
