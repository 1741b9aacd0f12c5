#!/usr/bin/env bash
# Approval latency: from an approver's decision to the held statement starting in PostgreSQL,
# over 200 approvals, in the production shape (a control-plane node ingesting from NATS,
# `custos edge` following it), measured by `custos-loadtest approvals`.
#   ./scripts/bench-approvals.sh [--rounds N] [--out FILE]
# Needs: PostgreSQL on 127.0.0.1:5432 (trust for user postgres) and nats-server.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/custos/target}"
if [ -n "${CUSTOS_BIN_DIR:-}" ]; then
  BIN="$CUSTOS_BIN_DIR"
else
  cargo build --release -p custos -p custos-loadtest >/dev/null
  BIN="$CARGO_TARGET_DIR/release"
fi
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; echo "nothing on port $1" >&2; exit 1; }

NATS_PORT=$(port); CP_PORT=$(port); EDGE_PORT=$(port)
nats-server -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$work/nats" >/dev/null 2>&1 & pids+=($!)
wait_port "$NATS_PORT"
mkdir -p "$work/cp"
echo -n bench-admin-token > "$work/admin.token"
cat > "$work/cp.toml" <<TOML
[node]
id = 1
listen = "127.0.0.1:$CP_PORT"
data_dir = "$work/cp"
admin_token_file = "$work/admin.token"
[cluster.initial_members]
1 = "127.0.0.1:$CP_PORT"
[bus]
kind = "nats"
[bus.nats]
url = "nats://127.0.0.1:$NATS_PORT"
TOML
CUSTOS_LOG=warn "$BIN/custos" controlplane --config "$work/cp.toml" 2>"$work/cp.log" & pids+=($!)
wait_port "$CP_PORT"
export CUSTOS_SERVER="http://127.0.0.1:$CP_PORT" CUSTOS_TOKEN=bench-admin-token
for _ in $(seq 100); do "$BIN/custos" cluster status 2>/dev/null | grep -q "leader 1" && break; sleep 0.1; done
psql -X -q -h 127.0.0.1 -U postgres -d postgres -c "DROP DATABASE IF EXISTS custos_bench_approvals" -c "CREATE DATABASE custos_bench_approvals" >/dev/null
psql -X -q -h 127.0.0.1 -U postgres -d custos_bench_approvals -c "CREATE TABLE bench_approvals (n int)" >/dev/null
cat > "$work/p.cedar" <<'CEDAR'
@id("bench-read")
permit (principal in Custos::Group::"bench", action == Custos::Action::"sql:select", resource);
@id("bench-inserts-need-approval")
@approval("group=bench-approvers,timeout=60s")
permit (principal in Custos::Group::"bench", action == Custos::Action::"sql:insert", resource);
CEDAR
"$BIN/custos" policy apply "$work/p.cedar" >/dev/null
"$BIN/custos" connection put bench --kind postgres --address 127.0.0.1:5432 \
  -o database=custos_bench_approvals -o audit_mode=strict -s username=postgres >/dev/null
AGENT=$("$BIN/custos" token issue bench-agent --group bench --ttl 2h 2>/dev/null)
APPROVER=$("$BIN/custos" token issue bench-approver --group bench-approvers --role approver --ttl 2h 2>/dev/null)
EDGE=$("$BIN/custos" token issue bench-edge --role edge --ttl 2h 2>/dev/null)
cat > "$work/edge.toml" <<TOML
[edge]
id = "bench-edge"
[controlplane]
servers = ["127.0.0.1:$CP_PORT"]
token = "$EDGE"
[bus.nats]
url = "nats://127.0.0.1:$NATS_PORT"
[postgres]
listen = "127.0.0.1:$EDGE_PORT"
allow_insecure_password = true
TOML
CUSTOS_LOG=warn "$BIN/custos" edge --config "$work/edge.toml" 2>"$work/edge.log" & pids+=($!)
wait_port "$EDGE_PORT"
CONN="host=127.0.0.1 port=$EDGE_PORT dbname=bench user=bench-agent password=$AGENT sslmode=disable"
for _ in $(seq 100); do psql -X -q "$CONN" -c "SELECT 1" >/dev/null 2>&1 && break; sleep 0.1; done
"$BIN/custos-loadtest" approvals --server "http://127.0.0.1:$CP_PORT" --approver-token "$APPROVER" \
  --conninfo "$CONN" "$@"
