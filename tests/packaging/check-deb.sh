#!/usr/bin/env bash
# The .deb: file list and modes, control fields, no conffiles (the configuration is the
# operator's), maintainer scripts, and the shipped files equal to their sources.
# usage: check-deb.sh DIST_DIR VERSION
. "$(dirname "$0")/common.sh"

# Files (directories left out) with mode and owner, as dpkg-deb -c lists them.
dpkg-deb -c "$deb" | awk '$1 !~ /^d/ { print $1, $2, $6 }' | sort -k3 >"$work/files"
sort -k3 >"$work/want" <<'LIST'
-rw-r--r-- root/root ./usr/lib/systemd/system/smtplb-agent.service
-rw-r--r-- root/root ./usr/lib/systemd/system/smtplb.service
-rw-r--r-- root/root ./usr/lib/sysusers.d/smtplb.conf
-rwxr-xr-x root/root ./usr/sbin/smtplb
-rw-r--r-- root/root ./usr/share/doc/smtplb/changelog.gz
-rw-r--r-- root/root ./usr/share/doc/smtplb/copyright
-rw-r--r-- root/root ./usr/share/doc/smtplb/examples/grafana/smtplb-dashboard.json
-rw-r--r-- root/root ./usr/share/doc/smtplb/examples/keepalived/keepalived.conf
-rw-r--r-- root/root ./usr/share/doc/smtplb/examples/keepalived/smtplb-ha-network.sh
-rw-r--r-- root/root ./usr/share/doc/smtplb/examples/prometheus/smtplb.rules.yml
-rw-r--r-- root/root ./usr/share/man/man5/smtplb.toml.5.gz
-rw-r--r-- root/root ./usr/share/man/man8/smtplb.8.gz
-rw-r--r-- root/root ./usr/share/smtplb/agent.toml
-rw-r--r-- root/root ./usr/share/smtplb/smtplb.toml
LIST
check "file list, modes and owners" diff -u "$work/want" "$work/files"
check "nothing under /etc (the configuration is the operator's)" bash -c "! dpkg-deb -c '$deb' | grep -q ' \./etc/'"

field() { dpkg-deb -f "$deb" "$1"; }
check "Package: smtplb" test "$(field Package)" = smtplb
check "Version: $version" test "$(field Version)" = "$version"
check "Architecture: amd64" test "$(field Architecture)" = amd64
check "Section: mail" test "$(field Section)" = mail
echo "     Maintainer: $(field Maintainer)"
check "Maintainer is the project's identity in packaging/packaging.cmake" test "$(field Maintainer)" = "$maintainer"
check "Maintainer is a name and an address, no placeholder" bash -c \
  "grep -Eq '^[^<>]+ <[^@<> ]+@[^@<> ]+\.[a-z]+>\$' <<<'$maintainer' && ! grep -Eiq 'example|noreply|invalid|seed|todo|changeme' <<<'$maintainer'"
depends=$(field Depends)
echo "     Depends: $depends"
dep_names=$(tr ',' '\n' <<<"$depends" | sed -E 's/^ *//; s/ .*//')
for d in adduser procps libc6 libssl3 libstdc++6; do
  check "Depends on $d" grep -qxF "$d" <<<"$dep_names"
done
for d in libuv1 libfmt9 libspdlog1.10 libtomlplusplus3; do
  check "no dependency on $d (compiled in)" bash -c "! grep -q '$d' <<<'$depends'"
done

dpkg-deb -e "$deb" "$work/control"
check "no conffiles" test ! -e "$work/control/conffiles"
for s in postinst prerm postrm; do
  check "$s is an executable shell script" test -x "$work/control/$s"
  check "$s parses (sh -n)" sh -n "$work/control/$s"
  check "$s equals packaging/deb/$s" cmp -s "$work/control/$s" "$src/packaging/deb/$s"
done
check "no preinst/config (user created in postinst)" \
  bash -c "[ ! -e '$work/control/preinst' ] && [ ! -e '$work/control/config' ]"
post=$work/control/postinst prerm=$work/control/prerm postrm=$work/control/postrm
check "postinst: adduser --system --group smtplb" grep -q 'adduser --system --group' "$post"
check "postinst: systemd work only under [ -d /run/systemd/system ]" \
  grep -q '\[ -d /run/systemd/system \]' "$post"
check "postinst: enables only on a first installation (\$2 empty)" \
  grep -q '\[ -z "\$2" \]' "$post"
check "postinst: starts only when the operator's config exists" bash -c \
  "grep -q '^conf=/etc/smtplb/smtplb.toml$' '$post' && grep -B1 'deb-systemd-invoke start' '$post' | grep -q 'if \\[ -e \"\\\$conf\" \\]'"
check "postinst: creates /etc/smtplb" grep -q 'install -d -m 0755 /etc/smtplb' "$post"
check "postinst: never restarts (outside its message)" bash -c "! grep -Ev '^ *(#|echo)' '$post' | grep -q restart"
check "prerm: stops on remove only" grep -q '\[ "\$1" = remove \]' "$prerm"
check "postrm: purge removes /etc/smtplb" grep -q 'rm -rf /etc/smtplb' "$postrm"
check "postrm: purge deletes the user" grep -q 'deluser --system' "$postrm"

dpkg-deb -x "$deb" "$work/root"
check "the reference config equals conf/smtplb.toml" cmp -s "$work/root/usr/share/smtplb/smtplb.toml" "$src/conf/smtplb.toml"
check "unit equals packaging/smtplb.service" \
  cmp -s "$work/root/usr/lib/systemd/system/smtplb.service" "$src/packaging/smtplb.service"
check "agent unit equals packaging/smtplb-agent.service" \
  cmp -s "$work/root/usr/lib/systemd/system/smtplb-agent.service" "$src/packaging/smtplb-agent.service"
check "the reference agent config equals conf/agent.toml" \
  cmp -s "$work/root/usr/share/smtplb/agent.toml" "$src/conf/agent.toml"
for f in keepalived/keepalived.conf keepalived/smtplb-ha-network.sh prometheus/smtplb.rules.yml \
         grafana/smtplb-dashboard.json; do
  check "example $f equals packaging/$f" cmp -s "$work/root/usr/share/doc/smtplb/examples/$f" "$src/packaging/$f"
done
check "sysusers.d line for user smtplb" grep -Eq '^u smtplb ' "$work/root/usr/lib/sysusers.d/smtplb.conf"
check "changelog's latest entry is version $version" \
  test "$(dpkg-parsechangelog -l "$work/root/usr/share/doc/smtplb/changelog.gz" -S Version 2>/dev/null \
          || zcat "$work/root/usr/share/doc/smtplb/changelog.gz" | head -1 | sed -E 's/.*\((.*)\).*/\1/')" = "$version"
check "changelog's trailer names the same maintainer" bash -c \
  "zcat '$work/root/usr/share/doc/smtplb/changelog.gz' | grep -m1 '^ -- ' | grep -qF -- ' -- $maintainer  '"
for m in usr/share/man/man8/smtplb.8.gz usr/share/man/man5/smtplb.toml.5.gz; do
  check "$m renders without warnings" bash -c \
    "out=\$(LC_ALL=C.UTF-8 MANWIDTH=80 man --warnings -l '$work/root/$m' 2>&1 >/dev/null); [ -z \"\$out\" ] || { echo \"\$out\"; false; }"
done
check "man page mentions version $version" bash -c "zcat '$work/root/usr/share/man/man8/smtplb.8.gz' | head -1 | grep -qF 'smtplb $version'"
finish
