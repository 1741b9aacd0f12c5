//! The rewriter that masks a WebSocket upstream's text messages on their way to the client
//! (`custos_edge::http::tunnel::Downstream`).
//!
//! Input: raw bytes at a fuzzer-chosen chunking, or (generated) server messages the fuzzer
//! chooses: text or binary, payload, how many frames, a ping inside, and a planted AWS key id.
//!
//! Properties:
//! - no panic, on any bytes and any chunking;
//! - what comes out always reads back as server frames (a valid stream, or a prefix of one);
//! - the messages that come out, and the error, do not depend on the chunking (a message may be
//!   fragmented differently);
//! - generated messages come out as sent, except text, which comes out as `mask_text` of its
//!   text (a planted AWS key id among the bytes, so that masking has work; whether `mask_text`
//!   finds every planted value is the `mask_text` target's property).
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use custos_core::mask::{MaskConfig, Masker, Stats};
use custos_core::ws::{encode_frame, Kind, Message, Reader};
use custos_edge::http::tunnel::Downstream;
use custos_fuzz::chunks;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

const KEY: &str = "AKIAIOSFODNN7EXAMPLE";

#[derive(Arbitrary, Debug)]
struct Gen {
    text: bool,
    payload: Vec<u8>,
    /// Where the key is planted in the payload, if anywhere.
    plant: Option<u8>,
    parts: u8,
    ping_after: Option<u8>,
}

fn masker() -> &'static Masker {
    static M: OnceLock<Masker> = OnceLock::new();
    M.get_or_init(|| Masker::new(&MaskConfig::default()).expect("default masking config"))
}

/// Rewrite `bytes` fed in `sizes` pieces; the messages read back from the output, and the error.
fn rewrite(bytes: &[u8], sizes: &[u8]) -> (Vec<Message>, Option<String>) {
    let mut d = Downstream::new(masker().scope("fuzz", &[]).stream());
    let mut out = Vec::new();
    let mut err = None;
    for piece in chunks(bytes, sizes) {
        if let Err(e) = d.feed(piece, &mut out) {
            err = Some(e);
            break;
        }
    }
    let mut r = Reader::new(1 << 20);
    let mut msgs = Vec::new();
    r.feed(&out, &mut msgs)
        .expect("what the rewriter sends reads back as server frames");
    for m in &mut msgs {
        m.frames = 0; // re-fragmented as the masker releases text
    }
    (msgs, err)
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(sizes) = <Vec<u8>>::arbitrary(&mut u) else {
        return;
    };
    let generated = u.arbitrary::<bool>().unwrap_or(false);
    if !generated {
        let raw = u.take_rest();
        let whole = rewrite(raw, &[]);
        let cut = rewrite(raw, &sizes);
        assert_eq!(whole, cut, "the chunking changed what was sent");
        return;
    }
    let Ok(msgs) = <Vec<Gen>>::arbitrary(&mut u) else {
        return;
    };
    let mut bytes = Vec::new();
    let mut want = Vec::new();
    for g in msgs.iter().take(16) {
        let mut payload = g.payload.clone();
        if let Some(at) = g.plant {
            let at = usize::from(at).min(payload.len());
            // Spaces around it, so that it stands as a key whatever the bytes beside it.
            let key = format!(" {KEY} ");
            payload.splice(at..at, key.bytes());
        }
        let parts = usize::from(g.parts % 6).clamp(1, payload.len().max(1));
        let step = payload.len().div_ceil(parts).max(1);
        let mut frames: Vec<&[u8]> = payload.chunks(step).collect();
        if frames.is_empty() {
            frames.push(&[]);
        }
        let op = if g.text { 1 } else { 2 };
        for (i, f) in frames.iter().enumerate() {
            encode_frame(
                &mut bytes,
                i + 1 == frames.len(),
                if i == 0 { op } else { 0 },
                None,
                f,
            );
            if i + 1 < frames.len() && g.ping_after == Some(i as u8) {
                encode_frame(&mut bytes, true, 9, None, b"inside");
                want.push(Message {
                    kind: Kind::Ping,
                    len: 6,
                    data: b"inside".to_vec(),
                    frames: 0,
                });
            }
        }
        let data = if g.text {
            let text = String::from_utf8_lossy(&payload);
            let masked = masker()
                .mask_text(&text, &mut Stats::default())
                .into_owned();
            masked.into_bytes()
        } else {
            payload.clone()
        };
        want.push(Message {
            kind: if g.text { Kind::Text } else { Kind::Binary },
            len: data.len() as u64,
            data,
            frames: 0,
        });
    }
    let (got, err) = rewrite(&bytes, &sizes);
    assert_eq!(err, None);
    assert_eq!(got, want);
});
