//! Tests of [`super::mark_written`] against vm-memory's own page bitmap.

use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::*;

const PAGE_BYTES: usize = 4096;
type Mem = GuestMemoryMmap<AtomicBitmap>;

fn two_regions() -> Mem {
    // Two 16-page regions with a hole between them.
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 16 * PAGE_BYTES),
        (GuestAddress(0x10_0000), 16 * PAGE_BYTES),
    ])
    .expect("guest memory")
}

/// Dirty pages of every region, as guest page numbers.
fn dirty_pages(mem: &Mem) -> Vec<u64> {
    let mut pages = Vec::new();
    for region in mem.iter() {
        for page in 0..region.len() as usize / PAGE_BYTES {
            if region.bitmap().dirty_at(page * PAGE_BYTES) {
                pages.push(region.start_addr().0 / PAGE_BYTES as u64 + page as u64);
            }
        }
    }
    pages
}

#[test]
fn marks_every_page_a_segment_touches() {
    let mem = two_regions();
    // Page 1 whole, 2 bytes straddling pages 3/4, one byte of page 15 of the second region.
    let segments = [
        (GuestAddress(PAGE_BYTES as u64), PAGE_BYTES as u32),
        (GuestAddress(5 * PAGE_BYTES as u64 - 1), 2),
        (GuestAddress(0x10_0000 + 15 * PAGE_BYTES as u64 + 7), 1),
    ];
    mark_written(&mem, &segments);
    assert_eq!(dirty_pages(&mem), vec![1, 4, 5, 256 + 15]);
}

#[test]
fn a_segment_running_into_a_hole_marks_what_exists() {
    let mem = two_regions();
    let last = GuestAddress(15 * PAGE_BYTES as u64);
    mark_written(
        &mem,
        &[(last, 2 * PAGE_BYTES as u32), (GuestAddress(0x8_0000), 512)],
    );
    assert_eq!(dirty_pages(&mem), vec![15]);
}

#[test]
fn log_state_follows_log_all() {
    let log = LogState::default();
    assert!(!log.is_active());
    log.set_acked_features(VhostUserVirtioFeatures::LOG_ALL.bits() | 1);
    assert!(log.is_active());
    log.set_acked_features(1);
    assert!(!log.is_active());
}

#[test]
fn log_bitmap_without_a_log_marks_nothing() {
    use vm_memory::Bytes;
    let mem: GuestMemoryMmap<LogBitmap> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 * PAGE_BYTES)]).expect("memory");
    mem.write_obj(1u8, GuestAddress(5)).expect("write");
    mark_written(&mem, &[(GuestAddress(0), 2 * PAGE_BYTES as u32)]);
    for region in mem.iter() {
        assert!(!region.bitmap().dirty_at(0));
        assert!(!region.bitmap().dirty_at(PAGE_BYTES));
    }
}
