//! The mirror between two daemons on 127.0.0.x, end to end: a local site
//! (master agent) and a remote site whose two storage servers together hold
//! the leg. Writes go through the volume API; legs are compared byte for
//! byte from their backing files.

mod common;
#[path = "nvmf_host_common/mod.rs"]
mod nvmf_host_common;

use common::two_sites::{two_sites, TwoSites};
use common::volume::{flush, write_sync, xorshift};
use common::*;
use mirrorpoint_poller::{buffer_pool, spawn};
use mirrorpoint_target::mirror::wire::{
    Decoded, ErrorCode, Framer, HandshakeConfig, Initiator, Message, ProtocolVersion, RequestTag,
    SharedSecret, SiteName,
};
use mirrorpoint_target::units::ByteOffset;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const REGION: u64 = 64 * 1024;

struct Pair {
    _dir: TempDir,
    a: Site,
    b: Site,
    leg: LegMap,
    local: PathBuf,
    proxy: Option<Proxy>,
}

fn pair(tag: &str, with_proxy: bool, extra: Value) -> Pair {
    // No single storage server of the remote site has room for the leg.
    let TwoSites {
        dir,
        mut a,
        b,
        servers,
        proxy,
    } = two_sites(tag, &[40 * MIB, 40 * MIB], with_proxy);
    let local = a.uring("local", SIZE);
    let mut params =
        json!({"name": "m0", "volume": "local", "link_timeout_ms": 600, "resync_rate": 0});
    if let (Some(p), Some(e)) = (params.as_object_mut(), extra.as_object()) {
        p.extend(e.clone());
    }
    let created = a.call("mirror_create", params);
    let leg = LegMap::from_create(&created, &servers);
    assert!(
        leg.0.len() >= 2,
        "the leg should span both storage servers: {created:#}"
    );
    Pair {
        _dir: dir,
        a,
        b,
        leg,
        local,
        proxy,
    }
}

impl Pair {
    fn compare(&mut self) {
        // Quiesce: the volume API's flush reaches every live leg.
        // Late failures of writes sent before a fault may degrade the leg
        // once more after it was seen synced: wait until it is synced and clean.
        wait_for(Duration::from_secs(30), "a synced, clean leg", || {
            let s = self.a.status("m0");
            s["legs"][0]["state"] == "synced" && s["legs"][0]["dirty_regions"] == 0
        });
        flush(&self.a, "m0");
        eprintln!("status at compare: {:#}", self.a.status("m0"));
        let local = read_file(&self.local, SIZE);
        let remote = self.leg.read(SIZE);
        assert_same(&local, &remote, "local vs remote leg");
    }
}

/// Many tasks on both cores write overlapping blocks at once, while the
/// initial full sync is still copying: the legs must come out identical.
#[test]
fn concurrent_overlapping_writes_leave_identical_legs() {
    concurrent_writes("concurrent", json!({}));
}

/// The same with the async acknowledgement policy (bounded lag).
#[test]
fn async_policy_writes_leave_identical_legs() {
    concurrent_writes("async", json!({"ack": "async", "max_lag_ios": 8}));
}

fn concurrent_writes(tag: &str, extra: Value) {
    let mut p = pair(tag, false, extra);
    let st = p.a.daemon.as_ref().unwrap().state().clone();
    let vol = st.volumes.get("m0").unwrap();
    let t0 = Instant::now();
    let waits: Vec<_> = st
        .reactors
        .iter()
        .enumerate()
        .map(|(core, r)| {
            let vol = vol.clone();
            r.spawn(move || async move {
                let tasks: Vec<_> = (0..16u64)
                    .map(|t| {
                        let vol = vol.clone();
                        spawn(async move {
                            let ch = vol.channel();
                            let mut x = 0x1234_5678 ^ (core as u64 * 97 + t + 1);
                            for i in 0..120u64 {
                                let r = xorshift(&mut x);
                                let blocks = 1 + (r % 16);
                                let off = if r % 4 == 0 {
                                    (r >> 8) % (SIZE / 4096 - blocks) * 4096
                                } else {
                                    (r >> 8) % (256 - blocks) * 4096 // hot 1 MiB
                                };
                                let mut b = buffer_pool()
                                    .alloc((blocks * 4096) as usize)
                                    .expect("buffer");
                                let stamp = (core as u64) << 56 | t << 48 | i;
                                for (k, c) in b.chunks_mut(8).enumerate() {
                                    c.copy_from_slice(&(stamp ^ k as u64).to_le_bytes());
                                }
                                ch.write(ByteOffset(off), b.freeze())
                                    .await
                                    .0
                                    .expect("write");
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await;
                }
            })
        })
        .collect();
    for w in waits {
        w.recv_blocking().expect("writers");
    }
    let elapsed = t0.elapsed();
    p.a.wait_leg("m0", "synced", Duration::from_secs(60));
    let s = p.a.status("m0");
    assert!(
        s["overlap_waits"].as_u64().unwrap() > 0,
        "no write ever overlapped: {s:#}"
    );
    eprintln!("3840 writes on 2 cores x 16 tasks in {elapsed:?}; status {s:#}");
    p.compare();
}

/// Cut the link: writes keep completing, the leg goes Degraded and the
/// bitmap records exactly the regions written; reconnect resyncs exactly
/// those regions.
#[test]
fn cut_link_degrades_and_resyncs_only_dirty_regions() {
    let mut p = pair("cut", true, json!({}));
    p.a.wait_leg("m0", "synced", Duration::from_secs(60));
    write_sync(&p.a, 0, "m0", 0, 64 * 1024, 1);
    let copied0 = p.a.status("m0")["legs"][0]["resync_copied_bytes"]
        .as_u64()
        .unwrap();
    let proxy = p.proxy.as_ref().unwrap();
    proxy.set(CUT);
    // Writes keep completing; 11 distinct regions get written.
    let t = Instant::now();
    write_sync(&p.a, 1, "m0", 3 * MIB, 8192, 2);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "a write waited {:?} on a cut link",
        t.elapsed()
    );
    p.a.wait_leg("m0", "degraded", Duration::from_secs(5));
    for k in 0..10u64 {
        write_sync(
            &p.a,
            (k % 2) as usize,
            "m0",
            (10 + k) * MIB + 4096,
            8192,
            3 + k as u8,
        );
    }
    let s = p.a.status("m0");
    assert_eq!(s["legs"][0]["dirty_regions"], 11, "{s:#}");
    assert_eq!(s["legs"][0]["dirty_bytes"], 11 * REGION, "{s:#}");
    // Resync is rate-limited: 704 KiB at 1 MiB/s takes most of a second.
    p.a.call(
        "mirror_set_resync_rate",
        json!({"name": "m0", "bytes_per_second": MIB}),
    );
    let t = Instant::now();
    p.proxy.as_ref().unwrap().set(PASS);
    p.a.wait_leg("m0", "synced", Duration::from_secs(30));
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(500),
        "resync ignored its rate limit ({took:?})"
    );
    let s = p.a.status("m0");
    assert!(
        s["legs"][0]["resync_rate_bps"].as_u64().unwrap() <= 2 * MIB,
        "{s:#}"
    );
    let copied = s["legs"][0]["resync_copied_bytes"].as_u64().unwrap() - copied0;
    assert_eq!(
        copied,
        11 * REGION,
        "resync must copy only the dirty regions: {s:#}"
    );
    assert_eq!(s["legs"][0]["dirty_regions"], 0);
    p.compare();
}

/// A verifying workload while the link is stalled, then corrupted: no write
/// fails, no acknowledged write is lost, and the legs end up identical.
#[test]
fn stall_and_corruption_during_a_verifying_workload() {
    let mut p = pair("stall", true, json!({}));
    p.a.wait_leg("m0", "synced", Duration::from_secs(60));
    let st = p.a.daemon.as_ref().unwrap().state().clone();
    let vol = st.volumes.get("m0").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    // Each task owns 8 slots of 64 KiB; the model is the last acked version.
    const TASKS: u64 = 8;
    let waits: Vec<_> = st
        .reactors
        .iter()
        .enumerate()
        .map(|(core, r)| {
            let (vol, stop, acked) = (vol.clone(), stop.clone(), acked.clone());
            r.spawn(move || async move {
                let tasks: Vec<_> = (0..TASKS)
                    .map(|t| {
                        let (vol, stop, acked) = (vol.clone(), stop.clone(), acked.clone());
                        spawn(async move {
                            let ch = vol.channel();
                            let owner = core as u64 * TASKS + t;
                            let mut model = vec![0u64; 8];
                            let mut v = 0u64;
                            let mut x = owner + 77;
                            while !stop.load(Ordering::Relaxed) {
                                v += 1;
                                let slot = (xorshift(&mut x) % 8) as usize;
                                let off = (owner * 8 + slot as u64) * REGION * 2 + 8 * MIB;
                                let mut b = buffer_pool().alloc(REGION as usize).expect("buffer");
                                b.fill(0);
                                b[..8].copy_from_slice(&(owner << 32 | v).to_le_bytes());
                                ch.write(ByteOffset(off), b.freeze())
                                    .await
                                    .0
                                    .expect("host write failed");
                                model[slot] = owner << 32 | v;
                                acked.fetch_add(1, Ordering::Relaxed);
                                mirrorpoint_poller::sleep(Duration::from_millis(2)).await;
                            }
                            (owner, model)
                        })
                    })
                    .collect();
                let mut out = Vec::new();
                for t in tasks {
                    out.push(t.await);
                }
                out
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let proxy = p.proxy.as_ref().unwrap();
    proxy.set(STALL);
    let before = acked.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(p.a.leg_state("m0"), "degraded");
    assert!(
        acked.load(Ordering::Relaxed) > before + 20,
        "writes stopped while the link stalled"
    );
    proxy.set(CUT);
    proxy.set(PASS);
    p.a.wait_leg("m0", "synced", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(200));
    p.proxy.as_ref().unwrap().set(CORRUPT);
    std::thread::sleep(Duration::from_millis(300));
    p.a.wait_leg("m0", "synced", Duration::from_secs(30));
    // A corrupt answer from the leg: the primary drops the link too.
    let before = p.a.status("m0")["legs"][0]["degradations"]
        .as_u64()
        .unwrap();
    p.proxy.as_ref().unwrap().set(CORRUPT_BACK);
    wait_for(
        Duration::from_secs(10),
        "a degradation on a corrupt answer",
        || {
            p.a.status("m0")["legs"][0]["degradations"]
                .as_u64()
                .unwrap()
                > before
        },
    );
    p.a.wait_leg("m0", "synced", Duration::from_secs(30));
    stop.store(true, Ordering::Relaxed);
    let mut models = Vec::new();
    for w in waits {
        models.extend(w.recv_blocking().expect("writers"));
    }
    let s = p.a.status("m0");
    assert!(s["legs"][0]["degradations"].as_u64().unwrap() >= 3, "{s:#}");
    p.compare();
    let local = read_file(&p.local, SIZE);
    for (owner, model) in models {
        for (slot, want) in model.iter().enumerate() {
            if *want == 0 {
                continue;
            }
            let off = ((owner * 8 + slot as u64) * REGION * 2 + 8 * MIB) as usize;
            let got = u64::from_le_bytes(local[off..off + 8].try_into().unwrap());
            assert_eq!(
                got, *want,
                "acknowledged write lost (owner {owner}, slot {slot})"
            );
        }
    }
    eprintln!(
        "{} acknowledged writes verified; status {s:#}",
        acked.load(Ordering::Relaxed)
    );
}

fn read_msg(s: &mut std::net::TcpStream, framer: &Framer) -> Option<Message<'static>> {
    let mut buf = vec![0u8; 32];
    s.read_exact(&mut buf).ok()?;
    loop {
        match framer.poll(&buf).ok()? {
            Decoded::Complete { .. } => break,
            Decoded::NeedMore(n) => {
                let at = buf.len();
                buf.resize(at + n, 0);
                s.read_exact(&mut buf[at..]).ok()?;
            }
        }
    }
    match framer.decode_message(&buf).ok()? {
        Decoded::Complete {
            value: (_, Message::Error(e)),
            ..
        } => Some(Message::Error(e)),
        Decoded::Complete {
            value: (_, Message::Hello(h)),
            ..
        } => Some(Message::Hello(h)),
        Decoded::Complete {
            value: (_, Message::HelloAck(h)),
            ..
        } => Some(Message::HelloAck(h)),
        _ => None,
    }
}

fn error_code_after_hello(
    addr: std::net::SocketAddr,
    secret: &[u8],
    version: ProtocolVersion,
) -> Option<ErrorCode> {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let cfg = HandshakeConfig::new(
        SharedSecret::new(secret).unwrap(),
        SiteName::new("mallory").unwrap(),
    );
    let (mut init, hello) = Initiator::start(cfg).unwrap();
    let framer = Framer::default().with_version(version);
    s.write_all(&hello.encode_to_vec(&framer, RequestTag(0)).unwrap())
        .unwrap();
    let reader = Framer::default();
    for _ in 0..4 {
        match read_msg(&mut s, &reader)? {
            Message::Error(e) => return Some(e.code),
            m => {
                if let Ok(step) = init.handle(&m) {
                    for x in step.send {
                        let _ = s.write_all(&x.encode_to_vec(&reader, RequestTag(0)).unwrap());
                    }
                }
            }
        }
    }
    None
}

/// Peers with the wrong secret, another protocol version or garbage are
/// refused; the daemon keeps serving the mirror.
#[test]
fn bad_peers_are_refused_and_the_daemon_keeps_serving() {
    let mut p = pair("badpeer", false, json!({}));
    p.a.wait_leg("m0", "synced", Duration::from_secs(60));
    let addr = p.b.addr;
    assert_eq!(
        error_code_after_hello(
            addr,
            b"a wrong secret of enough length",
            ProtocolVersion::CURRENT
        ),
        Some(ErrorCode::AuthFailed)
    );
    assert_eq!(
        error_code_after_hello(addr, SECRET.as_bytes(), ProtocolVersion::new(2, 0)),
        Some(ErrorCode::VersionMismatch)
    );
    let mut g = std::net::TcpStream::connect(addr).unwrap();
    g.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    g.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut sink = Vec::new();
    let _ = g.read_to_end(&mut sink); // closed by the daemon
                                      // Both daemons still serve: admin socket, mirror I/O, identical legs.
    p.b.call("agent_get_sites", json!({}));
    write_sync(&p.a, 0, "m0", 5 * MIB, 65536, 0xee);
    assert_eq!(p.a.leg_state("m0"), "synced");
    p.compare();
}

/// A primary whose metadata was lost (a new data generation) must not be
/// mixed with the leg's data: the leg is refused as Failed with a clear reason.
#[test]
fn unrelated_generation_is_refused() {
    let mut p = pair("unrelated", false, json!({}));
    p.a.wait_leg("m0", "synced", Duration::from_secs(60));
    write_sync(&p.a, 0, "m0", 0, 65536, 9);
    let adir = p.a.dir.clone();
    let cfg = p.a.call("save_config", json!({}));
    p.a.daemon.take().unwrap().shutdown();
    std::fs::remove_file(adir.join("data").join("mirror-m0.meta")).unwrap();
    let cfgfile = adir.join("saved.json");
    std::fs::write(&cfgfile, cfg.to_string()).unwrap();
    let mut opts = options(&adir);
    opts.config_file = Some(cfgfile);
    let d = mirrorpoint_target::daemon::Daemon::start(opts).expect("restart");
    p.a.rpc = mirrorpoint_target::rpc::RpcClient::connect(adir.join("rpc.sock")).unwrap();
    p.a.daemon = Some(d);
    p.a.wait_leg("m0", "failed", Duration::from_secs(20));
    let s = p.a.status("m0");
    let why = s["legs"][0]["last_error"].as_str().unwrap();
    assert!(why.contains("unrelated data"), "{why}");
    // Host I/O still works on the local leg.
    write_sync(&p.a, 1, "m0", MIB, 4096, 1);
    // The operator decides the local data wins: full resync, then synced.
    let bad = p.a.rpc.call(
        "mirror_resolve",
        Some(json!({"name": "m0", "action": "merge"})),
    );
    assert!(bad.is_err());
    p.a.call(
        "mirror_resolve",
        json!({"name": "m0", "action": "overwrite_leg"}),
    );
    p.a.wait_leg("m0", "synced", Duration::from_secs(60));
    let s = p.a.status("m0");
    assert!(
        s["legs"][0]["resync_copied_bytes"].as_u64().unwrap() >= SIZE,
        "{s:#}"
    );
    p.compare();
}

/// A clean restart from save_config brings the mirror back over the same
/// remote allocation and generation, with nothing to resync.
#[test]
fn clean_restart_from_saved_config_needs_no_resync() {
    let mut p = pair("restart", false, json!({"region_size": 131072}));
    p.a.wait_leg("m0", "synced", Duration::from_secs(60));
    write_sync(&p.a, 0, "m0", 0, 65536, 7);
    let adir = p.a.dir.clone();
    let cfg = p.a.call("save_config", json!({}));
    let mirror_sub = cfg["subsystems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["subsystem"] == "mirror")
        .unwrap();
    let methods: Vec<&str> = mirror_sub["config"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["method"].as_str().unwrap())
        .collect();
    assert_eq!(
        methods,
        ["agent_set_site", "agent_add_peer", "mirror_create"]
    );
    p.a.daemon.take().unwrap().shutdown();
    let cfgfile = adir.join("saved.json");
    std::fs::write(&cfgfile, cfg.to_string()).unwrap();
    let mut opts = options(&adir);
    opts.config_file = Some(cfgfile);
    p.a.daemon = Some(mirrorpoint_target::daemon::Daemon::start(opts).expect("restart"));
    p.a.rpc = mirrorpoint_target::rpc::RpcClient::connect(adir.join("rpc.sock")).unwrap();
    p.a.wait_leg("m0", "synced", Duration::from_secs(20));
    assert_eq!(p.a.status("m0")["legs"][0]["resync_copied_bytes"], 0);
    // The remote agent kept its allocation too.
    let sites = p.b.call("agent_get_sites", json!({}));
    assert_eq!(sites["hosted_legs"].as_array().unwrap().len(), 1);
    write_sync(&p.a, 1, "m0", 2 * MIB, 65536, 8);
    p.compare();
}

/// Three sites: the master agent (no storage of its own) picks the domain
/// for a mirror asked for by another site, relays the allocation, and a
/// mirror_delete releases it.
#[test]
fn master_agent_allocates_for_another_site() {
    let dir = TempDir::new("agents");
    let mut hq = Site::start(&dir.0.join("hq"), "hq", 3, "127.0.0.5", true);
    let mut east = Site::start(&dir.0.join("east"), "east", 1, "127.0.0.2", false);
    let mut west = Site::start(&dir.0.join("west"), "west", 2, "127.0.0.3", false);
    let s1 = west.uring("s1", 24 * MIB);
    let s2 = west.uring("s2", 24 * MIB);
    west.call(
        "agent_add_storage_server",
        json!({"name": "ss1", "id": 1, "volumes": ["s1"]}),
    );
    west.call(
        "agent_add_storage_server",
        json!({"name": "ss2", "id": 2, "volumes": ["s2"]}),
    );
    let (ha, ea, wa) = (
        hq.addr.to_string(),
        east.addr.to_string(),
        west.addr.to_string(),
    );
    hq.call(
        "agent_add_peer",
        json!({"name": "east", "domain": 1, "address": ea}),
    );
    hq.call(
        "agent_add_peer",
        json!({"name": "west", "domain": 2, "address": wa}),
    );
    east.call(
        "agent_add_peer",
        json!({"name": "hq", "domain": 3, "address": ha, "master": true}),
    );
    east.call(
        "agent_add_peer",
        json!({"name": "west", "domain": 2, "address": wa}),
    );
    west.call(
        "agent_add_peer",
        json!({"name": "hq", "domain": 3, "address": ha, "master": true}),
    );
    wait_for(
        Duration::from_secs(10),
        "both capacity reports at the master",
        || {
            let s = hq.call("agent_get_sites", json!({}));
            s["peers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|p| !p["last_report_ms"].is_null())
        },
    );
    let sites = hq.call("agent_get_sites", json!({}));
    assert_eq!(sites["peers"][1]["free_bytes"], 48 * MIB, "{sites:#}");
    let local = east.uring("local", 32 * MIB);
    // Asking for a domain without room fails cleanly.
    let e = east.rpc.call(
        "mirror_create",
        Some(json!({"name": "m9", "volume": "local", "domain": 1})),
    );
    assert!(format!("{e:?}").contains("allocate"), "{e:?}");
    let created = east.call(
        "mirror_create",
        json!({"name": "m0", "volume": "local", "resync_rate": 0}),
    );
    assert_eq!(created["legs"][0]["site"], "west");
    let leg = LegMap::from_create(&created, &[s1, s2]);
    assert!(leg.0.len() >= 2, "no server alone has 32 MiB: {created:#}");
    east.wait_leg("m0", "synced", Duration::from_secs(60));
    write_sync(&east, 0, "m0", 30 * MIB, 65536, 0x42);
    flush(&east, "m0");
    assert_same(
        &read_file(&local, 32 * MIB),
        &leg.read(32 * MIB),
        "east vs west",
    );
    let hosted = west.call("agent_get_sites", json!({}))["hosted_legs"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(hosted, 1);
    east.call("mirror_delete", json!({"name": "m0"}));
    wait_for(Duration::from_secs(5), "the release", || {
        west.call("agent_get_sites", json!({}))["hosted_legs"]
            .as_array()
            .unwrap()
            .is_empty()
    });
}

/// A host writes through the NVMe/TCP front end (our initiator, QD 32 on
/// a queue, 4 KiB to 128 KiB writes, read back and verified) to the
/// exported mirrored volume while the initial sync is still running: the
/// front end does not know it is a mirror, and the legs come out identical.
#[test]
fn writes_through_nvme_tcp_reach_both_legs() {
    let mut p = pair("nvmf", false, json!({}));
    let nqn = "nqn.2026-11.io.mirrorpoint:m0";
    p.a.call(
        "nvmf_create_subsystem",
        json!({"nqn": nqn, "allow_any_host": true}),
    );
    p.a.call(
        "nvmf_subsystem_add_ns",
        json!({"nqn": nqn, "namespace": {"bdev_name": "m0"}}),
    );
    let la = p.a.call(
        "nvmf_subsystem_add_listener",
        json!({"nqn": nqn, "listen_address": {"trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.2", "trsvcid": "0"}}),
    );
    let port: u16 = la["trsvcid"].as_str().unwrap().parse().unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.2:{port}").parse().unwrap();
    let report = nvmf_host_common::session(
        addr,
        nqn,
        mirrorpoint_target::nvmf::host::ConnectOptions::default(),
        77,
        200, // the helper holds every write's chunk at once: stay under the pool
    );
    assert!(report.bytes > 5 * MIB, "{report:?}");
    p.compare();
}

/// A mirror's local volume and a storage server's volumes are claimed: they
/// cannot be deleted or mirrored twice while in use, and bdev_get_bdevs says
/// by whom; mirror_delete gives the local volume back.
#[test]
fn claimed_volumes_cannot_be_deleted_or_reused() {
    let mut p = pair("claims", false, json!({}));
    let busy = |site: &mut Site, method: &str, params: Value| {
        let e = site
            .rpc
            .call(method, Some(params.clone()))
            .expect_err("refused");
        assert!(
            e.to_string().contains("claimed by"),
            "{method} {params}: {e}"
        );
    };
    busy(&mut p.a, "bdev_delete", json!({"name": "local"}));
    busy(
        &mut p.a,
        "mirror_create",
        json!({"name": "m1", "volume": "local"}),
    );
    busy(&mut p.b, "bdev_delete", json!({"name": "s1"}));
    p.b.uring("s3", 8 * MIB);
    busy(
        &mut p.b,
        "agent_add_storage_server",
        json!({"name": "ss3", "id": 3, "volumes": ["s3", "s2"]}),
    );
    // The refused server claimed nothing: s3 is still free.
    let infos = p.b.call("bdev_get_bdevs", json!({"name": "s3"}));
    assert_eq!(infos[0]["claimed"], false, "{infos:#}");
    let infos = p.a.call("bdev_get_bdevs", json!({"name": "local"}));
    assert_eq!(infos[0]["claimed"], true, "{infos:#}");
    assert_eq!(infos[0]["claimed_by"], "mirror m0", "{infos:#}");
    p.a.call("mirror_delete", json!({"name": "m0"}));
    p.a.call("bdev_delete", json!({"name": "local"}));
    p.b.call("bdev_delete", json!({"name": "s3"}));
}
