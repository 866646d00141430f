//! Reading one request line apart: `{"command": NAME, "arguments": {...}, "id": ID}`.
//!
//! The line is bounded ([`REQUEST_BYTES_MAX`](super::REQUEST_BYTES_MAX)), but a JSON value
//! built from it is not: `[0,0,0,...]` becomes sixteen times its text in memory. So the
//! envelope is read without building its parts (`arguments` and `id` stay text, which the
//! parser checks without allocating per element), and `arguments` is built only when its
//! text is at most [`ARGUMENTS_BYTES_MAX`]; an `id`, echoed in the reply, is at most
//! [`ID_BYTES_MAX`]. What a connection's request costs is then bounded whatever it says.

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// The longest `arguments` object accepted, as text. Every command's arguments are a few
/// names and numbers; this leaves room for lists of volumes.
pub const ARGUMENTS_BYTES_MAX: usize = 64 * 1024;
/// The longest `id` accepted, as text (it is copied into the reply).
pub const ID_BYTES_MAX: usize = 256;
/// The longest command name accepted.
pub const COMMAND_BYTES_MAX: usize = 64;

/// A request, read apart and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub command: String,
    /// The `arguments` object (empty when the request had none, or `null`).
    pub arguments: Value,
    /// The `id`, echoed in the reply.
    pub id: Option<Value>,
}

/// Why a request line was refused; the reply's `desc`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error("a request must be a JSON object")]
    NotAnObject,
    #[error("missing \"command\"")]
    MissingCommand,
    #[error("\"command\" must be a string of at most {COMMAND_BYTES_MAX} bytes")]
    BadCommand,
    #[error("\"arguments\" must be a JSON object")]
    ArgumentsNotAnObject,
    #[error("\"arguments\" longer than {ARGUMENTS_BYTES_MAX} bytes")]
    ArgumentsTooLong,
    #[error("\"id\" longer than {ID_BYTES_MAX} bytes")]
    IdTooLong,
}

/// The envelope, its parts left as text.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    command: Option<&'a RawValue>,
    #[serde(borrow)]
    arguments: Option<&'a RawValue>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
}

/// Reads a request line apart (without its newline).
pub fn parse_request(line: &str) -> Result<Request, RequestError> {
    let trimmed = line.trim_start();
    if !trimmed.starts_with('{') {
        // Checked first so that `[1,2,...]` is refused before anything is built from it.
        return Err(match serde_json::from_str::<&RawValue>(trimmed) {
            Ok(_) => RequestError::NotAnObject,
            Err(e) => RequestError::Json(e.to_string()),
        });
    }
    let envelope: Envelope<'_> =
        serde_json::from_str(line).map_err(|e| RequestError::Json(e.to_string()))?;
    let command = envelope.command.ok_or(RequestError::MissingCommand)?;
    if command.get().len() > COMMAND_BYTES_MAX + 2 {
        return Err(RequestError::BadCommand);
    }
    let command: String =
        serde_json::from_str(command.get()).map_err(|_| RequestError::BadCommand)?;
    if command.len() > COMMAND_BYTES_MAX {
        return Err(RequestError::BadCommand);
    }
    let arguments = match envelope.arguments {
        None => Value::Object(Map::new()),
        Some(raw) if raw.get().len() > ARGUMENTS_BYTES_MAX => {
            return Err(RequestError::ArgumentsTooLong)
        }
        Some(raw) => match serde_json::from_str(raw.get()) {
            Ok(Value::Null) => Value::Object(Map::new()),
            Ok(object @ Value::Object(_)) => object,
            _ => return Err(RequestError::ArgumentsNotAnObject),
        },
    };
    let id = match envelope.id {
        Some(raw) if raw.get().len() > ID_BYTES_MAX => return Err(RequestError::IdTooLong),
        Some(raw) => {
            Some(serde_json::from_str(raw.get()).map_err(|e| RequestError::Json(e.to_string()))?)
        }
        None => None,
    };
    Ok(Request {
        command,
        arguments,
        id,
    })
}
