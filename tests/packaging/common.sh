# Sourced by the package tests: usage: TEST DIST_DIR VERSION
# Sets deb, rpm, version, src (the repository), work (a temporary directory removed on
# exit); check/fail/finish count and report failures. A test that needs no package sets
# no_packages=1 before sourcing this file and takes no arguments.
set -euo pipefail
src=$(cd "$(dirname "$0")/../.." && pwd)
if [ "${no_packages:-0}" != 1 ]; then
  dist=${1:?usage: $0 DIST_DIR VERSION}
  version=${2:?usage: $0 DIST_DIR VERSION}
  deb=$dist/smtplb_${version}_amd64.deb
  rpm=$dist/smtplb-${version}-1.x86_64.rpm
  for f in "$deb" "$rpm"; do
    [ -f "$f" ] || { echo "FAIL: no package $f (the packaging.build test builds them)" >&2; exit 1; }
  done
fi
# The project's identity as packages carry it (packaging/packaging.cmake).
maintainer=$(sed -nE 's/^set\(SMTPLB_PACKAGE_MAINTAINER "([^"]*)"\)?$/\1/p' "$src/packaging/packaging.cmake")
work=$(mktemp -d /tmp/smtplb-pkgtest.XXXXXX)
cleanup_hooks=()
cleanup() { for h in "${cleanup_hooks[@]}"; do eval "$h" || true; done; rm -rf "$work"; }
trap cleanup EXIT
failures=0
ok() { echo "ok   $*"; }
fail() { echo "FAIL $*"; failures=$((failures + 1)); }
# check DESCRIPTION COMMAND...: runs COMMAND, counts a failure if it fails.
check() { local d=$1; shift; if "$@"; then ok "$d"; else fail "$d"; fi; }
finish() {
  if [ "$failures" -ne 0 ]; then echo "$failures check(s) failed"; exit 1; fi
  echo "all checks passed"
}

# make_root [TARBALL]: a fresh minimal bookworm root in $root (from the tarball cached by
# bookworm-root.sh, or TARBALL) with /proc mounted; in_root runs a command inside it.
make_root() {
  local t0 tarball
  t0=$(date +%s)
  tarball=${1:-$("$src/tests/packaging/bookworm-root.sh")}
  root=$work/root
  mkdir -p "$root"
  tar -C "$root" --numeric-owner -xf "$tarball"
  chmod 0755 "$root"
  mkdir -p "$root/proc"
  mount -t proc proc "$root/proc"
  cleanup_hooks+=("umount -l '$root/proc'")
  echo "     root unpacked from $tarball in $(( $(date +%s) - t0 )) s"
}
in_root() {
  chroot "$root" env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    DEBIAN_FRONTEND=noninteractive LC_ALL=C "$@"
}

# fake_systemd: makes the root look like systemd runs there ([ -d /run/systemd/system ])
# and puts a systemctl in /usr/bin (apt runs dpkg with PATH=/usr/sbin:/usr/bin:/sbin:/bin)
# that logs its arguments to $log and keeps an enabled symlink and an "active" flag.
# calls REGEX prints the logged calls matching REGEX.
fake_systemd() {
  mkdir -p "$root/run/systemd/system"
  cat >"$root/usr/bin/systemctl" <<'STUB'
#!/bin/sh
echo "systemctl $*" >>/var/log/systemctl.log
wants=/etc/systemd/system/multi-user.target.wants/smtplb.service
case " $* " in
  *" --version "*) echo "systemd 252 (252)" ;;
  *" preset "*|*" enable "*)
    mkdir -p "${wants%/*}" && ln -sf /usr/lib/systemd/system/smtplb.service "$wants"
    case " $* " in *" --now "*) touch /run/smtplb.fake-active ;; esac ;;
  *" disable "*)
    rm -f "$wants"
    case " $* " in *" --now "*) rm -f /run/smtplb.fake-active ;; esac ;;
  *" is-enabled "*) if [ -e "$wants" ]; then echo enabled; else echo disabled; exit 1; fi ;;
  *" is-active "*) [ -e /run/smtplb.fake-active ] || exit 3 ;;
  *" restart "*|*" start "*) touch /run/smtplb.fake-active ;;
  *" stop "*) rm -f /run/smtplb.fake-active ;;
esac
exit 0
STUB
  chmod 0755 "$root/usr/bin/systemctl"
  log=$root/var/log/systemctl.log
  : >"$log"
}
calls() { grep -E -- "$1" "$log" 2>/dev/null | grep -v -- '--version' || true; }
# The agent's unit is installed, never enabled or started by the maintainer scripts: no
# systemctl call names it and no enablement link or deb-systemd-helper state exists.
agent_untouched() {
  [ -f "$root/usr/lib/systemd/system/smtplb-agent.service" ] &&
    [ -z "$(calls smtplb-agent)" ] &&
    [ -z "$(find "$root/etc/systemd" "$root/var/lib/systemd" -name 'smtplb-agent*' 2>/dev/null)" ]
}
show_calls() { sed 's/^/     /' "$log"; }
reset_calls() { : >"$log"; }
