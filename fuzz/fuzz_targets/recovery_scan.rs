//! Fuzz target: scanning an arbitrary medium (recovery and every offline tool) must never
//! panic and must report a valid end inside the input.
#![no_main]

use ferry_engine::journal::scan::scan_medium;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(scan) = scan_medium(data) {
        assert!(scan.valid_end_bytes <= data.len() as u64);
    }
});
