//! The masking engine every protocol edge uses on responses.
//!
//! ```text
//!  MaskConfig ──Masker::new──▶ Masker (compiled, Arc inside, Clone is cheap)
//!                                 │ scope(connection, groups)
//!                                 ▼
//!                               Scope ── clear? (an exemption matched) ──▶ everything passes
//!                                 │
//!          ┌──────────────────────┼───────────────────────────┐
//!   mask_value(column, value)  mask_text(text)           stream() ─▶ StreamMasker
//!   column rules, then the     content detectors          push(chunk) / finish()
//!   content detectors          (Cow::Borrowed when         same result as mask_text,
//!   (Unchanged | Text | Null)   nothing matched)           bounded hold-back
//! ```
//!
//! Detection is two cheap passes (an Aho-Corasick automaton over literal anchors, and a byte loop
//! for digit runs and `@`) and a confirmation (regex, checksum, structure) on a bounded window
//! around each trigger only; see [`detect`] and `docs/masking.md`. Overlapping matches are
//! resolved left to right: the earliest start wins, then the longest, then the detector order of
//! [`Detector::ALL`]; the text around a replaced match is then looked at again as it will be
//! written, so that what a replacement uncovers is masked too (see [`resolve`]).
//!
//! [`Stats`] counts what was masked per detector; it never holds a value.

mod checks;
mod config;
pub mod corpus;
mod detect;
mod json_stream;
mod resolve;
mod sse;
mod stream;

#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

pub use checks::{dni_letter, iban_check_digits, luhn_check_digit};
pub use config::{ColumnRule, Exemption, MaskConfig, MaskConfigError, Strategy};
pub use detect::{Detector, DETECTOR_COUNT, JWT_CAP, PEM_CAP};
pub use json_stream::{JsonMasker, JsonPath};
pub use sse::{SseMasker, SseMode};
pub use stream::StreamMasker;

use config::{glob, ColumnPattern};
use detect::{Cand, Engine};

/// The demo HMAC key's seed. Anyone can derive this key, so hashes made with it protect nothing:
/// set `hash_key` in production ([`Masker::demo_key_in_use`] tells).
const DEMO_KEY_SEED: &[u8] = b"custos masking demo key - set masking.hash_key in production";

/// A compiled masking configuration. Cloning shares the compiled state.
#[derive(Clone)]
pub struct Masker {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    engine: Engine,
    detectors: Vec<Detector>,
    strategies: [Strategy; DETECTOR_COUNT],
    columns: Vec<(ColumnPattern, Strategy)>,
    exempt: Vec<Exemption>,
    key: Vec<u8>,
    demo_key: bool,
}

impl std::fmt::Debug for Masker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Masker")
            .field("detectors", &self.inner.detectors)
            .field("columns", &self.inner.columns.len())
            .field("exempt", &self.inner.exempt)
            .field("demo_key", &self.inner.demo_key)
            .finish_non_exhaustive()
    }
}

fn detector_names() -> String {
    Detector::ALL
        .iter()
        .map(|d| d.name())
        .collect::<Vec<_>>()
        .join(", ")
}

fn lookup(field: String, name: &str) -> Result<Detector, MaskConfigError> {
    Detector::from_name(name).ok_or_else(|| {
        MaskConfigError::new(
            field,
            format!("unknown detector {name:?} (known: {})", detector_names()),
        )
    })
}

impl Masker {
    /// Compile a configuration. Errors name the offending field.
    pub fn new(cfg: &MaskConfig) -> Result<Masker, MaskConfigError> {
        let mut detectors: Vec<Detector> = if cfg.detectors.is_empty() {
            Detector::ALL.to_vec()
        } else {
            let mut v = Vec::new();
            for (i, n) in cfg.detectors.iter().enumerate() {
                let d = lookup(format!("detectors[{i}]"), n)?;
                if !v.contains(&d) {
                    v.push(d);
                }
            }
            v
        };
        for (i, n) in cfg.disable.iter().enumerate() {
            let d = lookup(format!("disable[{i}]"), n)?;
            detectors.retain(|x| *x != d);
        }
        detectors.sort();
        let mut strategies = [cfg.default_strategy; DETECTOR_COUNT];
        for (name, s) in &cfg.strategies {
            let d = lookup(format!("strategies.{name}"), name)?;
            strategies[d.index()] = *s;
        }
        let mut columns = Vec::new();
        for (i, rule) in cfg.columns.iter().enumerate() {
            let p = ColumnPattern::parse(&rule.pattern)
                .map_err(|e| MaskConfigError::new(format!("columns[{i}].pattern"), e))?;
            columns.push((p, rule.strategy.unwrap_or(cfg.default_strategy)));
        }
        for (i, e) in cfg.exempt.iter().enumerate() {
            if e.connection.trim().is_empty() {
                return Err(MaskConfigError::new(
                    format!("exempt[{i}].connection"),
                    "empty; name a connection or use \"*\"",
                ));
            }
            if e.groups.is_empty() {
                return Err(MaskConfigError::new(
                    format!("exempt[{i}].groups"),
                    "empty; list the groups that see clear data, or [\"*\"] for everyone",
                ));
            }
            if let Some(j) = e.groups.iter().position(|g| g.trim().is_empty()) {
                return Err(MaskConfigError::new(
                    format!("exempt[{i}].groups[{j}]"),
                    "empty group name",
                ));
            }
        }
        let (key, demo_key) = match &cfg.hash_key {
            Some(h) => {
                let k = hex::decode(h.trim())
                    .map_err(|e| MaskConfigError::new("hash_key", format!("not hex ({e})")))?;
                if k.len() < 16 {
                    return Err(MaskConfigError::new(
                        "hash_key",
                        format!("{} bytes; use at least 16 (32 hex digits)", k.len()),
                    ));
                }
                (k, false)
            }
            None => (Sha256::digest(DEMO_KEY_SEED).to_vec(), true),
        };
        Ok(Masker {
            inner: Arc::new(Inner {
                engine: Engine::new(&detectors),
                detectors,
                strategies,
                columns,
                exempt: cfg.exempt.clone(),
                key,
                demo_key,
            }),
        })
    }

    /// The masking that applies to `groups` on `connection`.
    pub fn scope(&self, connection: &str, groups: &[String]) -> Scope<'_> {
        let clear = self.inner.exempt.iter().any(|e| {
            glob(&e.connection, connection, false)
                && e.groups
                    .iter()
                    .any(|g| g == "*" || groups.iter().any(|u| u == g))
        });
        Scope {
            masker: self,
            clear,
        }
    }

    /// The scope audit records use: never exempt, so clear data a `dba` may see on screen is
    /// still masked in the audit log.
    pub fn audit_scope(&self) -> Scope<'_> {
        Scope {
            masker: self,
            clear: false,
        }
    }

    /// Mask free text with no exemption applied (tools, tests, `custos mask`).
    pub fn mask_text<'t>(&self, text: &'t str, stats: &mut Stats) -> Cow<'t, str> {
        self.inner.mask_text(text, stats)
    }

    /// Where the detectors match in `text` (the replaced spans), without masking.
    pub fn find(&self, text: &str) -> Vec<Finding> {
        let mut cands = Vec::new();
        self.inner
            .engine
            .resolve(text.as_bytes(), 0, 0, false, &mut cands, &mut Vec::new());
        cands
            .iter()
            .map(|c| Finding {
                detector: c.kind,
                start: c.mstart,
                end: c.mend,
            })
            .collect()
    }

    /// The enabled detectors.
    pub fn detectors(&self) -> &[Detector] {
        &self.inner.detectors
    }

    /// True when no `hash_key` was configured and hashes use the built-in demo key.
    pub fn demo_key_in_use(&self) -> bool {
        self.inner.demo_key
    }

    /// A streaming masker with no exemption applied.
    pub fn stream(&self) -> StreamMasker {
        StreamMasker::new(self.inner.clone(), false)
    }

    /// The most bytes a [`StreamMasker`] of this configuration holds back after a push.
    pub fn max_holdback(&self) -> usize {
        self.inner.engine.holdback()
    }
}

/// A detector match found by [`Masker::find`]: the byte span that would be replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Finding {
    pub detector: Detector,
    pub start: usize,
    pub end: usize,
}

/// Masking for one caller on one connection.
#[derive(Clone, Copy, Debug)]
pub struct Scope<'a> {
    masker: &'a Masker,
    clear: bool,
}

/// The result of masking one column value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Masked {
    /// Send the value as it is.
    Unchanged,
    /// Send this instead.
    Text(String),
    /// Send SQL NULL instead.
    Null,
}

impl Scope<'_> {
    /// True when an exemption gives this caller clear data (nothing is masked).
    pub fn is_clear(&self) -> bool {
        self.clear
    }

    /// Mask one column value of a result row. `column` is `(table, column name)` when the
    /// protocol knows it; `table` is `schema.table` or `table`, or `None` for a computed column.
    /// Column rules come first (first match wins); otherwise the content detectors run on the
    /// value, and a match whose strategy is `null` turns the whole value into NULL.
    pub fn mask_value(
        &self,
        column: Option<(Option<&str>, &str)>,
        value: &str,
        stats: &mut Stats,
    ) -> Masked {
        if self.clear {
            return Masked::Unchanged;
        }
        let inner = &self.masker.inner;
        if let Some((table, name)) = column {
            if let Some((_, strategy)) = inner.columns.iter().find(|(p, _)| p.matches(table, name))
            {
                stats.columns += 1;
                return match strategy {
                    Strategy::Null => Masked::Null,
                    s => {
                        let mut out = String::new();
                        inner.replace(*s, "column", value, &mut out);
                        Masked::Text(out)
                    }
                };
            }
        }
        let mut cands = Vec::new();
        inner
            .engine
            .resolve(value.as_bytes(), 0, 0, false, &mut cands, &mut Vec::new());
        if cands.is_empty() {
            return Masked::Unchanged;
        }
        if cands
            .iter()
            .any(|c| inner.strategies[c.kind.index()] == Strategy::Null)
        {
            for c in &cands {
                stats.add(c.kind);
            }
            return Masked::Null;
        }
        let mut out = String::with_capacity(value.len() + 16);
        inner.render(value, 0, value.len(), &cands, &mut out, stats);
        Masked::Text(out)
    }

    /// Mask free text (log lines, JSON text, a whole file). Borrowed when nothing matched.
    pub fn mask_text<'t>(&self, text: &'t str, stats: &mut Stats) -> Cow<'t, str> {
        if self.clear {
            return Cow::Borrowed(text);
        }
        self.masker.inner.mask_text(text, stats)
    }

    /// A streaming masker for this scope (owned; it shares the compiled configuration).
    pub fn stream(&self) -> StreamMasker {
        StreamMasker::new(self.masker.inner.clone(), self.clear)
    }
}

impl Inner {
    fn mask_text<'t>(&self, text: &'t str, stats: &mut Stats) -> Cow<'t, str> {
        let mut cands = Vec::new();
        self.engine
            .resolve(text.as_bytes(), 0, 0, false, &mut cands, &mut Vec::new());
        if cands.is_empty() {
            return Cow::Borrowed(text);
        }
        let mut out = String::with_capacity(self.rendered_len(text.len(), &cands));
        self.render(text, 0, text.len(), &cands, &mut out, stats);
        Cow::Owned(out)
    }

    /// An upper bound of the rendered length (so the output is allocated once).
    pub(crate) fn rendered_len(&self, len: usize, accepted: &[Cand]) -> usize {
        accepted.iter().fold(len, |acc, c| {
            let m = c.mend - c.mstart;
            let r = match self.strategies[c.kind.index()] {
                Strategy::Redact | Strategy::Null => 11 + c.kind.name().len(),
                Strategy::Hash => 18,
                Strategy::Partial { .. } => m,
            };
            acc + r.saturating_sub(m)
        })
    }

    /// Copy `text[from..to]` to `out` with the accepted candidates replaced.
    fn render(
        &self,
        text: &str,
        from: usize,
        to: usize,
        accepted: &[Cand],
        out: &mut String,
        stats: &mut Stats,
    ) {
        let mut pos = from;
        for c in accepted {
            out.push_str(&text[pos..c.mstart]);
            self.replace(
                self.strategies[c.kind.index()],
                c.kind.name(),
                &text[c.mstart..c.mend],
                out,
            );
            stats.add(c.kind);
            pos = c.mend;
        }
        out.push_str(&text[pos..to]);
    }

    fn replace(&self, strategy: Strategy, label: &str, value: &str, out: &mut String) {
        match strategy {
            Strategy::Redact | Strategy::Null => {
                out.push_str("[REDACTED:");
                out.push_str(label);
                out.push(']');
            }
            Strategy::Partial { keep } => {
                let n = value.chars().count();
                let shown = if n > keep.saturating_mul(2) { keep } else { 0 };
                out.extend(std::iter::repeat_n('*', n - shown));
                out.extend(value.chars().skip(n - shown));
            }
            Strategy::Hash => {
                out.push_str("h:");
                out.push_str(&self.hash_hex(value));
            }
        }
    }

    fn hash_hex(&self, value: &str) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .expect("HMAC takes keys of any length");
        mac.update(value.as_bytes());
        hex::encode(&mac.finalize().into_bytes()[..8])
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.engine
    }
}

/// Resolve overlaps in place: keep candidates starting in `from..frontier`, then left to right,
/// earliest start first, then the longest, then detector order; drop what overlaps a kept one.
pub(crate) fn select(cands: &mut Vec<Cand>, from: usize, frontier: usize) {
    cands.retain(|c| c.start >= from && c.start < frontier);
    cands.sort_unstable_by(|a, b| {
        a.start
            .cmp(&b.start)
            .then(b.end.cmp(&a.end))
            .then(a.kind.cmp(&b.kind))
    });
    let mut last = from;
    cands.retain(|c| {
        if c.start >= last {
            last = c.end;
            true
        } else {
            false
        }
    });
}

/// How many values each detector masked (and how many column rules applied). Never the values.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    counts: [u64; DETECTOR_COUNT],
    columns: u64,
}

impl Stats {
    pub(crate) fn add(&mut self, d: Detector) {
        self.counts[d.index()] += 1;
    }

    /// Values masked by one detector.
    pub fn get(&self, d: Detector) -> u64 {
        self.counts[d.index()]
    }

    /// Values masked by column rules.
    pub fn columns(&self) -> u64 {
        self.columns
    }

    /// Everything masked.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum::<u64>() + self.columns
    }

    /// Non-zero counts by name (`"column"` for column rules), in detector order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Detector::ALL
            .iter()
            .map(|d| (d.name(), self.counts[d.index()]))
            .chain(std::iter::once(("column", self.columns)))
            .filter(|(_, n)| *n > 0)
    }

    /// Add another set of counts to this one.
    pub fn merge(&mut self, other: &Stats) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.columns += other.columns;
    }
}
