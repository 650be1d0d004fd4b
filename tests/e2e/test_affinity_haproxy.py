#!/usr/bin/env python3
"""Source affinity side by side with HAProxy 2.6 on the same keys.

SMTPLB_AFFINITY_KEYS client addresses (default 20000, each in its own /24, so smtplb's
/24 key and HAProxy's whole-address key name the same clients) arrive through PROXY v2
at smtplb (algorithm = "source") and at HAProxy (`balance source` with `hash-type
consistent`, and with its default map-based hash), each in front of the same five
backends that name themselves in their greeting. For each balancer: the share of keys
moved when one of the five servers goes down (maint) and of those not back after it
returns, the keys moved that were not on it, max/mean load, and the agreement between
two instances whose server lists are in different orders. The table is printed; smtplb's
own promises are asserted (HAProxy's figures are what they are).

Skipped (77) without haproxy. Every process is stopped by PID; only 127.0.0.1 is used."""

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))
import harness  # noqa: E402
from harness import TestCase, make_config, run_smtplb, stop_process, wait_until  # noqa: E402
from test_affinity import NAMES, Loop, Server, run_pass, served_by  # noqa: E402

KEYS = int(os.environ.get("SMTPLB_AFFINITY_KEYS", "20000"))
ORDER_B = ["mx-d", "mx-b", "mx-e", "mx-a", "mx-c"]
VICTIM = "mx-c"
TCP_RE = r"admin API \(read-only\) on http://127\.0\.0\.1:(\d+)/"


def addresses(n):
    return ["10.%d.%d.7" % (i >> 8, i & 255) for i in range(n)]


class HAProxy:
    """haproxy -db in front of the backends: PROXY v2 accepted, `balance source`."""

    def __init__(self, servers, order, hash_type):
        self.dir = tempfile.mkdtemp(prefix="smtplb-haproxy-affinity.")
        self.sock = os.path.join(self.dir, "admin.sock")
        self.log_path = os.path.join(self.dir, "haproxy.log")
        self.servers, self.order, self.hash_type = servers, order, hash_type
        self.proc = None

    def start(self):
        for _ in range(5):  # a port picked free may be taken before haproxy binds it
            self.port = harness.free_port()
            cfg = ["global", "    nbthread 1", "    stats socket %s level admin" % self.sock, "defaults",
                   "    mode tcp", "    timeout connect 5s", "    timeout client 60s", "    timeout server 60s",
                   "frontend fe", "    bind 127.0.0.1:%d accept-proxy" % self.port, "    default_backend be",
                   "backend be", "    balance source"]
            if self.hash_type:
                cfg.append("    hash-type %s" % self.hash_type)
            cfg += ["    server %s 127.0.0.1:%d" % (n, self.servers[n].port) for n in self.order]
            path = os.path.join(self.dir, "haproxy.cfg")
            with open(path, "w") as f:
                f.write("\n".join(cfg) + "\n")
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(["haproxy", "-db", "-f", path], stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT)
            try:
                wait_until(lambda: self.proc.poll() is not None or (os.path.exists(self.sock) and harness.port_open(
                    self.port)), 10, "haproxy listening")
            except AssertionError:
                pass
            if self.proc.poll() is None and harness.port_open(self.port):
                return self
            self.stop()
        with open(self.log_path, errors="replace") as f:
            raise RuntimeError("haproxy did not start:\n" + f.read())

    def command(self, line):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect(self.sock)
            s.sendall(line.encode() + b"\n")
            out = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    return out.decode()
                out += chunk
        finally:
            s.close()

    def set_state(self, name, state):
        out = self.command("set server be/%s state %s" % (name, state))
        if out.strip():
            raise RuntimeError("haproxy: " + out)

    def stop(self):
        stop_process(self.proc)

    def close(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class AffinityVersusHAProxy(TestCase):

    def setUp(self):
        if not shutil.which("haproxy"):
            self.skipTest("needs haproxy (Debian package haproxy)")
        self.loop = Loop()
        self.addCleanup(self.loop.close)
        self.servers = {n: Server(self.loop, n) for n in NAMES}
        for s in self.servers.values():
            self.addCleanup(s.kill)
        self.dir = tempfile.mkdtemp(prefix="smtplb-affinity-e2e.")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.srcs = addresses(KEYS)

    def mapping(self, port):
        m = served_by(self.loop.run(run_pass(port, self.srcs), timeout=900))
        bad = {a: s for a, s in m.items() if s not in NAMES}
        self.assertEqual(bad, {}, "sessions without a server's greeting")
        return m

    def figures(self, base, down, back, other):
        n = len(self.srcs)
        load = {s: sum(1 for a in self.srcs if base[a] == s) for s in NAMES}
        return {
            "moved": sum(1 for a in self.srcs if down[a] != base[a]) / n,
            "others": sum(1 for a in self.srcs if down[a] != base[a] and base[a] != VICTIM) / n,
            "not_back": sum(1 for a in self.srcs if back[a] != base[a]) / n,
            "max_mean": max(load.values()) / (n / len(NAMES)),
            "agree": sum(1 for a in self.srcs if other[a] == base[a]) / n,
        }

    def smtplb_figures(self):
        def start(order, n):
            sock = os.path.join(self.dir, "admin%d.sock" % n)
            cfg = make_config([(name, "127.0.0.1", self.servers[name].port) for name in order],
                              pool={"algorithm": "source"},
                              listener={"proxy_protocol": "v2", "trusted_proxies": ["127.0.0.0/8"]},
                              log={"access_log": False})
            lb = self.smtplb(cfg + '\n[admin]\nsocket = "%s"\n' % sock, up=["p/" + x for x in NAMES])
            return lb, sock

        lb, sock = start(NAMES, 0)
        base = self.mapping(lb.port())
        self.assertEqual(run_smtplb(["ctl", "--socket", sock, "maint", "p/" + VICTIM]).returncode, 0)
        down = self.mapping(lb.port())
        self.assertEqual(run_smtplb(["ctl", "--socket", sock, "ready", "p/" + VICTIM]).returncode, 0)
        back = self.mapping(lb.port())
        lb2, _ = start(ORDER_B, 1)
        other = self.mapping(lb2.port())
        return self.figures(base, down, back, other)

    def haproxy_figures(self, hash_type):
        a = HAProxy(self.servers, NAMES, hash_type).start()
        self.addCleanup(a.close)
        b = HAProxy(self.servers, ORDER_B, hash_type).start()
        self.addCleanup(b.close)
        base = self.mapping(a.port)
        a.set_state(VICTIM, "maint")
        down = self.mapping(a.port)
        a.set_state(VICTIM, "ready")
        back = self.mapping(a.port)
        other = self.mapping(b.port)
        return self.figures(base, down, back, other)

    def test_side_by_side(self):
        t0 = time.monotonic()
        version = subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.splitlines()[0]
        rows = [("smtplb source (rendezvous)", self.smtplb_figures()),
                ("HAProxy source, hash-type consistent", self.haproxy_figures("consistent")),
                ("HAProxy source, map-based (default)", self.haproxy_figures(None))]
        out = ["", "%d keys, 5 servers, %s down (maint) and back; %s" % (len(self.srcs), VICTIM, version),
               "%-38s %10s %14s %10s %9s %16s" % ("balancer", "moved", "others moved", "not back", "max/mean",
                                                   "agree (2 orders)")]
        for name, f in rows:
            out.append("%-38s %9.2f%% %13.2f%% %9.2f%% %9.3f %15.2f%%" % (
                name, f["moved"] * 100, f["others"] * 100, f["not_back"] * 100, f["max_mean"], f["agree"] * 100))
        sys.stderr.write("\n".join(out) + "\n(%.0f s)\n" % (time.monotonic() - t0))
        mine = rows[0][1]
        self.assertEqual(mine["others"], 0)
        self.assertEqual(mine["not_back"], 0)
        self.assertEqual(mine["agree"], 1)
        self.assertLess(mine["moved"], 0.25)
        self.assertLess(mine["max_mean"], 1.1)


if __name__ == "__main__":
    harness.main()
