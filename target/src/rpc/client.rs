//! A blocking JSON-RPC client for the admin socket (used by `mirrorpoint rpc`).
//!
//! One request at a time on one connection, with ids counting up from 1 and
//! an overall deadline per call (not just per `read`), so a server that
//! trickles bytes cannot hold the CLI forever. Responses are read as a stream
//! of JSON values, so a server that omits the newline after each response
//! works too. After an I/O or protocol error the stream position is unknown,
//! so the client refuses further calls rather than risk pairing a later
//! request with an earlier response.

use super::protocol::{Id, Request, Response, RpcError};
use serde_json::Value;
use std::io::{self, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long a call may take unless [`RpcClient::set_timeout`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting, sending or receiving failed (a timeout is `TimedOut`).
    #[error("RPC I/O error: {0}")]
    Io(#[from] io::Error),
    /// The server's answer does not make sense, or the connection is unusable.
    #[error("RPC protocol error: {0}")]
    Protocol(String),
    /// The server answered with a JSON-RPC error.
    #[error("RPC error {}: {}", .0.code, .0.message)]
    Rpc(RpcError),
}

impl ClientError {
    /// The JSON-RPC error code, if the server returned an error.
    pub fn rpc_code(&self) -> Option<i32> {
        match self {
            ClientError::Rpc(e) => Some(e.code),
            _ => None,
        }
    }
}

/// A reader over the socket that enforces the current call's deadline.
struct DeadlineStream {
    stream: UnixStream,
    deadline: Option<Instant>,
}

impl Read for DeadlineStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = match self.deadline {
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "timed out waiting for the RPC response",
                    ));
                }
                Some(left)
            }
            None => None,
        };
        self.stream.set_read_timeout(left)?;
        self.stream.read(buf).map_err(|e| {
            // A read timeout shows up as WouldBlock on Unix.
            if e.kind() == io::ErrorKind::WouldBlock {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    "timed out waiting for the RPC response",
                )
            } else {
                e
            }
        })
    }
}

/// A connection to an RPC server.
pub struct RpcClient {
    reader: BufReader<DeadlineStream>,
    next_id: u64,
    timeout: Option<Duration>,
    broken: bool,
}

impl std::fmt::Debug for RpcClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcClient")
            .field("next_id", &self.next_id)
            .field("timeout", &self.timeout)
            .field("broken", &self.broken)
            .finish()
    }
}

impl RpcClient {
    /// Connects to the server at `path` with [`DEFAULT_TIMEOUT`].
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path)?;
        Ok(RpcClient {
            reader: BufReader::new(DeadlineStream {
                stream,
                deadline: None,
            }),
            next_id: 1,
            timeout: Some(DEFAULT_TIMEOUT),
            broken: false,
        })
    }

    /// Sets the per-call timeout (`None`: wait forever).
    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    /// Calls `method` and returns its result.
    pub fn call(&mut self, method: &str, params: Option<Value>) -> Result<Value, ClientError> {
        self.usable()?;
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let outcome = self.exchange(&Request::new(method, params, Id::from(id)), id);
        if matches!(outcome, Err(ClientError::Io(_) | ClientError::Protocol(_))) {
            self.broken = true;
        }
        outcome
    }

    /// Sends a notification (no id, no response).
    pub fn notify(&mut self, method: &str, params: Option<Value>) -> Result<(), ClientError> {
        self.usable()?;
        let outcome = self.send(&Request::notification(method, params));
        if outcome.is_err() {
            self.broken = true;
        }
        outcome
    }

    fn usable(&self) -> Result<(), ClientError> {
        if self.broken {
            Err(ClientError::Protocol(
                "connection unusable after an earlier error".to_owned(),
            ))
        } else {
            Ok(())
        }
    }

    fn send(&mut self, request: &Request) -> Result<(), ClientError> {
        let mut line = serde_json::to_vec(request)
            .map_err(|e| ClientError::Protocol(format!("cannot encode request: {e}")))?;
        line.push(b'\n');
        let stream = &self.reader.get_ref().stream;
        stream.set_write_timeout(self.timeout)?;
        (&*stream).write_all(&line)?;
        Ok(())
    }

    fn exchange(&mut self, request: &Request, id: u64) -> Result<Value, ClientError> {
        self.reader.get_mut().deadline = self.timeout.map(|t| Instant::now() + t);
        if let Err(send_err) = self.send(request) {
            // The server may have closed the connection after explaining why
            // (e.g. "too many connections"): prefer its words to EPIPE.
            return match self.receive(id) {
                Err(ClientError::Rpc(e)) => Err(ClientError::Rpc(e)),
                _ => Err(send_err),
            };
        }
        self.receive(id)
    }

    fn receive(&mut self, id: u64) -> Result<Value, ClientError> {
        let value = {
            let mut de = serde_json::Deserializer::from_reader(&mut self.reader);
            serde::Deserialize::deserialize(&mut de)
        };
        let value: Value = value.map_err(|e| {
            if e.is_io() {
                let kind = e.io_error_kind().unwrap_or(io::ErrorKind::Other);
                ClientError::Io(io::Error::new(kind, e))
            } else if e.is_eof() {
                ClientError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "server closed the connection",
                ))
            } else {
                ClientError::Protocol(format!("invalid JSON from server: {e}"))
            }
        })?;
        let response =
            Response::from_value(value).map_err(|e| ClientError::Protocol(e.to_string()))?;
        if response.id != Id::from(id) {
            // An error the server could not attribute to a request (e.g.
            // "too many connections", or a parse error) has a null id. With one
            // request in flight it is ours; the server closes the connection
            // after such errors, so this client is done too.
            if response.id == Id::Null {
                if let Err(e) = response.outcome {
                    self.broken = true;
                    return Err(ClientError::Rpc(e));
                }
            }
            return Err(ClientError::Protocol(format!(
                "response id {} does not match request id {id}",
                response.id
            )));
        }
        response.outcome.map_err(ClientError::Rpc)
    }
}
