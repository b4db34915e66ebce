//! The send side of one iSCSI connection: PDUs are encoded into a queue as
//! they are produced and one writer task sends everything queued with as few
//! `sendmsg` ops as the kernel allows.
//!
//! Why this shape: profiling the target under fio's libiscsi load showed
//! that most of its CPU per I/O was `sendmsg` (on loopback each one also
//! runs the peer's TCP receive path and wakes it), one op per PDU. Commands
//! completing in the same reactor turn now share one op: their headers
//! (with digests, padding and small data segments) are copied into the
//! arena of a [`SendList`] (the transport's reusable batched `sendmsg`
//! list, shared with the NVMe/TCP side), and Data-In payload chunks go out
//! as they are, shared, between them, so read data is still never copied.
//! Two lists alternate (one filling while the other is in flight), so a
//! warm connection allocates nothing to send. Under load the writer is busy
//! while more responses queue up, so batches grow exactly when it matters;
//! at queue depth 1 a batch is the one PDU, sent in the same turn.
//!
//! Ordering: a PDU's place in the queue is fixed when it is pushed, and the
//! caller assigns its StatSN in the same synchronous step, so StatSNs leave
//! in order without a send lock. Every push is synchronous (no await), so
//! the PDUs of one response (Data-In sequence and status) are contiguous.
//! After a send error the queue is broken: later pushes fail, the owner shuts
//! the socket down. Memory is bounded by what commands in flight hold
//! anyway (the session's queue depth bounds them).

use std::cell::{Cell, RefCell};

use mirrorpoint_poller::{IoBuf, LocalNotify};
use mirrorpoint_transport::SendList;
use thiserror::Error;

use super::pdu::{self, Bhs, PduError, SegmentLengths};

/// Why a PDU could not be queued.
#[derive(Debug, Error)]
pub enum TxError {
    /// An earlier send failed; the connection is going away.
    #[error("connection send side is broken")]
    Broken,
    /// The header cannot be encoded (a field or length out of range).
    #[error("cannot encode PDU: {0}")]
    Encode(#[from] PduError),
}

/// One batch for the writer: the list to send (give it back with
/// [`TxQueue::done`] so its capacities are reused) and its PDU count.
pub(crate) struct Batch {
    pub(crate) list: SendList,
    pub(crate) pdus: usize,
}

/// A connection's outgoing PDUs.
pub(crate) struct TxQueue {
    /// What is queued: headers, digests, padding and small segments copied
    /// into the list's arena, payload chunks shared.
    pending: RefCell<SendList>,
    /// PDUs in `pending`.
    pdus: Cell<usize>,
    /// The list of the last batch sent, cleared, waiting to be the next
    /// `pending` (two lists alternate, so a warm queue allocates nothing).
    spare: RefCell<Option<SendList>>,
    header_digest: bool,
    data_digest: bool,
    /// The writer waits here for PDUs.
    work: LocalNotify,
    /// [`TxQueue::flushed`] waits here for the writer to go idle.
    idle: LocalNotify,
    /// The writer has a batch in flight.
    sending: Cell<bool>,
    broken: Cell<bool>,
}

impl TxQueue {
    pub(crate) fn new(header_digest: bool, data_digest: bool) -> TxQueue {
        TxQueue {
            pending: RefCell::new(SendList::new()),
            pdus: Cell::new(0),
            spare: RefCell::new(None),
            header_digest,
            data_digest,
            work: LocalNotify::default(),
            idle: LocalNotify::default(),
            sending: Cell::new(false),
            broken: Cell::new(false),
        }
    }

    /// Queues one PDU: `bhs` with a data segment of `small` (copied)
    /// followed by `bufs` (shared), with digests and padding as negotiated.
    pub(crate) fn push(&self, bhs: &Bhs, small: &[u8], bufs: &[IoBuf]) -> Result<(), TxError> {
        if self.broken.get() {
            return Err(TxError::Broken);
        }
        let len = small.len() + bufs.iter().map(|b| b.len()).sum::<usize>();
        let data_len = u32::try_from(len)
            .map_err(|_| TxError::Encode(PduError::EncodeOverflow("DataSegmentLength")))?;
        let raw = bhs.encode(SegmentLengths {
            ahs_len: 0,
            data_len,
        })?;
        let mut p = self.pending.borrow_mut();
        p.push_bytes(&raw);
        if self.header_digest {
            p.push_bytes(&pdu::digest_bytes(pdu::crc32c(&raw)));
        }
        if len > 0 {
            let mut crc = 0u32;
            p.push_bytes(small);
            if self.data_digest {
                crc = crc32c::crc32c_append(crc, small);
            }
            for b in bufs {
                p.push_chunk(b.clone());
                if self.data_digest {
                    crc = crc32c::crc32c_append(crc, b);
                }
            }
            let pad = [0u8; 3];
            let pad = pad.get(..pdu::pad_len(len)).unwrap_or(&[]);
            p.push_bytes(pad);
            if self.data_digest {
                crc = crc32c::crc32c_append(crc, pad);
                p.push_bytes(&pdu::digest_bytes(crc));
            }
        }
        drop(p);
        self.pdus.set(self.pdus.get() + 1);
        self.work.notify();
        Ok(())
    }

    /// Whether nothing is queued.
    fn is_empty(&self) -> bool {
        self.pdus.get() == 0
    }

    /// Everything queued so far, or `None` when nothing is. Marks the
    /// writer busy until [`TxQueue::done`].
    fn take(&self) -> Option<Batch> {
        if self.pdus.get() == 0 {
            return None;
        }
        let next = self.spare.borrow_mut().take().unwrap_or_default();
        let list = std::mem::replace(&mut *self.pending.borrow_mut(), next);
        self.sending.set(true);
        Some(Batch {
            list,
            pdus: self.pdus.replace(0),
        })
    }

    /// The next batch, waiting for one. Call [`TxQueue::done`] after it.
    pub(crate) async fn next(&self) -> Batch {
        loop {
            if let Some(b) = self.take() {
                return b;
            }
            self.work.wait().await;
        }
    }

    /// Reports the outcome of the batch [`TxQueue::next`] gave (`ok`: all
    /// of it was sent) and hands its list back for reuse.
    pub(crate) fn done(&self, ok: bool, mut list: SendList) {
        self.sending.set(false);
        list.clear();
        *self.spare.borrow_mut() = Some(list);
        if !ok {
            self.broken.set(true);
            self.pending.borrow_mut().clear();
            self.pdus.set(0);
        }
        if self.is_empty() {
            self.idle.notify();
        }
    }

    /// Resolves when everything queued has been handed to the socket (or
    /// the send side broke). One task at a time may wait here.
    pub(crate) async fn flushed(&self) {
        while !self.broken.get() && (self.sending.get() || !self.is_empty()) {
            self.idle.wait().await;
        }
    }

    /// Whether a send failed.
    #[cfg(test)]
    fn is_broken(&self) -> bool {
        self.broken.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iscsi::pdu::{CmdSn, Itt, Lun, NopIn, StatSn, Ttt, BHS_LEN, DIGEST_LEN};

    fn nop(sn: u32) -> Bhs {
        Bhs::NopIn(NopIn {
            lun: Lun([0; 8]),
            itt: Itt(sn),
            ttt: Ttt::RESERVED,
            stat_sn: StatSn(sn),
            exp_cmd_sn: CmdSn(1),
            max_cmd_sn: CmdSn(2),
        })
    }

    #[test]
    fn batches_match_the_reference_encoder_with_and_without_digests() {
        for (hd, dd) in [(false, false), (true, false), (false, true), (true, true)] {
            let q = TxQueue::new(hd, dd);
            let pool = mirrorpoint_poller::BufferPool::new(mirrorpoint_poller::PoolConfig {
                chunk_size: 4096,
                chunk_count: 4,
                huge_pages: false,
            })
            .expect("pool");
            let mut m = pool.alloc(1001).expect("chunk");
            for (i, b) in m.iter_mut().enumerate() {
                *b = i as u8;
            }
            let chunk = m.freeze();
            q.push(&nop(1), b"ping", &[]).expect("push");
            q.push(&nop(2), &[], &[chunk.clone(), chunk.clone()])
                .expect("push");
            q.push(&nop(3), &[], &[]).expect("push");
            let b = q.take().expect("a batch");
            assert_eq!(b.pdus, 3);
            let mut want = Vec::new();
            pdu::encode_pdu(&nop(1), &[], b"ping", hd, dd, &mut want).expect("enc");
            let mut two = chunk.to_vec();
            two.extend_from_slice(&chunk);
            pdu::encode_pdu(&nop(2), &[], &two, hd, dd, &mut want).expect("enc");
            pdu::encode_pdu(&nop(3), &[], &[], hd, dd, &mut want).expect("enc");
            assert_eq!(b.list.to_vec(), want, "hd={hd} dd={dd}");
            // The chunks were shared, not copied: the byte vector holds only
            // headers, digests, padding and the small segment.
            let hdl = if hd { DIGEST_LEN } else { 0 };
            let ddl = if dd { DIGEST_LEN } else { 0 };
            assert_eq!(
                b.list.arena_len(),
                3 * (BHS_LEN + hdl) + 4 + ddl + pdu::pad_len(2002) + ddl
            );
            assert!(q.take().is_none(), "the batch took everything");
            let arena = b.list.arena_len();
            q.done(true, b.list);
            // Two lists alternate: the third batch is sent from the first
            // one's list, cleared but with its arena kept.
            q.push(&nop(4), &[], &[]).expect("push");
            let b = q.take().expect("a batch");
            q.done(true, b.list);
            q.push(&nop(5), &[], &[]).expect("push");
            let b = q.take().expect("a batch");
            assert!(
                b.list.arena_capacity() >= arena,
                "the first list was reused"
            );
            let mut want = Vec::new();
            pdu::encode_pdu(&nop(5), &[], &[], hd, dd, &mut want).expect("enc");
            assert_eq!(
                b.list.to_vec(),
                want,
                "a reused list holds only the new PDU"
            );
            q.done(true, b.list);
        }
    }

    #[test]
    fn a_failed_send_breaks_the_queue() {
        let q = TxQueue::new(false, false);
        q.push(&nop(1), &[], &[]).expect("push");
        let b = q.take().expect("batch");
        q.push(&nop(2), &[], &[]).expect("queued behind the batch");
        q.done(false, b.list);
        assert!(q.is_broken());
        assert!(q.take().is_none(), "queued PDUs are dropped");
        assert!(matches!(q.push(&nop(3), &[], &[]), Err(TxError::Broken)));
    }
}
