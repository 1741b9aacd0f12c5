//! Which matches are replaced: left to right, each decided in the text as it will be written.
//!
//! A detector decides a match from a window around its trigger, and the window may reach into a
//! neighbouring match. Once that neighbour is replaced the text around it is no longer what the
//! detector saw, so deciding every match in the original text lets glued secrets survive:
//!
//! ```text
//!  -----END PRIVATE KEY-----ivan@example.com   e-mail candidate starts inside the key: dropped
//!  aws_key_id=AKIA…npm_…                        npm token glued to a word character: rejected
//!  Basic ZXJpbjpmb1…MTE=sk-proj-…               the credential runs into the key: not base64
//! ```
//!
//! and masking the output again would find them. [`Engine::resolve`] decides in the text as it
//! will be written instead. A gap is a stretch of unreplaced text; it starts at the start of the
//! text or at the end of a replaced match (read as "no byte", which is how every detector reads a
//! placeholder's `]`), and ends at the end of the text or the start of a replaced match (read as
//! "no byte", which every detector treats like the placeholder's `[`: a URL host may be missing).
//! In a gap:
//!
//! 1. the first match (earliest start, then longest, then detector order) is replaced;
//! 2. **after it** a new gap starts: the triggers whose window reads back into the match are
//!    looked at again (an e-mail whose local part ran back into the match is found again, from
//!    its `@`, with the local part that is left);
//! 3. **before it**, the triggers up to [`Engine::rfix`] bytes before the match are looked at
//!    again in the gap that now ends where the replacement starts (a candidate rejected because
//!    it ran into the match's bytes may be complete once they are gone); what they accept is
//!    resolved the same way, within that stretch.
//!
//! Each step looks only at bytes before the end of the match, so a stream decides exactly as a
//! whole text does: a match is final once the windows of the candidates before it are, and
//! [`Engine::hold`] keeps back the rejected candidates that a later match could still turn
//! (those within `rfix` bytes before the first undecided position whose window reaches it).
//!
//! What is left after a replacement is therefore re-examined with the replacement in place, so a
//! detector finds nothing in the output that it would not have masked, except a candidate that
//! would only be accepted after more than `rfix` bytes of glued matches after it were replaced, or
//! one whose verdict changes with text more than a window away (see `docs/masking.md`).

use super::detect::{Cand, Engine, Gap};

/// Where a resolution stopped.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Resolved {
    /// Everything before this is decided (the end of the text when nothing more may follow).
    pub frontier: usize,
    /// Start of the last gap: the end of the last replaced match, or the gap's start.
    pub open: usize,
}

/// Sort key: earliest start, then longest, then detector order (descending, so that the first
/// candidate is the last element).
fn key(c: &Cand) -> (usize, std::cmp::Reverse<usize>, super::Detector) {
    (c.start, std::cmp::Reverse(c.end), c.kind)
}

impl Engine {
    /// Resolve the gap `lo..text.len()` (bytes below `lo` read as "no byte"; with `more`, bytes
    /// at or past the end may still arrive), looking only at triggers from `floor` on. The
    /// replaced matches are appended to `acc` in order.
    pub(crate) fn resolve(
        &self,
        text: &[u8],
        lo: usize,
        floor: usize,
        more: bool,
        acc: &mut Vec<Cand>,
    ) -> Resolved {
        let n = text.len();
        let reach = self.ctx_keep();
        let mut cands: Vec<Cand> = Vec::new();
        let mut und: Vec<(usize, usize)> = Vec::new();
        let mut gap = Gap { lo, hi: n, more };
        self.analyze_in(text, gap, floor.max(lo), n, &mut cands, &mut und);
        if cands.is_empty() && und.is_empty() {
            return Resolved {
                frontier: n,
                open: lo,
            };
        }
        cands.sort_unstable_by_key(|c| std::cmp::Reverse(key(c)));
        let mut fresh: Vec<Cand> = Vec::new();
        loop {
            let frontier = und.iter().map(|u| u.1).min().unwrap_or(n).clamp(gap.lo, n);
            let c = match cands.last() {
                Some(c) if c.start < frontier => *c,
                _ => {
                    return Resolved {
                        frontier,
                        open: gap.lo,
                    }
                }
            };
            cands.pop();
            // Before it: the candidates that read its first bytes, with them replaced.
            let w = floor.max(gap.lo).max(c.start.saturating_sub(self.rfix()));
            if w < c.mstart {
                self.resolve(&text[..c.mstart], gap.lo, w, false, acc);
            }
            acc.push(c);
            // After it: a new gap. The triggers whose window reads back into the match are
            // looked at again (a candidate that overlapped the match is found again from its
            // trigger, as far as it still holds without the match's bytes).
            gap.lo = c.mend;
            let until = (c.mend + reach).min(n);
            fresh.clear();
            let keep = cands.partition_point(|x| x.start >= until);
            fresh.extend(cands.drain(keep..).filter(|x| x.trig >= until));
            und.retain(|u| u.0 >= until);
            self.analyze_in(text, gap, c.mend, until, &mut fresh, &mut und);
            fresh.retain(|x| x.start >= c.mend);
            fresh.sort_unstable_by_key(|c| std::cmp::Reverse(key(c)));
            cands.extend_from_slice(&fresh);
        }
    }

    /// In a stream: how far the text can be released when the resolution of the open gap
    /// (`open..`, triggers from `floor` on) stopped at `frontier`. A match found later starts at
    /// or after the frontier, and replacing it may turn a rejected candidate before it whose
    /// window reached it (step 3 of the module documentation): those within `rfix` bytes before
    /// the frontier are kept back, and so are the ones that read what they keep back.
    pub(crate) fn hold(&self, text: &[u8], open: usize, floor: usize, frontier: usize) -> usize {
        let from = open.max(floor).max(frontier.saturating_sub(self.rfix()));
        let mut f = frontier;
        let mut scratch = Vec::new();
        let mut und = Vec::new();
        while from < f {
            scratch.clear();
            und.clear();
            // Every trigger up to the frontier whose window reads at or past `f` (the triggers
            // from `f` on read themselves): a later replacement there may turn it.
            let g = Gap {
                lo: open,
                hi: f,
                more: true,
            };
            self.analyze_in(text, g, from, frontier, &mut scratch, &mut und);
            let next = und.iter().map(|u| u.1).min().unwrap_or(f).max(open);
            if next >= f {
                break;
            }
            f = next;
        }
        f.max(floor)
    }
}
