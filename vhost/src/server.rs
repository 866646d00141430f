//! Serving one volume on its vhost-user socket: bind the socket (refusing one in use),
//! then accept frontends one after another, each with a fresh device and fresh workers.
//!
//! A frontend that disconnects (a VM shut down, or QEMU reconnecting after a daemon
//! restart) is followed by the next one on the same socket; the volume stays open. The loop
//! ends only when its [`ServeStop`] is triggered (the daemon removes the volume at run time).

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use ferry_engine::Volume;
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::backend::{BlockDevice, DeviceSettings};
use crate::gate::{DeviceGate, StopCause};

/// Errors of binding a volume's socket (operator errors, reported before serving).
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("socket {0} is in use by another process")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("cannot bind socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Binds a listening unix socket at `path`. A stale socket file (nobody accepting) is
/// replaced; a live one or any other file is an error.
pub fn bind_socket(path: &Path) -> Result<UnixListener, BindError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(BindError::NotASocket(path.to_path_buf()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(BindError::InUse(path.to_path_buf()));
        }
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path).map_err(|source| BindError::Bind {
        path: path.to_path_buf(),
        source,
    })
}

/// What the control socket sees of a served volume.
#[derive(Default)]
pub struct ConnectionState {
    pub connected: AtomicBool,
    pub connections: AtomicU64,
}

/// Ends a [`serve_volume`] loop from another thread: the listening socket stops accepting
/// and the frontend attached at that moment, if any, is disconnected (its requests in flight
/// drain as at any disconnect).
pub struct ServeStop {
    /// A duplicate of the loop's listening socket. `shutdown(SHUT_RD)` on a listening unix
    /// socket wakes a blocked `accept` with `EINVAL` and refuses later connects
    /// (`ECONNREFUSED`), so the loop cannot take a frontend after the stop.
    listener: OwnedFd,
    state: Mutex<StopState>,
}

#[derive(Default)]
struct StopState {
    stopped: bool,
    /// The frontend being served, to disconnect on a stop.
    frontend: Option<ShutdownHandle>,
}

impl ServeStop {
    /// A stop for a loop that will serve on `listener`.
    pub fn new(listener: &UnixListener) -> io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            listener: listener.as_fd().try_clone_to_owned()?,
            state: Mutex::default(),
        }))
    }

    /// Stops the loop: no frontend is accepted from now on, and the attached one is
    /// disconnected. [`serve_volume`] returns once that frontend's requests have drained.
    pub fn stop(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.stopped = true;
        if let Err(e) =
            nix::sys::socket::shutdown(self.listener.as_raw_fd(), nix::sys::socket::Shutdown::Read)
        {
            log::warn!("cannot shut the vhost-user listener down: {e}");
        }
        if let Some(frontend) = state.frontend.take() {
            frontend.shutdown();
        }
    }

    /// True once [`stop`](Self::stop) was called.
    pub fn is_stopped(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .stopped
    }

    /// Records the frontend just accepted; disconnects it at once when a stop came first
    /// (the stop and the accept raced), so that it never outlives the stop.
    fn frontend_attached(&self, frontend: Option<ShutdownHandle>) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match frontend {
            Some(frontend) if state.stopped => frontend.shutdown(),
            frontend => state.frontend = frontend,
        }
    }

    fn frontend_detached(&self) {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .frontend = None;
    }
}

/// What one volume's serving loop works with besides its volume and settings.
pub struct Serving {
    pub listener: UnixListener,
    pub state: Arc<ConnectionState>,
    pub stop: Arc<ServeStop>,
    pub gate: Arc<DeviceGate>,
}

/// Serves `volume` on its listener, one frontend at a time, until `stop` is triggered, each
/// frontend's requests admitted by the gate. The socket file is left in place: its owner
/// removes it.
pub fn serve_volume(volume: Arc<Volume>, settings: DeviceSettings, serving: Serving) {
    let Serving {
        listener,
        state,
        stop,
        gate,
    } = serving;
    let mut listener = Listener::from(listener);
    ferry_engine::confine::enter(&crate::seccomp::VOLUME_SERVER_SYSCALLS);
    while !stop.is_stopped() {
        let served = serve_one_connection(&volume, &settings, &mut listener, &state, &stop, &gate);
        if let Err(e) = served {
            if stop.is_stopped() {
                break;
            }
            log::error!("volume {}: {e}", volume.name());
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    log::info!("volume {}: serving stopped", volume.name());
}

fn serve_one_connection(
    volume: &Arc<Volume>,
    settings: &DeviceSettings,
    listener: &mut Listener,
    state: &ConnectionState,
    stop: &ServeStop,
    gate: &Arc<DeviceGate>,
) -> Result<(), String> {
    let device = BlockDevice::new(volume.clone(), settings.clone(), gate.clone())
        .map_err(|e| e.to_string())?;
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon = VhostUserDaemon::new(format!("ferry-{}", volume.name()), device.clone(), mem)
        .map_err(|e| format!("cannot create vhost-user daemon: {e}"))?;
    for (handler, fd) in daemon
        .get_epoll_handlers()
        .iter()
        .zip(device.completion_fds())
    {
        handler
            .register_listener(fd.as_raw_fd(), EventSet::IN, device.completion_event())
            .map_err(|e| format!("cannot watch io_uring completions: {e}"))?;
    }
    // Registered for this connection only: dropped (unregistered, closed) when it ends.
    let mut resume_wakers = Vec::new();
    for fd in device.completion_fds() {
        if let Ok(owned) = fd.try_clone_to_owned() {
            resume_wakers.push(volume.register_resume_waker(owned));
        }
    }
    daemon
        .start(listener)
        .map_err(|e| format!("accepting a frontend failed: {e}"))?;
    stop.frontend_attached(daemon.shutdown_handle());
    gate.frontend_attached(daemon.shutdown_handle());
    state.connected.store(true, Ordering::SeqCst);
    state.connections.fetch_add(1, Ordering::SeqCst);
    log::info!("volume {}: frontend connected", volume.name());
    let result = daemon.wait();
    stop.frontend_detached();
    gate.frontend_detached();
    state.connected.store(false, Ordering::SeqCst);
    // Requests still in flight complete before the workers and their rings go away. One
    // that outlives the drain's bound keeps its guest memory snapshot in its worker's slot,
    // and the worker drops its engine queue (which waits for the kernel) before that
    // snapshot (`QueueWorker`'s drop order), when the last clone of `device` goes.
    device.drain_all();
    // Every request of the frontend has completed: a hand-off armed on the gate may go on.
    gate.device_stopped(StopCause::FrontendGone);
    drop(resume_wakers);
    drop(daemon);
    device.close_exit_events();
    match result {
        Ok(()) => log::info!("volume {}: frontend disconnected", volume.name()),
        Err(e) => log::info!("volume {}: frontend disconnected: {e}", volume.name()),
    }
    Ok(())
}

#[cfg(test)]
mod tests;
