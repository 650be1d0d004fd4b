#!/usr/bin/env bash
# The .rpm's scriptlets, run by this machine's rpm with --root in
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
ref=/usr/share/smtplb/smtplb.toml
# rpm on Debian warns that alien should be used; say nothing unless it fails.
r() { if ! rpm --root="$root" --nodeps "$@" >"$work/rpm.log" 2>&1; then cat "$work/rpm.log"; return 1; fi; }
said() { grep -qF -- "$1" "$work/rpm.log"; }
advice() { sed -n 's/^smtplb: /     %post: /p' "$work/rpm.log"; }
rpm --root="$root" --initdb

echo "== without systemd"
check "rpm -i" r -i "$rpm"
advice
check "user smtplb exists (system uid)" bash -c \
  "e=\$(chroot '$root' getent passwd smtplb) && uid=\$(cut -d: -f3 <<<\"\$e\") && [ \"\$uid\" -lt 1000 ] && echo \"     \$e\""
check "group smtplb exists" bash -c "chroot '$root' getent group smtplb >/dev/null"
check "no %config files: the package ships no configuration" test -z "$(rpm --root="$root" -qc smtplb 2>/dev/null)"
check "/etc/smtplb exists and is empty" bash -c "[ -d '$root/etc/smtplb' ] && [ -z \"\$(ls -A '$root/etc/smtplb')\" ]"
check "%post says the unit was not enabled (no systemd)" \
  said "smtplb: systemd is not running here: smtplb.service was not enabled"
check "%post says which file to write, from which reference" \
  said "smtplb: write $conf (the reference, every key with its default: $ref),"
check "smtplb --check passes on the reference as user smtplb" \
  in_root setpriv --reuid=smtplb --regid=smtplb --clear-groups /usr/sbin/smtplb --check -q -f "$ref"
check "not enabled (no systemd)" test ! -e "$root/etc/systemd/system/multi-user.target.wants/smtplb.service"
cp "$root$ref" "$root$conf"
echo "# edited by the administrator" >>"$root$conf"
edited() { grep -q '^# edited by the administrator$' "$root$conf"; }
check "rpm -U --replacepkgs (reinstall)" r -U --replacepkgs "$rpm"
check "config untouched by the reinstall" edited
check "rpm -U to release 2" r -U "$up"
check "upgraded" test "$(rpm --root="$root" -q --qf '%{RELEASE}' smtplb 2>/dev/null)" = 2
check "config untouched by the upgrade, no .rpmnew" bash -c "grep -q '^# edited' '$root$conf' && [ ! -e '$root$conf.rpmnew' ]"
check "upgrade: %post is silent (no first-install advice)" bash -c "! grep -q '^smtplb: ' '$work/rpm.log'"
check "rpm -e" r -e smtplb
check "erase: binary gone" test ! -e "$root/usr/sbin/smtplb"
check "erase: the operator's config kept as it was" edited
rm -rf "$root/etc/smtplb"

echo "== with a (fake) running systemd"
fake_systemd
wants=$root/etc/systemd/system/multi-user.target.wants/smtplb.service
check "rpm -i, no config yet" r -i "$rpm"
show_calls
advice
check "install: enabled" bash -c "[ -n \"\$(grep -E -- 'enable smtplb.service' '$log')\" ] && [ -L '$wants' ]"
check "install: smtplb-agent.service shipped, neither enabled nor started" agent_untouched
check "install: not started (no config: never port 25 with placeholder backends)" \
  bash -c "[ -z \"\$(grep -E -- ' (start|restart|--now)' '$log')\" ] && [ ! -e '$root/run/smtplb.fake-active' ]"
check "install: %post says it is enabled but waits for $conf" \
  said "smtplb: smtplb.service is enabled but not started: $conf does not exist yet."
reset_calls
cp "$root$ref" "$root$conf"
check "rpm -U to release 2" r -U "$up"
show_calls
check "upgrade: no start, stop, restart, enable or disable" \
  test -z "$(calls ' (start|stop|restart|try-restart|reload-or-restart|enable|disable) ')"
check "upgrade: still enabled" test -L "$wants"
reset_calls
check "rpm -e" r -e smtplb
show_calls
check "erase: disable --now" test -n "$(calls 'disable --now smtplb.service')"
check "erase: smtplb-agent.service disabled and stopped too" test -n "$(calls 'disable --now .*smtplb-agent\.service')"
check "erase: not enabled, not 'running'" bash -c "[ ! -e '$wants' ] && [ ! -e '$root/run/smtplb.fake-active' ]"
reset_calls
check "rpm -i with $conf already written" r -i "$rpm"
show_calls
check "install: enabled and started" bash -c "[ -L '$wants' ] && [ -e '$root/run/smtplb.fake-active' ]"
check "install: smtplb-agent.service shipped, neither enabled nor started" agent_untouched
check "install: %post gives no advice" bash -c "! grep -q '^smtplb: ' '$work/rpm.log'"
echo "     rpm install test took $(( $(date +%s) - start )) s"
finish
