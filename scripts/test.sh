#!/usr/bin/env bash
# The whole test suite: installs what is missing, builds, runs the fuzz targets for a
# bounded time, then every unit, integration and end-to-end test through CTest.
#   FUZZ_SECONDS=N  seconds per fuzz target (default 30; 0 skips fuzzing)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh test
BUILD_DIR=${BUILD_DIR:-build} scripts/build.sh -DSMTPLB_TESTS=ON -DSMTPLB_WERROR=ON
fuzz=${FUZZ_SECONDS:-30}
if [ "$fuzz" != 0 ]; then
  scripts/fuzz.sh "$fuzz"
fi
ctest --test-dir "${BUILD_DIR:-build}" --output-on-failure -j2 --timeout 600
