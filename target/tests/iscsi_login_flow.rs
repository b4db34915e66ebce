//! Wire-level login flows: a minimal initiator encodes Login Request PDUs,
//! the target side frames them, runs the login machine and encodes its
//! responses, which the initiator frames and decodes again. Exercises the
//! codec, text, negotiation and login modules together, with real OS
//! randomness for the CHAP challenge.

use mirrorpoint_target::iscsi::login::{
    chap_response, os_random, AuthPolicy, ChapConfig, ChapCredentials, ExistingSession,
    LoginConfig, LoginEnv, LoginMachine, LoginOutcome, Portal, TargetEntry,
};
use mirrorpoint_target::iscsi::negotiation::Digest;
use mirrorpoint_target::iscsi::pdu::{
    encode_pdu, frame, Bhs, Cid, CmdSn, DataOut, DataSn, FrameConfig, Framed, Isid, Itt,
    LoginRequest, Lun, Role, Stage, StatSn, Tsih, Ttt,
};
use mirrorpoint_target::iscsi::text::{hex_value, parse, parse_binary, TextBuilder};

struct OsEnv {
    next: u16,
}

impl LoginEnv for OsEnv {
    fn fill_random(&mut self, buf: &mut [u8]) -> bool {
        os_random(buf)
    }
    fn find_session(&self, _: Isid, _: Tsih) -> Option<ExistingSession> {
        None
    }
    fn allocate_tsih(&mut self) -> Option<Tsih> {
        self.next += 1;
        Some(Tsih(self.next))
    }
}

const TARGET: &str = "iqn.2026-01.io.mirrorpoint:vol0";

fn config() -> LoginConfig {
    LoginConfig {
        targets: vec![TargetEntry {
            name: TARGET.into(),
            auth: AuthPolicy::Chap(
                ChapConfig::new(
                    ChapCredentials {
                        name: "init".into(),
                        secret: b"initiator-secret".to_vec(),
                    },
                    Some(ChapCredentials {
                        name: "tgt".into(),
                        secret: b"target-secret-xx".to_vec(),
                    }),
                )
                .unwrap(),
            ),
            portals: vec![Portal {
                address: "[2001:db8::1]:3260".into(),
                tpgt: 1,
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

struct Wire {
    cfg: LoginConfig,
    env: OsEnv,
    m: LoginMachine,
    exp_stat_sn: u32,
}

impl Wire {
    /// Send one login request over the "wire" and return the decoded
    /// response header, its key/value pairs and the outcome.
    fn exchange(
        &mut self,
        t: bool,
        csg: Stage,
        nsg: Stage,
        kv: &[(&str, &str)],
    ) -> (
        mirrorpoint_target::iscsi::pdu::LoginResponse,
        Vec<(String, String)>,
        LoginOutcome,
    ) {
        let mut text = TextBuilder::new();
        for (k, v) in kv {
            text.push(k, v);
        }
        let req = Bhs::LoginRequest(LoginRequest {
            transit: t,
            continue_: false,
            csg,
            nsg,
            version_max: 0,
            version_min: 0,
            isid: Isid([0x40, 0, 0x12, 0x34, 0, 1]),
            tsih: Tsih(0),
            itt: Itt(0x77),
            cid: Cid(0),
            cmd_sn: CmdSn(1),
            exp_stat_sn: StatSn(self.exp_stat_sn),
        });
        let mut wire = Vec::new();
        encode_pdu(&req, &[], text.as_bytes(), false, false, &mut wire).unwrap();

        // Target side.
        let Framed::Complete(pdu) = frame(&wire, &FrameConfig::default(), Role::Target).unwrap()
        else {
            panic!("incomplete")
        };
        assert_eq!(pdu.wire_len, wire.len());
        let Bhs::LoginRequest(lr) = &pdu.bhs else {
            panic!()
        };
        let step = self.m.handle(&self.cfg, &mut self.env, lr, pdu.data);
        let mut out = Vec::new();
        encode_pdu(
            &Bhs::LoginResponse(step.response.clone()),
            &[],
            &step.data,
            false,
            false,
            &mut out,
        )
        .unwrap();

        // Initiator side.
        let Framed::Complete(rsp) = frame(&out, &FrameConfig::default(), Role::Initiator).unwrap()
        else {
            panic!("incomplete response")
        };
        let Bhs::LoginResponse(h) = rsp.bhs else {
            panic!()
        };
        self.exp_stat_sn = h.stat_sn.0.wrapping_add(1);
        let kv = parse(rsp.data)
            .unwrap()
            .iter()
            .map(|p| (p.key.to_string(), p.value.to_string()))
            .collect();
        (h, kv, step.outcome)
    }
}

fn val<'a>(kv: &'a [(String, String)], k: &str) -> &'a str {
    kv.iter()
        .find(|(kk, _)| kk == k)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("{k} missing in {kv:?}"))
}

#[test]
fn mutual_chap_login_then_digested_io() {
    let mut w = Wire {
        cfg: config(),
        env: OsEnv { next: 0 },
        m: LoginMachine::new(),
        exp_stat_sn: 0,
    };
    let sec = Stage::SecurityNegotiation;
    let op = Stage::LoginOperationalNegotiation;
    let ffp = Stage::FullFeaturePhase;

    let (h, kv, _) = w.exchange(
        true,
        sec,
        op,
        &[
            ("InitiatorName", "iqn.1994-05.com.redhat:host"),
            ("TargetName", TARGET),
            ("SessionType", "Normal"),
            ("AuthMethod", "CHAP,None"),
        ],
    );
    assert_eq!((h.status_class, h.transit), (0, false));
    assert_eq!(val(&kv, "AuthMethod"), "CHAP");
    assert_eq!(val(&kv, "TargetPortalGroupTag"), "1");

    let (_, kv, _) = w.exchange(false, sec, sec, &[("CHAP_A", "5")]);
    let id: u8 = val(&kv, "CHAP_I").parse().unwrap();
    let challenge = parse_binary(val(&kv, "CHAP_C")).unwrap();
    assert_eq!(challenge.len(), 16);

    let answer = hex_value(&chap_response(id, b"initiator-secret", &challenge));
    let my_challenge = [9u8; 16];
    let (h, kv, _) = w.exchange(
        true,
        sec,
        op,
        &[
            ("CHAP_N", "init"),
            ("CHAP_R", &answer),
            ("CHAP_I", "200"),
            ("CHAP_C", &hex_value(&my_challenge)),
        ],
    );
    assert_eq!((h.status_class, h.transit, h.nsg), (0, true, op));
    assert_eq!(val(&kv, "CHAP_N"), "tgt");
    assert_eq!(
        parse_binary(val(&kv, "CHAP_R")).unwrap(),
        chap_response(200, b"target-secret-xx", &my_challenge)
    );

    let (h, kv, outcome) = w.exchange(
        true,
        op,
        ffp,
        &[
            ("HeaderDigest", "CRC32C,None"),
            ("DataDigest", "CRC32C,None"),
            ("MaxRecvDataSegmentLength", "131072"),
            ("InitialR2T", "No"),
            ("ImmediateData", "Yes"),
            ("MaxBurstLength", "16776192"),
            ("FirstBurstLength", "262144"),
            ("DefaultTime2Wait", "2"),
            ("DefaultTime2Retain", "0"),
            ("MaxOutstandingR2T", "1"),
            ("ErrorRecoveryLevel", "0"),
            ("IFMarker", "No"),
            ("OFMarker", "No"),
            ("DataPDUInOrder", "Yes"),
            ("DataSequenceInOrder", "Yes"),
            ("MaxConnections", "1"),
        ],
    );
    assert_eq!((h.status_class, h.transit, h.nsg), (0, true, ffp));
    assert_ne!(h.tsih, Tsih(0));
    assert_eq!(val(&kv, "HeaderDigest"), "CRC32C");
    let LoginOutcome::FullFeature(res) = outcome else {
        panic!("{outcome:?}")
    };
    let p = &res.params;
    assert_eq!(
        (p.header_digest, p.data_digest),
        (Digest::Crc32c, Digest::Crc32c)
    );
    assert_eq!(p.max_burst_length, 1_048_576);
    assert_eq!(p.first_burst_length, 65_536);
    assert_eq!(p.default_time2retain, 0);

    // Full feature phase with the negotiated framing.
    let cfg = FrameConfig {
        header_digest: true,
        data_digest: true,
        max_recv_data_segment_length: p.target_max_recv_data_segment_length,
    };
    let bhs = Bhs::DataOut(DataOut {
        final_: true,
        lun: Lun::from_u64(0),
        itt: Itt(5),
        ttt: Ttt(6),
        exp_stat_sn: StatSn(w.exp_stat_sn),
        data_sn: DataSn(0),
        buffer_offset: 0,
    });
    let payload = vec![0xa5u8; 4095];
    let mut wire = Vec::new();
    encode_pdu(&bhs, &[], &payload, true, true, &mut wire).unwrap();
    assert_eq!(wire.len(), 48 + 4 + 4096 + 4);
    let Framed::Complete(pdu) = frame(&wire, &cfg, Role::Target).unwrap() else {
        panic!()
    };
    assert_eq!(pdu.data, &payload[..]);
    assert_eq!(pdu.bhs, bhs);
}

#[test]
fn wrong_chap_secret_is_rejected_on_the_wire() {
    let mut w = Wire {
        cfg: config(),
        env: OsEnv { next: 0 },
        m: LoginMachine::new(),
        exp_stat_sn: 0,
    };
    let sec = Stage::SecurityNegotiation;
    w.exchange(
        false,
        sec,
        sec,
        &[
            ("InitiatorName", "iqn.1994-05.com.redhat:host"),
            ("TargetName", TARGET),
            ("AuthMethod", "CHAP"),
        ],
    );
    let (_, kv, _) = w.exchange(false, sec, sec, &[("CHAP_A", "5")]);
    let id: u8 = val(&kv, "CHAP_I").parse().unwrap();
    let challenge = parse_binary(val(&kv, "CHAP_C")).unwrap();
    let answer = hex_value(&chap_response(id, b"not-the-secret", &challenge));
    let (h, kv, outcome) = w.exchange(
        true,
        sec,
        Stage::LoginOperationalNegotiation,
        &[("CHAP_N", "init"), ("CHAP_R", &answer)],
    );
    assert_eq!((h.status_class, h.status_detail), (2, 1));
    assert!(kv.is_empty());
    assert!(matches!(outcome, LoginOutcome::Failed(_)));
}
