//! Tests of [`serve_volume`]'s stop: an idle loop and a loop with a frontend attached both
//! end, and the socket refuses connections afterwards.

use super::*;
use std::time::{Duration, Instant};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Bound on a stopped loop's end; only a hang reaches it.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

struct Served {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    state: Arc<ConnectionState>,
    stop: Arc<ServeStop>,
    thread: std::thread::JoinHandle<()>,
}

fn serve() -> Result<Served, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let volume = Volume::open(ferry_engine::VolumeConfig {
        name: "v".into(),
        path: dir.path().join("v.img"),
        size_bytes: Some(1 << 20),
        ..Default::default()
    })?;
    let settings = DeviceSettings {
        queues: 1,
        queues_per_thread: 1,
        serial: "v".into(),
        poll_us: 0,
        batch: 8,
        logical_block_bytes: 512,
    };
    let socket = dir.path().join("v.sock");
    let listener = bind_socket(&socket)?;
    let state = Arc::new(ConnectionState::default());
    let stop = ServeStop::new(&listener)?;
    let thread = {
        let (state, stop) = (state.clone(), stop.clone());
        let serving = Serving {
            listener,
            state,
            stop,
            gate: Arc::new(DeviceGate::new_open(Duration::from_secs(10))),
        };
        std::thread::spawn(move || serve_volume(volume, settings, serving))
    };
    Ok(Served {
        _dir: dir,
        socket,
        state,
        stop,
        thread,
    })
}

fn join_within(thread: std::thread::JoinHandle<()>, bound: Duration) -> TestResult {
    let deadline = Instant::now() + bound;
    while !thread.is_finished() {
        if Instant::now() >= deadline {
            return Err("serve_volume did not return after its stop".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    thread.join().map_err(|_| "serve_volume panicked")?;
    Ok(())
}

#[test]
fn a_stopped_loop_without_a_frontend_returns_and_refuses_connections() -> TestResult {
    let served = serve()?;
    served.stop.stop();
    assert!(served.stop.is_stopped());
    join_within(served.thread, STOP_TIMEOUT)?;
    let refused = UnixStream::connect(&served.socket);
    assert!(refused.is_err(), "the socket still accepts after the stop");
    Ok(())
}

#[test]
fn a_stop_disconnects_the_attached_frontend() -> TestResult {
    let served = serve()?;
    let mut frontend = UnixStream::connect(&served.socket)?;
    let deadline = Instant::now() + STOP_TIMEOUT;
    while !served.state.connected.load(Ordering::SeqCst) {
        if Instant::now() >= deadline {
            return Err("the frontend was not accepted".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    served.stop.stop();
    join_within(served.thread, STOP_TIMEOUT)?;
    assert!(!served.state.connected.load(Ordering::SeqCst));
    // The daemon's end is shut down: the frontend reads the end of the stream.
    frontend.set_read_timeout(Some(STOP_TIMEOUT))?;
    let mut byte = [0u8; 1];
    assert_eq!(std::io::Read::read(&mut frontend, &mut byte)?, 0);
    Ok(())
}
