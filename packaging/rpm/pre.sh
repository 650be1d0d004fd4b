# smtplb %pre: the system user and group (also described in /usr/lib/sysusers.d/smtplb.conf).
getent group smtplb >/dev/null || groupadd -r smtplb
getent passwd smtplb >/dev/null || \
    useradd -r -g smtplb -d / -M -s /sbin/nologin -c "smtplb SMTP load balancer" smtplb
exit 0
