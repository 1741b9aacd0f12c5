//! A deterministic corpus for recall and precision: log lines, JSON rows and CSV rows with planted
//! sensitive values (valid checksums, at known byte offsets) and decoys that must not be masked
//! (invalid Luhn numbers, bad IBAN check digits, impossible SSNs, order ids, UUIDs, timestamps,
//! git SHAs, ISBNs, `max_tokens`, `tokenizer`, `password_policy`, `root@localhost`, ...).
//!
//! ```
//! use custos_core::mask::{corpus, MaskConfig, Masker};
//! let c = corpus::generate(7, 20_000);
//! let m = Masker::new(&MaskConfig::default()).unwrap();
//! let s = corpus::score(&c, &m.find(&c.text));
//! assert!(s.recall() > 0.9);
//! ```

use std::ops::Range;

use base64::Engine as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::checks::{dni_letter, iban_check_digits, luhn_check_digit};
use super::{Detector, Finding};

/// A planted sensitive value: its detector and the bytes that must be masked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planted {
    pub detector: Detector,
    pub start: usize,
    pub end: usize,
}

/// Generated text and what was planted in it.
#[derive(Clone, Debug)]
pub struct Corpus {
    pub text: String,
    pub planted: Vec<Planted>,
}

/// A snippet of text holding sensitive values at `values` (usually one).
#[derive(Clone, Debug)]
pub struct Sample {
    pub text: String,
    pub values: Vec<Range<usize>>,
}

impl Sample {
    fn one(text: String, value: Range<usize>) -> Sample {
        Sample {
            text,
            values: vec![value],
        }
    }

    /// The sensitive values themselves.
    pub fn secrets(&self) -> impl Iterator<Item = &str> + '_ {
        self.values.iter().map(|r| &self.text[r.clone()])
    }
}

/// How a snippet is embedded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    Log,
    Json,
    Csv,
}

/// Recall and precision of findings against the planted spans.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Score {
    /// Planted values.
    pub planted: usize,
    /// Planted values entirely covered by findings.
    pub recalled: usize,
    /// Findings.
    pub findings: usize,
    /// Findings that overlap a planted value.
    pub true_findings: usize,
}

impl Score {
    pub fn recall(&self) -> f64 {
        if self.planted == 0 {
            1.0
        } else {
            self.recalled as f64 / self.planted as f64
        }
    }

    pub fn precision(&self) -> f64 {
        if self.findings == 0 {
            1.0
        } else {
            self.true_findings as f64 / self.findings as f64
        }
    }
}

/// Score findings (sorted by start, non-overlapping, as [`super::Masker::find`] returns them).
pub fn score(corpus: &Corpus, findings: &[Finding]) -> Score {
    let mut s = Score {
        planted: corpus.planted.len(),
        findings: findings.len(),
        ..Score::default()
    };
    for p in &corpus.planted {
        // Covered: the findings overlapping p leave no byte of p uncovered.
        let first = findings.partition_point(|f| f.end <= p.start);
        let mut pos = p.start;
        for f in &findings[first..] {
            if f.start > pos || pos >= p.end {
                break;
            }
            pos = pos.max(f.end);
        }
        if pos >= p.end {
            s.recalled += 1;
        }
    }
    for f in findings {
        let first = corpus.planted.partition_point(|p| p.end <= f.start);
        if corpus.planted[first..]
            .iter()
            .take_while(|p| p.start < f.end)
            .any(|p| p.end > f.start)
        {
            s.true_findings += 1;
        }
    }
    s
}

/// The planted values that a masking output still contains verbatim (should be empty).
pub fn survivors<'c>(corpus: &'c Corpus, masked: &str) -> Vec<&'c str> {
    corpus
        .planted
        .iter()
        .map(|p| &corpus.text[p.start..p.end])
        .filter(|v| v.len() >= 6 && masked.contains(*v))
        .collect()
}

/// Generate about `bytes` bytes of corpus from `seed`. The first planted values go through every
/// detector once, in [`Detector::ALL`] order; about one line in 25 carries a planted value.
pub fn generate(seed: u64, bytes: usize) -> Corpus {
    let mut g = Gen::new(seed);
    let mut text = String::with_capacity(bytes + 4096);
    let mut planted = Vec::new();
    let mut next_kind = 0usize;
    while text.len() < bytes {
        let style = match g.r.random_range(0..10) {
            0..=4 => Style::Log,
            5..=7 => Style::Json,
            _ => Style::Csv,
        };
        let plant = next_kind < Detector::ALL.len() || g.r.random_bool(0.04);
        if plant {
            let kind = if next_kind < Detector::ALL.len() {
                next_kind += 1;
                Detector::ALL[next_kind - 1]
            } else {
                Detector::ALL[g.r.random_range(0..Detector::ALL.len())]
            };
            // Key files keep their own shape: a log line with the key on the following lines.
            let style = match kind {
                Detector::PrivateKey | Detector::GcpServiceAccountKey => Style::Log,
                _ => style,
            };
            let sample = g.sample(kind, style);
            let (prefix, suffix) = g.frame(style);
            let base = text.len() + prefix.len();
            text.push_str(&prefix);
            for v in &sample.values {
                planted.push(Planted {
                    detector: kind,
                    start: base + v.start,
                    end: base + v.end,
                });
            }
            text.push_str(&sample.text);
            text.push_str(&suffix);
            text.push('\n');
        } else {
            let line = g.filler_line(style);
            text.push_str(&line);
            text.push('\n');
        }
    }
    Corpus { text, planted }
}

/// One snippet for `kind` from `seed` (for property tests).
pub fn sample(kind: Detector, seed: u64, style: Style) -> Sample {
    Gen::new(seed).sample(kind, style)
}

struct Gen {
    r: StdRng,
}

const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
const B64URL: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
const B64STD: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const UPPER: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ";
const ALPHA: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const HEX: &[u8] = b"0123456789abcdef";
const DIGITS: &[u8] = b"0123456789";
const AWS32: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
const WORDS: &[&str] = &[
    "order",
    "shipped",
    "invoice",
    "customer",
    "retry",
    "cache",
    "miss",
    "warehouse",
    "queue",
    "batch",
    "export",
    "report",
    "latency",
    "upstream",
    "connection",
    "pool",
    "refund",
    "cart",
    "checkout",
    "session",
    "renewed",
    "scheduler",
    "job",
    "completed",
    "failed",
    "timeout",
    "payload",
    "accepted",
    "rejected",
    "region",
    "eu-west-1",
    "replica",
    "lag",
    "vacuum",
];
const FIRST: &[&str] = &[
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy",
];
const LAST: &[&str] = &[
    "smith", "jones", "garcia", "muller", "rossi", "dubois", "silva", "kim", "nowak", "berg",
];
const DOMAINS: &[&str] = &[
    "example.com",
    "mail.example.org",
    "corp.example.net",
    "example.co.uk",
    "shop.example.de",
];

impl Gen {
    fn new(seed: u64) -> Gen {
        Gen {
            r: StdRng::seed_from_u64(seed),
        }
    }

    fn pick<'a>(&mut self, v: &[&'a str]) -> &'a str {
        v[self.r.random_range(0..v.len())]
    }

    fn chars(&mut self, set: &[u8], n: usize) -> String {
        (0..n)
            .map(|_| char::from(set[self.r.random_range(0..set.len())]))
            .collect()
    }

    fn num(&mut self, lo: u64, hi: u64) -> u64 {
        self.r.random_range(lo..=hi)
    }

    // ---- filler ----

    fn ts(&mut self) -> String {
        format!(
            "2024-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            self.num(1, 12),
            self.num(1, 28),
            self.num(0, 23),
            self.num(0, 59),
            self.num(0, 59),
            self.num(0, 999)
        )
    }

    fn uuid(&mut self) -> String {
        format!(
            "{}-{}-4{}-{}{}-{}",
            self.chars(HEX, 8),
            self.chars(HEX, 4),
            self.chars(HEX, 3),
            self.pick(&["8", "9", "a", "b"]),
            self.chars(HEX, 3),
            self.chars(HEX, 12)
        )
    }

    fn ip(&mut self) -> String {
        format!(
            "10.{}.{}.{}",
            self.num(0, 255),
            self.num(0, 255),
            self.num(1, 254)
        )
    }

    fn order_id(&mut self) -> String {
        format!(
            "ORD-2024{:04}-{}",
            self.num(101, 1231),
            self.num(1000, 99999)
        )
    }

    fn decoy(&mut self) -> String {
        match self.r.random_range(0..25) {
            0 => {
                // Visa-like with a wrong check digit
                let body = format!("4{}", self.chars(DIGITS, 14));
                let good = luhn_check_digit(&body).to_digit(10).unwrap_or(0);
                let bad = (good + 1 + self.num(0, 8) as u32) % 10;
                let n = format!("{body}{bad}");
                if self.r.random_bool(0.5) {
                    format!("ref {} {} {} {}", &n[0..4], &n[4..8], &n[8..12], &n[12..16])
                } else {
                    format!("num={n}")
                }
            }
            1 => {
                let bban = self.chars(DIGITS, 18);
                let cd: u32 = iban_check_digits("DE", &bban).parse().unwrap_or(0);
                format!("acct DE{:02}{bban}", (cd + 1) % 97 + 2)
            }
            2 => format!(
                "id {}-{:02}-{:04}",
                self.pick(&["000", "666", "912", "987"]),
                self.num(1, 99),
                self.num(1, 9999)
            ),
            3 => format!("trace={}", self.uuid()),
            4 => format!("commit {}", self.chars(HEX, 40)),
            5 => format!(
                "epoch_ms={}",
                self.num(1_700_000_000_000, 1_799_999_999_999)
            ),
            6 => "isbn 978-3-16-148410-0".to_string(),
            7 => format!("\"max_tokens\": {}", self.num(256, 8192)),
            8 => "\"tokenizer\": \"cl100k_base\"".to_string(),
            9 => "password_policy=strict".to_string(),
            10 => "mail to root@localhost".to_string(),
            11 => format!("key AKIA{}", self.chars(UPPER, 8)),
            12 => format!("ghp_{}", self.chars(ALNUM, 12)),
            13 => "task-runner disk-usage".to_string(),
            14 => format!("order {}", self.order_id()),
            15 => format!("tel 123-456-{:04}", self.num(0, 9999)),
            16 => format!(
                "v{}.{}.{} built {}",
                self.num(1, 3),
                self.num(0, 30),
                self.num(0, 9),
                self.ip()
            ),
            17 => format!("token_count={}", self.num(10, 99999)),
            18 => format!("header eyJhbGciOiJIUzI1NiJ9 at {}", self.num(1000, 9999)),
            19 => "Bearer token missing; Basic auth disabled".to_string(),
            20 => format!("\"secret_name\": \"db-creds-{}\"", self.num(1, 9)),
            21 => {
                // a spaced IBAN with wrong check digits
                let bban = self.chars(DIGITS, 18);
                let cd: u32 = iban_check_digits("DE", &bban).parse().unwrap_or(0);
                let bad = format!("DE{:02}{bban}", (cd + 1) % 97 + 2);
                let spaced: Vec<&str> = (0..bad.len())
                    .step_by(4)
                    .map(|i| &bad[i..(i + 4).min(bad.len())])
                    .collect();
                format!("iban {}", spaced.join(" "))
            }
            22 => format!("at 2024-05-01 12:00:00 +0000 {}", self.num(2000, 2030)),
            23 => format!("http://localhost:{}/health", self.num(1024, 65535)),
            _ => format!("price 1,{:03}.{:02} EUR", self.num(0, 999), self.num(0, 99)),
        }
    }

    fn filler_line(&mut self, style: Style) -> String {
        let d = if self.r.random_bool(0.35) {
            self.decoy()
        } else {
            self.pick(WORDS).to_string()
        };
        match style {
            Style::Log => format!(
                "{} {} [{}] {} {} request_id={} status={} duration_ms={} user_id={} ip={} {}",
                self.ts(),
                self.pick(&["INFO", "WARN", "DEBUG", "ERROR"]),
                self.pick(&["api", "billing", "worker", "auth", "search"]),
                self.pick(WORDS),
                self.pick(WORDS),
                self.uuid(),
                self.pick(&["200", "201", "204", "400", "404", "500"]),
                self.num(1, 1500),
                self.num(1, 99999),
                self.ip(),
                d
            ),
            Style::Json => format!(
                "{{\"id\": {}, \"created_at\": \"2024-{:02}-{:02} {:02}:{:02}:{:02}\", \"order_id\": \"{}\", \"amount\": {}.{:02}, \"currency\": \"EUR\", \"status\": \"{}\", \"sha\": \"{}\", \"note\": \"{}\"}}",
                self.num(1, 999_999),
                self.num(1, 12),
                self.num(1, 28),
                self.num(0, 23),
                self.num(0, 59),
                self.num(0, 59),
                self.order_id(),
                self.num(1, 9999),
                self.num(0, 99),
                self.pick(WORDS),
                self.chars(HEX, 40),
                d.replace('"', "\\\"")
            ),
            Style::Csv => format!(
                "{},{},2024-{:02}-{:02},{}.{:02},{},{}",
                self.num(1, 999_999),
                self.order_id(),
                self.num(1, 12),
                self.num(1, 28),
                self.num(1, 9999),
                self.num(0, 99),
                self.uuid(),
                d.replace(',', ";")
            ),
        }
    }

    /// The text around a planted snippet.
    fn frame(&mut self, style: Style) -> (String, String) {
        match style {
            Style::Log => (
                format!(
                    "{} {} [{}] {} ",
                    self.ts(),
                    self.pick(&["INFO", "WARN", "DEBUG"]),
                    self.pick(&["api", "billing", "worker", "auth"]),
                    self.pick(WORDS)
                ),
                format!(" request_id={} status=200", self.uuid()),
            ),
            Style::Json => (
                format!(
                    "{{\"id\": {}, \"order_id\": \"{}\", ",
                    self.num(1, 999_999),
                    self.order_id()
                ),
                format!(", \"status\": \"{}\"}}", self.pick(WORDS)),
            ),
            Style::Csv => (
                format!("{},{},", self.num(1, 999_999), self.order_id()),
                format!(",{},{}", self.pick(WORDS), self.uuid()),
            ),
        }
    }

    // ---- sensitive values ----

    fn card(&mut self) -> String {
        let (prefix, len) = match self.r.random_range(0..5) {
            0 => ("4".to_string(), 16),
            1 => (format!("5{}", self.num(1, 5)), 16),
            2 => (self.pick(&["34", "37"]).to_string(), 15),
            3 => ("6011".to_string(), 16),
            _ => (format!("{}", self.num(2221, 2720)), 16),
        };
        let body = format!("{prefix}{}", self.chars(DIGITS, len - 1 - prefix.len()));
        let n = format!("{body}{}", luhn_check_digit(&body));
        match (self.r.random_range(0..3), len) {
            (0, _) => n,
            (_, 15) => format!("{} {} {}", &n[0..4], &n[4..10], &n[10..15]),
            (k, _) => {
                let s = if k == 1 { " " } else { "-" };
                format!(
                    "{}{s}{}{s}{}{s}{}",
                    &n[0..4],
                    &n[4..8],
                    &n[8..12],
                    &n[12..16]
                )
            }
        }
    }

    fn iban(&mut self) -> String {
        let (cc, bban) = match self.r.random_range(0..6) {
            0 => ("DE", self.chars(DIGITS, 18)),
            1 => (
                "GB",
                format!(
                    "{}{}",
                    self.pick(&["WEST", "NWBK", "BARC"]),
                    self.chars(DIGITS, 14)
                ),
            ),
            2 => ("FR", self.chars(DIGITS, 23)),
            3 => (
                "NL",
                format!(
                    "{}{}",
                    self.pick(&["ABNA", "INGB", "RABO"]),
                    self.chars(DIGITS, 10)
                ),
            ),
            4 => ("ES", self.chars(DIGITS, 20)),
            _ => (
                "IT",
                format!("{}{}", self.chars(UPPER, 1), self.chars(DIGITS, 22)),
            ),
        };
        let cd = iban_check_digits(cc, &bban);
        let plain = format!("{cc}{cd}{bban}");
        if self.r.random_bool(0.5) {
            plain
        } else {
            plain
                .as_bytes()
                .chunks(4)
                .map(|c| std::str::from_utf8(c).unwrap_or(""))
                .collect::<Vec<_>>()
                .join(" ")
        }
    }

    fn phone(&mut self) -> String {
        let area = self.num(201, 989);
        let exch = self.num(200, 999);
        let line = self.num(0, 9999);
        match self.r.random_range(0..6) {
            0 => format!("+1 {area} {exch} {line:04}"),
            1 => format!("({area}) {exch}-{line:04}"),
            2 => format!("{area}-{exch}-{line:04}"),
            3 => format!("+44 20 {} {}", self.num(7000, 7999), self.num(1000, 9999)),
            4 => format!("+49 30 {}", self.num(1_000_000, 9_999_999)),
            _ => format!("020 {} {}", self.num(7000, 7999), self.num(1000, 9999)),
        }
    }

    fn ssn(&mut self) -> String {
        let mut area = self.num(1, 899);
        if area == 666 {
            area = 667;
        }
        format!("{area:03}-{:02}-{:04}", self.num(1, 99), self.num(1, 9999))
    }

    fn nino(&mut self) -> String {
        let first = self.pick(&[
            "A", "B", "C", "E", "H", "J", "K", "L", "M", "P", "R", "S", "W", "Y",
        ]);
        let second = self.pick(&[
            "A", "B", "C", "E", "H", "J", "K", "L", "M", "P", "R", "S", "W",
        ]);
        let d = self.chars(DIGITS, 6);
        let suffix = self.pick(&["A", "B", "C", "D"]);
        if self.r.random_bool(0.5) {
            format!("{first}{second}{d}{suffix}")
        } else {
            format!(
                "{first}{second} {} {} {} {suffix}",
                &d[0..2],
                &d[2..4],
                &d[4..6]
            )
        }
    }

    fn dni(&mut self) -> String {
        if self.r.random_bool(0.7) {
            let n = self.num(10_000_000, 99_999_999) as u32;
            format!("{n:08}{}", char::from(dni_letter(n)))
        } else {
            let lead = self.num(0, 2) as u32;
            let n = self.num(0, 9_999_999) as u32;
            format!(
                "{}{n:07}{}",
                ["X", "Y", "Z"][lead as usize],
                char::from(dni_letter(lead * 10_000_000 + n))
            )
        }
    }

    fn jwt(&mut self) -> String {
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = e.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let payload = e.encode(format!(
            r#"{{"sub":"user-{}","iat":{},"scope":"read:orders"}}"#,
            self.num(1, 99999),
            self.num(1_700_000_000, 1_799_999_999)
        ));
        let sig: Vec<u8> = (0..32).map(|_| self.r.random()).collect();
        format!("{header}.{payload}.{}", e.encode(sig))
    }

    fn pem_body(&mut self, lines: usize, newline: &str) -> String {
        let mut s = String::from("MIIE");
        s.push_str(&self.chars(B64STD, 60));
        for _ in 1..lines {
            s.push_str(newline);
            s.push_str(&self.chars(B64STD, 64));
        }
        s
    }

    fn password(&mut self) -> String {
        let n = self.r.random_range(12..20);
        let mut p = self.chars(ALNUM, n);
        p.push_str(self.pick(&["!", "#", "%", "^", "*"]));
        p.push_str(&self.chars(DIGITS, 2));
        p
    }

    /// A snippet with a neutral label (no secret keyword): `label=value` or a JSON member.
    fn labelled(&self, style: Style, label: &str, value: &str) -> Sample {
        self.wrap(style, label, Sample::one(value.to_string(), 0..value.len()))
    }

    /// A token with a literal prefix.
    fn token(&mut self, kind: Detector) -> String {
        match kind {
            Detector::AwsAccessKeyId => {
                format!("{}{}", self.pick(&["AKIA", "ASIA"]), self.chars(AWS32, 16))
            }
            Detector::GcpApiKey => format!("AIza{}", self.chars(B64URL, 35)),
            Detector::GithubToken => {
                if self.r.random_bool(0.8) {
                    let p = self.pick(&["ghp_", "gho_", "ghu_", "ghs_", "ghr_"]);
                    format!("{p}{}", self.chars(ALNUM, 36))
                } else {
                    format!(
                        "github_pat_{}_{}",
                        self.chars(ALNUM, 22),
                        self.chars(ALNUM, 59)
                    )
                }
            }
            Detector::GitlabToken => format!("glpat-{}", self.chars(ALNUM, 20)),
            Detector::SlackToken => format!(
                "{}{}-{}-{}",
                self.pick(&["xoxb-", "xoxp-"]),
                self.chars(DIGITS, 12),
                self.chars(DIGITS, 13),
                self.chars(ALNUM, 24)
            ),
            Detector::OpenaiApiKey => {
                if self.r.random_bool(0.6) {
                    format!("sk-proj-{}", self.chars(ALNUM, 48))
                } else {
                    format!("sk-{}", self.chars(ALNUM, 48))
                }
            }
            Detector::AnthropicApiKey => format!("sk-ant-api03-{}AA", self.chars(B64URL, 93)),
            Detector::StripeKey => {
                let p = self.pick(&["sk_live_", "rk_live_", "sk_test_"]);
                format!("{p}{}", self.chars(ALNUM, 24))
            }
            Detector::CustosToken => {
                format!("cst_{}_{}", self.chars(HEX, 16), self.chars(B64URL, 43))
            }
            Detector::Jwt => self.jwt(),
            Detector::NpmToken => format!("npm_{}", self.chars(ALNUM, 36)),
            Detector::HuggingfaceToken => format!("hf_{}", self.chars(ALPHA, 34)),
            Detector::SendgridApiKey => {
                format!("SG.{}.{}", self.chars(B64URL, 22), self.chars(B64URL, 43))
            }
            _ => unreachable!("not a prefixed token: {kind}"),
        }
    }

    /// A snippet for `kind` in `style`; every value in it has valid checksums.
    fn sample(&mut self, kind: Detector, style: Style) -> Sample {
        match kind {
            Detector::Email => {
                let v = format!(
                    "{}.{}{}@{}",
                    self.pick(FIRST),
                    self.pick(LAST),
                    self.num(1, 99),
                    self.pick(DOMAINS)
                );
                self.labelled(style, "contact", &v)
            }
            Detector::CreditCard => {
                let v = self.card();
                self.labelled(style, "card", &v)
            }
            Detector::Iban => {
                let v = self.iban();
                self.labelled(style, "iban", &v)
            }
            Detector::Phone => {
                let v = self.phone();
                self.labelled(style, "phone", &v)
            }
            Detector::UsSsn => {
                let v = self.ssn();
                self.labelled(style, "ssn", &v)
            }
            Detector::UkNino => {
                let v = self.nino();
                self.labelled(style, "nino", &v)
            }
            Detector::EsDni => {
                let v = self.dni();
                self.labelled(style, "dni", &v)
            }
            Detector::SlackWebhook => {
                let path = format!(
                    "hooks.slack.com/services/T{}/B{}/{}",
                    self.chars(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", 8),
                    self.chars(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", 8),
                    self.chars(ALNUM, 24)
                );
                let text = format!("https://{path}");
                let len = text.len();
                self.wrap(style, "webhook", Sample::one(text, 8..len))
            }
            Detector::AzureStorageKey => {
                let key = format!("{}==", self.chars(B64STD, 86));
                let pre = "DefaultEndpointsProtocol=https;AccountName=shopdata;AccountKey=";
                let text = format!("{pre}{key};EndpointSuffix=core.windows.net");
                self.wrap(
                    style,
                    "storage",
                    Sample::one(text, pre.len()..pre.len() + key.len()),
                )
            }
            Detector::UrlPassword => {
                let pw = self.chars(ALNUM, 16);
                let pre = format!(
                    "{}://{}:",
                    self.pick(&["postgres", "mysql", "redis", "https"]),
                    self.pick(&["app", "svc_reporting", "admin"])
                );
                let text = format!("{pre}{pw}@db-{}.internal:5432/app", self.num(1, 9));
                self.wrap(
                    style,
                    "dsn",
                    Sample::one(text, pre.len()..pre.len() + pw.len()),
                )
            }
            Detector::HttpAuth => {
                let (pre, v) = if self.r.random_bool(0.6) {
                    ("Authorization: Bearer ", self.chars(B64URL, 40))
                } else {
                    let cred = format!("{}:{}", self.pick(FIRST), self.password());
                    (
                        "Authorization: Basic ",
                        base64::engine::general_purpose::STANDARD.encode(cred),
                    )
                };
                let text = format!("{pre}{v}");
                self.wrap(
                    style,
                    "hdr",
                    Sample::one(text, pre.len()..pre.len() + v.len()),
                )
            }
            Detector::GenericSecret | Detector::AwsSecretAccessKey => {
                let (label, v) = if kind == Detector::AwsSecretAccessKey {
                    let l = self.pick(&[
                        "aws_secret_access_key",
                        "AWS_SECRET_ACCESS_KEY",
                        "SecretAccessKey",
                    ]);
                    (l, self.chars(B64STD, 40))
                } else {
                    let l = self.pick(&[
                        "password",
                        "client_secret",
                        "db_password",
                        "api_key",
                        "auth_token",
                        "SECRET_KEY",
                    ]);
                    let v = if l.contains("password") {
                        self.password()
                    } else {
                        self.chars(ALNUM, 32)
                    };
                    (l, v)
                };
                let (pre, post) = match style {
                    Style::Log => (format!("{label}="), ""),
                    Style::Json => (format!("\"{label}\": \""), "\""),
                    Style::Csv => (format!("{label}: "), ""),
                };
                let text = format!("{pre}{v}{post}");
                Sample::one(text, pre.len()..pre.len() + v.len())
            }
            Detector::PrivateKey => {
                let label = self.pick(&[
                    "RSA PRIVATE KEY",
                    "PRIVATE KEY",
                    "EC PRIVATE KEY",
                    "OPENSSH PRIVATE KEY",
                ]);
                let lines = self.r.random_range(3..12);
                let pem = format!(
                    "-----BEGIN {label}-----\n{}\n-----END {label}-----",
                    self.pem_body(lines, "\n")
                );
                let pre = "key material:\n";
                let len = pem.len();
                Sample::one(format!("{pre}{pem}"), pre.len()..pre.len() + len)
            }
            Detector::GcpServiceAccountKey => {
                let id = self.chars(HEX, 40);
                let lines = self.r.random_range(3..10);
                let key = format!(
                    "-----BEGIN PRIVATE KEY-----\\n{}\\n-----END PRIVATE KEY-----\\n",
                    self.pem_body(lines, "\\n")
                );
                let pre = "{\"type\": \"service_account\", \"project_id\": \"shop-prod\", \"private_key_id\": \"";
                let mid = "\", \"private_key\": \"";
                let text = format!(
                    "{pre}{id}{mid}{key}\", \"token_uri\": \"https://oauth2.googleapis.com/token\"}}"
                );
                let kstart = pre.len() + id.len() + mid.len();
                Sample {
                    text,
                    values: vec![pre.len()..pre.len() + id.len(), kstart..kstart + key.len()],
                }
            }
            _ => {
                let v = self.token(kind);
                let label = match kind {
                    Detector::Jwt => "session",
                    Detector::AwsAccessKeyId => "aws_key_id",
                    _ => "value",
                };
                self.labelled(style, label, &v)
            }
        }
    }

    fn wrap(&self, style: Style, label: &str, s: Sample) -> Sample {
        let (pre, post) = match style {
            Style::Log => (format!("{label}="), ""),
            Style::Json => (format!("\"{label}\": \""), "\""),
            Style::Csv => (String::new(), ""),
        };
        Sample {
            text: format!("{pre}{}{post}", s.text),
            values: s
                .values
                .iter()
                .map(|v| pre.len() + v.start..pre.len() + v.end)
                .collect(),
        }
    }
}
