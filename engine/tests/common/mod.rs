//! Test helpers for migration tests: a guest that writes continuously through a
//! `VolumeQueue`, images with data and holes, and real NBD servers (qemu-nbd,
//! qemu-storage-daemon) on loopback.

#![allow(dead_code)]

use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_engine::volume::queue::{wait_readable, Rejected};
use ferry_engine::{BlockOp, Completion, Volume, VolumeConfig, VolumeQueue};

pub type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A small xorshift generator (tests need no crypto and no extra crate).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Creates an image of `len` bytes with pseudo-random data in every other MiB (holes
/// between) and returns its content.
pub fn make_image(path: &Path, len: u64, seed: u64) -> std::io::Result<Vec<u8>> {
    let file = std::fs::File::create(path)?;
    file.set_len(len)?;
    let mut model = vec![0u8; len as usize];
    let mut rng = Rng::new(seed);
    let mut offset = 0;
    while offset < len {
        let n = (len - offset).min(1 << 20);
        for b in &mut model[offset as usize..(offset + n / 2) as usize] {
            *b = rng.next() as u8;
        }
        file.write_all_at(&model[offset as usize..(offset + n / 2) as usize], offset)?;
        offset += 2 << 20;
    }
    file.sync_all()?;
    Ok(model)
}

pub fn open_volume(name: &str, path: &Path) -> Result<Arc<Volume>, ferry_engine::EngineError> {
    Volume::open(VolumeConfig {
        name: name.into(),
        path: path.to_path_buf(),
        ..Default::default()
    })
}

/// Where and how a [`Guest`] writes.
#[derive(Clone)]
pub struct GuestConfig {
    /// Bytes of the volume to write into.
    pub region: Range<u64>,
    /// Writes are 1..=blocks_max blocks of 4 KiB, block aligned.
    pub blocks_max: u64,
    pub inflight: usize,
    pub seed: u64,
    /// One request in this many is a write-zeroes or a discard (0: never).
    pub zero_every: u64,
    /// Requests per second at most (0: as fast as the volume goes).
    pub requests_per_s_max: u64,
}

impl GuestConfig {
    pub fn whole(len: u64, seed: u64) -> Self {
        Self {
            region: 0..len,
            blocks_max: 16,
            inflight: 16,
            seed,
            zero_every: 13,
            requests_per_s_max: 0,
        }
    }

    pub fn paced(mut self, requests_per_s: u64) -> Self {
        self.requests_per_s_max = requests_per_s;
        self
    }
}

/// What a guest did.
pub struct GuestReport {
    pub model: Vec<u8>,
    pub ok: u64,
    pub failed: u64,
}

/// A writer thread that plays guest: random writes, write-zeroes and discards with many in
/// flight, never two overlapping at once, and a model of what the disk must hold.
pub struct Guest {
    stop: Arc<AtomicBool>,
    pub completed: Arc<AtomicU64>,
    handle: JoinHandle<Result<GuestReport, String>>,
}

const BLOCK: u64 = 4096;

struct Inflight {
    range: Range<u64>,
    zero: bool,
}

impl Guest {
    pub fn spawn(volume: Arc<Volume>, model: Vec<u8>, config: GuestConfig) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let completed = Arc::new(AtomicU64::new(0));
        let (s, c) = (stop.clone(), completed.clone());
        let handle = std::thread::spawn(move || guest_loop(volume, model, config, &s, &c));
        Self {
            stop,
            completed,
            handle,
        }
    }

    /// Waits until at least `n` requests completed (to be sure the guest is busy).
    pub fn wait_completed(&self, n: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.completed.load(Ordering::Relaxed) < n {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }

    pub fn stop(self) -> Result<GuestReport, String> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .map_err(|_| "guest thread panicked".to_string())?
    }
}

fn guest_loop(
    volume: Arc<Volume>,
    mut model: Vec<u8>,
    config: GuestConfig,
    stop: &AtomicBool,
    completed: &AtomicU64,
) -> Result<GuestReport, String> {
    let mut queue =
        VolumeQueue::new(volume, 0, config.inflight as u32, 1).map_err(|e| e.to_string())?;
    let mut buffers: Vec<Vec<u8>> = (0..config.inflight)
        .map(|_| vec![0u8; (config.blocks_max * BLOCK) as usize])
        .collect();
    let mut slots: Vec<Option<Inflight>> = (0..config.inflight).map(|_| None).collect();
    let mut rng = Rng::new(config.seed);
    let mut done: Vec<Completion> = Vec::new();
    let (mut ok, mut failed, mut serial) = (0u64, 0u64, 0u64);
    let blocks = (config.region.end - config.region.start) / BLOCK;
    let started = Instant::now();
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        let mut paused = false;
        while !stopping && !paused {
            let Some(slot) = slots.iter().position(Option::is_none) else {
                break;
            };
            let rate = config.requests_per_s_max;
            if rate > 0 && serial >= (started.elapsed().as_secs_f64() * rate as f64) as u64 {
                break;
            }
            let n = 1 + rng.below(config.blocks_max.min(blocks));
            let start = config.region.start + rng.below(blocks - n + 1) * BLOCK;
            let range = start..start + n * BLOCK;
            if slots
                .iter()
                .flatten()
                .any(|f| f.range.start < range.end && range.start < f.range.end)
            {
                break; // overlaps a request in flight: try again next round
            }
            serial += 1;
            let zero = config.zero_every > 0 && serial % config.zero_every == 0;
            let buf = &mut buffers[slot];
            let iov = [libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: (n * BLOCK) as usize,
            }];
            let op = if zero && serial % 2 == 0 {
                BlockOp::Discard {
                    offset_bytes: start,
                    len_bytes: n * BLOCK,
                }
            } else if zero {
                BlockOp::WriteZeroes {
                    offset_bytes: start,
                    len_bytes: n * BLOCK,
                    unmap: false,
                }
            } else {
                for (i, b) in buf[..(n * BLOCK) as usize].iter_mut().enumerate() {
                    *b = (serial.wrapping_mul(131) as usize + i * 7 + (i >> 9)) as u8 | 1;
                }
                BlockOp::Write {
                    offset_bytes: start,
                    iovecs: &iov,
                }
            };
            // SAFETY: the buffer of slot `slot` is neither touched nor freed until the
            // completion with tag `slot` has been reaped below.
            match unsafe { queue.submit(op, slot as u64) } {
                Ok(()) => slots[slot] = Some(Inflight { range, zero }),
                Err(Rejected::Paused) => paused = true,
                Err(Rejected::Full) => break,
            }
        }
        queue.commit().map_err(|e| e.to_string())?;
        if stopping && queue.inflight() == 0 {
            break;
        }
        if queue.inflight() == 0 {
            std::thread::sleep(Duration::from_micros(50));
            continue;
        }
        wait_readable(queue.notify_fd(), 5);
        queue.clear_notification();
        queue.reap(&mut done);
        for c in done.drain(..) {
            let slot = c.tag as usize;
            let Some(f) = slots[slot].take() else {
                continue;
            };
            completed.fetch_add(1, Ordering::Relaxed);
            if c.result.is_err() {
                failed += 1;
                continue;
            }
            ok += 1;
            let dst = &mut model[f.range.start as usize..f.range.end as usize];
            if f.zero {
                dst.fill(0);
            } else {
                dst.copy_from_slice(&buffers[slot][..dst.len()]);
            }
        }
    }
    Ok(GuestReport { model, ok, failed })
}

/// Compares `len` bytes of `path` at `offset` with `expected`; names the first difference.
pub fn assert_image(path: &Path, offset: u64, expected: &[u8]) -> Result<(), String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut actual = vec![0u8; expected.len()];
    file.read_exact_at(&mut actual, offset)
        .map_err(|e| e.to_string())?;
    match actual.iter().zip(expected).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(i) => Err(format!(
            "{} differs at volume byte {i} (chunk {}): {} != expected {}",
            path.display(),
            i / 65536,
            actual[i],
            expected[i]
        )),
    }
}

pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// An NBD server process, killed when dropped.
pub struct Server {
    child: Child,
    pub uri: String,
}

impl Server {
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait_listening(child: &mut Child, probe: impl Fn() -> bool) -> std::io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            return Err(std::io::Error::other(format!(
                "NBD server exited: {status}"
            )));
        }
        if probe() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(std::io::Error::other("NBD server did not start listening"))
}

pub fn qemu_nbd_tcp(image: &Path, export: &str) -> std::io::Result<Server> {
    let port = free_port()?;
    let mut child = Command::new("qemu-nbd")
        .args([
            "-f",
            "raw",
            "-x",
            export,
            "-b",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            "-e",
            "8",
        ])
        .arg(image)
        .stdout(Stdio::null())
        .spawn()?;
    wait_listening(&mut child, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })?;
    Ok(Server {
        child,
        uri: format!("nbd://127.0.0.1:{port}/{export}"),
    })
}

pub fn qemu_nbd_unix(image: &Path, export: &str, socket: &Path) -> std::io::Result<Server> {
    qemu_nbd_unix_opts(image, export, socket, false)
}

/// `qemu-nbd` on a unix socket, read-only (`-r`) if asked.
pub fn qemu_nbd_unix_opts(
    image: &Path,
    export: &str,
    socket: &Path,
    read_only: bool,
) -> std::io::Result<Server> {
    let mut child = Command::new("qemu-nbd")
        .args(["-f", "raw", "-x", export, "-t", "-e", "8", "-k"])
        .arg(socket)
        .args(if read_only { &["-r"][..] } else { &[][..] })
        .arg(image)
        .stdout(Stdio::null())
        .spawn()?;
    wait_listening(&mut child, || {
        std::os::unix::net::UnixStream::connect(socket).is_ok()
    })?;
    Ok(Server {
        child,
        uri: format!("nbd+unix:///{export}?socket={}", socket.display()),
    })
}

pub fn qemu_storage_daemon(image: &Path, export: &str) -> std::io::Result<Server> {
    let port = free_port()?;
    let mut child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=n0,filename={}",
            image.display()
        ))
        .arg("--nbd-server")
        .arg(format!(
            "addr.type=inet,addr.host=127.0.0.1,addr.port={port}"
        ))
        .arg("--export")
        .arg(format!(
            "type=nbd,id=e0,node-name=n0,name={export},writable=on"
        ))
        .stdout(Stdio::null())
        .spawn()?;
    wait_listening(&mut child, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })?;
    Ok(Server {
        child,
        uri: format!("nbd://127.0.0.1:{port}/{export}"),
    })
}

/// Creates an empty (sparse) image of `len` bytes for a server to export.
pub fn empty_image(path: &Path, len: u64) -> std::io::Result<PathBuf> {
    let mut f = std::fs::File::create(path)?;
    f.set_len(len)?;
    f.flush()?;
    Ok(path.to_path_buf())
}
