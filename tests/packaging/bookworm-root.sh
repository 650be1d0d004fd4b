#!/usr/bin/env bash
# Prints the path of a tarball holding a minimal Debian bookworm root (debootstrap
# --variant=minbase plus smtplb's dependencies adduser, libssl3 and procps, so that
# installing smtplb's .deb needs no network), creating it on first use. The tarball is cached outside the repository so
# later runs (CI included) skip debootstrap:
#   SMTPLB_ROOT_CACHE=FILE  the tarball (default /var/cache/smtplb-test/bookworm-root.tar)
# The mirror is the one apt on this machine uses for bookworm main.
set -euo pipefail
cache=${SMTPLB_ROOT_CACHE:-/var/cache/smtplb-test/bookworm-root.tar}
# What the tarball holds, stored next to it: a change here rebuilds it.
spec="bookworm minbase adduser,libssl3,procps"
fresh() { [ -s "$cache" ] && [ "$(cat "$cache.spec" 2>/dev/null)" = "$spec" ]; }
if fresh; then echo "$cache"; exit 0; fi

mkdir -p "$(dirname "$cache")"
exec 9>"$cache.lock"
flock 9
if fresh; then echo "$cache"; exit 0; fi

mirror=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(TARGET_OF) $(COMPONENT)' \
  | awk '$2 == "bookworm" && $3 == "deb" && $4 == "main" { print $1; exit }')
if [ -z "$mirror" ]; then
  echo "bookworm-root: apt has no 'deb ... bookworm main' source to debootstrap from" >&2
  exit 1
fi
tmp=$(mktemp -d "$(dirname "$cache")/root.XXXXXX")
trap 'rm -rf "$tmp" "$cache.tmp"' EXIT
start=$(date +%s)
echo "bookworm-root: debootstrap bookworm from $mirror (first run only)" >&2
if ! debootstrap --variant=minbase --include=adduser,libssl3,procps bookworm "$tmp" "$mirror" \
     >"$tmp.log" 2>&1; then
  tail -n 30 "$tmp.log" >&2
  rm -f "$tmp.log"
  exit 1
fi
rm -f "$tmp.log"
rm -rf "$tmp"/var/cache/apt/archives/*.deb
chmod 0755 "$tmp"   # mktemp made it 0700; it becomes the root directory
tar -C "$tmp" --numeric-owner -cf "$cache.tmp" .
mv "$cache.tmp" "$cache"
echo "$spec" >"$cache.spec"
echo "bookworm-root: created $cache ($(du -h "$cache" | cut -f1)) in $(( $(date +%s) - start )) s" >&2
echo "$cache"
