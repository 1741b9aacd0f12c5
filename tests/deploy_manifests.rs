//! The production manifests under `deploy/` checked against each other and against custos itself:
//! `deploy/k8s` (Kubernetes), `deploy/compose` (docker compose on one host), `deploy/systemd`
//! and `deploy/Dockerfile`.
//!
//! ```text
//!  manifest ──▶ every YAML document parses, names its kind, version and name
//!     │
//!     ├─▶ Services, PDBs, NetworkPolicies, affinities select real pods and real container ports
//!     ├─▶ every ConfigMap / Secret a pod mounts or reads exists, with the keys it reads
//!     ├─▶ every `custos …` command line parses with the real CLI (custos_cli::Cli)
//!     └─▶ every custos config a pod runs is rendered as the pod renders it (render-config.sh,
//!         run with sh for each pod name) and loaded with the real parser; then its listen ports
//!         are the container / published ports, its files lie under mounts that provide them,
//!         and its Raft peers, control-plane servers and NATS URLs name real pods, Services and
//!         ports
//! ```
//!
//! The checks return lists of problems rather than panicking, so `a_broken_manifest_is_caught`
//! breaks the manifests on purpose (a wrong port, name, key or path) and sees each break caught.
//! `nats-server -t` validates the NATS configs when a nats-server binary is installed (the test
//! script installs one).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use custos_controlplane::ControlPlaneConfig;
use custos_edge::config::EdgeFileConfig;
use serde::Deserialize;
use serde_norway::Value;

type Problems = Vec<String>;
type Labels = BTreeMap<String, String>;

// ---------------------------------------------------------------------------------------------
// The files under test, with in-memory overrides for the mutation test.

#[derive(Clone)]
struct Tree {
    root: PathBuf,
    over: BTreeMap<String, String>,
}

impl Tree {
    fn real() -> Tree {
        Tree {
            root: PathBuf::from(env!("CARGO_MANIFEST_DIR")),
            over: BTreeMap::new(),
        }
    }

    /// A copy with `from` replaced by `to` in `rel` (`from` must occur exactly once).
    fn with(&self, rel: &str, from: &str, to: &str) -> Tree {
        let text = self.read(rel).unwrap_or_else(|| panic!("{rel} is missing"));
        assert_eq!(
            text.matches(from).count(),
            1,
            "{rel}: the text to break, {from:?}, must occur exactly once"
        );
        let mut t = self.clone();
        t.over.insert(rel.to_string(), text.replacen(from, to, 1));
        t
    }

    fn read(&self, rel: &str) -> Option<String> {
        self.over
            .get(rel)
            .cloned()
            .or_else(|| std::fs::read_to_string(self.root.join(rel)).ok())
    }

    fn is_file(&self, rel: &str) -> bool {
        self.over.contains_key(rel) || self.root.join(rel).is_file()
    }

    fn is_dir(&self, rel: &str) -> bool {
        self.root.join(rel).is_dir()
    }

    /// Files under `dir` (recursively) whose names end in one of `suffixes`, sorted.
    fn files(&self, dir: &str, suffixes: &[&str]) -> Vec<String> {
        fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(root, &p, out);
                } else {
                    out.push(p.strip_prefix(root).unwrap().to_path_buf());
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.root, &self.root.join(dir), &mut out);
        let mut names: Vec<String> = out
            .into_iter()
            .map(|p| p.to_string_lossy().replace('\\', "/"))
            .filter(|p| suffixes.iter().any(|s| p.ends_with(s)))
            .collect();
        names.sort();
        names
    }
}

/// `base` joined with a relative path, `.` and `..` resolved (repository-relative, '/'-separated).
fn join_rel(base: &str, rel: &str) -> String {
    let mut parts: Vec<&str> = base.split('/').filter(|s| !s.is_empty()).collect();
    for seg in rel.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s),
        }
    }
    parts.join("/")
}

fn under(path: &str, dir: &str) -> bool {
    let dir = dir.trim_end_matches('/');
    path == dir || path.starts_with(&format!("{dir}/"))
}

// ---------------------------------------------------------------------------------------------
// YAML helpers.

fn yaml_docs(file: &str, text: &str, p: &mut Problems) -> Vec<Value> {
    let mut out = Vec::new();
    for de in serde_norway::Deserializer::from_str(text) {
        match Value::deserialize(de) {
            Ok(Value::Null) => {}
            Ok(v) => out.push(v),
            Err(e) => {
                p.push(format!("{file}: not valid YAML: {e}"));
                break;
            }
        }
    }
    out
}

fn at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

fn st<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    at(v, path).and_then(Value::as_str)
}

fn seq<'a>(v: &'a Value, path: &[&str]) -> &'a [Value] {
    at(v, path)
        .and_then(Value::as_sequence)
        .map(|s| s.as_slice())
        .unwrap_or(&[])
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn string_map(v: Option<&Value>) -> Labels {
    let mut out = Labels::new();
    if let Some(m) = v.and_then(Value::as_mapping) {
        for (k, v) in m {
            if let (Some(k), Some(v)) = (scalar(k), scalar(v)) {
                out.insert(k, v);
            }
        }
    }
    out
}

fn strings(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::Sequence(s)) => s.iter().filter_map(scalar).collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => Vec::new(),
    }
}

/// Does a label selector pick pods with these labels?
fn selects(selector: &Labels, labels: &Labels) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[derive(Debug, Clone, PartialEq)]
enum PortRef {
    Num(u64),
    Name(String),
}

fn port_ref(v: &Value) -> Option<PortRef> {
    let s = scalar(v)?;
    Some(match s.parse() {
        Ok(n) => PortRef::Num(n),
        Err(_) => PortRef::Name(s),
    })
}

fn port_of(addr: &str) -> Option<u64> {
    addr.rsplit_once(':')?.1.parse().ok()
}

fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr)
}

fn listens_everywhere(addr: &str) -> bool {
    matches!(host_of(addr), "0.0.0.0" | "[::]")
}

// ---------------------------------------------------------------------------------------------
// Command lines: the real custos CLI, a small shell tokenizer, nats-server, the render script.

/// Parse a `custos …` argv with the real clap definition; the subcommand's role and --config.
fn custos_argv(argv: &[String]) -> Result<(String, Option<PathBuf>), String> {
    let cli = custos_cli::Cli::try_parse_from(argv)
        .map_err(|e| format!("`{}` is not a custos command: {e}", argv.join(" ")))?;
    Ok(match cli.command {
        custos_cli::Command::Controlplane { config } => ("controlplane".into(), Some(config)),
        custos_cli::Command::Edge { config } => ("edge".into(), Some(config)),
        other => (
            format!("{other:?}")
                .split([' ', '(', '{'])
                .next()
                .unwrap_or_default()
                .to_lowercase(),
            None,
        ),
    })
}

const SHELL_SEPARATORS: &[&str] = &["&&", "||", ";", "|", ">", ">>", "<", "{", "}", "(", ")"];

fn shell_tokens(script: &str) -> Vec<String> {
    script
        .replace(';', " ; ")
        .split_whitespace()
        .map(|t| t.trim_matches(|c| c == '"' || c == '\'').to_string())
        .collect()
}

/// The argv of every `custos` invocation in a shell script.
fn custos_invocations(tokens: &[String]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        let command_position =
            i == 0 || SHELL_SEPARATORS.contains(&tokens[i - 1].as_str()) || tokens[i - 1] == "exec";
        if command_position && (t == "custos" || t.ends_with("/custos")) {
            out.push(
                tokens[i..]
                    .iter()
                    .take_while(|t| !SHELL_SEPARATORS.contains(&t.as_str()))
                    .cloned()
                    .collect(),
            );
        }
    }
    out
}

/// The argument after `flag` (`--flag X` or `--flag=X`).
fn flag_value(argv: &[String], flag: &str) -> Option<String> {
    argv.iter().enumerate().find_map(|(i, a)| {
        if a == flag {
            argv.get(i + 1).cloned()
        } else {
            a.strip_prefix(&format!("{flag}=")).map(str::to_string)
        }
    })
}

fn nats_server_bin() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.push("/usr/sbin".into());
    dirs.into_iter()
        .map(|d| d.join("nats-server"))
        .find(|p| p.is_file())
}

/// `nats-server -t` on a config (None when no nats-server is installed).
fn nats_validate(text: &str, env: &[(&str, &str)]) -> Option<Result<(), String>> {
    let bin = nats_server_bin()?;
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("nats.conf");
    std::fs::write(&conf, text).unwrap();
    let out = Command::new(bin)
        .arg("-t")
        .arg("-c")
        .arg(&conf)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    Some(if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    })
}

fn nats_check(what: &str, text: &str, env: &[(&str, &str)], p: &mut Problems) {
    match nats_validate(text, env) {
        Some(Ok(())) => {}
        Some(Err(e)) => p.push(format!("{what}: nats-server -t rejects it: {}", e.trim())),
        None => eprintln!("note: no nats-server installed; {what} was not validated by it"),
    }
}

/// The few facts of a NATS server config the manifests depend on.
#[derive(Debug, Default)]
struct NatsConf {
    client_port: Option<u64>,
    http_port: Option<u64>,
    cluster_port: Option<u64>,
    routes: Vec<String>,
    jetstream: bool,
    store_dir: Option<String>,
    pid_file: Option<String>,
}

fn parse_nats_conf(text: &str) -> NatsConf {
    let mut c = NatsConf::default();
    let mut blocks: Vec<String> = Vec::new();
    let mut in_routes = false;
    for raw in text.lines() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if in_routes {
            if line.starts_with(']') {
                in_routes = false;
            } else {
                c.routes.extend(
                    line.split([',', ' '])
                        .filter(|s| !s.is_empty())
                        .map(str::to_string),
                );
            }
            continue;
        }
        if line == "}" {
            blocks.pop();
            continue;
        }
        let (key, value) = match line.find([':', '=', ' ', '{']) {
            Some(i) => (
                line[..i].trim(),
                line[i..].trim_start_matches([':', '=', ' ']).trim(),
            ),
            None => (line, ""),
        };
        if value.starts_with('{') {
            blocks.push(key.to_string());
            if key == "jetstream" {
                c.jetstream = true;
            }
            continue;
        }
        let port = || port_of(value).or_else(|| value.parse().ok());
        match (blocks.last().map(String::as_str), key) {
            (None, "listen") | (None, "port") => c.client_port = port(),
            (None, "http") | (None, "http_port") | (None, "monitor_port") => c.http_port = port(),
            (None, "pid_file") => c.pid_file = Some(value.trim_matches('"').to_string()),
            (None, "jetstream") => c.jetstream = value != "disabled" && value != "false",
            (Some("jetstream"), "store_dir") => {
                c.store_dir = Some(value.trim_matches('"').to_string())
            }
            (Some("cluster"), "listen") | (Some("cluster"), "port") => c.cluster_port = port(),
            (Some("cluster"), "routes") => {
                in_routes = !value.contains(']');
                c.routes.extend(
                    value
                        .trim_matches(['[', ']'])
                        .split([',', ' '])
                        .filter(|s| !s.is_empty())
                        .map(str::to_string),
                );
            }
            _ => {}
        }
    }
    c
}

/// Run the render script the way a pod's start command does, for one pod.
fn render(script: &str, template: &str, env: &[(String, String)]) -> Result<String, String> {
    let dir = tempfile::tempdir().unwrap();
    let (s, t, o) = (
        dir.path().join("render.sh"),
        dir.path().join("template"),
        dir.path().join("out"),
    );
    std::fs::write(&s, script).unwrap();
    std::fs::write(&t, template).unwrap();
    let out = Command::new("sh")
        .arg(&s)
        .arg(&t)
        .arg(&o)
        .env_remove("POD_NAME")
        .env_remove("MASKING_HASH_KEY")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    std::fs::read_to_string(&o).map_err(|e| e.to_string())
}

/// The ports a custos config listens on, by what they are for.
fn custos_listens(role: &str, text: &str, origin: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    if role == "controlplane" {
        let c = ControlPlaneConfig::parse(text, origin).map_err(|e| e.to_string())?;
        out.push(("node.listen".into(), c.node.listen.clone()));
        if let Some(m) = c.metrics.listen.filter(|m| !m.is_empty()) {
            out.push(("metrics.listen".into(), m));
        }
        if let Some(s) = c.slack.filter(|s| !s.listen.is_empty()) {
            out.push(("slack.listen".into(), s.listen));
        }
    } else {
        let c = edge_parse(text, origin)?;
        if c.postgres.enabled {
            out.push(("postgres.listen".into(), c.postgres.listen.clone()));
        }
        if c.http.enabled {
            out.push(("http.listen".into(), c.http.listen.clone()));
        }
        if let Some(m) = c.metrics.listen.filter(|m| !m.is_empty()) {
            out.push(("metrics.listen".into(), m));
        }
    }
    Ok(out)
}

/// The edge parser takes a path; write the text to a file so `load` (parse + validate) runs.
fn edge_parse(text: &str, origin: &str) -> Result<EdgeFileConfig, String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edge.toml");
    std::fs::write(&path, text).unwrap();
    EdgeFileConfig::load(&path).map_err(|e| format!("{origin}: {e}"))
}

fn nats_urls(url: &str) -> Vec<(String, u64)> {
    url.split(',')
        .filter_map(|u| {
            let hp = u.trim().split_once("://")?.1;
            let hp = hp.rsplit_once('@').map(|(_, h)| h).unwrap_or(hp);
            Some((host_of(hp).to_string(), port_of(hp)?))
        })
        .collect()
}

/// Files a control-plane config reads (field, path), with defaults resolved.
fn controlplane_files(c: &ControlPlaneConfig) -> Vec<(&'static str, PathBuf)> {
    let mut out = vec![
        (
            "node.secret_key_file",
            c.data_file(&c.node.secret_key_file, "secret.key"),
        ),
        (
            "node.cluster_secret_file",
            c.data_file(&c.node.cluster_secret_file, "cluster.secret"),
        ),
        (
            "node.admin_token_file",
            c.data_file(&c.node.admin_token_file, "admin.token"),
        ),
    ];
    for (f, v) in [
        ("tls.cert", &c.tls.cert),
        ("tls.key", &c.tls.key),
        ("tls.ca", &c.tls.ca),
    ] {
        if let Some(v) = v {
            out.push((f, v.clone()));
        }
    }
    out
}

fn edge_files(c: &EdgeFileConfig) -> Vec<(&'static str, PathBuf)> {
    let mut out = Vec::new();
    for (f, v) in [
        ("controlplane.token_file", &c.controlplane.token_file),
        ("controlplane.ca", &c.controlplane.ca),
        ("controlplane.cert", &c.controlplane.cert),
        ("controlplane.key", &c.controlplane.key),
        ("postgres.tls_cert", &c.postgres.tls_cert),
        ("postgres.tls_key", &c.postgres.tls_key),
        ("http.tls_cert", &c.http.tls_cert),
        ("http.tls_key", &c.http.tls_key),
    ] {
        if let Some(v) = v {
            out.push((f, v.clone()));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Kubernetes.

const K8S_DIR: &str = "deploy/k8s";

/// The API version each kind the manifests use is served at (older ones are removed from
/// current clusters).
const KINDS: &[(&str, &str)] = &[
    ("ConfigMap", "v1"),
    ("Secret", "v1"),
    ("Service", "v1"),
    ("StatefulSet", "apps/v1"),
    ("Deployment", "apps/v1"),
    ("PodDisruptionBudget", "policy/v1"),
    ("NetworkPolicy", "networking.k8s.io/v1"),
];

struct Workload<'a> {
    kind: String,
    name: String,
    replicas: u64,
    labels: Labels,
    annotations: Labels,
    spec: &'a Value,
    claims: Vec<String>,
    service_name: Option<String>,
}

impl Workload<'_> {
    fn containers(&self) -> &[Value] {
        seq(self.spec, &["containers"])
    }

    /// The pod names this workload gets: ordinals for a StatefulSet, generated names otherwise.
    fn pod_names(&self) -> Vec<String> {
        (0..self.replicas)
            .map(|i| {
                if self.kind == "StatefulSet" {
                    format!("{}-{i}", self.name)
                } else {
                    format!("{}-5d8f7c9b4-x{i}k4p", self.name)
                }
            })
            .collect()
    }

    fn has_container_port(&self, r: &PortRef) -> Option<u64> {
        self.containers().iter().find_map(|c| container_port(c, r))
    }
}

fn container_ports(c: &Value) -> Vec<(Option<String>, u64)> {
    seq(c, &["ports"])
        .iter()
        .filter_map(|p| {
            Some((
                st(p, &["name"]).map(str::to_string),
                at(p, &["containerPort"])?.as_u64()?,
            ))
        })
        .collect()
}

fn container_port(c: &Value, r: &PortRef) -> Option<u64> {
    container_ports(c)
        .into_iter()
        .find(|(name, n)| match r {
            PortRef::Num(x) => n == x,
            PortRef::Name(x) => name.as_deref() == Some(x.as_str()),
        })
        .map(|(_, n)| n)
}

struct Service<'a> {
    name: String,
    selector: Labels,
    headless: bool,
    publish_not_ready: bool,
    v: &'a Value,
}

/// Where a path inside a container comes from.
#[derive(Debug, PartialEq)]
enum Source {
    ConfigMap { name: String, key: String },
    Secret { name: String, key: String },
    EmptyDir,
    Claim,
    Other,
}

struct Mounted {
    source: Source,
    read_only: bool,
}

struct K8s<'a> {
    workloads: Vec<Workload<'a>>,
    services: Vec<Service<'a>>,
    config_maps: BTreeMap<String, Labels>,
    secrets: BTreeMap<String, Labels>,
}

/// What one custos container runs.
struct CustosRun {
    workload: String,
    role: String,
    /// Per pod: (pod name, rendered config text).
    configs: Vec<(String, String)>,
    ports: Vec<(Option<String>, u64)>,
}

impl<'a> K8s<'a> {
    fn new(docs: &'a [(String, Value)], p: &mut Problems) -> K8s<'a> {
        let mut k = K8s {
            workloads: Vec::new(),
            services: Vec::new(),
            config_maps: BTreeMap::new(),
            secrets: BTreeMap::new(),
        };
        let mut seen = BTreeSet::new();
        for (file, d) in docs {
            let (Some(api), Some(kind), Some(name)) = (
                st(d, &["apiVersion"]),
                st(d, &["kind"]),
                st(d, &["metadata", "name"]),
            ) else {
                p.push(format!(
                    "{file}: a document lacks apiVersion, kind or metadata.name"
                ));
                continue;
            };
            match KINDS.iter().find(|(k, _)| *k == kind) {
                Some((_, want)) if *want == api => {}
                Some((_, want)) => p.push(format!(
                    "{file}: {kind} {name}: apiVersion {api}, want {want}"
                )),
                None => p.push(format!(
                    "{file}: {kind} {name}: a kind these checks do not know"
                )),
            }
            if at(d, &["metadata", "namespace"]).is_some() {
                p.push(format!(
                    "{file}: {kind} {name} names a namespace; the manifests are namespace-agnostic"
                ));
            }
            if !seen.insert((kind.to_string(), name.to_string())) {
                p.push(format!("{file}: {kind} {name} is defined twice"));
            }
            match kind {
                "StatefulSet" | "Deployment" => {
                    let Some(spec) = at(d, &["spec", "template", "spec"]) else {
                        p.push(format!("{file}: {kind} {name} has no spec.template.spec"));
                        continue;
                    };
                    k.workloads.push(Workload {
                        kind: kind.into(),
                        name: name.into(),
                        replicas: at(d, &["spec", "replicas"])
                            .and_then(Value::as_u64)
                            .unwrap_or(1),
                        labels: string_map(at(d, &["spec", "template", "metadata", "labels"])),
                        annotations: string_map(at(
                            d,
                            &["spec", "template", "metadata", "annotations"],
                        )),
                        spec,
                        claims: seq(d, &["spec", "volumeClaimTemplates"])
                            .iter()
                            .filter_map(|c| st(c, &["metadata", "name"]).map(str::to_string))
                            .collect(),
                        service_name: st(d, &["spec", "serviceName"]).map(str::to_string),
                    });
                    let sel = string_map(at(d, &["spec", "selector", "matchLabels"]));
                    let labels = &k.workloads.last().unwrap().labels;
                    if !selects(&sel, labels) {
                        p.push(format!("{file}: {kind} {name}: spec.selector {sel:?} does not match its pod labels {labels:?}"));
                    }
                }
                "Service" => k.services.push(Service {
                    name: name.into(),
                    selector: string_map(at(d, &["spec", "selector"])),
                    headless: st(d, &["spec", "clusterIP"]) == Some("None"),
                    publish_not_ready: at(d, &["spec", "publishNotReadyAddresses"])
                        .and_then(Value::as_bool)
                        .unwrap_or(false),
                    v: d,
                }),
                "ConfigMap" => {
                    let mut m = string_map(at(d, &["data"]));
                    m.extend(string_map(at(d, &["binaryData"])));
                    k.config_maps.insert(name.into(), m);
                }
                "Secret" => {
                    let mut m = string_map(at(d, &["data"]));
                    m.extend(string_map(at(d, &["stringData"])));
                    k.secrets.insert(name.into(), m);
                }
                _ => {}
            }
        }
        k
    }

    fn selected(&self, selector: &Labels) -> Vec<&Workload<'a>> {
        self.workloads
            .iter()
            .filter(|w| selects(selector, &w.labels))
            .collect()
    }

    fn workload(&self, name: &str) -> Option<&Workload<'a>> {
        self.workloads.iter().find(|w| w.name == name)
    }

    /// Where `path` inside container `c` of `w` comes from (the longest mount that holds it).
    fn source_of(&self, w: &Workload, c: &Value, path: &str) -> Result<Mounted, String> {
        let mount = seq(c, &["volumeMounts"])
            .iter()
            .filter_map(|m| Some((m, st(m, &["mountPath"])?)))
            .filter(|(m, mp)| {
                if st(m, &["subPath"]).is_some() {
                    path == *mp
                } else {
                    under(path, mp)
                }
            })
            .max_by_key(|(_, mp)| mp.len());
        let Some((m, mp)) = mount else {
            return Err(format!("{path} lies under no volumeMount"));
        };
        let vname = st(m, &["name"]).unwrap_or_default();
        let read_only = at(m, &["readOnly"])
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let rel = match st(m, &["subPath"]) {
            Some(s) => s.to_string(),
            None => path[mp.len()..].trim_start_matches('/').to_string(),
        };
        if w.claims.iter().any(|c| c == vname) {
            return Ok(Mounted {
                source: Source::Claim,
                read_only,
            });
        }
        let Some(vol) = seq(w.spec, &["volumes"])
            .iter()
            .find(|v| st(v, &["name"]) == Some(vname))
        else {
            return Err(format!("volumeMount {vname} ({mp}) names no volume"));
        };
        let key_of = |items: &[Value], rel: &str| -> Option<String> {
            if items.is_empty() {
                (!rel.is_empty() && !rel.contains('/')).then(|| rel.to_string())
            } else {
                items
                    .iter()
                    .find(|i| st(i, &["path"]) == Some(rel))
                    .and_then(|i| st(i, &["key"]).map(str::to_string))
            }
        };
        let source = if let Some(cm) = at(vol, &["configMap"]) {
            let name = st(cm, &["name"]).unwrap_or_default().to_string();
            let key = key_of(seq(cm, &["items"]), &rel).ok_or_else(|| {
                format!("{path}: volume {vname} (ConfigMap {name}) provides no file {rel:?}")
            })?;
            if !self
                .config_maps
                .get(&name)
                .is_some_and(|m| m.contains_key(&key))
            {
                return Err(format!("{path}: ConfigMap {name} has no key {key}"));
            }
            Source::ConfigMap { name, key }
        } else if let Some(s) = at(vol, &["secret"]) {
            let name = st(s, &["secretName"]).unwrap_or_default().to_string();
            let key = key_of(seq(s, &["items"]), &rel).ok_or_else(|| {
                format!("{path}: volume {vname} (Secret {name}) provides no file {rel:?}")
            })?;
            if !self
                .secrets
                .get(&name)
                .is_some_and(|m| m.contains_key(&key))
            {
                return Err(format!("{path}: Secret {name} has no key {key}"));
            }
            Source::Secret { name, key }
        } else if at(vol, &["emptyDir"]).is_some() {
            Source::EmptyDir
        } else if at(vol, &["persistentVolumeClaim"]).is_some() {
            Source::Claim
        } else {
            Source::Other
        };
        Ok(Mounted { source, read_only })
    }

    /// Resolve `host:port` as seen from a pod in the same namespace to (workload, container
    /// port): a Service name, or `<pod>.<headless service>` for a StatefulSet pod.
    fn resolve(&self, host: &str, port: u64) -> Result<Vec<(&Workload<'a>, u64)>, String> {
        if let Some(s) = self.services.iter().find(|s| s.name == host) {
            let sp = seq(s.v, &["spec", "ports"])
                .iter()
                .find(|sp| at(sp, &["port"]).and_then(Value::as_u64) == Some(port))
                .ok_or_else(|| format!("Service {host} has no port {port}"))?;
            let target = at(sp, &["targetPort"])
                .and_then(port_ref)
                .unwrap_or(PortRef::Num(port));
            let out: Vec<_> = self
                .selected(&s.selector)
                .into_iter()
                .filter_map(|w| Some((w, w.has_container_port(&target)?)))
                .collect();
            return if out.is_empty() {
                Err(format!(
                    "Service {host} port {port} reaches no container port {target:?}"
                ))
            } else {
                Ok(out)
            };
        }
        if let Some((pod, svc)) = host.split_once('.') {
            let w = self
                .workloads
                .iter()
                .find(|w| {
                    w.kind == "StatefulSet"
                        && w.service_name.as_deref() == Some(svc)
                        && w.pod_names().iter().any(|n| n == pod)
                })
                .ok_or_else(|| format!("{host}: no StatefulSet pod {pod} under a Service {svc}"))?;
            if !self.services.iter().any(|s| s.name == svc && s.headless) {
                return Err(format!("{host}: {svc} is not a headless Service"));
            }
            return match w.has_container_port(&PortRef::Num(port)) {
                Some(n) => Ok(vec![(w, n)]),
                None => Err(format!("{host}: pod {pod} has no container port {port}")),
            };
        }
        Err(format!(
            "{host} is neither a Service nor <pod>.<headless service> in these manifests \
             (use namespace-relative names)"
        ))
    }
}

fn load_k8s(t: &Tree, p: &mut Problems) -> Vec<(String, Value)> {
    let files = t.files(K8S_DIR, &[".yaml", ".yml"]);
    if files.is_empty() {
        p.push(format!("no manifests under {K8S_DIR}"));
    }
    let mut docs = Vec::new();
    for f in files {
        let text = t.read(&f).unwrap_or_default();
        for d in yaml_docs(&f, &text, p) {
            docs.push((f.clone(), d));
        }
    }
    docs
}

fn check_k8s(t: &Tree, custos_image: &str) -> Problems {
    let mut p = Problems::new();
    let docs = load_k8s(t, &mut p);
    let k = K8s::new(&docs, &mut p);

    // Secrets are templates: nothing real is committed.
    for (name, keys) in &k.secrets {
        for (key, v) in keys {
            if !v.starts_with("REPLACE_ME") {
                p.push(format!(
                    "Secret {name} key {key}: a template value must start with REPLACE_ME"
                ));
            }
        }
    }

    // Workloads: containers, ports, probes, resources, mounts, references.
    for w in &k.workloads {
        let what = format!("{} {}", w.kind, w.name);
        if w.containers().is_empty() {
            p.push(format!("{what}: no containers"));
        }
        for c in w.containers() {
            let cname = st(c, &["name"]).unwrap_or("?");
            let what = format!("{what} container {cname}");
            if st(c, &["image"]).is_none() {
                p.push(format!("{what}: no image"));
            }
            for r in ["cpu", "memory"] {
                if at(c, &["resources", "requests", r]).is_none() {
                    p.push(format!("{what}: no resources.requests.{r}"));
                }
            }
            if at(c, &["resources", "limits", "memory"]).is_none() {
                p.push(format!("{what}: no resources.limits.memory"));
            }
            for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
                let Some(pr) = at(c, &[probe]) else { continue };
                let port = at(pr, &["httpGet", "port"])
                    .or_else(|| at(pr, &["tcpSocket", "port"]))
                    .or_else(|| at(pr, &["grpc", "port"]))
                    .and_then(port_ref);
                match port {
                    Some(r) if container_port(c, &r).is_some() => {}
                    Some(r) => p.push(format!("{what}: {probe} port {r:?} is no container port")),
                    None if at(pr, &["exec"]).is_some() => {}
                    None => p.push(format!("{what}: {probe} names no port")),
                }
            }
            if probe_less(c) {
                p.push(format!("{what}: no readinessProbe and livenessProbe"));
            }
            for m in seq(c, &["volumeMounts"]) {
                let n = st(m, &["name"]).unwrap_or_default();
                if !w.claims.iter().any(|c| c == n)
                    && !seq(w.spec, &["volumes"])
                        .iter()
                        .any(|v| st(v, &["name"]) == Some(n))
                {
                    p.push(format!("{what}: volumeMount {n} names no volume"));
                }
            }
            for e in seq(c, &["env"]) {
                let n = st(e, &["name"]).unwrap_or("?");
                if let Some(r) = at(e, &["valueFrom", "configMapKeyRef"]) {
                    k_ref(
                        &k.config_maps,
                        "ConfigMap",
                        r,
                        &["name"],
                        &mut p,
                        &format!("{what} env {n}"),
                    );
                }
                if let Some(r) = at(e, &["valueFrom", "secretKeyRef"]) {
                    k_ref(
                        &k.secrets,
                        "Secret",
                        r,
                        &["name"],
                        &mut p,
                        &format!("{what} env {n}"),
                    );
                }
            }
            for e in seq(c, &["envFrom"]) {
                for (field, map, kind) in [
                    ("configMapRef", &k.config_maps, "ConfigMap"),
                    ("secretRef", &k.secrets, "Secret"),
                ] {
                    if let Some(name) = st(e, &[field, "name"]) {
                        if !map.contains_key(name) && !optional(at(e, &[field])) {
                            p.push(format!("{what}: envFrom {kind} {name} does not exist"));
                        }
                    }
                }
            }
        }
        for v in seq(w.spec, &["volumes"]) {
            let vn = st(v, &["name"]).unwrap_or("?");
            let what = format!("{what} volume {vn}");
            if let Some(cm) = at(v, &["configMap"]) {
                volume_ref(&k.config_maps, "ConfigMap", cm, "name", &mut p, &what);
            }
            if let Some(s) = at(v, &["secret"]) {
                volume_ref(&k.secrets, "Secret", s, "secretName", &mut p, &what);
            }
            for src in seq(v, &["projected", "sources"]) {
                if let Some(cm) = at(src, &["configMap"]) {
                    volume_ref(&k.config_maps, "ConfigMap", cm, "name", &mut p, &what);
                }
                if let Some(s) = at(src, &["secret"]) {
                    volume_ref(&k.secrets, "Secret", s, "name", &mut p, &what);
                }
            }
        }
        for term in seq(
            w.spec,
            &[
                "affinity",
                "podAntiAffinity",
                "preferredDuringSchedulingIgnoredDuringExecution",
            ],
        ) {
            let sel = string_map(at(
                term,
                &["podAffinityTerm", "labelSelector", "matchLabels"],
            ));
            if !selects(&sel, &w.labels) {
                p.push(format!(
                    "{what}: anti-affinity selector {sel:?} does not select its own pods"
                ));
            }
        }
        if let Some(port) = w.annotations.get("prometheus.io/port") {
            match port.parse() {
                Ok(n) if w.has_container_port(&PortRef::Num(n)).is_some() => {}
                _ => p.push(format!(
                    "{what}: prometheus.io/port {port} is no container port"
                )),
            }
        }
        if w.kind == "StatefulSet" {
            match &w.service_name {
                None => p.push(format!("{what}: no serviceName")),
                Some(sn) => match k.services.iter().find(|s| &s.name == sn) {
                    None => p.push(format!("{what}: serviceName {sn} names no Service")),
                    Some(s) => {
                        if !s.headless {
                            p.push(format!(
                                "{what}: serviceName {sn} is not headless (clusterIP: None)"
                            ));
                        }
                        if !selects(&s.selector, &w.labels) {
                            p.push(format!(
                                "{what}: its governing Service {sn} does not select its pods"
                            ));
                        }
                        if !s.publish_not_ready {
                            p.push(format!(
                                "{what}: Service {sn} needs publishNotReadyAddresses: true so peers resolve before they are ready"
                            ));
                        }
                    }
                },
            }
        }
    }

    // Services select pods and reach container ports.
    for s in &k.services {
        let pods = k.selected(&s.selector);
        if pods.is_empty() {
            p.push(format!(
                "Service {}: selector {:?} matches no pod template",
                s.name, s.selector
            ));
        }
        for sp in seq(s.v, &["spec", "ports"]) {
            let Some(port) = at(sp, &["port"]).and_then(Value::as_u64) else {
                p.push(format!("Service {}: a port without a number", s.name));
                continue;
            };
            let target = at(sp, &["targetPort"])
                .and_then(port_ref)
                .unwrap_or(PortRef::Num(port));
            for w in &pods {
                if w.has_container_port(&target).is_none() {
                    p.push(format!(
                        "Service {} port {port}: targetPort {target:?} is no container port of {} {}",
                        s.name, w.kind, w.name
                    ));
                }
            }
        }
    }

    // PodDisruptionBudgets and NetworkPolicies select workloads.
    for (file, d) in &docs {
        let name = st(d, &["metadata", "name"]).unwrap_or("?");
        match st(d, &["kind"]) {
            Some("PodDisruptionBudget") => {
                let sel = string_map(at(d, &["spec", "selector", "matchLabels"]));
                let ws = k.selected(&sel);
                if ws.is_empty() {
                    p.push(format!(
                        "{file}: PodDisruptionBudget {name}: selector {sel:?} matches no workload"
                    ));
                }
                let min = at(d, &["spec", "minAvailable"]).and_then(Value::as_u64);
                for w in ws {
                    match min {
                        Some(m) if m >= 1 && m < w.replicas => {}
                        _ => p.push(format!(
                            "{file}: PodDisruptionBudget {name}: minAvailable {min:?} must be 1 … {} for {} {} \
                             ({} replicas), or no node could ever be drained",
                            w.replicas.saturating_sub(1), w.kind, w.name, w.replicas
                        )),
                    }
                }
            }
            Some("NetworkPolicy") => {
                let sel = string_map(at(d, &["spec", "podSelector", "matchLabels"]));
                let targets = k.selected(&sel);
                if targets.is_empty() {
                    p.push(format!(
                        "{file}: NetworkPolicy {name}: podSelector {sel:?} matches no workload"
                    ));
                }
                for rule in seq(d, &["spec", "ingress"]) {
                    for from in seq(rule, &["from"]) {
                        if let Some(ps) = at(from, &["podSelector"]) {
                            let fsel = string_map(at(ps, &["matchLabels"]));
                            if k.selected(&fsel).is_empty() {
                                p.push(format!("{file}: NetworkPolicy {name}: from {fsel:?} matches no workload"));
                            }
                        }
                    }
                    for port in seq(rule, &["ports"]) {
                        let Some(r) = at(port, &["port"]).and_then(port_ref) else {
                            continue;
                        };
                        for w in &targets {
                            if w.has_container_port(&r).is_none() {
                                p.push(format!("{file}: NetworkPolicy {name}: port {r:?} is no container port of {}", w.name));
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }

    // custos containers: command line, rendered config, ports, files, addresses.
    let mut runs = Vec::new();
    for w in &k.workloads {
        for c in w.containers() {
            if let Some(run) = custos_container(&k, w, c, custos_image, &mut p) {
                runs.push((w, c, run));
            }
        }
    }
    // NATS containers.
    let mut nats: BTreeMap<String, (u64, NatsConf)> = BTreeMap::new();
    for w in &k.workloads {
        for c in w.containers() {
            if let Some(conf) = nats_container(&k, w, c, &mut p) {
                nats.insert(w.name.clone(), (w.replicas, conf));
            }
        }
    }
    if nats.is_empty() {
        p.push("no NATS server among the manifests (custos needs JetStream)".into());
    }
    if !runs.iter().any(|(_, _, r)| r.role == "controlplane")
        || !runs.iter().any(|(_, _, r)| r.role == "edge")
    {
        p.push("the manifests must run both a control plane and an edge".into());
    }
    for (w, c, run) in &runs {
        for (pod, text) in &run.configs {
            let what = format!("{} pod {pod} ({})", run.workload, run.role);
            if run.role == "controlplane" {
                check_k8s_controlplane(&k, w, c, pod, text, &what, &nats, &mut p);
            } else {
                check_k8s_edge(&k, w, c, text, &what, &nats, &runs, &mut p);
            }
        }
        // Every container port is something the config listens on.
        let listens: BTreeSet<u64> = run
            .configs
            .first()
            .and_then(|(_, t)| custos_listens(&run.role, t, &run.workload).ok())
            .unwrap_or_default()
            .iter()
            .filter_map(|(_, a)| port_of(a))
            .collect();
        for (name, n) in &run.ports {
            if !listens.contains(n) {
                p.push(format!(
                    "{}: container port {n} ({name:?}) is nothing the {} config listens on",
                    run.workload, run.role
                ));
            }
        }
    }
    if runs
        .iter()
        .filter(|(_, _, r)| r.role == "edge")
        .flat_map(|(_, _, r)| &r.configs)
        .count()
        > 1
    {
        let ids: Vec<String> = runs
            .iter()
            .filter(|(_, _, r)| r.role == "edge")
            .flat_map(|(_, _, r)| &r.configs)
            .filter_map(|(_, t)| edge_parse(t, "edge").ok().map(|c| c.edge.id))
            .collect();
        let unique: BTreeSet<_> = ids.iter().collect();
        if unique.len() != ids.len() {
            p.push(format!(
                "edge ids must be unique among running edges: {ids:?}"
            ));
        }
    }
    p
}

fn probe_less(c: &Value) -> bool {
    at(c, &["readinessProbe"]).is_none() || at(c, &["livenessProbe"]).is_none()
}

fn optional(v: Option<&Value>) -> bool {
    v.and_then(|v| at(v, &["optional"]))
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

fn k_ref(
    map: &BTreeMap<String, Labels>,
    kind: &str,
    r: &Value,
    name_path: &[&str],
    p: &mut Problems,
    what: &str,
) {
    let name = st(r, name_path).unwrap_or_default();
    let key = st(r, &["key"]).unwrap_or_default();
    if optional(Some(r)) {
        return;
    }
    match map.get(name) {
        None => p.push(format!("{what}: {kind} {name} does not exist")),
        Some(m) if !m.contains_key(key) => {
            p.push(format!("{what}: {kind} {name} has no key {key}"))
        }
        _ => {}
    }
}

fn volume_ref(
    map: &BTreeMap<String, Labels>,
    kind: &str,
    v: &Value,
    name_field: &str,
    p: &mut Problems,
    what: &str,
) {
    let name = st(v, &[name_field]).unwrap_or_default();
    if optional(Some(v)) {
        return;
    }
    let Some(m) = map.get(name) else {
        p.push(format!("{what}: {kind} {name} does not exist"));
        return;
    };
    for i in seq(v, &["items"]) {
        let key = st(i, &["key"]).unwrap_or_default();
        if !m.contains_key(key) {
            p.push(format!("{what}: {kind} {name} has no key {key}"));
        }
    }
}

/// The container's command line as one shell script (`sh -c SCRIPT`) or a plain argv.
fn container_argv(c: &Value) -> Vec<String> {
    let mut argv = strings(at(c, &["command"]));
    argv.extend(strings(at(c, &["args"])));
    argv
}

fn custos_container(
    k: &K8s,
    w: &Workload,
    c: &Value,
    custos_image: &str,
    p: &mut Problems,
) -> Option<CustosRun> {
    let argv = container_argv(c);
    let (tokens, shell) = match argv.as_slice() {
        [sh, dash_c, script, ..] if sh.ends_with("sh") && dash_c == "-c" => {
            (shell_tokens(script), true)
        }
        _ => (argv.clone(), false),
    };
    let invocations = if shell {
        custos_invocations(&tokens)
    } else if argv
        .first()
        .is_some_and(|a| a == "custos" || a.ends_with("/custos"))
    {
        vec![argv.clone()]
    } else {
        Vec::new()
    };
    let what = format!("{} {}", w.kind, w.name);
    let mut run = None;
    for inv in invocations {
        let (role, config) = match custos_argv(&inv) {
            Ok(x) => x,
            Err(e) => {
                p.push(format!("{what}: {e}"));
                continue;
            }
        };
        let Some(config) = config else { continue };
        let config = config.to_string_lossy().to_string();
        if st(c, &["image"]) != Some(custos_image) {
            p.push(format!(
                "{what}: runs custos from image {:?}, want {custos_image} (deploy/Dockerfile)",
                st(c, &["image"])
            ));
        }
        // The config: rendered from a template by render-config.sh, or mounted as it is.
        let render_at = tokens.iter().position(|t| t.ends_with("render-config.sh"));
        let mut configs = Vec::new();
        match render_at {
            Some(i) => {
                let (Some(template), Some(out)) = (tokens.get(i + 1), tokens.get(i + 2)) else {
                    p.push(format!("{what}: render-config.sh needs TEMPLATE OUTPUT"));
                    continue;
                };
                if *out != config {
                    p.push(format!("{what}: renders {out} but runs --config {config}"));
                }
                match k.source_of(w, c, out) {
                    Ok(Mounted {
                        source: Source::EmptyDir,
                        read_only: false,
                    }) => {}
                    Ok(_) => p.push(format!(
                        "{what}: the rendered config {out} must go to a writable emptyDir"
                    )),
                    Err(e) => p.push(format!("{what}: {e}")),
                }
                let (script, tmpl) = match (
                    config_map_text(k, w, c, &tokens[i]),
                    config_map_text(k, w, c, template),
                ) {
                    (Ok(s), Ok(t)) => (s, t),
                    (Err(e), _) | (_, Err(e)) => {
                        p.push(format!("{what}: {e}"));
                        continue;
                    }
                };
                for pod in w.pod_names() {
                    let env = match pod_env(k, c, &pod) {
                        Ok(e) => e,
                        Err(e) => {
                            p.push(format!("{what}: {e}"));
                            break;
                        }
                    };
                    for ph in placeholders(&tmpl) {
                        if !env.iter().any(|(n, _)| *n == ph) && ph != "NODE_ID" {
                            p.push(format!("{what}: the template uses @{ph}@ but the container sets no env {ph}"));
                        }
                    }
                    match render(&script, &tmpl, &env) {
                        Ok(text) => {
                            if let Some(ph) = placeholders(&text).first() {
                                p.push(format!("{what} pod {pod}: @{ph}@ left after rendering"));
                            }
                            configs.push((pod, text));
                        }
                        Err(e) => p.push(format!("{what} pod {pod}: render-config.sh failed: {e}")),
                    }
                }
            }
            None => match config_map_text(k, w, c, &config) {
                Ok(text) => {
                    configs.extend(w.pod_names().into_iter().map(|pod| (pod, text.clone())))
                }
                Err(e) => p.push(format!("{what}: {e}")),
            },
        }
        run = Some(CustosRun {
            workload: w.name.clone(),
            role,
            configs,
            ports: container_ports(c),
        });
    }
    run
}

fn placeholders(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find('@') {
        let after = &rest[i + 1..];
        match after.find('@') {
            Some(j)
                if j > 0
                    && after[..j]
                        .chars()
                        .all(|c| c.is_ascii_uppercase() || c == '_') =>
            {
                out.push(after[..j].to_string());
                rest = &after[j + 1..];
            }
            _ => rest = after,
        }
    }
    out
}

/// The env a pod's start command sees (values from the downward API, ConfigMaps, and a test
/// hex value for Secret keys, whose committed values are placeholders).
fn pod_env(k: &K8s, c: &Value, pod: &str) -> Result<Vec<(String, String)>, String> {
    let mut env = Vec::new();
    for e in seq(c, &["env"]) {
        let name = st(e, &["name"]).unwrap_or_default().to_string();
        let value = if let Some(v) = at(e, &["value"]).and_then(scalar) {
            v
        } else if let Some(f) = st(e, &["valueFrom", "fieldRef", "fieldPath"]) {
            match f {
                "metadata.name" => pod.to_string(),
                other => format!("<{other}>"),
            }
        } else if let Some(r) = at(e, &["valueFrom", "configMapKeyRef"]) {
            let (n, key) = (
                st(r, &["name"]).unwrap_or_default(),
                st(r, &["key"]).unwrap_or_default(),
            );
            k.config_maps
                .get(n)
                .and_then(|m| m.get(key))
                .cloned()
                .ok_or_else(|| format!("env {name}: ConfigMap {n} has no key {key}"))?
        } else if at(e, &["valueFrom", "secretKeyRef"]).is_some() {
            "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff".to_string()
        } else {
            return Err(format!("env {name} has no value this test understands"));
        };
        env.push((name, value));
    }
    if !env.iter().any(|(n, v)| n == "POD_NAME" && v == pod) {
        return Err("render-config.sh needs env POD_NAME from fieldRef metadata.name".into());
    }
    Ok(env)
}

fn config_map_text(k: &K8s, w: &Workload, c: &Value, path: &str) -> Result<String, String> {
    match k.source_of(w, c, path)?.source {
        Source::ConfigMap { name, key } => Ok(k.config_maps[&name][&key].clone()),
        other => Err(format!("{path} comes from {other:?}, not from a ConfigMap")),
    }
}

/// A custos file path must come from a mount of the right kind ("secret" or "claim"); the
/// problem, if not.
fn wrong_source(
    k: &K8s,
    w: &Workload,
    c: &Value,
    field: &str,
    path: &Path,
    want: &str,
) -> Option<String> {
    let path = path.to_string_lossy();
    match k.source_of(w, c, &path) {
        Err(e) => Some(format!("{field} = {path}: {e}")),
        Ok(m) => {
            let ok = match want {
                "secret" => matches!(m.source, Source::Secret { .. }),
                "claim" => m.source == Source::Claim && !m.read_only,
                _ => true,
            };
            (!ok).then(|| {
                format!(
                    "{field} = {path} must come from a {want} mount, not {:?}",
                    m.source
                )
            })
        }
    }
}

fn check_listens(c: &Value, listens: &[(String, String)], what: &str, p: &mut Problems) {
    for (field, addr) in listens {
        if !listens_everywhere(addr) {
            p.push(format!(
                "{what}: {field} = {addr} must listen on 0.0.0.0 to be reachable in a pod"
            ));
        }
        match port_of(addr) {
            Some(n) if container_port(c, &PortRef::Num(n)).is_some() => {}
            _ => p.push(format!("{what}: {field} = {addr} is no containerPort")),
        }
    }
    // Probes on the metrics port must ask the one path it serves.
    if let Some((_, m)) = listens.iter().find(|(f, _)| f == "metrics.listen") {
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            let Some(r) = at(c, &[probe, "httpGet", "port"]).and_then(port_ref) else {
                continue;
            };
            if container_port(c, &r) == port_of(m) {
                let path = st(c, &[probe, "httpGet", "path"]).unwrap_or("/");
                if !path.starts_with("/metrics") {
                    p.push(format!("{what}: {probe} asks {path} on the metrics port, which serves only /metrics"));
                }
            }
        }
    }
}

fn check_nats_url(
    k: &K8s,
    url: &str,
    replicas: usize,
    nats: &BTreeMap<String, (u64, NatsConf)>,
    what: &str,
    p: &mut Problems,
) {
    let urls = nats_urls(url);
    if urls.is_empty() {
        p.push(format!("{what}: bus.nats.url {url} names no server"));
    }
    for (host, port) in urls {
        match k.resolve(&host, port) {
            Err(e) => p.push(format!("{what}: bus.nats.url: {e}")),
            Ok(targets) => {
                for (w, cport) in targets {
                    match nats.get(&w.name) {
                        None => p.push(format!(
                            "{what}: bus.nats.url {host}:{port} reaches {}, which runs no NATS",
                            w.name
                        )),
                        Some((n, conf)) => {
                            if conf.client_port != Some(cport) {
                                p.push(format!("{what}: bus.nats.url {host}:{port} reaches port {cport}, not NATS's client port {:?}", conf.client_port));
                            }
                            if replicas as u64 != *n {
                                p.push(format!("{what}: bus.nats.replicas = {replicas}, but NATS {} has {n} servers", w.name));
                            }
                        }
                    }
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn check_k8s_controlplane(
    k: &K8s,
    w: &Workload,
    c: &Value,
    pod: &str,
    text: &str,
    what: &str,
    nats: &BTreeMap<String, (u64, NatsConf)>,
    p: &mut Problems,
) {
    let cfg = match ControlPlaneConfig::parse(text, what) {
        Ok(c) => c,
        Err(e) => {
            p.push(format!(
                "{what}: the real parser rejects the rendered config: {e}"
            ));
            return;
        }
    };
    let listens = custos_listens("controlplane", text, what).unwrap_or_default();
    check_listens(c, &listens, what, p);
    // Raft: node id = ordinal + 1, the first members are exactly this StatefulSet's pods.
    let ordinal: u64 = pod
        .rsplit('-')
        .next()
        .and_then(|o| o.parse().ok())
        .unwrap_or(u64::MAX);
    if w.kind != "StatefulSet" {
        p.push(format!(
            "{what}: a control plane keeps state: run it as a StatefulSet"
        ));
    }
    if cfg.node.id != ordinal.wrapping_add(1) {
        p.push(format!(
            "{what}: node.id = {}, want ordinal + 1 = {}",
            cfg.node.id,
            ordinal.wrapping_add(1)
        ));
    }
    let grpc = port_of(&cfg.node.listen);
    let members = cfg.initial_members();
    let want_ids: BTreeSet<u64> = (1..=w.replicas).collect();
    if members.keys().copied().collect::<BTreeSet<_>>() != want_ids {
        p.push(format!(
            "{what}: cluster.initial_members ids {:?}, want 1 … {}",
            members.keys().collect::<Vec<_>>(),
            w.replicas
        ));
    }
    for (id, addr) in &members {
        let want_pod = format!("{}-{}", w.name, id - 1);
        let (host, port) = (host_of(addr), port_of(addr).unwrap_or(0));
        match k.resolve(host, port) {
            Err(e) => p.push(format!(
                "{what}: cluster.initial_members {id} = {addr}: {e}"
            )),
            Ok(t) => {
                let ok = host.split('.').next() == Some(want_pod.as_str())
                    && t.iter()
                        .all(|(tw, cport)| tw.name == w.name && Some(*cport) == grpc);
                if !ok {
                    p.push(format!(
                        "{what}: cluster.initial_members {id} = {addr} must be pod {want_pod} under {:?} on the gRPC port {grpc:?}",
                        w.service_name
                    ));
                }
            }
        }
    }
    match (&cfg.node.advertise, members.get(&cfg.node.id)) {
        (Some(a), Some(m)) if a == m => {}
        (a, m) => p.push(format!(
            "{what}: node.advertise {a:?} must equal its own initial member {m:?}"
        )),
    }
    // Files: data on the pod's own volume, secrets from a Secret.
    let mut files = vec![("node.data_dir", cfg.node.data_dir.clone(), "claim")];
    files.extend(
        controlplane_files(&cfg)
            .into_iter()
            .map(|(f, path)| (f, path, "secret")),
    );
    for (field, path, want) in files {
        if let Some(e) = wrong_source(k, w, c, field, &path, want) {
            p.push(format!("{what}: {e}"));
        }
    }
    if cfg.bus.kind != custos_controlplane::config::BusKind::Nats {
        p.push(format!("{what}: bus.kind must be nats in production"));
    }
    check_nats_url(k, &cfg.bus.nats.url, cfg.bus.nats.replicas, nats, what, p);
}

#[allow(clippy::too_many_arguments)]
fn check_k8s_edge(
    k: &K8s,
    w: &Workload,
    c: &Value,
    text: &str,
    what: &str,
    nats: &BTreeMap<String, (u64, NatsConf)>,
    runs: &[(&Workload, &Value, CustosRun)],
    p: &mut Problems,
) {
    let cfg = match edge_parse(text, what) {
        Ok(c) => c,
        Err(e) => {
            p.push(format!(
                "{what}: the real parser rejects the rendered config: {e}"
            ));
            return;
        }
    };
    let listens = custos_listens("edge", text, what).unwrap_or_default();
    check_listens(c, &listens, what, p);
    if cfg.postgres.allow_insecure_password {
        p.push(format!(
            "{what}: postgres.allow_insecure_password is for local development only"
        ));
    }
    for (field, path) in edge_files(&cfg) {
        if let Some(e) = wrong_source(k, w, c, field, &path, "secret") {
            p.push(format!("{what}: {e}"));
        }
    }
    // Control-plane servers reach a control-plane container's gRPC port.
    for s in &cfg.controlplane.servers {
        let (host, port) = (host_of(s), port_of(s).unwrap_or(0));
        match k.resolve(host, port) {
            Err(e) => p.push(format!("{what}: controlplane.servers {s}: {e}")),
            Ok(targets) => {
                for (tw, cport) in targets {
                    let grpc = runs
                        .iter()
                        .find(|(rw, _, r)| rw.name == tw.name && r.role == "controlplane")
                        .and_then(|(_, _, r)| r.configs.first())
                        .and_then(|(_, t)| ControlPlaneConfig::parse(t, "cp").ok())
                        .and_then(|c| port_of(&c.node.listen));
                    if grpc != Some(cport) {
                        p.push(format!("{what}: controlplane.servers {s} reaches {} port {cport}, not a control plane's gRPC port", tw.name));
                    }
                }
            }
        }
    }
    check_nats_url(k, &cfg.bus.nats.url, cfg.bus.nats.replicas, nats, what, p);
}

fn nats_container(k: &K8s, w: &Workload, c: &Value, p: &mut Problems) -> Option<NatsConf> {
    let argv = container_argv(c);
    if !argv.first().is_some_and(|a| a.ends_with("nats-server")) {
        return None;
    }
    let what = format!("{} {}", w.kind, w.name);
    let path = flag_value(&argv, "--config").or_else(|| flag_value(&argv, "-c"))?;
    let text = match config_map_text(k, w, c, &path) {
        Ok(t) => t,
        Err(e) => {
            p.push(format!("{what}: {e}"));
            return None;
        }
    };
    let conf = parse_nats_conf(&text);
    let pods = w.pod_names();
    nats_check(
        &format!("{what} {path}"),
        &text,
        &[("POD_NAME", &pods[0])],
        p,
    );
    if !conf.jetstream {
        p.push(format!("{what}: JetStream is not enabled in {path}"));
    }
    for (field, port) in [
        ("listen", conf.client_port),
        ("cluster.listen", conf.cluster_port),
        ("http", conf.http_port),
    ] {
        match port {
            Some(n) if container_port(c, &PortRef::Num(n)).is_some() => {}
            _ => p.push(format!(
                "{what}: {path} {field} port {port:?} is no containerPort"
            )),
        }
    }
    if let Some(dir) = &conf.store_dir {
        match k.source_of(w, c, dir) {
            Ok(m) if m.source == Source::Claim && !m.read_only => {}
            Ok(m) => p.push(format!(
                "{what}: JetStream store_dir {dir} is on {:?}, not the pod's own volume",
                m.source
            )),
            Err(e) => p.push(format!("{what}: JetStream store_dir: {e}")),
        }
    }
    if let Some(pid) = &conf.pid_file {
        if k.source_of(w, c, pid).is_err() {
            p.push(format!("{what}: pid_file {pid} lies under no volumeMount"));
        }
        let pre = strings(at(c, &["lifecycle", "preStop", "exec", "command"])).join(" ");
        if !pre.is_empty() && !pre.contains(pid.as_str()) {
            p.push(format!(
                "{what}: preStop `{pre}` does not signal the pid_file {pid}"
            ));
        }
    }
    // Routes: every pod of this StatefulSet under its headless Service, on the cluster port.
    if w.replicas > 1 {
        let want: BTreeSet<String> = pods
            .iter()
            .map(|pod| format!("{pod}.{}", w.service_name.clone().unwrap_or_default()))
            .collect();
        let mut have = BTreeSet::new();
        for r in &conf.routes {
            let hp = r.split_once("://").map(|(_, h)| h).unwrap_or(r);
            let (host, port) = (host_of(hp), port_of(hp).unwrap_or(0));
            match k.resolve(host, port) {
                Ok(t)
                    if t.iter()
                        .all(|(tw, cp)| tw.name == w.name && Some(*cp) == conf.cluster_port) => {}
                Ok(_) => p.push(format!(
                    "{what}: route {r} does not reach this cluster's route port"
                )),
                Err(e) => p.push(format!("{what}: route {r}: {e}")),
            }
            have.insert(host.to_string());
        }
        if have != want {
            p.push(format!("{what}: routes {have:?}, want every pod {want:?}"));
        }
    }
    Some(conf)
}

// ---------------------------------------------------------------------------------------------
// docker compose.

const COMPOSE_DIR: &str = "deploy/compose";
const COMPOSE_FILE: &str = "deploy/compose/docker-compose.yml";

struct ComposeMount {
    /// A repository-relative host path (bind mount) or a named volume.
    host: Option<String>,
    volume: Option<String>,
    target: String,
    read_only: bool,
}

fn compose_mounts(svc: &Value) -> Vec<ComposeMount> {
    seq(svc, &["volumes"])
        .iter()
        .filter_map(|v| {
            let (src, target, ro) = match v {
                Value::String(s) => {
                    let parts: Vec<&str> = s.split(':').collect();
                    match parts.as_slice() {
                        [src, dst] => (src.to_string(), dst.to_string(), false),
                        [src, dst, mode] => (
                            src.to_string(),
                            dst.to_string(),
                            mode.split(',').any(|m| m == "ro"),
                        ),
                        _ => return None,
                    }
                }
                m => (
                    st(m, &["source"])?.to_string(),
                    st(m, &["target"])?.to_string(),
                    at(m, &["read_only"])
                        .and_then(Value::as_bool)
                        .unwrap_or(false),
                ),
            };
            let bind = src.starts_with('.') || src.starts_with('/');
            Some(ComposeMount {
                host: bind.then(|| join_rel(COMPOSE_DIR, &src)),
                volume: (!bind).then_some(src),
                target,
                read_only: ro,
            })
        })
        .collect()
}

fn compose_mount_of<'m>(
    mounts: &'m [ComposeMount],
    path: &str,
) -> Option<(&'m ComposeMount, String)> {
    mounts
        .iter()
        .filter(|m| under(path, &m.target))
        .max_by_key(|m| m.target.len())
        .map(|m| {
            (
                m,
                path[m.target.len()..].trim_start_matches('/').to_string(),
            )
        })
}

fn container_side_port(spec: &Value) -> Option<u64> {
    match spec {
        Value::Mapping(_) => at(spec, &["target"]).and_then(Value::as_u64),
        other => scalar(other)?
            .rsplit(':')
            .next()?
            .split('/')
            .next()?
            .parse()
            .ok(),
    }
}

/// A compose service's custos command lines (command with the image's entrypoint, an `sh -c`
/// script, and healthchecks).
fn compose_invocations(svc: &Value) -> Vec<Vec<String>> {
    let entry = strings(at(svc, &["entrypoint"]));
    let cmd = strings(at(svc, &["command"]));
    let mut out = Vec::new();
    if entry.is_empty() {
        let mut argv = vec!["/usr/local/bin/custos".to_string()];
        argv.extend(cmd);
        out.push(argv);
    } else if entry.last().is_some_and(|e| e == "-c") {
        out.extend(custos_invocations(&shell_tokens(&cmd.join(" "))));
    } else {
        let mut argv = entry;
        argv.extend(cmd);
        out.extend(custos_invocations(&argv));
    }
    let test = strings(at(svc, &["healthcheck", "test"]));
    match test.first().map(String::as_str) {
        Some("CMD") => out.extend(custos_invocations(&test[1..])),
        Some("CMD-SHELL") => out.extend(custos_invocations(&shell_tokens(&test[1..].join(" ")))),
        _ => {}
    }
    out
}

struct ComposeCustos {
    role: String,
    text: String,
    listens: Vec<(String, String)>,
}

fn check_compose(t: &Tree, custos_image: &str) -> Problems {
    let mut p = Problems::new();
    let mut docs = Vec::new();
    for f in t.files(COMPOSE_DIR, &[".yaml", ".yml"]) {
        docs.extend(yaml_docs(&f, &t.read(&f).unwrap_or_default(), &mut p));
    }
    let Some(text) = t.read(COMPOSE_FILE) else {
        p.push(format!("{COMPOSE_FILE} is missing"));
        return p;
    };
    let mut d = yaml_docs(COMPOSE_FILE, &text, &mut p);
    let Some(doc) = d.pop() else { return p };
    let Some(services) = at(&doc, &["services"]).and_then(Value::as_mapping) else {
        p.push(format!("{COMPOSE_FILE}: no services"));
        return p;
    };
    let volumes: BTreeSet<String> = at(&doc, &["volumes"])
        .and_then(Value::as_mapping)
        .map(|m| m.keys().filter_map(scalar).collect())
        .unwrap_or_default();

    let mut custos: BTreeMap<String, ComposeCustos> = BTreeMap::new();
    let mut nats: BTreeMap<String, NatsConf> = BTreeMap::new();
    for (name, svc) in services {
        let name = scalar(name).unwrap_or_default();
        let what = format!("{COMPOSE_FILE} service {name}");
        let image = st(svc, &["image"]);
        if image.is_none() && at(svc, &["build"]).is_none() {
            p.push(format!("{what}: neither image nor build"));
        }
        if let Some(b) = at(svc, &["build"]) {
            let ctx = join_rel(COMPOSE_DIR, st(b, &["context"]).unwrap_or("."));
            let df = join_rel(&ctx, st(b, &["dockerfile"]).unwrap_or("Dockerfile"));
            if !t.is_dir(&ctx) && !ctx.is_empty() {
                p.push(format!("{what}: build context {ctx} does not exist"));
            }
            if !t.is_file(&df) {
                p.push(format!("{what}: Dockerfile {df} does not exist"));
            }
        }
        // depends_on names services, with conditions the target can meet.
        let deps: Vec<(String, Option<String>)> = match at(svc, &["depends_on"]) {
            Some(Value::Sequence(s)) => s.iter().filter_map(scalar).map(|n| (n, None)).collect(),
            Some(Value::Mapping(m)) => m
                .iter()
                .filter_map(|(k, v)| Some((scalar(k)?, st(v, &["condition"]).map(str::to_string))))
                .collect(),
            _ => Vec::new(),
        };
        for (dep, cond) in deps {
            let Some(target) = services.get(dep.as_str()) else {
                p.push(format!("{what}: depends_on {dep}, which is no service"));
                continue;
            };
            match cond.as_deref() {
                None | Some("service_started") | Some("service_completed_successfully") => {}
                Some("service_healthy") if at(target, &["healthcheck"]).is_some() => {}
                Some("service_healthy") => p.push(format!(
                    "{what}: waits for {dep} to be healthy, but {dep} has no healthcheck"
                )),
                Some(c) => p.push(format!("{what}: depends_on {dep}: unknown condition {c}")),
            }
        }
        let mounts = compose_mounts(svc);
        for m in &mounts {
            if let Some(h) = &m.host {
                if !t.is_file(h) && !t.is_dir(h) {
                    p.push(format!(
                        "{what}: mounts {h}, which is not in the repository"
                    ));
                }
            }
            if let Some(v) = &m.volume {
                if !volumes.contains(v) {
                    p.push(format!("{what}: volume {v} is not declared under volumes:"));
                }
            }
        }
        // custos command lines parse; the config it runs loads.
        let is_custos = image == Some(custos_image) || at(svc, &["build"]).is_some();
        if image.is_some_and(|i| i.starts_with("custos") && i != custos_image) {
            p.push(format!(
                "{what}: image {image:?}, want {custos_image} (deploy/Dockerfile)"
            ));
        }
        if is_custos {
            for argv in compose_invocations(svc) {
                match custos_argv(&argv) {
                    Err(e) => p.push(format!("{what}: {e}")),
                    Ok((role, Some(config))) => {
                        let config = config.to_string_lossy().to_string();
                        let Some((m, rel)) = compose_mount_of(&mounts, &config) else {
                            p.push(format!("{what}: --config {config} is mounted from nowhere"));
                            continue;
                        };
                        let Some(host) = m.host.as_ref().map(|h| join_rel(h, &rel)) else {
                            p.push(format!(
                                "{what}: --config {config} must be a file from the repository"
                            ));
                            continue;
                        };
                        let Some(text) = t.read(&host) else {
                            p.push(format!("{what}: --config {config}: {host} does not exist"));
                            continue;
                        };
                        match custos_listens(&role, &text, &host) {
                            Ok(listens) => {
                                custos.insert(
                                    name.clone(),
                                    ComposeCustos {
                                        role,
                                        text,
                                        listens,
                                    },
                                );
                            }
                            Err(e) => {
                                p.push(format!("{what}: the real parser rejects {host}: {e}"))
                            }
                        }
                    }
                    Ok(_) => {}
                }
            }
        }
        // NATS: its config validates and has JetStream.
        let argv = strings(at(svc, &["command"]));
        if argv.first().is_some_and(|a| a.ends_with("nats-server")) {
            let path = flag_value(&argv, "--config").or_else(|| flag_value(&argv, "-c"));
            let host = path
                .as_deref()
                .and_then(|c| compose_mount_of(&mounts, c))
                .and_then(|(m, rel)| Some(join_rel(m.host.as_ref()?, &rel)));
            match host.as_deref().and_then(|h| Some((h, t.read(h)?))) {
                None => p.push(format!(
                    "{what}: nats-server --config {path:?} is not a file from the repository"
                )),
                Some((h, text)) => {
                    nats_check(&format!("{what} {h}"), &text, &[], &mut p);
                    let conf = parse_nats_conf(&text);
                    if !conf.jetstream {
                        p.push(format!("{what}: {h} does not enable JetStream"));
                    }
                    if let Some(dir) = &conf.store_dir {
                        if !compose_mount_of(&mounts, dir)
                            .is_some_and(|(m, _)| m.volume.is_some() && !m.read_only)
                        {
                            p.push(format!(
                                "{what}: JetStream store_dir {dir} is on no writable named volume"
                            ));
                        }
                    }
                    let hc = strings(at(svc, &["healthcheck", "test"])).join(" ");
                    if let Some(hp) = conf.http_port {
                        if !hc.is_empty() && !hc.contains(&format!(":{hp}/")) {
                            p.push(format!(
                                "{what}: the healthcheck does not ask the monitoring port {hp}"
                            ));
                        }
                    }
                    nats.insert(name.clone(), conf);
                }
            }
        }
    }

    // Ports, files and addresses of each custos service.
    for (name, cc) in &custos {
        let svc = &services[name.as_str()];
        let what = format!("{COMPOSE_FILE} service {name}");
        let mounts = compose_mounts(svc);
        let published: BTreeSet<u64> = seq(svc, &["ports"])
            .iter()
            .filter_map(container_side_port)
            .collect();
        let listening: BTreeSet<u64> = cc.listens.iter().filter_map(|(_, a)| port_of(a)).collect();
        for (field, addr) in &cc.listens {
            if !listens_everywhere(addr) {
                p.push(format!(
                    "{what}: {field} = {addr} must listen on 0.0.0.0 inside a container"
                ));
            }
        }
        if published != listening {
            p.push(format!("{what}: publishes container ports {published:?}, but its config listens on {listening:?}"));
        }
        // An address another container uses: <service>:<port it listens on>.
        let reach = |addr: &str, role: &str| -> Result<(), String> {
            let (host, port) = (host_of(addr), port_of(addr).unwrap_or(0));
            if role == "nats" {
                return match nats.get(host) {
                    Some(c) if c.client_port == Some(port) => Ok(()),
                    Some(c) => Err(format!(
                        "NATS service {host} listens on {:?}, not {port}",
                        c.client_port
                    )),
                    None => Err(format!("{host} is no NATS service")),
                };
            }
            match custos.get(host) {
                Some(t) if t.role == role => {
                    let grpc = ControlPlaneConfig::parse(&t.text, host)
                        .ok()
                        .and_then(|c| port_of(&c.node.listen));
                    if grpc == Some(port) {
                        Ok(())
                    } else {
                        Err(format!("{host} listens for gRPC on {grpc:?}, not {port}"))
                    }
                }
                _ => Err(format!("{host} is no {role} service")),
            }
        };
        let data_file_mount = |field: &str, path: &Path, writable: bool, p: &mut Problems| {
            let path = path.to_string_lossy();
            match compose_mount_of(&mounts, &path) {
                Some((m, _)) if m.volume.is_some() && (!writable || !m.read_only) => {}
                _ => p.push(format!(
                    "{what}: {field} = {path} must lie on a{} named volume",
                    if writable { " writable" } else { "" }
                )),
            }
        };
        if cc.role == "controlplane" {
            let c = ControlPlaneConfig::parse(&cc.text, name).unwrap();
            data_file_mount("node.data_dir", &c.node.data_dir, true, &mut p);
            for (field, path) in controlplane_files(&c) {
                data_file_mount(
                    field,
                    &path,
                    under(&path.to_string_lossy(), &c.node.data_dir.to_string_lossy()),
                    &mut p,
                );
            }
            for (id, addr) in c.initial_members() {
                if let Err(e) = reach(&addr, "controlplane") {
                    p.push(format!(
                        "{what}: cluster.initial_members {id} = {addr}: {e}"
                    ));
                }
            }
            if c.node
                .advertise
                .as_ref()
                .is_some_and(|a| host_of(a) != name)
            {
                p.push(format!(
                    "{what}: node.advertise {:?} must name this service",
                    c.node.advertise
                ));
            }
            for u in nats_urls(&c.bus.nats.url) {
                if let Err(e) = reach(&format!("{}:{}", u.0, u.1), "nats") {
                    p.push(format!("{what}: bus.nats.url: {e}"));
                }
            }
        } else {
            let c = edge_parse(&cc.text, name).unwrap();
            for s in &c.controlplane.servers {
                if let Err(e) = reach(s, "controlplane") {
                    p.push(format!("{what}: controlplane.servers {s}: {e}"));
                }
            }
            for u in nats_urls(&c.bus.nats.url) {
                if let Err(e) = reach(&format!("{}:{}", u.0, u.1), "nats") {
                    p.push(format!("{what}: bus.nats.url: {e}"));
                }
            }
            // Files the edge reads come from a volume another service writes them to.
            for (field, path) in edge_files(&c) {
                let path = path.to_string_lossy().to_string();
                let Some((m, rel)) = compose_mount_of(&mounts, &path) else {
                    p.push(format!("{what}: {field} = {path} lies on no mount"));
                    continue;
                };
                if let Some(h) = &m.host {
                    if !t.is_file(&join_rel(h, &rel)) {
                        p.push(format!(
                            "{what}: {field} = {path}: {} is not in the repository",
                            join_rel(h, &rel)
                        ));
                    }
                    continue;
                }
                let vol = m.volume.clone().unwrap_or_default();
                let writer = services.iter().any(|(other, osvc)| {
                    scalar(other).as_deref() != Some(name.as_str())
                        && compose_mounts(osvc).iter().any(|om| {
                            let there = format!("{}/{rel}", om.target.trim_end_matches('/'));
                            om.volume.as_deref() == Some(vol.as_str())
                                && !om.read_only
                                && strings(at(osvc, &["command"])).join(" ").contains(&there)
                        })
                });
                if !writer {
                    p.push(format!(
                        "{what}: {field} = {path} (volume {vol}): no other service writes it"
                    ));
                }
            }
        }
        // Admin commands (healthchecks, the edge-token job) use the control plane's admin token
        // and a server that is a control plane.
        for argv in compose_invocations(svc) {
            if let Some(server) = flag_value(&argv, "--server") {
                let hp = server.split_once("://").map(|(_, h)| h).unwrap_or(&server);
                let hp = if host_of(hp) == "127.0.0.1" {
                    format!("{name}:{}", port_of(hp).unwrap_or(0))
                } else {
                    hp.to_string()
                };
                if let Err(e) = reach(&hp, "controlplane") {
                    p.push(format!("{what}: --server {server}: {e}"));
                }
            }
        }
    }
    // The edge-token job (and any other custos admin command) uses a token file the control
    // plane writes.
    for (name, svc) in services {
        let name = scalar(name).unwrap_or_default();
        let mounts = compose_mounts(svc);
        for argv in compose_invocations(svc) {
            let Some(tf) = flag_value(&argv, "--token-file") else {
                continue;
            };
            let Some((m, rel)) = compose_mount_of(&mounts, &tf) else {
                p.push(format!(
                    "{COMPOSE_FILE} service {name}: --token-file {tf} lies on no mount"
                ));
                continue;
            };
            let provided = custos.iter().any(|(cn, cc)| {
                cc.role == "controlplane"
                    && ControlPlaneConfig::parse(&cc.text, cn).is_ok_and(|c| {
                        let admin = c.data_file(&c.node.admin_token_file, "admin.token");
                        let cm = compose_mounts(&services[cn.as_str()]);
                        compose_mount_of(&cm, &admin.to_string_lossy()).is_some_and(|(am, arel)| {
                            am.volume.is_some() && am.volume == m.volume && arel == rel
                        })
                    })
            });
            if !provided {
                p.push(format!("{COMPOSE_FILE} service {name}: --token-file {tf} is not the control plane's admin token"));
            }
        }
    }
    if !custos.values().any(|c| c.role == "controlplane")
        || !custos.values().any(|c| c.role == "edge")
    {
        p.push(format!("{COMPOSE_FILE}: runs no control plane or no edge"));
    }
    if nats.is_empty() {
        p.push(format!("{COMPOSE_FILE}: runs no NATS"));
    }
    p
}

// ---------------------------------------------------------------------------------------------
// systemd.

type Unit = BTreeMap<String, Vec<(String, String)>>;

fn parse_unit(text: &str) -> Result<Unit, String> {
    let mut unit = Unit::new();
    let mut section: Option<String> = None;
    let mut pending = String::new();
    for (i, raw) in text.lines().enumerate() {
        let line = format!("{pending}{}", raw.trim());
        if let Some(l) = line.strip_suffix('\\') {
            pending = format!("{l} ");
            continue;
        }
        pending.clear();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') && line.ends_with(']') {
            let s = line[1..line.len() - 1].to_string();
            unit.entry(s.clone()).or_default();
            section = Some(s);
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(format!(
                "line {}: {line:?} is neither [Section] nor Key=Value",
                i + 1
            ));
        };
        let Some(s) = &section else {
            return Err(format!("line {}: {k} comes before any [Section]", i + 1));
        };
        unit.get_mut(s)
            .unwrap()
            .push((k.trim().to_string(), v.trim().to_string()));
    }
    Ok(unit)
}

fn unit_values<'u>(u: &'u Unit, section: &str, key: &str) -> Vec<&'u str> {
    u.get(section)
        .map(|kv| {
            kv.iter()
                .filter(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
                .collect()
        })
        .unwrap_or_default()
}

fn check_systemd(t: &Tree) -> Problems {
    let mut p = Problems::new();
    let files = t.files("deploy/systemd", &[".service", ".conf"]);
    let units: Vec<&String> = files
        .iter()
        .filter(|f| f.ends_with(".service") || f.contains(".service.d/"))
        .collect();
    if !units.iter().any(|f| f.ends_with(".service")) {
        p.push("no units under deploy/systemd".into());
    }
    let examples = t.files("deploy/examples", &[".toml"]);
    let mut roles = BTreeSet::new();
    for f in units {
        let u = match parse_unit(&t.read(f).unwrap_or_default()) {
            Ok(u) => u,
            Err(e) => {
                p.push(format!("{f}: {e}"));
                continue;
            }
        };
        let drop_in = f.contains(".service.d/");
        if !drop_in {
            for (s, k) in [
                ("Unit", "Description"),
                ("Service", "ExecStart"),
                ("Install", "WantedBy"),
            ] {
                if unit_values(&u, s, k).is_empty() {
                    p.push(format!("{f}: no [{s}] {k}"));
                }
            }
        }
        let execs = unit_values(&u, "Service", "ExecStart");
        if drop_in && execs.first() != Some(&"") && !execs.is_empty() {
            p.push(format!(
                "{f}: a drop-in must reset ExecStart= before setting its own"
            ));
        }
        let Some(exec) = execs.iter().rev().find(|e| !e.is_empty()) else {
            continue;
        };
        let argv: Vec<String> = exec
            .trim_start_matches(['-', '@', '+', '!'])
            .split_whitespace()
            .map(str::to_string)
            .collect();
        if !argv[0].starts_with('/') {
            p.push(format!(
                "{f}: ExecStart must name an absolute path, not {}",
                argv[0]
            ));
        }
        if argv[0].ends_with("/custos") {
            let (role, config) = match custos_argv(&argv) {
                Ok(x) => x,
                Err(e) => {
                    p.push(format!("{f}: {e}"));
                    continue;
                }
            };
            let Some(config) = config else {
                p.push(format!("{f}: runs custos {role}, not controlplane or edge"));
                continue;
            };
            roles.insert(role.clone());
            let config = config.to_string_lossy().to_string();
            let Some(rel) = config.strip_prefix("/etc/custos/") else {
                p.push(format!(
                    "{f}: --config {config} must be installed under /etc/custos/"
                ));
                continue;
            };
            let file_name = rel.rsplit('/').next().unwrap_or(rel);
            let matching: Vec<&String> = examples
                .iter()
                .filter(|e| e.ends_with(&format!("/{file_name}")))
                .collect();
            let [example] = matching.as_slice() else {
                p.push(format!("{f}: --config {config} must correspond to one file named {file_name} under deploy/examples, found {matching:?}"));
                continue;
            };
            let text = t.read(example).unwrap_or_default();
            if let Err(e) = custos_listens(&role, &text, example) {
                p.push(format!("{f}: its example {example} does not load: {e}"));
            }
            // Every control-plane example keeps its data where this unit may write.
            if role == "controlplane" {
                let mut writable: BTreeSet<String> = unit_values(&u, "Service", "ReadWritePaths")
                    .iter()
                    .flat_map(|v| v.split_whitespace())
                    .map(|s| s.trim_start_matches('-').to_string())
                    .collect();
                writable.extend(
                    unit_values(&u, "Service", "StateDirectory")
                        .iter()
                        .flat_map(|v| v.split_whitespace())
                        .map(|d| format!("/var/lib/{d}")),
                );
                for ex in examples
                    .iter()
                    .filter(|e| !e.contains("/edge/") && !e.ends_with("masking.toml"))
                {
                    let Ok(c) = ControlPlaneConfig::parse(&t.read(ex).unwrap_or_default(), ex)
                    else {
                        continue;
                    };
                    let dd = c.node.data_dir.to_string_lossy().to_string();
                    if !writable.iter().any(|w| under(&dd, w)) {
                        p.push(format!("{f}: {ex} keeps data_dir {dd} outside the unit's writable paths {writable:?}"));
                    }
                }
            }
        } else if argv[0].ends_with("/nats-server") {
            let Some(conf) = flag_value(&argv, "-c").or_else(|| flag_value(&argv, "--config"))
            else {
                p.push(format!("{f}: nats-server without -c"));
                continue;
            };
            let name = conf.rsplit('/').next().unwrap_or(&conf);
            let local = format!("deploy/systemd/{name}");
            let Some(text) = t.read(&local) else {
                p.push(format!(
                    "{f}: runs nats-server -c {conf}, but {local} does not exist"
                ));
                continue;
            };
            nats_check(&local, &text, &[], &mut p);
            let nc = parse_nats_conf(&text);
            if !nc.jetstream {
                p.push(format!("{local}: JetStream is not enabled"));
            }
            let state: Vec<String> = unit_values(&u, "Service", "StateDirectory")
                .iter()
                .map(|d| format!("/var/lib/{d}"))
                .collect();
            if let Some(sd) = &nc.store_dir {
                if !state.iter().any(|s| under(sd, s)) {
                    p.push(format!(
                        "{local}: store_dir {sd} is not under the unit's StateDirectory {state:?}"
                    ));
                }
            }
            // The single-host examples reach this server.
            for ex in [
                "deploy/examples/controlplane.toml",
                "deploy/examples/edge/edge.toml",
            ] {
                let text = t.read(ex).unwrap_or_default();
                let url = ControlPlaneConfig::parse(&text, ex)
                    .map(|c| c.bus.nats.url)
                    .or_else(|_| edge_parse(&text, ex).map(|c| c.bus.nats.url))
                    .unwrap_or_default();
                if !nats_urls(&url)
                    .iter()
                    .any(|(_, port)| Some(*port) == nc.client_port)
                {
                    p.push(format!(
                        "{ex}: bus.nats.url {url} does not reach {local} (port {:?})",
                        nc.client_port
                    ));
                }
            }
        }
    }
    for role in ["controlplane", "edge"] {
        if !roles.contains(role) {
            p.push(format!("deploy/systemd has no unit running custos {role}"));
        }
    }
    p
}

// ---------------------------------------------------------------------------------------------
// The Dockerfile, and the image name everything runs.

/// `custos:<workspace version>`, the tag deploy/Dockerfile documents.
fn custos_image(t: &Tree) -> String {
    let cargo: toml::Value = toml::from_str(&t.read("Cargo.toml").unwrap()).unwrap();
    let version = cargo["workspace"]["package"]["version"]
        .as_str()
        .unwrap()
        .to_string();
    format!("custos:{version}")
}

fn check_dockerfile(t: &Tree, image: &str) -> Problems {
    let mut p = Problems::new();
    let Some(df) = t.read("deploy/Dockerfile") else {
        return vec!["deploy/Dockerfile is missing".into()];
    };
    let lines: Vec<&str> = df
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    let toolchain: toml::Value = toml::from_str(&t.read("rust-toolchain.toml").unwrap()).unwrap();
    let channel = toolchain["toolchain"]["channel"].as_str().unwrap();
    let minor = channel.split('.').take(2).collect::<Vec<_>>().join(".");
    if !lines
        .iter()
        .any(|l| l.starts_with(&format!("FROM rust:{minor}")))
    {
        p.push(format!(
            "deploy/Dockerfile: build FROM rust:{minor} (rust-toolchain.toml pins {channel})"
        ));
    }
    if !df.contains(&format!("-t {image}")) {
        p.push(format!(
            "deploy/Dockerfile: document the tag the manifests run, {image}"
        ));
    }
    if !df.contains("--bin custos") || !df.contains("/usr/local/bin/custos") {
        p.push("deploy/Dockerfile: must build --bin custos into /usr/local/bin/custos".into());
    }
    if !lines
        .iter()
        .any(|l| l.starts_with("ENTRYPOINT") && l.contains("\"/usr/local/bin/custos\""))
    {
        p.push("deploy/Dockerfile: ENTRYPOINT must be /usr/local/bin/custos (compose passes only the subcommand)".into());
    }
    // The user the image runs as is the one the pods run as.
    let user = lines
        .iter()
        .find_map(|l| l.strip_prefix("USER "))
        .map(|u| u.split(':').next().unwrap_or(u).trim().to_string());
    let mut docs_p = Problems::new();
    let docs = load_k8s(t, &mut docs_p);
    for (file, d) in &docs {
        let Some(spec) = at(d, &["spec", "template", "spec"]) else {
            continue;
        };
        let runs_custos = seq(spec, &["containers"])
            .iter()
            .any(|c| st(c, &["image"]) == Some(image));
        if runs_custos {
            let uid = at(spec, &["securityContext", "runAsUser"]).and_then(scalar);
            if uid != user {
                p.push(format!(
                    "{file}: {}: securityContext.runAsUser {uid:?} is not the image's USER {user:?}",
                    st(d, &["metadata", "name"]).unwrap_or("?")
                ));
            }
        }
    }
    // Directories the compose file mounts named volumes on exist in the image (so the volumes
    // start owned by the custos user).
    if let Some(doc) = t
        .read(COMPOSE_FILE)
        .and_then(|s| serde_norway::from_str::<Value>(&s).ok())
    {
        if let Some(services) = at(&doc, &["services"]).and_then(Value::as_mapping) {
            for (name, svc) in services {
                if st(svc, &["image"]) != Some(image) {
                    continue;
                }
                for m in compose_mounts(svc).iter().filter(|m| m.volume.is_some()) {
                    if !df.contains(&m.target) {
                        p.push(format!(
                            "deploy/Dockerfile: compose service {} mounts a volume on {}, which the image does not create for the custos user",
                            scalar(name).unwrap_or_default(),
                            m.target
                        ));
                    }
                }
            }
        }
    }
    p
}

fn all(t: &Tree) -> Problems {
    let image = custos_image(t);
    let mut p = check_k8s(t, &image);
    p.extend(check_compose(t, &image));
    p.extend(check_systemd(t));
    p.extend(check_dockerfile(t, &image));
    p
}

fn assert_clean(p: Problems) {
    assert!(p.is_empty(), "{} problems:\n  {}", p.len(), p.join("\n  "));
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[test]
fn kubernetes_manifests_are_consistent() {
    let t = Tree::real();
    assert_clean(check_k8s(&t, &custos_image(&t)));
}

#[test]
fn compose_file_is_consistent() {
    let t = Tree::real();
    assert_clean(check_compose(&t, &custos_image(&t)));
}

#[test]
fn systemd_units_run_real_commands_and_example_configs() {
    assert_clean(check_systemd(&Tree::real()));
}

#[test]
fn dockerfile_matches_the_manifests() {
    let t = Tree::real();
    assert_clean(check_dockerfile(&t, &custos_image(&t)));
}

#[test]
fn the_control_plane_pods_render_distinct_raft_identities() {
    // What the rendered configs must say, spelled out for the three pods.
    let t = Tree::real();
    let mut p = Problems::new();
    let docs = load_k8s(&t, &mut p);
    let k = K8s::new(&docs, &mut p);
    let w = k
        .workload("custos-controlplane")
        .expect("StatefulSet custos-controlplane");
    let c = &w.containers()[0];
    let run = custos_container(&k, w, c, &custos_image(&t), &mut p).expect("runs custos");
    assert_clean(p);
    assert_eq!(run.configs.len(), 3);
    for (i, (pod, text)) in run.configs.iter().enumerate() {
        let cfg = ControlPlaneConfig::parse(text, pod).unwrap();
        assert_eq!(cfg.node.id, i as u64 + 1, "{pod}");
        assert_eq!(
            cfg.node.advertise.as_deref(),
            Some(format!("custos-controlplane-{i}.custos-controlplane-headless:7400").as_str())
        );
        assert_eq!(cfg.initial_members().len(), 3);
        assert_eq!(cfg.bus.nats.replicas, 3);
    }
}

/// Break the manifests on purpose, one thing at a time: each break must be reported, naming
/// what is wrong.
#[test]
fn a_broken_manifest_is_caught() {
    let t = Tree::real();
    let cases: &[(&str, &str, &str, &str)] = &[
        // (file, text, broken text, a word the problem names)
        ("deploy/k8s/edge.yaml", "targetPort: postgres", "targetPort: postgress", "postgress"),
        ("deploy/k8s/controlplane.yaml", "serviceName: custos-controlplane-headless", "serviceName: custos-cp-headless", "custos-cp-headless"),
        ("deploy/k8s/controlplane.yaml", "listen = \"0.0.0.0:7400\"", "listen = \"0.0.0.0:7401\"", "7401"),
        ("deploy/k8s/controlplane.yaml", "2 = \"custos-controlplane-1.custos-controlplane-headless:7400\"", "2 = \"custos-controlplane-5.custos-controlplane-headless:7400\"", "custos-controlplane-5"),
        ("deploy/k8s/controlplane.yaml", "3 = \"custos-controlplane-2.custos-controlplane-headless:7400\"", "3 = \"custos-controlplane-2.custos-controlplane-headless:7402\"", "7402"),
        ("deploy/k8s/controlplane.yaml", "  publishNotReadyAddresses: true\n", "", "publishNotReadyAddresses"),
        ("deploy/k8s/controlplane.yaml", "            name: custos-controlplane-config", "            name: custos-controlplane-cfg", "custos-controlplane-cfg"),
        ("deploy/k8s/controlplane.yaml", "admin_token_file = \"/etc/custos/secrets/admin.token\"", "admin_token_file = \"/etc/custos/secrets/admin-token\"", "admin-token"),
        ("deploy/k8s/controlplane.yaml", "data_dir = \"/var/lib/custos\"", "data_dir = \"/run/custos/data\"", "data_dir"),
        ("deploy/k8s/controlplane.yaml", "              path: /metrics\n              port: metrics\n            periodSeconds: 10", "              path: /healthz\n              port: metrics\n            periodSeconds: 10", "/healthz"),
        ("deploy/k8s/controlplane.yaml", "exec /usr/local/bin/custos controlplane --config", "exec /usr/local/bin/custos control-plane --config", "control-plane"),
        ("deploy/k8s/edge.yaml", "key: masking.key", "key: masking-key", "masking-key"),
        ("deploy/k8s/edge.yaml", "token_file = \"/etc/custos/secrets/edge.token\"", "token_file = \"/etc/custos/edge.token\"", "edge.token"),
        ("deploy/k8s/edge.yaml", "servers = [\"custos-controlplane:7400\"]", "servers = [\"custos-controlplane:7401\"]", "7401"),
        ("deploy/k8s/edge.yaml", "  minAvailable: 1", "  minAvailable: 2", "minAvailable"),
        ("deploy/k8s/edge.yaml", "listen = \"0.0.0.0:9401\"", "listen = \"0.0.0.0:9402\"", "9402"),
        ("deploy/k8s/edge.yaml", "prometheus.io/port: \"9401\"", "prometheus.io/port: \"9411\"", "9411"),
        ("deploy/k8s/secrets.yaml", "  admin.token: REPLACE_ME_ADMIN_TOKEN", "  admin_token: REPLACE_ME_ADMIN_TOKEN", "admin.token"),
        ("deploy/k8s/secrets.yaml", "edge.token: REPLACE_ME_EDGE_TOKEN", "edge.token: c2VjcmV0", "REPLACE_ME"),
        ("deploy/k8s/render-config.yaml", "s/@NODE_ID@/$node_id/g", "s/@NODE_ID@/$ordinal/g", "node.id"),
        ("deploy/k8s/nats.yaml", "nats://custos-nats-2.custos-nats-headless:6222", "nats://custos-nats-3.custos-nats-headless:6222", "custos-nats-3"),
        ("deploy/k8s/nats.yaml", "  replicas: 3\n  podManagementPolicy", "  replicas: 5\n  podManagementPolicy", "replicas"),
        ("deploy/k8s/nats.yaml", "policy/v1", "policy/v1beta1", "policy/v1beta1"),
        ("deploy/compose/docker-compose.yml", "      edge-token:\n        condition", "      edge-tokens:\n        condition", "edge-tokens"),
        ("deploy/compose/docker-compose.yml", "./nats.conf:/etc/nats/nats.conf:ro", "./nats-server.conf:/etc/nats/nats.conf:ro", "nats-server.conf"),
        ("deploy/compose/docker-compose.yml", "--role edge --ttl", "--roles edge --ttl", "--roles"),
        ("deploy/compose/docker-compose.yml", "\"127.0.0.1:9401:9401\"", "\"127.0.0.1:9401:9411\"", "9411"),
        ("deploy/compose/edge.toml", "listen = \"0.0.0.0:15432\"", "listen = \"0.0.0.0:15433\"", "15433"),
        ("deploy/compose/edge.toml", "url = \"nats://nats:4222\"", "url = \"nats://natsd:4222\"", "natsd"),
        ("deploy/compose/edge.toml", "token_file = \"/run/custos/edge.token\"", "token_file = \"/run/custos/edge-token\"", "edge-token"),
        ("deploy/compose/controlplane.toml", "1 = \"controlplane:7400\"", "1 = \"controlplane:7000\"", "7000"),
        ("deploy/systemd/custos-edge.service", "custos edge --config", "custos edges --config", "edges"),
        ("deploy/systemd/custos-edge.service", "--config /etc/custos/edge.toml", "--config /etc/custos/edge-prod.toml", "edge-prod.toml"),
        ("deploy/examples/controlplane.toml", "data_dir = \"/var/lib/custos/node1\"", "data_dir = \"/srv/custos/node1\"", "writable"),
        ("deploy/systemd/nats-server.service.d/jetstream.conf", "-c /etc/nats/nats-custos.conf", "-c /etc/nats/nats.conf", "nats.conf"),
        ("deploy/Dockerfile", "USER 10001:10001", "USER 10002:10002", "runAsUser"),
        ("deploy/Dockerfile", "FROM rust:1.95", "FROM rust:1.94", "rust-toolchain.toml"),
    ];
    let mut cases = cases.to_vec();
    if nats_server_bin().is_some() {
        // nats-server -t itself rejects a misspelt setting.
        cases.push((
            "deploy/compose/nats.conf",
            "max_file_store: 10GB",
            "max_file_stor: 10GB",
            "max_file_stor",
        ));
    }
    let mut missed = Vec::new();
    for (file, from, to, word) in cases {
        let p = all(&t.with(file, from, to));
        if !p.iter().any(|m| m.contains(word)) {
            missed.push(format!(
                "{file}: {from:?} -> {to:?} was not reported with {word:?}; got {p:#?}"
            ));
        }
    }
    assert!(missed.is_empty(), "{}", missed.join("\n"));
}
