#!/usr/bin/env bash
# Installs what `custos-loadtest pgbench` needs besides PostgreSQL itself: pgbouncer and haproxy
# (the baselines the edge is compared with) and pgbench/psql; and wrk, which
# `scripts/bench-http.sh --client wrk` uses as an independent load generator. The benchmark starts its own
# pgbouncer and haproxy on ephemeral ports, so the distro services are kept stopped and disabled:
# nothing is left listening on 6432 or haproxy's default ports.
#   ./scripts/bench-deps.sh
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }
pkg_installed() { dpkg -s "$1" >/dev/null 2>&1; }
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"

need_pkgs=()
pkg_installed pgbouncer || need_pkgs+=(pgbouncer)
pkg_installed haproxy || need_pkgs+=(haproxy)
have pgbench || [ -n "$(ls /usr/lib/postgresql/*/bin/pgbench 2>/dev/null)" ] || need_pkgs+=(postgresql-contrib)
have psql || need_pkgs+=(postgresql-client)
have wrk || need_pkgs+=(wrk)

if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "installing: ${need_pkgs[*]}"
  # Keep the packages' maintainer scripts from starting the daemons: a policy-rc.d that refuses
  # every start (exit 101), only for the length of the install and only if none is there already.
  made_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  cleanup() { [ -z "$made_policy" ] || $SUDO rm -f /usr/sbin/policy-rc.d; }
  trap cleanup EXIT
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    "${need_pkgs[@]}" >/dev/null
fi

# Stop and disable the distro services, whatever started them.
for svc in pgbouncer haproxy; do
  pkg_installed "$svc" || continue
  if have systemctl && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now "$svc" >/dev/null 2>&1 || true
  else
    [ -x "/etc/init.d/$svc" ] && $SUDO "/etc/init.d/$svc" stop >/dev/null 2>&1 || true
    have update-rc.d && $SUDO update-rc.d "$svc" disable >/dev/null 2>&1 || true
  fi
done
# A daemon that is still up (no init system to stop it) is ended by the pid its package recorded.
for pidfile in /run/pgbouncer/pgbouncer.pid /var/run/pgbouncer/pgbouncer.pid /run/haproxy.pid; do
  [ -f "$pidfile" ] || continue
  pid=$(head -n1 "$pidfile" | tr -dc '0-9')
  if [ -n "$pid" ] && [ -d "/proc/$pid" ]; then
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null || true)
    case "$exe" in
      */pgbouncer|*/haproxy) echo "stopping distro ${exe##*/} (pid $pid)"; $SUDO kill "$pid" || true ;;
    esac
  fi
done

for bin in pgbouncer haproxy pgbench psql wrk; do
  path=$(command -v "$bin" || ls /usr/sbin/"$bin" 2>/dev/null || true)
  if [ -z "$path" ]; then
    echo "bench-deps: $bin is still missing" >&2
    exit 1
  fi
done
echo "bench deps: $(pgbouncer --version 2>/dev/null | head -n1); $(haproxy -v 2>/dev/null | head -n1); $(pgbench --version); $(wrk --version 2>&1 | head -n1 | cut -d' ' -f1-2)"
