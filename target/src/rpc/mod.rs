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

/// Feeds arbitrary bytes to the admin socket's stream framing and dispatch,
/// as one connection would; for a cargo-fuzz target. Never panics.
pub fn fuzz_rpc_stream(data: &[u8]) {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Params {
        name: String,
        #[serde(default)]
        num_blocks: Option<u64>,
        #[serde(default)]
        block_size: Option<crate::units::BlockSize>,
    }
    let registry = MethodRegistry::new();
    let _ = registry.register("bdev_fuzz_create", |p| {
        let params: Params = parse_params(p)?;
        Ok(serde_json::Value::String(params.name))
    });
    let mut out = Vec::new();
    let _ = server::serve_stream(&registry, data, &mut out, 64 * 1024);
}
