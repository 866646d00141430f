//! Fuzz target: every NBD message decoder (both sides of a connection) must answer any
//! bytes with a message or an error, never panic, and a decoded message must encode back to
//! the bytes it came from.
#![no_main]

use ferry_engine::nbd::protocol::{
    ClientFlags, ExportRequest, Greeting, Info, InfoBlockSize, InfoExport, OptionHeader,
    OptionReplyHeader, RequestHeader, SimpleReply,
};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Greeting::decode(data) {
        assert_eq!(m.encode()[..], data[..]);
    }
    if let Ok(m) = ClientFlags::decode(data) {
        assert_eq!(m.encode()[..], data[..]);
    }
    if let Ok(m) = OptionHeader::decode(data) {
        assert_eq!(m.encode()[..], data[..]);
    }
    if let Ok(m) = OptionReplyHeader::decode(data) {
        assert_eq!(m.encode()[..], data[..]);
    }
    if let Ok(m) = ExportRequest::decode(data) {
        assert_eq!(m.encode().ok().as_deref(), Some(data));
    }
    match Info::decode(data) {
        Ok(Info::Export(m)) => assert_eq!(m.encode()[..], data[..]),
        Ok(Info::BlockSize(m)) => assert_eq!(m.encode()[..], data[..]),
        Ok(Info::Other { .. }) | Err(_) => {}
    }
    let _ = InfoExport::decode(data);
    let _ = InfoBlockSize::decode(data);
    if let Ok(m) = RequestHeader::decode(data) {
        assert_eq!(m.encode()[..], data[..]);
    }
    if let Ok(m) = SimpleReply::decode(data) {
        assert_eq!(m.encode()[..], data[..]);
    }
});
