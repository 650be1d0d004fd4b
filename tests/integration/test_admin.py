#!/usr/bin/env python3
"""Admin API and `smtplb ctl` (docs/operations.md): exact counters
after 500 sessions, `promtool check metrics`, /status (JSON and text), /healthz going 503
and back, runtime drain / ready / maint / weight through ctl (and their `(cause: admin)`
log lines), ctl's exit codes, /reload (200 and 422), the read-only TCP endpoint (403 for
writes), HTTP strictness (400/404/405/413/414/431/501/505, keep-alive, pipelining,
requests split anywhere, Connection: close), hostile admin clients that must not stall the
data path or the API (closed after ~10 s; at most 64 at once), runtime values against
reloads, the API while stopping, and the socket file (mode 0660, stale socket replaced,
removed at exit).

Every config gets an [admin] table with a unix socket in a private temporary directory
and `listen = "127.0.0.1:0"` (the bound port is read from the log). HTTP is spoken with
a small client written here (no http.client: we want to see the raw bytes, send broken
requests and pipeline). Every wait is bounded; only loopback; smtplb is stopped by PID by
the harness.
"""

import collections
import concurrent.futures
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import (STEP_TIMEOUT, Behaviour, SmtpClient, TestCase, main, make_config, server_of,  # noqa: E402
                     wait_until)

OK_QUIT = b"221 2.0.0 Bye\r\n"
BUSY = b"421 4.3.2 All server ports are busy\r\n"
TCP_RE = r"admin API \(read-only\) on http://127\.0\.0\.1:(\d+)/"
# Fields documented for /status (docs/operations.md).
LISTENER_FIELDS = {"name", "address", "pool", "current_connections", "connections_total"}
POOL_FIELDS = {"name", "algorithm", "queued", "servers"}
SERVER_FIELDS = {"name", "address", "health", "admin_state", "backup", "weight", "effective_weight",
                 "max_connections", "current_connections", "connections_total", "last_check", "last_change"}
LAST_CHECK_FIELDS = {"time", "duration_ms", "result", "reason"}
LAST_CHANGE_FIELDS = {"time", "cause"}


# --------------------------------------------------------------------------------------
# a minimal HTTP/1.1 client (unix socket or TCP)
# --------------------------------------------------------------------------------------


class Response:
    def __init__(self, status, reason, headers, body):
        self.status = status
        self.reason = reason
        self.headers = headers  # lower-case names
        self.body = body

    @property
    def text(self):
        return self.body.decode("utf-8", "replace")

    def __repr__(self):
        return "<Response %d %s %r %r>" % (self.status, self.reason, self.headers, self.body[:300])


class HttpConn:
    """One HTTP connection. request() sends; response() reads one response (responses to
    pipelined requests come in order); eof() tells whether the server closed."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()

    @classmethod
    def unix(cls, path, timeout=STEP_TIMEOUT):
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.settimeout(timeout)
                s.connect(path)
                return cls(s)
            except BlockingIOError:  # the listen backlog is full (EAGAIN): try again
                s.close()
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)
            except BaseException:
                s.close()
                raise

    @classmethod
    def tcp(cls, port, timeout=STEP_TIMEOUT):
        return cls(harness.connect(port, timeout=timeout))

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, raw: bytes):
        self.sock.sendall(raw)

    @staticmethod
    def encode(method, path, body=b"", headers=None, close=False):
        if isinstance(body, str):
            body = body.encode()
        h = {"Host": "smtplb"}
        if body or method == "POST":
            h["Content-Length"] = str(len(body))
        if close:
            h["Connection"] = "close"
        h.update(headers or {})
        head = "%s %s HTTP/1.1\r\n" % (method, path) + "".join("%s: %s\r\n" % kv for kv in h.items()) + "\r\n"
        return head.encode() + body

    def request(self, method, path, body=b"", headers=None, close=False):
        self.send(self.encode(method, path, body, headers, close))

    def _fill(self, deadline, what):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("timed out waiting for %s; have %r" % (what, bytes(self.buf[:300])))
        self.sock.settimeout(left)
        try:
            d = self.sock.recv(65536)
        except socket.timeout:
            raise AssertionError("timed out waiting for %s; have %r" % (what, bytes(self.buf[:300])))
        if not d:
            raise AssertionError("EOF while waiting for %s; have %r" % (what, bytes(self.buf[:300])))
        self.buf += d

    def response(self, timeout=STEP_TIMEOUT) -> Response:
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buf:
            self._fill(deadline, "a response head")
        end = self.buf.index(b"\r\n\r\n")
        head = bytes(self.buf[:end]).decode("latin-1")
        del self.buf[:end + 4]
        lines = head.split("\r\n")
        m = re.match(r"HTTP/1\.1 (\d{3}) (.*)$", lines[0])
        if not m:
            raise AssertionError("bad status line %r" % lines[0])
        headers = {}
        for ln in lines[1:]:
            k, sep, v = ln.partition(":")
            if not sep:
                raise AssertionError("bad header line %r" % ln)
            k = k.strip().lower()
            if k in headers:
                raise AssertionError("duplicate header %r in %r" % (k, head))
            headers[k] = v.strip()
        if "content-length" not in headers:
            raise AssertionError("no Content-Length in %r" % head)
        n = int(headers["content-length"])
        while len(self.buf) < n:
            self._fill(deadline, "a body of %d bytes" % n)
        body = bytes(self.buf[:n])
        del self.buf[:n]
        return Response(int(m.group(1)), m.group(2), headers, body)

    def eof(self, timeout=STEP_TIMEOUT) -> bool:
        """True if the server closes (FIN or reset) within timeout with nothing more sent;
        False if it keeps the connection open that long."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            r, _, _ = select.select([self.sock], [], [], left)
            if not r:
                return False
            try:
                d = self.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                return True
            if not d:
                return True
            raise AssertionError("unexpected bytes instead of EOF: %r" % d[:300])


# --------------------------------------------------------------------------------------
# metrics parsing
# --------------------------------------------------------------------------------------

SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


class Metrics:
    def __init__(self, text):
        self.text = text
        self.samples = []  # (name, labels dict, value)
        for ln in text.splitlines():
            if not ln or ln.startswith("#"):
                continue
            m = SAMPLE_RE.match(ln)
            if not m:
                raise AssertionError("unparsable metrics line %r" % ln)
            labels = dict(LABEL_RE.findall(m.group(2) or ""))
            self.samples.append((m.group(1), labels, float(m.group(3))))

    def find(self, name, **labels):
        return [(lb, v) for n, lb, v in self.samples
                if n == name and all(lb.get(k) == str(v) for k, v in labels.items())]

    def value(self, name, **labels):
        got = self.find(name, **labels)
        if len(got) != 1:
            raise AssertionError("%d samples of %s%r: %r" % (len(got), name, labels, got))
        return got[0][1]

    def total(self, name, **labels):
        return sum(v for _, v in self.find(name, **labels))

    def histogram(self, name, **labels):
        """[(le, count)] in the order written, plus _count and _sum."""
        buckets = [(lb["le"], v) for lb, v in self.find(name + "_bucket", **labels)]
        return buckets, self.value(name + "_count", **labels), self.value(name + "_sum", **labels)


# --------------------------------------------------------------------------------------
# test base
# --------------------------------------------------------------------------------------


def _float_le(le):
    return float("inf") if le == "+Inf" else float(le)


class AdminTestCase(TestCase):

    def start(self, servers, *, extra="", up=(), down=(), **kw):
        """smtplb with an [admin] table: self.sock_path (unix socket), self.tcp_port."""
        self.tmp = tempfile.mkdtemp(prefix="smtplb-adm-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.sock_path = os.path.join(self.tmp, "admin.sock")
        admin = '\n[admin]\nsocket = "%s"\nlisten = "127.0.0.1:0"\n' % self.sock_path
        self.lb = self.smtplb(make_config(servers, extra=admin + extra, **kw), up=up, down=down)
        line = self.lb.wait_log(TCP_RE, what="the admin TCP endpoint")[0]
        self.tcp_port = int(re.search(TCP_RE, line).group(1))
        self.assertTrue(os.path.exists(self.sock_path))
        return self.lb

    def conn(self, tcp=False) -> HttpConn:
        c = HttpConn.tcp(self.tcp_port) if tcp else HttpConn.unix(self.sock_path)
        self.addCleanup(c.close)
        return c

    def call(self, method, path, body=b"", headers=None, tcp=False, timeout=STEP_TIMEOUT) -> Response:
        """One request on a fresh connection with Connection: close; checks that it closes."""
        c = HttpConn.tcp(self.tcp_port) if tcp else HttpConn.unix(self.sock_path)
        try:
            c.request(method, path, body, headers, close=True)
            r = c.response(timeout)
            self.assertEqual(r.headers.get("connection"), "close", r)
            self.assertTrue(c.eof(5), "no close after Connection: close")
            return r
        finally:
            c.close()

    def get(self, path, **kw) -> Response:
        return self.call("GET", path, **kw)

    def metrics(self, tcp=False) -> Metrics:
        r = self.get("/metrics", tcp=tcp)
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.headers["content-type"], "text/plain; version=0.0.4; charset=utf-8")
        return Metrics(r.text)

    def status(self) -> dict:
        r = self.get("/status")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.headers["content-type"], "application/json")
        return json.loads(r.body)

    def server_status(self, name, pool="p"):
        st = self.status()
        for p in st["pools"]:
            if p["name"] == pool:
                for s in p["servers"]:
                    if s["name"] == name:
                        return s
        self.fail("no server %s/%s in /status" % (pool, name))

    def ctl(self, *args, socket_path=None, timeout=20) -> subprocess.CompletedProcess:
        return harness.check_sanitizer(
            subprocess.run([harness.SMTPLB_BIN, "ctl", "--socket", socket_path or self.sock_path, *args],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout))

    def ctl_ok(self, *args) -> str:
        r = self.ctl(*args)
        self.assertEqual((r.returncode, r.stderr), (0, ""), r)
        return r.stdout

    def promtool(self, text):
        if not shutil.which("promtool"):
            self.skipTest("promtool not installed (Debian package prometheus)")
        r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
        self.assertEqual((r.returncode, r.stdout, r.stderr), (0, "", ""), "promtool check metrics complained")

    def assert_histogram(self, m, name, **labels):
        buckets, count, total = m.histogram(name, **labels)
        self.assertGreater(len(buckets), 1, "%s%r" % (name, labels))
        les = [_float_le(le) for le, _ in buckets]
        self.assertEqual(les, sorted(les), "bucket bounds out of order: %r" % buckets)
        self.assertEqual(buckets[-1][0], "+Inf")
        values = [v for _, v in buckets]
        self.assertEqual(values, sorted(values), "%s%r buckets not cumulative: %r" % (name, labels, buckets))
        self.assertEqual(values[-1], count, "%s%r: _count %s, +Inf bucket %s" % (name, labels, count, values[-1]))
        self.assertGreaterEqual(total, 0)
        return count


def short_session(port):
    """Greeting and QUIT; returns (server name, client label)."""
    c = SmtpClient(port)
    try:
        g = c.greeting()
        label = c.label()
        r = c.quit()
        if r != OK_QUIT:
            raise AssertionError("QUIT: %r" % r)
        return server_of(g), label
    finally:
        c.close()


def mail_session(port, i):
    """A whole session with one message whose size depends on i; returns (server, label)."""
    c = SmtpClient(port)
    try:
        g = c.greeting()
        label = c.label()
        body = ("Subject: %d\r\n\r\n" % i).encode() + b"y" * ((i * 37) % 500) + b"\r\n"
        r = c.send_message(body, ehlo="client%d.test" % i)
        if not r.startswith(b"250 "):
            raise AssertionError("final dot: %r" % r)
        r = c.quit()
        if r != OK_QUIT:
            raise AssertionError("QUIT: %r" % r)
        return server_of(g), label
    finally:
        c.close()


# --------------------------------------------------------------------------------------
# metrics and status
# --------------------------------------------------------------------------------------


class MetricsTest(AdminTestCase):

    def test_counters_exact_after_500_sessions(self):
        """workers = 2 (per-worker counters summed at scrape time), 8 clients in parallel,
        500 sessions with a message each: every counter adds up to exactly 500, and the
        byte counters of each server equal the sums of its sessions' access lines."""
        s1 = self.fake("s1")
        s2 = self.fake("s2")
        lb = self.start([s1, s2], global_={"workers": 2}, up=["p/s1", "p/s2"])
        n = 500
        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            results = list(ex.map(lambda i: mail_session(lb.port(), i), range(n)))
        access = lb.wait_access(count=n, timeout=STEP_TIMEOUT)
        self.assertEqual(len(access), n)
        self.assertEqual({a["term"] for a in access}, {"--"})
        per_server = collections.Counter(a["server"] for a in access)
        self.assertEqual(per_server, collections.Counter(name for name, _ in results))
        self.assertEqual(sum(per_server.values()), n)

        m = self.metrics()
        self.assertEqual(m.value("smtplb_listener_connections_total", listener="mx"), n)
        self.assertEqual(m.value("smtplb_listener_current_connections", listener="mx"), 0)
        self.assertEqual(m.total("smtplb_listener_rejected_connections_total"), 0)
        self.assertEqual(m.total("smtplb_server_connections_total"), n)
        self.assertEqual(m.total("smtplb_server_current_connections"), 0)
        self.assertEqual(m.total("smtplb_server_connection_errors_total"), 0)
        self.assertEqual(m.total("smtplb_pool_no_server_total"), 0)
        self.assertEqual(m.value("smtplb_access_log_dropped_total"), 0)
        self.assertEqual(m.value("smtplb_pool_servers", pool="p", state="up"), 2)
        for name in ("s1", "s2"):
            mine = [a for a in access if a["server"] == name]
            with self.subTest(server=name):
                self.assertEqual(m.value("smtplb_server_connections_total", pool="p", server=name), len(mine))
                self.assertEqual(m.value("smtplb_server_bytes_sent_total", pool="p", server=name),
                                 sum(a["bytes_in"] for a in mine), "bytes to the server vs clients' bytes_in")
                self.assertEqual(m.value("smtplb_server_bytes_received_total", pool="p", server=name),
                                 sum(a["bytes_out"] for a in mine), "bytes from the server vs clients' bytes_out")
                self.assertEqual(m.value("smtplb_server_up", pool="p", server=name), 1)
                self.assertEqual(m.value("smtplb_server_admin_state", pool="p", server=name, state="ready"), 1)
                self.assertEqual(self.assert_histogram(m, "smtplb_server_connect_duration_seconds", pool="p",
                                                       server=name), len(mine))
        self.assertEqual(self.assert_histogram(m, "smtplb_session_duration_seconds", listener="mx"), n)
        # The histograms measure what the access lines say (Tt; Tc + Tb), to the millisecond.
        buckets, _, total = m.histogram("smtplb_session_duration_seconds", listener="mx")
        self.assertAlmostEqual(total, sum(a["Tt"] for a in access) / 1000, delta=0.001 * n)
        for le, count in buckets:
            bound_ms = _float_le(le) * 1000
            lo = len([a for a in access if a["Tt"] < bound_ms])
            hi = len([a for a in access if a["Tt"] <= bound_ms])
            self.assertTrue(lo <= count <= hi, "bucket le=%s has %d; Tt < it: %d, <= it: %d" % (le, count, lo, hi))
        connect_sum = m.total("smtplb_server_connect_duration_seconds_sum")
        self.assertAlmostEqual(connect_sum, sum(a["Tc"] + a["Tb"] for a in access) / 1000, delta=0.001 * n)
        self.assertEqual(m.total("smtplb_sessions_terminated_total", listener="mx"), n)
        self.assertEqual(m.value("smtplb_sessions_terminated_total", listener="mx", term="--"), n)
        self.assertEqual(self.assert_histogram(m, "smtplb_server_check_duration_seconds", pool="p"), 2,
                         "one check per server (interval 10m)")
        self.assertEqual(m.value("smtplb_config_generation"), 1)
        self.assertEqual(m.value("smtplb_build_info", version=m.find("smtplb_build_info")[0][0]["version"]), 1)
        # Client addresses never appear as label values.
        self.assertNotIn("127.0.0.1", "".join(v for _, lb_, _ in m.samples for v in lb_.values()))

        # /status agrees.
        st = self.status()
        self.assertEqual(st["listeners"][0]["connections_total"], n)
        self.assertEqual({s["name"]: s["connections_total"] for s in st["pools"][0]["servers"]}, dict(per_server))
        self.promtool(m.text)

    def test_promtool_check_metrics(self):
        """Both endpoints' /metrics pass `promtool check metrics` silently, also with a
        drained server, a server in maintenance, a DOWN one and a failed reload."""
        s1 = self.fake("s1")
        s2 = self.fake("s2")
        s3 = self.fake("s3")
        s4 = self.fake("s4", Behaviour(greeting=BUSY))
        lb = self.start([s1, s2, s3, s4], up=["p/s1", "p/s2", "p/s3"], down=["p/s4"],
                        health={"rise": 1, "fall": 1})
        for i in range(5):
            mail_session(lb.port(), i)
        self.ctl_ok("drain", "p/s2")
        self.ctl_ok("maint", "p/s3")
        with open(lb.config_path, "a") as f:
            f.write("\n[bogus\n")
        self.assertEqual(self.call("POST", "/reload").status, 422)
        lb.wait_access(count=5)
        for tcp in (False, True):
            with self.subTest(tcp=tcp):
                m = self.metrics(tcp=tcp)
                self.assertEqual(m.value("smtplb_config_last_reload_successful"), 0)
                self.assertEqual(m.value("smtplb_config_reloads_total", result="failure"), 1)
                self.assertEqual(m.value("smtplb_pool_servers", pool="p", state="drain"), 1)
                self.assertEqual(m.value("smtplb_pool_servers", pool="p", state="maint"), 1)
                self.assertEqual(m.value("smtplb_pool_servers", pool="p", state="down"), 1)
                self.assertEqual(m.value("smtplb_pool_servers", pool="p", state="up"), 1)
                self.assertGreaterEqual(m.value("smtplb_server_check_failures_total", pool="p", server="s4",
                                                reason="greeting"), 1)
                self.promtool(m.text)

    def test_status_json_and_text(self):
        s1 = self.fake("s1")
        s2 = self.fake("s2")
        lb = self.start([s1, (s2, {"weight": 5, "backup": True, "max_connections": 7})], up=["p/s1", "p/s2"])
        short_session(lb.port())
        lb.wait_access(count=1)
        st = self.status()
        for k in ("version", "generation", "loaded_at", "listeners", "pools"):
            self.assertIn(k, st)
        self.assertEqual(st["generation"], 1)
        self.assertRegex(st["loaded_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        self.assertEqual(len(st["listeners"]), 1)
        li = st["listeners"][0]
        self.assertLessEqual(LISTENER_FIELDS, set(li), li)
        self.assertEqual((li["name"], li["address"], li["pool"], li["connections_total"], li["current_connections"]),
                         ("mx", "127.0.0.1:%d" % lb.port(), "p", 1, 0))
        self.assertEqual(len(st["pools"]), 1)
        pool = st["pools"][0]
        self.assertLessEqual(POOL_FIELDS, set(pool), pool)
        self.assertEqual((pool["name"], pool["algorithm"], pool["queued"]), ("p", "roundrobin", 0))
        servers = {s["name"]: s for s in pool["servers"]}
        self.assertEqual(set(servers), {"s1", "s2"})
        for name, s in servers.items():
            with self.subTest(server=name):
                self.assertLessEqual(SERVER_FIELDS, set(s), s)
                self.assertLessEqual(LAST_CHECK_FIELDS, set(s["last_check"]), s)
                self.assertLessEqual(LAST_CHANGE_FIELDS, set(s["last_change"]), s)
                self.assertEqual((s["health"], s["admin_state"]), ("up", "ready"))
                self.assertEqual(s["last_check"]["result"], "passed")
                self.assertRegex(s["last_check"]["time"], r"^\d{4}-\d\d-\d\dT")
                self.assertIsInstance(s["last_check"]["duration_ms"], int)
        self.assertEqual(servers["s1"]["address"], "127.0.0.1:%d" % s1.port)
        self.assertEqual((servers["s1"]["weight"], servers["s1"]["backup"], servers["s1"]["connections_total"]),
                         (1, False, 1))
        self.assertEqual((servers["s2"]["weight"], servers["s2"]["effective_weight"], servers["s2"]["backup"],
                          servers["s2"]["max_connections"], servers["s2"]["connections_total"]), (5, 5, True, 7, 0))

        r = self.get("/status?format=text")
        self.assertEqual(r.status, 200, r)
        self.assertTrue(r.headers["content-type"].startswith("text/plain"), r)
        lines = r.text.splitlines()
        self.assertRegex(lines[0], r"^smtplb \S+, generation 1$")
        self.assertEqual(len([ln for ln in lines if re.match(r"^mx\s+127\.0\.0\.1:%d\s+p\s+0\s+1$" % lb.port(), ln)]),
                         1, r.text)
        for name, port, weight, total in (("s1", s1.port, 1, 1), ("s2", s2.port, 5, 0)):
            rx = r"^p/%s\s+127\.0\.0\.1:%d\s+up\s+ready\s+%d\s+0\s+%d\s+passed$" % (name, port, weight, total)
            self.assertEqual(len([ln for ln in lines if re.match(rx, ln)]), 1, "%s\n%s" % (rx, r.text))
        # ctl status prints the same table.
        out = self.ctl_ok("status")
        self.assertEqual(out, r.text)


class HealthzTest(AdminTestCase):

    def test_healthz_503_names_the_pool_and_recovers(self):
        """Pool p (a, b) and pool q (c). Both of p fail their checks: /healthz 503 naming p
        (not q), on both endpoints. One of p heals: 200 ok again."""
        a = self.fake("a")
        b = self.fake("b")
        c = self.fake("c")
        extra = ('\n[listener.mx2]\naddress = "127.0.0.1"\nport = 0\npool = "q"\n'
                 '[pool.q]\nalgorithm = "roundrobin"\n'
                 '[pool.q.health_check]\ninterval = "10m"\nehlo_name = "%s"\n'
                 '[[pool.q.server]]\nname = "c"\naddress = "127.0.0.1"\nport = %d\n' % (harness.CHECK_EHLO, c.port))
        lb = self.start([a, b], extra=extra, health={"interval": "150ms", "timeout": "1s", "rise": 1, "fall": 1},
                        up=["p/a", "p/b", "q/c"])
        for tcp in (False, True):
            r = self.get("/healthz", tcp=tcp)
            self.assertEqual((r.status, r.body), (200, b"ok\n"), r)
        off = lb.log_offset()
        a.behaviour = Behaviour(greeting=BUSY)
        b.behaviour = Behaviour(greeting=BUSY)
        lb.wait_log(r"server p/a is DOWN", since=off)
        lb.wait_log(r"server p/b is DOWN", since=off)
        for tcp in (False, True):
            r = self.get("/healthz", tcp=tcp)
            self.assertEqual(r.status, 503, r)
            self.assertIn("pool p ", r.text)
            self.assertNotIn("pool q", r.text)
        self.assertEqual(self.server_status("a")["health"], "down")
        self.assertEqual(self.server_status("a")["last_check"]["result"], "failed")
        self.assertIn("421", self.server_status("a")["last_check"]["reason"])
        off = lb.log_offset()
        b.behaviour = Behaviour()
        lb.wait_log(r"server p/b is UP", since=off)
        r = self.get("/healthz")
        self.assertEqual((r.status, r.body), (200, b"ok\n"), r)

    def test_healthz_503_when_all_servers_drained(self):
        """Usable = UP and ready: draining the only server makes /healthz 503 too."""
        s1 = self.fake("s1")
        self.start([s1], up=["p/s1"])
        self.ctl_ok("drain", "p/s1")
        r = self.get("/healthz")
        self.assertEqual(r.status, 503, r)
        self.assertIn("pool p", r.text)
        self.ctl_ok("ready", "p/s1")
        self.assertEqual(self.get("/healthz").status, 200)


# --------------------------------------------------------------------------------------
# ctl: drain / ready / maint / weight / errors
# --------------------------------------------------------------------------------------


class CtlTest(AdminTestCase):

    def test_drain_keeps_open_session_then_ready(self):
        s1 = self.fake("s1")
        s2 = self.fake("s2")
        lb = self.start([s1, s2], health={"interval": "200ms", "timeout": "1s", "rise": 1, "fall": 1},
                        up=["p/s1", "p/s2"])
        held = self.client(lb.port())
        victim = server_of(held.greeting())
        other = "s2" if victim == "s1" else "s1"
        vsrv = s1 if victim == "s1" else s2
        held_label = held.label()
        held.expect("EHLO held.test", 250)

        off = lb.log_offset()
        out = self.ctl_ok("drain", "p/" + victim)
        self.assertEqual(out, "p/%s state drain\n" % victim)
        lb.wait_log(r"server p/%s state ready -> drain \(cause: admin\)" % victim, since=off, timeout=2)
        st = self.server_status(victim)
        self.assertEqual((st["admin_state"], st["current_connections"]), ("drain", 1))
        m = self.metrics()
        self.assertEqual(m.value("smtplb_server_current_connections", pool="p", server=victim), 1)
        self.assertEqual(m.value("smtplb_listener_current_connections", listener="mx"), 1)
        self.assertEqual(m.value("smtplb_server_admin_state", pool="p", server=victim, state="drain"), 1)
        self.assertEqual(m.value("smtplb_server_admin_state", pool="p", server=victim, state="ready"), 0)
        names = [short_session(lb.port())[0] for _ in range(10)]
        self.assertEqual(names, [other] * 10)

        # The open session on the drained server goes on: a message and QUIT.
        checks_before = len(vsrv.checks())
        r = held.send_message(b"Subject: drained\r\n\r\n" + b"z" * 2000 + b"\r\n")
        self.assertTrue(r.startswith(b"250 "), r)
        self.assertEqual(held.quit(), OK_QUIT)
        a = lb.wait_access(client=held_label)[0]
        self.assertEqual((a["server"], a["term"]), (victim, "--"), a)
        self.assertGreater(a["bytes_in"], 2000, a)
        self.assertEqual(vsrv.messages()[-1]["size"], len(b"Subject: drained\r\n\r\n") + 2002)
        # A drained server is still checked.
        wait_until(lambda: len(vsrv.checks()) >= checks_before + 2, 3, "checks of the drained server")
        self.assertEqual(self.server_status(victim)["health"], "up")

        off = lb.log_offset()
        self.assertEqual(self.ctl_ok("ready", "p/" + victim), "p/%s state ready\n" % victim)
        lb.wait_log(r"server p/%s state drain -> ready \(cause: admin\)" % victim, since=off, timeout=2)
        names = collections.Counter(short_session(lb.port())[0] for _ in range(10))
        self.assertEqual(names, collections.Counter({"s1": 5, "s2": 5}))

    def test_maint_stops_checks_and_ready_restarts_them(self):
        """Checks take ~80 ms (a slow greeting) every 200 ms; `maint` is sent while one is
        in flight. From then on the server sees no connection for 6 intervals, its health
        is unchecked (and stays so: the in-flight check must not bring it back), it takes
        no sessions; `ready` restarts the checks and it comes UP again."""
        s1 = self.fake("s1")
        s2 = self.fake("s2", Behaviour(greeting_delay=0.08))
        lb = self.start([s1, s2], health={"interval": "200ms", "timeout": "1s", "rise": 1, "fall": 1},
                        up=["p/s1", "p/s2"])
        n0 = len(s2.snapshot())
        wait_until(lambda: len(s2.snapshot()) > n0 and not s2.snapshot()[-1].done.is_set(), 3,
                   "a check of s2 in flight")
        off = lb.log_offset()
        self.assertEqual(self.ctl_ok("maint", "p/s2"), "p/s2 state maint\n")
        lb.wait_log(r"server p/s2 state ready -> maint \(cause: admin\)", since=off, timeout=2)
        lb.wait_log(r"server p/s2 is in maintenance: checks stopped", since=off, timeout=2)
        time.sleep(0.3)  # the check in flight ends (or is cut)
        n = len(s2.snapshot())
        names = [short_session(lb.port())[0] for _ in range(6)]
        self.assertEqual(names, ["s1"] * 6)
        time.sleep(1.2)
        self.assertEqual(len(s2.snapshot()), n, "checks went on in maintenance")
        st = self.server_status("s2")
        self.assertEqual((st["admin_state"], st["health"]), ("maint", "unchecked"), st)
        m = self.metrics()
        self.assertEqual(m.value("smtplb_pool_servers", pool="p", state="maint"), 1)
        self.assertEqual(m.value("smtplb_server_up", pool="p", server="s2"), 0)
        self.assertEqual(m.value("smtplb_server_admin_state", pool="p", server="s2", state="maint"), 1)
        self.assertNotRegex(lb.log()[off:], r"server p/s2 is (UP|DOWN)")

        # maint -> drain: checked again, still no sessions.
        off = lb.log_offset()
        self.assertEqual(self.ctl_ok("drain", "p/s2"), "p/s2 state drain\n")
        lb.wait_log(r"server p/s2 state maint -> drain \(cause: admin\)", since=off, timeout=2)
        checks = len(s2.checks())
        wait_until(lambda: len(s2.checks()) >= checks + 2, 3, "checks of s2 after drain")
        lb.wait_log(r"server p/s2 is UP", since=off, timeout=3)
        self.assertEqual(self.server_status("s2")["health"], "up")
        self.assertEqual([short_session(lb.port())[0] for _ in range(4)], ["s1"] * 4)
        self.assertEqual([c for c in s2.snapshot() if c.kind == "session"], [])

        off = lb.log_offset()
        self.assertEqual(self.ctl_ok("ready", "p/s2"), "p/s2 state ready\n")
        lb.wait_log(r"server p/s2 state drain -> ready \(cause: admin\)", since=off, timeout=2)
        checks = len(s2.checks())
        wait_until(lambda: len(s2.checks()) >= checks + 2, 3, "checks of s2 after ready")
        self.assertEqual(self.server_status("s2")["health"], "up")
        names = collections.Counter(short_session(lb.port())[0] for _ in range(10))
        self.assertEqual(names, collections.Counter({"s1": 5, "s2": 5}))

    def test_weight_changes_the_split(self):
        s1 = self.fake("s1")
        s2 = self.fake("s2")
        lb = self.start([s1, s2], up=["p/s1", "p/s2"])  # roundrobin, workers = 1
        off = lb.log_offset()
        self.assertEqual(self.ctl_ok("weight", "p/s1", "3"), "p/s1 weight 3\n")
        lb.wait_log(r"server p/s1 weight 1 -> 3 \(cause: admin\)", since=off, timeout=2)
        self.assertEqual(self.server_status("s1")["weight"], 3)
        self.assertEqual(self.metrics().value("smtplb_server_weight", pool="p", server="s1"), 3)
        names = collections.Counter(short_session(lb.port())[0] for _ in range(400))
        self.assertEqual(names, collections.Counter({"s1": 300, "s2": 100}))
        # Weight 0: no new sessions.
        self.ctl_ok("weight", "p/s1", "0")
        names = [short_session(lb.port())[0] for _ in range(6)]
        self.assertEqual(names, ["s2"] * 6)
        lb.wait_log(r"server p/s1 weight 3 -> 0 \(cause: admin\)", timeout=2)

    def test_errors_and_exit_codes(self):
        s1 = self.fake("s1")
        lb = self.start([s1], up=["p/s1"])
        r = self.ctl("drain", "p/nosuch")
        self.assertEqual((r.returncode, r.stdout), (1, ""), r)
        self.assertIn("no server p/nosuch", r.stderr)
        r = self.ctl("weight", "q/s1", "2")
        self.assertEqual(r.returncode, 1, r)
        self.assertIn("no server q/s1", r.stderr)
        for bad in ("x", "257", "-1", "1.5", ""):
            with self.subTest(weight=bad):
                r = self.ctl("weight", "p/s1", bad)
                self.assertEqual((r.returncode, r.stdout), (1, ""), r)
                self.assertIn("weight must be a number from 0 to 256", r.stderr)
        # (`drain` and `ready` alone drain the whole process: test_process_drain.py.)
        for args in ((), ("bogus",), ("drain", "s1"), ("weight", "p/s1"), ("status", "extra"),
                     ("ready", "p/s1", "p/s1")):
            with self.subTest(args=args):
                r = self.ctl(*args)
                self.assertEqual((r.returncode, r.stdout), (64, ""), r)
                self.assertIn("usage: smtplb ctl", r.stderr)
        r = harness.check_sanitizer(subprocess.run([harness.SMTPLB_BIN, "ctl", "--socket"], capture_output=True,
                                                   text=True, timeout=20))
        self.assertEqual(r.returncode, 64, r)
        missing = os.path.join(self.tmp, "missing.sock")
        r = self.ctl("status", socket_path=missing)
        self.assertEqual((r.returncode, r.stdout), (1, ""), r)
        self.assertIn("cannot connect to %s" % missing, r.stderr)
        self.assertIn("No such file or directory", r.stderr)
        # A socket file nobody listens on.
        dead = os.path.join(self.tmp, "dead.sock")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(dead)
        s.close()
        r = self.ctl("status", socket_path=dead)
        self.assertEqual(r.returncode, 1, r)
        self.assertIn("cannot connect to %s" % dead, r.stderr)
        # -f CONFIG finds the socket in the file.
        r = harness.check_sanitizer(subprocess.run([harness.SMTPLB_BIN, "ctl", "-f", lb.config_path, "status"],
                                                   capture_output=True, text=True, timeout=20))
        self.assertEqual(r.returncode, 0, r)
        self.assertIn("p/s1", r.stdout)
        # Nothing was changed by the failed commands.
        st = self.server_status("s1")
        self.assertEqual((st["admin_state"], st["weight"]), ("ready", 1))
        self.assertNotIn("(cause: admin)", lb.log())


# --------------------------------------------------------------------------------------
# endpoints: read-only TCP, reload
# --------------------------------------------------------------------------------------


class EndpointTest(AdminTestCase):

    def test_tcp_endpoint_is_read_only(self):
        s1 = self.fake("s1")
        lb = self.start([s1], up=["p/s1"])
        m = self.metrics(tcp=True)
        self.assertEqual(m.value("smtplb_config_generation"), 1)
        self.assertEqual(self.get("/status", tcp=True).status, 200)
        self.assertEqual(self.get("/healthz", tcp=True).body, b"ok\n")
        for path, body in (("/reload", ""), ("/servers/p/s1/state", "drain"), ("/servers/p/s1/weight", "9")):
            with self.subTest(path=path):
                r = self.call("POST", path, body, tcp=True)
                self.assertEqual(r.status, 403, r)
        st = self.server_status("s1")
        self.assertEqual((st["admin_state"], st["weight"]), ("ready", 1))
        self.assertEqual(self.status()["generation"], 1)
        self.assertNotIn("(cause: admin)", lb.log())
        self.assertNotIn("reloading", lb.log())

    def test_reload_through_the_socket(self):
        s1 = self.fake("s1")
        s2 = self.fake("s2")
        lb = self.start([s1, s2], up=["p/s1", "p/s2"])
        with open(lb.config_path) as f:
            good = f.read()
        # A good reload changing s2's weight.
        new = good.replace('name = "s2"', 'name = "s2"\nweight = 4')
        self.assertNotEqual(new, good)
        with open(lb.config_path, "w") as f:
            f.write(new)
        r = self.call("POST", "/reload")
        self.assertEqual((r.status, r.body), (200, b"reloaded: generation 2\n"), r)
        self.assertEqual(self.status()["generation"], 2)
        self.assertEqual(self.server_status("s2")["weight"], 4)

        # A broken file with two bad values: 422, every error as FILE:LINE:COL: message;
        # generation 2 keeps serving.
        lines = new.splitlines()
        i_retries = next(i for i, ln in enumerate(lines) if ln.startswith("retries ="))
        i_timeout = next(i for i, ln in enumerate(lines) if ln.startswith("connect_timeout ="))
        lines[i_retries] = 'retries = "many"'
        lines[i_timeout] = 'connect_timeout = "banana"'
        with open(lb.config_path, "w") as f:
            f.write("\n".join(lines) + "\n")
        r = self.call("POST", "/reload")
        self.assertEqual(r.status, 422, r)
        body = r.text.splitlines()
        self.assertEqual(body[0], "reload failed; still running generation 2", r.text)
        errs = body[1:]
        for e in errs:
            self.assertRegex(e, r"^%s:\d+:\d+: \S" % re.escape(lb.config_path))
        for i in (i_retries, i_timeout):
            self.assertEqual(len([e for e in errs if e.startswith("%s:%d:" % (lb.config_path, i + 1))]), 1,
                             "line %d not named once: %r" % (i + 1, errs))
        lb.wait_log(r"reload failed \(2 errors\); still running generation 2", timeout=2)
        # A TOML syntax error too.
        with open(lb.config_path, "a") as f:
            f.write("[listener.mx]\n")
        r = self.call("POST", "/reload")
        self.assertEqual(r.status, 422, r)
        self.assertRegex(r.text, r"\n%s:%d:\d+: " % (re.escape(lb.config_path), len(lines) + 1))
        st = self.status()
        self.assertEqual((st["generation"], st["last_reload_successful"]), (2, False))
        names = collections.Counter(short_session(lb.port())[0] for _ in range(10))
        self.assertEqual(names, collections.Counter({"s1": 2, "s2": 8}), "the old configuration (weight 4)")
        m = self.metrics()
        self.assertEqual((m.value("smtplb_config_reloads_total", result="success"),
                          m.value("smtplb_config_reloads_total", result="failure"),
                          m.value("smtplb_config_last_reload_successful"),
                          m.value("smtplb_config_generation")), (1, 2, 0, 2))
        # ctl reload: the same answers through ctl (exit 1 and the errors on stderr).
        r = self.ctl("reload")
        self.assertEqual(r.returncode, 1, r)
        self.assertIn("error 422", r.stderr)
        self.assertIn(lb.config_path + ":", r.stderr)
        with open(lb.config_path, "w") as f:
            f.write(good)
        self.assertEqual(self.ctl_ok("reload"), "reloaded: generation 3\n")
        self.assertEqual(self.status()["last_reload_successful"], True)
        self.assertEqual(self.server_status("s2")["weight"], 1)


class LifecycleTest(AdminTestCase):

    def test_socket_mode_and_stale_socket(self):
        """The socket is mode 0660; a socket file left by an earlier run is replaced; a
        regular file at the configured path stops smtplb at start (and is kept)."""
        s1 = self.fake("s1")
        tmp = tempfile.mkdtemp(prefix="smtplb-adm-")
        self.addCleanup(shutil.rmtree, tmp, True)
        path = os.path.join(tmp, "admin.sock")
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(path)
        stale.close()
        cfg = make_config([s1], extra='\n[admin]\nsocket = "%s"\n' % path)
        lb = self.smtplb(cfg, up=["p/s1"])
        lb.wait_log(r"admin API on unix socket %s" % re.escape(path))
        self.assertEqual(stat_mode(path), 0o660)
        self.sock_path = path
        self.assertEqual(self.get("/healthz").status, 200)
        self.assertEqual(lb.terminate(), 0)
        self.assertFalse(os.path.exists(path), "socket file left after the stop")

        with open(path, "w") as f:
            f.write("not a socket\n")
        cfg_path = os.path.join(tmp, "smtplb.toml")
        with open(cfg_path, "w") as f:
            f.write(cfg)
        r = harness.run_smtplb(["-f", cfg_path])
        self.assertNotEqual(r.returncode, 0, r)
        self.assertIn("admin socket %s" % path, r.stdout + r.stderr)
        with open(path) as f:
            self.assertEqual(f.read(), "not a socket\n")

    def test_default_socket_without_its_directory_warns(self):
        """No [admin] table and no /run/smtplb (smtplb outside systemd): a warning names
        the missing directory, and smtplb serves without the admin API."""
        if os.path.exists("/run/smtplb"):
            self.skipTest("/run/smtplb exists on this machine, so the default socket can be made")
        s1 = self.fake("s1")
        lb = self.smtplb(make_config([s1]), up=["p/s1"])
        lb.wait_log(r"warning: admin socket /run/smtplb/admin\.sock: directory /run/smtplb does not exist "
                    r"\(admin API off; set admin\.socket to use it\)")
        self.assertNotIn("admin API on unix socket", lb.log())
        c = self.client(lb.port())
        c.greeting()
        self.assertEqual(c.quit(), OK_QUIT)

    def test_while_stopping(self):
        """After SIGTERM with a session open, the API still answers: /healthz 503
        "stopping", /status says stopping, /reload 503; the session ends normally and
        smtplb exits 0, removing its socket."""
        s1 = self.fake("s1")
        lb = self.start([s1], up=["p/s1"])
        held = self.client(lb.port())
        held.greeting()
        os.kill(lb.pid, signal.SIGTERM)
        lb.wait_log(r"stopping: listeners closed")
        r = self.get("/healthz")
        self.assertEqual(r.status, 503, r)
        self.assertIn("stopping", r.text)
        self.assertEqual(self.status()["state"], "stopping")
        self.assertEqual(self.get("/healthz", tcp=True).status, 503)
        self.assertEqual(self.call("POST", "/reload").status, 503)
        self.assertEqual(held.cmd("NOOP"), b"250 2.0.0 Ok\r\n")
        self.assertEqual(held.quit(), OK_QUIT)
        wait_until(lambda: not lb.alive(), STEP_TIMEOUT, "smtplb to exit after the last session")
        self.assertEqual(lb.terminate(), 0)
        self.assertFalse(os.path.exists(self.sock_path), "socket file left after the stop")

    def test_connection_limit(self):
        """64 keep-alive admin clients at once (each has had an answer, so all are
        accepted): a 65th is closed at once; the data path goes on; when one leaves the API
        answers again."""
        lb = self.start([self.fake("s1")], up=["p/s1"])
        idle = []
        for _ in range(64):
            c = self.conn()
            c.request("GET", "/healthz")
            self.assertEqual(c.response(timeout=2).status, 200)
            idle.append(c)
        extra = self.conn()
        self.assertTrue(extra.eof(2), "a 65th admin connection was kept")
        self.assertEqual(short_session(lb.port())[0], "s1")
        # The ones held are still served.
        idle[10].request("GET", "/healthz")
        self.assertEqual(idle[10].response(timeout=2).status, 200)
        idle[0].close()
        wait_until(self._healthz_ok, 3, "the API after one idle client left")
        for c in idle:
            c.close()

    def _healthz_ok(self):
        try:
            return self.get("/healthz", timeout=1).status == 200
        except (AssertionError, OSError):
            return False


def stat_mode(path):
    import stat
    return stat.S_IMODE(os.stat(path).st_mode)


class RuntimeVsReloadTest(AdminTestCase):

    def test_runtime_changes_last_until_the_configured_value_changes(self):
        """Runtime weight / drain / maint survive a reload of an unchanged file (s3 stays
        unchecked); a reload that changes s1's configured weight and s3's configured state
        replaces those runtime values (s3 drain: checked again), s2 keeps its runtime drain."""
        s1 = self.fake("s1")
        s2 = self.fake("s2")
        s3 = self.fake("s3")
        lb = self.start([s1, s2, s3], health={"interval": "200ms", "timeout": "1s", "rise": 1, "fall": 1},
                        up=["p/s1", "p/s2", "p/s3"])
        with open(lb.config_path) as f:
            cfg = f.read()
        self.ctl_ok("weight", "p/s1", "3")
        self.ctl_ok("drain", "p/s2")
        self.ctl_ok("maint", "p/s3")
        self.assertEqual(self.ctl_ok("reload"), "reloaded: generation 2\n")

        def states():
            return {s["name"]: (s["admin_state"], s["weight"], s["health"])
                    for s in self.status()["pools"][0]["servers"]}

        self.assertEqual(states(), {"s1": ("ready", 3, "up"), "s2": ("drain", 1, "up"),
                                    "s3": ("maint", 1, "unchecked")})
        time.sleep(0.3)
        n3 = len(s3.snapshot())
        time.sleep(0.8)
        self.assertEqual(len(s3.snapshot()), n3, "a server in runtime maint checked again after a reload")
        self.assertEqual([short_session(lb.port())[0] for _ in range(4)], ["s1"] * 4)

        cfg = cfg.replace('name = "s1"', 'name = "s1"\nweight = 2')
        cfg = cfg.replace('name = "s3"', 'name = "s3"\nstate = "drain"')
        with open(lb.config_path, "w") as f:
            f.write(cfg)
        off = lb.log_offset()
        self.assertEqual(self.ctl_ok("reload"), "reloaded: generation 3\n")
        lb.wait_log(r"server p/s3 is UP", since=off, timeout=3)
        self.assertEqual(states(), {"s1": ("ready", 2, "up"), "s2": ("drain", 1, "up"), "s3": ("drain", 1, "up")})
        checks = len(s3.checks())
        wait_until(lambda: len(s3.checks()) >= checks + 2, 3, "checks of s3 after the reload")


# --------------------------------------------------------------------------------------
# HTTP strictness
# --------------------------------------------------------------------------------------


class HttpTest(AdminTestCase):

    def setUp(self):
        self.start([self.fake("s1")], up=["p/s1"])

    def raw(self, data, check_close, timeout=STEP_TIMEOUT):
        """Sends raw bytes on a fresh connection; returns the response and (check_close)
        whether the server closed the connection after it."""
        c = self.conn()
        c.send(data)
        r = c.response(timeout)
        return r, (c.eof(3) if check_close else None)

    def test_errors(self):
        cases = [
            (b"GARBAGE\r\n\r\n", 400),
            (b"GET /status\r\n\r\n", 400),
            (b"GET http://x/status HTTP/1.1\r\nHost: x\r\n\r\n", 400),  # origin-form only
            (b"GET /nosuch HTTP/1.1\r\nHost: x\r\n\r\n", 404),
            (b"GET /servers/p/s1/nosuch HTTP/1.1\r\nHost: x\r\n\r\n", 404),
            (b"GET /reload HTTP/1.1\r\nHost: x\r\n\r\n", 405),
            (b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405),
            (b"GET /servers/p/s1/state HTTP/1.1\r\nHost: x\r\n\r\n", 405),
            (b"POST /reload HTTP/1.1\r\nHost: x\r\nContent-Length: 70000\r\n\r\n", 413),
            (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431),
            (b"POST /reload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
            (b"GET /healthz HTTP/2.0\r\nHost: x\r\n\r\n", 505),
            (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
            (b"GET /healthz HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400),
            (b"POST /reload HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
            (b"GET /healthz HTTP/1.1\r\nHost : x\r\n\r\n", 400),
            (b"GET /healthz HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", 400),
            (b"GET /healthz HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400),
            (b"DELETE /status HTTP/1.1\r\nHost: x\r\n\r\n", 405),
        ]
        for data, code in cases:
            with self.subTest(request=data[:40], code=code):
                r, closed = self.raw(data, code not in (404, 405))
                self.assertEqual(r.status, code, r)
                if code == 405:
                    want = "POST" if b"/reload" in data or b"/servers/" in data else "GET, HEAD"
                    self.assertEqual(r.headers.get("allow"), want, r)
                if code not in (404, 405):
                    self.assertTrue(closed, "connection left open after a %d" % code)
        # The server is fine afterwards.
        self.assertEqual(self.get("/healthz").status, 200)
        self.assertEqual(self.lb.log().count("(cause: admin)"), 0)

    def test_keep_alive_and_pipelining(self):
        c = self.conn()
        # Two requests one after the other on one connection.
        c.request("GET", "/healthz")
        r = c.response()
        self.assertEqual((r.status, r.body), (200, b"ok\n"))
        self.assertNotIn("connection", r.headers)
        c.request("GET", "/status")
        r = c.response()
        self.assertEqual(r.status, 200)
        json.loads(r.body)
        self.assertFalse(c.eof(0.3), "keep-alive connection closed")
        # Three pipelined in one write, the last with Connection: close: answered in order.
        c.send(c.encode("GET", "/healthz") + c.encode("GET", "/nosuch") +
               c.encode("GET", "/status?format=text", close=True))
        r1, r2, r3 = c.response(), c.response(), c.response()
        self.assertEqual((r1.status, r1.body), (200, b"ok\n"))
        self.assertEqual(r2.status, 404)
        self.assertEqual(r3.status, 200)
        self.assertTrue(r3.text.startswith("smtplb "), r3)
        self.assertEqual(r3.headers.get("connection"), "close")
        self.assertTrue(c.eof(3), "no close after Connection: close")
        # Requests split across writes at awkward places (inside a head, inside a body,
        # right after one request ends).
        c = self.conn()
        stream = (c.encode("GET", "/healthz") + c.encode("POST", "/servers/p/s1/weight", "5") +
                  c.encode("GET", "/status?format=text") + c.encode("GET", "/healthz", close=True))
        cuts = [10, stream.index(b"\r\n\r\n5") + 5, len(c.encode("GET", "/healthz")), len(stream) - 3]
        pos = 0
        for cut in sorted(cuts) + [len(stream)]:
            c.send(stream[pos:cut])
            pos = cut
            time.sleep(0.05)
        rs = [c.response() for _ in range(4)]
        self.assertEqual([r.status for r in rs], [200] * 4, rs)
        self.assertEqual((rs[0].body, rs[1].body, rs[3].body), (b"ok\n", b"p/s1 weight 5\n", b"ok\n"))
        self.assertRegex(rs[2].text, r"\np/s1 .* 5 ")
        self.assertTrue(c.eof(3))
        # A POST body is not taken for the next request; the change is applied once.
        c = self.conn()
        c.send(c.encode("POST", "/servers/p/s1/weight", "7") + c.encode("POST", "/servers/p/s1/weight", "8") +
               c.encode("GET", "/healthz", close=True))
        self.assertEqual(c.response().body, b"p/s1 weight 7\n")
        self.assertEqual(c.response().body, b"p/s1 weight 8\n")
        self.assertEqual(c.response().body, b"ok\n")
        self.assertTrue(c.eof(3))
        self.assertEqual(self.server_status("s1")["weight"], 8)
        # HTTP/1.0 without keep-alive closes after the response.
        c = self.conn()
        c.send(b"GET /healthz HTTP/1.0\r\n\r\n")
        self.assertEqual(c.response().status, 200)
        self.assertTrue(c.eof(3))
        # A request split into single bytes is parsed as one.
        c = self.conn()
        for byte in c.encode("GET", "/healthz", close=True):
            c.send(bytes([byte]))
        self.assertEqual(c.response().body, b"ok\n")

    def test_head_content_length(self):
        # BUG: HEAD answers Content-Length: 0 instead of the length a GET would have
        # (src/control/admin.cpp clears the body before computing Content-Length); RFC 9110 8.6
        # forbids a Content-Length in a HEAD response that differs from the GET one.
        c = self.conn()
        c.send(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        deadline = time.monotonic() + STEP_TIMEOUT
        while b"\r\n\r\n" not in data and time.monotonic() < deadline:
            c.sock.settimeout(max(0.01, deadline - time.monotonic()))
            d = c.sock.recv(65536)
            if not d:
                break
            data += d
        head, _, rest = data.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), data)
        self.assertEqual(rest, b"", "a body in a HEAD response")
        self.assertIn(b"\r\nContent-Length: 3", head)


# --------------------------------------------------------------------------------------
# hostile admin clients
# --------------------------------------------------------------------------------------


class SlowClientTest(AdminTestCase):

    def test_silent_and_trickling_clients(self):
        """One unix client says nothing, another sends one header byte every 0.5 s, a TCP
        client says nothing. Meanwhile SMTP sessions go through and the API answers
        promptly; the three are closed about 10 s after they connected (checked: within
        9-15 s)."""
        lb = self.start([self.fake("s1"), self.fake("s2")], up=["p/s1", "p/s2"])
        t0 = time.monotonic()
        idle = self.conn()
        idle_tcp = self.conn(tcp=True)
        trickle = self.conn()
        closed = {}

        def trickler():
            data = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"z" * 100
            try:
                for byte in data:
                    trickle.sock.sendall(bytes([byte]))
                    r, _, _ = select.select([trickle.sock], [], [], 0.5)
                    if r:
                        break
                closed["trickle"] = time.monotonic() if trickle.eof(16) else None
            except OSError:
                closed["trickle"] = time.monotonic()

        t = threading.Thread(target=trickler, daemon=True)
        t.start()
        self.addCleanup(t.join, 20)
        time.sleep(0.3)

        # The data path is not stalled.
        ts = time.monotonic()
        names = collections.Counter(mail_session(lb.port(), i)[0] for i in range(20))
        self.assertEqual(names, collections.Counter({"s1": 10, "s2": 10}))
        self.assertLess(time.monotonic() - ts, 5.0, "20 sessions were slow while admin clients hung")
        # Nor the API.
        for path in ("/healthz", "/metrics", "/status"):
            ts = time.monotonic()
            self.assertEqual(self.get(path, timeout=2).status, 200)
            self.assertEqual(self.get(path, tcp=True, timeout=2).status, 200)
            self.assertLess(time.monotonic() - ts, 1.0, "%s slow while admin clients hung" % path)
        ts = time.monotonic()
        self.ctl_ok("drain", "p/s2")
        self.ctl_ok("ready", "p/s2")
        self.assertLess(time.monotonic() - ts, 2.0)
        self.assertEqual(self.metrics().value("smtplb_listener_connections_total", listener="mx"), 20)

        # Closed after ~10 s.
        for name, c in (("idle", idle), ("idle_tcp", idle_tcp)):
            left = 15 - (time.monotonic() - t0)
            self.assertTrue(c.eof(max(0.1, left)), "%s admin client still open after 15 s" % name)
            closed[name] = time.monotonic()
        t.join(max(0.1, 16 - (time.monotonic() - t0)))
        self.assertIsNotNone(closed.get("trickle"), "trickling admin client still open after 15 s")
        for name, when in closed.items():
            self.assertGreater(when - t0, 9.0, "%s closed after only %.1fs" % (name, when - t0))
            self.assertLess(when - t0, 15.5, "%s closed after %.1fs" % (name, when - t0))
        # And the API still answers.
        self.assertEqual(self.get("/healthz").status, 200)


# --------------------------------------------------------------------------------------
# the log
# --------------------------------------------------------------------------------------


class CauseLogTest(AdminTestCase):

    def test_cause_admin_lines(self):
        s1 = self.fake("s1")
        s2 = self.fake("s2")
        lb = self.start([s1, s2], up=["p/s1", "p/s2"])
        for args in (("drain", "p/s1"), ("ready", "p/s1"), ("maint", "p/s2"), ("ready", "p/s2"),
                     ("weight", "p/s1", "9")):
            self.ctl_ok(*args)
        want = [r"server p/s1 state ready -> drain \(cause: admin\)",
                r"server p/s1 state drain -> ready \(cause: admin\)",
                r"server p/s2 state ready -> maint \(cause: admin\)",
                r"server p/s2 state maint -> ready \(cause: admin\)",
                r"server p/s1 weight 1 -> 9 \(cause: admin\)"]
        lb.wait_log(r"\(cause: admin\)", count=len(want), timeout=2)
        got = [ln for ln in lb.log().splitlines() if "(cause: admin)" in ln]
        self.assertEqual(len(got), len(want), got)
        for rx, ln in zip(want, got):
            self.assertRegex(ln, r"^\S+ info: " + rx + "$")


if __name__ == "__main__":
    main()
