#!/usr/bin/env bash
# Installs the .deb in a minimal Debian bookworm root (debootstrap, cached by
# bookworm-root.sh) with apt-get and follows its life: user, conffile, smtplb --check as
# user smtplb, an edited config across reinstall and upgrade, remove, purge. A second
# round fakes a running systemd ([ -d /run/systemd/system ] and a logging systemctl) to
# see what the maintainer scripts ask of it. Needs root (chroot); no network once the
# root is cached. usage: check-install.sh DIST_DIR VERSION
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
check "apt-get install ./smtplb.deb (no network)" apt_install /tmp/smtplb.deb
check "installed version $version" test "$(in_root dpkg-query -W -f='${Version}' smtplb)" = "$version"
check "user smtplb exists (system user, nologin)" bash -c \
  "in_root() { chroot '$root' \"\$@\"; }; e=\$(in_root getent passwd smtplb) && IFS=: read -r n x uid gid g h sh <<<\"\$e\" \
   && [ \"\$uid\" -lt 1000 ] && [ \"\$sh\" = /usr/sbin/nologin ] && echo \"     \$e\""
check "group smtplb exists" in_root getent group smtplb
check "conffile registered with dpkg" bash -c \
  "chroot '$root' dpkg-query -W -f='\${Conffiles}' smtplb | grep -q '^ $conf [0-9a-f]\\{32\\}$'"
check "config is root:root 0644" test "$(stat -c '%U:%G %a' "$root$conf")" = "root:root 644"
check "smtplb --check passes on the shipped config as user smtplb" \
  in_root setpriv --reuid=smtplb --regid=smtplb --clear-groups /usr/sbin/smtplb --check -f "$conf"
check "man smtplb works" bash -c "[ -f '$root/usr/share/man/man8/smtplb.8.gz' ]"
check "not enabled (no systemd): no wants symlink" \
  test ! -e "$root/etc/systemd/system/multi-user.target.wants/smtplb.service"

# The administrator edits the config.
sed -i 's/^port = 25$/port = 2525/' "$root$conf"
echo "# edited by the administrator" >>"$root$conf"
edited() { grep -q '^# edited by the administrator$' "$root$conf" && grep -q '^port = 2525$' "$root$conf"; }
check "edit made" edited
check "apt-get install --reinstall" apt_install --reinstall /tmp/smtplb.deb
check "edit survives the reinstall" edited
check "apt-get install (upgrade to ${version}+test1)" apt_install /tmp/smtplb-upgrade.deb
check "upgraded" test "$(in_root dpkg-query -W -f='${Version}' smtplb)" = "${version}+test1"
check "edit survives the upgrade, no prompt, no .dpkg-new/.dpkg-dist" bash -c \
  "grep -q '^# edited by the administrator$' '$root$conf' && ! ls '$root/etc/smtplb' | grep -q dpkg"
check "smtplb --check passes on the edited config as user smtplb" \
  in_root setpriv --reuid=smtplb --regid=smtplb --clear-groups /usr/sbin/smtplb --check -q -f "$conf"
check "apt-get remove smtplb" apt_remove smtplb
check "remove: binary gone" test ! -e "$root/usr/sbin/smtplb"
check "remove: edited config and user kept" bash -c "grep -q 'edited by the administrator' '$root$conf' && chroot '$root' getent passwd smtplb >/dev/null"
check "dpkg --purge smtplb" dpkg_do --purge smtplb
check "purge: /etc/smtplb gone" test ! -e "$root/etc/smtplb"
check "purge: user smtplb gone" bash -c "! chroot '$root' getent passwd smtplb"
check "purge: group smtplb gone" bash -c "! chroot '$root' getent group smtplb"
check "purge: package unknown to dpkg" bash -c "! chroot '$root' dpkg-query -W -f='\${Status}' smtplb 2>/dev/null | grep -q installed"

echo "== with a (fake) running systemd"
fake_systemd
wants=$root/etc/systemd/system/multi-user.target.wants/smtplb.service
check "install" apt_install /tmp/smtplb.deb
show_calls
check "install: daemon-reload" test -n "$(calls 'daemon-reload')"
check "install: enabled (wants symlink)" test -L "$wants"
check "install: started" test -n "$(calls ' start smtplb.service')"
reset_calls
check "upgrade" apt_install /tmp/smtplb-upgrade.deb
show_calls
check "upgrade: no start, stop or restart" test -z "$(calls ' (start|stop|restart|try-restart|reload-or-restart) ')"
check "upgrade: still enabled" test -L "$wants"
check "upgrade: still 'running'" test -e "$root/run/smtplb.fake-active"
reset_calls
check "remove" apt_remove smtplb
show_calls
check "remove: stopped" test -n "$(calls ' stop smtplb.service')"
reset_calls
check "purge" dpkg_do --purge smtplb
show_calls
check "purge: wants symlink gone" test ! -e "$wants"
check "purge: user gone" bash -c "! chroot '$root' getent passwd smtplb"
echo "     install test took $(( $(date +%s) - start )) s"
finish
