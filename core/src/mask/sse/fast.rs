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
//! The lexer accepts only JSON that `serde_json` reads to the same value: no duplicate or escaped
//! member names, no exponents or integer parts over 20 digits, nesting under 64 levels, at most
//! 64 members an object. Anything else, and any other shape (several choices, tool calls,
//! reasoning fields, a non-integer `index`, no `delta` object, Anthropic and Responses events),
//! goes through the general path. Both paths produce the same JSON value; on `serde_json`'s
//! compact output they produce the same bytes.

use super::{End, Line, SseMasker};
use crate::mask::json_stream::escape_into;
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
        let start = self.i;
        let mut i = self.i + 1;
        let mut esc = false;
        loop {
            match *self.b.get(i)? {
                b'"' => {
                    self.i = i + 1;
                    return Some((start, self.i, esc));
                }
                b'\\' => {
                    esc = true;
                    match *self.b.get(i + 1)? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => i += 2,
                        b'u' => {
                            let hex = self.b.get(i + 2..i + 6)?;
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

impl SseMasker {
    /// Mask a chat-completions delta event whose JSON payload `text` was parsed into
    /// `self.tree`, if it has the common shape (see the module documentation). False, with
    /// nothing done, for any other event.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn chat_fast(
        &mut self,
        ev: &[u8],
        lines: &[Line],
        data: &[(Line, usize)],
        event_line: Option<&[u8]>,
        text: &str,
        blank: &[u8],
        out: &mut Vec<u8>,
        stats: &mut Stats,
    ) -> bool {
        let tree = std::mem::take(&mut self.tree);
        let done = self.chat_fast_in(&tree, ev, lines, data, event_line, text, blank, out, stats);
        self.tree = tree;
        done
    }

    #[allow(clippy::too_many_arguments)]
    fn chat_fast_in(
        &mut self,
        tree: &Tree,
        ev: &[u8],
        lines: &[Line],
        data: &[(Line, usize)],
        event_line: Option<&[u8]>,
        text: &str,
        blank: &[u8],
        out: &mut Vec<u8>,
        stats: &mut Stats,
    ) -> bool {
        let Some(chat) = chat_shape(tree, text) else {
            return false;
        };
        let Some(&(first, vstart)) = data.first() else {
            return false;
        };
        // Decode the strings with escapes first: nothing may be done before the last check.
        let mut decoded: Vec<(usize, String)> = Vec::new();
        for (n, x) in tree.nodes.iter().enumerate() {
            if x.kind == Kind::Str && x.esc {
                match text
                    .get(x.start..x.end)
                    .and_then(|raw| serde_json::from_str::<String>(raw).ok())
                {
                    Some(s) => decoded.push((n, s)),
                    None => return false,
                }
            }
        }
        let value = |n: usize| -> &str {
            if let Some((_, s)) = decoded.iter().find(|(d, _)| *d == n) {
                return s;
            }
            let x = tree.nodes[n];
            text.get(x.start + 1..x.end - 1).unwrap_or("")
        };
        // The other string values, masked as the general path masks them.
        let mut reps: Vec<(usize, String)> = Vec::new();
        for (n, x) in tree.nodes.iter().enumerate() {
            if x.kind != Kind::Str || n == chat.content {
                continue;
            }
            let key = x.key.and_then(|(a, b)| text.get(a..b));
            if let Some(m) = super::mask_cached(&self.inner, key, value(n), &mut self.clean, stats)
            {
                reps.push((n, m));
            }
        }
        let key = format!("chat|{}|content", chat.idx);
        let ends = if chat.end {
            vec![End::Prefix(format!("chat|{}|", chat.idx))]
        } else {
            Vec::new()
        };
        self.end_streams(&ends, &[key.as_str()], out, stats);
        let delta = value(chat.content);
        let (rel, open) = self.feed_delta(&key, delta, &ends, out, stats);
        if rel != delta {
            reps.push((chat.content, rel));
        }
        let prefix = &ev[first.start..vstart];
        let term = &ev[first.end..first.next];
        let spliced;
        let json: &str = if reps.is_empty() {
            out.extend_from_slice(ev);
            out.extend_from_slice(blank);
            text
        } else {
            reps.sort_unstable_by_key(|(n, _)| *n);
            let mut buf = Vec::with_capacity(text.len() + 64);
            let mut pos = 0;
            for (n, s) in &reps {
                let x = tree.nodes[*n];
                buf.extend_from_slice(text.as_bytes().get(pos..x.start).unwrap_or_default());
                buf.push(b'"');
                escape_into(&mut buf, s);
                buf.push(b'"');
                pos = x.end;
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
