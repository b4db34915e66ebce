//! End-to-end tests of the JSON-RPC admin socket: a real server on a temporary
//! socket path, driven through `RpcClient` and through raw streams.

use mirrorpoint_target::rpc::{
    parse_params, ClientError, MethodRegistry, RpcClient, RpcError, RpcServer, ServerConfig,
    ServerError,
};
use mirrorpoint_target::units::BlockSize;
use serde::Deserialize;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A socket path unique to this process and test, removed on drop.
struct TempSock(PathBuf);

impl TempSock {
    fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("mp-rpc-{}-{tag}-{n}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        TempSock(path)
    }
}

impl Drop for TempSock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddParams {
    a: i64,
    b: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MallocCreate {
    name: String,
    block_size: BlockSize,
    num_blocks: u64,
}

fn registry(notified: Arc<AtomicUsize>) -> Arc<MethodRegistry> {
    let r = MethodRegistry::new();
    r.register("test_add", |p| {
        let AddParams { a, b } = parse_params(p)?;
        a.checked_add(b)
            .map(Value::from)
            .ok_or_else(|| RpcError::app(-34, "Numerical result out of range"))
    })
    .unwrap();
    r.register("test_echo", |p| Ok(p.unwrap_or(Value::Null)))
        .unwrap();
    r.register("test_notify", move |_| {
        notified.fetch_add(1, Ordering::SeqCst);
        Ok(Value::Null)
    })
    .unwrap();
    r.register("test_sleep_ms", |p| {
        let (ms,): (u64,) = parse_params(p)?;
        std::thread::sleep(Duration::from_millis(ms));
        Ok(Value::Bool(true))
    })
    .unwrap();
    r.register("bdev_malloc_create", |p| {
        let c: MallocCreate = parse_params(p)?;
        if c.name == "exists" {
            return Err(RpcError::errno(libc::EEXIST));
        }
        let _ = (c.block_size, c.num_blocks);
        Ok(Value::from(c.name))
    })
    .unwrap();
    Arc::new(r)
}

fn start(sock: &TempSock) -> RpcServer {
    start_with(ServerConfig::new(&sock.0))
}

fn start_with(config: ServerConfig) -> RpcServer {
    RpcServer::start(config, registry(Arc::new(AtomicUsize::new(0)))).unwrap()
}

/// A raw connection with line-oriented reads.
struct Raw {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Raw {
    fn connect(sock: &TempSock) -> Raw {
        let stream = UnixStream::connect(&sock.0).unwrap();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Raw { stream, reader }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    fn line(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).unwrap();
        assert!(n > 0, "connection closed, expected a response");
        assert!(line.ends_with('\n'));
        serde_json::from_str(&line).unwrap()
    }

    /// Asserts the server closed the connection (EOF, or a reset because
    /// the server closed with our bytes still unread).
    fn assert_closed(&mut self) {
        let mut buf = [0u8; 64];
        match self.reader.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!(
                "expected close, got {:?}",
                String::from_utf8_lossy(&buf[..n])
            ),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(e) => panic!("expected close, got {e}"),
        }
    }
}

#[test]
fn socket_is_0600_and_shutdown_removes_it() {
    let sock = TempSock::new("mode");
    let server = start(&sock);
    let meta = std::fs::symlink_metadata(&sock.0).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    assert_eq!(server.path(), sock.0.as_path());
    server.shutdown();
    assert!(!sock.0.exists());
    assert!(UnixStream::connect(&sock.0).is_err());
}

#[test]
fn good_calls_through_the_client() {
    let sock = TempSock::new("good");
    let _server = start(&sock);
    let mut client = RpcClient::connect(&sock.0).unwrap();
    assert_eq!(
        client.call("test_add", Some(json!({"a":2,"b":3}))).unwrap(),
        json!(5)
    );
    assert_eq!(
        client
            .call("test_echo", Some(json!(["x", {"y": null}])))
            .unwrap(),
        json!(["x", {"y": null}])
    );
    assert_eq!(
        client.call("rpc_get_methods", None).unwrap(),
        json!([
            "bdev_malloc_create",
            "rpc_get_methods",
            "test_add",
            "test_echo",
            "test_notify",
            "test_sleep_ms"
        ])
    );
    assert_eq!(
        client
            .call(
                "bdev_malloc_create",
                Some(json!({"name":"m0","block_size":4096,"num_blocks":8}))
            )
            .unwrap(),
        json!("m0")
    );
    // Application errors carry their code; the connection stays usable.
    let err = client
        .call(
            "bdev_malloc_create",
            Some(json!({"name":"exists","block_size":512,"num_blocks":8})),
        )
        .unwrap_err();
    match err {
        ClientError::Rpc(e) => assert_eq!((e.code, e.message.as_str()), (-17, "File exists")),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        client
            .call("test_add", Some(json!({"a":-1,"b":1})))
            .unwrap(),
        json!(0)
    );
}

#[test]
fn ids_are_echoed_over_the_wire() {
    let sock = TempSock::new("ids");
    let _server = start(&sock);
    let mut raw = Raw::connect(&sock);
    for id in [json!(1), json!("abc"), json!(null), json!(-7), json!(1.5)] {
        let req = json!({"jsonrpc":"2.0","method":"test_echo","params":[1],"id":id});
        raw.send(req.to_string().as_bytes());
        let resp = raw.line();
        assert_eq!(resp["id"], id);
        assert_eq!(resp["result"], json!([1]));
    }
}

#[test]
fn malformed_json_gets_parse_error_then_close() {
    let sock = TempSock::new("parse");
    let _server = start(&sock);
    let mut raw = Raw::connect(&sock);
    raw.send(br#"{"jsonrpc":"2.0","method":"test_echo","id":1}{"jsonrpc": nope}"#);
    assert_eq!(raw.line()["id"], json!(1));
    let err = raw.line();
    assert_eq!(err["error"]["code"], json!(-32700));
    assert_eq!(err["id"], json!(null));
    raw.assert_closed();
    // Other clients are unaffected.
    let mut client = RpcClient::connect(&sock.0).unwrap();
    assert_eq!(
        client.call("test_add", Some(json!({"a":1,"b":1}))).unwrap(),
        json!(2)
    );
}

#[test]
fn invalid_requests_keep_the_connection() {
    let sock = TempSock::new("invalid");
    let _server = start(&sock);
    let mut raw = Raw::connect(&sock);
    raw.send(br#"42 {"jsonrpc":"1.0","method":"test_echo","id":3} {"jsonrpc":"2.0","method":"test_echo","params":"s","id":4}"#);
    let a = raw.line();
    assert_eq!(
        (a["id"].clone(), a["error"]["code"].clone()),
        (json!(null), json!(-32600))
    );
    let b = raw.line();
    assert_eq!(
        (b["id"].clone(), b["error"]["code"].clone()),
        (json!(3), json!(-32600))
    );
    let c = raw.line();
    assert_eq!(
        (c["id"].clone(), c["error"]["code"].clone()),
        (json!(4), json!(-32600))
    );
    raw.send(b"{\"jsonrpc\":\"2.0\",\"method\":\"test_echo\",\"id\":5}\n");
    assert_eq!(raw.line()["id"], json!(5));
}

#[test]
fn unknown_method_is_32601() {
    let sock = TempSock::new("nomethod");
    let _server = start(&sock);
    let mut client = RpcClient::connect(&sock.0).unwrap();
    match client.call("bdev_nope_create", None).unwrap_err() {
        ClientError::Rpc(e) => {
            assert_eq!(e.code, -32601);
            assert!(e.message.contains("bdev_nope_create"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(client.call("test_echo", None).unwrap(), Value::Null);
}

#[test]
fn invalid_params_name_the_field() {
    let sock = TempSock::new("params");
    let _server = start(&sock);
    let mut client = RpcClient::connect(&sock.0).unwrap();
    let e = client
        .call(
            "bdev_malloc_create",
            Some(json!({"block_size":512,"num_blocks":1})),
        )
        .unwrap_err();
    assert_eq!(e.rpc_code(), Some(-32602));
    let ClientError::Rpc(e) = e else { panic!() };
    assert_eq!(e.message, "invalid params: missing field `name`");

    let e = client
        .call(
            "bdev_malloc_create",
            Some(json!({"name":"m","block_size":1000,"num_blocks":1})),
        )
        .unwrap_err();
    let ClientError::Rpc(e) = e else { panic!() };
    assert_eq!(e.code, -32602);
    assert!(
        e.message
            .starts_with("invalid params: field `block_size`: "),
        "{}",
        e.message
    );
    let e = client
        .call("test_add", Some(json!({"a":1,"b":"two"})))
        .unwrap_err();
    let ClientError::Rpc(e) = e else { panic!() };
    assert!(e.message.contains("field `b`"), "{}", e.message);
}

#[test]
fn batch_over_the_wire() {
    let sock = TempSock::new("batch");
    let notified = Arc::new(AtomicUsize::new(0));
    let _server =
        RpcServer::start(ServerConfig::new(&sock.0), registry(Arc::clone(&notified))).unwrap();
    let mut raw = Raw::connect(&sock);
    raw.send(
        json!([
            {"jsonrpc":"2.0","method":"test_add","params":{"a":1,"b":2},"id":"one"},
            {"jsonrpc":"2.0","method":"test_notify"},
            {"jsonrpc":"2.0","method":"nope","id":2},
            "garbage"
        ])
        .to_string()
        .as_bytes(),
    );
    let resp = raw.line();
    let arr = resp.as_array().unwrap();
    assert_eq!(arr.len(), 3);
    assert_eq!(arr[0], json!({"jsonrpc":"2.0","id":"one","result":3}));
    assert_eq!(arr[1]["error"]["code"], json!(-32601));
    assert_eq!(arr[2]["error"]["code"], json!(-32600));
    assert_eq!(notified.load(Ordering::SeqCst), 1);
    raw.send(b"[]");
    assert_eq!(raw.line()["error"]["code"], json!(-32600));
}

#[test]
fn notification_gets_no_response() {
    let sock = TempSock::new("notify");
    let notified = Arc::new(AtomicUsize::new(0));
    let _server =
        RpcServer::start(ServerConfig::new(&sock.0), registry(Arc::clone(&notified))).unwrap();
    let mut raw = Raw::connect(&sock);
    raw.send(br#"{"jsonrpc":"2.0","method":"test_notify"}"#);
    raw.send(br#"{"jsonrpc":"2.0","method":"no_such_method"}"#);
    raw.send(br#"{"jsonrpc":"2.0","method":"test_echo","params":[7],"id":8}"#);
    // The first (and only) line answers the request, not the notifications.
    let resp = raw.line();
    assert_eq!(resp["id"], json!(8));
    assert_eq!(notified.load(Ordering::SeqCst), 1);
    // Through the client too.
    let mut client = RpcClient::connect(&sock.0).unwrap();
    client.notify("test_notify", None).unwrap();
    assert_eq!(
        client.call("test_echo", Some(json!([1]))).unwrap(),
        json!([1])
    );
    assert_eq!(notified.load(Ordering::SeqCst), 2);
}

#[test]
fn concurrent_clients_with_garbage_and_a_stalled_client() {
    let sock = TempSock::new("concurrent");
    let server = start(&sock);

    // A client that holds a half-written request open for the whole test.
    let mut stalled = Raw::connect(&sock);
    stalled.send(br#"{"jsonrpc":"2.0","method":"test_ec"#);

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let garbage = {
        let path = sock.0.clone();
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut rounds = 0u32;
            let mut seed = 0x9e37_79b9_u32;
            while !stop.load(Ordering::Relaxed) || rounds < 5 {
                let Ok(mut s) = UnixStream::connect(&path) else {
                    continue;
                };
                s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                let mut junk = Vec::with_capacity(256);
                for _ in 0..256 {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    junk.push((seed & 0xff) as u8);
                }
                junk.extend_from_slice(b"}}]]\xff");
                let _ = s.write_all(b"{\"jsonrpc\":\"2.0\",");
                let _ = s.write_all(&junk);
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink);
                rounds += 1;
            }
            rounds
        })
    };

    let workers: Vec<_> = (0..8)
        .map(|t| {
            let path = sock.0.clone();
            std::thread::spawn(move || {
                let mut client = RpcClient::connect(&path).unwrap();
                for i in 0..100i64 {
                    let got = client
                        .call("test_add", Some(json!({"a": t * 1000, "b": i})))
                        .unwrap();
                    assert_eq!(got, json!(t * 1000 + i));
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let rounds = garbage.join().unwrap();
    assert!(rounds >= 5);

    // The stalled client is still connected and can even finish its request.
    stalled.send(br#"ho","id":1}"#);
    assert_eq!(stalled.line()["result"], Value::Null);

    // Shutdown closes it along with everything else.
    stalled.send(br#"{"jsonrpc":"2.0","met"#);
    let t0 = Instant::now();
    server.shutdown();
    assert!(t0.elapsed() < Duration::from_secs(5));
    stalled.assert_closed();
    assert!(!sock.0.exists());
}

#[test]
fn oversized_request_is_rejected() {
    let sock = TempSock::new("big");
    let server = start(&sock);
    let mut raw = Raw::connect(&sock);
    let writer = {
        let mut s = raw.stream.try_clone().unwrap();
        std::thread::spawn(move || {
            // A syntactically fine request whose string alone is over 16 MiB.
            let _ = s.write_all(br#"{"jsonrpc":"2.0","method":"test_echo","id":1,"params":[""#);
            let chunk = vec![b'a'; 1 << 20];
            for _ in 0..17 {
                if s.write_all(&chunk).is_err() {
                    return;
                }
            }
            let _ = s.write_all(br#""]}"#);
        })
    };
    let resp = raw.line();
    assert_eq!(resp["error"]["code"], json!(-32600));
    assert!(
        resp["error"]["message"]
            .as_str()
            .unwrap()
            .contains("16777216"),
        "{resp}"
    );
    raw.assert_closed();
    writer.join().unwrap();
    // A request just under a small cap still works on a server configured so.
    drop(server);
    let sock2 = TempSock::new("big2");
    let mut config = ServerConfig::new(&sock2.0);
    config.max_request_bytes = 200;
    let _server = start_with(config);
    let mut client = RpcClient::connect(&sock2.0).unwrap();
    assert_eq!(
        client
            .call("test_echo", Some(Value::from(vec!["x"; 10])))
            .unwrap(),
        Value::from(vec!["x"; 10])
    );
    let err = client
        .call("test_echo", Some(Value::from(vec!["x"; 100])))
        .unwrap_err();
    assert_eq!(err.rpc_code(), Some(-32600));
}

#[test]
fn connection_limit_rejects_excess_clients() {
    let sock = TempSock::new("limit");
    let mut config = ServerConfig::new(&sock.0);
    config.max_connections = 2;
    let server = start_with(config);
    let mut a = RpcClient::connect(&sock.0).unwrap();
    let mut b = RpcClient::connect(&sock.0).unwrap();
    a.call("test_echo", None).unwrap();
    b.call("test_echo", None).unwrap();
    assert_eq!(server.active_connections(), 2);

    let mut c = Raw::connect(&sock);
    let resp = c.line();
    assert_eq!(resp["error"]["code"], json!(-32603));
    assert!(resp["error"]["message"]
        .as_str()
        .unwrap()
        .contains("too many connections"));
    c.assert_closed();
    // Through the client, the rejection is an RPC error, not a hang.
    let mut d = RpcClient::connect(&sock.0).unwrap();
    assert_eq!(
        d.call("test_echo", None).unwrap_err().rpc_code(),
        Some(-32603)
    );

    // Existing clients are unaffected; freeing a slot admits a new one.
    a.call("test_echo", None).unwrap();
    drop(b);
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.active_connections() > 1 {
        assert!(Instant::now() < deadline, "slot never freed");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut e = RpcClient::connect(&sock.0).unwrap();
    e.call("test_echo", None).unwrap();
}

#[test]
fn refuses_a_live_socket_replaces_a_stale_one_and_keeps_other_files() {
    let sock = TempSock::new("stale");
    let server = start(&sock);
    match RpcServer::start(
        ServerConfig::new(&sock.0),
        registry(Arc::new(AtomicUsize::new(0))),
    ) {
        Err(ServerError::AlreadyRunning(p)) => assert_eq!(p, sock.0),
        other => panic!("{other:?}"),
    }
    // The failed attempt did not disturb the running server.
    RpcClient::connect(&sock.0)
        .unwrap()
        .call("test_echo", None)
        .unwrap();
    server.shutdown();

    // A stale socket file (nobody listening) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock.0).unwrap());
    assert!(sock.0.exists());
    let server = start(&sock);
    RpcClient::connect(&sock.0)
        .unwrap()
        .call("test_echo", None)
        .unwrap();
    server.shutdown();

    // A regular file is never removed.
    std::fs::write(&sock.0, b"precious").unwrap();
    match RpcServer::start(
        ServerConfig::new(&sock.0),
        registry(Arc::new(AtomicUsize::new(0))),
    ) {
        Err(ServerError::NotASocket(_)) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(std::fs::read(&sock.0).unwrap(), b"precious");

    // A path too long for sockaddr_un is a clean error.
    let long = std::env::temp_dir().join("x".repeat(200));
    assert!(matches!(
        RpcServer::bind(long, registry(Arc::new(AtomicUsize::new(0)))),
        Err(ServerError::InvalidPath(_))
    ));
}

#[test]
fn shutdown_from_a_handler_and_join() {
    let sock = TempSock::new("handle");
    let server = start(&sock);
    let handle = server.shutdown_handle();
    assert!(!handle.is_shutting_down());
    let weak = handle.clone();
    server
        .registry()
        .register("test_kill", move |_| {
            handle.shutdown();
            Ok(Value::Bool(true))
        })
        .unwrap();
    let mut client = RpcClient::connect(&sock.0).unwrap();
    // The reply may or may not make it out before the connection is closed.
    let _ = client.call("test_kill", None);
    let t0 = Instant::now();
    server.join();
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(!sock.0.exists());
    // The handle outlives the server harmlessly.
    assert!(weak.is_shutting_down());
    weak.shutdown();
}

#[test]
fn drop_closes_idle_connections() {
    let sock = TempSock::new("drop");
    let server = start(&sock);
    let mut raw = Raw::connect(&sock);
    raw.send(br#"{"jsonrpc":"2.0","method":"test_echo","id":1}"#);
    raw.line();
    drop(server);
    raw.assert_closed();
    assert!(!sock.0.exists());
}

#[test]
fn client_timeout_and_server_idle_timeout() {
    let sock = TempSock::new("timeout");
    let mut config = ServerConfig::new(&sock.0);
    config.idle_timeout = Some(Duration::from_millis(300));
    let _server = start_with(config);

    let mut client = RpcClient::connect(&sock.0).unwrap();
    client.set_timeout(Some(Duration::from_millis(100)));
    match client
        .call("test_sleep_ms", Some(json!([250])))
        .unwrap_err()
    {
        ClientError::Io(e) => assert_eq!(e.kind(), ErrorKind::TimedOut),
        other => panic!("{other:?}"),
    }
    // The stream is now out of step, so the client refuses to go on.
    assert!(matches!(
        client.call("test_echo", None),
        Err(ClientError::Protocol(_))
    ));

    // A connection that stays silent past the idle timeout is closed.
    let mut raw = Raw::connect(&sock);
    std::thread::sleep(Duration::from_millis(500));
    raw.assert_closed();
}

#[test]
fn half_closed_client_still_gets_its_answers() {
    // `printf '{...}' | socat - UNIX-CONNECT:...` style: write, shut down
    // the write half, then read everything.
    let sock = TempSock::new("halfclose");
    let _server = start(&sock);
    let mut s = UnixStream::connect(&sock.0).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(
        br#"{"jsonrpc":"2.0","method":"test_echo","params":[1],"id":1}
{"jsonrpc":"2.0","method":"test_echo","params":[2],"id":2}"#,
    )
    .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["result"], json!([2]));
}

#[test]
fn bad_configuration_and_paths_are_errors() {
    let sock = TempSock::new("cfg");
    let mut config = ServerConfig::new(&sock.0);
    config.max_connections = 0;
    assert!(matches!(
        RpcServer::start(config, registry(Arc::new(AtomicUsize::new(0)))),
        Err(ServerError::InvalidConfig(_))
    ));
    let missing_dir = std::env::temp_dir()
        .join(format!("mp-rpc-no-such-dir-{}", std::process::id()))
        .join("s.sock");
    match RpcServer::bind(missing_dir, registry(Arc::new(AtomicUsize::new(0)))) {
        Err(e @ ServerError::Io { .. }) => assert!(e.to_string().contains("bind"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert!(!sock.0.exists());
}
