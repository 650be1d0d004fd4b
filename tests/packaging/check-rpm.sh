#!/usr/bin/env bash
# The .rpm: file list (no %config file: the configuration is the operator's), requirements (nothing Debian-only,
# symbol versions RHEL 9 has) and the hand-written scriptlets.
# usage: check-rpm.sh DIST_DIR VERSION
. "$(dirname "$0")/common.sh"
q() { rpm -qp --nosignature "$@" "$rpm" 2>/dev/null; }

check "Name/Version/Release/Arch" test "$(q --qf '%{NAME} %{VERSION} %{RELEASE} %{ARCH}')" = "smtplb $version 1 x86_64"
check "not relocatable" test "$(q --qf '%{PREFIXES}')" = "(none)"
echo "     Packager: $(q --qf '%{PACKAGER}'), Vendor: $(q --qf '%{VENDOR}')"
check "Packager is the project's identity (the .deb's Maintainer)" test "$(q --qf '%{PACKAGER}')" = "$maintainer"

# Everything the package owns, with flags (c: %config, n: noreplace, d: %doc), mode, owner.
q --qf '[%{FILEFLAGS:fflags}|%{FILEMODES:perms}|%{FILEUSERNAME}:%{FILEGROUPNAME}|%{FILENAMES}\n]' \
  | sort -t'|' -k4 >"$work/files"
sort -t'|' -k4 >"$work/want" <<'LIST'
|-rw-r--r--|root:root|/usr/lib/systemd/system/smtplb-agent.service
|-rw-r--r--|root:root|/usr/lib/systemd/system/smtplb.service
|-rw-r--r--|root:root|/usr/lib/sysusers.d/smtplb.conf
|-rwxr-xr-x|root:root|/usr/sbin/smtplb
|drwxr-xr-x|root:root|/usr/share/doc/smtplb
d|-rw-r--r--|root:root|/usr/share/doc/smtplb/changelog.gz
d|-rw-r--r--|root:root|/usr/share/doc/smtplb/copyright
|drwxr-xr-x|root:root|/usr/share/doc/smtplb/examples
|drwxr-xr-x|root:root|/usr/share/doc/smtplb/examples/grafana
d|-rw-r--r--|root:root|/usr/share/doc/smtplb/examples/grafana/smtplb-dashboard.json
|drwxr-xr-x|root:root|/usr/share/doc/smtplb/examples/keepalived
d|-rw-r--r--|root:root|/usr/share/doc/smtplb/examples/keepalived/keepalived.conf
d|-rw-r--r--|root:root|/usr/share/doc/smtplb/examples/keepalived/smtplb-ha-network.sh
|drwxr-xr-x|root:root|/usr/share/doc/smtplb/examples/prometheus
d|-rw-r--r--|root:root|/usr/share/doc/smtplb/examples/prometheus/smtplb.rules.yml
d|-rw-r--r--|root:root|/usr/share/man/man5/smtplb.toml.5.gz
d|-rw-r--r--|root:root|/usr/share/man/man8/smtplb.8.gz
|drwxr-xr-x|root:root|/usr/share/smtplb
|-rw-r--r--|root:root|/usr/share/smtplb/agent.toml
|-rw-r--r--|root:root|/usr/share/smtplb/smtplb.toml
LIST
check "file list, flags, modes (nothing is %config)" diff -u "$work/want" "$work/files"
check "rpm -qcp lists nothing" test -z "$(q -c)"

q --requires >"$work/requires"
echo "     requires:"; paste -sd' ' "$work/requires" | fold -s -w 100 | sed 's/^/       /'
check "library requirements are glibc, libstdc++, libgcc_s and OpenSSL 3 only" bash -c \
  "! grep -E '^lib|^ld-' '$work/requires' | sed -E 's/\\(.*//' | sort -u \
     | grep -vxE 'libc\\.so\\.6|libm\\.so\\.6|ld-linux-x86-64\\.so\\.2|libstdc\\+\\+\\.so\\.6|libgcc_s\\.so\\.1|libssl\\.so\\.3|libcrypto\\.so\\.3'"
ver_ok() { # PREFIX MAX: every PREFIX_x.y in the requirements is <= MAX
  local max
  max=$(grep -oE "\\($1_[0-9.]+\\)" "$work/requires" | tr -d '()' | sed "s/^$1_//" | sort -V | tail -1)
  echo "     highest $1: ${max:-none}"
  [ -z "$max" ] || [ "$(printf '%s\n%s\n' "$max" "$2" | sort -V | tail -1)" = "$2" ]
}
check "GLIBC versions <= 2.34 (RHEL 9)" ver_ok GLIBC 2.34
check "GLIBCXX versions <= 3.4.29 (RHEL 9)" ver_ok GLIBCXX 3.4.29
check "CXXABI versions <= 1.3.13 (RHEL 9)" ver_ok CXXABI 1.3.13
check "OpenSSL symbol versions are OPENSSL_3.0.0 only" bash -c \
  "grep -oE 'OPENSSL_[0-9.]+' '$work/requires' | sort -u | grep -qvx OPENSSL_3.0.0 && exit 1 || exit 0"
check "%pre requires shadow-utils (useradd)" grep -qx shadow-utils "$work/requires"

q --scripts >"$work/scripts"
section() { awk -v s="$1 scriptlet" 'index($0, s) == 1 { on = 1; next } / scriptlet \(using/ { on = 0 } on' "$work/scripts"; }
for s in preinstall postinstall preuninstall postuninstall; do
  check "$s scriptlet present" test -n "$(section $s)"
  check "$s scriptlet parses (sh -n)" bash -c "sh -n <<<\"\$0\"" "$(section $s)"
done
check "no unexpanded RPM macros in scriptlets" bash -c "! grep -q '%{\\?systemd\\|%systemd' '$work/scripts'"
check "%pre: groupadd -r / useradd -r smtplb" bash -c \
  "grep -q 'groupadd -r smtplb' <<<\"\$0\" && grep -q 'useradd -r .* smtplb' <<<\"\$0\"" "$(section preinstall)"
check "%post: enable on first install only, where systemd runs" bash -c \
  "grep -q '\\[ -d /run/systemd/system \\]' <<<\"\$0\" && grep -q '\"\$1\" -eq 1' <<<\"\$0\" \
   && grep -q 'systemctl enable smtplb.service' <<<\"\$0\" && ! grep -q 'enable --now' <<<\"\$0\"" "$(section postinstall)"
check "%post: start only when the operator's config exists" bash -c \
  "grep -B1 'systemctl start smtplb.service' <<<\"\$0\" | grep -q 'if \\[ -e \"\\\$conf\" \\]'" "$(section postinstall)"
check "%post: no restart on upgrade" bash -c "! grep -Ev '^ *(#|echo)' <<<\"\$0\" | grep -q restart" "$(section postinstall)"
check "%preun: stops and disables on erase only" bash -c \
  "grep -q '\"\$1\" -eq 0' <<<\"\$0\" && grep -q 'systemctl disable --now smtplb.service' <<<\"\$0\"" "$(section preuninstall)"
check "%postun: daemon-reload where systemd runs" bash -c \
  "grep -q 'systemctl daemon-reload' <<<\"\$0\"" "$(section postuninstall)"

mkdir -p "$work/root"
(cd "$work/root" && rpm2cpio "$rpm" | cpio -idm --quiet)
check "RPM reference config equals conf/smtplb.toml" cmp -s "$work/root/usr/share/smtplb/smtplb.toml" "$src/conf/smtplb.toml"
for f in keepalived/keepalived.conf keepalived/smtplb-ha-network.sh prometheus/smtplb.rules.yml \
         grafana/smtplb-dashboard.json; do
  check "RPM example $f equals packaging/$f" \
    cmp -s "$work/root/usr/share/doc/smtplb/examples/$f" "$src/packaging/$f"
done
check "RPM unit equals packaging/smtplb.service" cmp -s "$work/root/usr/lib/systemd/system/smtplb.service" "$src/packaging/smtplb.service"
finish
