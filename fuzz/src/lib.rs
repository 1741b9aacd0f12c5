//! Helpers shared by the fuzz targets in `fuzz_targets/`: a runtime for the async wire reader, a
//! reader that hands out bytes a few at a time, an allocator that records the largest allocation, fuzzer-chosen chunkings, the default masker, and
//! small reference models (an SSE client's view of a stream).

use std::alloc::{GlobalAlloc, Layout, System};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::task::{Context, Poll};

use custos_core::mask::{MaskConfig, Masker};
use tokio::io::{AsyncRead, ReadBuf};

/// One current-thread runtime for every run (building one per input would dominate the time).
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("current-thread runtime")
    })
}

/// The default configuration's masker (every detector, strategy `redact`), compiled once.
pub fn masker() -> &'static Masker {
    static M: OnceLock<Masker> = OnceLock::new();
    M.get_or_init(|| Masker::new(&MaskConfig::default()).expect("default masking config"))
}

/// An in-memory peer that delivers at most `step` bytes per read, so every split of the input
/// across reads is exercised (the split-read tests of STYLE.md rule 4, driven by the fuzzer).
pub struct Trickle<'a> {
    data: &'a [u8],
    pos: usize,
    step: usize,
    /// Bytes handed out so far, readable after the reader took ownership.
    pub delivered: std::rc::Rc<std::cell::Cell<usize>>,
}

impl<'a> Trickle<'a> {
    pub fn new(data: &'a [u8], step: usize) -> Self {
        Trickle {
            data,
            pos: 0,
            step: step.max(1),
            delivered: Default::default(),
        }
    }
}

impl AsyncRead for Trickle<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = self
            .step
            .min(buf.remaining())
            .min(self.data.len() - self.pos);
        let from = self.pos;
        buf.put_slice(&self.data[from..from + n]);
        self.pos += n;
        self.delivered.set(self.pos);
        Poll::Ready(Ok(()))
    }
}

impl std::io::Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.step.min(buf.len()).min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        self.delivered.set(self.pos);
        Ok(n)
    }
}

/// A global allocator that records the largest single allocation made while armed. A target
/// that bounds memory declares `#[global_allocator] static ALLOC: Counting = Counting;` and wraps
/// the code under test in [`arm`] and [`disarm`].
pub struct Counting;

static ARMED: AtomicBool = AtomicBool::new(false);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

fn note(size: usize) {
    if ARMED.load(Ordering::Relaxed) {
        LARGEST.fetch_max(size, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator; only sizes are recorded.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Start recording the largest allocation (from 0).
pub fn arm() {
    LARGEST.store(0, Ordering::Relaxed);
    ARMED.store(true, Ordering::Relaxed);
}

/// Stop recording; the largest allocation since [`arm`].
pub fn disarm() -> usize {
    ARMED.store(false, Ordering::Relaxed);
    LARGEST.load(Ordering::Relaxed)
}

/// Most pieces [`chunks`] makes: the last one takes the rest. Pushing a 4 KiB input a byte at a
/// time costs thousands of passes per run; 64 fuzzer-placed cuts keep runs fast and still put a
/// cut anywhere the fuzzer wants.
pub const MAX_PIECES: usize = 64;

/// Cut `data` into pieces whose sizes come from `sizes` (cycled; 0 counts as 1), at most
/// [`MAX_PIECES`]. With no sizes the whole input is one piece.
pub fn chunks<'a>(data: &'a [u8], sizes: &[u8]) -> Vec<&'a [u8]> {
    if sizes.is_empty() {
        return vec![data];
    }
    let mut out = Vec::new();
    let mut rest = data;
    let mut k = 0;
    while !rest.is_empty() {
        if out.len() + 1 == MAX_PIECES {
            out.push(rest);
            break;
        }
        let n = usize::from(sizes[k % sizes.len()]).max(1).min(rest.len());
        let (a, b) = rest.split_at(n);
        out.push(a);
        rest = b;
        k += 1;
    }
    out
}

/// The greatest char boundary of `s` at or below `i`.
pub fn floor_boundary(s: &str, i: usize) -> usize {
    let mut i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// What an SSE client (the WHATWG `EventSource` algorithm) sees: the `data` payload of each
/// event, its lines joined by `\n`. `flush_tail`: also report an event the stream ended inside
/// (a browser would drop it; the masker releases it, masked, so it is compared too). A leading
/// byte-order mark is skipped; values are decoded line by line as lossy UTF-8.
pub fn sse_payloads(stream: &[u8], flush_tail: bool) -> Vec<String> {
    let s = stream.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(stream);
    let mut events = Vec::new();
    let mut data: Option<String> = None;
    let mut i = 0;
    while i < s.len() {
        let end = s[i..]
            .iter()
            .position(|&c| c == b'\n' || c == b'\r')
            .map_or(s.len(), |k| i + k);
        let line = &s[i..end];
        i = if end < s.len() && s[end] == b'\r' && s.get(end + 1) == Some(&b'\n') {
            end + 2
        } else {
            end + 1
        };
        if line.is_empty() {
            if let Some(d) = data.take() {
                events.push(d);
            }
            continue;
        }
        let colon = line.iter().position(|&c| c == b':');
        let name = &line[..colon.unwrap_or(line.len())];
        if name != b"data" {
            continue;
        }
        let value = match colon {
            None => &[][..],
            Some(c) => {
                let v = &line[c + 1..];
                v.strip_prefix(b" ").unwrap_or(v)
            }
        };
        let value = String::from_utf8_lossy(value);
        match &mut data {
            Some(d) => {
                d.push('\n');
                d.push_str(&value);
            }
            None => data = Some(value.into_owned()),
        }
    }
    if flush_tail {
        if let Some(d) = data {
            events.push(d);
        }
    }
    events
}

/// Detector matches in already-masked text that are not artefacts of the masker's placeholders.
///
/// Re-scanning masked text can match a placeholder: `postgres://admin:[REDACTED:url_password]@db`
/// still has the shape of a URL with a password, and so has `https://[REDACTED:slack_webhook]x@y`
/// (the `:` inside the placeholder reads as `user:password`). Those are not secrets that survived,
/// so a finding that overlaps a `[REDACTED:<detector>]` placeholder is ignored; any finding wholly
/// in text the masker left alone is a survivor.
pub fn survivors(masked: &str) -> Vec<(custos_core::mask::Detector, String)> {
    let mut covered = vec![false; masked.len()];
    let mut from = 0;
    while let Some(k) = masked[from..].find("[REDACTED:") {
        let start = from + k;
        let Some(len) = masked[start..].find(']') else {
            break;
        };
        let name = &masked[start + 10..start + len];
        if custos_core::mask::Detector::from_name(name).is_some()
            || name == "column"
            || name == "field"
        {
            covered[start..=start + len]
                .iter_mut()
                .for_each(|c| *c = true);
        }
        from = start + 1;
    }
    masker()
        .find(masked)
        .into_iter()
        .filter(|f| !covered[f.start..f.end].iter().any(|&c| c))
        .map(|f| (f.detector, masked[f.start..f.end].to_string()))
        .collect()
}
