# smtplb %preun ($1: 0 erase, 1 upgrade). Erasing the package stops and disables the
# service (and smtplb-agent.service, which an administrator may have enabled); an upgrade
# leaves them running.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl disable --now smtplb.service smtplb-agent.service >/dev/null 2>&1 || :
fi
exit 0
