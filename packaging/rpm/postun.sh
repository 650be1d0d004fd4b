# smtplb %postun ($1: 0 erase, 1 upgrade). RPM has no purge: like every RPM, erase keeps
# the smtplb user, and an edited /etc/smtplb/smtplb.toml as smtplb.toml.rpmsave.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
exit 0
