//! Operator mistakes `ferry serve` refuses before it creates anything (one line on stderr, a
//! non-zero exit, the directory as it was): two volumes with one name (two `--volume`s, or
//! two `[[volume]]` entries), on one vhost-user socket, or on overlapping bytes of one image
//! (however the image is named, unless both only read), and a journal directory another
//! daemon appends to. What may be shared is served.

#[path = "support/mod.rs"]
mod support;

use anyhow::{ensure, Context as _, Result};
use std::path::Path;
use support::blkio_client::{BlkioClient, BlkioOpts};
use support::ferry::{self, refused, vol};

/// Bound on the daemon's clean exit after SIGTERM.
const EXIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

fn args_of(volumes: &[[String; 2]]) -> Vec<String> {
    volumes.iter().flatten().cloned().collect()
}

/// An 8 MiB image of pattern bytes at `dir/name`.
fn image(dir: &Path, name: &str) -> Result<Vec<u8>> {
    let content = support::pattern(7, 8 << 20);
    std::fs::write(dir.join(name), &content).context("write image")?;
    Ok(content)
}

#[test]
fn refuses_two_volumes_with_one_name() -> Result<()> {
    let dir = support::scratch_dir()?;
    let d = dir.path();
    let args = args_of(&[
        vol(d, "a", "a.img", "a.sock", ",size=4M"),
        vol(d, "a", "b.img", "b.sock", ",size=4M"),
    ]);
    refused(d, &args, "two --volume options are named a")?;
    let p = |name: &str| ferry::path_str(d, name);
    let config = d.join("ferry.toml");
    std::fs::write(
        &config,
        format!(
            "[[volume]]\nname = \"a\"\npath = \"{}\"\nsocket = \"{}\"\nsize = \"4M\"\n\n\
             [[volume]]\nname = \"a\"\npath = \"{}\"\nsocket = \"{}\"\nsize = \"4M\"\n",
            p("a.img"),
            p("a.sock"),
            p("b.img"),
            p("b.sock")
        ),
    )
    .context("write config")?;
    refused(
        d,
        &["--config".to_string(), config.display().to_string()],
        "two [[volume]] entries are named a",
    )?;
    Ok(())
}

#[test]
fn refuses_two_volumes_on_one_socket() -> Result<()> {
    let dir = support::scratch_dir()?;
    let d = dir.path();
    std::fs::create_dir(d.join("sub")).context("mkdir")?;
    // One socket named two ways.
    let args = args_of(&[
        vol(d, "a", "a.img", "s.sock", ",size=4M"),
        vol(d, "b", "b.img", "sub/../s.sock", ",size=4M"),
    ]);
    refused(d, &args, "volumes a and b use the same socket")?;
    Ok(())
}

#[test]
fn refuses_overlapping_ranges_of_one_image() -> Result<()> {
    let dir = support::scratch_dir()?;
    let d = dir.path();
    let content = image(d, "disk.img")?;
    std::fs::hard_link(d.join("disk.img"), d.join("link.img")).context("link")?;
    std::os::unix::fs::symlink(d.join("disk.img"), d.join("symlink.img")).context("symlink")?;
    let cases = [
        // The whole image twice, the second through a hard link.
        (
            vol(d, "a", "disk.img", "a.sock", ""),
            vol(d, "b", "link.img", "b.sock", ""),
        ),
        // Slices that share one byte, through a symlink.
        (
            vol(d, "a", "disk.img", "a.sock", ",offset=0,length=4M"),
            vol(d, "b", "symlink.img", "b.sock", ",offset=4190208,length=4M"),
        ),
        // A slice to the end and a slice inside it.
        (
            vol(d, "a", "disk.img", "a.sock", ",offset=2M"),
            vol(d, "b", "disk.img", "b.sock", ",offset=6M,length=1M"),
        ),
        // One reader and one writer.
        (
            vol(d, "a", "disk.img", "a.sock", ",read-only"),
            vol(d, "b", "link.img", "b.sock", ""),
        ),
    ];
    for (a, b) in cases {
        let message = refused(d, &args_of(&[a, b]), "same image")?;
        ensure!(message.contains("overlapping"), "{message}");
    }
    ensure!(
        std::fs::read(d.join("disk.img"))? == content,
        "image changed"
    );
    Ok(())
}

/// Disjoint slices of one image, and readers of the same bytes, are served together.
#[test]
fn serves_disjoint_slices_and_shared_readers() -> Result<()> {
    let dir = support::scratch_dir()?;
    let d = dir.path();
    let content = image(d, "disk.img")?;
    std::fs::hard_link(d.join("disk.img"), d.join("link.img")).context("link")?;
    let shared = image(d, "shared.img")?;
    let args = args_of(&[
        vol(d, "low", "disk.img", "low.sock", ",offset=0,length=4M"),
        vol(d, "high", "link.img", "high.sock", ",offset=4M"),
        vol(d, "r1", "shared.img", "r1.sock", ",read-only"),
        vol(
            d,
            "r2",
            "shared.img",
            "r2.sock",
            ",read-only,offset=1M,length=2M",
        ),
    ]);
    let sockets = ["low.sock", "high.sock", "r1.sock", "r2.sock"].map(|s| d.join(s));
    let mut daemon = ferry::serve(&args, &sockets.each_ref().map(|s| s.as_path()))?;
    let high = BlkioClient::connect(&sockets[1], &BlkioOpts::default())?;
    ensure!(high.capacity_bytes() == 4 << 20, "high capacity");
    drop(high);
    let status = daemon.terminate(EXIT_TIMEOUT)?;
    ensure!(status.success(), "ferry exited {status}");
    ensure!(
        std::fs::read(d.join("disk.img"))? == content
            && std::fs::read(d.join("shared.img"))? == shared,
        "image changed"
    );
    Ok(())
}

/// A second daemon on the first one's journal directory is refused, naming the first's pid;
/// nothing of its volumes is created, and the first daemon keeps serving.
#[test]
fn refuses_a_journal_directory_in_use() -> Result<()> {
    let dir = support::scratch_dir()?;
    let d = dir.path();
    let journal = format!("dir={},mode=sync", ferry::path_str(d, "journal"));
    let mut first_args = vol(d, "a", "a.img", "a.sock", ",size=4M").to_vec();
    first_args.extend(["--journal".to_string(), journal.clone()]);
    let mut first = ferry::serve(&first_args, &[&d.join("a.sock")])?;
    let mut second_args = vol(d, "b", "b.img", "b.sock", ",size=4M").to_vec();
    second_args.extend(["--journal".to_string(), journal]);
    let message = refused(d, &second_args, "is in use by another process")?;
    ensure!(
        message.contains(&format!("pid {}", first.pid())),
        "the refusal does not name the holder {}: {message}",
        first.pid()
    );
    let client = BlkioClient::connect(&d.join("a.sock"), &BlkioOpts::default())?;
    ensure!(client.capacity_bytes() == 4 << 20, "first ferry disturbed");
    drop(client);
    let status = first.terminate(EXIT_TIMEOUT)?;
    ensure!(status.success(), "ferry exited {status}");
    // Released at exit: the directory serves a new daemon.
    let mut again = ferry::serve(&second_args, &[&d.join("b.sock")])?;
    let status = again.terminate(EXIT_TIMEOUT)?;
    ensure!(status.success(), "ferry exited {status}");
    Ok(())
}
