//! Every example under deploy/ is loaded by the real parsers, so examples never rot.

use std::path::{Path, PathBuf};

fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files(&p, ext));
        } else if p.extension().and_then(|x| x.to_str()) == Some(ext) {
            out.push(p);
        }
    }
    out
}

/// An edge config lives under an `edge/` directory or is named `edge*.toml`
/// (deploy/compose/edge.toml); every other TOML under deploy/ but masking.toml is a control plane's.
fn is_edge_config(p: &Path) -> bool {
    p.to_string_lossy().contains("/edge/")
        || p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("edge"))
}

#[test]
fn every_example_config_loads() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let tomls: Vec<_> = files(&root, "toml")
        .into_iter()
        .filter(|p| !p.ends_with("masking.toml") && !is_edge_config(p))
        .collect();
    assert!(tomls.len() >= 4, "{tomls:?}");
    for p in tomls {
        custos_controlplane::ControlPlaneConfig::load(&p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
}

#[test]
fn every_example_edge_config_loads() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let tomls: Vec<_> = files(&root, "toml")
        .into_iter()
        .filter(|p| is_edge_config(p))
        .collect();
    assert!(tomls.len() >= 3, "{tomls:?}");
    for p in tomls {
        let cfg = custos_edge::config::EdgeFileConfig::load(&p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        // The reference example shows every section.
        if p.ends_with("examples/edge/edge.toml") {
            assert!(
                cfg.oidc.is_some() && cfg.postgres.tls_cert.is_some() && cfg.http.enabled,
                "{}",
                p.display()
            );
        }
    }
}

/// The commented-out `[telemetry]` block of a config, uncommented (None when it has none).
fn telemetry_block(text: &str) -> Option<String> {
    let mut lines = text.lines().skip_while(|l| l.trim() != "# [telemetry]");
    let mut out = format!("{}\n", lines.next()?.trim_start_matches("# "));
    for l in lines {
        let Some(kv) = l.strip_prefix("# ").filter(|kv| kv.contains(" = ")) else {
            break;
        };
        out.push_str(kv);
        out.push('\n');
    }
    Some(out)
}

#[test]
fn the_commented_telemetry_examples_load_when_uncommented() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mut seen = 0;
    for p in files(&root, "toml") {
        let text = std::fs::read_to_string(&p).unwrap();
        let Some(block) = telemetry_block(&text) else {
            continue;
        };
        seen += 1;
        let on = std::env::temp_dir().join(format!(
            "custos-telemetry-{}-{}",
            std::process::id(),
            p.file_name().unwrap().to_string_lossy()
        ));
        std::fs::write(&on, format!("{text}\n{block}")).unwrap();
        let t = if is_edge_config(&p) {
            custos_edge::config::EdgeFileConfig::load(&on)
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
                .telemetry
        } else {
            custos_controlplane::ControlPlaneConfig::load(&on)
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
                .telemetry
        };
        let _ = std::fs::remove_file(&on);
        assert!(t.otlp_endpoint.is_some(), "{}: {block}", p.display());
        assert!(t.sample_ratio < 1.0, "{}: {block}", p.display());
    }
    assert!(seen >= 4, "only {seen} configs show [telemetry]");
}

#[test]
fn every_example_policy_validates() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let cedars = files(&root, "cedar");
    assert!(!cedars.is_empty());
    for p in cedars {
        let text = std::fs::read_to_string(&p).unwrap();
        let v =
            custos_core::policy::validate(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(v.count > 0, "{}", p.display());
        custos_core::authz::check_annotations(&v.set)
            .unwrap_or_else(|e| panic!("{}: {e:?}", p.display()));
    }
}

#[test]
fn every_systemd_unit_runs_an_existing_subcommand() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    for p in files(&root, "service") {
        let text = std::fs::read_to_string(&p).unwrap();
        let exec = text
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .expect("ExecStart");
        let sub = exec.split_whitespace().nth(1).expect("subcommand");
        assert!(
            ["controlplane", "edge", "dev"].contains(&sub),
            "{}: {sub}",
            p.display()
        );
    }
}

#[test]
fn custos_mask_masks_a_file_and_counts_per_detector() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.log");
    let secret = "AKIAIOSFODNN7EXAMPLE";
    std::fs::write(
        &input,
        format!("user=alice@example.com key={secret} card=4111 1111 1111 1111 order=12345\n"),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_custos"))
        .args(["mask", "--stats"])
        .arg(&input)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let stats = String::from_utf8_lossy(&out.stderr);
    assert!(
        !text.contains(secret)
            && !text.contains("alice@example.com")
            && !text.contains("4111 1111 1111 1111"),
        "{text}"
    );
    assert!(
        text.contains("order=12345"),
        "non-sensitive text is kept: {text}"
    );
    assert!(stats.contains("total\t3"), "{stats}");
    // Every example masking config loads.
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples/masking.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_custos"))
        .args(["mask", "--config"])
        .arg(&cfg)
        .arg(&input)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A bad config names the problem.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[masking]\ndetectors = [\"no-such-detector\"]\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_custos"))
        .args(["mask", "--config"])
        .arg(&bad)
        .arg(&input)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no-such-detector"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
