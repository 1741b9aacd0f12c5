#!/usr/bin/env bash
# Fuzz the parsers and the masking engine with cargo-fuzz (libFuzzer + AddressSanitizer).
#   ./scripts/fuzz.sh [SECONDS_PER_TARGET]              build, then run every target (default 30 s)
#   FUZZ_TARGETS="mask_text sse_stream" ./scripts/fuzz.sh 600   only these targets
#   CUSTOS_FUZZ_SKIP_KNOWN=1 ./scripts/fuzz.sh 600   do not stop on the findings already reported
# Targets and their properties: docs/reliability.md. Seeds (committed) are in fuzz/seeds/<target>/;
# libFuzzer adds what it finds to a scratch corpus outside the clone ($FUZZ_CORPUS, kept between
# runs on this machine), so the seeds stay as they are. A crash or a broken property leaves its
# input in fuzz/artifacts/<target>/ and makes the script fail.
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-30}"
case "$secs" in
  '' | *[!0-9]*)
    echo "usage: $0 [SECONDS_PER_TARGET]" >&2
    exit 2
    ;;
esac

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/custos/target-fuzz}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_odr_violation=0}"
corpus_root="${FUZZ_CORPUS:-$HOME/.cache/custos/fuzz-corpus}"
logs="${FUZZ_LOGS:-$HOME/.cache/custos/fuzz-logs}"

# The sanitizer flags are unstable: use nightly when there is one, else the pinned toolchain with
# RUSTC_BOOTSTRAP=1 (machines that can fetch no other toolchain; stable ships the ASan runtime).
if rustup run nightly rustc --version >/dev/null 2>&1; then
  tc=(+nightly)
  echo "toolchain: $(rustup run nightly rustc --version)"
else
  tc=()
  export RUSTC_BOOTSTRAP=1
  echo "toolchain: no nightly; $(rustc --version) with RUSTC_BOOTSTRAP=1"
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

# Release build with debug assertions and ASan, all targets at once (cargo-fuzz's defaults).
build_start=$(date +%s)
nice -n 19 cargo "${tc[@]}" fuzz build
build_secs=$(($(date +%s) - build_start))
echo "build: ${#targets[@]} targets in ${build_secs} s (target dir $CARGO_TARGET_DIR)"

bin_dir="$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release"
mkdir -p "$logs"
summary=()
failed=0
for t in "${targets[@]}"; do
  corpus="$corpus_root/$t"
  mkdir -p "$corpus" "fuzz/artifacts/$t"
  log="$logs/$t.log"
  echo "fuzzing $t for ${secs} s (log: $log)"
  set +e
  # New inputs go to the first (scratch) directory; the seeds are only read.
  nice -n 19 "$bin_dir/$t" \
    -max_total_time="$secs" -timeout=30 -print_final_stats=1 \
    -artifact_prefix="fuzz/artifacts/$t/" \
    "$corpus" "fuzz/seeds/$t" >"$log" 2>&1
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
    status="CRASH (exit $rc) ${artifact:-see $log}"
    grep -m1 -E "panicked at|ERROR: (AddressSanitizer|libFuzzer)" "$log" | sed 's/^/    /' || true
  fi
  summary+=("$(printf '%-13s %5s s %12s execs  cov %-6s %s' "$t" "$secs" "${execs:-?}" "${cov:-?}" "$status")")
done

echo
echo "summary (build ${build_secs} s):"
printf '  %s\n' "${summary[@]}"
if [ "$failed" -ne 0 ]; then
  echo "some targets crashed: reproduce with $bin_dir/<target> <artifact>; minimise with" \
    "cargo +nightly fuzz tmin <target> <artifact>" >&2
  exit 1
fi
