#!/usr/bin/env bash
# Installs the Debian packages smtplb needs, only those missing (idempotent).
# usage: scripts/deps.sh build|demo|bench|package|test
#        scripts/deps.sh --list SET     prints the set's packages, one a line, installs nothing
#   build: compiler, CMake, the libraries, and python3 (CMake looks for it: the tests are
#          on by default, and doctest for them); all scripts/build.sh needs on a minimal
#          Debian 12 (no python3 there)
#   package: build + what CPack needs for the .deb and .rpm (scripts/package.sh)
#   demo:  build + smtp-sink/smtp-source (postfix), swaks, and curl for the metrics hint
#   bench: build + smtp-sink/smtp-source (postfix), haproxy (the comparison)
#   test:  demo + haproxy (a PROXY protocol peer), prometheus (promtool checks /metrics and the
#          alerting rules), strace (system calls per session), keepalived and nftables (the
#          keepalived pair in network namespaces, tests/e2e/test_ha_pair.py) and clang's
#          libFuzzer runtime for the fuzz targets; package + lintian, debootstrap, systemd
#          (systemd-analyze), binutils (objdump), cpio and man-db for the package tests;
#          clang-format-14 (scripts/format.sh, pinned); GCC's sanitizer runtimes come with g++
set -euo pipefail

list=0
if [ "${1:-}" = --list ]; then list=1; shift; fi
want=(g++ cmake ninja-build pkg-config libuv1-dev libssl-dev libtomlplusplus-dev libspdlog-dev doctest-dev python3)
demo=(postfix swaks curl)
package=(rpm dpkg-dev file xz-utils)
case "${1:-build}" in
  build) ;;
  demo) want+=("${demo[@]}") ;;
  bench) want+=(postfix haproxy) ;;
  package) want+=("${package[@]}") ;;
  test) want+=("${demo[@]}" "${package[@]}" haproxy prometheus clang libclang-rt-14-dev procps iproute2 strace
        keepalived nftables
        lintian debootstrap systemd binutils cpio man-db clang-format-14) ;;
  *) echo "usage: $0 [--list] build|demo|bench|package|test" >&2; exit 64 ;;
esac
if [ "$list" = 1 ]; then printf '%s\n' "${want[@]}"; exit 0; fi

missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "deps: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  sudo="sudo"
fi
echo "deps: installing ${missing[*]}"
# Postfix must not ask questions or claim port 25: smtplb's tests run private instances.
echo "postfix postfix/main_mailer_type select No configuration" | $sudo debconf-set-selections
$sudo apt-get update -qq
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
