//! Errors of the userspace NVMe/TCP initiator.
//!
//! One enum, [`HostError`], for everything a caller can see: socket errors,
//! an NVMe status the controller completed a command with (mapped to a
//! [`StatusKind`] so tests can match on meaning instead of raw codes),
//! protocol violations by the target, a C2HTermReq, digest mismatches,
//! timeouts and use of a dead queue. It is `Clone` because a queue that dies
//! fails every command in flight with the same cause.

use crate::nvmf::pdu::PduError;
use crate::nvmf::spec::{sct, Status};
use std::io;
use std::sync::Arc;

/// What an NVMe completion status means, for the statuses a block initiator
/// acts on; everything else is [`StatusKind::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatusKind {
    /// Invalid command opcode.
    InvalidOpcode,
    /// Invalid field in command.
    InvalidField,
    /// Command ID conflict.
    CommandIdConflict,
    /// Data transfer error.
    DataTransferError,
    /// Internal error.
    InternalError,
    /// Command abort requested / aborted (SQ deletion, preempt).
    Aborted,
    /// Invalid namespace or format.
    InvalidNamespace,
    /// Command sequence error.
    CommandSequenceError,
    /// An SGL was refused (descriptor type, length, offset).
    InvalidSgl,
    /// Keep alive timer expired.
    KeepAliveExpired,
    /// Namespace is write protected.
    WriteProtected,
    /// Transient transport error (e.g. a data digest mismatch seen by the target).
    TransientTransport,
    /// LBA out of range.
    LbaOutOfRange,
    /// Capacity exceeded.
    CapacityExceeded,
    /// Namespace not ready.
    NamespaceNotReady,
    /// Invalid queue identifier (Connect).
    InvalidQueueId,
    /// Invalid queue size (Connect).
    InvalidQueueSize,
    /// Connect: incompatible format.
    ConnectIncompatibleFormat,
    /// Connect: controller busy.
    ConnectControllerBusy,
    /// Connect: invalid parameters.
    ConnectInvalidParameters,
    /// Connect: host not allowed.
    ConnectInvalidHost,
    /// Invalid log page.
    InvalidLogPage,
    /// Media error (write fault, unrecovered read error, ...).
    Media,
    /// Path related status.
    Path,
    /// Anything else.
    Other,
}

impl StatusKind {
    /// Classifies a completion status.
    pub fn of(s: Status) -> StatusKind {
        let key = Status {
            sct: s.sct,
            sc: s.sc,
            ..Status::default()
        };
        let table: &[(Status, StatusKind)] = &[
            (Status::INVALID_OPCODE, StatusKind::InvalidOpcode),
            (Status::INVALID_FIELD, StatusKind::InvalidField),
            (Status::COMMAND_ID_CONFLICT, StatusKind::CommandIdConflict),
            (Status::DATA_TRANSFER_ERROR, StatusKind::DataTransferError),
            (Status::INTERNAL_ERROR, StatusKind::InternalError),
            (Status::ABORT_REQUESTED, StatusKind::Aborted),
            (Status::ABORTED_SQ_DELETION, StatusKind::Aborted),
            (Status::ABORTED_PREEMPT, StatusKind::Aborted),
            (Status::ABORTED_POWER_LOSS, StatusKind::Aborted),
            (Status::INVALID_NAMESPACE, StatusKind::InvalidNamespace),
            (
                Status::COMMAND_SEQUENCE_ERROR,
                StatusKind::CommandSequenceError,
            ),
            (
                Status::INVALID_SGL_SEGMENT_DESCRIPTOR,
                StatusKind::InvalidSgl,
            ),
            (Status::INVALID_SGL_COUNT, StatusKind::InvalidSgl),
            (Status::DATA_SGL_LENGTH_INVALID, StatusKind::InvalidSgl),
            (Status::METADATA_SGL_LENGTH_INVALID, StatusKind::InvalidSgl),
            (Status::SGL_DESCRIPTOR_TYPE_INVALID, StatusKind::InvalidSgl),
            (Status::SGL_OFFSET_INVALID, StatusKind::InvalidSgl),
            (Status::KEEP_ALIVE_EXPIRED, StatusKind::KeepAliveExpired),
            (
                Status::NAMESPACE_WRITE_PROTECTED,
                StatusKind::WriteProtected,
            ),
            (
                Status::TRANSIENT_TRANSPORT_ERROR,
                StatusKind::TransientTransport,
            ),
            (Status::LBA_OUT_OF_RANGE, StatusKind::LbaOutOfRange),
            (Status::CAPACITY_EXCEEDED, StatusKind::CapacityExceeded),
            (Status::NAMESPACE_NOT_READY, StatusKind::NamespaceNotReady),
            (Status::INVALID_QUEUE_ID, StatusKind::InvalidQueueId),
            (Status::INVALID_QUEUE_SIZE, StatusKind::InvalidQueueSize),
            (
                Status::CONNECT_INCOMPATIBLE_FORMAT,
                StatusKind::ConnectIncompatibleFormat,
            ),
            (
                Status::CONNECT_CONTROLLER_BUSY,
                StatusKind::ConnectControllerBusy,
            ),
            (
                Status::CONNECT_INVALID_PARAMETERS,
                StatusKind::ConnectInvalidParameters,
            ),
            (Status::CONNECT_INVALID_HOST, StatusKind::ConnectInvalidHost),
            (Status::INVALID_LOG_PAGE, StatusKind::InvalidLogPage),
        ];
        if let Some((_, k)) = table.iter().find(|(st, _)| *st == key) {
            return *k;
        }
        match s.sct {
            sct::MEDIA => StatusKind::Media,
            sct::PATH => StatusKind::Path,
            _ => StatusKind::Other,
        }
    }
}

/// Why an initiator operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HostError {
    /// A socket operation failed.
    #[error("socket: {0}")]
    Io(Arc<io::Error>),
    /// The target closed the connection.
    #[error("connection closed by the target")]
    Disconnected,
    /// The controller completed the command with an error status.
    #[error("command failed: {kind:?} ({status}), dw0 {dw0:#x}")]
    Status {
        /// What the status means.
        kind: StatusKind,
        /// The raw status.
        status: Status,
        /// Completion dword 0 (Connect puts IPO/IATTR here).
        dw0: u32,
    },
    /// The target sent something the protocol does not allow; the queue
    /// sent an H2CTermReq (when the error has a FES) and is dead.
    #[error("protocol violation by the target: {0}")]
    Protocol(PduError),
    /// The target sent something this initiator cannot accept (not a codec
    /// error: e.g. a completion for a command not in flight).
    #[error("unexpected from the target: {0}")]
    Unexpected(String),
    /// The target terminated the connection with a C2HTermReq.
    #[error("target terminated the connection: FES {fes:#x}, FEI {fei:#x}")]
    Terminated {
        /// Fatal error status.
        fes: u16,
        /// Fatal error information.
        fei: u32,
    },
    /// Data received for the command failed its data digest.
    #[error("data digest mismatch on command {cid}: received {received:#010x}, computed {computed:#010x}")]
    DataDigest {
        /// The command.
        cid: u16,
        /// Digest in the PDU.
        received: u32,
        /// Digest computed over the data.
        computed: u32,
    },
    /// Connection setup disagreed (ICResp, digests, Connect response).
    #[error("negotiation failed: {0}")]
    Negotiation(String),
    /// An operation did not complete in time; for commands the queue is
    /// then torn down (the target may still act on the command).
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// The queue died earlier (the cause is kept).
    #[error("queue is dead: {0}")]
    Dead(Arc<HostError>),
    /// The caller asked for something impossible (buffer too short, no
    /// such namespace, transfer larger than the controller's MDTS, ...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The reactor's buffer pool has no free chunk.
    #[error("no free buffer in the reactor's pool")]
    NoBuffer,
    /// The host closed the queue.
    #[error("queue closed by the host")]
    Closed,
    /// The controller reports a fatal status (CSTS.CFS) or never got ready.
    #[error("controller not ready: {0}")]
    NotReady(String),
}

impl From<io::Error> for HostError {
    fn from(e: io::Error) -> HostError {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            HostError::Disconnected
        } else {
            HostError::Io(Arc::new(e))
        }
    }
}

impl HostError {
    /// The status kind when the controller failed the command.
    pub fn status_kind(&self) -> Option<StatusKind> {
        match self {
            HostError::Status { kind, .. } => Some(*kind),
            HostError::Dead(inner) => inner.status_kind(),
            _ => None,
        }
    }

    /// The underlying cause (looks through [`HostError::Dead`]).
    pub fn root(&self) -> &HostError {
        match self {
            HostError::Dead(inner) => inner.root(),
            e => e,
        }
    }

    pub(crate) fn from_status(status: Status, dw0: u32) -> HostError {
        HostError::Status {
            kind: StatusKind::of(status),
            status,
            dw0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_kinds_ignore_dnr_and_classify_types() {
        assert_eq!(
            StatusKind::of(Status::LBA_OUT_OF_RANGE.with_dnr()),
            StatusKind::LbaOutOfRange
        );
        assert_eq!(
            StatusKind::of(Status::UNRECOVERED_READ_ERROR),
            StatusKind::Media
        );
        assert_eq!(
            StatusKind::of(Status {
                sct: 0,
                sc: 0x7e,
                ..Status::default()
            }),
            StatusKind::Other
        );
        let e = HostError::Dead(Arc::new(HostError::from_status(Status::INVALID_FIELD, 0)));
        assert_eq!(e.status_kind(), Some(StatusKind::InvalidField));
        assert!(matches!(e.root(), HostError::Status { .. }));
    }
}
