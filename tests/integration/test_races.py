#!/usr/bin/env python3
"""The control plane under concurrency: back-to-back reloads (two SIGHUPs within a
millisecond, pipelined admin requests) that add and remove listeners and retire health
checkers; queued sessions woken by every kind of new capacity (a freed slot on another
worker, a reload, an admin change); refused clients that cost little and briefly; a
client that leaves while a PROXY backend is being connected.

Run under AddressSanitizer and ThreadSanitizer too (scripts/sanitize.sh): several of
these only show their defect as a sanitizer report. Only 127.0.0.1; every wait bounded;
everything started is stopped by PID, also on failure.
"""

import os
import re
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from harness import (STEP_TIMEOUT, UNAVAILABLE, SmtpClient, TestCase, connect, main, recv_exact,  # noqa: E402
                     recv_until_eof, server_of, wait_until)
from test_reload import (OK_QUIT, build_config, greet, listener_ports, refused, wait_listening,  # noqa: E402
                         write_config)

PROXY_V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def admin_table(path):
    return '\n[admin]\nsocket = "%s"\nlisten = ""\n' % path


def admin_pipelined(path, requests):
    """Sends every request in one write on one connection (so smtplb handles them in
    one loop turn) and returns the raw responses (until smtplb closes after the last)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(STEP_TIMEOUT)
    try:
        s.connect(path)
        wire = b""
        for i, (method, target, body) in enumerate(requests):
            last = i == len(requests) - 1
            wire += ("%s %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n"
                     % (method, target, len(body), "Connection: close\r\n" if last else "")).encode() + body
        s.sendall(wire)
        return recv_until_eof(s)
    finally:
        s.close()


def make_tmpdir(test):
    d = tempfile.mkdtemp(prefix="smtplb-races-")
    test.addCleanup(shutil.rmtree, d, True)
    return d


def fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


class BackToBackReloadTest(TestCase):

    def double_reload(self, lb, text, how, admin_path):
        """Rewrites the config, then reloads twice as fast as `how` allows: two SIGHUPs
        (the kernel may merge a pending one into the first: one or two reloads), or two
        pipelined POST /reload (two reloads in one loop turn of the control thread)."""
        off = lb.log_offset()
        write_config(lb.config_path, text)
        if how == "sighup":
            os.kill(lb.pid, signal.SIGHUP)
            os.kill(lb.pid, signal.SIGHUP)
            lb.wait_log(r"configuration reloaded: generation \d+", since=off)
            time.sleep(0.1)  # a second reload, if the signals were not merged
        else:
            out = admin_pipelined(admin_path, [("POST", "/reload", b""), ("POST", "/reload", b"")])
            self.assertEqual(out.count(b"HTTP/1.1 200"), 2, out)
        return off

    def test_back_to_back_reloads_adding_then_removing_a_listener(self):
        """Reload N adds a listener and N+1 follows at once: with two workers, every socket
        of the new listener is adopted (every connection is greeted, none hangs in a
        backlog nobody accepts from); two more remove it again: the port refuses (no
        socket left open in the SO_REUSEPORT group)."""
        s1 = self.fake("s1")
        path = os.path.join(make_tmpdir(self), "admin.sock")
        with_sub = build_config({"mx": "p", "sub": "p"}, {"p": [s1]}, global_={"workers": 2}) + admin_table(path)
        without = build_config({"mx": "p"}, {"p": [s1]}, global_={"workers": 2}) + admin_table(path)
        lb = self.smtplb(without, up=["p/s1"])
        for round_, how in enumerate(["admin", "sighup", "admin", "sighup", "admin"]):
            off = self.double_reload(lb, with_sub, how, path)
            port = listener_ports(lb, off)["sub"]
            wait_listening(lb, port, count=2)
            # SO_REUSEPORT spreads by the client's port: 40 clients reach both sockets.
            for _ in range(40):
                self.assertEqual(greet(port), "s1")
            self.assertEqual(greet(lb.port("mx")), "s1")

            self.double_reload(lb, without, how, path)
            wait_until(lambda: refused(port), 5, "the removed listener's port to refuse (round %d)" % round_)
            self.assertEqual(greet(lb.port("mx")), "s1")

    def test_pipelined_maint_then_reload_retires_a_closing_checker(self):
        """`state maint` retires s1's checker (its timer is closing), and the /reload right
        behind it in the same loop turn must not free that checker before libuv is done
        with it (AddressSanitizer saw a use after free). smtplb keeps serving, s1 comes
        back with `ready`, and it exits cleanly."""
        s1, s2 = self.fake("s1"), self.fake("s2")
        path = os.path.join(make_tmpdir(self), "admin.sock")
        cfg = build_config({"mx": "p"}, {"p": [s1, s2]}, health={"interval": "200ms"}) + admin_table(path)
        lb = self.smtplb(cfg, up=["p/s1", "p/s2"])
        for _ in range(5):
            out = admin_pipelined(path, [("POST", "/servers/p/s1/state", b"maint"), ("POST", "/reload", b""),
                                         ("POST", "/reload", b"")])
            self.assertEqual(out.count(b"HTTP/1.1 200"), 3, out)
            self.assertEqual(greet(lb.port()), "s2")
            off = lb.log_offset()
            out = admin_pipelined(path, [("POST", "/servers/p/s1/state", b"ready"), ("POST", "/reload", b"")])
            self.assertEqual(out.count(b"HTTP/1.1 200"), 2, out)
            lb.wait_log(r"server p/s1 is UP", since=off)
        # Two SIGHUPs in one turn while checks run every 200 ms.
        for _ in range(5):
            os.kill(lb.pid, signal.SIGHUP)
            os.kill(lb.pid, signal.SIGHUP)
            time.sleep(0.05)
        self.assertIn(greet(lb.port()), ("s1", "s2"))


class QueueWakeupTest(TestCase):
    """s1 takes one session at a time (max_connections = 1); others wait in the queue."""

    def hold(self, port):
        c = self.client(port)
        self.assertEqual(server_of(c.greeting()), "s1")
        return c

    def test_reload_raising_max_connections_wakes_the_queue(self):
        s1 = self.fake("s1")
        cfg = lambda n: build_config({"mx": "p"}, {"p": [(s1, {"max_connections": n})]},  # noqa: E731
                                     pool_opts={"p": {"queue_timeout": "8s"}})
        lb = self.smtplb(cfg(1), up=["p/s1"])
        held = self.hold(lb.port())
        waiting = connect(lb.port())
        self.addCleanup(waiting.close)
        time.sleep(0.3)  # it is queued (nothing else can happen to it for 8 s)
        t0 = time.monotonic()
        write_config(lb.config_path, cfg(2))
        os.kill(lb.pid, signal.SIGHUP)
        g = recv_exact(waiting, len(s1.default_greeting()), timeout=5)
        self.assertEqual(g, s1.default_greeting())
        self.assertLess(time.monotonic() - t0, 2.0, "the queued session waited for something else")
        held.quit()

    def test_admin_weight_making_a_server_usable_wakes_the_queue(self):
        s1, s2 = self.fake("s1"), self.fake("s2")
        path = os.path.join(make_tmpdir(self), "admin.sock")
        cfg = build_config({"mx": "p"}, {"p": [(s1, {"max_connections": 1}), (s2, {"weight": 0})]},
                           pool_opts={"p": {"queue_timeout": "8s"}}) + admin_table(path)
        lb = self.smtplb(cfg, up=["p/s1", "p/s2"])
        held = self.hold(lb.port())
        waiting = connect(lb.port())
        self.addCleanup(waiting.close)
        time.sleep(0.3)
        t0 = time.monotonic()
        out = admin_pipelined(path, [("POST", "/servers/p/s2/weight", b"10")])
        self.assertIn(b"HTTP/1.1 200", out)
        g = recv_exact(waiting, len(s2.default_greeting()), timeout=5)
        self.assertEqual(server_of(g), "s2")
        self.assertLess(time.monotonic() - t0, 2.0, "the queued session waited for something else")
        held.quit()

    def test_cross_worker_queue_never_times_out_next_to_a_free_slot(self):
        """workers = 2, s1 with max_connections = 1: 60 clients in 6 waves of 10 at once,
        each a whole short session. Slots freed on one worker wake sessions queued on the
        other; none may time out (sQ) while the server is free at times."""
        s1 = self.fake("s1")
        lb = self.smtplb(build_config({"mx": "p"}, {"p": [(s1, {"max_connections": 1})]}, global_={"workers": 2},
                                      pool_opts={"p": {"queue_timeout": "20s"}}), up=["p/s1"])
        errors = []

        def one():
            try:
                self.assertEqual(greet(lb.port()), "s1")
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

        for _ in range(6):
            threads = [threading.Thread(target=one) for _ in range(10)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
        self.assertEqual(errors, [])
        terms = [a["term"] for a in lb.wait_access(count=60)]
        self.assertEqual(terms.count("--"), 60, terms)


class RefusalCostTest(TestCase):

    def test_refused_clients_hold_no_slot_and_no_descriptor_for_long(self):
        """global max_connections = 2, both held. 30 more clients are refused (421, then
        EOF) and keep their sockets open: they must not count against the limit (when a
        held session ends, the next client is served at once), and smtplb must let go of
        their descriptors within about a second."""
        s1 = self.fake("s1")
        # queue_timeout "0s": refused at once, not after waiting in the backlog.
        lb = self.smtplb(build_config({"mx": "p"}, {"p": [s1]}, global_={"max_connections": 2},
                                      pool_opts={"p": {"queue_timeout": "0s"}}), up=["p/s1"])
        held = [self.client(lb.port()) for _ in range(2)]
        for c in held:
            self.assertEqual(server_of(c.greeting()), "s1")
        base = fd_count(lb.pid)
        refused_socks = []
        for _ in range(30):
            s = connect(lb.port())
            self.addCleanup(s.close)
            self.assertEqual(recv_until_eof(s), UNAVAILABLE)
            refused_socks.append(s)  # kept open: a flood's clients do not close politely
        # One held session ends: its slot is free for the next client right away.
        t0 = time.monotonic()
        held[0].quit()
        deadline = time.monotonic() + 1.0
        while True:
            c = SmtpClient(lb.port())
            g = c.reply()
            c.close()
            if g != UNAVAILABLE:
                self.assertEqual(server_of(g), "s1")
                break
            self.assertLess(time.monotonic(), deadline, "refused clients still count against max_connections")
            time.sleep(0.05)
        self.assertLess(time.monotonic() - t0, 1.0)
        # The refused ones' descriptors go after the linger (1 s), though they stay open.
        wait_until(lambda: fd_count(lb.pid) <= base, 3, "smtplb to close the refused clients' sockets")
        self.assertGreaterEqual(len(lb.wait_access(count=30, term="RC")), 30)  # + polls refused above
        held[1].quit()


class ProxyBackend:
    """A minimal PROXY v2 backend: it reads the header before it greets, like Postfix
    with smtpd_upstream_proxy_protocol = haproxy. results: per connection "check" (a
    LOCAL header: smtplb's health check), "header" (a client's), "eof-before-header" or
    "not-proxy"."""

    def __init__(self, name="pv"):
        self.name = name
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(128)
        self.port = self.lsock.getsockname()[1]
        self.results = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.accept_loop, daemon=True)
        self.thread.start()

    def close(self):
        self.stop.set()
        self.lsock.close()
        self.thread.join(5)

    def accept_loop(self):
        while not self.stop.is_set():
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(c,), daemon=True).start()

    def serve(self, c):
        c.settimeout(5)
        buf = b""
        try:
            while len(buf) < 16 or len(buf) < 16 + struct.unpack("!H", buf[14:16])[0]:
                chunk = c.recv(4096)
                if not chunk:
                    self.results.append("eof-before-header")
                    return
                buf += chunk
            if not buf.startswith(PROXY_V2_SIG):
                self.results.append("not-proxy")
                return
            local = buf[12] & 0x0F == 0
            # Whatever happens next (smtplb may close, and reset our 220), the header came.
            self.results.append("check" if local else "header")
            c.sendall(b"220 %s ESMTP\r\n" % self.name.encode())
            data = buf[16 + struct.unpack("!H", buf[14:16])[0]:]
            while True:
                while b"\r\n" in data:
                    line, data = data.split(b"\r\n", 1)
                    verb = line.split(b" ")[0].upper()
                    if verb in (b"EHLO", b"HELO"):
                        c.sendall(b"250 pv\r\n")
                    elif verb == b"QUIT":
                        c.sendall(b"221 bye\r\n")
                        return
                    else:
                        c.sendall(b"250 ok\r\n")
                chunk = c.recv(4096)
                if not chunk:
                    return
                data += chunk
        except OSError:
            pass  # after the header: how the dialogue ends is not what these tests check
        finally:
            c.close()


class VanishingClientProxyTest(TestCase):
    """Clients that connect and leave at once, like a port scanner, in front of a PROXY
    v2 backend."""

    def setUp(self):
        self.backend = ProxyBackend()
        self.addCleanup(self.backend.close)
        self.port = self.backend.port
        self.results = self.backend.results

    def test_client_gone_during_connect_still_sends_the_header(self):
        cfg = build_config({"mx": "p"}, {"p": [("pv", "127.0.0.1", self.port)]},
                           pool_opts={"p": {"proxy_protocol": "v2"}})
        lb = self.smtplb(cfg, up=["p/pv"])
        checks = self.results.count("check")
        for _ in range(30):
            s = socket.create_connection(("127.0.0.1", lb.port()), timeout=STEP_TIMEOUT)
            s.close()  # FIN at once: smtplb is still connecting to the backend
        lb.wait_access(count=30)
        wait_until(lambda: len(self.results) - checks >= 30 or None, 5, "30 backend connections to end")
        sessions = [r for r in self.results if r != "check"]
        self.assertEqual(sessions.count("eof-before-header"), 0, sessions)
        self.assertEqual(sessions.count("header"), len(sessions), sessions)
        # And a client that stays is served as always.
        c = self.client(lb.port())
        self.assertEqual(c.greeting(), b"220 pv ESMTP\r\n")
        self.assertEqual(c.quit(), b"221 bye\r\n")


class ProxyHeaderWriteFaultTest(TestCase):
    """The write of a PROXY header fails (ECONNRESET, injected with LD_PRELOAD:
    faults/proxy_write_fault.cpp; a real reset that arrives first shows as a failed
    connect instead, so sockets cannot produce this on demand)."""

    def setUp(self):
        self.lib = os.environ.get("SMTPLB_FAULT_LIB") or os.path.join(
            HERE, "..", "..", "build", "tests", "integration", "libsmtplb_faults.so")
        if not os.path.exists(self.lib):
            self.skipTest("fault injector not built: %s" % self.lib)
        self.backends = [ProxyBackend("pv1"), ProxyBackend("pv2")]
        for b in self.backends:
            self.addCleanup(b.close)

    def start(self, faults, admin_path=None):
        # The injector is not instrumented first in line: AddressSanitizer must not insist
        # on being the first library.
        asan = os.environ.get("ASAN_OPTIONS", "")
        wrapper = ["env", "LD_PRELOAD=" + os.path.abspath(self.lib),
                   "ASAN_OPTIONS=" + (asan + ":" if asan else "") + "verify_asan_link_order=0"]
        wrapper += ["%s=%d" % kv for kv in faults.items()]
        cfg = build_config({"mx": "p"}, {"p": [("pv1", "127.0.0.1", self.backends[0].port),
                                               ("pv2", "127.0.0.1", self.backends[1].port)]},
                           pool_opts={"p": {"proxy_protocol": "v2", "retries": 3}})
        if admin_path:
            cfg += admin_table(admin_path)
        return self.smtplb(cfg, wrapper=wrapper)

    def test_failed_header_send_tries_the_next_server(self):
        """A client session's header cannot be written to the first server: that attempt
        fails and the next server greets the client (it used to end the session, SD)."""
        lb = self.start({"SMTPLB_FAULT_SEND_PROXY": 1})
        lb.wait_log(r"server p/pv1 is UP")
        lb.wait_log(r"server p/pv2 is UP")
        c = self.client(lb.port())
        g = c.greeting()
        self.assertIn(g, (b"220 pv1 ESMTP\r\n", b"220 pv2 ESMTP\r\n"))
        label = c.label()
        self.assertEqual(c.quit(), b"221 bye\r\n")
        a = lb.wait_access(client=label)[0]
        self.assertEqual((a["tries"], a["term"]), (2, "--"), a)
        lb.wait_log(r"client=%s .*tries=2" % re.escape(label))

    def test_failed_header_write_of_a_check_counts_as_connect(self):
        """A health check's header cannot be written: the failure counts under `connect`
        (the step it belongs to), not `greeting` (where the check was when libuv reported
        it), and not as a PROXY mismatch."""
        path = os.path.join(make_tmpdir(self), "admin.sock")
        lb = self.start({"SMTPLB_FAULT_WRITE_PROXY": 1}, admin_path=path)
        line = lb.wait_log(r"server p/pv[12] is DOWN")[0]
        self.assertIn("write: connection reset by peer", line)
        self.assertNotIn("mismatch", line)
        out = admin_pipelined(path, [("GET", "/metrics", b"")]).decode()
        rows = {}  # by reason, both servers together (one of them had the fault)
        for m in re.finditer(r'^smtplb_server_check_failures_total\{pool="p",server="pv[12]",reason="(\w+)"\} (\d+)$',
                             out, re.M):
            rows[m.group(1)] = rows.get(m.group(1), 0) + int(m.group(2))
        self.assertEqual(rows.get("connect"), 1, rows)
        self.assertEqual(rows.get("greeting"), 0, rows)
        self.assertEqual(rows.get("proxy"), 0, rows)


if __name__ == "__main__":
    main()
