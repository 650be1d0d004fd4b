#!/usr/bin/env bash
# Builds smtplb and its tests with sanitizers and runs the unit and integration tests
# (CTest labels unit and integration; never e2e, packaging or fuzz) on each build:
#   asan: build-asan/, AddressSanitizer (with LeakSanitizer) + UndefinedBehaviorSanitizer
#   tsan: build-tsan/, ThreadSanitizer
# Any sanitizer report fails: every report halts the process with exit status 66, and the
# integration harness (tests/integration/harness.py) fails a test when an smtplb process
# it ran exited 66 or wrote a report, also where the test expected a non-zero exit.
# Both builds always run; the exit status is non-zero when either failed.
#   usage: scripts/sanitize.sh [asan] [tsan]     (default: both)
#   SANITIZE_JOBS=N   parallel CTest jobs (default 2)
# Build type Debug at -O1: assertions on, sanitizer slowdown moderate, stacks readable.
set -euo pipefail
cd "$(dirname "$0")/.."

kinds=("$@")
[ ${#kinds[@]} -gt 0 ] || kinds=(asan tsan)
for k in "${kinds[@]}"; do
  case "$k" in asan | tsan) ;; *) echo "usage: $0 [asan] [tsan]" >&2; exit 64 ;; esac
done
jobs=${SANITIZE_JOBS:-2}

# halt_on_error + exitcode=66: the first report ends the process with a status smtplb
# never uses itself, which the integration harness checks (harness.SANITIZER_EXIT).
export ASAN_OPTIONS=detect_leaks=1:halt_on_error=1:exitcode=66:strict_string_checks=1:check_initialization_order=1:strict_init_order=1
export LSAN_OPTIONS=exitcode=66
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1:exitcode=66
export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:exitcode=66:history_size=4"

# Tests excluded per sanitizer: a CTest -E regex, each test with the reason. None so far:
# every unit and integration test passes within its timeout under both (integration_relay's
# RSS bounds included), and TSan reported nothing from the uninstrumented libuv (its libc
# interceptors also see libuv's calls, e.g. the eventfd write()/read() behind uv_async_send).
asan_exclude=""
tsan_exclude=""

now() { date +%s; }
status=0
summary=()

run() {
  local kind=$1 dir san exclude t0 t1 t2 rc log
  case "$kind" in
    asan) dir=build-asan san=address,undefined exclude=$asan_exclude ;;
    tsan) dir=build-tsan san=thread exclude=$tsan_exclude ;;
  esac
  echo "sanitize: $kind: building $dir (-DSMTPLB_SANITIZE=$san)"
  t0=$(now)
  if ! BUILD_DIR=$dir scripts/build.sh -DSMTPLB_TESTS=ON -DSMTPLB_WERROR=ON -DSMTPLB_SANITIZE=$san \
       -DCMAKE_BUILD_TYPE=Debug "-DCMAKE_CXX_FLAGS_DEBUG=-g -O1"; then
    echo "sanitize: $kind: build FAILED" >&2
    status=1; summary+=("$kind: build FAILED"); return
  fi
  t1=$(now)
  echo "sanitize: $kind: built in $((t1 - t0))s; running the unit and integration tests"
  # The JUnit file lets scripts/test.sh list what was skipped (scripts/skips.py).
  rm -f "$dir/Testing/junit.xml"
  local args=(--test-dir "$dir" -L 'unit|integration' --output-on-failure -j "$jobs" --timeout 600
              --output-junit "$PWD/$dir/Testing/junit.xml" --test-output-size-passed 4194304)
  [ -z "$exclude" ] || args+=(-E "$exclude")
  set +e
  ctest "${args[@]}"
  rc=$?
  set -e
  t2=$(now)
  # A second net: a report in any test's output (CTest keeps all of it) fails the run even
  # if that test passed, e.g. a report from a process whose output a test did not check.
  log=$dir/Testing/Temporary/LastTest.log
  if [ -f "$log" ] && grep -Eq 'SUMMARY: (Address|Leak|Thread|UndefinedBehavior)Sanitizer|WARNING: ThreadSanitizer|ERROR: (Address|Leak)Sanitizer' "$log"; then
    echo "sanitize: $kind: sanitizer report(s) in $log:" >&2
    grep -E 'SUMMARY: .*Sanitizer' "$log" | sort | uniq -c >&2 || true
    rc=1
  fi
  if [ "$rc" -ne 0 ]; then
    status=1; summary+=("$kind: tests FAILED (build $((t1 - t0))s, tests $((t2 - t1))s)")
  else
    summary+=("$kind: ok (build $((t1 - t0))s, tests $((t2 - t1))s)")
  fi
}

for k in "${kinds[@]}"; do
  run "$k"
done
printf 'sanitize: %s\n' "${summary[@]}"
exit "$status"
