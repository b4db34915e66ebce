//! JSON-RPC 2.0 admin socket: framing, errors, the Unix-socket server and client.
//!
//! The control plane speaks JSON-RPC 2.0 over a Unix stream socket, like
//! SPDK: the daemon fills a [`MethodRegistry`] with `<subsystem>_<object>_<verb>`
//! methods and starts an [`RpcServer`]; the `mirrorpoint rpc` CLI uses
//! [`RpcClient`]. [`protocol`] holds the wire types, [`registry`] dispatch,
//! [`server`] the socket server and [`client`] the client.

pub mod client;
pub mod protocol;
pub mod registry;
pub mod server;

pub use client::{ClientError, RpcClient, DEFAULT_TIMEOUT};
pub use protocol::{
    parse_params, Id, InvalidRequest, MalformedResponse, Reply, Request, Response, RpcError,
    JSONRPC_VERSION,
};
pub use registry::{Handler, MethodRegistry, RegisterError, GET_METHODS};
pub use server::{
    RpcServer, ServerConfig, ServerError, ShutdownHandle, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_SOCKET_PATH, MAX_REQUEST_BYTES,
};
