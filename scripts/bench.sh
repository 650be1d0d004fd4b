#!/usr/bin/env bash
# Installs what is missing, builds smtplb (optimised, into build/) and runs the
# side-by-side benchmark: a direct connection, HAProxy (nbthread 1) and smtplb in front of
# the same smtp-sink backends on loopback. Prints messages/s, CPU per message, greeting
# latency and memory per idle session, with smtplb/HAProxy ratios; --tests scale (or --quick)
# runs the scale and overload modes: concurrency, overload, storm, fleet and idle.
# usage: scripts/bench.sh [bench.py options]   e.g. --tests connect --rounds 5 --workers 1,2
# See docs/performance.md for what the figures mean and how to read them.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh bench
scripts/build.sh >/dev/null
exec python3 scripts/bench.py --smtplb "${BUILD_DIR:-build}/smtplb" "$@"
