//! Sans-IO receive state machine for one NVMe/TCP queue pair, controller side.
//!
//! It turns the host's PDU stream into [`Event`]s and enforces the transport
//! rules that span PDUs: ICReq first and only once; only host-to-controller
//! PDU types afterwards; in-capsule data consistent with the command's SGL;
//! and, for commands whose data arrives by R2T, that every H2CData PDU
//! answers an outstanding R2T (known TTAG, matching CID), continues exactly
//! where the previous one stopped (no gaps, overlaps or duplicates), stays
//! inside the R2T and sets LAST_PDU exactly on the R2T's final PDU.
//!
//! Shape, and why: the caller owns sockets, buffers and command execution;
//! this type only owns protocol state. It tells the caller what happened
//! (an event borrowing the received bytes, no copies), what to send (an
//! ICResp; R2Ts when the caller asks for data with [`QueuePair::next_r2t`]),
//! and on a fatal error returns the [`PduError`] from which the caller
//! builds the C2HTermReq. Errors that only fail one command (bad SGL, data
//! digest mismatch) are events, not connection failures. This is the surface
//! a fuzz target drives.

use super::pdu::{
    self, C2HData, DataDigest, H2CData, IcReq, IcResp, Pdu, PduConfig, PduError, R2t, MAX_PDA,
    MIN_MAXH2CDATA,
};
use super::spec::{CommandId, DataDirection, DataSgl, Sqe, Status};
use std::collections::HashMap;

/// Controller-side limits and offers for a queue pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpairConfig {
    /// Whether a header digest requested by the host is granted.
    pub allow_hdgst: bool,
    /// Whether a data digest requested by the host is granted.
    pub allow_ddgst: bool,
    /// CPDA advertised (Linux hosts require 0).
    pub cpda: u8,
    /// MAXH2CDATA advertised (>= 4096, multiple of 4).
    pub maxh2cdata: u32,
    /// Largest in-capsule data accepted (IOCCSZ * 16 - 64; 8 KiB on admin queues).
    pub in_capsule_data: u32,
    /// Largest data transfer of one command (MDTS), in bytes.
    pub max_transfer: u32,
    /// Cap on outstanding R2Ts per command (the host's MAXR2T also applies).
    pub max_r2t_per_command: u32,
}

impl Default for QpairConfig {
    fn default() -> Self {
        QpairConfig {
            allow_hdgst: true,
            allow_ddgst: true,
            cpda: 0,
            maxh2cdata: 128 * 1024,
            in_capsule_data: 8192,
            max_transfer: 1 << 20,
            max_r2t_per_command: 1,
        }
    }
}

/// What a received PDU meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<'a> {
    /// ICReq accepted: send `icresp` (IC PDUs never carry digests), after
    /// which [`QueuePair::codec`] reflects the negotiated parameters.
    Connected {
        /// The response to send.
        icresp: IcResp,
        /// What the host asked for.
        icreq: IcReq,
    },
    /// A command to execute. `in_capsule` is its data when the SGL is an
    /// in-capsule data block; for a transport SGL write, ask for the data
    /// with [`QueuePair::next_r2t`]; for a read, send C2HData.
    Command {
        /// The submission queue entry.
        sqe: Sqe,
        /// Its data SGL.
        sgl: DataSgl,
        /// In-capsule data (empty if none).
        in_capsule: &'a [u8],
    },
    /// A command the transport rejects: answer with a CapsuleResp carrying
    /// `status`. It is not tracked; do not call [`QueuePair::complete`].
    CommandError {
        /// The submission queue entry.
        sqe: Sqe,
        /// Status to complete it with.
        status: Status,
    },
    /// Host data for a command, at `offset` within its data buffer.
    Data {
        /// The command.
        cid: CommandId,
        /// Offset within the command's data.
        offset: u32,
        /// The bytes.
        data: &'a [u8],
        /// False if the data digest did not match: complete the command with
        /// Transient Transport Error once its transfer ends.
        digest_ok: bool,
        /// All of the command's data has now arrived.
        complete: bool,
    },
    /// The host terminated the connection.
    Terminated {
        /// Fatal error status it reported.
        fes: u16,
        /// Fatal error information.
        fei: u32,
    },
}

/// A received PDU's event and length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received<'a> {
    /// What happened.
    pub event: Event<'a>,
    /// Bytes consumed.
    pub len: usize,
}

/// Misuse of the sending-side API (not a protocol error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QpairError {
    /// No such outstanding command.
    #[error("no outstanding command {0:?}")]
    UnknownCommand(CommandId),
    /// The command does not take data by R2T.
    #[error("command {0:?} takes no host data by R2T")]
    NoR2tData(CommandId),
    /// The connection is not established.
    #[error("connection not established")]
    NotConnected,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitIcReq,
    Live,
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct R2tWindow {
    ttag: u16,
    offset: u32,
    len: u32,
    received: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Outstanding {
    /// Bytes to arrive by R2T (0 if none).
    h2c_total: u32,
    /// Bytes covered by R2Ts issued so far.
    requested: u32,
    /// Bytes received so far.
    received: u32,
    /// Outstanding R2Ts, oldest first.
    windows: Vec<R2tWindow>,
}

/// Receive state of one queue pair.
#[derive(Debug, Clone)]
pub struct QueuePair {
    cfg: QpairConfig,
    codec: PduConfig,
    state: State,
    host_maxr2t: u64,
    commands: HashMap<u16, Outstanding>,
    ttags: HashMap<u16, u16>,
    next_ttag: u16,
}

impl QueuePair {
    /// A queue pair awaiting ICReq.
    pub fn new(cfg: QpairConfig) -> QueuePair {
        let codec = PduConfig {
            max_plen: Self::max_plen(&cfg),
            max_h2c_data: cfg.maxh2cdata.max(MIN_MAXH2CDATA) & !3,
            ..PduConfig::default()
        };
        QueuePair {
            cfg,
            codec,
            state: State::AwaitIcReq,
            host_maxr2t: 1,
            commands: HashMap::new(),
            ttags: HashMap::new(),
            next_ttag: 0,
        }
    }

    fn max_plen(cfg: &QpairConfig) -> u32 {
        // Header (72) + digest (4) + padding (< 128) + data + digest (4).
        cfg.in_capsule_data.max(cfg.maxh2cdata).saturating_add(256)
    }

    /// The codec parameters to frame, decode and encode PDUs with.
    pub fn codec(&self) -> &PduConfig {
        &self.codec
    }

    /// Whether the IC exchange is done and the host has not terminated.
    pub fn is_live(&self) -> bool {
        self.state == State::Live
    }

    /// Number of tracked commands.
    pub fn outstanding(&self) -> usize {
        self.commands.len()
    }

    /// Processes the PDU at the front of `buf` (frame it first with
    /// [`pdu::frame`] and [`QueuePair::codec`]). On an error with
    /// [`PduError::fatal`] set, send the C2HTermReq and close; the queue
    /// pair refuses further input.
    pub fn receive<'a>(&mut self, buf: &'a [u8]) -> Result<Received<'a>, PduError> {
        if self.state == State::Closed {
            return Err(PduError::SequenceError {
                what: "connection terminated",
            });
        }
        let r = self.receive_inner(buf);
        if let Err(e) = &r {
            if e.fatal().is_some() {
                self.state = State::Closed;
            }
        }
        r
    }

    /// Like [`QueuePair::receive`], for a PDU read in parts (see
    /// [`pdu::parts_layout`]): the head, the data section (already in its
    /// final buffer) and the received data digest. This is the zero-copy path.
    pub fn receive_parts<'a>(
        &mut self,
        head: &'a [u8],
        data: &'a [u8],
        ddgst: Option<u32>,
    ) -> Result<Received<'a>, PduError> {
        if self.state == State::Closed {
            return Err(PduError::SequenceError {
                what: "connection terminated",
            });
        }
        let r = pdu::decode_parts(head, data, ddgst, &self.codec)
            .and_then(|(d, digest)| self.on_decoded(d, digest));
        if let Err(e) = &r {
            if e.fatal().is_some() {
                self.state = State::Closed;
            }
        }
        r
    }

    fn receive_inner<'a>(&mut self, buf: &'a [u8]) -> Result<Received<'a>, PduError> {
        let (d, digest) = pdu::decode_checking_data_digest(buf, &self.codec)?;
        self.on_decoded(d, digest)
    }

    fn on_decoded<'a>(
        &mut self,
        d: pdu::Decoded<'a>,
        digest: DataDigest,
    ) -> Result<Received<'a>, PduError> {
        let len = d.len;
        let event = match (self.state, d.pdu) {
            (State::AwaitIcReq, Pdu::IcReq(ic)) => self.on_icreq(ic),
            (State::AwaitIcReq, _) => {
                return Err(PduError::SequenceError {
                    what: "PDU before ICReq",
                })
            }
            (State::Live, Pdu::IcReq(_)) => {
                return Err(PduError::SequenceError {
                    what: "second ICReq",
                })
            }
            (State::Live, Pdu::CapsuleCmd(c)) => self.on_command(c.sqe, c.data, digest),
            (State::Live, Pdu::H2CData(h)) => self.on_h2c_data(h, digest)?,
            (State::Live, Pdu::H2CTermReq(t)) => {
                self.state = State::Closed;
                Event::Terminated {
                    fes: t.fes,
                    fei: t.fei,
                }
            }
            (State::Live, _) => {
                return Err(PduError::InvalidHeaderField {
                    offset: pdu::ch_off::PDU_TYPE,
                    what: "controller-to-host PDU type sent by host",
                })
            }
            (State::Closed, _) => {
                return Err(PduError::SequenceError {
                    what: "connection terminated",
                })
            }
        };
        Ok(Received { event, len })
    }

    fn on_icreq(&mut self, ic: IcReq) -> Event<'static> {
        let hdgst = ic.hdgst && self.cfg.allow_hdgst;
        let ddgst = ic.ddgst && self.cfg.allow_ddgst;
        let cpda = self.cfg.cpda.min(MAX_PDA);
        let maxh2cdata = self.codec.max_h2c_data & !3;
        self.codec.hdgst = hdgst;
        self.codec.ddgst = ddgst;
        self.codec.cpda = cpda;
        self.codec.hpda = ic.hpda;
        self.host_maxr2t = u64::from(ic.maxr2t) + 1;
        self.state = State::Live;
        Event::Connected {
            icresp: IcResp {
                cpda,
                hdgst,
                ddgst,
                maxh2cdata,
            },
            icreq: ic,
        }
    }

    fn on_command<'a>(&mut self, sqe: Sqe, data: &'a [u8], digest: DataDigest) -> Event<'a> {
        let reject = |status: Status| Event::CommandError { sqe, status };
        if matches!(digest, DataDigest::Mismatch { .. }) {
            return reject(Status::TRANSIENT_TRANSPORT_ERROR);
        }
        if self.commands.contains_key(&sqe.cid.0) {
            return reject(Status::COMMAND_ID_CONFLICT.with_dnr());
        }
        // A command moving no data may carry any descriptor of length zero
        // (hosts differ: Linux sends a null transport SGL); only the length
        // matters then, as in Linux nvmet.
        let sgl = if data.is_empty() && sqe.dptr.get(8..12) == Some(&[0u8; 4][..]) {
            DataSgl::Transport { len: 0 }
        } else {
            match sqe.data_sgl() {
                Ok(s) => s,
                Err(e) => return reject(e.status()),
            }
        };
        let dir = sqe.data_direction();
        match sgl {
            DataSgl::InCapsule { offset, len } => {
                if offset != 0 {
                    return reject(Status::SGL_OFFSET_INVALID.with_dnr());
                }
                if usize::try_from(len).ok() != Some(data.len()) || len > self.cfg.in_capsule_data {
                    return reject(Status::DATA_SGL_LENGTH_INVALID.with_dnr());
                }
                if dir != DataDirection::HostToController && len != 0 {
                    return reject(Status::INVALID_FIELD.with_dnr());
                }
                self.commands.insert(sqe.cid.0, Outstanding::default());
            }
            DataSgl::Transport { len } => {
                if !data.is_empty() {
                    return reject(Status::DATA_SGL_LENGTH_INVALID.with_dnr());
                }
                if len > self.cfg.max_transfer {
                    return reject(Status::DATA_SGL_LENGTH_INVALID.with_dnr());
                }
                let h2c_total = match dir {
                    DataDirection::HostToController => len,
                    DataDirection::None if len != 0 => {
                        return reject(Status::INVALID_FIELD.with_dnr())
                    }
                    DataDirection::Bidirectional => {
                        return reject(Status::INVALID_FIELD.with_dnr())
                    }
                    _ => 0,
                };
                self.commands.insert(
                    sqe.cid.0,
                    Outstanding {
                        h2c_total,
                        ..Outstanding::default()
                    },
                );
            }
        }
        Event::Command {
            sqe,
            sgl,
            in_capsule: data,
        }
    }

    fn on_h2c_data<'a>(
        &mut self,
        h: H2CData<'a>,
        digest: DataDigest,
    ) -> Result<Event<'a>, PduError> {
        let cid = *self
            .ttags
            .get(&h.ttag)
            .ok_or(PduError::InvalidHeaderField {
                offset: 10,
                what: "H2CData TTAG matches no outstanding R2T",
            })?;
        if cid != h.cid.0 {
            return Err(PduError::InvalidHeaderField {
                offset: 8,
                what: "H2CData CCCID differs from the R2T's",
            });
        }
        let cmd = self.commands.get_mut(&cid).ok_or(PduError::SequenceError {
            what: "R2T for a finished command",
        })?;
        let w =
            cmd.windows
                .iter_mut()
                .find(|w| w.ttag == h.ttag)
                .ok_or(PduError::SequenceError {
                    what: "R2T window missing",
                })?;
        let datal = u32::try_from(h.data.len()).map_err(|_| PduError::DataOutOfRange {
            what: "DATAL too large",
        })?;
        let expected = w.offset.checked_add(w.received);
        if expected != Some(h.offset) {
            return Err(PduError::DataOutOfRange {
                what: "DATAO is not where the R2T's data continues",
            });
        }
        let new_received = w
            .received
            .checked_add(datal)
            .filter(|&r| r <= w.len)
            .ok_or(PduError::DataOutOfRange {
                what: "H2CData beyond the R2T",
            })?;
        let window_done = new_received == w.len;
        if window_done != h.last {
            return Err(PduError::InvalidHeaderField {
                offset: pdu::ch_off::FLAGS,
                what: "LAST_PDU does not mark the R2T's final H2CData",
            });
        }
        w.received = new_received;
        cmd.received = cmd.received.saturating_add(datal);
        let complete = cmd.received == cmd.h2c_total;
        if window_done {
            let ttag = h.ttag;
            cmd.windows.retain(|w| w.ttag != ttag);
            self.ttags.remove(&ttag);
        }
        Ok(Event::Data {
            cid: h.cid,
            offset: h.offset,
            data: h.data,
            digest_ok: !matches!(digest, DataDigest::Mismatch { .. }),
            complete,
        })
    }

    /// The next R2T to send for a write command, covering at most `max_len`
    /// bytes, or `None` when all data is requested or the command already
    /// has as many R2Ts outstanding as allowed.
    pub fn next_r2t(&mut self, cid: CommandId, max_len: u32) -> Result<Option<R2t>, QpairError> {
        if self.state != State::Live {
            return Err(QpairError::NotConnected);
        }
        let limit = self
            .host_maxr2t
            .min(u64::from(self.cfg.max_r2t_per_command.max(1)));
        let cmd = self
            .commands
            .get(&cid.0)
            .ok_or(QpairError::UnknownCommand(cid))?;
        if cmd.h2c_total == 0 {
            return Err(QpairError::NoR2tData(cid));
        }
        let remaining = cmd.h2c_total.saturating_sub(cmd.requested);
        if remaining == 0 || cmd.windows.len() as u64 >= limit || max_len == 0 {
            return Ok(None);
        }
        let Some(ttag) = self.alloc_ttag() else {
            return Ok(None);
        };
        let Some(cmd) = self.commands.get_mut(&cid.0) else {
            return Err(QpairError::UnknownCommand(cid));
        };
        let len = remaining.min(max_len);
        let r2t = R2t {
            cid,
            ttag,
            offset: cmd.requested,
            len,
        };
        cmd.windows.push(R2tWindow {
            ttag,
            offset: cmd.requested,
            len,
            received: 0,
        });
        cmd.requested = cmd.requested.saturating_add(len);
        self.ttags.insert(ttag, cid.0);
        Ok(Some(r2t))
    }

    fn alloc_ttag(&mut self) -> Option<u16> {
        for _ in 0..=u16::MAX {
            let t = self.next_ttag;
            self.next_ttag = self.next_ttag.wrapping_add(1);
            if !self.ttags.contains_key(&t) {
                return Some(t);
            }
        }
        None
    }

    /// Forgets a command once its response (or final C2HData with SUCCESS)
    /// has been sent. Outstanding R2Ts for it are dropped.
    pub fn complete(&mut self, cid: CommandId) -> Result<(), QpairError> {
        let cmd = self
            .commands
            .remove(&cid.0)
            .ok_or(QpairError::UnknownCommand(cid))?;
        for w in cmd.windows {
            self.ttags.remove(&w.ttag);
        }
        Ok(())
    }
}

/// Splits a read's data into C2HData PDUs of at most `max_pdu_data` bytes
/// (0 is treated as 1), LAST_PDU on the final one and SUCCESS there when
/// `success` (the caller then sends no CapsuleResp).
pub fn c2h_data_pdus<'a>(
    cid: CommandId,
    data: &'a [u8],
    max_pdu_data: usize,
    success: bool,
) -> impl Iterator<Item = C2HData<'a>> + 'a {
    let step = max_pdu_data.max(1);
    let n = data.len().div_ceil(step);
    data.chunks(step).enumerate().map(move |(i, chunk)| {
        let last = i + 1 == n;
        C2HData {
            cid,
            offset: u32::try_from(i.saturating_mul(step)).unwrap_or(u32::MAX),
            last,
            success: last && success,
            data: chunk,
        }
    })
}

#[cfg(test)]
mod tests;
