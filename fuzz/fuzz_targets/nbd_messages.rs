//! Fuzz target: every NBD message decoder (both sides of a connection) must answer any
//! bytes with a message or an error, never panic, and a decoded message must encode back to
//! the bytes it came from.
#![no_main]

use ferry_engine::nbd::protocol::{
    BlockDescriptor, BlockStatusHeader, ClientFlags, ErrorChunk, ExportListEntry,
    ExportNameReply, ExportRequest, Greeting, Info, InfoBlockSize, InfoExport, InfoText,
    MetaContextReply, MetaContextRequest, OffsetDataHeader, OptionHeader, OptionReplyHeader,
    RequestHeader, SimpleReply, StructuredReplyHeader, EXPORT_NAME_REPLY_BYTES,
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
    if let Ok(m) = StructuredReplyHeader::decode(data) {
        assert_eq!(m.encode()[..], data[..]);
    }
    if let Ok(m) = OffsetDataHeader::decode(data) {
        assert_eq!(m.encode().as_ref().map(|b| &b[..]), Some(data));
    }
    if let Ok(m) = ErrorChunk::decode(data) {
        assert_eq!(m.encode()[..], data[..]);
    }
    if let Ok(m) = BlockStatusHeader::decode(data) {
        assert_eq!(m.encode().as_ref().map(|b| &b[..]), Some(data));
    }
    if let Ok(m) = BlockDescriptor::decode(data) {
        assert_eq!(m.encode()[..], data[..]);
    }
    if let Ok(m) = ExportNameReply::decode(data) {
        assert_eq!(m.encode()[..EXPORT_NAME_REPLY_BYTES], data[..]);
    }
    if let Ok(m) = MetaContextRequest::decode(data) {
        assert_eq!(m.encode().ok().as_deref(), Some(data));
    }
    if let Ok(m) = MetaContextReply::decode(data) {
        assert_eq!(m.encode().ok().as_deref(), Some(data));
    }
    if let Ok(m) = ExportListEntry::decode(data) {
        assert_eq!(m.encode().ok().as_deref(), Some(data));
    }
    if let Ok(m) = InfoText::decode(data) {
        assert_eq!(m.encode().ok().as_deref(), Some(data));
    }
});
