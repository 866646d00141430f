//! The messages only a server sends (and the option data only a server reads) against
//! bytes written out by hand from the NBD protocol text: metadata contexts, export lists,
//! information strings, `NBD_OPT_EXPORT_NAME`'s reply, structured reply chunks and block
//! status descriptors; and decoding of hostile input, which must fail without panicking.

use super::super::protocol::*;

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[test]
fn meta_context_request() -> TestResult {
    #[rustfmt::skip]
    let bytes = [
        0x00, 0x00, 0x00, 0x02,                         // export name length
        b'v', b'1',                                     // "v1"
        0x00, 0x00, 0x00, 0x01,                         // one query
        0x00, 0x00, 0x00, 0x0f,                         // query length 15
        b'b', b'a', b's', b'e', b':', b'a', b'l', b'l', // "base:allocation"
        b'o', b'c', b'a', b't', b'i', b'o', b'n',
    ];
    let request = MetaContextRequest {
        export_name: "v1".into(),
        queries: vec![NBD_META_CONTEXT_BASE_ALLOCATION.into()],
    };
    assert_eq!(request.encode()?, bytes);
    assert_eq!(MetaContextRequest::decode(&bytes)?, request);
    let list_all = [0, 0, 0, 0, 0, 0, 0, 0];
    assert_eq!(
        MetaContextRequest::decode(&list_all)?,
        MetaContextRequest {
            export_name: String::new(),
            queries: vec![]
        }
    );
    Ok(())
}

#[test]
fn meta_context_request_refuses_what_the_protocol_forbids() {
    for (bytes, says) in [
        (&[0x00, 0x00, 0x00][..], "at least 4"),
        (&[0x00, 0x00, 0x10, 0x01][..], "longer than 4096"),
        (&[0x00, 0x00, 0x00, 0x05, b'a'][..], "runs past"),
        (&[0, 0, 0, 0, 0, 0][..], "count is missing"),
        (
            &[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff][..],
            "too many queries",
        ),
        (&[0, 0, 0, 0, 0, 0, 0, 1][..], "at least 4"),
        (&[0, 0, 0, 0, 0, 0, 0, 0, 7][..], "after the last query"),
        (&[0, 0, 0, 1, 0xff, 0, 0, 0, 0][..], "not UTF-8"),
    ] {
        match MetaContextRequest::decode(bytes) {
            Err(e) => assert!(
                e.to_string().contains(says),
                "{bytes:?}: {e} lacks {says:?}"
            ),
            Ok(m) => panic!("{bytes:?} decoded as {m:?}"),
        }
    }
}

#[test]
fn meta_context_reply() -> TestResult {
    #[rustfmt::skip]
    let bytes = [
        0x00, 0x00, 0x00, 0x01,                         // context id 1
        b'b', b'a', b's', b'e', b':', b'a', b'l', b'l', // "base:allocation"
        b'o', b'c', b'a', b't', b'i', b'o', b'n',
    ];
    let reply = MetaContextReply {
        context_id: 1,
        name: NBD_META_CONTEXT_BASE_ALLOCATION.into(),
    };
    assert_eq!(reply.encode()?, bytes);
    assert_eq!(MetaContextReply::decode(&bytes)?, reply);
    assert!(MetaContextReply::decode(&[0, 0, 1]).is_err());
    Ok(())
}

#[test]
fn export_list_entry() -> TestResult {
    #[rustfmt::skip]
    let bytes = [
        0x00, 0x00, 0x00, 0x03, // name length
        b'v', b'm', b'1',       // "vm1"
        b'r', b'o',             // description "ro"
    ];
    let entry = ExportListEntry {
        name: "vm1".into(),
        description: "ro".into(),
    };
    assert_eq!(entry.encode()?, bytes);
    assert_eq!(ExportListEntry::decode(&bytes)?, entry);
    assert!(ExportListEntry::decode(&bytes[..5]).is_err());
    Ok(())
}

#[test]
fn info_name_and_description() -> TestResult {
    let name = [0x00, 0x01, b'v', b'm', b'1'];
    let info = InfoText {
        info_type: NBD_INFO_NAME,
        text: "vm1".into(),
    };
    assert_eq!(info.encode()?, name);
    assert_eq!(InfoText::decode(&name)?, info);
    let description = [0x00, 0x02, b'h', b'i'];
    assert_eq!(
        InfoText::decode(&description)?,
        InfoText {
            info_type: NBD_INFO_DESCRIPTION,
            text: "hi".into()
        }
    );
    assert!(InfoText::decode(&[0x00, 0x03, b'x']).is_err());
    assert!(InfoText::decode(&[0x00]).is_err());
    Ok(())
}

#[test]
fn export_name_reply() -> TestResult {
    #[rustfmt::skip]
    let head = [
        0x00, 0x00, 0x00, 0x00, 0x40, 0x00, 0x00, 0x00, // 1 GiB
        0x01, 0x0d,                                     // MULTI_CONN|FUA|FLUSH|HAS_FLAGS
    ];
    let reply = ExportNameReply {
        size_bytes: 1 << 30,
        transmission_flags: NBD_FLAG_HAS_FLAGS
            | NBD_FLAG_SEND_FLUSH
            | NBD_FLAG_SEND_FUA
            | NBD_FLAG_CAN_MULTI_CONN,
    };
    let encoded = reply.encode();
    assert_eq!(encoded[..EXPORT_NAME_REPLY_BYTES], head);
    assert!(encoded[EXPORT_NAME_REPLY_BYTES..].iter().all(|&b| b == 0));
    assert_eq!(encoded.len(), 134);
    assert_eq!(ExportNameReply::decode(&head)?, reply);
    Ok(())
}

#[test]
fn structured_read_data_chunk() -> TestResult {
    #[rustfmt::skip]
    let bytes = [
        0x66, 0x8e, 0x33, 0xef,                         // NBD_STRUCTURED_REPLY_MAGIC
        0x00, 0x01,                                     // NBD_REPLY_FLAG_DONE
        0x00, 0x01,                                     // NBD_REPLY_TYPE_OFFSET_DATA
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x07, // cookie 7
        0x00, 0x00, 0x10, 0x08,                         // payload 8 + 4096
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x20, 0x00, // offset 8192
    ];
    let chunk = OffsetDataHeader {
        cookie: 7,
        offset_bytes: 8192,
        data_len_bytes: 4096,
    };
    assert_eq!(chunk.encode(), Some(bytes));
    assert_eq!(OffsetDataHeader::decode(&bytes)?, chunk);
    let header = StructuredReplyHeader::decode(&bytes[..STRUCTURED_REPLY_HEADER_BYTES])?;
    assert_eq!(
        header,
        StructuredReplyHeader {
            flags: NBD_REPLY_FLAG_DONE,
            reply_type: NBD_REPLY_TYPE_OFFSET_DATA,
            cookie: 7,
            len_bytes: 4104,
        }
    );
    assert_eq!(header.encode()[..], bytes[..STRUCTURED_REPLY_HEADER_BYTES]);
    let mut not_last = bytes;
    not_last[5] = 0;
    assert!(OffsetDataHeader::decode(&not_last).is_err());
    let too_long = OffsetDataHeader {
        data_len_bytes: u32::MAX - 7,
        ..chunk
    };
    assert_eq!(too_long.encode(), None);
    Ok(())
}

#[test]
fn structured_error_chunk() -> TestResult {
    #[rustfmt::skip]
    let bytes = [
        0x66, 0x8e, 0x33, 0xef,                         // NBD_STRUCTURED_REPLY_MAGIC
        0x00, 0x01,                                     // NBD_REPLY_FLAG_DONE
        0x80, 0x01,                                     // NBD_REPLY_TYPE_ERROR
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x09, // cookie 9
        0x00, 0x00, 0x00, 0x06,                         // payload 6
        0x00, 0x00, 0x00, 0x16,                         // EINVAL
        0x00, 0x00,                                     // no message
    ];
    let chunk = ErrorChunk {
        cookie: 9,
        error: NBD_EINVAL,
    };
    assert_eq!(chunk.encode(), bytes);
    assert_eq!(ErrorChunk::decode(&bytes)?, chunk);
    let mut with_message = bytes;
    with_message[25] = 1;
    assert!(ErrorChunk::decode(&with_message).is_err());
    let mut not_last = bytes;
    not_last[5] = 0;
    assert!(ErrorChunk::decode(&not_last).is_err());
    Ok(())
}

#[test]
fn block_status_chunk_and_descriptors() -> TestResult {
    #[rustfmt::skip]
    let header = [
        0x66, 0x8e, 0x33, 0xef,                         // NBD_STRUCTURED_REPLY_MAGIC
        0x00, 0x01,                                     // NBD_REPLY_FLAG_DONE
        0x00, 0x05,                                     // NBD_REPLY_TYPE_BLOCK_STATUS
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03, // cookie 3
        0x00, 0x00, 0x00, 0x14,                         // payload 4 + 2 * 8
        0x00, 0x00, 0x00, 0x01,                         // context id 1
    ];
    let chunk = BlockStatusHeader {
        cookie: 3,
        context_id: 1,
        descriptors: 2,
    };
    assert_eq!(chunk.encode(), Some(header));
    assert_eq!(BlockStatusHeader::decode(&header)?, chunk);
    #[rustfmt::skip]
    let hole = [
        0x00, 0x01, 0x00, 0x00, // 64 KiB
        0x00, 0x00, 0x00, 0x03, // NBD_STATE_HOLE | NBD_STATE_ZERO
    ];
    let descriptor = BlockDescriptor {
        len_bytes: 65536,
        flags: NBD_STATE_HOLE | NBD_STATE_ZERO,
    };
    assert_eq!(descriptor.encode(), hole);
    assert_eq!(BlockDescriptor::decode(&hole)?, descriptor);
    let mut odd = header;
    odd[19] = 0x15;
    assert!(BlockStatusHeader::decode(&odd).is_err());
    let mut not_last = header;
    not_last[5] = 0;
    assert!(BlockStatusHeader::decode(&not_last).is_err());
    let huge = BlockStatusHeader {
        descriptors: u32::MAX / 8 + 1,
        ..chunk
    };
    assert_eq!(huge.encode(), None);
    Ok(())
}

#[test]
fn server_side_decoders_never_panic_on_short_or_long_input() {
    let junk = [0xffu8; 40];
    for len in 0..junk.len() {
        let b = &junk[..len];
        let _ = StructuredReplyHeader::decode(b);
        let _ = OffsetDataHeader::decode(b);
        let _ = ErrorChunk::decode(b);
        let _ = BlockStatusHeader::decode(b);
        let _ = BlockDescriptor::decode(b);
        let _ = ExportNameReply::decode(b);
        let _ = MetaContextRequest::decode(b);
        let _ = MetaContextReply::decode(b);
        let _ = ExportListEntry::decode(b);
        let _ = InfoText::decode(b);
    }
}
