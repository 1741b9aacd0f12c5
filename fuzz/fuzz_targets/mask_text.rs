//! The masking engine on free text: `Masker::mask_text`, `Masker::find`, `StreamMasker`.
//!
//! Input: the fuzzer's text (the whole input, lossy UTF-8), with realistic secrets from
//! `mask::corpus::sample` spliced in as its last bytes direct (so every detector's confirmation
//! path is reached, not just its trigger), cut where those bytes say.
//!
//! Properties (default configuration: every detector, strategy `redact`):
//! - nothing survives: `find(mask_text(x))` finds nothing outside the placeholders (a finding
//!   that overlaps one is an artefact of re-scanning, see `custos_fuzz::survivors`:
//!   `user:[REDACTED:url_password]@host` still looks like a URL password);
//! - `mask_text(x)` borrows exactly when `find(x)` is empty;
//! - streaming is exact: `push(a) + push(b) + finish()` equals `mask_text(a + b)` for the
//!   fuzzer's cut point, and so does a push per fuzzer-sized piece;
//! - after every `push`, `pending() <= max_holdback()`; after `finish`, nothing is pending;
//! - the stream and `mask_text` count the same values in `Stats`.
#![no_main]

use std::borrow::Cow;

use arbitrary::{Arbitrary, Unstructured};
use custos_core::mask::corpus::{self, Style};
use custos_core::mask::{Detector, Stats, StreamMasker};
use custos_fuzz::{floor_boundary, masker, survivors, MAX_PIECES};
use libfuzzer_sys::fuzz_target;

/// Chunking and planted secrets, read from the input's last bytes (the text is the whole input,
/// so hand-written seeds are plain text).
#[derive(Arbitrary, Debug)]
struct Control {
    cut: u16,
    /// (position in the text, detector index, seed, style) of planted secrets.
    planted: Vec<(u16, u8, u8, u8)>,
    pieces: Vec<u8>,
}

/// Bytes at the end of the input that also steer the run.
const CONTROL: usize = 24;

fn style(s: u8) -> Style {
    match s % 3 {
        0 => Style::Log,
        1 => Style::Json,
        _ => Style::Csv,
    }
}

fn push_all(sm: &mut StreamMasker, pieces: &[&str], stats: &mut Stats) -> String {
    let hold = sm.max_holdback();
    let mut out = String::new();
    for p in pieces {
        out.push_str(&sm.push(p, stats));
        assert!(
            sm.pending() <= hold,
            "pending {} > max_holdback {hold}",
            sm.pending()
        );
    }
    out.push_str(&sm.finish(stats));
    assert_eq!(sm.pending(), 0, "pending after finish");
    out
}

/// Cut `s` at char boundaries into pieces sized by `sizes` (cycled), at most `MAX_PIECES`.
fn str_pieces<'a>(s: &'a str, sizes: &[u8]) -> Vec<&'a str> {
    if sizes.is_empty() {
        return vec![s];
    }
    let mut out = Vec::new();
    let mut at = 0;
    let mut k = 0;
    while at < s.len() {
        if out.len() + 1 == MAX_PIECES {
            out.push(&s[at..]);
            break;
        }
        let mut end = floor_boundary(s, at + usize::from(sizes[k % sizes.len()]).max(1));
        if end == at {
            end = (at + 1..=s.len()).find(|&i| s.is_char_boundary(i)).unwrap();
        }
        out.push(&s[at..end]);
        at = end;
        k += 1;
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let tail = &data[data.len().saturating_sub(CONTROL)..];
    let Ok(input) = Control::arbitrary(&mut Unstructured::new(tail)) else {
        return;
    };
    let mut text = String::from_utf8_lossy(data).into_owned();
    for &(at, d, seed, st) in input.planted.iter().take(4) {
        let kind = Detector::ALL[usize::from(d) % Detector::ALL.len()];
        let sample = corpus::sample(kind, u64::from(seed), style(st));
        let at = floor_boundary(&text, usize::from(at));
        text.insert_str(at, &sample.text);
    }
    let m = masker();

    let mut stats = Stats::default();
    let masked = m.mask_text(&text, &mut stats);
    let found = m.find(&text);
    assert_eq!(
        matches!(masked, Cow::Borrowed(_)),
        found.is_empty(),
        "borrowed iff nothing found"
    );
    // One cut point.
    let cut = floor_boundary(&text, usize::from(input.cut));
    let mut st = Stats::default();
    let streamed = push_all(&mut m.stream(), &[&text[..cut], &text[cut..]], &mut st);
    assert_eq!(
        streamed, masked,
        "stream cut at {cut} differs from mask_text"
    );
    assert_eq!(st, stats, "stats differ");

    // Many pieces.
    let mut st = Stats::default();
    let streamed = push_all(&mut m.stream(), &str_pieces(&text, &input.pieces), &mut st);
    assert_eq!(streamed, masked, "stream in pieces differs from mask_text");

    // Last, so that the stream properties are checked for inputs that fail this one.
    let survivors = survivors(&masked);
    assert!(
        survivors.is_empty(),
        "matches survive masking: {survivors:?} in {masked:?}"
    );
});
