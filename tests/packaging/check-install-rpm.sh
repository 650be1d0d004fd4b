#!/usr/bin/env bash
# The .rpm's scriptlets and %config(noreplace), run by this machine's rpm with --root in
# a minimal bookworm root (Debian userland: useradd/groupadd from passwd, /bin/sh), so it
# checks the scriptlet logic, not RHEL itself. --nodeps: that rpm database knows none of
# the Debian packages. Upgrade: release 2 of the same tree (build-packages.sh).
# usage: check-install-rpm.sh DIST_DIR VERSION [UPGRADE_DIR]
. "$(dirname "$0")/common.sh"
if [ "$(id -u)" -ne 0 ]; then echo "SKIP: needs root (chroot)"; exit 77; fi
up=${3:-$dist/../upgrade}/smtplb-${version}-2.x86_64.rpm
[ -f "$up" ] || { echo "FAIL: no upgrade package $up"; exit 1; }

start=$(date +%s)
make_root
conf=/etc/smtplb/smtplb.toml
# rpm on Debian warns that alien should be used; say nothing unless it fails.
r() { if ! rpm --root="$root" --nodeps "$@" >"$work/rpm.log" 2>&1; then cat "$work/rpm.log"; return 1; fi; }
rpm --root="$root" --initdb

echo "== without systemd"
check "rpm -i" r -i "$rpm"
check "user smtplb exists (system uid)" bash -c \
  "e=\$(chroot '$root' getent passwd smtplb) && uid=\$(cut -d: -f3 <<<\"\$e\") && [ \"\$uid\" -lt 1000 ] && echo \"     \$e\""
check "group smtplb exists" bash -c "chroot '$root' getent group smtplb >/dev/null"
check "rpm -qc lists the config" test "$(rpm --root="$root" -qc smtplb 2>/dev/null)" = "$conf"
check "smtplb --check passes on the shipped config as user smtplb" \
  in_root setpriv --reuid=smtplb --regid=smtplb --clear-groups /usr/sbin/smtplb --check -q -f "$conf"
check "not enabled (no systemd)" test ! -e "$root/etc/systemd/system/multi-user.target.wants/smtplb.service"
echo "# edited by the administrator" >>"$root$conf"
edited() { grep -q '^# edited by the administrator$' "$root$conf"; }
check "rpm -U --replacepkgs (reinstall)" r -U --replacepkgs "$rpm"
check "edit survives the reinstall" edited
check "rpm -U to release 2" r -U "$up"
check "upgraded" test "$(rpm --root="$root" -q --qf '%{RELEASE}' smtplb 2>/dev/null)" = 2
check "edit survives the upgrade, no .rpmnew" bash -c "grep -q '^# edited' '$root$conf' && [ ! -e '$root$conf.rpmnew' ]"
check "rpm -e" r -e smtplb
check "erase: binary gone" test ! -e "$root/usr/sbin/smtplb"
check "erase: the edited config kept as .rpmsave" grep -q '^# edited' "$root$conf.rpmsave"
rm -rf "$root/etc/smtplb"

echo "== with a (fake) running systemd"
fake_systemd
wants=$root/etc/systemd/system/multi-user.target.wants/smtplb.service
check "rpm -i" r -i "$rpm"
show_calls
check "install: enable --now" test -n "$(calls 'enable --now smtplb.service')"
check "install: enabled and 'running'" bash -c "[ -L '$wants' ] && [ -e '$root/run/smtplb.fake-active' ]"
reset_calls
check "rpm -U to release 2" r -U "$up"
show_calls
check "upgrade: no start, stop, restart, enable or disable" \
  test -z "$(calls ' (start|stop|restart|try-restart|reload-or-restart|enable|disable) ')"
check "upgrade: still enabled and 'running'" bash -c "[ -L '$wants' ] && [ -e '$root/run/smtplb.fake-active' ]"
reset_calls
check "rpm -e" r -e smtplb
show_calls
check "erase: disable --now" test -n "$(calls 'disable --now smtplb.service')"
check "erase: not enabled, not 'running'" bash -c "[ ! -e '$wants' ] && [ ! -e '$root/run/smtplb.fake-active' ]"
echo "     rpm install test took $(( $(date +%s) - start )) s"
finish
