//! Fuzz target: the control protocol's request framing and parser, as a daemon meets them.
//! Any bytes, handed out in reads of a size the first byte chooses, are cut into lines by
//! the bounded line reader and each line read apart as a request: no panic, no line past
//! its bound, and an accepted request has a bounded name and an `arguments` object, and
//! survives being written again as a request line and read back.
#![no_main]

use std::io::{self, Read};
use std::time::Duration;

use ferry_engine::peer::control_protocol::{
    parse_request, request_line, LineDeadlines, LineError, LineReader, TimedRead, COMMAND_BYTES_MAX,
};

/// Small, so that inputs reach the bound.
const LINE_BYTES_MAX: usize = 4096;

/// The input as a stream, `chunk` bytes a read.
struct Chunks<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl Read for Chunks<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.chunk.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

impl TimedRead for Chunks<'_> {
    fn set_read_timeout(&mut self, _: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let mut stream = Chunks {
        data: rest,
        chunk: usize::from(first) + 1,
    };
    let mut reader = LineReader::new(LINE_BYTES_MAX);
    loop {
        let line = match reader.read_line(&mut stream, LineDeadlines::default()) {
            Ok(Some(line)) => line,
            Ok(None)
            | Err(LineError::TooLong { .. } | LineError::NotUtf8 | LineError::Truncated) => return,
            Err(e) => panic!("a stream that cannot fail failed: {e}"),
        };
        assert!(line.len() <= LINE_BYTES_MAX && !line.contains('\n'));
        let Ok(request) = parse_request(&line) else {
            continue;
        };
        assert!(request.command.len() <= COMMAND_BYTES_MAX);
        assert!(request.arguments.is_object());
        let again = request_line(&request.command, &request.arguments, None);
        let reread = parse_request(again.trim_end()).expect("a request written again is read back");
        assert_eq!(reread.command, request.command);
        assert!(reread.arguments.is_object() && reread.id.is_none());
    }
});
