#!/usr/bin/env bash
# The Postgres benchmark in its production shape, in one run:
#   direct PostgreSQL, pgbouncer (session pool), haproxy (TCP), and the custos edge with strict and
#   with async audit (a control-plane node ingesting from NATS JetStream, `custos edge` publishing
#   to it), all measured by `custos-loadtest pgbench` in interleaved rounds.
#   ./scripts/bench-pg.sh [extra custos-loadtest pgbench flags, e.g. --seconds 20 --rounds 3 --out FILE]
#   BENCH_CP=off ./scripts/bench-pg.sh …   stops the control plane for the runs (the edge serves with
#     the configuration it has and NATS keeps the events), so the figures show the data path alone;
#     the control plane is restarted afterwards and ingests the backlog.
#   PERF_EDGE=FILE ./scripts/bench-pg.sh …   also samples the edge with perf (perf report -i FILE).
#   PERF_CP=FILE ./scripts/bench-pg.sh …   also samples the control plane with perf.
#   PERF_NATS=FILE ./scripts/bench-pg.sh …   also samples nats-server with perf.
#   BENCH_SIEM=off ./scripts/bench-pg.sh …   turns the control plane's SIEM republish off ([siem]
#     enabled = false), to see what that feed costs NATS and the control plane.
#   NATS_GOMAXPROCS=N ./scripts/bench-pg.sh …   runs nats-server with GOMAXPROCS=N (default: one per
#     CPU); Go's scheduler spins and sleeps between wake-ups, a large part of nats-server's CPU on
#     these shared cores (docs/benchmarks.md).
#   EDGE_WORKERS=N ./scripts/bench-pg.sh …   runs the edge with N tokio worker threads (default: one
#     per CPU).
#   BENCH_LINGER=MS ./scripts/bench-pg.sh …   the control plane's [bus] batch_linger_ms (default 2; 0
#     commits each fetched batch at once, as custos did before).
#   BENCH_BATCH=N ./scripts/bench-pg.sh …   the edge's [bus.nats] publish_batch_max (default 64; 1
#     publishes every event as its own bus message, as custos did before batching).
# It prints the CPU seconds NATS, the control plane and the edge used during the runs: divided by
# the statements the custos targets ran, they give a CPU cost per statement that moves much less
# with the machine's other load than the TPS figures do.
# Needs: PostgreSQL on 127.0.0.1:5432 (trust for user postgres), nats-server, pgbouncer, haproxy
# (./scripts/bench-deps.sh installs the last two).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/custos/target}"
# CUSTOS_BIN_DIR=… uses binaries built elsewhere (e.g. a dev build with CARGO_PROFILE_DEV_OPT_LEVEL=3).
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

NATS_PORT=$(port); CP_PORT=$(port); EDGE_PORT=$(port); CP_METRICS=$(port); NATS_MON=$(port)
env ${NATS_GOMAXPROCS:+GOMAXPROCS=$NATS_GOMAXPROCS} nats-server -js -a 127.0.0.1 -p "$NATS_PORT" -m "$NATS_MON" -sd "$work/nats" >/dev/null 2>&1 & pids+=($!)
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
[metrics]
listen = "127.0.0.1:$CP_METRICS"
[siem]
enabled = $([ "${BENCH_SIEM:-on}" = off ] && echo false || echo true)
[bus]
kind = "nats"
${BENCH_LINGER:+batch_linger_ms = $BENCH_LINGER}
[bus.nats]
url = "nats://127.0.0.1:$NATS_PORT"
TOML
CUSTOS_LOG=warn "$BIN/custos" controlplane --config "$work/cp.toml" 2>"$work/cp.log" & cp_pid=$!; pids+=($cp_pid)
wait_port "$CP_PORT"
export CUSTOS_SERVER="http://127.0.0.1:$CP_PORT" CUSTOS_TOKEN=bench-admin-token
for _ in $(seq 100); do "$BIN/custos" cluster status 2>/dev/null | grep -q "leader 1" && break; sleep 0.1; done
cat > "$work/bench.cedar" <<'CEDAR'
@id("bench-read")
permit (principal in Custos::Group::"bench", action in Custos::Action::"sql:read", resource);
@id("no-drop")
forbid (principal, action == Custos::Action::"sql:drop", resource);
CEDAR
"$BIN/custos" policy apply "$work/bench.cedar" >/dev/null
for mode in strict async; do
  "$BIN/custos" connection put "bench-$mode" --kind postgres --address 127.0.0.1:5432 \
    -o database=custos_bench -o audit_mode=$mode -s username=postgres >/dev/null
done
TOKEN=$("$BIN/custos" token issue bench --group bench --ttl 2h)
EDGE_TOKEN=$("$BIN/custos" token issue bench-edge --role edge --ttl 2h)
cat > "$work/edge.toml" <<TOML
[edge]
id = "bench-edge"
[controlplane]
servers = ["127.0.0.1:$CP_PORT"]
token = "$EDGE_TOKEN"
[bus.nats]
url = "nats://127.0.0.1:$NATS_PORT"
publish_batch_max = ${BENCH_BATCH:-64}
[postgres]
listen = "127.0.0.1:$EDGE_PORT"
allow_insecure_password = true
TOML
env ${EDGE_WORKERS:+TOKIO_WORKER_THREADS=$EDGE_WORKERS} CUSTOS_LOG=warn "$BIN/custos" edge --config "$work/edge.toml" 2>"$work/edge.log" & edge_pid=$!; pids+=($edge_pid)
wait_port "$EDGE_PORT"
sleep 1
cpu() { [ -r "/proc/$1/stat" ] && awk -v t="$(getconf CLK_TCK)" '{printf "%.2f", ($14+$15)/t}' "/proc/$1/stat" || echo 0; }
names=(nats controlplane edge)
cpu_pids=("${pids[0]}" "$cp_pid" "$edge_pid")
if [ "${BENCH_CP:-on}" = off ]; then
  kill "$cp_pid"; wait "$cp_pid" 2>/dev/null || true
  echo "control plane stopped for the runs" >&2
fi
before=(); for p in "${cpu_pids[@]}"; do before+=("$(cpu "$p")"); done
# nats-server's message counters (client and internal JetStream traffic alike), before and after.
nats_msgs() { curl -fsS "http://127.0.0.1:$NATS_MON/varz" 2>/dev/null | python3 -c 'import json,sys; v=json.load(sys.stdin); print(v["in_msgs"], v["out_msgs"])' || echo "0 0"; }
read -r nats_in0 nats_out0 <<<"$(nats_msgs)"
perf_pids=()
if [ -n "${PERF_EDGE:-}" ]; then
  perf record -q -F 499 -g -p "$edge_pid" -o "$PERF_EDGE" >/dev/null 2>&1 & perf_pids+=($!)
fi
if [ -n "${PERF_CP:-}" ]; then
  perf record -q -F 499 -g -p "$cp_pid" -o "$PERF_CP" >/dev/null 2>&1 & perf_pids+=($!)
fi
if [ -n "${PERF_NATS:-}" ]; then
  perf record -q -F 499 -g -p "${pids[0]}" -o "$PERF_NATS" >/dev/null 2>&1 & perf_pids+=($!)
fi
"$BIN/custos-loadtest" pgbench \
  --target "custos-strict=postgresql://bench:$TOKEN@127.0.0.1:$EDGE_PORT/bench-strict?sslmode=disable" \
  --target "custos-async=postgresql://bench:$TOKEN@127.0.0.1:$EDGE_PORT/bench-async?sslmode=disable" \
  "$@"
for p in "${perf_pids[@]}"; do kill -INT "$p"; wait "$p" 2>/dev/null || true; done
# NATS, the control plane and the edge work only in the custos rounds (the control plane not at
# all with BENCH_CP=off); the figure includes warm-up and latency runs.
echo -n "CPU seconds during the runs:" >&2
for i in "${!cpu_pids[@]}"; do
  echo -n " ${names[$i]} $(awk -v a="$(cpu "${cpu_pids[$i]}")" -v b="${before[$i]}" 'BEGIN{printf "%.2f", a-b}')" >&2
done
echo >&2
read -r nats_in1 nats_out1 <<<"$(nats_msgs)"
echo "nats-server messages during the runs: $((nats_in1 - nats_in0)) in, $((nats_out1 - nats_out0)) out" >&2
if [ "${BENCH_CP:-on}" = off ]; then
  CUSTOS_LOG=warn "$BIN/custos" controlplane --config "$work/cp.toml" 2>>"$work/cp.log" & pids+=($!)
  wait_port "$CP_PORT"
  t0=$(date +%s)
  prev=-1
  while :; do
    head=$("$BIN/custos" cluster status 2>/dev/null | sed -n 's/.*audit head seq \([0-9]*\).*/\1/p')
    [ "$head" = "$prev" ] && break
    prev=$head; sleep 2
  done
  echo "control plane ingested the backlog: head seq $head after $(( $(date +%s) - t0 )) s" >&2
fi
# The publishers' mean batch size: events over bus messages, as the control plane fetched them.
if page=$(curl -fsS "http://127.0.0.1:$CP_METRICS/metrics" 2>/dev/null); then
  echo "$page" | awk '/^custos_ingest_events_total\{/ && !/result="(filled|lost)"/ {e+=$2}
    /^custos_ingest_bus_messages_total / {m=$2}
    /^custos_raft_last_log_index[{ ]/ {r=$NF}
    END {if (m > 0) printf "bus: %d events in %d messages (%.2f events per message); %d Raft log entries (%.2f events per entry)\n", e, m, e/m, r, (r > 0 ? e/r : 0)}' >&2
fi
echo "audit: $("$BIN/custos" audit verify | head -1)" >&2
