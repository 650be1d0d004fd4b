#!/usr/bin/env bash
# The whole test suite: installs what is missing, checks the formatting (clang-format 14),
# builds, runs the fuzz targets for a bounded time, then every unit, integration and
# end-to-end test through CTest, then the unit and integration tests again on the
# sanitizer builds (scripts/sanitize.sh: build-asan/ and build-tsan/).
# At the end it lists every skip with its reason (scripts/skips.py): a test that could not
# run here (CTest: Skipped) and single cases skipped inside tests that ran.
#   FUZZ_SECONDS=N  seconds per fuzz target (default 30; 0 skips fuzzing)
#   SANITIZE=0      skip the sanitizer builds and runs (default 1)
set -euo pipefail
cd "$(dirname "$0")/.."
build=${BUILD_DIR:-build}
scripts/deps.sh test
scripts/format.sh --check
BUILD_DIR=$build scripts/build.sh -DSMTPLB_TESTS=ON -DSMTPLB_WERROR=ON
fuzz=${FUZZ_SECONDS:-30}
if [ "$fuzz" != 0 ]; then
  scripts/fuzz.sh "$fuzz"
fi
# JUnit files: each test's status and whole output (CTest keeps only 1 KiB of a passed
# test's output by default; the skip lines come last), read by scripts/skips.py.
junit=$(cd "$build" && pwd)/Testing/junit.xml
rm -f "$junit" build-asan/Testing/junit.xml build-tsan/Testing/junit.xml
status=0
ctest --test-dir "$build" --output-on-failure -j2 --timeout 600 --output-junit "$junit" \
  --test-output-size-passed 4194304 || status=$?
if [ "$status" = 0 ] && [ "${SANITIZE:-1}" != 0 ]; then
  scripts/sanitize.sh || status=$?
fi
scripts/skips.py "$build=$junit" build-asan=build-asan/Testing/junit.xml build-tsan=build-tsan/Testing/junit.xml
exit "$status"
