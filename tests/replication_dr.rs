//! Replication to a DR site between two hosts (`docs/replication.md`): `ferry serve` daemons
//! A and B, each in its own network namespace, over mutual TLS. The DR side alone (this test
//! plays the primary with the engine's encoder): records applied in order; garbage,
//! bad-checksum and replayed streams refused with nothing applied; B killed (SIGKILL) with
//! records logged, its replicas a prefix of the write order, its log re-applied on restart;
//! promotion serving exactly the primary's state to libblkio on the replicas' sockets, whose
//! gates were closed until then. Then the whole thing driven by `ferry replicate start` on
//! A with a libblkio client writing a sequence-stamped pattern on two volumes: replicas
//! equal to the primary after promotion, also when B is killed between the writes and
//! restarted, and a group promoted while records are still on a slow link is a prefix of the
//! guest's writes across both volumes. A QEMU guest writes on the primary and a second one,
//! booted on the promoted replica, reads the same bytes. Sync mode: every write the client saw
//! completed is on the DR site (the primary killed right after, then promoted), and the DR
//! daemon killed while the client writes degrades the group to async without an error.

#[path = "support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use ferry_engine::peer::transport::ClientStream;
use ferry_engine::peer::ControlAddress;
use ferry_engine::replication::frame::{Ack, Frame, Record, RecordOp, HEADER_BYTES};
use ferry_engine::tls::TlsCredentials;
use serde_json::{json, Value};
use support::blkio_client::{BlkioClient, BlkioOpts, Op};
use support::two_hosts::{path_str, HostOptions, TwoHosts, CONTROL_PORT, VOLUME_BYTES};

const REPLICA_BYTES: u64 = 1 << 20;
const BLOCK_BYTES: usize = 4096;
const BLOCKS: u64 = REPLICA_BYTES / BLOCK_BYTES as u64;
const TIMEOUT: Duration = Duration::from_secs(60);

/// Record `seq` of the workload: on volume `seq % 2`, one block stamped with its sequence
/// number, at a block chosen so later records overwrite earlier ones; every 10th a
/// write-zeroes of 2 blocks, every 25th a flush.
fn record(seq: u64) -> Record {
    let block = (seq * 7) % BLOCKS;
    let offset_bytes = block * BLOCK_BYTES as u64;
    let op = if seq.is_multiple_of(25) {
        RecordOp::Flush
    } else if seq.is_multiple_of(10) {
        RecordOp::WriteZeroes {
            offset_bytes,
            len_bytes: (2 * BLOCK_BYTES as u64).min(REPLICA_BYTES - offset_bytes),
            unmap: false,
        }
    } else {
        let mut data = vec![(seq % 251) as u8 + 1; BLOCK_BYTES];
        data[..8].copy_from_slice(&seq.to_le_bytes());
        RecordOp::Write { offset_bytes, data }
    };
    Record {
        seq,
        volume_index: (seq % 2) as u32,
        timestamp_ns: seq,
        op,
    }
}

/// The two volumes of the primary after records `1..=n`.
fn primary_after(n: u64) -> [Vec<u8>; 2] {
    let mut vols = [
        vec![0u8; REPLICA_BYTES as usize],
        vec![0u8; REPLICA_BYTES as usize],
    ];
    for seq in 1..=n {
        let r = record(seq);
        let vol = &mut vols[r.volume_index as usize];
        match r.op {
            RecordOp::Write { offset_bytes, data } => {
                let at = offset_bytes as usize;
                vol[at..at + data.len()].copy_from_slice(&data);
            }
            RecordOp::WriteZeroes {
                offset_bytes,
                len_bytes,
                ..
            } => {
                vol[offset_bytes as usize..(offset_bytes + len_bytes) as usize].fill(0);
            }
            _ => {}
        }
    }
    vols
}

/// The N for which the replicas equal the primary after N, if any (the prefix check).
fn prefix_point(replicas: &[Vec<u8>; 2], last: u64) -> Option<u64> {
    (0..=last).rev().find(|&n| primary_after(n) == *replicas)
}

fn encode(range: std::ops::RangeInclusive<u64>) -> Vec<u8> {
    let mut out = Vec::new();
    for seq in range {
        record(seq).encode_into(&mut out);
    }
    out
}

/// A connection to B's control listener from host A's namespace, with A's certificate.
fn connect_from_a(hosts: &TwoHosts) -> Result<ClientStream> {
    let namespace = format!("/run/netns/{}", hosts.host_a().namespace);
    let creds = TlsCredentials::load(&hosts.creds_a).context("A's credentials")?;
    let config = creds.client_config().context("A's TLS client")?;
    let address = ControlAddress::Tcp {
        host: hosts.network.host(1).address.to_string(),
        port: CONTROL_PORT,
    };
    // A thread that joins A's network namespace (setns affects the calling thread only)
    // connects; the socket stays in that namespace after the thread ends.
    std::thread::spawn(move || -> Result<ClientStream> {
        let ns = std::fs::File::open(&namespace).with_context(|| namespace.clone())?;
        // SAFETY: setns reads the descriptor, which `ns` owns for the whole call, and changes
        // only this thread's network namespace.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        ensure!(
            rc == 0,
            "setns {namespace}: {}",
            std::io::Error::last_os_error()
        );
        Ok(ClientStream::connect(
            &address,
            Some(&Arc::clone(&config)),
            TIMEOUT,
            TIMEOUT,
        )?)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the connecting thread panicked"))?
}

/// The primary's end of a replication stream.
struct Stream {
    conn: ClientStream,
}

impl Stream {
    /// Asks for the group's stream; returns it with B's first acknowledgment.
    fn open(hosts: &TwoHosts, group: &str) -> Result<(Stream, Ack)> {
        let mut conn = connect_from_a(hosts)?;
        let request = json!({ "command": "replicate-stream", "arguments": { "group": group } });
        conn.write_all(format!("{request}\n").as_bytes())?;
        conn.flush()?;
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while byte[0] != b'\n' {
            ensure!(conn.read(&mut byte)? == 1, "B closed before its reply");
            line.push(byte[0]);
        }
        let reply: Value = serde_json::from_slice(&line)?;
        ensure!(
            reply.get("return").is_some(),
            "replicate-stream refused: {reply}"
        );
        let mut stream = Stream { conn };
        let ack = stream.ack()?;
        Ok((stream, ack))
    }

    fn ack(&mut self) -> Result<Ack> {
        let mut buf = vec![0u8; HEADER_BYTES];
        self.conn.read_exact(&mut buf)?;
        match Frame::decode(&buf)? {
            (Frame::Ack(ack), _) => Ok(ack),
            (other, _) => bail!("B sent {other:?}"),
        }
    }

    /// Sends `bytes`, then reads acknowledgments until one says `seq` is durable and applied.
    fn send_until_applied(&mut self, bytes: &[u8], seq: u64) -> Result<()> {
        self.conn.write_all(bytes)?;
        self.conn.flush()?;
        loop {
            let ack = self.ack()?;
            if ack.applied_seq >= seq {
                return Ok(());
            }
        }
    }

    fn send_until_durable(&mut self, bytes: &[u8], seq: u64) -> Result<()> {
        self.conn.write_all(bytes)?;
        self.conn.flush()?;
        while self.ack()?.durable_seq < seq {}
        Ok(())
    }

    /// Sends `bytes` and waits for B to close the stream (B may close it before it has read
    /// everything, so a failed write is expected too).
    fn send_refused(mut self, bytes: &[u8]) -> Result<()> {
        let _ = self.conn.write_all(bytes).and_then(|()| self.conn.flush());
        let mut rest = Vec::new();
        let _ = self.conn.read_to_end(&mut rest);
        Ok(())
    }
}

fn receive(hosts: &TwoHosts) -> Result<Value> {
    let volumes: Vec<Value> = (1..=2)
        .map(|i| {
            json!({
                "name": format!("r{i}"),
                "size": REPLICA_BYTES,
                "path": hosts.path(&format!("r{i}.img")),
                "socket": hosts.path(&format!("r{i}.sock")),
            })
        })
        .collect();
    let args = json!({ "group": "g", "dir": hosts.path("g.dr"), "volumes": volumes });
    hosts
        .query_b(None, "replicate-receive", &args)?
        .ok()?
        .json()
}

fn status(hosts: &TwoHosts) -> Result<Value> {
    hosts
        .query_b(None, "replicate-status", &json!({ "group": "g" }))?
        .ok()?
        .json()
}

fn replica_images(hosts: &TwoHosts) -> Result<[Vec<u8>; 2]> {
    Ok([
        std::fs::read(hosts.path("r1.img"))?,
        std::fs::read(hosts.path("r2.img"))?,
    ])
}

/// Reads a replica whole through its vhost-user socket with libblkio.
fn read_through_socket(hosts: &TwoHosts, name: &str) -> Result<Vec<u8>> {
    let opts = BlkioOpts {
        buf_bytes: REPLICA_BYTES as usize,
        ..BlkioOpts::default()
    };
    let mut client = BlkioClient::connect(&hosts.path(&format!("{name}.sock")), &opts)?;
    client.read_all(0, REPLICA_BYTES as usize, 64 << 10)
}

#[test]
fn replicas_follow_the_stream_refuse_bad_input_survive_a_crash_and_promote() -> Result<()> {
    let Some(mut hosts) = TwoHosts::start(HostOptions::default())? else {
        return Ok(());
    };
    // A new group does not take over a file with data (here A's image).
    let taken = json!({ "group": "h", "dir": hosts.path("h.dr"), "volumes": [{
        "name": "h1", "size": VOLUME_BYTES, "path": hosts.path("a.img"), "socket": hosts.path("h1.sock"),
    }]});
    let refused = hosts.query_b(None, "replicate-receive", &taken)?;
    ensure!(
        !refused.status.success() && refused.stderr.contains("is not an empty file"),
        "{}",
        refused.stderr
    );
    let received = receive(&hosts)?;
    assert_eq!(received["state"], "replicating");
    // The replicas' devices wait behind closed gates while they are replicas.
    let mut early = BlkioClient::connect(&hosts.path("r1.sock"), &BlkioOpts::default())?;
    early.submit_batches(&[vec![Op::Read {
        offset_bytes: 0,
        len_bytes: 4096,
        buf_offset: 0,
    }]])?;
    assert_eq!(
        early.reap_batches(&[1], Duration::from_millis(300))?,
        vec![vec![None]],
        "a replica served before promotion"
    );
    drop(early);

    let (mut stream, first) = Stream::open(&hosts, "g")?;
    assert_eq!((first.durable_seq, first.applied_seq), (0, 0));
    stream.send_until_applied(&encode(1..=120), 120)?;
    drop(stream);
    assert_eq!(prefix_point(&replica_images(&hosts)?, 120), Some(120));

    // Garbage, a bad checksum, a replayed old stream: refused, nothing applied.
    let (stream, _) = Stream::open(&hosts, "g")?;
    stream.send_refused(
        &(0..3000u32)
            .map(|i| (i * 131 + 17) as u8)
            .collect::<Vec<_>>(),
    )?;
    let s = status(&hosts)?;
    assert!(
        s["last-error"]
            .as_str()
            .is_some_and(|e| e.contains("not a replication frame")),
        "{s}"
    );
    let mut bad = encode(121..=121);
    bad[HEADER_BYTES + 100] ^= 0x20;
    let (stream, _) = Stream::open(&hosts, "g")?;
    stream.send_refused(&bad)?;
    let s = status(&hosts)?;
    assert!(
        s["last-error"]
            .as_str()
            .is_some_and(|e| e.contains("bad frame checksum")),
        "{s}"
    );
    let (stream, _) = Stream::open(&hosts, "g")?;
    stream.send_refused(&encode(100..=101))?;
    let s = status(&hosts)?;
    assert!(
        s["last-error"]
            .as_str()
            .is_some_and(|e| e.contains("out of order")),
        "{s}"
    );
    assert_eq!(
        (s["durable-seq"].as_u64(), s["applied-seq"].as_u64()),
        (Some(120), Some(120))
    );
    assert_eq!(prefix_point(&replica_images(&hosts)?, 120), Some(120));

    // B is killed once records up to 400 are durable (acknowledged), whether or not it has
    // applied them yet; restarted, it re-applies its log.
    let (mut stream, _) = Stream::open(&hosts, "g")?;
    stream.send_until_durable(&encode(121..=400), 400)?;
    hosts.crash_and_restart_b()?;
    drop(stream);
    let prefix = prefix_point(&replica_images(&hosts)?, 400);
    assert!(
        prefix.is_some(),
        "after the crash the replicas are no prefix of the write order"
    );
    let reopened = receive(&hosts)?;
    assert_eq!(
        (
            reopened["durable-seq"].as_u64(),
            reopened["applied-seq"].as_u64()
        ),
        (Some(400), Some(400))
    );
    assert_eq!(prefix_point(&replica_images(&hosts)?, 400), Some(400));
    let (mut stream, resumed) = Stream::open(&hosts, "g")?;
    assert_eq!(resumed.durable_seq, 400, "the primary resumes after 400");
    stream.send_until_applied(&encode(401..=450), 450)?;
    drop(stream);

    // Failover: promote to the latest record; the replicas serve exactly the primary after 450.
    let creds = path_str(&hosts.creds_a)?.to_string();
    let url = hosts.url_b();
    let out = support::two_hosts::ferry_in(
        Some(hosts.host_a()),
        &[
            "replicate",
            "promote",
            "--control",
            &url,
            "--tls-creds",
            &creds,
            "--group",
            "g",
            "--at",
            "seq:10",
        ],
    )?;
    ensure!(
        !out.status.success() && out.stderr.contains("keeps no undo"),
        "{}",
        out.stderr
    );
    let out = support::two_hosts::ferry_in(
        Some(hosts.host_a()),
        &[
            "replicate",
            "promote",
            "--control",
            &url,
            "--tls-creds",
            &creds,
            "--group",
            "g",
        ],
    )?;
    ensure!(out.status.success(), "promote: {}", out.stderr);
    assert!(out.stdout.contains("after record 450"), "{}", out.stdout);
    let expected = primary_after(450);
    support::compare_bytes("r1", &read_through_socket(&hosts, "r1")?, &expected[0])?;
    support::compare_bytes("r2", &read_through_socket(&hosts, "r2")?, &expected[1])?;
    assert_eq!(status(&hosts)?["state"], "promoted");
    // A promoted group takes no more records.
    assert!(
        Stream::open(&hosts, "g").is_err(),
        "a promoted group took a stream"
    );
    let s = status(&hosts)?;
    assert!(
        s["last-error"]
            .as_str()
            .is_some_and(|e| e.contains("was promoted")),
        "{s}"
    );
    Ok(())
}

/// A sequence-stamped 4 KiB block: write `seq` of the workload.
fn stamped(seq: u64) -> Vec<u8> {
    let mut data = vec![(seq % 251) as u8 + 1; BLOCK_BYTES];
    data[..8].copy_from_slice(&seq.to_le_bytes());
    data
}

/// Two hosts with `vm1` and `vm2` on A, and libblkio clients on both volumes, with data
/// written before replication starts (the initial copy carries it).
fn primary_with_data() -> Result<Option<(TwoHosts, BlkioClient, BlkioClient)>> {
    let options = HostOptions {
        second_volume: true,
        ..HostOptions::default()
    };
    let Some(hosts) = TwoHosts::start(options)? else {
        return Ok(None);
    };
    let opts = BlkioOpts {
        buf_bytes: 1 << 20,
        ..BlkioOpts::default()
    };
    let mut vm1 = BlkioClient::connect(&hosts.path("a.sock"), &opts)?;
    let mut vm2 = BlkioClient::connect(&hosts.path("a2.sock"), &opts)?;
    vm1.write_all(3 << 20, &vec![0x11; 1 << 20], 64 << 10)?;
    vm2.write_all(5 << 20, &vec![0x22; 512 << 10], 64 << 10)?;
    Ok(Some((hosts, vm1, vm2)))
}

/// `ferry replicate start` of vm1 and vm2 on A to B as group `g`.
fn start_replication(hosts: &TwoHosts) -> Result<()> {
    start_replication_with(hosts, &[])
}

/// `ferry replicate start` of vm1 and vm2 on A to B as group `g`, with `extra` arguments.
fn start_replication_with(hosts: &TwoHosts, extra: &[&str]) -> Result<()> {
    std::fs::create_dir(hosts.path("dr")).context("dr directory")?;
    let dr = path_str(&hosts.path("dr"))?.to_string();
    let control_a = path_str(&hosts.path("a.ctl"))?.to_string();
    let url = hosts.url_b();
    let start = support::two_hosts::ferry_in(
        Some(hosts.host_a()),
        &[
            "replicate",
            "start",
            "--control",
            &control_a,
            "--volume",
            "vm1",
            "--volume",
            "vm2",
            "--to",
            &url,
            "--group",
            "g",
            "--path-prefix",
            &dr,
            "--socket-prefix",
            &dr,
        ]
        .iter()
        .chain(extra)
        .copied()
        .collect::<Vec<_>>(),
    )?;
    ensure!(start.status.success(), "replicate start: {}", start.stderr);
    Ok(())
}

/// The guest's writes `seqs`: each block stamped with its place in the order, alternating
/// volumes, later ones overwriting earlier ones, a flush every 50.
fn write_pattern(
    vm1: &mut BlkioClient,
    vm2: &mut BlkioClient,
    seqs: std::ops::RangeInclusive<u64>,
) -> Result<()> {
    for seq in seqs {
        let block = (seq * 13) % 512;
        let client = if seq % 2 == 0 { &mut *vm1 } else { &mut *vm2 };
        client.write_all(block * BLOCK_BYTES as u64, &stamped(seq), BLOCK_BYTES)?;
        if seq.is_multiple_of(50) {
            client.flush()?;
        }
    }
    Ok(())
}

/// `ferry replicate status` of group `g` on A.
fn primary_status(hosts: &TwoHosts) -> Result<Value> {
    let control_a = path_str(&hosts.path("a.ctl"))?.to_string();
    let out = support::two_hosts::ferry_in(
        Some(hosts.host_a()),
        &[
            "replicate",
            "status",
            "--control",
            &control_a,
            "--group",
            "g",
            "--json",
        ],
    )?;
    ensure!(out.status.success(), "status: {}", out.stderr);
    let v: Value = serde_json::from_str(&out.stdout)?;
    Ok(v[0].clone())
}

/// Waits until every record numbered on A is applied on B, with nothing degraded.
fn wait_applied(hosts: &TwoHosts) -> Result<()> {
    let applied = support::wait::wait_until("the group applied at the DR site", TIMEOUT, || {
        let s = primary_status(hosts)?;
        ensure!(s["state"] != "degraded", "degraded: {s}");
        Ok(s["state"] == "replicating"
            && s["numbered-seq"].as_u64() > Some(0)
            && s["applied-seq"] == s["numbered-seq"])
    });
    if let Err(e) = applied {
        bail!("{e:#}: primary {}", primary_status(hosts)?);
    }
    let s = primary_status(hosts)?;
    assert_eq!(s["lag-records"], 0, "{s}");
    Ok(())
}

/// Promotes `g` on B (from A, with A's certificate) and checks that libblkio on the
/// replicas' sockets reads exactly A's images.
fn promote_and_compare(hosts: &TwoHosts) -> Result<()> {
    let creds = path_str(&hosts.creds_a)?.to_string();
    let url = hosts.url_b();
    let out = support::two_hosts::ferry_in(
        Some(hosts.host_a()),
        &[
            "replicate",
            "promote",
            "--control",
            &url,
            "--tls-creds",
            &creds,
            "--group",
            "g",
        ],
    )?;
    ensure!(out.status.success(), "promote: {}", out.stderr);
    for (name, image, size) in [("vm1", "a.img", 32usize << 20), ("vm2", "a2.img", 16 << 20)] {
        let primary = std::fs::read(hosts.path(image))?;
        let opts = BlkioOpts {
            buf_bytes: size,
            ..BlkioOpts::default()
        };
        let mut replica = BlkioClient::connect(&hosts.path(&format!("dr/{name}.sock")), &opts)?;
        let served = replica.read_all(0, size, 1 << 20)?;
        support::compare_bytes(name, &served, &primary)?;
    }
    Ok(())
}

/// The whole primary side: `ferry replicate start` on A's daemon, a libblkio client writing
/// a sequence-stamped pattern on both volumes while they replicate, the group acknowledged
/// and applied, then promoted on B: the replicas serve exactly A's images.
#[test]
fn a_primary_replicates_a_group_written_by_libblkio_and_the_dr_site_promotes_it() -> Result<()> {
    let Some((hosts, mut vm1, mut vm2)) = primary_with_data()? else {
        return Ok(());
    };
    start_replication(&hosts)?;
    write_pattern(&mut vm1, &mut vm2, 1..=600)?;
    wait_applied(&hosts)?;
    promote_and_compare(&hosts)
}

/// The DR daemon killed (SIGKILL) while the guest writes and the primary ships, then
/// restarted: the primary reconnects, has the group received again (the log re-applied) and
/// resumes after the DR site's durable record; promoted, the replicas equal the primary.
#[test]
fn the_primary_resumes_after_the_dr_daemon_is_killed_mid_stream() -> Result<()> {
    let Some((mut hosts, mut vm1, mut vm2)) = primary_with_data()? else {
        return Ok(());
    };
    start_replication(&hosts)?;
    write_pattern(&mut vm1, &mut vm2, 1..=300)?;
    hosts.crash_and_restart_b()?;
    write_pattern(&mut vm1, &mut vm2, 301..=600)?;
    wait_applied(&hosts)?;
    promote_and_compare(&hosts)
}

/// The guest's writes in the mid-stream test.
const WRITES: u64 = 1000;

/// The N for which `replicas` (the two volumes' first 2 MiB, where the pattern writes, on
/// volumes that held nothing before) equal the primary after writes `1..=N`, if any.
fn prefix_of_pattern(replicas: &[Vec<u8>; 2], last: u64) -> Option<u64> {
    let mut vols = [vec![0u8; 2 << 20], vec![0u8; 2 << 20]];
    let mut found = (vols == *replicas).then_some(0);
    for seq in 1..=last {
        let at = ((seq * 13) % 512) as usize * BLOCK_BYTES;
        let vol = &mut vols[if seq % 2 == 0 { 0 } else { 1 }];
        vol[at..at + BLOCK_BYTES].copy_from_slice(&stamped(seq));
        if vols == *replicas {
            found = Some(seq);
        }
    }
    found
}

/// Unplanned failover in the middle of the stream: B promotes the group while the primary
/// still ships the guest's latest writes over a link slower than they are written. The replica set equals the primary's state after
/// some N of the guest's writes (a prefix of the group's write order across both volumes).
#[test]
fn a_group_promoted_mid_stream_is_a_prefix_of_the_write_order() -> Result<()> {
    let options = HostOptions {
        second_volume: true,
        ..HostOptions::default()
    };
    let Some(hosts) = TwoHosts::start(options)? else {
        return Ok(());
    };
    let opts = BlkioOpts {
        buf_bytes: 1 << 20,
        ..BlkioOpts::default()
    };
    let mut vm1 = BlkioClient::connect(&hosts.path("a.sock"), &opts)?;
    let mut vm2 = BlkioClient::connect(&hosts.path("a2.sock"), &opts)?;
    start_replication(&hosts)?;
    // The stream flowing, then a link slower than the guest's writes, so records are still
    // on their way at promotion.
    write_pattern(&mut vm1, &mut vm2, 1..=100)?;
    support::wait::wait_until("the first records applied", TIMEOUT, || {
        Ok(primary_status(&hosts)?["applied-seq"].as_u64() > Some(0))
    })?;
    hosts.host_a().limit_rate(20_000_000)?;
    write_pattern(&mut vm1, &mut vm2, 101..=WRITES)?;
    eprintln!("before promotion: {}", primary_status(&hosts)?);
    let creds = path_str(&hosts.creds_a)?.to_string();
    let url = hosts.url_b();
    let out = support::two_hosts::ferry_in(
        Some(hosts.host_a()),
        &[
            "replicate",
            "promote",
            "--control",
            &url,
            "--tls-creds",
            &creds,
            "--group",
            "g",
            "--json",
        ],
    )?;
    ensure!(out.status.success(), "promote: {}", out.stderr);
    let promoted: Value = serde_json::from_str(out.stdout.trim())?;
    let mut replicas = Vec::new();
    for (name, size) in [("vm1", 32usize << 20), ("vm2", 16 << 20)] {
        let opts = BlkioOpts {
            buf_bytes: size,
            ..BlkioOpts::default()
        };
        let mut replica = BlkioClient::connect(&hosts.path(&format!("dr/{name}.sock")), &opts)?;
        let served = replica.read_all(0, size, 1 << 20)?;
        ensure!(
            served[2 << 20..].iter().all(|&b| b == 0),
            "{name}: data where the guest never wrote"
        );
        replicas.push(served[..2 << 20].to_vec());
    }
    let replicas = [replicas[0].clone(), replicas[1].clone()];
    let n = prefix_of_pattern(&replicas, WRITES);
    let Some(n) = n else {
        bail!("the promoted replicas are no prefix of the guest's writes (promoted at {promoted})");
    };
    eprintln!("promoted at {promoted}: the replicas equal the primary after write {n} of {WRITES}");
    Ok(())
}

/// A QEMU (TCG) guest on A writes a pattern on vm1 while it replicates; after promotion a
/// second guest boots on B's replica and reads the same bytes.
#[test]
fn a_guest_boots_on_a_promoted_replica_and_reads_the_primary_guests_data() -> Result<()> {
    use support::guest::{Guest, GuestOpts};
    if !support::require::require(
        "qemu-system-x86_64",
        support::require::command_available("qemu-system-x86_64"),
    ) {
        return Ok(());
    }
    let options = HostOptions {
        second_volume: true,
        ..HostOptions::default()
    };
    let Some(hosts) = TwoHosts::start(options)? else {
        return Ok(());
    };
    start_replication(&hosts)?;
    let md5 = "md5() { md5sum | cut -d' ' -f1; }\n";
    let write = format!(
        "set -e\n{md5}seq 1 9999999 | head -c 4194304 > /tmp/p\n\
         dd if=/tmp/p of=/dev/vda bs=65536 seek=16 oflag=direct 2>/dev/null\n\
         sync\n\
         echo \"RESULT written=$(md5 < /tmp/p)\"\n"
    );
    let out = Guest::run_script(&hosts.path("a.sock"), &write, &GuestOpts::default())?;
    out.ensure_success()?;
    let written = out.result("written")?;
    wait_applied(&hosts)?;
    let creds = path_str(&hosts.creds_a)?.to_string();
    let url = hosts.url_b();
    let promote = support::two_hosts::ferry_in(
        Some(hosts.host_a()),
        &[
            "replicate",
            "promote",
            "--control",
            &url,
            "--tls-creds",
            &creds,
            "--group",
            "g",
        ],
    )?;
    ensure!(promote.status.success(), "promote: {}", promote.stderr);
    let read = format!(
        "set -e\n{md5}\
         echo \"RESULT read=$(dd if=/dev/vda bs=65536 skip=16 count=64 iflag=direct 2>/dev/null | md5)\"\n"
    );
    let out = Guest::run_script(&hosts.path("dr/vm1.sock"), &read, &GuestOpts::default())?;
    out.ensure_success()?;
    ensure!(
        out.result("read")? == written,
        "the guest on the promoted replica read other data\n{}",
        out.tail()
    );
    let primary = std::fs::read(hosts.path("a.img"))?;
    let replica = std::fs::read(hosts.path("dr/vm1.img"))?;
    support::compare_bytes("vm1 replica image", &replica, &primary)
}

/// A sync group (`--mode sync`) whose initial copy the DR site acknowledged.
fn start_sync(hosts: &TwoHosts, timeout_s: &str) -> Result<()> {
    start_replication_with(hosts, &["--mode", "sync", "--sync-timeout", timeout_s])?;
    support::wait::wait_until("the sync group in sync", TIMEOUT, || {
        let s = primary_status(hosts)?;
        ensure!(s["mode"] == "sync", "not a sync group: {s}");
        ensure!(s["sync-state"] != "degraded", "degraded: {s}");
        Ok(s["sync-state"] == "in-sync")
    })
}

/// A sync group: every write the libblkio client saw completed is durable at the DR site.
/// The primary daemon is killed (SIGKILL) the moment the client's last write completes, so
/// nothing more is shipped; promoted, the replicas equal the primary's images.
#[test]
fn every_write_a_sync_group_completed_is_on_the_dr_site_after_promotion() -> Result<()> {
    let Some((mut hosts, mut vm1, mut vm2)) = primary_with_data()? else {
        return Ok(());
    };
    // A timeout no run reaches: the group must stay in sync throughout.
    start_sync(&hosts, "600")?;
    write_pattern(&mut vm1, &mut vm2, 1..=400)?;
    let s = primary_status(&hosts)?;
    ensure!(s["sync-state"] == "in-sync", "{s}");
    ensure!(s["sync-degraded-reason"].is_null(), "{s}");
    drop((vm1, vm2));
    hosts.daemon_a.kill();
    promote_and_compare(&hosts)
}

/// A sync group whose DR daemon is killed (SIGKILL) while the client writes: the write
/// held at the kill and every later one complete without error once the sync timeout
/// passes, status says the group degraded and why, its bitmap marking what changed since;
/// with B back, the group resyncs from the bitmap and, promoted, equals the primary.
#[test]
fn a_sync_group_degrades_to_async_when_the_dr_site_dies() -> Result<()> {
    let Some((mut hosts, mut vm1, mut vm2)) = primary_with_data()? else {
        return Ok(());
    };
    start_sync(&hosts, "2")?;
    write_pattern(&mut vm1, &mut vm2, 1..=100)?;
    hosts.kill_b();
    write_pattern(&mut vm1, &mut vm2, 101..=300)?;
    let s = primary_status(&hosts)?;
    ensure!(s["sync-state"] == "degraded", "not degraded: {s}");
    let reason = s["sync-degraded-reason"].as_str().unwrap_or_default();
    ensure!(reason.contains("did not acknowledge"), "reason: {s}");
    ensure!(s["sync-held-writes"] == 0, "writes still held: {s}");
    ensure!(s["state"] == "degraded", "not degraded to the bitmap: {s}");
    ensure!(s["dirty-bytes"].as_u64() > Some(0), "nothing marked: {s}");
    hosts.restart_b()?;
    support::wait::wait_until("the group resynced", TIMEOUT, || {
        let s = primary_status(&hosts)?;
        Ok(s["state"] != "degraded" && s["resyncs"].as_u64() > Some(0))
    })?;
    write_pattern(&mut vm1, &mut vm2, 301..=400)?;
    wait_applied(&hosts)?;
    promote_and_compare(&hosts)
}
