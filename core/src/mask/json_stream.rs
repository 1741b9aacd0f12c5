//! Streaming JSON masking: a tokenizer-level rewriter for response bodies that arrive in chunks.
//!
//! ```text
//!  chunk ─▶ lexer (paths, keys, string and number boundaries, escapes)
//!             │ structure, whitespace, numbers, keys ──────────────────────────▶ raw bytes out
//!             │ value at a configured path ───────────────▶ "[REDACTED:field]" (value skipped)
//!             │ string values (decoded) ─▶ one detection buffer per push ─▶ match? re-encoded
//!             │                                                           └ no  ─▶ raw bytes out
//!             └ syntax error ─▶ the rest of the body goes through the text StreamMasker
//! ```
//!
//! Nothing is buffered beyond the token in flight: structure is released as soon as it is read,
//! and a string value is held only until its closing quote (up to [`JsonMasker::MAX_STRING_HOLD`]
//! bytes; a longer one is masked in pieces by a [`StreamMasker`] over its decoded text).
//!
//! Detection sees the *decoded* string (escapes resolved), exactly as [`Scope::mask_text`] would
//! see it. The decoded values completed in one push are collected in one buffer (joined by
//! `"\n\0\n"`), and each is resolved on its own stretch of it: the detectors' windows stop at the
//! value's ends, which they read as the start and end of a text. (An unclosed quote in a
//! labelled value, `"password: \"hunter2"`, is masked to the end of the value, as `mask_text`
//! does; when the next value's bytes were in reach, a line end in the separator used to make the
//! label look unterminated, so the value passed when another string shared its push.)
//!
//! Keys are not masked (a secret used as a key passes). A key that looks like a secret label
//! (`password`, `db_pwd`, `client_secret`, `api_key`, `private_key_id` …) is shown to the
//! detectors with its value as written (`"password": "p\"4ss"`, what `mask_text` would see in the
//! raw body); when the label is accepted the whole value is replaced, with that detector's
//! strategy (for a value longer than the hold cap: `[REDACTED:<detector>]`). Integers of 13 to 19
//! digits are checked too (card numbers sent as JSON numbers); a masked number becomes a string.
//! Values at a configured path are counted as column rules in [`Stats`].
//!
//! When nothing matches, the output is byte-identical to the input. A masked string is
//! re-encoded with canonical JSON escaping; a string longer than `MAX_STRING_HOLD` is always
//! re-encoded (its escapes may change form, its value does not).
//!
//! Concatenated top-level values (NDJSON, JSON lines) are accepted. An empty body is not invalid.
//! Syntax errors are detected as they are read (strings are checked for escapes, control
//! characters and UTF-8; numbers for their grammar); nesting deeper than 1024 counts as invalid.

use std::str::FromStr;
use std::sync::Arc;

use super::detect::{Cand, Literals, Trig};
use super::{select, Detector, Inner, Scope, Stats, StreamMasker};

/// Longest numeric token that is held (and checked for a card number); longer ones pass through.
const NUMBER_HOLD: usize = 64;
/// Decoded key bytes kept for path matching; a longer key matches only wildcards.
const KEY_CAP: usize = 1024;
/// Bytes of a label key shown to the detectors in front of its value.
const PROBE_KEY: usize = 64;
/// Decoded bytes of a long string's start used for the label probe.
const PROBE_VALUE: usize = 1024;
/// Deepest nesting accepted.
const MAX_DEPTH: usize = 1024;
/// Most steps in a [`JsonPath`].
const MAX_STEPS: usize = 63;
/// Shortest text any detector matches (`a@b.co`): shorter values skip the engine.
const MIN_MATCH: usize = 6;
/// Joins the decoded values of one push in the detection buffer.
const SEP: &str = "\n\0\n";
/// What a value at a configured path becomes.
const FIELD: &[u8] = b"\"[REDACTED:field]\"";

// ---------------------------------------------------------------------------------------------
// Paths

/// A field path like `$.users[*].email`, `$.data.items[*].card`, `$..password` (recursive
/// descent), `$.token`.
///
/// Grammar: `$` then steps: `.name`, `['name']` or `["name"]` (a member), `[3]` (an element),
/// `.*` or `[*]` (any member or element), and `..` before any of these (at any depth below).
/// Names are matched exactly (case-sensitive) against the decoded key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsonPath {
    text: String,
    steps: Vec<Step>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Step {
    deep: bool,
    sel: Sel,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Sel {
    Name(String),
    Index(usize),
    Any,
}

/// One step of a value's path.
#[derive(Clone, Copy, Debug)]
enum Comp<'a> {
    Key(&'a str),
    /// A key longer than [`KEY_CAP`].
    LongKey,
    Index(usize),
}

impl Sel {
    fn matches(&self, c: Comp<'_>) -> bool {
        match (self, c) {
            (Sel::Any, _) => true,
            (Sel::Name(n), Comp::Key(k)) => n == k,
            (Sel::Index(i), Comp::Index(j)) => *i == j,
            _ => false,
        }
    }
}

impl JsonPath {
    /// The path as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The states (bit k: the first k steps matched) after one more path component.
    fn advance(&self, s: u64, c: Comp<'_>) -> u64 {
        let mut r = 0u64;
        let mut bits = s;
        while bits != 0 {
            let k = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            if let Some(step) = self.steps.get(k) {
                if step.deep {
                    r |= 1 << k;
                }
                if step.sel.matches(c) {
                    r |= 1 << (k + 1);
                }
            }
        }
        r
    }

    fn accepts(&self, s: u64) -> bool {
        s & (1 << self.steps.len()) != 0
    }
}

impl std::fmt::Display for JsonPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for JsonPath {
    type Err = String;

    fn from_str(s: &str) -> Result<JsonPath, String> {
        let b = s.as_bytes();
        if b.first() != Some(&b'$') {
            return Err(format!("json path {s:?}: must start with `$`"));
        }
        let mut steps = Vec::new();
        let mut i = 1;
        while i < b.len() {
            let at = i;
            match b[i] {
                b'.' => {
                    let deep = b.get(i + 1) == Some(&b'.');
                    i += if deep { 2 } else { 1 };
                    match b.get(i) {
                        Some(b'*') => {
                            i += 1;
                            steps.push(Step {
                                deep,
                                sel: Sel::Any,
                            });
                        }
                        Some(b'[') if deep => {
                            let (sel, next) = bracket(s, i)?;
                            i = next;
                            steps.push(Step { deep, sel });
                        }
                        _ => {
                            let start = i;
                            while i < b.len() && !matches!(b[i], b'.' | b'[' | b']') {
                                i += 1;
                            }
                            if i == start {
                                return Err(format!(
                                    "json path {s:?}: empty member name after `{}` at byte {at}",
                                    if deep { ".." } else { "." }
                                ));
                            }
                            steps.push(Step {
                                deep,
                                sel: Sel::Name(s[start..i].to_string()),
                            });
                        }
                    }
                }
                b'[' => {
                    let (sel, next) = bracket(s, i)?;
                    i = next;
                    steps.push(Step { deep: false, sel });
                }
                _ => {
                    let c = s[at..].chars().next().unwrap_or('?');
                    return Err(format!(
                        "json path {s:?}: unexpected {c:?} at byte {at}; expected `.` or `[`"
                    ));
                }
            }
        }
        if steps.len() > MAX_STEPS {
            return Err(format!(
                "json path {s:?}: {} steps; at most {MAX_STEPS}",
                steps.len()
            ));
        }
        Ok(JsonPath {
            text: s.to_string(),
            steps,
        })
    }
}

/// Parse `[...]` at byte `i` of `s`: `[*]`, `[12]`, `['name']`, `["name"]`.
fn bracket(s: &str, i: usize) -> Result<(Sel, usize), String> {
    let b = s.as_bytes();
    let inner = i + 1;
    let bad = |what: &str| format!("json path {s:?}: {what} in the bracket at byte {i}");
    match b.get(inner) {
        Some(b'*') => {
            if b.get(inner + 1) != Some(&b']') {
                return Err(bad("missing `]` after `*`"));
            }
            Ok((Sel::Any, inner + 2))
        }
        Some(q @ (b'\'' | b'"')) => {
            let start = inner + 1;
            let len = b[start..]
                .iter()
                .position(|c| c == q)
                .ok_or_else(|| bad("unterminated quoted name"))?;
            let end = start + len;
            if b.get(end + 1) != Some(&b']') {
                return Err(bad("missing `]` after the quoted name"));
            }
            Ok((Sel::Name(s[start..end].to_string()), end + 2))
        }
        Some(c) if c.is_ascii_digit() => {
            let mut j = inner;
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            if b.get(j) != Some(&b']') {
                return Err(bad("missing `]` after the index"));
            }
            let n = s[inner..j]
                .parse::<usize>()
                .map_err(|e| bad(&format!("index {:?} ({e})", &s[inner..j])))?;
            Ok((Sel::Index(n), j + 1))
        }
        _ => Err(bad("expected `*`, an index or a quoted name")),
    }
}

// ---------------------------------------------------------------------------------------------
// Shared helpers (also used by the SSE masker)

/// True when a key may be a secret label (`password`, `db_pwd`, `client_secret`, `auth_token`,
/// `api_key`, `credentials`, `private_key_id` …): its value is then shown to the detectors with
/// the key in front of it. A superset of the engine's labels; the engine decides.
pub(super) fn label_key(key: &str) -> bool {
    fn at(k: &[u8], w: &[u8]) -> bool {
        k.get(..w.len()).is_some_and(|x| x.eq_ignore_ascii_case(w))
    }
    let k = key.as_bytes();
    let mut i = 0;
    while i + 3 <= k.len() {
        let rest = &k[i..];
        let hit = match k[i] | 0x20 {
            b'p' => at(rest, b"pass") || at(rest, b"pwd"),
            b's' => at(rest, b"secret"),
            b't' => at(rest, b"token"),
            b'k' => at(rest, b"key"),
            b'c' => at(rest, b"credential"),
            _ => false,
        };
        if hit {
            return true;
        }
        i += 1;
    }
    false
}

/// The last at most `max` bytes of `s`, cut at a character boundary.
fn tail(s: &str, max: usize) -> &str {
    let mut i = s.len().saturating_sub(max);
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// The detector of a label match in `"key": "raw"`, where `raw` is the value as it is written in
/// JSON (escaped): what `mask_text` would see in the raw body. Only the start of a long value is
/// read (a labelled value is capped at 256 bytes anyway).
fn probe_label(inner: &Inner, key: &str, raw: &str) -> Option<Detector> {
    let raw_head = floor(raw, PROBE_VALUE);
    let mut det = String::with_capacity(PROBE_KEY + raw_head.len() + 8);
    det.push('"');
    det.push_str(tail(key, PROBE_KEY));
    det.push_str("\": \"");
    let ds = det.len();
    det.push_str(raw_head);
    if raw_head.len() == raw.len() {
        det.push('"');
    }
    let mut cands = Vec::new();
    inner.engine().analyze(det.as_bytes(), 0, false, &mut cands);
    select(&mut cands, 0, det.len());
    cands
        .iter()
        .find(|c| c.start < ds && c.mend > ds)
        .map(|c| c.kind)
}

/// The first at most `max` bytes of `s`, cut at a character boundary.
fn floor(s: &str, max: usize) -> &str {
    let mut i = max.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    &s[..i]
}

/// `value` replaced whole, as the strategy of `kind` does.
fn whole(inner: &Inner, kind: Detector, value: &str, stats: &mut Stats) -> String {
    let mut out = String::new();
    inner.replace(inner.strategies[kind.index()], kind.name(), value, &mut out);
    stats.add(kind);
    out
}

/// Mask one complete JSON string value as [`JsonMasker`] does: a value under a label key
/// (`key`) is masked whole when the detectors accept the label; otherwise the content detectors
/// run on the value. `None` when nothing matched.
pub(super) fn mask_string(
    inner: &Inner,
    key: Option<&str>,
    value: &str,
    stats: &mut Stats,
) -> Option<String> {
    if let Some(k) = key.filter(|k| label_key(k)) {
        let mut raw = Vec::with_capacity(value.len() + 8);
        escape_into(&mut raw, floor(value, PROBE_VALUE));
        let raw = String::from_utf8(raw).ok()?;
        if let Some(kind) = probe_label(inner, k, &raw) {
            return Some(whole(inner, kind, value, stats));
        }
    }
    if value.len() < MIN_MATCH {
        return None;
    }
    match inner.mask_text(value, stats) {
        std::borrow::Cow::Owned(m) => Some(m),
        std::borrow::Cow::Borrowed(_) => None,
    }
}

/// Render the value `det[ds..de]` with the accepted candidates that overlap it (cut at its ends)
/// into `out`. `cands[k]` has the index `base + k` in the push's list; those at or below
/// `counted` were already counted in `stats` (a match cut at a value's end continues in the next
/// value). False when no candidate overlapped the value.
#[allow(clippy::too_many_arguments)]
fn render_value(
    inner: &Inner,
    det: &str,
    ds: usize,
    de: usize,
    cands: &[Cand],
    base: usize,
    counted: &mut Option<usize>,
    out: &mut String,
    stats: &mut Stats,
) -> bool {
    let mut pos = ds;
    let mut any = false;
    for (k, c) in cands.iter().enumerate() {
        if c.mend <= ds || c.mstart >= de {
            continue;
        }
        let ms = c.mstart.max(ds);
        let me = c.mend.min(de);
        out.push_str(det.get(pos..ms).unwrap_or(""));
        inner.replace(
            inner.strategies[c.kind.index()],
            c.kind.name(),
            det.get(ms..me).unwrap_or(""),
            out,
        );
        if counted.is_none_or(|n| base + k > n) {
            stats.add(c.kind);
            *counted = Some(base + k);
        }
        pos = me;
        any = true;
    }
    if any {
        out.push_str(det.get(pos..de).unwrap_or(""));
    }
    any
}

/// Append `s` as the contents of a JSON string (without the quotes), canonically escaped.
pub(super) fn escape_into(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    let mut run = 0;
    for (i, &c) in b.iter().enumerate() {
        let esc: &[u8] = match c {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..=0x1f => {
                out.extend_from_slice(&b[run..i]);
                out.extend_from_slice(b"\\u00");
                out.push(HEXD[usize::from(c >> 4)]);
                out.push(HEXD[usize::from(c & 15)]);
                run = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&b[run..i]);
        out.extend_from_slice(esc);
        run = i + 1;
    }
    out.extend_from_slice(&b[run..]);
}

const HEXD: &[u8; 16] = b"0123456789abcdef";

/// Decode `bytes` as UTF-8, replacing invalid sequences with U+FFFD, up to an incomplete
/// sequence at the very end. Returns the text and the bytes consumed.
pub(super) fn lossy_prefix(bytes: &[u8]) -> (String, usize) {
    let mut out = String::new();
    let mut pos = 0;
    while pos < bytes.len() {
        match std::str::from_utf8(&bytes[pos..]) {
            Ok(s) => {
                out.push_str(s);
                pos = bytes.len();
            }
            Err(e) => {
                let valid = e.valid_up_to();
                out.push_str(std::str::from_utf8(&bytes[pos..pos + valid]).unwrap_or(""));
                pos += valid;
                match e.error_len() {
                    Some(l) => {
                        out.push('\u{FFFD}');
                        pos += l;
                    }
                    None => break,
                }
            }
        }
    }
    (out, pos)
}

/// Free text through a [`StreamMasker`], from bytes that may split characters.
pub(super) struct TextTail {
    sm: StreamMasker,
    utf8: Vec<u8>,
}

impl TextTail {
    pub(super) fn new(sm: StreamMasker) -> TextTail {
        TextTail {
            sm,
            utf8: Vec::new(),
        }
    }

    pub(super) fn push(&mut self, b: &[u8], stats: &mut Stats) -> String {
        let (s, used) = if self.utf8.is_empty() {
            let (s, used) = lossy_prefix(b);
            self.utf8.extend_from_slice(&b[used..]);
            (s, 0)
        } else {
            self.utf8.extend_from_slice(b);
            lossy_prefix(&self.utf8)
        };
        self.utf8.drain(..used);
        self.sm.push(&s, stats)
    }

    pub(super) fn finish(&mut self, stats: &mut Stats) -> String {
        let rest = String::from_utf8_lossy(&self.utf8).into_owned();
        self.utf8.clear();
        let mut out = self.sm.push(&rest, stats);
        out.push_str(&self.sm.finish(stats));
        out
    }

    pub(super) fn pending(&self) -> usize {
        self.sm.pending() + self.utf8.len()
    }
}

// ---------------------------------------------------------------------------------------------
// Lexing helpers

/// Index of the first `"`, `\` or control character at or after `from` (8 bytes per step).
pub(crate) fn find_special(b: &[u8], from: usize) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mut i = from;
    while i + 8 <= b.len() {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[i..i + 8]);
        let w = u64::from_le_bytes(a);
        let q = w ^ (ONES * u64::from(b'"'));
        let s = w ^ (ONES * u64::from(b'\\'));
        // Each term flags its lowest matching byte exactly (false positives only above it).
        let m = (q.wrapping_sub(ONES) & !q)
            | (s.wrapping_sub(ONES) & !s)
            | (w.wrapping_sub(ONES * 0x20) & !w);
        let m = m & HIGH;
        if m != 0 {
            return Some(i + (m.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    (i..b.len()).find(|&k| matches!(b[k], b'"' | b'\\' | 0..=0x1f))
}

/// Where a string scan stopped.
enum Scan {
    /// The closing quote is at this index.
    Closed(usize),
    /// The data ended; resume at this index (an incomplete escape starts there).
    More(usize),
    /// Not a valid JSON string (a control character or a bad escape).
    Bad,
}

/// Scan string contents from `j` (after the opening quote); sets `esc` when an escape is seen.
fn scan_str(data: &[u8], mut j: usize, esc: &mut bool) -> Scan {
    loop {
        let Some(p) = find_special(data, j) else {
            return Scan::More(data.len());
        };
        match data[p] {
            b'"' => return Scan::Closed(p),
            b'\\' => {
                *esc = true;
                let Some(&c) = data.get(p + 1) else {
                    return Scan::More(p);
                };
                match c {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => j = p + 2,
                    b'u' => {
                        let Some(h) = data.get(p + 2..p + 6) else {
                            return if data[p + 2..].iter().all(u8::is_ascii_hexdigit) {
                                Scan::More(p)
                            } else {
                                Scan::Bad
                            };
                        };
                        if !h.iter().all(u8::is_ascii_hexdigit) {
                            return Scan::Bad;
                        }
                        j = p + 6;
                    }
                    _ => return Scan::Bad,
                }
            }
            _ => return Scan::Bad,
        }
    }
}

fn hex4(h: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(h.get(..4)?).ok()?;
    u32::from_str_radix(s, 16).ok()
}

/// Index of the first `byte` at or after `from` (8 bytes per step).
fn find_byte(b: &[u8], from: usize, byte: u8) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mut i = from;
    while i + 8 <= b.len() {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[i..i + 8]);
        let x = u64::from_le_bytes(a) ^ (ONES * u64::from(byte));
        let m = x.wrapping_sub(ONES) & !x & HIGH;
        if m != 0 {
            return Some(i + (m.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    (i..b.len()).find(|&k| b[k] == byte)
}

/// Decode JSON string contents (raw bytes; checked by [`scan_str`]) into `out`. Unless
/// `complete`, decoding stops before an incomplete escape, surrogate pair or UTF-8 sequence at
/// the end. Returns the bytes consumed; `Err` on invalid UTF-8 (or an incomplete end when
/// `complete`).
fn decode_into(raw: &[u8], complete: bool, out: &mut String) -> Result<usize, ()> {
    let cut = if complete { raw.len() } else { utf8_cut(raw) };
    let s = std::str::from_utf8(&raw[..cut]).map_err(|_| ())?;
    decode_str(s, complete, out)
}

/// Decode the contents of a JSON string (valid UTF-8, checked by [`scan_str`]) into `out`; see
/// [`decode_into`]. Lone surrogates decode to U+FFFD.
fn decode_str(raw: &str, complete: bool, out: &mut String) -> Result<usize, ()> {
    let b = raw.as_bytes();
    let mut pos = 0;
    loop {
        let seg_end = find_byte(b, pos, b'\\').unwrap_or(b.len());
        out.push_str(raw.get(pos..seg_end).ok_or(())?);
        pos = seg_end;
        if pos >= b.len() {
            return Ok(pos);
        }
        let Some(&c) = b.get(pos + 1) else {
            return if complete { Err(()) } else { Ok(pos) };
        };
        let ch = match c {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let Some(u) = b.get(pos + 2..pos + 6).and_then(hex4) else {
                    return if !complete && b.len() < pos + 6 {
                        Ok(pos)
                    } else {
                        Err(())
                    };
                };
                if (0xD800..0xDC00).contains(&u) {
                    // A high surrogate: a low one must follow to make a character.
                    let next = b.get(pos + 6..).unwrap_or(&[]);
                    if !complete && next.len() < 6 && may_start_escape(next) {
                        return Ok(pos);
                    }
                    if next.get(..2) == Some(b"\\u") {
                        if let Some(lo) = next.get(2..6).and_then(hex4) {
                            if (0xDC00..0xE000).contains(&lo) {
                                let cp = 0x10000 + ((u - 0xD800) << 10) + (lo - 0xDC00);
                                out.push(char::from_u32(cp).unwrap_or('\u{FFFD}'));
                                pos += 12;
                                continue;
                            }
                        }
                    }
                    out.push('\u{FFFD}');
                    pos += 6;
                    continue;
                }
                out.push(char::from_u32(u).unwrap_or('\u{FFFD}'));
                pos += 6;
                continue;
            }
            _ => return Err(()),
        };
        out.push(ch);
        pos += 2;
    }
}

/// The part of a lexed buffer checked as UTF-8 once per push (from the first character that
/// starts in the new chunk), so that complete strings inside it need no check of their own.
#[derive(Clone, Copy)]
struct Valid<'d> {
    data: &'d [u8],
    start: usize,
    text: &'d str,
}

impl<'d> Valid<'d> {
    fn new(data: &'d [u8], from: usize) -> Valid<'d> {
        let mut s = from.min(data.len());
        let mut k = 0;
        while s < data.len() && k < 3 && data[s] & 0xC0 == 0x80 {
            s += 1;
            k += 1;
        }
        let text = match std::str::from_utf8(&data[s..]) {
            Ok(t) => t,
            Err(e) => std::str::from_utf8(&data[s..s + e.valid_up_to()]).unwrap_or(""),
        };
        Valid {
            data,
            start: s,
            text,
        }
    }

    /// `data[a..b]` as text, if it is valid UTF-8.
    fn get(&self, a: usize, b: usize) -> Option<&'d str> {
        if a >= self.start && b <= self.start + self.text.len() {
            self.text.get(a - self.start..b - self.start)
        } else {
            std::str::from_utf8(self.data.get(a..b)?).ok()
        }
    }
}

/// True when `b` (shorter than 6 bytes) may be the start of a `\uXXXX` escape.
fn may_start_escape(b: &[u8]) -> bool {
    b.iter().enumerate().all(|(k, &c)| match k {
        0 => c == b'\\',
        1 => c == b'u',
        _ => c.is_ascii_hexdigit(),
    })
}

/// The length of the longest prefix of `b` that does not end inside a UTF-8 sequence.
fn utf8_cut(b: &[u8]) -> usize {
    let n = b.len();
    for back in 1..=3.min(n) {
        let c = b[n - back];
        if c & 0xC0 == 0x80 {
            continue;
        }
        let width = match c {
            0xF0..=0xF7 => 4,
            0xE0..=0xEF => 3,
            0xC0..=0xDF => 2,
            _ => 1,
        };
        return if width > back { n - back } else { n };
    }
    n
}

/// A JSON number: `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`.
fn valid_number(t: &[u8]) -> bool {
    let mut i = usize::from(t.first() == Some(&b'-'));
    let digits = |i: &mut usize| {
        let s = *i;
        while *i < t.len() && t[*i].is_ascii_digit() {
            *i += 1;
        }
        *i - s
    };
    match t.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            digits(&mut i);
        }
        _ => return false,
    }
    if t.get(i) == Some(&b'.') {
        i += 1;
        if digits(&mut i) == 0 {
            return false;
        }
    }
    if matches!(t.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(t.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == t.len()
}

fn is_num_byte(b: u8) -> bool {
    b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E')
}

// ---------------------------------------------------------------------------------------------
// The masker

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// A value (top level, after `:`, after `,` in an array).
    Value,
    /// After `[`: a value or `]`.
    ValueOrClose,
    /// After `{`: a key or `}`.
    KeyOrClose,
    /// After `,` in an object.
    Key,
    Colon,
    CommaOrClose,
    /// After a top-level value: another one may follow (JSON lines).
    TopNext,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// An object key, held until it ends (it is never masked).
    Key,
    /// A string value, held until it ends.
    Value,
    /// A string value inside (or replacing) a redacted value: scanned, dropped.
    Skip,
    /// A key inside a redacted value: scanned, dropped.
    SkipKey,
    /// A key longer than the hold cap: passed through as it is read.
    LongKey,
    /// A value longer than the hold cap: decoded and masked by a [`StreamMasker`] in pieces.
    LongValue,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tok {
    None,
    /// A string; `scan` bytes from the token start are checked. The token starts at the opening
    /// quote, except for `LongValue` (the first unconsumed content byte) and `Skip`/`LongKey`
    /// (the resume point).
    Str {
        role: Role,
        scan: usize,
        esc: bool,
    },
    /// A number; `held` while it is short enough to check.
    Num {
        held: bool,
    },
    /// `true`, `false` or `null`; `got` bytes matched.
    Lit {
        word: &'static [u8],
        got: usize,
    },
}

#[derive(Debug, Default)]
struct Frame {
    obj: bool,
    /// Elements before the current one (arrays).
    index: usize,
    /// The current member's decoded key (objects), at most [`KEY_CAP`] bytes.
    key: String,
    key_long: bool,
    /// The key may be a secret label (computed when a string value needs it).
    probe: Option<bool>,
}

/// A value completed in this push that may change.
#[derive(Clone, Copy, Debug)]
struct Rec {
    /// Its raw bytes in the output (quotes included).
    out_start: usize,
    out_end: usize,
    /// Its decoded text in the detection buffer (`det`), or, when `fixed`, its replacement in
    /// `fixed` (a labelled value, replaced whole).
    det_start: usize,
    det_end: usize,
    fixed: bool,
}

/// Streams a JSON body through the masking engine; see the module documentation.
pub struct JsonMasker {
    inner: Arc<Inner>,
    clear: bool,
    paths: Vec<JsonPath>,
    frames: Vec<Frame>,
    depth: usize,
    expect: Expect,
    tok: Tok,
    /// Raw bytes of the token in flight.
    carry: Vec<u8>,
    /// Path states of each open container (`paths.len()` per level).
    pstates: Vec<u64>,
    /// Depth at which a redacted value started; its bytes are dropped until it ends.
    suppress: Option<usize>,
    long: Option<StreamMasker>,
    text: Option<TextTail>,
    invalid: bool,
    /// The body broke inside a value at a redacted path: nothing more is written (the value must
    /// never appear, and where it ends is not known).
    discard: bool,
    det: String,
    recs: Vec<Rec>,
    /// Replacements of labelled values completed in this push.
    fixed: String,
    cands: Vec<Cand>,
    /// The candidates of each value in `cands` (`recs[i]` has `cands[spans[i].0..spans[i].1]`).
    spans: Vec<(usize, usize)>,
    recs_scratch: Vec<Trig>,
    /// The literal anchors of `det` (see `Engine::find_literals`).
    lits: Literals,
    scratch: String,
}

impl std::fmt::Debug for JsonMasker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonMasker")
            .field("clear", &self.clear)
            .field("paths", &self.paths)
            .field("depth", &self.depth)
            .field("invalid", &self.invalid)
            .field("pending", &self.pending())
            .finish_non_exhaustive()
    }
}

/// How a lexing pass ended.
enum Lexed {
    /// Keep `data[keep..]` for the next push.
    Done(usize),
    /// Not JSON from `data[at..]`: mask the rest as text.
    Failed(usize),
}

impl JsonMasker {
    /// Longest string value held whole before it is masked in pieces.
    pub const MAX_STRING_HOLD: usize = 1 << 20;

    /// `paths`: values at these paths are replaced whole by the string `"[REDACTED:field]"`
    /// (whatever their type; counted as column rules in [`Stats`]). Every other string value
    /// (not keys) goes through the scope's content detectors (`Scope::mask_text` semantics,
    /// same replacement text). A clear scope (exempt caller) passes bytes through unchanged.
    pub fn new(scope: Scope<'_>, paths: Vec<JsonPath>) -> JsonMasker {
        let mut m = JsonMasker::with_inner(scope.masker.inner.clone());
        m.clear = scope.clear;
        m.paths = paths;
        m
    }

    /// A masker without paths over a shared configuration (also for the SSE masker).
    pub(super) fn with_inner(inner: Arc<Inner>) -> JsonMasker {
        JsonMasker {
            inner,
            clear: false,
            paths: Vec::new(),
            frames: Vec::new(),
            depth: 0,
            expect: Expect::Value,
            tok: Tok::None,
            carry: Vec::new(),
            pstates: Vec::new(),
            suppress: None,
            discard: false,
            long: None,
            text: None,
            invalid: false,
            det: String::new(),
            recs: Vec::new(),
            fixed: String::new(),
            cands: Vec::new(),
            spans: Vec::new(),
            recs_scratch: Vec::new(),
            lits: Literals::default(),
            scratch: String::new(),
        }
    }

    /// Feed the next chunk of the body (split anywhere, even inside a character or an escape);
    /// returns the output bytes that are final.
    pub fn push(&mut self, chunk: &[u8], stats: &mut Stats) -> Vec<u8> {
        if self.clear {
            return chunk.to_vec();
        }
        if self.discard {
            return Vec::new();
        }
        if let Some(t) = &mut self.text {
            return t.push(chunk, stats).into_bytes();
        }
        let mut out = Vec::with_capacity(chunk.len() + 32);
        if self.carry.is_empty() {
            let r = self.lex(chunk, 0, false, &mut out, stats);
            let out = self.apply(out, stats);
            match r {
                Lexed::Done(keep) => {
                    self.carry
                        .extend_from_slice(chunk.get(keep..).unwrap_or(&[]));
                    out
                }
                Lexed::Failed(at) => self.rest_as_text(chunk.get(at..).unwrap_or(&[]), out, stats),
            }
        } else {
            // The token in flight continues: lex it with the chunk appended (a long string
            // resumes where its scan stopped, and keeps its buffer).
            let mut buf = std::mem::take(&mut self.carry);
            let fresh = buf.len();
            buf.extend_from_slice(chunk);
            let r = self.lex(&buf, fresh, false, &mut out, stats);
            let out = self.apply(out, stats);
            match r {
                Lexed::Done(keep) => {
                    buf.drain(..keep.min(buf.len()));
                    self.carry = buf;
                    out
                }
                Lexed::Failed(at) => self.rest_as_text(buf.get(at..).unwrap_or(&[]), out, stats),
            }
        }
    }

    /// End of body: returns the rest. If the input was not valid JSON, the rest is masked as text
    /// (never passed unmasked) and [`invalid`](Self::invalid) is true.
    pub fn finish(&mut self, stats: &mut Stats) -> Vec<u8> {
        if self.clear || self.discard {
            return Vec::new();
        }
        if let Some(t) = &mut self.text {
            return t.finish(stats).into_bytes();
        }
        let buf = std::mem::take(&mut self.carry);
        let mut out = Vec::new();
        let r = self.lex(&buf, buf.len(), true, &mut out, stats);
        let mut out = self.apply(out, stats);
        if let Lexed::Failed(at) = r {
            out = self.rest_as_text(buf.get(at..).unwrap_or(&[]), out, stats);
        }
        if let Some(t) = &mut self.text {
            out.extend_from_slice(t.finish(stats).as_bytes());
        } else if self.depth > 0
            || !matches!(self.expect, Expect::Value | Expect::TopNext)
            || self.tok != Tok::None
        {
            self.invalid = true;
        }
        out
    }

    /// True once the input was found not to be valid JSON (the rest was masked as text).
    pub fn invalid(&self) -> bool {
        self.invalid
    }

    /// Bytes currently held back: the token in flight (a string value until its closing quote, at
    /// most [`MAX_STRING_HOLD`](Self::MAX_STRING_HOLD) bytes), or what a [`StreamMasker`] holds
    /// for a longer string or for text after a syntax error.
    pub fn pending(&self) -> usize {
        self.carry.len()
            + self.long.as_ref().map_or(0, StreamMasker::pending)
            + self.text.as_ref().map_or(0, TextTail::pending)
    }

    /// Not JSON from `rest` on: it and everything after it is masked as text.
    fn rest_as_text(&mut self, rest: &[u8], mut out: Vec<u8>, stats: &mut Stats) -> Vec<u8> {
        self.invalid = true;
        self.carry.clear();
        self.tok = Tok::None;
        if self.suppress.is_some() {
            // Broken inside a value that must not be written: fail closed, drop the rest.
            self.discard = true;
            return out;
        }
        let mut t = TextTail::new(StreamMasker::new(self.inner.clone(), false));
        out.extend_from_slice(t.push(rest, stats).as_bytes());
        self.text = Some(t);
        out
    }

    /// Mask the values collected in the detection buffer: rewrite the output where they matched.
    fn apply(&mut self, out: Vec<u8>, stats: &mut Stats) -> Vec<u8> {
        if self.recs.is_empty() {
            self.det.clear();
            return out;
        }
        // Each value on its own, as `mask_text` sees it: the text starts and ends with it.
        self.cands.clear();
        self.spans.clear();
        let engine = self.inner.engine();
        let det = self.det.as_bytes();
        // With several values, one search for the literal anchors over all of them costs less
        // than one per value (most values are short).
        let batch = self.recs.iter().filter(|r| !r.fixed).nth(1).is_some();
        if batch {
            engine.find_literals(det, &mut self.lits);
        }
        for rec in &self.recs {
            let k = self.cands.len();
            if !rec.fixed {
                let found = batch.then(|| self.lits.within(rec.det_start, rec.det_end));
                engine.resolve_found(
                    &det[..rec.det_end],
                    rec.det_start,
                    rec.det_start,
                    false,
                    found,
                    &mut self.cands,
                    &mut self.recs_scratch,
                );
            }
            self.spans.push((k, self.cands.len()));
        }
        if self.cands.is_empty() && self.fixed.is_empty() && !self.recs.iter().any(|r| r.fixed) {
            self.det.clear();
            self.recs.clear();
            return out;
        }
        let mut res = Vec::with_capacity(out.len() + 64);
        let mut pos = 0;
        let mut counted = None;
        for (rec, &(a, b)) in self.recs.iter().zip(&self.spans) {
            self.scratch.clear();
            let hit = if rec.fixed {
                self.scratch
                    .push_str(self.fixed.get(rec.det_start..rec.det_end).unwrap_or(""));
                true
            } else {
                a < b
                    && render_value(
                        &self.inner,
                        &self.det,
                        rec.det_start,
                        rec.det_end,
                        &self.cands[a..b],
                        a,
                        &mut counted,
                        &mut self.scratch,
                        stats,
                    )
            };
            if hit {
                res.extend_from_slice(out.get(pos..rec.out_start).unwrap_or(&[]));
                res.push(b'"');
                escape_into(&mut res, &self.scratch);
                res.push(b'"');
                pos = rec.out_end;
            }
        }
        res.extend_from_slice(out.get(pos..).unwrap_or(&[]));
        self.det.clear();
        self.recs.clear();
        self.fixed.clear();
        res
    }

    /// The innermost frame, when it is an object whose current key may be a secret label.
    fn label_frame(frames: &mut [Frame], depth: usize) -> Option<&Frame> {
        let f = frames.get_mut(depth.checked_sub(1)?)?;
        if !f.obj || f.key_long {
            return None;
        }
        let key = &f.key;
        if !*f.probe.get_or_insert_with(|| label_key(key)) {
            return None;
        }
        Some(f)
    }

    /// The path component of a value starting now (in the innermost open container).
    #[inline]
    fn comp(&self) -> Option<Comp<'_>> {
        let f = self.frames.get(self.depth.checked_sub(1)?)?;
        Some(if !f.obj {
            Comp::Index(f.index)
        } else if f.key_long {
            Comp::LongKey
        } else {
            Comp::Key(&f.key)
        })
    }

    /// A value starts at `data[i]`. Returns true when it is at a configured path (it is then
    /// replaced and skipped). For containers, opens the frame.
    #[inline]
    fn begin_value(
        &mut self,
        container: Option<bool>,
        data: &[u8],
        i: usize,
        run: &mut Option<usize>,
        out: &mut Vec<u8>,
        stats: &mut Stats,
    ) -> Result<bool, ()> {
        let np = self.paths.len();
        let mut redact = false;
        if np > 0 && self.suppress.is_none() {
            let base = self.pstates.len().saturating_sub(np);
            let mut child = Vec::new();
            let comp = self.comp();
            for (p, path) in self.paths.iter().enumerate() {
                let s = match comp {
                    None => 1,
                    Some(c) => path.advance(self.pstates.get(base + p).copied().unwrap_or(0), c),
                };
                redact |= path.accepts(s);
                child.push(s);
            }
            if redact {
                if let Some(r) = run.take() {
                    out.extend_from_slice(&data[r..i]);
                }
                out.extend_from_slice(FIELD);
                stats.columns += 1;
                self.suppress = Some(self.depth);
            }
            if container.is_some() {
                self.pstates.extend_from_slice(&child);
            }
        } else if np > 0 && container.is_some() {
            self.pstates.extend(std::iter::repeat_n(0, np));
        }
        if let Some(obj) = container {
            if self.depth >= MAX_DEPTH {
                return Err(());
            }
            if self.frames.len() <= self.depth {
                self.frames.push(Frame::default());
            }
            let f = &mut self.frames[self.depth];
            f.obj = obj;
            f.index = 0;
            f.key.clear();
            f.key_long = false;
            f.probe = None;
            self.depth += 1;
            self.expect = if obj {
                Expect::KeyOrClose
            } else {
                Expect::ValueOrClose
            };
        }
        Ok(redact)
    }

    /// A value ended just before `data[after]`.
    #[inline]
    fn end_value(&mut self, after: usize, run: &mut Option<usize>) {
        if self.suppress == Some(self.depth) {
            self.suppress = None;
            *run = Some(after);
        }
        self.expect = if self.depth == 0 {
            Expect::TopNext
        } else {
            Expect::CommaOrClose
        };
    }

    #[inline]
    fn close(&mut self, after: usize, run: &mut Option<usize>) {
        self.depth -= 1;
        let np = self.paths.len();
        self.pstates.truncate(self.pstates.len().saturating_sub(np));
        self.end_value(after, run);
    }

    /// Lex `data` (the carried token's bytes, then the new chunk). Raw output goes to `out`;
    /// completed string values go to the detection buffer. `eof`: the body ends with `data`.
    /// `fresh`: where the new chunk starts in `data` (after the carried token).
    fn lex(
        &mut self,
        data: &[u8],
        fresh: usize,
        eof: bool,
        out: &mut Vec<u8>,
        stats: &mut Stats,
    ) -> Lexed {
        let n = data.len();
        let valid = Valid::new(data, fresh);
        let mut run = match self.tok {
            Tok::Str {
                role: Role::LongValue | Role::Skip | Role::SkipKey,
                ..
            } => None,
            _ if self.suppress.is_some() => None,
            _ => Some(0),
        };
        let mut ts = 0usize;
        // A literal resumes after the bytes it matched (numbers rescan their carried bytes).
        let mut i = match self.tok {
            Tok::Lit { got, .. } => got.min(n),
            _ => 0,
        };
        let flush = |run: Option<usize>, upto: usize, out: &mut Vec<u8>| {
            if let Some(r) = run {
                if r < upto {
                    out.extend_from_slice(&data[r..upto]);
                }
            }
        };
        macro_rules! fail {
            ($at:expr) => {{
                let at = $at;
                flush(run, at, out);
                if let Some(mut sm) = self.long.take() {
                    let rest = sm.finish(stats);
                    escape_into(out, &rest);
                }
                return Lexed::Failed(at);
            }};
        }
        loop {
            match self.tok {
                Tok::Str { role, scan, esc } => {
                    let mut e = esc;
                    match scan_str(data, ts + scan, &mut e) {
                        Scan::Bad => {
                            let at = if matches!(role, Role::Skip | Role::SkipKey | Role::LongKey) {
                                ts + scan
                            } else {
                                ts
                            };
                            fail!(at)
                        }
                        Scan::More(j) => {
                            if eof {
                                let at =
                                    if matches!(role, Role::Skip | Role::SkipKey | Role::LongKey) {
                                        j
                                    } else {
                                        ts
                                    };
                                fail!(at)
                            }
                            return match self
                                .suspend_str(data, ts, j, role, e, &mut run, out, stats)
                            {
                                Ok(keep) => {
                                    flush(run, keep, out);
                                    Lexed::Done(keep)
                                }
                                Err(at) => fail!(at),
                            };
                        }
                        Scan::Closed(q) => {
                            self.tok = Tok::None;
                            i = q + 1;
                            if let Err(at) =
                                self.end_str(data, &valid, ts, q, role, e, &mut run, out, stats)
                            {
                                fail!(at)
                            }
                        }
                    }
                }
                Tok::Num { held } => {
                    let mut j = i;
                    while j < n && is_num_byte(data[j]) {
                        j += 1;
                    }
                    if j == n && !eof {
                        let held = held && j - ts <= NUMBER_HOLD;
                        self.tok = Tok::Num { held };
                        let keep = if held { ts } else { j };
                        flush(run, keep, out);
                        return Lexed::Done(keep);
                    }
                    self.tok = Tok::None;
                    i = j;
                    if held {
                        let t = &data[ts..j];
                        if !valid_number(t) {
                            fail!(ts)
                        }
                        if run.is_some()
                            && (13..=19).contains(&t.len())
                            && t.iter().all(u8::is_ascii_digit)
                        {
                            let r = run.unwrap_or(0);
                            self.det.push_str(SEP);
                            let ds = self.det.len();
                            self.det
                                .push_str(std::str::from_utf8(t).unwrap_or_default());
                            self.recs.push(Rec {
                                out_start: out.len() + (ts - r),
                                out_end: out.len() + (j - r),
                                det_start: ds,
                                det_end: self.det.len(),
                                fixed: false,
                            });
                        }
                    }
                    self.end_value(j, &mut run);
                }
                Tok::Lit { word, got } => {
                    let mut g = got;
                    while g < word.len() && i < n {
                        if data[i] != word[g] {
                            fail!(ts)
                        }
                        g += 1;
                        i += 1;
                    }
                    if g < word.len() {
                        if eof {
                            fail!(ts)
                        }
                        self.tok = Tok::Lit { word, got: g };
                        flush(run, ts, out);
                        return Lexed::Done(ts);
                    }
                    self.tok = Tok::None;
                    self.end_value(i, &mut run);
                }
                Tok::None => {
                    while i < n && matches!(data[i], b' ' | b'\n' | b'\r' | b'\t') {
                        i += 1;
                    }
                    if i >= n {
                        flush(run, n, out);
                        return Lexed::Done(n);
                    }
                    let b = data[i];
                    match self.expect {
                        Expect::Value | Expect::ValueOrClose | Expect::TopNext => {
                            if b == b']' && self.expect == Expect::ValueOrClose {
                                i += 1;
                                self.close(i, &mut run);
                                continue;
                            }
                            let container = match b {
                                b'{' => Some(true),
                                b'[' => Some(false),
                                b'"' | b'-' | b'0'..=b'9' | b't' | b'f' | b'n' => None,
                                _ => fail!(i),
                            };
                            let redact =
                                match self.begin_value(container, data, i, &mut run, out, stats) {
                                    Ok(r) => r,
                                    Err(()) => fail!(i),
                                };
                            ts = i;
                            match b {
                                b'{' | b'[' => i += 1,
                                b'"' => {
                                    let role = if self.suppress.is_some() {
                                        Role::Skip
                                    } else {
                                        Role::Value
                                    };
                                    self.tok = Tok::Str {
                                        role,
                                        scan: 1,
                                        esc: false,
                                    };
                                }
                                b't' | b'f' | b'n' => {
                                    let word: &'static [u8] = match b {
                                        b't' => b"true",
                                        b'f' => b"false",
                                        _ => b"null",
                                    };
                                    self.tok = Tok::Lit { word, got: 0 };
                                }
                                _ => {
                                    self.tok = Tok::Num {
                                        held: !redact && self.suppress.is_none(),
                                    };
                                }
                            }
                        }
                        Expect::KeyOrClose | Expect::Key => {
                            if b == b'}' && self.expect == Expect::KeyOrClose {
                                i += 1;
                                self.close(i, &mut run);
                            } else if b == b'"' {
                                ts = i;
                                let role = if self.suppress.is_some() {
                                    Role::SkipKey
                                } else {
                                    Role::Key
                                };
                                self.tok = Tok::Str {
                                    role,
                                    scan: 1,
                                    esc: false,
                                };
                                self.expect = Expect::Colon;
                            } else {
                                fail!(i)
                            }
                        }
                        Expect::Colon => {
                            if b != b':' {
                                fail!(i)
                            }
                            i += 1;
                            self.expect = Expect::Value;
                        }
                        Expect::CommaOrClose => {
                            let obj = self
                                .depth
                                .checked_sub(1)
                                .and_then(|d| self.frames.get(d))
                                .is_some_and(|f| f.obj);
                            match b {
                                b',' => {
                                    i += 1;
                                    if obj {
                                        self.expect = Expect::Key;
                                    } else {
                                        if let Some(f) = self
                                            .depth
                                            .checked_sub(1)
                                            .and_then(|d| self.frames.get_mut(d))
                                        {
                                            f.index += 1;
                                        }
                                        self.expect = Expect::Value;
                                    }
                                }
                                b'}' if obj => {
                                    i += 1;
                                    self.close(i, &mut run);
                                }
                                b']' if !obj => {
                                    i += 1;
                                    self.close(i, &mut run);
                                }
                                _ => fail!(i),
                            }
                        }
                    }
                }
            }
        }
    }

    /// The data ended inside a string (scanned up to `j`). Returns where the bytes to keep start,
    /// or `Err(at)` for invalid input from `at`.
    #[allow(clippy::too_many_arguments)]
    fn suspend_str(
        &mut self,
        data: &[u8],
        ts: usize,
        j: usize,
        role: Role,
        esc: bool,
        run: &mut Option<usize>,
        out: &mut Vec<u8>,
        stats: &mut Stats,
    ) -> Result<usize, usize> {
        match role {
            Role::Skip | Role::SkipKey | Role::LongKey => {
                self.tok = Tok::Str { role, scan: 0, esc };
                Ok(j)
            }
            Role::Key => {
                if j - ts <= Self::MAX_STRING_HOLD {
                    self.tok = Tok::Str {
                        role,
                        scan: j - ts,
                        esc,
                    };
                    return Ok(ts);
                }
                if let Some(f) = self
                    .depth
                    .checked_sub(1)
                    .and_then(|d| self.frames.get_mut(d))
                {
                    f.key.clear();
                    f.key_long = true;
                    f.probe = Some(false);
                }
                self.tok = Tok::Str {
                    role: Role::LongKey,
                    scan: 0,
                    esc,
                };
                Ok(j)
            }
            Role::Value => {
                if j - ts <= Self::MAX_STRING_HOLD {
                    self.tok = Tok::Str {
                        role,
                        scan: j - ts,
                        esc,
                    };
                    return Ok(ts);
                }
                // Too long to hold: the label probe on its start, then mask it in pieces.
                let r = run.take().unwrap_or(ts);
                out.extend_from_slice(data.get(r..ts).unwrap_or(&[]));
                let content = &data[ts + 1..j];
                let key = Self::label_frame(&mut self.frames, self.depth).map(|f| f.key.clone());
                if let Some(key) = key {
                    let cut = utf8_cut(&content[..content.len().min(PROBE_VALUE)]);
                    let head = std::str::from_utf8(&content[..cut]).map_err(|_| ts)?;
                    if let Some(kind) = probe_label(&self.inner, &key, head) {
                        // A labelled value: replaced whole (redacted: the rest is not known yet).
                        out.extend_from_slice(b"\"[REDACTED:");
                        out.extend_from_slice(kind.name().as_bytes());
                        out.extend_from_slice(b"]\"");
                        stats.add(kind);
                        self.tok = Tok::Str {
                            role: Role::Skip,
                            scan: 0,
                            esc,
                        };
                        return Ok(j);
                    }
                }
                out.push(b'"');
                self.long = Some(StreamMasker::new(self.inner.clone(), false));
                let used = self
                    .long_feed(&data[ts + 1..j], false, out, stats)
                    .map_err(|_| ts + 1)?;
                let keep = ts + 1 + used;
                self.tok = Tok::Str {
                    role: Role::LongValue,
                    scan: j - keep,
                    esc,
                };
                Ok(keep)
            }
            Role::LongValue => {
                let used = self
                    .long_feed(&data[ts..j], false, out, stats)
                    .map_err(|_| ts)?;
                let keep = ts + used;
                self.tok = Tok::Str {
                    role,
                    scan: j - keep,
                    esc,
                };
                Ok(keep)
            }
        }
    }

    /// Decode raw string contents into the long-string masker and write what it releases.
    /// Returns the raw bytes consumed (an incomplete escape or character at the end waits).
    fn long_feed(
        &mut self,
        raw: &[u8],
        last: bool,
        out: &mut Vec<u8>,
        stats: &mut Stats,
    ) -> Result<usize, ()> {
        self.scratch.clear();
        let used = decode_into(raw, last, &mut self.scratch)?;
        if last && used != raw.len() {
            return Err(());
        }
        if let Some(sm) = &mut self.long {
            let mut released = sm.push(&self.scratch, stats);
            if last {
                released.push_str(&sm.finish(stats));
            }
            escape_into(out, &released);
        }
        if last {
            self.long = None;
        }
        Ok(used)
    }

    /// A string ended at the closing quote `data[q]`.
    #[allow(clippy::too_many_arguments)]
    fn end_str(
        &mut self,
        data: &[u8],
        valid: &Valid<'_>,
        ts: usize,
        q: usize,
        role: Role,
        esc: bool,
        run: &mut Option<usize>,
        out: &mut Vec<u8>,
        stats: &mut Stats,
    ) -> Result<(), usize> {
        match role {
            Role::Key => {
                let raw = valid.get(ts + 1, q).ok_or(ts)?;
                let d = self.depth.checked_sub(1).ok_or(ts)?;
                let f = self.frames.get_mut(d).ok_or(ts)?;
                f.key.clear();
                f.key_long = false;
                if esc {
                    decode_str(raw, true, &mut f.key).map_err(|_| ts)?;
                } else {
                    f.key.push_str(raw);
                }
                if f.key.len() > KEY_CAP {
                    f.key.clear();
                    f.key_long = true;
                    f.probe = Some(false);
                } else {
                    f.probe = None;
                }
                // The colon comes next (`expect` was set when the key started).
            }
            Role::LongKey | Role::SkipKey => {}
            Role::Skip => {
                if self.suppress.is_none() {
                    // A long value replaced whole after the label probe.
                    *run = Some(q + 1);
                }
                self.end_value(q + 1, run);
            }
            Role::LongValue => {
                self.long_feed(&data[ts..q], true, out, stats)
                    .map_err(|_| ts)?;
                out.push(b'"');
                *run = Some(q + 1);
                self.end_value(q + 1, run);
            }
            Role::Value => {
                let raw = valid.get(ts + 1, q).ok_or(ts)?;
                let r = run.unwrap_or(ts);
                let (out_start, out_end) = (out.len() + (ts - r), out.len() + (q + 1 - r));
                // Password labels take values from 4 characters on.
                let label = if raw.len() >= 4 {
                    Self::label_frame(&mut self.frames, self.depth)
                        .and_then(|f| probe_label(&self.inner, &f.key, raw))
                } else {
                    None
                };
                if raw.len() < MIN_MATCH && !esc && label.is_none() {
                    // Too short for any detector.
                    self.end_value(q + 1, run);
                    return Ok(());
                }
                let mark = self.det.len();
                self.det.push_str(SEP);
                let ds = self.det.len();
                if esc {
                    if decode_str(raw, true, &mut self.det).is_err() {
                        self.det.truncate(mark);
                        return Err(ts);
                    }
                } else {
                    self.det.push_str(raw);
                }
                let de = self.det.len();
                if let Some(kind) = label {
                    // A labelled value: replaced whole, whatever the detectors find in it.
                    let value = self.det.get(ds..de).unwrap_or("");
                    let repl = whole(&self.inner, kind, value, stats);
                    self.det.truncate(mark);
                    let fs = self.fixed.len();
                    self.fixed.push_str(&repl);
                    self.recs.push(Rec {
                        out_start,
                        out_end,
                        det_start: fs,
                        det_end: self.fixed.len(),
                        fixed: true,
                    });
                } else if de - ds < MIN_MATCH {
                    self.det.truncate(mark);
                } else {
                    self.recs.push(Rec {
                        out_start,
                        out_end,
                        det_start: ds,
                        det_end: de,
                        fixed: false,
                    });
                }
                self.end_value(q + 1, run);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::mask::corpus::{self, Style};
    use crate::mask::{Detector, MaskConfig, Masker};

    fn masker() -> Masker {
        Masker::new(&MaskConfig::default()).expect("default config")
    }

    fn paths(p: &[&str]) -> Vec<JsonPath> {
        p.iter().map(|s| s.parse().expect("path parses")).collect()
    }

    /// Push `input` in the given chunk sizes (cycled) and finish.
    fn run_chunks(m: &Masker, p: &[JsonPath], input: &[u8], sizes: &[usize]) -> (Vec<u8>, bool) {
        let mut jm = JsonMasker::new(m.audit_scope(), p.to_vec());
        let mut stats = Stats::default();
        let mut out = Vec::new();
        let mut i = 0;
        let mut k = 0;
        while i < input.len() {
            let s = sizes[k % sizes.len()].max(1);
            k += 1;
            let j = (i + s).min(input.len());
            out.extend(jm.push(&input[i..j], &mut stats));
            i = j;
        }
        out.extend(jm.finish(&mut stats));
        (out, jm.invalid())
    }

    fn run_whole(m: &Masker, p: &[JsonPath], input: &[u8]) -> (Vec<u8>, bool) {
        run_chunks(m, p, input, &[input.len().max(1)])
    }

    fn s(b: &[u8]) -> String {
        String::from_utf8_lossy(b).into_owned()
    }

    /// `input` gives `want` for every two-piece split and byte by byte.
    #[track_caller]
    fn every_split(m: &Masker, p: &[JsonPath], input: &str, check: impl Fn(&[u8])) {
        let b = input.as_bytes();
        let (whole, _) = run_whole(m, p, b);
        check(&whole);
        for cut in 0..=b.len() {
            let mut jm = JsonMasker::new(m.audit_scope(), p.to_vec());
            let mut st = Stats::default();
            let mut out = jm.push(&b[..cut], &mut st);
            out.extend(jm.push(&b[cut..], &mut st));
            out.extend(jm.finish(&mut st));
            assert_eq!(s(&out), s(&whole), "split at {cut} of {input:?}");
        }
        let (bytewise, _) = run_chunks(m, p, b, &[1]);
        assert_eq!(s(&bytewise), s(&whole), "byte by byte: {input:?}");
    }

    #[test]
    fn path_parsing_and_errors() {
        for ok in [
            "$",
            "$.a",
            "$.users[*].email",
            "$..password",
            "$.a.b.c",
            "$['x y'][3]",
            "$..*",
            "$.*.k",
            "$..[0]",
        ] {
            let p: JsonPath = ok.parse().expect(ok);
            assert_eq!(p.to_string(), ok);
        }
        for (bad, part) in [
            ("a.b", "must start with `$`"),
            ("$.", "empty member name"),
            ("$..", "empty member name"),
            ("$.a[", "bracket at byte 3"),
            ("$.a[x]", "expected `*`"),
            ("$.a['b]", "unterminated"),
            ("$[1", "missing `]`"),
            ("$a", "unexpected 'a' at byte 1"),
            ("$[99999999999999999999999]", "index"),
        ] {
            let e = bad.parse::<JsonPath>().expect_err(bad);
            assert!(e.contains(part), "{bad}: {e}");
        }
        let long = format!("${}", ".a".repeat(64));
        assert!(long.parse::<JsonPath>().is_err());
    }

    #[test]
    fn unchanged_when_nothing_matches() {
        let m = masker();
        let input = r#" {"a": [1, -2.5e+3, true, false, null, "plain text", {"b": "x\"y\\z\u00e9\/"}],
            "empty": "", "nested": {"k": []}, "ünï": "cödé"}  "#;
        every_split(&m, &[], input, |out| assert_eq!(s(out), input));
        let (_, invalid) = run_whole(&m, &[], input.as_bytes());
        assert!(!invalid);
    }

    #[test]
    fn secrets_in_values_are_masked_and_output_stays_json() {
        let m = masker();
        let key = "AKIAIOSFODNN7EXAMPL2";
        let input = format!(
            r#"{{"note": "aws key {key} here", "list": ["mail alice.smith@example.com"], "n": 1}}"#
        );
        every_split(&m, &[], &input, |out| {
            let t = s(out);
            assert!(!t.contains(key), "{t}");
            assert!(!t.contains("alice.smith@example.com"), "{t}");
            assert!(t.contains("[REDACTED:aws_access_key_id]"), "{t}");
            assert!(t.contains("[REDACTED:email]"), "{t}");
            let v: serde_json::Value = serde_json::from_slice(out).expect("valid JSON");
            assert_eq!(v["n"], 1);
        });
    }

    #[test]
    fn every_detector_sample_in_a_string_value_at_every_split() {
        let m = masker();
        for (i, d) in Detector::ALL.iter().enumerate() {
            for style in [Style::Log, Style::Json, Style::Csv] {
                let sample = corpus::sample(*d, 1000 + i as u64, style);
                let body = serde_json::to_string(&serde_json::json!({
                    "id": 7, "data": {"items": [{"text": sample.text}]}
                }))
                .expect("serializes");
                let want = m
                    .audit_scope()
                    .mask_text(&sample.text, &mut Stats::default())
                    .into_owned();
                every_split(&m, &[], &body, |out| {
                    let v: serde_json::Value = serde_json::from_slice(out).expect("valid JSON");
                    let got = v["data"]["items"][0]["text"].as_str().unwrap_or_default();
                    assert_eq!(got, want, "{d:?} {style:?}");
                    for secret in sample.secrets() {
                        assert!(!got.contains(secret), "{d:?} {style:?}: {secret} in {got}");
                    }
                });
            }
        }
    }

    #[test]
    fn corpus_lines_as_values_match_mask_text_line_by_line() {
        // Thousands of values (planted secrets, decoys) analysed together in one detection
        // buffer give exactly what `mask_text` gives for each value alone.
        let m = masker();
        let c = corpus::generate(11, 300_000);
        let lines: Vec<&str> = c.text.lines().collect();
        let body = serde_json::to_string(&lines).unwrap_or_default();
        for sizes in [vec![body.len()], vec![4096], vec![997, 13]] {
            let (out, invalid) = run_chunks(&m, &[], body.as_bytes(), &sizes);
            assert!(!invalid);
            let got: Vec<String> = serde_json::from_slice(&out).expect("valid JSON");
            assert_eq!(got.len(), lines.len());
            let mut want_stats = Stats::default();
            for (g, l) in got.iter().zip(&lines) {
                let want = m.audit_scope().mask_text(l, &mut want_stats);
                assert_eq!(g, &want, "{l}");
            }
            let mut st = Stats::default();
            let mut jm = JsonMasker::new(m.audit_scope(), Vec::new());
            jm.push(body.as_bytes(), &mut st);
            jm.finish(&mut st);
            assert_eq!(st, want_stats);
        }
    }

    #[test]
    fn literals_at_the_edges_of_values_are_found_as_in_each_value_alone() {
        // The literal anchors of all the values of a push are found in one search; an anchor
        // that starts in one value and would end in the next must not count, and one that
        // starts or ends a value must.
        let m = masker();
        let values = [
            "x AKIA",
            "IOSFODNN7EXAMPL2 y",
            "AKIAIOSFODNN7EXAMPL2",
            "see AKIAIOSFODNN7EXAMPL2",
            "ghp_",
            "ghp_0123456789abcdefghijABCDEFGHIJ012345",
            "password",
            "=hunter2hunter2",
            "password=hunter2hunter2",
            "https://",
            "admin:s3cr3tP4ss@db.example.com:5432/app and more",
            "-----BEGIN ",
            "Bearer ",
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.c2lnbmF0dXJlX2hlcmVfMTIz",
        ];
        let body = serde_json::to_string(&values).unwrap_or_default();
        for sizes in [vec![body.len()], vec![7], vec![64, 3]] {
            let (out, invalid) = run_chunks(&m, &[], body.as_bytes(), &sizes);
            assert!(!invalid);
            let got: Vec<String> = serde_json::from_slice(&out).expect("valid JSON");
            assert_eq!(got.len(), values.len());
            for (g, v) in got.iter().zip(&values) {
                let want = m.audit_scope().mask_text(v, &mut Stats::default());
                assert_eq!(g, &want, "{v}");
            }
            assert!(got[2].contains("[REDACTED:"), "{}", got[2]);
            assert_eq!(got[0], "x AKIA");
        }
    }

    #[test]
    fn structural_json_corpus_lines_are_masked() {
        // The corpus's JSON samples as real members (`"password": "…"` is a key and a value).
        let m = masker();
        for (i, d) in Detector::ALL.iter().enumerate() {
            if matches!(d, Detector::PrivateKey) {
                continue;
            }
            let sample = corpus::sample(*d, 77 + i as u64, Style::Json);
            let body = if sample.text.starts_with('{') {
                sample.text.clone()
            } else {
                format!("{{{}}}", sample.text)
            };
            let v: serde_json::Value = match serde_json::from_str(&body) {
                Ok(v) => v,
                Err(e) => panic!("{d:?}: sample is not JSON: {e}: {body}"),
            };
            drop(v);
            let (out, invalid) = run_chunks(&m, &[], body.as_bytes(), &[3, 1, 7]);
            assert!(!invalid, "{d:?}");
            let t = s(&out);
            for secret in sample.secrets() {
                assert!(!t.contains(secret), "{d:?}: {secret} survives in {t}");
            }
            serde_json::from_slice::<serde_json::Value>(&out).expect("valid JSON");
        }
    }

    #[test]
    fn label_keys_mask_their_values() {
        let m = masker();
        let input = r#"{"password": "hunter2hunter2", "client_secret": "Zx8Qw2Lp9Rt4Vb7N", "token_count": "12", "db": {"PASSWORD": "a\"b c"}, "private_key_id": "0123456789abcdef0123456789abcdef01234567"}"#;
        every_split(&m, &[], input, |out| {
            let t = s(out);
            assert!(!t.contains("hunter2hunter2"), "{t}");
            assert!(!t.contains("Zx8Qw2Lp9Rt4Vb7N"), "{t}");
            assert!(!t.contains("a\\\"b c"), "{t}");
            assert!(
                !t.contains("0123456789abcdef0123456789abcdef01234567"),
                "{t}"
            );
            assert!(t.contains(r#""token_count": "12""#), "{t}");
            serde_json::from_slice::<serde_json::Value>(out).expect("valid JSON");
        });
    }

    #[test]
    fn a_value_is_masked_alone_whatever_shares_its_push() {
        // Fuzz finding (regressions/json_stream/unclosed-quote-*): a labelled secret with an
        // unclosed quote is masked to the end of its value, as `mask_text` masks it; analysed
        // together with the next value of the same push, the separator's line end made the label
        // look unterminated and the value passed.
        let m = masker();
        let masked = |v: &str| m.mask_text(v, &mut Stats::default()).into_owned();
        assert_eq!(
            masked("password: \"hunter2xyz"),
            "password: \"[REDACTED:generic_secret]"
        );
        for (input, values) in [
            (
                r#"["password: \"hunter2xyz", "another string here"]"#,
                vec!["password: \"hunter2xyz", "another string here"],
            ),
            (
                r#"["token:\"Al+ient_s", 4111111111111111]"#,
                vec!["token:\"Al+ient_s", "4111111111111111"],
            ),
            (
                r#"{"a": "secret='Zx8Qw2Lp9Rt4", "b": "ok", "c": "x@example.com"}"#,
                vec!["secret='Zx8Qw2Lp9Rt4", "ok", "x@example.com"],
            ),
        ] {
            every_split(&m, &[], input, |out| {
                let v: serde_json::Value = serde_json::from_slice(out).expect("valid JSON");
                let got: Vec<String> = match &v {
                    serde_json::Value::Array(a) => a.iter().map(json_text).collect(),
                    serde_json::Value::Object(o) => o.values().map(json_text).collect(),
                    _ => unreachable!(),
                };
                let want: Vec<String> = values.iter().map(|x| masked(x)).collect();
                assert_eq!(got, want, "{input}");
            });
        }
    }

    fn json_text(v: &serde_json::Value) -> String {
        match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    }

    #[test]
    fn field_paths() {
        let m = masker();
        let p = paths(&["$.users[*].email", "$..password", "$.a.b", "$.t"]);
        let input = r#"{"users": [{"email": "x", "name": "ann"}, {"email": 5, "e": "k"}],
            "deep": {"x": [{"password": {"n": [1, "s"]}}]}, "password": true,
            "a": {"b": null, "c": {"b": "keep"}}, "b": "keep2", "t": [1, [2]], "u": "keep3"}"#;
        every_split(&m, &p, input, |out| {
            let v: serde_json::Value = serde_json::from_slice(out).expect("valid JSON");
            let f = "[REDACTED:field]";
            assert_eq!(v["users"][0]["email"], f);
            assert_eq!(v["users"][1]["email"], f);
            assert_eq!(v["users"][0]["name"], "ann");
            assert_eq!(v["users"][1]["e"], "k");
            assert_eq!(v["deep"]["x"][0]["password"], f);
            assert_eq!(v["password"], f);
            assert_eq!(v["a"]["b"], f);
            assert_eq!(v["a"]["c"]["b"], "keep");
            assert_eq!(v["b"], "keep2");
            assert_eq!(v["t"], f);
            assert_eq!(v["u"], "keep3");
        });
        let mut st = Stats::default();
        let mut jm = JsonMasker::new(m.audit_scope(), p.clone());
        jm.push(input.as_bytes(), &mut st);
        jm.finish(&mut st);
        assert_eq!(st.columns(), 6);
        // Non-matching paths leave the input byte-identical.
        let other = paths(&["$.nope", "$..zzz", "$.users[5].email", "$.a.b.c"]);
        let (out, _) = run_whole(&m, &other, input.as_bytes());
        assert_eq!(s(&out), input);
        // The root itself.
        let (out, _) = run_whole(&m, &paths(&["$"]), b" {\"a\": 1} ");
        assert_eq!(s(&out), " \"[REDACTED:field]\" ");
    }

    #[test]
    fn escapes_are_decoded_for_the_detectors() {
        let m = masker();
        // `AKIA…` written with \u escapes, and an e-mail split by an escaped slash.
        let input = r#"{"a": "key \u0041\u004BIAIOSFODNN7EXAMPL2 end", "b": "to alice\u002esmith@example.com", "c": "tab\there \ud83d\ude00"}"#;
        every_split(&m, &[], input, |out| {
            let t = s(out);
            assert!(t.contains("[REDACTED:aws_access_key_id]"), "{t}");
            assert!(t.contains("[REDACTED:email]"), "{t}");
            assert!(t.contains(r#""c": "tab\there \ud83d\ude00""#), "{t}");
            let v: serde_json::Value = serde_json::from_slice(out).expect("valid JSON");
            assert_eq!(v["a"], "key [REDACTED:aws_access_key_id] end");
        });
        // Re-encoding keeps other characters intact.
        let input =
            "{\"a\": \"line1\\nAKIAIOSFODNN7EXAMPL2 \\\"q\\\" \\\\ \\u0001 é \\ud83d\\ude00\"}";
        let (out, _) = run_whole(&m, &[], input.as_bytes());
        let v: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
        assert_eq!(
            v["a"],
            "line1\n[REDACTED:aws_access_key_id] \"q\" \\ \u{1} é 😀"
        );
    }

    #[test]
    fn numbers_that_are_card_numbers() {
        let m = masker();
        let input = r#"{"card": 4111111111111111, "ts": 1700000000000, "x": 4111111111111111.5}"#;
        every_split(&m, &[], input, |out| {
            let v: serde_json::Value = serde_json::from_slice(out).expect("valid JSON");
            assert_eq!(v["card"], "[REDACTED:credit_card]");
            assert_eq!(v["ts"], 1_700_000_000_000u64);
        });
    }

    #[test]
    fn invalid_json_is_masked_as_text() {
        let m = masker();
        for input in [
            r#"{"a": 1} password=hunter2hunter2 AKIAIOSFODNN7EXAMPL2"#,
            r#"{"a": AKIAIOSFODNN7EXAMPL2}"#,
            r#"{"a": "AKIAIOSFODNN7EXAMPL2 unterminated"#,
            "{\"a\": \"ctl \u{1} AKIAIOSFODNN7EXAMPL2\"}",
            r#"{"a": "bad \q escape AKIAIOSFODNN7EXAMPL2"}"#,
            r#"[1, 2,, "AKIAIOSFODNN7EXAMPL2"]"#,
            r#"{"a" "AKIAIOSFODNN7EXAMPL2"}"#,
            r#"nul AKIAIOSFODNN7EXAMPL2"#,
            r#"{"a": 01, "b": "AKIAIOSFODNN7EXAMPL2"}"#,
        ] {
            every_split(&m, &[], input, |out| {
                let t = s(out);
                assert!(!t.contains("AKIAIOSFODNN7EXAMPL2"), "{input}: {t}");
            });
            let (_, invalid) = run_whole(&m, &[], input.as_bytes());
            assert!(invalid, "{input}");
        }
        // Invalid UTF-8 in a string.
        let mut b = br#"{"a": "x "#.to_vec();
        b.push(0xff);
        b.extend_from_slice(br#" AKIAIOSFODNN7EXAMPL2"}"#);
        let (out, invalid) = run_chunks(&m, &[], &b, &[1]);
        assert!(invalid);
        assert!(!s(&out).contains("AKIAIOSFODNN7EXAMPL2"));
        // Truncated structure is invalid but loses nothing.
        let (out, invalid) = run_whole(&m, &[], br#"{"a": [1, 2"#);
        assert!(invalid);
        assert_eq!(s(&out), r#"{"a": [1, 2"#);
    }

    #[test]
    fn json_lines_are_accepted() {
        let m = masker();
        let input = "{\"a\": 1}\n{\"b\": \"AKIAIOSFODNN7EXAMPL2\"}\n[2]\n";
        let (out, invalid) = run_chunks(&m, &[], input.as_bytes(), &[5]);
        assert!(!invalid);
        assert_eq!(
            s(&out),
            "{\"a\": 1}\n{\"b\": \"[REDACTED:aws_access_key_id]\"}\n[2]\n"
        );
    }

    #[test]
    fn clear_scope_passes_everything() {
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
        let mut jm = JsonMasker::new(scope, paths(&["$.a"]));
        let mut st = Stats::default();
        let mut out = jm.push(br#"{"a": "AKIAIOSFODNN7EXAMPL2"} junk"#, &mut st);
        out.extend(jm.finish(&mut st));
        assert_eq!(s(&out), r#"{"a": "AKIAIOSFODNN7EXAMPL2"} junk"#);
        assert_eq!(st.total(), 0);
    }

    #[test]
    fn long_strings_are_masked_in_pieces_with_bounded_hold() {
        let m = masker();
        let n = JsonMasker::MAX_STRING_HOLD + 5000;
        let mut v = "lorem ipsum ".repeat(n / 12);
        v.insert_str(100, " AKIAIOSFODNN7EXAMPL2 ");
        v.push_str(" tail AKIAIOSFODNN7EXAMPL3 \\n end é");
        let body = format!("{{\"big\": \"{v}\", \"k\": 1}}");
        let mut jm = JsonMasker::new(m.audit_scope(), Vec::new());
        let mut st = Stats::default();
        let mut out = Vec::new();
        let mut max_pending = 0;
        for c in body.as_bytes().chunks(4093) {
            out.extend(jm.push(c, &mut st));
            max_pending = max_pending.max(jm.pending());
        }
        out.extend(jm.finish(&mut st));
        assert!(!jm.invalid());
        assert!(
            max_pending <= JsonMasker::MAX_STRING_HOLD + 4093 + m.max_holdback(),
            "{max_pending}"
        );
        let t = s(&out);
        assert!(!t.contains("AKIAIOSFODNN7EXAMPL2"));
        assert!(!t.contains("AKIAIOSFODNN7EXAMPL3"));
        let parsed: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
        assert_eq!(parsed["k"], 1);
        assert!(parsed["big"]
            .as_str()
            .is_some_and(|b| b.ends_with("tail [REDACTED:aws_access_key_id] \n end é")));
        // A long value under a label key is replaced whole.
        let body = format!("{{\"password\": \"{}\"}}", "Zx8Qw2Lp9Rt4".repeat(n / 12));
        let (out, invalid) = run_chunks(&m, &[], body.as_bytes(), &[65536]);
        assert!(!invalid);
        let t = s(&out);
        assert!(
            t == r#"{"password": "[REDACTED:generic_secret]"}"#,
            "{}",
            &t[..80]
        );
    }

    #[test]
    fn long_keys_and_long_redacted_values_are_not_held() {
        let m = masker();
        let n = JsonMasker::MAX_STRING_HOLD + 1000;
        let key = "k".repeat(n);
        let secret = format!("x {} y", "AKIAIOSFODNN7EXAMPL2");
        let body = format!(
            "{{\"{key}\": \"{secret}\", \"p\": \"{}\", \"q\": 1}}",
            "z".repeat(n)
        );
        let p = paths(&["$.p"]);
        let mut jm = JsonMasker::new(m.audit_scope(), p);
        let mut st = Stats::default();
        let mut out = Vec::new();
        let mut max_pending = 0;
        for c in body.as_bytes().chunks(65536) {
            out.extend(jm.push(c, &mut st));
            max_pending = max_pending.max(jm.pending());
        }
        out.extend(jm.finish(&mut st));
        assert!(!jm.invalid());
        assert!(
            max_pending <= JsonMasker::MAX_STRING_HOLD + 65536,
            "{max_pending}"
        );
        let v: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
        assert_eq!(v[key.as_str()], "x [REDACTED:aws_access_key_id] y");
        assert_eq!(v["p"], "[REDACTED:field]");
        assert_eq!(v["q"], 1);
    }

    #[test]
    fn strategies_apply_to_values() {
        let cfg = MaskConfig {
            default_strategy: crate::mask::Strategy::Hash,
            ..MaskConfig::default()
        };
        let m = Masker::new(&cfg).expect("config");
        let input = r#"{"a": "AKIAIOSFODNN7EXAMPL2", "password": "hunter2hunter2"}"#;
        every_split(&m, &[], input, |out| {
            let v: serde_json::Value = serde_json::from_slice(out).expect("valid JSON");
            for k in ["a", "password"] {
                let s = v[k].as_str().unwrap_or_default();
                assert!(s.starts_with("h:") && s.len() == 18, "{k}: {s}");
            }
        });
    }

    /// Random JSON values with random whitespace between tokens.
    fn arb_json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<i64>().prop_map(|n| serde_json::json!(n)),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| serde_json::json!(f)),
            "[a-zA-Z0-9 _.,:/\\-\"\\\\\n\t\u{e9}\u{1F600}]{0,24}"
                .prop_map(serde_json::Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
                prop::collection::vec(("[a-z_\u{e9}\"]{0,8}", inner), 0..6)
                    .prop_map(|kv| { serde_json::Value::Object(kv.into_iter().collect()) }),
            ]
        })
    }

    /// Insert whitespace after structural characters, chosen by `ws`.
    fn spread(json: &str, ws: &[u8]) -> String {
        let mut out = String::new();
        let mut in_str = false;
        let mut esc = false;
        let mut k = 0;
        for c in json.chars() {
            out.push(c);
            if in_str {
                if esc {
                    esc = false;
                } else if c == '\\' {
                    esc = true;
                } else if c == '"' {
                    in_str = false;
                }
                continue;
            }
            if c == '"' {
                in_str = true;
            } else if matches!(c, '{' | '[' | ',' | ':') {
                let w = ws.get(k % ws.len().max(1)).copied().unwrap_or(0);
                k += 1;
                out.push_str(match w % 4 {
                    0 => "",
                    1 => " ",
                    2 => "\n  ",
                    _ => "\t\r\n",
                });
            }
        }
        out
    }

    proptest! {
        // No regression files: a failure prints its minimal input.
        #![proptest_config(ProptestConfig {
            cases: 256,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn random_json_is_unchanged(
            v in arb_json(),
            ws in prop::collection::vec(any::<u8>(), 1..16),
            sizes in prop::collection::vec(1usize..40, 1..8),
        ) {
            let m = masker();
            let body = spread(&serde_json::to_string(&v).unwrap_or_default(), &ws);
            prop_assume!(m.find(&body).is_empty());
            let (out, invalid) = run_chunks(&m, &[], body.as_bytes(), &sizes);
            prop_assert!(!invalid);
            prop_assert_eq!(s(&out), body);
        }

        #[test]
        fn samples_are_masked_for_random_chunkings(
            d in 0usize..Detector::ALL.len(),
            seed in any::<u64>(),
            style in prop_oneof![Just(Style::Log), Just(Style::Json), Just(Style::Csv)],
            sizes in prop::collection::vec(1usize..64, 1..8),
        ) {
            let m = masker();
            let sample = corpus::sample(Detector::ALL[d], seed, style);
            let body = serde_json::to_string(&serde_json::json!([1, {"x": sample.text}]))
                .unwrap_or_default();
            let (out, invalid) = run_chunks(&m, &[], body.as_bytes(), &sizes);
            prop_assert!(!invalid);
            let v: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
            let got = v[1]["x"].as_str().unwrap_or_default().to_string();
            let mut want_stats = Stats::default();
            let want = m.audit_scope().mask_text(&sample.text, &mut want_stats).into_owned();
            prop_assert_eq!(&got, &want);
            let mut jm = JsonMasker::new(m.audit_scope(), Vec::new());
            let mut got_stats = Stats::default();
            jm.push(body.as_bytes(), &mut got_stats);
            jm.finish(&mut got_stats);
            prop_assert_eq!(got_stats, want_stats);
            for secret in sample.secrets() {
                prop_assert!(!got.contains(secret));
            }
        }

        #[test]
        fn arbitrary_bytes_do_not_panic(
            b in prop::collection::vec(any::<u8>(), 0..400),
            sizes in prop::collection::vec(1usize..50, 1..6),
        ) {
            let m = masker();
            let p = paths(&["$.a", "$..b[*]"]);
            let _ = run_chunks(&m, &p, &b, &sizes);
        }

        #[test]
        fn json_like_bytes_do_not_panic_and_never_leak(
            parts in prop::collection::vec(prop_oneof![
                Just("{".to_string()), Just("}".to_string()), Just("[".to_string()),
                Just("]".to_string()), Just(",".to_string()), Just(":".to_string()),
                Just("\"".to_string()), Just("\\".to_string()), Just("\\u00".to_string()),
                Just("1".to_string()), Just("true".to_string()), Just(" ".to_string()),
                // After a colon: a value or not JSON (keys are never masked).
                Just(": \" AKIAIOSFODNN7EXAMPL2 ".to_string()), "[a-z]{1,4}",
            ], 0..40),
            sizes in prop::collection::vec(1usize..20, 1..6),
        ) {
            let m = masker();
            let body = parts.concat();
            let (out, _) = run_chunks(&m, &paths(&["$.a"]), body.as_bytes(), &sizes);
            prop_assert!(!s(&out).contains("AKIAIOSFODNN7EXAMPL2"), "{} -> {}", body, s(&out));
        }

        #[test]
        fn valid_input_gives_valid_output(
            v in arb_json(),
            d in 0usize..Detector::ALL.len(),
            seed in any::<u64>(),
            sizes in prop::collection::vec(1usize..40, 1..8),
        ) {
            let m = masker();
            let sample = corpus::sample(Detector::ALL[d], seed, Style::Log);
            let body = serde_json::to_string(&serde_json::json!({"v": v, "s": sample.text, "w": [v]}))
                .unwrap_or_default();
            let (out, invalid) = run_chunks(&m, &paths(&["$.w[0]"]), body.as_bytes(), &sizes);
            prop_assert!(!invalid);
            let parsed: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
            prop_assert_eq!(&parsed["w"][0], "[REDACTED:field]");
            for secret in sample.secrets() {
                prop_assert!(!s(&out).contains(secret));
            }
        }
    }

    #[test]
    fn a_redacted_value_never_leaks_when_the_body_breaks_inside_it() {
        // fuzz/regressions/json_stream/token-field-leaks-on-control-char
        let m = Masker::new(&MaskConfig::default()).unwrap();
        let body: &[u8] =
            b"{\"user\": \"bob\", \"token\": \"s3cr3t-v4lue-Zq9\x01\", \"note\": \"x\"}";
        for chunk in [body.len(), 1, 7] {
            let mut j = JsonMasker::new(m.scope("c", &[]), vec!["$.token".parse().unwrap()]);
            let mut stats = Stats::default();
            let mut out = Vec::new();
            for c in body.chunks(chunk) {
                out.extend(j.push(c, &mut stats));
            }
            out.extend(j.finish(&mut stats));
            let text = String::from_utf8_lossy(&out);
            assert!(!text.contains("s3cr3t"), "chunk {chunk}: {text}");
            assert!(j.invalid());
        }
    }
}
