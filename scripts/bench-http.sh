#!/usr/bin/env bash
# HTTP through the edge, in the production shape (a control-plane node ingesting from NATS,
# `custos edge` with its HTTP listener, audit async or strict), next to the same upstream reached
# directly, in interleaved rounds measured by `custos-loadtest http`.
#   ./scripts/bench-http.sh [--seconds 10 --rounds 3 --connections 16 --out FILE]
#   AUDIT=strict ./scripts/bench-http.sh …   (default async)
#   UPSTREAM_DELAY_MS=5 ./scripts/bench-http.sh …   the upstream answers after 5 ms (default 0: from memory)
#   ./scripts/bench-http.sh --client wrk …   wrk generates the load instead of custos-loadtest's own
#     loop (scripts/bench-deps.sh installs it); --wrk-threads N (default 2), --wrk PATH (default:
#     wrk on PATH)
#   BENCH_BATCH=N ./scripts/bench-http.sh …   the edge's [bus.nats] publish_batch_max (default 64; 1
#     publishes every event as its own bus message)
#   When haproxy is installed (scripts/bench-deps.sh), it runs as a plain HTTP reverse proxy of the
#   same upstream and is measured in the same rounds (the baseline a proxy that does nothing else
#   reaches on these cores); BASELINE=none leaves it out.
# Needs: nats-server.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/custos/target}"
if [ -n "${CUSTOS_BIN_DIR:-}" ]; then
  BIN="$CUSTOS_BIN_DIR"
else
  cargo build --release -p custos -p custos-loadtest >/dev/null
  BIN="$CARGO_TARGET_DIR/release"
fi
AUDIT="${AUDIT:-async}"
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; echo "nothing on port $1" >&2; exit 1; }

NATS_PORT=$(port); CP_PORT=$(port); EDGE_PORT=$(port); UP_PORT=$(port)
"$BIN/custos-loadtest" upstream --port "$UP_PORT" --delay-ms "${UPSTREAM_DELAY_MS:-0}" >/dev/null & pids+=($!)
nats-server -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$work/nats" >/dev/null 2>&1 & pids+=($!)
wait_port "$NATS_PORT"; wait_port "$UP_PORT"
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
cat > "$work/p.cedar" <<'CEDAR'
@id("bench-read")
permit (principal in Custos::Group::"bench", action in Custos::Action::"http:read", resource);
CEDAR
"$BIN/custos" policy apply "$work/p.cedar" >/dev/null
"$BIN/custos" connection put bench --kind http --address "http://127.0.0.1:$UP_PORT" -o audit_mode="$AUDIT" >/dev/null
TOKEN=$("$BIN/custos" token issue bench-agent --group bench --ttl 2h 2>/dev/null)
EDGE=$("$BIN/custos" token issue bench-edge --role edge --ttl 2h 2>/dev/null)
cat > "$work/edge.toml" <<TOML
[edge]
id = "bench-edge"
[controlplane]
servers = ["127.0.0.1:$CP_PORT"]
token = "$EDGE"
[bus.nats]
url = "nats://127.0.0.1:$NATS_PORT"
publish_batch_max = ${BENCH_BATCH:-64}
[postgres]
enabled = false
[http]
enabled = true
listen = "127.0.0.1:$EDGE_PORT"
TOML
CUSTOS_LOG=warn "$BIN/custos" edge --config "$work/edge.toml" 2>"$work/edge.log" & pids+=($!)
wait_port "$EDGE_PORT"
for _ in $(seq 100); do curl -sf -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$EDGE_PORT/bench/items" >/dev/null && break; sleep 0.1; done
baseline=()
if [ "${BASELINE:-haproxy}" = haproxy ] && command -v haproxy >/dev/null 2>&1; then
  HAPROXY_PORT=$(port)
  cat > "$work/haproxy.cfg" <<CFG
global
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend api
    bind 127.0.0.1:$HAPROXY_PORT
    default_backend api
backend api
    http-reuse always
    server up1 127.0.0.1:$UP_PORT
CFG
  haproxy -db -f "$work/haproxy.cfg" >"$work/haproxy.log" 2>&1 & pids+=($!)
  wait_port "$HAPROXY_PORT"
  baseline=(--baseline "haproxy=http://127.0.0.1:$HAPROXY_PORT/items")
  echo "baseline: $(haproxy -v | head -1), mode http"
fi
echo "audit_mode=$AUDIT upstream_delay_ms=${UPSTREAM_DELAY_MS:-0}"
cpu() { awk -v t="$(getconf CLK_TCK)" '{printf "%.2f", ($14+$15)/t}' "/proc/$1/stat"; }
names=(upstream nats controlplane edge haproxy)
before=(); for p in "${pids[@]}"; do before+=("$(cpu "$p")"); done
# PERF_EDGE=FILE: sample the edge with perf during the runs (perf report -i FILE).
if [ -n "${PERF_EDGE:-}" ]; then
  perf record -q -F 499 -g -p "${pids[3]}" -o "$PERF_EDGE" >/dev/null 2>&1 & perf_pid=$!
fi
"$BIN/custos-loadtest" http --direct "http://127.0.0.1:$UP_PORT/items" \
  --edge "http://127.0.0.1:$EDGE_PORT/bench/items" --edge-header "Authorization: Bearer $TOKEN" \
  "${baseline[@]}" "$@"
# CPU seconds each process used during the measured runs (the edge, NATS and the control plane
# work only in the edge rounds, haproxy only in its own; the upstream in all).
if [ -n "${perf_pid:-}" ]; then kill -INT "$perf_pid"; wait "$perf_pid" 2>/dev/null || true; fi
echo -n "CPU seconds during the runs:"
for i in "${!pids[@]}"; do
  echo -n " ${names[$i]} $(awk -v a="$(cpu "${pids[$i]}")" -v b="${before[$i]}" 'BEGIN{printf "%.2f", a-b}')"
done
echo
