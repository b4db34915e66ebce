use super::*;
use proptest::prelude::*;

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

// RFC 7143 Appendix B.4 (same as RFC 3720 B.4): CRC32C examples, digest
// bytes as they appear on the wire.
#[test]
fn crc32c_rfc_vectors() {
    assert_eq!(digest_bytes(crc32c(&[0u8; 32])), [0xaa, 0x36, 0x91, 0x8a]);
    assert_eq!(
        digest_bytes(crc32c(&[0xffu8; 32])),
        [0x43, 0xab, 0xa8, 0x62]
    );
    let inc: Vec<u8> = (0u8..32).collect();
    assert_eq!(digest_bytes(crc32c(&inc)), [0x4e, 0x79, 0xdd, 0x46]);
    let dec: Vec<u8> = (0u8..32).rev().collect();
    assert_eq!(digest_bytes(crc32c(&dec)), [0x5c, 0xdb, 0x3f, 0x11]);
    let read_cmd = hex("01 c0 00 00 00 00 00 00 00 00 00 00 00 00 00 00
         14 00 00 00 00 00 04 00 00 00 00 14 00 00 00 18
         28 00 00 00 00 00 00 00 02 00 00 00 00 00 00 00");
    assert_eq!(digest_bytes(crc32c(&read_cmd)), [0x56, 0x3a, 0x96, 0xd9]);
    // And that PDU decodes as the READ(10) it is.
    let raw: [u8; 48] = read_cmd.try_into().unwrap();
    let (bhs, lens) = Bhs::decode(&raw).unwrap();
    assert_eq!(lens, SegmentLengths::default());
    let Bhs::ScsiCommand(c) = bhs else { panic!() };
    assert!(c.final_ && c.read && !c.write);
    assert_eq!(c.itt, Itt(0x1400_0000));
    assert_eq!(c.expected_data_transfer_length, 0x400);
    assert_eq!(c.cmd_sn, CmdSn(0x14));
    assert_eq!(c.exp_stat_sn, StatSn(0x18));
    assert_eq!(c.cdb[0], 0x28);
    assert_eq!(c.cdb[8], 0x02);
}

fn lun() -> Lun {
    Lun([0, 1, 0, 0, 0, 0, 0, 0])
}

fn rt(bhs: Bhs, lens: SegmentLengths) -> [u8; 48] {
    let raw = bhs.encode(lens).unwrap();
    let (back, l2) = Bhs::decode(&raw).unwrap();
    assert_eq!(back, bhs);
    assert_eq!(l2, lens);
    assert_eq!(raw[4] as usize * 4, lens.ahs_len);
    assert_eq!(
        u32::from_be_bytes([0, raw[5], raw[6], raw[7]]),
        lens.data_len
    );
    raw
}

fn u32at(b: &[u8; 48], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

const L: SegmentLengths = SegmentLengths {
    ahs_len: 0,
    data_len: 0,
};
const L100: SegmentLengths = SegmentLengths {
    ahs_len: 0,
    data_len: 100,
};

#[test]
fn nop_out_layout() {
    let b = rt(
        Bhs::NopOut(NopOut {
            immediate: true,
            lun: lun(),
            itt: Itt(0x11),
            ttt: Ttt(0x22),
            cmd_sn: CmdSn(0x33),
            exp_stat_sn: StatSn(0x44),
        }),
        L100,
    );
    assert_eq!(b[0], 0x40);
    assert_eq!(b[1], 0x80);
    assert_eq!(&b[8..16], &lun().0);
    assert_eq!(
        (u32at(&b, 16), u32at(&b, 20), u32at(&b, 24), u32at(&b, 28)),
        (0x11, 0x22, 0x33, 0x44)
    );
}

#[test]
fn scsi_command_layout() {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x2a;
    cdb[15] = 0xee;
    let b = rt(
        Bhs::ScsiCommand(ScsiCommand {
            immediate: false,
            final_: true,
            read: false,
            write: true,
            attr: TaskAttr::Simple,
            lun: lun(),
            itt: Itt(7),
            expected_data_transfer_length: 4096,
            cmd_sn: CmdSn(9),
            exp_stat_sn: StatSn(10),
            cdb,
        }),
        SegmentLengths {
            ahs_len: 8,
            data_len: 512,
        },
    );
    assert_eq!(b[0], 0x01);
    assert_eq!(b[1], 0x80 | 0x20 | 0x01);
    assert_eq!(b[4], 2);
    assert_eq!(u32at(&b, 20), 4096);
    assert_eq!(u32at(&b, 24), 9);
    assert_eq!(u32at(&b, 28), 10);
    assert_eq!(&b[32..48], &cdb);
}

#[test]
fn scsi_command_validation() {
    let mut raw = [0u8; 48];
    raw[0] = 0x01;
    raw[1] = 0x80 | 0x05; // reserved ATTR
    assert!(matches!(
        Bhs::decode(&raw),
        Err(PduError::ReservedValue { .. })
    ));
    raw[1] = 0x40; // F=0 on a read
    assert!(matches!(
        Bhs::decode(&raw),
        Err(PduError::InvalidField { .. })
    ));
    raw[1] = 0xc0;
    raw[7] = 4; // immediate data without W
    assert!(matches!(
        Bhs::decode(&raw),
        Err(PduError::InvalidField { .. })
    ));
    raw[7] = 0;
    raw[16..20].copy_from_slice(&[0xff; 4]);
    assert!(matches!(
        Bhs::decode(&raw),
        Err(PduError::InvalidField { .. })
    ));
}

#[test]
fn tmf_request_layout() {
    let b = rt(
        Bhs::TaskMgmtRequest(TaskMgmtRequest {
            immediate: true,
            function: TmfFunction::LogicalUnitReset,
            lun: lun(),
            itt: Itt(1),
            referenced_task_tag: Itt(2),
            cmd_sn: CmdSn(3),
            exp_stat_sn: StatSn(4),
            ref_cmd_sn: CmdSn(5),
            exp_data_sn: DataSn(6),
        }),
        L,
    );
    assert_eq!(b[0], 0x42);
    assert_eq!(b[1], 0x85);
    assert_eq!([20, 24, 28, 32, 36].map(|o| u32at(&b, o)), [2, 3, 4, 5, 6]);
    let mut raw = b;
    raw[1] = 0x80 | 0x7f;
    let (h, _) = Bhs::decode(&raw).unwrap();
    let Bhs::TaskMgmtRequest(t) = h else { panic!() };
    assert_eq!(t.function, TmfFunction::Other(0x7f));
    raw[7] = 4;
    assert!(matches!(
        Bhs::decode(&raw),
        Err(PduError::InvalidField { .. })
    ));
}

#[test]
fn login_request_layout() {
    let b = rt(
        Bhs::LoginRequest(LoginRequest {
            transit: true,
            continue_: false,
            csg: Stage::LoginOperationalNegotiation,
            nsg: Stage::FullFeaturePhase,
            version_max: 0,
            version_min: 0,
            isid: Isid([0x80, 1, 2, 3, 4, 5]),
            tsih: Tsih(0x1234),
            itt: Itt(0x99),
            cid: Cid(0x0102),
            cmd_sn: CmdSn(0x55),
            exp_stat_sn: StatSn(0x66),
        }),
        L100,
    );
    assert_eq!(b[0], 0x43);
    assert_eq!(b[1], 0x87);
    assert_eq!(&b[8..14], &[0x80, 1, 2, 3, 4, 5]);
    assert_eq!(&b[14..16], &[0x12, 0x34]);
    assert_eq!(&b[20..22], &[1, 2]);
    assert_eq!(u32at(&b, 24), 0x55);
    assert_eq!(u32at(&b, 28), 0x66);
    // T and C together are invalid; reserved stage 2.
    let mut raw = b;
    raw[1] = 0xc7;
    assert!(Bhs::decode(&raw).is_err());
    raw[1] = 0x80 | (1 << 2) | 2;
    assert!(matches!(
        Bhs::decode(&raw),
        Err(PduError::ReservedValue { .. })
    ));
    raw[1] = 0x80 | (3 << 2) | 3;
    assert!(matches!(
        Bhs::decode(&raw),
        Err(PduError::ReservedValue { .. })
    ));
    // With T=0, NSG is ignored.
    raw[1] = 0x02;
    assert!(Bhs::decode(&raw).is_ok());
}

#[test]
fn text_request_layout() {
    let b = rt(
        Bhs::TextRequest(TextRequest {
            immediate: true,
            final_: false,
            continue_: true,
            lun: lun(),
            itt: Itt(1),
            ttt: Ttt::RESERVED,
            cmd_sn: CmdSn(2),
            exp_stat_sn: StatSn(3),
        }),
        L100,
    );
    assert_eq!(b[0], 0x44);
    assert_eq!(b[1], 0x40);
    assert_eq!(u32at(&b, 20), 0xffff_ffff);
    let mut raw = b;
    raw[1] = 0xc0;
    assert!(Bhs::decode(&raw).is_err());
}

#[test]
fn data_out_layout() {
    let b = rt(
        Bhs::DataOut(DataOut {
            final_: true,
            lun: lun(),
            itt: Itt(1),
            ttt: Ttt(2),
            exp_stat_sn: StatSn(3),
            data_sn: DataSn(4),
            buffer_offset: 8192,
        }),
        L100,
    );
    assert_eq!(b[0], 0x05);
    assert_eq!(b[1], 0x80);
    assert_eq!(u32at(&b, 24), 0);
    assert_eq!(u32at(&b, 28), 3);
    assert_eq!(u32at(&b, 36), 4);
    assert_eq!(u32at(&b, 40), 8192);
}

#[test]
fn logout_request_layout() {
    let b = rt(
        Bhs::LogoutRequest(LogoutRequest {
            immediate: true,
            reason: LogoutReason::CloseConnection,
            itt: Itt(1),
            cid: Cid(7),
            cmd_sn: CmdSn(2),
            exp_stat_sn: StatSn(3),
        }),
        L,
    );
    assert_eq!(b[0], 0x46);
    assert_eq!(b[1], 0x81);
    assert_eq!(&b[20..22], &[0, 7]);
    let mut raw = b;
    raw[1] = 0x83;
    assert!(matches!(
        Bhs::decode(&raw),
        Err(PduError::ReservedValue { .. })
    ));
}

#[test]
fn snack_layout() {
    let b = rt(
        Bhs::Snack(Snack {
            snack_type: SnackType::Status,
            lun: lun(),
            itt: Itt(1),
            ttt: Ttt(2),
            exp_stat_sn: StatSn(3),
            beg_run: 4,
            run_length: 5,
        }),
        L,
    );
    assert_eq!(b[0], 0x10);
    assert_eq!(b[1], 0x81);
    assert_eq!([28, 40, 44].map(|o| u32at(&b, o)), [3, 4, 5]);
    let mut raw = b;
    raw[1] = 0x84;
    assert!(Bhs::decode(&raw).is_err());
}

#[test]
fn target_pdus_layout() {
    let b = rt(
        Bhs::NopIn(NopIn {
            lun: lun(),
            itt: Itt::RESERVED,
            ttt: Ttt(5),
            stat_sn: StatSn(1),
            exp_cmd_sn: CmdSn(2),
            max_cmd_sn: CmdSn(3),
        }),
        L,
    );
    assert_eq!((b[0], b[1]), (0x20, 0x80));
    assert_eq!([20, 24, 28, 32].map(|o| u32at(&b, o)), [5, 1, 2, 3]);

    let b = rt(
        Bhs::ScsiResponse(ScsiResponse {
            bidi_overflow: false,
            bidi_underflow: true,
            overflow: false,
            underflow: true,
            response: 0,
            status: 2,
            itt: Itt(9),
            snack_tag: 0,
            stat_sn: StatSn(1),
            exp_cmd_sn: CmdSn(2),
            max_cmd_sn: CmdSn(3),
            exp_data_sn: DataSn(4),
            bidi_read_residual_count: 5,
            residual_count: 6,
        }),
        SegmentLengths {
            ahs_len: 0,
            data_len: 20,
        },
    );
    assert_eq!((b[0], b[1], b[2], b[3]), (0x21, 0x8a, 0, 2));
    assert_eq!(
        [24, 28, 32, 36, 40, 44].map(|o| u32at(&b, o)),
        [1, 2, 3, 4, 5, 6]
    );

    let b = rt(
        Bhs::TaskMgmtResponse(TaskMgmtResponse {
            response: 5,
            itt: Itt(9),
            stat_sn: StatSn(1),
            exp_cmd_sn: CmdSn(2),
            max_cmd_sn: CmdSn(3),
        }),
        L,
    );
    assert_eq!((b[0], b[1], b[2]), (0x22, 0x80, 5));

    let b = rt(
        Bhs::LoginResponse(LoginResponse {
            transit: true,
            continue_: false,
            csg: Stage::SecurityNegotiation,
            nsg: Stage::LoginOperationalNegotiation,
            version_max: 0,
            version_active: 0,
            isid: Isid([1, 2, 3, 4, 5, 6]),
            tsih: Tsih(7),
            itt: Itt(8),
            stat_sn: StatSn(1),
            exp_cmd_sn: CmdSn(2),
            max_cmd_sn: CmdSn(3),
            status_class: 2,
            status_detail: 1,
        }),
        L100,
    );
    assert_eq!((b[0], b[1]), (0x23, 0x81));
    assert_eq!((b[36], b[37]), (2, 1));
    assert_eq!(&b[14..16], &[0, 7]);

    let b = rt(
        Bhs::TextResponse(TextResponse {
            final_: true,
            continue_: false,
            lun: Lun::default(),
            itt: Itt(8),
            ttt: Ttt::RESERVED,
            stat_sn: StatSn(1),
            exp_cmd_sn: CmdSn(2),
            max_cmd_sn: CmdSn(3),
        }),
        L100,
    );
    assert_eq!((b[0], b[1]), (0x24, 0x80));

    let b = rt(
        Bhs::DataIn(DataIn {
            final_: true,
            acknowledge: false,
            overflow: false,
            underflow: true,
            has_status: true,
            status: 0,
            lun: lun(),
            itt: Itt(1),
            ttt: Ttt::RESERVED,
            stat_sn: StatSn(2),
            exp_cmd_sn: CmdSn(3),
            max_cmd_sn: CmdSn(4),
            data_sn: DataSn(5),
            buffer_offset: 6,
            residual_count: 7,
        }),
        L100,
    );
    assert_eq!((b[0], b[1]), (0x25, 0x83));
    assert_eq!(
        [24, 28, 32, 36, 40, 44].map(|o| u32at(&b, o)),
        [2, 3, 4, 5, 6, 7]
    );

    let b = rt(
        Bhs::LogoutResponse(LogoutResponse {
            response: 0,
            itt: Itt(1),
            stat_sn: StatSn(2),
            exp_cmd_sn: CmdSn(3),
            max_cmd_sn: CmdSn(4),
            time2wait: 2,
            time2retain: 20,
        }),
        L,
    );
    assert_eq!((b[0], b[1]), (0x26, 0x80));
    assert_eq!(&b[40..44], &[0, 2, 0, 20]);

    let b = rt(
        Bhs::R2t(R2t {
            lun: lun(),
            itt: Itt(1),
            ttt: Ttt(2),
            stat_sn: StatSn(3),
            exp_cmd_sn: CmdSn(4),
            max_cmd_sn: CmdSn(5),
            r2t_sn: R2tSn(6),
            buffer_offset: 7,
            desired_data_transfer_length: 8,
        }),
        L,
    );
    assert_eq!((b[0], b[1]), (0x31, 0x80));
    assert_eq!(
        [20, 24, 28, 32, 36, 40, 44].map(|o| u32at(&b, o)),
        [2, 3, 4, 5, 6, 7, 8]
    );

    let b = rt(
        Bhs::AsyncMessage(AsyncMessage {
            lun: lun(),
            stat_sn: StatSn(1),
            exp_cmd_sn: CmdSn(2),
            max_cmd_sn: CmdSn(3),
            async_event: 1,
            async_vcode: 0,
            parameter1: 4,
            parameter2: 5,
            parameter3: 6,
        }),
        L,
    );
    assert_eq!((b[0], b[1]), (0x32, 0x80));
    assert_eq!(u32at(&b, 16), 0xffff_ffff);
    assert_eq!(&b[36..44], &[1, 0, 0, 4, 0, 5, 0, 6]);

    let b = rt(
        Bhs::Reject(Reject {
            reason: RejectReason::InvalidPduField,
            stat_sn: StatSn(1),
            exp_cmd_sn: CmdSn(2),
            max_cmd_sn: CmdSn(3),
            data_sn_r2t_sn: 0,
        }),
        SegmentLengths {
            ahs_len: 0,
            data_len: 48,
        },
    );
    assert_eq!((b[0], b[1], b[2]), (0x3f, 0x80, 0x09));
    assert_eq!(u32at(&b, 16), 0xffff_ffff);
}

#[test]
fn unknown_opcodes() {
    for op in [0x07u8, 0x0f, 0x1c, 0x1e, 0x27, 0x30, 0x3c] {
        let mut raw = [0u8; 48];
        raw[0] = op;
        let e = Bhs::decode(&raw).unwrap_err();
        assert_eq!(e, PduError::UnknownOpcode(op));
        assert_eq!(e.reject_reason(), Some(RejectReason::CommandNotSupported));
    }
}

#[test]
fn reject_pdu_carries_bad_header() {
    let mut bad = [0u8; 48];
    bad[0] = 0x1d; // vendor-specific opcode
    bad[16..20].copy_from_slice(&[0, 0, 0, 9]);
    let e = Bhs::decode(&bad).unwrap_err();
    let mut out = Vec::new();
    encode_reject(
        e.reject_reason().unwrap(),
        &bad,
        StatSn(4),
        CmdSn(5),
        CmdSn(36),
        true,
        true,
        &mut out,
    )
    .unwrap();
    assert_eq!(out.len(), 48 + 4 + 48 + 4);
    let cfg = FrameConfig {
        header_digest: true,
        data_digest: true,
        ..Default::default()
    };
    let Framed::Complete(p) = frame(&out, &cfg, Role::Initiator).unwrap() else {
        panic!()
    };
    let Bhs::Reject(r) = &p.bhs else { panic!() };
    assert_eq!(r.reason, RejectReason::CommandNotSupported);
    assert_eq!(r.stat_sn, StatSn(4));
    assert_eq!(p.data, &bad[..]);
    assert_eq!(p.bhs.itt(), Itt::RESERVED);
}

#[test]
fn reserved_top_bit_of_opcode_byte() {
    let mut raw = [0u8; 48];
    raw[0] = 0x80; // NOP-Out with the reserved bit
    let e = Bhs::decode(&raw).unwrap_err();
    assert!(matches!(e, PduError::ReservedValue { .. }));
    assert_eq!(e.reject_reason(), Some(RejectReason::ProtocolError));
}

#[test]
fn serial_numbers() {
    assert!(CmdSn(1).lt(CmdSn(2)));
    assert!(CmdSn(0xffff_fff0).lt(CmdSn(5)));
    assert!(CmdSn(5).gt(CmdSn(0xffff_fff0)));
    assert_eq!(serial_cmp(0, 0x8000_0000), None);
    assert_eq!(serial_cmp(7, 7), Some(Ordering::Equal));
    assert_eq!(CmdSn(u32::MAX).next(), CmdSn(0));
    assert_eq!(StatSn(u32::MAX).serial_add(2), StatSn(1));
}

fn data_out_pdu(data: &[u8], hd: bool, dd: bool) -> Vec<u8> {
    let bhs = Bhs::DataOut(DataOut {
        final_: true,
        lun: lun(),
        itt: Itt(1),
        ttt: Ttt(2),
        exp_stat_sn: StatSn(3),
        data_sn: DataSn(0),
        buffer_offset: 0,
    });
    let mut out = Vec::new();
    encode_pdu(&bhs, &[], data, hd, dd, &mut out).unwrap();
    out
}

#[test]
fn framer_incremental_padding_digests() {
    for (hd, dd) in [(false, false), (true, false), (false, true), (true, true)] {
        let cfg = FrameConfig {
            header_digest: hd,
            data_digest: dd,
            max_recv_data_segment_length: 8192,
        };
        let data = b"hello";
        let wire = data_out_pdu(data, hd, dd);
        let expect_len = 48 + if hd { 4 } else { 0 } + 8 + if dd { 4 } else { 0 };
        assert_eq!(wire.len(), expect_len);
        assert_eq!(
            &wire[wire.len() - if dd { 7 } else { 3 }..][..3],
            &[0, 0, 0]
        );
        for cut in 0..wire.len() {
            match frame(&wire[..cut], &cfg, Role::Target).unwrap() {
                Framed::NeedMore(n) => assert!(n > cut && n <= wire.len()),
                Framed::Complete(_) => panic!("complete at {cut}"),
            }
        }
        // Two PDUs back to back: first one framed, consumes exact length.
        let mut two = wire.clone();
        two.extend_from_slice(&wire);
        let Framed::Complete(p) = frame(&two, &cfg, Role::Target).unwrap() else {
            panic!()
        };
        assert_eq!(p.data, data);
        assert_eq!(p.wire_len, wire.len());
        assert_eq!(&two[p.data_range.clone()], data);
        if dd {
            let mut bad = wire.clone();
            let n = bad.len();
            bad[n - 6] ^= 1; // a padding byte is covered too
            let e = frame(&bad, &cfg, Role::Target).unwrap_err();
            assert!(matches!(e, PduError::DataDigest { .. }));
            assert_eq!(e.reject_reason(), Some(RejectReason::DataDigestError));
        }
        if hd {
            let mut bad = wire.clone();
            bad[20] ^= 1;
            let e = frame(&bad, &cfg, Role::Target).unwrap_err();
            assert!(matches!(e, PduError::HeaderDigest { .. }));
            assert_eq!(e.reject_reason(), None);
        }
    }
}

#[test]
fn framer_no_data_digest_without_data() {
    let cfg = FrameConfig {
        header_digest: true,
        data_digest: true,
        max_recv_data_segment_length: 8192,
    };
    let wire = data_out_pdu(&[], true, true);
    assert_eq!(wire.len(), 52);
    assert!(matches!(
        frame(&wire, &cfg, Role::Target).unwrap(),
        Framed::Complete(_)
    ));
}

#[test]
fn framer_limits_and_direction() {
    let cfg = FrameConfig {
        max_recv_data_segment_length: 4,
        ..Default::default()
    };
    let wire = data_out_pdu(b"hello", false, false);
    let e = frame(&wire, &cfg, Role::Target).unwrap_err();
    assert_eq!(e, PduError::DataSegmentTooLong { len: 5, max: 4 });
    assert_eq!(e.reject_reason(), Some(RejectReason::ProtocolError));
    // The error is reported from the header alone, before the data arrives.
    assert!(frame(&wire[..48], &cfg, Role::Target).is_err());
    let e = frame(&wire, &FrameConfig::default(), Role::Initiator).unwrap_err();
    assert_eq!(e, PduError::WrongDirection(Opcode::DataOut));
    assert_eq!(e.reject_reason(), Some(RejectReason::ProtocolError));
}

#[test]
fn ahs_extended_cdb_and_bidi() {
    let mut cdb32 = [0u8; 32];
    for (i, b) in cdb32.iter_mut().enumerate() {
        *b = i as u8;
    }
    let ahs = build_ahs(Some(&cdb32[16..]), Some(0x1000));
    // 2+1+1+16 = 20 bytes extended CDB AHS, then 8 bytes bidi.
    assert_eq!(ahs.len(), 28);
    assert_eq!(&ahs[..4], &[0, 17, 1, 0]);
    assert_eq!(&ahs[20..28], &[0, 5, 2, 0, 0, 0, 0x10, 0]);
    let bhs = Bhs::ScsiCommand(ScsiCommand {
        immediate: false,
        final_: true,
        read: true,
        write: true,
        attr: TaskAttr::Simple,
        lun: lun(),
        itt: Itt(1),
        expected_data_transfer_length: 512,
        cmd_sn: CmdSn(1),
        exp_stat_sn: StatSn(1),
        cdb: cdb32[..16].try_into().unwrap(),
    });
    let mut wire = Vec::new();
    encode_pdu(&bhs, &ahs, &[], true, false, &mut wire).unwrap();
    let cfg = FrameConfig {
        header_digest: true,
        ..Default::default()
    };
    let Framed::Complete(p) = frame(&wire, &cfg, Role::Target).unwrap() else {
        panic!()
    };
    assert_eq!(
        p.ahs_list().unwrap(),
        vec![
            Ahs::ExtendedCdb(&cdb32[16..]),
            Ahs::BidiReadExpectedLength(0x1000)
        ]
    );
    assert_eq!(p.full_cdb().unwrap().unwrap(), cdb32.to_vec());

    // Odd-sized extended CDB is padded.
    let ahs = build_ahs(Some(&[1, 2, 3]), None);
    assert_eq!(ahs, vec![0, 4, 1, 0, 1, 2, 3, 0]);
    assert_eq!(parse_ahs(&ahs).unwrap(), vec![Ahs::ExtendedCdb(&[1, 2, 3])]);
    // Malformed AHS.
    assert!(parse_ahs(&[0, 9, 1, 0, 1, 2, 3, 4]).is_err());
    assert!(parse_ahs(&[0, 4, 2, 0, 1, 2, 3, 4]).is_err());
    assert!(parse_ahs(&[0, 1, 7, 0]).is_err());
    assert!(parse_ahs(&[0, 0, 1, 0]).is_err());
    assert!(parse_ahs(&[0, 1]).is_err());
}

#[test]
fn encode_overflow() {
    let bhs = Bhs::NopIn(NopIn {
        lun: lun(),
        itt: Itt(1),
        ttt: Ttt(1),
        stat_sn: StatSn(1),
        exp_cmd_sn: CmdSn(1),
        max_cmd_sn: CmdSn(1),
    });
    assert!(bhs
        .encode(SegmentLengths {
            ahs_len: 0,
            data_len: 1 << 24
        })
        .is_err());
    assert!(bhs
        .encode(SegmentLengths {
            ahs_len: 6,
            data_len: 0
        })
        .is_err());
}

proptest! {
    #[test]
    fn decoder_never_panics(data in proptest::collection::vec(any::<u8>(), 0..400),
                            hd: bool, dd: bool, max in 0u32..20000) {
        let cfg = FrameConfig { header_digest: hd, data_digest: dd, max_recv_data_segment_length: max };
        let _ = frame(&data, &cfg, Role::Target);
        let _ = frame(&data, &cfg, Role::Initiator);
        let _ = parse_ahs(&data);
        crate::iscsi::fuzz_decode_pdu(&data);
    }

    #[test]
    fn decode_encode_is_stable(raw in proptest::array::uniform32(any::<u8>()),
                               tail in proptest::array::uniform16(any::<u8>()),
                               op in prop::sample::select(vec![0u8,1,2,3,4,5,6,0x10,0x20,0x21,0x22,0x23,0x24,0x25,0x26,0x31,0x32,0x3f])) {
        let mut b = [0u8; 48];
        b[..32].copy_from_slice(&raw);
        b[32..].copy_from_slice(&tail);
        b[0] = (b[0] & 0x40) | op;
        prop_assume!(b[0] & 0x80 == 0);
        if let Ok((bhs, lens)) = Bhs::decode(&b) {
            let enc = bhs.encode(lens).unwrap();
            let (again, lens2) = Bhs::decode(&enc).unwrap();
            prop_assert_eq!(again, bhs);
            prop_assert_eq!(lens2, lens);
        }
    }
}
