//! The daemon as an admin sees it: start, create volumes over the socket,
//! I/O through the volume API, malformed requests, save_config and a restart
//! from the saved file; and the real `mirrorpoint` binary with its CLI and
//! signal handling.

use mirrorpoint_poller::{buffer_pool, PoolConfig};
use mirrorpoint_target::daemon::{Daemon, DaemonOptions};
use mirrorpoint_target::rpc::{ClientError, RpcClient, RpcError};
use mirrorpoint_target::units::ByteOffset;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "common/tempdir.rs"]
mod tempdir;
use tempdir::TempDir;

fn options(dir: &Path) -> DaemonOptions {
    DaemonOptions {
        cores: vec![0, 1],
        rpc_socket: dir.join("rpc.sock"),
        config_file: None,
        data_dir: dir.join("data"),
        pool: PoolConfig {
            chunk_size: 128 * 1024,
            chunk_count: 32,
            huge_pages: false,
        },
        pin: false,
        iscsi_listen: "127.0.0.1:0".into(),
        // Parallel tests must not contend for the NVMe/TCP default port.
        nvmf_default_listen: None,
        ..DaemonOptions::default()
    }
}

fn rpc_err(r: Result<Value, ClientError>) -> RpcError {
    match r {
        Err(ClientError::Rpc(e)) => e,
        other => panic!("expected an RPC error, got {other:?}"),
    }
}

#[test]
fn admin_socket_volumes_io_and_config_round_trip() {
    let dir = TempDir::new("roundtrip");
    let daemon = Daemon::start(options(&dir.0)).expect("daemon starts");
    let sock = dir.0.join("rpc.sock");
    let mode = std::fs::metadata(&sock)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let mut c = RpcClient::connect(&sock).expect("connect");
    // The built-in default volume.
    let bdevs = c.call("bdev_get_bdevs", None).expect("bdevs");
    assert_eq!(bdevs[0]["name"], "vol0");
    assert_eq!(bdevs[0]["product_name"], "Uring disk");

    // Good creates.
    let img = dir.0.join("u1.img");
    let name = c
        .call(
            "bdev_uring_create",
            Some(json!({"name": "u1", "filename": img, "block_size": 4096, "size": 8 << 20})),
        )
        .expect("uring create");
    assert_eq!(name, "u1");
    let name = c
        .call(
            "bdev_malloc_create",
            Some(json!({"num_blocks": 1024, "block_size": 512})),
        )
        .expect("malloc create");
    assert_eq!(name, "Malloc0");

    // Bad params name the field; duplicates and unknown volumes get errnos.
    let e = rpc_err(c.call("bdev_malloc_create", Some(json!({"block_size": 512}))));
    assert_eq!(e.code, -32602);
    assert!(e.message.contains("num_blocks"), "{}", e.message);
    let e = rpc_err(c.call(
        "bdev_uring_create",
        Some(json!({"name": "u2", "filename": img, "queue_depth": "deep"})),
    ));
    assert_eq!(e.code, -32602);
    assert!(e.message.contains("queue_depth"), "{}", e.message);
    let e = rpc_err(c.call(
        "bdev_uring_create",
        Some(json!({"name": "u1", "filename": img})),
    ));
    assert_eq!(e.code, -libc::EEXIST);
    let e = rpc_err(c.call("bdev_delete", Some(json!({"name": "ghost"}))));
    assert_eq!(e.code, -libc::ENODEV);
    let e = rpc_err(c.call("bdev_get_bdevs", Some(json!({"name": "ghost"}))));
    assert_eq!(e.code, -libc::ENODEV);
    let e = rpc_err(c.call("no_such_method", None));
    assert_eq!(e.code, -32601);

    // Malformed JSON on another connection: -32700, and this one still works.
    let mut raw = UnixStream::connect(&sock).expect("raw connect");
    raw.write_all(b"{\"jsonrpc\": \"2.0\", \"method\": ")
        .expect("send");
    raw.write_all(b"}}}\n").expect("send");
    let mut line = String::new();
    BufReader::new(raw.try_clone().expect("clone"))
        .read_line(&mut line)
        .expect("answer");
    let v: Value = serde_json::from_str(&line).expect("json answer");
    assert_eq!(v["error"]["code"], -32700);
    let methods = c.call("rpc_get_methods", None).expect("still serving");
    for m in [
        "bdev_uring_create",
        "bdev_malloc_create",
        "bdev_delete",
        "bdev_get_bdevs",
        "framework_get_reactors",
        "save_config",
        "mirrorpoint_get_version",
    ] {
        assert!(
            methods.as_array().expect("list").iter().any(|x| x == m),
            "{m}"
        );
    }
    let version = c.call("mirrorpoint_get_version", None).expect("version");
    assert!(version["version"]
        .as_str()
        .expect("string")
        .starts_with("mirrorpoint v"));

    // Write a pattern into u1 through the volume API on reactor 1.
    let u1 = daemon.state().volumes.get("u1").expect("u1");
    let pattern: Vec<u8> = (0..65536u32).map(|i| (i % 253) as u8).collect();
    let expected = pattern.clone();
    daemon.state().reactors[1]
        .block_on(move || async move {
            let ch = u1.channel();
            let mut b = buffer_pool().alloc(pattern.len()).expect("chunk");
            b.copy_from_slice(&pattern);
            ch.write(ByteOffset(1 << 20), b.freeze())
                .await
                .0
                .expect("write");
            ch.flush().await.expect("flush");
        })
        .expect("io");

    // Counters are published about once a millisecond (and before a reactor
    // blocks), so they become visible shortly after the I/O.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let reactors = c.call("framework_get_reactors", None).expect("reactors");
        let r = reactors["reactors"].as_array().expect("array");
        assert_eq!(r.len(), 2);
        if r[1]["ios_completed"].as_u64().expect("count") >= 2 {
            assert!(r[1]["busy_ns"].as_u64().expect("busy") > 0, "{reactors}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "counters never showed the I/O: {reactors}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    // Save the config to a file and restart from it.
    let saved = dir.0.join("saved.json");
    let cfg = c
        .call("save_config", Some(json!({"filename": saved})))
        .expect("save_config");
    let mode = std::fs::metadata(&saved)
        .expect("saved")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "a saved config may hold secrets");
    let uuids: Vec<Value> = c
        .call("bdev_get_bdevs", None)
        .expect("bdevs")
        .as_array()
        .expect("array")
        .iter()
        .map(|b| b["uuid"].clone())
        .collect();
    assert_eq!(
        cfg["subsystems"][0]["config"]
            .as_array()
            .expect("calls")
            .len(),
        3
    );
    let iscsi = cfg["subsystems"]
        .as_array()
        .expect("subsystems")
        .iter()
        .find(|s| s["subsystem"] == "iscsi")
        .expect("iscsi subsystem");
    let iscsi_calls: Vec<String> = iscsi["config"]
        .as_array()
        .expect("iscsi calls")
        .iter()
        .map(|c| c["method"].as_str().unwrap_or("").to_string())
        .collect();
    for m in [
        "iscsi_create_portal_group",
        "iscsi_create_initiator_group",
        "iscsi_create_target_node",
    ] {
        assert!(iscsi_calls.iter().any(|c| c == m), "{m} in {iscsi_calls:?}");
    }
    drop(c);
    assert_eq!(daemon.shutdown(), 3, "every volume synced");
    assert!(!sock.exists(), "socket removed at shutdown");

    let mut opts = options(&dir.0);
    opts.config_file = Some(saved);
    let daemon = Daemon::start(opts).expect("restart from saved config");
    let mut c = RpcClient::connect(&sock).expect("connect");
    let after: Vec<Value> = c
        .call("bdev_get_bdevs", None)
        .expect("bdevs")
        .as_array()
        .expect("array")
        .iter()
        .map(|b| b["uuid"].clone())
        .collect();
    assert_eq!(after, uuids, "same volumes, same identities");
    let nodes = c.call("iscsi_get_target_nodes", None).expect("nodes");
    assert_eq!(
        nodes[0]["name"], "iqn.2026-11.io.mirrorpoint:vol0",
        "{nodes}"
    );
    let u1 = daemon.state().volumes.get("u1").expect("u1");
    let back = daemon.state().reactors[0]
        .block_on(move || async move {
            let ch = u1.channel();
            let b = buffer_pool().alloc(65536).expect("chunk");
            let (r, b) = ch.read(ByteOffset(1 << 20), b).await;
            r.expect("read");
            b.to_vec()
        })
        .expect("io");
    assert_eq!(back, expected, "data survived the restart");
    drop(c);
    daemon.shutdown();
}

#[test]
fn bad_config_files_are_refused_clearly() {
    let dir = TempDir::new("badcfg");
    let cases = [
        ("not json", "not valid"),
        (
            r#"{"subsystems": [{"subsystem": "bdev", "config": [{"method": "bdev_malloc_create", "params": {"num_blocks": 0, "block_size": 512}}]}]}"#,
            "entry 0",
        ),
        (
            r#"{"subsystems": [{"subsystem": "warp", "config": []}]}"#,
            "unknown subsystem",
        ),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let path = dir.0.join(format!("c{i}.json"));
        std::fs::write(&path, text).expect("write");
        let mut opts = options(&dir.0);
        opts.config_file = Some(path);
        let err = match Daemon::start(opts) {
            Ok(_) => panic!("config {i} accepted"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(needle), "case {i}: {err}");
    }
}

fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_binary_serves_answers_the_cli_and_stops_on_sigterm() {
    let dir = TempDir::new("binary");
    let sock = dir.0.join("rpc.sock");
    let bin = env!("CARGO_BIN_EXE_mirrorpoint");
    let mut child = Command::new(bin)
        .args(["serve", "--no-pin", "--cores", "0", "--buffers", "32"])
        .args(["--iscsi-listen", "127.0.0.1:0"])
        .arg("--rpc-socket")
        .arg(&sock)
        .arg("--data-dir")
        .arg(dir.0.join("data"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn serve");
    wait_for(&sock);
    let rpc = |args: &[&str]| {
        Command::new(bin)
            .arg("rpc")
            .arg("--socket")
            .arg(&sock)
            .args(args)
            .output()
            .expect("run rpc")
    };
    let out = rpc(&["bdev_get_bdevs"]);
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v[0]["name"], "vol0");
    let out = rpc(&[
        "bdev_malloc_create",
        r#"{"name": "m", "num_blocks": 64, "block_size": 512}"#,
    ]);
    assert!(out.status.success());
    // The default configuration exports vol0 over iSCSI.
    let out = rpc(&["iscsi_get_target_nodes"]);
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v[0]["name"], "iqn.2026-11.io.mirrorpoint:vol0");
    assert_eq!(v[0]["luns"][0]["bdev_name"], "vol0");
    let out = rpc(&["bdev_delete", r#"{"name": "vol0"}"#]);
    assert!(
        !out.status.success(),
        "an exported volume cannot be deleted"
    );
    let out = rpc(&["no_such_method"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("-32601"));
    let out = rpc(&["bdev_malloc_create", "{not json"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(std::fs::metadata(dir.0.join("data").join("vol0.img")).is_ok());

    // SAFETY: sends SIGTERM to our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "serve did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut stdout)
        .expect("read");
    assert!(stdout.contains("built-in default"), "{stdout}");
    assert!(stdout.contains("exported over iSCSI"), "{stdout}");
    assert!(
        stdout.contains("stopped cleanly, 2 volume(s) synced"),
        "{stdout}"
    );
    assert!(!sock.exists());
}
