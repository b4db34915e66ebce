use super::*;
use crate::nvmf::spec::{DataSgl, Nsid, Status};
use proptest::prelude::*;

fn cfg(hdgst: bool, ddgst: bool) -> PduConfig {
    PduConfig {
        hdgst,
        ddgst,
        ..PduConfig::default()
    }
}

fn roundtrip(p: &Pdu<'_>, c: &PduConfig) -> Vec<u8> {
    let bytes = p.to_vec(c).unwrap();
    let d = decode(&bytes, c).unwrap();
    assert_eq!(&d.pdu, p);
    assert_eq!(d.len, bytes.len());
    assert_eq!(frame(&bytes, c), Ok(Frame::Complete(bytes.len())));
    assert_eq!(d.pdu.to_vec(c).unwrap(), bytes);
    bytes
}

fn sqe() -> Sqe {
    Sqe {
        cdw: [0x10, 0, 7, 0, 0, 0],
        ..Sqe::new(
            0x01,
            CommandId(0x21),
            Nsid(1),
            DataSgl::InCapsule { offset: 0, len: 8 },
        )
    }
}

#[test]
fn crc32c_is_castagnoli() {
    assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
}

#[test]
fn icreq_layout() {
    let p = Pdu::IcReq(IcReq {
        hpda: 0,
        hdgst: true,
        ddgst: false,
        maxr2t: 0,
    });
    let b = roundtrip(&p, &PduConfig::default());
    assert_eq!(b.len(), 128);
    assert_eq!(&b[..8], &[0x00, 0, 128, 0, 128, 0, 0, 0]);
    assert_eq!(&b[8..10], &[0, 0]); // PFV
    assert_eq!(b[11], 0x01); // DGST
    assert!(b[16..].iter().all(|&x| x == 0));
    // Digest negotiation state never applies to IC PDUs.
    assert!(decode(&b, &cfg(true, true)).is_ok());
}

#[test]
fn icresp_layout() {
    let p = Pdu::IcResp(IcResp {
        cpda: 0,
        hdgst: true,
        ddgst: true,
        maxh2cdata: 131072,
    });
    let b = roundtrip(&p, &PduConfig::default());
    assert_eq!(b.len(), 128);
    assert_eq!(&b[..8], &[0x01, 0, 128, 0, 128, 0, 0, 0]);
    assert_eq!(b[11], 0x03);
    assert_eq!(&b[12..16], &131072u32.to_le_bytes());
}

#[test]
fn capsule_cmd_in_capsule_data_with_digests() {
    let data = [1u8, 2, 3, 4, 5, 6, 7, 8];
    let p = Pdu::CapsuleCmd(CapsuleCmd {
        sqe: sqe(),
        data: &data,
    });
    let c = cfg(true, true);
    let b = roundtrip(&p, &c);
    // hlen 72 + hdgst 4 -> pdo 76 (CPDA 0: dword alignment), + 8 data + 4 ddgst.
    assert_eq!(&b[..4], &[0x04, 0x03, 72, 76]);
    assert_eq!(b.len(), 88);
    assert_eq!(&b[4..8], &88u32.to_le_bytes());
    assert_eq!(&b[72..76], &crc32c::crc32c(&b[..72]).to_le_bytes());
    assert_eq!(&b[76..84], &data);
    assert_eq!(&b[84..88], &crc32c::crc32c(&data).to_le_bytes());
    let d = decode(&b, &c).unwrap();
    assert_eq!(d.data_range, 76..84);
    // Zero copy: the data slice points into the input.
    assert_eq!(p.data(), &data);
    if let Pdu::CapsuleCmd(cc) = d.pdu {
        assert!(std::ptr::eq(cc.data.as_ptr(), b[76..].as_ptr()));
    } else {
        panic!("wrong type");
    }
}

#[test]
fn capsule_cmd_alignment_padding() {
    let data = [9u8; 4];
    let p = Pdu::CapsuleCmd(CapsuleCmd {
        sqe: sqe(),
        data: &data,
    });
    let c = PduConfig {
        cpda: 3, // 16-byte alignment
        ..cfg(true, false)
    };
    let b = roundtrip(&p, &c);
    assert_eq!(b[3], 80); // 76 rounded up to 16
    assert_eq!(&b[76..80], &[0; 4]);
    assert_eq!(b.len(), 84);
    // The same PDU with PDO 76 is misaligned for CPDA 3.
    let mut bad = p.to_vec(&cfg(true, false)).unwrap();
    assert_eq!(bad[3], 76);
    assert_eq!(
        decode(&bad, &c).unwrap_err().fatal(),
        Some(FatalError {
            fes: Fes::InvalidHeaderField,
            fei: 3
        })
    );
    bad[3] = 72; // overlaps the header digest
    assert!(matches!(
        decode(&bad, &cfg(true, false)),
        Err(PduError::InvalidHeaderField { offset: 3, .. })
    ));
}

#[test]
fn capsule_cmd_without_data() {
    let p = Pdu::CapsuleCmd(CapsuleCmd {
        sqe: sqe(),
        data: &[],
    });
    let b = roundtrip(&p, &cfg(true, true));
    assert_eq!(&b[..4], &[0x04, 0x01, 72, 0]);
    assert_eq!(b.len(), 76);
    let b = roundtrip(&p, &cfg(false, false));
    assert_eq!(b.len(), 72);
}

#[test]
fn capsule_resp_layout() {
    let p = Pdu::CapsuleResp(CapsuleResp {
        cqe: Cqe::new(CommandId(0x21), Status::INVALID_FIELD.with_dnr()),
    });
    let b = roundtrip(&p, &cfg(false, true));
    assert_eq!(&b[..8], &[0x05, 0, 24, 0, 24, 0, 0, 0]);
    assert_eq!(&b[20..22], &[0x21, 0]);
    let b = roundtrip(&p, &cfg(true, false));
    assert_eq!(b.len(), 28);
    assert_eq!(b[1], flags::HDGSTF);
}

#[test]
fn c2h_data_layout() {
    let data = vec![0xaa; 4096];
    let p = Pdu::C2HData(C2HData {
        cid: CommandId(5),
        offset: 8192,
        last: true,
        success: true,
        data: &data,
    });
    let b = roundtrip(&p, &cfg(false, false));
    assert_eq!(&b[..4], &[0x07, 0x0c, 24, 24]);
    assert_eq!(&b[8..10], &[5, 0]);
    assert_eq!(&b[12..16], &8192u32.to_le_bytes());
    assert_eq!(&b[16..20], &4096u32.to_le_bytes());
    assert_eq!(b.len(), 24 + 4096);
    // HPDA governs C2H alignment.
    let c = PduConfig {
        hpda: 7,
        ..cfg(false, false)
    };
    let b = roundtrip(&p, &c);
    assert_eq!(b[3], 32);
}

#[test]
fn h2c_data_and_r2t_layout() {
    let data = [3u8; 12];
    let p = Pdu::H2CData(H2CData {
        cid: CommandId(7),
        ttag: 0x1234,
        offset: 4,
        last: false,
        data: &data,
    });
    let b = roundtrip(&p, &cfg(true, true));
    assert_eq!(&b[..4], &[0x06, 0x03, 24, 28]);
    assert_eq!(&b[10..12], &[0x34, 0x12]);
    assert_eq!(b.len(), 24 + 4 + 12 + 4);

    let p = Pdu::R2t(R2t {
        cid: CommandId(7),
        ttag: 0x1234,
        offset: 0,
        len: 65536,
    });
    let b = roundtrip(&p, &cfg(false, false));
    assert_eq!(&b[..8], &[0x09, 0, 24, 0, 24, 0, 0, 0]);
    assert_eq!(&b[16..20], &65536u32.to_le_bytes());
}

#[test]
fn term_req_layout() {
    let hdr = [0x04u8, 0, 99, 0, 72, 0, 0, 0];
    let err = PduError::InvalidHeaderField {
        offset: 2,
        what: "x",
    };
    assert_eq!(
        err.h2c_term_req(&hdr).map(|p| p.pdu_type()),
        Some(PduType::H2CTermReq)
    );
    assert_eq!(PduError::Incomplete { needed: 1 }.c2h_term_req(&hdr), None);
    let p = err.c2h_term_req(&hdr).unwrap();
    let b = roundtrip(&p, &cfg(true, true));
    assert_eq!(&b[..8], &[0x03, 0, 24, 0, 32, 0, 0, 0]);
    assert_eq!(&b[8..10], &[1, 0]);
    assert_eq!(&b[10..14], &[2, 0, 0, 0]);
    assert_eq!(&b[24..], &hdr);
    // Header-in-error is capped at 128 bytes.
    let big = [0u8; 200];
    let t = TermReq::new(
        FatalError {
            fes: Fes::PduSequenceError,
            fei: 0,
        },
        &big,
    );
    assert_eq!(t.data.len(), 128);
    assert_eq!(
        Pdu::H2CTermReq(t).to_vec(&cfg(false, false)).unwrap().len(),
        152
    );
    let too_big = TermReq { data: &big, ..t };
    assert_eq!(
        Pdu::H2CTermReq(too_big).to_vec(&cfg(false, false)),
        Err(EncodeError::DataTooLarge)
    );
}

fn fatal(r: Result<Decoded<'_>, PduError>) -> FatalError {
    r.unwrap_err().fatal().unwrap()
}

fn fe(fes: Fes, fei: u32) -> FatalError {
    FatalError { fes, fei }
}

#[test]
fn truncated_input_is_incomplete() {
    let p = Pdu::R2t(R2t {
        cid: CommandId(1),
        ttag: 1,
        offset: 0,
        len: 1,
    });
    let b = p.to_vec(&cfg(true, false)).unwrap();
    let c = cfg(true, false);
    for n in 0..b.len() {
        let e = decode(&b[..n], &c).unwrap_err();
        assert_eq!(
            e,
            PduError::Incomplete {
                needed: if n < 8 { 8 - n } else { b.len() - n }
            }
        );
        assert_eq!(e.fatal(), None);
        let f = frame(&b[..n], &c).unwrap();
        assert_eq!(f, Frame::NeedMore(if n < 8 { 8 - n } else { b.len() - n }));
    }
    // Trailing bytes belong to the next PDU.
    let mut two = b.clone();
    two.extend_from_slice(&b);
    assert_eq!(decode(&two, &c).unwrap().len, b.len());
}

#[test]
fn header_field_errors() {
    let c = cfg(false, false);
    let resp = Pdu::CapsuleResp(CapsuleResp {
        cqe: Cqe::new(CommandId(1), Status::SUCCESS),
    })
    .to_vec(&c)
    .unwrap();

    let mut b = resp.clone();
    b[0] = 0x08;
    assert_eq!(fatal(decode(&b, &c)), fe(Fes::InvalidHeaderField, 0));
    let mut b = resp.clone();
    b[2] = 72;
    assert_eq!(fatal(decode(&b, &c)), fe(Fes::InvalidHeaderField, 2));
    assert!(frame(&b[..8], &c).is_err());
    // PLEN shorter than the header.
    let mut b = resp.clone();
    b[4] = 20;
    assert_eq!(fatal(decode(&b, &c)), fe(Fes::InvalidHeaderField, 4));
    // CapsuleResp cannot carry data.
    let mut b = resp.clone();
    b[4] = 28;
    b.extend_from_slice(&[0; 4]);
    assert_eq!(fatal(decode(&b, &c)), fe(Fes::InvalidHeaderField, 4));
    // ICReq with a wrong PLEN.
    let mut ic = Pdu::IcReq(IcReq {
        hpda: 0,
        hdgst: false,
        ddgst: false,
        maxr2t: 0,
    })
    .to_vec(&c)
    .unwrap();
    ic[4] = 127;
    assert_eq!(fatal(decode(&ic, &c)), fe(Fes::InvalidHeaderField, 4));
    ic[4] = 128;
    ic[1] = flags::HDGSTF;
    assert_eq!(fatal(decode(&ic, &c)), fe(Fes::InvalidHeaderField, 1));
    ic[1] = 0;
    ic[8] = 1; // PFV
    assert_eq!(fatal(decode(&ic, &c)), fe(Fes::UnsupportedParameter, 8));
    ic[8] = 0;
    ic[10] = 32; // HPDA
    assert_eq!(fatal(decode(&ic, &c)), fe(Fes::InvalidHeaderField, 10));
    // ICResp MAXH2CDATA.
    let mut icr = Pdu::IcResp(IcResp {
        cpda: 0,
        hdgst: false,
        ddgst: false,
        maxh2cdata: 4096,
    })
    .to_vec(&c)
    .unwrap();
    icr[12..16].copy_from_slice(&4095u32.to_le_bytes());
    assert_eq!(fatal(decode(&icr, &c)), fe(Fes::InvalidHeaderField, 12));
    // TermReq PLEN above 152.
    let mut t = [0u8; 160];
    t[..8].copy_from_slice(&[0x02, 0, 24, 0, 160, 0, 0, 0]);
    assert_eq!(fatal(decode(&t, &c)), fe(Fes::InvalidHeaderField, 4));
}

#[test]
fn plen_limit() {
    let c = PduConfig {
        max_plen: 1024,
        ..cfg(false, false)
    };
    let ch = CommonHeader {
        pdu_type: PduType::CapsuleCmd as u8,
        flags: 0,
        hlen: 72,
        pdo: 72,
        plen: 1025,
    }
    .encode();
    assert_eq!(
        frame(&ch, &c),
        Err(PduError::DataLimitExceeded {
            len: 1025,
            limit: 1024
        })
    );
    assert_eq!(fatal(decode(&ch, &c)), fe(Fes::DataLimitExceeded, 0));
    let ch = CommonHeader {
        plen: u32::MAX,
        ..CommonHeader::parse(&ch).unwrap()
    }
    .encode();
    assert!(frame(&ch, &c).is_err());
}

#[test]
fn h2c_data_limits_and_consistency() {
    let data = [0u8; 8192];
    let p = Pdu::H2CData(H2CData {
        cid: CommandId(1),
        ttag: 0,
        offset: 0,
        last: true,
        data: &data,
    });
    let c = PduConfig {
        max_h2c_data: 4096,
        ..cfg(false, false)
    };
    let b = p.to_vec(&c).unwrap();
    assert_eq!(fatal(decode(&b, &c)), fe(Fes::DataLimitExceeded, 0));
    let c = cfg(false, false);
    let mut b2 = b.clone();
    b2[16..20].copy_from_slice(&8191u32.to_le_bytes());
    assert_eq!(fatal(decode(&b2, &c)), fe(Fes::InvalidHeaderField, 16));
    let mut b3 = b.clone();
    b3[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(fatal(decode(&b3, &c)), fe(Fes::DataOutOfRange, 0));
    // Data PDU with no data.
    let ch = CommonHeader {
        pdu_type: 0x06,
        flags: 0,
        hlen: 24,
        pdo: 0,
        plen: 24,
    };
    let mut e = vec![0u8; 24];
    e[..8].copy_from_slice(&ch.encode());
    assert_eq!(fatal(decode(&e, &c)), fe(Fes::InvalidHeaderField, 4));
}

#[test]
fn c2h_success_requires_last() {
    let data = [1u8; 4];
    let p = Pdu::C2HData(C2HData {
        cid: CommandId(1),
        offset: 0,
        last: true,
        success: true,
        data: &data,
    });
    let c = cfg(false, false);
    let mut b = p.to_vec(&c).unwrap();
    b[1] &= !flags::LAST_PDU;
    assert_eq!(fatal(decode(&b, &c)), fe(Fes::InvalidHeaderField, 1));
    let bad = Pdu::C2HData(C2HData {
        cid: CommandId(1),
        offset: 0,
        last: false,
        success: true,
        data: &data,
    });
    assert!(bad.to_vec(&c).is_err());
}

#[test]
fn digest_errors() {
    let data = [7u8; 16];
    let p = Pdu::CapsuleCmd(CapsuleCmd {
        sqe: sqe(),
        data: &data,
    });
    let c = cfg(true, true);
    let good = p.to_vec(&c).unwrap();

    let mut b = good.clone();
    b[72] ^= 1;
    let e = decode(&b, &c).unwrap_err();
    assert!(matches!(e, PduError::HeaderDigest { .. }));
    let rx = u32::from_le_bytes([b[72], b[73], b[74], b[75]]);
    assert_eq!(e.fatal(), Some(fe(Fes::HeaderDigestError, rx)));

    let mut b = good.clone();
    b[80] ^= 1; // data byte
    let e = decode(&b, &c).unwrap_err();
    assert!(matches!(
        e,
        PduError::DataDigest {
            cid: Some(CommandId(0x21)),
            ..
        }
    ));
    assert_eq!(e.fatal(), None);

    // Flag mismatches: PDU has digests, connection negotiated none.
    assert_eq!(
        fatal(decode(&good, &cfg(false, false))),
        fe(Fes::InvalidHeaderField, 1)
    );
    // Header digest present, data digest expected but missing.
    let no_dd = p.to_vec(&cfg(true, false)).unwrap();
    assert_eq!(fatal(decode(&no_dd, &c)), fe(Fes::InvalidHeaderField, 1));
    // Missing header digest.
    let no_hd = p.to_vec(&cfg(false, true)).unwrap();
    assert_eq!(fatal(decode(&no_hd, &c)), fe(Fes::InvalidHeaderField, 1));
    // DDGSTF on a PDU without data.
    let mut r = Pdu::CapsuleResp(CapsuleResp {
        cqe: Cqe::new(CommandId(1), Status::SUCCESS),
    })
    .to_vec(&c)
    .unwrap();
    r[1] |= flags::DDGSTF;
    assert_eq!(fatal(decode(&r, &c)), fe(Fes::InvalidHeaderField, 1));
}

// --- property tests -------------------------------------------------------

fn any_cfg() -> impl Strategy<Value = PduConfig> {
    (any::<bool>(), any::<bool>(), 0u8..=31, 0u8..=31).prop_map(|(h, d, cpda, hpda)| PduConfig {
        hdgst: h,
        ddgst: d,
        cpda,
        hpda,
        ..PduConfig::default()
    })
}

fn any_sqe() -> impl Strategy<Value = Sqe> {
    proptest::collection::vec(any::<u8>(), 64).prop_map(|b| Sqe::decode(&b).unwrap_or_default())
}

fn any_cqe() -> impl Strategy<Value = Cqe> {
    proptest::collection::vec(any::<u8>(), 16).prop_map(|b| Cqe::decode(&b).unwrap_or_default())
}

/// An owned description of a valid PDU (the strategy cannot yield borrows).
#[derive(Debug, Clone)]
enum Spec {
    IcReq(IcReq),
    IcResp(IcResp),
    Term(bool, u16, u32, Vec<u8>),
    Cmd(Sqe, Vec<u8>),
    Resp(Cqe),
    H2C(u16, u16, u32, bool, Vec<u8>),
    C2H(u16, u32, bool, bool, Vec<u8>),
    R2t(u16, u16, u32, u32),
}

impl Spec {
    fn pdu(&self) -> Pdu<'_> {
        match self {
            Spec::IcReq(i) => Pdu::IcReq(*i),
            Spec::IcResp(i) => Pdu::IcResp(*i),
            Spec::Term(h2c, fes, fei, d) => {
                let t = TermReq {
                    fes: *fes,
                    fei: *fei,
                    data: d,
                };
                if *h2c {
                    Pdu::H2CTermReq(t)
                } else {
                    Pdu::C2HTermReq(t)
                }
            }
            Spec::Cmd(s, d) => Pdu::CapsuleCmd(CapsuleCmd { sqe: *s, data: d }),
            Spec::Resp(c) => Pdu::CapsuleResp(CapsuleResp { cqe: *c }),
            Spec::H2C(cid, ttag, off, last, d) => Pdu::H2CData(H2CData {
                cid: CommandId(*cid),
                ttag: *ttag,
                offset: *off,
                last: *last,
                data: d,
            }),
            Spec::C2H(cid, off, last, success, d) => Pdu::C2HData(C2HData {
                cid: CommandId(*cid),
                offset: *off,
                last: *last || *success,
                success: *success,
                data: d,
            }),
            Spec::R2t(cid, ttag, off, len) => Pdu::R2t(R2t {
                cid: CommandId(*cid),
                ttag: *ttag,
                offset: *off,
                len: *len,
            }),
        }
    }
}

fn any_spec() -> impl Strategy<Value = Spec> {
    let data = || proptest::collection::vec(any::<u8>(), 1..300);
    prop_oneof![
        (0u8..=31, any::<bool>(), any::<bool>(), any::<u32>()).prop_map(|(hpda, h, d, m)| {
            Spec::IcReq(IcReq {
                hpda,
                hdgst: h,
                ddgst: d,
                maxr2t: m,
            })
        }),
        (
            0u8..=31,
            any::<bool>(),
            any::<bool>(),
            1024u32..=(u32::MAX / 4)
        )
            .prop_map(|(cpda, h, d, m)| Spec::IcResp(IcResp {
                cpda,
                hdgst: h,
                ddgst: d,
                maxh2cdata: m * 4,
            })),
        (
            any::<bool>(),
            any::<u16>(),
            any::<u32>(),
            proptest::collection::vec(any::<u8>(), 0..=128)
        )
            .prop_map(|(a, b, c, d)| Spec::Term(a, b, c, d)),
        (any_sqe(), proptest::collection::vec(any::<u8>(), 0..300))
            .prop_map(|(s, d)| Spec::Cmd(s, d)),
        any_cqe().prop_map(Spec::Resp),
        (
            any::<u16>(),
            any::<u16>(),
            0u32..1 << 30,
            any::<bool>(),
            data()
        )
            .prop_map(|(a, b, c, l, d)| Spec::H2C(a, b, c, l, d)),
        (
            any::<u16>(),
            0u32..1 << 30,
            any::<bool>(),
            any::<bool>(),
            data()
        )
            .prop_map(|(a, c, l, s, d)| Spec::C2H(a, c, l, s, d)),
        (any::<u16>(), any::<u16>(), 0u32..1 << 30, 1u32..1 << 30)
            .prop_map(|(a, b, c, d)| Spec::R2t(a, b, c, d)),
    ]
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..400), c in any_cfg()) {
        let _ = frame(&b, &c);
        if let Ok(d) = decode(&b, &c) {
            prop_assert!(d.len <= b.len());
            prop_assert!(d.data_range.end <= d.len);
            // Re-encoding a decoded PDU decodes to the same PDU.
            let again = d.pdu.to_vec(&c).unwrap();
            prop_assert_eq!(decode(&again, &c).unwrap().pdu, d.pdu);
        }
    }

    #[test]
    fn typed_header_fuzz_never_panics(
        ty in prop_oneof![0u8..=9, any::<u8>()],
        fl in any::<u8>(),
        pdo in any::<u8>(),
        plen in 0u32..600,
        body in proptest::collection::vec(any::<u8>(), 0..600),
        c in any_cfg(),
    ) {
        let ty_hlen = PduType::from_u8(ty).map(|t| t.hlen() as u8).unwrap_or(24);
        let mut b = CommonHeader { pdu_type: ty, flags: fl, hlen: ty_hlen, pdo, plen }.encode().to_vec();
        b.extend_from_slice(&body);
        let _ = frame(&b, &c);
        let _ = decode(&b, &c);
    }

    #[test]
    fn valid_pdus_round_trip(s in any_spec(), c in any_cfg()) {
        let p = s.pdu();
        let bytes = p.to_vec(&c).unwrap();
        prop_assert_eq!(frame(&bytes, &c), Ok(Frame::Complete(bytes.len())));
        let d = decode(&bytes, &c).unwrap();
        prop_assert_eq!(d.pdu, p);
        prop_assert_eq!(d.len, bytes.len());
        prop_assert_eq!(&bytes[d.data_range.clone()], p.data());
        prop_assert_eq!(d.pdu.to_vec(&c).unwrap(), bytes.clone());
        let parts = p.encode_parts(&c).unwrap();
        prop_assert_eq!(&bytes[..parts.header.len()], &parts.header[..]);
        // Any single bit flip is either rejected or yields a PDU that still
        // re-encodes consistently; it never panics.
        for i in [0usize, 1, 2, 3, 4, bytes.len() / 2, bytes.len() - 1] {
            let mut m = bytes.clone();
            if let Some(x) = m.get_mut(i) { *x ^= 0x10; }
            if let Ok(d) = decode(&m, &c) {
                let again = d.pdu.to_vec(&c).unwrap();
                prop_assert_eq!(decode(&again, &c).unwrap().pdu, d.pdu);
            }
        }
    }
}
