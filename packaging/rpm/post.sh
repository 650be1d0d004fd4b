# smtplb %post ($1: 1 install, 2 upgrade). Written by hand (no systemd RPM macros on the
# Debian build host). First installation, where systemd runs: enable, and start only if
# the operator's /etc/smtplb/smtplb.toml exists already (the package ships none: the
# reference config on port 25 with placeholder backends must never start by itself; the
# unit's ConditionPathExists= keeps it from starting at boot too). An upgrade restarts
# nothing: the running smtplb serves until the administrator restarts it.
conf=/etc/smtplb/smtplb.toml
[ -d /etc/smtplb ] || install -d -m 0755 /etc/smtplb
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -eq 1 ]; then
        systemctl enable smtplb.service >/dev/null 2>&1 || :
        if [ -e "$conf" ]; then
            systemctl start smtplb.service >/dev/null 2>&1 || :
        else
            echo "smtplb: smtplb.service is enabled but not started: $conf does not exist yet."
        fi
    elif systemctl --quiet is-active smtplb.service; then
        echo "smtplb: upgraded; 'systemctl restart smtplb' runs the new version"
    fi
elif [ "$1" -eq 1 ]; then
    echo "smtplb: systemd is not running here: smtplb.service was not enabled ('systemctl enable smtplb' where it runs)."
fi
if [ "$1" -eq 1 ] && [ ! -e "$conf" ]; then
    echo "smtplb: write $conf (the reference, every key with its default: /usr/share/smtplb/smtplb.toml),"
    echo "smtplb: then: smtplb --check -f $conf && systemctl start smtplb"
fi
exit 0
