# smtplb %post ($1: 1 install, 2 upgrade). Written by hand (no systemd RPM macros on the
# Debian build host). First installation, where systemd runs: enable and start. An
# upgrade restarts nothing: the running smtplb serves until the administrator restarts it.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -eq 1 ]; then
        systemctl enable --now smtplb.service >/dev/null 2>&1 || :
    elif systemctl --quiet is-active smtplb.service; then
        echo "smtplb: upgraded; 'systemctl restart smtplb' runs the new version"
    fi
fi
exit 0
