//! Every message of [`super::super::protocol`] against bytes written out by hand from the
//! NBD protocol text (`doc/proto.md`), both ways; and decoding of truncated, oversized and
//! hostile input, which must fail with an error and never panic.

use super::super::protocol::*;

#[test]
fn greeting() -> Result<(), DecodeError> {
    #[rustfmt::skip]
    let bytes = [
        b'N', b'B', b'D', b'M', b'A', b'G', b'I', b'C', // NBD_INIT_MAGIC
        b'I', b'H', b'A', b'V', b'E', b'O', b'P', b'T', // NBD_OPTS_MAGIC
        0x00, 0x03,                                     // FIXED_NEWSTYLE | NO_ZEROES
    ];
    let greeting = Greeting {
        handshake_flags: NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES,
    };
    assert_eq!(greeting.encode(), bytes);
    assert_eq!(Greeting::decode(&bytes)?, greeting);
    let mut oldstyle = bytes;
    oldstyle[8..16].copy_from_slice(&0x0000_4202_8186_1253_u64.to_be_bytes());
    assert_eq!(
        Greeting::decode(&oldstyle),
        Err(DecodeError::BadMagic {
            what: "greeting",
            magic: 0x0000_4202_8186_1253
        })
    );
    Ok(())
}

#[test]
fn client_flags() -> Result<(), DecodeError> {
    let bytes = [0x00, 0x00, 0x00, 0x03];
    let flags = ClientFlags {
        flags: NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES,
    };
    assert_eq!(flags.encode(), bytes);
    assert_eq!(ClientFlags::decode(&bytes)?, flags);
    Ok(())
}

#[test]
fn option_header() -> Result<(), DecodeError> {
    #[rustfmt::skip]
    let bytes = [
        0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54, // "IHAVEOPT"
        0x00, 0x00, 0x00, 0x07,                         // NBD_OPT_GO
        0x00, 0x00, 0x00, 0x09,                         // 9 bytes of data
    ];
    let header = OptionHeader {
        option: NBD_OPT_GO,
        len_bytes: 9,
    };
    assert_eq!(header.encode(), bytes);
    assert_eq!(OptionHeader::decode(&bytes)?, header);
    Ok(())
}

#[test]
fn export_request() -> Result<(), Box<dyn std::error::Error>> {
    #[rustfmt::skip]
    let bytes = [
        0x00, 0x00, 0x00, 0x01, // name length
        b'e',                   // name
        0x00, 0x01,             // one information request
        0x00, 0x03,             // NBD_INFO_BLOCK_SIZE
    ];
    let request = ExportRequest {
        export_name: "e".into(),
        info_types: vec![NBD_INFO_BLOCK_SIZE],
    };
    assert_eq!(request.encode()?, bytes);
    assert_eq!(ExportRequest::decode(&bytes)?, request);
    let empty = [0, 0, 0, 0, 0, 0];
    let default_export = ExportRequest {
        export_name: String::new(),
        info_types: vec![],
    };
    assert_eq!(default_export.encode()?, empty);
    assert_eq!(ExportRequest::decode(&empty)?, default_export);
    Ok(())
}

#[test]
fn export_request_refuses_what_the_protocol_forbids() {
    let long = ExportRequest {
        export_name: "x".repeat(NBD_STRING_BYTES_MAX + 1),
        info_types: vec![],
    };
    assert_eq!(
        long.encode(),
        Err(EncodeError::NameTooLong { len_bytes: 4097 })
    );
    let hostile: [&[u8]; 7] = [
        &[],
        &[0, 0, 0],
        &[0, 0, 0, 5, b'e', 0, 0],       // the name runs past the data
        &[0xff, 0xff, 0xff, 0xff, 0, 0], // a name of 4 GiB
        &[0, 0, 0, 1, b'e'],             // no count
        &[0, 0, 0, 1, b'e', 0, 2, 0, 3], // two requests announced, one sent
        &[0, 0, 0, 2, 0xc3, 0x28, 0, 1, 0, 3], // not UTF-8
    ];
    for bytes in hostile {
        assert!(ExportRequest::decode(bytes).is_err(), "{bytes:?}");
    }
}

#[test]
fn option_reply_header() -> Result<(), DecodeError> {
    #[rustfmt::skip]
    let bytes = [
        0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, // NBD_REP_MAGIC
        0x00, 0x00, 0x00, 0x07,                         // NBD_OPT_GO
        0x80, 0x00, 0x00, 0x06,                         // NBD_REP_ERR_UNKNOWN
        0x00, 0x00, 0x00, 0x0e,                         // 14 bytes of data
    ];
    let header = OptionReplyHeader {
        option: NBD_OPT_GO,
        reply_type: NBD_REP_ERR_UNKNOWN,
        len_bytes: 14,
    };
    assert_eq!(header.encode(), bytes);
    assert_eq!(OptionReplyHeader::decode(&bytes)?, header);
    assert!(header.is_error());
    let ack = OptionReplyHeader {
        reply_type: NBD_REP_ACK,
        ..header
    };
    assert!(!ack.is_error());
    Ok(())
}

#[test]
fn info_export() -> Result<(), DecodeError> {
    #[rustfmt::skip]
    let bytes = [
        0x00, 0x00,                                     // NBD_INFO_EXPORT
        0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, // 4 GiB
        0x01, 0x6d,                                     // flags
    ];
    let info = InfoExport {
        size_bytes: 4 << 30,
        transmission_flags: NBD_FLAG_HAS_FLAGS
            | NBD_FLAG_SEND_FLUSH
            | NBD_FLAG_SEND_FUA
            | NBD_FLAG_SEND_TRIM
            | NBD_FLAG_SEND_WRITE_ZEROES
            | NBD_FLAG_CAN_MULTI_CONN,
    };
    assert_eq!(info.encode(), bytes);
    assert_eq!(Info::decode(&bytes)?, Info::Export(info));
    Ok(())
}

#[test]
fn info_block_size() -> Result<(), DecodeError> {
    #[rustfmt::skip]
    let bytes = [
        0x00, 0x03,             // NBD_INFO_BLOCK_SIZE
        0x00, 0x00, 0x02, 0x00, // minimum 512
        0x00, 0x00, 0x10, 0x00, // preferred 4096
        0x02, 0x00, 0x00, 0x00, // maximum payload 32 MiB
    ];
    let info = InfoBlockSize {
        block_bytes_min: 512,
        block_bytes_preferred: 4096,
        payload_bytes_max: 32 << 20,
    };
    assert_eq!(info.encode(), bytes);
    assert_eq!(Info::decode(&bytes)?, Info::BlockSize(info));
    assert_eq!(
        Info::decode(&bytes[..12]).map_err(|e| e.to_string()),
        Err("NBD_INFO_BLOCK_SIZE of 12 bytes (14 expected)".to_string())
    );
    Ok(())
}

#[test]
fn info_of_other_types_is_passed_over() -> Result<(), DecodeError> {
    assert_eq!(
        Info::decode(&[0x00, 0x02, b'h', b'i'])?,
        Info::Other {
            info_type: NBD_INFO_DESCRIPTION
        }
    );
    assert_eq!(Info::decode(&[0x00, 0x63])?, Info::Other { info_type: 99 });
    for short in [&[][..], &[0x00][..], &[0x00, 0x00, 0x01][..]] {
        assert!(Info::decode(short).is_err(), "{short:?}");
    }
    Ok(())
}

#[test]
fn request_header() -> Result<(), DecodeError> {
    #[rustfmt::skip]
    let bytes = [
        0x25, 0x60, 0x95, 0x13,                         // NBD_REQUEST_MAGIC
        0x00, 0x01,                                     // NBD_CMD_FLAG_FUA
        0x00, 0x01,                                     // NBD_CMD_WRITE
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x2a, // cookie 42
        0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, // offset 1 MiB
        0x00, 0x00, 0x10, 0x00,                         // length 4096
    ];
    let header = RequestHeader {
        flags: NBD_CMD_FLAG_FUA,
        command: NBD_CMD_WRITE,
        cookie: 42,
        offset_bytes: 1 << 20,
        len_bytes: 4096,
    };
    assert_eq!(header.encode(), bytes);
    assert_eq!(RequestHeader::decode(&bytes)?, header);
    #[rustfmt::skip]
    let disconnect = [
        0x25, 0x60, 0x95, 0x13, 0x00, 0x00, 0x00, 0x02,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    assert_eq!(RequestHeader::DISCONNECT.encode(), disconnect);
    Ok(())
}

#[test]
fn simple_reply() -> Result<(), DecodeError> {
    #[rustfmt::skip]
    let bytes = [
        0x67, 0x44, 0x66, 0x98,                         // NBD_SIMPLE_REPLY_MAGIC
        0x00, 0x00, 0x00, 0x1c,                         // ENOSPC
        0xff, 0xee, 0xdd, 0xcc, 0xbb, 0xaa, 0x99, 0x88, // cookie
    ];
    let reply = SimpleReply {
        error: NBD_ENOSPC,
        cookie: 0xffee_ddcc_bbaa_9988,
    };
    assert_eq!(reply.encode(), bytes);
    assert_eq!(SimpleReply::decode(&bytes)?, reply);
    let mut structured = bytes;
    structured[0..4].copy_from_slice(&[0x66, 0x8e, 0x33, 0xef]);
    assert_eq!(
        SimpleReply::decode(&structured).map_err(|e| e.to_string()),
        Err("bad reply magic 0x668e33ef".to_string())
    );
    Ok(())
}

/// Every fixed-size decoder refuses every length but its own, and bytes of any length give
/// an answer (never a panic).
#[test]
fn fixed_size_decoders_refuse_other_lengths_and_never_panic() {
    type Decoder = fn(&[u8]) -> bool;
    let decoders: [(usize, Decoder); 8] = [
        (GREETING_BYTES, |b| Greeting::decode(b).is_ok()),
        (CLIENT_FLAGS_BYTES, |b| ClientFlags::decode(b).is_ok()),
        (OPTION_HEADER_BYTES, |b| OptionHeader::decode(b).is_ok()),
        (OPTION_REPLY_HEADER_BYTES, |b| {
            OptionReplyHeader::decode(b).is_ok()
        }),
        (INFO_EXPORT_BYTES, |b| InfoExport::decode(b).is_ok()),
        (INFO_BLOCK_SIZE_BYTES, |b| InfoBlockSize::decode(b).is_ok()),
        (REQUEST_HEADER_BYTES, |b| RequestHeader::decode(b).is_ok()),
        (SIMPLE_REPLY_BYTES, |b| SimpleReply::decode(b).is_ok()),
    ];
    for fill in [0x00u8, 0x25, 0x67, 0xff] {
        let bytes = [fill; 64];
        for n in 0..=bytes.len() {
            for (len, decode) in decoders {
                assert!(
                    n == len || !decode(&bytes[..n]),
                    "{n} bytes accepted for {len}"
                );
            }
            let _ = ExportRequest::decode(&bytes[..n]);
            let _ = Info::decode(&bytes[..n]);
        }
    }
}

#[test]
fn errors_map_both_ways() {
    for errno in [
        libc::EPERM,
        libc::EIO,
        libc::ENOMEM,
        libc::EINVAL,
        libc::ENOSPC,
        libc::EOVERFLOW,
        libc::ENOTSUP,
        libc::ESHUTDOWN,
    ] {
        assert_eq!(errno_from_wire(errno_to_wire(errno)), errno);
    }
    assert_eq!(errno_to_wire(libc::EDQUOT), NBD_ENOSPC);
    assert_eq!(errno_to_wire(libc::EFBIG), NBD_ENOSPC);
    assert_eq!(errno_to_wire(libc::ENOENT), NBD_EIO);
    assert_eq!(errno_to_wire(-1), NBD_EIO);
    assert_eq!(errno_from_wire(2), libc::EIO);
    assert_eq!(errno_from_wire(u32::MAX), libc::EIO);
}
