#!/usr/bin/env bash
# lintian on the .deb: no errors (warnings are printed; the package has none today).
# usage: check-lintian.sh DIST_DIR VERSION
. "$(dirname "$0")/common.sh"
# lintian leaves temporary files (mldbm-elf-*) in $TMPDIR: there, that is in $work,
# which common.sh removes on exit.
mkdir -p "$work/tmp"
set +e
TMPDIR=$work/tmp lintian --fail-on error --display-info --pedantic "$deb" >"$work/lintian" 2>&1
rc=$?
set -e
grep -v 'running with root privileges' "$work/lintian" | sed 's/^/     /'
echo "     lintian: $(grep -c '^E:' "$work/lintian") error(s), $(grep -c '^W:' "$work/lintian") warning(s), $(grep -c '^[IP]:' "$work/lintian") info/pedantic"
check "lintian reports no errors" test "$rc" = 0
finish
