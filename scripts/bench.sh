#!/usr/bin/env bash
# Installs what is missing, builds smtplb (optimised, into build/) and runs the
# side-by-side benchmark: a direct connection, HAProxy (nbthread 1) and smtplb in front of
# the same smtp-sink backends on loopback. Prints messages/s, CPU per message, greeting
# latency and memory per idle session, with smtplb/HAProxy ratios; --tests scale (or --quick)
# runs the scale and overload modes: concurrency, overload, storm, fleet and idle.
# usage: scripts/bench.sh [bench.py options]   e.g. --tests connect --rounds 5 --workers 1,2
#        scripts/bench.sh --affinity [SERVERS...]
#   source affinity instead: the table build time (control loop) and the lookup cost (data
#   path) for pools of SERVERS (default 5 50 1000), then the side-by-side with HAProxy
#   (tests/e2e/test_affinity_haproxy.py; SMTPLB_AFFINITY_KEYS, default 20000).
# See docs/performance.md for what the figures mean and how to read them.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == --affinity ]]; then
  shift
  TARGET=source_hash_bench scripts/build.sh >/dev/null
  TARGET=smtplb scripts/build.sh >/dev/null
  build=${BUILD_DIR:-build}
  "$build/tests/bench/source_hash_bench" "$@"
  SMTPLB_BIN="$build/smtplb" python3 tests/e2e/test_affinity_haproxy.py
  exit
fi
scripts/deps.sh bench
scripts/build.sh >/dev/null
exec python3 scripts/bench.py --smtplb "${BUILD_DIR:-build}/smtplb" "$@"
