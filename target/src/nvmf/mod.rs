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

pub mod identify;
pub mod log_page;
pub mod pdu;
pub mod spec;
mod wire;

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

#[cfg(test)]
mod tests {
    proptest::proptest! {
        #[test]
        fn fuzz_entry_never_panics(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2000)) {
            super::fuzz_decode_pdu(&b);
        }
    }
}
