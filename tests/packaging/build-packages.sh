#!/usr/bin/env bash
# CTest fixture: builds the .deb and .rpm once per run with scripts/package.sh, plus a
# release-2 .rpm of the same tree for the RPM upgrade test.
# usage: build-packages.sh PKG_DIR   (build tree PKG_DIR/build, packages in PKG_DIR/dist,
#                                     the test-only upgrade .rpm in PKG_DIR/upgrade)
set -euo pipefail
pkg=${1:?usage: $0 PKG_DIR}
src=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$pkg"
exec 9>"$pkg/.lock"
flock 9
start=$(date +%s)
PKG_BUILD_DIR="$pkg/build" "$src/scripts/package.sh" "$pkg/dist"
rm -rf "$pkg/upgrade"
(cd "$pkg/build" && cpack -G RPM -D CPACK_RPM_PACKAGE_RELEASE=2 -B "$pkg/upgrade" >"$pkg/upgrade.log" 2>&1) \
  || { cat "$pkg/upgrade.log"; exit 1; }
echo "packages built in $(( $(date +%s) - start )) s"
