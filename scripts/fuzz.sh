#!/usr/bin/env bash
# Fuzz the parsers and the masking engine with cargo-fuzz (libFuzzer + AddressSanitizer).
#   ./scripts/fuzz.sh [SECONDS_PER_TARGET]              build, then run every target (default 30 s,
#                                                       or $CUSTOS_FUZZ_SECONDS)
#   FUZZ_TARGETS="mask_text sse_stream" ./scripts/fuzz.sh 600   only these targets
#   CUSTOS_FUZZ_NIGHTLY=0 ./scripts/fuzz.sh             use the pinned toolchain with RUSTC_BOOTSTRAP=1
#                                                       even where a nightly toolchain is installed
# Targets and their properties: docs/reliability.md. Every run starts from the committed inputs,
# which it only reads: fuzz/seeds/<target>/ (hand-written), fuzz/corpus/<target>/ (a minimised
# corpus of earlier long runs) and fuzz/regressions/<target>/ (the inputs of fixed findings; one
# that fails again fails the run). What libFuzzer finds goes to a scratch corpus outside the clone
# ($FUZZ_CORPUS, kept between runs on this machine); logs go to ~/.cache/custos/fuzz-logs/<run>/
# ($FUZZ_LOGS). A crash or a broken property leaves its input
# in fuzz/artifacts/<target>/ (ignored by git), is printed in base64, and makes the script fail.
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-${CUSTOS_FUZZ_SECONDS:-30}}"
case "$secs" in
  '' | *[!0-9]* | 0)
    echo "usage: $0 [SECONDS_PER_TARGET]   (a whole number of seconds, at least 1)" >&2
    exit 2
    ;;
esac

# Its own build directory: the sanitizer flags would otherwise rebuild the main workspace's cache
# (scripts/test.sh exports CARGO_TARGET_DIR for that one).
export CARGO_TARGET_DIR="${CUSTOS_FUZZ_TARGET_DIR:-$HOME/.cache/custos/target-fuzz}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_odr_violation=0}"
corpus_root="${FUZZ_CORPUS:-$HOME/.cache/custos/fuzz-corpus}"
# One log directory per run: runs from several clones may share the machine.
if [ -n "${FUZZ_LOGS:-}" ]; then
  logs="$FUZZ_LOGS"
else
  logs="$HOME/.cache/custos/fuzz-logs/$(date +%Y%m%d-%H%M%S)-$$"
  # keep the 20 newest runs' logs
  find "$HOME/.cache/custos/fuzz-logs" -mindepth 1 -maxdepth 1 -type d -name '20*-*' 2>/dev/null |
    sort | head -n -20 | xargs -r rm -rf -- || true
fi

# The sanitizer flags are unstable: use nightly when there is one, else the pinned toolchain with
# RUSTC_BOOTSTRAP=1 (machines that can fetch no other toolchain; stable ships the ASan runtime).
if [ "${CUSTOS_FUZZ_NIGHTLY:-1}" != "0" ] && rustup run nightly rustc --version >/dev/null 2>&1; then
  tc=(+nightly)
  echo "toolchain: $(rustup run nightly rustc --version)"
else
  tc=()
  export RUSTC_BOOTSTRAP=1
  echo "toolchain: $(rustc --version) with RUSTC_BOOTSTRAP=1 (no nightly used)"
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "cargo-fuzz is missing: installing it (cargo install cargo-fuzz --locked)"
  cargo install cargo-fuzz --locked
fi

if [ -n "${FUZZ_TARGETS:-}" ]; then
  read -r -a targets <<<"$FUZZ_TARGETS"
else
  mapfile -t targets < <(cargo "${tc[@]}" fuzz list)
fi

# Release build with debug assertions and ASan, all targets at once. cargo-fuzz compiles every
# crate as one codegen unit by default: the fastest fuzzing, but no parallelism in LLVM, and with
# opt-level 3 a cold build took 41 minutes here. Brief runs (CI) build with 16 units and
# fuzz/Cargo.toml's opt-level 1; for long runs use
#   CUSTOS_FUZZ_CGU=1 CARGO_PROFILE_RELEASE_OPT_LEVEL=3 ./scripts/fuzz.sh 600
cgu="${CUSTOS_FUZZ_CGU:-16}"
build_start=$(date +%s)
nice -n 19 cargo "${tc[@]}" fuzz build --codegen-units "$cgu"
build_secs=$(($(date +%s) - build_start))
echo "build: ${#targets[@]} targets in ${build_secs} s (codegen units $cgu, opt-level ${CARGO_PROFILE_RELEASE_OPT_LEVEL:-1}, target dir $CARGO_TARGET_DIR)"

bin_dir="$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release"
mkdir -p "$logs"
summary=()
failed=0
run_start=$(date +%s)
for t in "${targets[@]}"; do
  scratch="$corpus_root/$t"
  mkdir -p "$scratch" "fuzz/artifacts/$t"
  # libFuzzer writes new inputs only to the first directory (the scratch corpus); the committed
  # ones after it are read.
  inputs=("$scratch")
  for d in "fuzz/corpus/$t" "fuzz/seeds/$t" "fuzz/regressions/$t"; do
    [ -d "$d" ] && inputs+=("$d")
  done
  log="$logs/$t.log"
  echo "fuzzing $t for ${secs} s (log: $log)"
  set +e
  nice -n 19 "$bin_dir/$t" \
    -max_total_time="$secs" -timeout=30 -print_final_stats=1 \
    -artifact_prefix="fuzz/artifacts/$t/" \
    "${inputs[@]}" >"$log" 2>&1
  rc=$?
  set -e
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  [ -n "$execs" ] || execs=$(sed -n 's/^#\([0-9]*\)[[:space:]].*/\1/p' "$log" | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
  if [ "$rc" -eq 0 ]; then
    status="ok"
  else
    failed=1
    artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
    status="FAILED (exit $rc) ${artifact:-see $log}"
    grep -m1 -E "panicked at|ERROR: (AddressSanitizer|libFuzzer)" "$log" | sed 's/^/    /' || true
    grep -m1 -A3 "panicked at" "$log" | tail -n +2 | cut -c1-400 | sed 's/^/    /' || true
    if [ -n "$artifact" ] && [ -f "$artifact" ]; then
      # So that a CI log alone reproduces it: base64 -d > input; $bin_dir/$t input
      echo "    input ($(wc -c <"$artifact") bytes, base64):"
      head -c 8192 "$artifact" | base64 -w 100 | sed 's/^/      /'
    fi
  fi
  summary+=("$(printf '%-13s %5s s %12s execs  cov %-6s %s' "$t" "$secs" "${execs:-?}" "${cov:-?}" "$status")")
done
run_secs=$(($(date +%s) - run_start))

echo
echo "fuzz summary (build ${build_secs} s, runs ${run_secs} s):"
printf '  %s\n' "${summary[@]}"
if [ "$failed" -ne 0 ]; then
  echo "a fuzz target crashed or broke its property: reproduce with $bin_dir/<target> <input>;" \
    "minimise with cargo +nightly fuzz tmin <target> <input>; save it under fuzz/regressions/<target>/" >&2
  exit 1
fi
