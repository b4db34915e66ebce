//! A site-to-site session through the public `mirror::wire` API only: both
//! handshake machines talk over an in-memory byte stream delivered in odd
//! chunk sizes, then a replicated write is sent as two iovecs and received
//! with a split (head, then pool buffer) receive.

use mirrorpoint_target::mirror::wire::{
    Acceptor, Decoded, Established, Framer, HandshakeConfig, Initiator, Message, RequestTag,
    SharedSecret, SiteName, Status, Write, WriteAck, WriteFlags,
};
use mirrorpoint_target::mirror::wire::{Epoch, MirrorId, SeqNo};
use mirrorpoint_target::units::ByteOffset;

/// One direction of a connection: bytes written, read back in chunks.
#[derive(Default)]
struct Pipe {
    bytes: Vec<u8>,
    rx: Vec<u8>,
}

impl Pipe {
    fn send(&mut self, framer: &Framer, msg: &Message<'_>) {
        let mut head = vec![0u8; msg.encoded_head_len()];
        let enc = msg.encode(framer, RequestTag(0), &mut head).unwrap();
        self.bytes.extend_from_slice(&head[..enc.len]);
        self.bytes.extend_from_slice(enc.trailer);
    }

    /// Moves up to `chunk` bytes to the receive buffer and returns every
    /// complete message, owned.
    fn recv(&mut self, framer: &Framer, chunk: usize) -> Vec<Message<'static>> {
        let n = chunk.min(self.bytes.len());
        self.rx.extend(self.bytes.drain(..n));
        let mut out = Vec::new();
        while let Decoded::Complete {
            value: (_, msg),
            consumed,
        } = framer.decode_message(&self.rx).unwrap()
        {
            out.push(match msg {
                Message::Hello(h) => Message::Hello(h),
                Message::HelloAck(a) => Message::HelloAck(a),
                Message::Error(e) => Message::Error(e),
                other => panic!("unexpected {other:?}"),
            });
            self.rx.drain(..consumed);
        }
        out
    }
}

fn config(name: &str) -> HandshakeConfig {
    HandshakeConfig::new(
        SharedSecret::new(b"0123456789abcdef0123456789abcdef").unwrap(),
        SiteName::new(name).unwrap(),
    )
}

fn handshake(chunk: usize) -> (Established, Established) {
    let framer = Framer::default();
    let (mut init, hello) = Initiator::start(config("dc-east")).unwrap();
    let mut acc = Acceptor::new(config("dc-west")).unwrap();
    let (mut to_acc, mut to_init) = (Pipe::default(), Pipe::default());
    to_acc.send(&framer, &hello);
    let (mut ei, mut ea) = (None, None);
    for _ in 0..10_000 {
        for m in to_acc.recv(&framer, chunk) {
            let step = acc.handle(&m).unwrap();
            step.send.iter().for_each(|s| to_init.send(&framer, s));
            ea = ea.or(step.established);
        }
        for m in to_init.recv(&framer, chunk) {
            let step = init.handle(&m).unwrap();
            step.send.iter().for_each(|s| to_acc.send(&framer, s));
            ei = ei.or(step.established);
        }
        if ei.is_some() && ea.is_some() {
            break;
        }
    }
    (ei.unwrap(), ea.unwrap())
}

#[test]
fn handshake_over_a_chunked_stream() {
    for chunk in [1, 7, 31, 32, 33, 100, 4096] {
        let (ei, ea) = handshake(chunk);
        assert_eq!(ei.peer_name.as_str(), "dc-west");
        assert_eq!(ea.peer_name.as_str(), "dc-east");
        assert_eq!(ei.version, ea.version);
    }
}

#[test]
fn write_as_two_iovecs_received_into_a_pool_buffer() {
    let (established, _) = handshake(4096);
    let framer = Framer::default().with_version(established.version);
    let data = vec![0xc3u8; 64 * 1024];
    let msg = Message::Write(Write {
        mirror: MirrorId(5),
        seq: SeqNo(1),
        epoch: Epoch(1),
        flags: WriteFlags::FUA,
        offset: ByteOffset(1 << 20),
        data: &data,
    });
    let mut head = [0u8; 256];
    let enc = msg.encode(&framer, RequestTag(99), &mut head).unwrap();
    assert_eq!(enc.trailer.as_ptr(), data.as_ptr(), "payload not copied");

    // Receiver: read the headers first, then the payload into its own buffer.
    let wire: Vec<u8> = [&head[..enc.len], enc.trailer].concat();
    let hdr = match framer.decode_head(&wire[..enc.len]).unwrap() {
        Decoded::Complete { value, .. } => value,
        Decoded::NeedMore(n) => panic!("need {n}"),
    };
    let mut pool = vec![0u8; hdr.payload_len as usize];
    pool.copy_from_slice(&wire[enc.len..]);
    let frame = framer.decode_split(&wire[..enc.len], &pool).unwrap();
    let Message::Write(w) = frame.message(framer.limits()).unwrap() else {
        panic!("not a write")
    };
    assert_eq!(w.data.as_ptr(), pool.as_ptr(), "decoded in place");
    assert!(w.flags.contains(WriteFlags::FUA));

    let ack = Message::WriteAck(WriteAck {
        seq: w.seq,
        status: Status::Ok,
    });
    let bytes = ack.encode_to_vec(&framer, frame.header.tag).unwrap();
    match framer.decode_message(&bytes).unwrap() {
        Decoded::Complete {
            value: (tag, m), ..
        } => {
            assert_eq!(tag, RequestTag(99));
            assert_eq!(m, ack);
        }
        Decoded::NeedMore(n) => panic!("need {n}"),
    }
}

#[test]
fn fuzz_entry_point_is_public_and_total() {
    use mirrorpoint_target::mirror::wire::fuzz_decode;
    fuzz_decode(&[]);
    fuzz_decode(b"MPWR\x01\x00");
    fuzz_decode(&[0xff; 300]);
}
