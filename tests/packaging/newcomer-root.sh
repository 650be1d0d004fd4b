#!/usr/bin/env bash
# Prints the path of a tarball holding what a newcomer starts from: a minimal Debian
# bookworm (bookworm-root.sh's root) with git, ca-certificates and sudo installed, apt's
# package lists, and the .deb files of `scripts/deps.sh test` (a superset of the demo's)
# downloaded into apt's archive cache but NOT installed; creating it on first use
# (network: apt-get, about 400 MB). check-newcomer.sh runs the README's commands in it
# without network: their scripts/deps.sh still decides what is missing and installs it
# with apt-get, which finds the files in its cache instead of downloading them.
#   SMTPLB_NEWCOMER_CACHE=FILE  the tarball (default /var/cache/smtplb-test/newcomer-root.tar)
# A change of the test command's package list (scripts/deps.sh) or of the base root rebuilds it.
set -euo pipefail
src=$(cd "$(dirname "$0")/../.." && pwd)
cache=${SMTPLB_NEWCOMER_CACHE:-/var/cache/smtplb-test/newcomer-root.tar}
base=$("$src/tests/packaging/bookworm-root.sh")
spec="$(cat "$base.spec" 2>/dev/null) + git,ca-certificates,sudo + downloaded: $("$src/scripts/deps.sh" --list test | paste -sd,)"
fresh() { [ -s "$cache" ] && [ "$(cat "$cache.spec" 2>/dev/null)" = "$spec" ]; }
if fresh; then echo "$cache"; exit 0; fi

mkdir -p "$(dirname "$cache")"
exec 9>"$cache.lock"
flock 9
if fresh; then echo "$cache"; exit 0; fi

start=$(date +%s)
echo "newcomer-root: installing git, ca-certificates, sudo and downloading the test command's packages (first run only)" >&2
tmp=$(mktemp -d "$(dirname "$cache")/newcomer.XXXXXX")
cleanup() {
  umount -l "$tmp/proc" 2>/dev/null || true
  rm -rf "$tmp" "$cache.tmp"
}
trap cleanup EXIT
tar -C "$tmp" --numeric-owner -xf "$base"
chmod 0755 "$tmp"
mkdir -p "$tmp/proc"
mount -t proc proc "$tmp/proc"
cp /etc/resolv.conf "$tmp/etc/resolv.conf"
in_tmp() {
  chroot "$tmp" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive LC_ALL=C "$@" \
    >>"$tmp.log" 2>&1 || { tail -n 30 "$tmp.log" >&2; rm -f "$tmp.log"; exit 1; }
}
in_tmp apt-get update
in_tmp apt-get install -y --no-install-recommends git ca-certificates sudo
# shellcheck disable=SC2046
in_tmp apt-get install -y --no-install-recommends --download-only $("$src/scripts/deps.sh" --list test)
rm -f "$tmp.log"
umount "$tmp/proc"
tar -C "$tmp" --numeric-owner -cf "$cache.tmp" .
mv "$cache.tmp" "$cache"
echo "$spec" >"$cache.spec"
echo "newcomer-root: created $cache ($(du -h "$cache" | cut -f1)) in $(( $(date +%s) - start )) s" >&2
echo "$cache"
