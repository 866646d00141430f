//! `ferry serve` driven by a real vhost-user-blk client (libblkio): data round trips at many
//! offsets and sizes with many requests in flight, flush, discard and write-zeroes, requests
//! out of range, read-only volumes, two queues, two volumes, O_DIRECT, frontends that go
//! away with requests in flight, and SIGTERM under load.
//! Every test checks the image file on the host against a model of what the client wrote.

#[path = "support/mod.rs"]
mod support;

use anyhow::{ensure, Context as _, Result};
use nix::sys::signal::Signal;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::blkio_client::{BlkioClient, BlkioOpts, Op};
use support::daemon::Daemon;
use support::ferry;
use support::loop_device::LoopDevice;

/// Bound on the daemon's clean exit after SIGTERM.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// One `ferry serve` with one volume named `vol` and a control socket, in its own directory.
struct Served {
    _dir: tempfile::TempDir,
    daemon: Daemon,
    image: PathBuf,
    socket: PathBuf,
    control: PathBuf,
}

impl Served {
    /// Serves a new sparse image of `size_bytes`; `extra` is appended to the volume spec.
    fn start(size_bytes: u64, extra: &str) -> Result<Self> {
        let dir = support::scratch_dir()?;
        let image = dir.path().join("vol.img");
        support::create_image(&image, size_bytes)?;
        Self::start_on(dir, image, extra)
    }

    /// Serves an existing image `image` inside `dir`.
    fn start_on(dir: tempfile::TempDir, image: PathBuf, extra: &str) -> Result<Self> {
        let socket = dir.path().join("vol.sock");
        let control = dir.path().join("ctl.sock");
        let spec = format!(
            "name=vol,path={},socket={}{extra}",
            image.display(),
            socket.display()
        );
        let mut args = ferry::volume_args(&spec).to_vec();
        args.extend(["--control".to_string(), control.display().to_string()]);
        let daemon = ferry::serve(&args, &[&socket, &control])?;
        Ok(Self {
            _dir: dir,
            daemon,
            image,
            socket,
            control,
        })
    }

    fn connect(&self, opts: &BlkioOpts) -> Result<BlkioClient> {
        BlkioClient::connect(&self.socket, opts)
    }

    /// The volume's I/O counters from `query-volumes`.
    fn stats(&self) -> Result<serde_json::Value> {
        Ok(ferry::query_volume(&self.control, "vol")?["stats"].clone())
    }

    /// SIGTERM; the daemon must exit 0 and remove its sockets.
    fn stop(mut self) -> Result<()> {
        let status = self.daemon.terminate(EXIT_TIMEOUT)?;
        ensure!(
            status.success(),
            "ferry exited {status}:\n{}",
            self.daemon.log()
        );
        ensure!(!self.socket.exists(), "socket left behind");
        ensure!(!self.control.exists(), "control socket left behind");
        Ok(())
    }
}

/// What the image should hold: every byte the client wrote, zeroes elsewhere.
struct Model {
    bytes: Vec<u8>,
}

impl Model {
    fn new(len_bytes: u64) -> Self {
        Self {
            bytes: vec![0; len_bytes as usize],
        }
    }

    fn write(&mut self, offset_bytes: u64, data: &[u8]) {
        let at = offset_bytes as usize;
        self.bytes[at..at + data.len()].copy_from_slice(data);
    }

    fn zero(&mut self, offset_bytes: u64, len_bytes: u64) {
        let at = offset_bytes as usize;
        self.bytes[at..at + len_bytes as usize].fill(0);
    }

    /// Fails unless the image file holds exactly the model's bytes.
    fn check_image(&self, image: &Path) -> Result<()> {
        let host = std::fs::read(image).context("read image")?;
        ensure!(host.len() == self.bytes.len(), "image size {}", host.len());
        if let Some(at) = first_difference(&host, &self.bytes) {
            anyhow::bail!(
                "image differs from the model at byte {at} (sector {}): {:#04x} != {:#04x}",
                at / 512,
                host[at],
                self.bytes[at]
            );
        }
        Ok(())
    }
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Request sizes from one sector to 1 MiB, most of them not multiples of 4 KiB.
const SIZES: [usize; 12] = [
    512,
    1024,
    1536,
    4096,
    4608,
    8192,
    12800,
    65536,
    66048,
    131072,
    262_656,
    1 << 20,
];

/// Lays out `count` non-overlapping extents from `start`, sizes cycling through `SIZES`,
/// separated by gaps of 1..7 sectors (so most offsets are 512- but not 4096-aligned).
fn layout(start: u64, count: usize) -> Vec<(u64, usize)> {
    let mut cursor = start;
    (0..count)
        .map(|i| {
            let len = SIZES[(i * 5) % SIZES.len()];
            let extent = (cursor, len);
            cursor += len as u64 + 512 * (1 + (i as u64 * 3) % 7);
            extent
        })
        .collect()
}

/// Writes every extent at once from the start of the buffer region (data from `seed`), then
/// reads them back at once into the region's second half; updates `model`.
fn write_and_verify(
    client: &mut BlkioClient,
    queue: usize,
    extents: &[(u64, usize)],
    seed: u64,
    model: &mut Model,
) -> Result<()> {
    let total: usize = extents.iter().map(|e| e.1).sum();
    let half = client.buf().len() / 2;
    ensure!(total <= half, "extents larger than half the buffer region");
    let data = support::pattern(seed, total);
    client.buf_mut()[..total].copy_from_slice(&data);
    let mut writes = Vec::new();
    let mut reads = Vec::new();
    let mut buf_offset = 0;
    for (i, &(offset_bytes, len_bytes)) in extents.iter().enumerate() {
        writes.push(Op::Write {
            offset_bytes,
            len_bytes,
            buf_offset,
            fua: i % 5 == 0,
        });
        reads.push(Op::Read {
            offset_bytes,
            len_bytes,
            buf_offset: half + buf_offset,
        });
        model.write(offset_bytes, &data[buf_offset..buf_offset + len_bytes]);
        buf_offset += len_bytes;
    }
    client.run_batch_ok(queue, &writes)?;
    client.buf_mut()[half..half + total].fill(0xEE);
    client.run_batch_ok(queue, &reads)?;
    ensure!(
        client.buf()[half..half + total] == data[..],
        "read-back differs at byte {:?} of the batch",
        first_difference(&client.buf()[half..half + total], &data)
    );
    Ok(())
}

/// Reads `len_bytes` at `offset_bytes` (in 256 KiB requests) and compares with the model.
fn verify_range(
    client: &mut BlkioClient,
    model: &Model,
    offset_bytes: u64,
    len_bytes: usize,
) -> Result<()> {
    let back = client.read_all(offset_bytes, len_bytes, 256 << 10)?;
    let want = &model.bytes[offset_bytes as usize..offset_bytes as usize + len_bytes];
    if let Some(at) = first_difference(&back, want) {
        anyhow::bail!(
            "device differs from the model at byte {}",
            offset_bytes as usize + at
        );
    }
    Ok(())
}

fn big_client() -> BlkioOpts {
    BlkioOpts {
        buf_bytes: 20 << 20,
        ..BlkioOpts::default()
    }
}

/// 64 extents of 512 B..1 MiB at 512-aligned offsets, all in flight at once, in two rounds
/// that partly overwrite each other; flush; the device and the image file match the model.
#[test]
fn round_trip_many_offsets_and_sizes() -> Result<()> {
    const IMAGE_BYTES: u64 = 64 << 20;
    let served = Served::start(IMAGE_BYTES, "")?;
    let mut client = served.connect(&big_client())?;
    ensure!(client.capacity_bytes() == IMAGE_BYTES, "capacity");
    let mut model = Model::new(IMAGE_BYTES);
    write_and_verify(&mut client, 0, &layout(1536, 64), 1, &mut model)?;
    write_and_verify(&mut client, 0, &layout((5 << 20) + 2560, 64), 2, &mut model)?;
    // The last sector of the device, and a flush on its own and behind writes.
    write_and_verify(&mut client, 0, &[(IMAGE_BYTES - 512, 512)], 3, &mut model)?;
    client.flush()?;
    verify_range(&mut client, &model, 0, 16 << 20)?;
    drop(client);
    model.check_image(&served.image)?;
    served.stop()
}

/// Discard and write-zeroes (with and without unmap, aligned and not) read back as zeroes and
/// leave their neighbours alone; flush succeeds.
#[test]
fn discard_and_write_zeroes_read_back_as_zeroes() -> Result<()> {
    const IMAGE_BYTES: u64 = 16 << 20;
    const DATA_BYTES: usize = 8 << 20;
    let served = Served::start(IMAGE_BYTES, "")?;
    let mut client = served.connect(&big_client())?;
    let mut model = Model::new(IMAGE_BYTES);
    let data = support::pattern(11, DATA_BYTES);
    client.write_all(0, &data, 256 << 10)?;
    model.write(0, &data);
    let ops = [
        Op::Discard {
            offset_bytes: 1 << 20,
            len_bytes: 256 << 10,
        },
        Op::Discard {
            offset_bytes: (2 << 20) + 512,
            len_bytes: 9 * 512,
        },
        Op::WriteZeroes {
            offset_bytes: (3 << 20) + 1536,
            len_bytes: 100 * 512,
            no_unmap: false,
        },
        Op::WriteZeroes {
            offset_bytes: (4 << 20) + 512,
            len_bytes: 64 << 10,
            no_unmap: true,
        },
        Op::WriteZeroes {
            offset_bytes: 5 << 20,
            len_bytes: 1 << 20,
            no_unmap: false,
        },
        Op::WriteZeroes {
            offset_bytes: (7 << 20) - 512,
            len_bytes: 1024,
            no_unmap: true,
        },
        Op::Flush,
    ];
    client.run_batch_ok(0, &ops)?;
    for op in ops {
        match op {
            Op::Discard {
                offset_bytes,
                len_bytes,
            }
            | Op::WriteZeroes {
                offset_bytes,
                len_bytes,
                ..
            } => model.zero(offset_bytes, len_bytes),
            _ => {}
        }
    }
    verify_range(&mut client, &model, 0, DATA_BYTES)?;
    let stats = served.stats()?;
    ensure!(
        stats["discard_ops"] == 2 && stats["write_zeroes_ops"] == 4 && stats["flush_ops"] == 1,
        "counters: {stats}"
    );
    drop(client);
    model.check_image(&served.image)?;
    served.stop()
}

/// A discard or write-zeroes of zero sectors is answered at once: success on the volume,
/// an error past its end.
#[test]
fn zero_length_discards_are_answered_at_once() -> Result<()> {
    const IMAGE_BYTES: u64 = 8 << 20;
    let served = Served::start(IMAGE_BYTES, "")?;
    let mut client = served.connect(&BlkioOpts::default())?;
    let ops = [
        Op::Discard {
            offset_bytes: 4096,
            len_bytes: 0,
        },
        Op::WriteZeroes {
            offset_bytes: IMAGE_BYTES,
            len_bytes: 0,
            no_unmap: false,
        },
        Op::Discard {
            offset_bytes: IMAGE_BYTES + 4096,
            len_bytes: 0,
        },
    ];
    let results = client.run_batch(0, &ops)?;
    ensure!(results[0] == 0 && results[1] == 0, "{results:?}");
    ensure!(
        results[2] < 0,
        "a zero-length discard past the end: {results:?}"
    );
    drop(client);
    served.stop()
}

/// Frontends that connect, write and go away, again and again (a VM rebooted or restarted,
/// QEMU reconnecting): the daemon's open descriptors stay where they were. A connection that
/// left one descriptor behind per queue thread (vhost-user-backend's exit events, or a
/// thread's resume waker) would bring a long-running daemon to its descriptor limit.
#[test]
fn reconnecting_frontends_leak_no_descriptors() -> Result<()> {
    let served = Served::start(8 << 20, ",queues=2")?;
    let open_fds = || -> Result<usize> {
        let dir = format!("/proc/{}/fd", served.daemon.pid());
        Ok(std::fs::read_dir(&dir)
            .with_context(|| dir.clone())?
            .count())
    };
    // Counted while a client that wrote is connected and idle: the daemon then holds one
    // connection's descriptors, and has closed those of every earlier connection (it cleans
    // one up before it accepts the next).
    let write_and_count = |round: u64| -> Result<usize> {
        let mut client = served.connect(&BlkioOpts::default())?;
        client.write_all(round * 4096, &support::pattern(round, 4096), 4096)?;
        open_fds()
    };
    for round in 0..2 {
        write_and_count(round)?;
    }
    let before = write_and_count(2)?;
    for round in 3..22 {
        write_and_count(round)?;
    }
    let after = write_and_count(22)?;
    ensure!(
        after <= before,
        "open descriptors grew from {before} to {after} over 20 connections"
    );
    served.stop()
}

/// A frontend that goes away with requests in flight (a VM killed in the middle of its I/O),
/// again and again: the daemon finishes those requests before it lets go of the guest's
/// memory and rings (vhost/ARCHITECTURE.md, "Guest memory and requests in flight"), keeps
/// serving, and none of them lands after the next frontend's writes.
#[test]
fn frontends_gone_with_requests_in_flight() -> Result<()> {
    const IMAGE_BYTES: u64 = 64 << 20;
    const REGION_BYTES: usize = 16 << 20;
    const CHUNK_BYTES: usize = 256 << 10;
    let served = Served::start(IMAGE_BYTES, ",queues=2")?;
    let opts = BlkioOpts {
        num_queues: 2,
        buf_bytes: 2 * REGION_BYTES,
        ..BlkioOpts::default()
    };
    let chunks = REGION_BYTES / CHUNK_BYTES;
    for round in 0..4u64 {
        let mut client = served.connect(&opts)?;
        client.buf_mut()[..REGION_BYTES].copy_from_slice(&support::pattern(round, REGION_BYTES));
        let writes = (0..chunks)
            .map(|i| Op::Write {
                offset_bytes: (i * CHUNK_BYTES) as u64,
                len_bytes: CHUNK_BYTES,
                buf_offset: i * CHUNK_BYTES,
                fua: false,
            })
            .collect();
        let reads = (0..chunks)
            .map(|i| Op::Read {
                offset_bytes: (i * CHUNK_BYTES) as u64,
                len_bytes: CHUNK_BYTES,
                buf_offset: REGION_BYTES + i * CHUNK_BYTES,
            })
            .collect();
        // One pass that kicks both queues and reaps what is done by then; the frontend
        // goes with the rest still in flight.
        client.run_batches_within(&[writes, reads], Duration::from_millis(1))?;
        drop(client);
    }
    // The next frontend's writes are the last: nothing of the rounds above may land after.
    let last = support::pattern(99, REGION_BYTES);
    let mut client = served.connect(&opts)?;
    client.write_all(0, &last, CHUNK_BYTES)?;
    ensure!(
        client.read_all(0, REGION_BYTES, CHUNK_BYTES)? == last,
        "the last frontend reads back other data than it wrote"
    );
    drop(client);
    let mut model = Model::new(IMAGE_BYTES);
    model.write(0, &last);
    model.check_image(&served.image)?;
    let log = served.daemon.log();
    ensure!(!log.contains("panicked"), "{log}");
    served.stop()
}

/// Sends `bad` on queue 0: every request must fail, and the daemon must count each among
/// the volume's errors.
fn expect_errors(served: &Served, client: &mut BlkioClient, bad: &[Op]) -> Result<()> {
    let errors_before = served.stats()?["errors"].as_u64().unwrap_or(0);
    let results = client.run_batch(0, bad)?;
    for (op, ret) in bad.iter().zip(&results) {
        ensure!(*ret < 0, "{op:?} got ret {ret}, expected an error");
    }
    let stats = served.stats()?;
    let errors_after = stats["errors"].as_u64().unwrap_or(0);
    let by_kind: u64 = [
        "read_errors",
        "write_errors",
        "flush_errors",
        "discard_errors",
        "write_zeroes_errors",
        "refused",
    ]
    .iter()
    .map(|kind| stats[kind].as_u64().unwrap_or(0))
    .sum();
    ensure!(
        by_kind == errors_after,
        "errors by kind add up to {by_kind}, not {errors_after}: {stats}"
    );
    ensure!(
        errors_after >= errors_before + bad.len() as u64,
        "the daemon counted {} errors for {} bad requests",
        errors_after - errors_before,
        bad.len()
    );
    Ok(())
}

/// Reads, writes, discards and write-zeroes past the end or straddling it fail with a
/// negative ret; the last sectors are untouched and the daemon keeps serving.
#[test]
fn out_of_range_requests_fail_and_daemon_keeps_serving() -> Result<()> {
    const IMAGE_BYTES: u64 = 8 << 20;
    let mut served = Served::start(IMAGE_BYTES, "")?;
    let mut client = served.connect(&BlkioOpts::default())?;
    let mut model = Model::new(IMAGE_BYTES);
    let tail = support::pattern(21, 4096);
    client.write_all(IMAGE_BYTES - 4096, &tail, 4096)?;
    model.write(IMAGE_BYTES - 4096, &tail);
    client.buf_mut()[..8192].fill(0x5A);
    let end = IMAGE_BYTES;
    let bad = [
        Op::Read {
            offset_bytes: end,
            len_bytes: 512,
            buf_offset: 0,
        },
        Op::Read {
            offset_bytes: end - 512,
            len_bytes: 1024,
            buf_offset: 0,
        },
        Op::Read {
            offset_bytes: end + (1 << 30),
            len_bytes: 4096,
            buf_offset: 0,
        },
        Op::Write {
            offset_bytes: end,
            len_bytes: 512,
            buf_offset: 0,
            fua: false,
        },
        Op::Write {
            offset_bytes: end - 2048,
            len_bytes: 4096,
            buf_offset: 0,
            fua: false,
        },
        Op::Write {
            offset_bytes: u64::MAX - 511,
            len_bytes: 512,
            buf_offset: 0,
            fua: false,
        },
        Op::Discard {
            offset_bytes: end - 512,
            len_bytes: 4096,
        },
        Op::WriteZeroes {
            offset_bytes: end - 1024,
            len_bytes: 2048,
            no_unmap: false,
        },
    ];
    expect_errors(&served, &mut client, &bad)?;
    ensure!(served.daemon.is_running(), "daemon died");
    // Still serving, on the same connection and on a new one.
    verify_range(&mut client, &model, IMAGE_BYTES - (1 << 20), 1 << 20)?;
    let data = support::pattern(22, 64 << 10);
    client.write_all(0, &data, 4096)?;
    model.write(0, &data);
    drop(client);
    let mut again = served.connect(&BlkioOpts::default())?;
    verify_range(&mut again, &model, 0, 1 << 20)?;
    drop(again);
    model.check_image(&served.image)?;
    served.stop()
}

/// `logical-block-size=4K`: the client sees 4 KiB blocks (libblkio takes virtio-blk's
/// `blk_size` as its `request-alignment`), whole-block I/O of every kind works, and requests
/// that are not whole blocks fail at the daemon (libblkio sends them) while it keeps serving.
#[test]
fn logical_block_size_4k_takes_whole_blocks_only() -> Result<()> {
    const IMAGE_BYTES: u64 = 8 << 20;
    let served = Served::start(IMAGE_BYTES, ",logical-block-size=4K")?;
    let mut client = served.connect(&BlkioOpts::default())?;
    ensure!(client.capacity_bytes() == IMAGE_BYTES, "capacity");
    let alignment = client.property_i32("request-alignment")?;
    ensure!(
        alignment == 4096,
        "request-alignment {alignment}, expected 4096"
    );
    let reported = ferry::query_volume(&served.control, "vol")?["logical-block-size"].clone();
    ensure!(
        reported == 4096,
        "query-volumes logical-block-size {reported}"
    );
    let mut model = Model::new(IMAGE_BYTES);
    let data = support::pattern(41, 256 << 10);
    client.write_all(8192, &data, 4096)?;
    model.write(8192, &data);
    let good = [
        Op::Discard {
            offset_bytes: 16384,
            len_bytes: 8192,
        },
        Op::WriteZeroes {
            offset_bytes: 65536,
            len_bytes: 4096,
            no_unmap: true,
        },
    ];
    client.run_batch_ok(0, &good)?;
    model.write(16384, &[0; 8192]);
    model.write(65536, &[0; 4096]);
    let bad = [
        Op::Read {
            offset_bytes: 512,
            len_bytes: 4096,
            buf_offset: 0,
        },
        Op::Read {
            offset_bytes: 4096,
            len_bytes: 512,
            buf_offset: 0,
        },
        Op::Write {
            offset_bytes: 2048,
            len_bytes: 4096,
            buf_offset: 0,
            fua: false,
        },
        Op::Write {
            offset_bytes: 8192,
            len_bytes: 6144,
            buf_offset: 0,
            fua: false,
        },
        Op::Discard {
            offset_bytes: 8192 + 512,
            len_bytes: 4096,
        },
        Op::WriteZeroes {
            offset_bytes: 8192,
            len_bytes: 1024,
            no_unmap: false,
        },
    ];
    expect_errors(&served, &mut client, &bad)?;
    verify_range(&mut client, &model, 0, 512 << 10)?;
    drop(client);
    model.check_image(&served.image)?;
    served.stop()
}

/// A `read-only` volume serves reads and refuses writes, discards and write-zeroes; the
/// image file stays as it was.
#[test]
fn read_only_volume_refuses_changes() -> Result<()> {
    const IMAGE_BYTES: u64 = 8 << 20;
    let dir = support::scratch_dir()?;
    let image = dir.path().join("vol.img");
    let content = support::pattern(31, IMAGE_BYTES as usize);
    std::fs::write(&image, &content).context("write image")?;
    let served = Served::start_on(dir, image, ",read-only")?;
    let volume = ferry::query_volume(&served.control, "vol")?;
    ensure!(volume["read-only"] == true, "query-volumes: {volume}");
    // libblkio refuses to start a read-only device unless asked for read-only access.
    ensure!(
        served.connect(&BlkioOpts::default()).is_err(),
        "libblkio started a read-write client on a read-only volume"
    );
    let mut client = served.connect(&BlkioOpts {
        read_only: true,
        ..BlkioOpts::default()
    })?;
    let back = client.read_all(4096 + 512, 1 << 20, 64 << 10)?;
    ensure!(
        back[..] == content[4608..4608 + (1 << 20)],
        "read-only volume read back other data"
    );
    client.buf_mut()[..8192].fill(0x77);
    let changes = [
        Op::Write {
            offset_bytes: 0,
            len_bytes: 4096,
            buf_offset: 0,
            fua: false,
        },
        Op::Write {
            offset_bytes: 1 << 20,
            len_bytes: 512,
            buf_offset: 0,
            fua: true,
        },
        Op::Discard {
            offset_bytes: 0,
            len_bytes: 1 << 20,
        },
        Op::WriteZeroes {
            offset_bytes: 2 << 20,
            len_bytes: 4096,
            no_unmap: false,
        },
    ];
    let results = client.run_batch(0, &changes)?;
    for (op, ret) in changes.iter().zip(&results) {
        ensure!(*ret < 0, "{op:?} on a read-only volume got ret {ret}");
    }
    // Discard and write-zeroes are not offered on a read-only volume: unsupported, not an
    // I/O error (VIRTIO_BLK_S_UNSUPP, which libblkio reports as -ENOTSUP).
    ensure!(
        results[2..] == [-libc::ENOTSUP, -libc::ENOTSUP],
        "discard / write-zeroes on a read-only volume: {:?}",
        &results[2..]
    );
    let errors = served.stats()?["errors"].clone();
    eprintln!("errors counted by the daemon after the refused changes: {errors}");
    let again = client.read_all(0, 4096, 4096)?;
    ensure!(again[..] == content[..4096], "read-only data changed");
    drop(client);
    let host = std::fs::read(&served.image).context("read image")?;
    ensure!(host == content, "read-only image changed on the host");
    served.stop()
}

/// `queues=2` with a 2-queue client: concurrent batches on both queues, each read back
/// through the other queue.
#[test]
fn two_queues_concurrent_batches() -> Result<()> {
    const IMAGE_BYTES: u64 = 32 << 20;
    const REQS: usize = 128;
    const BLOCK: usize = 8192;
    let served = Served::start(IMAGE_BYTES, ",queues=2")?;
    let mut client = served.connect(&BlkioOpts {
        num_queues: 2,
        queue_size: Some(128),
        buf_bytes: 8 << 20,
        ..BlkioOpts::default()
    })?;
    ensure!(
        client.num_queues() == 2,
        "client has {} queues",
        client.num_queues()
    );
    let mut model = Model::new(IMAGE_BYTES);
    let data = support::pattern(41, 2 * REQS * BLOCK);
    client.buf_mut()[..data.len()].copy_from_slice(&data);
    // Queue q writes the blocks i*2+q (interleaved), at 512 B past a 4 KiB boundary.
    let base = (1 << 20) + 512;
    let writes = |q: usize| -> Vec<Op> {
        (0..REQS)
            .map(|i| {
                let slot = i * 2 + q;
                Op::Write {
                    offset_bytes: base + (slot * BLOCK) as u64,
                    len_bytes: BLOCK,
                    buf_offset: slot * BLOCK,
                    fua: false,
                }
            })
            .collect()
    };
    let results = client.run_batches(&[writes(0), writes(1)])?;
    ensure!(
        results.iter().flatten().all(|&r| r == 0),
        "a write failed: {results:?}"
    );
    model.write(base, &data);
    let read_half = data.len();
    let reads = |q: usize| -> Vec<Op> {
        (0..REQS)
            .map(|i| {
                let slot = i * 2 + (1 - q);
                Op::Read {
                    offset_bytes: base + (slot * BLOCK) as u64,
                    len_bytes: BLOCK,
                    buf_offset: read_half + slot * BLOCK,
                }
            })
            .collect()
    };
    let results = client.run_batches(&[reads(0), reads(1)])?;
    ensure!(
        results.iter().flatten().all(|&r| r == 0),
        "a read failed: {results:?}"
    );
    ensure!(
        client.buf()[read_half..2 * read_half] == data[..],
        "cross-queue read-back differs"
    );
    client.run_batches(&[vec![Op::Flush], vec![Op::Flush]])?;
    drop(client);
    model.check_image(&served.image)?;
    served.stop()
}

/// One daemon, two `--volume`s on two sockets: each client sees its own volume's size and
/// data, and each image holds only its own client's writes.
#[test]
fn two_volumes_in_one_daemon() -> Result<()> {
    let dir = support::scratch_dir()?;
    let sizes = [8u64 << 20, 12 << 20];
    let images: Vec<PathBuf> = (0..2)
        .map(|i| dir.path().join(format!("v{i}.img")))
        .collect();
    let sockets: Vec<PathBuf> = (0..2)
        .map(|i| dir.path().join(format!("v{i}.sock")))
        .collect();
    let mut args = Vec::new();
    for i in 0..2 {
        args.extend(ferry::volume_args(&format!(
            "name=v{i},path={},socket={},size={}",
            images[i].display(),
            sockets[i].display(),
            sizes[i]
        )));
    }
    let mut daemon = ferry::serve(&args, &[&sockets[0], &sockets[1]])?;
    let mut clients = Vec::new();
    for i in 0..2 {
        let client = BlkioClient::connect(&sockets[i], &BlkioOpts::default())?;
        ensure!(
            client.capacity_bytes() == sizes[i],
            "volume {i}: capacity {}",
            client.capacity_bytes()
        );
        clients.push(client);
    }
    let data: Vec<Vec<u8>> = (0..2).map(|i| support::pattern(50 + i, 2 << 20)).collect();
    for i in 0..2 {
        clients[i].write_all(4096 + 512, &data[i], 64 << 10)?;
    }
    for i in 0..2 {
        let back = clients[i].read_all(4096 + 512, 2 << 20, 128 << 10)?;
        ensure!(back == data[i], "volume {i} read back other data");
    }
    drop(clients);
    for i in 0..2 {
        let mut model = Model::new(sizes[i]);
        model.write(4096 + 512, &data[i]);
        model.check_image(&images[i])?;
    }
    let status = daemon.terminate(EXIT_TIMEOUT)?;
    ensure!(status.success(), "ferry exited {status}");
    ensure!(sockets.iter().all(|s| !s.exists()), "a socket left behind");
    Ok(())
}

/// `cache=none` (O_DIRECT): the same round trip, with 512 B-aligned requests that are not
/// 4 KiB-aligned among them, plus discard and write-zeroes.
#[test]
fn cache_none_round_trip() -> Result<()> {
    const IMAGE_BYTES: u64 = 32 << 20;
    let served = Served::start(IMAGE_BYTES, ",cache=none")?;
    let volume = ferry::query_volume(&served.control, "vol")?;
    ensure!(volume["cache"] != "writeback", "cache mode: {volume}");
    let mut client = served.connect(&big_client())?;
    let mut model = Model::new(IMAGE_BYTES);
    write_and_verify(&mut client, 0, &layout(512, 48), 61, &mut model)?;
    write_and_verify(
        &mut client,
        0,
        &layout((3 << 20) + 3584, 48),
        62,
        &mut model,
    )?;
    let zeroes = [
        Op::WriteZeroes {
            offset_bytes: 4096 + 1024,
            len_bytes: 8192,
            no_unmap: true,
        },
        Op::Discard {
            offset_bytes: 1 << 20,
            len_bytes: 64 << 10,
        },
        Op::Flush,
    ];
    client.run_batch_ok(0, &zeroes)?;
    model.zero(4096 + 1024, 8192);
    model.zero(1 << 20, 64 << 10);
    verify_range(&mut client, &model, 0, 16 << 20)?;
    drop(client);
    model.check_image(&served.image)?;
    served.stop()
}

/// SIGTERM while writes are in flight: the daemon exits 0, removes its socket, and every
/// write the client saw succeed is in the image file.
#[test]
fn sigterm_with_writes_in_flight() -> Result<()> {
    const IMAGE_BYTES: u64 = 64 << 20;
    const BLOCK: usize = 16 << 10;
    /// Distinct blocks of data per batch (the buffer region); larger batches reuse them.
    const BUF_BLOCKS: usize = 128;
    /// Writes of the batch during which SIGTERM is sent: long enough to be cut in the middle.
    const SIGNALLED_BATCH: usize = 8 * BUF_BLOCKS;
    let mut served = Served::start(IMAGE_BYTES, "")?;
    let mut client = served.connect(&BlkioOpts {
        buf_bytes: BUF_BLOCKS * BLOCK,
        ..BlkioOpts::default()
    })?;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(served.daemon.pid())?);
    // (slot, seed, block of the seed's data) of every write that completed successfully.
    let mut completed: Vec<(usize, u64, usize)> = Vec::new();
    let mut first_slot = 0;
    let mut terminated = false;
    // Two full batches, then SIGTERM once the third (large) one is being served, then batches
    // until one gets nothing done.
    for batch in 0.. {
        let len = if batch == 2 {
            SIGNALLED_BATCH
        } else {
            BUF_BLOCKS
        };
        if (first_slot + len) * BLOCK > IMAGE_BYTES as usize {
            anyhow::bail!("the daemon kept serving after SIGTERM");
        }
        let seed = 1000 + batch as u64;
        client
            .buf_mut()
            .copy_from_slice(&support::pattern(seed, BUF_BLOCKS * BLOCK));
        let ops: Vec<Op> = (0..len)
            .map(|i| Op::Write {
                offset_bytes: ((first_slot + i) * BLOCK) as u64,
                len_bytes: BLOCK,
                buf_offset: (i % BUF_BLOCKS) * BLOCK,
                fua: false,
            })
            .collect();
        let timeout = Duration::from_secs(match batch {
            0 | 1 => 30,
            2 => 3,
            _ => 1,
        });
        client.submit_batches(&[ops])?;
        let mut results = vec![vec![None; len]];
        if batch == 2 {
            // Once the daemon has completed one write of the batch, the rest are in flight.
            client.reap_until(&mut results, 1, timeout)?;
            nix::sys::signal::kill(pid, Signal::SIGTERM).context("send SIGTERM")?;
            terminated = true;
        }
        client.reap_until(&mut results, len, timeout)?;
        let results = results.swap_remove(0);
        let done: Vec<usize> = (0..len).filter(|&i| results[i] == Some(0)).collect();
        eprintln!("batch {batch}: {} of {len} writes completed", done.len());
        ensure!(
            batch >= 2 || done.len() == len,
            "batch {batch} failed before SIGTERM: {results:?}"
        );
        completed.extend(done.iter().map(|&i| (first_slot + i, seed, i % BUF_BLOCKS)));
        first_slot += len;
        if terminated && done.is_empty() {
            break;
        }
    }
    let status = served.daemon.wait_exit(EXIT_TIMEOUT)?;
    ensure!(
        status.success(),
        "ferry exited {status}:\n{}",
        served.daemon.log()
    );
    ensure!(!served.socket.exists(), "socket left behind after SIGTERM");
    drop(client);
    let host = std::fs::read(&served.image).context("read image")?;
    let mut data = std::collections::HashMap::new();
    for (slot, seed, block) in completed {
        let data = data
            .entry(seed)
            .or_insert_with(|| support::pattern(seed, BUF_BLOCKS * BLOCK));
        ensure!(
            host[slot * BLOCK..(slot + 1) * BLOCK] == data[block * BLOCK..(block + 1) * BLOCK],
            "a write the client saw complete (slot {slot}) is not in the image"
        );
    }
    Ok(())
}

/// A block device as the volume (a loop device over an image file), buffered and O_DIRECT:
/// round trips, discard and write-zeroes (BLKDISCARD/BLKZEROOUT through fallocate), and the
/// backing file holds exactly what the client wrote.
#[test]
fn block_device_round_trip() -> Result<()> {
    const IMAGE_BYTES: u64 = 32 << 20;
    for (round, cache) in ["", ",cache=none"].iter().enumerate() {
        let image_dir = support::scratch_dir()?;
        let image = image_dir.path().join("backing.img");
        support::create_image(&image, IMAGE_BYTES)?;
        let Some(device) = support::require_ok("a loop device", LoopDevice::attach(&image)) else {
            return Ok(());
        };
        let served = Served::start_on(support::scratch_dir()?, device.path().to_path_buf(), cache)?;
        let volume = ferry::query_volume(&served.control, "vol")?;
        ensure!(volume["size"] == IMAGE_BYTES, "size: {volume}");
        let mut client = served.connect(&big_client())?;
        let mut model = Model::new(IMAGE_BYTES);
        write_and_verify(
            &mut client,
            0,
            &layout(4096, 48),
            70 + round as u64,
            &mut model,
        )?;
        let zeroes = [
            Op::WriteZeroes {
                offset_bytes: 8192,
                len_bytes: 8192,
                no_unmap: true,
            },
            Op::Discard {
                offset_bytes: 1 << 20,
                len_bytes: 64 << 10,
            },
            Op::Flush,
        ];
        client.run_batch_ok(0, &zeroes)?;
        model.zero(8192, 8192);
        model.zero(1 << 20, 64 << 10);
        verify_range(&mut client, &model, 0, 16 << 20)?;
        drop(client);
        let stop_image = served.image.clone();
        served.stop()?;
        ensure!(stop_image == device.path(), "served the device");
        drop(device);
        model.check_image(&image)?;
    }
    Ok(())
}
