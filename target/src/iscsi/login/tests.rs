use super::*;
use crate::iscsi::negotiation::SessionParams;
use crate::iscsi::pdu::RejectReason;
use crate::iscsi::text::parse;
use proptest::prelude::*;

const TARGET: &str = "iqn.2026-01.io.mirrorpoint:disk1";
const INITIATOR: &str = "iqn.1994-05.com.redhat:client";

fn creds(name: &str, secret: &str) -> ChapCredentials {
    ChapCredentials {
        name: name.into(),
        secret: secret.as_bytes().to_vec(),
    }
}

fn config(auth: AuthPolicy) -> LoginConfig {
    LoginConfig {
        targets: vec![
            TargetEntry {
                name: TARGET.into(),
                alias: Some("disk one".into()),
                allowed_initiators: Some(vec![INITIATOR.into()]),
                auth,
                portals: vec![Portal {
                    address: "192.0.2.1:3260".into(),
                    tpgt: 1,
                }],
                redirect: None,
                removed: false,
            },
            TargetEntry {
                name: "iqn.2026-01.io.mirrorpoint:gone".into(),
                removed: true,
                ..Default::default()
            },
            TargetEntry {
                name: "iqn.2026-01.io.mirrorpoint:moved".into(),
                redirect: Some(Redirect {
                    target_address: "192.0.2.9:3260,1".into(),
                    permanent: false,
                }),
                ..Default::default()
            },
        ],
        ..Default::default()
    }
}

fn chap_policy(mutual: bool) -> AuthPolicy {
    AuthPolicy::Chap(
        ChapConfig::new(
            creds("alice", "alice-secret-12"),
            mutual.then(|| creds("target-name", "target-secret-1")),
        )
        .unwrap(),
    )
}

fn req(t: bool, c: bool, csg: Stage, nsg: Stage) -> LoginRequest {
    LoginRequest {
        transit: t,
        continue_: c,
        csg,
        nsg,
        version_max: 0,
        version_min: 0,
        isid: Isid([0x80, 0x12, 0x34, 0x56, 0x78, 0x9a]),
        tsih: Tsih(0),
        itt: Itt(0x1000),
        cid: Cid(0),
        cmd_sn: CmdSn(100),
        exp_stat_sn: StatSn(0),
    }
}

const SEC: Stage = Stage::SecurityNegotiation;
const OP: Stage = Stage::LoginOperationalNegotiation;
const FFP: Stage = Stage::FullFeaturePhase;

fn kv(text: &str) -> Vec<u8> {
    text.split('|')
        .filter(|s| !s.is_empty())
        .flat_map(|s| {
            let mut v = s.as_bytes().to_vec();
            v.push(0);
            v
        })
        .collect()
}

fn pairs(data: &[u8]) -> Vec<(String, String)> {
    parse(data)
        .unwrap()
        .iter()
        .map(|p| (p.key.to_string(), p.value.to_string()))
        .collect()
}

fn get(data: &[u8], key: &str) -> Option<String> {
    pairs(data)
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

struct Harness {
    cfg: LoginConfig,
    env: FixedEnv,
    m: LoginMachine,
}

impl Harness {
    fn new(auth: AuthPolicy) -> Self {
        Harness {
            cfg: config(auth),
            env: FixedEnv {
                random_byte: 7,
                next_tsih: 0x40,
                ..Default::default()
            },
            m: LoginMachine::new(),
        }
    }
    fn send(&mut self, r: &LoginRequest, text: &str) -> LoginStep {
        self.m.handle(&self.cfg, &mut self.env, r, &kv(text))
    }
}

fn status(step: &LoginStep) -> (u8, u8) {
    (step.response.status_class, step.response.status_detail)
}

fn failed(step: &LoginStep) -> LoginStatus {
    match step.outcome {
        LoginOutcome::Failed(s) => {
            assert_eq!(status(step), s.class_detail());
            assert!(!step.response.transit);
            s
        }
        ref o => panic!("expected failure, got {o:?}"),
    }
}

fn full(step: &LoginStep) -> LoginResult {
    match &step.outcome {
        LoginOutcome::FullFeature(r) => (**r).clone(),
        o => panic!("expected full feature, got {o:?} {:?}", pairs(&step.data)),
    }
}

const FIRST: &str = "InitiatorName=iqn.1994-05.com.redhat:client|SessionType=Normal|TargetName=iqn.2026-01.io.mirrorpoint:disk1|";

#[test]
fn md5_chap_vectors() {
    // RFC 1321 test suite, split as id || secret || challenge.
    assert_eq!(
        hex_value(&chap_response(b'a', b"b", b"c")),
        "0x900150983cd24fb0d6963f7d28e17f72"
    );
    assert_eq!(
        hex_value(&chap_response(b'm', b"essage", b" digest")),
        "0xf96b697d7cb7938d525a2f31aaf161d0"
    );
    assert_eq!(
        hex_value(&chap_response(b'a', b"", b"")),
        "0x0cc175b9c0f1b6a831c399e269772661"
    );
}

#[test]
fn status_codes() {
    use LoginStatus::*;
    assert_eq!(Success.class_detail(), (0, 0));
    assert_eq!(TargetMovedPermanently.class_detail(), (1, 2));
    assert_eq!(AuthenticationFailure.class_detail(), (2, 1));
    assert_eq!(SessionDoesNotExist.class_detail(), (2, 0x0a));
    assert_eq!(OutOfResources.class_detail(), (3, 2));
}

#[test]
fn plain_login_one_round() {
    let mut h = Harness::new(AuthPolicy::None);
    let text = format!(
        "{FIRST}HeaderDigest=CRC32C,None|DataDigest=None|MaxRecvDataSegmentLength=65536|ImmediateData=Yes|InitialR2T=No|MaxBurstLength=262144|FirstBurstLength=65536|IFMarker=No|X-com.example=1|"
    );
    let s = h.send(&req(true, false, OP, FFP), &text);
    let r = full(&s);
    assert_eq!(status(&s), (0, 0));
    assert!(s.response.transit);
    assert_eq!(s.response.csg, OP);
    assert_eq!(s.response.nsg, FFP);
    assert_eq!(s.response.tsih, Tsih(0x41));
    assert_eq!(s.response.itt, Itt(0x1000));
    assert_eq!(s.response.exp_cmd_sn, CmdSn(100));
    assert_eq!(s.response.max_cmd_sn, CmdSn(131));
    assert_eq!(s.response.version_active, 0);
    assert_eq!(get(&s.data, "TargetPortalGroupTag").as_deref(), Some("1"));
    assert_eq!(get(&s.data, "TargetAlias").as_deref(), Some("disk one"));
    assert_eq!(get(&s.data, "HeaderDigest").as_deref(), Some("CRC32C"));
    assert_eq!(
        get(&s.data, "MaxRecvDataSegmentLength").as_deref(),
        Some("262144")
    );
    assert_eq!(get(&s.data, "IFMarker").as_deref(), Some("No"));
    assert_eq!(
        get(&s.data, "X-com.example").as_deref(),
        Some("NotUnderstood")
    );
    assert!(r.new_session);
    assert_eq!(r.tsih, Tsih(0x41));
    assert_eq!(
        r.params.header_digest,
        crate::iscsi::negotiation::Digest::Crc32c
    );
    assert_eq!(r.params.initiator_max_recv_data_segment_length, 65536);
    assert_eq!(r.params.target_max_recv_data_segment_length, 262_144);
    assert!(!r.params.initial_r2t);
    assert_eq!(r.params.target_name.as_deref(), Some(TARGET));
    assert_eq!(r.exp_cmd_sn, CmdSn(100));
    assert_eq!(r.next_stat_sn, StatSn(1));
    assert!(h.m.is_finished());
    // Anything after completion is refused.
    let s = h.send(&req(true, false, OP, FFP), "");
    failed(&s);
}

#[test]
fn security_then_operational() {
    let mut h = Harness::new(AuthPolicy::None);
    let s = h.send(
        &req(true, false, SEC, OP),
        &format!("{FIRST}AuthMethod=CHAP,None|"),
    );
    assert_eq!(s.outcome, LoginOutcome::Continue);
    assert!(s.response.transit);
    assert_eq!((s.response.csg, s.response.nsg), (SEC, OP));
    assert_eq!(s.response.tsih, Tsih(0));
    assert_eq!(get(&s.data, "AuthMethod").as_deref(), Some("None"));
    assert_eq!(s.response.stat_sn, StatSn(0));
    // Operational keys in the security stage would have been an error; now
    // they are fine.
    let mut r2 = req(true, false, OP, FFP);
    r2.exp_stat_sn = StatSn(1);
    let s = h.send(&r2, "ErrorRecoveryLevel=0|");
    assert_eq!(s.response.stat_sn, StatSn(1));
    let r = full(&s);
    // Target declares its MaxRecvDataSegmentLength even unasked.
    assert_eq!(
        get(&s.data, "MaxRecvDataSegmentLength").as_deref(),
        Some("262144")
    );
    assert_eq!(r.params.target_max_recv_data_segment_length, 262_144);
    assert_eq!(r.next_stat_sn, StatSn(2));
}

#[test]
fn operational_keys_in_security_stage_fail() {
    let mut h = Harness::new(AuthPolicy::None);
    let s = h.send(
        &req(true, false, SEC, OP),
        &format!("{FIRST}AuthMethod=None|HeaderDigest=None|"),
    );
    assert_eq!(failed(&s), LoginStatus::InitiatorError);
}

#[test]
fn multi_round_with_c_bit() {
    let mut h = Harness::new(AuthPolicy::None);
    let all = kv(&format!("{FIRST}MaxBurstLength=65536|"));
    let (a, b) = all.split_at(30);
    let s = h.m.handle(&h.cfg, &mut h.env, &req(false, true, OP, OP), a);
    assert_eq!(s.outcome, LoginOutcome::Continue);
    assert!(s.data.is_empty());
    assert!(!s.response.transit && !s.response.continue_);
    let s =
        h.m.handle(&h.cfg, &mut h.env, &req(false, false, OP, OP), b);
    assert_eq!(s.outcome, LoginOutcome::Continue);
    assert!(!s.response.transit);
    assert_eq!(get(&s.data, "MaxBurstLength").as_deref(), Some("65536"));
    // Initiator now asks to go to full feature phase.
    let s = h.send(&req(true, false, OP, FFP), "");
    assert_eq!(full(&s).params.max_burst_length, 65536);
}

#[test]
fn long_response_uses_c_bit() {
    let mut h = Harness::new(AuthPolicy::None);
    let mut text = FIRST.to_string();
    for i in 0..170 {
        text.push_str(&format!(
            "X-unknown-key-{i:03}-padding-padding-padding-padding=1|"
        ));
    }
    let all = kv(&text);
    assert!(all.len() > LOGIN_MAX_DATA);
    let (a, b) = all.split_at(LOGIN_MAX_DATA);
    let s = h.m.handle(&h.cfg, &mut h.env, &req(false, true, OP, OP), a);
    assert_eq!(s.outcome, LoginOutcome::Continue);
    let s =
        h.m.handle(&h.cfg, &mut h.env, &req(true, false, OP, FFP), b);
    assert_eq!(s.outcome, LoginOutcome::Continue);
    assert!(s.response.continue_ && !s.response.transit);
    assert_eq!(s.data.len(), LOGIN_MAX_DATA);
    let mut got = s.data.clone();
    let s = h.send(&req(false, false, OP, OP), "");
    assert!(!s.response.continue_ && s.response.transit);
    got.extend_from_slice(&s.data);
    full(&s);
    let p = pairs(&got);
    assert_eq!(p.iter().filter(|(_, v)| v == "NotUnderstood").count(), 170);
}

fn chap_login(h: &mut Harness) -> (u8, Vec<u8>) {
    let s = h.send(
        &req(true, false, SEC, OP),
        &format!("{FIRST}AuthMethod=CHAP,None|"),
    );
    assert_eq!(s.outcome, LoginOutcome::Continue);
    assert_eq!(get(&s.data, "AuthMethod").as_deref(), Some("CHAP"));
    assert!(!s.response.transit, "must not leave security before auth");
    let s = h.send(&req(false, false, SEC, SEC), "CHAP_A=7,5|");
    assert_eq!(s.outcome, LoginOutcome::Continue);
    assert_eq!(get(&s.data, "CHAP_A").as_deref(), Some("5"));
    let id: u8 = get(&s.data, "CHAP_I").unwrap().parse().unwrap();
    let c = parse_binary(&get(&s.data, "CHAP_C").unwrap()).unwrap();
    // FixedEnv: id = 7, challenge = 8, 9, ... (16 bytes).
    assert_eq!(id, 7);
    assert_eq!(c, (8u8..24).collect::<Vec<_>>());
    (id, c)
}

#[test]
fn chap_one_way_success() {
    let mut h = Harness::new(chap_policy(false));
    let (id, c) = chap_login(&mut h);
    let r = hex_value(&chap_response(id, b"alice-secret-12", &c));
    let s = h.send(
        &req(true, false, SEC, OP),
        &format!("CHAP_N=alice|CHAP_R={r}|"),
    );
    assert_eq!(s.outcome, LoginOutcome::Continue);
    assert!(s.response.transit);
    assert_eq!(s.response.nsg, OP);
    assert!(s.data.is_empty());
    let s = h.send(&req(true, false, OP, FFP), "HeaderDigest=None|");
    full(&s);
}

#[test]
fn chap_failures() {
    // Wrong secret.
    let mut h = Harness::new(chap_policy(false));
    let (id, c) = chap_login(&mut h);
    let r = hex_value(&chap_response(id, b"wrong", &c));
    let s = h.send(
        &req(true, false, SEC, OP),
        &format!("CHAP_N=alice|CHAP_R={r}|"),
    );
    assert_eq!(failed(&s), LoginStatus::AuthenticationFailure);
    // Wrong name.
    let mut h = Harness::new(chap_policy(false));
    let (id, c) = chap_login(&mut h);
    let r = hex_value(&chap_response(id, b"alice-secret-12", &c));
    let s = h.send(
        &req(true, false, SEC, OP),
        &format!("CHAP_N=bob|CHAP_R={r}|"),
    );
    assert_eq!(failed(&s), LoginStatus::AuthenticationFailure);
    // Malformed response.
    let mut h = Harness::new(chap_policy(false));
    chap_login(&mut h);
    let s = h.send(&req(true, false, SEC, OP), "CHAP_N=alice|CHAP_R=zz|");
    assert_eq!(failed(&s), LoginStatus::AuthenticationFailure);
    // No MD5 offered.
    let mut h = Harness::new(chap_policy(false));
    h.send(
        &req(false, false, SEC, SEC),
        &format!("{FIRST}AuthMethod=CHAP|"),
    );
    let s = h.send(&req(false, false, SEC, SEC), "CHAP_A=6,7|");
    assert_eq!(failed(&s), LoginStatus::AuthenticationFailure);
    assert_eq!(get(&s.data, "CHAP_A"), None);
    // CHAP required but not offered.
    let mut h = Harness::new(chap_policy(false));
    let s = h.send(
        &req(true, false, SEC, OP),
        &format!("{FIRST}AuthMethod=None|"),
    );
    assert_eq!(failed(&s), LoginStatus::AuthenticationFailure);
    // CHAP required but initiator skips the security stage.
    let mut h = Harness::new(chap_policy(false));
    let s = h.send(&req(true, false, OP, FFP), FIRST);
    assert_eq!(failed(&s), LoginStatus::AuthenticationFailure);
    // Asking to transit without choosing a method.
    let mut h = Harness::new(chap_policy(false));
    let s = h.send(&req(true, false, SEC, OP), FIRST);
    assert_eq!(failed(&s), LoginStatus::AuthenticationFailure);
    // CHAP_R before the challenge.
    let mut h = Harness::new(chap_policy(false));
    h.send(
        &req(false, false, SEC, SEC),
        &format!("{FIRST}AuthMethod=CHAP|"),
    );
    let s = h.send(&req(false, false, SEC, SEC), "CHAP_N=alice|CHAP_R=0x00|");
    assert_eq!(failed(&s), LoginStatus::InitiatorError);
    // Mutual requested but the target has no mutual credentials.
    let mut h = Harness::new(chap_policy(false));
    let (id, c) = chap_login(&mut h);
    let r = hex_value(&chap_response(id, b"alice-secret-12", &c));
    let s = h.send(
        &req(true, false, SEC, OP),
        &format!("CHAP_N=alice|CHAP_R={r}|CHAP_I=3|CHAP_C=0x0102030405060708|"),
    );
    assert_eq!(failed(&s), LoginStatus::AuthenticationFailure);
}

#[test]
fn chap_mutual() {
    let mut h = Harness::new(chap_policy(true));
    let (id, c) = chap_login(&mut h);
    let r = hex_value(&chap_response(id, b"alice-secret-12", &c));
    let ic: Vec<u8> = (100u8..116).collect();
    let s = h.send(
        &req(true, false, SEC, OP),
        &format!(
            "CHAP_N=alice|CHAP_R={r}|CHAP_I=42|CHAP_C={}|",
            hex_value(&ic)
        ),
    );
    assert_eq!(s.outcome, LoginOutcome::Continue, "{:?}", status(&s));
    assert!(s.response.transit);
    assert_eq!(get(&s.data, "CHAP_N").as_deref(), Some("target-name"));
    let expect = chap_response(42, b"target-secret-1", &ic);
    assert_eq!(
        parse_binary(&get(&s.data, "CHAP_R").unwrap()).unwrap(),
        expect
    );
    full(&h.send(&req(true, false, OP, FFP), ""));

    // Base64 encodings are accepted too.
    let mut h = Harness::new(chap_policy(true));
    let (id, c) = chap_login(&mut h);
    let resp = chap_response(id, b"alice-secret-12", &c);
    let b64 = base64(&resp);
    let s = h.send(
        &req(true, false, SEC, OP),
        &format!("CHAP_N=alice|CHAP_R=0b{b64}|CHAP_I=1|CHAP_C=0xff00ff|"),
    );
    assert_eq!(s.outcome, LoginOutcome::Continue);

    // Reflected challenge.
    let mut h = Harness::new(chap_policy(true));
    let (id, c) = chap_login(&mut h);
    let r = hex_value(&chap_response(id, b"alice-secret-12", &c));
    let s = h.send(
        &req(true, false, SEC, OP),
        &format!(
            "CHAP_N=alice|CHAP_R={r}|CHAP_I={id}|CHAP_C={}|",
            hex_value(&c)
        ),
    );
    assert_eq!(failed(&s), LoginStatus::AuthenticationFailure);

    // Mutual configured (required) but initiator does not challenge.
    let mut h = Harness::new(chap_policy(true));
    let (id, c) = chap_login(&mut h);
    let r = hex_value(&chap_response(id, b"alice-secret-12", &c));
    let s = h.send(
        &req(true, false, SEC, OP),
        &format!("CHAP_N=alice|CHAP_R={r}|"),
    );
    assert_eq!(failed(&s), LoginStatus::AuthenticationFailure);

    // Bad CHAP_I.
    let mut h = Harness::new(chap_policy(true));
    let (id, c) = chap_login(&mut h);
    let r = hex_value(&chap_response(id, b"alice-secret-12", &c));
    let s = h.send(
        &req(true, false, SEC, OP),
        &format!("CHAP_N=alice|CHAP_R={r}|CHAP_I=256|CHAP_C=0x01|"),
    );
    assert_eq!(failed(&s), LoginStatus::AuthenticationFailure);
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for ch in data.chunks(3) {
        let b = [ch[0], *ch.get(1).unwrap_or(&0), *ch.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= ch.len() {
                s.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

#[test]
fn chap_config_validation() {
    assert_eq!(
        ChapConfig::new(creds("a", "same"), Some(creds("b", "same"))),
        Err(ConfigError::SameSecret)
    );
    assert_eq!(
        ChapConfig::new(creds("a", ""), None),
        Err(ConfigError::EmptySecret)
    );
}

#[test]
fn admission_failures() {
    let mut h = Harness::new(AuthPolicy::None);
    let s = h.send(
        &req(true, false, OP, FFP),
        "InitiatorName=iqn.2000-01.com.evil:x|TargetName=iqn.2026-01.io.mirrorpoint:disk1|",
    );
    assert_eq!(failed(&s), LoginStatus::AuthorizationFailure);

    let mut h = Harness::new(AuthPolicy::None);
    let s = h.send(
        &req(true, false, OP, FFP),
        "InitiatorName=iqn.1994-05.com.redhat:client|TargetName=iqn.2026-01.io.mirrorpoint:nope|",
    );
    assert_eq!(failed(&s), LoginStatus::NotFound);

    let mut h = Harness::new(AuthPolicy::None);
    let s = h.send(
        &req(true, false, OP, FFP),
        "TargetName=iqn.2026-01.io.mirrorpoint:disk1|",
    );
    assert_eq!(failed(&s), LoginStatus::MissingParameter);

    let mut h = Harness::new(AuthPolicy::None);
    let s = h.send(
        &req(true, false, OP, FFP),
        "InitiatorName=iqn.1994-05.com.redhat:client|",
    );
    assert_eq!(failed(&s), LoginStatus::MissingParameter);

    let mut h = Harness::new(AuthPolicy::None);
    let s = h.send(
        &req(true, false, OP, FFP),
        &format!("{FIRST}SessionType=Other|"),
    );
    // SessionType repeated is caught first: a protocol error.
    assert_eq!(failed(&s), LoginStatus::InitiatorError);

    let mut h = Harness::new(AuthPolicy::None);
    let s = h.send(
        &req(true, false, OP, FFP),
        "InitiatorName=iqn.1994-05.com.redhat:client|SessionType=Bogus|",
    );
    assert_eq!(failed(&s), LoginStatus::SessionTypeNotSupported);

    let mut h = Harness::new(AuthPolicy::None);
    let s = h.send(
        &req(true, false, OP, FFP),
        "InitiatorName=iqn.1994-05.com.redhat:client|TargetName=iqn.2026-01.io.mirrorpoint:moved|",
    );
    assert_eq!(failed(&s), LoginStatus::TargetMovedTemporarily);
    assert_eq!(status(&s), (1, 1));
    assert_eq!(
        get(&s.data, "TargetAddress").as_deref(),
        Some("192.0.2.9:3260,1")
    );

    let mut h = Harness::new(AuthPolicy::None);
    let s = h.send(
        &req(true, false, OP, FFP),
        "InitiatorName=iqn.1994-05.com.redhat:client|TargetName=iqn.2026-01.io.mirrorpoint:gone|",
    );
    assert_eq!(failed(&s), LoginStatus::TargetRemoved);
}

#[test]
fn abort_during_login() {
    let mut h = Harness::new(AuthPolicy::None);
    let s = h.send(&req(false, false, OP, OP), FIRST);
    assert_eq!(s.outcome, LoginOutcome::Continue);
    let s = h.m.abort(&h.cfg, LoginStatus::InvalidDuringLogin);
    assert_eq!(failed(&s), LoginStatus::InvalidDuringLogin);
    assert_eq!(status(&s), (2, 0x0b));
    assert_eq!(s.response.itt, Itt(0x1000));
    assert_eq!(s.response.stat_sn, StatSn(1));
    assert!(h.m.is_finished());
    // Before any request.
    let mut m = LoginMachine::new();
    let s = m.abort(&h.cfg, LoginStatus::ServiceUnavailable);
    assert_eq!(status(&s), (3, 1));
}

#[test]
fn version_mismatch() {
    let mut h = Harness::new(AuthPolicy::None);
    let mut r = req(true, false, OP, FFP);
    r.version_max = 2;
    r.version_min = 1;
    let s = h.send(&r, FIRST);
    assert_eq!(failed(&s), LoginStatus::UnsupportedVersion);
    assert_eq!(s.response.version_max, 0);
    // A range that includes 0 is fine.
    let mut h = Harness::new(AuthPolicy::None);
    let mut r = req(true, false, OP, FFP);
    r.version_max = 5;
    full(&h.send(&r, FIRST));
}

#[test]
fn protocol_errors_during_login() {
    // Stage regression / skipping: NSG must follow CSG.
    let mut h = Harness::new(AuthPolicy::None);
    let s = h.send(&req(true, false, OP, SEC), FIRST);
    assert_eq!(failed(&s), LoginStatus::InitiatorError);
    // CSG changes without the target having transited.
    let mut h = Harness::new(AuthPolicy::None);
    let s = h.send(
        &req(false, false, SEC, SEC),
        &format!("{FIRST}AuthMethod=None|"),
    );
    assert_eq!(s.outcome, LoginOutcome::Continue);
    let s = h.send(&req(true, false, OP, FFP), "");
    assert_eq!(failed(&s), LoginStatus::InitiatorError);
    // ISID changes mid-login.
    let mut h = Harness::new(AuthPolicy::None);
    h.send(&req(false, false, OP, OP), FIRST);
    let mut r = req(true, false, OP, FFP);
    r.isid = Isid([0; 6]);
    assert_eq!(failed(&h.send(&r, "")), LoginStatus::InitiatorError);
    // Repeated key across PDUs.
    let mut h = Harness::new(AuthPolicy::None);
    h.send(
        &req(false, false, OP, OP),
        &format!("{FIRST}MaxBurstLength=1024|"),
    );
    let s = h.send(&req(false, false, OP, OP), "MaxBurstLength=1024|");
    assert_eq!(failed(&s), LoginStatus::InitiatorError);
    // Identity keys cannot be changed after the first request.
    let mut h = Harness::new(chap_policy(false));
    let s = h.send(
        &req(false, false, SEC, SEC),
        &format!("{FIRST}AuthMethod=CHAP|"),
    );
    assert_eq!(s.outcome, LoginOutcome::Continue);
    let s = h.send(&req(false, false, SEC, SEC), "SessionType=Discovery|");
    assert_eq!(failed(&s), LoginStatus::InitiatorError);
    let mut h = Harness::new(AuthPolicy::None);
    h.send(
        &req(false, false, OP, OP),
        "InitiatorName=iqn.1994-05.com.redhat:client|TargetName=iqn.2026-01.io.mirrorpoint:disk1|",
    );
    let s = h.send(
        &req(false, false, OP, OP),
        "TargetName=iqn.2026-01.io.mirrorpoint:moved|",
    );
    assert_eq!(failed(&s), LoginStatus::InitiatorError);
    // Security key in operational stage.
    let mut h = Harness::new(AuthPolicy::None);
    let s = h.send(
        &req(false, false, OP, OP),
        &format!("{FIRST}AuthMethod=None|"),
    );
    assert_eq!(failed(&s), LoginStatus::InitiatorError);
    // Malformed text.
    let mut h = Harness::new(AuthPolicy::None);
    let s = h.m.handle(
        &h.cfg,
        &mut h.env,
        &req(false, false, OP, OP),
        b"InitiatorName",
    );
    assert_eq!(failed(&s), LoginStatus::InitiatorError);
}

#[test]
fn discovery_session() {
    let mut h = Harness::new(chap_policy(false));
    let s = h.send(
        &req(true, false, SEC, OP),
        "InitiatorName=iqn.2000-01.com.anyone:x|SessionType=Discovery|AuthMethod=None|",
    );
    assert_eq!(s.outcome, LoginOutcome::Continue);
    assert!(s.response.transit);
    let s = h.send(
        &req(true, false, OP, FFP),
        "HeaderDigest=None|MaxBurstLength=65536|ImmediateData=Yes|DefaultTime2Wait=0|",
    );
    assert_eq!(
        get(&s.data, "MaxBurstLength").as_deref(),
        Some("Irrelevant")
    );
    assert_eq!(get(&s.data, "ImmediateData").as_deref(), Some("Irrelevant"));
    assert_eq!(get(&s.data, "HeaderDigest").as_deref(), Some("None"));
    let r = full(&s);
    assert_eq!(r.params.session_type, SessionType::Discovery);
    assert_eq!(r.params.target_name, None);

    // Discovery disabled.
    let mut h = Harness::new(AuthPolicy::None);
    h.cfg.discovery_enabled = false;
    let s = h.send(
        &req(true, false, SEC, OP),
        "InitiatorName=iqn.x:y|SessionType=Discovery|AuthMethod=None|",
    );
    assert_eq!(failed(&s), LoginStatus::SessionTypeNotSupported);

    // Discovery CHAP when configured.
    let mut cfg = config(AuthPolicy::None);
    cfg.discovery_auth = chap_policy(false);
    let mut h = Harness::new(AuthPolicy::None);
    h.cfg = cfg;
    let s = h.send(
        &req(true, false, SEC, OP),
        "InitiatorName=iqn.x:y|SessionType=Discovery|AuthMethod=None|",
    );
    assert_eq!(failed(&s), LoginStatus::AuthenticationFailure);
}

fn existing(connections: u16) -> ExistingSession {
    ExistingSession {
        initiator_name: INITIATOR.into(),
        target_name: Some(TARGET.into()),
        session_type: SessionType::Normal,
        connections,
        max_connections: 2,
        params: SessionParams {
            max_burst_length: 4096,
            immediate_data: false,
            ..SessionParams::default()
        },
    }
}

#[test]
fn adding_connections() {
    let isid = req(true, false, OP, FFP).isid;
    let mut r = req(true, false, OP, FFP);
    r.tsih = Tsih(9);
    r.cid = Cid(1);
    // Unknown session.
    let mut h = Harness::new(AuthPolicy::None);
    assert_eq!(failed(&h.send(&r, FIRST)), LoginStatus::SessionDoesNotExist);
    // Room for one more connection.
    let mut h = Harness::new(AuthPolicy::None);
    h.env.sessions.push((isid, Tsih(9), existing(1)));
    let s = h.send(&r, &format!("{FIRST}HeaderDigest=CRC32C|"));
    let res = full(&s);
    assert!(!res.new_session);
    // Session-wide values come from the session, digests from this login.
    assert_eq!(res.params.max_burst_length, 4096);
    assert!(!res.params.immediate_data);
    assert_eq!(
        res.params.header_digest,
        crate::iscsi::negotiation::Digest::Crc32c
    );
    assert_eq!(res.tsih, Tsih(9));
    assert_eq!(s.response.tsih, Tsih(9));
    assert_eq!(res.cid, Cid(1));
    // Leading-only key on a non-leading connection.
    let mut h = Harness::new(AuthPolicy::None);
    h.env.sessions.push((isid, Tsih(9), existing(1)));
    let s = h.send(&r, &format!("{FIRST}MaxBurstLength=512|"));
    assert_eq!(failed(&s), LoginStatus::InitiatorError);
    // Full.
    let mut h = Harness::new(AuthPolicy::None);
    h.env.sessions.push((isid, Tsih(9), existing(2)));
    assert_eq!(failed(&h.send(&r, FIRST)), LoginStatus::TooManyConnections);
    // Someone else's session.
    let mut h = Harness::new(AuthPolicy::None);
    let mut other = existing(1);
    other.initiator_name = "iqn.other:x".into();
    h.env.sessions.push((isid, Tsih(9), other));
    assert_eq!(
        failed(&h.send(&r, FIRST)),
        LoginStatus::CantIncludeInSession
    );
}

#[test]
fn send_targets() {
    let cfg = config(AuthPolicy::None);
    let t = &cfg.targets[..1];
    let all = kv("TargetName=iqn.2026-01.io.mirrorpoint:disk1|TargetAddress=192.0.2.1:3260,1|");
    let st = |v: &str, ty: SessionType, cur: Option<&str>| send_targets_response(v, ty, cur, t);
    assert_eq!(st("All", SessionType::Discovery, None), Some(all.clone()));
    assert_eq!(
        st("All", SessionType::Normal, Some(TARGET)),
        Some(all.clone())
    );
    assert_eq!(st("", SessionType::Normal, Some(TARGET)), Some(all.clone()));
    assert_eq!(st(TARGET, SessionType::Discovery, None), Some(all.clone()));
    assert_eq!(st("iqn.none:x", SessionType::Discovery, None), Some(vec![]));
    // Two targets, two portals.
    let mut two = cfg.targets.clone();
    two.truncate(2);
    two[1].portals = vec![
        Portal {
            address: "192.0.2.9:3260".into(),
            tpgt: 2,
        },
        Portal {
            address: "[2001:db8::9]:3260".into(),
            tpgt: 2,
        },
    ];
    let r = send_targets_response("All", SessionType::Discovery, None, &two).unwrap();
    assert_eq!(
        pairs(&r)
            .iter()
            .map(|(k, _)| k.as_str())
            .collect::<Vec<_>>(),
        [
            "TargetName",
            "TargetAddress",
            "TargetName",
            "TargetAddress",
            "TargetAddress"
        ]
    );
    assert_eq!(
        get(&r, "TargetAddress").as_deref(),
        Some("192.0.2.1:3260,1")
    );
    // libiscsi iSCSI.SendTargets.Invalid cases.
    for bad in ["Alle", "A", "aLL", ""] {
        assert_eq!(st(bad, SessionType::Discovery, None), None, "{bad}");
    }
    let tr = |d: &str| text_request_response(&kv(d), SessionType::Normal, Some(TARGET), t);
    assert_eq!(tr("SendTargets=All|"), Ok(all.clone()));
    assert_eq!(tr("SendTargets=Alle|"), Err(RejectReason::ProtocolError));
    assert_eq!(tr("SendTargets=A|"), Err(RejectReason::ProtocolError));
    assert_eq!(tr("sENDtARGETS=aLL|"), Ok(kv("sENDtARGETS=NotUnderstood|")));
    assert_eq!(
        tr("SendTargetsPlease=All|"),
        Ok(kv("SendTargetsPlease=NotUnderstood|"))
    );
    assert_eq!(tr("MaxBurstLength=512|"), Ok(kv("MaxBurstLength=Reject|")));
    assert_eq!(
        text_request_response(b"junk", SessionType::Normal, None, t),
        Err(RejectReason::ProtocolError)
    );
}

proptest! {
    #[test]
    fn login_never_panics(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        crate::iscsi::fuzz_login(&data);
    }

    #[test]
    fn login_never_panics_on_texty_input(
        records in proptest::collection::vec(
            (any::<u8>(), proptest::collection::vec(
                prop::sample::select(vec![
                    "InitiatorName=iqn.a:b", "TargetName=iqn.2026-01.io.mirrorpoint:t",
                    "SessionType=Discovery", "SessionType=Normal", "AuthMethod=CHAP,None",
                    "AuthMethod=None", "CHAP_A=5", "CHAP_N=user", "CHAP_R=0x00",
                    "CHAP_I=1", "CHAP_C=0x0102", "HeaderDigest=CRC32C", "MaxBurstLength=512",
                    "X-y=z", "=", "", "A", "TargetAlias=x", "SendTargets=All",
                ]), 0..6)),
            0..8)
    ) {
        let mut bytes = Vec::new();
        for (flags, keys) in records {
            let mut t = Vec::new();
            for k in keys {
                t.extend_from_slice(k.as_bytes());
                t.push(0);
            }
            t.truncate(255);
            bytes.push(flags);
            bytes.push(t.len() as u8);
            bytes.extend_from_slice(&t);
        }
        crate::iscsi::fuzz_login(&bytes);
    }
}
