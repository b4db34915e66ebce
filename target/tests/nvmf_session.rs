//! An admin-queue session as a Linux nvme-tcp host drives it, played through
//! the public sans-IO API only: ICReq/ICResp with digests, Fabrics Connect
//! with in-capsule data, Property Get of CAP, Identify Controller returned in
//! C2HData, then an I/O write moved by R2T/H2CData. Both ends use this crate's
//! codec, so it checks the pieces compose (and that the initiator-side
//! encoders and target-side decoders agree).

use mirrorpoint_target::nvmf::identify::{ctrl_off, IdentifyCommand, IdentifyController};
use mirrorpoint_target::nvmf::pdu::{
    self, CapsuleCmd, CapsuleResp, Frame, H2CData, IcReq, Pdu, PduConfig,
};
use mirrorpoint_target::nvmf::qpair::{c2h_data_pdus, Event, QpairConfig, QueuePair};
use mirrorpoint_target::nvmf::spec::{
    connect_success_dw0, property_get_completion, Cap, CntlId, CommandId, ConnectCommand,
    ConnectData, Cqe, DataSgl, Nqn, Nsid, Property, PropertyCommand, QueueId, RwCommand, Sqe,
    Status,
};
use mirrorpoint_target::units::{BlockSize, Lba};

/// Host side: encode with the host's view of the codec.
fn host_send(host: &PduConfig, p: Pdu<'_>) -> Vec<u8> {
    p.to_vec(host).unwrap()
}

/// Target side: frame the bytes like a receive loop would, then process.
fn target_recv<'a>(qp: &mut QueuePair, wire: &'a [u8]) -> Event<'a> {
    // Feed the framer byte by byte up to the header, as a socket might.
    assert_eq!(pdu::frame(&wire[..3], qp.codec()), Ok(Frame::NeedMore(5)));
    let n = match pdu::frame(wire, qp.codec()).unwrap() {
        Frame::Complete(n) => n,
        Frame::NeedMore(_) => panic!("short"),
    };
    assert_eq!(n, wire.len());
    let r = qp.receive(&wire[..n]).unwrap();
    r.event
}

#[test]
fn admin_connect_identify_and_write() {
    let subnqn = Nqn::new("nqn.2024-01.io.mirrorpoint:vol0").unwrap();
    let hostnqn = Nqn::new("nqn.2014-08.org.nvmexpress:uuid:0000").unwrap();
    let mut qp = QueuePair::new(QpairConfig::default());
    let mut host = PduConfig::default();

    // IC exchange with header and data digests.
    let icreq = host_send(
        &host,
        Pdu::IcReq(IcReq {
            hpda: 0,
            hdgst: true,
            ddgst: true,
            maxr2t: 0,
        }),
    );
    let icresp = match target_recv(&mut qp, &icreq) {
        Event::Connected { icresp, .. } => icresp,
        e => panic!("{e:?}"),
    };
    let wire = Pdu::IcResp(icresp).to_vec(qp.codec()).unwrap();
    match pdu::decode(&wire, &host).unwrap().pdu {
        Pdu::IcResp(r) => {
            host.hdgst = r.hdgst;
            host.ddgst = r.ddgst;
            host.cpda = r.cpda;
            host.max_h2c_data = r.maxh2cdata;
        }
        p => panic!("{p:?}"),
    }
    assert!(host.hdgst && host.ddgst);

    // Connect (admin queue), data in capsule.
    let data = ConnectData {
        hostid: [1; 16],
        cntlid: CntlId::DYNAMIC,
        subnqn: subnqn.clone(),
        hostnqn,
    }
    .encode();
    let connect = ConnectCommand {
        cid: CommandId(0),
        recfmt: 0,
        qid: QueueId(0),
        sqsize: 31,
        cattr: 0,
        kato: 15_000,
        sgl: DataSgl::InCapsule {
            offset: 0,
            len: 1024,
        },
    };
    let wire = host_send(
        &host,
        Pdu::CapsuleCmd(CapsuleCmd {
            sqe: connect.to_sqe(),
            data: &data,
        }),
    );
    let (sqe, in_capsule) = match target_recv(&mut qp, &wire) {
        Event::Command {
            sqe, in_capsule, ..
        } => (sqe, in_capsule),
        e => panic!("{e:?}"),
    };
    assert_eq!(ConnectCommand::from_sqe(&sqe), Ok(connect));
    let cd = ConnectData::decode(in_capsule).unwrap();
    assert_eq!(cd.subnqn, subnqn);
    let resp = Cqe {
        dw0: connect_success_dw0(CntlId(1), 0),
        ..Cqe::new(sqe.cid, Status::SUCCESS)
    };
    qp.complete(sqe.cid).unwrap();
    let wire = Pdu::CapsuleResp(CapsuleResp { cqe: resp })
        .to_vec(qp.codec())
        .unwrap();
    assert_eq!(wire.len(), 28);
    match pdu::decode(&wire, &host).unwrap().pdu {
        Pdu::CapsuleResp(r) => assert_eq!(r.cqe.dw0 & 0xffff, 1),
        p => panic!("{p:?}"),
    }

    // Property Get CAP.
    let pg = PropertyCommand {
        cid: CommandId(1),
        size8: true,
        offset: 0,
        value: None,
    };
    let wire = host_send(
        &host,
        Pdu::CapsuleCmd(CapsuleCmd {
            sqe: pg.to_sqe(),
            data: &[],
        }),
    );
    let sqe = match target_recv(&mut qp, &wire) {
        Event::Command { sqe, .. } => sqe,
        e => panic!("{e:?}"),
    };
    let p = PropertyCommand::from_sqe(&sqe).unwrap();
    assert_eq!(p.property(), Ok(Property::Cap));
    let cap = Cap {
        mqes: 127,
        cqr: true,
        to: 30,
        nssrs: false,
        css: 1,
        mpsmin: 0,
        mpsmax: 0,
    };
    let cqe = property_get_completion(sqe.cid, cap.to_u64());
    qp.complete(sqe.cid).unwrap();
    assert_eq!(
        Cap::from_u64(u64::from(cqe.dw0) | u64::from(cqe.dw1) << 32),
        cap
    );

    // Identify Controller, 4096 bytes returned as two C2HData PDUs.
    let mut idsqe = Sqe::new(
        0x06,
        CommandId(2),
        Nsid(0),
        DataSgl::Transport { len: 4096 },
    );
    idsqe.cdw[0] = 1;
    let wire = host_send(
        &host,
        Pdu::CapsuleCmd(CapsuleCmd {
            sqe: idsqe,
            data: &[],
        }),
    );
    let sqe = match target_recv(&mut qp, &wire) {
        Event::Command { sqe, .. } => sqe,
        e => panic!("{e:?}"),
    };
    assert_eq!(IdentifyCommand::from_sqe(&sqe).cns, 1);
    let id = IdentifyController::tcp_io("SN1", "mirrorpoint", "0.1", CntlId(1), subnqn, 1, 8192)
        .encode()
        .unwrap();
    let mut received = Vec::new();
    for c2h in c2h_data_pdus(sqe.cid, &id, 2048, true) {
        let wire = Pdu::C2HData(c2h).to_vec(qp.codec()).unwrap();
        match pdu::decode(&wire, &host).unwrap().pdu {
            Pdu::C2HData(d) => {
                assert_eq!(d.offset as usize, received.len());
                received.extend_from_slice(d.data);
            }
            p => panic!("{p:?}"),
        }
    }
    qp.complete(sqe.cid).unwrap();
    assert_eq!(received, id);
    assert_eq!(&received[ctrl_off::CNTLID..ctrl_off::CNTLID + 2], &[1, 0]);

    // A 12 KiB write moved by R2T in 8 KiB windows of 4 KiB H2CData PDUs.
    let rw = RwCommand {
        slba: Lba(8),
        nlb: 3,
        fua: false,
        deac: false,
    };
    let mut wsqe = Sqe::new(
        0x01,
        CommandId(3),
        Nsid(1),
        DataSgl::Transport { len: 12288 },
    );
    rw.fill_sqe(&mut wsqe);
    let wire = host_send(
        &host,
        Pdu::CapsuleCmd(CapsuleCmd {
            sqe: wsqe,
            data: &[],
        }),
    );
    let (sqe, sgl) = match target_recv(&mut qp, &wire) {
        Event::Command { sqe, sgl, .. } => (sqe, sgl),
        e => panic!("{e:?}"),
    };
    let rw = RwCommand::from_sqe(&sqe);
    rw.check_transfer(BlockSize::B4096, sgl).unwrap();
    rw.check_range(1024).unwrap();
    let payload: Vec<u8> = (0..12288u32).map(|i| (i % 251) as u8).collect();
    let mut got = vec![0u8; payload.len()];
    let mut complete = false;
    while let Some(r2t) = qp.next_r2t(sqe.cid, 8192).unwrap() {
        let wire = Pdu::R2t(r2t).to_vec(qp.codec()).unwrap();
        let r2t = match pdu::decode(&wire, &host).unwrap().pdu {
            Pdu::R2t(r) => r,
            p => panic!("{p:?}"),
        };
        let window = &payload[r2t.offset as usize..(r2t.offset + r2t.len) as usize];
        let n = window.chunks(4096).count();
        for (i, chunk) in window.chunks(4096).enumerate() {
            let wire = host_send(
                &host,
                Pdu::H2CData(H2CData {
                    cid: r2t.cid,
                    ttag: r2t.ttag,
                    offset: r2t.offset + (i * 4096) as u32,
                    last: i + 1 == n,
                    data: chunk,
                }),
            );
            match target_recv(&mut qp, &wire) {
                Event::Data {
                    offset,
                    data,
                    digest_ok,
                    complete: c,
                    ..
                } => {
                    assert!(digest_ok);
                    got[offset as usize..offset as usize + data.len()].copy_from_slice(data);
                    complete = c;
                }
                e => panic!("{e:?}"),
            }
        }
    }
    assert!(complete);
    assert_eq!(got, payload);
    qp.complete(sqe.cid).unwrap();
    assert_eq!(qp.outstanding(), 0);
}
