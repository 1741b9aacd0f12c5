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
         {} planted values surviving; single thread, median of {RUNS} runs of at least {MIN_RUN_SECS} s, MB/s by {clock}.\n\n",
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

/// Shortest timed run: `f` is repeated within a run until it lasts this long. On VMs whose
/// thread CPU clock advances in scheduler ticks (4 ms at 250 Hz), a 40 ms run would otherwise
/// be off by up to 10 %.
const MIN_RUN_SECS: f64 = 0.25;

/// Median duration in seconds of one call of `f`, over `RUNS` timed runs (each repeating `f`
/// until it lasts [`MIN_RUN_SECS`]), and the last result.
fn median_run<T>(mut f: impl FnMut() -> T) -> (f64, T) {
    let mut times = Vec::with_capacity(RUNS);
    let mut last = None;
    for _ in 0..RUNS {
        let wall = Instant::now();
        let cpu = cpu_ns();
        let mut calls = 0u32;
        let secs = loop {
            let out = f();
            calls += 1;
            let secs = match (cpu, cpu_ns()) {
                (Some(a), Some(b)) if b > a => (b - a) as f64 / 1e9,
                _ => wall.elapsed().as_secs_f64(),
            };
            drop(last.replace(out));
            if secs >= MIN_RUN_SECS || calls >= 1000 {
                break secs;
            }
        };
        times.push(secs / f64::from(calls));
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

/// Chunk size of JSON bodies (about what an HTTP client reads at a time).
const JSON_CHUNK: usize = 16 * 1024;
/// Chunk size of the event stream.
const SSE_CHUNK: usize = 512;

/// Throughput of the streaming rewriters of the HTTP/LLM edge (`JsonMasker`, `SseMasker`), single
/// thread, on about `megabytes` MiB each of:
/// - API-style JSON: one document of issue-like records whose `body` strings are pieces of the
///   masking corpus (so about one record in 12 carries a planted value, and every string also goes
///   through the detectors), in 16 KiB chunks and in one push, with `mask_text` over the same
///   bytes as a reference;
/// - an OpenAI chat-completions event stream whose deltas are 3–6 character tokens of the corpus
///   text, in 512-byte chunks, in `LlmDeltas` and in `Text` mode.
///
/// Checks (untimed): the JSON output parses and no planted value survives in its decoded strings;
/// the text a client assembles from the masked deltas equals `mask_text` of the whole text.
/// Returns a Markdown table; MB/s are input bytes per second of on-CPU time.
pub fn run_streams(megabytes: usize) -> Result<String> {
    use custos_core::mask::{JsonMasker, SseMasker, SseMode};

    let bytes = megabytes.max(1) << 20;
    let masker = Masker::new(&MaskConfig::default())?;
    let detectors = masker.detectors().len();
    ensure!(detectors >= 20, "only {detectors} detectors enabled");
    let corpus = corpus::generate(SEED, bytes.min(64 << 20) / 2);
    let pieces = corpus_pieces(&corpus);
    ensure!(!pieces.is_empty(), "empty corpus");

    // ---- JSON ----
    let (json, records) = api_json(&pieces, bytes);
    let body = json.as_bytes();
    let json_chunks: Vec<&[u8]> = body.chunks(JSON_CHUNK).collect();
    let (json_secs, masked) = median_run(|| {
        let mut stats = Stats::default();
        let mut m = JsonMasker::new(masker.audit_scope(), Vec::new());
        let mut out = Vec::with_capacity(body.len() + body.len() / 16);
        for c in &json_chunks {
            out.extend_from_slice(&m.push(c, &mut stats));
        }
        out.extend_from_slice(&m.finish(&mut stats));
        (out, m.invalid())
    });
    let (json_whole_secs, masked_whole) = median_run(|| {
        let mut stats = Stats::default();
        let mut m = JsonMasker::new(masker.audit_scope(), Vec::new());
        let mut out = m.push(body, &mut stats);
        out.extend_from_slice(&m.finish(&mut stats));
        out
    });
    let (text_secs, _) = median_run(|| {
        let mut stats = Stats::default();
        masker.mask_text(&json, &mut stats).len()
    });
    ensure!(!masked.1, "JsonMasker found the generated JSON invalid");
    ensure!(
        masked.0 == masked_whole,
        "JsonMasker output depends on the chunking"
    );
    let parsed: serde_json::Value = serde_json::from_slice(&masked.0)?;
    let bodies: Vec<&str> = parsed["items"]
        .as_array()
        .map(|a| a.iter().filter_map(|r| r["body"].as_str()).collect())
        .unwrap_or_default();
    ensure!(bodies.len() == records, "records lost in the masked JSON");
    let json_survivors = corpus::survivors(&corpus, &bodies.join("\n")).len();

    // ---- SSE ----
    let (sse, sse_text, events) = chat_stream(&corpus.text, bytes);
    let sse_chunks: Vec<&[u8]> = sse.as_bytes().chunks(SSE_CHUNK).collect();
    let run_sse = |mode: SseMode| {
        median_run(|| {
            let mut stats = Stats::default();
            let mut m = SseMasker::new(masker.audit_scope(), mode);
            let mut out = Vec::with_capacity(sse.len() + sse.len() / 8);
            for c in &sse_chunks {
                out.extend_from_slice(&m.push(c, &mut stats));
            }
            out.extend_from_slice(&m.finish(&mut stats));
            out
        })
    };
    let (llm_secs, llm_out) = run_sse(SseMode::LlmDeltas);
    let (sse_text_secs, _) = run_sse(SseMode::Text);
    let mut assembled = String::with_capacity(sse_text.len());
    for line in String::from_utf8_lossy(&llm_out).lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(data) {
            if let Some(t) = v
                .pointer("/choices/0/delta/content")
                .and_then(|t| t.as_str())
            {
                assembled.push_str(t);
            }
        }
    }
    let want = masker.mask_text(&sse_text, &mut Stats::default());
    ensure!(
        assembled == want,
        "the masked deltas do not assemble to mask_text of the whole text"
    );
    let sse_survivors = corpus::survivors(&corpus, &assembled).len();

    let json_mb = body.len() as f64 / 1e6;
    let sse_mb = sse.len() as f64 / 1e6;
    let clock = if cpu_ns().is_some() {
        "on-CPU time"
    } else {
        "wall-clock time"
    };
    let mut md = String::new();
    md.push_str(&format!(
        "Streaming masking: {json_mb:.1} MB of API JSON ({records} records, bodies from the \
         masking corpus, {json_survivors} planted values surviving) and a {sse_mb:.1} MB \
         chat-completions event stream ({events} delta events, {sse_survivors} planted values \
         surviving); single thread, median of {RUNS} runs of at least {MIN_RUN_SECS} s, MB/s of input by {clock}.\n\n"
    ));
    md.push_str("| rewriter | input | chunks | MB/s (per core) | detectors active |\n");
    md.push_str("| --- | --- | --- | ---: | ---: |\n");
    let rows = [
        ("`JsonMasker`", "API JSON", "16 KiB", json_mb, json_secs),
        (
            "`JsonMasker`",
            "API JSON",
            "one push",
            json_mb,
            json_whole_secs,
        ),
        (
            "`mask_text` (reference)",
            "API JSON",
            "whole",
            json_mb,
            text_secs,
        ),
        (
            "`SseMasker` (`LlmDeltas`)",
            "chat SSE",
            "512 B",
            sse_mb,
            llm_secs,
        ),
        (
            "`SseMasker` (`Text`)",
            "chat SSE",
            "512 B",
            sse_mb,
            sse_text_secs,
        ),
    ];
    for (name, input, chunks, mb, secs) in rows {
        md.push_str(&format!(
            "| {name} | {input} | {chunks} | {:.0} | {detectors} |\n",
            mb / secs.max(1e-9)
        ));
    }
    Ok(md)
}

/// The corpus cut into pieces of at least two lines, never inside a planted value.
fn corpus_pieces(c: &corpus::Corpus) -> Vec<&str> {
    let t = c.text.as_str();
    let mut out = Vec::new();
    let (mut start, mut lines, mut p) = (0, 0, 0);
    for (i, b) in t.bytes().enumerate() {
        if b != b'\n' {
            continue;
        }
        lines += 1;
        while p < c.planted.len() && c.planted[p].end <= i {
            p += 1;
        }
        let inside = c.planted.get(p).is_some_and(|x| x.start < i);
        if lines >= 2 && !inside {
            out.push(&t[start..i]);
            start = i + 1;
            lines = 0;
        }
    }
    out
}

/// One JSON document of about `bytes` bytes: `{"total_count": n, "items": [records]}`.
fn api_json(pieces: &[&str], bytes: usize) -> (String, usize) {
    const WORDS: [&str; 8] = [
        "checkout", "fails", "when", "cart", "is", "empty", "after", "refund",
    ];
    let mut items = Vec::new();
    let mut size = 0;
    let mut k = 0usize;
    while size < bytes {
        let title: Vec<&str> = (0..5)
            .map(|j| WORDS[(k * 7 + j * 3) % WORDS.len()])
            .collect();
        let rec = serde_json::json!({
            "id": 1_000_000 + k,
            "node_id": format!("MDU6SXNzdWU{k:08}"),
            "url": format!("https://api.example.com/repos/acme/shop/issues/{k}"),
            "title": title.join(" "),
            "user": {"login": format!("user{}", k % 97), "id": k % 97, "type": "User",
                     "site_admin": false},
            "labels": [{"name": "bug", "color": "d73a4a", "default": k.is_multiple_of(2)}],
            "state": if k.is_multiple_of(3) { "closed" } else { "open" },
            "comments": k % 17,
            "created_at": format!("2024-05-{:02}T12:{:02}:00Z", k % 28 + 1, k % 60),
            "score": 0.5 + (k % 100) as f64 / 8.0,
            "assignee": null,
            "body": pieces[k % pieces.len()],
        });
        size += rec.to_string().len() + 2;
        items.push(rec);
        k += 1;
    }
    let doc = serde_json::json!({"total_count": k, "incomplete_results": false, "items": items});
    (doc.to_string(), k)
}

/// An OpenAI chat-completions stream of about `bytes` bytes whose deltas are 3 to 6 character
/// tokens of `text`: (stream, the text it carries, delta events).
fn chat_stream(text: &str, bytes: usize) -> (String, String, usize) {
    let mut sse = String::with_capacity(bytes + 4096);
    let mut carried = String::new();
    let mut events = 0;
    let mut i = 0;
    while sse.len() < bytes {
        if i >= text.len() {
            i = 0;
        }
        let mut j = (i + 3 + events % 4).min(text.len());
        while !text.is_char_boundary(j) {
            j += 1;
        }
        let tok = &text[i..j];
        carried.push_str(tok);
        let ev = serde_json::json!({
            "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT", "object": "chat.completion.chunk",
            "created": 1_741_570_283, "model": "gpt-4o-2024-08-06",
            "system_fingerprint": "fp_f9f4fb6dbf",
            "choices": [{"index": 0, "delta": {"content": tok}, "logprobs": null,
                         "finish_reason": null}]
        });
        sse.push_str("data: ");
        sse.push_str(&ev.to_string());
        sse.push_str("\n\n");
        events += 1;
        i = j;
    }
    let fin = serde_json::json!({
        "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT", "object": "chat.completion.chunk",
        "created": 1_741_570_283, "model": "gpt-4o-2024-08-06",
        "choices": [{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "stop"}]
    });
    sse.push_str(&format!("data: {fin}\n\ndata: [DONE]\n\n"));
    (sse, carried, events)
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
    fn streams_report_a_table() {
        let md = super::run_streams(1).expect("stream benchmark runs");
        assert!(md.contains("| `JsonMasker` | API JSON | 16 KiB |"), "{md}");
        assert!(
            md.contains("| `SseMasker` (`LlmDeltas`) | chat SSE |"),
            "{md}"
        );
        assert!(md.contains(" 0 planted values surviving) and"), "{md}");
        assert!(md.contains(" 0 planted values surviving);"), "{md}");
    }

    #[test]
    fn split_keeps_characters_whole() {
        let text = "é".repeat(100);
        let parts = super::split(&text, 63);
        assert_eq!(parts.concat(), text);
        assert!(parts.iter().all(|p| p.len() <= 64));
    }
}
