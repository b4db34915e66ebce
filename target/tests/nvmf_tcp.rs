//! NVMe/TCP end to end: a daemon on 127.0.0.1 (ephemeral ports) and a small
//! but real host built from the crate's codec: ICReq/ICResp with and without
//! digests, Fabrics Connect of an admin queue and of an I/O queue on a second
//! connection, Property Get/Set, Identify, Write/Read in-capsule and via
//! R2T/H2CData, Flush, Write Zeroes, Dataset Management, the discovery log,
//! allowed hosts, keep-alive expiry, asynchronous events, and hostile PDUs
//! (each answered by the right C2HTermReq and a close, while another
//! connection keeps working and acknowledged data stays intact).

use mirrorpoint_poller::PoolConfig;
use mirrorpoint_target::daemon::{Daemon, DaemonOptions, DEFAULT_SUBSYSTEM_NQN};
use mirrorpoint_target::nvmf::log_page::GetLogPage;
use mirrorpoint_target::nvmf::pdu::{
    self, CapsuleCmd, CommonHeader, Fes, H2CData, IcReq, Pdu, PduConfig,
};
use mirrorpoint_target::nvmf::spec::{
    CntlId, CommandId, ConnectCommand, ConnectData, Cqe, DataSgl, DsmRange, Nqn, Nsid,
    PropertyCommand, QueueId, RwCommand, Sqe, Status, DISCOVERY_NQN,
};
use mirrorpoint_target::rpc::{ClientError, RpcClient};
use mirrorpoint_target::units::Lba;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555";

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
            chunk_count: 64,
            huge_pages: false,
        },
        pin: false,
        nvmf_default_listen: "127.0.0.1:0".parse().ok(),
        ..DaemonOptions::default()
    }
}

/// Starts a daemon with the default configuration; returns it and the
/// address the default subsystem listens on.
fn start(dir: &Path) -> (Daemon, SocketAddrV4) {
    let daemon = Daemon::start(options(dir)).expect("daemon starts");
    let sub = daemon
        .state()
        .nvmf
        .subsystem(DEFAULT_SUBSYSTEM_NQN)
        .expect("default subsystem");
    let addr = sub.policy().listeners[0];
    (daemon, addr)
}

/// A minimal NVMe/TCP host.
struct Host {
    s: TcpStream,
    cfg: PduConfig,
    cid: u16,
    cntlid: u16,
    maxh2cdata: u32,
    cattr: u8,
    saw_success_flag: bool,
}

/// What a command got back.
struct Reply {
    cqe: Cqe,
    data: Vec<u8>,
}

impl Host {
    fn connect_tcp(addr: SocketAddrV4, hdgst: bool, ddgst: bool) -> Host {
        let s = TcpStream::connect(addr).expect("tcp connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.set_nodelay(true).expect("nodelay");
        let mut h = Host {
            s,
            cfg: PduConfig::default(),
            cid: 0,
            cntlid: 0xffff,
            maxh2cdata: 0,
            cattr: 0,
            saw_success_flag: false,
        };
        h.send(&Pdu::IcReq(IcReq {
            hpda: 0,
            hdgst,
            ddgst,
            maxr2t: 0,
        }));
        let raw = h.recv_raw().expect("icresp");
        match pdu::decode(&raw, &h.cfg).expect("decode icresp").pdu {
            Pdu::IcResp(r) => {
                assert_eq!((r.hdgst, r.ddgst), (hdgst, ddgst));
                h.cfg.hdgst = r.hdgst;
                h.cfg.ddgst = r.ddgst;
                h.cfg.cpda = r.cpda;
                h.cfg.max_plen = u32::MAX;
                h.maxh2cdata = r.maxh2cdata;
            }
            p => panic!("expected ICResp, got {p:?}"),
        }
        h
    }

    fn send(&mut self, p: &Pdu<'_>) {
        let v = p.to_vec(&self.cfg).expect("encode");
        self.s.write_all(&v).expect("send");
    }

    fn send_raw(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send raw");
    }

    /// One whole PDU as bytes; None on EOF.
    fn recv_raw(&mut self) -> Option<Vec<u8>> {
        let mut ch = [0u8; 8];
        if self.s.read_exact(&mut ch).is_err() {
            return None;
        }
        let plen = CommonHeader::parse(&ch).expect("ch").plen as usize;
        assert!((8..(4 << 20)).contains(&plen), "plen {plen}");
        let mut buf = ch.to_vec();
        buf.resize(plen, 0);
        self.s.read_exact(&mut buf[8..]).expect("pdu body");
        Some(buf)
    }

    fn next_cid(&mut self) -> CommandId {
        self.cid = self.cid.wrapping_add(1);
        CommandId(self.cid)
    }

    /// Sends a command and collects its data and completion. `out` is the
    /// host data (in-capsule when `in_capsule`, else by R2T); `read_len`
    /// the controller-to-host data expected.
    fn command(
        &mut self,
        mut sqe: Sqe,
        out: Option<&[u8]>,
        in_capsule: bool,
        read_len: u32,
    ) -> Reply {
        let cid = self.next_cid();
        sqe.cid = cid;
        let sgl = match out {
            Some(d) if in_capsule => DataSgl::InCapsule {
                offset: 0,
                len: d.len() as u32,
            },
            Some(d) => DataSgl::Transport {
                len: d.len() as u32,
            },
            None => DataSgl::Transport { len: read_len },
        };
        sqe.dptr = sgl.encode();
        sqe.flags = 1 << 6;
        let capsule_data: &[u8] = match out {
            Some(d) if in_capsule => d,
            _ => &[],
        };
        self.send(&Pdu::CapsuleCmd(CapsuleCmd {
            sqe,
            data: capsule_data,
        }));
        let mut data = vec![0u8; read_len as usize];
        loop {
            let raw = self.recv_raw().expect("connection closed during command");
            let d = pdu::decode(&raw, &self.cfg).expect("decode");
            match d.pdu {
                Pdu::R2t(r) => {
                    assert_eq!(r.cid, cid);
                    let body = out.expect("R2T for a command without data");
                    let mut off = r.offset;
                    let end = r.offset + r.len;
                    while off < end {
                        let n = (end - off).min(self.maxh2cdata);
                        let chunk = &body[off as usize..(off + n) as usize];
                        self.send(&Pdu::H2CData(H2CData {
                            cid,
                            ttag: r.ttag,
                            offset: off,
                            last: off + n == end,
                            data: chunk,
                        }));
                        off += n;
                    }
                }
                Pdu::C2HData(c) => {
                    assert_eq!(c.cid, cid);
                    let o = c.offset as usize;
                    data[o..o + c.data.len()].copy_from_slice(c.data);
                    if c.success {
                        self.saw_success_flag = true;
                        return Reply {
                            cqe: Cqe::new(cid, Status::SUCCESS),
                            data,
                        };
                    }
                }
                Pdu::CapsuleResp(r) => {
                    if r.cqe.cid != cid {
                        panic!("unexpected completion {:?}", r.cqe);
                    }
                    return Reply { cqe: r.cqe, data };
                }
                p => panic!("unexpected PDU {p:?}"),
            }
        }
    }

    fn connect(&mut self, subnqn: &str, qid: u16, kato: u32) -> Cqe {
        let data = ConnectData {
            hostid: [7; 16],
            cntlid: CntlId(self.cntlid),
            subnqn: Nqn::new(subnqn).expect("nqn"),
            hostnqn: Nqn::new(HOSTNQN).expect("nqn"),
        }
        .encode();
        let sqe = ConnectCommand {
            cid: CommandId(0),
            recfmt: 0,
            qid: QueueId(qid),
            sqsize: if qid == 0 { 31 } else { 127 },
            cattr: self.cattr,
            kato,
            sgl: DataSgl::InCapsule {
                offset: 0,
                len: 1024,
            },
        }
        .to_sqe();
        let r = self.command(sqe, Some(&data), true, 0);
        if r.cqe.status.is_success() {
            self.cntlid = (r.cqe.dw0 & 0xffff) as u16;
        }
        r.cqe
    }

    fn prop_get(&mut self, offset: u32, size8: bool) -> u64 {
        let sqe = PropertyCommand {
            cid: CommandId(0),
            size8,
            offset,
            value: None,
        }
        .to_sqe();
        let r = self.command(sqe, None, false, 0);
        assert!(r.cqe.status.is_success(), "{:?}", r.cqe);
        u64::from(r.cqe.dw0) | (u64::from(r.cqe.dw1) << 32)
    }

    fn prop_set(&mut self, offset: u32, value: u64) -> Cqe {
        let sqe = PropertyCommand {
            cid: CommandId(0),
            size8: false,
            offset,
            value: Some(value),
        }
        .to_sqe();
        self.command(sqe, None, false, 0).cqe
    }

    fn enable(&mut self) {
        let cc = 1 | (6 << 16) | (4 << 20);
        assert!(self.prop_set(0x14, cc).status.is_success());
        assert_eq!(self.prop_get(0x1c, false) & 1, 1, "CSTS.RDY");
    }

    fn admin(&mut self, opcode: u8, nsid: u32, cdw: [u32; 6], read_len: u32) -> Reply {
        let mut sqe = Sqe::new(
            opcode,
            CommandId(0),
            Nsid(nsid),
            DataSgl::Transport { len: 0 },
        );
        sqe.cdw = cdw;
        self.command(sqe, None, false, read_len)
    }

    fn write(&mut self, lba: u64, data: &[u8], in_capsule: bool) -> Cqe {
        let mut sqe = Sqe::new(0x01, CommandId(0), Nsid(1), DataSgl::Transport { len: 0 });
        RwCommand {
            slba: Lba(lba),
            nlb: (data.len() / 512) as u32,
            fua: false,
            deac: false,
        }
        .fill_sqe(&mut sqe);
        self.command(sqe, Some(data), in_capsule, 0).cqe
    }

    fn read(&mut self, lba: u64, len: usize) -> Reply {
        let mut sqe = Sqe::new(0x02, CommandId(0), Nsid(1), DataSgl::Transport { len: 0 });
        RwCommand {
            slba: Lba(lba),
            nlb: (len / 512) as u32,
            fua: false,
            deac: false,
        }
        .fill_sqe(&mut sqe);
        self.command(sqe, None, false, len as u32)
    }

    /// Expects a C2HTermReq with `fes` (and `fei` if given), then EOF.
    fn expect_term(&mut self, fes: Fes, fei: Option<u32>) {
        let raw = self.recv_raw().expect("a C2HTermReq before the close");
        match pdu::decode(&raw, &self.cfg).expect("decode").pdu {
            Pdu::C2HTermReq(t) => {
                assert_eq!(t.fes, fes as u16, "FES");
                if let Some(fei) = fei {
                    assert_eq!(t.fei, fei, "FEI");
                }
            }
            p => panic!("expected C2HTermReq, got {p:?}"),
        }
        assert!(self.recv_raw().is_none(), "connection closed after TermReq");
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// An admin queue (enabled, 4 I/O queues granted) and one I/O queue.
fn session(addr: SocketAddrV4, hdgst: bool, ddgst: bool) -> (Host, Host) {
    let mut admin = Host::connect_tcp(addr, hdgst, ddgst);
    let c = admin.connect(DEFAULT_SUBSYSTEM_NQN, 0, 0);
    assert!(c.status.is_success(), "admin connect: {c:?}");
    admin.enable();
    let r = admin.admin(0x09, 0, [0x07, 3 | (3 << 16), 0, 0, 0, 0], 0);
    assert!(r.cqe.status.is_success());
    let mut io = Host::connect_tcp(addr, hdgst, ddgst);
    io.cntlid = admin.cntlid;
    let c = io.connect(DEFAULT_SUBSYSTEM_NQN, 1, 0);
    assert!(c.status.is_success(), "io connect: {c:?}");
    (admin, io)
}

fn end_to_end(hdgst: bool, ddgst: bool) {
    let dir = TempDir::new(&format!("e2e-{hdgst}-{ddgst}"));
    let (daemon, addr) = start(&dir.0);
    let (mut admin, mut io) = session(addr, hdgst, ddgst);

    // CAP and VS.
    let cap = admin.prop_get(0, true);
    assert_eq!(cap & 0xffff, 127, "MQES");
    assert_eq!(admin.prop_get(8, false), 0x0001_0400);
    // Identify controller and namespace.
    let id = admin.admin(0x06, 0, [1, 0, 0, 0, 0, 0], 4096);
    assert!(id.cqe.status.is_success());
    assert_eq!(id.data[77], 5, "MDTS matches a 128 KiB pool chunk");
    assert_eq!(
        &id.data[768..768 + DEFAULT_SUBSYSTEM_NQN.len()],
        DEFAULT_SUBSYSTEM_NQN.as_bytes()
    );
    assert_eq!(
        id.data[525] & 1,
        1,
        "file-backed volume: volatile write cache present"
    );
    let ns = admin.admin(0x06, 1, [0; 6], 4096);
    let nsze = u64::from_le_bytes(ns.data[0..8].try_into().expect("8"));
    assert_eq!(nsze, (1u64 << 30) / 512);
    let list = admin.admin(0x06, 0, [2, 0, 0, 0, 0, 0], 4096);
    assert_eq!(&list.data[0..8], &[1, 0, 0, 0, 0, 0, 0, 0]);

    // Writes in capsule and by R2T, read back.
    let small = pattern(1, 4096);
    assert!(io.write(8, &small, true).status.is_success());
    let big = pattern(2, 128 * 1024);
    assert!(io.write(1024, &big, false).status.is_success());
    assert_eq!(io.read(8, 4096).data, small);
    let r = io.read(1024, 128 * 1024);
    assert!(r.cqe.status.is_success());
    assert!(r.data == big, "R2T write reads back");
    // Flush.
    let f = io.admin(0x00, 1, [0; 6], 0);
    assert!(f.cqe.status.is_success());
    // Write Zeroes over the small write.
    let wz = io.admin(0x08, 1, [8, 0, 7, 0, 0, 0], 0);
    assert!(wz.cqe.status.is_success());
    assert!(io.read(8, 4096).data.iter().all(|&b| b == 0));
    // Dataset Management deallocate of part of the big write.
    let range = DsmRange {
        attributes: 0,
        nlb: 8,
        slba: Lba(1024),
    }
    .encode();
    let mut dsm = Sqe::new(0x09, CommandId(0), Nsid(1), DataSgl::Transport { len: 0 });
    dsm.cdw[0] = 0;
    dsm.cdw[1] = 1 << 2;
    assert!(io
        .command(dsm, Some(&range), true, 0)
        .cqe
        .status
        .is_success());
    let r = io.read(1024, 8192);
    assert!(r.data[..4096].iter().all(|&b| b == 0));
    assert_eq!(r.data[4096..], big[4096..8192]);
    // Out of range and unknown namespace.
    let e = io.write(nsze - 4, &small, true);
    assert_eq!(e.status, Status::LBA_OUT_OF_RANGE.with_dnr());
    let mut bad_ns = Sqe::new(0x00, CommandId(0), Nsid(9), DataSgl::Transport { len: 0 });
    bad_ns.cdw = [0; 6];
    assert_eq!(
        io.command(bad_ns, None, false, 0).cqe.status,
        Status::INVALID_NAMESPACE.with_dnr()
    );
    // SMART counts the host's I/O.
    let mut glp = Sqe::new(
        0x02,
        CommandId(0),
        Nsid::BROADCAST,
        DataSgl::Transport { len: 0 },
    );
    GetLogPage {
        cid: CommandId(0),
        nsid: Nsid::BROADCAST,
        lid: 2,
        lsp: 0,
        rae: false,
        numd: 128,
        offset: 0,
        lsi: 0,
    }
    .fill_sqe(&mut glp);
    let smart = admin.command(glp, None, false, 512);
    assert!(smart.cqe.status.is_success());
    let host_writes = u64::from_le_bytes(smart.data[80..88].try_into().expect("8"));
    assert!(host_writes >= 2, "{host_writes}");
    drop((admin, io));
    daemon.shutdown();
}

#[test]
fn end_to_end_without_digests() {
    end_to_end(false, false);
}

#[test]
fn end_to_end_with_header_and_data_digests() {
    end_to_end(true, true);
}

#[test]
fn discovery_log_lists_the_subsystem() {
    let dir = TempDir::new("disc");
    let (daemon, addr) = start(&dir.0);
    let mut h = Host::connect_tcp(addr, false, false);
    assert!(h.connect(DISCOVERY_NQN, 0, 0).status.is_success());
    assert!(h.prop_set(0x14, 1).status.is_success());
    let mut glp = Sqe::new(0x02, CommandId(0), Nsid(0), DataSgl::Transport { len: 0 });
    GetLogPage {
        cid: CommandId(0),
        nsid: Nsid(0),
        lid: 0x70,
        lsp: 0,
        rae: false,
        numd: 512,
        offset: 0,
        lsi: 0,
    }
    .fill_sqe(&mut glp);
    let r = h.command(glp, None, false, 2048);
    assert!(r.cqe.status.is_success());
    assert_eq!(
        u64::from_le_bytes(r.data[8..16].try_into().expect("8")),
        1,
        "NUMREC"
    );
    let e = &r.data[1024..2048];
    assert_eq!(e[0], 3, "TCP");
    assert_eq!(
        std::str::from_utf8(&e[32..64]).expect("ascii").trim(),
        addr.port().to_string()
    );
    assert_eq!(
        &e[256..256 + DEFAULT_SUBSYSTEM_NQN.len()],
        DEFAULT_SUBSYSTEM_NQN.as_bytes()
    );
    // A discovery log change notice when a subsystem appears.
    assert!(h
        .admin(0x09, 0, [0x0b, 1 << 31, 0, 0, 0, 0], 0)
        .cqe
        .status
        .is_success());
    let cid = h.next_cid();
    let aer = Sqe::new(0x0c, cid, Nsid(0), DataSgl::Transport { len: 0 });
    h.send(&Pdu::CapsuleCmd(CapsuleCmd {
        sqe: aer,
        data: &[],
    }));
    rpc(&dir.0)
        .call(
            "nvmf_create_subsystem",
            Some(json!({"nqn": "nqn.2026-11.io.mirrorpoint:new", "allow_any_host": true})),
        )
        .expect("create");
    let raw = h.recv_raw().expect("aen");
    match pdu::decode(&raw, &h.cfg).expect("decode").pdu {
        Pdu::CapsuleResp(r) => {
            assert_eq!(r.cqe.cid, cid);
            assert_eq!(r.cqe.dw0, 2 | (0xf0 << 8) | (0x70 << 16));
        }
        p => panic!("{p:?}"),
    }
    // No I/O queues on a discovery controller.
    let mut io = Host::connect_tcp(addr, false, false);
    io.cntlid = h.cntlid;
    assert!(!io.connect(DISCOVERY_NQN, 1, 0).status.is_success());
    daemon.shutdown();
}

fn rpc(dir: &Path) -> RpcClient {
    RpcClient::connect(dir.join("rpc.sock")).expect("rpc connect")
}

#[test]
fn hostile_pdus_end_only_their_connection() {
    let dir = TempDir::new("hostile");
    let (daemon, addr) = start(&dir.0);
    let (_admin, mut io) = session(addr, true, true);
    let acked = pattern(9, 8192);
    assert!(io.write(100, &acked, false).status.is_success());

    // A PDU before ICReq: sequence error.
    let mut h = Host::connect_tcp_raw(addr);
    let sqe = Sqe::new(0x00, CommandId(1), Nsid(1), DataSgl::Transport { len: 0 });
    h.send(&Pdu::CapsuleCmd(CapsuleCmd { sqe, data: &[] }));
    h.expect_term(Fes::PduSequenceError, None);

    // Unknown PDU type: invalid header field at byte 0.
    let mut h = Host::connect_tcp(addr, false, false);
    h.send_raw(&[0x7e, 0, 8, 0, 8, 0, 0, 0]);
    h.expect_term(Fes::InvalidHeaderField, Some(0));

    // Oversized PLEN: data transfer limit exceeded.
    let mut h = Host::connect_tcp(addr, false, false);
    h.send_raw(&[0x04, 0, 72, 72, 0, 0, 0, 0x10]);
    h.expect_term(Fes::DataLimitExceeded, None);

    // Bad header digest: FES 3, FEI = the digest received.
    let mut h = Host::connect_tcp(addr, true, false);
    let sqe = Sqe::new(0x00, CommandId(1), Nsid(1), DataSgl::Transport { len: 0 });
    let mut v = Pdu::CapsuleCmd(CapsuleCmd { sqe, data: &[] })
        .to_vec(&h.cfg)
        .expect("encode");
    v[72] ^= 0xff;
    let got = u32::from_le_bytes([v[72], v[73], v[74], v[75]]);
    h.send_raw(&v);
    h.expect_term(Fes::HeaderDigestError, Some(got));

    // H2CData answering no R2T: invalid field (TTAG at byte 10).
    let mut h = Host::connect_tcp(addr, false, false);
    h.send(&Pdu::H2CData(H2CData {
        cid: CommandId(3),
        ttag: 77,
        offset: 0,
        last: true,
        data: &[0u8; 512],
    }));
    h.expect_term(Fes::InvalidHeaderField, Some(10));

    // Out-of-order H2CData inside a real R2T window: data out of range.
    let mut bad = Host::connect_tcp(addr, false, false);
    bad.cntlid = io.cntlid;
    assert!(bad.connect(DEFAULT_SUBSYSTEM_NQN, 2, 0).status.is_success());
    let mut sqe = Sqe::new(
        0x01,
        CommandId(5),
        Nsid(1),
        DataSgl::Transport { len: 8192 },
    );
    RwCommand {
        slba: Lba(100),
        nlb: 16,
        fua: false,
        deac: false,
    }
    .fill_sqe(&mut sqe);
    bad.send(&Pdu::CapsuleCmd(CapsuleCmd { sqe, data: &[] }));
    let raw = bad.recv_raw().expect("r2t");
    let r2t = match pdu::decode(&raw, &bad.cfg).expect("decode").pdu {
        Pdu::R2t(r) => r,
        p => panic!("{p:?}"),
    };
    bad.send(&Pdu::H2CData(H2CData {
        cid: CommandId(5),
        ttag: r2t.ttag,
        offset: 4096,
        last: false,
        data: &[0xee; 4096],
    }));
    bad.expect_term(Fes::DataOutOfRange, None);

    // Truncated PDU then close: nothing to answer, nothing breaks.
    let mut h = Host::connect_tcp(addr, false, false);
    h.send_raw(&[0x04, 0, 72, 0, 72, 0, 0, 0, 1, 2, 3]);
    drop(h);

    // Bad data digest on an in-capsule write: the command fails, the
    // connection lives on, and nothing was written.
    let mut sqe = Sqe::new(
        0x01,
        CommandId(40),
        Nsid(1),
        DataSgl::InCapsule {
            offset: 0,
            len: 4096,
        },
    );
    RwCommand {
        slba: Lba(100),
        nlb: 8,
        fua: false,
        deac: false,
    }
    .fill_sqe(&mut sqe);
    let junk = [0xabu8; 4096];
    let mut v = Pdu::CapsuleCmd(CapsuleCmd { sqe, data: &junk })
        .to_vec(&io.cfg)
        .expect("encode");
    let n = v.len();
    v[n - 1] ^= 0x01;
    io.send_raw(&v);
    let raw = io.recv_raw().expect("resp");
    let resp = pdu::decode(&raw, &io.cfg).expect("decode");
    match resp.pdu {
        Pdu::CapsuleResp(r) => assert_eq!(r.cqe.status, Status::TRANSIENT_TRANSPORT_ERROR),
        p => panic!("{p:?}"),
    }

    // Bad data digest on H2CData: the write fails, nothing is written.
    let mut sqe = Sqe::new(
        0x01,
        CommandId(41),
        Nsid(1),
        DataSgl::Transport { len: 4096 },
    );
    RwCommand {
        slba: Lba(100),
        nlb: 8,
        fua: false,
        deac: false,
    }
    .fill_sqe(&mut sqe);
    io.send(&Pdu::CapsuleCmd(CapsuleCmd { sqe, data: &[] }));
    let raw = io.recv_raw().expect("r2t");
    let r2t = match pdu::decode(&raw, &io.cfg).expect("decode").pdu {
        Pdu::R2t(r) => r,
        p => panic!("{p:?}"),
    };
    let mut v = Pdu::H2CData(H2CData {
        cid: CommandId(41),
        ttag: r2t.ttag,
        offset: 0,
        last: true,
        data: &junk,
    })
    .to_vec(&io.cfg)
    .expect("encode");
    let n = v.len();
    v[n - 2] ^= 0x80;
    io.send_raw(&v);
    let raw = io.recv_raw().expect("resp");
    match pdu::decode(&raw, &io.cfg).expect("decode").pdu {
        Pdu::CapsuleResp(r) => {
            assert_eq!(r.cqe.cid, CommandId(41));
            assert_eq!(r.cqe.status, Status::TRANSIENT_TRANSPORT_ERROR);
        }
        p => panic!("{p:?}"),
    }

    // The good connection still works and acknowledged data is intact.
    assert_eq!(io.read(100, 8192).data, acked);
    let more = pattern(11, 4096);
    assert!(io.write(200, &more, true).status.is_success());
    assert_eq!(io.read(200, 4096).data, more);
    let subs = rpc(&dir.0).call("nvmf_get_subsystems", None).expect("rpc");
    assert_eq!(subs[1]["nqn"], DEFAULT_SUBSYSTEM_NQN);
    daemon.shutdown();
}

impl Host {
    /// A TCP connection with no IC exchange.
    fn connect_tcp_raw(addr: SocketAddrV4) -> Host {
        let s = TcpStream::connect(addr).expect("tcp connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        Host {
            s,
            cfg: PduConfig::default(),
            cid: 0,
            cntlid: 0xffff,
            maxh2cdata: 4096,
            cattr: 0,
            saw_success_flag: false,
        }
    }
}

fn rpc_err(r: Result<Value, ClientError>) -> i32 {
    match r {
        Err(ClientError::Rpc(e)) => e.code,
        other => panic!("expected an RPC error, got {other:?}"),
    }
}

#[test]
fn hosts_keep_alive_events_and_config() {
    let dir = TempDir::new("hosts");
    let (daemon, addr) = start(&dir.0);
    let mut c = rpc(&dir.0);
    let nqn = "nqn.2026-11.io.mirrorpoint:locked";
    c.call(
        "bdev_malloc_create",
        Some(json!({"name": "m1", "num_blocks": 2048, "block_size": 512})),
    )
    .expect("malloc");
    c.call(
        "nvmf_create_subsystem",
        Some(json!({"nqn": nqn, "serial_number": "SN-LOCKED"})),
    )
    .expect("create");
    assert_eq!(
        rpc_err(c.call("nvmf_create_subsystem", Some(json!({"nqn": nqn})))),
        -libc::EEXIST
    );
    assert_eq!(
        rpc_err(c.call("nvmf_create_subsystem", Some(json!({"nqn": "bad nqn"})))),
        -32602
    );
    assert_eq!(
        rpc_err(c.call(
            "nvmf_subsystem_add_ns",
            Some(json!({"nqn": nqn, "namespace": {"bdev_name": "ghost"}}))
        )),
        -libc::ENODEV
    );
    let nsid = c
        .call(
            "nvmf_subsystem_add_ns",
            Some(json!({"nqn": nqn, "namespace": {"bdev_name": "m1"}})),
        )
        .expect("add ns");
    assert_eq!(nsid, 1);
    let la = c
        .call(
            "nvmf_subsystem_add_listener",
            Some(json!({"nqn": nqn, "listen_address": {"trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1", "trsvcid": "0"}})),
        )
        .expect("listener");
    let port: u16 = la["trsvcid"].as_str().expect("port").parse().expect("port");
    let laddr = SocketAddrV4::new([127, 0, 0, 1].into(), port);

    // Not allowed, then allowed.
    let mut h = Host::connect_tcp(laddr, false, false);
    assert_eq!(
        h.connect(nqn, 0, 0).status,
        Status::CONNECT_INVALID_HOST.with_dnr()
    );
    // The default subsystem is not reachable on this port.
    let mut h2 = Host::connect_tcp(laddr, false, false);
    assert!(!h2.connect(DEFAULT_SUBSYSTEM_NQN, 0, 0).status.is_success());
    let _ = addr;
    c.call(
        "nvmf_subsystem_add_host",
        Some(json!({"nqn": nqn, "host": HOSTNQN})),
    )
    .expect("add host");
    let mut h = Host::connect_tcp(laddr, false, false);
    assert!(h.connect(nqn, 0, 0).status.is_success());
    h.enable();

    let ctrls = c
        .call("nvmf_subsystem_get_controllers", Some(json!({"nqn": nqn})))
        .expect("controllers");
    assert_eq!(ctrls.as_array().map(Vec::len), Some(1));
    assert_eq!(ctrls[0]["hostnqn"], HOSTNQN);
    assert_eq!(ctrls[0]["cntlid"], h.cntlid);

    // Asynchronous event on a namespace change.
    assert!(h
        .admin(0x09, 0, [0x0b, 1 << 8, 0, 0, 0, 0], 0)
        .cqe
        .status
        .is_success());
    let cid = h.next_cid();
    let mut aer = Sqe::new(0x0c, cid, Nsid(0), DataSgl::Transport { len: 0 });
    aer.cdw = [0; 6];
    h.send(&Pdu::CapsuleCmd(CapsuleCmd {
        sqe: aer,
        data: &[],
    }));
    c.call(
        "bdev_malloc_create",
        Some(json!({"name": "m2", "num_blocks": 2048, "block_size": 512})),
    )
    .expect("malloc");
    c.call(
        "nvmf_subsystem_add_ns",
        Some(json!({"nqn": nqn, "namespace": {"bdev_name": "m2", "nsid": 5}})),
    )
    .expect("add ns 5");
    let raw = h.recv_raw().expect("aen");
    match pdu::decode(&raw, &h.cfg).expect("decode").pdu {
        Pdu::CapsuleResp(r) => {
            assert_eq!(r.cqe.cid, cid);
            assert_eq!(r.cqe.dw0, 2 | (4 << 16));
        }
        p => panic!("{p:?}"),
    }

    // save_config has the nvmf section, replayed after bdev.
    let cfg = c.call("save_config", None).expect("save");
    let nvmf = cfg["subsystems"]
        .as_array()
        .expect("subsystems")
        .iter()
        .find(|s| s["subsystem"] == "nvmf")
        .expect("nvmf section");
    let methods: Vec<&str> = nvmf["config"]
        .as_array()
        .expect("calls")
        .iter()
        .filter_map(|c| c["method"].as_str())
        .collect();
    assert!(methods.contains(&"nvmf_subsystem_add_host"), "{methods:?}");
    assert_eq!(
        methods
            .iter()
            .filter(|m| **m == "nvmf_subsystem_add_ns")
            .count(),
        3
    );

    // Deleting a volume hot-removes its namespace.
    c.call("bdev_delete", Some(json!({"name": "m2"})))
        .expect("delete m2");
    let subs = c
        .call("nvmf_get_subsystems", Some(json!({"nqn": nqn})))
        .expect("subsystems");
    let nsids: Vec<u64> = subs[0]["namespaces"]
        .as_array()
        .expect("namespaces")
        .iter()
        .filter_map(|n| n["nsid"].as_u64())
        .collect();
    assert_eq!(nsids, vec![1]);

    // Keep-alive: a controller with KATO 1 s and no Keep Alive is torn down,
    // its I/O queue with it.
    let mut k = Host::connect_tcp(laddr, false, false);
    assert!(k.connect(nqn, 0, 1000).status.is_success());
    k.enable();
    let mut kio = Host::connect_tcp(laddr, false, false);
    kio.cntlid = k.cntlid;
    assert!(kio.connect(nqn, 1, 0).status.is_success());
    let t0 = Instant::now();
    assert!(k.recv_raw().is_none(), "admin queue closed");
    assert!(kio.recv_raw().is_none(), "I/O queue closed");
    let waited = t0.elapsed();
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    // Keep Alive keeps another one alive past its KATO.
    let mut ok = Host::connect_tcp(laddr, false, false);
    assert!(ok.connect(nqn, 0, 1000).status.is_success());
    ok.enable();
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(400));
        assert!(ok.admin(0x18, 0, [0; 6], 0).cqe.status.is_success());
    }

    // Delete: the controller's connection closes.
    c.call("nvmf_delete_subsystem", Some(json!({"nqn": nqn})))
        .expect("delete");
    assert!(h.recv_raw().is_none());
    assert_eq!(
        rpc_err(c.call("nvmf_delete_subsystem", Some(json!({"nqn": nqn})))),
        -libc::ENODEV
    );
    drop(cfg);
    daemon.shutdown();
}

/// Many R2T writes in flight at once on a pool with fewer chunks than
/// writes: writes without a chunk wait for one (the connection keeps
/// receiving the data of the others), then all complete and read back.
#[test]
fn pipelined_writes_wait_for_pool_chunks() {
    let dir = TempDir::new("pipeline");
    let mut opts = options(&dir.0);
    opts.pool.chunk_count = 6;
    let daemon = Daemon::start(opts).expect("daemon starts");
    let addr = daemon
        .state()
        .nvmf
        .subsystem(DEFAULT_SUBSYSTEM_NQN)
        .expect("sub")
        .policy()
        .listeners[0];
    let (_admin, mut io) = session(addr, false, true);
    const N: u16 = 12;
    const LEN: usize = 64 * 1024;
    let data: Vec<Vec<u8>> = (0..N).map(|i| pattern(i as u8 + 50, LEN)).collect();
    for i in 0..N {
        let mut sqe = Sqe::new(
            0x01,
            CommandId(100 + i),
            Nsid(1),
            DataSgl::Transport { len: LEN as u32 },
        );
        RwCommand {
            slba: Lba(u64::from(i) * 128),
            nlb: (LEN / 512) as u32,
            fua: false,
            deac: false,
        }
        .fill_sqe(&mut sqe);
        io.send(&Pdu::CapsuleCmd(CapsuleCmd { sqe, data: &[] }));
    }
    let mut done = 0;
    while done < N {
        let raw = io.recv_raw().expect("pdu");
        match pdu::decode(&raw, &io.cfg).expect("decode").pdu {
            Pdu::R2t(r) => {
                let body = &data[(r.cid.0 - 100) as usize];
                let mut off = r.offset;
                let end = r.offset + r.len;
                while off < end {
                    let n = (end - off).min(io.maxh2cdata);
                    io.send(&Pdu::H2CData(H2CData {
                        cid: r.cid,
                        ttag: r.ttag,
                        offset: off,
                        last: off + n == end,
                        data: &body[off as usize..(off + n) as usize],
                    }));
                    off += n;
                }
            }
            Pdu::CapsuleResp(r) => {
                assert!(r.cqe.status.is_success(), "{:?}", r.cqe);
                done += 1;
            }
            p => panic!("{p:?}"),
        }
    }
    io.cid = 200;
    for i in 0..N {
        let r = io.read(u64::from(i) * 128, LEN);
        assert!(r.data == data[i as usize], "write {i} reads back");
    }
    daemon.shutdown();
}

/// With SQ flow control disabled (Connect CATTR bit 2) and no data digest,
/// a successful read ends with a C2HData carrying SUCCESS and no response
/// capsule; with flow control on it never does.
#[test]
fn c2h_success_flag_only_without_sq_flow_control() {
    let dir = TempDir::new("success");
    let (daemon, addr) = start(&dir.0);
    let (admin, mut io) = session(addr, false, false);
    let d = pattern(3, 8192);
    // Above in_capsule_data_size (4096) in-capsule data is refused on an I/O queue.
    assert_eq!(
        io.write(0, &d, true).status,
        Status::DATA_SGL_LENGTH_INVALID.with_dnr()
    );
    assert!(io.write(0, &d, false).status.is_success());
    assert_eq!(io.read(0, 8192).data, d);
    assert!(!io.saw_success_flag);
    let mut fast = Host::connect_tcp(addr, false, false);
    fast.cntlid = admin.cntlid;
    fast.cattr = 1 << 2;
    assert!(fast
        .connect(DEFAULT_SUBSYSTEM_NQN, 2, 0)
        .status
        .is_success());
    assert_eq!(fast.read(0, 8192).data, d);
    assert!(fast.saw_success_flag);
    // A failed read still gets a response capsule.
    let e = fast.read((1u64 << 30) / 512, 4096);
    assert_eq!(e.cqe.status, Status::LBA_OUT_OF_RANGE.with_dnr());
    // And the next command on the queue works (the SUCCESS path freed the CID).
    assert_eq!(fast.read(0, 4096).data, d[..4096]);
    daemon.shutdown();
}

/// Transport options from a config file: a larger in-capsule size and a
/// smaller MAXH2CDATA, honoured on the wire and written back by save_config.
#[test]
fn transport_options_from_a_config_file() {
    let dir = TempDir::new("transport");
    let nqn = "nqn.2026-11.io.mirrorpoint:cfg";
    let cfg = json!({"subsystems": [
        {"subsystem": "bdev", "config": [
            {"method": "bdev_malloc_create", "params": {"name": "m0", "num_blocks": 8192, "block_size": 512}}]},
        {"subsystem": "nvmf", "config": [
            {"method": "nvmf_create_transport", "params": {"trtype": "TCP", "in_capsule_data_size": 8192, "io_unit_size": 16384, "max_io_size": 65536}},
            {"method": "nvmf_create_subsystem", "params": {"nqn": nqn, "allow_any_host": true}},
            {"method": "nvmf_subsystem_add_ns", "params": {"nqn": nqn, "namespace": {"bdev_name": "m0"}}},
            {"method": "nvmf_subsystem_add_listener", "params": {"nqn": nqn, "listen_address":
                {"trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1", "trsvcid": "0"}}}]}
    ]});
    let path = dir.0.join("cfg.json");
    std::fs::write(&path, serde_json::to_vec(&cfg).expect("json")).expect("write cfg");
    let mut opts = options(&dir.0);
    opts.config_file = Some(path);
    let daemon = Daemon::start(opts).expect("daemon starts from config");
    let addr = daemon
        .state()
        .nvmf
        .subsystem(nqn)
        .expect("sub")
        .policy()
        .listeners[0];
    let mut admin = Host::connect_tcp(addr, false, false);
    assert!(admin.connect(nqn, 0, 0).status.is_success());
    admin.enable();
    assert_eq!(admin.maxh2cdata, 16384);
    let id = admin.admin(0x06, 0, [1, 0, 0, 0, 0, 0], 4096);
    assert_eq!(id.data[77], 4, "MDTS 64 KiB");
    let ioccsz = u32::from_le_bytes(id.data[1792..1796].try_into().expect("4"));
    assert_eq!(ioccsz, (8192 + 64) / 16);
    assert!(admin
        .admin(0x09, 0, [0x07, 0, 0, 0, 0, 0], 0)
        .cqe
        .status
        .is_success());
    let mut io = Host::connect_tcp(addr, false, false);
    io.cntlid = admin.cntlid;
    assert!(io.connect(nqn, 1, 0).status.is_success());
    let small = pattern(5, 8192);
    assert!(io.write(0, &small, true).status.is_success());
    let big = pattern(6, 65536);
    assert!(
        io.write(64, &big, false).status.is_success(),
        "several H2CData per R2T"
    );
    assert_eq!(io.read(0, 8192).data, small);
    assert!(io.read(64, 65536).data == big);
    // Larger than MDTS: refused.
    let too_big = vec![0u8; 131072];
    assert_eq!(
        io.write(512, &too_big, false).status,
        Status::DATA_SGL_LENGTH_INVALID.with_dnr()
    );
    let mut c = rpc(&dir.0);
    let t = c.call("nvmf_get_transports", None).expect("transports");
    assert_eq!(t[0]["in_capsule_data_size"], 8192);
    assert_eq!(
        rpc_err(c.call("nvmf_create_transport", Some(json!({"trtype": "TCP"})))),
        -libc::EEXIST
    );
    let saved = c.call("save_config", None).expect("save");
    let text = saved.to_string();
    assert!(text.contains("nvmf_create_transport"), "{text}");
    daemon.shutdown();
}

/// Many tiny PDUs in one TCP segment (16-byte H2CData PDUs followed by a
/// capsule): the receiver's greedy head reads must split them exactly.
fn tiny_pdus(hdgst: bool, ddgst: bool) {
    let dir = TempDir::new(&format!("tiny-{hdgst}-{ddgst}"));
    let (daemon, addr) = start(&dir.0);
    let (_admin, mut io) = session(addr, hdgst, ddgst);
    let data = pattern(77, 512);
    let mut sqe = Sqe::new(0x01, CommandId(7), Nsid(1), DataSgl::Transport { len: 512 });
    RwCommand {
        slba: Lba(300),
        nlb: 1,
        fua: false,
        deac: false,
    }
    .fill_sqe(&mut sqe);
    io.send(&Pdu::CapsuleCmd(CapsuleCmd { sqe, data: &[] }));
    let raw = io.recv_raw().expect("r2t");
    let r2t = match pdu::decode(&raw, &io.cfg).expect("decode").pdu {
        Pdu::R2t(r) => r,
        p => panic!("{p:?}"),
    };
    assert_eq!((r2t.offset, r2t.len), (0, 512));
    let mut wire = Vec::new();
    for (i, chunk) in data.chunks(16).enumerate() {
        let p = Pdu::H2CData(H2CData {
            cid: CommandId(7),
            ttag: r2t.ttag,
            offset: (i * 16) as u32,
            last: (i + 1) * 16 == data.len(),
            data: chunk,
        });
        p.encode(&io.cfg, &mut wire).expect("encode");
    }
    let flush = Sqe::new(0x00, CommandId(8), Nsid(1), DataSgl::Transport { len: 0 });
    Pdu::CapsuleCmd(CapsuleCmd {
        sqe: flush,
        data: &[],
    })
    .encode(&io.cfg, &mut wire)
    .expect("encode");
    io.send_raw(&wire);
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let raw = io.recv_raw().expect("resp");
        match pdu::decode(&raw, &io.cfg).expect("decode").pdu {
            Pdu::CapsuleResp(r) => {
                assert!(r.cqe.status.is_success(), "{:?}", r.cqe);
                seen.push(r.cqe.cid.0);
            }
            p => panic!("{p:?}"),
        }
    }
    seen.sort();
    assert_eq!(seen, vec![7, 8]);
    io.cid = 100;
    assert_eq!(io.read(300, 512).data, data);
    daemon.shutdown();
}

#[test]
fn tiny_pdus_back_to_back() {
    tiny_pdus(false, false);
}

#[test]
fn tiny_pdus_back_to_back_with_digests() {
    tiny_pdus(true, true);
}

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Sends random commands (random opcode, NSID, CDWs, flags; no data or a
/// little in-capsule data) on a queue and collects whatever comes back
/// until each is answered or the connection closes. Returns the number
/// answered.
fn random_commands(h: &mut Host, rng: &mut Rng, n: usize, opcodes: &[u8]) -> usize {
    let mut answered = 0;
    for i in 0..n {
        let cid = CommandId(1000 + i as u16);
        let opcode = if rng.below(4) == 0 {
            rng.next() as u8
        } else {
            opcodes[rng.below(opcodes.len() as u64) as usize]
        };
        let data = if rng.below(3) == 0 {
            let n = rng.below(257) as usize;
            rng.bytes(n)
        } else {
            Vec::new()
        };
        let sgl = if data.is_empty() {
            DataSgl::Transport { len: 0 }
        } else {
            DataSgl::InCapsule {
                offset: 0,
                len: data.len() as u32,
            }
        };
        let nsid = match rng.below(4) {
            0 => 0,
            1 => rng.next() as u32,
            _ => 1,
        };
        let mut sqe = Sqe::new(opcode, cid, Nsid(nsid), sgl);
        for c in sqe.cdw.iter_mut() {
            *c = match rng.below(3) {
                0 => 0,
                1 => rng.below(64) as u32,
                _ => rng.next() as u32,
            };
        }
        // Never lower the keep-alive timer: the test must not race it.
        if opcode == 0x09 && sqe.cdw[0] & 0xff == 0x0f {
            sqe.cdw[0] = 0x07;
        }
        if rng.below(8) == 0 {
            sqe.flags = rng.next() as u8;
        }
        let mut wire = Vec::new();
        if Pdu::CapsuleCmd(CapsuleCmd { sqe, data: &data })
            .encode(&h.cfg, &mut wire)
            .is_err()
        {
            continue;
        }
        if h.s.write_all(&wire).is_err() {
            return answered;
        }
        // An AER is held: do not wait for it.
        if opcode == 0x0c {
            continue;
        }
        loop {
            let Some(raw) = h.recv_raw() else {
                return answered;
            };
            match pdu::decode(&raw, &h.cfg)
                .expect("the target's PDUs decode")
                .pdu
            {
                Pdu::CapsuleResp(r) if r.cqe.cid == cid => {
                    answered += 1;
                    break;
                }
                Pdu::CapsuleResp(_) => {} // a held AER completing
                Pdu::C2HData(d) if d.cid == cid && d.success => {
                    answered += 1;
                    break;
                }
                Pdu::C2HData(_) => {}
                Pdu::C2HTermReq(_) => return answered,
                p => panic!("unexpected {p:?}"),
            }
        }
    }
    answered
}

/// Random commands on the admin and I/O queues and random byte streams on
/// fresh connections never take the target down: afterwards a new session
/// works and data written before is intact.
#[test]
fn random_commands_and_streams_do_not_hurt_the_target() {
    let dir = TempDir::new("random");
    let (daemon, addr) = start(&dir.0);
    let (_keep_admin, mut keep) = session(addr, false, false);
    let acked = pattern(42, 4096);
    assert!(keep.write(2_000_000, &acked, true).status.is_success());
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for round in 0..4 {
        let (mut admin, mut io) = session(addr, round % 2 == 1, round % 2 == 1);
        let a = random_commands(
            &mut admin,
            &mut rng,
            150,
            &[0x02, 0x06, 0x08, 0x09, 0x0a, 0x0c, 0x18, 0x7f],
        );
        let b = random_commands(
            &mut io,
            &mut rng,
            150,
            &[0x00, 0x01, 0x02, 0x08, 0x09, 0x7f],
        );
        assert!(a + b >= 150, "round {round}: only {a} + {b} answered");
    }
    for _ in 0..30 {
        let mut h = if rng.below(2) == 0 {
            Host::connect_tcp(addr, rng.below(2) == 0, rng.below(2) == 0)
        } else {
            Host::connect_tcp_raw(addr)
        };
        let n = rng.below(600) as usize;
        let mut junk = rng.bytes(n);
        if rng.below(2) == 0 && junk.len() >= 8 {
            // A plausible common header in front of random bytes.
            let ty = [0x00, 0x02, 0x04, 0x06][rng.below(4) as usize];
            let hlen = [128u8, 24, 72, 24][(ty / 2) as usize];
            junk[0] = ty;
            junk[2] = hlen;
            let plen = (junk.len() as u32).max(u32::from(hlen));
            junk[4..8].copy_from_slice(&plen.to_le_bytes());
        }
        let _ = h.s.write_all(&junk);
        let _ = h.s.shutdown(std::net::Shutdown::Write);
        while h.recv_raw().is_some() {}
    }
    // The target is fine: the old session and a new one work.
    assert_eq!(keep.read(2_000_000, 4096).data, acked);
    let (_a, mut fresh) = session(addr, true, true);
    assert_eq!(fresh.read(2_000_000, 4096).data, acked);
    daemon.shutdown();
}

/// Host Write Commands from the controller's SMART log.
fn host_writes(admin: &mut Host) -> u64 {
    // Get Log Page, SMART / Health (LID 2), 512 bytes (NUMDL 127), all namespaces.
    let r = admin.admin(0x02, 0xffff_ffff, [0x02 | (127 << 16), 0, 0, 0, 0, 0], 512);
    assert!(r.cqe.status.is_success(), "{:?}", r.cqe);
    let mut b = [0u8; 8];
    b.copy_from_slice(&r.data[80..88]);
    u64::from_le_bytes(b)
}

/// I/O commands still in flight when the host closes its side are run to
/// completion: the connection's command driver outlives its receive loop.
/// A burst of in-capsule writes to the (io_uring, file-backed) default
/// volume, then FIN right behind it; every write the target received is
/// counted by the controller (it counts a write only once the volume has
/// completed it) and reads back on a new I/O queue.
#[test]
fn in_flight_writes_finish_after_the_host_closes() {
    let dir = TempDir::new("drain");
    let (daemon, addr) = start(&dir.0);
    let (mut admin, mut io) = session(addr, false, false);
    const N: u16 = 96;
    let data: Vec<Vec<u8>> = (0..N).map(|i| pattern(i as u8 + 7, 4096)).collect();
    let mut burst = Vec::new();
    for i in 0..N {
        let sgl = DataSgl::InCapsule {
            offset: 0,
            len: 4096,
        };
        let mut sqe = Sqe::new(0x01, CommandId(300 + i), Nsid(1), sgl);
        RwCommand {
            slba: Lba(u64::from(i) * 8),
            nlb: 8,
            fua: false,
            deac: false,
        }
        .fill_sqe(&mut sqe);
        sqe.dptr = sgl.encode();
        sqe.flags = 1 << 6;
        let capsule = Pdu::CapsuleCmd(CapsuleCmd {
            sqe,
            data: &data[usize::from(i)],
        });
        burst.extend(capsule.to_vec(&io.cfg).expect("encode"));
    }
    io.send_raw(&burst);
    io.s.shutdown(std::net::Shutdown::Write).expect("FIN");
    // Whatever the target answers before it closes its side.
    while io.recv_raw().is_some() {}
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = host_writes(&mut admin);
        assert!(n <= u64::from(N), "{n} writes counted");
        if n == u64::from(N) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {n} of {N} received writes completed after the close"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut io2 = Host::connect_tcp(addr, false, false);
    io2.cntlid = admin.cntlid;
    let c = io2.connect(DEFAULT_SUBSYSTEM_NQN, 2, 0);
    assert!(c.status.is_success(), "second I/O queue: {c:?}");
    for i in 0..N {
        let r = io2.read(u64::from(i) * 8, 4096);
        assert!(r.cqe.status.is_success(), "{:?}", r.cqe);
        assert!(r.data == data[usize::from(i)], "write {i} reads back");
    }
    daemon.shutdown();
}

/// Encodes in-capsule 4 KiB writes `cids` (at LBA 8 * (cid - 300) + 64)
/// into `wire`; the one with CID `bad_ns` goes to NSID 99, which does not
/// exist. Returns the (LBA, data) of the others.
fn burst_of_writes(
    io: &Host,
    cids: std::ops::Range<u16>,
    bad_ns: Option<u16>,
    wire: &mut Vec<u8>,
) -> Vec<(u64, Vec<u8>)> {
    let mut good = Vec::new();
    for cid in cids {
        let nsid = if Some(cid) == bad_ns { 99 } else { 1 };
        let lba = u64::from(cid - 300) * 8 + 64;
        let data = pattern(cid as u8, 4096);
        let mut sqe = Sqe::new(
            0x01,
            CommandId(cid),
            Nsid(nsid),
            DataSgl::InCapsule {
                offset: 0,
                len: 4096,
            },
        );
        RwCommand {
            slba: Lba(lba),
            nlb: 8,
            fua: false,
            deac: false,
        }
        .fill_sqe(&mut sqe);
        let p = Pdu::CapsuleCmd(CapsuleCmd { sqe, data: &data });
        wire.extend(p.to_vec(&io.cfg).expect("encode"));
        if nsid == 1 {
            good.push((lba, data));
        }
    }
    good
}

/// Bursts of in-capsule 4 KiB writes, which the target takes with batch
/// receives. First, a write to a namespace that does not exist in the
/// middle of one: it gets its own error status, every other write succeeds
/// and reads back. Then an unknown PDU type right behind a burst: it ends
/// only this connection, with the right C2HTermReq, and every write
/// acknowledged before it reads back from another connection.
#[test]
fn a_bad_pdu_inside_a_batch_of_writes_ends_only_its_connection() {
    let dir = TempDir::new("batchbad");
    let (daemon, addr) = start(&dir.0);
    let (_admin, mut io) = session(addr, false, false);
    // One write first, so the queue has seen in-capsule data.
    assert!(io.write(0, &pattern(1, 4096), true).status.is_success());
    let mut wire = Vec::new();
    let good = burst_of_writes(&io, 300..313, Some(306), &mut wire);
    io.send_raw(&wire);
    let (mut ok, mut failed) = (0, 0);
    while ok + failed < 13 {
        let raw = io.recv_raw().expect("an answer");
        match pdu::decode(&raw, &io.cfg).expect("decode").pdu {
            Pdu::CapsuleResp(r) if r.cqe.cid == CommandId(306) => {
                assert!(!r.cqe.status.is_success(), "the write to NSID 99 fails");
                failed += 1;
            }
            Pdu::CapsuleResp(r) => {
                assert!(r.cqe.status.is_success(), "{:?}", r.cqe);
                ok += 1;
            }
            p => panic!("{p:?}"),
        }
    }
    assert_eq!((ok, failed), (12, 1));
    let (_admin2, mut other) = session(addr, false, false);
    for (lba, data) in &good {
        let r = other.read(*lba, 4096);
        assert!(r.data == *data, "the write at LBA {lba} reads back");
    }

    let mut wire = Vec::new();
    let sent = burst_of_writes(&io, 320..332, None, &mut wire);
    wire.extend([0x7e, 0, 8, 0, 8, 0, 0, 0]);
    io.send_raw(&wire);
    let mut acked = Vec::new();
    loop {
        let raw = io.recv_raw().expect("answers, then a C2HTermReq");
        match pdu::decode(&raw, &io.cfg).expect("decode").pdu {
            Pdu::CapsuleResp(r) => {
                assert!(r.cqe.status.is_success(), "{:?}", r.cqe);
                acked.push(r.cqe.cid.0);
            }
            Pdu::C2HTermReq(t) => {
                assert_eq!(t.fes, Fes::InvalidHeaderField as u16);
                break;
            }
            p => panic!("{p:?}"),
        }
    }
    assert!(io.recv_raw().is_none(), "connection closed after TermReq");
    for cid in acked {
        let (lba, data) = &sent[usize::from(cid - 320)];
        let r = other.read(*lba, 4096);
        assert!(
            r.data == *data,
            "the acknowledged write at LBA {lba} reads back"
        );
    }
    daemon.shutdown();
}
