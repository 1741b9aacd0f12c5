//! The server-sent-events masker (`custos_core::mask::SseMasker`), both modes, with a
//! fuzzer-chosen chunking.
//!
//! Input: the raw bytes as the stream, or (LlmDeltas) a stream generated from fuzzer choices: OpenAI chat deltas
//! over three choices, Anthropic `content_block_delta`s over three blocks, OpenAI Responses
//! `output_text.delta`s over four parts, their end events, `[DONE]`, pings and other JSON events;
//! delta texts are fuzzer text or realistic secrets from `mask::corpus`, whole or split in two
//! across consecutive events.
//!
//! Properties:
//! - no panic; `pending()` is 0 after `finish`;
//! - hold-back, after every push: `Text` mode holds at most `max_holdback()` plus the bytes of the
//!   current event's non-`data` lines (they are deferred while masked data is held) plus 16
//!   (the undecided field name of the line in flight, at most `data:` and one byte; a partial
//!   UTF-8 character, at most 3; a partial byte-order mark, at most 3). `LlmDeltas` holds at most
//!   the current event (held whole until its blank line, at most 1 MiB) plus `max_holdback()` for
//!   each delta stream still open (the generated streams know how many are open; for raw input
//!   the bound is what was received);
//! - `Text`: what a client reads is masked exactly: each event's payload (its `data` lines joined
//!   by `\n`, as `EventSource` assembles it) equals `mask_text` of the input event's payload;
//! - `LlmDeltas`: the output does not depend on the chunking, and for generated streams each
//!   delta stream's text as a client concatenates it (per choice / block / part, up to its end
//!   event) equals `mask_text` of the concatenated input deltas — a secret split across events
//!   is still masked.
#![no_main]

use std::collections::BTreeMap;

use arbitrary::{Arbitrary, Unstructured};
use custos_core::mask::corpus::{self, Style};
use custos_core::mask::{Detector, SseMasker, SseMode, Stats};
use custos_fuzz::{chunks, masker, sse_payloads};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

#[derive(Arbitrary, Debug)]
enum Piece {
    Plain(String),
    Secret(u8, u8),
    /// The first or second half of a secret.
    Half(u8, u8, bool),
}

#[derive(Arbitrary, Debug)]
enum Ev {
    Chat {
        choice: u8,
        piece: Piece,
        finish: bool,
    },
    Anth {
        index: u8,
        piece: Piece,
    },
    AnthStop {
        index: u8,
    },
    Resp {
        out: u8,
        part: u8,
        piece: Piece,
    },
    RespDone {
        out: u8,
        part: u8,
    },
    Ping,
    Done,
    Other(String),
}

fn piece_text(p: &Piece) -> String {
    let secret = |d: u8, seed: u8| {
        let kind = Detector::ALL[usize::from(d) % Detector::ALL.len()];
        let s = corpus::sample(kind, u64::from(seed), Style::Log);
        let first = s.secrets().next().unwrap_or(&s.text).to_string();
        first
    };
    match p {
        Piece::Plain(s) => s.clone(),
        Piece::Secret(d, seed) => secret(*d, *seed),
        Piece::Half(d, seed, first) => {
            let s = secret(*d, *seed);
            let mut mid = s.len() / 2;
            while !s.is_char_boundary(mid) {
                mid -= 1;
            }
            if *first {
                s[..mid].to_string()
            } else {
                s[mid..].to_string()
            }
        }
    }
}

fn render(evs: &[Ev], crlf: bool) -> Vec<u8> {
    let nl = if crlf { "\r\n" } else { "\n" };
    let mut buf = String::new();
    let event = |buf: &mut String, name: Option<&str>, data: String| {
        if let Some(n) = name {
            buf.push_str(&format!("event: {n}{nl}"));
        }
        buf.push_str(&format!("data: {data}{nl}{nl}"));
    };
    for e in evs {
        match e {
            Ev::Chat {
                choice,
                piece,
                finish,
            } => {
                let v = json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "m",
                    "choices": [{"index": choice % 3, "delta": {"content": piece_text(piece)},
                    "finish_reason": if *finish { Value::from("stop") } else { Value::Null }}]});
                event(&mut buf, None, v.to_string());
            }
            Ev::Anth { index, piece } => {
                let v = json!({"type": "content_block_delta", "index": index % 3,
                    "delta": {"type": "text_delta", "text": piece_text(piece)}});
                event(&mut buf, Some("content_block_delta"), v.to_string());
            }
            Ev::AnthStop { index } => {
                let v = json!({"type": "content_block_stop", "index": index % 3});
                event(&mut buf, Some("content_block_stop"), v.to_string());
            }
            Ev::Resp { out, part, piece } => {
                let v = json!({"type": "response.output_text.delta", "item_id": "msg_1",
                    "output_index": out % 2, "content_index": part % 2, "delta": piece_text(piece)});
                event(&mut buf, Some("response.output_text.delta"), v.to_string());
            }
            Ev::RespDone { out, part } => {
                let v = json!({"type": "response.output_text.done", "item_id": "msg_1",
                    "output_index": out % 2, "content_index": part % 2, "text": ""});
                event(&mut buf, Some("response.output_text.done"), v.to_string());
            }
            Ev::Ping => buf.push_str(&format!(": ping{nl}{nl}")),
            Ev::Done => event(&mut buf, None, "[DONE]".to_string()),
            Ev::Other(s) => event(
                &mut buf,
                None,
                json!({"type": "ping", "note": s}).to_string(),
            ),
        }
    }
    buf.into_bytes()
}

/// Delta streams as a client assembles them: per key, the texts of its segments (a segment ends
/// with the key's end event), in order.
#[derive(Default, Debug)]
struct Streams {
    open: BTreeMap<String, String>,
    closed: BTreeMap<String, Vec<String>>,
}

impl Streams {
    fn add(&mut self, key: String, text: &str) {
        self.open.entry(key).or_default().push_str(text);
    }

    fn end(&mut self, covers: impl Fn(&str) -> bool) {
        let keys: Vec<String> = self.open.keys().filter(|k| covers(k)).cloned().collect();
        for k in keys {
            let t = self.open.remove(&k).unwrap();
            self.closed.entry(k).or_default().push(t);
        }
    }

    /// One event payload.
    fn event(&mut self, payload: &str) {
        if payload.trim() == "[DONE]" {
            return self.end(|_| true);
        }
        let Ok(v) = serde_json::from_str::<Value>(payload) else {
            return;
        };
        if let Some(chs) = v.get("choices").and_then(Value::as_array) {
            for c in chs {
                let idx = c["index"].as_u64().unwrap_or(0);
                if let Some(t) = c.pointer("/delta/content").and_then(Value::as_str) {
                    self.add(format!("chat|{idx}"), t);
                }
                if !c["finish_reason"].is_null() {
                    self.end(|k| k == format!("chat|{idx}"));
                }
            }
            return;
        }
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        match v["type"].as_str() {
            Some("content_block_delta") => {
                if let Some(t) = v.pointer("/delta/text").and_then(Value::as_str) {
                    self.add(format!("anth|{}", n("index")), t);
                }
            }
            Some("content_block_stop") => {
                let key = format!("anth|{}", n("index"));
                self.end(|k| k == key);
            }
            Some("response.output_text.delta") => {
                if let Some(t) = v["delta"].as_str() {
                    self.add(
                        format!("resp|{}|{}", n("output_index"), n("content_index")),
                        t,
                    );
                }
            }
            Some("response.output_text.done") => {
                let key = format!("resp|{}|{}", n("output_index"), n("content_index"));
                self.end(|k| k == key);
            }
            _ => {}
        }
    }

    fn of(stream: &[u8]) -> Streams {
        let mut s = Streams::default();
        for p in sse_payloads(stream, true) {
            s.event(&p);
        }
        s.end(|_| true);
        s
    }
}

/// Bytes of the current event (after the last blank line) in `input`, and of those the bytes
/// of lines that are not `data` lines (the line in flight counts unless it starts `data:`).
fn current_event(input: &[u8]) -> (usize, usize) {
    let s = input.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(input);
    // A final `\r` may be the first half of `\r\n`: the masker has not ended that line yet.
    let s = s.strip_suffix(b"\r").unwrap_or(s);
    let mut lines = Vec::new(); // (start, end of content, end with terminator)
    let mut i = 0;
    while i < s.len() {
        let Some(k) = s[i..].iter().position(|&c| c == b'\n' || c == b'\r') else {
            lines.push((i, s.len(), s.len(), false));
            break;
        };
        let end = i + k;
        let next = if s[end] == b'\r' && s.get(end + 1) == Some(&b'\n') {
            end + 2
        } else {
            end + 1
        };
        lines.push((i, end, next, true));
        i = next;
    }
    let from = lines
        .iter()
        .rposition(|&(a, b, _, done)| done && a == b)
        .map_or(0, |p| p + 1);
    let mut total = 0;
    let mut other = 0;
    for &(a, b, next, done) in &lines[from..] {
        total += next - a;
        let line = &s[a..b];
        let name = &line[..line.iter().position(|&c| c == b':').unwrap_or(line.len())];
        let data = if done {
            name == b"data"
        } else {
            line.starts_with(b"data:")
        };
        if !data {
            other += next - a;
        }
    }
    (total, other)
}

fn run(
    mode: SseMode,
    body: &[u8],
    sizes: &[u8],
    open_keys: Option<&dyn Fn(usize) -> usize>,
) -> Vec<u8> {
    let m = masker();
    let hold = m.max_holdback();
    let mut sm = SseMasker::new(m.audit_scope(), mode);
    let mut stats = Stats::default();
    let mut out = Vec::new();
    let mut seen = 0;
    for c in chunks(body, sizes) {
        out.extend(sm.push(c, &mut stats));
        seen += c.len();
        let (event, other) = current_event(&body[..seen]);
        let bound = match (mode, open_keys) {
            (SseMode::Text, _) => hold + other + 16,
            (SseMode::LlmDeltas, Some(open)) => event + hold * open(seen) + 16,
            (SseMode::LlmDeltas, None) => seen + 16,
        };
        assert!(
            sm.pending() <= bound,
            "{mode:?}: pending {} > {bound} after {seen} bytes (event {event}, other {other})",
            sm.pending()
        );
    }
    out.extend(sm.finish(&mut stats));
    assert_eq!(sm.pending(), 0, "pending after finish");
    out
}

/// Steering, read from the input's last bytes (the stream is the whole input, so hand-written
/// seeds are plain event streams).
#[derive(Arbitrary, Debug)]
struct Control {
    /// Bit 0: LlmDeltas (else Text). Bit 1: generate events from the whole input. Bit 2: CRLF.
    flags: u8,
    sizes: Vec<u8>,
}

/// Bytes at the end of the input that also steer the run.
const CONTROL: usize = 16;

fuzz_target!(|data: &[u8]| {
    let tail = &data[data.len().saturating_sub(CONTROL)..];
    let Ok(control) = Control::arbitrary(&mut Unstructured::new(tail)) else {
        return;
    };
    let llm = control.flags & 1 == 1;
    let crlf = control.flags & 4 != 0;
    let events = if llm && control.flags & 2 != 0 {
        match Vec::<Ev>::arbitrary(&mut Unstructured::new(data)) {
            Ok(e) => Some(e),
            Err(_) => return,
        }
    } else {
        None
    };
    let sizes = &control.sizes;
    let m = masker();
    let mask = |s: &str| m.mask_text(s, &mut Stats::default()).into_owned();
    match (&events, llm) {
        (Some(evs), _) => {
            let body = render(evs, crlf);
            // Open delta streams after each byte count: the model's view at each event end.
            let mut ends = Vec::new(); // (byte offset after the event, open streams)
            let mut model = Streams::default();
            let mut at = 0;
            for e in evs {
                let one = render(std::slice::from_ref(e), crlf);
                at += one.len();
                for p in sse_payloads(&one, true) {
                    model.event(&p);
                }
                ends.push((at, model.open.len()));
            }
            let open = |seen: usize| {
                // Streams open before the event in flight, plus those it may open (at most 1).
                let before = ends
                    .iter()
                    .rev()
                    .find(|(a, _)| *a <= seen)
                    .map_or(0, |e| e.1);
                before + 1
            };
            let out = run(SseMode::LlmDeltas, &body, sizes, Some(&open));
            let whole = run(SseMode::LlmDeltas, &body, &[], Some(&open));
            assert!(
                out == whole,
                "LlmDeltas output depends on the chunking:\n chunked: {:?}\n whole:   {:?}",
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&whole)
            );
            let sent = Streams::of(&body);
            let got = Streams::of(&out);
            for (key, segs) in &sent.closed {
                let want: Vec<String> = segs.iter().map(|s| mask(s)).collect();
                let have = got.closed.get(key).cloned().unwrap_or_default();
                // A segment whose text was all held and is empty needs no event of its own.
                let have: Vec<String> = have.into_iter().filter(|s| !s.is_empty()).collect();
                let want: Vec<String> = want.into_iter().filter(|s| !s.is_empty()).collect();
                assert_eq!(
                    have,
                    want,
                    "delta stream {key}; output: {:?}",
                    String::from_utf8_lossy(&out)
                );
            }
        }
        (None, true) => {
            let out = run(SseMode::LlmDeltas, data, sizes, None);
            let whole = run(SseMode::LlmDeltas, data, &[], None);
            assert!(
                out == whole,
                "LlmDeltas output depends on the chunking:\n chunked: {:?}\n whole:   {:?}",
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&whole)
            );
        }
        (None, false) => {
            let out = run(SseMode::Text, data, sizes, None);
            let want: Vec<String> = sse_payloads(data, true).iter().map(|p| mask(p)).collect();
            let got = sse_payloads(&out, true);
            assert_eq!(
                got,
                want,
                "client-visible payloads differ from mask_text; output: {:?}",
                String::from_utf8_lossy(&out)
            );
        }
    }
});
