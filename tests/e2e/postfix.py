"""A private Postfix instance for end-to-end tests.

    with Postfix({"a": "{listen} inet n - n - - smtpd -o smtpd_upstream_proxy_protocol=haproxy"}) as pf:
        port = pf.ports["a"]
        ...
        pf.wait_log(r"postfix/a/smtpd\\[\\d+\\]: connect from")

Each instance lives in its own temporary folder: configuration (DIR), queue, data and
log, so tests leave the machine's own Postfix alone and can run side by side. What it
takes on Debian 12 with Postfix 3.7 (which reports most failures only to syslog):

* the default /etc/postfix/main.cf must exist and list DIR in
  `alternate_config_directories` (Postfix's set-gid commands check -c/MAIL_CONFIG
  against it); we append DIR under a lock and remove it again on stop, and create a
  main.cf holding only that line when the machine has none ("No configuration");
* DIR mode 0755; the queue directory must exist before `postfix -c DIR post-install
  create-missing`, which creates the rest (the postfix command chdirs into it first);
* `maillog_file` inside the folder needs the folder in `maillog_file_prefixes`, and
  the `postlog` service of the stock master.cf (postlogd writes the file);
* master.cf is Debian's, with the `smtp inet` service commented out (port 25 stays
  free), chroot off for every service (a chroot would need copies of /etc files in the
  queue directory), and the test listeners added as `127.0.0.1:PORT inet ...` lines.

Every listener line gets `-o syslog_name=postfix/NAME`, so its log lines read
`postfix/NAME/smtpd[PID]: ...` and `postfix/NAME/postscreen[PID]: ...`.

Readiness is read from /proc (the master's own listening sockets), never by connecting:
a bare connect to a listener that expects a PROXY header is itself logged as a problem.

Needs root (master runs as root and switches to the postfix user). Every wait is
bounded; stop() runs `postfix -c DIR stop` and kills a leftover master by PID.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Mapping, Optional, Sequence

DEFAULT_MAIN_CF = "/etc/postfix/main.cf"
MAIN_CF_TEMPLATE = "/usr/share/postfix/main.cf.debian"
MASTER_CF_TEMPLATE = "/usr/share/postfix/master.cf.dist"
# Serialises edits of the default main.cf between test processes.
LOCK_FILE = os.path.join(tempfile.gettempdir(), "smtplb-postfix-main.cf.lock")
HOSTNAME = "pf.smtplb.test"
RELAY_DOMAIN = "example.net"


def available() -> Optional[str]:
    """None when a private Postfix can run here, else why not (for skipUnless)."""
    if os.geteuid() != 0:
        return "needs root to run Postfix's master"
    for tool in ("postfix", "postconf"):
        if not shutil.which(tool):
            return "needs %s (Debian package postfix)" % tool
    for f in (MAIN_CF_TEMPLATE, MASTER_CF_TEMPLATE):
        if not os.path.exists(f):
            return "needs %s (Debian package postfix)" % f
    return None


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _run(args: Sequence[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _check(args: Sequence[str], timeout: float = 30) -> str:
    r = _run(args, timeout)
    if r.returncode != 0:
        raise RuntimeError("%s failed (%d): %s%s" % (" ".join(args), r.returncode, r.stdout, r.stderr))
    return r.stdout


@contextlib.contextmanager
def _main_cf_lock():
    with open(LOCK_FILE, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _alternate_dirs() -> list:
    out = _check(["postconf", "-c", os.path.dirname(DEFAULT_MAIN_CF), "-h", "alternate_config_directories"])
    return [d for d in re.split(r"[\s,]+", out.strip()) if d]


def _set_alternate_dirs(dirs: list) -> None:
    _check(["postconf", "-c", os.path.dirname(DEFAULT_MAIN_CF), "-e",
            "alternate_config_directories = " + ", ".join(dirs)])


def allow_config_dir(config_dir: str) -> None:
    """Lists config_dir in the default main.cf's alternate_config_directories (idempotent)."""
    with _main_cf_lock():
        if not os.path.exists(DEFAULT_MAIN_CF):
            # Debian's "No configuration" leaves none. A file with only this parameter
            # configures nothing else for the machine's own Postfix.
            with open(DEFAULT_MAIN_CF, "x") as f:
                f.write("# Created by smtplb's tests (tests/e2e/postfix.py): private Postfix instances\n"
                        "# must be listed in alternate_config_directories.\n")
        dirs = _alternate_dirs()
        if config_dir not in dirs:
            _set_alternate_dirs(dirs + [config_dir])


def disallow_config_dir(config_dir: str) -> None:
    with _main_cf_lock():
        if not os.path.exists(DEFAULT_MAIN_CF):
            return
        dirs = _alternate_dirs()
        if config_dir in dirs:
            _set_alternate_dirs([d for d in dirs if d != config_dir])


def _listening_inodes(port: int) -> set:
    """Inodes of the sockets listening on 127.0.0.1:port."""
    inodes = set()
    want = "0100007F:%04X" % port
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[1] == want and fields[3] == "0A":  # 0A = LISTEN
                inodes.add(fields[9])
    return inodes


def _socket_inodes(pid: int) -> set:
    inodes = set()
    fd_dir = "/proc/%d/fd" % pid
    with contextlib.suppress(OSError):
        for fd in os.listdir(fd_dir):
            with contextlib.suppress(OSError):
                m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(os.path.join(fd_dir, fd)))
                if m:
                    inodes.add(m.group(1))
    return inodes


def listens(pid: int, port: int) -> bool:
    """True when process pid itself holds a socket listening on 127.0.0.1:port."""
    return bool(_listening_inodes(port) & _socket_inodes(pid))


def _running(pid: int) -> bool:
    """True while pid exists and is not a zombie (a reaped-late master is gone for us)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _children(pid: int) -> list:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open("/proc/%s/stat" % entry) as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
    return kids


class Postfix:
    """A private Postfix instance; use as a context manager (or start()/stop()).

    listeners: name -> master.cf line with `{listen}` where the service name goes, e.g.
      "{listen} inet n - n - 1 postscreen -o postscreen_greet_wait=2s". `{listen}` becomes
      127.0.0.1:PORT with a free port (ports[name]).
    services: further master.cf lines, verbatim ("smtpd pass - - n - - smtpd").
    main: main.cf parameters on top of the defaults below.

    Defaults: nothing is local (`mydestination =`), mail for example.net is relayed to the
    discard transport (accepted, logged, dropped), no network is trusted (`mynetworks =`:
    relaying is allowed by domain, never by client address), no DNS or alias lookups.
    """

    START_ATTEMPTS = 5
    START_TIMEOUT = 20.0

    def __init__(self, listeners: Mapping[str, str], *, services: Sequence[str] = (),
                 main: Optional[Mapping[str, str]] = None):
        self.listeners = dict(listeners)
        self.services = list(services)
        self.main = dict(main or {})
        self.ports: dict = {}
        self.base: Optional[str] = None
        self.config_dir = ""
        self.maillog = ""
        self.master_pid: Optional[int] = None
        self._allowed = False

    # -- lifecycle ----------------------------------------------------------------------

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    def start(self) -> None:
        self.base = tempfile.mkdtemp(prefix="smtplb-postfix.")
        os.chmod(self.base, 0o755)  # the postfix user reads below it
        self.config_dir = os.path.join(self.base, "etc")
        self.queue_dir = os.path.join(self.base, "queue")
        self.maillog = os.path.join(self.base, "maillog")
        os.mkdir(self.config_dir, 0o755)
        os.mkdir(self.queue_dir, 0o755)
        os.chmod(self.config_dir, 0o755)  # mkdir's mode is subject to the umask
        os.chmod(self.queue_dir, 0o755)
        allow_config_dir(self.config_dir)
        self._allowed = True
        shutil.copy(MAIN_CF_TEMPLATE, os.path.join(self.config_dir, "main.cf"))
        shutil.copy(MASTER_CF_TEMPLATE, os.path.join(self.config_dir, "master.cf"))
        params = {
            "queue_directory": self.queue_dir,
            "data_directory": os.path.join(self.base, "data"),
            "maillog_file": self.maillog,
            "maillog_file_prefixes": "/var, /dev/stdout, " + self.base,
            "myhostname": HOSTNAME,
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mydestination": "",
            "mynetworks": "",
            "relay_domains": RELAY_DOMAIN,
            "relay_transport": "discard:relayed to the test discard",
            "default_transport": "discard:no other destination in this test",
            "alias_maps": "",
            "alias_database": "",
            "smtpd_peername_lookup": "no",
        }
        params.update(self.main)
        self._postconf("-e", *("%s = %s" % kv for kv in params.items()))
        self._postconf("-M#", "smtp/inet")
        self._postconf("-F", "*/*/chroot = n")
        for line in self.services:
            name, kind = line.split()[:2]
            self._postconf("-M", "%s/%s = %s" % (name, kind, line))
        _check(["postfix", "-c", self.config_dir, "post-install", "create-missing"])

        for attempt in range(self.START_ATTEMPTS):
            self._set_listeners()
            r = _run(["postfix", "-c", self.config_dir, "start"], self.START_TIMEOUT)
            if r.returncode == 0 and self._wait_ready():
                return
            # Most likely another process took one of the ports between our pick and
            # master's bind; stop whatever started and try other ports.
            self._stop_master()
        raise RuntimeError("Postfix did not start in %d attempts\n--- maillog tail ---\n%s"
                           % (self.START_ATTEMPTS, self.tail()))

    def stop(self) -> None:
        self._stop_master()
        if self._allowed:
            self._allowed = False
            disallow_config_dir(self.config_dir)
        if self.base:
            if os.environ.get("SMTPLB_KEEP"):
                sys.stderr.write("Postfix test files kept in %s\n" % self.base)
            else:
                shutil.rmtree(self.base, ignore_errors=True)
            self.base = None

    # -- observation --------------------------------------------------------------------

    def log(self) -> str:
        try:
            with open(self.maillog, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except (FileNotFoundError, TypeError):
            return ""

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def lines(self, pattern: str) -> list:
        rx = re.compile(pattern)
        return [ln for ln in self.log().splitlines() if rx.search(ln)]

    def wait_log(self, pattern: str, *, count: int = 1, timeout: float = 10.0) -> list:
        """Waits until `pattern` (regex) matches at least `count` lines; returns them.
        postlogd writes asynchronously, so a line may show up shortly after the event."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.lines(pattern)
            if len(found) >= count:
                return found
            if time.monotonic() >= deadline:
                raise AssertionError("timed out after %.1fs waiting for %d x %r in the Postfix log (have %d)\n"
                                     "--- maillog tail ---\n%s" % (timeout, count, pattern, len(found), self.tail()))
            time.sleep(0.05)

    # -- internals ----------------------------------------------------------------------

    def _postconf(self, *args: str) -> None:
        _check(["postconf", "-c", self.config_dir, *args])

    def _set_listeners(self) -> None:
        for name, old in list(self.ports.items()):
            self._postconf("-MX", "127.0.0.1:%d/inet" % old)
        self.ports = {}
        for name, template in self.listeners.items():
            port = free_port()
            while port in self.ports.values():
                port = free_port()
            self.ports[name] = port
            line = template.format(listen="127.0.0.1:%d" % port) + " -o syslog_name=postfix/" + name
            self._postconf("-M", "127.0.0.1:%d/inet = %s" % (port, line))

    def _read_master_pid(self) -> Optional[int]:
        with contextlib.suppress(OSError, ValueError):
            with open(os.path.join(self.queue_dir, "pid", "master.pid")) as f:
                return int(f.read().split()[0])
        return None

    def _wait_ready(self) -> bool:
        """True once master listens on every port itself; False if it died or another
        process holds a port."""
        deadline = time.monotonic() + self.START_TIMEOUT
        while time.monotonic() < deadline:
            pid = self._read_master_pid()
            if pid:
                self.master_pid = pid
                if not _running(pid):
                    return False
                mine = _socket_inodes(pid)
                listening = {name: _listening_inodes(port) for name, port in self.ports.items()}
                if all(inodes & mine for inodes in listening.values()):
                    return True
                if any(inodes and not inodes & mine for inodes in listening.values()):
                    return False  # someone else's socket on our port
            time.sleep(0.05)
        return False

    def _stop_master(self) -> None:
        pid = self._read_master_pid() if self.base else None
        pid = pid or self.master_pid
        if self.base and pid and _running(pid):
            # Waits up to 5 s for master, then kills its process group itself.
            with contextlib.suppress(subprocess.TimeoutExpired):
                _run(["postfix", "-c", self.config_dir, "stop"], 20)
        if pid:
            deadline = time.monotonic() + 10
            while _running(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _running(pid):
                for kid in _children(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(kid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.master_pid = None
