//! Mutual authentication of two sites with a shared secret, as sans-IO state
//! machines.
//!
//! ```text
//! initiator                                   acceptor
//!   Hello{Initiator, versions, Ni, name_i}  ->
//!                                           <-  Hello{Acceptor, versions, Na, name_a}
//!                                           <-  HelloAck{v, proof_a}
//!   HelloAck{v, proof_i}                    ->
//! ```
//!
//! `proof_x = HMAC-SHA256(secret, label || role_x || peer nonce || own nonce
//! || name_i || name_a || versions_i || versions_a || v)`, names length-prefixed.
//! Each side proves it holds the secret over the other side's fresh nonce, so
//! a recorded proof is useless on another connection; the role byte stops a
//! proof being reflected back at its sender; binding names and both version
//! ranges stops a man in the middle from swapping names or forcing a lower
//! version. `v` is the highest version in both ranges; both sides compute it
//! and must agree. Proofs are checked with `verify_slice` (constant time).
//! Nonces come from the OS (`getrandom`); nothing is derived from the secret
//! except the proofs. The secret must be at least 16 bytes, and should be
//! random rather than a password: whoever connects gets the acceptor's proof
//! over a nonce of its choosing, which allows offline guessing of a
//! low-entropy secret (as with any symmetric challenge-response).
//!
//! The initiator sends its proof as soon as it has both nonces, before it has
//! checked the acceptor's, so each side decides on its own and both report
//! [`HandshakeError::AuthFailed`] on a wrong secret. On any error, send
//! [`HandshakeError::to_wire`] and close; the machines refuse further input.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt;

use super::error::HandshakeError;
use super::message::{ErrorMsg, Hello, HelloAck, Message, MAX_ERROR_TEXT, NONCE_LEN, PROOF_LEN};
use super::types::{ErrorCode, ProtocolVersion, Role, SiteName, VersionRange};

type HmacSha256 = Hmac<Sha256>;

/// Domain-separation label at the start of every proof transcript.
const LABEL: &[u8] = b"mirrorpoint wire handshake v1\0";

/// Shortest accepted shared secret.
pub const MIN_SECRET_LEN: usize = 16;
/// Longest accepted shared secret.
pub const MAX_SECRET_LEN: usize = 1024;

/// The secret both sites share. Its `Debug` does not print it; its bytes are
/// overwritten (best effort) on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct SharedSecret(Vec<u8>);

/// A secret shorter than 16 or longer than 1024 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("shared secrets are 16 to 1024 bytes")]
pub struct InvalidSecret;

impl SharedSecret {
    /// Checks and keeps a secret.
    pub fn new(bytes: &[u8]) -> Result<Self, InvalidSecret> {
        if (MIN_SECRET_LEN..=MAX_SECRET_LEN).contains(&bytes.len()) {
            Ok(SharedSecret(bytes.to_vec()))
        } else {
            Err(InvalidSecret)
        }
    }
}

impl fmt::Debug for SharedSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedSecret(<redacted>)")
    }
}

impl Drop for SharedSecret {
    fn drop(&mut self) {
        self.0.fill(0);
        std::hint::black_box(&self.0);
    }
}

/// What a side needs to shake hands.
#[derive(Debug, Clone)]
pub struct HandshakeConfig {
    /// The shared secret.
    pub secret: SharedSecret,
    /// Our site name.
    pub local_name: SiteName,
    /// Versions we speak.
    pub versions: VersionRange,
    /// If set, refuse any peer with another name.
    pub expected_peer: Option<SiteName>,
}

impl HandshakeConfig {
    /// Speaking only [`VersionRange::CURRENT`], accepting any peer name.
    pub fn new(secret: SharedSecret, local_name: SiteName) -> Self {
        HandshakeConfig {
            secret,
            local_name,
            versions: VersionRange::CURRENT,
            expected_peer: None,
        }
    }
}

/// The result of a successful handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Established {
    /// The version both sides now speak (stamp it with [`super::Framer::with_version`]).
    pub version: ProtocolVersion,
    /// The authenticated peer's site name.
    pub peer_name: SiteName,
    /// The versions the peer supports.
    pub peer_versions: VersionRange,
}

/// What to do after feeding a message to a machine.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Step {
    /// Messages to send now, in order.
    pub send: Vec<Message<'static>>,
    /// Set once the peer is authenticated.
    pub established: Option<Established>,
}

impl HandshakeError {
    /// The Error message to send the peer before closing.
    pub fn to_wire(&self) -> Message<'static> {
        let code = match self {
            HandshakeError::AuthFailed => ErrorCode::AuthFailed,
            HandshakeError::VersionMismatch { .. } | HandshakeError::VersionChoice { .. } => {
                ErrorCode::VersionMismatch
            }
            HandshakeError::UnexpectedMessage { .. } | HandshakeError::Finished(_) => {
                ErrorCode::UnexpectedMessage
            }
            HandshakeError::UnexpectedPeer { .. } => ErrorCode::UnexpectedPeer,
            HandshakeError::RoleConflict
            | HandshakeError::NonceReplay
            | HandshakeError::WeakNonce
            | HandshakeError::PeerRefused { .. } => ErrorCode::Protocol,
            HandshakeError::Random(_) | HandshakeError::Internal(_) => ErrorCode::Internal,
        };
        let mut text = self.to_string();
        while text.len() > MAX_ERROR_TEXT {
            text.pop();
        }
        Message::Error(ErrorMsg { code, text })
    }
}

fn fresh_nonce() -> Result<[u8; NONCE_LEN], HandshakeError> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| HandshakeError::Random(e.to_string()))?;
    Ok(n)
}

/// The proof transcript MAC for `role`, keyed with the secret.
fn transcript(
    secret: &SharedSecret,
    role: Role,
    initiator: &Hello,
    acceptor: &Hello,
    version: ProtocolVersion,
) -> Result<HmacSha256, HandshakeError> {
    let mut mac = <HmacSha256 as Mac>::new_from_slice(&secret.0)
        .map_err(|_| HandshakeError::Internal("HMAC key rejected"))?;
    let (own, peer) = match role {
        Role::Initiator => (initiator, acceptor),
        Role::Acceptor => (acceptor, initiator),
    };
    mac.update(LABEL);
    mac.update(&[role.to_wire()]);
    mac.update(&peer.nonce);
    mac.update(&own.nonce);
    for h in [initiator, acceptor] {
        let name = h.name.as_str().as_bytes();
        mac.update(&[u8::try_from(name.len()).unwrap_or(u8::MAX)]);
        mac.update(name);
    }
    for h in [initiator, acceptor] {
        mac.update(&[
            h.versions.min().major,
            h.versions.min().minor,
            h.versions.max().major,
            h.versions.max().minor,
        ]);
    }
    mac.update(&[version.major, version.minor]);
    Ok(mac)
}

fn make_proof(
    secret: &SharedSecret,
    role: Role,
    initiator: &Hello,
    acceptor: &Hello,
    version: ProtocolVersion,
) -> Result<[u8; PROOF_LEN], HandshakeError> {
    let tag = transcript(secret, role, initiator, acceptor, version)?
        .finalize()
        .into_bytes();
    let mut out = [0u8; PROOF_LEN];
    out.copy_from_slice(tag.as_slice());
    Ok(out)
}

fn verify_proof(
    secret: &SharedSecret,
    role: Role,
    initiator: &Hello,
    acceptor: &Hello,
    version: ProtocolVersion,
    proof: &[u8; PROOF_LEN],
) -> Result<(), HandshakeError> {
    transcript(secret, role, initiator, acceptor, version)?
        .verify_slice(proof)
        .map_err(|_| HandshakeError::AuthFailed)
}

/// Checks a peer's Hello against ours; returns the negotiated version.
fn check_peer_hello(
    cfg: &HandshakeConfig,
    own: &Hello,
    peer: &Hello,
) -> Result<ProtocolVersion, HandshakeError> {
    if peer.role == own.role {
        return Err(HandshakeError::RoleConflict);
    }
    if peer.nonce == [0u8; NONCE_LEN] {
        return Err(HandshakeError::WeakNonce);
    }
    if peer.nonce == own.nonce {
        return Err(HandshakeError::NonceReplay);
    }
    if let Some(expected) = &cfg.expected_peer {
        if *expected != peer.name {
            return Err(HandshakeError::UnexpectedPeer {
                expected: expected.to_string(),
                found: peer.name.to_string(),
            });
        }
    }
    own.versions
        .negotiate(&peer.versions)
        .ok_or(HandshakeError::VersionMismatch {
            ours: own.versions,
            theirs: peer.versions,
        })
}

/// A Hello arriving again once we have the peer's: a replay if its nonce was seen.
fn repeated_hello(state: &'static str, own: &Hello, peer: &Hello, again: &Hello) -> HandshakeError {
    if again.nonce == peer.nonce || again.nonce == own.nonce {
        HandshakeError::NonceReplay
    } else {
        HandshakeError::UnexpectedMessage {
            state,
            got: super::frame::MsgType::Hello,
        }
    }
}

#[derive(Debug, Clone)]
enum State {
    AwaitHello,
    AwaitAck {
        peer: Hello,
        version: ProtocolVersion,
    },
    Done,
    Failed,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::AwaitHello => "awaiting Hello",
            State::AwaitAck { .. } => "awaiting HelloAck",
            State::Done => "established",
            State::Failed => "failed",
        }
    }
}

/// Shared machinery of both sides.
#[derive(Debug, Clone)]
struct Machine {
    cfg: HandshakeConfig,
    own: Hello,
    state: State,
}

impl Machine {
    fn new(cfg: HandshakeConfig, role: Role, nonce: [u8; NONCE_LEN]) -> Self {
        let own = Hello {
            role,
            versions: cfg.versions,
            nonce,
            name: cfg.local_name.clone(),
        };
        Machine {
            cfg,
            own,
            state: State::AwaitHello,
        }
    }

    fn hellos<'h>(&'h self, peer: &'h Hello) -> (&'h Hello, &'h Hello) {
        match self.own.role {
            Role::Initiator => (&self.own, peer),
            Role::Acceptor => (peer, &self.own),
        }
    }

    fn handle(&mut self, msg: &Message<'_>) -> Result<Step, HandshakeError> {
        let state = std::mem::replace(&mut self.state, State::Failed);
        match self.step(state, msg) {
            Ok((next, step)) => {
                self.state = next;
                Ok(step)
            }
            Err(e) => Err(e),
        }
    }

    fn step(&self, state: State, msg: &Message<'_>) -> Result<(State, Step), HandshakeError> {
        let name = state.name();
        match (state, msg) {
            (State::Done, _) => Err(HandshakeError::Finished("established")),
            (State::Failed, _) => Err(HandshakeError::Finished("failed")),
            (_, Message::Error(e)) => Err(HandshakeError::PeerRefused {
                code: e.code,
                message: e.text.clone(),
            }),
            (State::AwaitHello, Message::Hello(peer)) => {
                let version = check_peer_hello(&self.cfg, &self.own, peer)?;
                let (i, a) = self.hellos(peer);
                let proof = make_proof(&self.cfg.secret, self.own.role, i, a, version)?;
                let mut send = Vec::with_capacity(2);
                if self.own.role == Role::Acceptor {
                    send.push(Message::Hello(self.own.clone()));
                }
                send.push(Message::HelloAck(HelloAck { version, proof }));
                Ok((
                    State::AwaitAck {
                        peer: peer.clone(),
                        version,
                    },
                    Step {
                        send,
                        established: None,
                    },
                ))
            }
            (State::AwaitAck { peer, version }, Message::HelloAck(ack)) => {
                if ack.version != version {
                    return Err(HandshakeError::VersionChoice {
                        expected: version,
                        theirs: ack.version,
                    });
                }
                let (i, a) = self.hellos(&peer);
                verify_proof(&self.cfg.secret, peer.role, i, a, version, &ack.proof)?;
                Ok((
                    State::Done,
                    Step {
                        send: Vec::new(),
                        established: Some(Established {
                            version,
                            peer_name: peer.name.clone(),
                            peer_versions: peer.versions,
                        }),
                    },
                ))
            }
            (State::AwaitAck { peer, .. }, Message::Hello(again)) => {
                Err(repeated_hello(name, &self.own, &peer, again))
            }
            (_, other) => Err(HandshakeError::UnexpectedMessage {
                state: name,
                got: other.msg_type(),
            }),
        }
    }
}

/// The side that opened the connection.
#[derive(Debug, Clone)]
pub struct Initiator(Machine);

impl Initiator {
    /// Starts a handshake with a fresh OS nonce; send the returned Hello.
    pub fn start(cfg: HandshakeConfig) -> Result<(Self, Message<'static>), HandshakeError> {
        Ok(Self::start_with_nonce(cfg, fresh_nonce()?))
    }

    /// Deterministic start for tests and fuzzing only.
    pub(crate) fn start_with_nonce(
        cfg: HandshakeConfig,
        nonce: [u8; NONCE_LEN],
    ) -> (Self, Message<'static>) {
        let m = Machine::new(cfg, Role::Initiator, nonce);
        let hello = Message::Hello(m.own.clone());
        (Initiator(m), hello)
    }

    /// Feeds one received message.
    pub fn handle(&mut self, msg: &Message<'_>) -> Result<Step, HandshakeError> {
        self.0.handle(msg)
    }

    /// Whether the peer has been authenticated.
    pub fn is_established(&self) -> bool {
        matches!(self.0.state, State::Done)
    }
}

/// The side that accepted the connection.
#[derive(Debug, Clone)]
pub struct Acceptor(Machine);

impl Acceptor {
    /// Waits for the initiator's Hello, with a fresh OS nonce.
    pub fn new(cfg: HandshakeConfig) -> Result<Self, HandshakeError> {
        Ok(Self::with_nonce(cfg, fresh_nonce()?))
    }

    /// Deterministic start for tests and fuzzing only.
    pub(crate) fn with_nonce(cfg: HandshakeConfig, nonce: [u8; NONCE_LEN]) -> Self {
        Acceptor(Machine::new(cfg, Role::Acceptor, nonce))
    }

    /// Feeds one received message.
    pub fn handle(&mut self, msg: &Message<'_>) -> Result<Step, HandshakeError> {
        self.0.handle(msg)
    }

    /// Whether the peer has been authenticated.
    pub fn is_established(&self) -> bool {
        matches!(self.0.state, State::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::super::frame::{Decoded, Framer, MsgType};
    use super::super::types::RequestTag;
    use super::*;

    fn cfg(secret: &[u8], name: &str) -> HandshakeConfig {
        HandshakeConfig::new(
            SharedSecret::new(secret).unwrap(),
            SiteName::new(name).unwrap(),
        )
    }

    const SECRET: &[u8] = b"correct horse battery staple";

    /// Sends messages through the real codec, as a socket would.
    fn wire(msg: &Message<'static>) -> Message<'static> {
        let framer = Framer::default();
        let bytes = msg.encode_to_vec(&framer, RequestTag(0)).unwrap();
        match framer.decode_message(&bytes).unwrap() {
            Decoded::Complete { value: (_, m), .. } => match m {
                Message::Hello(h) => Message::Hello(h),
                Message::HelloAck(a) => Message::HelloAck(a),
                Message::Error(e) => Message::Error(e),
                other => panic!("unexpected {other:?}"),
            },
            Decoded::NeedMore(_) => panic!("incomplete"),
        }
    }

    struct Run {
        initiator: Result<Established, HandshakeError>,
        acceptor: Result<Established, HandshakeError>,
    }

    /// Runs both machines against each other until both decided.
    fn run(ci: HandshakeConfig, ca: HandshakeConfig) -> Run {
        let (mut i, hello) = Initiator::start(ci).unwrap();
        let mut a = Acceptor::new(ca).unwrap();
        let mut to_a = vec![wire(&hello)];
        let mut to_i: Vec<Message<'static>> = Vec::new();
        let (mut ri, mut ra) = (None, None);
        for _ in 0..8 {
            for m in std::mem::take(&mut to_a) {
                if ra.is_some() {
                    break;
                }
                match a.handle(&m) {
                    Ok(step) => {
                        to_i.extend(step.send.iter().map(wire));
                        if let Some(e) = step.established {
                            ra = Some(Ok(e));
                        }
                    }
                    Err(e) => {
                        to_i.push(wire(&e.to_wire()));
                        ra = Some(Err(e));
                    }
                }
            }
            for m in std::mem::take(&mut to_i) {
                if ri.is_some() {
                    break;
                }
                match i.handle(&m) {
                    Ok(step) => {
                        to_a.extend(step.send.iter().map(wire));
                        if let Some(e) = step.established {
                            ri = Some(Ok(e));
                        }
                    }
                    Err(e) => {
                        to_a.push(wire(&e.to_wire()));
                        ri = Some(Err(e));
                    }
                }
            }
        }
        Run {
            initiator: ri.expect("initiator undecided"),
            acceptor: ra.expect("acceptor undecided"),
        }
    }

    #[test]
    fn success_both_ways() {
        let r = run(cfg(SECRET, "site-a"), cfg(SECRET, "site-b"));
        let ei = r.initiator.unwrap();
        let ea = r.acceptor.unwrap();
        assert_eq!(ei.peer_name.as_str(), "site-b");
        assert_eq!(ea.peer_name.as_str(), "site-a");
        assert_eq!(ei.version, ProtocolVersion::CURRENT);
        assert_eq!(ea.version, ProtocolVersion::CURRENT);
        // And the other way round (b initiates).
        let r = run(cfg(SECRET, "site-b"), cfg(SECRET, "site-a"));
        assert_eq!(r.initiator.unwrap().peer_name.as_str(), "site-a");
        assert_eq!(r.acceptor.unwrap().peer_name.as_str(), "site-b");
    }

    #[test]
    fn negotiates_highest_common_minor() {
        let v = ProtocolVersion::new;
        let mut ci = cfg(SECRET, "a");
        ci.versions = VersionRange::new(v(1, 0), v(1, 4)).unwrap();
        let mut ca = cfg(SECRET, "b");
        ca.versions = VersionRange::new(v(1, 2), v(1, 7)).unwrap();
        let r = run(ci, ca);
        assert_eq!(r.initiator.unwrap().version, v(1, 4));
        assert_eq!(r.acceptor.unwrap().version, v(1, 4));
    }

    #[test]
    fn wrong_secret_is_refused_on_both_sides() {
        let r = run(cfg(SECRET, "a"), cfg(b"another secret of 16+ bytes", "b"));
        assert_eq!(r.initiator, Err(HandshakeError::AuthFailed));
        assert_eq!(r.acceptor, Err(HandshakeError::AuthFailed));
    }

    #[test]
    fn version_mismatch_names_both_ranges() {
        let v = ProtocolVersion::new;
        let mut ci = cfg(SECRET, "a");
        ci.versions = VersionRange::new(v(1, 0), v(1, 1)).unwrap();
        let mut ca = cfg(SECRET, "b");
        ca.versions = VersionRange::new(v(1, 3), v(1, 4)).unwrap();
        let r = run(ci, ca);
        let ours = VersionRange::new(v(1, 3), v(1, 4)).unwrap();
        let theirs = VersionRange::new(v(1, 0), v(1, 1)).unwrap();
        assert_eq!(
            r.acceptor,
            Err(HandshakeError::VersionMismatch { ours, theirs })
        );
        match r.initiator {
            Err(HandshakeError::PeerRefused { code, message }) => {
                assert_eq!(code, ErrorCode::VersionMismatch);
                assert!(
                    message.contains("1.3..=1.4") && message.contains("1.0..=1.1"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn expected_peer_is_enforced() {
        let mut ca = cfg(SECRET, "b");
        ca.expected_peer = Some(SiteName::new("site-a").unwrap());
        let r = run(cfg(SECRET, "mallory"), ca);
        assert!(matches!(
            r.acceptor,
            Err(HandshakeError::UnexpectedPeer { .. })
        ));
        assert!(matches!(
            r.initiator,
            Err(HandshakeError::PeerRefused {
                code: ErrorCode::UnexpectedPeer,
                ..
            })
        ));
    }

    #[test]
    fn out_of_order_messages_are_refused() {
        let ack = Message::HelloAck(HelloAck {
            version: ProtocolVersion::CURRENT,
            proof: [0; 32],
        });
        let mut a = Acceptor::new(cfg(SECRET, "b")).unwrap();
        assert_eq!(
            a.handle(&ack),
            Err(HandshakeError::UnexpectedMessage {
                state: "awaiting Hello",
                got: MsgType::HelloAck
            })
        );
        // A failed machine takes no more input.
        assert_eq!(a.handle(&ack), Err(HandshakeError::Finished("failed")));

        let (mut i, _) = Initiator::start(cfg(SECRET, "a")).unwrap();
        assert!(matches!(
            i.handle(&ack),
            Err(HandshakeError::UnexpectedMessage { .. })
        ));

        // Data before authentication.
        let (mut i, hello) = Initiator::start(cfg(SECRET, "a")).unwrap();
        let mut a = Acceptor::new(cfg(SECRET, "b")).unwrap();
        let sent = a.handle(&hello).unwrap().send;
        assert_eq!(sent.len(), 2);
        let flush = Message::Flush(super::super::message::Flush {
            mirror: super::super::types::MirrorId(1),
            seq: super::super::types::SeqNo(1),
            epoch: super::super::types::Epoch(1),
        });
        assert_eq!(
            a.handle(&flush),
            Err(HandshakeError::UnexpectedMessage {
                state: "awaiting HelloAck",
                got: MsgType::Flush
            })
        );
        // The initiator gets the acceptor's HelloAck before its Hello.
        assert!(matches!(
            i.handle(&sent[1]),
            Err(HandshakeError::UnexpectedMessage { .. })
        ));
    }

    #[test]
    fn established_machines_refuse_more_handshake() {
        let (mut i, hello) = Initiator::start(cfg(SECRET, "a")).unwrap();
        let mut a = Acceptor::new(cfg(SECRET, "b")).unwrap();
        let to_i = a.handle(&hello).unwrap().send;
        let s1 = i.handle(&to_i[0]).unwrap();
        assert!(s1.established.is_none());
        let s2 = i.handle(&to_i[1]).unwrap();
        assert!(s2.established.is_some() && s2.send.is_empty());
        assert!(i.is_established());
        let s3 = a.handle(&s1.send[0]).unwrap();
        assert!(s3.established.is_some());
        assert!(a.is_established());
        assert_eq!(
            a.handle(&hello),
            Err(HandshakeError::Finished("established"))
        );
        assert_eq!(
            i.handle(&to_i[1]),
            Err(HandshakeError::Finished("established"))
        );
    }

    #[test]
    fn nonce_replay_and_reflection_are_refused() {
        // The initiator's own Hello reflected back at it.
        let (mut i, hello) = Initiator::start(cfg(SECRET, "a")).unwrap();
        assert_eq!(i.handle(&hello), Err(HandshakeError::RoleConflict));

        // Reflected with the role flipped: its own nonce comes back.
        let (mut i, hello) = Initiator::start(cfg(SECRET, "a")).unwrap();
        let Message::Hello(mut h) = hello.clone() else {
            panic!()
        };
        h.role = Role::Acceptor;
        assert_eq!(
            i.handle(&Message::Hello(h)),
            Err(HandshakeError::NonceReplay)
        );

        // A second Hello with a nonce already seen in this connection.
        let (_, hello) = Initiator::start(cfg(SECRET, "a")).unwrap();
        let mut a = Acceptor::new(cfg(SECRET, "b")).unwrap();
        a.handle(&hello).unwrap();
        assert_eq!(a.handle(&hello), Err(HandshakeError::NonceReplay));

        // All-zero nonce.
        let (_, hello) = Initiator::start(cfg(SECRET, "a")).unwrap();
        let Message::Hello(mut h) = hello else {
            panic!()
        };
        h.nonce = [0; 32];
        let mut a = Acceptor::new(cfg(SECRET, "b")).unwrap();
        assert_eq!(a.handle(&Message::Hello(h)), Err(HandshakeError::WeakNonce));
    }

    #[test]
    fn proofs_do_not_transfer_between_connections() {
        // Record a good run's initiator proof, replay it to a new acceptor.
        let (mut i, hello) = Initiator::start(cfg(SECRET, "a")).unwrap();
        let mut a1 = Acceptor::new(cfg(SECRET, "b")).unwrap();
        let to_i = a1.handle(&hello).unwrap().send;
        let proof_i = i.handle(&to_i[0]).unwrap().send;
        let mut a2 = Acceptor::new(cfg(SECRET, "b")).unwrap();
        a2.handle(&hello).unwrap();
        assert_eq!(a2.handle(&proof_i[0]), Err(HandshakeError::AuthFailed));
        assert!(a1.handle(&proof_i[0]).unwrap().established.is_some());
    }

    #[test]
    fn tampered_transcript_fails() {
        // A man in the middle renames the acceptor: the proofs no longer match.
        let (mut i, hello) = Initiator::start(cfg(SECRET, "a")).unwrap();
        let mut a = Acceptor::new(cfg(SECRET, "b")).unwrap();
        let to_i = a.handle(&hello).unwrap().send;
        let Message::Hello(mut ha) = to_i[0].clone() else {
            panic!()
        };
        ha.name = SiteName::new("evil").unwrap();
        let proof_i = i.handle(&Message::Hello(ha)).unwrap().send;
        assert_eq!(i.handle(&to_i[1]), Err(HandshakeError::AuthFailed));
        assert_eq!(a.handle(&proof_i[0]), Err(HandshakeError::AuthFailed));

        // A downgraded version choice is refused.
        let (mut i, hello) = Initiator::start(cfg(SECRET, "a")).unwrap();
        let mut a = Acceptor::new(cfg(SECRET, "b")).unwrap();
        let to_i = a.handle(&hello).unwrap().send;
        i.handle(&to_i[0]).unwrap();
        let Message::HelloAck(mut ack) = to_i[1].clone() else {
            panic!()
        };
        ack.version = ProtocolVersion::new(1, 9);
        assert!(matches!(
            i.handle(&Message::HelloAck(ack)),
            Err(HandshakeError::VersionChoice { .. })
        ));
    }

    #[test]
    fn peer_error_is_reported() {
        let (mut i, _) = Initiator::start(cfg(SECRET, "a")).unwrap();
        let err = HandshakeError::AuthFailed.to_wire();
        assert_eq!(
            i.handle(&err),
            Err(HandshakeError::PeerRefused {
                code: ErrorCode::AuthFailed,
                message: "authentication failed: peer proof does not verify".into()
            })
        );
    }

    #[test]
    fn nonces_are_fresh_and_secrets_checked() {
        let (_, h1) = Initiator::start(cfg(SECRET, "a")).unwrap();
        let (_, h2) = Initiator::start(cfg(SECRET, "a")).unwrap();
        let (Message::Hello(h1), Message::Hello(h2)) = (h1, h2) else {
            panic!()
        };
        assert_ne!(h1.nonce, h2.nonce);
        assert_ne!(h1.nonce, [0; 32]);
        assert_eq!(SharedSecret::new(b"short"), Err(InvalidSecret));
        assert_eq!(SharedSecret::new(&[0; 1025]), Err(InvalidSecret));
        assert_eq!(
            format!("{:?}", SharedSecret::new(SECRET).unwrap()),
            "SharedSecret(<redacted>)"
        );
    }

    #[test]
    fn every_error_maps_to_a_sendable_message() {
        let v = VersionRange::CURRENT;
        let errors = [
            HandshakeError::AuthFailed,
            HandshakeError::VersionMismatch { ours: v, theirs: v },
            HandshakeError::RoleConflict,
            HandshakeError::NonceReplay,
            HandshakeError::WeakNonce,
            HandshakeError::Random("x".repeat(5000)),
            HandshakeError::Finished("failed"),
        ];
        for e in errors {
            let m = e.to_wire();
            m.encode_to_vec(&Framer::default(), RequestTag(0)).unwrap();
        }
    }
}
