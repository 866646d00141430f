//! One conformance suite for the engine's volumes, run over every backend kind: each case of
//! `cases.rs` on a fresh volume of each backend of `backends/`, one test per pair, named
//! `<backend>::<case>`. After a case passes, the backend's post-check runs (see
//! [`fixture::Beside`]).
//!
//! | backend (module) | what is under the volume | post-check |
//! |---|---|---|
//! | `file_buffered`, `file_direct` | a raw image in the build directory, buffered or `cache=none` | the image holds what the volume reads |
//! | `tmpfs_buffered`, `tmpfs_direct` | the same on tmpfs (`/dev/shm`) | the same |
//! | `journal_sync`, `journal_async` | a buffered image observed by a `sync` / `async` journal in the build directory | the journal verifies; the restore equals the volume |
//! | `journal_mapped` | the same with a `sync` journal on tmpfs, `mapped=on` | the same, and records went through the mapping |
//! | `mirror_active`, `mirror_background` | a buffered image migrating to a file, mid-copy | still copying; once ready and cut over, target = source = volume |
//! | `nbd_qemu_nbd_unix` | a `qemu-nbd` export on a unix socket | the export holds what the volume reads |
//! | `nbd_qsd_slice_tcp` | a slice of a `qemu-storage-daemon` export on TCP | the same, and the export is untouched around the slice |
//! | `nbd_qsd_split_unix` | a `qemu-storage-daemon` export on a unix socket with a 64 KiB maximum payload: larger requests go in pieces | the same, and no request the server received broke its limits |
//!
//! Every case runs on every backend. A missing prerequisite (tmpfs, `O_DIRECT`, a server
//! program) goes through `ferry_test_support::require`: a skip that says so, or a failure
//! under `FERRY_REQUIRE_ALL`.

mod aligned;
mod backends;
mod cases;
mod fixture;

use backends::journal::Kind as JournalKind;
use backends::nbd::Server;
use backends::{file::Place, Backend};
use ferry_engine::mirror::MirrorMode;
use ferry_engine::CacheMode;
use fixture::{Access, Fixture};

/// Runs `case` on a fresh `access` volume of `backend`, then the backend's post-check.
fn run(backend: Backend, access: Access, case: fn(&mut Fixture)) {
    let opened = backend.open(access);
    let Some(mut fixture) = opened.unwrap_or_else(|e| panic!("set-up of {backend:?}: {e:#}"))
    else {
        return;
    };
    case(&mut fixture);
    if let Err(e) = fixture.check_after() {
        panic!("{backend:?} after the case: {e:#}");
    }
}

/// One module of tests per backend, one test per case: `$cases` is the one list of cases.
macro_rules! suite {
    ($cases:tt; $($module:ident => $backend:expr,)*) => {
        $(suite!(@backend $module, $backend, $cases);)*
    };
    (@backend $module:ident, $backend:expr, [$($case:ident: $access:ident,)*]) => {
        mod $module {
            use super::*;
            $(
                #[test]
                fn $case() {
                    run($backend, Access::$access, cases::$case);
                }
            )*
        }
    };
}

suite! {
    [
        write_then_read_round_trips: ReadWrite,
        unaligned_buffers_round_trip: ReadWrite,
        discard_and_write_zeroes_read_back_as_zeros: ReadWrite,
        out_of_range_requests_fail: ReadWrite,
        read_only_volumes_refuse_changes: ReadOnly,
        many_requests_in_flight_complete_with_their_tags: ReadWrite,
        a_full_queue_rejects_and_a_pause_holds: ReadWrite,
        random_round_trips_with_many_in_flight: ReadWrite,
    ];
    file_buffered => Backend::File(Place::BuildDir, CacheMode::Writeback),
    file_direct => Backend::File(Place::BuildDir, CacheMode::None),
    tmpfs_buffered => Backend::File(Place::Tmpfs, CacheMode::Writeback),
    tmpfs_direct => Backend::File(Place::Tmpfs, CacheMode::None),
    journal_sync => Backend::Journal(JournalKind::Sync),
    journal_async => Backend::Journal(JournalKind::Async),
    journal_mapped => Backend::Journal(JournalKind::Mapped),
    mirror_active => Backend::Mirror(MirrorMode::Active),
    mirror_background => Backend::Mirror(MirrorMode::Background),
    nbd_qemu_nbd_unix => Backend::Nbd(Server::QemuNbdUnix),
    nbd_qsd_slice_tcp => Backend::Nbd(Server::QsdSliceTcp),
    nbd_qsd_split_unix => Backend::Nbd(Server::QsdSplitUnix),
}
