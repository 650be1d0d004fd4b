#!/usr/bin/env bash
# The packaged unit: the directives the packaging issue asks for, systemd-analyze verify
# (unit syntax, executables, man pages) and systemd-analyze security --offline=true at
# 2.0 or better. usage: check-systemd.sh DIST_DIR VERSION
. "$(dirname "$0")/common.sh"
dpkg-deb -x "$deb" "$work/root"
unit=$work/root/usr/lib/systemd/system/smtplb.service
has() { grep -qxF -- "$1" "$unit"; }
check "ConditionPathExists=/etc/smtplb/smtplb.toml (no start before the operator writes it)" \
  has ConditionPathExists=/etc/smtplb/smtplb.toml
check "Type=notify" has Type=notify
check "ExecStartPre runs smtplb --check -q -f" has "ExecStartPre=/usr/sbin/smtplb --check -q -f /etc/smtplb/smtplb.toml"
check "ExecStart" has "ExecStart=/usr/sbin/smtplb -f /etc/smtplb/smtplb.toml"
check "ExecReload: first --check, then HUP to \$MAINPID" test \
  "$(grep '^ExecReload=' "$unit" | paste -sd'|')" = \
  'ExecReload=/usr/sbin/smtplb --check -q -f /etc/smtplb/smtplb.toml|ExecReload=/bin/kill -HUP $MAINPID'
for d in User=smtplb Group=smtplb AmbientCapabilities=CAP_NET_BIND_SERVICE \
         CapabilityBoundingSet=CAP_NET_BIND_SERVICE RuntimeDirectory=smtplb \
         Restart=on-failure RestartPreventExitStatus=78 \
         NoNewPrivileges=yes ProtectSystem=strict PrivateTmp=yes PrivateDevices=yes \
         ProtectKernelTunables=yes ProtectKernelModules=yes ProtectKernelLogs=yes \
         "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6" SystemCallFilter=@system-service \
         WantedBy=multi-user.target; do
  check "$d" has "$d"
done
check "LimitNOFILE set" grep -Eq '^LimitNOFILE=[0-9]+$' "$unit"
# TimeoutStopSec above the default shutdown_grace ("30s" in conf/smtplb.toml).
grace=$(sed -nE 's/^#?shutdown_grace = "([0-9]+)s"$/\1/p' "$src/conf/smtplb.toml")
stop=$(sed -nE 's/^TimeoutStopSec=([0-9]+)s?$/\1/p' "$unit")
check "TimeoutStopSec=${stop:-?}s > shutdown_grace ${grace:-?}s" test "${stop:-0}" -gt "${grace:-30}"

# verify: the unit as installed, with the binary and man pages taken from the package
# (they are not installed on this machine).
mkdir -p "$work/verify"
sed "s|/usr/sbin/smtplb|$work/root/usr/sbin/smtplb|g" "$unit" >"$work/verify/smtplb.service"
check "systemd-analyze verify" env MANPATH="$work/root/usr/share/man" \
  systemd-analyze verify "$work/verify/smtplb.service"
# The agent's unit (installed, never enabled by the packages): a user that can read the
# Postfix queue, not root.
agent_unit=$work/root/usr/lib/systemd/system/smtplb-agent.service
sed "s|/usr/sbin/smtplb|$work/root/usr/sbin/smtplb|g" "$agent_unit" >"$work/verify/smtplb-agent.service"
check "agent unit: systemd-analyze verify" env MANPATH="$work/root/usr/share/man" \
  systemd-analyze verify "$work/verify/smtplb-agent.service"
check "agent unit: User=postfix" grep -qx 'User=postfix' "$agent_unit"

set +e
systemd-analyze security --offline=true --threshold=20 "$unit" >"$work/security" 2>&1
rc=$?
set -e
grep -F '✗' "$work/security" | sed 's/^/     /'
score=$(sed -nE 's/.*Overall exposure level for smtplb.service: ([0-9.]+).*/\1/p' "$work/security")
echo "     systemd-analyze security: ${score:-?} (lower is better)"
check "systemd-analyze security --offline=true: ${score:-?} <= 2.0" \
  bash -c "[ '$rc' = 0 ] && [ -n '$score' ] && awk 'BEGIN { exit !($score <= 2.0) }'"
finish
