#!/usr/bin/env python3
"""Reload on SIGHUP (issue 5): servers added (checked before they take traffic), removed
(open sessions run to their end), moved to a new address (a new server; the old one
drains), re-weighted; listeners added, removed and moved to another pool; health state
carried over; bad files keep the running configuration; kept listeners keep their
sockets (no refused connection); `workers` needs a restart; 40 reloads under load.

Each test rewrites the harness's config file (lb.config_path), sends SIGHUP and waits for
`configuration reloaded: generation N` or `reload failed`. Every wait is bounded; only
127.0.0.1; everything started is stopped by PID, also on failure.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from harness import (CHECK_EHLO, HOSTNAME, STEP_TIMEOUT, Behaviour, FakeSmtpServer, SmtpClient,  # noqa: E402
                     SmtpSink, TestCase, connect, log_time, main, server_of, toml_value, wait_until)

SMTPLOAD = os.path.join(HERE, "..", "..", "scripts", "smtpload.py")
OK_QUIT = b"221 2.0.0 Bye\r\n"
RELOADED_RE = r"configuration reloaded: generation (\d+)"
# Log timestamps are truncated to the millisecond.
SLACK = 0.003


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _server_table(pool, s):
    more = {}
    if isinstance(s, tuple) and isinstance(s[0], FakeSmtpServer):
        s, more = s
    if isinstance(s, FakeSmtpServer):
        d = {"name": s.name, "address": s.host, "port": s.port}
    else:
        d = {"name": s[0], "address": s[1], "port": s[2]}
        if len(s) > 3:
            more = s[3]
    d.update(more)
    return _table("[[pool.%s.server]]" % pool, d)


def _table(header, values):
    lines = [header]
    lines += ["%s = %s" % (k, toml_value(v)) for k, v in values.items() if v is not None]
    return "\n".join(lines) + "\n"


def build_config(listeners, pools, *, global_=None, pool_opts=None, health=None, log=None):
    """Several listeners and pools, with make_config()'s defaults (one check only:
    interval 10m). listeners: {name: pool} or {name: {"pool": ..., more keys}};
    pools: {name: [server, ...]} (a server as in make_config: FakeSmtpServer,
    (FakeSmtpServer, extra), or (name, host, port[, extra])); pool_opts: {name: {...}}."""
    g = {"hostname": HOSTNAME, "workers": 1}
    g.update(global_ or {})
    lg = {"level": "info", "access_log": True}
    lg.update(log or {})
    out = [_table("[global]", g), _table("[log]", lg)]
    for name, li in listeners.items():
        d = {"address": "127.0.0.1", "port": 0}
        d.update({"pool": li} if isinstance(li, str) else li)
        out.append(_table("[listener.%s]" % name, d))
    for name, servers in pools.items():
        po = {"algorithm": "roundrobin", "retries": 3, "connect_timeout": "2s", "banner_timeout": "3s"}
        po.update((pool_opts or {}).get(name, {}))
        hc = {"interval": "10m", "timeout": "2s", "rise": 2, "fall": 2, "ehlo_name": CHECK_EHLO}
        hc.update(health or {})
        out.append(_table("[pool.%s]" % name, po))
        out.append(_table("[pool.%s.health_check]" % name, hc))
        out += [_server_table(name, s) for s in servers]
    return "\n".join(out)


def one_pool(servers, **kw):
    return build_config({"mx": "p"}, {"p": servers}, **kw)


def write_config(path, text):
    """Replaces the file atomically (a reader never sees half a file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def log_size(lb):
    try:
        return os.path.getsize(lb.log_path)
    except FileNotFoundError:
        return 0


def wait_log_bytes(lb, pattern, since, timeout=STEP_TIMEOUT, what=None):
    """Like lb.wait_log(), but reads only the log bytes after byte offset `since` (cheap on
    a large log); returns (first matching line, offset just after it)."""
    rx = re.compile(pattern.encode() if isinstance(pattern, str) else pattern)
    deadline = time.monotonic() + timeout
    pos = since
    with open(lb.log_path, "rb") as f:
        buf = b""
        while True:
            f.seek(pos)
            chunk = f.read()
            if chunk:
                buf += chunk
                pos += len(chunk)
                start = 0
                while True:
                    nl = buf.find(b"\n", start)
                    if nl < 0:
                        break
                    line = buf[start:nl]
                    if rx.search(line):
                        return line.decode("utf-8", "replace"), pos - (len(buf) - nl - 1)
                    start = nl + 1
                buf = buf[start:]
            elif not lb.alive():
                raise AssertionError("smtplb exited (status %s) waiting for %s" % (lb.proc.poll(), what or pattern))
            if time.monotonic() >= deadline:
                raise AssertionError("timed out after %.1fs waiting for %s\n--- log tail ---\n%s"
                                     % (timeout, what or pattern, lb._tail()))
            time.sleep(0.01)


def reload(lb, text, *, ok=True, timeout=STEP_TIMEOUT):
    """Writes the config file, sends SIGHUP, waits for the outcome. Returns (char offset of
    the log before the signal, outcome line). Fails when the outcome is not the expected one."""
    if text is not None:
        write_config(lb.config_path, text)
    off = lb.log_offset()
    os.kill(lb.pid, signal.SIGHUP)
    line = lb.wait_log(r"configuration reloaded: generation \d+|reload failed", since=off, timeout=timeout)[0]
    if ok and "configuration reloaded" not in line:
        raise AssertionError("reload failed:\n" + lb.log()[off:])
    if not ok and "reload failed" not in line:
        raise AssertionError("reload did not fail: %s" % line)
    return off, line


def greet(port):
    """Greeting, QUIT; returns the name of the fake server that greeted. Closes the client."""
    c = SmtpClient(port)
    try:
        name = server_of(c.greeting())
        r = c.quit()
        if r != OK_QUIT:
            raise AssertionError("QUIT: %r" % r)
        return name
    finally:
        c.close()


def names(port, n):
    return [greet(port) for _ in range(n)]


def refused(port):
    """True when a connection to port is refused. A connection reset instead counts as
    not refused yet: it was caught in the accept queue of a listener being closed."""
    try:
        connect(port, timeout=1).close()
        return False
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        return False


def session_on(test, port, name, tries=10):
    """Opens client sessions until one is greeted by fake server `name`; returns that
    client (registered for cleanup) and closes the others (after QUIT)."""
    for _ in range(tries):
        c = test.client(port)
        if server_of(c.greeting()) == name:
            return c
        c.quit()
    raise AssertionError("no session reached %s in %d tries" % (name, tries))


def listener_ports(lb, since=0):
    """{listener: port} from the `listening on` lines after char offset `since`."""
    return {m.group(1): int(m.group(3))
            for m in re.finditer(r"listener (\S+) listening on (\S+):(\d+) for pool", lb.log()[since:])}


def socket_inodes(pid):
    out = set()
    fd_dir = "/proc/%d/fd" % pid
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        m = re.fullmatch(r"socket:\[(\d+)\]", target)
        if m:
            out.add(int(m.group(1)))
    return out


def listening_inodes(pid, port):
    """Inodes of the listening TCP sockets of process `pid` on `port`: listening sockets
    on the port (from `ss -ltne`, which filters in the kernel, or else /proc/net/tcp{,6}
    entries in state 0A, slow when many TIME_WAIT sockets are around) matched against the
    socket:[INODE] links in /proc/PID/fd."""
    table = set()
    if shutil.which("ss"):
        out = subprocess.run(["ss", "-Hltne", "sport = :%d" % port], capture_output=True, text=True,
                             timeout=STEP_TIMEOUT, check=True).stdout
        table = {int(m.group(1)) for m in re.finditer(r"\bino:(\d+)", out)}
    else:
        for name in ("tcp", "tcp6"):
            try:
                with open("/proc/%d/net/%s" % (pid, name)) as f:
                    rows = f.read().splitlines()[1:]
            except FileNotFoundError:
                continue
            for row in rows:
                fields = row.split()
                local, state, inode = fields[1], fields[3], int(fields[9])
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    table.add(inode)
    return table & socket_inodes(pid)


def wait_listening(lb, port, count=1):
    """Waits until smtplb has `count` listening sockets on port. The reload line is
    logged when the new snapshot is published; the workers start listening on new
    listeners' sockets (bound by then) a moment later, on their own threads."""
    return wait_until(lambda: len(listening_inodes(lb.pid, port)) >= count and listening_inodes(lb.pid, port), 5,
                      "%d listening sockets on port %d" % (count, port))


# --------------------------------------------------------------------------------------
# servers
# --------------------------------------------------------------------------------------


class ServerReloadTest(TestCase):

    def test_added_server_is_checked_before_it_takes_traffic(self):
        s1 = self.fake("s1")
        # s2's check takes a second (a slow greeting), so there is a window in which
        # the balancer knows s2 but must not use it.
        s2 = self.fake("s2", Behaviour(greeting_delay=1.0))
        lb = self.smtplb(one_pool([s1]), up=["p/s1"])
        self.assertEqual(names(lb.port(), 2), ["s1", "s1"])

        off, line = reload(lb, one_pool([s1, s2]))
        self.assertIn("generation 2 (1 servers added, 0 removed", line)
        # The check has connected; sessions accepted from now on greet at once.
        wait_until(lambda: s2.snapshot(), 5, "s2's first check")
        s2.behaviour = Behaviour()
        before_up = []
        up_rx = re.compile(r"server p/s2 is UP")
        deadline = time.monotonic() + 5
        while not up_rx.search(lb.log()[off:]):
            self.assertLess(time.monotonic(), deadline, "no UP line for p/s2")
            before_up.append((greet(lb.port()), time.time()))
            time.sleep(0.01)
        up_line = lb.wait_log(r"server p/s2 is UP: check passed \(first check\)", since=off)[0]
        # Sessions greeted before the UP line was written (the last one may have raced it).
        early = [name for name, t in before_up if t < log_time(up_line) - SLACK]
        self.assertGreaterEqual(len(early), 3, "sessions during s2's check")
        self.assertEqual(set(early), {"s1"}, "sessions before s2's UP line")
        # Afterwards s2 takes its share; none of its sessions started before the UP line.
        after = names(lb.port(), 10)
        self.assertEqual(after.count("s2"), 5, after)
        t_up = log_time(up_line)
        for c in s2.sessions():
            self.assertGreaterEqual(c.t_accept, t_up - SLACK, "s2 session accepted before its UP line")
        self.assertEqual(len(s2.sessions()), 5)

    def test_removed_server_gets_no_new_sessions(self):
        s1, s2 = self.fake("s1"), self.fake("s2")
        lb = self.smtplb(one_pool([s1, s2]), up=["p/s1", "p/s2"])
        self.assertEqual(sorted(names(lb.port(), 4)), ["s1", "s1", "s2", "s2"])
        lb.wait_access(4)  # those sessions have ended inside smtplb too
        off, line = reload(lb, one_pool([s1]))
        self.assertIn("generation 2 (0 servers added, 1 removed", line)
        lb.wait_log(r"server p/s2 removed: no new sessions; 0 open ones", since=off)
        n2 = len(s2.snapshot())
        self.assertEqual(names(lb.port(), 8), ["s1"] * 8)
        self.assertEqual(len(s2.snapshot()), n2)

    def test_changed_address_is_a_new_server_and_the_old_one_drains(self):
        s1, old = self.fake("s1"), self.fake("s2")
        new = self.fake("s2new", Behaviour(greeting_delay=0.7))  # a slow first check
        lb = self.smtplb(one_pool([s1, old]), up=["p/s1", "p/s2"])
        open_old = session_on(self, lb.port(), "s2")
        open_old.expect("EHLO client.test", 250)

        off, line = reload(lb, one_pool([s1, ("s2", "127.0.0.1", new.port)]))
        self.assertIn("generation 2 (1 servers added, 1 removed", line)
        lb.wait_log(r"server p/s2 removed: no new sessions; 1 open ones run to their end", since=off)
        wait_until(lambda: new.snapshot(), 5, "the new s2's first check")
        new.behaviour = Behaviour()
        before_up = []
        deadline = time.monotonic() + 5
        while not re.search(r"server p/s2 is UP", lb.log()[off:]):
            self.assertLess(time.monotonic(), deadline, "no UP line for the new p/s2")
            before_up.append((greet(lb.port()), time.time()))
            time.sleep(0.01)
        up_line = lb.wait_log(r"server p/s2 is UP: check passed \(first check\)", since=off)[0]
        early = [name for name, t in before_up if t < log_time(up_line) - SLACK]
        self.assertGreaterEqual(len(early), 3, "sessions during the new s2's check")
        self.assertEqual(set(early), {"s1"}, "sessions before the new s2 was UP")

        n_old = len(old.snapshot())
        after = names(lb.port(), 10)
        self.assertEqual(sorted(set(after)), ["s1", "s2new"], after)
        # Round-robin state is kept per position, and the new s2 takes the old one's: the
        # split of 10 may be off by one.
        self.assertTrue(4 <= after.count("s2new") <= 6, after)
        self.assertEqual(len(old.snapshot()), n_old, "the old address got new connections")
        for c in new.sessions():
            self.assertGreaterEqual(c.t_accept, log_time(up_line) - SLACK)
        # The session on the old address goes on to its end.
        self.assertEqual(open_old.cmd("NOOP"), b"250 2.0.0 Ok\r\n")
        label = open_old.label()
        self.assertEqual(open_old.quit(), OK_QUIT)
        a = lb.wait_access(client=label)[0]
        self.assertEqual((a["server"], a["term"]), ("s2", "--"))

    def test_weight_change_changes_the_split(self):
        s1, s2 = self.fake("s1"), self.fake("s2")
        lb = self.smtplb(one_pool([s1, s2]), up=["p/s1", "p/s2"])
        before = names(lb.port(), 20)
        self.assertEqual(before.count("s1"), 10, before)
        reload(lb, one_pool([(s1, {"weight": 3}), (s2, {"weight": 1})]))
        after = names(lb.port(), 40)
        # Smooth weighted round-robin: exactly 3:1 per window of 4 once the carried-over
        # balancer state has evened out (within one pick).
        self.assertTrue(29 <= after.count("s1") <= 31, after)
        # weight 0: no new sessions at all.
        reload(lb, one_pool([(s1, {"weight": 0}), (s2, {"weight": 1})]))
        self.assertEqual(names(lb.port(), 6), ["s2"] * 6)
        # The servers were kept (no new check, no UP line after the first two).
        self.assertEqual(len(re.findall(r"is UP", lb.log())), 2)

    def test_down_server_stays_down_without_a_new_check(self):
        s1 = self.fake("s1")
        s2 = self.fake("s2", Behaviour(close_immediately=True))
        lb = self.smtplb(one_pool([s1, s2]), up=["p/s1"], down=["p/s2"])
        # s2 would pass a check now: only a (wrong) new check could bring it back.
        s2.behaviour = Behaviour()
        n2 = len(s2.snapshot())
        off, _ = reload(lb, one_pool([s1, s2]))                                     # unchanged
        reload(lb, one_pool([s1, (s2, {"weight": 5})], health={"timeout": "3s"}))  # new settings
        self.assertEqual(names(lb.port(), 10), ["s1"] * 10)
        time.sleep(1.0)  # a check started by the reload would connect within 100 ms
        self.assertEqual(len(s2.snapshot()), n2, "s2 was checked or got sessions after the reload")
        self.assertNotRegex(lb.log()[off:], r"server p/s2 is (UP|DOWN)")
        self.assertEqual(names(lb.port(), 4), ["s1"] * 4)

    def test_removed_servers_open_session_completes(self):
        s1, s2 = self.fake("s1"), self.fake("s2")
        lb = self.smtplb(one_pool([s1, s2]), up=["p/s1", "p/s2"])
        c = session_on(self, lb.port(), "s2")
        c.expect("EHLO client.test", 250)
        c.expect("MAIL FROM:<a@example.org>", 250)

        off, line = reload(lb, one_pool([s1]))
        self.assertIn("1 removed", line)
        lb.wait_log(r"server p/s2 removed: no new sessions; 1 open ones run to their end", since=off)
        # Both directions still flow: commands, a 200 KB body, replies.
        c.expect("RCPT TO:<b@example.org>", 250)
        c.expect("DATA", 354)
        body = b"".join(b"line %06d of a message sent after the reload\r\n" % i for i in range(4500))
        c.sock.sendall(body + b".\r\n")
        self.assertTrue(c.reply().startswith(b"250 2.0.0 Ok: queued as s2"))
        label = c.label()
        self.assertEqual(c.quit(), OK_QUIT)
        self.assertEqual([m["body"] for m in s2.messages()], [body])
        a = lb.wait_access(client=label)[0]
        self.assertEqual((a["server"], a["term"]), ("s2", "--"))
        self.assertGreater(a["bytes_in"], len(body))
        # And then nothing new goes there.
        n2 = len(s2.snapshot())
        self.assertEqual(names(lb.port(), 6), ["s1"] * 6)
        self.assertEqual(len(s2.snapshot()), n2)


# --------------------------------------------------------------------------------------
# listeners
# --------------------------------------------------------------------------------------


class ListenerReloadTest(TestCase):

    def test_added_and_removed_listeners(self):
        s1 = self.fake("s1")
        lb = self.smtplb(build_config({"mx": "p", "old": "p"}, {"p": [s1]}), up=["p/s1"])
        old_port = lb.port("old")
        on_old = self.client(old_port)
        self.assertEqual(server_of(on_old.greeting()), "s1")
        on_old.expect("EHLO client.test", 250)

        off, line = reload(lb, build_config({"mx": "p", "new": "p"}, {"p": [s1]}))
        self.assertIn("1 listeners added, 1 removed", line)
        lb.wait_log(r"listener old on 127\.0\.0\.1:%d removed" % old_port, since=off)
        new_port = listener_ports(lb, off)["new"]
        self.assertNotIn("mx", listener_ports(lb, off), "mx was bound again")
        # The new listener accepts; the removed one refuses new connections.
        wait_listening(lb, new_port)
        self.assertEqual(greet(new_port), "s1")
        wait_until(lambda: refused(old_port), 5, "the removed listener to refuse connections")
        self.assertEqual(greet(lb.port("mx")), "s1")
        # Its open session runs to its end.
        self.assertEqual(on_old.cmd("NOOP"), b"250 2.0.0 Ok\r\n")
        label = on_old.label()
        self.assertEqual(on_old.quit(), OK_QUIT)
        a = lb.wait_access(client=label)[0]
        self.assertEqual((a["listener"], a["term"]), ("old", "--"))

    def test_listener_moves_to_another_pool(self):
        s1, s2 = self.fake("s1"), self.fake("s2")
        pools = {"p": [s1], "q": [s2]}
        lb = self.smtplb(build_config({"mx": "p"}, pools), up=["p/s1", "q/s2"])
        port = lb.port()
        inodes = listening_inodes(lb.pid, port)
        open_p = self.client(port)
        self.assertEqual(server_of(open_p.greeting()), "s1")

        # Pool p goes away with the move; its open session keeps it alive.
        off, line = reload(lb, build_config({"mx": "q"}, {"q": [s2]}))
        self.assertIn("0 servers added, 1 removed; 0 listeners added, 0 removed", line)
        self.assertEqual(names(port, 4), ["s2"] * 4)
        self.assertEqual(listening_inodes(lb.pid, port), inodes, "the listener was re-bound")
        # The session started on pool p stays there.
        self.assertEqual(open_p.cmd("NOOP"), b"250 2.0.0 Ok\r\n")
        label = open_p.label()
        self.assertEqual(open_p.quit(), OK_QUIT)
        a = lb.wait_access(client=label)[0]
        self.assertEqual((a["pool"], a["server"], a["term"]), ("p", "s1", "--"))
        self.assertEqual([a["pool"] for a in lb.access() if a["client"] != label], ["q"] * 4)

    def test_kept_listener_keeps_its_sockets_and_refuses_nobody(self):
        s1, s2 = self.fake("s1"), self.fake("s2")
        cfg_a = build_config({"mx": "p"}, {"p": [s1, s2]}, global_={"workers": 2})
        lb = self.smtplb(cfg_a, up=["p/s1", "p/s2"])
        port = lb.port()
        inodes = listening_inodes(lb.pid, port)
        self.assertEqual(len(inodes), 2, "one listening socket per worker")
        # The second config changes the listener's settings (not its identity), the servers
        # and adds a listener, so every reload touches the kept listener.
        cfg_b = build_config({"mx": {"pool": "p", "max_connections": 500, "client_idle_timeout": "1m"},
                              "extra": "p"}, {"p": [(s1, {"weight": 2}), s2]}, global_={"workers": 2})

        stop = threading.Event()
        stats = {"ok": 0, "refused": 0, "other": []}

        def hammer():
            while not stop.is_set():
                try:
                    s = connect(port, timeout=5)
                except ConnectionRefusedError:
                    stats["refused"] += 1
                    continue
                except OSError as e:
                    stats["other"].append(repr(e))
                    continue
                try:
                    s.settimeout(5)
                    g = s.recv(512)
                    if g.startswith(b"220 "):
                        stats["ok"] += 1
                        s.sendall(b"QUIT\r\n")
                        s.recv(512)
                    else:
                        stats["other"].append(g[:80])
                except OSError as e:
                    stats["other"].append(repr(e))
                finally:
                    s.close()

        t = threading.Thread(target=hammer, daemon=True)
        t.start()
        try:
            time.sleep(0.2)
            for i in range(6):
                reload(lb, cfg_b if i % 2 == 0 else cfg_a)
                time.sleep(0.1)
                self.assertEqual(listening_inodes(lb.pid, port), inodes, "after reload %d" % (i + 1))
            time.sleep(0.2)
        finally:
            stop.set()
            t.join(10)
        self.assertFalse(t.is_alive())
        self.assertEqual(stats["refused"], 0, stats)
        self.assertEqual(stats["other"], [], stats)
        self.assertGreater(stats["ok"], 20, stats)
        lb.wait_log(r"configuration reloaded: generation 7")

    def test_backlog_follows_somaxconn_and_a_reload_resizes_the_open_sockets(self):
        """The listen() backlog of each worker's socket is what the config says, or
        net.core.somaxconn by default; a reload resizes the open sockets in place (same
        inodes, nothing refused). `ss -lt` shows a listening socket's backlog as Send-Q."""
        if not shutil.which("ss"):
            self.skipTest("needs ss (iproute2) to read a listening socket's backlog")
        with open("/proc/sys/net/core/somaxconn") as f:
            somaxconn = int(f.read())

        def backlogs(port):
            out = subprocess.run(["ss", "-Hltn", "sport = :%d" % port], capture_output=True, text=True,
                                 timeout=STEP_TIMEOUT, check=True).stdout
            return sorted(int(line.split()[2]) for line in out.splitlines() if line.strip())

        admin = '\n[admin]\nlisten = "127.0.0.1:0"\n'
        s1 = self.fake("s1")
        cfg_a = build_config({"mx": {"pool": "p", "backlog": 17}, "dflt": "p"}, {"p": [s1]}, global_={"workers": 2})
        lb = self.smtplb(cfg_a + admin, up=["p/s1"])
        tcp_re = r"admin API \(read-only\) on http://127\.0\.0\.1:(\d+)/"
        admin_port = int(re.search(tcp_re, lb.wait_log(tcp_re, what="the admin TCP endpoint")[0]).group(1))

        def status_backlog(lb):
            with urllib.request.urlopen("http://127.0.0.1:%d/status" % admin_port, timeout=5) as r:
                status = json.loads(r.read())
            return {li["name"]: li["backlog"] for li in status["listeners"]}

        port = lb.port()
        self.assertIn("(2 workers, backlog 17)", lb.wait_log(r"listener mx listening on")[0])
        self.assertIn("(2 workers, backlog %d)" % somaxconn, lb.wait_log(r"listener dflt listening on")[0])
        self.assertEqual(backlogs(port), [17, 17])
        self.assertEqual(backlogs(lb.port("dflt")), [somaxconn, somaxconn])
        self.assertEqual(status_backlog(lb), {"mx": 17, "dflt": somaxconn})
        inodes = listening_inodes(lb.pid, port)

        bigger = somaxconn + 1000
        off, _ = reload(lb, build_config({"mx": {"pool": "p", "backlog": 33}, "dflt": {"pool": "p", "backlog": bigger}},
                                         {"p": [s1]}, global_={"workers": 2}) + admin)
        lb.wait_log(r"listener mx: backlog 17 -> 33", since=off)
        lb.wait_log(r"warning: listener dflt: backlog %d is above net\.core\.somaxconn \(%d\); the kernel queues at "
                    r"most %d" % (bigger, somaxconn, somaxconn), since=off)
        wait_until(lambda: backlogs(port) == [33, 33], 5, "the workers to resize the backlog")
        self.assertEqual(listening_inodes(lb.pid, port), inodes, "the listener was re-bound")
        # The kernel caps the request at somaxconn.
        wait_until(lambda: backlogs(lb.port("dflt")) == [somaxconn, somaxconn], 5, "the capped backlog")
        self.assertEqual(status_backlog(lb), {"mx": 33, "dflt": bigger})
        self.assertEqual(greet(port), "s1")

    def test_workers_change_needs_a_restart(self):
        s1 = self.fake("s1")
        lb = self.smtplb(one_pool([s1], global_={"workers": 2}), up=["p/s1"])
        self.assertEqual(len(listening_inodes(lb.pid, lb.port())), 2)
        off, _ = reload(lb, build_config({"mx": "p", "two": "p"}, {"p": [s1]}, global_={"workers": 3}))
        lb.wait_log(r"warning: reload: global\.workers changed to 3; it takes effect at the next restart "
                    r"\(2 workers run\)", since=off)
        new_port = listener_ports(lb, off)["two"]
        self.assertIn("(2 workers, backlog ", lb.wait_log(r"listener two listening on", since=off)[0])
        wait_listening(lb, new_port, 2)
        time.sleep(0.1)
        self.assertEqual(len(listening_inodes(lb.pid, new_port)), 2, "the new listener has one socket per worker")
        self.assertEqual(len(listening_inodes(lb.pid, lb.port())), 2)
        self.assertEqual(greet(new_port), "s1")


# --------------------------------------------------------------------------------------
# bad files
# --------------------------------------------------------------------------------------


class BadReloadTest(TestCase):

    def test_bad_files_keep_the_running_configuration(self):
        s1, s2, s3 = self.fake("s1"), self.fake("s2"), self.fake("s3")
        good = one_pool([s1, s2])
        lb = self.smtplb(good, up=["p/s1", "p/s2"])
        path = re.escape(lb.config_path)
        # Each bad file would also replace s2 by s3 if it were taken.
        base = one_pool([s1, s3])
        lines = base.splitlines()
        weight_line = lines.index('name = "s3"') + 4  # 1-based line after the server's port
        wrong_type = "\n".join(lines[:weight_line - 1] + ['weight = "heavy"'] + lines[weight_line - 1:])
        header_line = lines.index("[pool.p]") + 1
        syntax = "\n".join(lines[:header_line - 1] + ["[pool.p"] + lines[header_line:])
        missing_pool = base.replace('pool = "p"', 'pool = "nope"')
        pool_line = missing_pool.splitlines().index('pool = "nope"') + 1
        cases = [
            ("syntax error", syntax, r"%s:%d:\d+: Error while parsing table header" % (path, header_line)),
            ("wrong type", wrong_type, r"%s:%d:\d+: 'weight' must be an integer" % (path, weight_line)),
            ("missing pool", missing_pool,
             r"%s:%d:\d+: listener 'mx' names pool 'nope', which is not defined" % (path, pool_line)),
        ]
        for what, text, error_rx in cases:
            with self.subTest(what):
                n3 = len(s3.snapshot())
                off, line = reload(lb, text, ok=False)
                self.assertRegex(line, r"error: reload failed \(\d+ errors?\); still running generation 1")
                errors = [ln for ln in lb.log()[off:].splitlines() if "error: reload: " in ln]
                self.assertTrue(errors, lb.log()[off:])
                for ln in errors:
                    self.assertRegex(ln, r"error: reload: %s:\d+:\d+: " % path)
                self.assertTrue(any(re.search(error_rx, ln) for ln in errors), errors)
                # The old configuration goes on serving: same servers, same listener.
                self.assertEqual(sorted(names(lb.port(), 6)), ["s1"] * 3 + ["s2"] * 3)
                self.assertEqual(len(s3.snapshot()), n3, "s3 was checked or used")
                self.assertNotIn("configuration reloaded", lb.log()[off:])
        self.assertTrue(lb.alive())
        # A good file afterwards is generation 2: failures do not use up numbers.
        off, line = reload(lb, base)
        self.assertIn("generation 2 (1 servers added, 1 removed", line)
        lb.wait_log(r"server p/s3 is UP", since=off)


    def test_bind_error_of_a_new_listener_fails_the_whole_reload(self):
        s1, s2 = self.fake("s1"), self.fake("s2")
        lb = self.smtplb(one_pool([s1]), up=["p/s1"])
        taken = socket.socket()  # bound without SO_REUSEPORT: smtplb cannot join it
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        # The same file also adds s2: nothing of it may be applied.
        off, line = reload(lb, build_config({"mx": "p", "two": {"pool": "p", "port": port}}, {"p": [s1, s2]}),
                           ok=False)
        self.assertIn("still running generation 1", line)
        lb.wait_log(r"error: reload: listener two: cannot bind 127\.0\.0\.1:%d: " % port, since=off)
        self.assertEqual(names(lb.port(), 4), ["s1"] * 4)
        time.sleep(0.3)
        self.assertEqual(s2.snapshot(), [], "s2 of the failed reload was checked")
        self.assertNotIn("server p/s2", lb.log())
        taken.close()
        off, line = reload(lb, None)  # same file, port free now
        self.assertIn("generation 2 (1 servers added, 0 removed; 1 listeners added, 0 removed)", line)
        lb.wait_log(r"server p/s2 is UP", since=off)
        self.assertEqual(listener_ports(lb, off), {"two": port})
        wait_listening(lb, port)
        self.assertIn(greet(port), ("s1", "s2"))


# --------------------------------------------------------------------------------------
# under load
# --------------------------------------------------------------------------------------


@unittest.skipUnless(shutil.which("smtp-sink"), "needs postfix (smtp-sink)")
class ReloadUnderLoadTest(TestCase):
    SESSIONS = 8000
    PARALLEL = 20
    RELOADS = 40

    def test_40_reloads_while_8000_sessions_run(self):
        work = tempfile.mkdtemp(prefix="smtplb-reload-load.")
        self.addCleanup(shutil.rmtree, work, ignore_errors=True)
        sinks = []
        for i in range(3):
            sinks.append(SmtpSink(stderr_path=os.path.join(work, "sink%d.stderr" % (i + 1))))
            self.addCleanup(sinks[-1].stop)
        s1, s2, s3 = [("s%d" % (i + 1), "127.0.0.1", s.port) for i, s in enumerate(sinks)]
        opts = {"global_": {"workers": 2, "max_connections": 4000},
                "pool_opts": {"p": {"connect_timeout": "1s", "banner_timeout": "2s"}},
                "health": {"interval": "500ms", "timeout": "1s"}}
        cfg_a = one_pool([s1, s2], **opts)
        # B re-weights s1 and s2 and adds s3 (checked, then used; removed again by A).
        cfg_b = one_pool([s1 + ({"weight": 3},), s2, s3], **opts)
        lb = self.smtplb(cfg_a, up=["p/s1", "p/s2"])

        timeline = os.path.join(work, "timeline.jsonl")
        load = subprocess.Popen([sys.executable, SMTPLOAD, "-q", "-n", str(self.SESSIONS), "-p", str(self.PARALLEL),
                                 "-j", "2", "-t", "10", "--timeline", timeline, "127.0.0.1:%d" % lb.port()],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def stop_load():
            if load.poll() is None:
                os.kill(load.pid, signal.SIGKILL)
                load.wait(10)
        self.addCleanup(stop_load)

        t0 = time.monotonic()
        during = 0
        pos = log_size(lb)
        time.sleep(0.2)
        for i in range(self.RELOADS):
            write_config(lb.config_path, cfg_b if i % 2 == 0 else cfg_a)
            os.kill(lb.pid, signal.SIGHUP)
            line, pos = wait_log_bytes(lb, r"configuration reloaded: generation \d+|reload failed", pos)
            self.assertIn("configuration reloaded: generation %d " % (i + 2), line)
            during += load.poll() is None
            time.sleep(0.04)
        reload_s = time.monotonic() - t0
        try:
            out, err = load.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.fail("smtpload did not finish within 60 s")
        self.assertIn(load.returncode, (0, 3), err)
        summary = json.loads(out)
        report = json.dumps({k: summary.get(k) for k in ("counts", "details", "elapsed_s", "sessions_per_s")})
        # For a failure report: the backends' fate and smtplb's own events (not access lines).
        events = [ln for ln in lb.log().splitlines() if "client=" not in ln and "reload" not in ln]
        report += "\nsmtp-sinks: %s\nsmtplb events:\n%s" % (
            "; ".join("s%d %s" % (i + 1, s.status()) for i, s in enumerate(sinks)), "\n".join(events[:60]))
        s3_ups = len(re.findall(r"server p/s3 is UP", lb.log()))
        s3_sessions = sum(1 for a in lb.access() if a["server"] == "s3")
        sys.stderr.write("\nreload under load: %d reloads in %.1f s (%d while the load ran); s3 UP %d times, "
                         "%d sessions; load: %s\n" % (self.RELOADS, reload_s, during, s3_ups, s3_sessions,
                                                      report.split("\n")[0]))
        self.assertEqual([s.proc.poll() for s in sinks], [None] * 3, "an smtp-sink died: " + report)
        self.assertEqual(summary["counts"]["ok"], self.SESSIONS, report)
        self.assertEqual(load.returncode, 0, report)
        self.assertTrue(lb.alive())
        self.assertGreaterEqual(during, self.RELOADS * 3 // 4, "too few reloads overlapped the load")
        lb.wait_log(r"configuration reloaded: generation %d " % (self.RELOADS + 1))
        # Every session was relayed normally; s3 took part while it was configured.
        terms = [a["term"] for a in lb.access()]
        self.assertEqual(len(terms), self.SESSIONS)
        self.assertEqual(set(terms), {"--"})
        self.assertNotRegex(lb.log(), r"(?m) error: ")


if __name__ == "__main__":
    main()
