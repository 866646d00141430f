//! Tests of what `incoming-prepare` accepts before anything is created: the arguments, the
//! image path, and the daemon it needs. The commands against real daemons are in
//! `tests/cross_host.rs`.

use super::*;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn args(name: &str, path: &str, socket: &str) -> Value {
    json!({ "name": name, "size": 1 << 20, "path": path, "socket": socket })
}

#[test]
fn names_sizes_and_paths_are_checked_in_one_line() {
    let ok = request(&args("vm-1.a_b", "/var/lib/ferry/x.img", "/run/x.sock"));
    assert!(ok.is_ok_and(|r| r.logical_block_bytes == 512 && r.size_bytes == 1 << 20));
    for (bad, needle) in [
        (args("", "/x.img", "/x.sock"), "name"),
        (args("a/b", "/x.img", "/x.sock"), "name"),
        (args(&"n".repeat(65), "/x.img", "/x.sock"), "name"),
        (args("a", "x.img", "/x.sock"), "absolute"),
        (args("a", "/x,y.img", "/x.sock"), "commas"),
        (args("a", "/x.img", "rel.sock"), "absolute"),
        (
            json!({ "name": "a", "size": 0, "path": "/x", "socket": "/y" }),
            "size",
        ),
        (json!({ "name": "a", "path": "/x", "socket": "/y" }), "size"),
        (json!({ "size": 1, "path": "/x", "socket": "/y" }), "name"),
    ] {
        match request(&bad) {
            Err(e) => assert!(
                e.desc.contains(needle) && !e.desc.contains('\n'),
                "{bad}: {}",
                e.desc
            ),
            Ok(_) => panic!("{bad} accepted"),
        }
    }
}

#[test]
fn an_image_path_with_data_is_refused_and_an_empty_file_is_used() -> TestResult {
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("new.img");
    assert!(!check_image_path(&missing, 4096).map_err(|e| e.desc)?);
    assert!(!missing.exists(), "nothing is created by the check");
    let data = dir.path().join("data.img");
    std::fs::write(&data, b"data")?;
    let refused = check_image_path(&data, 4096).err().map(|e| e.desc);
    assert!(refused.is_some_and(|d| d.contains("not an empty file")));
    assert_eq!(std::fs::read(&data)?, b"data");
    let empty = dir.path().join("empty.img");
    std::fs::write(&empty, b"")?;
    assert!(check_image_path(&empty, 4096).map_err(|e| e.desc)?);
    assert_eq!(std::fs::metadata(&empty)?.len(), 4096);
    let refused = check_image_path(dir.path(), 4096).err().map(|e| e.desc);
    assert!(refused.is_some(), "a directory is refused");
    Ok(())
}

#[test]
fn a_daemon_without_an_nbd_server_over_tls_prepares_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let daemon = Daemon::new(None, None, None);
    let image = dir.path().join("x.img");
    let arguments = json!({
        "name": "x", "size": 1 << 20, "client": "ferry-a",
        "path": image, "socket": dir.path().join("x.sock"),
    });
    let refused = daemon.incoming_prepare(&Caller::Local, &arguments).err();
    assert!(refused.is_some_and(|e| e.class == "NotSupported"));
    assert!(!image.exists());
    let no_client = daemon
        .incoming_prepare(&Caller::Local, &args("x", "/x.img", "/x.sock"))
        .err();
    assert!(no_client.is_some_and(|e| e.desc.contains("client")));
    assert!(daemon
        .incoming_status(&Caller::Local, &json!({ "name": "x" }))
        .is_err_and(|e| e.class == "NotFound"));
    Ok(())
}
