#!/usr/bin/env bash
# The whole test suite: installs what is missing, checks the formatting (clang-format 14),
# builds, runs the fuzz targets for a bounded time, then every unit, integration and
# end-to-end test through CTest, then the unit and integration tests again on the
# sanitizer builds (scripts/sanitize.sh: build-asan/ and build-tsan/).
#   FUZZ_SECONDS=N  seconds per fuzz target (default 30; 0 skips fuzzing)
#   SANITIZE=0      skip the sanitizer builds and runs (default 1)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh test
scripts/format.sh --check
BUILD_DIR=${BUILD_DIR:-build} scripts/build.sh -DSMTPLB_TESTS=ON -DSMTPLB_WERROR=ON
fuzz=${FUZZ_SECONDS:-30}
if [ "$fuzz" != 0 ]; then
  scripts/fuzz.sh "$fuzz"
fi
ctest --test-dir "${BUILD_DIR:-build}" --output-on-failure -j2 --timeout 600
if [ "${SANITIZE:-1}" != 0 ]; then
  scripts/sanitize.sh
fi
