//! The byte-level path for the common chat-completions delta event.
//!
//! Nearly every event of an OpenAI chat-completions stream is
//! `{"id":…,"choices":[{"index":0,"delta":{"content":"tok"},"finish_reason":null}],…}`. The
//! general path parses it into a `serde_json::Value`, and re-serializes it whenever the masker
//! holds text back or releases held text, which is most of the time. Here a small strict JSON
//! lexer builds a flat tree of the event (no allocation per string), the delta string is found in
//! it, the other string values are masked as the general path masks them, and the released text
//! (and any masked value) is spliced back into the original bytes.
//!
//! Consecutive events of a stream mostly share their bytes outside their string values: the
//! next event is first compared with the last one's [`Shape`], and when it matches it is masked
//! without a parse.
//!
//! The lexer accepts only JSON that `serde_json` reads to the same value: no duplicate or escaped
//! member names, no exponents or integer parts over 20 digits, nesting under 64 levels, at most
//! 64 members an object. Anything else, and any other shape (several choices, tool calls,
//! reasoning fields, a non-integer `index`, no `delta` object, Anthropic and Responses events),
//! goes through the general path. Both paths produce the same JSON value; on `serde_json`'s
//! compact output they produce the same bytes.

use super::{End, Line, SseMasker};
use crate::mask::json_stream::{escape_into, find_special};
use crate::mask::Stats;

const MAX_DEPTH: usize = 64;
const MAX_MEMBERS: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Obj,
    Arr,
    Str,
    Num,
    Lit,
}

#[derive(Clone, Copy, Debug)]
struct Node {
    kind: Kind,
    /// First byte of the value (the opening quote of a string).
    start: usize,
    /// One past its last byte.
    end: usize,
    /// The member name (between its quotes) when the parent is an object.
    key: Option<(usize, usize)>,
    /// Index of the first node after this subtree.
    next: usize,
    /// A string with escapes.
    esc: bool,
}

/// A parsed JSON text: its values in document order.
#[derive(Debug, Default)]
pub(super) struct Tree {
    nodes: Vec<Node>,
}

impl Tree {
    /// Parse `text` as one JSON value. True when it is valid JSON that `serde_json` reads to a
    /// value with the same members and strings (no duplicate or escaped member names, see the
    /// module documentation); false for anything the lexer does not vouch for.
    pub(super) fn parse(&mut self, text: &str) -> bool {
        self.nodes.clear();
        let mut p = Parser {
            b: text.as_bytes(),
            i: 0,
            nodes: &mut self.nodes,
        };
        let ok = p.value(None, 0).is_some() && {
            p.ws();
            p.i == p.b.len()
        };
        if !ok {
            self.nodes.clear();
        }
        ok
    }

    /// The children of node `n`.
    fn children(&self, n: usize) -> impl Iterator<Item = usize> + '_ {
        let end = self.nodes.get(n).map_or(0, |x| x.next);
        let mut c = n + 1;
        std::iter::from_fn(move || {
            if c >= end {
                return None;
            }
            let this = c;
            c = self.nodes.get(c).map_or(end, |x| x.next);
            Some(this)
        })
    }

    /// The member `name` of object node `n`.
    fn member(&self, text: &str, n: usize, name: &str) -> Option<usize> {
        self.children(n).find(|&c| {
            self.nodes[c]
                .key
                .is_some_and(|(a, b)| text.get(a..b) == Some(name))
        })
    }

    fn kind(&self, n: usize) -> Option<Kind> {
        self.nodes.get(n).map(|x| x.kind)
    }
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
    nodes: &'a mut Vec<Node>,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn value(&mut self, key: Option<(usize, usize)>, depth: usize) -> Option<()> {
        self.ws();
        let start = self.i;
        let idx = self.nodes.len();
        self.nodes.push(Node {
            kind: Kind::Lit,
            start,
            end: start,
            key,
            next: 0,
            esc: false,
        });
        let kind = match self.peek()? {
            b'{' => {
                if depth >= MAX_DEPTH {
                    return None;
                }
                self.i += 1;
                self.ws();
                if self.peek() == Some(b'}') {
                    self.i += 1;
                } else {
                    let mut members = 0;
                    loop {
                        self.ws();
                        if self.peek() != Some(b'"') {
                            return None;
                        }
                        let (ks, ke, esc) = self.string()?;
                        members += 1;
                        if esc || members > MAX_MEMBERS {
                            return None;
                        }
                        self.ws();
                        if self.peek() != Some(b':') {
                            return None;
                        }
                        self.i += 1;
                        self.value(Some((ks + 1, ke - 1)), depth + 1)?;
                        self.ws();
                        match self.peek()? {
                            b',' => self.i += 1,
                            b'}' => {
                                self.i += 1;
                                break;
                            }
                            _ => return None,
                        }
                    }
                    self.no_duplicates(idx)?;
                }
                Kind::Obj
            }
            b'[' => {
                if depth >= MAX_DEPTH {
                    return None;
                }
                self.i += 1;
                self.ws();
                if self.peek() == Some(b']') {
                    self.i += 1;
                } else {
                    loop {
                        self.value(None, depth + 1)?;
                        self.ws();
                        match self.peek()? {
                            b',' => self.i += 1,
                            b']' => {
                                self.i += 1;
                                break;
                            }
                            _ => return None,
                        }
                    }
                }
                Kind::Arr
            }
            b'"' => {
                let (_, _, esc) = self.string()?;
                self.nodes[idx].esc = esc;
                Kind::Str
            }
            b't' => self.literal(b"true")?,
            b'f' => self.literal(b"false")?,
            b'n' => self.literal(b"null")?,
            b'-' | b'0'..=b'9' => {
                self.number()?;
                Kind::Num
            }
            _ => return None,
        };
        let next = self.nodes.len();
        let n = &mut self.nodes[idx];
        n.kind = kind;
        n.end = self.i;
        n.next = next;
        Some(())
    }

    /// The members of the object at `obj` (being closed) have distinct names.
    fn no_duplicates(&self, obj: usize) -> Option<()> {
        let name = |n: &Node| n.key.and_then(|(a, b)| self.b.get(a..b));
        let len = self.nodes.len();
        let mut c = obj + 1;
        while c < len {
            let k = name(&self.nodes[c]);
            let mut d = self.nodes[c].next;
            while d < len {
                if name(&self.nodes[d]) == k {
                    return None;
                }
                d = self.nodes[d].next;
            }
            c = self.nodes[c].next;
        }
        Some(())
    }

    /// A string at the current quote: (start, end, has escapes).
    fn string(&mut self) -> Option<(usize, usize, bool)> {
        let r = string_at(self.b, self.i)?;
        self.i = r.1;
        Some(r)
    }

    fn literal(&mut self, word: &[u8]) -> Option<Kind> {
        if self.b.get(self.i..self.i + word.len())? != word {
            return None;
        }
        self.i += word.len();
        Some(Kind::Lit)
    }

    /// `-?(0|[1-9][0-9]{0,19})(\.[0-9]+)?`: a number `serde_json` reads without a range error.
    fn number(&mut self) -> Option<()> {
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek()? {
            b'0' => self.i += 1,
            b'1'..=b'9' => {
                let s = self.i;
                while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                    self.i += 1;
                }
                if self.i - s > 20 {
                    return None;
                }
            }
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            let s = self.i;
            while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                self.i += 1;
            }
            if self.i == s {
                return None;
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            return None;
        }
        Some(())
    }
}

/// The JSON string whose opening quote is at `start`: (start, one past its closing quote, has
/// escapes); `None` when it is not a valid, closed JSON string.
fn string_at(b: &[u8], start: usize) -> Option<(usize, usize, bool)> {
    let mut i = start + 1;
    let mut esc = false;
    loop {
        // Skip to the next quote, backslash or control character (8 bytes a step; the strings
        // of an event are short, where a vector search costs more than it saves).
        i = find_special(b, i)?;
        match *b.get(i)? {
            b'"' => return Some((start, i + 1, esc)),
            b'\\' => {
                esc = true;
                match *b.get(i + 1)? {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => i += 2,
                    b'u' => {
                        let hex = b.get(i + 2..i + 6)?;
                        if !hex.iter().all(u8::is_ascii_hexdigit) {
                            return None;
                        }
                        i += 6;
                    }
                    _ => return None,
                }
            }
            0..=0x1f => return None,
            _ => i += 1,
        }
    }
}

/// Where the delta of a common chat-completions event is.
struct Chat {
    idx: u64,
    /// The `content` string node.
    content: usize,
    /// `finish_reason` is set: the choice's streams end with this event.
    end: bool,
}

/// The single choice with a plain `delta.content` string, if `tree` (of `text`) is that shape.
fn chat_shape(tree: &Tree, text: &str) -> Option<Chat> {
    if tree.kind(0)? != Kind::Obj {
        return None;
    }
    let choices = tree.member(text, 0, "choices")?;
    if tree.kind(choices)? != Kind::Arr {
        return None;
    }
    let mut it = tree.children(choices);
    let choice = it.next()?;
    if it.next().is_some() || tree.kind(choice)? != Kind::Obj {
        return None;
    }
    let idx = match tree.member(text, choice, "index") {
        None => 0,
        Some(n) => {
            let x = tree.nodes[n];
            let digits = text.get(x.start..x.end)?;
            if x.kind != Kind::Num || !digits.bytes().all(|c| c.is_ascii_digit()) {
                return None;
            }
            digits.parse::<u64>().ok()?
        }
    };
    let delta = tree.member(text, choice, "delta")?;
    if tree.kind(delta)? != Kind::Obj {
        return None;
    }
    for f in ["reasoning_content", "reasoning", "refusal", "tool_calls"] {
        if tree.member(text, delta, f).is_some() {
            return None;
        }
    }
    let content = tree.member(text, delta, "content")?;
    if tree.kind(content)? != Kind::Str {
        return None;
    }
    let end = match tree.member(text, choice, "finish_reason") {
        None => false,
        Some(n) => {
            let x = tree.nodes[n];
            !(x.kind == Kind::Lit && text.get(x.start..x.end) == Some("null"))
        }
    };
    Some(Chat { idx, content, end })
}

/// The bytes around the string values of the last event that took the byte-level path with one
/// data line, no `event:` line and no `finish_reason`.
///
/// An event whose payload is `fixed[0]`, a valid JSON string, `fixed[1]`, … a valid JSON string,
/// `fixed[n]` has the same tree, only with other string values. Before the first string every
/// byte is the same, so the lexer is at the same point when it starts: a string value (member
/// names are in the fixed bytes). After a string the lexer's state does not depend on what the
/// string held, so the same fixed bytes lead it to the same point at the next string, and at the
/// end to the same closed value. So the event has the same shape, choice index, member names and
/// numbers; its `content` is the same hole. Its other string values (an `id`, OpenAI's random
/// `obfuscation` padding) are masked as a full parse masks them, and the content goes through
/// the same steps. The next event of a stream is checked against this first: byte comparisons
/// and a scan of each string instead of a parse.
#[derive(Debug)]
pub(super) struct Shape {
    /// The bytes before each string value (each ends with its opening quote), then the bytes
    /// after the last one.
    fixed: Vec<Vec<u8>>,
    /// The member name of each string value, if it has one.
    keys: Vec<Option<String>>,
    /// The raw bytes (quotes included) of the last value in each place that was found clean.
    clean: Vec<Option<Vec<u8>>>,
    /// Which string value is the content.
    content: usize,
    idx: u64,
}

impl Shape {
    /// The shape of `text`, parsed into `tree`, whose content string starts at `parts.content`;
    /// the other string values not in `parts.reps` were found clean.
    fn of(tree: &Tree, text: &str, parts: &Parts) -> Option<Shape> {
        let b = text.as_bytes();
        let (mut fixed, mut keys, mut clean) = (Vec::new(), Vec::new(), Vec::new());
        let (mut pos, mut hole) = (0, None);
        for x in tree.nodes.iter().filter(|x| x.kind == Kind::Str) {
            let content = x.start == parts.content.0;
            if content {
                hole = Some(keys.len());
            }
            let masked = parts.reps.iter().any(|r| r.0 == x.start);
            fixed.push(b.get(pos..=x.start)?.to_vec());
            keys.push(x.key.and_then(|(a, b)| text.get(a..b)).map(str::to_string));
            clean.push((!content && !masked).then(|| b[x.start..x.end].to_vec()));
            pos = x.end;
        }
        fixed.push(b.get(pos..)?.to_vec());
        Some(Shape {
            fixed,
            keys,
            clean,
            content: hole?,
            idx: parts.idx,
        })
    }
}

/// The event in flight, as `SseMasker::event_inner` split it.
pub(super) struct EventIn<'a> {
    /// The event's bytes, up to its blank line.
    pub ev: &'a [u8],
    pub lines: &'a [Line],
    /// Its data lines: (line, value start).
    pub data: &'a [(Line, usize)],
    pub event_line: Option<&'a [u8]>,
    /// The data payload.
    pub text: &'a str,
    /// The blank line that ends it.
    pub blank: &'a [u8],
}

/// What the byte-level path masks in one event.
struct Parts<'a> {
    idx: u64,
    end: bool,
    /// The content string: (opening quote, one past the closing quote).
    content: (usize, usize),
    /// Its decoded value.
    delta: std::borrow::Cow<'a, str>,
    /// The other string values that were masked: (quote, one past the quote, masked value).
    reps: Vec<(usize, usize, String)>,
}

impl SseMasker {
    /// Mask a chat-completions delta event whose JSON payload `text` was parsed into
    /// `self.tree`, if it has the common shape (see the module documentation). False, with
    /// nothing done, for any other event.
    pub(super) fn chat_fast(&mut self, e: &EventIn, out: &mut Vec<u8>, stats: &mut Stats) -> bool {
        let text = e.text;
        if e.data.is_empty() {
            return false;
        }
        let tree = std::mem::take(&mut self.tree);
        let parts = self.chat_parts(&tree, text, stats);
        if let Some(p) = parts.as_ref() {
            if e.data.len() == 1 && e.event_line.is_none() && !p.end {
                self.shape = Shape::of(&tree, text, p);
            }
        }
        self.tree = tree;
        let Some(parts) = parts else {
            return false;
        };
        self.chat_apply(parts, e, out, stats)
    }

    /// Mask an event of one data line and no `event:` line whose payload `text` has the
    /// [`Shape`] of an earlier one, without parsing it. False, with nothing done, when it does
    /// not have that shape (or its content does not decode).
    pub(super) fn chat_again(&mut self, e: &EventIn, out: &mut Vec<u8>, stats: &mut Stats) -> bool {
        let text = e.text;
        let Some(shape) = self
            .shape
            .as_ref()
            .filter(|_| e.data.len() == 1 && e.event_line.is_none())
        else {
            return false;
        };
        let b = text.as_bytes();
        // Each string value's (opening quote, one past its closing quote, has escapes).
        let mut spans = Vec::with_capacity(shape.keys.len());
        let mut pos = 0;
        for f in &shape.fixed[..shape.keys.len()] {
            if b.get(pos..pos + f.len()) != Some(&f[..]) {
                return false;
            }
            let Some(span) = string_at(b, pos + f.len() - 1) else {
                return false;
            };
            pos = span.1;
            spans.push(span);
        }
        if b.get(pos..) != shape.fixed.last().map(|f| &f[..]) {
            return false;
        }
        let hole = shape.content;
        // A value with the raw bytes of one found clean in this place needs no check again
        // (masking is deterministic, and the member name is the same).
        let check = |k: usize| {
            let (s, e, _) = spans[k];
            k != hole && shape.clean[k].as_deref() != Some(&b[s..e])
        };
        // Decode the strings with escapes first: nothing may be done before the last check.
        let mut values: Vec<Option<std::borrow::Cow<str>>> = Vec::with_capacity(spans.len());
        for (k, &(s, e, esc)) in spans.iter().enumerate() {
            values.push(if k != hole && !check(k) {
                None
            } else if esc {
                match serde_json::from_str::<String>(&text[s..e]) {
                    Ok(v) => Some(v.into()),
                    Err(_) => return false,
                }
            } else {
                Some(text[s + 1..e - 1].into())
            });
        }
        #[cfg(test)]
        {
            self.shape_hits += 1;
        }
        let idx = shape.idx;
        let mut reps = Vec::new();
        // The values checked now: (place, found clean).
        let mut checked = Vec::new();
        for (k, v) in values.iter().enumerate() {
            let Some(v) = v.as_deref().filter(|_| k != hole) else {
                continue;
            };
            let key = shape.keys[k].as_deref();
            let (s, e, _) = spans[k];
            match super::mask_cached(&self.inner, key, v, &mut self.clean, stats) {
                Some(m) => {
                    reps.push((s, e, m));
                    checked.push((k, false));
                }
                None => checked.push((k, true)),
            }
        }
        if let Some(shape) = self.shape.as_mut() {
            for (k, clean) in checked {
                let (s, e, _) = spans[k];
                match (clean, &mut shape.clean[k]) {
                    (false, slot) => *slot = None,
                    (true, Some(raw)) => {
                        raw.clear();
                        raw.extend_from_slice(&b[s..e]);
                    }
                    (true, slot) => *slot = Some(b[s..e].to_vec()),
                }
            }
        }
        let delta = values.swap_remove(hole).unwrap_or_default();
        let parts = Parts {
            idx,
            end: false,
            content: (spans[hole].0, spans[hole].1),
            delta,
            reps,
        };
        self.chat_apply(parts, e, out, stats)
    }

    /// The parts of a common chat-completions event parsed into `tree`, with its other string
    /// values masked; `None` for any other event, before anything is counted.
    fn chat_parts<'t>(
        &mut self,
        tree: &Tree,
        text: &'t str,
        stats: &mut Stats,
    ) -> Option<Parts<'t>> {
        let chat = chat_shape(tree, text)?;
        // Decode the strings with escapes first: nothing may be done before the last check.
        let mut decoded: Vec<(usize, String)> = Vec::new();
        for (n, x) in tree.nodes.iter().enumerate() {
            if x.kind == Kind::Str && x.esc {
                let s = text
                    .get(x.start..x.end)
                    .and_then(|raw| serde_json::from_str::<String>(raw).ok())?;
                decoded.push((n, s));
            }
        }
        // `decoded` is in node order: a binary search keeps an event of many escaped strings
        // linear-logarithmic.
        let value = |n: usize| -> &str {
            if let Ok(k) = decoded.binary_search_by_key(&n, |(d, _)| *d) {
                return &decoded[k].1;
            }
            let x = tree.nodes[n];
            text.get(x.start + 1..x.end - 1).unwrap_or("")
        };
        // The other string values, masked as the general path masks them.
        let mut reps = Vec::new();
        for (n, x) in tree.nodes.iter().enumerate() {
            if x.kind != Kind::Str || n == chat.content {
                continue;
            }
            let key = x.key.and_then(|(a, b)| text.get(a..b));
            if let Some(m) = super::mask_cached(&self.inner, key, value(n), &mut self.clean, stats)
            {
                reps.push((x.start, x.end, m));
            }
        }
        let c = tree.nodes[chat.content];
        let delta = match decoded.binary_search_by_key(&chat.content, |(d, _)| *d) {
            Ok(k) => std::mem::take(&mut decoded[k].1).into(),
            Err(_) => text.get(c.start + 1..c.end - 1).unwrap_or("").into(),
        };
        Some(Parts {
            idx: chat.idx,
            end: chat.end,
            content: (c.start, c.end),
            delta,
            reps,
        })
    }

    /// Feed the delta of `parts` to its stream and write the event with what the stream
    /// released (and the other masked values) in place.
    fn chat_apply(
        &mut self,
        parts: Parts<'_>,
        e: &EventIn,
        out: &mut Vec<u8>,
        stats: &mut Stats,
    ) -> bool {
        let EventIn {
            ev,
            lines,
            data,
            event_line,
            text,
            blank,
        } = *e;
        let Some(&(first, vstart)) = data.first() else {
            return false;
        };
        let Parts {
            idx,
            end,
            content,
            delta,
            mut reps,
        } = parts;
        // The key of the choice's delta stream; choice 0 (nearly every stream) without a
        // formatted string per event.
        let key: std::borrow::Cow<'static, str> = match idx {
            0 => "chat|0|content".into(),
            i => format!("chat|{i}|content").into(),
        };
        let ends = if end {
            vec![End::Prefix(format!("chat|{idx}|"))]
        } else {
            Vec::new()
        };
        self.end_streams(&ends, &[&key], out, stats);
        let (rel, open) = self.feed_delta(&key, &delta, &ends, out, stats);
        if rel != delta {
            reps.push((content.0, content.1, rel));
        }
        let prefix = &ev[first.start..vstart];
        let term = &ev[first.end..first.next];
        let spliced;
        let json: &str = if reps.is_empty() {
            out.extend_from_slice(ev);
            out.extend_from_slice(blank);
            text
        } else {
            reps.sort_unstable_by_key(|r| r.0);
            let mut buf = Vec::with_capacity(text.len() + 64);
            let mut pos = 0;
            for (start, end, s) in &reps {
                buf.extend_from_slice(text.as_bytes().get(pos..*start).unwrap_or_default());
                buf.push(b'"');
                escape_into(&mut buf, s);
                buf.push(b'"');
                pos = *end;
            }
            buf.extend_from_slice(text.as_bytes().get(pos..).unwrap_or_default());
            // Built from whole strings and escaped text: always UTF-8.
            spliced = String::from_utf8(buf)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
            self.reframe(ev, lines, data, spliced.as_bytes(), blank, out);
            &spliced
        };
        if open {
            self.set_template(&key, json, event_line, prefix, term);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::{json, Value};

    use super::*;
    use crate::mask::sse::SseMode;
    use crate::mask::{MaskConfig, Masker};

    const AWS: &str = "AKIAIOSFODNN7EXAMPL2";

    fn masker() -> Masker {
        Masker::new(&MaskConfig::default()).expect("default config")
    }

    /// Push `input` split at `cuts` (sorted) through a masker with the fast path on or off.
    fn run(m: &Masker, fast: bool, input: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut sm = SseMasker::new(m.audit_scope(), SseMode::LlmDeltas);
        sm.fast = fast;
        let mut st = Stats::default();
        let mut out = Vec::new();
        let mut prev = 0;
        for &c in cuts.iter().chain(std::iter::once(&input.len())) {
            let c = c.clamp(prev, input.len());
            out.extend(sm.push(&input[prev..c], &mut st));
            prev = c;
        }
        out.extend(sm.finish(&mut st));
        out
    }

    /// Both paths on `input`: (fast output, general output).
    fn both(m: &Masker, input: &str, cuts: &[usize]) -> (String, String) {
        let f = run(m, true, input.as_bytes(), cuts);
        let g = run(m, false, input.as_bytes(), cuts);
        (
            String::from_utf8(f).expect("utf-8"),
            String::from_utf8(g).expect("utf-8"),
        )
    }

    /// The stream with each JSON `data:` line re-serialized compactly (to compare values).
    fn normalized(out: &str) -> String {
        out.split('\n')
            .map(
                |l| match l.strip_prefix("data: ").map(serde_json::from_str::<Value>) {
                    Some(Ok(v)) => format!("data: {v}"),
                    _ => l.to_string(),
                },
            )
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn takes_fast_path(text: &str) -> bool {
        let mut t = Tree::default();
        t.parse(text) && chat_shape(&t, text).is_some()
    }

    fn chat(index: u64, content: &str, finish: Option<&str>) -> Value {
        json!({
            "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": index, "delta": {"content": content}, "logprobs": null,
                         "finish_reason": finish}]
        })
    }

    #[test]
    fn the_common_event_takes_the_fast_path() {
        for v in [
            chat(0, "tok", None),
            chat(3, "a \"quoted\"\n\\ é \u{1}", Some("stop")),
            json!({"choices": [{"delta": {"role": "assistant", "content": ""}}]}),
        ] {
            let text = v.to_string();
            assert!(takes_fast_path(&text), "{text}");
        }
        // Spaces, escapes and a pretty layout are JSON too.
        let text = "{ \"id\" : \"x\\/y\" , \"choices\" : [ { \"index\" : 0 , \"delta\" : { \"content\" : \"a\\u00e9\\n\" } , \"finish_reason\" : null } ] , \"n\" : -1.25 } ";
        assert!(takes_fast_path(text));
    }

    /// Events with the bytes of the last one around their string values take the shape path,
    /// and give the same bytes as the general path; any other difference falls back.
    #[test]
    fn an_event_shaped_like_the_last_skips_the_parse() {
        let m = masker();
        let with = |v: Value, field: &str, x: &str| {
            let mut v = v;
            v[field] = json!(x);
            v
        };
        let events = [
            (chat(0, "tok", None), false),
            // Escapes, and a secret split across two events.
            (chat(0, "a \"q\" \n é", None), true),
            (chat(0, &AWS[..9], None), true),
            (chat(0, &AWS[9..], None), true),
            // Content that reads like the bytes after it.
            (chat(0, "\"}}]}", None), true),
            // Another id is another string value in the same place.
            (with(chat(0, "z", None), "id", "chatcmpl-2"), true),
            (chat(0, "y", None), true),
            // Another choice index, another number: parsed again.
            (chat(1, "other choice", None), false),
            (chat(1, "w", None), true),
            // A new member: parsed again; then its value is masked in every event of the shape.
            (
                with(chat(0, "n", None), "note", &format!("key {AWS}")),
                false,
            ),
            (
                with(chat(0, "n2", None), "note", &format!("the key {AWS}")),
                true,
            ),
            // OpenAI's random padding, in every event.
            (with(chat(0, "o", None), "obfuscation", "Lk3"), false),
            (with(chat(0, "p", None), "obfuscation", "q\"8Zx"), true),
            (with(chat(0, "q", None), "obfuscation", ""), true),
            // A place whose last value was clean is still checked when its bytes change.
            (
                with(chat(0, "r", None), "obfuscation", &format!("{AWS} ")),
                true,
            ),
            (with(chat(0, "s", None), "obfuscation", ""), true),
            (chat(1, "", Some("stop")), false),
            (chat(0, "", Some("stop")), false),
        ];
        let mut input = String::new();
        let mut sm = SseMasker::new(m.audit_scope(), SseMode::LlmDeltas);
        let mut st = Stats::default();
        let mut out = Vec::new();
        for (v, hit) in &events {
            let ev = format!("data: {v}\n\n");
            let before = sm.shape_hits;
            out.extend(sm.push(ev.as_bytes(), &mut st));
            assert_eq!(sm.shape_hits - before, usize::from(*hit), "{ev}");
            input.push_str(&ev);
        }
        out.extend(sm.finish(&mut st));
        let fast = String::from_utf8(out).expect("utf-8");
        assert!(!fast.contains(AWS) && !fast.contains(&AWS[9..]), "{fast}");
        let general = String::from_utf8(run(&m, false, input.as_bytes(), &[])).expect("utf-8");
        assert_eq!(fast, general);
    }

    #[test]
    fn unusual_events_fall_back() {
        let cases = [
            // Two choices, tool calls, reasoning, no string content, legacy text.
            r#"{"choices":[{"index":0,"delta":{"content":"a"}},{"index":1,"delta":{"content":"b"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"a","reasoning_content":"b"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":null,"refusal":"no"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":null}}]}"#,
            r#"{"choices":[{"index":0,"text":"legacy"}]}"#,
            r#"{"choices":[{"index":0,"delta":"x"}]}"#,
            r#"{"choices":[]}"#,
            r#"{"choices":{"index":0}}"#,
            // An index that is not a plain unsigned integer.
            r#"{"choices":[{"index":"1","delta":{"content":"a"}}]}"#,
            r#"{"choices":[{"index":1.0,"delta":{"content":"a"}}]}"#,
            r#"{"choices":[{"index":-1,"delta":{"content":"a"}}]}"#,
            r#"{"choices":[{"index":99999999999999999999,"delta":{"content":"a"}}]}"#,
            // What the lexer does not vouch for.
            r#"{"created":1e3,"choices":[{"index":0,"delta":{"content":"a"}}]}"#,
            r#"{"created":123456789012345678901,"choices":[{"index":0,"delta":{"content":"a"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"\u0063ontent":"a"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"a","content":"b"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"a"}}],"choices":[]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"a"}},]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"a	b"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"\x"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"a"}}]} x"#,
            r#"{"choices":[{"index":0,"delta":{"content":"a"}}]"#,
            r#"{"choices":[{"index":01,"delta":{"content":"a"}}]}"#,
            // Anthropic and Responses events.
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"a"}}"#,
            r#"{"type":"response.output_text.delta","item_id":"i","output_index":0,"content_index":0,"delta":"a"}"#,
        ];
        let m = masker();
        for text in cases {
            assert!(!takes_fast_path(text), "{text}");
            let input = format!("data: {text}\n\ndata: [DONE]\n\n");
            let (f, g) = both(&m, &input, &[]);
            assert_eq!(f, g, "{text}");
        }
        let deep = format!(
            "{{\"x\":{}1{},\"choices\":[{{\"delta\":{{\"content\":\"a\"}}}}]}}",
            "[".repeat(70),
            "]".repeat(70)
        );
        assert!(!takes_fast_path(&deep));
        // A lone surrogate passes the lexer but not serde_json: masked as text, both ways.
        let text = r#"{"choices":[{"index":0,"delta":{"content":"\ud800 AKIAIOSFODNN7EXAMPL2"}}]}"#;
        let (f, g) = both(&m, &format!("data: {text}\n\n"), &[]);
        assert_eq!(f, g);
        assert!(!f.contains(AWS), "{f}");
    }

    #[test]
    fn a_secret_in_a_shadowed_duplicate_member_does_not_pass() {
        // serde_json keeps the last of two equal member names; the first one's string was never
        // masked, so such an event must not be sent as it came.
        let m = masker();
        for text in [
            format!(
                r#"{{"note":"{AWS}","note":"fine","choices":[{{"index":0,"delta":{{"content":"hello world. "}}}}]}}"#
            ),
            format!(
                r#"{{"choices":[{{"index":0,"delta":{{"content":"{AWS} ","content":"hello world. "}}}}]}}"#
            ),
            format!(
                r#"{{"choices":[{{"index":0,"delta":{{"content":"hello world. "}},"finish_reason":null,"finish_reason":"{AWS}"}}]}}"#
            ),
        ] {
            let input = format!("data: {text}\n\ndata: [DONE]\n\n");
            let (f, g) = both(&m, &input, &[]);
            assert!(!f.contains(AWS), "{f}");
            assert!(!g.contains(AWS), "{g}");
        }
    }

    #[test]
    fn fast_output_keeps_bytes_and_masks_other_fields() {
        let m = masker();
        // A layout serde_json would not write: the fast path keeps it; both mean the same.
        let ev = |c: &str| {
            format!("data: {{ \"id\": \"x\\/1\", \"note\": \"{AWS}\", \"choices\": [ {{ \"index\": 0, \"delta\": {{ \"content\": \"{c}\" }}, \"finish_reason\": null }} ] }}\n\n")
        };
        let input = format!(
            "{}{}{}data: [DONE]\n\n",
            ev("mail bob@"),
            ev("example.com"),
            ev(" ok\\n")
        );
        for cut in 0..=input.len() {
            let (f, g) = both(&m, &input, &[cut]);
            assert!(!f.contains(AWS) && !f.contains("bob@"), "{f}");
            assert!(f.contains("\"id\": \"x\\/1\""), "{f}");
            assert_eq!(normalized(&f), normalized(&g), "cut at {cut}");
        }
    }

    #[test]
    fn an_event_of_many_escaped_strings_agrees() {
        // Many escaped strings in one event (each one looked up once among the decoded ones).
        let m = masker();
        let many: Vec<String> = (0..5000).map(|i| format!("l{i}\n")).collect();
        let mut v = chat(0, "mail bob@", None);
        v["x"] = json!(many);
        let input = format!(
            "data: {v}\n\ndata: {}\n\n",
            chat(0, "example.com", Some("stop"))
        );
        let (f, g) = both(&m, &input, &[]);
        assert!(!f.contains("bob@"), "{f}");
        assert_eq!(f, g);
    }

    const PIECES: [&str; 16] = [
        "hello ",
        "world",
        "\n",
        "\"q\" ",
        "é ",
        "日本語",
        " bob@example.com",
        " AKIAIOSFODNN7EXAMPL2 ",
        "sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4zAb3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z",
        "\\",
        "\t",
        " 4111 1111 1111 1111 ",
        "password: hunter2xyz ",
        "\u{1}",
        "mail ",
        ". ",
    ];

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 96,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        /// On serde_json's compact output the fast path writes the same bytes as the general
        /// path (which parses and re-serializes), for any tokenization, interleaving of choices,
        /// other fields, endings and chunking.
        #[test]
        fn fast_and_general_paths_agree(
            words in prop::collection::vec(0usize..PIECES.len(), 1..30),
            split in prop::collection::vec(1usize..9, 1..8),
            choices in 1u64..4,
            note in 0usize..3,
            finish in 0usize..3,
            done in any::<bool>(),
            cuts in prop::collection::vec(0usize..6000, 0..6),
        ) {
            let m = masker();
            let whole: String = words.iter().map(|&w| PIECES[w]).collect();
            let mut input = String::new();
            let (mut i, mut k) = (0, 0usize);
            while i < whole.len() {
                let mut j = (i + split[k % split.len()]).min(whole.len());
                while !whole.is_char_boundary(j) {
                    j += 1;
                }
                let mut v = chat(k as u64 % choices, &whole[i..j], None);
                match (note, k % 3) {
                    (1, 0) => v["note"] = json!(format!("key {AWS}")),
                    (2, _) => v["choices"][0]["delta"]["role"] = json!("assistant"),
                    _ => {}
                }
                input.push_str(&format!("data: {v}\n\n"));
                i = j;
                k += 1;
            }
            for c in 0..choices {
                match finish {
                    0 => input.push_str(&format!("data: {}\n\n", chat(c, "", Some("stop")))),
                    1 => {
                        let mut v = chat(c, "", Some("length"));
                        v["choices"][0]["delta"] = json!({});
                        input.push_str(&format!("data: {v}\n\n"));
                    }
                    _ => {}
                }
            }
            if done {
                input.push_str("data: [DONE]\n\n");
            }
            let mut cuts = cuts;
            cuts.sort_unstable();
            let (f, g) = both(&m, &input, &cuts);
            prop_assert!(!f.contains(AWS), "{}", f);
            prop_assert_eq!(f, g);
        }
    }
}
