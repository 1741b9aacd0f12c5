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

use super::detect::{Cand, Engine, Found, Gap, Trig, AT_REACH, DIGIT_REACH};

/// Where a resolution stopped.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Resolved {
    /// Everything before this is decided (the end of the text when nothing more may follow).
    pub frontier: usize,
    /// Start of the last gap: the end of the last replaced match, or the gap's start.
    pub open: usize,
}

/// Sort key: earliest start, then longest, then detector order.
fn key(c: &Cand) -> (usize, std::cmp::Reverse<usize>, super::Detector) {
    (c.start, std::cmp::Reverse(c.end), c.kind)
}

/// The state of one gap: its candidates (sorted by descending [`key`]) and the triggers evaluated
/// in it (by descending position), so that the first of each is last; in a stream, the
/// undecided triggers.
struct State {
    gap: Gap,
    floor: usize,
    cands: Vec<Cand>,
    recs: Vec<Trig>,
    und: Vec<(usize, usize)>,
}

impl Engine {
    /// Resolve the gap `lo..text.len()` (bytes below `lo` read as "no byte"; with `more`, bytes
    /// at or past the end may still arrive), looking only at triggers from `floor` on. The
    /// replaced matches are appended to `acc` in order. The returned `open` and the triggers
    /// left in `recs` (by descending position) describe the last gap, for [`Engine::hold`].
    pub(crate) fn resolve(
        &self,
        text: &[u8],
        lo: usize,
        floor: usize,
        more: bool,
        acc: &mut Vec<Cand>,
        recs: &mut Vec<Trig>,
    ) -> Resolved {
        self.resolve_found(text, lo, floor, more, None, acc, recs)
    }

    /// [`Engine::resolve`], with the literal anchors of `text` already found (by
    /// [`Engine::find_literals`] over `text` or a longer text that starts like it).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn resolve_found(
        &self,
        text: &[u8],
        lo: usize,
        floor: usize,
        more: bool,
        found: Option<Found<'_>>,
        acc: &mut Vec<Cand>,
        recs: &mut Vec<Trig>,
    ) -> Resolved {
        let n = text.len();
        let gap = Gap { lo, hi: n, more };
        let mut st = State {
            gap,
            floor: floor.max(lo),
            cands: Vec::new(),
            recs: std::mem::take(recs),
            und: Vec::new(),
        };
        st.recs.clear();
        self.analyze_in(
            text,
            gap,
            st.floor,
            n,
            found,
            &mut st.cands,
            &mut st.und,
            &mut st.recs,
        );
        // Each literal set and the byte loop give their triggers in order: a stable sort merges
        // those runs in linear time.
        st.recs.sort_by_key(|r| std::cmp::Reverse(r.t));
        let r = if st.cands.is_empty() {
            Resolved {
                frontier: frontier(&st),
                open: lo,
            }
        } else {
            st.cands.sort_unstable_by_key(|c| std::cmp::Reverse(key(c)));
            self.run(text, &mut st, acc)
        };
        *recs = st.recs;
        r
    }

    /// Replace matches left to right in the gap of `st` (see the module documentation).
    fn run(&self, text: &[u8], st: &mut State, acc: &mut Vec<Cand>) -> Resolved {
        let reach = self.ctx_keep();
        let mut fresh: Vec<Cand> = Vec::new();
        let mut new_recs: Vec<Trig> = Vec::new();
        loop {
            let f = frontier(st);
            let c = match st.cands.last() {
                Some(c) if c.start < f => *c,
                _ => {
                    return Resolved {
                        frontier: f,
                        open: st.gap.lo,
                    }
                }
            };
            st.cands.pop();
            // Before it: the candidates that read its first bytes, with them replaced.
            let w = st.floor.max(c.start.saturating_sub(self.rfix()));
            if w < c.mstart {
                self.before(text, st, w, c.mstart, acc);
            }
            acc.push(c);
            // After it: a new gap. The triggers whose window reads back into the match are
            // looked at again (a candidate that overlapped the match is found again from its
            // trigger, as far as it still holds without the match's bytes).
            st.gap.lo = c.mend;
            st.floor = st.floor.max(c.mend);
            let until = (c.mend + reach).min(st.gap.hi);
            fresh.clear();
            let keep = st.cands.partition_point(|x| x.start >= until);
            fresh.extend(st.cands.drain(keep..).filter(|x| x.trig >= until));
            st.und.retain(|u| u.0 >= until);
            // In a whole text the literal triggers there are all recorded: evaluate them again,
            // and scan for the others. (A stream searches again: an undecided literal has no
            // record.)
            new_recs.clear();
            let cut = st.recs.partition_point(|r| r.t >= until);
            if st.gap.more {
                self.analyze_in(
                    text,
                    st.gap,
                    c.mend,
                    until,
                    None,
                    &mut fresh,
                    &mut st.und,
                    &mut new_recs,
                );
            } else {
                let mid = st.recs.partition_point(|r| r.t >= c.mend);
                self.reeval_literals(
                    text,
                    st.gap,
                    &st.recs[cut..mid],
                    &mut fresh,
                    &mut st.und,
                    &mut new_recs,
                );
                self.analyze_bytes(text, st.gap, c.mend, c.mend, until, &mut fresh, &mut st.und);
            }
            st.recs.truncate(cut);
            new_recs.sort_unstable_by_key(|r| std::cmp::Reverse(r.t));
            st.recs.append(&mut new_recs);
            fresh.retain(|x| x.start >= c.mend);
            fresh.sort_unstable_by_key(|c| std::cmp::Reverse(key(c)));
            st.cands.extend_from_slice(&fresh);
        }
    }

    /// The gap of `st` now ends at `hi` (a match is replaced from there): resolve the triggers
    /// from `w` on again. A literal trigger whose window did not reach `hi` keeps its verdict,
    /// the others are evaluated again with the text ending at `hi`; the `@` and digit-run
    /// triggers whose window can reach it are found again by a scan.
    fn before(&self, text: &[u8], st: &State, w: usize, hi: usize, acc: &mut Vec<Cand>) {
        let gap = Gap {
            lo: st.gap.lo,
            hi,
            more: false,
        };
        let mut sub = State {
            gap,
            floor: w,
            cands: Vec::new(),
            recs: Vec::new(),
            und: Vec::new(),
        };
        // Records are by descending position.
        let from = st.recs.partition_point(|r| r.t >= hi);
        let to = st.recs.partition_point(|r| r.t >= w);
        let mut again = Vec::new();
        for r in st.recs[from..to].iter().filter(|r| r.is_literal()) {
            if r.read() > hi {
                self.reeval(text, gap, r, &mut sub.cands, &mut sub.recs);
                again.push(r.t);
            } else {
                sub.recs.push(*r);
            }
        }
        let at_from = w.max(hi.saturating_sub(AT_REACH));
        let digit_from = w.max(hi.saturating_sub(DIGIT_REACH));
        self.analyze_bytes(
            text,
            gap,
            at_from,
            digit_from,
            hi,
            &mut sub.cands,
            &mut sub.und,
        );
        // A candidate of a trigger that is not looked at again keeps its verdict. (Candidates
        // are sorted by descending start; those before `hi` are at the end.)
        let tail = st.cands.partition_point(|x| x.start >= hi);
        for x in &st.cands[tail..] {
            if x.trig < w || x.trig >= hi || x.mend > hi {
                continue;
            }
            let seen_again = match text[x.trig] {
                b'@' => x.trig >= at_from,
                b'0'..=b'9' => x.trig >= digit_from,
                _ => again.contains(&x.trig),
            };
            if !seen_again {
                sub.cands.push(*x);
            }
        }
        if sub.cands.is_empty() {
            return;
        }
        sub.cands
            .sort_unstable_by_key(|c| std::cmp::Reverse(key(c)));
        self.run(text, &mut sub, acc);
    }

    /// In a stream: how far the text can be released when the resolution of the open gap
    /// (`open..`, triggers from `floor` on, evaluated as `recs`) stopped at `frontier`. A match
    /// found later starts at or after the frontier, and replacing it may turn a rejected
    /// candidate before it whose window reached it (step 3 of the module documentation): those
    /// within `rfix` bytes before the frontier are kept back, and so are the ones that read what
    /// they keep back.
    pub(crate) fn hold(&self, recs: &[Trig], open: usize, floor: usize, frontier: usize) -> usize {
        let from = open.max(floor).max(frontier.saturating_sub(self.rfix()));
        let a = recs.partition_point(|r| r.t >= frontier);
        let b = recs.partition_point(|r| r.t >= from);
        let mut f = frontier;
        loop {
            let next = recs[a..b]
                .iter()
                .filter(|r| r.read() > f)
                .map(|r| r.pstart())
                .min()
                .unwrap_or(f)
                .max(open);
            if next >= f {
                break;
            }
            f = next;
        }
        f.max(floor)
    }
}

/// The lowest start of an undecided match (the end of the gap when there is none).
fn frontier(st: &State) -> usize {
    st.und
        .iter()
        .map(|u| u.1)
        .min()
        .unwrap_or(st.gap.hi)
        .clamp(st.gap.lo, st.gap.hi)
}
