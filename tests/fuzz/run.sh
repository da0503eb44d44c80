#!/usr/bin/env bash
# The fuzz-smoke lane: builds every fuzz target once (cargo-fuzz on the nightly toolchain,
# installed here if missing) and runs each from its checked-in corpus for a bounded time
# (FUZZ_SECONDS, default 10; the lane's timings are in docs/fuzzing.md). Targets with a
# libFuzzer dictionary (dict/, see dict_for) get -dict=. A crash, leak, timeout or
# out-of-memory fails the lane; the artifact's path is in libFuzzer's output. Prints the
# build's and the lane's time and 'fuzz: N passed, M failed'.
# Usage: tests/fuzz/run.sh [TARGET...]   (default: every target)
set -uo pipefail
cd "$(dirname "$0")"
secs=${FUZZ_SECONDS:-10}
export CARGO_TERM_COLOR=never
if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "no nightly toolchain: the fuzz targets cannot build"; echo "fuzz: 0 passed, 1 failed"; exit 1
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo +nightly install cargo-fuzz --locked >/tmp/cargo-fuzz-install.log 2>&1 ||
    { tail -n 20 /tmp/cargo-fuzz-install.log; echo "fuzz: 0 passed, 1 failed"; exit 1; }
fi
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo +nightly fuzz list)
echo "building ${#targets[@]} targets"
# cargo-fuzz has no --locked: check the lockfile is current first (CI builds locked).
cargo +nightly fetch --locked >/dev/null || { echo "tests/fuzz/Cargo.lock is out of date"; echo "fuzz: 0 passed, 1 failed"; exit 1; }
started=$SECONDS
build_log=$(mktemp)
if ! cargo +nightly fuzz build -O >"$build_log" 2>&1; then
  tail -n 30 "$build_log"; rm -f "$build_log"
  echo "building the fuzz targets failed"; echo "fuzz: 0 passed, ${#targets[@]} failed"; exit 1
fi
rm -f "$build_log"
echo "built in $((SECONDS - started)) s"
# The dictionary a target runs with, if any (checked-in, under dict/).
dict_for() {
  case "$1" in
    ui_http) echo "$PWD"/dict/http.dict ;;
    config) echo "$PWD"/dict/config.dict ;;
    policy) echo "$PWD"/dict/policy.dict ;;
    control) echo "$PWD"/dict/control.dict ;;
    credentials) echo "$PWD"/dict/credentials.dict ;;
  esac
}
pass=0; fail=0
for t in "${targets[@]}"; do
  log=$(mktemp)
  mkdir -p "corpus/$t"
  # A scratch corpus: new inputs found here are not written into the repository's.
  scratch=$(mktemp -d)
  dict=$(dict_for "$t")
  cargo +nightly fuzz run -O "$t" "$scratch" "corpus/$t" -- ${dict:+-dict="$dict"} \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=8192 -print_final_stats=1 >"$log" 2>&1
  rc=$?
  done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n1)
  execs=$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}')
  if [ $rc -eq 0 ]; then
    pass=$((pass + 1)); echo "fuzz $t: ok, ${execs:-?} executions in ${secs}s: $done_line"
  else
    fail=$((fail + 1)); echo "fuzz $t: FAILED (exit $rc)"
    grep -E 'panicked|ERROR: libFuzzer|SUMMARY|Test unit written to|artifact_prefix' "$log" | head -n 20
    tail -n 30 "$log"
  fi
  rm -rf "$scratch" "$log"
done
echo "fuzz-smoke: ${SECONDS} s in all (build and ${#targets[@]} runs of ${secs} s)"
echo "fuzz: $pass passed, $fail failed"
[ $fail -eq 0 ]
