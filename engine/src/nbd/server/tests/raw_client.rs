//! A hand-written NBD client over any byte stream, for tests that must send exactly what
//! they choose (well formed or not) and see every byte the server answers.

use std::io::{Read, Write};

use crate::nbd::protocol::*;

pub(crate) type TestResult = Result<(), Box<dyn std::error::Error>>;
pub(crate) type Res<T> = Result<T, Box<dyn std::error::Error>>;

pub(crate) struct RawClient<S: Read + Write> {
    pub s: S,
}

/// One option reply: its type and data.
pub(crate) type OptionReply = (u32, Vec<u8>);

impl<S: Read + Write> RawClient<S> {
    /// Reads the greeting and answers with fixed newstyle and no zeroes.
    pub fn greet(stream: S) -> Res<Self> {
        let mut c = Self { s: stream };
        let mut greeting = [0u8; GREETING_BYTES];
        c.s.read_exact(&mut greeting)?;
        let flags = Greeting::decode(&greeting)?.handshake_flags;
        assert_eq!(flags, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
        let client = ClientFlags {
            flags: NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES,
        };
        c.s.write_all(&client.encode())?;
        Ok(c)
    }

    pub fn send_option(&mut self, option: u32, data: &[u8]) -> Res<()> {
        let header = OptionHeader {
            option,
            len_bytes: data.len() as u32,
        };
        self.s.write_all(&header.encode())?;
        self.s.write_all(data)?;
        Ok(())
    }

    pub fn read_option_reply(&mut self) -> Res<OptionReply> {
        let mut head = [0u8; OPTION_REPLY_HEADER_BYTES];
        self.s.read_exact(&mut head)?;
        let head = OptionReplyHeader::decode(&head)?;
        let mut data = vec![0u8; head.len_bytes as usize];
        self.s.read_exact(&mut data)?;
        Ok((head.reply_type, data))
    }

    /// Sends an option and reads its replies up to the final one (an ACK or an error).
    pub fn option(&mut self, option: u32, data: &[u8]) -> Res<Vec<OptionReply>> {
        self.send_option(option, data)?;
        let mut replies = Vec::new();
        loop {
            let reply = self.read_option_reply()?;
            let last = reply.0 == NBD_REP_ACK || reply.0 & NBD_REP_FLAG_ERROR != 0;
            replies.push(reply);
            if last {
                return Ok(replies);
            }
        }
    }

    /// The final reply type of an option.
    pub fn option_result(&mut self, option: u32, data: &[u8]) -> Res<u32> {
        let replies = self.option(option, data)?;
        Ok(replies.last().map_or(0, |r| r.0))
    }

    /// Negotiates structured replies and `base:allocation` (when asked), then `NBD_OPT_GO`;
    /// returns the export's size and flags.
    pub fn go(&mut self, name: &str, structured: bool) -> Res<InfoExport> {
        if structured {
            assert_eq!(
                self.option_result(NBD_OPT_STRUCTURED_REPLY, &[])?,
                NBD_REP_ACK
            );
            let meta = MetaContextRequest {
                export_name: name.into(),
                queries: vec![NBD_META_CONTEXT_BASE_ALLOCATION.into()],
            };
            let replies = self.option(NBD_OPT_SET_META_CONTEXT, &meta.encode()?)?;
            assert_eq!(replies.len(), 2, "{replies:?}");
            let context = MetaContextReply::decode(&replies[0].1)?;
            assert_eq!(context.name, NBD_META_CONTEXT_BASE_ALLOCATION);
        }
        let request = ExportRequest {
            export_name: name.into(),
            info_types: vec![NBD_INFO_BLOCK_SIZE],
        };
        let replies = self.option(NBD_OPT_GO, &request.encode()?)?;
        let mut export = None;
        for (reply_type, data) in &replies {
            if *reply_type == NBD_REP_INFO {
                if let Info::Export(info) = Info::decode(data)? {
                    export = Some(info);
                }
            }
        }
        match (replies.last(), export) {
            (Some((NBD_REP_ACK, _)), Some(info)) => Ok(info),
            _ => Err(format!("NBD_OPT_GO failed: {replies:?}").into()),
        }
    }

    pub fn request(
        &mut self,
        command: u16,
        flags: u16,
        cookie: u64,
        offset_bytes: u64,
        len_bytes: u32,
    ) -> Res<()> {
        let header = RequestHeader {
            flags,
            command,
            cookie,
            offset_bytes,
            len_bytes,
        };
        self.s.write_all(&header.encode())?;
        Ok(())
    }

    pub fn write(&mut self, cookie: u64, offset_bytes: u64, data: &[u8], flags: u16) -> Res<()> {
        self.request(
            NBD_CMD_WRITE,
            flags,
            cookie,
            offset_bytes,
            data.len() as u32,
        )?;
        self.s.write_all(data)?;
        Ok(())
    }

    pub fn simple_reply(&mut self) -> Res<SimpleReply> {
        let mut b = [0u8; SIMPLE_REPLY_BYTES];
        self.s.read_exact(&mut b)?;
        Ok(SimpleReply::decode(&b)?)
    }

    /// Reads one structured chunk: its header and payload.
    pub fn chunk(&mut self) -> Res<(StructuredReplyHeader, Vec<u8>)> {
        let mut b = [0u8; STRUCTURED_REPLY_HEADER_BYTES];
        self.s.read_exact(&mut b)?;
        let header = StructuredReplyHeader::decode(&b)?;
        let mut payload = vec![0u8; header.len_bytes as usize];
        self.s.read_exact(&mut payload)?;
        Ok((header, payload))
    }

    /// Reads the reply to a request in a structured session: (cookie, error, payload).
    pub fn structured_reply(&mut self) -> Res<(u64, u32, Vec<u8>)> {
        let mut magic = [0u8; 4];
        self.s.read_exact(&mut magic)?;
        if u32::from_be_bytes(magic) == NBD_SIMPLE_REPLY_MAGIC {
            let mut rest = [0u8; SIMPLE_REPLY_BYTES - 4];
            self.s.read_exact(&mut rest)?;
            let mut whole = magic.to_vec();
            whole.extend_from_slice(&rest);
            let reply = SimpleReply::decode(&whole)?;
            return Ok((reply.cookie, reply.error, Vec::new()));
        }
        let mut rest = [0u8; STRUCTURED_REPLY_HEADER_BYTES - 4];
        self.s.read_exact(&mut rest)?;
        let mut whole = magic.to_vec();
        whole.extend_from_slice(&rest);
        let header = StructuredReplyHeader::decode(&whole)?;
        assert_eq!(header.flags, NBD_REPLY_FLAG_DONE, "one chunk per reply");
        let mut payload = vec![0u8; header.len_bytes as usize];
        self.s.read_exact(&mut payload)?;
        match header.reply_type {
            NBD_REPLY_TYPE_ERROR => {
                let error = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                Ok((header.cookie, error, Vec::new()))
            }
            NBD_REPLY_TYPE_OFFSET_DATA => Ok((header.cookie, 0, payload[8..].to_vec())),
            _ => Ok((header.cookie, 0, payload)),
        }
    }
}
