//! `custos mask [--config FILE] [--stats] [FILE|-]`: run the masking engine on a file or stdin.
//!
//! The input is streamed through the engine's `StreamMasker` in 64 KiB chunks, so memory stays
//! bounded whatever the input size, and the output equals masking the whole text at once.

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
use custos_core::mask::{MaskConfig, Masker, Stats};

#[derive(clap::Args, Debug)]
pub struct MaskArgs {
    /// TOML file with a `[masking]` section (see docs/masking.md); default: every built-in detector.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Print counts per detector to stderr.
    #[arg(long)]
    pub stats: bool,
    /// Input file; `-` or nothing reads stdin.
    pub file: Option<PathBuf>,
}

pub fn load_config(path: &std::path::Path) -> Result<MaskConfig> {
    #[derive(serde::Deserialize)]
    struct File {
        masking: Option<MaskConfig>,
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file: File = toml::from_str(&text)
        .with_context(|| format!("{} is not valid masking TOML", path.display()))?;
    file.masking
        .with_context(|| format!("{} has no [masking] section", path.display()))
}

pub fn run(args: MaskArgs) -> Result<i32> {
    let cfg = match &args.config {
        Some(p) => load_config(p)?,
        None => MaskConfig::default(),
    };
    let masker = Masker::new(&cfg).map_err(|e| anyhow::anyhow!("masking config: {e}"))?;
    if masker.demo_key_in_use() && args.stats {
        eprintln!("note: no hash_key configured; hashed values use the public demo key (set [masking] hash_key in production)");
    }
    let mut input: Box<dyn Read> = match &args.file {
        None => Box::new(std::io::stdin().lock()),
        Some(p) if p.as_os_str() == "-" => Box::new(std::io::stdin().lock()),
        Some(p) => Box::new(
            std::fs::File::open(p).with_context(|| format!("cannot open {}", p.display()))?,
        ),
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut stream = masker.stream();
    let mut stats = Stats::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut carry: Vec<u8> = Vec::new();
    loop {
        let n = input.read(&mut buf).context("read input")?;
        if n == 0 {
            break;
        }
        carry.extend_from_slice(&buf[..n]);
        // Feed only complete UTF-8; keep an incomplete trailing sequence for the next read.
        let valid = match std::str::from_utf8(&carry) {
            Ok(_) => carry.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(e) => anyhow::bail!(
                "input is not UTF-8 text (invalid byte at offset {})",
                e.valid_up_to()
            ),
        };
        let text = std::str::from_utf8(&carry[..valid]).expect("checked above");
        out.write_all(stream.push(text, &mut stats).as_bytes())?;
        carry.drain(..valid);
    }
    if !carry.is_empty() {
        anyhow::bail!("input ends in the middle of a UTF-8 character");
    }
    out.write_all(stream.finish(&mut stats).as_bytes())?;
    out.flush()?;
    if args.stats {
        for (name, n) in stats.iter() {
            if n > 0 {
                eprintln!("{name}\t{n}");
            }
        }
        eprintln!("total\t{}", stats.total());
    }
    Ok(0)
}
