#!/usr/bin/env python3
"""Server host names are resolved off the control loop: a slow DNS server delays only
the reload that needs the answer. While a reload waits for a name, the admin API answers
at once, health checks of the other servers keep running and clients keep being served;
`POST /reload` answers when the reload is done (200, or 422 with FILE:LINE:COL errors);
reloads asked for meanwhile are coalesced into one more; SIGTERM abandons a pending
reload. A name that does not resolve is not fatal (start, --check, reload): its server
is DOWN ("cannot resolve NAME") and the name is looked up again. Names are looked up
again every global.resolve_interval: a changed address is checked before it takes new
sessions, open sessions stay on the old one, and a failing resolver keeps the address.

How: smtplb runs in a private mount namespace (`unshare --mount`, as root; skipped
otherwise) in which /etc/resolv.conf is a file naming a fake DNS server written here
(UDP and TCP port 53 on 127.0.0.77, or the next free 127.0.0.x). It answers A queries
for names under slow.test with 127.0.0.1 after DELAY seconds (other types: no data,
also after DELAY), at once for the names the test put in `instant` (an address, an
empty answer for "", or SERVFAIL for None), and NXDOMAIN at once for every other name. The namespace lives as long
as the smtplb process (nothing is mounted outside it). Every wait is bounded; everything
started is stopped by PID / closed, also on failure.
"""

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from harness import (CHECK_EHLO, HOSTNAME, SMTPLB_BIN, STEP_TIMEOUT, SmtpClient, TestCase, admin_request,  # noqa: E402
                     log_time, main, recv_until_eof, server_of, toml_value, wait_until)

SLOW_ZONE = "slow.test"
DELAY = 4.0             # seconds the fake DNS server takes for names under slow.test
FAST = 1.0              # what "answers at once" means on a busy machine
RELOADED_RE = r"configuration reloaded: generation (\d+)"


# --------------------------------------------------------------------------------------
# a fake DNS server
# --------------------------------------------------------------------------------------


def _parse_query(data):
    """(id, flags, lower-case name, qtype, question bytes) or None."""
    if len(data) < 12:
        return None
    qid, flags, qdcount = struct.unpack("!HHH", data[:6])
    if qdcount != 1:
        return None
    pos, labels = 12, []
    while pos < len(data):
        n = data[pos]
        pos += 1
        if n == 0:
            break
        labels.append(data[pos:pos + n].decode("ascii", "replace"))
        pos += n
    if pos + 4 > len(data):
        return None
    qtype = struct.unpack("!H", data[pos:pos + 2])[0]
    return qid, flags, ".".join(labels).lower(), qtype, data[12:pos + 4]


def _response(qid, flags, question, rcode, addresses=()):
    # QR, AA, RA, the client's RD; one question; A records pointing at the question name.
    header = struct.pack("!HHHHHH", qid, 0x8000 | 0x0400 | 0x0080 | (flags & 0x0100) | rcode, 1,
                         len(addresses), 0, 0)
    body = question
    for ip in addresses:
        body += b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(ip)
    return header + body


class FakeDns:
    """UDP and TCP on HOST:53. `names` maps a name to the IPv4 address it answers after
    `delay` seconds; names under slow.test not in `names` answer 127.0.0.1; all others
    NXDOMAIN at once. `queries` records (time, name, qtype); `answered` (time, name, qtype)."""

    def __init__(self, delay=DELAY):
        self.delay = delay
        self.names = {}
        self.instant = {}
        self.queries = []
        self.answered = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.timers = []
        self.threads = []
        self.udp = self.tcp = None
        for last in range(77, 100):
            host = "127.0.0.%d" % last
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                udp.bind((host, 53))
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind((host, 53))
                tcp.listen(16)
            except OSError:
                udp.close()
                tcp.close()
                continue
            self.host, self.udp, self.tcp = host, udp, tcp
            break
        if not self.udp:
            raise unittest.SkipTest("no free port 53 on 127.0.0.77..99 for the fake DNS server")
        self.udp.settimeout(0.1)
        self.tcp.settimeout(0.1)
        for target in (self._udp_loop, self._tcp_loop):
            t = threading.Thread(target=target, daemon=True)
            t.start()
            self.threads.append(t)

    def close(self):
        self.stopping.set()
        with self.lock:
            for t in self.timers:
                t.cancel()
        for t in self.threads:
            t.join(5)
        self.udp.close()
        self.tcp.close()

    def queried(self, name):
        with self.lock:
            return [q for q in self.queries if q[1] == name]

    def was_answered(self, name):
        with self.lock:
            return [a for a in self.answered if a[1] == name]

    def _answer(self, data, send):
        q = _parse_query(data)
        if not q:
            return
        qid, flags, name, qtype, question = q
        with self.lock:
            self.queries.append((time.monotonic(), name, qtype))
            instant = self.instant.get(name, False)
        if instant is not False:
            with self.lock:
                self.answered.append((time.monotonic(), name, qtype))
            if instant is None:
                send(_response(qid, flags, question, 2))  # SERVFAIL: the resolver fails
            elif isinstance(instant, list):
                # Round-robin DNS: the list turns by one at every A query.
                with self.lock:
                    k = sum(1 for q in self.queries if q[1] == name and q[2] == 1) % len(instant)
                send(_response(qid, flags, question, 0, instant[k:] + instant[:k] if qtype == 1 else []))
            else:
                send(_response(qid, flags, question, 0, [instant] if qtype == 1 and instant else []))
        elif name == SLOW_ZONE or name.endswith("." + SLOW_ZONE):
            addr = self.names.get(name, "127.0.0.1")
            reply = _response(qid, flags, question, 0, [addr] if qtype == 1 else [])

            def later():
                if self.stopping.is_set():
                    return
                with self.lock:
                    self.answered.append((time.monotonic(), name, qtype))
                try:
                    send(reply)
                except OSError:
                    pass

            t = threading.Timer(self.delay, later)
            t.daemon = True
            with self.lock:
                self.timers.append(t)
            t.start()
        else:
            with self.lock:
                self.answered.append((time.monotonic(), name, qtype))
            send(_response(qid, flags, question, 3))

    def _udp_loop(self):
        while not self.stopping.is_set():
            try:
                data, peer = self.udp.recvfrom(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            self._answer(data, lambda reply, peer=peer: self.udp.sendto(reply, peer))

    def _tcp_loop(self):
        while not self.stopping.is_set():
            try:
                conn, _ = self.tcp.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._tcp_conn, args=(conn,), daemon=True)
            t.start()

    def _tcp_conn(self, conn):
        conn.settimeout(0.2)
        buf = b""
        lock = threading.Lock()

        def send(reply):
            with lock:
                conn.sendall(struct.pack("!H", len(reply)) + reply)

        try:
            while not self.stopping.is_set():
                try:
                    chunk = conn.recv(4096)
                except socket.timeout:
                    continue
                if not chunk:
                    break
                buf += chunk
                while len(buf) >= 2 and len(buf) >= 2 + struct.unpack("!H", buf[:2])[0]:
                    n = struct.unpack("!H", buf[:2])[0]
                    self._answer(buf[2:2 + n], send)
                    buf = buf[2 + n:]
        except OSError:
            pass
        finally:
            conn.close()  # answers still due fail to send (OSError, ignored)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def namespace_problem():
    """Why smtplb cannot run in a private mount namespace here, or None."""
    if os.geteuid() != 0:
        return "needs root (unshare --mount and a bind mount over /etc/resolv.conf)"
    for tool in ("unshare", "mount", "sh"):
        if not shutil.which(tool):
            return "%s is missing" % tool
    r = subprocess.run(["unshare", "--mount", "--", "true"], capture_output=True, text=True, timeout=STEP_TIMEOUT)
    if r.returncode != 0:
        return "unshare --mount does not work here: %s" % r.stderr.strip()
    return None


def table(header, values):
    return "\n".join([header] + ["%s = %s" % (k, toml_value(v)) for k, v in values.items()]) + "\n"


def config(servers, admin_path, interval="200ms", resolve_interval=None):
    """One listener, one pool p; servers: (name, address, port[, extra])."""
    g = {"hostname": HOSTNAME, "workers": 1}
    if resolve_interval:
        g["resolve_interval"] = resolve_interval
    out = [table("[global]", g),
           table("[log]", {"level": "info", "access_log": True}),
           '[admin]\nsocket = "%s"\nlisten = ""\n' % admin_path,
           table("[listener.mx]", {"address": "127.0.0.1", "port": 0, "pool": "p"}),
           table("[pool.p]", {"algorithm": "roundrobin", "retries": 3, "connect_timeout": "2s",
                              "banner_timeout": "3s"}),
           table("[pool.p.health_check]", {"interval": interval, "timeout": "2s", "rise": 1, "fall": 2,
                                           "ehlo_name": CHECK_EHLO})]
    for s in servers:
        d = {"name": s[0], "address": s[1], "port": s[2]}
        if len(s) > 3:
            d.update(s[3])
        out.append(table("[[pool.p.server]]", d))
    return "\n".join(out)


def write_config(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def admin(path, method, target, timeout=STEP_TIMEOUT + DELAY):
    """One request on its own connection: (status, body text, seconds taken)."""
    start = time.monotonic()
    status, body = admin_request(path, method, target, timeout=timeout)
    return status, body, time.monotonic() - start


class Background:
    """Runs fn() on a thread; result() waits for its value (or re-raises)."""

    def __init__(self, fn):
        self.value = self.error = None
        self.done_at = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn):
        try:
            self.value = fn()
        except BaseException as e:  # noqa: B902 - handed to the test thread
            self.error = e
        self.done_at = time.monotonic()

    def done(self):
        return not self.thread.is_alive()

    def result(self, timeout=STEP_TIMEOUT + DELAY):
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError("background call still running after %.1fs" % timeout)
        if self.error:
            raise self.error
        return self.value


def greet(port):
    c = SmtpClient(port)
    try:
        name = server_of(c.greeting())
        c.quit()
        return name
    finally:
        c.close()


# --------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------


class FakeDnsTestCase(TestCase):
    """Runs in a mount namespace whose /etc/resolv.conf names a FakeDns: set_up_dns()
    starts it and writes that file (self.resolv) and self.admin_path in a fresh dir."""

    @classmethod
    def setUpClass(cls):
        why = namespace_problem()
        if why:
            raise unittest.SkipTest(why)

    def set_up_dns(self, prefix, timeout):
        self.dns = FakeDns()
        self.addCleanup(self.dns.close)
        self.dir = tempfile.mkdtemp(prefix=prefix)
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.resolv = os.path.join(self.dir, "resolv.conf")
        with open(self.resolv, "w") as f:
            f.write("nameserver %s\noptions timeout:%d attempts:1\n" % (self.dns.host, timeout))
        self.admin_path = os.path.join(self.dir, "admin.sock")


class SlowResolverTest(FakeDnsTestCase):

    def setUp(self):
        # One try, long enough for the slow answers: the delay is the fake server's.
        self.set_up_dns("smtplb-resolve-", int(DELAY) + 3)
        self.s1 = self.fake("s1")
        self.s2 = self.fake("s2")

    def wrapper(self):
        return ["unshare", "--mount", "--", "sh", "-c", 'mount --bind "$0" /etc/resolv.conf && exec "$@"',
                self.resolv]

    def start(self, servers, resolve_interval=None, **kw):
        return self.smtplb(config(servers, self.admin_path, resolve_interval=resolve_interval),
                           wrapper=self.wrapper(), **kw)

    def run_lb(self, text, *args):
        path = os.path.join(self.dir, "run.toml")
        with open(path, "w") as f:
            f.write(text)
        return path, subprocess.run([*self.wrapper(), SMTPLB_BIN, *args, "-f", path], stdin=subprocess.DEVNULL,
                                    capture_output=True, text=True, timeout=DELAY + STEP_TIMEOUT)

    def test_unresolvable_name_at_start_is_a_warning_and_looked_up_again(self):
        """The start and --check resolve names before anything else. One that does not
        resolve is a FILE:LINE:COL warning (--check exits 0), not an error: its server
        starts DOWN ("cannot resolve NAME"), the others serve, and the name is looked up
        again until it answers; then that server is checked and takes sessions. A slow
        name delays the start."""
        text = config([("s1", "127.0.0.1", self.s1.port), ("s3", "late.dyn.test", self.s2.port)], self.admin_path,
                      resolve_interval="1s")
        line = text.splitlines().index('address = "late.dyn.test"') + 1
        path, r = self.run_lb(text, "--check")
        self.assertEqual(r.returncode, 0, r)
        self.assertRegex(r.stderr, r"(?m)^%s:%d:11: warning: cannot resolve 'late\.dyn\.test': \S.*; server p/s3 "
                         r"starts DOWN and the name is looked up again$" % (re.escape(path), line))
        self.assertIn("test is successful", r.stdout)

        lb = self.start([("s1", "127.0.0.1", self.s1.port), ("s3", "late.dyn.test", self.s2.port)],
                        resolve_interval="1s", up=["p/s1"])
        lb.wait_log(r"server p/s3 is DOWN: cannot resolve late\.dyn\.test; the name is looked up again")
        status, body, _ = admin(self.admin_path, "GET", "/status")
        self.assertRegex(body, r'"name":"s3","address":"","host":"late\.dyn\.test",[^}]*"health":"down"[^}]*'
                         r'"reason":"cannot resolve late\.dyn\.test"')
        self.assertEqual({greet(lb.port()) for _ in range(4)}, {"s1"})
        queried = len(self.dns.queried("late.dyn.test"))
        wait_until(lambda: len(self.dns.queried("late.dyn.test")) > queried, STEP_TIMEOUT, "the name looked up again")
        with self.dns.lock:
            self.dns.instant["late.dyn.test"] = "127.0.0.1"
        lb.wait_log(r"server p/s3 now at 127\.0\.0\.1:%d" % self.s2.port)
        wait_until(lambda: "s2" in {greet(lb.port()) for _ in range(4)}, STEP_TIMEOUT, "a session on s3's server")
        status, body, _ = admin(self.admin_path, "GET", "/status")
        self.assertRegex(body, r'"name":"s3","address":"127\.0\.0\.1:%d","host":"late\.dyn\.test",'
                         r'"pending_address":"","resolve_error":"","health":"up"' % self.s2.port)

        path, r = self.run_lb(config([("s2", "mx1.slow.test", self.s2.port)], self.admin_path), "--check", "-q")
        self.assertEqual((r.returncode, r.stdout, r.stderr), (0, "", ""))
        lb2_admin = os.path.join(self.dir, "admin2.sock")
        lb2 = self.smtplb(config([("s2", "mx1.slow.test", self.s2.port)], lb2_admin), wrapper=self.wrapper(),
                          up=["p/s2"], start_timeout=DELAY + STEP_TIMEOUT)
        self.assertEqual(greet(lb2.port()), "s2")

    def wait_query(self, name):
        return wait_until(lambda: self.dns.queried(name), STEP_TIMEOUT, "a DNS query for %s" % name)[0][0]

    def test_loop_keeps_running_while_a_name_resolves(self):
        lb = self.start([("s1", "127.0.0.1", self.s1.port)], up=["p/s1"])
        write_config(lb.config_path, config([("s1", "127.0.0.1", self.s1.port),
                                             ("s2", "mx1.slow.test", self.s2.port)], self.admin_path))
        sent = time.monotonic()
        reload_call = Background(lambda: admin(self.admin_path, "POST", "/reload"))
        asked = self.wait_query("mx1.slow.test")
        checks_before = len(self.s1.checks())
        # Within the DNS delay: the API answers at once, again and again, and s1 keeps
        # being checked (every 200 ms) and serving clients.
        slowest = 0.0
        probes = 0
        while time.monotonic() < asked + DELAY - 1.2:
            for target in ("/status", "/metrics"):
                status, body, took = admin(self.admin_path, "GET", target)
                self.assertEqual(status, 200, body)
                slowest = max(slowest, took)
                probes += 1
            self.assertEqual(greet(lb.port()), "s1")
            time.sleep(0.1)
        checks_during = len(self.s1.checks()) - checks_before
        self.assertLess(slowest, FAST, "the admin API waited for the resolver (%.2fs)" % slowest)
        self.assertGreaterEqual(checks_during, 4, "s1's health checks stopped while the name resolved")
        self.assertGreaterEqual(probes, 4)
        self.assertFalse(self.dns.was_answered("mx1.slow.test"), "the probes were not all inside the DNS delay")
        self.assertFalse(reload_call.done(), "POST /reload answered before the name was resolved")

        status, body, took = reload_call.result()
        self.assertEqual((status, body), (200, "reloaded: generation 2\n"))
        self.assertGreaterEqual(reload_call.done_at - sent, DELAY - 0.5, "answered before the reload completed")
        lb.wait_log(r"server p/s2 is UP")
        wait_until(lambda: "s2" in {greet(lb.port()) for _ in range(4)}, STEP_TIMEOUT, "a session on s2")
        status, body, _ = admin(self.admin_path, "GET", "/status")
        self.assertIn('"address":"127.0.0.1:%d"' % self.s2.port, body)

    def test_periodic_lookup_does_not_hold_up_the_loop(self):
        """Re-resolution (every resolve_interval) runs off the control loop too: while a
        periodic lookup waits for the slow DNS server, the admin API answers at once, both
        servers keep being checked and clients keep being served; the same answer changes
        nothing."""
        lb = self.start([("s1", "127.0.0.1", self.s1.port), ("s2", "mx1.slow.test", self.s2.port)],
                        resolve_interval="1s", up=["p/s1", "p/s2"], start_timeout=DELAY + STEP_TIMEOUT)
        at_start = len(self.dns.queried("mx1.slow.test"))
        asked = wait_until(lambda: self.dns.queried("mx1.slow.test")[at_start:], STEP_TIMEOUT + DELAY,
                           "a periodic lookup of mx1.slow.test")[0][0]
        # One lookup at a time: the ones before this have all been answered by now.
        answered = len(self.dns.was_answered("mx1.slow.test"))
        checks_before = (len(self.s1.checks()), len(self.s2.checks()))
        slowest = 0.0
        probes = 0
        served = set()
        while time.monotonic() < asked + DELAY - 1.2:
            status, body, took = admin(self.admin_path, "GET", "/status")
            self.assertEqual(status, 200, body)
            slowest = max(slowest, took)
            probes += 1
            served.add(greet(lb.port()))
            time.sleep(0.1)
        checks_during = (len(self.s1.checks()) - checks_before[0], len(self.s2.checks()) - checks_before[1])
        self.assertEqual(len(self.dns.was_answered("mx1.slow.test")), answered,
                         "the probes were not all inside the DNS delay")
        print("periodic lookup in flight for %.1f s: %d admin requests (slowest %.3f s), checks s1 %d, s2 %d, "
              "sessions on %s" % (time.monotonic() - asked, probes, slowest, checks_during[0], checks_during[1],
                                  "+".join(sorted(served))))
        self.assertLess(slowest, FAST, "the admin API waited for the resolver (%.2fs)" % slowest)
        self.assertGreaterEqual(probes, 4)
        self.assertGreaterEqual(min(checks_during), 4, "health checks stopped while the name resolved")
        self.assertEqual(served, {"s1", "s2"})
        # The answer (the same address) comes: nothing changes.
        wait_until(lambda: len(self.dns.was_answered("mx1.slow.test")) > answered, DELAY + STEP_TIMEOUT,
                   "the slow answer")
        time.sleep(0.3)
        self.assertNotRegex(lb.log(), r"now resolves to|now at 127|cannot resolve")
        status, body, _ = admin(self.admin_path, "GET", "/status")
        self.assertRegex(body, r'"name":"s2","address":"127\.0\.0\.1:%d","host":"mx1\.slow\.test",'
                         r'"pending_address":"","resolve_error":"","health":"up"' % self.s2.port)

    def test_unresolvable_name_at_reload_is_a_warning(self):
        """A reload with a name that does not resolve succeeds: that server is DOWN
        ("cannot resolve NAME"), the others take their sessions."""
        lb = self.start([("s1", "127.0.0.1", self.s1.port)], up=["p/s1"])
        text = config([("s1", "127.0.0.1", self.s1.port), ("s3", "nope.invalid-zone.test", 2525),
                       ("s2", "mx1.slow.test", self.s2.port)], self.admin_path)
        write_config(lb.config_path, text)
        lines = text.splitlines()
        line = next(i for i, ln in enumerate(lines) if ln == 'address = "nope.invalid-zone.test"') + 1
        status, body, _ = admin(self.admin_path, "POST", "/reload")
        self.assertEqual((status, body), (200, "reloaded: generation 2\n"))
        lb.wait_log(r"reload: %s:%d:11: cannot resolve 'nope\.invalid-zone\.test': \S"
                    % (re.escape(lb.config_path), line))
        lb.wait_log(r"server p/s3 is DOWN: cannot resolve nope\.invalid-zone\.test")
        lb.wait_log(r"server p/s2 is UP")
        status, body, _ = admin(self.admin_path, "GET", "/status")
        self.assertIn('"last_reload_successful":true', body)
        self.assertRegex(body, r'"name":"s3","address":"",[^}]*"health":"down"')
        wait_until(lambda: {greet(lb.port()) for _ in range(6)} == {"s1", "s2"}, STEP_TIMEOUT, "sessions on s1 and s2")

    def test_reloads_asked_for_while_resolving_are_coalesced(self):
        """Two more SIGHUPs and a POST /reload while a reload waits for DNS: one more
        reload follows, reading the file again (the last version wins)."""
        lb = self.start([("s1", "127.0.0.1", self.s1.port)], up=["p/s1"])
        write_config(lb.config_path, config([("s1", "127.0.0.1", self.s1.port),
                                             ("s2", "mx1.slow.test", self.s2.port)], self.admin_path))
        os.kill(lb.pid, signal.SIGHUP)
        self.wait_query("mx1.slow.test")
        write_config(lb.config_path, config([("s1", "127.0.0.1", self.s1.port, {"weight": 3}),
                                             ("s2", "mx1.slow.test", self.s2.port)], self.admin_path))
        os.kill(lb.pid, signal.SIGHUP)
        time.sleep(0.2)
        os.kill(lb.pid, signal.SIGHUP)
        status, body, _ = admin(self.admin_path, "POST", "/reload")
        # Answered by the coalesced reload: generation 3, with weight 3.
        self.assertEqual((status, body), (200, "reloaded: generation 3\n"))
        lb.wait_log(RELOADED_RE, count=2)
        time.sleep(0.3)
        self.assertEqual(len(re.findall(RELOADED_RE, lb.log())), 2, lb.log())
        status, body, _ = admin(self.admin_path, "GET", "/status")
        self.assertIn('"generation":3', body)
        self.assertRegex(body, r'"name":"s1","address":"127\.0\.0\.1:%d",[^}]*"weight":3' % self.s1.port)

    def test_requests_behind_a_pending_reload_wait_and_a_vanished_client_is_harmless(self):
        """A GET pipelined behind a resolving POST /reload on the same connection is
        answered after it, in order (and sees the new generation). A client that closes
        while its reload resolves does not disturb anything. `smtplb ctl reload` waits
        for the outcome."""
        lb = self.start([("s1", "127.0.0.1", self.s1.port)], up=["p/s1"])
        write_config(lb.config_path, config([("s1", "127.0.0.1", self.s1.port),
                                             ("s2", "mx1.slow.test", self.s2.port)], self.admin_path))
        gone = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        gone.connect(self.admin_path)
        gone.sendall(b"POST /reload HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        self.wait_query("mx1.slow.test")
        gone.close()

        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(s.close)
        s.settimeout(STEP_TIMEOUT)
        s.connect(self.admin_path)
        start = time.monotonic()
        s.sendall(b"POST /reload HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
                  b"GET /status?format=text HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        # Meanwhile other connections are answered at once.
        status, _, took = admin(self.admin_path, "GET", "/healthz")
        self.assertEqual(status, 200)
        self.assertLess(took, FAST)
        raw = recv_until_eof(s, timeout=2 * DELAY + STEP_TIMEOUT)
        statuses = re.findall(rb"HTTP/1\.1 (\d+) ", raw)
        self.assertEqual(statuses, [b"200", b"200", b"200"], raw)
        parts = raw.split(b"HTTP/1.1 ")
        # The first reload (the vanished client's) ran; this one was coalesced after it.
        self.assertIn(b"reloaded: generation 3\n", parts[1])
        self.assertIn(b"generation 3", parts[2])
        self.assertIn(b"ok\n", parts[3])
        self.assertGreaterEqual(time.monotonic() - start, DELAY / 2)
        self.assertEqual(len(re.findall(RELOADED_RE, lb.log())), 2)

        write_config(lb.config_path, config([("s2", "mx1.slow.test", self.s2.port, {"weight": 2})], self.admin_path))
        start = time.monotonic()
        r = subprocess.run([SMTPLB_BIN, "ctl", "--socket", self.admin_path, "reload"], capture_output=True, text=True,
                           timeout=DELAY + STEP_TIMEOUT)
        self.assertEqual((r.returncode, r.stdout), (0, "reloaded: generation 4\n"), r)
        self.assertGreaterEqual(time.monotonic() - start, DELAY - 0.5)
        self.assertTrue(lb.alive())

    def test_sigterm_abandons_a_pending_reload(self):
        lb = self.start([("s1", "127.0.0.1", self.s1.port)], up=["p/s1"])
        write_config(lb.config_path, config([("s1", "127.0.0.1", self.s1.port),
                                             ("s2", "mx1.slow.test", self.s2.port)], self.admin_path))
        reload_call = Background(lambda: admin(self.admin_path, "POST", "/reload"))
        self.wait_query("mx1.slow.test")
        time.sleep(0.3)
        stopped = time.monotonic()
        os.kill(lb.pid, signal.SIGTERM)
        status, body, took = reload_call.result()
        self.assertEqual((status, body), (503, "stopping: reload abandoned\n"))
        self.assertLess(reload_call.done_at - stopped, FAST, "the pending POST /reload was answered late")
        # Exits once the lookup already running on its thread comes back (cannot be stopped).
        self.assertEqual(lb.terminate(timeout=DELAY + STEP_TIMEOUT), 0)
        log = lb.log()
        self.assertIn("reload abandoned: stopping", log)
        self.assertNotRegex(log, RELOADED_RE)


class ReresolveTest(FakeDnsTestCase):
    """A name re-resolved every resolve_interval, under load."""

    INTERVAL = 1.0  # resolve_interval
    CHECK = 0.2     # health_check.interval

    def setUp(self):
        self.set_up_dns("smtplb-reresolve-", 2)
        # The same port on two addresses: the name moves from one to the other.
        for _ in range(20):
            self.old = self.fake("old", host="127.0.0.2")
            try:
                self.new = self.fake("new", host="127.0.0.3", port=self.old.port)
                break
            except OSError:
                self.old.close()
        else:
            self.skipTest("no port free on both 127.0.0.2 and 127.0.0.3")

    def set_answer(self, value):
        with self.dns.lock:
            self.dns.instant["mx.dyn.test"] = value

    def status(self):
        status, body, _ = admin(self.admin_path, "GET", "/status")
        self.assertEqual(status, 200, body)
        return body

    def test_rotating_answers_keep_the_address(self):
        """Round-robin DNS: the name answers 127.0.0.2 and 127.0.0.3, the order turning at
        every lookup. The server stays on the address it has, lookup after lookup; only an
        answer without it moves the server (to that answer's first address, checked first)."""
        name = "mx.dyn.test"
        port = self.old.port
        self.set_answer(["127.0.0.2", "127.0.0.3"])
        lb = self.smtplb(config([("pf", name, port)], self.admin_path, interval="%dms" % (self.CHECK * 1000),
                                resolve_interval="300ms"),
                         wrapper=["unshare", "--mount", "--", "sh", "-c",
                                  'mount --bind "$0" /etc/resolv.conf && exec "$@"', self.resolv],
                         up=["p/pf"])
        m = re.search(r'"name":"pf","address":"(127\.0\.0\.[23]):%d"' % port, self.status())
        self.assertIsNotNone(m, self.status())
        first = m.group(1)
        fakes = {"127.0.0.2": self.old, "127.0.0.3": self.new}
        other = "127.0.0.3" if first == "127.0.0.2" else "127.0.0.2"
        asked = len(self.dns.queried(name))
        wait_until(lambda: len(self.dns.queried(name)) >= asked + 12, STEP_TIMEOUT, "six more lookups")
        time.sleep(0.2)
        self.assertNotIn("now resolves to", lb.log())
        self.assertRegex(self.status(), r'"name":"pf","address":"%s:%d",[^}]*"pending_address":""'
                         % (re.escape(first), port))
        self.assertEqual({greet(lb.port()) for _ in range(6)}, {fakes[first].name})
        self.assertEqual(fakes[other].checks(), [], "%s was checked as a new address" % other)
        # An answer without the address in use: its first address, after a check.
        self.set_answer([other, "127.0.0.4"])
        lb.wait_log(r"server p/pf now at %s:%d \(mx\.dyn\.test resolves there; was %s:%d\)"
                    % (re.escape(other), port, re.escape(first), port), timeout=STEP_TIMEOUT)
        wait_until(lambda: greet(lb.port()) == fakes[other].name, STEP_TIMEOUT, "sessions on the new address")
        # And it stays there while the answers keep turning.
        offset = lb.log_offset()
        asked = len(self.dns.queried(name))
        wait_until(lambda: len(self.dns.queried(name)) >= asked + 8, STEP_TIMEOUT, "four more lookups")
        self.assertNotIn("now resolves to", lb.log()[offset:])
        print("rotating answers: %d lookups; the server stayed on %s, then moved once, to %s"
              % (len(self.dns.queried(name)), first, other))

    def test_changed_address_under_load(self):
        name = "mx.dyn.test"
        port = self.old.port
        self.set_answer("127.0.0.2")
        lb = self.smtplb(config([("pf", name, port)], self.admin_path, interval="%dms" % (self.CHECK * 1000),
                                resolve_interval="%dms" % (self.INTERVAL * 1000)),
                         wrapper=["unshare", "--mount", "--", "sh", "-c",
                                  'mount --bind "$0" /etc/resolv.conf && exec "$@"', self.resolv],
                         up=["p/pf"])
        # Sessions open on the old address before the change; they finish after it.
        held = []
        for _ in range(3):
            c = self.client(lb.port())
            self.assertEqual(server_of(c.greeting()), "old")
            c.expect("EHLO client.test", 250)
            held.append(c)

        # Load: two clients, one session after the other each, until told to stop.
        results = []  # (start, end, server or None, error)
        lock = threading.Lock()
        stop = threading.Event()

        def load():
            while not stop.is_set():
                start = time.monotonic()
                try:
                    c = SmtpClient(lb.port())
                    try:
                        who = server_of(c.greeting())
                        reply = c.quit()
                        err = None if reply.startswith(b"221") else "QUIT: %r" % reply
                    finally:
                        c.close()
                except (OSError, AssertionError) as e:
                    who, err = None, repr(e)
                with lock:
                    results.append((start, time.monotonic(), who, err))

        threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        self.addCleanup(stop.set)
        try:
            time.sleep(1.0)
            changed = time.monotonic()
            changed_wall = time.time()
            self.set_answer("127.0.0.3")
            switched = lb.wait_log(r"server p/pf now at 127\.0\.0\.3:%d \(mx\.dyn\.test resolves there; was "
                                   r"127\.0\.0\.2:%d\)" % (port, port), timeout=STEP_TIMEOUT)[0]

            def first_new():
                with lock:
                    return next((r for r in results if r[2] == "new"), None)
            first = wait_until(first_new, STEP_TIMEOUT, "a session on the new address")
            time.sleep(1.0)
        finally:
            stop.set()
            for t in threads:
                t.join(STEP_TIMEOUT)
        took = first[1] - changed
        with lock:
            done = list(results)
        failures = [r for r in done if r[3]]
        late_old = [r for r in done if r[2] == "old" and r[0] > first[1] + 0.5]
        before = sum(1 for r in done if r[2] == "old")
        after = sum(1 for r in done if r[2] == "new")
        switch = log_time(switched) - changed_wall
        print("re-resolution: %d sessions (%d on 127.0.0.2, %d on 127.0.0.3), %d failed; new sessions switched "
              "%.2f s after the DNS change and the first one on the new address ended %.2f s after it "
              "(resolve_interval %.1f s + check interval %.1f s)"
              % (len(done), before, after, len(failures), switch, took, self.INTERVAL, self.CHECK))
        self.assertEqual(failures, [])
        self.assertEqual(late_old, [], "sessions still reached the old address after the switch")
        self.assertGreater(before, 0)
        self.assertGreater(after, 0)
        # The switch within resolve_interval + one check (the next lookup comes at most
        # resolve_interval after the change, the new address's first check starts at
        # once; both take milliseconds). The first session there ends a little later
        # (slack for a loaded machine).
        self.assertLess(switch, self.INTERVAL + self.CHECK)
        self.assertLess(took, self.INTERVAL + self.CHECK + 1.0)
        # The new address passed a health check before its first session.
        first_check = min(c.t_accept for c in self.new.checks())
        first_session = min(c.t_accept for c in self.new.sessions())
        print("re-resolution: 127.0.0.3 checked %.3f s before its first session" % (first_session - first_check))
        self.assertLess(first_check, first_session)
        # The sessions opened before the change finish on the old address.
        for i, c in enumerate(held):
            self.assertTrue(c.send_message(b"Subject: held %d\r\n\r\nbody\r\n" % i).startswith(b"250"))
            self.assertTrue(c.quit().startswith(b"221"))
        self.assertEqual(len(self.old.wait_messages(3)), 3)
        self.assertEqual(self.new.messages(), [])
        self.assertRegex(self.status(), r'"name":"pf","address":"127\.0\.0\.3:%d","host":"mx\.dyn\.test",'
                         r'"pending_address":"","resolve_error":""' % port)

        # A failing resolver (SERVFAIL, then NXDOMAIN, then an empty answer): the address
        # stays, one warning per failure streak, the failures are counted.
        self.set_answer(None)
        offset = lb.log_offset()
        lb.wait_log(r"cannot resolve 'mx\.dyn\.test' \(.*\): its servers keep their address")
        asked = len(self.dns.queried(name))
        wait_until(lambda: len(self.dns.queried(name)) >= asked + 4, 4 * self.INTERVAL + STEP_TIMEOUT,
                   "two more lookups")
        with self.dns.lock:
            del self.dns.instant[name]  # NXDOMAIN
        wait_until(lambda: len(self.dns.queried(name)) >= asked + 8, 4 * self.INTERVAL + STEP_TIMEOUT,
                   "two more lookups")
        self.set_answer("")  # NOERROR without an address
        wait_until(lambda: len(self.dns.queried(name)) >= asked + 12, 4 * self.INTERVAL + STEP_TIMEOUT,
                   "two more lookups")
        time.sleep(0.2)
        self.assertEqual(len(re.findall(r"cannot resolve 'mx\.dyn\.test'", lb.log()[offset:])), 1, lb.log()[offset:])
        self.assertEqual({greet(lb.port()) for _ in range(6)}, {"new"})
        body = self.status()
        self.assertRegex(body, r'"name":"pf","address":"127\.0\.0\.3:%d",[^}]*"resolve_error":"[^"]+"' % port)
        status, metrics, _ = admin(self.admin_path, "GET", "/metrics")
        m = re.search(r'(?m)^smtplb_server_resolve_failures_total\{pool="p",server="pf"\} (\d+)$', metrics)
        self.assertIsNotNone(m, metrics)
        self.assertGreaterEqual(int(m.group(1)), 5)
        print("failing resolver: %s failed lookups counted, address kept, one warning" % m.group(1))

        # A new address that fails its check (nothing listens on 127.0.0.4): sessions stay.
        self.set_answer("127.0.0.4")
        lb.wait_log(r"'mx\.dyn\.test' resolves again")
        lb.wait_log(r"server p/pf: the new address 127\.0\.0\.4:%d fails its check" % port)
        self.assertIn('"pending_address":"127.0.0.4:%d"' % port, self.status())
        self.assertEqual({greet(lb.port()) for _ in range(6)}, {"new"})
        # Back to the address in use: the pending check is dropped.
        self.set_answer("127.0.0.3")
        lb.wait_log(r"server p/pf: mx\.dyn\.test resolves to 127\.0\.0\.3:%d again; the check of "
                    r"127\.0\.0\.4:%d is dropped" % (port, port))
        self.assertIn('"pending_address":""', self.status())


if __name__ == "__main__":
    main()
