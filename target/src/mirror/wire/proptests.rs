//! Property tests: arbitrary input never panics the decoders or the handshake,
//! generated valid messages round-trip, and a stream cut at arbitrary points
//! reassembles into the same frames.

use proptest::prelude::*;

use super::*;
use crate::units::{ByteLen, ByteOffset};

fn status() -> impl Strategy<Value = Status> {
    proptest::sample::select(Status::ALL)
}

fn nonzero_range() -> impl Strategy<Value = (u64, u64)> {
    (1u64..=u64::MAX).prop_flat_map(|len| (0..=u64::MAX - len, Just(len)))
}

/// Valid messages; bulk payloads are left empty and attached by [`attach`].
fn message() -> impl Strategy<Value = Message<'static>> {
    let ids = (any::<u64>(), any::<u64>(), any::<u32>());
    prop_oneof![
        (any::<[u8; 32]>(), "[a-z0-9._:-]{1,64}", 0u8..4, 0u8..4).prop_map(
            |(nonce, name, a, b)| {
                let (lo, hi) = (a.min(b), a.max(b));
                Message::Hello(Hello {
                    role: if a % 2 == 0 {
                        Role::Initiator
                    } else {
                        Role::Acceptor
                    },
                    versions: VersionRange::new(
                        ProtocolVersion::new(1, lo),
                        ProtocolVersion::new(1, hi),
                    )
                    .unwrap_or(VersionRange::CURRENT),
                    nonce,
                    name: SiteName::new(&name).unwrap_or_else(|_| SiteName::new("x").unwrap()),
                })
            }
        ),
        (any::<u8>(), any::<[u8; 32]>()).prop_map(|(minor, proof)| Message::HelloAck(HelloAck {
            version: ProtocolVersion::new(1, minor),
            proof
        })),
        (proptest::sample::select(ErrorCode::ALL), ".{0,200}").prop_map(|(code, text)| {
            let mut text: String = text;
            while text.len() > MAX_ERROR_TEXT {
                text.pop();
            }
            Message::Error(ErrorMsg { code, text })
        }),
        (ids, 0u32..4, 0..u64::MAX - DEFAULT_MAX_PAYLOAD as u64).prop_map(|((m, s, e), f, off)| {
            Message::Write(Write {
                mirror: MirrorId(m),
                seq: SeqNo(s),
                epoch: Epoch(e),
                flags: WriteFlags(f),
                offset: ByteOffset(off),
                data: &[],
            })
        }),
        (any::<u64>(), status()).prop_map(|(s, status)| Message::WriteAck(WriteAck {
            seq: SeqNo(s),
            status
        })),
        ids.prop_map(|(m, s, e)| Message::Flush(Flush {
            mirror: MirrorId(m),
            seq: SeqNo(s),
            epoch: Epoch(e)
        })),
        (any::<u64>(), status()).prop_map(|(s, status)| Message::FlushAck(FlushAck {
            seq: SeqNo(s),
            status
        })),
        (any::<u64>(), 1..=u64::from(DEFAULT_MAX_PAYLOAD)).prop_flat_map(|(m, len)| {
            (0..=u64::MAX - len).prop_map(move |off| {
                Message::Read(Read {
                    mirror: MirrorId(m),
                    offset: ByteOffset(off),
                    len: ByteLen(len),
                })
            })
        }),
        status().prop_map(|status| Message::ReadResp(ReadResp { status, data: &[] })),
        (ids, 0u32..8, nonzero_range()).prop_map(|((m, s, e), f, (off, len))| {
            Message::WriteZeroes(WriteZeroes {
                mirror: MirrorId(m),
                seq: SeqNo(s),
                epoch: Epoch(e),
                flags: WriteFlags(f),
                offset: ByteOffset(off),
                len: ByteLen(len),
            })
        }),
        (ids, nonzero_range()).prop_map(|((m, s, e), (off, len))| Message::Unmap(Unmap {
            mirror: MirrorId(m),
            seq: SeqNo(s),
            epoch: Epoch(e),
            offset: ByteOffset(off),
            len: ByteLen(len),
        })),
        (digest_range(), any::<bool>(), status()).prop_map(|(range, resp, status)| {
            if resp {
                Message::RangeDigestResp(RangeDigestResp {
                    range,
                    status,
                    digests: DigestList::default(),
                })
            } else {
                Message::RangeDigest(range)
            }
        }),
        ids.prop_map(|(m, s, e)| Message::SplitMarker(SplitMarker {
            mirror: MirrorId(m),
            epoch: Epoch(e),
            seq: SeqNo(s)
        })),
        (ids, 1u32..=4, any::<bool>(), 12u32..=30, "[a-z0-9_-]{0,40}").prop_map(
            |((m, s, e), op, writable, shift, name)| Message::SplitCtl(SplitCtl {
                mirror: MirrorId(m),
                leg: LegId(e ^ 5),
                op: SplitOp::from_wire(op).unwrap_or(SplitOp::Query),
                writable,
                epoch: Epoch(e),
                seq: SeqNo(s),
                region_size: 1 << shift,
                name,
            })
        ),
        (
            any::<u64>(),
            any::<u32>(),
            proptest::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(m, rs, bitmap)| Message::SplitCtlResp(SplitCtlResp {
                mirror: MirrorId(m),
                status: Status::Ok,
                region_size: rs,
                bitmap,
            })),
        (any::<u64>(), any::<u64>()).prop_map(|(c, t)| Message::Heartbeat(Heartbeat {
            counter: c,
            sent: Timestamp(t)
        })),
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(c, s, a, b)| {
            Message::HeartbeatAck(HeartbeatAck {
                counter: c,
                echo_sent: Timestamp(s),
                received: Timestamp(a.min(b)),
                replied: Timestamp(a.max(b)),
            })
        }),
        (
            any::<u32>(),
            any::<u64>(),
            proptest::collection::btree_map(
                any::<u32>(),
                (0u8..3, any::<u64>(), any::<u64>()),
                0..40
            )
        )
            .prop_map(|(d, t, servers)| {
                Message::CapacityReport(CapacityReport {
                    domain: DomainId(d),
                    reported_at: Timestamp(t),
                    servers: servers
                        .into_iter()
                        .map(|(id, (h, a, b))| ServerCapacity {
                            server: StorageServerId(id),
                            health: Health::from_wire(h).unwrap_or(Health::Healthy),
                            total: ByteLen(a.max(b)),
                            free: ByteLen(a.min(b)),
                        })
                        .collect(),
                })
            }),
        (any::<u64>(), 1..=u64::MAX, any::<u32>(), any::<u32>()).prop_map(|(m, size, d, l)| {
            Message::AllocateRequest(AllocateRequest {
                mirror: MirrorId(m),
                size: ByteLen(size),
                domain: DomainId(d),
                leg: LegId(l),
            })
        }),
        (
            any::<u64>(),
            proptest::collection::vec((0u32..4, 1u64..1 << 40, 0u64..1 << 40), 1..50)
        )
            .prop_map(|(m, pieces)| {
                // Lay extents out back to back, logically and per server.
                let mut logical = 0u64;
                let mut device_end = [0u64; 4];
                let extents = pieces
                    .into_iter()
                    .map(|(server, len, gap)| {
                        let e = Extent {
                            server: StorageServerId(server),
                            device_offset: ByteOffset(device_end[server as usize] + gap),
                            len: ByteLen(len),
                            logical_offset: ByteOffset(logical + gap),
                        };
                        device_end[server as usize] += gap + len;
                        logical += gap + len;
                        e
                    })
                    .collect();
                Message::AllocateResponse(AllocateResponse {
                    mirror: MirrorId(m),
                    status: Status::Ok,
                    extents,
                })
            }),
        (any::<u64>(), any::<u32>(), any::<u32>()).prop_map(|(m, d, l)| Message::ReleaseRequest(
            ReleaseRequest {
                mirror: MirrorId(m),
                domain: DomainId(d),
                leg: LegId(l),
            }
        )),
        (any::<u64>(), status()).prop_map(|(m, status)| Message::ReleaseAck(ReleaseAck {
            mirror: MirrorId(m),
            status
        })),
        (any::<[u64; 5]>(), any::<u32>(), 0u32..8).prop_map(|(g, leg, f)| {
            Message::GenerationExchange(GenerationExchange {
                mirror: MirrorId(g[0]),
                leg: LegId(leg),
                current: Generation(g[1]),
                bitmap: Generation(g[2]),
                history: [Generation(g[3]), Generation(g[4])],
                flags: GenerationFlags(f),
            })
        }),
    ]
}

fn digest_range() -> impl Strategy<Value = RangeDigest> {
    (any::<u64>(), 9u32..=30, 1u64..=4096).prop_flat_map(|(m, shift, regions)| {
        let region = 1u32 << shift;
        let max_len = regions * u64::from(region);
        (1..=max_len).prop_flat_map(move |len| {
            (0..=u64::MAX - len).prop_map(move |off| RangeDigest {
                mirror: MirrorId(m),
                offset: ByteOffset(off),
                len: ByteLen(len),
                region_size: region,
                algo: DigestAlgo::Sha256,
            })
        })
    })
}

/// Sizes the bulk buffer a generated message needs.
fn bulk_len(msg: &Message<'_>, data_len: usize) -> usize {
    match msg {
        Message::Write(_) => data_len.max(1),
        Message::ReadResp(r) if r.status == Status::Ok => data_len,
        Message::RangeDigestResp(r) if r.status == Status::Ok => {
            r.range.region_count() as usize * 32
        }
        _ => 0,
    }
}

/// Attaches a bulk buffer to a generated message.
fn attach<'a>(msg: &Message<'static>, bulk: &'a [u8]) -> Message<'a> {
    match msg {
        Message::Write(w) => Message::Write(Write { data: bulk, ..*w }),
        Message::ReadResp(r) => Message::ReadResp(ReadResp { data: bulk, ..*r }),
        Message::RangeDigestResp(r) => Message::RangeDigestResp(RangeDigestResp {
            digests: DigestList::from_packed(bulk).unwrap_or_default(),
            ..*r
        }),
        other => other.clone(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        fuzz_decode(&data);
    }

    #[test]
    fn arbitrary_bytes_behind_a_valid_prefix_never_panic(
        fixed in proptest::collection::vec(any::<u8>(), 28..29),
        rest in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut data = MAGIC.to_vec();
        data.extend_from_slice(&[1, 0]);
        data.extend_from_slice(&fixed[..22]);
        data.extend_from_slice(&rest);
        fuzz_decode(&data);
        let _ = Framer::default().decode(&data);
    }

    #[test]
    fn valid_messages_round_trip(
        msg in message(),
        data_len in 1usize..8192,
        tag in any::<u64>(),
        fill in any::<u8>(),
    ) {
        let bulk = vec![fill; bulk_len(&msg, data_len)];
        let msg = attach(&msg, &bulk);
        let framer = Framer::default();
        let bytes = msg.encode_to_vec(&framer, RequestTag(tag)).unwrap();
        prop_assert_eq!(bytes.len(), msg.encoded_len());
        match framer.decode_message(&bytes).unwrap() {
            Decoded::Complete { value: (t, back), consumed } => {
                prop_assert_eq!(t, RequestTag(tag));
                prop_assert_eq!(consumed, bytes.len());
                prop_assert_eq!(back, msg);
            }
            Decoded::NeedMore(n) => prop_assert!(false, "need {n} more"),
        }
        // Every truncation asks for more, never errors.
        for end in [0, 1, 31, 32, bytes.len() / 2, bytes.len() - 1] {
            prop_assert!(matches!(framer.decode(&bytes[..end]), Ok(Decoded::NeedMore(n)) if n > 0));
        }
    }

    #[test]
    fn single_bit_flips_are_errors(msg in message(), data_len in 1usize..512, bit in any::<usize>()) {
        let bulk = vec![0x33; bulk_len(&msg, data_len)];
        let msg = attach(&msg, &bulk);
        let mut bytes = msg.encode_to_vec(&Framer::default(), RequestTag(1)).unwrap();
        let bit = bit % (bytes.len() * 8);
        bytes[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(Framer::default().decode_message(&bytes).is_err());
    }

    #[test]
    fn a_stream_cut_anywhere_reassembles(
        msgs in proptest::collection::vec(message(), 1..6),
        cuts in proptest::collection::vec(1usize..200, 1..40),
    ) {
        let framer = Framer::default();
        let bulk = vec![0x44u8; 16384 * 32];
        let msgs: Vec<Message<'_>> = msgs
            .iter()
            .map(|m| attach(m, &bulk[..bulk_len(m, 100)]))
            .collect();
        let mut stream = Vec::new();
        for (i, m) in msgs.iter().enumerate() {
            stream.extend_from_slice(&m.encode_to_vec(&framer, RequestTag(i as u64)).unwrap());
        }
        // A receive buffer filled in arbitrary chunk sizes.
        let mut rx: Vec<u8> = Vec::new();
        let mut sent = 0;
        let mut got = Vec::new();
        let mut cut = cuts.iter().cycle();
        while got.len() < msgs.len() {
            let n = (*cut.next().unwrap()).min(stream.len() - sent);
            rx.extend_from_slice(&stream[sent..sent + n]);
            sent += n;
            loop {
                match framer.decode_message(&rx).unwrap() {
                    Decoded::NeedMore(need) => {
                        prop_assert!(need > 0 && (sent < stream.len() || got.len() == msgs.len()));
                        break;
                    }
                    Decoded::Complete { value: (tag, m), consumed } => {
                        got.push((tag, format!("{m:?}")));
                        rx.drain(..consumed);
                    }
                }
            }
        }
        for (i, (tag, m)) in got.iter().enumerate() {
            prop_assert_eq!(*tag, RequestTag(i as u64));
            prop_assert_eq!(m, &format!("{:?}", msgs[i]));
        }
    }

    #[test]
    fn handshake_succeeds_iff_secrets_match(
        s1 in proptest::collection::vec(any::<u8>(), 16..64),
        s2 in proptest::collection::vec(any::<u8>(), 16..64),
        same in any::<bool>(),
    ) {
        let s2 = if same { s1.clone() } else { s2 };
        let ci = HandshakeConfig::new(SharedSecret::new(&s1).unwrap(), SiteName::new("a").unwrap());
        let ca = HandshakeConfig::new(SharedSecret::new(&s2).unwrap(), SiteName::new("b").unwrap());
        let (mut i, hello) = Initiator::start(ci).unwrap();
        let mut a = Acceptor::new(ca).unwrap();
        let to_i = a.handle(&hello).unwrap().send;
        let proof_i = i.handle(&to_i[0]).unwrap().send;
        let ri = i.handle(&to_i[1]);
        let ra = a.handle(&proof_i[0]);
        if s1 == s2 {
            prop_assert!(ri.unwrap().established.is_some());
            prop_assert!(ra.unwrap().established.is_some());
        } else {
            prop_assert_eq!(ri, Err(HandshakeError::AuthFailed));
            prop_assert_eq!(ra, Err(HandshakeError::AuthFailed));
        }
    }
}
