//! Masking benchmark: throughput, recall and precision of `custos_core::mask` on a generated
//! corpus (log lines, JSON rows and CSV rows with planted secrets and personal data, plus decoys;
//! see `custos_core::mask::corpus`).
//!
//! `run(megabytes)` generates the corpus (fixed seed), then, single-threaded:
//! - times `mask_text` over the whole input (median of 5 runs);
//! - times `StreamMasker` over the same input split into 64-byte chunks (median of 5 runs) and
//!   checks that its output equals `mask_text`'s;
//! - scores the findings against the planted spans (recall: planted values entirely masked;
//!   precision: findings that overlap a planted value).
//!
//! MB/s are per core: bytes divided by the thread's on-CPU time (Linux
//! `/proc/thread-self/schedstat`), so other load on the machine does not distort them; where that
//! file is missing, wall-clock time is used and the table says so.

use std::time::Instant;

use anyhow::{ensure, Result};
use custos_core::mask::{corpus, MaskConfig, Masker, Stats};

/// Seed of the benchmark corpus (the same text on every run).
const SEED: u64 = 0x6d61_736b;
const RUNS: usize = 5;
const CHUNK: usize = 64;

/// Run the benchmark on about `megabytes` MiB of corpus and return a Markdown report.
pub fn run(megabytes: usize) -> Result<String> {
    let bytes = megabytes.max(1) << 20;
    let corpus = corpus::generate(SEED, bytes);
    let text = corpus.text.as_str();
    let masker = Masker::new(&MaskConfig::default())?;
    let detectors = masker.detectors().len();

    let (whole_secs, whole) = median_run(|| {
        let mut stats = Stats::default();
        masker.mask_text(text, &mut stats).into_owned()
    });
    let findings = masker.find(text);
    let score = corpus::score(&corpus, &findings);
    let survivors = corpus::survivors(&corpus, &whole).len();

    let chunks = split(text, CHUNK);
    let (stream_secs, streamed) = median_run(|| {
        let mut stats = Stats::default();
        let mut s = masker.stream();
        let mut out = String::with_capacity(text.len() + text.len() / 8);
        for c in &chunks {
            out.push_str(&s.push(c, &mut stats));
        }
        out.push_str(&s.finish(&mut stats));
        out
    });
    ensure!(
        streamed == whole,
        "StreamMasker output differs from mask_text over the same input"
    );

    let mb = text.len() as f64 / 1e6;
    let clock = if cpu_ns().is_some() {
        "on-CPU time"
    } else {
        "wall-clock time"
    };
    let mut md = String::new();
    md.push_str(&format!(
        "Masking: {:.1} MB corpus (seed {SEED:#x}), {} planted values, {} findings, \
         {} planted values surviving; single thread, median of {RUNS} runs, MB/s by {clock}.\n\n",
        mb, score.planted, score.findings, survivors
    ));
    md.push_str("| engine mode | MB/s (per core) | recall | precision | detectors active |\n");
    md.push_str("| --- | ---: | ---: | ---: | ---: |\n");
    for (mode, secs) in [
        ("`mask_text` (whole input)", whole_secs),
        ("`StreamMasker` (64-byte chunks)", stream_secs),
    ] {
        md.push_str(&format!(
            "| {mode} | {:.0} | {:.4} | {:.4} | {detectors} |\n",
            mb / secs.max(1e-9),
            score.recall(),
            score.precision()
        ));
    }
    md.push_str(&format!(
        "\nStream hold-back bound with these detectors: {} bytes.\n",
        masker.max_holdback()
    ));
    Ok(md)
}

/// Split at `size` bytes, moved forward to character boundaries.
fn split(text: &str, size: usize) -> Vec<&str> {
    let mut out = Vec::with_capacity(text.len() / size + 1);
    let mut i = 0;
    while i < text.len() {
        let mut j = (i + size).min(text.len());
        while !text.is_char_boundary(j) {
            j += 1;
        }
        out.push(&text[i..j]);
        i = j;
    }
    out
}

/// Median duration in seconds of `RUNS` runs of `f`, and the last result.
fn median_run<T>(mut f: impl FnMut() -> T) -> (f64, T) {
    let mut times = Vec::with_capacity(RUNS);
    let mut last = None;
    for _ in 0..RUNS {
        let wall = Instant::now();
        let cpu = cpu_ns();
        let out = f();
        let secs = match (cpu, cpu_ns()) {
            (Some(a), Some(b)) if b > a => (b - a) as f64 / 1e9,
            _ => wall.elapsed().as_secs_f64(),
        };
        drop(last.replace(out));
        times.push(secs);
    }
    times.sort_by(f64::total_cmp);
    (times[RUNS / 2], last.expect("RUNS > 0"))
}

/// Nanoseconds this thread has spent on a CPU (Linux), if known.
fn cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn small_run_reports_a_table() {
        let md = super::run(1).expect("benchmark runs");
        assert!(md.contains("| `mask_text` (whole input) |"), "{md}");
        assert!(md.contains("| `StreamMasker` (64-byte chunks) |"), "{md}");
        assert!(md.contains(" 0 planted values surviving"), "{md}");
    }

    #[test]
    fn split_keeps_characters_whole() {
        let text = "é".repeat(100);
        let parts = super::split(&text, 63);
        assert_eq!(parts.concat(), text);
        assert!(parts.iter().all(|p| p.len() <= 64));
    }
}
