#!/usr/bin/env bash
# The one test command: installs what the suite needs when it is missing, then runs everything.
#   ./scripts/test.sh            full suite (fmt, clippy, all tests)
#   ./scripts/test.sh --quick    tests only
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
have() { command -v "$1" >/dev/null 2>&1; }
pkg_installed() { dpkg -s "$1" >/dev/null 2>&1; }
pkg_installed libclang-dev || need_pkgs+=(libclang-dev)
pkg_installed clang || need_pkgs+=(clang)
have nats-server || [ -x /usr/sbin/nats-server ] || need_pkgs+=(nats-server)
have g++ || need_pkgs+=(g++)
have openssl || need_pkgs+=(openssl)   # the mutual-TLS test makes its certificates with it
# The edge tests start private PostgreSQL servers (initdb/postgres) and drive them with psql.
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_pkgs+=(postgresql)
have psql || need_pkgs+=(postgresql-client)
have setpriv || need_pkgs+=(util-linux)
# The HTTP/LLM/MCP and Slack tests drive real clients: curl, the Python openai and mcp SDKs, and
# the Python websockets library.
have curl || need_pkgs+=(curl)
have python3 || need_pkgs+=(python3 python3-pip)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "installing: ${need_pkgs[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
if ! python3 -c "import openai, mcp, websockets" >/dev/null 2>&1; then
  echo "installing the Python openai, mcp and websockets libraries (tests/py)"
  python3 -m pip install -q openai mcp websockets 2>/dev/null \
    || python3 -m pip install -q --break-system-packages openai mcp websockets
fi
if ! have cargo; then
  echo "cargo is missing: install Rust with rustup (the toolchain is pinned in rust-toolchain.toml)" >&2
  exit 1
fi

# RocksDB takes ~11 minutes to compile cold; keep the build cache outside the clone.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/custos/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
mkdir -p "$CARGO_TARGET_DIR"

if [ "${1:-}" != "--quick" ]; then
  cargo fmt --all -- --check
  cargo clippy --workspace --all-targets -- -D warnings
fi

if have cargo-nextest; then
  cargo nextest run --workspace --no-fail-fast
else
  # Without nextest's test groups, run one test at a time: cluster tests share 2 cores badly.
  cargo test --workspace --no-fail-fast -- --test-threads=1
fi

# Fuzzing, briefly (docs/reliability.md, "Fuzzing"): every fuzz target for CUSTOS_FUZZ_SECONDS
# (default 30) seconds after the tests, from the committed seeds, corpus and regression inputs;
# it fails on a crash or a broken property. Its build is cached in ~/.cache/custos/target-fuzz.
# CUSTOS_FUZZ=0 (or --quick) skips it.
if [ "${CUSTOS_FUZZ:-1}" != "0" ] && [ "${1:-}" != "--quick" ]; then
  ./scripts/fuzz.sh "${CUSTOS_FUZZ_SECONDS:-30}"
fi
