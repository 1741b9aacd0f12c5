#!/usr/bin/env bash
# The soak (not part of CI): a mixed Postgres load for 30 minutes through both edges of
# `custos local-cluster` (3 NATS JetStream servers, 3 control-plane nodes, 2 edges), recording every
# minute the RSS and open file descriptors of every edge and control-plane node and the p50/p99
# latency of the minute's statements. Results go to stdout and are appended to $SOAK_OUT.
#   ./scripts/soak.sh                       30 minutes
#   SOAK_MINUTES=5 ./scripts/soak.sh        a shorter run
#   CUSTOS_BIN_DIR=/tmp/bench-bin ./scripts/soak.sh   binaries built elsewhere
#   SOAK_KEEP=1 ./scripts/soak.sh          keep the cluster folder (logs, data) and print its path
# Needs: PostgreSQL on 127.0.0.1:5432 with trust for user postgres (the target), nats-server.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/custos/target}"
if [ -n "${CUSTOS_BIN_DIR:-}" ]; then
  BIN="$CUSTOS_BIN_DIR"
else
  cargo build --release -p custos -p custos-loadtest >/dev/null
  BIN="$CARGO_TARGET_DIR/release"
fi
MINUTES="${SOAK_MINUTES:-30}"
BASE="${SOAK_BASE_PORT:-26000}"
OUT="${SOAK_OUT:-/tmp/custos-soak.md}"
work=$(mktemp -d)
cluster_pid=""
cleanup() {
  if [ -n "$cluster_pid" ]; then kill -TERM "$cluster_pid" 2>/dev/null || true; wait "$cluster_pid" 2>/dev/null || true; fi
  if [ "${SOAK_KEEP:-0}" = 1 ]; then echo "kept $work (logs: $work/cluster/*/*.log)" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
# Wait for a port while the cluster launcher runs (3 minutes at most); show its output if it gave up.
wait_port() {
  for _ in $(seq 1800); do
    (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0
    kill -0 "$cluster_pid" 2>/dev/null || { echo "custos local-cluster exited:" >&2; cat "$work/local-cluster.out" >&2; exit 1; }
    sleep 0.1
  done
  echo "nothing on port $1 after 3 minutes:" >&2; cat "$work/local-cluster.out" >&2; exit 1
}

"$BIN/custos" local-cluster --dir "$work/cluster" --base-port "$BASE" >"$work/local-cluster.out" 2>&1 &
cluster_pid=$!
# The fixed layout: 3 × NATS (client, cluster, monitor), 3 × node (grpc, metrics), 2 × edge (pg, http, metrics).
NODE1=$((BASE + 9)); EDGE1=$((BASE + 15)); EDGE2=$((BASE + 18))
wait_port "$EDGE1"; wait_port "$EDGE2"
export CUSTOS_SERVER="http://127.0.0.1:$NODE1" CUSTOS_TOKEN_FILE="$work/cluster/shared/admin.token"

psql -X -q -h 127.0.0.1 -U postgres -d postgres -c "DROP DATABASE IF EXISTS custos_soak" -c "CREATE DATABASE custos_soak"
psql -X -q -h 127.0.0.1 -U postgres -d custos_soak \
  -c "CREATE TABLE soak_log (marker text PRIMARY KEY, client int, note text, n int NOT NULL DEFAULT 0)"
cat > "$work/soak.cedar" <<'CEDAR'
@id("soak-agents")
permit (principal in Custos::Group::"agents", action, resource);
@id("no-drop")
forbid (principal, action == Custos::Action::"sql:drop", resource);
CEDAR
"$BIN/custos" policy apply "$work/soak.cedar" >/dev/null
"$BIN/custos" connection put app --kind postgres --address 127.0.0.1:5432 \
  -o database=custos_soak -o audit_mode=strict -s username=postgres >/dev/null
SOAK_TOKEN=$("$BIN/custos" token issue agent:soak --group agents --ttl 4h)
export SOAK_TOKEN

pid_of() { pgrep -f -- "$1" | head -1; }
pids=()
for n in 1 2 3; do pids+=(--pid "node$n=$(pid_of "$work/cluster/node$n/controlplane.toml")"); done
for e in 1 2; do pids+=(--pid "edge$e=$(pid_of "$work/cluster/edge$e/edge.toml")"); done

{
  echo
  echo "### Soak $(date -u +%Y-%m-%dT%H:%MZ): ${MINUTES} min, 16 clients through 2 edges (local-cluster), strict audit"
  echo
} >>"$OUT"
"$BIN/custos-loadtest" soak --edge "127.0.0.1:$EDGE1" --edge "127.0.0.1:$EDGE2" \
  --minutes "$MINUTES" "${pids[@]}" --out "$OUT"
# Every node must end with the same log: wait (2 minutes at most) for the followers to apply
# what the leader holds, then verify each one. A node left behind is reported, not hidden.
head_of() { curl -s "http://127.0.0.1:$1/metrics" | awk '/^custos_audit_head_seq/ {print $2}'; }
for _ in $(seq 120); do
  h1=$(head_of $((BASE + 10))); h2=$(head_of $((BASE + 12))); h3=$(head_of $((BASE + 14)))
  [ -n "$h1" ] && [ "$h1" = "$h2" ] && [ "$h2" = "$h3" ] && break
  sleep 1
done
echo "audit heads: node1 ${h1:-?}, node2 ${h2:-?}, node3 ${h3:-?}" | tee -a "$OUT"
status=0
for n in 1 2 3; do
  echo "audit verify on node$n:"
  CUSTOS_SERVER="http://127.0.0.1:$((BASE + 7 + 2 * n))" "$BIN/custos" audit verify | tee -a "$OUT" || status=1
done
if [ "${h1:-}" != "${h2:-}" ] || [ "${h2:-}" != "${h3:-}" ]; then
  echo "FAILED: the nodes' audit heads differ 2 minutes after the load stopped" | tee -a "$OUT"
  status=1
fi
echo "results appended to $OUT"
exit "$status"
