//! iSCSI (RFC 7143) with the SPC-4/SBC-3 command sets: the front end open-iscsi and libiscsi connect to.
//!
//! This module holds the sans-IO protocol layer: everything here works on byte
//! slices and plain values, never on sockets, so it can be tested exhaustively
//! and fuzzed. [`pdu`] frames and (de)serialises PDUs, [`text`] handles
//! key=value text segments, [`negotiation`] answers operational keys and
//! [`login`] drives the target side of the login phase (including CHAP);
//! [`sense`] builds SCSI sense data for CHECK CONDITION responses.
//!
//! On top of it sit the target itself: [`registry`] (portal groups,
//! initiator groups, target nodes, sessions), [`portal`] (listeners),
//! [`conn`] (one connection's login and full feature phase on its reactor),
//! [`txq`] (its send queue, which batches PDUs into few `sendmsg` ops),
//! [`pacing`] (when its reader waits for a lock-step initiator's writes),
//! [`rpc`] (the `iscsi_*` admin methods). Commands go to the SCSI layer
//! in [`crate::scsi`] through its task contract.

pub mod conn;
pub mod login;
pub mod negotiation;
pub mod pacing;
pub mod pdu;
pub mod portal;
pub mod registry;
pub mod rpc;
pub mod sense;
pub mod text;
pub mod txq;

/// Fuzz entry point: frame and decode arbitrary bytes as a target would.
/// Never panics; returns nothing useful on purpose.
pub fn fuzz_decode_pdu(data: &[u8]) {
    for cfg in [
        pdu::FrameConfig::default(),
        pdu::FrameConfig {
            header_digest: true,
            data_digest: true,
            max_recv_data_segment_length: 1 << 24,
        },
    ] {
        let mut buf = data;
        while let Ok(pdu::Framed::Complete(p)) = pdu::frame(buf, &cfg, pdu::Role::Target) {
            let _ = p.ahs_list();
            let _ = p.full_cdb();
            let _ = text::parse(p.data);
            let Some(rest) = buf.get(p.wire_len..) else {
                break;
            };
            buf = rest;
        }
    }
    if let Some(raw) = data.get(..pdu::BHS_LEN) {
        let mut a = [0u8; pdu::BHS_LEN];
        a.copy_from_slice(raw);
        if let Ok((bhs, lens)) = pdu::Bhs::decode(&a) {
            let _ = bhs.encode(lens);
        }
    }
}

/// Fuzz entry point: feed arbitrary bytes as a sequence of login PDUs to a
/// target login state machine. Never panics.
pub fn fuzz_login(data: &[u8]) {
    login::fuzz_drive(data);
}
