use super::*;

#[test]
fn allowlist_is_the_sorted_union_of_its_groups_and_extras() {
    const LIST: Allowlist = Allowlist {
        kind: "test",
        groups: &[URING_USE, URING_SETUP],
        extra: &[libc::SYS_read, libc::SYS_io_uring_enter],
    };
    let all = LIST.syscalls();
    assert_eq!(
        all,
        vec![
            libc::SYS_read,
            libc::SYS_io_uring_setup,
            libc::SYS_io_uring_enter,
            libc::SYS_io_uring_register
        ]
    );
}

#[test]
fn no_group_allows_starting_programs_or_tracing() {
    let forbidden = [
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_ptrace,
        libc::SYS_process_vm_writev,
        libc::SYS_mount,
        libc::SYS_bpf,
        libc::SYS_init_module,
        libc::SYS_setns,
        libc::SYS_unshare,
        libc::SYS_kill,
        libc::SYS_sysinfo,
    ];
    for group in [
        RUNTIME,
        NET_CLIENT,
        SPAWN,
        FILE_IO,
        FILE_PATHS,
        NET,
        URING_USE,
        URING_SETUP,
    ] {
        for call in forbidden {
            assert!(!group.contains(&call), "system call {call} allowed");
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn names_follow_the_kernel_numbers() {
    assert_eq!(syscall_name(0), Some("read"));
    assert_eq!(
        syscall_name(libc::SYS_io_uring_enter),
        Some("io_uring_enter")
    );
    assert_eq!(syscall_name(libc::SYS_sysinfo), Some("sysinfo"));
    assert_eq!(syscall_name(-1), None);
    assert_eq!(syscall_name(100_000), None);
}

/// A thread whose kind may not start threads gets EPERM from `clone3`, so the spawn fails
/// with an error its caller reports (a trapped `clone3` would kill the process unreported:
/// glibc blocks every signal around it).
#[test]
fn a_kind_without_spawn_fails_to_start_a_thread_with_eperm() {
    const NO_SPAWN: Allowlist = Allowlist {
        kind: "test-no-spawn",
        groups: &[groups::RUNTIME],
        extra: &[],
    };
    let outcome = std::thread::spawn(|| {
        install(&NO_SPAWN).map_err(|e| e.to_string())?;
        match std::thread::Builder::new().spawn(|| ()) {
            Ok(_) => Err("a confined thread started another".to_string()),
            Err(e) => Ok(e.raw_os_error()),
        }
    })
    .join();
    match outcome {
        Ok(Ok(code)) => assert_eq!(code, Some(libc::EPERM)),
        Ok(Err(reason)) => panic!("{reason}"),
        Err(_) => panic!("the confined thread panicked"),
    }
}
