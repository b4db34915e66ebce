//! JSON-RPC 2.0 admin socket: framing, errors, the Unix-socket server and client.
