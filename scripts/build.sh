#!/usr/bin/env bash
# Configures and builds smtplb into ${BUILD_DIR:-build}. Extra arguments go to CMake.
#   TARGET=NAME   build only that target (scripts/demo.sh: TARGET=smtplb)
set -euo pipefail
cd "$(dirname "$0")/.."
build=${BUILD_DIR:-build}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo "$@" >/dev/null
cmake --build "$build" -j2 ${TARGET:+--target "$TARGET"}
