//! The passive WebSocket frame reader (`custos_core::ws::Reader`) the HTTP edge uses to transcribe
//! upgraded connections.
//!
//! Input: raw bytes fed at a fuzzer-chosen chunking, or (generated) messages the fuzzer chooses:
//! kind, payload, how many frames a data message is split into, an optional client masking key,
//! with control frames interleaved inside fragmented messages.
//!
//! Properties:
//! - no panic, on any bytes and any chunking;
//! - nothing kept beyond `keep` bytes of a message, nor beyond its length;
//! - the messages and the error do not depend on the chunking;
//! - once failed, every later feed returns the same error and completes no message;
//! - generated frames read back as exactly the messages encoded (kind, length, the first `keep`
//!   payload bytes unmasked, frame count), whatever the chunking.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use custos_core::ws::{encode_frame, FrameError, Kind, Message, Reader};
use custos_fuzz::chunks;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Gen {
    kind: u8,
    payload: Vec<u8>,
    parts: u8,
    mask: Option<[u8; 4]>,
    /// A ping sent after this many frames of a fragmented message (if within it).
    ping_after: Option<u8>,
}

fn kind(k: u8) -> Kind {
    match k % 5 {
        0 => Kind::Text,
        1 => Kind::Binary,
        2 => Kind::Close,
        3 => Kind::Ping,
        _ => Kind::Pong,
    }
}

fn read(bytes: &[u8], sizes: &[u8], keep: usize) -> (Vec<Message>, Result<(), FrameError>) {
    let mut r = Reader::new(keep);
    let mut out = Vec::new();
    let mut res: Result<(), FrameError> = Ok(());
    for piece in chunks(bytes, sizes) {
        let before = out.len();
        let now = r.feed(piece, &mut out);
        if let Err(e) = &res {
            assert_eq!(&now, &Err(e.clone()), "a failed reader stays failed");
            assert_eq!(out.len(), before, "a failed reader completes nothing");
        }
        res = now;
    }
    for m in &out {
        assert!(
            m.data.len() <= keep && m.data.len() as u64 <= m.len,
            "{m:?}"
        );
    }
    (out, res)
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(keep) = u.int_in_range(0u16..=512) else {
        return;
    };
    let keep = keep as usize;
    let Ok(sizes) = <Vec<u8>>::arbitrary(&mut u) else {
        return;
    };
    let generated = u.arbitrary::<bool>().unwrap_or(false);
    if !generated {
        let raw = u.take_rest();
        let whole = read(raw, &[], keep);
        let cut = read(raw, &sizes, keep);
        assert_eq!(whole, cut, "the chunking changed what was read");
        return;
    }
    let Ok(msgs) = <Vec<Gen>>::arbitrary(&mut u) else {
        return;
    };
    let mut bytes = Vec::new();
    let mut want = Vec::new();
    for g in msgs.iter().take(32) {
        let k = kind(g.kind);
        let control = matches!(k, Kind::Close | Kind::Ping | Kind::Pong);
        let payload = if control {
            &g.payload[..g.payload.len().min(125)]
        } else {
            &g.payload[..]
        };
        let parts = if control {
            1
        } else {
            usize::from(g.parts % 6).clamp(1, payload.len().max(1))
        };
        let step = payload.len().div_ceil(parts).max(1);
        let mut frames: Vec<&[u8]> = payload.chunks(step).collect();
        if frames.is_empty() {
            frames.push(&[]);
        }
        let mut ping = None;
        for (i, f) in frames.iter().enumerate() {
            let op = if i == 0 { k.opcode() } else { 0 };
            encode_frame(&mut bytes, i + 1 == frames.len(), op, g.mask, f);
            if !control && i + 1 < frames.len() && g.ping_after == Some(i as u8) {
                encode_frame(&mut bytes, true, Kind::Ping.opcode(), g.mask, b"inside");
                ping = Some(Message {
                    kind: Kind::Ping,
                    len: 6,
                    data: b"inside"[..keep.min(6)].to_vec(),
                    frames: 1,
                });
            }
        }
        // A control frame inside a message completes before it.
        want.extend(ping);
        want.push(Message {
            kind: k,
            len: payload.len() as u64,
            data: payload[..payload.len().min(keep)].to_vec(),
            frames: frames.len() as u32,
        });
    }
    let (got, res) = read(&bytes, &sizes, keep);
    assert_eq!(res, Ok(()));
    assert_eq!(got, want);
});
