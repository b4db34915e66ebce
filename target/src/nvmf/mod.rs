//! NVMe over Fabrics, TCP transport: the front end Linux nvme-tcp hosts connect to.
//!
//! This module is the sans-IO protocol layer: pure functions and state over
//! byte slices, with no sockets and no volumes.
//!
//! * [`pdu`]: the NVMe/TCP PDU codec, framer and digests.
//! * [`spec`]: NVMe SQE/CQE, status codes, SGLs, opcodes, Fabrics Connect and
//!   Property Get/Set, controller registers.
//! * [`identify`]: Identify Controller / Namespace / namespace lists.
//! * [`log_page`]: Error, SMART, Changed Namespace and Discovery log pages and
//!   Get Log Page offset/length slicing.
//! * [`qpair`]: the controller-side receive state machine of one queue pair
//!   (IC exchange, capsules, R2T/H2CData bookkeeping).
//!
//! On top of it, the target itself:
//!
//! * [`subsystem`]: NVM subsystems and the discovery subsystem (namespaces,
//!   allowed hosts, listeners), published to the data path as snapshots.
//! * [`controller`]: controllers created by Connect, registers, and the
//!   admin command set (Identify, logs, features, keep-alive, AER, Abort).
//! * [`io`]: NVM I/O commands onto a volume channel.
//! * [`target`]: the shared target state (subsystems, controller table,
//!   transport options, listeners).
//! * [`conn`]: one connection's receive loop, send task and dispatch.
//! * [`slots`]: a connection's in-flight I/O commands in reusable slots
//!   (no task per command).
//! * [`sock`]: the io_uring socket operations the connections use.
//! * [`host`]: a userspace NVMe/TCP initiator over the same codec, for tests
//!   and the benchmark harness.
//! * [`rpc`]: the `nvmf_*` admin methods and their save_config form.
//!
//! [`fuzz_decode_pdu`] and [`fuzz_queue_pair`] are entry points for fuzzing.

pub mod conn;
pub mod controller;
pub mod host;
pub mod identify;
pub mod io;
pub mod log_page;
pub mod pdu;
pub mod qpair;
pub mod rpc;
pub mod sock;
pub mod spec;
pub mod subsystem;
pub mod target;
mod wire;

pub use target::{NvmfTarget, TransportOptions};

/// Drives the decoders over arbitrary input; for a cargo-fuzz target.
///
/// Never panics on any input except when an internal invariant is broken
/// (debug assertions: a decoded PDU must re-encode to bytes that decode to
/// the same PDU).
pub fn fuzz_decode_pdu(data: &[u8]) {
    // The first byte picks the connection parameters, the rest is the stream.
    let (sel, stream) = match data.split_first() {
        Some((s, rest)) => (*s, rest),
        None => return,
    };
    let cfg = pdu::PduConfig {
        hdgst: sel & 1 != 0,
        ddgst: sel & 2 != 0,
        cpda: (sel >> 2) & 0x3,
        hpda: (sel >> 4) & 0x3,
        max_plen: 64 * 1024,
        max_h2c_data: 32 * 1024,
    };
    let mut rest = stream;
    while !rest.is_empty() {
        match pdu::frame(rest, &cfg) {
            Ok(pdu::Frame::Complete(_)) => {}
            Ok(pdu::Frame::NeedMore(_)) | Err(_) => return,
        }
        match pdu::decode(rest, &cfg) {
            Ok(d) => {
                if let Ok(again) = d.pdu.to_vec(&cfg) {
                    let re = pdu::decode(&again, &cfg).map(|x| x.pdu);
                    debug_assert_eq!(re, Ok(d.pdu));
                }
                if let pdu::Pdu::CapsuleCmd(c) = d.pdu {
                    let _ = c.sqe.data_sgl();
                    let _ = spec::ConnectCommand::from_sqe(&c.sqe);
                    let _ = spec::PropertyCommand::from_sqe(&c.sqe).map(|p| p.property());
                    let _ = spec::ConnectData::decode(c.data);
                    let _ = spec::RwCommand::from_sqe(&c.sqe).check_range(1 << 20);
                    let _ = spec::DsmCommand::from_sqe(&c.sqe).parse_ranges(c.data);
                    let g = log_page::GetLogPage::from_sqe(&c.sqe);
                    let _ = log_page::slice_log(c.data, &g, 64 * 1024);
                }
                rest = rest.get(d.len..).unwrap_or(&[]);
            }
            Err(pdu::PduError::DataDigest { .. }) => {
                // Not fatal: skip the PDU, as a controller would after failing the command.
                let Some(ch) = pdu::CommonHeader::parse(rest) else {
                    return;
                };
                rest = rest.get(ch.plen as usize..).unwrap_or(&[]);
            }
            Err(e) => {
                if let Some(t) = e.c2h_term_req(rest) {
                    let _ = t.to_vec(&cfg);
                }
                return;
            }
        }
    }
}

/// Drives a controller-side [`qpair::QueuePair`] with arbitrary input; for a
/// cargo-fuzz target.
///
/// The first byte selects options; unless its top bit is set a valid ICReq
/// (with the digests the low bits ask for) is fed first so the fuzzer spends
/// its effort past connection setup. The rest is treated as the host's byte
/// stream, framed the way a receive loop would; after each command the
/// queue pair is asked for R2Ts (TTAGs are allocated from 0, so a fuzzer can
/// learn to answer them).
pub fn fuzz_queue_pair(data: &[u8]) {
    let (sel, stream) = match data.split_first() {
        Some((s, rest)) => (*s, rest),
        None => return,
    };
    let mut qp = qpair::QueuePair::new(qpair::QpairConfig {
        maxh2cdata: 4096,
        in_capsule_data: 4096,
        max_transfer: 64 * 1024,
        max_r2t_per_command: u32::from(sel >> 4 & 0x3) + 1,
        ..qpair::QpairConfig::default()
    });
    if sel & 0x80 == 0 {
        let ic = pdu::Pdu::IcReq(pdu::IcReq {
            hpda: 0,
            hdgst: sel & 1 != 0,
            ddgst: sel & 2 != 0,
            maxr2t: u32::from(sel >> 2 & 0x3),
        });
        if let Ok(b) = ic.to_vec(qp.codec()) {
            let _ = qp.receive(&b);
        }
    }
    let r2t_len = 1024 * (u32::from(sel >> 6 & 0x1) + 1);
    let mut rest = stream;
    while !rest.is_empty() {
        let n = match pdu::frame(rest, qp.codec()) {
            Ok(pdu::Frame::Complete(n)) => n,
            Ok(pdu::Frame::NeedMore(_)) => return,
            Err(e) => {
                if let Some(t) = e.c2h_term_req(rest) {
                    let _ = t.to_vec(qp.codec());
                }
                return;
            }
        };
        let pdu_bytes = rest.get(..n).unwrap_or(&[]);
        // The zero-copy receive path (head, data, digest received apart) must
        // decide exactly as the contiguous one.
        let mut twin = qp.clone();
        let split = split_parts(pdu_bytes, twin.codec());
        let by_parts = split.map(|(h, d, g)| twin.receive_parts(h, d, g));
        let whole = qp.receive(pdu_bytes);
        if let Some(p) = by_parts {
            debug_assert_eq!(
                p.as_ref().map(|r| (&r.event, r.len)).map_err(|e| *e),
                whole.as_ref().map(|r| (&r.event, r.len)).map_err(|e| *e)
            );
        }
        match whole {
            Ok(r) => {
                debug_assert_eq!(r.len, n);
                match r.event {
                    qpair::Event::Command { sqe, .. } => {
                        while let Ok(Some(r2t)) = qp.next_r2t(sqe.cid, r2t_len) {
                            let _ = pdu::Pdu::R2t(r2t).to_vec(qp.codec());
                        }
                        if sqe.cdw10_plus(5) & 1 != 0 {
                            let _ = qp.complete(sqe.cid);
                        }
                    }
                    qpair::Event::Data { cid, complete, .. } => {
                        if complete {
                            let _ = qp.complete(cid);
                        } else {
                            while let Ok(Some(_)) = qp.next_r2t(cid, r2t_len) {}
                        }
                    }
                    qpair::Event::Connected { icresp, .. } => {
                        let _ = pdu::Pdu::IcResp(icresp).to_vec(&pdu::PduConfig::default());
                    }
                    qpair::Event::CommandError { .. } | qpair::Event::Terminated { .. } => {}
                }
            }
            Err(e) => {
                if let Some(t) = e.c2h_term_req(pdu_bytes) {
                    let _ = t.to_vec(qp.codec());
                }
                if !qp.is_live() {
                    return;
                }
            }
        }
        rest = rest.get(n..).unwrap_or(&[]);
    }
}

/// Splits a whole PDU into the head, data section and data digest a
/// parts-wise receiver would have read; `None` if its header is invalid.
fn split_parts<'a>(
    pdu_bytes: &'a [u8],
    cfg: &pdu::PduConfig,
) -> Option<(&'a [u8], &'a [u8], Option<u32>)> {
    let ch = pdu::CommonHeader::parse(pdu_bytes)?;
    let p = pdu::parts_layout(&ch, cfg).ok()?;
    let head = pdu_bytes.get(..p.head_len)?;
    let data_end = p.head_len.checked_add(p.data_len)?;
    let data = pdu_bytes.get(p.head_len..data_end)?;
    let ddgst = if p.ddgst {
        Some(u32::from_le_bytes(wire::bytes::<4>(pdu_bytes, data_end)?))
    } else {
        None
    };
    Some((head, data, ddgst))
}

#[cfg(test)]
mod tests {
    proptest::proptest! {
        #[test]
        fn fuzz_entry_never_panics(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2000)) {
            super::fuzz_decode_pdu(&b);
            super::fuzz_queue_pair(&b);
        }
    }
}
