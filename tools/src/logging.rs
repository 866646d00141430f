//! The daemon's log on stderr, in one of two forms: text for people (the default), or one
//! JSON object per line for log shippers (`--log-format json`: journald's JSON import,
//! Vector, Fluent Bit, Loki's promtail), each with the same fields in the same types so
//! that a pipeline can index them without parsing messages. `RUST_LOG` filters both.

use std::io::Write;

use log::kv::{Key, Value, VisitSource};
use serde_json::{json, Map, Value as Json};

/// `--log-format`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// `[TIME LEVEL target] message`, for a terminal.
    #[default]
    Text,
    /// One object a line: `time` (RFC 3339, UTC, milliseconds), `level`, `target`,
    /// `module`, `thread`, `message`, `fields` (the record's key-values).
    Json,
}

/// Installs the logger (once, before anything logs).
pub fn init(format: LogFormat) {
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    match format {
        LogFormat::Text => {
            builder.format_timestamp_millis();
        }
        LogFormat::Json => {
            builder.format(|buf, record| {
                let line = json_line(&buf.timestamp_millis().to_string(), record);
                writeln!(buf, "{line}")
            });
        }
    }
    builder.init();
}

/// One record as a JSON object.
fn json_line(time: &str, record: &log::Record<'_>) -> Json {
    let mut fields = Fields(Map::new());
    // A visitor that never fails: every pair is kept.
    let _ = record.key_values().visit(&mut fields);
    json!({
        "time": time,
        "level": record.level().as_str(),
        "target": record.target(),
        "module": record.module_path(),
        "thread": std::thread::current().name(),
        "message": record.args().to_string(),
        "fields": fields.0,
    })
}

/// A record's key-values, numbers and booleans kept as such.
struct Fields(Map<String, Json>);

impl<'kvs> VisitSource<'kvs> for Fields {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), log::kv::Error> {
        let value = if let Some(n) = value.to_u64() {
            json!(n)
        } else if let Some(n) = value.to_i64() {
            json!(n)
        } else if let Some(b) = value.to_bool() {
            json!(b)
        } else if let Some(x) = value.to_f64() {
            json!(x)
        } else {
            json!(value.to_string())
        };
        self.0.insert(key.to_string(), value);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_becomes_one_object_with_its_fields() {
        let kvs: [(&str, log::kv::Value<'_>); 3] = [
            ("volume", "vm1".into()),
            ("bytes", 4096u64.into()),
            ("ok", true.into()),
        ];
        let args = format_args!("a \"quoted\"\nmessage");
        let record = log::Record::builder()
            .args(args)
            .level(log::Level::Warn)
            .target("ferry::serve")
            .module_path(Some("ferry::serve"))
            .key_values(&kvs)
            .build();
        let line = json_line("2026-01-02T03:04:05.678Z", &record);
        assert_eq!(line["time"], "2026-01-02T03:04:05.678Z");
        assert_eq!(line["level"], "WARN");
        assert_eq!(line["target"], "ferry::serve");
        assert_eq!(line["module"], "ferry::serve");
        assert_eq!(line["message"], "a \"quoted\"\nmessage");
        assert_eq!(
            line["fields"],
            json!({ "volume": "vm1", "bytes": 4096, "ok": true })
        );
        assert!(!line.to_string().contains('\n'), "one line: {line}");
    }
}
