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
//! except the proofs. The secret must be at least 16 bytes.
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
