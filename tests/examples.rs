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

#[test]
fn every_example_config_loads() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let tomls = files(&root, "toml");
    assert!(tomls.len() >= 4, "{tomls:?}");
    for p in tomls {
        custos_controlplane::ControlPlaneConfig::load(&p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
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
