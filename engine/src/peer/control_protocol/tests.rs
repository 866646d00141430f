//! Tests of the control protocol's framing: request and reply lines, and the bounded line
//! reader (lines split and joined across reads, limits, deadlines).

use super::*;
use std::collections::VecDeque;
use std::io::Write;
use std::os::unix::net::UnixStream;

/// A stream that hands out its chunks one read at a time, then the end of the stream.
struct Chunks(VecDeque<Vec<u8>>);

impl Chunks {
    fn new(chunks: &[&[u8]]) -> Self {
        Self(chunks.iter().map(|c| c.to_vec()).collect())
    }
}

impl Read for Chunks {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let Some(mut chunk) = self.0.pop_front() else {
            return Ok(0);
        };
        let n = chunk.len().min(out.len());
        out[..n].copy_from_slice(&chunk[..n]);
        if n < chunk.len() {
            self.0.push_front(chunk.split_off(n));
        }
        Ok(n)
    }
}

impl TimedRead for Chunks {
    fn set_read_timeout(&mut self, _: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
}

fn lines(reader: &mut LineReader, source: &mut Chunks) -> Result<Vec<String>, LineError> {
    let mut out = Vec::new();
    while let Some(line) = reader.read_line(source, LineDeadlines::default())? {
        out.push(line);
    }
    Ok(out)
}

#[test]
fn requests_carry_their_id_when_given_one() {
    let args = json!({ "a": 1 });
    assert_eq!(
        request_line("query-volumes", &args, Some(7)),
        "{\"arguments\":{\"a\":1},\"command\":\"query-volumes\",\"id\":7}\n"
    );
    assert_eq!(
        request_line("query-version", &json!({}), None),
        "{\"arguments\":{},\"command\":\"query-version\"}\n"
    );
    assert_eq!(
        error_reply(class::BUSY, "too many", Some(&json!(3))),
        "{\"error\":{\"class\":\"Busy\",\"desc\":\"too many\"},\"id\":3}"
    );
}

#[test]
fn replies_are_values_errors_or_garbage() {
    let ok = parse_reply("{\"return\": {\"x\": 1}, \"id\": 4}");
    assert_eq!(
        ok,
        Ok(Reply {
            id: Some(json!(4)),
            outcome: Ok(json!({ "x": 1 })),
        })
    );
    let refused = parse_reply("{\"error\": {\"class\": \"Busy\", \"desc\": \"d\"}}");
    assert_eq!(
        refused,
        Ok(Reply {
            id: None,
            outcome: Err(RemoteError {
                class: "Busy".into(),
                desc: "d".into(),
            }),
        })
    );
    for (line, reason) in [
        ("hello", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ("{\"id\": 1}", "neither"),
        ("{\"error\": \"bad\"}", "without \"class\""),
    ] {
        match parse_reply(line) {
            Err(e) => assert!(e.contains(reason), "{line}: {e}"),
            Ok(reply) => panic!("{line} parsed as {reply:?}"),
        }
    }
    assert_eq!(
        reply_id("{\"return\": [1, 2], \"id\": 9}"),
        Ok(Some(json!(9)))
    );
    assert_eq!(reply_id("{\"return\": 1}"), Ok(None));
    assert!(reply_id("{\"return\": 1").is_err());
}

#[test]
fn lines_are_split_and_joined_across_reads() -> Result<(), LineError> {
    let mut reader = LineReader::new(64);
    let mut source = Chunks::new(&[b"one\ntw", b"o\n", b"\nthr", b"ee\nfour\n"]);
    assert_eq!(
        lines(&mut reader, &mut source)?,
        ["one", "two", "", "three", "four"]
    );
    Ok(())
}

#[test]
fn a_line_is_bounded_and_must_be_whole_and_utf8() {
    let long = [b'x'; 65];
    let mut at_bound = long[..64].to_vec();
    at_bound.push(b'\n');
    let mut reader = LineReader::new(64);
    let read = lines(&mut reader, &mut Chunks::new(&[&at_bound]));
    assert_eq!(
        read.ok().map(|l| l[0].len()),
        Some(64),
        "a line of the bound is read"
    );

    for (chunks, expected) in [
        (vec![&long[..], b"\n"], "longer than 64"),
        (vec![&long[..40], &long[..40]], "longer than 64"),
        (vec![b"{\"a\"", b": 1"], "in the middle of a line"),
        (vec![b"\xff\xfe\n"], "not UTF-8"),
    ] {
        let mut reader = LineReader::new(64);
        match lines(
            &mut reader,
            &mut Chunks(chunks.into_iter().map(<[u8]>::to_vec).collect()),
        ) {
            Err(e) => assert!(e.to_string().contains(expected), "{e}"),
            Ok(lines) => panic!("read {lines:?}, expected {expected}"),
        }
    }
}

#[test]
fn silence_and_a_line_that_stops_halfway_time_out() -> Result<(), Box<dyn std::error::Error>> {
    let (mut near, mut far) = UnixStream::pair()?;
    let deadlines = LineDeadlines {
        first_byte: Some(Duration::from_millis(30)),
        whole_line: Some(Duration::from_millis(30)),
    };
    let mut reader = LineReader::new(64);
    match reader.read_line(&mut near, deadlines) {
        Err(LineError::TimedOut(bound)) => assert_eq!(bound, Duration::from_millis(30)),
        other => panic!("silence gave {other:?}"),
    }
    far.write_all(b"{\"half\":")?;
    match reader.read_line(&mut near, deadlines) {
        Err(LineError::TimedOut(_)) => {}
        other => panic!("half a line gave {other:?}"),
    }
    far.write_all(b" 1}\n")?;
    assert_eq!(
        reader.read_line(&mut near, deadlines)?.as_deref(),
        Some("{\"half\": 1}"),
        "bytes read before a timeout are kept"
    );
    drop(far);
    assert_eq!(reader.read_line(&mut near, deadlines)?, None);
    Ok(())
}

#[test]
fn a_request_is_read_apart_with_its_defaults() {
    let request = parse_request(r#"{"command": "query-volumes", "id": [7, "x"]}"#);
    assert_eq!(
        request,
        Ok(Request {
            command: "query-volumes".into(),
            arguments: json!({}),
            id: Some(json!([7, "x"])),
        })
    );
    let with_arguments = parse_request(r#"{"arguments": {"volume": "a"}, "command": "c"}"#);
    assert_eq!(
        with_arguments.map(|r| r.arguments),
        Ok(json!({ "volume": "a" }))
    );
    let null_arguments = parse_request(r#"{"command": "c", "arguments": null}"#);
    assert_eq!(null_arguments.map(|r| r.arguments), Ok(json!({})));
    let line = request_line("migrate-start", &json!({ "volumes": ["a"] }), Some(3));
    let parsed = parse_request(line.trim_end());
    assert_eq!(
        parsed.map(|r| (r.command, r.id)),
        Ok(("migrate-start".into(), Some(json!(3))))
    );
}

#[test]
fn malformed_and_oversized_requests_are_refused_with_their_reason() {
    let refused = |line: &str| parse_request(line).err();
    assert!(matches!(
        refused("{\"command\": "),
        Some(RequestError::Json(_))
    ));
    assert!(matches!(refused("not json"), Some(RequestError::Json(_))));
    assert_eq!(refused("[1, 2, 3]"), Some(RequestError::NotAnObject));
    assert_eq!(refused("\"command\""), Some(RequestError::NotAnObject));
    assert_eq!(refused("{}"), Some(RequestError::MissingCommand));
    assert_eq!(refused(r#"{"command": 7}"#), Some(RequestError::BadCommand));
    let long_name = format!(r#"{{"command": "{}"}}"#, "x".repeat(COMMAND_BYTES_MAX + 1));
    assert_eq!(refused(&long_name), Some(RequestError::BadCommand));
    assert_eq!(
        refused(r#"{"command": "c", "arguments": [1]}"#),
        Some(RequestError::ArgumentsNotAnObject)
    );
    let zeros = vec!["0"; ARGUMENTS_BYTES_MAX].join(",");
    let big = format!(r#"{{"command": "c", "arguments": {{"a": [{zeros}]}}}}"#);
    assert_eq!(refused(&big), Some(RequestError::ArgumentsTooLong));
    let big_id = format!(
        r#"{{"command": "c", "id": "{}"}}"#,
        "i".repeat(ID_BYTES_MAX)
    );
    assert_eq!(refused(&big_id), Some(RequestError::IdTooLong));
    let duplicate = refused(r#"{"command": "a", "command": "b"}"#);
    assert!(
        matches!(duplicate, Some(RequestError::Json(_))),
        "{duplicate:?}"
    );
}
