//! The `custos` command line: parses arguments and calls into the libraries.
//!
//! `main.rs` only installs the crypto provider and tracing ([`telemetry`]) and calls [`run`].
#![forbid(unsafe_code)]

mod approvals_cmd;
mod client;
mod dev;
mod edge_cmd;
pub mod local_cluster;
mod mask_cmd;
mod render;
pub mod replay;
pub mod telemetry;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

pub use client::Client;

#[derive(Parser, Debug)]
#[command(
    name = "custos",
    version,
    about = "An access gateway between AI agents (and people) and production systems."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Control-plane gRPC address (any node of the cluster).
    #[arg(
        long,
        global = true,
        env = "CUSTOS_SERVER",
        default_value = "http://127.0.0.1:7400"
    )]
    pub server: String,
    /// Bearer token (admin token for administration).
    #[arg(long, global = true, env = "CUSTOS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Read the token from this file instead (e.g. .custos-dev/admin.token).
    #[arg(long, global = true, env = "CUSTOS_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// CA bundle to verify the control plane's TLS certificate (enables TLS).
    #[arg(long, global = true, env = "CUSTOS_CA")]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, global = true, env = "CUSTOS_CERT", requires = "key")]
    pub cert: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    #[arg(long, global = true, env = "CUSTOS_KEY", requires = "cert")]
    pub key: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a one-node control plane with an in-process event bus (no NATS, no cluster).
    Dev(dev::DevArgs),
    /// Mask secrets and personal data in a file or stdin with the same engine the edges use.
    Mask(mask_cmd::MaskArgs),
    /// Run one control-plane node.
    Controlplane {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run an edge: the data-path listeners (Postgres on 15432), following the control plane.
    Edge {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Start the production topology on this machine: a 3-node NATS JetStream cluster, 3
    /// control-plane nodes and 2 edges, as real processes on loopback ports, in one folder.
    LocalCluster(local_cluster::LocalClusterArgs),
    /// Print a session's transcript: statements, verdicts, approvals, result excerpts, errors.
    Replay {
        session: String,
        /// One JSON document (an array of entries) for tools.
        #[arg(long)]
        json: bool,
    },
    /// Policies: validate, apply, get.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Connections to target systems.
    #[command(subcommand)]
    Connection(ConnectionCmd),
    /// custos-issued tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// The canonical audit log.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// The Raft cluster.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Just-in-time approvals: watch, list, approve and deny held commands.
    #[command(subcommand)]
    Approvals(approvals_cmd::ApprovalsCmd),
    /// Grants created by approvals: list and revoke.
    #[command(subcommand)]
    Grants(approvals_cmd::GrantsCmd),
}

#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    /// Check a .cedar file against the schema (locally, no server needed).
    Validate { file: PathBuf },
    /// Validate and apply a .cedar file as the new policy version.
    Apply {
        file: PathBuf,
        #[arg(long, short, default_value = "")]
        message: String,
        /// Fail unless the current version is this one.
        #[arg(long, default_value_t = 0)]
        expect_version: u64,
    },
    /// Print a policy version (default: the current one).
    Get {
        #[arg(long, default_value_t = 0)]
        version: u64,
    },
}

#[derive(Subcommand, Debug)]
pub enum ConnectionCmd {
    /// Create or update a connection.
    Put {
        name: String,
        #[arg(long)]
        kind: String,
        #[arg(long)]
        address: String,
        /// Option KEY=VALUE (repeatable), e.g. database=app, audit_mode=strict.
        #[arg(long = "option", short = 'o')]
        options: Vec<String>,
        /// Credential KEY=VALUE (repeatable), e.g. username=app password=…; `KEY=@file` reads a file,
        /// `KEY=env:VAR` reads an environment variable.
        #[arg(long = "secret", short = 's')]
        secrets: Vec<String>,
    },
    Get {
        name: String,
    },
    List,
    Delete {
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Issue a token; it is printed once and only its hash is stored.
    Issue {
        /// The identity the token authenticates as.
        subject: String,
        #[arg(long = "group", short = 'g')]
        groups: Vec<String>,
        /// Lifetime, e.g. 1h, 30m, 7d.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Role: admin, edge or approver (repeatable).
        #[arg(long = "role")]
        roles: Vec<String>,
    },
    Revoke {
        token_id: String,
    },
}

#[derive(Args, Debug, Clone, Default)]
pub struct Filter {
    #[arg(long)]
    pub identity: Option<String>,
    #[arg(long)]
    pub connection: Option<String>,
    #[arg(long)]
    pub session: Option<String>,
    /// Event kind, e.g. command_received, session_started.
    #[arg(long)]
    pub kind: Option<String>,
    /// allow, deny, pending_approval, approved.
    #[arg(long)]
    pub verdict: Option<String>,
    /// Events since: a duration ago (e.g. 1h) or an RFC 3339 time.
    #[arg(long)]
    pub since: Option<String>,
    #[arg(long)]
    pub until: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum AuditCmd {
    /// Print the latest records; --follow keeps printing as they commit.
    Tail {
        #[arg(long, short = 'n', default_value_t = 20)]
        last: u32,
        #[arg(long, short)]
        follow: bool,
        /// Print OCSF JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Find records by identity, connection, session, kind, verdict and time.
    Search {
        #[command(flatten)]
        filter: Filter,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Check the hash chain of the node at --server (exit 1 and the first bad seq on failure).
    Verify,
}

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    Status,
    /// Add a node (started with no initial_members) as a voter.
    Add {
        #[arg(long)]
        id: u64,
        #[arg(long)]
        addr: String,
        #[arg(long)]
        learner: bool,
    },
    Remove {
        #[arg(long)]
        id: u64,
    },
}

/// Parse `KEY=VALUE` pairs.
fn pairs(items: &[String], what: &str) -> Result<Vec<(String, String)>> {
    items
        .iter()
        .map(|s| {
            let (k, v) = s
                .split_once('=')
                .with_context(|| format!("{what} {s:?} must be KEY=VALUE"))?;
            Ok((k.to_string(), v.to_string()))
        })
        .collect()
}

fn secret_value(v: &str) -> Result<String> {
    if let Some(path) = v.strip_prefix('@') {
        return Ok(std::fs::read_to_string(path)
            .with_context(|| format!("cannot read secret file {path}"))?
            .trim_end()
            .to_string());
    }
    if let Some(var) = v.strip_prefix("env:") {
        return std::env::var(var)
            .with_context(|| format!("environment variable {var} is not set"));
    }
    Ok(v.to_string())
}

/// Parse `1h`, `30m` … or an RFC 3339 time into nanoseconds since the epoch.
pub fn parse_time(s: &str) -> Result<i64> {
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(custos_core::events::now_unix_nano() - d.as_nanos() as i64);
    }
    let t = chrono::DateTime::parse_from_rfc3339(s).with_context(|| {
        format!("time {s:?} is neither a duration (1h, 30m) nor RFC 3339 (2026-11-26T18:00:00Z)")
    })?;
    Ok(t.timestamp_nanos_opt().unwrap_or(0))
}

/// Run a parsed command line.
pub async fn run(cli: Cli) -> Result<i32> {
    let g = cli.global.clone();
    match cli.command {
        Command::Dev(args) => dev::run(args).await.map(|_| 0),
        Command::Mask(args) => mask_cmd::run(args),
        Command::Edge { config } => edge_cmd::run(&config).await.map(|_| 0),
        Command::LocalCluster(args) => local_cluster::run(args).await.map(|_| 0),
        Command::Replay { session, json } => {
            let mut c = Client::connect(&g).await?;
            let events = replay::records(&mut c, &session).await?;
            let entries = replay::transcript(&events);
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else {
                print!("{}", replay::text(&entries));
            }
            Ok(0)
        }
        Command::Controlplane { config } => {
            let cfg = custos_controlplane::ControlPlaneConfig::load(&config)?;
            dev::run_node(cfg).await.map(|_| 0)
        }
        Command::Policy(PolicyCmd::Validate { file }) => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            match custos_core::policy::validate(&text) {
                Ok(v) => match custos_core::authz::check_annotations(&v.set) {
                    Ok(()) => {
                        println!("{}: ok, {} policies", file.display(), v.count);
                        Ok(0)
                    }
                    Err(errors) => {
                        for e in errors {
                            eprintln!("{}: {e}", file.display());
                        }
                        Ok(1)
                    }
                },
                Err(e) => {
                    for p in &e.problems {
                        eprintln!("{}:{}:{}: {}", file.display(), p.line, p.column, p.message);
                    }
                    Ok(1)
                }
            }
        }
        Command::Policy(cmd) => {
            let mut c = Client::connect(&g).await?;
            match cmd {
                PolicyCmd::Apply {
                    file,
                    message,
                    expect_version,
                } => {
                    let text = std::fs::read_to_string(&file)
                        .with_context(|| format!("cannot read {}", file.display()))?;
                    let p = c.apply_policy(text, message, expect_version).await?;
                    println!("applied policy version {} (sha256 {})", p.version, p.sha256);
                }
                PolicyCmd::Get { version } => {
                    let p = c.get_policy(version).await?;
                    if p.version == 0 {
                        eprintln!("no policy applied yet: everything is denied");
                    } else {
                        eprintln!(
                            "# version {} by {} ({})",
                            p.version, p.author, p.description
                        );
                        print!("{}", p.text);
                    }
                }
                PolicyCmd::Validate { .. } => unreachable!("handled above"),
            }
            Ok(0)
        }
        Command::Connection(cmd) => {
            let mut c = Client::connect(&g).await?;
            match cmd {
                ConnectionCmd::Put {
                    name,
                    kind,
                    address,
                    options,
                    secrets,
                } => {
                    let options = pairs(&options, "option")?.into_iter().collect();
                    let secrets = pairs(&secrets, "secret")?
                        .into_iter()
                        .map(|(k, v)| Ok((k, secret_value(&v)?)))
                        .collect::<Result<_>>()?;
                    let conn = c
                        .put_connection(custos_proto::v1::Connection {
                            name,
                            kind,
                            address,
                            options,
                            secrets,
                            revision: 0,
                        })
                        .await?;
                    println!("{}", render::connection(&conn));
                }
                ConnectionCmd::Get { name } => {
                    println!("{}", render::connection(&c.get_connection(name).await?))
                }
                ConnectionCmd::List => {
                    for conn in c.list_connections().await? {
                        println!("{}", render::connection(&conn));
                    }
                }
                ConnectionCmd::Delete { name } => {
                    c.delete_connection(name.clone()).await?;
                    println!("deleted connection {name}");
                }
            }
            Ok(0)
        }
        Command::Token(cmd) => {
            let mut c = Client::connect(&g).await?;
            match cmd {
                TokenCmd::Issue {
                    subject,
                    groups,
                    ttl,
                    roles,
                } => {
                    let ttl = humantime::parse_duration(&ttl)
                        .with_context(|| format!("--ttl {ttl:?}: use e.g. 30m, 1h, 7d"))?;
                    let t = c.issue_token(subject, groups, ttl.as_secs(), roles).await?;
                    eprintln!(
                        "token {} expires {}",
                        t.token_id,
                        render::time(t.expires_unix_nano)
                    );
                    println!("{}", t.token);
                }
                TokenCmd::Revoke { token_id } => {
                    c.revoke_token(token_id.clone()).await?;
                    println!("revoked token {token_id}");
                }
            }
            Ok(0)
        }
        Command::Audit(cmd) => {
            let mut c = Client::connect(&g).await?;
            match cmd {
                AuditCmd::Tail { last, follow, json } => {
                    c.tail(last, follow, |r| {
                        println!(
                            "{}",
                            if json {
                                render::json(r)
                            } else {
                                render::record(r)
                            }
                        )
                    })
                    .await?;
                    Ok(0)
                }
                AuditCmd::Search {
                    filter,
                    limit,
                    json,
                } => {
                    let recs = c.search(&filter, limit).await?;
                    for r in &recs {
                        println!(
                            "{}",
                            if json {
                                render::json(r)
                            } else {
                                render::record(r)
                            }
                        );
                    }
                    if !json {
                        eprintln!("{} records", recs.len());
                    }
                    Ok(0)
                }
                AuditCmd::Verify => {
                    let v = c.verify().await?;
                    if v.ok {
                        println!(
                            "ok: node {} holds {} records, chain intact, head hash {} ({} malformed events parked)",
                            v.node_id, v.checked, v.head_hash, v.parked
                        );
                        Ok(0)
                    } else if v.first_bad_seq == 0 && v.lost > 0 {
                        println!(
                            "FAILED: node {}: chain intact over {} records, but {} events the bus acknowledged were lost before ingest; the ingesting leader's log names the stream sequences (search it for \"lost before ingest\"), then check the NATS servers' logs and the stream's limits (max_age)",
                            v.node_id, v.checked, v.lost
                        );
                        Ok(1)
                    } else {
                        println!(
                            "FAILED: node {}: first bad record is seq {} ({}); {} records before it verified",
                            v.node_id, v.first_bad_seq, v.reason, v.checked
                        );
                        Ok(1)
                    }
                }
            }
        }
        Command::Cluster(cmd) => {
            let mut c = Client::connect(&g).await?;
            let s = match cmd {
                ClusterCmd::Status => c.status().await?,
                ClusterCmd::Add { id, addr, learner } => c.add_node(id, addr, learner).await?,
                ClusterCmd::Remove { id } => c.remove_node(id).await?,
            };
            println!("{}", render::status(&s));
            Ok(0)
        }
        Command::Approvals(cmd) => approvals_cmd::approvals(&Client::connect(&g).await?, cmd).await,
        Command::Grants(cmd) => approvals_cmd::grants(&Client::connect(&g).await?, cmd).await,
    }
}
