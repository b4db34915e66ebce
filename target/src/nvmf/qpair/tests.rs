use super::*;
use crate::nvmf::pdu::{CapsuleCmd, CapsuleResp, FatalError, Fes, TermReq};
use crate::nvmf::spec::{Cqe, Nsid};
use proptest::prelude::*;

fn icreq(hdgst: bool, ddgst: bool) -> Vec<u8> {
    Pdu::IcReq(IcReq {
        hpda: 0,
        hdgst,
        ddgst,
        maxr2t: 0,
    })
    .to_vec(&PduConfig::default())
    .unwrap()
}

fn live(hdgst: bool, ddgst: bool) -> QueuePair {
    let mut qp = QueuePair::new(QpairConfig::default());
    let b = icreq(hdgst, ddgst);
    let r = qp.receive(&b).unwrap();
    assert_eq!(r.len, 128);
    match r.event {
        Event::Connected { icresp, .. } => {
            assert_eq!(icresp.hdgst, hdgst);
            assert_eq!(icresp.ddgst, ddgst);
            assert_eq!(icresp.cpda, 0);
            assert_eq!(icresp.maxh2cdata, 128 * 1024);
        }
        e => panic!("unexpected {e:?}"),
    }
    assert!(qp.is_live());
    assert_eq!(qp.codec().hdgst, hdgst);
    qp
}

fn write_cmd(cid: u16, len: u32) -> Sqe {
    Sqe::new(0x01, CommandId(cid), Nsid(1), DataSgl::Transport { len })
}

fn enc(qp: &QueuePair, p: Pdu<'_>) -> Vec<u8> {
    p.to_vec(qp.codec()).unwrap()
}

fn cmd_pdu(qp: &QueuePair, sqe: Sqe, data: &[u8]) -> Vec<u8> {
    enc(qp, Pdu::CapsuleCmd(CapsuleCmd { sqe, data }))
}

fn h2c(qp: &QueuePair, cid: u16, ttag: u16, offset: u32, last: bool, data: &[u8]) -> Vec<u8> {
    enc(
        qp,
        Pdu::H2CData(H2CData {
            cid: CommandId(cid),
            ttag,
            offset,
            last,
            data,
        }),
    )
}

fn fatal_of(r: Result<Received<'_>, PduError>) -> FatalError {
    r.unwrap_err().fatal().unwrap()
}

#[test]
fn ic_sequence_rules() {
    let mut qp = QueuePair::new(QpairConfig::default());
    let c = cmd_pdu(&qp, write_cmd(1, 0), &[]);
    let f = fatal_of(qp.receive(&c));
    assert_eq!(f.fes, Fes::PduSequenceError);
    // Closed after a fatal error.
    assert!(qp.receive(&icreq(false, false)).is_err());

    let mut qp = live(false, false);
    assert_eq!(
        fatal_of(qp.receive(&icreq(false, false))).fes,
        Fes::PduSequenceError
    );

    // Digest requests can be refused by configuration.
    let mut qp = QueuePair::new(QpairConfig {
        allow_ddgst: false,
        ..QpairConfig::default()
    });
    match qp.receive(&icreq(true, true)).unwrap().event {
        Event::Connected { icresp, .. } => assert!(icresp.hdgst && !icresp.ddgst),
        e => panic!("{e:?}"),
    }
}

#[test]
fn host_may_not_send_controller_pdus() {
    let mut qp = live(false, false);
    let resp = enc(
        &qp,
        Pdu::CapsuleResp(CapsuleResp {
            cqe: Cqe::new(CommandId(1), Status::SUCCESS),
        }),
    );
    assert_eq!(
        fatal_of(qp.receive(&resp)),
        FatalError {
            fes: Fes::InvalidHeaderField,
            fei: 0
        }
    );
}

#[test]
fn in_capsule_write_and_rejections() {
    let mut qp = live(true, true);
    let data = [5u8; 512];
    let sqe = Sqe::new(
        0x01,
        CommandId(1),
        Nsid(1),
        DataSgl::InCapsule {
            offset: 0,
            len: 512,
        },
    );
    let b = cmd_pdu(&qp, sqe, &data);
    match qp.receive(&b).unwrap().event {
        Event::Command {
            in_capsule, sgl, ..
        } => {
            assert_eq!(in_capsule, &data[..]);
            assert_eq!(
                sgl,
                DataSgl::InCapsule {
                    offset: 0,
                    len: 512
                }
            );
        }
        e => panic!("{e:?}"),
    }
    assert_eq!(qp.outstanding(), 1);
    // Same CID again while outstanding.
    let err = |qp: &mut QueuePair, b: &[u8]| match qp.receive(b).unwrap().event {
        Event::CommandError { status, .. } => status,
        e => panic!("{e:?}"),
    };
    assert_eq!(err(&mut qp, &b), Status::COMMAND_ID_CONFLICT.with_dnr());
    qp.complete(CommandId(1)).unwrap();
    assert!(qp.complete(CommandId(1)).is_err());
    // Length mismatch between SGL and capsule.
    let sqe = Sqe::new(
        0x01,
        CommandId(2),
        Nsid(1),
        DataSgl::InCapsule {
            offset: 0,
            len: 100,
        },
    );
    let b = cmd_pdu(&qp, sqe, &data);
    assert_eq!(err(&mut qp, &b), Status::DATA_SGL_LENGTH_INVALID.with_dnr());
    // Non-zero offset (ICDOFF is 0).
    let sqe = Sqe::new(
        0x01,
        CommandId(2),
        Nsid(1),
        DataSgl::InCapsule {
            offset: 16,
            len: 512,
        },
    );
    let b = cmd_pdu(&qp, sqe, &data);
    assert_eq!(err(&mut qp, &b), Status::SGL_OFFSET_INVALID.with_dnr());
    // In-capsule data on a read.
    let sqe = Sqe::new(
        0x02,
        CommandId(2),
        Nsid(1),
        DataSgl::InCapsule {
            offset: 0,
            len: 512,
        },
    );
    let b = cmd_pdu(&qp, sqe, &data);
    assert_eq!(err(&mut qp, &b), Status::INVALID_FIELD.with_dnr());
    // A zero-length descriptor of any type is accepted for a no-data command.
    let mut sqe = Sqe::new(0x00, CommandId(9), Nsid(1), DataSgl::Transport { len: 0 });
    sqe.dptr = [0; 16];
    let b = cmd_pdu(&qp, sqe, &[]);
    assert!(matches!(
        qp.receive(&b).unwrap().event,
        Event::Command {
            sgl: DataSgl::Transport { len: 0 },
            ..
        }
    ));
    qp.complete(CommandId(9)).unwrap();
    // Keyed SGL.
    let mut sqe = write_cmd(2, 4096);
    sqe.dptr[15] = 0x40;
    let b = cmd_pdu(&qp, sqe, &[]);
    assert_eq!(
        err(&mut qp, &b),
        Status::SGL_DESCRIPTOR_TYPE_INVALID.with_dnr()
    );
    // Too much in-capsule data.
    let big = vec![0u8; 8196];
    let sqe = Sqe::new(
        0x01,
        CommandId(2),
        Nsid(1),
        DataSgl::InCapsule {
            offset: 0,
            len: 8196,
        },
    );
    let b = cmd_pdu(&qp, sqe, &big);
    assert_eq!(err(&mut qp, &b), Status::DATA_SGL_LENGTH_INVALID.with_dnr());
    // Data digest mismatch fails just the command.
    let sqe = Sqe::new(
        0x01,
        CommandId(3),
        Nsid(1),
        DataSgl::InCapsule {
            offset: 0,
            len: 512,
        },
    );
    let mut b = cmd_pdu(&qp, sqe, &data);
    let n = b.len();
    b[n - 1] ^= 0xff;
    assert_eq!(err(&mut qp, &b), Status::TRANSIENT_TRANSPORT_ERROR);
    assert!(qp.is_live());
    assert_eq!(qp.outstanding(), 0);
}

#[test]
fn r2t_driven_write() {
    let mut qp = live(false, true);
    let b = cmd_pdu(&qp, write_cmd(7, 10_000), &[]);
    assert!(matches!(
        qp.receive(&b).unwrap().event,
        Event::Command { .. }
    ));
    let r1 = qp.next_r2t(CommandId(7), 8192).unwrap().unwrap();
    assert_eq!((r1.offset, r1.len), (0, 8192));
    // MAXR2T 0 (one outstanding) blocks a second R2T.
    assert_eq!(qp.next_r2t(CommandId(7), 8192), Ok(None));
    let d = vec![1u8; 4096];
    let b = h2c(&qp, 7, r1.ttag, 0, false, &d);
    match qp.receive(&b).unwrap().event {
        Event::Data {
            offset,
            complete,
            digest_ok,
            ..
        } => {
            assert_eq!(offset, 0);
            assert!(!complete);
            assert!(digest_ok);
        }
        e => panic!("{e:?}"),
    }
    let b = h2c(&qp, 7, r1.ttag, 4096, true, &d);
    assert!(matches!(
        qp.receive(&b).unwrap().event,
        Event::Data {
            complete: false,
            ..
        }
    ));
    let r2 = qp.next_r2t(CommandId(7), 8192).unwrap().unwrap();
    assert_eq!((r2.offset, r2.len), (8192, 1808));
    assert_ne!(r2.ttag, r1.ttag);
    let tail = vec![2u8; 1808];
    let b = h2c(&qp, 7, r2.ttag, 8192, true, &tail);
    assert!(matches!(
        qp.receive(&b).unwrap().event,
        Event::Data { complete: true, .. }
    ));
    assert_eq!(qp.next_r2t(CommandId(7), 8192), Ok(None));
    qp.complete(CommandId(7)).unwrap();
    // A read has no R2T data.
    let b = cmd_pdu(
        &qp,
        Sqe::new(
            0x02,
            CommandId(8),
            Nsid(1),
            DataSgl::Transport { len: 4096 },
        ),
        &[],
    );
    qp.receive(&b).unwrap();
    assert_eq!(
        qp.next_r2t(CommandId(8), 4096),
        Err(QpairError::NoR2tData(CommandId(8)))
    );
    assert_eq!(
        qp.next_r2t(CommandId(9), 4096),
        Err(QpairError::UnknownCommand(CommandId(9)))
    );
}

fn with_r2t(len: u32) -> (QueuePair, R2t) {
    let mut qp = live(false, false);
    let b = cmd_pdu(&qp, write_cmd(7, len), &[]);
    qp.receive(&b).unwrap();
    let r = qp.next_r2t(CommandId(7), len).unwrap().unwrap();
    (qp, r)
}

#[test]
fn h2c_data_violations() {
    let d = [0u8; 1024];
    // Unknown TTAG.
    let (mut qp, r) = with_r2t(2048);
    let b = h2c(&qp, 7, r.ttag.wrapping_add(1), 0, false, &d);
    assert_eq!(
        fatal_of(qp.receive(&b)),
        FatalError {
            fes: Fes::InvalidHeaderField,
            fei: 10
        }
    );
    // CID not matching the TTAG.
    let (mut qp, r) = with_r2t(2048);
    let b = h2c(&qp, 8, r.ttag, 0, false, &d);
    assert_eq!(
        fatal_of(qp.receive(&b)),
        FatalError {
            fes: Fes::InvalidHeaderField,
            fei: 8
        }
    );
    // Out of order (gap).
    let (mut qp, r) = with_r2t(2048);
    let b = h2c(&qp, 7, r.ttag, 1024, true, &d);
    assert_eq!(fatal_of(qp.receive(&b)).fes, Fes::DataOutOfRange);
    // Duplicate.
    let (mut qp, r) = with_r2t(2048);
    let b = h2c(&qp, 7, r.ttag, 0, false, &d);
    qp.receive(&b).unwrap();
    assert_eq!(fatal_of(qp.receive(&b)).fes, Fes::DataOutOfRange);
    // Beyond the R2T.
    let (mut qp, r) = with_r2t(1000);
    let b = h2c(&qp, 7, r.ttag, 0, true, &d);
    assert_eq!(fatal_of(qp.receive(&b)).fes, Fes::DataOutOfRange);
    // LAST_PDU missing on the final PDU / set early.
    let (mut qp, r) = with_r2t(1024);
    let b = h2c(&qp, 7, r.ttag, 0, false, &d);
    assert_eq!(
        fatal_of(qp.receive(&b)),
        FatalError {
            fes: Fes::InvalidHeaderField,
            fei: 1
        }
    );
    let (mut qp, r) = with_r2t(2048);
    let b = h2c(&qp, 7, r.ttag, 0, true, &d);
    assert_eq!(fatal_of(qp.receive(&b)).fes, Fes::InvalidHeaderField);
    // Data after the command completed (TTAG retired).
    let (mut qp, r) = with_r2t(1024);
    let b = h2c(&qp, 7, r.ttag, 0, true, &d);
    qp.receive(&b).unwrap();
    assert_eq!(fatal_of(qp.receive(&b)).fei, 10);
    // Over MAXH2CDATA.
    let mut qp = QueuePair::new(QpairConfig {
        maxh2cdata: 4096,
        ..QpairConfig::default()
    });
    qp.receive(&icreq(false, false)).unwrap();
    let b = cmd_pdu(&qp, write_cmd(7, 8192), &[]);
    qp.receive(&b).unwrap();
    let r = qp.next_r2t(CommandId(7), 8192).unwrap().unwrap();
    let big = vec![0u8; 8192];
    let b = h2c(&qp, 7, r.ttag, 0, true, &big);
    assert_eq!(fatal_of(qp.receive(&b)).fes, Fes::DataLimitExceeded);
}

#[test]
fn h2c_digest_error_keeps_bookkeeping() {
    let mut qp = live(false, true);
    let b = cmd_pdu(&qp, write_cmd(7, 2048), &[]);
    qp.receive(&b).unwrap();
    let r = qp.next_r2t(CommandId(7), 2048).unwrap().unwrap();
    let d = [9u8; 1024];
    let mut b = h2c(&qp, 7, r.ttag, 0, false, &d);
    let n = b.len();
    b[n - 1] ^= 1;
    assert!(matches!(
        qp.receive(&b).unwrap().event,
        Event::Data {
            digest_ok: false,
            complete: false,
            ..
        }
    ));
    let b = h2c(&qp, 7, r.ttag, 1024, true, &d);
    assert!(matches!(
        qp.receive(&b).unwrap().event,
        Event::Data {
            digest_ok: true,
            complete: true,
            ..
        }
    ));
}

#[test]
fn term_req_closes() {
    let mut qp = live(false, false);
    let t = enc(
        &qp,
        Pdu::H2CTermReq(TermReq {
            fes: 2,
            fei: 0,
            data: &[],
        }),
    );
    assert_eq!(
        qp.receive(&t).unwrap().event,
        Event::Terminated { fes: 2, fei: 0 }
    );
    assert!(!qp.is_live());
    assert!(qp.receive(&t).is_err());
    assert_eq!(qp.next_r2t(CommandId(1), 1), Err(QpairError::NotConnected));
}

#[test]
fn c2h_split() {
    let data = vec![0u8; 10_000];
    let v: Vec<_> = c2h_data_pdus(CommandId(3), &data, 4096, true).collect();
    assert_eq!(v.len(), 3);
    assert_eq!((v[0].offset, v[0].data.len(), v[0].last), (0, 4096, false));
    assert_eq!(
        (v[2].offset, v[2].data.len(), v[2].last, v[2].success),
        (8192, 1808, true, true)
    );
    assert!(!v[1].success);
}

proptest! {
    #[test]
    fn random_streams_never_panic(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..20),
        r2t_lens in proptest::collection::vec(0u32..5000, 0..20),
    ) {
        let mut qp = live(false, false);
        for (i, c) in chunks.iter().enumerate() {
            let _ = qp.receive(c);
            let cid = CommandId(c.first().copied().unwrap_or(0).into());
            let _ = qp.next_r2t(cid, r2t_lens.get(i).copied().unwrap_or(1));
        }
    }

    #[test]
    fn any_valid_split_of_a_write_is_accepted(
        len in 1u32..20_000,
        r2t_max in 1u32..9000,
        pdu_max in 1usize..5000,
        ddgst in any::<bool>(),
    ) {
        let mut qp = live(true, ddgst);
        let b = cmd_pdu(&qp, write_cmd(1, len), &[]);
        qp.receive(&b).unwrap();
        let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let mut got = Vec::new();
        let mut done = false;
        while let Some(r) = qp.next_r2t(CommandId(1), r2t_max).unwrap() {
            let window = &payload[r.offset as usize..(r.offset + r.len) as usize];
            let n = window.len().div_ceil(pdu_max);
            for (i, chunk) in window.chunks(pdu_max).enumerate() {
                let off = r.offset + (i * pdu_max) as u32;
                let b = h2c(&qp, 1, r.ttag, off, i + 1 == n, chunk);
                match qp.receive(&b).unwrap().event {
                    Event::Data { data, offset, complete, .. } => {
                        prop_assert_eq!(offset as usize, got.len());
                        got.extend_from_slice(data);
                        done = complete;
                    }
                    e => prop_assert!(false, "{:?}", e),
                }
            }
        }
        prop_assert!(done);
        prop_assert_eq!(got, payload);
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write(u16, u32),
    InCapsule(u16, usize),
    Data(u16, u16, u32, usize, bool),
    R2t(u16, u32),
    Complete(u16),
    Flip(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u16..4, 0u32..10_000).prop_map(|(c, l)| Op::Write(c, l)),
        (0u16..4, 0usize..600).prop_map(|(c, l)| Op::InCapsule(c, l)),
        (0u16..4, 0u16..4, 0u32..10_000, 1usize..3000, any::<bool>())
            .prop_map(|(c, t, o, l, last)| Op::Data(c, t, o, l, last)),
        (0u16..4, 0u32..6000).prop_map(|(c, l)| Op::R2t(c, l)),
        (0u16..4).prop_map(Op::Complete),
        any::<usize>().prop_map(Op::Flip),
    ]
}

proptest! {
    #[test]
    fn structured_streams_never_panic(ops in proptest::collection::vec(op(), 0..40), d in any::<bool>()) {
        let mut qp = live(d, d);
        let mut flip: Option<usize> = None;
        let mut accepted = 0usize;
        for o in ops {
            let bytes = match o {
                Op::Write(c, l) => Some(cmd_pdu(&qp, write_cmd(c, l), &[])),
                Op::InCapsule(c, l) => {
                    let data = vec![0x5a; l];
                    let sqe = Sqe::new(0x01, CommandId(c), Nsid(1), DataSgl::InCapsule { offset: 0, len: l as u32 });
                    Some(cmd_pdu(&qp, sqe, &data))
                }
                Op::Data(c, t, off, l, last) => Some(h2c(&qp, c, t, off, last, &vec![1u8; l])),
                Op::R2t(c, l) => {
                    let _ = qp.next_r2t(CommandId(c), l);
                    None
                }
                Op::Complete(c) => {
                    let _ = qp.complete(CommandId(c));
                    None
                }
                Op::Flip(i) => {
                    flip = Some(i);
                    None
                }
            };
            if let Some(mut b) = bytes {
                if let Some(i) = flip.take() {
                    let n = b.len();
                    if let Some(x) = b.get_mut(i % n) {
                        *x ^= 1 << (i % 8);
                    }
                }
                match pdu::frame(&b, qp.codec()) {
                    Ok(pdu::Frame::Complete(n)) => {
                        // Received in parts (the zero-copy path), the same PDU
                        // must lead to the same outcome.
                        let mut twin = qp.clone();
                        let (h, d, g) = crate::nvmf::split_parts(&b[..n], twin.codec()).unwrap();
                        let by_parts = twin.receive_parts(h, d, g);
                        let whole = qp.receive(&b[..n]);
                        prop_assert_eq!(&by_parts, &whole);
                        prop_assert_eq!(twin.outstanding(), qp.outstanding());
                        if let Ok(r) = whole {
                            prop_assert_eq!(r.len, n);
                            if matches!(r.event, Event::Command { .. }) {
                                accepted += 1;
                            }
                        }
                    }
                    _ => {
                        let _ = qp.receive(&b);
                    }
                }
            }
            prop_assert!(qp.outstanding() <= accepted);
        }
    }
}
