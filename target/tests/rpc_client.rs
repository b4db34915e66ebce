//! `RpcClient` against scripted fake servers: framing it must accept and
//! answers it must refuse.

use mirrorpoint_target::rpc::{ClientError, RpcClient};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

struct TempSock(PathBuf);

impl TempSock {
    fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("mp-rpcc-{}-{tag}-{n}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        TempSock(path)
    }
}

impl Drop for TempSock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A one-connection server: for each request line read, `script` returns the
/// bytes to send back (given the request's id).
fn fake_server(
    sock: &TempSock,
    script: impl Fn(usize, &Value) -> Vec<u8> + Send + 'static,
) -> JoinHandle<Vec<Value>> {
    let listener = UnixListener::bind(&sock.0).unwrap();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut seen = Vec::new();
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 0 {
            let req: Value = serde_json::from_str(&line).unwrap();
            let out = script(seen.len(), &req["id"]);
            seen.push(req);
            line.clear();
            if (&stream).write_all(&out).is_err() {
                break;
            }
        }
        seen
    })
}

#[test]
fn ids_increment_and_responses_without_newlines_are_fine() {
    let sock = TempSock::new("ids");
    let server = fake_server(&sock, |n, id| {
        // No newline after the response, and a split write: both allowed.
        let resp = json!({"jsonrpc":"2.0","id":id,"result":n}).to_string();
        resp.into_bytes()
    });
    let mut client = RpcClient::connect(&sock.0).unwrap();
    for n in 0..3 {
        assert_eq!(client.call("x_y", None).unwrap(), json!(n));
    }
    client.notify("x_z", Some(json!({"a":1}))).unwrap();
    drop(client);
    let seen = server.join().unwrap();
    let ids: Vec<_> = seen.iter().map(|r| r.get("id").cloned()).collect();
    assert_eq!(
        ids,
        vec![Some(json!(1)), Some(json!(2)), Some(json!(3)), None]
    );
    assert_eq!(seen[0], json!({"jsonrpc":"2.0","method":"x_y","id":1}));
    assert_eq!(
        seen[3],
        json!({"jsonrpc":"2.0","method":"x_z","params":{"a":1}})
    );
}

#[test]
fn rpc_errors_keep_the_client_usable() {
    let sock = TempSock::new("rpcerr");
    let server = fake_server(&sock, |n, id| {
        let v = if n == 0 {
            json!({"jsonrpc":"2.0","id":id,"error":{"code":-19,"message":"No such device","data":{"x":1}}})
        } else {
            json!({"jsonrpc":"2.0","id":id,"result":"ok"})
        };
        format!("{v}\n").into_bytes()
    });
    let mut client = RpcClient::connect(&sock.0).unwrap();
    match client.call("bdev_get", None).unwrap_err() {
        ClientError::Rpc(e) => {
            assert_eq!((e.code, e.message.as_str()), (-19, "No such device"));
            assert_eq!(e.data, Some(json!({"x":1})));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(client.call("bdev_get", None).unwrap(), json!("ok"));
    drop(client);
    server.join().unwrap();
}

fn expect_protocol_error(tag: &str, reply: &'static str) {
    let sock = TempSock::new(tag);
    let server = fake_server(&sock, move |_, _| reply.as_bytes().to_vec());
    let mut client = RpcClient::connect(&sock.0).unwrap();
    client.set_timeout(Some(Duration::from_secs(5)));
    match client.call("a_b", None) {
        Err(ClientError::Protocol(_)) => {}
        other => panic!("{reply}: {other:?}"),
    }
    // Unusable afterwards.
    assert!(matches!(
        client.call("a_b", None),
        Err(ClientError::Protocol(_))
    ));
    drop(client);
    server.join().unwrap();
}

#[test]
fn bad_responses_are_protocol_errors() {
    expect_protocol_error("wrongid", r#"{"jsonrpc":"2.0","id":99,"result":1}"#);
    expect_protocol_error("notjson", "hello\n");
    expect_protocol_error("noresult", r#"{"jsonrpc":"2.0","id":1}"#);
    expect_protocol_error("version", r#"{"jsonrpc":"1.0","id":1,"result":1}"#);
    expect_protocol_error(
        "both",
        r#"{"jsonrpc":"2.0","id":1,"result":1,"error":{"code":1,"message":"m"}}"#,
    );
    expect_protocol_error("array", "[1,2]");
}

#[test]
fn server_closing_is_an_io_error() {
    let sock = TempSock::new("close");
    let listener = UnixListener::bind(&sock.0).unwrap();
    let server = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        // Half a response, then hang up.
        let _ = (&s).write_all(br#"{"jsonrpc":"2.0","#);
    });
    let mut client = RpcClient::connect(&sock.0).unwrap();
    match client.call("a_b", None) {
        Err(ClientError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof),
        other => panic!("{other:?}"),
    }
    server.join().unwrap();
}

#[test]
fn timeout_covers_the_whole_call() {
    let sock = TempSock::new("trickle");
    let listener = UnixListener::bind(&sock.0).unwrap();
    let server = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        // One byte every 20 ms: each read is quick, the whole call is not.
        for b in br#"{"jsonrpc":"2.0","id":1,"result":"slow"}"# {
            if (&s).write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let mut client = RpcClient::connect(&sock.0).unwrap();
    client.set_timeout(Some(Duration::from_millis(200)));
    let t0 = std::time::Instant::now();
    match client.call("a_b", None) {
        Err(ClientError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::TimedOut),
        other => panic!("{other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(2));
    drop(client);
    server.join().unwrap();
}

#[test]
fn connect_to_nothing_is_an_io_error() {
    let sock = TempSock::new("none");
    assert!(matches!(
        RpcClient::connect(&sock.0),
        Err(ClientError::Io(_))
    ));
    let _ = UnixStream::connect(&sock.0).unwrap_err();
}
