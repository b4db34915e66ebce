//! Target side of iSCSI login key negotiation (RFC 7143 §6, §13).
//!
//! [`Negotiator`] consumes the initiator's key=value pairs one login PDU at a
//! time and writes the target's answers into a [`TextBuilder`]; when login
//! ends, [`Negotiator::finish`] yields the typed [`SessionParams`]. It is a
//! table of keys, each with its phase (which login stage may carry it), its
//! scope (leading connection only or not), its value domain and its result
//! function (min, max, AND, OR, list selection, declarative), because that is
//! how the RFC specifies them and how the tests enumerate them.
//!
//! Answers follow the RFC rules: unknown keys (including X-/X# private
//! extensions we do not implement) get `NotUnderstood`, values outside the
//! domain get `Reject`, keys that are irrelevant for discovery sessions get
//! `Irrelevant`. A key sent twice, in the wrong stage, on a non-leading
//! connection when it is leading-only, or that only a target may send is a
//! protocol error that fails the login (initiator error).
//!
//! Security keys (AuthMethod, CHAP_*) are not handled here: the login state
//! machine owns authentication; this module only reports them as such.

use std::collections::HashSet;

use thiserror::Error;

use super::text::{bool_str, parse_bool, parse_list, parse_number, Pair, TextBuilder};

/// A digest algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Digest {
    None,
    Crc32c,
}

impl Digest {
    fn parse(s: &str) -> Option<Digest> {
        match s {
            "None" => Some(Digest::None),
            "CRC32C" => Some(Digest::Crc32c),
            _ => None,
        }
    }
    /// Key value spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Digest::None => "None",
            Digest::Crc32c => "CRC32C",
        }
    }
}

/// Session type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum SessionType {
    #[default]
    Normal,
    Discovery,
}

/// What the target supports / prefers. Values are the target's side of each
/// result function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NegotiationLimits {
    /// Header digests the target accepts (any order).
    pub header_digests: Vec<Digest>,
    /// Data digests the target accepts (any order).
    pub data_digests: Vec<Digest>,
    pub max_connections: u16,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    /// What we declare as our MaxRecvDataSegmentLength.
    pub max_recv_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub default_time2wait: u16,
    pub default_time2retain: u16,
    pub max_outstanding_r2t: u16,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    pub error_recovery_level: u8,
}

impl Default for NegotiationLimits {
    fn default() -> Self {
        NegotiationLimits {
            header_digests: vec![Digest::Crc32c, Digest::None],
            data_digests: vec![Digest::Crc32c, Digest::None],
            max_connections: 1,
            initial_r2t: false,
            immediate_data: true,
            max_recv_data_segment_length: 262_144,
            max_burst_length: 1_048_576,
            first_burst_length: 65_536,
            default_time2wait: 2,
            default_time2retain: 20,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            error_recovery_level: 0,
        }
    }
}

/// The negotiated parameters of a session/connection; `Default` gives the
/// RFC 7143 defaults that apply to keys never sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionParams {
    pub session_type: SessionType,
    pub initiator_name: Option<String>,
    pub initiator_alias: Option<String>,
    pub target_name: Option<String>,
    pub header_digest: Digest,
    pub data_digest: Digest,
    pub max_connections: u16,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    /// The initiator's MaxRecvDataSegmentLength: the most we may send per PDU.
    pub initiator_max_recv_data_segment_length: u32,
    /// Our MaxRecvDataSegmentLength: the most the initiator may send per PDU.
    pub target_max_recv_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub default_time2wait: u16,
    pub default_time2retain: u16,
    pub max_outstanding_r2t: u16,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    pub error_recovery_level: u8,
}

impl Default for SessionParams {
    fn default() -> Self {
        SessionParams {
            session_type: SessionType::Normal,
            initiator_name: None,
            initiator_alias: None,
            target_name: None,
            header_digest: Digest::None,
            data_digest: Digest::None,
            max_connections: 1,
            initial_r2t: true,
            immediate_data: true,
            initiator_max_recv_data_segment_length: 8192,
            target_max_recv_data_segment_length: 8192,
            max_burst_length: 262_144,
            first_burst_length: 65_536,
            default_time2wait: 2,
            default_time2retain: 20,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            error_recovery_level: 0,
        }
    }
}

/// Login stage in which keys arrive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyStage {
    Security,
    Operational,
}

/// Negotiation failures; all are initiator errors that end the login.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NegotiationError {
    #[error("key {0} sent more than once")]
    Repeated(String),
    #[error("key {key} not allowed in {stage:?} stage")]
    WrongStage { key: String, stage: KeyStage },
    #[error("key {0} is only valid on the leading connection")]
    LeadingOnly(String),
    #[error("key {0} may only be sent by a target")]
    TargetOnlyKey(String),
    #[error("key {0} is only valid in full feature phase")]
    FullFeatureOnly(String),
    #[error("unsupported SessionType {0:?}")]
    BadSessionType(String),
    #[error("no acceptable value for {0}")]
    NoAcceptableValue(&'static str),
}

/// How a key is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// AuthMethod, CHAP_*: owned by the login machine.
    Security,
    /// Declarative login keys sent by the initiator in any login stage.
    LoginDeclarative,
    /// Operational, leading-only (session-wide) key.
    SessionOp,
    /// Operational, per-connection key.
    ConnectionOp,
    /// Keys only a target sends.
    TargetOnly,
    /// Only valid in a Text request in full feature phase.
    FullFeatureOnly,
    /// Obsoleted marker keys (RFC 7143 §13.25).
    ObsoleteMarker,
}

fn kind_of(key: &str) -> Option<Kind> {
    Some(match key {
        "AuthMethod" => Kind::Security,
        k if k.starts_with("CHAP_") => Kind::Security,
        "InitiatorName" | "InitiatorAlias" | "TargetName" | "SessionType" => Kind::LoginDeclarative,
        "HeaderDigest" | "DataDigest" | "MaxRecvDataSegmentLength" => Kind::ConnectionOp,
        "MaxConnections"
        | "InitialR2T"
        | "ImmediateData"
        | "MaxBurstLength"
        | "FirstBurstLength"
        | "DefaultTime2Wait"
        | "DefaultTime2Retain"
        | "MaxOutstandingR2T"
        | "DataPDUInOrder"
        | "DataSequenceInOrder"
        | "ErrorRecoveryLevel" => Kind::SessionOp,
        "TargetAlias" | "TargetAddress" | "TargetPortalGroupTag" => Kind::TargetOnly,
        "SendTargets" => Kind::FullFeatureOnly,
        "IFMarker" | "OFMarker" | "IFMarkInt" | "OFMarkInt" => Kind::ObsoleteMarker,
        _ => return None,
    })
}

/// True if the key is one RFC 7143 defines (as opposed to unknown/private).
pub fn is_known_key(key: &str) -> bool {
    kind_of(key).is_some()
}

/// True if a key is a security key handled by the login machine.
pub fn is_security_key(key: &str) -> bool {
    kind_of(key) == Some(Kind::Security)
}

/// Keys irrelevant in a discovery session (RFC 7143 §13).
fn irrelevant_for_discovery(key: &str) -> bool {
    matches!(
        key,
        "MaxConnections"
            | "InitialR2T"
            | "ImmediateData"
            | "MaxBurstLength"
            | "FirstBurstLength"
            | "MaxOutstandingR2T"
            | "DataPDUInOrder"
            | "DataSequenceInOrder"
    )
}

/// Target-side negotiation state for one login.
#[derive(Debug, Clone)]
pub struct Negotiator {
    limits: NegotiationLimits,
    params: SessionParams,
    seen: HashSet<String>,
    leading: bool,
    declared_mrdsl: bool,
}

fn num_in(v: &str, lo: u64, hi: u64) -> Option<u64> {
    parse_number(v).ok().filter(|n| (lo..=hi).contains(n))
}

impl Negotiator {
    /// Start negotiating a login. `leading` is true for the first connection
    /// of a new session (TSIH 0), false when adding a connection.
    pub fn new(limits: NegotiationLimits, leading: bool) -> Self {
        let params = SessionParams {
            target_max_recv_data_segment_length: limits.max_recv_data_segment_length,
            ..SessionParams::default()
        };
        Negotiator {
            limits,
            params,
            seen: HashSet::new(),
            leading,
            declared_mrdsl: false,
        }
    }

    /// Whether this login is for the leading connection of a new session.
    pub fn is_leading(&self) -> bool {
        self.leading
    }

    /// Parameters negotiated so far.
    pub fn params(&self) -> &SessionParams {
        &self.params
    }

    /// Record that a key was sent, refusing repeats.
    pub fn mark_seen(&mut self, key: &str) -> Result<(), NegotiationError> {
        if !self.seen.insert(key.to_string()) {
            return Err(NegotiationError::Repeated(key.to_string()));
        }
        Ok(())
    }

    /// Process the non-security keys of one login request, appending answers.
    /// Security keys are skipped (the caller routes them to authentication).
    pub fn process(
        &mut self,
        stage: KeyStage,
        pairs: &[Pair<'_>],
        resp: &mut TextBuilder,
    ) -> Result<(), NegotiationError> {
        for p in pairs {
            self.process_one(stage, p.key, p.value, resp)?;
        }
        Ok(())
    }

    fn process_one(
        &mut self,
        stage: KeyStage,
        key: &str,
        value: &str,
        resp: &mut TextBuilder,
    ) -> Result<(), NegotiationError> {
        let Some(kind) = kind_of(key) else {
            // Unknown and private (X-, X#) keys.
            self.mark_seen(key)?;
            resp.push(key, "NotUnderstood");
            return Ok(());
        };
        match kind {
            Kind::Security => return Ok(()),
            Kind::TargetOnly => return Err(NegotiationError::TargetOnlyKey(key.to_string())),
            Kind::FullFeatureOnly => {
                return Err(NegotiationError::FullFeatureOnly(key.to_string()))
            }
            Kind::LoginDeclarative => {}
            Kind::SessionOp | Kind::ConnectionOp | Kind::ObsoleteMarker => {
                if stage != KeyStage::Operational {
                    return Err(NegotiationError::WrongStage {
                        key: key.to_string(),
                        stage,
                    });
                }
            }
        }
        if kind == Kind::SessionOp && !self.leading {
            return Err(NegotiationError::LeadingOnly(key.to_string()));
        }
        self.mark_seen(key)?;
        if kind == Kind::SessionOp
            && self.params.session_type == SessionType::Discovery
            && irrelevant_for_discovery(key)
        {
            resp.push(key, "Irrelevant");
            return Ok(());
        }
        let l = &self.limits;
        let p = &mut self.params;
        match key {
            "InitiatorName" => p.initiator_name = Some(value.to_string()),
            "InitiatorAlias" => p.initiator_alias = Some(value.to_string()),
            "TargetName" => p.target_name = Some(value.to_string()),
            "SessionType" => {
                p.session_type = match value {
                    "Normal" => SessionType::Normal,
                    "Discovery" => SessionType::Discovery,
                    _ => return Err(NegotiationError::BadSessionType(value.to_string())),
                }
            }
            "HeaderDigest" | "DataDigest" => {
                let allowed = if key == "HeaderDigest" {
                    &l.header_digests
                } else {
                    &l.data_digests
                };
                let pick = parse_list(value)
                    .filter_map(Digest::parse)
                    .find(|d| allowed.contains(d));
                match pick {
                    Some(d) => {
                        if key == "HeaderDigest" {
                            p.header_digest = d;
                        } else {
                            p.data_digest = d;
                        }
                        resp.push(key, d.as_str());
                    }
                    None => {
                        resp.push(key, "Reject");
                    }
                }
            }
            "MaxRecvDataSegmentLength" => match num_in(value, 512, 16_777_215) {
                Some(n) => {
                    p.initiator_max_recv_data_segment_length = n as u32;
                    // Declarative per direction: answer with our own value.
                    resp.push(key, &l.max_recv_data_segment_length.to_string());
                    self.declared_mrdsl = true;
                }
                None => {
                    resp.push(key, "Reject");
                }
            },
            "MaxConnections" => match num_in(value, 1, 65_535) {
                Some(n) => {
                    p.max_connections = (n as u16).min(l.max_connections);
                    resp.push(key, &p.max_connections.to_string());
                }
                None => {
                    resp.push(key, "Reject");
                }
            },
            "MaxBurstLength" | "FirstBurstLength" => match num_in(value, 512, 16_777_215) {
                Some(n) => {
                    let n = n as u32;
                    let v = if key == "MaxBurstLength" {
                        p.max_burst_length = n.min(l.max_burst_length);
                        p.max_burst_length
                    } else {
                        p.first_burst_length = n.min(l.first_burst_length);
                        p.first_burst_length
                    };
                    resp.push(key, &v.to_string());
                }
                None => {
                    resp.push(key, "Reject");
                }
            },
            "DefaultTime2Wait" => match num_in(value, 0, 3600) {
                Some(n) => {
                    // Result function: Maximum.
                    p.default_time2wait = (n as u16).max(l.default_time2wait);
                    resp.push(key, &p.default_time2wait.to_string());
                }
                None => {
                    resp.push(key, "Reject");
                }
            },
            "DefaultTime2Retain" => match num_in(value, 0, 3600) {
                Some(n) => {
                    p.default_time2retain = (n as u16).min(l.default_time2retain);
                    resp.push(key, &p.default_time2retain.to_string());
                }
                None => {
                    resp.push(key, "Reject");
                }
            },
            "MaxOutstandingR2T" => match num_in(value, 1, 65_535) {
                Some(n) => {
                    p.max_outstanding_r2t = (n as u16).min(l.max_outstanding_r2t);
                    resp.push(key, &p.max_outstanding_r2t.to_string());
                }
                None => {
                    resp.push(key, "Reject");
                }
            },
            "ErrorRecoveryLevel" => match num_in(value, 0, 2) {
                Some(n) => {
                    p.error_recovery_level = (n as u8).min(l.error_recovery_level);
                    resp.push(key, &p.error_recovery_level.to_string());
                }
                None => {
                    resp.push(key, "Reject");
                }
            },
            "InitialR2T" | "DataPDUInOrder" | "DataSequenceInOrder" | "ImmediateData" => {
                match parse_bool(value) {
                    Ok(b) => {
                        let v = match key {
                            "InitialR2T" => {
                                p.initial_r2t = b || l.initial_r2t;
                                p.initial_r2t
                            }
                            "DataPDUInOrder" => {
                                p.data_pdu_in_order = b || l.data_pdu_in_order;
                                p.data_pdu_in_order
                            }
                            "DataSequenceInOrder" => {
                                p.data_sequence_in_order = b || l.data_sequence_in_order;
                                p.data_sequence_in_order
                            }
                            _ => {
                                p.immediate_data = b && l.immediate_data;
                                p.immediate_data
                            }
                        };
                        resp.push(key, bool_str(v));
                    }
                    Err(_) => {
                        resp.push(key, "Reject");
                    }
                }
            }
            // RFC 7143 §13.25: markers are obsolete; answer IFMarker/OFMarker
            // with "No" (permitted, and understood by RFC 3720 initiators),
            // and the interval keys with "Reject" (mandatory).
            "IFMarker" | "OFMarker" => {
                resp.push(key, "No");
            }
            _ => {
                resp.push(key, "Reject");
            }
        }
        Ok(())
    }

    /// Declarations the target adds before leaving the operational stage:
    /// our MaxRecvDataSegmentLength if the initiator never triggered it.
    pub fn target_declarations(&mut self, resp: &mut TextBuilder) {
        if !self.declared_mrdsl {
            resp.push(
                "MaxRecvDataSegmentLength",
                &self.limits.max_recv_data_segment_length.to_string(),
            );
            self.declared_mrdsl = true;
        }
    }

    /// Final parameters. Enforces FirstBurstLength <= MaxBurstLength and that
    /// the digests in force are ones the target accepts.
    pub fn finish(&self) -> Result<SessionParams, NegotiationError> {
        let mut p = self.params.clone();
        if !self.declared_mrdsl {
            // Never told the initiator: it will assume the default.
            p.target_max_recv_data_segment_length = 8192;
        }
        if p.first_burst_length > p.max_burst_length {
            p.first_burst_length = p.max_burst_length;
        }
        if !self.limits.header_digests.contains(&p.header_digest) {
            return Err(NegotiationError::NoAcceptableValue("HeaderDigest"));
        }
        if !self.limits.data_digests.contains(&p.data_digest) {
            return Err(NegotiationError::NoAcceptableValue("DataDigest"));
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iscsi::text::parse;

    fn run(
        limits: NegotiationLimits,
        stage: KeyStage,
        text: &str,
    ) -> (
        Result<(), NegotiationError>,
        Vec<(String, String)>,
        Negotiator,
    ) {
        let mut n = Negotiator::new(limits, true);
        let mut resp = TextBuilder::new();
        let data = text.replace('\n', "\0");
        let pairs = parse(data.as_bytes()).unwrap();
        let r = n.process(stage, &pairs, &mut resp);
        let out = parse(resp.as_bytes())
            .unwrap()
            .iter()
            .map(|p| (p.key.to_string(), p.value.to_string()))
            .collect();
        (r, out, n)
    }

    fn answer(text: &str) -> Vec<(String, String)> {
        let (r, out, _) = run(NegotiationLimits::default(), KeyStage::Operational, text);
        r.unwrap();
        out
    }

    fn one(text: &str) -> String {
        let a = answer(text);
        assert_eq!(a.len(), 1, "{a:?}");
        a[0].1.clone()
    }

    #[test]
    fn defaults_when_not_sent() {
        let n = Negotiator::new(NegotiationLimits::default(), true);
        let p = n.finish().unwrap();
        assert_eq!(p.header_digest, Digest::None);
        assert!(p.initial_r2t);
        assert!(p.immediate_data);
        assert_eq!(p.max_burst_length, 262_144);
        assert_eq!(p.first_burst_length, 65_536);
        assert_eq!(p.initiator_max_recv_data_segment_length, 8192);
        assert_eq!(p.target_max_recv_data_segment_length, 8192);
        assert_eq!(p.default_time2wait, 2);
        assert_eq!(p.default_time2retain, 20);
        assert_eq!(p.max_outstanding_r2t, 1);
        assert_eq!(p.error_recovery_level, 0);
        assert_eq!(p.session_type, SessionType::Normal);
    }

    #[test]
    fn digests() {
        assert_eq!(one("HeaderDigest=CRC32C,None\n"), "CRC32C");
        assert_eq!(one("HeaderDigest=None,CRC32C\n"), "None");
        assert_eq!(one("DataDigest=Foo,CRC32C\n"), "CRC32C");
        assert_eq!(one("DataDigest=Foo\n"), "Reject");
        let limits = NegotiationLimits {
            header_digests: vec![Digest::Crc32c],
            ..Default::default()
        };
        let (r, out, n) = run(
            limits.clone(),
            KeyStage::Operational,
            "HeaderDigest=None,CRC32C\n",
        );
        r.unwrap();
        assert_eq!(out[0].1, "CRC32C");
        assert_eq!(n.finish().unwrap().header_digest, Digest::Crc32c);
        let (r, out, n) = run(limits.clone(), KeyStage::Operational, "HeaderDigest=None\n");
        r.unwrap();
        assert_eq!(out[0].1, "Reject");
        assert_eq!(
            n.finish(),
            Err(NegotiationError::NoAcceptableValue("HeaderDigest"))
        );
        // Required digest but initiator never asked: default None unacceptable.
        let n = Negotiator::new(limits, true);
        assert!(n.finish().is_err());
    }

    #[test]
    fn numeric_min_max() {
        assert_eq!(one("MaxBurstLength=65536\n"), "65536");
        assert_eq!(one("MaxBurstLength=16776192\n"), "1048576");
        assert_eq!(one("MaxBurstLength=511\n"), "Reject");
        assert_eq!(one("MaxBurstLength=16777216\n"), "Reject");
        assert_eq!(one("MaxBurstLength=abc\n"), "Reject");
        assert_eq!(one("FirstBurstLength=262144\n"), "65536");
        assert_eq!(one("FirstBurstLength=0x1000\n"), "4096");
        assert_eq!(one("MaxConnections=8\n"), "1");
        assert_eq!(one("MaxConnections=0\n"), "Reject");
        assert_eq!(one("DefaultTime2Wait=0\n"), "2");
        assert_eq!(one("DefaultTime2Wait=10\n"), "10");
        assert_eq!(one("DefaultTime2Wait=3601\n"), "Reject");
        assert_eq!(one("DefaultTime2Retain=0\n"), "0");
        assert_eq!(one("DefaultTime2Retain=60\n"), "20");
        assert_eq!(one("MaxOutstandingR2T=4\n"), "1");
        assert_eq!(one("MaxOutstandingR2T=0\n"), "Reject");
        assert_eq!(one("ErrorRecoveryLevel=2\n"), "0");
        assert_eq!(one("ErrorRecoveryLevel=3\n"), "Reject");
    }

    #[test]
    fn booleans() {
        assert_eq!(one("InitialR2T=No\n"), "No");
        assert_eq!(one("InitialR2T=Yes\n"), "Yes");
        assert_eq!(one("ImmediateData=Yes\n"), "Yes");
        assert_eq!(one("ImmediateData=No\n"), "No");
        assert_eq!(one("DataPDUInOrder=No\n"), "Yes");
        assert_eq!(one("DataSequenceInOrder=No\n"), "Yes");
        assert_eq!(one("ImmediateData=yes\n"), "Reject");
        let limits = NegotiationLimits {
            immediate_data: false,
            initial_r2t: true,
            ..Default::default()
        };
        let (r, out, _) = run(
            limits,
            KeyStage::Operational,
            "ImmediateData=Yes\nInitialR2T=No\n",
        );
        r.unwrap();
        assert_eq!(out[0].1, "No");
        assert_eq!(out[1].1, "Yes");
    }

    #[test]
    fn mrdsl_is_declarative() {
        let (r, out, n) = run(
            NegotiationLimits::default(),
            KeyStage::Operational,
            "MaxRecvDataSegmentLength=65536\n",
        );
        r.unwrap();
        assert_eq!(
            out,
            vec![("MaxRecvDataSegmentLength".into(), "262144".into())]
        );
        let p = n.finish().unwrap();
        assert_eq!(p.initiator_max_recv_data_segment_length, 65536);
        assert_eq!(p.target_max_recv_data_segment_length, 262_144);
        assert_eq!(one("MaxRecvDataSegmentLength=100\n"), "Reject");
        // Undeclared: target declares on its own.
        let mut n = Negotiator::new(NegotiationLimits::default(), true);
        let mut b = TextBuilder::new();
        n.target_declarations(&mut b);
        assert_eq!(b.as_bytes(), b"MaxRecvDataSegmentLength=262144\0");
        let mut b = TextBuilder::new();
        n.target_declarations(&mut b);
        assert!(b.is_empty());
    }

    #[test]
    fn first_burst_clamped() {
        let limits = NegotiationLimits {
            max_burst_length: 16_777_215,
            first_burst_length: 16_777_215,
            ..Default::default()
        };
        let (r, _, n) = run(
            limits,
            KeyStage::Operational,
            "MaxBurstLength=65536\nFirstBurstLength=262144\n",
        );
        r.unwrap();
        let p = n.finish().unwrap();
        assert_eq!(p.first_burst_length, 65536);
    }

    #[test]
    fn markers_unknown_private() {
        assert_eq!(one("IFMarker=No\n"), "No");
        assert_eq!(one("OFMarker=Yes\n"), "No");
        assert_eq!(one("IFMarkInt=2048~8192\n"), "Reject");
        assert_eq!(one("OFMarkInt=2048\n"), "Reject");
        assert_eq!(one("FooBar=1\n"), "NotUnderstood");
        assert_eq!(one("X-com.example.thing=1\n"), "NotUnderstood");
        assert_eq!(one("X#NodeArchitecture=foo\n"), "NotUnderstood");
    }

    #[test]
    fn protocol_errors() {
        let d = NegotiationLimits::default;
        let (r, _, _) = run(
            d(),
            KeyStage::Operational,
            "MaxBurstLength=512\nMaxBurstLength=512\n",
        );
        assert_eq!(r, Err(NegotiationError::Repeated("MaxBurstLength".into())));
        let (r, _, _) = run(d(), KeyStage::Security, "HeaderDigest=None\n");
        assert!(matches!(r, Err(NegotiationError::WrongStage { .. })));
        let (r, _, _) = run(d(), KeyStage::Operational, "TargetAlias=x\n");
        assert!(matches!(r, Err(NegotiationError::TargetOnlyKey(_))));
        let (r, _, _) = run(d(), KeyStage::Operational, "SendTargets=All\n");
        assert!(matches!(r, Err(NegotiationError::FullFeatureOnly(_))));
        let (r, _, _) = run(d(), KeyStage::Security, "SessionType=Weird\n");
        assert!(matches!(r, Err(NegotiationError::BadSessionType(_))));
        let mut n = Negotiator::new(d(), false);
        let pairs = [Pair {
            key: "MaxBurstLength",
            value: "512",
        }];
        let r = n.process(KeyStage::Operational, &pairs, &mut TextBuilder::new());
        assert!(matches!(r, Err(NegotiationError::LeadingOnly(_))));
        let pairs = [Pair {
            key: "HeaderDigest",
            value: "None",
        }];
        assert!(n
            .process(KeyStage::Operational, &pairs, &mut TextBuilder::new())
            .is_ok());
    }

    proptest::proptest! {
        #[test]
        fn negotiator_never_panics(
            kvs in proptest::collection::vec((
                proptest::sample::select(vec![
                    "HeaderDigest", "DataDigest", "MaxConnections", "InitialR2T", "ImmediateData",
                    "MaxRecvDataSegmentLength", "MaxBurstLength", "FirstBurstLength",
                    "DefaultTime2Wait", "DefaultTime2Retain", "MaxOutstandingR2T",
                    "DataPDUInOrder", "DataSequenceInOrder", "ErrorRecoveryLevel", "IFMarker",
                    "OFMarkInt", "SessionType", "TargetName", "InitiatorName", "X-a", "Foo",
                    "AuthMethod", "CHAP_A", "TargetAlias", "SendTargets",
                ]),
                "[ -~]{0,24}",
            ), 0..12),
            security: bool,
            leading: bool,
        ) {
            let mut n = Negotiator::new(NegotiationLimits::default(), leading);
            let stage = if security { KeyStage::Security } else { KeyStage::Operational };
            let pairs: Vec<Pair<'_>> = kvs.iter().map(|(k, v)| Pair { key: k, value: v }).collect();
            let mut resp = TextBuilder::new();
            let _ = n.process(stage, &pairs, &mut resp);
            // Whatever we answer is itself well-formed text.
            proptest::prop_assert!(crate::iscsi::text::parse(resp.as_bytes()).is_ok());
            if let Ok(p) = n.finish() {
                proptest::prop_assert!(p.first_burst_length <= p.max_burst_length);
                proptest::prop_assert!(p.max_burst_length >= 512 || p.max_burst_length == 262_144);
                proptest::prop_assert!(p.error_recovery_level == 0);
            }
        }
    }

    #[test]
    fn declaratives_and_discovery() {
        let (r, out, n) = run(
            NegotiationLimits::default(),
            KeyStage::Security,
            "InitiatorName=iqn.a\nInitiatorAlias=host\nSessionType=Discovery\nAuthMethod=None\n",
        );
        r.unwrap();
        assert!(out.is_empty());
        let p = n.params();
        assert_eq!(p.initiator_name.as_deref(), Some("iqn.a"));
        assert_eq!(p.initiator_alias.as_deref(), Some("host"));
        assert_eq!(p.session_type, SessionType::Discovery);
        let mut n = n;
        let mut b = TextBuilder::new();
        let pairs = [
            Pair {
                key: "MaxBurstLength",
                value: "512",
            },
            Pair {
                key: "HeaderDigest",
                value: "None",
            },
            Pair {
                key: "ImmediateData",
                value: "Yes",
            },
        ];
        n.process(KeyStage::Operational, &pairs, &mut b).unwrap();
        assert_eq!(
            b.as_bytes(),
            b"MaxBurstLength=Irrelevant\0HeaderDigest=None\0ImmediateData=Irrelevant\0"
        );
    }
}
