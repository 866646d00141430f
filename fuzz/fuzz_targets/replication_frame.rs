//! Fuzz target: the replication frame decoder (network and DR log) and the applied
//! checkpoint decoder must never panic, and a frame they accept encodes back to its bytes.
#![no_main]

use ferry_engine::replication::checkpoint::Checkpoint;
use ferry_engine::replication::frame::Frame;
use ferry_engine::replication::stream::read_frame;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok((frame, len)) = Frame::decode(data) {
        assert_eq!(frame.encode(), &data[..len]);
    }
    let mut reader = data;
    let mut buf = Vec::new();
    while let Ok(Some(_)) = read_frame(&mut reader, &mut buf) {}
    if let Ok(checkpoint) = Checkpoint::decode(data) {
        assert_eq!(&checkpoint.encode()[..], &data[..32]);
    }
});
