//! JSON-RPC 2.0 wire types: requests, responses, error objects and batches.
//!
//! Requests are validated by hand from a [`serde_json::Value`] rather than
//! derived with serde, because the spec distinguishes cases serde would merge:
//! an absent `id` (a notification) versus `"id": null` (a request that wants a
//! reply), and a malformed request must still be answered with the id it
//! carried when that id is usable. Keeping the raw `Value` step also lets the
//! server tell "not JSON" (-32700, connection is lost) from "JSON but not a
//! request" (-32600, keep going). Responses hold `Result<Value, RpcError>` so
//! that "exactly one of result or error" is a property of the type.

use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};
use std::fmt;

/// The only protocol version this module speaks.
pub const JSONRPC_VERSION: &str = "2.0";

/// Longest method name echoed back in a "method not found" message; longer
/// names are cut so a hostile request cannot make us build huge messages.
const MAX_ECHOED_NAME: usize = 128;

/// A request id: a number, a string or null. An *absent* id is represented as
/// `Option::<Id>::None` on [`Request`] and marks a notification.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Id {
    /// `"id": null` (legal, but then the client cannot match replies).
    Null,
    /// A numeric id, echoed back exactly as received.
    Number(Number),
    /// A string id.
    String(String),
}

impl Id {
    /// Converts a JSON value into an id, if it is of a kind the spec allows.
    pub fn from_value(value: &Value) -> Option<Id> {
        match value {
            Value::Null => Some(Id::Null),
            Value::Number(n) => Some(Id::Number(n.clone())),
            Value::String(s) => Some(Id::String(s.clone())),
            _ => None,
        }
    }

    /// The id as a JSON value.
    pub fn to_value(&self) -> Value {
        match self {
            Id::Null => Value::Null,
            Id::Number(n) => Value::Number(n.clone()),
            Id::String(s) => Value::String(s.clone()),
        }
    }
}

impl From<u64> for Id {
    fn from(n: u64) -> Self {
        Id::Number(n.into())
    }
}

impl From<i64> for Id {
    fn from(n: i64) -> Self {
        Id::Number(n.into())
    }
}

impl From<&str> for Id {
    fn from(s: &str) -> Self {
        Id::String(s.to_owned())
    }
}

impl From<String> for Id {
    fn from(s: String) -> Self {
        Id::String(s)
    }
}

impl Serialize for Id {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Id::Null => serializer.serialize_unit(),
            Id::Number(n) => n.serialize(serializer),
            Id::String(s) => serializer.serialize_str(s),
        }
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Id::Null => f.write_str("null"),
            Id::Number(n) => write!(f, "{n}"),
            Id::String(s) => write!(f, "{s:?}"),
        }
    }
}

/// A JSON-RPC error object. Codes follow the spec (-32700..-32600) for
/// protocol errors; handlers use [`RpcError::app`] for their own codes, e.g.
/// SPDK-style negative errno values or the -32000..-32099 server range.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} (code {code})")]
pub struct RpcError {
    /// The error code.
    pub code: i32,
    /// A short human-readable description.
    pub message: String,
    /// Optional structured detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl RpcError {
    /// Invalid JSON was received.
    pub const PARSE_ERROR: i32 = -32700;
    /// The JSON sent is not a valid request object.
    pub const INVALID_REQUEST: i32 = -32600;
    /// The method does not exist.
    pub const METHOD_NOT_FOUND: i32 = -32601;
    /// Invalid method parameters.
    pub const INVALID_PARAMS: i32 = -32602;
    /// Internal JSON-RPC error.
    pub const INTERNAL_ERROR: i32 = -32603;
    /// Upper end of the implementation-defined server error range.
    pub const SERVER_ERROR_MAX: i32 = -32000;
    /// Lower end of the implementation-defined server error range.
    pub const SERVER_ERROR_MIN: i32 = -32099;

    /// An error with any code and message.
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
            data: None,
        }
    }

    /// -32700: the bytes received are not JSON.
    pub fn parse_error(detail: impl fmt::Display) -> Self {
        Self::new(Self::PARSE_ERROR, format!("parse error: {detail}"))
    }

    /// -32600: valid JSON that is not a valid request.
    pub fn invalid_request(detail: impl fmt::Display) -> Self {
        Self::new(Self::INVALID_REQUEST, format!("invalid request: {detail}"))
    }

    /// -32601: no such method; the message names it.
    pub fn method_not_found(method: &str) -> Self {
        Self::new(
            Self::METHOD_NOT_FOUND,
            format!("method not found: {}", truncate(method, MAX_ECHOED_NAME)),
        )
    }

    /// -32602: bad parameters; `detail` should name the offending field.
    pub fn invalid_params(detail: impl fmt::Display) -> Self {
        Self::new(Self::INVALID_PARAMS, format!("invalid params: {detail}"))
    }

    /// -32603: something went wrong on our side.
    pub fn internal(detail: impl fmt::Display) -> Self {
        Self::new(Self::INTERNAL_ERROR, format!("internal error: {detail}"))
    }

    /// An application error with the handler's own code, e.g. `-17` (EEXIST)
    /// as SPDK does, or a code in -32000..=-32099.
    pub fn app(code: i32, message: impl Into<String>) -> Self {
        Self::new(code, message)
    }

    /// An SPDK-style error from an errno value: code `-errno`, message the
    /// system's description (`errno(libc::ENODEV)` gives -19 "No such device").
    pub fn errno(errno: i32) -> Self {
        let text = std::io::Error::from_raw_os_error(errno).to_string();
        // std appends " (os error N)"; SPDK's messages are just strerror().
        let message = match text.rfind(" (os error ") {
            Some(cut) => text.get(..cut).unwrap_or(&text).to_owned(),
            None => text,
        };
        Self::new(errno.saturating_neg(), message)
    }

    /// Attaches structured detail.
    pub fn with_data(mut self, data: Value) -> Self {
        self.data = Some(data);
        self
    }
}

/// Cuts `s` to at most `max` bytes on a char boundary, marking the cut.
fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", s.get(..end).unwrap_or(""))
}

/// A validated request. `id == None` means a notification (no reply).
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The method name.
    pub method: String,
    /// Parameters: always an object or an array when present.
    pub params: Option<Value>,
    /// The id, or `None` for a notification.
    pub id: Option<Id>,
}

/// A value that is JSON but not a valid request, with the id to answer to.
#[derive(Debug, Clone, PartialEq)]
pub struct InvalidRequest {
    /// The request's id if it had a usable one, else [`Id::Null`].
    pub id: Id,
    /// The -32600 error describing what is wrong.
    pub error: RpcError,
}

impl InvalidRequest {
    /// The error response to send back.
    pub fn into_response(self) -> Response {
        Response::error(self.id, self.error)
    }
}

impl Request {
    /// A request expecting a reply.
    pub fn new(method: impl Into<String>, params: Option<Value>, id: Id) -> Self {
        Request {
            method: method.into(),
            params,
            id: Some(id),
        }
    }

    /// A notification (no id, no reply).
    pub fn notification(method: impl Into<String>, params: Option<Value>) -> Self {
        Request {
            method: method.into(),
            params,
            id: None,
        }
    }

    /// Whether this is a notification.
    pub fn is_notification(&self) -> bool {
        self.id.is_none()
    }

    /// Validates one JSON value as a request object. Unknown members are
    /// ignored; everything the spec constrains is checked.
    pub fn from_value(value: Value) -> Result<Request, InvalidRequest> {
        let mut obj = match value {
            Value::Object(obj) => obj,
            other => {
                return Err(InvalidRequest {
                    id: Id::Null,
                    error: RpcError::invalid_request(format!(
                        "expected an object, got {}",
                        kind_of(&other)
                    )),
                })
            }
        };
        // The id decides whom to answer, so pull it out first; an id of the
        // wrong type is itself an invalid request answered to `null`.
        let id = match obj.remove("id") {
            None => None,
            Some(raw) => match Id::from_value(&raw) {
                Some(id) => Some(id),
                None => {
                    return Err(InvalidRequest {
                        id: Id::Null,
                        error: RpcError::invalid_request(format!(
                            "`id` must be a number, string or null, got {}",
                            kind_of(&raw)
                        )),
                    })
                }
            },
        };
        let reply_id = id.clone().unwrap_or(Id::Null);
        let invalid = |detail: String| InvalidRequest {
            id: reply_id.clone(),
            error: RpcError::invalid_request(detail),
        };
        match obj.get("jsonrpc") {
            Some(Value::String(v)) if v == JSONRPC_VERSION => {}
            Some(Value::String(v)) => {
                return Err(invalid(format!(
                    "unsupported `jsonrpc` version {:?}, expected \"2.0\"",
                    truncate(v, MAX_ECHOED_NAME)
                )))
            }
            Some(other) => {
                return Err(invalid(format!(
                    "`jsonrpc` must be the string \"2.0\", got {}",
                    kind_of(other)
                )))
            }
            None => return Err(invalid("missing `jsonrpc` member".to_owned())),
        }
        let method = match obj.remove("method") {
            Some(Value::String(m)) => m,
            Some(other) => {
                return Err(invalid(format!(
                    "`method` must be a string, got {}",
                    kind_of(&other)
                )))
            }
            None => return Err(invalid("missing `method` member".to_owned())),
        };
        let params = match obj.remove("params") {
            None => None,
            Some(p @ (Value::Object(_) | Value::Array(_))) => Some(p),
            Some(other) => {
                return Err(invalid(format!(
                    "`params` must be an object or an array, got {}",
                    kind_of(&other)
                )))
            }
        };
        Ok(Request { method, params, id })
    }
}

impl Serialize for Request {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("jsonrpc", JSONRPC_VERSION)?;
        map.serialize_entry("method", &self.method)?;
        if let Some(params) = &self.params {
            map.serialize_entry("params", params)?;
        }
        if let Some(id) = &self.id {
            map.serialize_entry("id", id)?;
        }
        map.end()
    }
}

/// A response: the id it answers and either a result or an error.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// The id of the request answered (null if it could not be determined).
    pub id: Id,
    /// The result, or the error.
    pub outcome: Result<Value, RpcError>,
}

/// A response that does not follow the spec (seen by the client).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed response: {0}")]
pub struct MalformedResponse(pub String);

impl Response {
    /// A success response.
    pub fn result(id: Id, result: Value) -> Self {
        Response {
            id,
            outcome: Ok(result),
        }
    }

    /// An error response.
    pub fn error(id: Id, error: RpcError) -> Self {
        Response {
            id,
            outcome: Err(error),
        }
    }

    /// Validates a JSON value as a response object.
    pub fn from_value(value: Value) -> Result<Response, MalformedResponse> {
        let bad = |s: &str| MalformedResponse(s.to_owned());
        let mut obj = match value {
            Value::Object(obj) => obj,
            _ => return Err(bad("not an object")),
        };
        if obj.get("jsonrpc").and_then(Value::as_str) != Some(JSONRPC_VERSION) {
            return Err(bad("missing or wrong `jsonrpc` version"));
        }
        let id = match obj.get("id") {
            Some(raw) => Id::from_value(raw).ok_or_else(|| bad("`id` of the wrong type"))?,
            None => return Err(bad("missing `id`")),
        };
        let outcome = match (obj.remove("result"), obj.remove("error")) {
            (Some(result), None) => Ok(result),
            (None, Some(error)) => Err(serde_json::from_value::<RpcError>(error)
                .map_err(|e| MalformedResponse(format!("bad error object: {e}")))?),
            (Some(_), Some(_)) => return Err(bad("both `result` and `error`")),
            (None, None) => return Err(bad("neither `result` nor `error`")),
        };
        Ok(Response { id, outcome })
    }
}

impl Serialize for Response {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(3))?;
        map.serialize_entry("jsonrpc", JSONRPC_VERSION)?;
        map.serialize_entry("id", &self.id)?;
        match &self.outcome {
            Ok(result) => map.serialize_entry("result", result)?,
            Err(error) => map.serialize_entry("error", error)?,
        }
        map.end()
    }
}

/// What goes back for one incoming JSON value: a single response, or an
/// array of responses for a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// The answer to a single request (or a single error).
    Single(Response),
    /// The answers to the non-notification members of a batch, in order.
    Batch(Vec<Response>),
}

impl Serialize for Reply {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Reply::Single(r) => r.serialize(serializer),
            Reply::Batch(rs) => rs.serialize(serializer),
        }
    }
}

impl Reply {
    /// The reply as one line of compact JSON followed by `\n`, as the server
    /// writes it. Compact JSON never contains a raw newline.
    pub fn to_line(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec(self).unwrap_or_else(|e| {
            // Serialising a Value cannot fail (keys are strings); answer with
            // a fixed error rather than panic if that ever changes.
            tracing::error!(error = %e, "failed to serialise an RPC reply");
            br#"{"jsonrpc":"2.0","id":null,"error":{"code":-32603,"message":"internal error: unserialisable reply"}}"#.to_vec()
        });
        out.push(b'\n');
        out
    }
}

/// Deserialises method parameters into `T`, turning serde's complaint into a
/// -32602 error that names the offending field. Absent params deserialise as
/// `{}`, so a struct whose fields are all optional accepts no params at all.
pub fn parse_params<T: serde::de::DeserializeOwned>(params: Option<Value>) -> Result<T, RpcError> {
    let value = params.unwrap_or_else(|| Value::Object(Map::new()));
    serde_path_to_error::deserialize(value).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        if path == "." || path.is_empty() {
            RpcError::invalid_params(inner)
        } else {
            RpcError::invalid_params(format!("field `{path}`: {inner}"))
        }
    })
}

/// A short name for the kind of a JSON value, for error messages.
fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn req(v: Value) -> Result<Request, InvalidRequest> {
        Request::from_value(v)
    }

    #[test]
    fn id_kinds() {
        let r = req(json!({"jsonrpc":"2.0","method":"m","id":7})).unwrap();
        assert_eq!(r.id, Some(Id::from(7u64)));
        let r = req(json!({"jsonrpc":"2.0","method":"m","id":-3})).unwrap();
        assert_eq!(r.id, Some(Id::from(-3i64)));
        let r = req(json!({"jsonrpc":"2.0","method":"m","id":"abc"})).unwrap();
        assert_eq!(r.id, Some(Id::from("abc")));
        let r = req(json!({"jsonrpc":"2.0","method":"m","id":null})).unwrap();
        assert_eq!(r.id, Some(Id::Null));
        assert!(!r.is_notification());
        let r = req(json!({"jsonrpc":"2.0","method":"m","id":1.5})).unwrap();
        assert_eq!(r.id.unwrap().to_value(), json!(1.5));
    }

    #[test]
    fn absent_id_is_notification() {
        let r = req(json!({"jsonrpc":"2.0","method":"m"})).unwrap();
        assert!(r.is_notification());
    }

    #[test]
    fn bad_id_types_are_invalid_and_answered_to_null() {
        for id in [json!([1]), json!({"a":1}), json!(true)] {
            let e = req(json!({"jsonrpc":"2.0","method":"m","id":id})).unwrap_err();
            assert_eq!(e.id, Id::Null);
            assert_eq!(e.error.code, RpcError::INVALID_REQUEST);
        }
    }

    #[test]
    fn wrong_version_is_invalid_but_keeps_id() {
        for v in [json!("1.0"), json!(2.0), json!(null)] {
            let e = req(json!({"jsonrpc":v,"method":"m","id":4})).unwrap_err();
            assert_eq!(e.error.code, RpcError::INVALID_REQUEST);
            assert_eq!(e.id, Id::from(4u64));
        }
        let e = req(json!({"method":"m","id":"x"})).unwrap_err();
        assert_eq!(e.id, Id::from("x"));
        assert!(e.error.message.contains("jsonrpc"), "{}", e.error.message);
    }

    #[test]
    fn method_must_be_a_string() {
        let e = req(json!({"jsonrpc":"2.0","method":1,"params":"bar"})).unwrap_err();
        assert_eq!(e.error.code, RpcError::INVALID_REQUEST);
        assert_eq!(e.id, Id::Null);
        assert!(req(json!({"jsonrpc":"2.0","id":1})).is_err());
    }

    #[test]
    fn params_must_be_structured() {
        for p in [json!("s"), json!(1), json!(true), json!(null)] {
            let e = req(json!({"jsonrpc":"2.0","method":"m","params":p,"id":1})).unwrap_err();
            assert_eq!(e.error.code, RpcError::INVALID_REQUEST);
            assert!(e.error.message.contains("params"), "{}", e.error.message);
        }
        let r = req(json!({"jsonrpc":"2.0","method":"m","params":[1,2],"id":1})).unwrap();
        assert_eq!(r.params, Some(json!([1, 2])));
        let r = req(json!({"jsonrpc":"2.0","method":"m","params":{},"id":1})).unwrap();
        assert_eq!(r.params, Some(json!({})));
    }

    #[test]
    fn non_objects_are_invalid() {
        for v in [json!(1), json!("x"), json!(null), json!([1])] {
            let e = req(v).unwrap_err();
            assert_eq!(e.error.code, RpcError::INVALID_REQUEST);
            assert_eq!(e.id, Id::Null);
        }
    }

    #[test]
    fn huge_numbers() {
        // Beyond u64: serde_json falls back to f64; the id is echoed as such.
        let v: Value = serde_json::from_str(
            r#"{"jsonrpc":"2.0","method":"m","id":123456789012345678901234567890}"#,
        )
        .unwrap();
        let r = req(v).unwrap();
        assert!(matches!(r.id, Some(Id::Number(ref n)) if n.is_f64()));
        // Beyond f64 is not representable: a parse error, not a panic.
        assert!(serde_json::from_str::<Value>(r#"{"id":1e400}"#).is_err());
    }

    #[test]
    fn unknown_members_are_ignored() {
        let r = req(json!({"jsonrpc":"2.0","method":"m","id":1,"extra":true})).unwrap();
        assert_eq!(r.method, "m");
    }

    #[test]
    fn response_serialisation() {
        let ok = Response::result(Id::from(1u64), json!({"a":1}));
        assert_eq!(
            serde_json::to_value(&ok).unwrap(),
            json!({"jsonrpc":"2.0","id":1,"result":{"a":1}})
        );
        let err = Response::error(Id::Null, RpcError::method_not_found("nope"));
        assert_eq!(
            serde_json::to_value(&err).unwrap(),
            json!({"jsonrpc":"2.0","id":null,"error":{"code":-32601,"message":"method not found: nope"}})
        );
        let line = Reply::Batch(vec![ok.clone(), err.clone()]).to_line();
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        // Round trip through the client-side parser.
        let back = Response::from_value(serde_json::to_value(&err).unwrap()).unwrap();
        assert_eq!(back, err);
        assert_eq!(
            Response::from_value(serde_json::to_value(&ok).unwrap()).unwrap(),
            ok
        );
    }

    #[test]
    fn malformed_responses() {
        for v in [
            json!(1),
            json!({"jsonrpc":"2.0","id":1}),
            json!({"jsonrpc":"2.0","id":1,"result":1,"error":{"code":1,"message":"x"}}),
            json!({"jsonrpc":"1.0","id":1,"result":1}),
            json!({"jsonrpc":"2.0","result":1}),
            json!({"jsonrpc":"2.0","id":1,"error":{"code":"x","message":"x"}}),
            json!({"jsonrpc":"2.0","id":1,"error":{"code":99999999999i64,"message":"x"}}),
        ] {
            assert!(Response::from_value(v.clone()).is_err(), "{v}");
        }
    }

    #[test]
    fn request_serialisation() {
        let r = Request::new("m", Some(json!({"x":1})), Id::from(3u64));
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"jsonrpc":"2.0","method":"m","params":{"x":1},"id":3})
        );
        let n = Request::notification("m", None);
        assert_eq!(
            serde_json::to_value(&n).unwrap(),
            json!({"jsonrpc":"2.0","method":"m"})
        );
        assert_eq!(req(serde_json::to_value(&r).unwrap()).unwrap(), r);
    }

    #[test]
    fn error_constructors() {
        assert_eq!(RpcError::parse_error("x").code, -32700);
        assert_eq!(RpcError::invalid_request("x").code, -32600);
        assert_eq!(RpcError::invalid_params("x").code, -32602);
        assert_eq!(RpcError::internal("x").code, -32603);
        let e = RpcError::method_not_found("bdev_foo_create");
        assert_eq!(e.code, -32601);
        assert!(e.message.contains("bdev_foo_create"));
        let long = "é".repeat(500);
        assert!(RpcError::method_not_found(&long).message.len() < 200);
        let e = RpcError::errno(libc::EEXIST);
        assert_eq!((e.code, e.message.as_str()), (-17, "File exists"));
        let e = RpcError::errno(libc::ENODEV);
        assert_eq!((e.code, e.message.as_str()), (-19, "No such device"));
        let e = RpcError::app(-32001, "busy").with_data(json!({"retry":true}));
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            json!({"code":-32001,"message":"busy","data":{"retry":true}})
        );
        assert_eq!(e.to_string(), "busy (code -32001)");
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Create {
        name: String,
        block_size: crate::units::BlockSize,
        #[serde(default)]
        num_blocks: Option<u64>,
    }

    #[derive(Debug, Deserialize, PartialEq, Default)]
    struct AllOptional {
        #[serde(default)]
        verbose: Option<bool>,
    }

    #[derive(Debug, Deserialize)]
    struct Outer {
        #[allow(dead_code)]
        inner: Inner,
    }

    #[derive(Debug, Deserialize)]
    struct Inner {
        #[allow(dead_code)]
        depth: u32,
    }

    #[test]
    fn parse_params_names_missing_field() {
        let e = parse_params::<Create>(Some(json!({"block_size":512}))).unwrap_err();
        assert_eq!(e.code, RpcError::INVALID_PARAMS);
        assert_eq!(e.message, "invalid params: missing field `name`");
    }

    #[test]
    fn parse_params_names_bad_field() {
        let e = parse_params::<Create>(Some(json!({"name":"m0","block_size":1000}))).unwrap_err();
        assert_eq!(e.code, RpcError::INVALID_PARAMS);
        assert!(
            e.message
                .starts_with("invalid params: field `block_size`: "),
            "{}",
            e.message
        );
        let e = parse_params::<Create>(Some(json!({"name":"m0","block_size":"4k"}))).unwrap_err();
        assert!(e.message.contains("`block_size`"), "{}", e.message);
        let e = parse_params::<Create>(Some(json!({"name":"m0","block_size":512,"num_blocks":-1})))
            .unwrap_err();
        assert!(e.message.contains("`num_blocks`"), "{}", e.message);
        // A number too big for u64 is an f64 in serde_json, and still named.
        let big: Value = serde_json::from_str(
            r#"{"name":"m0","block_size":512,"num_blocks":99999999999999999999999}"#,
        )
        .unwrap();
        let e = parse_params::<Create>(Some(big)).unwrap_err();
        assert!(e.message.contains("`num_blocks`"), "{}", e.message);
        let e = parse_params::<Outer>(Some(json!({"inner":{"depth":"deep"}}))).unwrap_err();
        assert!(e.message.contains("`inner.depth`"), "{}", e.message);
    }

    #[test]
    fn parse_params_unknown_field() {
        let e = parse_params::<Create>(Some(json!({"name":"m0","block_size":512,"bogus":1})))
            .unwrap_err();
        assert!(e.message.contains("`bogus`"), "{}", e.message);
    }

    #[test]
    fn parse_params_absent_is_empty_object() {
        assert_eq!(
            parse_params::<AllOptional>(None).unwrap(),
            AllOptional::default()
        );
        let e = parse_params::<Create>(None).unwrap_err();
        assert_eq!(e.message, "invalid params: missing field `name`");
    }

    #[test]
    fn parse_params_ok_and_positional() {
        let c: Create = parse_params(Some(json!({"name":"m0","block_size":4096}))).unwrap();
        assert_eq!(c.name, "m0");
        assert_eq!(c.block_size, crate::units::BlockSize::B4096);
        let (a, b): (String, u32) = parse_params(Some(json!(["x", 2]))).unwrap();
        assert_eq!((a.as_str(), b), ("x", 2));
        let e = parse_params::<(String, u32)>(Some(json!(["x", "y"]))).unwrap_err();
        assert_eq!(e.code, RpcError::INVALID_PARAMS);
        assert!(e.message.contains("field `[1]`"), "{}", e.message);
    }
}
