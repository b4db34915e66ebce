//! A fuzzing entry point over the whole decoder surface.
//!
//! [`fuzz_decode`] is what a `cargo fuzz` target calls. Random bytes rarely
//! carry valid CRCs, so besides running the framer over the input as a stream
//! it also hands slices straight to the message decoders (past the CRCs), and
//! feeds whatever decodes into handshake machines in every state. It never
//! panics on any input; with debug assertions on (as cargo-fuzz builds) it
//! asserts codec invariants, so a panic there means a codec bug, not bad input.

use super::frame::{Decoded, Framer, MsgType};
use super::handshake::{Acceptor, HandshakeConfig, Initiator, SharedSecret};
use super::message::Message;
use super::types::{RequestTag, SiteName};

/// Bytes of the input tried as incremental prefixes (quadratic, so bounded).
const PREFIX_PROBE: usize = 128;

/// Drives the framer, every message decoder and both handshake machines on
/// `data`. Never panics on any input (see the module doc for assertions).
pub fn fuzz_decode(data: &[u8]) {
    let framer = Framer::default();
    let mut messages: Vec<Message<'_>> = Vec::new();

    // The framer as a receive loop sees it: frames back to back.
    let mut rest = data;
    while let Ok(Decoded::Complete { value, consumed }) = framer.decode(rest) {
        debug_assert!(consumed >= value.header.header_len as usize);
        if let Ok(msg) = value.message(framer.limits()) {
            check_round_trip(&framer, value.header.tag, &msg);
            messages.push(msg);
        }
        match rest.get(consumed..) {
            Some(r) if consumed > 0 => rest = r,
            _ => break,
        }
    }

    // Incremental delivery: every prefix is NeedMore, an error, or a frame.
    for end in 0..=data.len().min(PREFIX_PROBE) {
        let prefix = data.get(..end).unwrap_or_default();
        if let Ok(Decoded::NeedMore(n)) = framer.poll(prefix) {
            debug_assert!(n > 0);
        }
    }

    // Past the CRCs: first byte picks the type, then message header, then payload.
    if let Some((&sel, body)) = data.split_first() {
        let types = MsgType::ALL;
        if let Some(&t) = types.get(usize::from(sel) % types.len()) {
            let split = t.msg_header_len().min(body.len());
            let (head, payload) = body.split_at(split);
            if let Ok(msg) = Message::decode_parts(t, head, payload, framer.limits()) {
                check_round_trip(&framer, RequestTag(0), &msg);
                messages.push(msg);
            }
        }
    }

    drive_handshakes(&messages);
}

fn check_round_trip(framer: &Framer, tag: RequestTag, msg: &Message<'_>) {
    let encoded = msg.encode_to_vec(framer, tag);
    debug_assert!(
        encoded.is_ok(),
        "decoded message does not re-encode: {encoded:?}"
    );
    if let Ok(bytes) = encoded {
        let again = framer.decode_message(&bytes);
        debug_assert!(
            matches!(&again, Ok(Decoded::Complete { value: (t, m), consumed })
                if *t == tag && m == msg && *consumed == bytes.len()),
            "round trip changed the message: {again:?}"
        );
    }
}

fn config() -> Option<HandshakeConfig> {
    let secret = SharedSecret::new(b"fuzzing secret, 32 bytes long!!!").ok()?;
    Some(HandshakeConfig::new(
        secret,
        SiteName::new("fuzz-site").ok()?,
    ))
}

/// Feeds `messages` to machines in each state: fresh, and one honest step in.
fn drive_handshakes(messages: &[Message<'_>]) {
    let Some(cfg) = config() else { return };
    let (initiator, hello_i) = Initiator::start_with_nonce(cfg.clone(), [1; 32]);
    let acceptor = Acceptor::with_nonce(cfg, [2; 32]);

    let mut a_waiting = acceptor.clone();
    let a_sent = a_waiting
        .handle(&hello_i)
        .map(|s| s.send)
        .unwrap_or_default();
    let mut i_waiting = initiator.clone();
    if let Some(hello_a) = a_sent.first() {
        let _ = i_waiting.handle(hello_a);
    }

    let mut machines_i = [initiator, i_waiting];
    let mut machines_a = [acceptor, a_waiting];
    for msg in messages {
        for m in &mut machines_i {
            let _ = m.handle(msg);
        }
        for m in &mut machines_a {
            let _ = m.handle(msg);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::wire::message::samples;

    /// Deterministic xorshift, so failures reproduce.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// Valid inputs in `fuzz_decode`'s direct format (type index, message
    /// header, payload), and as frames, mutated: reaches the validators far
    /// deeper than random bytes do.
    #[test]
    fn mutated_valid_inputs_never_panic() {
        let framer = Framer::default();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let seeds: Vec<Vec<u8>> = samples()
            .iter()
            .flat_map(|m| {
                let frame = m.encode_to_vec(&framer, RequestTag(3)).unwrap();
                let idx = MsgType::ALL
                    .iter()
                    .position(|t| *t == m.msg_type())
                    .unwrap();
                let mut direct = vec![idx as u8];
                direct.extend_from_slice(&frame[32..]);
                [frame, direct]
            })
            .collect();
        for seed in &seeds {
            fuzz_decode(seed);
        }
        for _ in 0..20_000 {
            let mut input = seeds[rng.next() as usize % seeds.len()].clone();
            for _ in 0..=rng.next() % 4 {
                let at = rng.next() as usize % input.len();
                match rng.next() % 4 {
                    0 => input[at] ^= 1 << (rng.next() % 8),
                    1 => input[at] = rng.next() as u8,
                    2 => input.truncate(at.max(1)),
                    _ => input[at] = [0, 0xff, 0x7f, 0x80][rng.next() as usize % 4],
                }
            }
            fuzz_decode(&input);
        }
    }

    #[test]
    fn handshake_messages_reach_every_state() {
        // A valid Hello and HelloAck from an honest peer, through fuzz_decode's
        // stream path, must not trip any assertion.
        let framer = Framer::default();
        let Some(cfg) = config() else { panic!() };
        let (_, hello) = Initiator::start_with_nonce(cfg.clone(), [5; 32]);
        let mut a = Acceptor::with_nonce(cfg, [6; 32]);
        let mut stream = hello.encode_to_vec(&framer, RequestTag(0)).unwrap();
        for m in a.handle(&hello).unwrap().send {
            stream.extend_from_slice(&m.encode_to_vec(&framer, RequestTag(0)).unwrap());
        }
        fuzz_decode(&stream);
    }
}
