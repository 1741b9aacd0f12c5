//! Property tests of the masking engine: planted secrets never survive `mask_text`, the stream
//! masker equals `mask_text` for every chunking (and never holds back more than its bound), and
//! no input makes either panic.

use std::sync::OnceLock;

use custos_core::mask::corpus::{self, Style};
use custos_core::mask::{Detector, MaskConfig, Masked, Masker, Stats};
use proptest::prelude::*;

fn masker() -> &'static Masker {
    static M: OnceLock<Masker> = OnceLock::new();
    M.get_or_init(|| Masker::new(&MaskConfig::default()).expect("default config"))
}

fn style() -> impl Strategy<Value = Style> {
    prop_oneof![Just(Style::Log), Just(Style::Json), Just(Style::Csv)]
}

/// A planted value: detector index, generator seed, embedding style.
fn plant() -> impl Strategy<Value = (usize, u64, Style)> {
    (0..Detector::ALL.len(), any::<u64>(), style())
}

/// Random filler text, including characters detectors care about.
fn filler() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 ,.;:=_/+()\"-]{0,40}"
}

/// Text made of the pieces detectors look at (digit groups, separators, capitals, `@`, labels,
/// token prefixes), so that matches and near misses fall at chunk boundaries.
fn dense_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        "[0-9]{1,5}",
        "[ .()+/-]{1,2}",
        "[a-z]{1,6}",
        "[A-Z]{1,3}",
        Just("@".to_string()),
        Just("example.com".to_string()),
        Just("4111 1111 1111 1111".to_string()),
        Just("DE89 3704 0044 0532 0130 00".to_string()),
        Just("password=".to_string()),
        Just("\"token\": \"".to_string()),
        Just("AKIAIOSFODNN7EXAMPLE".to_string()),
        Just("sk-proj-aB3dE5fG7hI9jK1lM3nO5pQ7rS9tU1vW3xY5".to_string()),
        Just("https://u:".to_string()),
        Just("-----BEGIN RSA PRIVATE KEY-----\nMIIE".to_string()),
        Just("\n".to_string()),
        Just("é✓".to_string()),
    ];
    prop::collection::vec(piece, 0..40).prop_map(|v| v.concat())
}

/// Filler and planted snippets, one per line; returns the text and the planted values.
fn build(parts: &[(String, (usize, u64, Style))], tail: &str) -> (String, Vec<String>) {
    let mut text = String::new();
    let mut secrets = Vec::new();
    for (fill, (kind, seed, style)) in parts {
        let s = corpus::sample(Detector::ALL[*kind], *seed, *style);
        secrets.extend(s.secrets().map(str::to_string));
        text.push_str(fill);
        text.push('\n');
        text.push_str(&s.text);
        text.push('\n');
    }
    text.push_str(tail);
    (text, secrets)
}

/// Cut `text` at the given fractions (rounded down to character boundaries).
fn chunks<'a>(text: &'a str, cuts: &[prop::sample::Index]) -> Vec<&'a str> {
    let mut at: Vec<usize> = cuts
        .iter()
        .map(|c| {
            let mut i = c.index(text.len() + 1);
            while !text.is_char_boundary(i) {
                i -= 1;
            }
            i
        })
        .collect();
    at.push(0);
    at.push(text.len());
    at.sort_unstable();
    at.dedup();
    at.windows(2).map(|w| &text[w[0]..w[1]]).collect()
}

fn stream(text_chunks: &[&str], stats: &mut Stats) -> String {
    let mut s = masker().stream();
    let mut out = String::new();
    for c in text_chunks {
        out.push_str(&s.push(c, stats));
        assert!(
            s.pending() <= s.max_holdback(),
            "pending {} exceeds the bound {}",
            s.pending(),
            s.max_holdback()
        );
    }
    out.push_str(&s.finish(stats));
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn planted_secrets_never_survive(parts in prop::collection::vec((filler(), plant()), 1..6), tail in filler()) {
        let (text, secrets) = build(&parts, &tail);
        let mut stats = Stats::default();
        let out = masker().mask_text(&text, &mut stats);
        for s in &secrets {
            prop_assert!(!out.contains(s.as_str()), "{s:?} survives in {out:?}");
        }
        prop_assert!(stats.total() >= parts.len() as u64);
    }

    #[test]
    fn stream_equals_mask_text(
        parts in prop::collection::vec((filler(), plant()), 0..5),
        tail in filler(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let (text, secrets) = build(&parts, &tail);
        let mut whole_stats = Stats::default();
        let whole = masker().mask_text(&text, &mut whole_stats).into_owned();
        let mut stats = Stats::default();
        let out = stream(&chunks(&text, &cuts), &mut stats);
        prop_assert_eq!(&out, &whole);
        prop_assert_eq!(stats, whole_stats);
        for s in &secrets {
            prop_assert!(!out.contains(s.as_str()), "{s:?} survives the stream");
        }
    }

    #[test]
    fn stream_equals_mask_text_on_dense_text(
        text in dense_text(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..16),
    ) {
        let whole = masker().mask_text(&text, &mut Stats::default()).into_owned();
        prop_assert_eq!(stream(&chunks(&text, &cuts), &mut Stats::default()), whole);
    }

    #[test]
    fn arbitrary_text_never_panics(text in any::<String>(), cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6)) {
        let m = masker();
        let mut stats = Stats::default();
        let whole = m.mask_text(&text, &mut stats).into_owned();
        for f in m.find(&text) {
            prop_assert!(f.start < f.end && f.end <= text.len());
            prop_assert!(text.is_char_boundary(f.start) && text.is_char_boundary(f.end));
        }
        let scope = m.scope("prod", &[]);
        match scope.mask_value(Some((None, "note")), &text, &mut stats) {
            Masked::Unchanged => prop_assert_eq!(&whole, &text),
            Masked::Text(t) => prop_assert_eq!(t, whole.clone()),
            Masked::Null => {}
        }
        prop_assert_eq!(stream(&chunks(&text, &cuts), &mut Stats::default()), whole);
    }
}
