#!/usr/bin/env bash
# Installs the .deb in a minimal Debian bookworm root (debootstrap, cached by
# bookworm-root.sh) with apt-get and follows its life: user, no configuration shipped
# (the operator writes /etc/smtplb/smtplb.toml from the reference), what postinst says,
# smtplb --check as user smtplb, the operator's config across reinstall and upgrade,
# remove, purge. A second round fakes a running systemd ([ -d /run/systemd/system ] and
# a logging systemctl) to see what the maintainer scripts ask of it: a first install
# enables the unit but starts it only when the operator's config exists already. Needs
# root (chroot); no network once the root is cached. usage: check-install.sh DIST_DIR VERSION
. "$(dirname "$0")/common.sh"
if [ "$(id -u)" -ne 0 ]; then echo "SKIP: needs root (chroot)"; exit 77; fi

start=$(date +%s)
make_root
conf=/etc/smtplb/smtplb.toml
apt_install() { # quiet apt-get install, its output shown only on failure
  if ! in_root apt-get install -y -o Dpkg::Use-Pty=0 "$@" >"$work/apt.log" 2>&1; then
    cat "$work/apt.log"; return 1
  fi
}
apt_remove() {
  if ! in_root apt-get remove -y -o Dpkg::Use-Pty=0 "$@" >"$work/apt.log" 2>&1; then
    cat "$work/apt.log"; return 1
  fi
}
dpkg_do() { if ! in_root dpkg "$@" >"$work/dpkg.log" 2>&1; then cat "$work/dpkg.log"; return 1; fi; }

# An "upgrade": the same package with version VERSION+test1.
dpkg-deb -R "$deb" "$work/up"
sed -i "s/^Version: .*/Version: ${version}+test1/" "$work/up/DEBIAN/control"
dpkg-deb -b "$work/up" "$root/tmp/smtplb-upgrade.deb" >/dev/null
cp "$deb" "$root/tmp/smtplb.deb"

echo "== without systemd"
ref=/usr/share/smtplb/smtplb.toml
check "apt-get install ./smtplb.deb (no network)" apt_install /tmp/smtplb.deb
said() { grep -qF -- "$1" "$work/apt.log"; }
sed -n 's/^smtplb: /     postinst: /p' "$work/apt.log"
check "installed version $version" test "$(in_root dpkg-query -W -f='${Version}' smtplb)" = "$version"
check "user smtplb exists (system user, nologin)" bash -c \
  "in_root() { chroot '$root' \"\$@\"; }; e=\$(in_root getent passwd smtplb) && IFS=: read -r n x uid gid g h sh <<<\"\$e\" \
   && [ \"\$uid\" -lt 1000 ] && [ \"\$sh\" = /usr/sbin/nologin ] && echo \"     \$e\""
check "group smtplb exists" in_root getent group smtplb
check "no conffiles: the package ships no configuration" \
  test -z "$(chroot "$root" dpkg-query -W -f='${Conffiles}' smtplb)"
check "/etc/smtplb exists, root:root 0755, empty" bash -c \
  "[ \"\$(stat -c '%U:%G %a' '$root/etc/smtplb')\" = 'root:root 755' ] && [ -z \"\$(ls -A '$root/etc/smtplb')\" ]"
check "the reference config is $ref" test -f "$root$ref"
check "postinst says the unit was not enabled (no systemd)" \
  said "smtplb: systemd is not running here: smtplb.service was not enabled"
check "postinst says which file to write, from which reference" \
  said "smtplb: write $conf (the reference, every key with its default: $ref),"
check "smtplb --check names the missing file" bash -c \
  "out=\$(chroot '$root' /usr/sbin/smtplb --check -f '$conf' 2>&1); [ \"\$out\" = '$conf: the file does not exist' ] || { echo \"\$out\"; false; }"
check "man smtplb works" bash -c "[ -f '$root/usr/share/man/man8/smtplb.8.gz' ]"
check "not enabled (no systemd): no wants symlink" \
  test ! -e "$root/etc/systemd/system/multi-user.target.wants/smtplb.service"

# The administrator writes the config from the reference.
sed 's/^port = 25$/port = 2525/' "$root$ref" >"$root$conf"
echo "# edited by the administrator" >>"$root$conf"
edited() { grep -q '^# edited by the administrator$' "$root$conf" && grep -q '^port = 2525$' "$root$conf"; }
check "config written" edited
check "smtplb --check passes on it as user smtplb" \
  in_root setpriv --reuid=smtplb --regid=smtplb --clear-groups /usr/sbin/smtplb --check -f "$conf"
check "apt-get install --reinstall" apt_install --reinstall /tmp/smtplb.deb
check "config untouched by the reinstall" edited
check "apt-get install (upgrade to ${version}+test1)" apt_install /tmp/smtplb-upgrade.deb
check "upgraded" test "$(in_root dpkg-query -W -f='${Version}' smtplb)" = "${version}+test1"
check "config untouched by the upgrade, no prompt, nothing else in /etc/smtplb" bash -c \
  "grep -q '^# edited by the administrator$' '$root$conf' && [ \"\$(ls -A '$root/etc/smtplb')\" = smtplb.toml ]"
check "upgrade: postinst is silent (no first-install advice)" bash -c "! grep -q '^smtplb: ' '$work/apt.log'"
check "smtplb --check passes on the config as user smtplb" \
  in_root setpriv --reuid=smtplb --regid=smtplb --clear-groups /usr/sbin/smtplb --check -q -f "$conf"
check "apt-get remove smtplb" apt_remove smtplb
check "remove: binary gone" test ! -e "$root/usr/sbin/smtplb"
check "remove: config and user kept" bash -c "grep -q 'edited by the administrator' '$root$conf' && chroot '$root' getent passwd smtplb >/dev/null"
check "dpkg --purge smtplb" dpkg_do --purge smtplb
check "purge: /etc/smtplb gone" test ! -e "$root/etc/smtplb"
check "purge: user smtplb gone" bash -c "! chroot '$root' getent passwd smtplb"
check "purge: group smtplb gone" bash -c "! chroot '$root' getent group smtplb"
check "purge: package unknown to dpkg" bash -c "! chroot '$root' dpkg-query -W -f='\${Status}' smtplb 2>/dev/null | grep -q installed"

echo "== with a (fake) running systemd"
fake_systemd
wants=$root/etc/systemd/system/multi-user.target.wants/smtplb.service
check "first install, no config yet" apt_install /tmp/smtplb.deb
show_calls
sed -n 's/^smtplb: /     postinst: /p' "$work/apt.log"
check "install: daemon-reload" test -n "$(calls 'daemon-reload')"
check "install: enabled (wants symlink)" test -L "$wants"
check "install: smtplb-agent.service shipped, neither enabled nor started" agent_untouched
check "install: not started (no config: never port 25 with placeholder backends)" \
  test -z "$(calls ' (start|restart|reload-or-restart) ')"
check "install: not 'running'" test ! -e "$root/run/smtplb.fake-active"
check "install: postinst says it is enabled but waits for $conf" \
  said "smtplb: smtplb.service is enabled but not started: $conf does not exist yet."
check "install: and how to start it" said "smtplb: then: smtplb --check -f $conf && systemctl start smtplb"
reset_calls
cp "$root$ref" "$root$conf"
check "upgrade" apt_install /tmp/smtplb-upgrade.deb
show_calls
check "upgrade: no start, stop or restart" test -z "$(calls ' (start|stop|restart|try-restart|reload-or-restart) ')"
check "upgrade: still enabled" test -L "$wants"
reset_calls
check "remove" apt_remove smtplb
show_calls
check "remove: stopped" test -n "$(calls ' stop smtplb.service')"
check "remove: smtplb-agent.service stopped too" test -n "$(calls ' stop .*smtplb-agent\.service')"
reset_calls
check "purge" dpkg_do --purge smtplb
show_calls
check "purge: wants symlink gone" test ! -e "$wants"
check "purge: user gone" bash -c "! chroot '$root' getent passwd smtplb"

# Configuration management often writes the file before the package arrives.
mkdir -p "$root/etc/smtplb"
dpkg-deb --fsys-tarfile "$deb" | tar -xO ".$ref" >"$root$conf"
reset_calls
check "first install with $conf already written" apt_install /tmp/smtplb.deb
show_calls
check "install: enabled and started" bash -c "[ -L '$wants' ] && [ -e '$root/run/smtplb.fake-active' ]"
check "install: smtplb-agent.service shipped, neither enabled nor started" agent_untouched
check "install: postinst gives no advice" bash -c "! grep -q '^smtplb: ' '$work/apt.log'"
check "install: config untouched" cmp -s "$root$conf" "$root$ref"
echo "     install test took $(( $(date +%s) - start )) s"
finish
