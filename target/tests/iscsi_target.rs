//! The iSCSI target over real sockets on 127.0.0.1: a small blocking
//! initiator (the crate's own PDU codec, initiator role) logs in, moves
//! data with immediate data, unsolicited Data-Out and R2T, and then sends
//! what a broken or hostile initiator would: malformed PDUs, out-of-window
//! CmdSNs, oversized segments, bad digests, logins full of garbage keys.
//! Each test checks the answer (Reject, silence, dropped connection) and
//! that a second session on the same target keeps working with its
//! acknowledged data intact.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use mirrorpoint_poller::{PoolConfig, ReactorConfig, Runtime, RuntimeConfig};
use mirrorpoint_target::iscsi::pdu::{
    encode_pdu, frame, Bhs, Cid, CmdSn, DataOut, DataSn, FrameConfig, Framed, Isid, Itt,
    LoginRequest, Lun, NopOut, Opcode, Role, ScsiCommand, Stage, StatSn, TaskAttr, Tsih, Ttt,
    BHS_LEN,
};
use mirrorpoint_target::iscsi::portal::create_portal_group;
use mirrorpoint_target::iscsi::registry::{
    InitiatorGroupSpec, IscsiTarget, LunSpec, PgIgMap, PortalGroupSpec, PortalSpec, TargetNodeSpec,
};
use mirrorpoint_target::iscsi::text::{parse, TextBuilder};
use mirrorpoint_target::units::BlockSize;
use mirrorpoint_target::volume::registry::{MallocParams, UringParams};
use mirrorpoint_target::volume::{VolumeRegistry, VolumeSpec};

const IQN: &str = "iqn.2026-11.io.mirrorpoint:test";
const INITIATOR: &str = "iqn.2026-11.io.mirrorpoint:initiator";

struct Target {
    rt: Runtime,
    addr: SocketAddr,
    target: Arc<IscsiTarget>,
}

fn start() -> Target {
    start_on(malloc_m0())
}

/// The 4 MiB malloc volume "m0" most tests export.
fn malloc_m0() -> VolumeSpec {
    VolumeSpec::Malloc(MallocParams {
        name: Some("m0".into()),
        num_blocks: 8192,
        block_size: BlockSize::B512,
        uuid: None,
    })
}

/// A target exporting the volume `spec` (named "m0") as LUN 0.
fn start_on(spec: VolumeSpec) -> Target {
    start_with(spec, 16)
}

/// [`start_on`] with the node's queue depth (commands a session may have
/// outstanding).
fn start_with(spec: VolumeSpec, queue_depth: u32) -> Target {
    let rt = Runtime::start(RuntimeConfig {
        cores: vec![0, 1],
        reactor: ReactorConfig {
            pool: PoolConfig {
                chunk_size: 128 * 1024,
                chunk_count: 128,
                huge_pages: false,
            },
            ..ReactorConfig::default()
        },
        pin: false,
    })
    .expect("runtime");
    let volumes = Arc::new(VolumeRegistry::new());
    volumes.create(spec).expect("volume m0");
    let v = volumes.clone();
    let target = IscsiTarget::new(rt.handles().to_vec(), Arc::new(move |n| v.get(n)));
    let addrs = create_portal_group(
        &target,
        PortalGroupSpec {
            tag: 1,
            portals: vec![PortalSpec {
                host: "127.0.0.1".into(),
                port: "0".into(),
            }],
            private: false,
        },
    )
    .expect("portal group");
    target
        .add_initiator_group(InitiatorGroupSpec {
            tag: 1,
            initiators: vec!["ANY".into()],
            netmasks: vec!["127.0.0.1/32".into()],
        })
        .expect("ig");
    target
        .add_target_node(TargetNodeSpec {
            name: IQN.into(),
            alias_name: None,
            luns: vec![LunSpec {
                bdev_name: "m0".into(),
                lun_id: 0,
            }],
            pg_ig_maps: vec![PgIgMap {
                pg_tag: 1,
                ig_tag: 1,
            }],
            queue_depth,
            disable_chap: true,
            require_chap: false,
            mutual_chap: false,
            chap_group: None,
            chap: None,
            header_digest: false,
            data_digest: false,
        })
        .expect("node");
    Target {
        rt,
        addr: addrs[0],
        target,
    }
}

/// A minimal blocking initiator.
struct Ini {
    s: TcpStream,
    buf: Vec<u8>,
    cmd_sn: u32,
    exp_stat_sn: u32,
    itt: u32,
    max_burst: u32,
    /// Header digests in force.
    hd: bool,
    /// Ask for header digests at login.
    want_hd: bool,
    /// Data-In PDUs with F=1 in the last read.
    f_bits: usize,
}

fn send_raw(s: &mut TcpStream, bytes: &[u8]) {
    s.write_all(bytes).expect("send");
}

impl Ini {
    fn connect(addr: SocketAddr) -> Ini {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        s.set_nodelay(true).ok();
        Ini {
            s,
            buf: Vec::new(),
            cmd_sn: 1,
            exp_stat_sn: 0,
            itt: 1,
            max_burst: 262_144,
            hd: false,
            want_hd: false,
            f_bits: 0,
        }
    }

    fn send(&mut self, bhs: &Bhs, data: &[u8]) {
        let mut out = Vec::new();
        encode_pdu(bhs, &[], data, self.hd, false, &mut out).expect("encode");
        send_raw(&mut self.s, &out);
    }

    /// Next PDU, or None on EOF/timeout.
    fn recv(&mut self) -> Option<(Bhs, Vec<u8>)> {
        let cfg = FrameConfig {
            header_digest: self.hd,
            data_digest: false,
            max_recv_data_segment_length: 1 << 24,
        };
        loop {
            match frame(&self.buf, &cfg, Role::Initiator) {
                Ok(Framed::Complete(p)) => {
                    let r = (p.bhs.clone(), p.data.to_vec());
                    let n = p.wire_len;
                    self.buf.drain(..n);
                    match &r.0 {
                        Bhs::ScsiResponse(h) => self.exp_stat_sn = h.stat_sn.0 + 1,
                        Bhs::NopIn(h) if !h.itt.is_reserved() => self.exp_stat_sn = h.stat_sn.0 + 1,
                        Bhs::DataIn(h) if h.has_status => self.exp_stat_sn = h.stat_sn.0 + 1,
                        Bhs::LoginResponse(h) => self.exp_stat_sn = h.stat_sn.0 + 1,
                        Bhs::Reject(h) => self.exp_stat_sn = h.stat_sn.0 + 1,
                        _ => {}
                    }
                    return Some(r);
                }
                Ok(Framed::NeedMore(_)) => {
                    let mut tmp = [0u8; 65536];
                    match self.s.read(&mut tmp) {
                        Ok(0) | Err(_) => return None,
                        Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                    }
                }
                Err(e) => panic!("initiator framing: {e}"),
            }
        }
    }

    fn login(&mut self, isid: u8, extra: &[(&str, &str)]) -> Result<(), (u8, u8)> {
        self.login_full(isid, 0, 1, false, INITIATOR, extra)
            .map(drop)
    }

    /// Full login; returns the TSIH.
    fn login_full(
        &mut self,
        isid: u8,
        tsih: u16,
        cid: u16,
        discovery: bool,
        initiator: &str,
        extra: &[(&str, &str)],
    ) -> Result<u16, (u8, u8)> {
        let mut t = TextBuilder::new();
        t.push("InitiatorName", initiator);
        if discovery {
            t.push("SessionType", "Discovery");
        } else {
            t.push("TargetName", IQN).push("SessionType", "Normal");
        }
        t.push("AuthMethod", "None");
        for (k, v) in extra {
            t.push(k, v);
        }
        let req = |transit, csg, nsg, cmd_sn, exp| {
            Bhs::LoginRequest(LoginRequest {
                transit,
                continue_: false,
                csg,
                nsg,
                version_max: 0,
                version_min: 0,
                isid: Isid([0x80, 0, 0, 0, 0, isid]),
                tsih: Tsih(tsih),
                itt: Itt(0),
                cid: Cid(cid),
                cmd_sn: CmdSn(cmd_sn),
                exp_stat_sn: StatSn(exp),
            })
        };
        self.send(
            &req(
                true,
                Stage::SecurityNegotiation,
                Stage::LoginOperationalNegotiation,
                self.cmd_sn,
                0,
            ),
            t.as_bytes(),
        );
        let (b, _) = self.recv().expect("login response");
        let Bhs::LoginResponse(r) = b else {
            panic!("expected login response")
        };
        if r.status_class != 0 {
            return Err((r.status_class, r.status_detail));
        }
        let mut t = TextBuilder::new();
        t.push("HeaderDigest", if self.want_hd { "CRC32C" } else { "None" })
            .push("DataDigest", "None")
            .push("MaxRecvDataSegmentLength", "65536");
        if !discovery && tsih == 0 {
            t.push("InitialR2T", "No")
                .push("ImmediateData", "Yes")
                .push("MaxBurstLength", "32768")
                .push("FirstBurstLength", "16384")
                .push("MaxConnections", "2");
        }
        self.send(
            &req(
                true,
                Stage::LoginOperationalNegotiation,
                Stage::FullFeaturePhase,
                self.cmd_sn,
                self.exp_stat_sn,
            ),
            t.as_bytes(),
        );
        let (b, data) = self.recv().expect("login response 2");
        let Bhs::LoginResponse(r) = b else {
            panic!("expected login response")
        };
        if r.status_class != 0 {
            return Err((r.status_class, r.status_detail));
        }
        for p in parse(&data).expect("text") {
            if p.key == "MaxBurstLength" {
                self.max_burst = p.value.parse().unwrap_or(262_144);
            }
        }
        assert!(r.transit && r.nsg == Stage::FullFeaturePhase);
        for p in parse(&data).expect("text") {
            if p.key == "HeaderDigest" {
                self.hd = p.value == "CRC32C";
            }
        }
        if !discovery && tsih == 0 {
            // A new I_T nexus starts with a unit attention (power on /
            // reset); TEST UNIT READY consumes it.
            for _ in 0..4 {
                let c = self.cmd(&[0, 0, 0, 0, 0, 0], false, false, 0);
                self.send(&Bhs::ScsiCommand(c), &[]);
                match self.recv() {
                    Some((Bhs::ScsiResponse(r), _)) if r.status == 0 => break,
                    Some((Bhs::ScsiResponse(_), _)) => {}
                    other => panic!("TEST UNIT READY: {other:?}"),
                }
            }
        }
        Ok(r.tsih.0)
    }

    /// SendTargets=All in a discovery session: the target names.
    fn send_targets(&mut self) -> Vec<String> {
        let itt = self.next_itt();
        let req = Bhs::TextRequest(mirrorpoint_target::iscsi::pdu::TextRequest {
            immediate: true,
            final_: true,
            continue_: false,
            lun: Lun::default(),
            itt,
            ttt: Ttt::RESERVED,
            cmd_sn: CmdSn(self.cmd_sn),
            exp_stat_sn: StatSn(self.exp_stat_sn),
        });
        self.send(&req, b"SendTargets=All\0");
        let (b, data) = self.recv().expect("text response");
        assert!(matches!(b, Bhs::TextResponse(_)), "{b:?}");
        parse(&data)
            .expect("text")
            .iter()
            .filter(|p| p.key == "TargetName")
            .map(|p| p.value.to_string())
            .collect()
    }

    fn logout(&mut self, reason: mirrorpoint_target::iscsi::pdu::LogoutReason, cid: u16) -> u8 {
        let itt = self.next_itt();
        let sn = self.cmd_sn;
        self.cmd_sn += 1;
        let req = Bhs::LogoutRequest(mirrorpoint_target::iscsi::pdu::LogoutRequest {
            immediate: false,
            reason,
            itt,
            cid: Cid(cid),
            cmd_sn: CmdSn(sn),
            exp_stat_sn: StatSn(self.exp_stat_sn),
        });
        self.send(&req, &[]);
        loop {
            match self.recv().expect("logout response") {
                (Bhs::LogoutResponse(r), _) => return r.response,
                (Bhs::NopIn(_), _) => {}
                (other, _) => panic!("unexpected {other:?}"),
            }
        }
    }

    fn next_itt(&mut self) -> Itt {
        self.itt += 1;
        Itt(self.itt)
    }

    fn cmd(&mut self, cdb: &[u8], read: bool, write: bool, edtl: u32) -> ScsiCommand {
        let mut c = [0u8; 16];
        c[..cdb.len()].copy_from_slice(cdb);
        let sn = self.cmd_sn;
        self.cmd_sn += 1;
        ScsiCommand {
            immediate: false,
            final_: true,
            read,
            write,
            attr: TaskAttr::Simple,
            lun: Lun::default(),
            itt: self.next_itt(),
            expected_data_transfer_length: edtl,
            cmd_sn: CmdSn(sn),
            exp_stat_sn: StatSn(self.exp_stat_sn),
            cdb: c,
        }
    }

    /// READ(10); returns (status, data).
    fn read10(&mut self, lba: u32, blocks: u16) -> (u8, Vec<u8>) {
        let mut cdb = [0u8; 10];
        cdb[0] = 0x28;
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
        let c = self.cmd(&cdb, true, false, u32::from(blocks) * 512);
        self.send(&Bhs::ScsiCommand(c), &[]);
        let mut data = Vec::new();
        self.f_bits = 0;
        loop {
            match self.recv().expect("read answer") {
                (Bhs::DataIn(d), seg) => {
                    assert_eq!(d.buffer_offset as usize, data.len());
                    self.f_bits += usize::from(d.final_);
                    data.extend(seg);
                    if d.has_status {
                        return (d.status, data);
                    }
                }
                (Bhs::ScsiResponse(r), _) => return (r.status, data),
                (Bhs::NopIn(_), _) => {}
                (other, _) => panic!("unexpected {other:?}"),
            }
        }
    }

    /// WRITE(10) with `imm` bytes of immediate data, then answers R2Ts.
    fn write10(&mut self, lba: u32, data: &[u8], imm: usize) -> u8 {
        let blocks = (data.len() / 512) as u16;
        let mut cdb = [0u8; 10];
        cdb[0] = 0x2a;
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
        let c = self.cmd(&cdb, false, true, data.len() as u32);
        let itt = c.itt;
        let mut c = c;
        // With no immediate data and InitialR2T=No, say no unsolicited
        // Data-Out follows (F=1): everything then comes through R2Ts.
        c.final_ = true;
        self.send(&Bhs::ScsiCommand(c), &data[..imm]);
        loop {
            match self.recv().expect("write answer") {
                (Bhs::R2t(r), _) => {
                    let mut off = r.buffer_offset as usize;
                    let end = off + r.desired_data_transfer_length as usize;
                    let mut sn = 0;
                    while off < end {
                        let n = (end - off).min(8192);
                        let d = DataOut {
                            final_: off + n == end,
                            lun: Lun::default(),
                            itt,
                            ttt: r.ttt,
                            exp_stat_sn: StatSn(self.exp_stat_sn),
                            data_sn: DataSn(sn),
                            buffer_offset: off as u32,
                        };
                        self.send(&Bhs::DataOut(d), &data[off..off + n]);
                        off += n;
                        sn += 1;
                    }
                }
                (Bhs::ScsiResponse(r), _) => return r.status,
                (Bhs::NopIn(_), _) => {}
                (other, _) => panic!("unexpected {other:?}"),
            }
        }
    }

    fn ping(&mut self) -> bool {
        let itt = self.next_itt();
        let n = NopOut {
            immediate: true,
            lun: Lun::default(),
            itt,
            ttt: Ttt::RESERVED,
            cmd_sn: CmdSn(self.cmd_sn),
            exp_stat_sn: StatSn(self.exp_stat_sn),
        };
        self.send(&Bhs::NopOut(n), b"ping");
        loop {
            match self.recv() {
                Some((Bhs::NopIn(r), d)) if r.itt == itt => return d == b"ping",
                Some(_) => {}
                None => return false,
            }
        }
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

#[test]
fn login_inquiry_write_read_with_immediate_unsolicited_and_r2t() {
    let t = start();
    let mut a = Ini::connect(t.addr);
    a.login(1, &[]).expect("login");
    let c = a.cmd(&[0x12, 0, 0, 0, 96, 0], true, false, 96);
    a.send(&Bhs::ScsiCommand(c), &[]);
    let (b, d) = a.recv().expect("inquiry");
    let Bhs::DataIn(h) = b else {
        panic!("expected Data-In")
    };
    assert!(h.has_status && h.status == 0);
    assert_eq!(h.residual_count, 96 - d.len() as u32);
    assert_eq!(h.underflow, d.len() < 96);
    // 120 KiB (the SCSI layer's largest transfer is one 128 KiB pool
    // chunk): 16 KiB immediate (FirstBurstLength), the rest in R2Ts of
    // MaxBurstLength (32 KiB), one outstanding at a time.
    let data = pattern(7, 120 * 1024);
    assert_eq!(a.write10(16, &data, 16384), 0);
    let (st, back) = a.read10(16, (data.len() / 512) as u16);
    assert_eq!(st, 0);
    assert_eq!(back, data);
    // Small write with everything immediate.
    let small = pattern(9, 4096);
    assert_eq!(a.write10(2000, &small, 4096), 0);
    // Nothing immediate: all of it through R2Ts.
    let r2t_only = pattern(10, 64 * 1024);
    assert_eq!(a.write10(3000, &r2t_only, 0), 0);
    assert_eq!(a.read10(3000, 128).1, r2t_only);
    // 64 KiB of Data-In with MaxBurstLength 32 KiB: two sequences.
    assert_eq!(a.f_bits, 2);
    assert_eq!(a.read10(2000, 8).1, small);
    assert!(a.ping());
}

#[test]
fn malformed_pdus_are_rejected_and_other_sessions_keep_working() {
    let t = start();
    let mut good = Ini::connect(t.addr);
    good.login(1, &[]).expect("login");
    let keep = pattern(3, 8192);
    assert_eq!(good.write10(100, &keep, 8192), 0);

    let mut bad = Ini::connect(t.addr);
    bad.login(2, &[]).expect("login");
    // Reserved opcode 0x1c: Reject (command not supported), connection lives.
    let mut raw = [0u8; BHS_LEN];
    raw[0] = 0x1c;
    raw[1] = 0x80;
    send_raw(&mut bad.s, &raw);
    let (b, d) = bad.recv().expect("reject");
    let Bhs::Reject(r) = b else {
        panic!("expected Reject, got {b:?}")
    };
    assert_eq!(r.reason as u8, 0x05);
    assert_eq!(&d[..BHS_LEN], &raw[..]);
    assert!(bad.ping());
    // A SCSI Command with the reserved ITT: Reject (invalid PDU field).
    let mut c = bad.cmd(&[0, 0, 0, 0, 0, 0], false, false, 0);
    c.itt = Itt::RESERVED;
    bad.send(&Bhs::ScsiCommand(c), &[]);
    let (b, _) = bad.recv().expect("reject 2");
    assert!(matches!(b, Bhs::Reject(_)), "{b:?}");
    assert!(bad.ping());
    // Its CmdSN was consumed: the next command still works.
    assert_eq!(bad.read10(0, 1).0, 0);
    // A target-only opcode from the initiator: Reject.
    let mut raw = [0u8; BHS_LEN];
    raw[0] = Opcode::ScsiResponse as u8;
    send_raw(&mut bad.s, &raw);
    assert!(matches!(bad.recv(), Some((Bhs::Reject(_), _))));
    // Garbage bytes: whatever the target makes of them, it must not take
    // the other session down.
    send_raw(&mut bad.s, &[0xff; 200]);
    drop(bad);

    assert!(good.ping());
    assert_eq!(good.read10(100, 16), (0, keep));
}

#[test]
fn out_of_window_commands_are_dropped_silently() {
    let t = start();
    let mut a = Ini::connect(t.addr);
    a.login(1, &[]).expect("login");
    assert_eq!(a.read10(0, 1).0, 0);
    // CmdSN far beyond MaxCmdSN: no answer.
    let mut c = a.cmd(&[0, 0, 0, 0, 0, 0], false, false, 0);
    c.cmd_sn = CmdSn(c.cmd_sn.0 + 1000);
    a.cmd_sn -= 1;
    a.send(&Bhs::ScsiCommand(c), &[]);
    // CmdSN below ExpCmdSN (a duplicate): no answer either.
    let mut c = a.cmd(&[0, 0, 0, 0, 0, 0], false, false, 0);
    c.cmd_sn = CmdSn(1);
    a.cmd_sn -= 1;
    a.send(&Bhs::ScsiCommand(c), &[]);
    // The next in-window command is answered, and it is the first answer.
    let (st, _) = a.read10(0, 1);
    assert_eq!(st, 0);
}

#[test]
fn commands_ahead_of_the_window_wait_for_the_gap() {
    let t = start();
    let mut a = Ini::connect(t.addr);
    a.login(1, &[]).expect("login");
    assert_eq!(a.read10(0, 1).0, 0);
    // Send CmdSN n+1 first, then n: both answered, n first.
    let c1 = a.cmd(&[0, 0, 0, 0, 0, 0], false, false, 0);
    let c2 = a.cmd(&[0, 0, 0, 0, 0, 0], false, false, 0);
    a.send(&Bhs::ScsiCommand(c2.clone()), &[]);
    a.send(&Bhs::ScsiCommand(c1.clone()), &[]);
    let (b1, _) = a.recv().expect("first");
    let (b2, _) = a.recv().expect("second");
    assert_eq!(b1.itt(), c1.itt);
    assert_eq!(b2.itt(), c2.itt);
}

#[test]
fn oversized_segments_and_bad_data_out_are_rejected() {
    let t = start();
    let mut a = Ini::connect(t.addr);
    a.login(1, &[]).expect("login");
    // A NOP-Out with a data segment far above our MaxRecvDataSegmentLength.
    let n = NopOut {
        immediate: true,
        lun: Lun::default(),
        itt: a.next_itt(),
        ttt: Ttt::RESERVED,
        cmd_sn: CmdSn(a.cmd_sn),
        exp_stat_sn: StatSn(a.exp_stat_sn),
    };
    let big = vec![0u8; 1 << 20];
    a.send(&Bhs::NopOut(n), &big);
    let (b, _) = a.recv().expect("reject");
    assert!(matches!(b, Bhs::Reject(_)), "{b:?}");
    assert!(a.ping());
    // Data-Out with a wrong DataSN for a write waiting for unsolicited data.
    let mut cdb = [0u8; 10];
    cdb[0] = 0x2a;
    cdb[7..9].copy_from_slice(&2u16.to_be_bytes());
    let mut c = a.cmd(&cdb, false, true, 1024);
    c.final_ = false;
    let itt = c.itt;
    a.send(&Bhs::ScsiCommand(c), &[]);
    let d = DataOut {
        final_: true,
        lun: Lun::default(),
        itt,
        ttt: Ttt::RESERVED,
        exp_stat_sn: StatSn(a.exp_stat_sn),
        data_sn: DataSn(27),
        buffer_offset: 0,
    };
    a.send(&Bhs::DataOut(d), &[0u8; 1024]);
    let (b, _) = a.recv().expect("reject");
    assert!(matches!(b, Bhs::Reject(_)), "{b:?}");
    assert!(a.ping());
    assert_eq!(a.read10(0, 1).0, 0);
}

#[test]
fn garbage_login_keys_fail_cleanly() {
    let t = start();
    let mut a = Ini::connect(t.addr);
    // One login PDU above 8192 bytes of text: a failed login, not a crash.
    let mut z = Ini::connect(t.addr);
    let huge: Vec<(String, String)> = (0..300)
        .map(|i| (format!("X-junk-{i}"), "y".repeat(30)))
        .collect();
    let refs: Vec<(&str, &str)> = huge.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(z.login(3, &refs).map_err(|e| e.0), Err(2));
    let junk: Vec<(String, String)> = (0..100)
        .map(|i| (format!("X-junk-{i}"), "y".repeat(30)))
        .collect();
    let refs: Vec<(&str, &str)> = junk.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    // Unknown X- keys are answered NotUnderstood: the login still succeeds.
    a.login(1, &refs).expect("login with private keys");
    assert!(a.ping());
    // Keys that break the syntax fail the login and close the connection.
    let mut b = Ini::connect(t.addr);
    let mut raw = Vec::new();
    let req = Bhs::LoginRequest(LoginRequest {
        transit: true,
        continue_: false,
        csg: Stage::SecurityNegotiation,
        nsg: Stage::LoginOperationalNegotiation,
        version_max: 0,
        version_min: 0,
        isid: Isid([0x80, 0, 0, 0, 0, 9]),
        tsih: Tsih(0),
        itt: Itt(0),
        cid: Cid(0),
        cmd_sn: CmdSn(1),
        exp_stat_sn: StatSn(0),
    });
    encode_pdu(
        &req,
        &[],
        b"no equals sign\0=\0\xff\xfe",
        false,
        false,
        &mut raw,
    )
    .unwrap();
    send_raw(&mut b.s, &raw);
    match b.recv() {
        Some((Bhs::LoginResponse(r), _)) => assert_ne!(r.status_class, 0),
        other => panic!("expected a failed login, got {other:?}"),
    }
    assert!(b.recv().is_none(), "connection closed after failed login");
    // The good session is unharmed.
    assert!(a.ping());
    assert_eq!(a.read10(0, 1).0, 0);
}

/// A cold reset closes the connection it arrived on; its TMF response is
/// queued behind the send side's batching and must still go out first.
#[test]
fn cold_reset_is_answered_before_the_connection_closes() {
    use mirrorpoint_target::iscsi::pdu::{TaskMgmtRequest, TmfFunction};
    let t = start();
    let mut a = Ini::connect(t.addr);
    a.login(9, &[]).expect("login");
    assert!(a.ping());
    let itt = a.next_itt();
    let req = Bhs::TaskMgmtRequest(TaskMgmtRequest {
        immediate: true,
        function: TmfFunction::TargetColdReset,
        lun: Lun([0; 8]),
        itt,
        referenced_task_tag: Itt(u32::MAX),
        cmd_sn: CmdSn(a.cmd_sn),
        exp_stat_sn: StatSn(a.exp_stat_sn),
        ref_cmd_sn: CmdSn(0),
        exp_data_sn: DataSn(0),
    });
    a.send(&req, &[]);
    let mut answered = None;
    while let Some((bhs, _)) = a.recv() {
        match bhs {
            Bhs::TaskMgmtResponse(r) if r.itt == itt => answered = Some(r.response),
            Bhs::NopIn(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(answered, Some(0), "function complete, before the close");
}

#[test]
fn session_reinstatement_closes_the_old_session() {
    let t = start();
    let mut a = Ini::connect(t.addr);
    a.login(5, &[]).expect("login");
    assert!(a.ping());
    let mut b = Ini::connect(t.addr);
    b.login(5, &[]).expect("reinstating login");
    assert!(b.ping());
    // The old connection is shut down.
    assert!(!a.ping());
}

#[test]
fn header_digest_errors_drop_only_that_connection() {
    let t = start();
    let mut good = Ini::connect(t.addr);
    good.login(1, &[]).expect("login");
    let keep = pattern(5, 4096);
    assert_eq!(good.write10(300, &keep, 4096), 0);
    let mut d = Ini::connect(t.addr);
    d.want_hd = true;
    d.login(2, &[]).expect("login with header digests");
    assert!(d.hd, "target accepted CRC32C header digests");
    assert!(d.ping());
    // A NOP-Out whose header digest is wrong ends that connection.
    let mut raw = Vec::new();
    let n = NopOut {
        immediate: true,
        lun: Lun::default(),
        itt: Itt(77),
        ttt: Ttt::RESERVED,
        cmd_sn: CmdSn(d.cmd_sn),
        exp_stat_sn: StatSn(d.exp_stat_sn),
    };
    encode_pdu(&Bhs::NopOut(n), &[], &[], true, false, &mut raw).unwrap();
    raw[BHS_LEN] ^= 0xff;
    send_raw(&mut d.s, &raw);
    assert!(
        d.recv().is_none(),
        "connection dropped on header digest error"
    );
    assert!(good.ping());
    assert_eq!(good.read10(300, 8), (0, keep));
}

#[test]
fn discovery_lists_only_what_the_initiator_may_see() {
    let t = start();
    t.target
        .add_initiator_group(InitiatorGroupSpec {
            tag: 2,
            initiators: vec!["iqn.2026-11.io.mirrorpoint:someone-else".into()],
            netmasks: vec!["ANY".into()],
        })
        .expect("ig");
    t.target
        .add_target_node(TargetNodeSpec {
            name: "private".into(),
            alias_name: None,
            luns: vec![LunSpec {
                bdev_name: "m0".into(),
                lun_id: 0,
            }],
            pg_ig_maps: vec![PgIgMap {
                pg_tag: 1,
                ig_tag: 2,
            }],
            queue_depth: 16,
            disable_chap: true,
            require_chap: false,
            mutual_chap: false,
            chap_group: None,
            chap: None,
            header_digest: false,
            data_digest: false,
        })
        .expect("node");
    let mut d = Ini::connect(t.addr);
    d.login_full(1, 0, 1, true, INITIATOR, &[])
        .expect("discovery login");
    assert_eq!(d.send_targets(), vec![IQN.to_string()]);
    // The same request split over two Text Requests (C=1, then the
    // target's TTT).
    let itt = d.next_itt();
    let mut req = mirrorpoint_target::iscsi::pdu::TextRequest {
        immediate: true,
        final_: false,
        continue_: true,
        lun: Lun::default(),
        itt,
        ttt: Ttt::RESERVED,
        cmd_sn: CmdSn(d.cmd_sn),
        exp_stat_sn: StatSn(d.exp_stat_sn),
    };
    d.send(&Bhs::TextRequest(req.clone()), b"SendTar");
    let (b, data) = d.recv().expect("empty text response");
    let Bhs::TextResponse(r) = b else {
        panic!("{b:?}")
    };
    assert!(!r.final_ && !r.continue_ && !r.ttt.is_reserved() && data.is_empty());
    req.final_ = true;
    req.continue_ = false;
    req.ttt = r.ttt;
    d.send(&Bhs::TextRequest(req), b"gets=All\0");
    let (b, data) = d.recv().expect("text response");
    assert!(matches!(b, Bhs::TextResponse(ref r) if r.final_), "{b:?}");
    assert!(String::from_utf8_lossy(&data).contains(IQN));
    // A normal login to the hidden node is refused.
    let mut n = Ini::connect(t.addr);
    let mut t2 = TextBuilder::new();
    t2.push("InitiatorName", INITIATOR)
        .push("TargetName", "iqn.2026-11.io.mirrorpoint:private")
        .push("AuthMethod", "None");
    let req = Bhs::LoginRequest(LoginRequest {
        transit: true,
        continue_: false,
        csg: Stage::SecurityNegotiation,
        nsg: Stage::LoginOperationalNegotiation,
        version_max: 0,
        version_min: 0,
        isid: Isid([0x80, 0, 0, 0, 0, 3]),
        tsih: Tsih(0),
        itt: Itt(0),
        cid: Cid(0),
        cmd_sn: CmdSn(1),
        exp_stat_sn: StatSn(0),
    });
    n.send(&req, t2.as_bytes());
    match n.recv() {
        Some((Bhs::LoginResponse(r), _)) => assert_eq!(r.status_class, 2),
        other => panic!("{other:?}"),
    }
    // The other initiator sees both.
    let mut o = Ini::connect(t.addr);
    o.login_full(
        1,
        0,
        1,
        true,
        "iqn.2026-11.io.mirrorpoint:someone-else",
        &[],
    )
    .expect("discovery login");
    let mut names = o.send_targets();
    names.sort();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn two_connections_share_one_session_and_logout_closes_it() {
    use mirrorpoint_target::iscsi::pdu::LogoutReason;
    let t = start();
    let mut a = Ini::connect(t.addr);
    let tsih = a.login_full(7, 0, 1, false, INITIATOR, &[]).expect("login");
    assert!(tsih != 0);
    assert_eq!(a.read10(0, 1).0, 0);
    let mut b = Ini::connect(t.addr);
    b.cmd_sn = a.cmd_sn;
    b.login_full(7, tsih, 2, false, INITIATOR, &[])
        .expect("second connection");
    // Commands on either connection share the session's CmdSN space.
    let data = pattern(11, 2048);
    assert_eq!(b.write10(40, &data, 2048), 0);
    a.cmd_sn = b.cmd_sn;
    assert_eq!(a.read10(40, 4), (0, data));
    b.cmd_sn = a.cmd_sn;
    // CmdSN n+1 on the second connection before n on the first: the
    // second waits for the gap, then both are answered.
    let n = a.cmd_sn;
    b.cmd_sn = n + 1;
    let later = b.cmd(&[0, 0, 0, 0, 0, 0], false, false, 0);
    b.send(&Bhs::ScsiCommand(later.clone()), &[]);
    std::thread::sleep(Duration::from_millis(100));
    let first = a.cmd(&[0, 0, 0, 0, 0, 0], false, false, 0);
    assert_eq!(first.cmd_sn.0, n);
    a.send(&Bhs::ScsiCommand(first.clone()), &[]);
    assert_eq!(a.recv().expect("first").0.itt(), first.itt);
    assert_eq!(b.recv().expect("second").0.itt(), later.itt);
    a.cmd_sn = n + 2;
    b.cmd_sn = n + 2;
    // Closing the second connection leaves the first one working.
    assert_eq!(b.logout(LogoutReason::CloseConnection, 2), 0);
    assert!(b.recv().is_none());
    a.cmd_sn = b.cmd_sn;
    assert!(a.ping());
    assert_eq!(a.read10(40, 1).0, 0);
    assert_eq!(a.logout(LogoutReason::CloseSession, 1), 0);
    assert!(a.recv().is_none());
    assert!(
        t.target.sessions().is_empty() || {
            std::thread::sleep(Duration::from_millis(200));
            t.target.sessions().is_empty()
        }
    );
}

#[test]
fn unanswered_nop_in_pings_drop_the_connection() {
    let t = start();
    *t.target.nop.lock().unwrap() = (1, 1);
    let mut a = Ini::connect(t.addr);
    a.login(1, &[]).expect("login");
    // Do not answer the target's NOP-In: after interval + timeout the
    // target closes the connection.
    let start = std::time::Instant::now();
    let mut pinged = false;
    loop {
        match a.recv() {
            Some((Bhs::NopIn(n), _)) => {
                assert!(n.itt.is_reserved() && !n.ttt.is_reserved());
                pinged = true;
            }
            Some(other) => panic!("unexpected {other:?}"),
            None => break,
        }
        assert!(start.elapsed() < Duration::from_secs(10));
    }
    assert!(pinged, "the target pinged before dropping");
    // An answering initiator stays connected.
    let mut b = Ini::connect(t.addr);
    b.login(2, &[]).expect("login");
    let until = std::time::Instant::now() + Duration::from_secs(4);
    while std::time::Instant::now() < until {
        if let Some((Bhs::NopIn(n), _)) = b.recv() {
            let ans = NopOut {
                immediate: true,
                lun: Lun::default(),
                itt: Itt::RESERVED,
                ttt: n.ttt,
                cmd_sn: CmdSn(b.cmd_sn),
                exp_stat_sn: StatSn(b.exp_stat_sn),
            };
            b.send(&Bhs::NopOut(ans), &[]);
        }
    }
    assert!(b.ping());
}

#[test]
fn deleting_a_node_closes_its_sessions_and_refuses_new_logins() {
    let t = start();
    let mut a = Ini::connect(t.addr);
    a.login(1, &[]).expect("login");
    assert!(a.ping());
    // Portal and initiator groups in use cannot go.
    assert!(mirrorpoint_target::iscsi::portal::delete_portal_group(&t.target, 1).is_err());
    assert!(t.target.remove_initiator_group(1).is_err());
    assert_eq!(t.target.sessions().len(), 1);
    t.target.remove_target_node(IQN).expect("delete node");
    assert!(!a.ping(), "session closed");
    let mut b = Ini::connect(t.addr);
    assert_eq!(b.login(2, &[]).map_err(|e| e.0), Err(2));
    // Now the groups can be deleted, and the portal stops listening.
    t.target.remove_initiator_group(1).expect("ig");
    mirrorpoint_target::iscsi::portal::delete_portal_group(&t.target, 1).expect("pg");
    std::thread::sleep(Duration::from_millis(100));
    assert!(TcpStream::connect(t.addr).is_err(), "listener closed");
}

/// The write path's receive: a write's data segment and what follows it
/// (padding, digest, the next header) come in one split receive. Pipelined
/// writes with immediate data, each followed by a NOP-Out with a 5-byte
/// segment (3 bytes of padding), with header digests, are sent once as one
/// burst (many PDUs per receive) and once in 7-byte dribbles (every receive
/// partial, splits landing inside data, padding, digests and headers). Every
/// write must succeed, every ping come back intact, and every block read
/// back as written: a byte taken by the wrong side of a split would break
/// the framing or the data.
#[test]
fn pipelined_writes_split_receives_in_bursts_and_dribbles() {
    let t = start();
    let mut a = Ini::connect(t.addr);
    a.want_hd = true;
    a.login(1, &[]).expect("login");
    assert!(a.hd, "header digests in force");
    for (round, dribble) in [(0u8, false), (1, true)] {
        let mut wire = Vec::new();
        let mut pings = Vec::new();
        for i in 0..8u8 {
            let lba = u32::from(round) * 64 + u32::from(i) * 8;
            let mut cdb = [0u8; 10];
            cdb[0] = 0x2a;
            cdb[2..6].copy_from_slice(&lba.to_be_bytes());
            cdb[7..9].copy_from_slice(&8u16.to_be_bytes());
            let mut c = a.cmd(&cdb, false, true, 4096);
            c.final_ = true;
            let data = pattern(round * 16 + i, 4096);
            encode_pdu(&Bhs::ScsiCommand(c), &[], &data, a.hd, false, &mut wire).expect("enc");
            let itt = a.next_itt();
            pings.push(itt);
            let n = NopOut {
                immediate: true,
                lun: Lun::default(),
                itt,
                ttt: Ttt::RESERVED,
                cmd_sn: CmdSn(a.cmd_sn),
                exp_stat_sn: StatSn(a.exp_stat_sn),
            };
            encode_pdu(&Bhs::NopOut(n), &[], b"ping!", a.hd, false, &mut wire).expect("enc");
        }
        if dribble {
            for (k, piece) in wire.chunks(7).enumerate() {
                send_raw(&mut a.s, piece);
                if k % 32 == 31 {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        } else {
            send_raw(&mut a.s, &wire);
        }
        let (mut ok, mut echoed) = (0, 0);
        while ok + echoed < 16 {
            match a.recv().expect("answers to the pipelined writes") {
                (Bhs::ScsiResponse(r), _) => {
                    assert_eq!(r.status, 0, "write status (round {round})");
                    ok += 1;
                }
                (Bhs::NopIn(r), d) if pings.contains(&r.itt) => {
                    assert_eq!(d, b"ping!", "NOP-In echoes the 5-byte segment");
                    echoed += 1;
                }
                (Bhs::NopIn(_), _) => {}
                (other, _) => panic!("unexpected {other:?}"),
            }
        }
        for i in 0..8u8 {
            let lba = u32::from(round) * 64 + u32::from(i) * 8;
            let (st, back) = a.read10(lba, 8);
            assert_eq!(st, 0);
            assert!(
                back == pattern(round * 16 + i, 4096),
                "write {i} of round {round} read back intact"
            );
        }
    }
    assert!(a.ping());
}

/// Ring ops the target's reactors have completed so far (published at
/// least every millisecond).
fn target_ring_ops(t: &Target) -> u64 {
    t.rt.handles().iter().map(|h| h.stats().ios_completed).sum()
}

/// Bursts of 4 KiB writes with immediate data, 60 commands pipelined per
/// burst (a READ(10) and a 512-byte write among them, so a batch receive
/// meets a PDU of another shape), with and without header digests: every
/// command is answered with GOOD, every write reads back, and the target
/// took the writes with batch receives: its reactors complete fewer ring
/// ops (receives and sends) than there were writes, where one receive per
/// write already makes more.
#[test]
fn bursts_of_immediate_writes_take_batch_receives() {
    for header_digest in [false, true] {
        let t = start_with(malloc_m0(), 64);
        let mut a = Ini::connect(t.addr);
        a.want_hd = header_digest;
        a.login(1, &[]).expect("login");
        assert_eq!(a.hd, header_digest);
        const BURSTS: u32 = 4;
        const PER_BURST: u32 = 60;
        let ops_before = target_ring_ops(&t);
        let mut writes = 0u64;
        let mut expect: Vec<(u32, Vec<u8>)> = Vec::new();
        for burst in 0..BURSTS {
            let mut wire = Vec::new();
            for i in 0..PER_BURST {
                let lba = (burst * PER_BURST + i) * 8;
                let mut cdb = [0u8; 10];
                if i == 25 {
                    // A read (no data segment).
                    cdb[0] = 0x28;
                    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
                    cdb[7..9].copy_from_slice(&8u16.to_be_bytes());
                    let c = a.cmd(&cdb, true, false, 4096);
                    encode_pdu(&Bhs::ScsiCommand(c), &[], &[], a.hd, false, &mut wire)
                        .expect("enc");
                    continue;
                }
                let len: u16 = if i == 40 { 1 } else { 8 };
                cdb[0] = 0x2a;
                cdb[2..6].copy_from_slice(&lba.to_be_bytes());
                cdb[7..9].copy_from_slice(&len.to_be_bytes());
                let bytes = usize::from(len) * 512;
                let c = a.cmd(&cdb, false, true, bytes as u32);
                let data = pattern((burst * PER_BURST + i) as u8, bytes);
                encode_pdu(&Bhs::ScsiCommand(c), &[], &data, a.hd, false, &mut wire).expect("enc");
                expect.push((lba, data));
                writes += 1;
            }
            send_raw(&mut a.s, &wire);
            let mut answered = 0;
            while answered < PER_BURST {
                match a.recv().expect("answers to the burst") {
                    (Bhs::ScsiResponse(r), _) => {
                        assert_eq!(r.status, 0, "burst {burst}");
                        answered += 1;
                    }
                    (Bhs::DataIn(d), _) if d.has_status => {
                        assert_eq!(d.status, 0, "read in burst {burst}");
                        answered += 1;
                    }
                    (Bhs::DataIn(_) | Bhs::NopIn(_), _) => {}
                    (other, _) => panic!("unexpected {other:?}"),
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
        let ops = target_ring_ops(&t) - ops_before;
        for (lba, data) in &expect {
            let (st, back) = a.read10(*lba, (data.len() / 512) as u16);
            assert_eq!(st, 0);
            assert!(back == *data, "the write at LBA {lba} reads back");
        }
        assert!(
            ops < writes,
            "{ops} target ring ops for {writes} pipelined writes: no batch receives (header digest {header_digest})"
        );
    }
}

/// An initiator in lock step with a deep queue, as fio's libiscsi engine
/// is at QD 32: 16 writes of 4 KiB outstanding, a new one sent for each
/// answer read, each as two sends (header, then data). Every write lands,
/// and the target paces its receives (ExpStatSN shows 15 answers unread)
/// into batch receives: fewer ring ops than writes, where taking each write
/// as it comes costs a header receive and a data receive per write, plus
/// the sends.
#[test]
fn a_deep_queue_in_lock_step_is_received_in_batches() {
    const QD: u32 = 16;
    const WRITES: u32 = 400;
    let t = start_with(malloc_m0(), 64);
    let mut a = Ini::connect(t.addr);
    a.login(1, &[]).expect("login");
    let send_write = |a: &mut Ini, n: u32| {
        let lba = (n % 1000) * 8;
        let mut cdb = [0u8; 10];
        cdb[0] = 0x2a;
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[7..9].copy_from_slice(&8u16.to_be_bytes());
        let c = a.cmd(&cdb, false, true, 4096);
        let mut wire = Vec::new();
        encode_pdu(
            &Bhs::ScsiCommand(c),
            &[],
            &pattern(n as u8, 4096),
            false,
            false,
            &mut wire,
        )
        .expect("enc");
        send_raw(&mut a.s, &wire[..BHS_LEN]);
        send_raw(&mut a.s, &wire[BHS_LEN..]);
    };
    let ops_before = target_ring_ops(&t);
    for n in 0..QD {
        send_write(&mut a, n);
    }
    let mut answered = 0;
    while answered < WRITES {
        match a.recv().expect("an answer") {
            (Bhs::ScsiResponse(r), _) => {
                assert_eq!(r.status, 0, "write {answered}");
                answered += 1;
                let next = answered + QD - 1;
                if next < WRITES {
                    send_write(&mut a, next);
                }
            }
            (Bhs::NopIn(_), _) => {}
            (other, _) => panic!("unexpected {other:?}"),
        }
    }
    std::thread::sleep(Duration::from_millis(20));
    let ops = target_ring_ops(&t) - ops_before;
    for n in (0..WRITES).step_by(37) {
        let (st, back) = a.read10(n * 8, 8);
        assert_eq!(st, 0);
        assert!(back == pattern(n as u8, 4096), "write {n} reads back");
    }
    assert!(
        ops < u64::from(WRITES),
        "{ops} target ring ops for {WRITES} lock-step writes: receives not paced into batches"
    );
}

/// Writes still in flight when the host closes its side are finished (their
/// data is on the volume) and the target then closes the connection: the
/// command driver runs on after the reader ends, until its slots are empty.
/// The volume is a file through the ring (O_DIRECT on a disk file system),
/// so the writes are still in the kernel when the FIN is read.
#[test]
fn in_flight_writes_finish_and_the_connection_closes_after_the_host_leaves() {
    let path = std::env::temp_dir().join(format!("mp-iscsi-drain-{}.img", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let t = start_on(VolumeSpec::Uring(UringParams {
        name: "m0".into(),
        filename: path.clone(),
        block_size: Some(BlockSize::B512),
        size: Some(4 << 20),
        queue_depth: Some(32),
        uuid: None,
    }));
    let mut a = Ini::connect(t.addr);
    a.login(1, &[]).expect("login");
    const N: u8 = 12;
    let mut wire = Vec::new();
    for i in 0..N {
        let lba = u32::from(i) * 8;
        let mut cdb = [0u8; 10];
        cdb[0] = 0x2a;
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[7..9].copy_from_slice(&8u16.to_be_bytes());
        let c = a.cmd(&cdb, false, true, 4096);
        encode_pdu(
            &Bhs::ScsiCommand(c),
            &[],
            &pattern(i + 40, 4096),
            a.hd,
            false,
            &mut wire,
        )
        .expect("encode");
    }
    send_raw(&mut a.s, &wire);
    a.s.shutdown(std::net::Shutdown::Write).expect("FIN");
    // Whatever the target answers, then its own close (EOF, not a timeout).
    a.s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut tmp = [0u8; 65536];
    let closed = loop {
        match a.s.read(&mut tmp) {
            Ok(0) => break true,
            Ok(_) => {}
            Err(_) => break false,
        }
    };
    assert!(
        closed,
        "the target did not close the connection after the host left"
    );
    let mut b = Ini::connect(t.addr);
    b.login(2, &[]).expect("login");
    for i in 0..N {
        let (st, back) = b.read10(u32::from(i) * 8, 8);
        assert_eq!(st, 0);
        assert!(back == pattern(i + 40, 4096), "write {i} reads back");
    }
    drop(t);
    std::fs::remove_file(path).ok();
}
