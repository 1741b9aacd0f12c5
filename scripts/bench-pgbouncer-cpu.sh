#!/usr/bin/env bash
# pgbouncer's own CPU per transaction under pgbench -S -c16 (session pool), to set beside the
# edge's CPU per statement that bench-pg.sh prints. Needs pgbouncer (./scripts/bench-deps.sh),
# PostgreSQL on 127.0.0.1:5432 with the custos_bench database bench-pg.sh creates, and root (pgbouncer
# runs as the postgres user).
#   ./scripts/bench-pgbouncer-cpu.sh [SECONDS]
set -euo pipefail
SECS=${1:-8}
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
d=$(mktemp -d); chmod 777 "$d"
echo '"postgres" ""' > "$d/users.txt"
cat > "$d/pgb.ini" <<INI
[databases]
custos_bench = host=127.0.0.1 port=5432 dbname=custos_bench user=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PORT
auth_type = trust
auth_file = $d/users.txt
pool_mode = session
max_client_conn = 100
default_pool_size = 20
logfile = $d/pgb.log
pidfile = $d/pgb.pid
INI
chown -R postgres "$d"
su postgres -c "pgbouncer -d $d/pgb.ini"
sleep 1
pid=$(cat "$d/pgb.pid")
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$d"' EXIT
cpu() { awk -v t="$(getconf CLK_TCK)" '{printf "%.2f", ($14+$15)/t}' "/proc/$1/stat"; }
for r in 1 2 3; do
  b=$(cpu "$pid")
  out=$(pgbench -n -S -c 16 -j 2 -T "$SECS" -M simple -h 127.0.0.1 -p "$PORT" -U postgres custos_bench 2>&1)
  a=$(cpu "$pid")
  tx=$(echo "$out" | sed -n 's/number of transactions actually processed: \([0-9]*\).*/\1/p')
  tps=$(echo "$out" | sed -n 's/tps = \([0-9.]*\) .*/\1/p' | head -1)
  echo "round $r: $tx transactions, tps $tps, pgbouncer CPU $(awk -v a="$a" -v b="$b" 'BEGIN{printf "%.2f", a-b}') s, $(awk -v a="$a" -v b="$b" -v t="$tx" 'BEGIN{printf "%.1f", (a-b)/t*1e6}') µs per transaction"
done
