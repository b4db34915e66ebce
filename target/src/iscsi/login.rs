//! Sans-IO target login state machine (RFC 7143 §6.3, §11.12–11.13) with CHAP
//! authentication (RFC 7143 §12.1.3 over RFC 1994 MD5-CHAP), plus the
//! SendTargets text response used for discovery.
//!
//! The connection layer decodes a Login Request with [`crate::iscsi::pdu`] and
//! hands its header and data segment to [`LoginMachine::handle`]; it gets back
//! the Login Response header, the response text and what happens next
//! (continue, full feature phase with typed session parameters, or failure
//! with a status class/detail, after which the connection is closed). All
//! environment-dependent inputs — randomness for CHAP challenges, the table
//! of existing sessions, TSIH allocation — come through the [`LoginEnv`]
//! trait, so the machine is deterministic under test and fuzzing.
//!
//! Policy lives in [`LoginConfig`]: the targets with their access lists and
//! CHAP settings (one-way, or mutual where the target also proves itself),
//! the discovery-session authentication and the negotiation limits.

use md5::{Digest as _, Md5};
use thiserror::Error;

use super::negotiation::{
    is_known_key, is_security_key, KeyStage, NegotiationError, NegotiationLimits, Negotiator,
    SessionParams, SessionType,
};
use super::pdu::{
    Cid, CmdSn, Isid, Itt, LoginRequest, LoginResponse, RejectReason, Stage, StatSn, Tsih,
};
use super::text::{
    self, hex_value, parse_binary, parse_list, parse_number, Pair, TextAssembler, TextBuilder,
};

/// The only iSCSI version (RFC 7143 §11.12.4).
pub const ISCSI_VERSION: u8 = 0x00;
/// MaxRecvDataSegmentLength in force during login (RFC 7143 §13.12).
pub const LOGIN_MAX_DATA: usize = 8192;
/// Bound on reassembled login text.
pub const LOGIN_TEXT_LIMIT: usize = 64 * 1024;

/// Login Response status (RFC 7143 §11.13.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LoginStatus {
    Success,
    TargetMovedTemporarily,
    TargetMovedPermanently,
    InitiatorError,
    AuthenticationFailure,
    AuthorizationFailure,
    NotFound,
    TargetRemoved,
    UnsupportedVersion,
    TooManyConnections,
    MissingParameter,
    CantIncludeInSession,
    SessionTypeNotSupported,
    SessionDoesNotExist,
    InvalidDuringLogin,
    TargetError,
    ServiceUnavailable,
    OutOfResources,
}

impl LoginStatus {
    /// (Status-Class, Status-Detail).
    pub fn class_detail(self) -> (u8, u8) {
        use LoginStatus::*;
        match self {
            Success => (0, 0),
            TargetMovedTemporarily => (1, 1),
            TargetMovedPermanently => (1, 2),
            InitiatorError => (2, 0),
            AuthenticationFailure => (2, 1),
            AuthorizationFailure => (2, 2),
            NotFound => (2, 3),
            TargetRemoved => (2, 4),
            UnsupportedVersion => (2, 5),
            TooManyConnections => (2, 6),
            MissingParameter => (2, 7),
            CantIncludeInSession => (2, 8),
            SessionTypeNotSupported => (2, 9),
            SessionDoesNotExist => (2, 0x0a),
            InvalidDuringLogin => (2, 0x0b),
            TargetError => (3, 0),
            ServiceUnavailable => (3, 1),
            OutOfResources => (3, 2),
        }
    }
}

/// A CHAP name and secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChapCredentials {
    pub name: String,
    pub secret: Vec<u8>,
}

/// CHAP configuration for a target (or for discovery).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChapConfig {
    /// What the initiator must prove (CHAP_N/CHAP_R it sends).
    pub initiator: ChapCredentials,
    /// If set, mutual CHAP is required: the initiator challenges us and we
    /// answer as this name/secret.
    pub mutual: Option<ChapCredentials>,
}

/// Configuration errors.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    #[error("CHAP secret must not be empty")]
    EmptySecret,
    #[error("the mutual CHAP secret must differ from the initiator secret (RFC 7143 §12.1.3)")]
    SameSecret,
}

impl ChapConfig {
    /// Validated constructor.
    pub fn new(
        initiator: ChapCredentials,
        mutual: Option<ChapCredentials>,
    ) -> Result<Self, ConfigError> {
        if initiator.secret.is_empty() {
            return Err(ConfigError::EmptySecret);
        }
        if let Some(m) = &mutual {
            if m.secret.is_empty() {
                return Err(ConfigError::EmptySecret);
            }
            if m.secret == initiator.secret {
                return Err(ConfigError::SameSecret);
            }
        }
        Ok(ChapConfig { initiator, mutual })
    }
}

/// Authentication required.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum AuthPolicy {
    #[default]
    None,
    Chap(ChapConfig),
}

/// A portal through which a target is reachable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Portal {
    /// `ip:port`, IPv6 as `[addr]:port`.
    pub address: String,
    pub tpgt: u16,
}

/// A target as login and discovery see it.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct TargetEntry {
    pub name: String,
    pub alias: Option<String>,
    /// Initiator names allowed to log in; `None` allows everyone.
    pub allowed_initiators: Option<Vec<String>>,
    pub auth: AuthPolicy,
    pub portals: Vec<Portal>,
    /// Redirect: answer "target moved" with this TargetAddress value.
    pub redirect: Option<Redirect>,
    /// Being deleted: new logins get "target removed".
    pub removed: bool,
}

/// Redirection of a target (status class 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    /// `ip:port,tpgt`.
    pub target_address: String,
    pub permanent: bool,
}

impl TargetEntry {
    fn allows(&self, initiator: &str) -> bool {
        self.allowed_initiators
            .as_ref()
            .map_or(true, |l| l.iter().any(|i| i == initiator))
    }
}

/// Target-wide login policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginConfig {
    pub targets: Vec<TargetEntry>,
    /// Whether discovery sessions are accepted on this portal.
    pub discovery_enabled: bool,
    pub discovery_auth: AuthPolicy,
    /// Tag of the portal group this connection arrived on.
    pub portal_group_tag: u16,
    pub limits: NegotiationLimits,
    /// Command window advertised in MaxCmdSN (ExpCmdSN + window - 1).
    pub cmd_window: u32,
    /// CHAP challenge length in bytes.
    pub chap_challenge_len: usize,
}

impl Default for LoginConfig {
    fn default() -> Self {
        LoginConfig {
            targets: Vec::new(),
            discovery_enabled: true,
            discovery_auth: AuthPolicy::None,
            portal_group_tag: 1,
            limits: NegotiationLimits::default(),
            cmd_window: 32,
            chap_challenge_len: 16,
        }
    }
}

impl LoginConfig {
    /// Find a target by name.
    pub fn target(&self, name: &str) -> Option<&TargetEntry> {
        self.targets.iter().find(|t| t.name == name)
    }
}

/// A session the environment already has (for adding connections).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExistingSession {
    pub initiator_name: String,
    pub target_name: Option<String>,
    pub session_type: SessionType,
    pub connections: u16,
    pub max_connections: u16,
    /// The session's negotiated parameters; session-wide values of a new
    /// connection are taken from here (they are leading-only keys).
    pub params: SessionParams,
}

/// Everything the login machine needs from outside.
pub trait LoginEnv {
    /// Fill `buf` with unpredictable bytes; false on failure.
    fn fill_random(&mut self, buf: &mut [u8]) -> bool;
    /// Look up an existing session by ISID and TSIH.
    fn find_session(&self, isid: Isid, tsih: Tsih) -> Option<ExistingSession>;
    /// Allocate a non-zero TSIH for a new session.
    fn allocate_tsih(&mut self) -> Option<Tsih>;
}

/// Randomness from the operating system.
pub fn os_random(buf: &mut [u8]) -> bool {
    getrandom::fill(buf).is_ok()
}

/// Final state of a successful login.
///
/// For a new session (`new_session`), the caller must still handle session
/// reinstatement: an existing session with the same initiator name and ISID
/// is to be closed (RFC 7143 §6.3.5). For a connection added to a session,
/// `params` holds the session's session-wide values and this connection's
/// own digests and data segment lengths.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginResult {
    pub params: SessionParams,
    pub isid: Isid,
    pub tsih: Tsih,
    pub cid: Cid,
    /// True when this login created a new session.
    pub new_session: bool,
    /// ExpCmdSN to continue with.
    pub exp_cmd_sn: CmdSn,
    /// StatSN of the next response on this connection.
    pub next_stat_sn: StatSn,
}

/// What to do after sending the response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoginOutcome {
    /// Wait for the next Login Request.
    Continue,
    /// Login done; the connection is in full feature phase.
    FullFeature(Box<LoginResult>),
    /// Login failed; send the response, then close the connection.
    Failed(LoginStatus),
}

/// One step of the machine: the response to send and what follows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginStep {
    pub response: LoginResponse,
    pub data: Vec<u8>,
    pub outcome: LoginOutcome,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum ChapState {
    /// AuthMethod not yet agreed.
    Idle,
    /// AuthMethod=CHAP agreed, waiting for CHAP_A.
    AwaitAlgorithm,
    /// Challenge sent, waiting for CHAP_N/CHAP_R.
    AwaitResponse { id: u8, challenge: Vec<u8> },
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    Start,
    Stage(Stage),
    Done,
}

/// Pending multi-PDU response (we set C=1).
#[derive(Clone, Debug)]
struct PendingOut {
    rest: Vec<u8>,
    transit_to: Option<Stage>,
}

/// Target-side login state for one connection.
#[derive(Debug)]
pub struct LoginMachine {
    phase: Phase,
    isid: Isid,
    tsih: Tsih,
    cid: Cid,
    stat_sn: StatSn,
    auth: AuthPolicy,
    auth_done: bool,
    chap: ChapState,
    method_agreed: bool,
    negotiator: Option<Negotiator>,
    assembler: TextAssembler,
    pending: Option<PendingOut>,
    existing: Option<ExistingSession>,
    last_req: Option<LoginRequest>,
}

impl Default for LoginMachine {
    fn default() -> Self {
        Self::new()
    }
}

/// Internal failure carrying the status to report, a reason for the log and
/// any text the failed response must still carry (TargetAddress on redirect).
#[derive(Debug)]
struct Fail(LoginStatus, String, Vec<u8>);

impl From<NegotiationError> for Fail {
    fn from(e: NegotiationError) -> Self {
        let st = match e {
            NegotiationError::BadSessionType(_) => LoginStatus::SessionTypeNotSupported,
            _ => LoginStatus::InitiatorError,
        };
        Fail(st, e.to_string(), Vec::new())
    }
}

fn fail<T>(st: LoginStatus, why: &str) -> Result<T, Fail> {
    Err(Fail(st, why.to_string(), Vec::new()))
}

fn auth_fail(why: &str) -> Fail {
    Fail(
        LoginStatus::AuthenticationFailure,
        why.to_string(),
        Vec::new(),
    )
}

/// MD5-CHAP response: MD5(id || secret || challenge) (RFC 1994 §4.1).
pub fn chap_response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl LoginMachine {
    /// A machine for a freshly accepted connection.
    pub fn new() -> Self {
        LoginMachine {
            phase: Phase::Start,
            isid: Isid::default(),
            tsih: Tsih::default(),
            cid: Cid::default(),
            stat_sn: StatSn::default(),
            auth: AuthPolicy::None,
            auth_done: false,
            chap: ChapState::Idle,
            method_agreed: false,
            negotiator: None,
            assembler: TextAssembler::new(LOGIN_TEXT_LIMIT),
            pending: None,
            existing: None,
            last_req: None,
        }
    }

    /// End the login from the target side (login timeout, a non-Login PDU
    /// during login — use [`LoginStatus::InvalidDuringLogin`] —, shutdown —
    /// [`LoginStatus::ServiceUnavailable`]): a failure Login Response built
    /// from the last request seen. Close the connection after sending it.
    pub fn abort(&mut self, cfg: &LoginConfig, status: LoginStatus) -> LoginStep {
        let req = self.last_req.clone().unwrap_or(LoginRequest {
            transit: false,
            continue_: false,
            csg: Stage::SecurityNegotiation,
            nsg: Stage::SecurityNegotiation,
            version_max: ISCSI_VERSION,
            version_min: ISCSI_VERSION,
            isid: self.isid,
            tsih: self.tsih,
            itt: Itt::RESERVED,
            cid: self.cid,
            cmd_sn: CmdSn(0),
            exp_stat_sn: self.stat_sn,
        });
        self.phase = Phase::Done;
        let mut response = self.response_header(cfg, &req, status);
        response.nsg = req.csg;
        LoginStep {
            response,
            data: Vec::new(),
            outcome: LoginOutcome::Failed(status),
        }
    }

    /// True once the machine reached full feature phase or failed.
    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Process one Login Request (header and data segment).
    pub fn handle(
        &mut self,
        cfg: &LoginConfig,
        env: &mut dyn LoginEnv,
        req: &LoginRequest,
        data: &[u8],
    ) -> LoginStep {
        self.last_req = Some(req.clone());
        match self.step(cfg, env, req, data) {
            Ok(step) => step,
            Err(Fail(st, why, data)) => {
                tracing::debug!(status = ?st, reason = %why, "iSCSI login failed");
                self.phase = Phase::Done;
                let mut response = self.response_header(cfg, req, st);
                response.transit = false;
                response.continue_ = false;
                response.nsg = req.csg;
                LoginStep {
                    response,
                    data,
                    outcome: LoginOutcome::Failed(st),
                }
            }
        }
    }

    fn response_header(
        &mut self,
        cfg: &LoginConfig,
        req: &LoginRequest,
        st: LoginStatus,
    ) -> LoginResponse {
        let (class, detail) = st.class_detail();
        let stat_sn = self.stat_sn;
        self.stat_sn = self.stat_sn.next();
        LoginResponse {
            transit: false,
            continue_: false,
            csg: req.csg,
            nsg: req.csg,
            version_max: ISCSI_VERSION,
            version_active: ISCSI_VERSION,
            isid: req.isid,
            tsih: req.tsih,
            itt: req.itt,
            stat_sn,
            exp_cmd_sn: req.cmd_sn,
            max_cmd_sn: req.cmd_sn.serial_add(cfg.cmd_window.max(1) - 1),
            status_class: class,
            status_detail: detail,
        }
    }

    fn step(
        &mut self,
        cfg: &LoginConfig,
        env: &mut dyn LoginEnv,
        req: &LoginRequest,
        data: &[u8],
    ) -> Result<LoginStep, Fail> {
        let current = match self.phase {
            Phase::Done => return fail(LoginStatus::InitiatorError, "login already finished"),
            Phase::Start => {
                self.stat_sn = req.exp_stat_sn;
                if req.version_min > ISCSI_VERSION {
                    return fail(LoginStatus::UnsupportedVersion, "Version-min above 0");
                }
                self.isid = req.isid;
                self.tsih = req.tsih;
                self.cid = req.cid;
                req.csg
            }
            Phase::Stage(s) => {
                if req.isid != self.isid || req.tsih != self.tsih || req.cid != self.cid {
                    return fail(
                        LoginStatus::InitiatorError,
                        "ISID/TSIH/CID changed during login",
                    );
                }
                if req.csg != s {
                    return fail(
                        LoginStatus::InitiatorError,
                        "CSG does not match login stage",
                    );
                }
                s
            }
        };
        if req.transit && req.continue_ {
            return fail(LoginStatus::InitiatorError, "T and C both set");
        }
        if req.transit && req.nsg <= current {
            return fail(LoginStatus::InitiatorError, "NSG must follow CSG");
        }

        // Continuation of a long response of ours.
        if let Some(mut p) = self.pending.take() {
            if !data.is_empty() || req.transit || req.continue_ {
                return fail(
                    LoginStatus::InitiatorError,
                    "expected empty request while target continues",
                );
            }
            let n = p.rest.len().min(LOGIN_MAX_DATA);
            let chunk: Vec<u8> = p.rest.drain(..n).collect();
            let more = !p.rest.is_empty();
            let transit_to = p.transit_to;
            if more {
                self.pending = Some(p);
            }
            return self.finish_step(
                cfg,
                env,
                req,
                current,
                chunk,
                more,
                if more { None } else { transit_to },
            );
        }

        // Reassemble initiator text spanning several PDUs.
        let text = match self.assembler.push(data, req.continue_) {
            Ok(Some(t)) => t,
            Ok(None) => {
                let response = self.response_header(cfg, req, LoginStatus::Success);
                if self.phase == Phase::Start {
                    // Not enough to decide anything yet; remember the stage.
                    self.phase = Phase::Stage(current);
                }
                return Ok(LoginStep {
                    response,
                    data: Vec::new(),
                    outcome: LoginOutcome::Continue,
                });
            }
            Err(e) => return fail(LoginStatus::InitiatorError, &e.to_string()),
        };
        let pairs = text::parse(&text)
            .map_err(|e| Fail(LoginStatus::InitiatorError, e.to_string(), Vec::new()))?;

        let mut resp = TextBuilder::new();
        let stage = match current {
            Stage::SecurityNegotiation => KeyStage::Security,
            _ => KeyStage::Operational,
        };
        let first = self.negotiator.is_none();
        if first {
            self.negotiator = Some(Negotiator::new(cfg.limits.clone(), req.tsih == Tsih(0)));
        }
        let Some(neg) = self.negotiator.as_mut() else {
            return fail(LoginStatus::TargetError, "no negotiator");
        };
        neg.process(stage, &pairs, &mut resp)?;
        if first {
            self.admit(cfg, env, &mut resp)?;
            // Identity is fixed by the first request (RFC 7143 §13.7, §13.4):
            // a later InitiatorName/TargetName/SessionType is a protocol error,
            // otherwise a session could be re-typed after its access checks.
            if let Some(neg) = self.negotiator.as_mut() {
                for k in ["InitiatorName", "TargetName", "SessionType"] {
                    let _ = neg.mark_seen(k);
                }
            }
        }
        self.phase = Phase::Stage(current);

        if current == Stage::SecurityNegotiation {
            self.security(cfg, env, &pairs, &mut resp)?;
        } else {
            if pairs.iter().any(|p| is_security_key(p.key)) {
                return fail(
                    LoginStatus::InitiatorError,
                    "security key outside security stage",
                );
            }
            if !self.auth_done {
                if self.auth != AuthPolicy::None {
                    return fail(
                        LoginStatus::AuthenticationFailure,
                        "authentication required",
                    );
                }
                self.auth_done = true;
            }
        }

        // Decide on the transition. In the security stage we only follow the
        // initiator once authentication is complete; asking to leave before
        // even choosing CHAP is an authentication failure.
        let mut transit_to = None;
        if req.transit {
            match current {
                Stage::SecurityNegotiation if self.auth_done => transit_to = Some(req.nsg),
                Stage::SecurityNegotiation if self.chap == ChapState::Idle => {
                    return fail(
                        LoginStatus::AuthenticationFailure,
                        "transit without authentication",
                    )
                }
                Stage::SecurityNegotiation => {}
                _ => transit_to = Some(req.nsg),
            }
        }
        if let (Some(Stage::FullFeaturePhase), Stage::LoginOperationalNegotiation) =
            (transit_to, current)
        {
            if let Some(neg) = self.negotiator.as_mut() {
                neg.target_declarations(&mut resp);
            }
        }
        let mut out = resp.into_bytes();
        if out.len() > LOGIN_MAX_DATA {
            let rest = out.split_off(LOGIN_MAX_DATA);
            self.pending = Some(PendingOut { rest, transit_to });
            return self.finish_step(cfg, env, req, current, out, true, None);
        }
        self.finish_step(cfg, env, req, current, out, false, transit_to)
    }

    #[allow(clippy::too_many_arguments)]
    fn finish_step(
        &mut self,
        cfg: &LoginConfig,
        env: &mut dyn LoginEnv,
        req: &LoginRequest,
        current: Stage,
        data: Vec<u8>,
        more: bool,
        transit_to: Option<Stage>,
    ) -> Result<LoginStep, Fail> {
        let mut outcome = LoginOutcome::Continue;
        let mut new_tsih = self.tsih;
        if transit_to == Some(Stage::FullFeaturePhase) {
            let Some(neg) = self.negotiator.as_ref() else {
                return fail(LoginStatus::TargetError, "no negotiator");
            };
            let mut params = neg.finish()?;
            let new_session = self.tsih == Tsih(0);
            if let Some(s) = &self.existing {
                params = SessionParams {
                    header_digest: params.header_digest,
                    data_digest: params.data_digest,
                    initiator_max_recv_data_segment_length: params
                        .initiator_max_recv_data_segment_length,
                    target_max_recv_data_segment_length: params.target_max_recv_data_segment_length,
                    initiator_name: params.initiator_name,
                    initiator_alias: params.initiator_alias,
                    target_name: params.target_name,
                    session_type: params.session_type,
                    ..s.params.clone()
                };
            }
            if new_session {
                new_tsih = match env.allocate_tsih() {
                    Some(t) if t != Tsih(0) => t,
                    _ => return fail(LoginStatus::OutOfResources, "no TSIH available"),
                };
            }
            outcome = LoginOutcome::FullFeature(Box::new(LoginResult {
                params,
                isid: self.isid,
                tsih: new_tsih,
                cid: self.cid,
                new_session,
                exp_cmd_sn: req.cmd_sn,
                next_stat_sn: self.stat_sn.next(),
            }));
        }
        let mut response = self.response_header(cfg, req, LoginStatus::Success);
        response.continue_ = more;
        if let Some(nsg) = transit_to {
            response.transit = true;
            response.nsg = nsg;
            self.phase = if nsg == Stage::FullFeaturePhase {
                Phase::Done
            } else {
                Phase::Stage(nsg)
            };
        } else {
            response.nsg = current;
        }
        response.tsih = new_tsih;
        Ok(LoginStep {
            response,
            data,
            outcome,
        })
    }

    /// First-PDU checks: names, target, access, existing session.
    fn admit(
        &mut self,
        cfg: &LoginConfig,
        env: &mut dyn LoginEnv,
        resp: &mut TextBuilder,
    ) -> Result<(), Fail> {
        let Some(neg) = self.negotiator.as_ref() else {
            return fail(LoginStatus::TargetError, "no negotiator");
        };
        let p = neg.params().clone();
        let Some(initiator) = p.initiator_name.clone().filter(|n| !n.is_empty()) else {
            return fail(LoginStatus::MissingParameter, "InitiatorName missing");
        };
        match p.session_type {
            SessionType::Discovery => {
                if !cfg.discovery_enabled {
                    return fail(LoginStatus::SessionTypeNotSupported, "discovery disabled");
                }
                self.auth = cfg.discovery_auth.clone();
            }
            SessionType::Normal => {
                let Some(tn) = p.target_name.as_deref().filter(|n| !n.is_empty()) else {
                    return fail(LoginStatus::MissingParameter, "TargetName missing");
                };
                let Some(t) = cfg.target(tn) else {
                    return fail(LoginStatus::NotFound, "unknown target");
                };
                if t.removed {
                    return fail(LoginStatus::TargetRemoved, "target removed");
                }
                if let Some(r) = &t.redirect {
                    let mut b = TextBuilder::new();
                    b.push("TargetAddress", &r.target_address);
                    let st = if r.permanent {
                        LoginStatus::TargetMovedPermanently
                    } else {
                        LoginStatus::TargetMovedTemporarily
                    };
                    return Err(Fail(st, "target redirected".into(), b.into_bytes()));
                }
                if !t.allows(&initiator) {
                    return fail(LoginStatus::AuthorizationFailure, "initiator not allowed");
                }
                self.auth = t.auth.clone();
                resp.push("TargetPortalGroupTag", &cfg.portal_group_tag.to_string());
                if let Some(a) = &t.alias {
                    resp.push("TargetAlias", a);
                }
            }
        }
        if self.tsih != Tsih(0) {
            let Some(s) = env.find_session(self.isid, self.tsih) else {
                return fail(LoginStatus::SessionDoesNotExist, "unknown TSIH");
            };
            if s.initiator_name != initiator
                || s.session_type != p.session_type
                || s.target_name != p.target_name
            {
                return fail(
                    LoginStatus::CantIncludeInSession,
                    "session belongs to another nexus",
                );
            }
            if s.connections >= s.max_connections {
                return fail(LoginStatus::TooManyConnections, "MaxConnections reached");
            }
            self.existing = Some(s);
        }
        Ok(())
    }

    /// Security-stage keys: AuthMethod and CHAP.
    fn security(
        &mut self,
        cfg: &LoginConfig,
        env: &mut dyn LoginEnv,
        pairs: &[Pair<'_>],
        resp: &mut TextBuilder,
    ) -> Result<(), Fail> {
        let get = |k: &str| pairs.iter().find(|p| p.key == k).map(|p| p.value);
        let Some(neg) = self.negotiator.as_mut() else {
            return fail(LoginStatus::TargetError, "no negotiator");
        };
        for p in pairs.iter().filter(|p| is_security_key(p.key)) {
            neg.mark_seen(p.key)?;
            if !matches!(
                p.key,
                "AuthMethod" | "CHAP_A" | "CHAP_N" | "CHAP_R" | "CHAP_I" | "CHAP_C"
            ) {
                resp.push(p.key, "NotUnderstood");
            }
        }
        if let Some(v) = get("AuthMethod") {
            if self.method_agreed {
                return fail(LoginStatus::InitiatorError, "AuthMethod renegotiated");
            }
            let offered: Vec<&str> = parse_list(v).collect();
            match &self.auth {
                AuthPolicy::None => {
                    if !offered.contains(&"None") {
                        return fail(
                            LoginStatus::AuthenticationFailure,
                            "AuthMethod None not offered",
                        );
                    }
                    resp.push("AuthMethod", "None");
                    self.auth_done = true;
                }
                AuthPolicy::Chap(_) => {
                    if !offered.contains(&"CHAP") {
                        return fail(LoginStatus::AuthenticationFailure, "CHAP required");
                    }
                    resp.push("AuthMethod", "CHAP");
                    self.chap = ChapState::AwaitAlgorithm;
                }
            }
            self.method_agreed = true;
        }
        let chap_keys = ["CHAP_A", "CHAP_N", "CHAP_R", "CHAP_I", "CHAP_C"];
        let any_chap = chap_keys.iter().any(|k| get(k).is_some());
        if !any_chap {
            if self.auth == AuthPolicy::None {
                // AuthMethod defaults to None; nothing to prove.
                self.auth_done = true;
            }
            return Ok(());
        }
        let AuthPolicy::Chap(chap_cfg) = &self.auth else {
            return fail(
                LoginStatus::InitiatorError,
                "CHAP keys without AuthMethod=CHAP",
            );
        };
        match std::mem::replace(&mut self.chap, ChapState::Idle) {
            ChapState::Idle => fail(LoginStatus::InitiatorError, "CHAP keys before AuthMethod"),
            ChapState::AwaitAlgorithm => {
                let Some(a) = get("CHAP_A") else {
                    return fail(LoginStatus::InitiatorError, "expected CHAP_A");
                };
                if chap_keys.iter().skip(1).any(|k| get(k).is_some()) {
                    return fail(LoginStatus::InitiatorError, "CHAP keys out of order");
                }
                if !parse_list(a).any(|x| parse_number(x) == Ok(5)) {
                    resp.push("CHAP_A", "Reject");
                    return fail(
                        LoginStatus::AuthenticationFailure,
                        "only CHAP_A=5 (MD5) supported",
                    );
                }
                let mut rnd = vec![0u8; cfg.chap_challenge_len.clamp(1, 1024) + 1];
                if !env.fill_random(&mut rnd) {
                    return fail(LoginStatus::TargetError, "no randomness for CHAP challenge");
                }
                let Some((&id, challenge)) = rnd.split_first() else {
                    return fail(LoginStatus::TargetError, "empty challenge buffer");
                };
                resp.push("CHAP_A", "5");
                resp.push("CHAP_I", &id.to_string());
                resp.push("CHAP_C", &hex_value(challenge));
                self.chap = ChapState::AwaitResponse {
                    id,
                    challenge: challenge.to_vec(),
                };
                Ok(())
            }
            ChapState::AwaitResponse { id, challenge } => {
                if get("CHAP_A").is_some() {
                    return fail(LoginStatus::InitiatorError, "CHAP_A repeated");
                }
                let (Some(n), Some(r)) = (get("CHAP_N"), get("CHAP_R")) else {
                    return fail(LoginStatus::AuthenticationFailure, "CHAP_N/CHAP_R missing");
                };
                let r = parse_binary(r).map_err(|_| auth_fail("bad CHAP_R"))?;
                let expected = chap_response(id, &chap_cfg.initiator.secret, &challenge);
                let name_ok = ct_eq(n.as_bytes(), chap_cfg.initiator.name.as_bytes());
                if !(ct_eq(&r, &expected) && name_ok) {
                    return fail(LoginStatus::AuthenticationFailure, "CHAP response mismatch");
                }
                match (get("CHAP_I"), get("CHAP_C"), &chap_cfg.mutual) {
                    (None, None, None) => {}
                    (Some(i), Some(c), Some(ours)) => {
                        let i = parse_number(i)
                            .ok()
                            .and_then(|v| u8::try_from(v).ok())
                            .ok_or_else(|| auth_fail("bad CHAP_I"))?;
                        let c = parse_binary(c).map_err(|_| auth_fail("bad CHAP_C"))?;
                        if c.is_empty() || c.len() > 1024 {
                            return fail(LoginStatus::AuthenticationFailure, "bad CHAP_C length");
                        }
                        if c == challenge {
                            return fail(
                                LoginStatus::AuthenticationFailure,
                                "reflected CHAP challenge",
                            );
                        }
                        let answer = chap_response(i, &ours.secret, &c);
                        resp.push("CHAP_N", &ours.name);
                        resp.push("CHAP_R", &hex_value(&answer));
                    }
                    (None, None, Some(_)) => {
                        return fail(LoginStatus::AuthenticationFailure, "mutual CHAP required")
                    }
                    (_, _, None) => {
                        return fail(
                            LoginStatus::AuthenticationFailure,
                            "mutual CHAP requested but not configured",
                        )
                    }
                    _ => {
                        return fail(
                            LoginStatus::AuthenticationFailure,
                            "CHAP_I/CHAP_C incomplete",
                        )
                    }
                }
                self.auth_done = true;
                Ok(())
            }
        }
    }
}

/// Build the answer to a `SendTargets=<value>` request (RFC 7143 Appendix
/// C): `TargetName=` followed by one `TargetAddress=ip:port,tpgt` per portal.
///
/// * `All` lists every target the caller passes (already filtered to what
///   this initiator may see) in a discovery session, and only the session's
///   target in a normal session;
/// * an empty value is the session's own target (normal sessions only);
/// * an iSCSI name (`iqn.`, `eui.`, `naa.`) lists that target, or nothing if
///   unknown.
///
/// Anything else returns `None`: answer with a Reject PDU (protocol error),
/// as LIO does, which libiscsi's iSCSI.SendTargets.Invalid test expects to
/// fail the request without dropping the connection.
pub fn send_targets_response(
    value: &str,
    session_type: SessionType,
    current_target: Option<&str>,
    targets: &[TargetEntry],
) -> Option<Vec<u8>> {
    let is_name = |v: &str| v.starts_with("iqn.") || v.starts_with("eui.") || v.starts_with("naa.");
    let selected: Vec<&TargetEntry> = match (value, session_type) {
        ("All", SessionType::Discovery) => targets.iter().collect(),
        ("All", SessionType::Normal) | ("", SessionType::Normal) => targets
            .iter()
            .filter(|t| Some(t.name.as_str()) == current_target)
            .collect(),
        (v, _) if is_name(v) => targets.iter().filter(|t| t.name == v).collect(),
        _ => return None,
    };
    let mut b = TextBuilder::new();
    for t in selected {
        b.push("TargetName", &t.name);
        for p in &t.portals {
            b.push("TargetAddress", &format!("{},{}", p.address, p.tpgt));
        }
    }
    Some(b.into_bytes())
}

/// Answer a full-feature-phase Text Request (already reassembled across
/// C-bit PDUs): SendTargets is served, unknown keys get `NotUnderstood`,
/// other known keys (not renegotiable by this target) get `Reject`.
/// `Err` means: answer with a Reject PDU carrying that reason.
pub fn text_request_response(
    data: &[u8],
    session_type: SessionType,
    current_target: Option<&str>,
    targets: &[TargetEntry],
) -> Result<Vec<u8>, RejectReason> {
    let pairs = text::parse(data).map_err(|_| RejectReason::ProtocolError)?;
    let mut out = Vec::new();
    for p in pairs {
        if p.key == "SendTargets" {
            let r = send_targets_response(p.value, session_type, current_target, targets)
                .ok_or(RejectReason::ProtocolError)?;
            out.extend(r);
        } else {
            let mut b = TextBuilder::new();
            let known = is_known_key(p.key);
            b.push(p.key, if known { "Reject" } else { "NotUnderstood" });
            out.extend(b.into_bytes());
        }
    }
    Ok(out)
}

/// Deterministic environment for fuzzing and tests.
#[derive(Debug, Default, Clone)]
pub struct FixedEnv {
    pub random_byte: u8,
    pub sessions: Vec<(Isid, Tsih, ExistingSession)>,
    pub next_tsih: u16,
}

impl LoginEnv for FixedEnv {
    fn fill_random(&mut self, buf: &mut [u8]) -> bool {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = self.random_byte.wrapping_add(i as u8);
        }
        true
    }
    fn find_session(&self, isid: Isid, tsih: Tsih) -> Option<ExistingSession> {
        self.sessions
            .iter()
            .find(|(i, t, _)| *i == isid && *t == tsih)
            .map(|(_, _, s)| s.clone())
    }
    fn allocate_tsih(&mut self) -> Option<Tsih> {
        self.next_tsih = self.next_tsih.wrapping_add(1).max(1);
        Some(Tsih(self.next_tsih))
    }
}

/// Drive a login machine with arbitrary bytes (see [`crate::iscsi::fuzz_login`]).
///
/// The input is a sequence of records: one flag byte (bit 7 T, bit 6 C,
/// bits 2–3 CSG, bits 0–1 NSG, bit 4 selects a CHAP-protected target for the
/// whole run when set in the first record), a length byte, and that many
/// bytes of login text.
pub fn fuzz_drive(data: &[u8]) {
    let chap = data.first().is_some_and(|f| f & 0x10 != 0);
    let auth = if chap {
        AuthPolicy::Chap(ChapConfig {
            initiator: ChapCredentials {
                name: "user".into(),
                secret: b"secretsecret".to_vec(),
            },
            mutual: Some(ChapCredentials {
                name: "target".into(),
                secret: b"targetsecret".to_vec(),
            }),
        })
    } else {
        AuthPolicy::None
    };
    let cfg = LoginConfig {
        targets: vec![TargetEntry {
            name: "iqn.2026-01.io.mirrorpoint:t".into(),
            auth,
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut env = FixedEnv::default();
    let mut m = LoginMachine::new();
    let mut rest = data;
    while let [flags, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (text, next) = tail.split_at(n);
        rest = next;
        let stage = |v: u8| match v & 3 {
            0 => Stage::SecurityNegotiation,
            1 => Stage::LoginOperationalNegotiation,
            _ => Stage::FullFeaturePhase,
        };
        let csg = stage(flags >> 2);
        if csg == Stage::FullFeaturePhase {
            continue;
        }
        let req = LoginRequest {
            transit: flags & 0x80 != 0,
            continue_: flags & 0x40 != 0 && flags & 0x80 == 0,
            csg,
            nsg: stage(*flags),
            version_max: 0,
            version_min: 0,
            isid: Isid([0x80, 0, 0, 0, 0, 1]),
            tsih: Tsih(0),
            itt: Itt(1),
            cid: Cid(0),
            cmd_sn: CmdSn(1),
            exp_stat_sn: StatSn(0),
        };
        let step = m.handle(&cfg, &mut env, &req, text);
        let _ = step.response.clone();
        if m.is_finished() {
            break;
        }
    }
}

#[cfg(test)]
mod tests;
