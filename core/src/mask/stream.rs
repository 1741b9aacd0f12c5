//! Streaming masking for SSE / LLM token streams, where chunk boundaries fall anywhere.
//!
//! The stream keeps a buffer: already released text it still needs as look-behind (at most
//! `ctx_keep` bytes) followed by the pending, unreleased text. Each push runs the same analysis
//! as [`super::Masker::mask_text`] over the pending part with "more may follow" set. Every
//! confirmation reads a bounded window around its trigger; a window that reaches past the buffer
//! reports that it needs more, and the analysis returns a *frontier*: the lowest position where a
//! match that is not decided yet could start (an undecided trigger, a literal anchor that may be
//! starting in the last bytes, an e-mail local part or an IBAN/phone lead at the very end).
//! Everything before the frontier is final: it is released, with the matches that start there
//! replaced, and a released match may end beyond the frontier.
//!
//! Because decided windows see exactly the bytes `mask_text` would see, the concatenated output
//! equals `mask_text` of the whole input for every chunking (tests check every split offset).
//!
//! Hold-back bound: after `push` returns at most [`StreamMasker::max_holdback`] bytes are
//! pending. It is the longest window of an enabled detector, plus 4: with every detector
//! enabled, the PEM private-key cap (16 KiB) dominates; without `private_key`,
//! `gcp_service_account_key`, `http_auth` and `jwt` it is under 1 KiB. In practice much less is
//! held: only from the start of a possible match, so plain prose is released up to its last word.

use std::sync::Arc;

use super::detect::{Cand, Trig};
use super::{Inner, Stats};

/// Masks a stream chunk by chunk; see the module documentation for the guarantees.
pub struct StreamMasker {
    inner: Arc<Inner>,
    clear: bool,
    /// Look-behind context (already released) followed by the pending text.
    buf: String,
    /// Start of the pending text in `buf`.
    released: usize,
    /// Start of the current gap: the end of the last replaced match (see `resolve`).
    open: usize,
    cands: Vec<Cand>,
    /// The triggers evaluated in the last gap (see `Engine::hold`).
    recs: Vec<Trig>,
}

impl std::fmt::Debug for StreamMasker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamMasker")
            .field("clear", &self.clear)
            .field("pending", &self.pending())
            .finish_non_exhaustive()
    }
}

impl StreamMasker {
    pub(crate) fn new(inner: Arc<Inner>, clear: bool) -> StreamMasker {
        StreamMasker {
            inner,
            clear,
            buf: String::new(),
            released: 0,
            open: 0,
            cands: Vec::new(),
            recs: Vec::new(),
        }
    }

    /// Add a chunk; returns the text that is safe to release now (possibly empty).
    pub fn push(&mut self, chunk: &str, stats: &mut Stats) -> String {
        if self.clear {
            return chunk.to_owned();
        }
        self.buf.push_str(chunk);
        self.step(true, stats)
    }

    /// The stream ended: release everything that is left. The masker can then start a new stream.
    pub fn finish(&mut self, stats: &mut Stats) -> String {
        if self.clear {
            return String::new();
        }
        let out = self.step(false, stats);
        self.buf.clear();
        self.released = 0;
        self.open = 0;
        out
    }

    /// Bytes received but not released yet.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.released
    }

    /// The most bytes that can be pending after [`push`](Self::push) returns.
    pub fn max_holdback(&self) -> usize {
        if self.clear {
            0
        } else {
            self.inner.engine().holdback()
        }
    }

    fn step(&mut self, more: bool, stats: &mut Stats) -> String {
        let from = self.released;
        let n = self.buf.len();
        if from == n {
            return String::new();
        }
        let engine = self.inner.engine();
        self.cands.clear();
        let text = self.buf.as_bytes();
        let r = engine.resolve(text, self.open, from, more, &mut self.cands, &mut self.recs);
        let mut upto = if more {
            engine.hold(&self.recs, r.open, from, r.frontier)
        } else {
            n
        };
        upto = upto.clamp(from, n);
        while !self.buf.is_char_boundary(upto) {
            upto -= 1;
        }
        // Every replaced match ends at or before the start of the open gap, which is decided.
        debug_assert!(self
            .cands
            .iter()
            .all(|c| c.mstart >= from && c.mend <= upto));
        self.cands.retain(|c| c.mstart >= from && c.mend <= upto);
        let mut out = String::with_capacity(self.inner.rendered_len(upto - from, &self.cands));
        self.inner
            .render(&self.buf, from, upto, &self.cands, &mut out, stats);
        self.released = upto;
        self.open = r.open.min(upto).max(self.open);
        // Drop released text beyond the look-behind context (in blocks, to move bytes rarely).
        let mut cut = self.released.saturating_sub(engine.ctx_keep());
        if cut >= 4096 || (cut > 0 && cut * 2 >= self.buf.len()) {
            while !self.buf.is_char_boundary(cut) {
                cut -= 1;
            }
            self.buf.drain(..cut);
            self.released -= cut;
            self.open = self.open.saturating_sub(cut);
        }
        out
    }
}
