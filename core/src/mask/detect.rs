//! The detectors and the scan that finds their matches.
//!
//! Two cheap passes find *triggers*; only triggers run the (more expensive) confirmation:
//!
//! 1. one Aho-Corasick automaton over every literal anchor (token prefixes such as `AKIA` or
//!    `ghp_`, `-----BEGIN `, `://`, `Bearer `, and the spelled-out case variants of secret labels
//!    such as `password`/`PASSWORD`), overlapping, so each occurrence is found wherever a scan
//!    starts;
//! 2. one byte loop for the detectors without a literal: the start of every digit run that begins
//!    a digit cluster of at least 7 digits (or follows two capital letters: IBAN, NINO), and `@`.
//!
//! Every confirmation is a function of a bounded window around its trigger, read through [`Win`]:
//! at most `read_back` bytes before the trigger and `fwd` bytes after it. That locality is what
//! makes the streaming masker exact: a window that reaches past the bytes received so far returns
//! [`Need`], and the candidate is decided later, with the same bytes, to the same result.

use aho_corasick::packed;
use aho_corasick::Span;
use regex::Regex;

use super::checks;

/// Every built-in detector. The order is the tie-break when two candidates start and end at the
/// same byte (earlier wins).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Detector {
    PrivateKey,
    GcpServiceAccountKey,
    AwsAccessKeyId,
    AwsSecretAccessKey,
    GcpApiKey,
    GithubToken,
    GitlabToken,
    SlackToken,
    SlackWebhook,
    OpenaiApiKey,
    AnthropicApiKey,
    StripeKey,
    CustosToken,
    Jwt,
    NpmToken,
    HuggingfaceToken,
    SendgridApiKey,
    AzureStorageKey,
    UrlPassword,
    HttpAuth,
    GenericSecret,
    Email,
    CreditCard,
    Iban,
    Phone,
    UsSsn,
    UkNino,
    EsDni,
}

/// Number of built-in detectors.
pub const DETECTOR_COUNT: usize = 28;

impl Detector {
    /// All detectors, in tie-break order.
    pub const ALL: [Detector; DETECTOR_COUNT] = [
        Detector::PrivateKey,
        Detector::GcpServiceAccountKey,
        Detector::AwsAccessKeyId,
        Detector::AwsSecretAccessKey,
        Detector::GcpApiKey,
        Detector::GithubToken,
        Detector::GitlabToken,
        Detector::SlackToken,
        Detector::SlackWebhook,
        Detector::OpenaiApiKey,
        Detector::AnthropicApiKey,
        Detector::StripeKey,
        Detector::CustosToken,
        Detector::Jwt,
        Detector::NpmToken,
        Detector::HuggingfaceToken,
        Detector::SendgridApiKey,
        Detector::AzureStorageKey,
        Detector::UrlPassword,
        Detector::HttpAuth,
        Detector::GenericSecret,
        Detector::Email,
        Detector::CreditCard,
        Detector::Iban,
        Detector::Phone,
        Detector::UsSsn,
        Detector::UkNino,
        Detector::EsDni,
    ];

    /// The name used in configuration, in `[REDACTED:<name>]` and in [`super::Stats`].
    pub fn name(self) -> &'static str {
        match self {
            Detector::PrivateKey => "private_key",
            Detector::GcpServiceAccountKey => "gcp_service_account_key",
            Detector::AwsAccessKeyId => "aws_access_key_id",
            Detector::AwsSecretAccessKey => "aws_secret_access_key",
            Detector::GcpApiKey => "gcp_api_key",
            Detector::GithubToken => "github_token",
            Detector::GitlabToken => "gitlab_token",
            Detector::SlackToken => "slack_token",
            Detector::SlackWebhook => "slack_webhook",
            Detector::OpenaiApiKey => "openai_api_key",
            Detector::AnthropicApiKey => "anthropic_api_key",
            Detector::StripeKey => "stripe_key",
            Detector::CustosToken => "custos_token",
            Detector::Jwt => "jwt",
            Detector::NpmToken => "npm_token",
            Detector::HuggingfaceToken => "huggingface_token",
            Detector::SendgridApiKey => "sendgrid_api_key",
            Detector::AzureStorageKey => "azure_storage_key",
            Detector::UrlPassword => "url_password",
            Detector::HttpAuth => "http_auth",
            Detector::GenericSecret => "generic_secret",
            Detector::Email => "email",
            Detector::CreditCard => "credit_card",
            Detector::Iban => "iban",
            Detector::Phone => "phone",
            Detector::UsSsn => "us_ssn",
            Detector::UkNino => "uk_nino",
            Detector::EsDni => "es_dni",
        }
    }

    /// Look a detector up by its configuration name.
    pub fn from_name(name: &str) -> Option<Detector> {
        Detector::ALL.iter().copied().find(|d| d.name() == name)
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

impl std::fmt::Display for Detector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A confirmed match: `start..end` is the span that competes with other matches (it may include a
/// label such as `password=`); `mstart..mend` is the part that is replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Cand {
    pub start: usize,
    pub end: usize,
    pub mstart: usize,
    pub mend: usize,
    pub kind: Detector,
    /// The trigger that found it (a literal anchor, an `@`, a digit-run start): its window is
    /// read around this position.
    pub trig: usize,
}

/// A window read needed bytes the stream has not delivered yet.
#[derive(Debug)]
pub(crate) struct Need;

/// The stretch of text an analysis sees: bytes below `lo` read as "no byte" (the start of the
/// text, or the end of a replaced match: the placeholder that will stand there stops every
/// detector as the start of a text does), and so do bytes at or past `hi` (the end of the text,
/// or the start of a replaced match), unless `more` is set, in which case reading them fails
/// with [`Need`] (a stream that has not ended, or a verdict that must not depend on them).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Gap {
    pub lo: usize,
    pub hi: usize,
    pub more: bool,
}

/// An evaluated trigger: where it is, what it is, and how far its verdict read.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Trig {
    pub t: usize,
    /// `read - t` (see [`Trig::read`]; windows are shorter than 64 KiB).
    read_d: u16,
    /// `t - pstart` (matches start at most 64 bytes before their trigger).
    pstart_d: u8,
    what: What,
}

impl Trig {
    fn new(t: usize, read: usize, pstart: usize, what: What) -> Trig {
        debug_assert!(read.saturating_sub(t) <= usize::from(u16::MAX) && t - pstart <= 255);
        Trig {
            t,
            read_d: u16::try_from(read.saturating_sub(t)).unwrap_or(u16::MAX),
            pstart_d: u8::try_from(t - pstart).unwrap_or(u8::MAX),
            what,
        }
    }

    /// One past the farthest byte its window read: replacing bytes from there on cannot change
    /// its verdict.
    pub fn read(&self) -> usize {
        self.t + usize::from(self.read_d)
    }

    /// The lowest start of a match it can give.
    pub fn pstart(&self) -> usize {
        self.t - usize::from(self.pstart_d)
    }

    /// A literal anchor (not an `@` or a digit-run start).
    pub fn is_literal(&self) -> bool {
        matches!(self.what, What::Lit(..))
    }
}

#[derive(Clone, Copy, Debug)]
enum What {
    /// Literal `pat` of set `set`.
    Lit(u8, u16),
    Email,
    Digits,
}

/// The farthest an `@` reads after itself (its window).
pub(crate) const AT_REACH: usize = EMAIL_FWD + 1;
/// The farthest a digit-run start reads after itself (its window).
pub(crate) const DIGIT_REACH: usize = DIGIT_FWD + 1;

/// A bounded view of the text around one trigger. Reads below `lo` see "no byte" (as at the start
/// of a text); reads at or past `hi` see "no byte" too, unless more bytes may still arrive, in
/// which case they fail with [`Need`].
#[derive(Clone)]
pub(crate) struct Win<'a> {
    t: &'a [u8],
    lo: usize,
    hi: usize,
    more: bool,
    /// One past the farthest byte read (reads below `lo` aside): how far the verdict depends on
    /// the text.
    seen: std::cell::Cell<usize>,
}

impl<'a> Win<'a> {
    fn new(t: &'a [u8], g: Gap, at: usize, back: usize, fwd: usize) -> Self {
        let end = at.saturating_add(fwd).saturating_add(1);
        Win {
            t,
            lo: at.saturating_sub(back).max(g.lo),
            hi: end.min(g.hi).min(t.len()),
            more: g.more && end > g.hi.min(t.len()),
            seen: std::cell::Cell::new(at),
        }
    }

    /// Note a read of byte `i`.
    #[inline]
    fn note(&self, i: usize) {
        if i >= self.seen.get() {
            self.seen.set(i + 1);
        }
    }

    #[inline]
    fn at(&self, i: usize) -> Result<Option<u8>, Need> {
        if i < self.lo {
            return Ok(None);
        }
        self.note(i);
        if i < self.hi {
            Ok(Some(self.t[i]))
        } else if self.more {
            Err(Need)
        } else {
            Ok(None)
        }
    }

    #[inline]
    fn prev(&self, i: usize) -> Result<Option<u8>, Need> {
        if i == 0 {
            Ok(None)
        } else {
            self.at(i - 1)
        }
    }

    fn is(&self, i: usize, f: impl Fn(u8) -> bool) -> Result<bool, Need> {
        Ok(self.at(i)?.is_some_and(f))
    }

    fn starts_with(&self, i: usize, lit: &[u8]) -> Result<bool, Need> {
        for (k, &c) in lit.iter().enumerate() {
            if self.at(i + k)? != Some(c) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Round `i` down to a UTF-8 character boundary (for caps that may cut a character), looking
    /// only at bytes before `i` (the byte at `i` may lie outside the window).
    fn floor_char(&self, i: usize) -> usize {
        let mut j = i;
        while j > self.lo && i - j < 3 && (self.t[j - 1] & 0xC0) == 0x80 {
            j -= 1;
        }
        if j == 0 || j <= self.lo {
            return i;
        }
        let lead = self.t[j - 1];
        let width = match lead {
            0xF0..=0xFF => 4,
            0xE0..=0xEF => 3,
            0xC0..=0xDF => 2,
            _ => 1,
        };
        if j - 1 + width > i {
            j - 1
        } else {
            i
        }
    }
}

fn is_digit(b: u8) -> bool {
    b.is_ascii_digit()
}
fn is_alnum(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}
fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}
fn is_upper(b: u8) -> bool {
    b.is_ascii_uppercase()
}
fn is_b64url(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}
fn is_b64url_dot(b: u8) -> bool {
    is_b64url(b) || b == b'.'
}
fn is_b64std(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'='
}
fn is_upper_digit(b: u8) -> bool {
    b.is_ascii_uppercase() || b.is_ascii_digit()
}
fn is_word_dash(b: u8) -> bool {
    is_word(b) || b == b'-'
}
fn is_webhook(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'/' | b'.' | b'_' | b'-')
}
fn is_host_before(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'.' || b == b'-'
}
/// Characters of an e-mail local part (the unquoted, ASCII subset of RFC 5322).
pub(crate) fn is_local(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'%' | b'+' | b'-')
}
/// Characters that may precede the first digit of a digit-detector match (IBAN/NINO letters, `+`,
/// `(`); see [`lead_back`] for the space of `AB 12 34 56 C`.
pub(crate) fn is_digit_lead(b: u8) -> bool {
    b.is_ascii_uppercase() || matches!(b, b'+' | b'(')
}
fn is_label(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')
}
fn is_sep(b: u8) -> bool {
    matches!(b, b' ' | b'-' | b'.' | b'(' | b')' | b'/')
}
fn is_quote(b: u8) -> bool {
    b == b'"' || b == b'\''
}

/// Longest span a digit-detector match can have (IBAN: 34 characters plus 8 spaces).
const DIGIT_FWD: usize = 64;
/// How far a digit-detector match can start before its trigger (`AB ` of a spaced NINO).
pub(crate) const DIGIT_SPAN_BACK: usize = 3;
/// Look-behind of the digit detectors (the groups of a spaced IBAN before a digit run).
const DIGIT_READ_BACK: usize = 48;
/// Longest e-mail local part (RFC 5321).
pub(crate) const EMAIL_SPAN_BACK: usize = 64;
const EMAIL_FWD: usize = 256;
/// Cap of a JWT (and of a bearer value): longer tokens are masked up to the cap.
pub const JWT_CAP: usize = 8192;
/// Cap of a PEM private key block (and of a service-account `private_key` value).
pub const PEM_CAP: usize = 16384;
const LABEL_READ_BACK: usize = 40;
/// Longest `Basic` credential read.
const BASIC_CAP: usize = 1024;
const LABEL_FWD: usize = 512;
const LABEL_VALUE_CAP: usize = 256;
const URL_FWD: usize = 512;
/// Longest authority (`user:password@host`) a URL password is looked for in.
const URL_SCAN: usize = 256;

/// A token with a literal prefix, confirmed by a full-match regex (and for some, more).
struct TokenSpec {
    kind: Detector,
    prefixes: &'static [&'static str],
    class: fn(u8) -> bool,
    no_before: fn(u8) -> bool,
    max_len: usize,
    re: &'static str,
    /// Only the part after the prefix is the secret (`AccountKey=<key>`).
    value_after_prefix: bool,
}

const SPECS: &[TokenSpec] = &[
    TokenSpec {
        kind: Detector::AwsAccessKeyId,
        prefixes: &[
            "AKIA", "ASIA", "AGPA", "AIDA", "AROA", "AIPA", "ANPA", "ANVA", "ABIA", "ACCA",
        ],
        class: is_upper_digit,
        no_before: is_alnum,
        max_len: 20,
        re: r"^(?:AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA|ABIA|ACCA)[A-Z2-7]{16}$",
        value_after_prefix: false,
    },
    TokenSpec {
        kind: Detector::GcpApiKey,
        prefixes: &["AIza"],
        class: is_b64url,
        no_before: is_b64url,
        max_len: 39,
        re: r"^AIza[0-9A-Za-z_-]{35}$",
        value_after_prefix: false,
    },
    TokenSpec {
        kind: Detector::GithubToken,
        prefixes: &["ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"],
        class: is_word,
        no_before: is_word,
        max_len: 93,
        re: r"^(?:gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9]{22}_[A-Za-z0-9]{59})$",
        value_after_prefix: false,
    },
    TokenSpec {
        kind: Detector::GitlabToken,
        prefixes: &["glpat-"],
        class: is_b64url_dot,
        no_before: is_word,
        max_len: 100,
        re: r"^glpat-[A-Za-z0-9_.-]{20,94}$",
        value_after_prefix: false,
    },
    TokenSpec {
        kind: Detector::SlackToken,
        prefixes: &[
            "xoxa-", "xoxb-", "xoxp-", "xoxr-", "xoxs-", "xoxe-", "xapp-",
        ],
        class: is_word_dash,
        no_before: is_alnum,
        max_len: 255,
        re: r"^(?:xox[abprse]|xapp)-[0-9A-Za-z]+-[0-9A-Za-z-]{10,}$",
        value_after_prefix: false,
    },
    TokenSpec {
        kind: Detector::SlackWebhook,
        prefixes: &["hooks.slack.com/services/"],
        class: is_webhook,
        no_before: is_host_before,
        max_len: 128,
        re: r"^hooks\.slack\.com/services/T[A-Z0-9]{6,12}/B[A-Z0-9]{6,12}/[A-Za-z0-9]{20,32}$",
        value_after_prefix: false,
    },
    TokenSpec {
        kind: Detector::AnthropicApiKey,
        prefixes: &["sk-ant-"],
        class: is_b64url,
        no_before: is_b64url,
        max_len: 200,
        re: r"^sk-ant-(?:api|admin|sid|oat)[0-9]{2}-[A-Za-z0-9_-]{32,180}$",
        value_after_prefix: false,
    },
    TokenSpec {
        kind: Detector::OpenaiApiKey,
        prefixes: &["sk-"],
        class: is_b64url,
        no_before: is_b64url,
        max_len: 220,
        re: r"^sk-(?:(?:proj|svcacct|admin)-[A-Za-z0-9_-]{20,200}|[A-Za-z0-9]{32,64})$",
        value_after_prefix: false,
    },
    TokenSpec {
        kind: Detector::StripeKey,
        prefixes: &["sk_live_", "rk_live_", "sk_test_", "rk_test_", "whsec_"],
        class: is_word,
        no_before: is_word,
        max_len: 255,
        re: r"^(?:(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{20,247}|whsec_[A-Za-z0-9]{32,64})$",
        value_after_prefix: false,
    },
    TokenSpec {
        kind: Detector::CustosToken,
        prefixes: &["cst_"],
        class: is_b64url,
        no_before: is_b64url,
        max_len: 64,
        re: r"^cst_[0-9A-Fa-f]{16}_[A-Za-z0-9_-]{43}$",
        value_after_prefix: false,
    },
    TokenSpec {
        kind: Detector::Jwt,
        prefixes: &["eyJ"],
        class: is_b64url_dot,
        no_before: is_b64url_dot,
        max_len: JWT_CAP,
        re: r"^eyJ[A-Za-z0-9_-]{4,}(?:\.[A-Za-z0-9_-]*){1,4}$",
        value_after_prefix: false,
    },
    TokenSpec {
        kind: Detector::NpmToken,
        prefixes: &["npm_"],
        class: is_word,
        no_before: is_word,
        max_len: 40,
        re: r"^npm_[A-Za-z0-9]{36}$",
        value_after_prefix: false,
    },
    TokenSpec {
        kind: Detector::HuggingfaceToken,
        prefixes: &["hf_"],
        class: is_word,
        no_before: is_word,
        max_len: 40,
        re: r"^hf_[A-Za-z]{34}$",
        value_after_prefix: false,
    },
    TokenSpec {
        kind: Detector::SendgridApiKey,
        prefixes: &["SG."],
        class: is_b64url_dot,
        no_before: is_b64url_dot,
        max_len: 69,
        re: r"^SG\.[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43}$",
        value_after_prefix: false,
    },
    TokenSpec {
        kind: Detector::AzureStorageKey,
        prefixes: &["AccountKey=", "SharedAccessKey="],
        class: is_b64std,
        no_before: is_alnum,
        max_len: 120,
        re: r"^[A-Za-z0-9+/]{40,100}={0,2}$",
        value_after_prefix: true,
    },
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    Password,
    Passwd,
    Passphrase,
    Pwd,
    Secret,
    Token,
    ApiKey,
    AccessKey,
    Credential,
    PrivateKey,
}

impl Family {
    fn password_like(self) -> bool {
        matches!(
            self,
            Family::Password | Family::Passwd | Family::Passphrase | Family::Pwd
        )
    }
}

/// Secret labels, spelled out in the case variants that occur in practice (the automaton is
/// case-sensitive so that it keeps its SIMD prefilter).
const LABELS: &[(Family, &[&str])] = &[
    (Family::Password, &["password", "Password", "PASSWORD"]),
    (Family::Passwd, &["passwd", "Passwd", "PASSWD"]),
    (
        Family::Passphrase,
        &["passphrase", "Passphrase", "PASSPHRASE"],
    ),
    (Family::Pwd, &["pwd", "Pwd", "PWD"]),
    (Family::Secret, &["secret", "Secret", "SECRET"]),
    (Family::Token, &["token", "Token", "TOKEN"]),
    (
        Family::ApiKey,
        &[
            "apikey", "apiKey", "ApiKey", "APIKEY", "api_key", "Api_Key", "API_KEY", "api-key",
            "Api-Key", "API-KEY",
        ],
    ),
    (
        Family::AccessKey,
        &[
            "access_key",
            "accessKey",
            "AccessKey",
            "ACCESS_KEY",
            "access-key",
        ],
    ),
    (
        Family::Credential,
        &["credential", "Credential", "CREDENTIAL"],
    ),
    (
        Family::PrivateKey,
        &["private_key", "privateKey", "PrivateKey", "PRIVATE_KEY"],
    ),
];

/// What a literal anchor triggers.
#[derive(Clone, Copy, Debug)]
enum Eval {
    Token(u8),
    /// `sk-`: Anthropic and OpenAI share the prefix.
    Sk,
    Pem,
    GcpSa,
    UrlPw,
    Bearer,
    Basic,
    Label(Family),
}

struct Lit {
    eval: Eval,
    len: usize,
}

/// One Teddy searcher over a set of literals (at most 64, so that Teddy keeps its speed).
struct LitSet {
    searcher: packed::Searcher,
    lits: Vec<Lit>,
}

impl LitSet {
    fn new(pats: &[&'static str], lits: Vec<Lit>) -> Option<LitSet> {
        if pats.is_empty() {
            return None;
        }
        let searcher = packed::Config::new()
            .match_kind(packed::MatchKind::LeftmostFirst)
            .builder()
            .extend(pats.iter())
            .build()
            .expect("literal anchors compile");
        Some(LitSet { searcher, lits })
    }

    /// Every occurrence (start, pattern) that starts in `from..end` and ends by `end`, in order.
    /// The search restarts one byte after each match, so every occurrence is found wherever the
    /// scan starts (no literal is a prefix of another: one match per start position).
    fn occurrences<'t>(
        &'t self,
        text: &'t [u8],
        from: usize,
        end: usize,
    ) -> impl Iterator<Item = (usize, u16)> + 't {
        let mut at = from;
        std::iter::from_fn(move || {
            let m = self.searcher.find_in(text, Span::from(at..end))?;
            at = m.start() + 1;
            Some((m.start(), m.pattern().as_usize() as u16))
        })
    }
}

/// The compiled detectors.
pub(crate) struct Engine {
    enabled: u32,
    /// Token prefixes and structural anchors; secret labels; the three-byte anchors. Separate
    /// sets keep each under Teddy's 64-pattern limit and give the large ones 4-byte fingerprints.
    sets: Vec<LitSet>,
    /// Proper prefixes of every literal (for the stream's "a literal may be starting here").
    partials: std::collections::HashSet<Vec<u8>>,
    /// For each length `k`, the first bytes of the proper prefixes of length `k` (a bitset): a
    /// cheap necessary test before the `partials` look-up, which a stream runs at every push.
    partial_first: Vec<[u64; 4]>,
    /// For each byte, the lengths `k` (bit `k`) of the proper prefixes that end with it: a push
    /// tries only those lengths for the text's last bytes.
    partial_last: Box<[u64; 256]>,
    max_lit: usize,
    spec_re: Vec<Regex>,
    digits_on: bool,
    email_on: bool,
    holdback: usize,
    ctx_keep: usize,
    rfix: usize,
}

/// Every occurrence of the literal anchors in a text, set by set, by position (start, pattern):
/// found once by [`Engine::find_literals`] for a buffer of many short values, then handed to
/// the analysis of each value (see [`Literals::within`]) instead of searching each one again.
#[derive(Debug, Default)]
pub(crate) struct Literals {
    occ: Vec<Vec<(usize, u16)>>,
    /// Per set, where the last [`Literals::within`] started.
    cursor: [usize; MAX_SETS],
}

/// The most literal sets an engine has (see `all_literals`).
const MAX_SETS: usize = 3;

/// The occurrences of [`Literals`] that start in one stretch of the text, per set.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Found<'a>([&'a [(usize, u16)]; MAX_SETS]);

impl Literals {
    /// The occurrences that start in `from..to`. Stretches asked for in increasing order are
    /// found by walking forward from the previous one (a binary search over the occurrences of
    /// a large buffer, per value, cost more than the search it saves).
    pub(crate) fn within(&mut self, from: usize, to: usize) -> Found<'_> {
        let mut out: [&[(usize, u16)]; MAX_SETS] = [&[]; MAX_SETS];
        for ((occ, cur), slot) in self.occ.iter().zip(&mut self.cursor).zip(&mut out) {
            let mut a = (*cur).min(occ.len());
            if a > 0 && occ[a - 1].0 >= from {
                // Asked out of order: search from the start.
                a = occ.partition_point(|&(t, _)| t < from);
            }
            while a < occ.len() && occ[a].0 < from {
                a += 1;
            }
            let mut b = a;
            while b < occ.len() && occ[b].0 < to {
                b += 1;
            }
            *cur = a;
            *slot = &occ[a..b];
        }
        Found(out)
    }
}

/// Literals of the two sets (for the "no literal is a prefix of another" check).
#[cfg(test)]
pub(crate) fn literal_sets() -> Vec<Vec<&'static str>> {
    let (a, b, c) = all_literals(&Detector::ALL);
    [a, b, c]
        .into_iter()
        .map(|v| v.into_iter().map(|x| x.0).collect())
        .collect()
}

/// The literal anchors of the enabled detectors: (token and structural anchors, secret labels,
/// the three-byte anchors of both).
#[allow(clippy::type_complexity)]
fn all_literals(
    enabled: &[Detector],
) -> (
    Vec<(&'static str, Eval)>,
    Vec<(&'static str, Eval)>,
    Vec<(&'static str, Eval)>,
) {
    let on = |d: Detector| enabled.contains(&d);
    let mut tokens: Vec<(&'static str, Eval)> = Vec::new();
    let mut add = |p: &'static str, eval: Eval| {
        if !tokens.iter().any(|(q, _)| *q == p) {
            tokens.push((p, eval));
        }
    };
    for (i, s) in SPECS.iter().enumerate() {
        if !on(s.kind) {
            continue;
        }
        if matches!(s.kind, Detector::AnthropicApiKey | Detector::OpenaiApiKey) {
            add("sk-", Eval::Sk);
        } else {
            for p in s.prefixes {
                add(p, Eval::Token(i as u8));
            }
        }
    }
    if on(Detector::PrivateKey) {
        add("-----BEGIN ", Eval::Pem);
    }
    if on(Detector::GcpServiceAccountKey) {
        add("\"private_key", Eval::GcpSa);
    }
    if on(Detector::UrlPassword) {
        add("://", Eval::UrlPw);
    }
    if on(Detector::HttpAuth) {
        for p in ["Bearer ", "bearer ", "BEARER "] {
            add(p, Eval::Bearer);
        }
        add("Basic ", Eval::Basic);
    }
    let mut labels = Vec::new();
    if on(Detector::GenericSecret) || on(Detector::AwsSecretAccessKey) {
        for (fam, words) in LABELS {
            for w in *words {
                labels.push((*w, Eval::Label(*fam)));
            }
        }
    }
    // Three-byte anchors get their own small set: the others then use 4-byte fingerprints.
    let short: Vec<(&'static str, Eval)> = tokens
        .iter()
        .chain(labels.iter())
        .filter(|(p, _)| p.len() < 4)
        .copied()
        .collect();
    tokens.retain(|(p, _)| p.len() >= 4);
    labels.retain(|(p, _)| p.len() >= 4);
    (tokens, labels, short)
}

impl Engine {
    pub(crate) fn new(enabled_list: &[Detector]) -> Engine {
        let mut enabled = 0u32;
        for d in enabled_list {
            enabled |= d.bit();
        }
        let on = |d: Detector| enabled & d.bit() != 0;
        let spec_re: Vec<Regex> = SPECS
            .iter()
            .map(|s| Regex::new(s.re).expect("built-in detector regex compiles"))
            .collect();

        // (fwd, read_back) of every enabled evaluator, for the hold-back bound.
        let mut reach: Vec<(usize, usize)> = Vec::new();
        for s in SPECS.iter().filter(|s| on(s.kind)) {
            reach.push((s.max_len + 2, 1));
        }
        if on(Detector::PrivateKey) {
            reach.push((PEM_CAP, 0));
        }
        if on(Detector::GcpServiceAccountKey) {
            reach.push((PEM_CAP + 64, 1));
        }
        if on(Detector::UrlPassword) {
            reach.push((URL_FWD, 1));
        }
        if on(Detector::HttpAuth) {
            reach.push((JWT_CAP + 16, 1));
        }
        if on(Detector::GenericSecret) || on(Detector::AwsSecretAccessKey) {
            reach.push((LABEL_FWD, LABEL_READ_BACK));
        }
        let email_on = on(Detector::Email);
        if email_on {
            reach.push((EMAIL_FWD + EMAIL_SPAN_BACK, EMAIL_SPAN_BACK + 1));
        }
        let digits_on = [
            Detector::CreditCard,
            Detector::Iban,
            Detector::Phone,
            Detector::UsSsn,
            Detector::UkNino,
            Detector::EsDni,
        ]
        .iter()
        .any(|d| on(*d));
        if digits_on {
            reach.push((DIGIT_FWD + DIGIT_SPAN_BACK, DIGIT_READ_BACK));
        }

        let (tokens, labels, short) = all_literals(enabled_list);
        let mut partials = std::collections::HashSet::new();
        let mut partial_first: Vec<[u64; 4]> = Vec::new();
        let mut partial_last = Box::new([0u64; 256]);
        let mut max_lit = 0;
        let mut sets = Vec::new();
        for group in [tokens, labels, short] {
            let pats: Vec<&'static str> = group.iter().map(|(p, _)| *p).collect();
            for p in &pats {
                max_lit = max_lit.max(p.len());
                for k in 1..p.len() {
                    let pre = &p.as_bytes()[..k];
                    if partial_first.len() <= k {
                        partial_first.resize(k + 1, [0; 4]);
                    }
                    set_bit(&mut partial_first[k], pre[0]);
                    partial_last[usize::from(pre[k - 1])] |= 1 << k;
                    partials.insert(pre.to_vec());
                }
            }
            let lits = group
                .iter()
                .map(|(p, eval)| Lit {
                    eval: *eval,
                    len: p.len(),
                })
                .collect();
            sets.extend(LitSet::new(&pats, lits));
        }
        // Three groups above; `Literals` keeps one cursor per set.
        assert!(sets.len() <= MAX_SETS, "{} literal sets", sets.len());
        // `partial_last` keeps the prefix lengths as bits of a u64.
        assert!(max_lit <= 64, "a literal anchor of {max_lit} bytes");
        // A candidate is undecided only while its window (trigger + fwd + 1) is incomplete, and it
        // starts at most `span back` before its trigger; +3 for rounding to a char boundary.
        let holdback = reach
            .iter()
            .map(|(f, _)| f + 1)
            .chain(std::iter::once(max_lit))
            .max()
            .unwrap_or(0)
            + 3;
        let ctx_keep = reach.iter().map(|(_, b)| *b).max().unwrap_or(0) + 2;
        // How far before a replaced match a rejected candidate can start and still have read the
        // match's first byte: the longest span of a detector whose verdict can change when the
        // bytes after it become a placeholder (see `resolve`). PEM keys, service-account keys and
        // JWT-capped values are left out: they do not turn from rejected to accepted when cut.
        let mut rfix = 0;
        for s in SPECS
            .iter()
            .filter(|s| on(s.kind) && s.kind != Detector::Jwt)
        {
            rfix = rfix.max(s.max_len + 2);
        }
        if on(Detector::UrlPassword) {
            rfix = rfix.max(URL_SCAN + 8);
        }
        if on(Detector::HttpAuth) {
            rfix = rfix.max(BASIC_CAP + 16);
        }
        if on(Detector::GenericSecret) || on(Detector::AwsSecretAccessKey) {
            // label, its continuation, quotes, blanks and separator, then the value
            rfix = rfix.max(LABEL_VALUE_CAP + 64);
        }
        if email_on {
            rfix = rfix.max(EMAIL_FWD + 1);
        }
        if digits_on {
            rfix = rfix.max(DIGIT_FWD + DIGIT_SPAN_BACK);
        }
        // After a push at most `holdback` bytes wait for their window; the candidates that may
        // still change when a match after them is replaced add `rfix` and a match's reach back.
        let holdback = holdback + rfix + EMAIL_SPAN_BACK + 4;
        Engine {
            enabled,
            sets,
            partials,
            partial_first,
            partial_last,
            max_lit,
            spec_re,
            digits_on,
            email_on,
            holdback,
            ctx_keep,
            rfix,
        }
    }

    pub(crate) fn is_on(&self, d: Detector) -> bool {
        self.enabled & d.bit() != 0
    }

    /// Most bytes a [`super::StreamMasker`] keeps unreleased after a push.
    pub(crate) fn holdback(&self) -> usize {
        self.holdback
    }

    /// Bytes of already-released text the stream keeps as look-behind context (also the
    /// farthest a window reads back from its trigger, plus 2).
    pub(crate) fn ctx_keep(&self) -> usize {
        self.ctx_keep
    }

    /// How far back from a replaced match's start the candidates are looked at again with the
    /// match replaced (see `resolve`).
    pub(crate) fn rfix(&self) -> usize {
        self.rfix
    }

    /// Find every candidate whose trigger lies at or after `from`. When `more` is set (a stream
    /// that has not ended), candidates whose window is incomplete are left out and the returned
    /// frontier is the lowest position where such a candidate (or one whose trigger has not
    /// arrived yet) could start; everything before it is decided. Without `more` the frontier is
    /// `text.len()`.
    pub(crate) fn analyze(
        &self,
        text: &[u8],
        from: usize,
        more: bool,
        out: &mut Vec<Cand>,
    ) -> usize {
        let mut und = Vec::new();
        let g = Gap {
            lo: 0,
            hi: text.len(),
            more,
        };
        self.analyze_in(
            text,
            g,
            from,
            text.len(),
            None,
            out,
            &mut und,
            &mut Vec::new(),
        );
        und.iter().map(|u| u.1).min().unwrap_or(text.len())
    }

    /// The candidates of the triggers in `from..to` (a literal must end by `g.hi`), seen through
    /// the gap `g`. The literal triggers evaluated go to `recs`, and with `g.more` the `@` and
    /// digit-run triggers too (a stream needs them all for [`Engine::hold`]; a whole text has
    /// many, and looks at those before a match again by scanning [`BYTE_REACH`] bytes). With
    /// `g.more`, the triggers whose window reads at or past `g.hi` go to `und` as (trigger,
    /// lowest start of a match it could give) instead, and so do the matches that may be
    /// starting in the last bytes when `to` and `g.hi` are the end of `text`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn analyze_in(
        &self,
        text: &[u8],
        g: Gap,
        from: usize,
        to: usize,
        found: Option<Found<'_>>,
        out: &mut Vec<Cand>,
        und: &mut Vec<(usize, usize)>,
        recs: &mut Vec<Trig>,
    ) {
        let n = text.len().min(g.hi);
        let to = to.min(n);
        if from >= to {
            return;
        }
        let at_end = g.more && to == n && n == text.len();
        // A literal starting before `to` may end after it.
        let span_end = to.saturating_add(self.max_lit).min(n);
        match found {
            None => {
                for (si, set) in self.sets.iter().enumerate() {
                    for (t, p) in set.occurrences(text, from, span_end) {
                        if t >= to {
                            break;
                        }
                        let what = What::Lit(si as u8, p);
                        recs.extend(self.eval_trig(text, g, t, t, what, out, und));
                    }
                }
            }
            Some(found) => {
                // The same occurrences, taken from a search of a larger text: those that start
                // in `from..to` and end by `span_end`, set by set, by position.
                for (si, (set, occ)) in self.sets.iter().zip(found.0).enumerate() {
                    for &(t, p) in occ {
                        if t < from || t >= to || t + set.lits[usize::from(p)].len > span_end {
                            continue;
                        }
                        let what = What::Lit(si as u8, p);
                        recs.extend(self.eval_trig(text, g, t, t, what, out, und));
                    }
                }
            }
        }
        if self.digits_on || self.email_on {
            self.scan_bytes(text, g, from, to, out, und, recs);
        }
        if at_end {
            // A literal may be starting in the last bytes: the longest tail that is a proper
            // prefix of one. Only the lengths of the prefixes that end with the last byte.
            let kmax = (self.max_lit.saturating_sub(1)).min(n - from);
            let below = if kmax >= 63 {
                u64::MAX
            } else {
                (1u64 << (kmax + 1)) - 1
            };
            let mut ks = self.partial_last[usize::from(text[n - 1])] & below;
            while ks != 0 {
                let k = 63 - ks.leading_zeros() as usize;
                ks &= !(1u64 << k);
                let tail = &text[n - k..];
                if has_bit(&self.partial_first[k], tail[0]) && self.partials.contains(tail) {
                    und.push((n, n - k));
                    break;
                }
            }
            if self.email_on {
                let back = run_back(text, n, is_local, EMAIL_SPAN_BACK).min(n - g.lo.min(n));
                und.push((n, n - back));
            }
            if self.digits_on {
                let back = lead_back(text, n).min(n - g.lo.min(n));
                und.push((n, n - back));
            }
        }
    }

    /// Every occurrence of every literal anchor in `text` (see [`Literals`]). The analysis of a
    /// stretch of `text` takes those that lie inside it: the same ones a search of the stretch
    /// alone finds, since no literal is a prefix of another in its set (one occurrence per start
    /// position and set), and a search restarts one byte after each occurrence.
    pub(crate) fn find_literals(&self, text: &[u8], found: &mut Literals) {
        found.occ.resize_with(self.sets.len(), Vec::new);
        found.cursor = [0; MAX_SETS];
        for (set, occ) in self.sets.iter().zip(found.occ.iter_mut()) {
            occ.clear();
            occ.extend(set.occurrences(text, 0, text.len()));
        }
    }

    /// Evaluate the trigger `what` at `t` (lowest start of its matches: `pstart`) in the gap
    /// `g`: its candidates go to `out` and its record is returned, or, when its window is
    /// incomplete, it goes to `und`.
    #[allow(clippy::too_many_arguments)]
    fn eval_trig(
        &self,
        text: &[u8],
        g: Gap,
        t: usize,
        pstart: usize,
        what: What,
        out: &mut Vec<Cand>,
        und: &mut Vec<(usize, usize)>,
    ) -> Option<Trig> {
        let k = out.len();
        let (res, read) = match what {
            What::Lit(si, p) => {
                let lit = &self.sets[usize::from(si)].lits[usize::from(p)];
                self.eval_lit(text, g, t, lit, out)
            }
            What::Email => {
                let w = Win::new(text, g, t, EMAIL_SPAN_BACK + 1, EMAIL_FWD);
                let res = self.eval_email(&w, t, out);
                (res, w.seen.get())
            }
            What::Digits => self.digit_run(text, g, t, out),
        };
        if res.is_err() {
            out.truncate(k);
            und.push((t, pstart));
            return None;
        }
        for c in &mut out[k..] {
            c.trig = t;
        }
        Some(Trig::new(t, read, pstart, what))
    }

    /// Evaluate a recorded trigger again in the gap `g`.
    pub(crate) fn reeval(
        &self,
        text: &[u8],
        g: Gap,
        tr: &Trig,
        out: &mut Vec<Cand>,
        recs: &mut Vec<Trig>,
    ) {
        let mut und = Vec::new();
        let pstart = tr.pstart().max(g.lo);
        if let What::Digits = tr.what {
            if quick_skip(text, g, tr.t) {
                return;
            }
        }
        recs.extend(self.eval_trig(text, g, tr.t, pstart, tr.what, out, &mut und));
        debug_assert!(und.is_empty(), "re-evaluated in a closed gap");
    }

    /// The `@` triggers in `at_from..to` and the digit-run triggers in `digit_from..to`
    /// (`at_from <= digit_from`), as [`Engine::analyze_in`] finds them.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn analyze_bytes(
        &self,
        text: &[u8],
        g: Gap,
        at_from: usize,
        digit_from: usize,
        to: usize,
        out: &mut Vec<Cand>,
        und: &mut Vec<(usize, usize)>,
    ) {
        let to = to.min(text.len()).min(g.hi);
        if self.email_on {
            for i in (at_from..digit_from.min(to)).filter(|&i| text[i] == b'@') {
                let back = run_back(text, i, is_local, EMAIL_SPAN_BACK).min(i - g.lo.min(i));
                self.eval_trig(text, g, i, i - back, What::Email, out, und);
            }
        }
        if (self.digits_on || self.email_on) && digit_from < to {
            self.scan_bytes(text, g, digit_from, to, out, und, &mut Vec::new());
        }
    }

    /// The literal triggers of `recs` evaluated again in the gap `g` (their candidates to `out`,
    /// their new records to `fresh`).
    pub(crate) fn reeval_literals(
        &self,
        text: &[u8],
        g: Gap,
        recs: &[Trig],
        out: &mut Vec<Cand>,
        und: &mut Vec<(usize, usize)>,
        fresh: &mut Vec<Trig>,
    ) {
        for r in recs.iter().filter(|r| r.is_literal()) {
            fresh.extend(self.eval_trig(text, g, r.t, r.t, r.what, out, und));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn scan_bytes(
        &self,
        text: &[u8],
        g: Gap,
        from: usize,
        to: usize,
        out: &mut Vec<Cand>,
        und: &mut Vec<(usize, usize)>,
        recs: &mut Vec<Trig>,
    ) {
        // Per-byte flags in bit 7 of each byte of a u64 word (SWAR). The bytes before `from` (not
        // below the gap's start) seed the "previous byte" flags. Nothing starts in a word with
        // neither a digit nor an `@` (most words of prose): only its raw bytes are kept, and the
        // full flags of a word (and of the one before it) are computed when it holds one. On
        // digit-dense text (logs, the masking corpus) this saves little.
        let mut prev_word = if from > g.lo {
            let mut w = [0u8; 8];
            let k = (from - g.lo).min(8);
            w[8 - k..].copy_from_slice(&text[from - k..from]);
            u64::from_le_bytes(w)
        } else {
            0
        };
        // The full flags of `prev_word`, when they were computed.
        let mut prev_flags: Option<Flags> = None;
        let mut base = from;
        while base < to {
            let len = (to - base).min(8);
            let word = match text.get(base..base + 8) {
                Some(b) => u64::from_le_bytes(b.try_into().expect("8 bytes")),
                None => {
                    let mut w = [0u8; 8];
                    let avail = text.len() - base;
                    w[..avail].copy_from_slice(&text[base..]);
                    u64::from_le_bytes(w)
                }
            };
            let keep = if len < 8 {
                (1u64 << (8 * len)) - 1
            } else {
                u64::MAX
            };
            let (digit, at) = digit_at_flags(word);
            let (digit, at) = (digit & keep, at & keep);
            if digit | at == 0 {
                prev_word = word;
                prev_flags = None;
                base += len;
                continue;
            }
            let mut f = word_flags(word);
            // The bytes before `from` (or zero padding, which is in no class) as before.
            let prev = prev_flags.unwrap_or_else(|| word_flags(prev_word));
            prev_word = word;
            prev_flags = Some(f);
            f.digit = digit;
            f.at = at;
            let p1 = |x: u64, px: u64| (x << 8) | (px >> 56);
            let p2 = |x: u64, px: u64| (x << 16) | (px >> 48);
            // A digit-run start that a digit detector could use: the previous byte is not a digit,
            // not a lower-case letter or `_` (all digit detectors need a clean start; the
            // letter-led ones need capitals), and not a `-`/`.`/`/` that follows a digit.
            let starts = f.digit
                & !p1(f.digit, prev.digit)
                & !p1(f.lower, prev.lower)
                & !(p1(f.numsep, prev.numsep) & p2(f.digit, prev.digit));
            let ats = if self.email_on { f.at } else { 0 };
            let starts = if self.digits_on { starts } else { 0 };
            // In position order (the records then come sorted). Only a stream needs the lowest
            // start of their matches (for its frontier) and their records.
            let mut ev = ats | starts;
            while ev != 0 {
                let bit = ev.trailing_zeros();
                let i = base + (bit / 8) as usize;
                ev &= ev - 1;
                let what = if ats & (1u64 << bit) != 0 {
                    What::Email
                } else if quick_skip(text, g, i) {
                    // A skipped run stays skipped with fewer bytes after it (its cluster only
                    // gets shorter), so it needs no record.
                    continue;
                } else {
                    What::Digits
                };
                if !g.more {
                    self.eval_trig(text, g, i, i, what, out, und);
                    continue;
                }
                let back = match what {
                    What::Email => run_back(text, i, is_local, EMAIL_SPAN_BACK),
                    _ => lead_back(text, i),
                };
                let pstart = i - back.min(i - g.lo.min(i));
                recs.extend(self.eval_trig(text, g, i, pstart, what, out, und));
            }
            base += len;
        }
    }

    /// A digit run starts at `d` and [`quick_skip`] did not rule it out: the cluster's shape
    /// decides which digit detectors are worth running.
    #[inline(never)]
    fn digit_run(
        &self,
        text: &[u8],
        g: Gap,
        d: usize,
        out: &mut Vec<Cand>,
    ) -> (Result<(), Need>, usize) {
        let w = Win::new(text, g, d, DIGIT_READ_BACK, DIGIT_FWD);
        let res = self.digit_run_in(&w, text, d, out);
        (res, w.seen.get())
    }

    fn digit_run_in(
        &self,
        w: &Win,
        text: &[u8],
        d: usize,
        out: &mut Vec<Cand>,
    ) -> Result<(), Need> {
        let shape = if w.more {
            digit_shape(|i| w.at(i), d)?
        } else {
            // The window is complete: the same parse with plain reads.
            let (lo, hi) = (w.lo, w.hi);
            let last = std::cell::Cell::new(d);
            let read = |i: usize| -> Result<Option<u8>, Need> {
                last.set(last.get().max(i));
                Ok((lo..hi).contains(&i).then(|| text[i]))
            };
            let shape = digit_shape(read, d)?;
            w.note(last.get());
            shape
        };
        if shape.letters {
            if self.is_on(Detector::Iban) {
                self.eval_iban(w, d, out)?;
            }
            if self.is_on(Detector::UkNino) {
                self.eval_nino(w, d, out)?;
            }
        }
        if shape.total < 7 && !shape.letters {
            return Ok(());
        }
        // The groups of an IBAN (valid or not) are not card, phone or id numbers.
        if in_spaced_iban(w, d)? {
            return Ok(());
        }
        let lead = w.prev(d)?;
        if self.is_on(Detector::EsDni)
            && (shape.g1 == 8 || (shape.g1 == 7 && matches!(lead, Some(b'X' | b'Y' | b'Z'))))
        {
            self.eval_dni(w, d, out)?;
        }
        if self.is_on(Detector::UsSsn) && shape.g1 == 3 && shape.total >= 9 {
            self.eval_ssn(w, d, out)?;
        }
        if self.is_on(Detector::CreditCard) && shape.total >= 13 {
            self.eval_card(w, d, out)?;
        }
        if self.is_on(Detector::Phone)
            && ((lead == Some(b'+') && shape.total >= 8)
                || (shape.g1 == 3 && shape.total >= 10)
                || (text[d] == b'0' && shape.total >= 10))
        {
            self.eval_phone(w, d, out)?;
        }
        Ok(())
    }

    fn push(
        &self,
        out: &mut Vec<Cand>,
        kind: Detector,
        start: usize,
        end: usize,
        mstart: usize,
        mend: usize,
    ) {
        if self.is_on(kind) && mstart < mend {
            out.push(Cand {
                start,
                end,
                mstart,
                mend,
                kind,
                trig: start,
            });
        }
    }

    /// Evaluate a literal anchor at `t`. Also returns one past the farthest byte read.
    fn eval_lit(
        &self,
        text: &[u8],
        g: Gap,
        t: usize,
        lit: &Lit,
        out: &mut Vec<Cand>,
    ) -> (Result<(), Need>, usize) {
        let (back, fwd) = match lit.eval {
            Eval::Token(i) => (1, SPECS[i as usize].max_len + 2),
            Eval::Sk => {
                let mut res = Ok(());
                let mut read = t;
                for (i, spec) in SPECS.iter().enumerate() {
                    if matches!(
                        spec.kind,
                        Detector::AnthropicApiKey | Detector::OpenaiApiKey
                    ) && self.is_on(spec.kind)
                    {
                        let w = Win::new(text, g, t, 1, spec.max_len + 2);
                        if self.eval_token(&w, t, lit.len, i, out).is_err() {
                            res = Err(Need);
                        }
                        read = read.max(w.seen.get());
                    }
                }
                return (res, read);
            }
            Eval::Pem => (0, PEM_CAP),
            Eval::GcpSa => (1, PEM_CAP + 64),
            Eval::UrlPw => (1, URL_FWD),
            Eval::Bearer | Eval::Basic => (1, JWT_CAP + 16),
            Eval::Label(_) => (LABEL_READ_BACK, LABEL_FWD),
        };
        let w = Win::new(text, g, t, back, fwd);
        let res = match lit.eval {
            Eval::Token(i) => self.eval_token(&w, t, lit.len, i as usize, out),
            Eval::Pem => self.eval_pem(&w, t, out),
            Eval::GcpSa => self.eval_gcp_sa(&w, t, out),
            Eval::UrlPw => self.eval_url(&w, t, out),
            Eval::Bearer => self.eval_bearer(&w, t, lit.len, out),
            Eval::Basic => self.eval_basic(&w, t, lit.len, out),
            Eval::Label(fam) => self.eval_label(&w, t, lit.len, fam, out),
            Eval::Sk => unreachable!("handled above"),
        };
        (res, w.seen.get())
    }

    /// Does the whole of `tok` satisfy token spec `i` (regex and extra checks)?
    fn token_ok(&self, i: usize, tok: &[u8], truncated: bool) -> bool {
        let spec = &SPECS[i];
        match spec.kind {
            Detector::Jwt => jwt_ok(tok, truncated),
            _ if truncated => false,
            Detector::CustosToken => {
                self.spec_re[i].is_match(ascii(tok)) && crate::token::parse(ascii(tok)).is_ok()
            }
            _ => self.spec_re[i].is_match(ascii(tok)),
        }
    }

    fn eval_token(
        &self,
        w: &Win,
        t: usize,
        lit_len: usize,
        i: usize,
        out: &mut Vec<Cand>,
    ) -> Result<(), Need> {
        let spec = &SPECS[i];
        if w.prev(t)?.is_some_and(spec.no_before) {
            return Ok(());
        }
        let vstart = if spec.value_after_prefix {
            t + lit_len
        } else {
            t
        };
        let limit = t + spec.max_len;
        let mut j = t + lit_len;
        while j <= limit && w.is(j, spec.class)? {
            j += 1;
        }
        let truncated = j > limit;
        let mut end = j.min(limit);
        if spec.kind == Detector::Jwt {
            // A sentence may end right after the token.
            while end > vstart && w.t[end - 1] == b'.' {
                end -= 1;
            }
        }
        if self.token_ok(i, &w.t[vstart..end], truncated) {
            self.push(out, spec.kind, t, end, vstart, end);
        }
        Ok(())
    }

    /// Which token kind `value` is, if it is one of the enabled token detectors in full.
    fn classify_value(&self, value: &[u8]) -> Option<Detector> {
        for (i, spec) in SPECS.iter().enumerate() {
            if spec.value_after_prefix || !self.is_on(spec.kind) {
                continue;
            }
            if spec
                .prefixes
                .iter()
                .any(|p| value.starts_with(p.as_bytes()))
                && value.iter().all(|&b| (spec.class)(b))
                && value.len() <= spec.max_len
                && self.token_ok(i, value, false)
            {
                return Some(spec.kind);
            }
        }
        None
    }

    fn eval_pem(&self, w: &Win, t: usize, out: &mut Vec<Cand>) -> Result<(), Need> {
        let mut j = t + "-----BEGIN ".len();
        let label_start = j;
        while j - label_start <= 40 && w.is(j, |b| is_upper_digit(b) || b == b' ')? {
            j += 1;
        }
        let label = &w.t[label_start..j.min(w.t.len())];
        if !(label.ends_with(b"PRIVATE KEY") || label.ends_with(b"PRIVATE KEY BLOCK")) {
            return Ok(());
        }
        if !w.starts_with(j, b"-----")? {
            return Ok(());
        }
        j += 5;
        let end = loop {
            match w.at(j)? {
                None => break j,
                Some(b'-') => {
                    if w.starts_with(j, b"-----END ")? {
                        let mut k = j + 9;
                        while k - j <= 60 && w.is(k, |b| is_upper_digit(b) || b == b' ')? {
                            k += 1;
                        }
                        if w.starts_with(k, b"-----")? {
                            break k + 5;
                        }
                        break k;
                    }
                    j += 1;
                }
                Some(b)
                    if is_b64std(b)
                        || b.is_ascii_whitespace()
                        || matches!(b, b'\\' | b':' | b',' | b'.' | b'(' | b')' | b'_' | b'-') =>
                {
                    j += 1
                }
                Some(_) => break j,
            }
        };
        self.push(out, Detector::PrivateKey, t, end, t, end);
        Ok(())
    }

    fn eval_gcp_sa(&self, w: &Win, t: usize, out: &mut Vec<Cand>) -> Result<(), Need> {
        let mut j = t + "\"private_key".len();
        let is_id = w.starts_with(j, b"_id")?;
        if is_id {
            j += 3;
        }
        if w.at(j)? == Some(b'\\') {
            j += 1;
        }
        if w.at(j)? != Some(b'"') {
            return Ok(());
        }
        j += 1;
        j = skip_ws(w, j, 8)?;
        if w.at(j)? != Some(b':') {
            return Ok(());
        }
        j = skip_ws(w, j + 1, 8)?;
        let escaped = w.at(j)? == Some(b'\\');
        if escaped {
            j += 1;
        }
        if w.at(j)? != Some(b'"') {
            return Ok(());
        }
        let vstart = j + 1;
        let cap = vstart + PEM_CAP;
        let (vend, _closed) = scan_quoted(w, vstart, b'"', escaped, cap)?;
        let value = &w.t[vstart..vend];
        let ok = if is_id {
            value.len() == 40 && value.iter().all(|b| b.is_ascii_hexdigit())
        } else {
            value.starts_with(b"-----BEGIN")
        };
        if ok {
            self.push(out, Detector::GcpServiceAccountKey, t, vend, vstart, vend);
        }
        Ok(())
    }

    fn eval_url(&self, w: &Win, t: usize, out: &mut Vec<Cand>) -> Result<(), Need> {
        if !w.prev(t)?.is_some_and(is_alnum) {
            return Ok(());
        }
        let ustart = t + 3;
        let mut j = ustart;
        let mut colon = None;
        let mut at = None;
        while j - ustart < URL_SCAN {
            match w.at(j)? {
                None => break,
                Some(b)
                    if b.is_ascii_whitespace()
                        || matches!(
                            b,
                            b'/' | b'?' | b'#' | b'"' | b'\'' | b'<' | b'>' | b'\\' | b'`'
                        ) =>
                {
                    break
                }
                Some(b':') if colon.is_none() && at.is_none() => colon = Some(j),
                Some(b'@') => at = Some(j),
                Some(_) => {}
            }
            j += 1;
        }
        let (Some(c), Some(a)) = (colon, at) else {
            return Ok(());
        };
        // The host: a name, a bracketed address, or nothing more (the text ends, or a replaced
        // match follows: `user:pass@[REDACTED:…]` still shows the password).
        if c + 1 >= a || w.at(a + 1)?.is_some_and(|b| !(is_alnum(b) || b == b'[')) {
            return Ok(());
        }
        self.push(out, Detector::UrlPassword, t, a + 1, c + 1, a);
        Ok(())
    }

    fn eval_bearer(
        &self,
        w: &Win,
        t: usize,
        lit_len: usize,
        out: &mut Vec<Cand>,
    ) -> Result<(), Need> {
        if w.prev(t)?.is_some_and(is_alnum) {
            return Ok(());
        }
        let vstart = skip_ws(w, t + lit_len, 4)?;
        let cap = vstart + JWT_CAP;
        let mut j = vstart;
        while j < cap
            && w.is(j, |b| {
                is_b64url_dot(b) || matches!(b, b'~' | b'+' | b'/' | b'=')
            })?
        {
            j += 1;
        }
        let value = &w.t[vstart..j];
        if value.len() < 16 || checks::entropy(value) < 3.0 {
            return Ok(());
        }
        let kind = self.classify_value(value).unwrap_or(Detector::HttpAuth);
        self.push(out, kind, t, j, vstart, j);
        Ok(())
    }

    fn eval_basic(
        &self,
        w: &Win,
        t: usize,
        lit_len: usize,
        out: &mut Vec<Cand>,
    ) -> Result<(), Need> {
        if w.prev(t)?.is_some_and(is_alnum) {
            return Ok(());
        }
        let vstart = skip_ws(w, t + lit_len, 4)?;
        let mut j = vstart;
        while j - vstart < BASIC_CAP && w.is(j, is_b64std)? {
            j += 1;
        }
        let value = &w.t[vstart..j];
        if value.len() < 8 {
            return Ok(());
        }
        let ok = checks::b64_decode_any(value)
            .is_some_and(|d| d.contains(&b':') && d.iter().all(|&b| b >= 0x20 && b != 0x7f));
        if ok {
            self.push(out, Detector::HttpAuth, t, j, vstart, j);
        }
        Ok(())
    }

    fn eval_label(
        &self,
        w: &Win,
        t: usize,
        klen: usize,
        fam: Family,
        out: &mut Vec<Cand>,
    ) -> Result<(), Need> {
        // The rest of the label: only a few continuations keep it a secret's label
        // (`secret_key`, `SecretAccessKey`), so `tokenizer` or `password_policy` are not labels.
        let mut j = t + klen;
        let mut cont = [0u8; 24];
        let mut clen = 0;
        while j - (t + klen) < 24 && w.is(j, is_label)? {
            let b = w.t[j];
            if b.is_ascii_alphanumeric() {
                cont[clen] = b.to_ascii_lowercase();
                clen += 1;
            }
            j += 1;
        }
        if w.is(j, is_label)? {
            return Ok(());
        }
        let cont = &cont[..clen];
        if !matches!(
            cont,
            b"" | b"key" | b"accesskey" | b"keybase" | b"value" | b"hash"
        ) {
            return Ok(());
        }
        // Closing quote of the key, blanks, the separator, blanks, an opening quote.
        if w.at(j)? == Some(b'\\') && w.is(j + 1, is_quote)? {
            j += 2;
        } else if w.is(j, is_quote)? {
            j += 1;
        }
        j = skip_ws(w, j, 8)?;
        match w.at(j)? {
            Some(b':') => {
                j += 1;
                if w.at(j)? == Some(b'=') {
                    j += 1;
                }
            }
            Some(b'=') => {
                j += 1;
                if w.at(j)? == Some(b'>') {
                    j += 1;
                }
            }
            _ => return Ok(()),
        }
        j = skip_ws(w, j, 8)?;
        let (quote, escaped) = match (w.at(j)?, w.at(j + 1)?) {
            (Some(b'\\'), Some(q)) if is_quote(q) => {
                j += 2;
                (Some(q), true)
            }
            (Some(q), _) if is_quote(q) => {
                j += 1;
                (Some(q), false)
            }
            _ => (None, false),
        };
        let vstart = j;
        let cap = vstart + LABEL_VALUE_CAP;
        let vend = match quote {
            Some(q) => {
                let (e, closed) = scan_quoted(w, vstart, q, escaped, cap)?;
                if !closed && e < cap.min(w.hi) {
                    return Ok(());
                }
                e
            }
            None => {
                let mut k = vstart;
                while k < cap
                    && w.is(k, |b| {
                        !(b.is_ascii_whitespace()
                            || matches!(
                                b,
                                b',' | b';'
                                    | b'&'
                                    | b'"'
                                    | b'\''
                                    | b'<'
                                    | b'>'
                                    | b'('
                                    | b')'
                                    | b'{'
                                    | b'}'
                                    | b'['
                                    | b']'
                                    | b'\\'
                                    | b'`'
                            ))
                    })?
                {
                    k += 1;
                }
                w.floor_char(k)
            }
        };
        let value = &w.t[vstart..vend];
        if value.is_empty() || value.starts_with(b"-----BEGIN") || placeholder(value) {
            return Ok(());
        }
        if let Some(kind) = self.classify_value(value) {
            self.push(out, kind, t, vend, vstart, vend);
            return Ok(());
        }
        if fam.password_like() {
            if value.len() < 4 || (fam == Family::Pwd && matches!(value[0], b'/' | b'~' | b'.')) {
                return Ok(());
            }
        } else if value.len() < 8
            || value.iter().all(|b| b.is_ascii_digit())
            || checks::entropy(value) < 3.0
        {
            return Ok(());
        }
        let mut kind = Detector::GenericSecret;
        if matches!(fam, Family::Secret | Family::AccessKey)
            && value.len() == 40
            && value.iter().all(|&b| is_b64std(b))
        {
            // Read the label back to its start: `aws_secret_access_key`, `AWS_SECRET_...`.
            let mut s = t;
            while s > 0 && t - s < LABEL_READ_BACK && w.is(s - 1, is_label)? {
                s -= 1;
            }
            let prefix = &w.t[s..t];
            if prefix.windows(3).any(|x| x.eq_ignore_ascii_case(b"aws")) || cont == b"accesskey" {
                kind = Detector::AwsSecretAccessKey;
            }
        }
        if !self.is_on(kind) {
            kind = Detector::GenericSecret;
        }
        self.push(out, kind, t, vend, vstart, vend);
        Ok(())
    }

    fn eval_email(&self, w: &Win, t: usize, out: &mut Vec<Cand>) -> Result<(), Need> {
        let mut s = t;
        while t - s < EMAIL_SPAN_BACK && w.prev(s)?.is_some_and(is_local) {
            s -= 1;
        }
        while s < t && w.t[s] == b'.' {
            s += 1;
        }
        if s == t || w.t[t - 1] == b'.' {
            return Ok(());
        }
        // Domain: labels of [A-Za-z0-9-] joined by dots; the last is an alphabetic TLD.
        let mut j = t + 1;
        let mut labels = 0;
        let mut last_label = (j, j);
        loop {
            let ls = j;
            while j - ls < 63 && w.is(j, |b| is_alnum(b) || b == b'-')? {
                j += 1;
            }
            if j == ls || w.t[ls] == b'-' || w.t[j - 1] == b'-' {
                break;
            }
            labels += 1;
            last_label = (ls, j);
            if w.at(j)? == Some(b'.') && w.is(j + 1, is_alnum)? && j - t < 250 {
                j += 1;
            } else {
                break;
            }
        }
        let (ls, le) = last_label;
        let tld = &w.t[ls..le];
        if labels < 2
            || !(2..=24).contains(&tld.len())
            || !tld.iter().all(|b| b.is_ascii_alphabetic())
        {
            return Ok(());
        }
        if w.is(le, |b| is_word(b) || b == b'@')? {
            return Ok(());
        }
        self.push(out, Detector::Email, s, le, s, le);
        Ok(())
    }

    fn eval_iban(&self, w: &Win, d: usize, out: &mut Vec<Cand>) -> Result<(), Need> {
        if d < 2 {
            return Ok(());
        }
        let (Some(a), Some(b)) = (w.at(d - 2)?, w.at(d - 1)?) else {
            return Ok(());
        };
        if !is_upper(a) || !is_upper(b) || !clean_before(w, d - 2)? {
            return Ok(());
        }
        let Some(len) = checks::iban_len([a, b]) else {
            return Ok(());
        };
        let s = d - 2;
        let spaced = w.at(s + 4)? == Some(b' ');
        let mut buf = [0u8; 34];
        let mut k = 0;
        let mut j = s;
        while k < len {
            match w.at(j)? {
                Some(c) if is_upper_digit(c) => {
                    buf[k] = c;
                    k += 1;
                    j += 1;
                }
                Some(b' ') if spaced && k > 0 && k % 4 == 0 && w.t[j - 1] != b' ' => j += 1,
                _ => return Ok(()),
            }
        }
        if !is_digit(buf[2]) || !is_digit(buf[3]) || w.is(j, is_alnum)? {
            return Ok(());
        }
        if checks::iban_mod97(&buf[..len]) {
            self.push(out, Detector::Iban, s, j, s, j);
        }
        Ok(())
    }

    fn eval_nino(&self, w: &Win, d: usize, out: &mut Vec<Cand>) -> Result<(), Need> {
        // `AB123456C` or `AB 12 34 56 C`
        let spaced_prefix = w.prev(d)? == Some(b' ');
        let s = if spaced_prefix {
            d.checked_sub(3)
        } else {
            d.checked_sub(2)
        };
        let Some(s) = s else { return Ok(()) };
        let (Some(a), Some(b)) = (w.at(s)?, w.at(s + 1)?) else {
            return Ok(());
        };
        if !checks::nino_prefix_ok(a, b) || !clean_before(w, s)? {
            return Ok(());
        }
        let mut j = d;
        let mut digits = 0;
        while digits < 6 {
            if !w.is(j, is_digit)? || !w.is(j + 1, is_digit)? {
                return Ok(());
            }
            digits += 2;
            j += 2;
            if digits < 6 && spaced_prefix {
                if w.at(j)? != Some(b' ') {
                    return Ok(());
                }
                j += 1;
            }
        }
        if spaced_prefix && w.at(j)? == Some(b' ') {
            j += 1;
        }
        if !w.is(j, |c| (b'A'..=b'D').contains(&c))? || w.is(j + 1, is_alnum)? {
            return Ok(());
        }
        self.push(out, Detector::UkNino, s, j + 1, s, j + 1);
        Ok(())
    }

    fn eval_dni(&self, w: &Win, d: usize, out: &mut Vec<Cand>) -> Result<(), Need> {
        // DNI `12345678Z`; NIE `X1234567L` (X/Y/Z stand for 0/1/2).
        let lead = w.prev(d)?;
        let (s, ndig, base) = match lead {
            Some(c @ (b'X' | b'Y' | b'Z')) => (d - 1, 7, u32::from(c - b'X') * 10_000_000),
            _ => (d, 8, 0),
        };
        if !clean_before(w, s)? {
            return Ok(());
        }
        let mut n = 0u32;
        let mut j = d;
        while j - d < ndig {
            match w.at(j)? {
                Some(c) if is_digit(c) => n = n * 10 + u32::from(c - b'0'),
                _ => return Ok(()),
            }
            j += 1;
        }
        if w.at(j)? == Some(b'-') {
            j += 1;
        }
        if w.at(j)? != Some(checks::dni_letter(base + n)) || w.is(j + 1, is_alnum)? {
            return Ok(());
        }
        self.push(out, Detector::EsDni, s, j + 1, s, j + 1);
        Ok(())
    }

    fn eval_ssn(&self, w: &Win, d: usize, out: &mut Vec<Cand>) -> Result<(), Need> {
        if !clean_before(w, d)? {
            return Ok(());
        }
        let Some(area) = read_digits(w, d, 3)? else {
            return Ok(());
        };
        let sep = w.at(d + 3)?;
        if !matches!(sep, Some(b'-' | b' ')) {
            return Ok(());
        }
        let Some(group) = read_digits(w, d + 4, 2)? else {
            return Ok(());
        };
        if w.at(d + 6)? != sep {
            return Ok(());
        }
        let Some(serial) = read_digits(w, d + 7, 4)? else {
            return Ok(());
        };
        if !clean_after(w, d + 11)? || !checks::ssn_ok(area, group, serial) {
            return Ok(());
        }
        self.push(out, Detector::UsSsn, d, d + 11, d, d + 11);
        Ok(())
    }

    fn eval_card(&self, w: &Win, d: usize, out: &mut Vec<Cand>) -> Result<(), Need> {
        if !clean_before(w, d)? {
            return Ok(());
        }
        // Groups of digits joined by one uniform separator (space or dash), or one run.
        let mut digits = [0u8; 24];
        let mut nd = 0;
        let mut ends: [(usize, usize); 8] = [(0, 0); 8]; // (end position, digits so far)
        let mut ng = 0;
        let mut j = d;
        let mut sep: Option<u8> = None;
        'groups: loop {
            let gs = j;
            while w.is(j, is_digit)? {
                if nd == digits.len() {
                    // An incomplete group is not recorded.
                    break 'groups;
                }
                digits[nd] = w.t[j];
                nd += 1;
                j += 1;
            }
            ends[ng] = (j, nd);
            ng += 1;
            if ng == 1 && j - gs != 4 && !(13..=19).contains(&(j - gs)) {
                return Ok(());
            }
            let next = w.at(j)?;
            let joins = match (next, sep) {
                (Some(c @ (b' ' | b'-')), None) if ng == 1 && j - gs == 4 => {
                    sep = Some(c);
                    w.is(j + 1, is_digit)?
                }
                (Some(c), Some(s)) if c == s => w.is(j + 1, is_digit)?,
                _ => false,
            };
            if !joins || ng == ends.len() {
                break;
            }
            j += 1;
        }
        // Longest prefix of whole groups that is a valid card number.
        for g in (0..ng).rev() {
            let (end, count) = ends[g];
            if !(13..=19).contains(&count) {
                continue;
            }
            if g + 1 == ng && !clean_after(w, end)? {
                continue;
            }
            let num = &digits[..count];
            if checks::card_brand_ok(num) && checks::luhn(num) {
                self.push(out, Detector::CreditCard, d, end, d, end);
                return Ok(());
            }
        }
        Ok(())
    }

    fn eval_phone(&self, w: &Win, d: usize, out: &mut Vec<Cand>) -> Result<(), Need> {
        let lead = w.prev(d)?;
        if lead == Some(b'+') {
            // International: +CC and groups, 8 to 15 digits in all.
            let s = d - 1;
            // Country codes never start with 0 (and `+0000` is a time-zone offset).
            if !clean_before(w, s)? || w.prev(s)? == Some(b'+') || w.at(d)? == Some(b'0') {
                return Ok(());
            }
            let mut j = d;
            let mut nd = 0;
            loop {
                while w.is(j, is_digit)? {
                    nd += 1;
                    j += 1;
                    if nd > 15 {
                        return Ok(());
                    }
                }
                // one or two separators, then a digit
                let mut k = j;
                while k - j < 2 && w.is(k, |b| matches!(b, b' ' | b'-' | b'.' | b'(' | b')'))? {
                    k += 1;
                }
                if k > j && w.is(k, is_digit)? {
                    j = k;
                } else {
                    break;
                }
            }
            if (8..=15).contains(&nd) && clean_after(w, j)? {
                self.push(out, Detector::Phone, s, j, s, j);
            }
            return Ok(());
        }
        if lead.is_some_and(|b| b == b'-' || b == b'.') && w.prev(d - 1)?.is_some_and(is_digit) {
            return Ok(());
        }
        // Unlike cards, phone formats never start inside a run of space-separated digits (the
        // tail of a spaced IBAN or card number is not a phone number).
        if lead == Some(b' ') && d >= 2 && w.at(d - 2)?.is_some_and(is_digit) {
            return Ok(());
        }
        // NANP: (ddd) ddd-dddd, ddd-ddd-dddd, ddd.ddd.dddd, ddd ddd dddd
        let paren = lead == Some(b'(');
        let s = if paren { d - 1 } else { d };
        if clean_before(w, s)? {
            if let Some(area) = read_digits(w, d, 3)? {
                let mut j = d + 3;
                let sep1_ok = if paren {
                    if w.at(j)? == Some(b')') {
                        j += 1;
                        if w.at(j)? == Some(b' ') {
                            j += 1;
                        }
                        true
                    } else {
                        false
                    }
                } else if matches!(w.at(j)?, Some(b'-' | b'.' | b' ')) {
                    j += 1;
                    true
                } else {
                    false
                };
                let sep1 = w.t[j - 1];
                if sep1_ok && area >= 200 {
                    if let Some(exch) = read_digits(w, j, 3)? {
                        let sep2 = w.at(j + 3)?;
                        let sep2_ok = match sep2 {
                            Some(c @ (b'-' | b'.' | b' ')) => paren || c == sep1,
                            _ => false,
                        };
                        if exch >= 200
                            && sep2_ok
                            && read_digits(w, j + 4, 4)?.is_some()
                            && clean_after(w, j + 8)?
                        {
                            self.push(out, Detector::Phone, s, j + 8, s, j + 8);
                            return Ok(());
                        }
                    }
                }
            }
        }
        // National format with a trunk 0: `020 7946 0958`, `06 12 34 56 78`, `07700 900123`.
        if w.at(d)? == Some(b'0')
            && w.is(d + 1, |b| (b'1'..=b'9').contains(&b))?
            && clean_before(w, d)?
        {
            let mut j = d;
            let mut nd = 0;
            let mut groups = 0;
            let mut sep: Option<u8> = None;
            loop {
                let gs = j;
                while w.is(j, is_digit)? {
                    j += 1;
                    nd += 1;
                    if nd > 11 {
                        return Ok(());
                    }
                }
                if j - gs < 2 || (groups == 0 && j - gs > 5) {
                    return Ok(());
                }
                groups += 1;
                let next = w.at(j)?;
                let joins = match (next, sep) {
                    (Some(c @ (b' ' | b'.')), None) => {
                        sep = Some(c);
                        w.is(j + 1, is_digit)?
                    }
                    (Some(c), Some(s)) if c == s => w.is(j + 1, is_digit)?,
                    _ => false,
                };
                if !joins {
                    break;
                }
                j += 1;
            }
            if groups >= 2 && (10..=11).contains(&nd) && clean_after(w, j)? {
                self.push(out, Detector::Phone, d, j, d, j);
            }
        }
        Ok(())
    }
}

fn ascii(b: &[u8]) -> &str {
    std::str::from_utf8(b).unwrap_or("")
}

/// How far before a digit run at `end` a digit match can start: two capitals (IBAN, NINO), two
/// capitals and a space (`AB 12 34 56 C`), `X`/`Y`/`Z` (NIE), `+` or `(` (phones).
pub(crate) fn lead_back(text: &[u8], end: usize) -> usize {
    if end >= 1 && text[end - 1] == b' ' {
        if end >= 2 && is_upper(text[end - 2]) {
            1 + run_back(text, end - 1, is_upper, DIGIT_SPAN_BACK - 1)
        } else {
            0
        }
    } else {
        run_back(text, end, is_digit_lead, DIGIT_SPAN_BACK)
    }
}

/// Length of the run of `class` bytes ending at `end`, at most `max`.
pub(crate) fn run_back(text: &[u8], end: usize, class: fn(u8) -> bool, max: usize) -> usize {
    let mut k = 0;
    while k < max && k < end && class(text[end - 1 - k]) {
        k += 1;
    }
    k
}

fn skip_ws(w: &Win, mut j: usize, max: usize) -> Result<usize, Need> {
    let start = j;
    while j - start < max && w.is(j, |b| b == b' ' || b == b'\t')? {
        j += 1;
    }
    Ok(j)
}

/// Scan a quoted value from `start` to its closing quote (not crossing a line end). Returns the
/// end of the value and whether the quote was found; at `cap` the value is cut (masked up to it).
///
/// With `escaped`, the value sits inside another JSON string (`\"password\": \"p4ss\\\"w\"`):
/// each `\x` pair of the raw text is one character of the inner string, and the value ends at an
/// inner quote that the inner string does not escape.
fn scan_quoted(
    w: &Win,
    start: usize,
    q: u8,
    escaped: bool,
    cap: usize,
) -> Result<(usize, bool), Need> {
    let mut k = start;
    // escaped mode: the previous inner character was an unescaped backslash
    let mut inner_escape = false;
    while k < cap {
        match w.at(k)? {
            // (An unescaped `\\` may have stepped past the end of the window.)
            None => return Ok((k.min(w.hi), false)),
            Some(b'\n' | b'\r') => return Ok((k, false)),
            Some(b'\\') if escaped => {
                let inner = match w.at(k + 1)? {
                    Some(c) => c,
                    None => return Ok((k, false)),
                };
                if inner == q && !inner_escape {
                    return Ok((k, true));
                }
                inner_escape = inner == b'\\' && !inner_escape;
                k += 2;
            }
            Some(c) if escaped && c == q => return Ok((k, true)),
            Some(_) if escaped => {
                inner_escape = false;
                k += 1;
            }
            Some(b'\\') => k += 2,
            Some(c) if c == q => return Ok((k, true)),
            Some(_) => k += 1,
        }
    }
    // Cut at the cap. A `\\` just before it skips a byte unread: in a stream whose bytes end
    // before the cap, the value is not decided yet (it would be cut short of the cap).
    if w.more && w.hi < cap {
        return Err(Need);
    }
    Ok((w.floor_char(cap.min(w.hi)), false))
}

fn read_digits(w: &Win, at: usize, n: usize) -> Result<Option<u32>, Need> {
    let mut v = 0u32;
    for k in 0..n {
        match w.at(at + k)? {
            Some(c) if is_digit(c) => v = v * 10 + u32::from(c - b'0'),
            _ => return Ok(None),
        }
    }
    Ok(Some(v))
}

/// The byte before a digit match: not part of a word, and not a `-`/`.`/`/` continuing a number.
fn clean_before(w: &Win, s: usize) -> Result<bool, Need> {
    Ok(match w.prev(s)? {
        None => true,
        Some(b) if is_word(b) => false,
        Some(b'-' | b'.' | b'/') => !(s >= 2 && w.at(s - 2)?.is_some_and(is_digit)),
        Some(_) => true,
    })
}

/// The byte after a digit match: not part of a word, and not a `-`/`.`/`/` continuing a number.
fn clean_after(w: &Win, e: usize) -> Result<bool, Need> {
    Ok(match w.at(e)? {
        None => true,
        Some(b) if is_word(b) => false,
        Some(b'-' | b'.' | b'/') => !w.is(e + 1, is_digit)?,
        Some(_) => true,
    })
}

/// Per-byte flags of an 8-byte word: bit 7 of each byte is set when the byte is in the class.
#[derive(Clone, Copy, Default)]
struct Flags {
    /// `0`-`9`
    digit: u64,
    /// `@`
    at: u64,
    /// `a`-`z` and `_`
    lower: u64,
    /// `-`, `.`, `/`
    numsep: u64,
}

/// The `digit` and `at` flags of [`word_flags`] alone: (digit, at).
#[inline]
fn digit_at_flags(x: u64) -> (u64, u64) {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let ascii = !x & HIGH;
    let x7 = x & !HIGH;
    let digit = (x7 + ONES * (0x80 - 0x30)) & (ONES * (0x80 + 0x39) - x7) & ascii;
    let at = !((x7 ^ (ONES * 0x40)) + ONES * 0x7f) & ascii;
    (digit, at)
}

/// SWAR classification of the 8 bytes of `x` (little endian).
#[inline]
fn word_flags(x: u64) -> Flags {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let ascii = !x & HIGH;
    let x7 = x & !HIGH;
    // bit 7 set when the low 7 bits are >= lo (resp. <= hi); no carries cross bytes
    let ge = |lo: u64| (x7 + ONES * (0x80 - lo)) & HIGH;
    let le = |hi: u64| (ONES * (0x80 + hi) - x7) & HIGH;
    let eq = |c: u64| !((x7 ^ (ONES * c)) + ONES * 0x7f) & HIGH;
    Flags {
        digit: ge(0x30) & le(0x39) & ascii,
        at: eq(0x40) & ascii,
        lower: ((ge(0x61) & le(0x7a)) | eq(0x5f)) & ascii,
        numsep: ge(0x2d) & le(0x2f) & ascii,
    }
}

const C_DIGIT: u8 = 1;
const C_SEP: u8 = 2;
const C_UPPER: u8 = 4;
const C_SPACE: u8 = 8;

/// Byte classes for [`quick_skip`].
static CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        let mut c = 0;
        if b.is_ascii_digit() {
            c |= C_DIGIT;
        }
        if matches!(b, b' ' | b'-' | b'.' | b'(' | b')' | b'/') {
            c |= C_SEP;
        }
        if b.is_ascii_uppercase() {
            c |= C_UPPER;
        }
        if b == b' ' {
            c |= C_SPACE;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// Test that the digit run starting at `d` cannot start a match, whatever bytes may follow and
/// however the gap is later cut; it answers only when all the bytes it needs are present.
///
/// Two cases, neither preceded by two capital letters (or two capitals and a space), so no IBAN
/// or UK NINO:
/// - a run shorter than 7 digits that no separator continues: [`digit_shape`] gives
///   `total < 7` (the branch-free test below);
/// - a cluster of several runs (dates, times, IP addresses, versions) whose first run has 1, 2,
///   4, 5 or 6 digits, with fewer than 13 digits in all, not led by `+` and not starting with
///   `0` ([`cluster_skips`]). [`Engine::digit_run_in`] then tries no detector: an ES DNI needs
///   a first run of 7 or 8, a US SSN or a phone without `+` or `0` a first run of 3, a card 13
///   digits, a phone led by `+` or `0` that lead or digit.
///
/// A later cut of the gap (a match found next to the cluster) only takes bytes away at either
/// end: the total and the first run can only shrink, the lead and the first digit stay or become
/// unreadable, and capitals can only become unreadable. A first run cut to 3 digits leaves 3 in
/// all. So a skipped run stays skipped and needs no record; `quick_skip_is_final` tests this
/// against `digit_run` in cut and grown gaps.
#[inline(always)]
fn quick_skip(text: &[u8], g: Gap, d: usize) -> bool {
    if d < g.lo + 3 || d + 17 > g.hi.min(text.len()) {
        return false;
    }
    let word = u64::from_le_bytes(text[d + 1..d + 9].try_into().expect("8 bytes"));
    let digits = word_flags(word).digit;
    let run = 1 + ((!digits & 0x8080_8080_8080_8080).trailing_zeros() / 8) as usize;
    let c = |i: usize| CLASS[text[i] as usize];
    let (c0, c1, c2) = (c(d + run), c(d + run + 1), c(d + run + 2));
    let (p1, p2, p3) = (c(d - 1), c(d - 2), c(d - 3));
    let continues =
        (c0 & C_SEP != 0) & ((c1 & C_DIGIT != 0) | ((c1 & C_SEP != 0) & (c2 & C_DIGIT != 0)));
    let letters = ((p1 & p2 & C_UPPER) != 0) | ((p1 & C_SPACE != 0) & ((p2 & p3 & C_UPPER) != 0));
    if letters | (run >= 7) {
        return false;
    }
    if !continues {
        return true;
    }
    run != 3 && text[d] != b'0' && text[d - 1] != b'+' && cluster_skips(text, g, d)
}

/// The cluster at `d` (as [`digit_shape`] reads it) has fewer than 13 digits and ends before the
/// bytes still to come: when the gap may grow (`g.more`), every byte the shape reads is below its
/// end. Beyond the end of a closed gap nothing is a digit or a separator.
#[inline]
fn cluster_skips(text: &[u8], g: Gap, d: usize) -> bool {
    let lim = g.hi.min(text.len());
    // No class (0) past a closed gap's end; Err(()) past a growing gap's end (the answer waits).
    let class = |i: usize| -> Result<u8, ()> {
        if i < lim {
            Ok(CLASS[text[i] as usize])
        } else if g.more {
            Err(())
        } else {
            Ok(0)
        }
    };
    let mut j = d;
    let mut total = 0;
    loop {
        while j < lim && text[j].is_ascii_digit() {
            total += 1;
            j += 1;
        }
        if total >= 13 {
            return false;
        }
        // One or two separators, then a digit, continue the cluster.
        let step = (|| -> Result<usize, ()> {
            if class(j)? & C_SEP == 0 {
                return Ok(0);
            }
            let c1 = class(j + 1)?;
            if c1 & C_DIGIT != 0 {
                return Ok(1);
            }
            if c1 & C_SEP != 0 && class(j + 2)? & C_DIGIT != 0 {
                return Ok(2);
            }
            Ok(0)
        })();
        match step {
            Ok(0) => return true,
            Ok(k) => j += k,
            Err(()) => return false,
        }
    }
}

/// The digit cluster starting at a run start `d`: digits joined by at most two of ` -.()/`.
struct Shape {
    /// Digits in the cluster from `d` (counting stops at 24).
    total: usize,
    /// Length of the first run.
    g1: usize,
    /// Two capital letters precede (`DE89…`, `AB123456C`, `AB 12 34 56 C`).
    letters: bool,
}

#[inline(always)]
fn digit_shape(at: impl Fn(usize) -> Result<Option<u8>, Need>, d: usize) -> Result<Shape, Need> {
    let is = |i: usize, f: fn(u8) -> bool| -> Result<bool, Need> { Ok(at(i)?.is_some_and(f)) };
    let p1 = if d >= 1 { at(d - 1)? } else { None };
    let p2 = if d >= 2 { at(d - 2)? } else { None };
    let p3 = if d >= 3 { at(d - 3)? } else { None };
    let letters = (p1.is_some_and(is_upper) && p2.is_some_and(is_upper))
        || (p1 == Some(b' ') && p2.is_some_and(is_upper) && p3.is_some_and(is_upper));
    let mut j = d;
    let mut total = 0;
    let mut g1 = 0;
    loop {
        let rs = j;
        while total < 24 && is(j, is_digit)? {
            total += 1;
            j += 1;
        }
        if g1 == 0 {
            g1 = j - rs;
        }
        if total >= 24 {
            break;
        }
        // one or two separators, then a digit
        if !is(j, is_sep)? {
            break;
        }
        if is(j + 1, is_digit)? {
            j += 1;
        } else if is(j + 1, is_sep)? && is(j + 2, is_digit)? {
            j += 2;
        } else {
            break;
        }
    }
    Ok(Shape { total, g1, letters })
}

/// Is the digit run at `d` a later group of a spaced IBAN-shaped sequence (`DE12 3456 7890 …`):
/// after a space, groups of four capitals or digits back to one that starts with two capitals
/// and two digits?
fn in_spaced_iban(w: &Win, d: usize) -> Result<bool, Need> {
    let mut end = d;
    for _ in 0..9 {
        if end < 6 || w.prev(end)? != Some(b' ') {
            return Ok(false);
        }
        let ge = end - 1;
        let gs = ge - run_back_win(w, ge, is_upper_digit, 4)?;
        if ge - gs != 4 {
            return Ok(false);
        }
        let head = [w.at(gs)?, w.at(gs + 1)?, w.at(gs + 2)?, w.at(gs + 3)?];
        if head[0].is_some_and(is_upper)
            && head[1].is_some_and(is_upper)
            && head[2].is_some_and(is_digit)
            && head[3].is_some_and(is_digit)
            && !w.prev(gs)?.is_some_and(is_alnum)
        {
            return Ok(true);
        }
        end = gs;
    }
    Ok(false)
}

/// Like [`run_back`], through a window.
fn run_back_win(w: &Win, end: usize, class: fn(u8) -> bool, max: usize) -> Result<usize, Need> {
    let mut k = 0;
    while k < max && k < end && w.prev(end - k)?.is_some_and(class) {
        k += 1;
    }
    Ok(k)
}

/// Values that are not secrets: placeholders, booleans, our own masks.
fn placeholder(v: &[u8]) -> bool {
    let lower: Vec<u8> = v.iter().take(16).map(|b| b.to_ascii_lowercase()).collect();
    matches!(
        lower.as_slice(),
        b"null"
            | b"none"
            | b"nil"
            | b"true"
            | b"false"
            | b"undefined"
            | b"redacted"
            | b"hidden"
            | b"masked"
            | b"required"
            | b"optional"
            | b"string"
    ) || v.starts_with(b"[REDACTED")
        || v.starts_with(b"${")
        || v.starts_with(b"{{")
        || v.starts_with(b"$(")
        || v.starts_with(b"%(")
        || v.starts_with(b"<")
        || v.starts_with(b"h:")
        || v.iter().all(|&b| b == v[0])
        || v.starts_with(b"***")
}

/// JWT: three (JWS) or five (JWE) dot-separated base64url parts whose header decodes to a JSON
/// object with an `alg`. A token cut at the cap needs only a valid header and a second part.
fn jwt_ok(tok: &[u8], truncated: bool) -> bool {
    let parts: Vec<&[u8]> = tok.split(|&b| b == b'.').collect();
    let n = parts.len();
    let shape = if truncated { n >= 2 } else { n == 3 || n == 5 };
    if !shape || parts[0].len() < 8 || !parts[0].starts_with(b"eyJ") {
        return false;
    }
    if n == 3 && !parts[1].starts_with(b"eyJ") {
        return false;
    }
    if !parts.iter().all(|p| p.iter().all(|&b| is_b64url(b))) {
        return false;
    }
    match checks::b64_decode_any(parts[0]) {
        Some(h) => h.first() == Some(&b'{') && h.windows(5).any(|x| x == b"\"alg\""),
        None => false,
    }
}

#[cfg(test)]
pub(crate) fn word_flags_for_test(x: u64) -> [u64; 4] {
    let f = word_flags(x);
    assert_eq!(digit_at_flags(x), (f.digit, f.at), "{x:#x}");
    [f.digit, f.at, f.lower, f.numsep]
}

#[cfg(test)]
impl Engine {
    /// The positions of the `@` and digit-run triggers that [`Engine::scan_bytes`] evaluates in
    /// `from..to` of a stream over all of `text`, in order.
    pub(crate) fn scan_triggers_for_test(&self, text: &[u8], from: usize, to: usize) -> Vec<usize> {
        let g = Gap {
            lo: 0,
            hi: text.len(),
            more: true,
        };
        let (mut out, mut und, mut recs) = (Vec::new(), Vec::new(), Vec::new());
        self.scan_bytes(text, g, from, to, &mut out, &mut und, &mut recs);
        let mut t: Vec<usize> = recs
            .iter()
            .map(|r| r.t)
            .chain(und.iter().map(|u| u.0))
            .collect();
        t.sort_unstable();
        t
    }

    /// The same triggers, found byte by byte from their definition.
    pub(crate) fn scan_triggers_bytewise(&self, text: &[u8], from: usize, to: usize) -> Vec<usize> {
        let g = Gap {
            lo: 0,
            hi: text.len(),
            more: true,
        };
        let before = |i: usize, k: usize| i.checked_sub(k).map(|j| text[j]);
        (from..to.min(text.len()))
            .filter(|&i| {
                let b = text[i];
                if b == b'@' {
                    return self.email_on;
                }
                let p1 = before(i, 1);
                let p2 = before(i, 2);
                let numsep_after_digit = p1.is_some_and(|c| matches!(c, b'-' | b'.' | b'/'))
                    && p2.is_some_and(|c| c.is_ascii_digit());
                self.digits_on
                    && b.is_ascii_digit()
                    && !p1
                        .is_some_and(|c| c.is_ascii_digit() || c.is_ascii_lowercase() || c == b'_')
                    && !numsep_after_digit
                    && !quick_skip(text, g, i)
            })
            .collect()
    }
}

fn set_bit(bits: &mut [u64; 4], b: u8) {
    bits[usize::from(b >> 6)] |= 1 << (b & 63);
}

fn has_bit(bits: &[u64; 4], b: u8) -> bool {
    bits[usize::from(b >> 6)] & (1 << (b & 63)) != 0
}

#[cfg(test)]
mod partial_ends_tests {
    use super::has_bit;
    use crate::mask::{MaskConfig, Masker};

    /// The bitsets are a necessary test: every proper prefix of a literal passes it.
    #[test]
    fn every_partial_passes_the_bitset_test() {
        let m = Masker::new(&MaskConfig::default()).expect("default config");
        let e = m.inner.engine();
        assert!(!e.partials.is_empty());
        for p in &e.partials {
            let k = p.len();
            assert!(k < 64, "{p:?}");
            assert!(has_bit(&e.partial_first[k], p[0]), "{p:?}");
            assert!(
                e.partial_last[usize::from(p[k - 1])] & (1 << k) != 0,
                "{p:?}"
            );
        }
    }
}

#[cfg(test)]
mod quick_skip_tests {
    use super::{quick_skip, Gap};
    use crate::mask::{MaskConfig, Masker};

    /// A cluster in the shape of an id, a phone or a card number (13 digits or more led by `4`
    /// pass the Luhn check half of the time), groups joined by separators.
    fn shaped(text: &mut Vec<u8>, next: &mut impl FnMut(usize) -> usize) {
        const GROUPS: &[&[usize]] = &[
            &[3, 2, 4],
            &[3, 3, 4],
            &[4, 4, 5],
            &[4, 4, 4, 4],
            &[4, 2, 2],
            &[2, 2, 2, 2],
            &[1, 3, 3, 4],
            &[4, 6, 5],
            &[2, 4, 7],
            &[6, 6, 1],
            &[5, 4, 4],
        ];
        const SEPS: &[&[u8]] = &[b" ", b"-", b".", b"/", b" -", b") ", b"  ", b"("];
        let groups = GROUPS[next(GROUPS.len())];
        let mut digits: Vec<u8> = (0..groups.iter().sum::<usize>())
            .map(|_| next(10) as u8)
            .collect();
        if digits.len() >= 13 && next(2) == 0 {
            digits[0] = 4;
            let n = digits.len();
            digits[n - 1] = 0;
            let sum: usize = digits
                .iter()
                .rev()
                .enumerate()
                .map(|(i, &d)| {
                    let d = usize::from(d) * if i % 2 == 1 { 2 } else { 1 };
                    d / 10 + d % 10
                })
                .sum();
            digits[n - 1] = ((10 - sum % 10) % 10) as u8;
        }
        // One separator throughout half of the time (card numbers need that).
        let one = (next(2) == 0).then(|| SEPS[next(SEPS.len())]);
        let mut k = 0;
        for (i, &len) in groups.iter().enumerate() {
            if i > 0 {
                text.extend_from_slice(one.unwrap_or_else(|| SEPS[next(SEPS.len())]));
            }
            text.extend(digits[k..k + len].iter().map(|d| b'0' + d));
            k += len;
        }
    }

    /// A digit run that [`quick_skip`] rules out finds nothing in `digit_run`, in the gap it was
    /// decided in, in any cut of that gap, and (when the gap could grow) whatever bytes came next.
    #[test]
    fn quick_skip_is_final() {
        let m = Masker::new(&MaskConfig::default()).expect("default config");
        let e = m.inner.engine();
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        let pieces: &[&[u8]] = &[
            b" ", b"-", b".", b"/", b"(", b")", b"  ", b" -", b"+", b"AB", b"X", b"ES", b"a", b":",
            b"T", b"0", b"\n", b"=",
        ];
        let (mut skipped, mut clusters) = (0, 0);
        for _ in 0..12000 {
            let len = 30 + next(50);
            let mut text = Vec::with_capacity(len + 12);
            while text.len() < len {
                if next(4) == 0 {
                    shaped(&mut text, &mut next);
                } else if next(2) == 0 {
                    for _ in 0..1 + next(10) {
                        text.push(b'0' + next(10) as u8);
                    }
                } else {
                    text.extend_from_slice(pieces[next(pieces.len())]);
                }
            }
            let n = next(text.len() + 1);
            let lo = next(n.min(6) + 1);
            for more in [true, false] {
                let seen = &text[..n];
                let g = Gap { lo, hi: n, more };
                for d in lo..n {
                    if !seen[d].is_ascii_digit()
                        || (d > 0 && seen[d - 1].is_ascii_digit())
                        || !quick_skip(seen, g, d)
                    {
                        continue;
                    }
                    skipped += 1;
                    let full: &[u8] = if more { &text } else { seen };
                    let run = seen[d..].iter().take_while(|b| b.is_ascii_digit()).count();
                    if super::is_sep(seen[d + run]) {
                        clusters += 1;
                    }
                    // Cuts that take away the lead, or the bytes before it; every end.
                    for lo2 in [lo, d.saturating_sub(1).max(lo), d] {
                        for hi2 in d + 1..=full.len().min(d + 48) {
                            for more2 in [false, hi2 == full.len()] {
                                let mut out = Vec::new();
                                let g2 = Gap {
                                    lo: lo2,
                                    hi: hi2,
                                    more: more2,
                                };
                                let _ = e.digit_run(full, g2, d, &mut out);
                                assert!(
                                    out.is_empty(),
                                    "{:?}: run at {d} skipped in {lo}..{n} (more {more}) but \
                                     found {out:?} in {lo2}..{hi2}",
                                    String::from_utf8_lossy(full)
                                );
                            }
                        }
                    }
                }
            }
        }
        assert!(
            skipped > 4000 && clusters > 1500,
            "{skipped} skipped, {clusters} clusters"
        );
    }
}
