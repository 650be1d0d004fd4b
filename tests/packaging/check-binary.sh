#!/usr/bin/env bash
# The packaged binary runs on RHEL 9 too: one binary in both packages, its NEEDED
# libraries are ones every glibc distribution has (fmt, spdlog, toml++, libuv compiled
# in), its symbol versions are at most GLIBC_2.34, GLIBCXX_3.4.29, CXXABI_1.3.13 and
# OPENSSL_3.0.0, no RPATH; hardened (PIE, full RELRO); and it works.
# usage: check-binary.sh DIST_DIR VERSION
. "$(dirname "$0")/common.sh"

dpkg-deb -x "$deb" "$work/deb"
mkdir -p "$work/rpm"
(cd "$work/rpm" && rpm2cpio "$rpm" | cpio -idm --quiet)
bin=$work/deb/usr/sbin/smtplb
check "the .deb and the .rpm ship the same binary" cmp -s "$bin" "$work/rpm/usr/sbin/smtplb"
echo "     size: $(stat -c %s "$bin") bytes (stripped)"

objdump -p "$bin" >"$work/headers"
needed=$(awk '$1 == "NEEDED" { print $2 }' "$work/headers" | sort)
echo "     NEEDED: $(paste -sd' ' <<<"$needed")"
allowed='libc.so.6 libm.so.6 ld-linux-x86-64.so.2 libstdc++.so.6 libgcc_s.so.1 libssl.so.3 libcrypto.so.3'
for lib in $needed; do
  check "NEEDED $lib is allowed" bash -c "grep -qw -- '$lib' <<<'$allowed'"
done
for lib in libuv libfmt libspdlog libtomlplusplus; do
  check "no NEEDED $lib*" bash -c "! grep -q '^$lib' <<<'$needed'"
done
check "no RPATH/RUNPATH" bash -c "! grep -Eq '^ *(RPATH|RUNPATH) ' '$work/headers'"

# Version references (the "Version References" block of objdump -p).
awk '/^Version References:/ { on = 1; next } on && /^ *0x/ { print $NF }' "$work/headers" | sort -u >"$work/versions"
maxver() { grep "^$1_" "$work/versions" | sed "s/^$1_//" | sort -V | tail -1; }
le() { [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | tail -1)" = "$2" ]; }
for pair in GLIBC:2.34 GLIBCXX:3.4.29 CXXABI:1.3.13 GCC:7.0.0; do
  name=${pair%%:*} max=${pair#*:} got=$(maxver "${pair%%:*}")
  check "highest $name version ${got:-none} <= $max" bash -c "[ -z '$got' ] || [ \"\$(printf '%s\n%s\n' '$got' '$max' | sort -V | tail -1)\" = '$max' ]"
done
check "OpenSSL versions: OPENSSL_3.0.0 only" test "$(grep '^OPENSSL' "$work/versions" | paste -sd' ')" = OPENSSL_3.0.0
# Cross-check the dynamic symbol table itself.
objdump -T "$bin" | grep -oE '(GLIBC|GLIBCXX|CXXABI|OPENSSL)_[0-9.]+' | sort -u >"$work/symvers"
check "dynamic symbols agree with the version references" bash -c \
  "comm -23 '$work/symvers' '$work/versions' | grep -q . && exit 1 || exit 0"

check "PIE (ELF type DYN)" bash -c "LC_ALL=C readelf -h '$bin' | grep -q 'Type:.*DYN'"
check "full RELRO (BIND_NOW)" bash -c "LC_ALL=C readelf -d '$bin' | grep -Eq 'BIND_NOW|FLAGS_1.*NOW'"
check "stripped" bash -c "! LC_ALL=C readelf -S '$bin' | grep -q '\\.debug_info'"

check "smtplb --version says $version" bash -c "'$bin' --version | grep -qF '$version'"
check "smtplb --check passes on the reference config" "$bin" --check -q -f "$work/deb/usr/share/smtplb/smtplb.toml"
check "smtplb agent --check passes on the reference agent config" \
  "$bin" agent --check -f "$work/deb/usr/share/smtplb/agent.toml"
printf '[listener.mx]\nport = "25"\n' >"$work/bad.toml"
set +e; "$bin" --check -q -f "$work/bad.toml" >/dev/null 2>&1; rc=$?; set -e
check "smtplb --check exits 78 on a bad config (got $rc)" test "$rc" = 78
finish
