#!/usr/bin/env bash
# Builds the smtplb packages, a .deb and an .rpm sharing one portable binary (CPack; see
# packaging/), into a folder:
#   scripts/package.sh [OUTDIR]        default OUTDIR: dist
#   PKG_BUILD_DIR=DIR                  the package build tree (default build/packages)
# Installs what is missing first (scripts/deps.sh package).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-dist}
bdir=${PKG_BUILD_DIR:-build/packages}
scripts/deps.sh package
cmake -S . -B "$bdir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DSMTPLB_PORTABLE=ON -DSMTPLB_TESTS=OFF -DSMTPLB_WERROR=OFF >/dev/null
cmake --build "$bdir"
rm -f "$bdir"/smtplb_*.deb "$bdir"/smtplb-*.rpm
(cd "$bdir" && cpack -G "DEB;RPM" >cpack.log 2>&1) || { cat "$bdir/cpack.log" >&2; exit 1; }
mkdir -p "$out"
rm -f "$out"/smtplb_*.deb "$out"/smtplb-*.rpm
cp "$bdir"/smtplb_*.deb "$bdir"/smtplb-*.rpm "$out"/
ls -l "$out"/smtplb_*.deb "$out"/smtplb-*.rpm
