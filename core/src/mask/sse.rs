//! Streaming masking of `text/event-stream` bodies (server-sent events), generic and LLM.
//!
//! ```text
//!  bytes ─▶ lines (\n, \r\n, \r; split anywhere) ─▶ events (a blank line ends one)
//!    SseMode::Text       data: payload of each event ─▶ StreamMasker ─▶ data: lines again
//!    SseMode::LlmDeltas  event JSON ─▶ delta text of each stream key ─▶ one StreamMasker per key
//!                                   └▶ other string fields ─▶ detectors (as JsonMasker does)
//! ```
//!
//! **Text.** The `data:` lines of an event are one payload (joined by `\n`, as a client joins
//! them); it goes through a [`StreamMasker`] as it arrives and is written back as `data:` lines
//! with the original prefixes and line ends, so an unmasked stream is byte-identical. Comments
//! (`: ping`), `event:`, `id:`, `retry:` and unknown fields pass through; one that arrives while
//! masked data of the same event is still held is moved to the end of that event (field order
//! within an event does not matter to a client).
//!
//! **LlmDeltas.** Each event is held until its blank line (LLM events are small; an event over
//! 1 MiB is masked as text instead). Delta text is found at `choices[i].delta.content` (also
//! `reasoning_content`, `reasoning`, `refusal`, `tool_calls[j].function.arguments`, and legacy
//! `choices[i].text`), at `delta` of OpenAI Responses `*.delta` events, and at
//! `delta.text` / `delta.partial_json` / `delta.thinking` of Anthropic `content_block_delta`.
//! Each stream key (choice and field, output item and part, content block) has its own
//! [`StreamMasker`], fed with the deltas in order: the event carries what the masker released,
//! possibly an empty string, so a secret split across events or tokens is still masked and the
//! client's concatenation equals `mask_text` of the whole text. A key ends with a non-null
//! `finish_reason`, `[DONE]`, its `*.done` event, `response.completed`/`incomplete`/`failed`,
//! `content_block_stop`, `message_stop`, or [`SseMasker::finish`]: the held text goes into that
//! event's delta if it has one, or into a synthesized delta event just before it (built from the
//! key's last delta event). Other string fields of a delta event are masked as
//! [`super::JsonMasker`] masks values; a changed event is re-serialized with `serde_json`, an
//! unchanged one keeps its bytes. The common chat-completions event (one choice, a plain
//! `delta.content`) takes a byte-level path instead ([`fast`]): the same masking, with the
//! released text and masked values spliced into the original bytes. An event whose bytes a
//! strict lexer cannot vouch for (duplicate or escaped member names, exponents, deep nesting) is
//! always re-serialized, so a string `serde_json` drops (a shadowed duplicate member) is never
//! sent unmasked. JSON events without deltas go through a `JsonMasker` (bytes kept unless
//! something matched); non-JSON `data:` is masked as text (the `Text` behaviour).
//! At most 256 delta streams are open at once (the oldest is ended beyond that).

use std::collections::VecDeque;
use std::sync::Arc;

use serde_json::Value;

use super::json_stream::{label_key, lossy_prefix, mask_string, JsonMasker};
use super::{Inner, Scope, Stats, StreamMasker};

mod fast;

/// An LLM event larger than this is masked as text instead of being held whole.
const EVENT_CAP: usize = 1 << 20;
const BOM: &[u8] = b"\xEF\xBB\xBF";
/// Most delta streams open at once; the oldest is ended (its held text sent) beyond this.
const MAX_STREAMS: usize = 256;
/// Strings remembered as clean (see [`mask_strings`]).
const CLEAN_CACHE: usize = 16;

/// How the `data:` payloads of an event stream are masked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SseMode {
    /// Mask the `data:` payload of each event as text (generic SSE).
    Text,
    /// OpenAI chat-completions / responses / Anthropic messages streaming: `data:` is JSON whose
    /// delta text is split across events. Mask the *concatenation* of the delta texts per
    /// choice/content-block, so a secret split across two events (or two delta tokens) is still
    /// masked.
    LlmDeltas,
}

// ---------------------------------------------------------------------------------------------
// Text events

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LineKind {
    /// The field is not known yet (`head` collects the line).
    Start,
    Data,
    /// Passed through now.
    Pass,
    /// Passed through at the end of the event (masked data of this event is still held).
    Defer,
}

#[derive(Debug)]
struct Framing {
    prefix: Vec<u8>,
    term: Vec<u8>,
    ended: bool,
}

/// Text-mode event processing: fed line pieces and line ends.
struct TextEvents {
    sm: StreamMasker,
    utf8: Vec<u8>,
    head: Vec<u8>,
    kind: LineKind,
    data_lines: usize,
    /// The data lines whose output line is not closed yet, oldest first.
    q: VecDeque<Framing>,
    /// The prefix of `q.front()` is written.
    open: bool,
    deferred: Vec<u8>,
}

impl TextEvents {
    fn new(sm: StreamMasker) -> TextEvents {
        TextEvents {
            sm,
            utf8: Vec::new(),
            head: Vec::new(),
            kind: LineKind::Start,
            data_lines: 0,
            q: VecDeque::new(),
            open: false,
            deferred: Vec::new(),
        }
    }

    fn pending(&self) -> usize {
        self.sm.pending() + self.utf8.len() + self.head.len() + self.deferred.len()
    }

    fn pass_kind(&self) -> LineKind {
        if self.q.is_empty() && !self.open {
            LineKind::Pass
        } else {
            LineKind::Defer
        }
    }

    /// Bytes of the current line (no line end in them).
    fn bytes(&mut self, b: &[u8], out: &mut Vec<u8>, stats: &mut Stats) {
        match self.kind {
            LineKind::Data => self.data(b, out, stats),
            LineKind::Pass => out.extend_from_slice(b),
            LineKind::Defer => self.deferred.extend_from_slice(b),
            LineKind::Start => {
                self.head.extend_from_slice(b);
                self.decide(false, out, stats);
            }
        }
    }

    /// Decide the kind of the line in `head` if its bytes allow (`end`: the line ended).
    fn decide(&mut self, end: bool, out: &mut Vec<u8>, stats: &mut Stats) {
        let h = &self.head;
        let colon = h.iter().position(|&c| c == b':');
        let name = &h[..colon.unwrap_or(h.len())];
        let is_data = name == b"data";
        if is_data {
            let plen = match colon {
                None if end => 4,
                None => return,
                Some(c) => match h.get(c + 1) {
                    Some(b' ') => c + 2,
                    Some(_) => c + 1,
                    None if end => c + 1,
                    None => return,
                },
            };
            let head = std::mem::take(&mut self.head);
            self.start_data(&head[..plen], out, stats);
            self.kind = LineKind::Data;
            self.data(&head[plen..], out, stats);
            self.head = head;
            self.head.clear();
        } else if colon.is_some() || end || !b"data".starts_with(name) {
            self.kind = self.pass_kind();
            let head = std::mem::take(&mut self.head);
            if self.kind == LineKind::Pass {
                out.extend_from_slice(&head);
            } else {
                self.deferred.extend_from_slice(&head);
            }
            self.head = head;
            self.head.clear();
        }
    }

    fn start_data(&mut self, prefix: &[u8], out: &mut Vec<u8>, stats: &mut Stats) {
        if self.data_lines > 0 {
            let rel = self.sm.push("\n", stats);
            self.write(&rel, out);
        }
        self.data_lines += 1;
        self.q.push_back(Framing {
            prefix: prefix.to_vec(),
            term: Vec::new(),
            ended: false,
        });
    }

    fn data(&mut self, b: &[u8], out: &mut Vec<u8>, stats: &mut Stats) {
        if b.is_empty() {
            return;
        }
        let (s, used) = if self.utf8.is_empty() {
            let (s, used) = lossy_prefix(b);
            self.utf8.extend_from_slice(&b[used..]);
            (s, 0)
        } else {
            self.utf8.extend_from_slice(b);
            lossy_prefix(&self.utf8)
        };
        self.utf8.drain(..used);
        let rel = self.sm.push(&s, stats);
        self.write(&rel, out);
    }

    /// The current line ended with `term` (empty at the end of the stream).
    fn line_end(&mut self, term: &[u8], out: &mut Vec<u8>, stats: &mut Stats) {
        if self.kind == LineKind::Start {
            if self.head.is_empty() {
                self.event_end(term, out, stats);
                return;
            }
            self.decide(true, out, stats);
        }
        match self.kind {
            LineKind::Data => {
                if !self.utf8.is_empty() {
                    let rest = String::from_utf8_lossy(&self.utf8).into_owned();
                    self.utf8.clear();
                    let rel = self.sm.push(&rest, stats);
                    self.write(&rel, out);
                }
                if let Some(f) = self.q.back_mut() {
                    f.term = term.to_vec();
                    f.ended = true;
                }
            }
            LineKind::Pass => out.extend_from_slice(term),
            LineKind::Defer => self.deferred.extend_from_slice(term),
            LineKind::Start => {}
        }
        self.kind = LineKind::Start;
    }

    /// A blank line (`term`) ends the event: release everything.
    fn event_end(&mut self, term: &[u8], out: &mut Vec<u8>, stats: &mut Stats) {
        let before = out.len();
        self.close_event(out, stats);
        // What the event wrote last may end with a lone `\r` that the input did not have right
        // before this blank line (a deferred line, or the line end of a data line that took the
        // place of lines a replacement joined): followed by a `\n` it would read as one `\r\n`,
        // and the blank line that ends the event would be lost.
        if out.len() > before && out.last() == Some(&b'\r') && term.first() == Some(&b'\n') {
            out.push(b'\n');
        }
        out.extend_from_slice(term);
    }

    fn close_event(&mut self, out: &mut Vec<u8>, stats: &mut Stats) {
        if self.data_lines > 0 {
            let rest = self.sm.finish(stats);
            self.write(&rest, out);
            if let Some(f) = self.q.pop_front() {
                if !self.open {
                    out.extend_from_slice(&f.prefix);
                }
                out.extend_from_slice(&f.term);
                // The stream ended inside this line: end it before the deferred lines, or the
                // first of them would be read as the rest of the data line.
                if f.term.is_empty() && !self.deferred.is_empty() {
                    out.push(b'\n');
                }
            }
            // Lines whose line break a replacement swallowed have no output line of their own.
            self.q.clear();
            self.open = false;
        }
        out.append(&mut self.deferred);
        self.data_lines = 0;
        self.kind = LineKind::Start;
        self.head.clear();
    }

    /// End of stream inside a line or an event.
    fn finish(&mut self, out: &mut Vec<u8>, stats: &mut Stats) {
        if self.kind != LineKind::Start || !self.head.is_empty() {
            self.line_end(b"", out, stats);
        }
        self.close_event(out, stats);
    }

    /// Write released payload text as data lines.
    fn write(&mut self, text: &str, out: &mut Vec<u8>) {
        for (k, piece) in text.split('\n').enumerate() {
            if k > 0 {
                match self.q.pop_front() {
                    Some(f) => {
                        if !self.open {
                            out.extend_from_slice(&f.prefix);
                        }
                        if f.ended {
                            out.extend_from_slice(&f.term);
                        } else {
                            out.push(b'\n');
                        }
                    }
                    None => {
                        if !self.open {
                            out.extend_from_slice(b"data: ");
                        }
                        out.push(b'\n');
                    }
                }
                self.open = false;
            }
            if !piece.is_empty() {
                if !self.open {
                    match self.q.front() {
                        Some(f) => out.extend_from_slice(&f.prefix),
                        None => {
                            out.extend_from_slice(b"data: ");
                            self.q.push_back(Framing {
                                prefix: b"data: ".to_vec(),
                                term: b"\n".to_vec(),
                                ended: true,
                            });
                        }
                    }
                    self.open = true;
                }
                out.extend_from_slice(piece.as_bytes());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// LLM delta streams

/// One line of a held event.
#[derive(Clone, Copy, Debug)]
struct Line {
    start: usize,
    /// End of the content (start of the line end).
    end: usize,
    /// End of the line end.
    next: usize,
}

/// Which keys end with an event.
#[derive(Debug)]
enum End {
    All,
    Prefix(String),
    Exact(String),
}

impl End {
    fn covers(&self, key: &str) -> bool {
        match self {
            End::All => true,
            End::Prefix(p) => key.starts_with(p.as_str()),
            End::Exact(k) => key == k,
        }
    }
}

/// The last delta event of a key: the shape of a synthesized one.
struct Template {
    /// The event's JSON as it was sent (masked).
    event: String,
    /// The raw `event:` line (with its line end), if the event had one.
    event_line: Option<Vec<u8>>,
    prefix: Vec<u8>,
    term: Vec<u8>,
}

struct DeltaStream {
    key: String,
    sm: StreamMasker,
    tmpl: Option<Template>,
}

/// Where the delta texts of an event are, as (stream key, JSON pointer), and which keys end.
fn find_deltas(v: &Value) -> (Vec<(String, String)>, Vec<End>) {
    let mut found = Vec::new();
    let mut ends = Vec::new();
    if let Some(chs) = v.get("choices").and_then(Value::as_array) {
        for (p, c) in chs.iter().enumerate() {
            let idx = c.get("index").and_then(Value::as_u64).unwrap_or(p as u64);
            if let Some(d) = c.get("delta").and_then(Value::as_object) {
                for f in ["content", "reasoning_content", "reasoning", "refusal"] {
                    if d.get(f).is_some_and(Value::is_string) {
                        found.push((format!("chat|{idx}|{f}"), format!("/choices/{p}/delta/{f}")));
                    }
                }
                if let Some(tcs) = d.get("tool_calls").and_then(Value::as_array) {
                    for (t, tc) in tcs.iter().enumerate() {
                        let j = tc.get("index").and_then(Value::as_u64).unwrap_or(t as u64);
                        if tc
                            .pointer("/function/arguments")
                            .is_some_and(Value::is_string)
                        {
                            found.push((
                                format!("chat|{idx}|tool{j}"),
                                format!("/choices/{p}/delta/tool_calls/{t}/function/arguments"),
                            ));
                        }
                    }
                }
            } else if c.get("text").is_some_and(Value::is_string) {
                found.push((format!("chat|{idx}|text"), format!("/choices/{p}/text")));
            }
            if c.get("finish_reason").is_some_and(|f| !f.is_null()) {
                ends.push(End::Prefix(format!("chat|{idx}|")));
            }
        }
        return (found, ends);
    }
    let num = |k: &str| v.get(k).and_then(Value::as_u64);
    match v.get("type").and_then(Value::as_str) {
        Some("content_block_delta") => {
            let i = num("index").unwrap_or(0);
            let field = match v.pointer("/delta/type").and_then(Value::as_str) {
                Some("text_delta") => Some("text"),
                Some("input_json_delta") => Some("partial_json"),
                Some("thinking_delta") => Some("thinking"),
                _ => None,
            };
            if let Some(f) = field {
                if v.get("delta")
                    .and_then(|d| d.get(f))
                    .is_some_and(Value::is_string)
                {
                    found.push((format!("anth|{i}|{f}"), format!("/delta/{f}")));
                }
            }
        }
        Some("content_block_stop") => {
            ends.push(End::Prefix(format!("anth|{}|", num("index").unwrap_or(0))));
        }
        Some("message_stop") => ends.push(End::All),
        Some("response.completed" | "response.incomplete" | "response.failed" | "error") => {
            ends.push(End::All)
        }
        Some(t) => {
            let item = || {
                let out = num("output_index")
                    .map(|n| n.to_string())
                    .or_else(|| v.get("item_id").and_then(Value::as_str).map(str::to_string))
                    .unwrap_or_default();
                let part = num("content_index")
                    .or_else(|| num("summary_index"))
                    .map(|n| n.to_string())
                    .unwrap_or_default();
                format!("{out}|{part}")
            };
            if let Some(kind) = t.strip_suffix(".delta") {
                if v.get("delta").is_some_and(Value::is_string) {
                    found.push((format!("resp|{kind}|{}", item()), "/delta".to_string()));
                }
            } else if let Some(kind) = t.strip_suffix(".done") {
                ends.push(End::Exact(format!("resp|{kind}|{}", item())));
            }
        }
        None => {}
    }
    (found, ends)
}

/// A delta event for `key` carrying `text`, shaped like the key's last delta event.
fn synthesize(key: &str, t: &Template, text: &str) -> Option<Vec<u8>> {
    let mut ev: Value = serde_json::from_str(&t.event).ok()?;
    let ptr;
    if let Some(rest) = key.strip_prefix("chat|") {
        let (idx, field) = rest.split_once('|')?;
        let idx: u64 = idx.parse().ok()?;
        let obj = ev.as_object_mut()?;
        obj.remove("usage");
        let choice = if let Some(j) = field.strip_prefix("tool") {
            let j: u64 = j.parse().ok()?;
            ptr = "/choices/0/delta/tool_calls/0/function/arguments".to_string();
            serde_json::json!({"index": idx, "delta": {"tool_calls": [
                {"index": j, "function": {"arguments": ""}}
            ]}, "finish_reason": null})
        } else if field == "text" {
            ptr = "/choices/0/text".to_string();
            serde_json::json!({"index": idx, "text": "", "finish_reason": null})
        } else {
            ptr = format!("/choices/0/delta/{field}");
            let mut delta = serde_json::Map::new();
            delta.insert(field.to_string(), Value::String(String::new()));
            serde_json::json!({"index": idx, "delta": delta, "finish_reason": null})
        };
        obj.insert("choices".to_string(), Value::Array(vec![choice]));
    } else if let Some(rest) = key.strip_prefix("anth|") {
        let (idx, field) = rest.split_once('|')?;
        let idx: u64 = idx.parse().ok()?;
        let dtype = match field {
            "partial_json" => "input_json_delta",
            "thinking" => "thinking_delta",
            _ => "text_delta",
        };
        let mut delta = serde_json::Map::new();
        delta.insert("type".to_string(), Value::String(dtype.to_string()));
        delta.insert(field.to_string(), Value::String(String::new()));
        ev = serde_json::json!({"type": "content_block_delta", "index": idx, "delta": delta});
        ptr = format!("/delta/{field}");
    } else {
        if let Some(lp) = ev.get_mut("logprobs") {
            *lp = Value::Array(Vec::new());
        }
        ptr = "/delta".to_string();
    }
    *ev.pointer_mut(&ptr)? = Value::String(text.to_string());
    let json = serde_json::to_string(&ev).ok()?;
    let mut out = Vec::with_capacity(json.len() + 64);
    if let Some(l) = &t.event_line {
        out.extend_from_slice(l);
    }
    let term: &[u8] = if t.term.is_empty() { b"\n" } else { &t.term };
    out.extend_from_slice(&t.prefix);
    out.extend_from_slice(json.as_bytes());
    out.extend_from_slice(term);
    out.extend_from_slice(term);
    Some(out)
}

/// Mask the string value `s` under the member name `key` (see [`mask_strings`] for `clean`).
fn mask_cached(
    inner: &Inner,
    key: Option<&str>,
    s: &str,
    clean: &mut VecDeque<String>,
    stats: &mut Stats,
) -> Option<String> {
    let cacheable = key.is_none_or(|k| !label_key(k));
    if cacheable && clean.iter().any(|c| c == s) {
        return None;
    }
    let m = mask_string(inner, key, s, stats);
    if m.is_none() && cacheable && s.len() >= 8 {
        if clean.len() >= CLEAN_CACHE {
            clean.pop_front();
        }
        clean.push_back(s.to_string());
    }
    m
}

/// Mask every string of `v` (keys give label context). True when something changed.
///
/// `clean` remembers the last few strings in which nothing matched (ids, model names, the
/// same in every event of a stream) so they are not analysed again; masking is deterministic,
/// and a string under a label key is never remembered (its result depends on the key).
fn mask_strings(
    inner: &Inner,
    v: &mut Value,
    key: Option<&str>,
    clean: &mut VecDeque<String>,
    stats: &mut Stats,
) -> bool {
    match v {
        Value::String(s) => match mask_cached(inner, key, s, clean, stats) {
            Some(m) => {
                *s = m;
                true
            }
            None => false,
        },
        Value::Array(a) => {
            let mut changed = false;
            for x in a {
                changed |= mask_strings(inner, x, None, clean, stats);
            }
            changed
        }
        Value::Object(o) => {
            let mut changed = false;
            for (k, x) in o.iter_mut() {
                changed |= mask_strings(inner, x, Some(k), clean, stats);
            }
            changed
        }
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------------
// The masker

/// Masks an event stream chunk by chunk; see the module documentation.
pub struct SseMasker {
    inner: Arc<Inner>,
    clear: bool,
    mode: SseMode,
    /// The first bytes, until they are known not to start with a byte-order mark.
    bom: Option<Vec<u8>>,
    /// A line ended with `\r` at the end of a chunk: is a `\n` next?
    cr: bool,
    /// LlmDeltas: the current line.
    line: Vec<u8>,
    /// LlmDeltas: the complete lines of the current event, and where they are.
    ev: Vec<u8>,
    lines: Vec<Line>,
    /// LlmDeltas: the current event is too large and goes through `te`.
    overflow: bool,
    /// The event ended without a blank line (at `finish`).
    te: TextEvents,
    streams: Vec<DeltaStream>,
    clean: VecDeque<String>,
    /// LlmDeltas: the parsed JSON of the current event (see [`fast`]).
    tree: fast::Tree,
    /// The shape of the last common chat-completions event, checked first (see [`fast::Shape`]).
    shape: Option<fast::Shape>,
    /// Events masked by their shape (tests check that the path is taken).
    #[cfg(test)]
    shape_hits: usize,
    /// Use the byte-level path of [`fast`] (tests turn it off to compare with the general path).
    fast: bool,
}

impl std::fmt::Debug for SseMasker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseMasker")
            .field("clear", &self.clear)
            .field("mode", &self.mode)
            .field("streams", &self.streams.len())
            .field("pending", &self.pending())
            .finish_non_exhaustive()
    }
}

impl SseMasker {
    /// A masker for one event stream. A clear scope (exempt caller) passes bytes through
    /// unchanged.
    pub fn new(scope: Scope<'_>, mode: SseMode) -> SseMasker {
        let inner = scope.masker.inner.clone();
        SseMasker {
            te: TextEvents::new(StreamMasker::new(inner.clone(), false)),
            inner,
            clear: scope.clear,
            mode,
            bom: Some(Vec::new()),
            cr: false,
            line: Vec::new(),
            ev: Vec::new(),
            lines: Vec::new(),
            overflow: false,
            streams: Vec::new(),
            clean: VecDeque::new(),
            tree: fast::Tree::default(),
            shape: None,
            #[cfg(test)]
            shape_hits: 0,
            fast: true,
        }
    }

    /// Feed the next chunk of the byte stream (split anywhere); returns the bytes that are final.
    pub fn push(&mut self, chunk: &[u8], stats: &mut Stats) -> Vec<u8> {
        if self.clear {
            return chunk.to_vec();
        }
        let mut out = Vec::with_capacity(chunk.len() + 64);
        let mut chunk = chunk;
        if let Some(mut head) = self.bom.take() {
            let k = (BOM.len() - head.len()).min(chunk.len());
            head.extend_from_slice(&chunk[..k]);
            if head.as_slice() == BOM {
                out.extend_from_slice(BOM);
                chunk = &chunk[k..];
            } else if BOM.starts_with(&head) {
                // Still a prefix of the mark: wait for more.
                self.bom = Some(head);
                return out;
            } else {
                let h = head.len() - k;
                let prefix = head[..h].to_vec();
                self.bytes(&prefix, &mut out, stats);
            }
        }
        self.bytes(chunk, &mut out, stats);
        out
    }

    /// End of stream: release everything held (held delta text goes out in synthesized delta
    /// events).
    pub fn finish(&mut self, stats: &mut Stats) -> Vec<u8> {
        if self.clear {
            return Vec::new();
        }
        let mut out = Vec::new();
        if let Some(head) = self.bom.take() {
            self.bytes(&head, &mut out, stats);
        }
        if self.cr {
            self.cr = false;
            self.line_end(b"\r", &mut out, stats);
        }
        match self.mode {
            SseMode::Text => self.te.finish(&mut out, stats),
            SseMode::LlmDeltas => {
                // An event cut off by the end of the stream is masked and sent as it is.
                let cut_off = self.overflow || !self.line.is_empty() || !self.lines.is_empty();
                if self.overflow {
                    self.overflow = false;
                    self.te.finish(&mut out, stats);
                } else {
                    if !self.line.is_empty() {
                        self.line_end(b"", &mut out, stats);
                    }
                    if !self.lines.is_empty() {
                        self.event(b"", &mut out, stats);
                    }
                }
                let mut synth = Vec::new();
                self.end_streams(&[End::All], &[], &mut synth, stats);
                if cut_off && !synth.is_empty() {
                    // End the cut-off event first (an extra blank line is harmless).
                    out.extend_from_slice(b"\n\n");
                }
                out.extend_from_slice(&synth);
            }
        }
        out
    }

    /// Bytes held back: the delta text the stream maskers hold (each at most
    /// [`super::Masker::max_holdback`]), the event or line in flight, partial characters.
    pub fn pending(&self) -> usize {
        self.line.len()
            + self.ev.len()
            + self.bom.as_ref().map_or(0, Vec::len)
            + self.te.pending()
            + self.streams.iter().map(|s| s.sm.pending()).sum::<usize>()
    }

    fn bytes(&mut self, b: &[u8], out: &mut Vec<u8>, stats: &mut Stats) {
        let mut i = 0;
        if self.cr && !b.is_empty() {
            self.cr = false;
            if b[0] == b'\n' {
                i = 1;
                self.line_end(b"\r\n", out, stats);
            } else {
                self.line_end(b"\r", out, stats);
            }
        }
        while i < b.len() {
            match memchr::memchr2(b'\n', b'\r', &b[i..]) {
                None => {
                    self.piece(&b[i..], out, stats);
                    return;
                }
                Some(k) => {
                    let p = i + k;
                    self.piece(&b[i..p], out, stats);
                    if b[p] == b'\n' {
                        self.line_end(b"\n", out, stats);
                        i = p + 1;
                    } else if p + 1 == b.len() {
                        self.cr = true;
                        return;
                    } else if b[p + 1] == b'\n' {
                        self.line_end(b"\r\n", out, stats);
                        i = p + 2;
                    } else {
                        self.line_end(b"\r", out, stats);
                        i = p + 1;
                    }
                }
            }
        }
    }

    /// Part of a line (no line end in it).
    fn piece(&mut self, b: &[u8], out: &mut Vec<u8>, stats: &mut Stats) {
        if b.is_empty() {
            return;
        }
        if self.mode == SseMode::Text || self.overflow {
            self.te.bytes(b, out, stats);
            return;
        }
        self.line.extend_from_slice(b);
        if self.ev.len() + self.line.len() > EVENT_CAP {
            // Too large to hold: replay the event so far through the text path.
            self.overflow = true;
            let ev = std::mem::take(&mut self.ev);
            for l in std::mem::take(&mut self.lines) {
                self.te.bytes(&ev[l.start..l.end], out, stats);
                self.te.line_end(&ev[l.end..l.next], out, stats);
            }
            let line = std::mem::take(&mut self.line);
            self.te.bytes(&line, out, stats);
        }
    }

    fn line_end(&mut self, term: &[u8], out: &mut Vec<u8>, stats: &mut Stats) {
        if self.mode == SseMode::Text {
            self.te.line_end(term, out, stats);
            return;
        }
        if self.overflow {
            let blank = self.te.kind == LineKind::Start && self.te.head.is_empty();
            self.te.line_end(term, out, stats);
            if blank {
                self.overflow = false;
            }
            return;
        }
        if self.line.is_empty() {
            self.event(term, out, stats);
            return;
        }
        let start = self.ev.len();
        self.ev.extend_from_slice(&self.line);
        let end = self.ev.len();
        self.ev.extend_from_slice(term);
        self.lines.push(Line {
            start,
            end,
            next: self.ev.len(),
        });
        self.line.clear();
    }

    /// The held event ended with the blank line `blank`.
    fn event(&mut self, blank: &[u8], out: &mut Vec<u8>, stats: &mut Stats) {
        let ev = std::mem::take(&mut self.ev);
        let lines = std::mem::take(&mut self.lines);
        self.event_inner(&ev, &lines, blank, out, stats);
        self.ev = ev;
        self.ev.clear();
        self.lines = lines;
        self.lines.clear();
    }

    fn event_inner(
        &mut self,
        ev: &[u8],
        lines: &[Line],
        blank: &[u8],
        out: &mut Vec<u8>,
        stats: &mut Stats,
    ) {
        // The data lines: (line, value start).
        let mut data: Vec<(Line, usize)> = Vec::new();
        let mut event_line = None;
        for l in lines {
            let content = &ev[l.start..l.end];
            let colon = content.iter().position(|&c| c == b':');
            let name = &content[..colon.unwrap_or(content.len())];
            let vstart = match colon {
                None => l.end,
                Some(c) => l.start + c + 1 + usize::from(content.get(c + 1) == Some(&b' ')),
            };
            if name == b"data" {
                data.push((*l, vstart));
            } else if name == b"event" {
                event_line = Some(ev[l.start..l.next].to_vec());
            }
        }
        let raw = |out: &mut Vec<u8>| {
            out.extend_from_slice(ev);
            out.extend_from_slice(blank);
        };
        if data.is_empty() {
            raw(out);
            return;
        }
        let joined;
        let payload: &[u8] = match data.as_slice() {
            [(l, vs)] => &ev[*vs..l.end],
            _ => {
                let mut p = Vec::new();
                for (k, (l, vs)) in data.iter().enumerate() {
                    if k > 0 {
                        p.push(b'\n');
                    }
                    p.extend_from_slice(&ev[*vs..l.end]);
                }
                joined = p;
                &joined
            }
        };
        let Ok(text) = std::str::from_utf8(payload) else {
            return self.as_text(ev, lines, blank, out, stats);
        };
        if text.trim() == "[DONE]" {
            self.end_streams(&[End::All], &[], out, stats);
            raw(out);
            return;
        }
        let this = fast::EventIn {
            ev,
            lines,
            data: &data,
            event_line: event_line.as_deref(),
            text,
            blank,
        };
        // An event with the shape of the last common one needs no parse.
        if self.fast && self.chat_again(&this, out, stats) {
            return;
        }
        // The byte-level path for the common chat-completions event; `verified`: the payload
        // has no duplicate or escaped member names (see `fast`), so its bytes say what `v` says.
        let verified = self.tree.parse(text);
        if verified && self.fast && self.chat_fast(&this, out, stats) {
            return;
        }
        let Ok(mut v) = serde_json::from_str::<Value>(text) else {
            return self.as_text(ev, lines, blank, out, stats);
        };
        let (found, ends) = find_deltas(&v);
        if found.is_empty() {
            // No delta: flush what ends here, then mask the JSON in place (bytes kept).
            self.end_streams(&ends, &[], out, stats);
            let mut jm = JsonMasker::with_inner(self.inner.clone());
            let mut masked = jm.push(text.as_bytes(), stats);
            masked.extend(jm.finish(stats));
            if masked == text.as_bytes() {
                raw(out);
            } else {
                self.reframe(ev, lines, &data, &masked, blank, out);
            }
            return;
        }
        // Take the delta texts out, mask the other strings, then put the released text in.
        let mut texts = Vec::with_capacity(found.len());
        for (_, ptr) in &found {
            let t = v
                .pointer_mut(ptr)
                .map(|x| std::mem::replace(x, Value::Null))
                .and_then(|x| match x {
                    Value::String(s) => Some(s),
                    _ => None,
                })
                .unwrap_or_default();
            texts.push(t);
        }
        let masked = mask_strings(&self.inner, &mut v, None, &mut self.clean, stats);
        // Unverified bytes (a duplicate member, say) may hold a string `v` does not: never send
        // them as they are.
        let mut changed = masked || !verified;
        let keys: Vec<&str> = found.iter().map(|(k, _)| k.as_str()).collect();
        self.end_streams(&ends, &keys, out, stats);
        let first = data[0].0;
        let prefix = ev[first.start..data[0].1].to_vec();
        let term = ev[first.end..first.next].to_vec();
        let mut open = Vec::new();
        for ((key, ptr), text) in found.iter().zip(texts) {
            let (rel, is_open) = self.feed_delta(key, &text, &ends, out, stats);
            if is_open {
                open.push(key.clone());
            }
            changed |= rel != text;
            if let Some(x) = v.pointer_mut(ptr) {
                *x = Value::String(rel);
            }
        }
        let json = if changed {
            match serde_json::to_string(&v) {
                Ok(json) => json,
                // Cannot happen for a parsed value; never pass the original unmasked.
                Err(_) => return self.as_text(ev, lines, blank, out, stats),
            }
        } else {
            text.to_string()
        };
        for key in open {
            self.set_template(&key, &json, event_line.as_deref(), &prefix, &term);
        }
        if changed {
            self.reframe(ev, lines, &data, json.as_bytes(), blank, out);
        } else {
            raw(out);
        }
    }

    /// Push `text` into the stream of `key` (opened if new; the oldest is ended beyond
    /// [`MAX_STREAMS`]) and end it if `ends` covers it: (the released text, the stream is open).
    fn feed_delta(
        &mut self,
        key: &str,
        text: &str,
        ends: &[End],
        out: &mut Vec<u8>,
        stats: &mut Stats,
    ) -> (String, bool) {
        let pos = match self.streams.iter().position(|s| s.key == key) {
            Some(p) => p,
            None => {
                if self.streams.len() >= MAX_STREAMS {
                    // Bounded state: end the oldest stream (its held text goes out now).
                    let oldest = self.streams[0].key.clone();
                    self.end_streams(&[End::Exact(oldest)], &[], out, stats);
                }
                self.streams.push(DeltaStream {
                    key: key.to_string(),
                    sm: StreamMasker::new(self.inner.clone(), false),
                    tmpl: None,
                });
                self.streams.len() - 1
            }
        };
        let s = &mut self.streams[pos];
        let mut rel = s.sm.push(text, stats);
        if ends.iter().any(|e| e.covers(key)) {
            rel.push_str(&s.sm.finish(stats));
            self.streams.remove(pos);
            (rel, false)
        } else {
            (rel, true)
        }
    }

    /// Remember the event just sent for `key` as the shape of a synthesized one (the old
    /// template's buffers are reused).
    fn set_template(
        &mut self,
        key: &str,
        json: &str,
        event_line: Option<&[u8]>,
        prefix: &[u8],
        term: &[u8],
    ) {
        let Some(s) = self.streams.iter_mut().find(|s| s.key == key) else {
            return;
        };
        let t = s.tmpl.get_or_insert_with(|| Template {
            event: String::new(),
            event_line: None,
            prefix: Vec::new(),
            term: Vec::new(),
        });
        t.event.clear();
        t.event.push_str(json);
        match (event_line, &mut t.event_line) {
            (None, l) => *l = None,
            (Some(new), Some(l)) => {
                l.clear();
                l.extend_from_slice(new);
            }
            (Some(new), l) => *l = Some(new.to_vec()),
        }
        t.prefix.clear();
        t.prefix.extend_from_slice(prefix);
        t.term.clear();
        t.term.extend_from_slice(term);
    }

    /// Finish the streams that `ends` covers, except `skip` (their delta is in this event);
    /// their held text goes out in synthesized delta events.
    fn end_streams(&mut self, ends: &[End], skip: &[&str], out: &mut Vec<u8>, stats: &mut Stats) {
        if ends.is_empty() {
            return;
        }
        let mut k = 0;
        while k < self.streams.len() {
            let key = self.streams[k].key.as_str();
            if skip.contains(&key) || !ends.iter().any(|e| e.covers(key)) {
                k += 1;
                continue;
            }
            let mut s = self.streams.remove(k);
            let rest = s.sm.finish(stats);
            if rest.is_empty() {
                continue;
            }
            let ev = s.tmpl.as_ref().and_then(|t| synthesize(&s.key, t, &rest));
            match ev {
                Some(bytes) => out.extend_from_slice(&bytes),
                None => {
                    // No template (cannot happen: a stream is created by a delta event).
                    let json = serde_json::to_string(&rest).unwrap_or_default();
                    out.extend_from_slice(b"data: ");
                    out.extend_from_slice(json.as_bytes());
                    out.extend_from_slice(b"\n\n");
                }
            }
        }
    }

    /// Write the event with its data lines replaced by `payload` (split at its line breaks).
    fn reframe(
        &self,
        ev: &[u8],
        lines: &[Line],
        data: &[(Line, usize)],
        payload: &[u8],
        blank: &[u8],
        out: &mut Vec<u8>,
    ) {
        let first = data[0].0.start;
        for l in lines {
            if l.start == first {
                let (dl, vs) = data[0];
                let prefix = &ev[dl.start..vs];
                let term = &ev[dl.end..dl.next];
                let term: &[u8] = if term.is_empty() { b"\n" } else { term };
                let mut rest = payload;
                loop {
                    out.extend_from_slice(prefix);
                    match memchr::memchr(b'\n', rest) {
                        Some(p) => {
                            out.extend_from_slice(&rest[..p]);
                            out.extend_from_slice(term);
                            rest = &rest[p + 1..];
                        }
                        None => {
                            out.extend_from_slice(rest);
                            break;
                        }
                    }
                }
                out.extend_from_slice(&ev[dl.end..dl.next]);
            } else if data.iter().any(|(d, _)| d.start == l.start) {
                continue;
            } else {
                out.extend_from_slice(&ev[l.start..l.next]);
            }
        }
        out.extend_from_slice(blank);
    }

    /// Mask a complete held event as text.
    fn as_text(
        &mut self,
        ev: &[u8],
        lines: &[Line],
        blank: &[u8],
        out: &mut Vec<u8>,
        stats: &mut Stats,
    ) {
        for l in lines {
            self.te.bytes(&ev[l.start..l.end], out, stats);
            self.te.line_end(&ev[l.end..l.next], out, stats);
        }
        if blank.is_empty() {
            self.te.finish(out, stats);
        } else {
            self.te.line_end(blank, out, stats);
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::mask::{MaskConfig, Masker};

    const AWS: &str = "AKIAIOSFODNN7EXAMPL2";

    fn masker() -> Masker {
        Masker::new(&MaskConfig::default()).expect("default config")
    }

    fn openai_key() -> String {
        format!("sk-proj-{}", "Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z".repeat(2))
    }

    fn s(b: &[u8]) -> String {
        String::from_utf8_lossy(b).into_owned()
    }

    /// Push `input` split at the given offsets (sorted) and finish; checks the hold-back bound.
    fn run_cuts(m: &Masker, mode: SseMode, input: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut sm = SseMasker::new(m.audit_scope(), mode);
        let mut st = Stats::default();
        let mut out = Vec::new();
        let mut prev = 0;
        for &c in cuts.iter().chain(std::iter::once(&input.len())) {
            let c = c.clamp(prev, input.len());
            out.extend(sm.push(&input[prev..c], &mut st));
            // Hold-back: what the maskers hold plus the event in flight in the input.
            let ev_start = input[..c]
                .windows(2)
                .rposition(|w| w == b"\n\n")
                .map_or(0, |p| p + 2);
            assert!(
                sm.pending() <= m.max_holdback() + (c - ev_start) + 4,
                "pending {} after {c}",
                sm.pending()
            );
            prev = c;
        }
        out.extend(sm.finish(&mut st));
        out
    }

    fn chat_event(text: &str, finish: Option<&str>) -> String {
        let v = serde_json::json!({
            "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]
        });
        format!("data: {v}\n\n")
    }

    /// The text a client assembles from a chat / responses / anthropic stream.
    fn client_text(out: &[u8]) -> String {
        let mut text = String::new();
        for block in s(out).split("\n\n") {
            for line in block.lines() {
                let Some(d) = line.strip_prefix("data: ") else {
                    continue;
                };
                let Ok(v) = serde_json::from_str::<Value>(d) else {
                    continue;
                };
                if let Some(c) = v
                    .pointer("/choices/0/delta/content")
                    .and_then(Value::as_str)
                {
                    text.push_str(c);
                }
                if v["type"] == "response.output_text.delta" {
                    text.push_str(v["delta"].as_str().unwrap_or_default());
                }
                if let Some(t) = v.pointer("/delta/text").and_then(Value::as_str) {
                    text.push_str(t);
                }
            }
        }
        text
    }

    fn check_text(m: &Masker, got: &str, whole: &str) {
        let want = m
            .audit_scope()
            .mask_text(whole, &mut Stats::default())
            .into_owned();
        assert_eq!(got, want);
    }

    #[test]
    fn text_mode_is_byte_identical_without_secrets() {
        let m = masker();
        let input = "\u{feff}: ping\r\nevent: update\nid: 7\ndata: {\"a\": 1}\ndata:second\ndata\nretry: 10\n\ndata: x\r\rdata: y\r\n\r\nunknown: f\n\ndata: tail";
        for cut in 0..=input.len() {
            let out = run_cuts(&m, SseMode::Text, input.as_bytes(), &[cut]);
            assert_eq!(s(&out), input, "cut at {cut}");
        }
        let out = run_cuts(
            &m,
            SseMode::Text,
            input.as_bytes(),
            &(1..input.len()).collect::<Vec<_>>(),
        );
        assert_eq!(s(&out), input);
    }

    #[test]
    fn text_mode_masks_payloads_split_anywhere() {
        let m = masker();
        let input = format!(
            "event: a\ndata: key {} and\ndata: mail bob@example.com\nid: 1\n\ndata: {}\n\n",
            AWS,
            openai_key()
        );
        for cut in 0..=input.len() {
            let out = s(&run_cuts(&m, SseMode::Text, input.as_bytes(), &[cut]));
            assert!(!out.contains(AWS), "{out}");
            assert!(!out.contains(&openai_key()), "{out}");
            assert!(!out.contains("bob@example.com"), "{out}");
            assert_eq!(
                out,
                "event: a\ndata: key [REDACTED:aws_access_key_id] and\ndata: mail [REDACTED:email]\nid: 1\n\ndata: [REDACTED:openai_api_key]\n\n",
                "cut at {cut}"
            );
        }
    }

    /// The `data` payloads of `stream` as a client assembles them (lines split on `\n`, `\r\n`,
    /// `\r`), including an event the stream ends inside.
    fn payloads(stream: &str) -> Vec<String> {
        let mut events = Vec::new();
        let mut data: Option<String> = None;
        for line in stream.split("\r\n").flat_map(|l| l.split(['\r', '\n'])) {
            if line.is_empty() {
                events.extend(data.take());
                continue;
            }
            let (name, value) = line.split_once(':').unwrap_or((line, ""));
            if name == "data" {
                let value = value.strip_prefix(' ').unwrap_or(value);
                match &mut data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(value);
                    }
                    None => data = Some(value.to_string()),
                }
            }
        }
        events.extend(data);
        events
    }

    #[test]
    fn text_mode_stream_ending_inside_a_data_line_keeps_deferred_lines_apart() {
        // Fuzz finding (regressions/sse_stream/eof-*): a line deferred while masked data was held
        // was written straight after the last data line when the stream ended inside that line
        // (no line end), so it became part of it: `data: yid: 7`.
        let m = masker();
        let cases = [
            ("data\nt\ndata", "data\ndata\nt\n"),
            ("data: x\nid: 7\ndata: y", "data: x\ndata: y\nid: 7\n"),
            (
                "data: key AKIAIOSFODNN7EXAMPL2\nid: 7\ndata: mail bob@example.com",
                "data: key [REDACTED:aws_access_key_id]\ndata: mail [REDACTED:email]\nid: 7\n",
            ),
            ("data: x\r: ping\rdata: y", "data: x\rdata: y\n: ping\r"),
        ];
        for (input, want) in cases {
            let expected: Vec<String> = payloads(input)
                .iter()
                .map(|p| m.mask_text(p, &mut Stats::default()).into_owned())
                .collect();
            for cut in 0..=input.len() {
                let out = s(&run_cuts(&m, SseMode::Text, input.as_bytes(), &[cut]));
                assert_eq!(out, want, "{input:?} cut at {cut}");
                assert_eq!(payloads(&out), expected, "{input:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn text_mode_lone_cr_before_the_blank_line_keeps_events_apart() {
        // Fuzz finding (regressions/sse_stream/deferred-cr-line-joins-blank-line): a line ended
        // by a lone `\r` that was deferred to the end of its event came right before the blank
        // line's `\n`; a client read `\r\n` as one line end and joined the two events.
        let m = masker();
        let input = "data: mail bob@example.com\rretry: 10\rdata: y\n\ndata: z\n\n";
        let expected: Vec<String> = payloads(input)
            .iter()
            .map(|p| m.mask_text(p, &mut Stats::default()).into_owned())
            .collect();
        assert_eq!(expected, ["mail [REDACTED:email]\ny", "z"]);
        for cut in 0..=input.len() {
            let out = s(&run_cuts(&m, SseMode::Text, input.as_bytes(), &[cut]));
            assert_eq!(payloads(&out), expected, "cut at {cut}: {out:?}");
        }
        // A replacement that joins two data lines: the first line's lone `\r` ends the event.
        let input = "data: key AKIAIOSFODNN7\rdata: EXAMPL2\r\n\ndata: z\n\n";
        let out = s(&run_cuts(&m, SseMode::Text, input.as_bytes(), &[]));
        assert_eq!(payloads(&out).len(), 2, "{out:?}");
    }

    #[test]
    fn chat_deltas_secret_split_at_every_offset() {
        let m = masker();
        for secret in [openai_key(), AWS.to_string()] {
            let whole = format!("Here is the key: {secret} keep it safe.");
            for a in 1..whole.len() {
                for b in [a + 1, a + 3, whole.len() - 1] {
                    if b <= a || b >= whole.len() {
                        continue;
                    }
                    let mut input = String::new();
                    for part in [&whole[..a], &whole[a..b], &whole[b..]] {
                        input.push_str(&chat_event(part, None));
                    }
                    input.push_str(&chat_event("", Some("stop")));
                    input.push_str("data: [DONE]\n\n");
                    let out = run_cuts(&m, SseMode::LlmDeltas, input.as_bytes(), &[]);
                    let got = client_text(&out);
                    assert!(!s(&out).contains(&secret), "{a} {b}: {}", s(&out));
                    assert!(got.contains("[REDACTED:"), "{got}");
                    check_text(&m, &got, &whole);
                    assert!(s(&out).ends_with("data: [DONE]\n\n"));
                }
            }
        }
    }

    #[test]
    fn chat_deltas_every_byte_split_of_the_stream() {
        let m = masker();
        let key = openai_key();
        let whole = format!("token {key} done");
        let mut input = String::new();
        for part in [&whole[..10], &whole[10..30], &whole[30..]] {
            input.push_str(&chat_event(part, None));
        }
        input.push_str(&chat_event("", Some("stop")));
        input.push_str("data: [DONE]\n\n");
        let b = input.as_bytes();
        for cut in 0..=b.len() {
            for cuts in [vec![cut], vec![cut / 2, cut]] {
                let out = run_cuts(&m, SseMode::LlmDeltas, b, &cuts);
                assert!(!s(&out).contains(&key));
                check_text(&m, &client_text(&out), &whole);
            }
        }
        let out = run_cuts(&m, SseMode::LlmDeltas, b, &(1..b.len()).collect::<Vec<_>>());
        check_text(&m, &client_text(&out), &whole);
    }

    #[test]
    fn flush_goes_into_a_synthesized_event_before_the_end() {
        let m = masker();
        // The e-mail at the very end is held until the stream of that choice ends; the finish
        // event has no content (`"delta": {}`).
        let fin = serde_json::json!({
            "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]
        });
        let input = format!(
            "{}{}data: {fin}\n\ndata: [DONE]\n\n",
            chat_event("write to ", None),
            chat_event("bob@example.com", None),
        );
        let out = s(&run_cuts(&m, SseMode::LlmDeltas, input.as_bytes(), &[]));
        assert_eq!(client_text(out.as_bytes()), "write to [REDACTED:email]");
        let events: Vec<&str> = out.split("\n\n").filter(|e| !e.is_empty()).collect();
        // The synthesized delta comes right before the finish event.
        let fin = events
            .iter()
            .position(|e| e.contains("\"finish_reason\":\"stop\""))
            .expect("finish event");
        assert!(events[fin - 1].contains("[REDACTED:email]"), "{out}");
        assert!(!events[fin].contains("[REDACTED:email]"), "{out}");
        assert_eq!(events.len(), 5, "{out}");
        assert_eq!(events.last(), Some(&"data: [DONE]"));
        // A final event that carries a delta gets the held text in it.
        let input = format!(
            "{}{}",
            chat_event("mail bob@", None),
            chat_event("example.com", Some("stop"))
        );
        let out = s(&run_cuts(&m, SseMode::LlmDeltas, input.as_bytes(), &[]));
        assert_eq!(out.matches("data: ").count(), 2, "{out}");
        assert_eq!(client_text(out.as_bytes()), "mail [REDACTED:email]");
        // No end marker at all: finish() synthesizes it.
        let input = chat_event("mail bob@example.com", None);
        let out = s(&run_cuts(&m, SseMode::LlmDeltas, input.as_bytes(), &[]));
        assert_eq!(client_text(out.as_bytes()), "mail [REDACTED:email]");
    }

    #[test]
    fn anthropic_and_responses_streams() {
        let m = masker();
        let key = openai_key();
        let whole = format!("The key is {key}.");
        let (a, b) = (14, 40);
        let anth = |t: &str| {
            format!(
                "event: content_block_delta\ndata: {}\n\n",
                serde_json::json!({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": t}})
            )
        };
        let input = format!(
            "event: message_start\ndata: {{\"type\":\"message_start\",\"message\":{{\"id\":\"m\"}}}}\n\n{}{}{}event: content_block_stop\ndata: {{\"type\":\"content_block_stop\",\"index\":0}}\n\nevent: message_stop\ndata: {{\"type\":\"message_stop\"}}\n\n",
            anth(&whole[..a]),
            anth(&whole[a..b]),
            anth(&whole[b..])
        );
        for cut in 0..=input.len() {
            let out = run_cuts(&m, SseMode::LlmDeltas, input.as_bytes(), &[cut]);
            let t = s(&out);
            assert!(!t.contains(&key));
            check_text(&m, &client_text(&out), &whole);
            // Synthesized events keep the `event:` line.
            for block in t
                .split("\n\n")
                .filter(|e| e.contains("content_block_delta"))
            {
                assert!(
                    block.starts_with("event: content_block_delta\ndata: "),
                    "{block}"
                );
            }
        }
        let resp = |t: &str, seq: u32| {
            format!(
                "event: response.output_text.delta\ndata: {}\n\n",
                serde_json::json!({"type": "response.output_text.delta", "item_id": "msg_1",
                    "output_index": 0, "content_index": 0, "delta": t, "sequence_number": seq})
            )
        };
        let input = format!(
            "{}{}{}event: response.output_text.done\ndata: {}\n\n",
            resp(&whole[..a], 1),
            resp(&whole[a..b], 2),
            resp(&whole[b..], 3),
            serde_json::json!({"type": "response.output_text.done", "item_id": "msg_1",
                "output_index": 0, "content_index": 0, "text": whole})
        );
        for cut in 0..=input.len() {
            let out = run_cuts(&m, SseMode::LlmDeltas, input.as_bytes(), &[cut]);
            assert!(!s(&out).contains(&key), "{}", s(&out));
            check_text(&m, &client_text(&out), &whole);
        }
    }

    #[test]
    fn other_fields_tool_arguments_and_non_json() {
        let m = masker();
        let args = format!("{{\"cmd\": \"export AWS_KEY={AWS}\"}}");
        let tool = |t: &str, fin: Option<&str>| {
            format!(
                "data: {}\n\n",
                serde_json::json!({"id": "c", "object": "chat.completion.chunk", "choices": [{
                    "index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": t}}]},
                    "finish_reason": fin}]})
            )
        };
        let input = format!(
            "{}{}{}: ping\n\ndata: not json {AWS}\n\ndata: {{\"type\": \"x\", \"note\": \"{AWS}\", \"n\": 1}}\n\ndata: [DONE]\n\n",
            tool(&args[..20], None),
            tool(&args[20..], None),
            tool("", Some("tool_calls"))
        );
        for cut in 0..=input.len() {
            let out = s(&run_cuts(&m, SseMode::LlmDeltas, input.as_bytes(), &[cut]));
            assert!(!out.contains(AWS), "{out}");
            assert!(out.contains(": ping\n\n"));
            assert!(
                out.contains("data: not json [REDACTED:aws_access_key_id]\n\n"),
                "{out}"
            );
            assert!(
                out.contains("data: {\"type\": \"x\", \"note\": \"[REDACTED:aws_access_key_id]\", \"n\": 1}\n\n"),
                "{out}"
            );
            let mut assembled = String::new();
            for line in out.lines() {
                if let Some(v) = line
                    .strip_prefix("data: ")
                    .and_then(|d| serde_json::from_str::<Value>(d).ok())
                {
                    if let Some(a) = v
                        .pointer("/choices/0/delta/tool_calls/0/function/arguments")
                        .and_then(Value::as_str)
                    {
                        assembled.push_str(a);
                    }
                }
            }
            check_text(&m, &assembled, &args);
        }
    }

    #[test]
    fn oversized_llm_events_are_masked_as_text() {
        let m = masker();
        let filler = "lorem ipsum ".repeat(EVENT_CAP / 12 + 100);
        let text = format!("{AWS} {filler} {AWS} end");
        let input = format!(
            "{}{}data: [DONE]\n\n",
            chat_event(&text, None),
            chat_event("x", None)
        );
        let mut sm = SseMasker::new(m.audit_scope(), SseMode::LlmDeltas);
        let mut st = Stats::default();
        let mut out = Vec::new();
        for c in input.as_bytes().chunks(4096) {
            out.extend(sm.push(c, &mut st));
            assert!(sm.pending() <= EVENT_CAP + 4096 + m.max_holdback());
        }
        out.extend(sm.finish(&mut st));
        let t = s(&out);
        assert!(!t.contains(AWS));
        assert_eq!(st.get(crate::mask::Detector::AwsAccessKeyId), 2);
        assert!(t.ends_with("data: [DONE]\n\n"));
    }

    #[test]
    fn many_open_streams_stay_bounded() {
        let m = masker();
        let mut input = String::new();
        for i in 0..(MAX_STREAMS + 10) {
            let v =
                serde_json::json!({"choices": [{"index": i, "delta": {"content": "mail bob@"}}]});
            input.push_str(&format!("data: {v}\n\n"));
        }
        let mut sm = SseMasker::new(m.audit_scope(), SseMode::LlmDeltas);
        let mut st = Stats::default();
        let mut out = sm.push(input.as_bytes(), &mut st);
        assert!(sm.streams.len() <= MAX_STREAMS);
        out.extend(sm.finish(&mut st));
        assert!(sm.streams.is_empty());
        assert_eq!(s(&out).matches("bob@").count(), MAX_STREAMS + 10);
    }

    #[test]
    fn clear_scope_passes_through() {
        let cfg = MaskConfig {
            exempt: vec![crate::mask::Exemption {
                connection: "*".to_string(),
                groups: vec!["dba".to_string()],
            }],
            ..MaskConfig::default()
        };
        let m = Masker::new(&cfg).expect("config");
        let scope = m.scope("x", &["dba".to_string()]);
        assert!(scope.is_clear());
        let mut sm = SseMasker::new(scope, SseMode::LlmDeltas);
        let mut st = Stats::default();
        let input = chat_event(AWS, None);
        let mut out = sm.push(input.as_bytes(), &mut st);
        out.extend(sm.finish(&mut st));
        assert_eq!(s(&out), input);
    }

    proptest! {
        // No regression files: a failure prints its minimal input.
        #![proptest_config(ProptestConfig {
            cases: 128,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn arbitrary_bytes_do_not_panic(
            b in prop::collection::vec(any::<u8>(), 0..400),
            cuts in prop::collection::vec(0usize..400, 0..6),
            llm in any::<bool>(),
        ) {
            let m = masker();
            let mut cuts = cuts;
            cuts.sort_unstable();
            let mode = if llm { SseMode::LlmDeltas } else { SseMode::Text };
            let mut sm = SseMasker::new(m.audit_scope(), mode);
            let mut st = Stats::default();
            let mut prev = 0;
            for c in cuts.into_iter().chain(std::iter::once(b.len())) {
                let c = c.clamp(prev, b.len());
                sm.push(&b[prev..c], &mut st);
                prev = c;
            }
            sm.finish(&mut st);
        }

        #[test]
        fn random_llm_streams_never_leak(
            split in prop::collection::vec(1usize..12, 1..12),
            cuts in prop::collection::vec(0usize..2000, 0..8),
            lead in "[a-z ]{0,20}",
            crlf in any::<bool>(),
        ) {
            let m = masker();
            let key = openai_key();
            let whole = format!("{lead} {key} and {AWS} end");
            let mut input = String::new();
            let mut i = 0;
            let mut k = 0;
            while i < whole.len() {
                let j = (i + split[k % split.len()]).min(whole.len());
                input.push_str(&chat_event(&whole[i..j], None));
                i = j;
                k += 1;
            }
            input.push_str(&chat_event("", Some("stop")));
            input.push_str("data: [DONE]\n\n");
            if crlf {
                input = input.replace('\n', "\r\n");
            }
            let mut cuts = cuts;
            cuts.sort_unstable();
            let out = run_cuts(&m, SseMode::LlmDeltas, input.as_bytes(), &cuts);
            let t = s(&out).replace("\r\n", "\n");
            prop_assert!(!t.contains(&key));
            prop_assert!(!t.contains(AWS));
            let want = m.audit_scope().mask_text(&whole, &mut Stats::default()).into_owned();
            prop_assert_eq!(client_text(t.as_bytes()), want);
        }

        #[test]
        fn random_text_streams_match_mask_text(
            lines in prop::collection::vec("[a-z@. 0-9]{0,30}", 1..6),
            cuts in prop::collection::vec(0usize..400, 0..8),
        ) {
            let m = masker();
            let mut input = String::new();
            for l in &lines {
                input.push_str("data: ");
                input.push_str(l);
                input.push('\n');
            }
            input.push_str(&format!("data: {AWS}\n\n"));
            let mut cuts = cuts;
            cuts.sort_unstable();
            let out = s(&run_cuts(&m, SseMode::Text, input.as_bytes(), &cuts));
            let payload = format!("{}\n{AWS}", lines.join("\n"));
            let want = m.audit_scope().mask_text(&payload, &mut Stats::default()).into_owned();
            let got: Vec<&str> = out
                .lines()
                .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
                .collect();
            prop_assert_eq!(got.join("\n"), want);
        }
    }
}
