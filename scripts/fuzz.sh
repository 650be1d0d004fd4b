#!/usr/bin/env bash
# Builds the libFuzzer targets with clang in build-fuzz/ and runs each one for SECONDS
# (default 30), starting from the seeds in tests/fuzz/corpus/<target>/. New corpus
# entries go to build-fuzz/corpus/<target>/ and crash inputs to build-fuzz/artifacts/,
# never into the source tree. Exits non-zero if any target crashes.
#   usage: scripts/fuzz.sh [SECONDS]
#   needs: clang and libclang-rt-14-dev (scripts/deps.sh test)
set -euo pipefail

seconds=${1:-30}
if ! [[ $seconds =~ ^[0-9]+$ ]] || [ "$seconds" -eq 0 ]; then
  echo "usage: $0 [SECONDS]   (a positive number of seconds per target)" >&2
  exit 64
fi

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=$root/build-fuzz
targets=(fuzz_smtp_reply fuzz_config fuzz_proxy_protocol fuzz_http fuzz_session_core fuzz_edge fuzz_agent_reply)

for tool in clang clang++ cmake ninja; do
  command -v "$tool" >/dev/null || { echo "fuzz: '$tool' not found (scripts/deps.sh test)" >&2; exit 1; }
done

mkdir -p "$build"
buildlog=$build/fuzz-build.log
if ! { CC=clang CXX=clang++ cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
         -DSMTPLB_FUZZ=ON -DSMTPLB_TESTS=ON &&
       ninja -C "$build" -j2 "${targets[@]}"; } >"$buildlog" 2>&1; then
  tail -n 30 "$buildlog" >&2
  echo "fuzz: building the fuzz targets failed (full log: $buildlog)" >&2
  exit 1
fi

status=0
for t in "${targets[@]}"; do
  bin=$build/tests/fuzz/$t
  seeds=$root/tests/fuzz/corpus/$t
  work=$build/corpus/$t
  artifacts=$build/artifacts/$t
  log=$build/$t.log
  mkdir -p "$work" "$artifacts"
  # The first corpus directory receives new inputs; the seeds are only read.
  set +e
  "$bin" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -dict="$root/tests/fuzz/$t.dict" -artifact_prefix="$artifacts/" "$work" "$seeds" >"$log" 2>&1
  rc=$?
  set -e
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 | cut -d' ' -f2 || true)
  corpus=$(find "$work" -type f | wc -l)
  if [ "$rc" -eq 0 ]; then
    echo "fuzz: $t ok: ${execs:-?} execs in ${seconds}s, coverage ${cov:-?}, corpus $corpus files"
  else
    status=1
    crash=$(find "$artifacts" -type f -newer "$log" 2>/dev/null | head -n 1)
    [ -n "$crash" ] || crash=$(ls -t "$artifacts"/* 2>/dev/null | head -n 1 || true)
    echo "fuzz: $t FAILED (exit $rc) after ${execs:-?} execs; input ${crash:-none}; log $log"
    grep -E -m 5 'ERROR|invariant failed|runtime error|SUMMARY' "$log" | sed 's/^/fuzz:   /' || true
  fi
done
exit "$status"
