#!/usr/bin/env python3
"""Agent feedback (health_check.agent_port, HAProxy's agent-check): smtplb reads one line
from each server's agent every agent_interval and applies it. A percentage scales the
server's weight (the split over 2 000 sessions follows), `drain` stops new sessions while
open ones finish, and a dead agent changes nothing (logged once, counted).

Two fake SMTP servers on 127.0.0.2 and 127.0.0.3 (the same agent port on both, since the
agent's address is the server's), each with a scripted agent that answers its current
line and closes. Loopback only; every process and socket is stopped/closed by the test.
"""

import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (SMTPLB_BIN, STEP_TIMEOUT, SmtpClient, TestCase, admin_request, log_time, main,  # noqa: E402
                     make_config, server_of, stop_process, wait_until)
import subprocess  # noqa: E402

AGENT_INTERVAL = 0.2


class ScriptedAgent:
    """Answers `line` + LF to every connection on HOST:PORT, then closes; close() stops it
    (the port then refuses connections: a dead agent)."""

    def __init__(self, host, port, line):
        self.line = line
        self.queries = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while not self.stopping.is_set():
            try:
                c, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                c.sendall((self.line + "\n").encode())
                self.queries += 1
            except OSError:
                pass
            finally:
                c.close()

    def close(self):
        self.stopping.set()
        self.thread.join(5)
        self.sock.close()


def sessions(port, n, threads=4):
    """n sessions (greeting, QUIT) over `threads` clients; {server name: count}, failures."""
    counts, failures = {}, []
    lock = threading.Lock()
    todo = [n]

    def run():
        while True:
            with lock:
                if todo[0] == 0:
                    return
                todo[0] -= 1
            try:
                c = SmtpClient(port)
                try:
                    who = server_of(c.greeting())
                    c.quit()
                finally:
                    c.close()
                with lock:
                    counts[who] = counts.get(who, 0) + 1
            except (OSError, AssertionError) as e:
                with lock:
                    failures.append(repr(e))
    ts = [threading.Thread(target=run, daemon=True) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    return counts, failures


class AgentTest(TestCase):

    def setUp(self):
        for _ in range(20):
            self.s1 = self.fake("s1", host="127.0.0.2")
            try:
                self.s2 = self.fake("s2", host="127.0.0.3", port=self.s1.port)
            except OSError:
                self.s1.close()
                continue
            try:
                self.a1 = ScriptedAgent("127.0.0.2", 0, "up 100%")
                self.addCleanup(self.a1.close)
                self.a2 = ScriptedAgent("127.0.0.3", self.a1.port, "up 100%")
                self.addCleanup(self.a2.close)
                break
            except OSError:
                continue
        else:
            self.skipTest("no ports free on both 127.0.0.2 and 127.0.0.3")

    def metric(self, lb, name, server):
        path = self.admin_path
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(STEP_TIMEOUT)
        s.connect(path)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = b""
        while True:
            d = s.recv(65536)
            if not d:
                break
            raw += d
        s.close()
        m = re.search(r'(?m)^%s\{pool="p",server="%s"\} (\S+)$' % (name, server), raw.decode())
        self.assertIsNotNone(m, name)
        return float(m.group(1))

    def test_agent_weight_drain_and_dead_agent(self):
        d = tempfile.mkdtemp(prefix="smtplb-agent-")
        self.addCleanup(shutil.rmtree, d, True)
        self.admin_path = os.path.join(d, "admin.sock")
        cfg = make_config([(self.s1, {"weight": 100}), (self.s2, {"weight": 100})],
                          health={"agent_port": self.a1.port, "agent_interval": "%dms" % (AGENT_INTERVAL * 1000)},
                          extra='\n[admin]\nsocket = "%s"\nlisten = ""\n' % self.admin_path)
        lb = self.smtplb(cfg, up=["p/s1", "p/s2"])
        port = lb.port()
        wait_until(lambda: self.a1.queries >= 2 and self.a2.queries >= 2, STEP_TIMEOUT, "agent queries")
        base, fail = sessions(port, 600)
        self.assertEqual(fail, [])
        self.assertEqual(base, {"s1": 300, "s2": 300})

        # "up 50%": s1's weight halves within two agent intervals.
        offset = lb.log_offset()
        changed = time.time()
        self.a1.line = "up 50%"
        line = lb.wait_log(r'server p/s1 agent says "up 50%": agent state up -> up, weight 100 -> 50')[0]
        took = log_time(line) - changed
        half, fail = sessions(port, 2000)
        self.assertEqual(fail, [])
        share = half.get("s1", 0) / 2000.0
        print("agent: 'up 50%%' applied %.2f s after the agent changed (agent_interval %.1f s); split over 2000 "
              "sessions: s1 %d, s2 %d (s1 share %.3f, was %.3f over 600 at 100%%)"
              % (took, AGENT_INTERVAL, half.get("s1", 0), half.get("s2", 0), share, base["s1"] / 600.0))
        self.assertLess(took, 2 * AGENT_INTERVAL)  # the agent is asked once per interval
        # Weights 50:100 with smooth round-robin on one worker: exactly a third.
        self.assertAlmostEqual(share, 1 / 3.0, delta=0.01)
        self.assertEqual(self.metric(lb, "smtplb_server_effective_weight", "s1"), 50)
        self.assertEqual(self.metric(lb, "smtplb_server_agent_weight_percent", "s1"), 50)

        # "drain": no new sessions on s1; a session open on it finishes there.
        held = None
        for _ in range(10):
            c = self.client(port)
            if server_of(c.greeting()) == "s1":
                c.expect("EHLO client.test", 250)
                held = c
                break
            c.quit()
        self.assertIsNotNone(held)
        self.a1.line = "drain 50%"
        lb.wait_log(r'server p/s1 agent says "drain 50%": agent state up -> drain')
        drained, fail = sessions(port, 200)
        self.assertEqual((drained, fail), ({"s2": 200}, []))
        self.assertTrue(held.send_message(b"Subject: held\r\n\r\nbody\r\n").startswith(b"250"))
        self.assertTrue(held.quit().startswith(b"221"))
        self.assertEqual(len(self.s1.wait_messages(1)), 1)
        print("agent: drain: 200 new sessions all on s2; the session open on s1 delivered its message")

        # "ready" ends the agent's drain; then the agent dies: its last answer stays.
        self.a1.line = "ready up 50%"
        lb.wait_log(r'server p/s1 agent says "ready up 50%": agent state drain -> up')
        self.a1.close()
        lb.wait_log(r"server p/s1 agent at 127\.0\.0\.2:%d: connect: connection refused; its last answer stays"
                    % self.a1.port)
        failures_before = self.metric(lb, "smtplb_server_agent_failures_total", "s1")
        time.sleep(3 * AGENT_INTERVAL)
        dead, fail = sessions(port, 600)
        self.assertEqual(fail, [])
        self.assertEqual(dead, {"s1": 200, "s2": 400})
        failures = self.metric(lb, "smtplb_server_agent_failures_total", "s1")
        self.assertGreater(failures, failures_before)
        log = lb.log()[offset:]
        self.assertEqual(len(re.findall(r"server p/s1 agent at .*: connect:", log)), 1, log)
        print("agent: dead agent: split over 600 sessions s1 %d, s2 %d (unchanged 1:2); %d failed queries counted, "
              "one warning" % (dead["s1"], dead["s2"], failures))

    def admin(self, method, target, body=b""):
        """(status, body) of one admin API request."""
        return admin_request(self.admin_path, method, target, body)

    def states(self):
        """s1's (health, admin_state, effective_admin_state, agent state) from /status."""
        status, body = self.admin("GET", "/status")
        self.assertEqual(status, 200, body)
        m = re.search(r'"name":"s1",[^}]*"health":"(\w+)","admin_state":"(\w+)","effective_admin_state":"(\w+)"'
                      r'.*?"agent":\{"state":"(\w+)"', body)
        self.assertIsNotNone(m, body)
        return m.groups()

    def pool_servers(self):
        """smtplb_pool_servers of pool p, by state."""
        status, body = self.admin("GET", "/metrics")
        self.assertEqual(status, 200)
        return {m.group(1): int(m.group(2)) for m in
                re.finditer(r'(?m)^smtplb_pool_servers\{pool="p",state="(\w+)"\} (\d+)$', body)}

    def test_agent_and_operator_admin_states(self):
        """The combination rules: the more restrictive of the operator's and the agent's
        admin state applies (the operator's `ready` does not end an agent's drain, the
        agent's `ready` does not end an operator's drain or maint), an agent's `down`
        takes a server whose checks pass out until the agent says `up`, and an operator's
        maint stops the agent queries until `ready`."""
        d = tempfile.mkdtemp(prefix="smtplb-agent-admin-")
        self.addCleanup(shutil.rmtree, d, True)
        self.admin_path = os.path.join(d, "admin.sock")
        lb = self.smtplb(make_config([(self.s1, {"weight": 100}), (self.s2, {"weight": 100})],
                                     health={"agent_port": self.a1.port,
                                             "agent_interval": "%dms" % (AGENT_INTERVAL * 1000)},
                                     extra='\n[admin]\nsocket = "%s"\nlisten = ""\n' % self.admin_path),
                         up=["p/s1", "p/s2"])
        port = lb.port()
        wait_until(lambda: self.a1.queries >= 2, STEP_TIMEOUT, "agent queries")
        figures = []

        def split(what, n=200):
            counts, fail = sessions(port, n)
            self.assertEqual(fail, [])
            figures.append((what, counts.get("s1", 0), counts.get("s2", 0)))
            return counts

        def agent_says(words, pattern):
            off = lb.log_offset()
            self.a1.line = words
            lb.wait_log(r'server p/s1 agent says "%s": %s' % (re.escape(words), pattern), since=off)

        def operator(state):
            self.assertEqual(self.admin("POST", "/servers/p/s1/state", state.encode()),
                             (200, "p/s1 state %s\n" % state))

        self.assertEqual(split("both ready"), {"s1": 100, "s2": 100})

        # Agent drain, operator ready: drain (the operator cannot end the agent's drain).
        agent_says("drain", "agent state up -> drain")
        operator("ready")
        self.assertEqual(self.states(), ("up", "ready", "drain", "drain"))
        self.assertEqual(self.pool_servers(), {"up": 1, "down": 0, "unchecked": 0, "drain": 1, "maint": 0})
        self.assertEqual(split("agent drain, operator ready"), {"s2": 200})
        agent_says("ready", "agent state drain -> up")
        self.assertEqual(split("agent ready again"), {"s1": 100, "s2": 100})

        # Operator drain, agent ready (said again every interval): drain.
        operator("drain")
        queries = self.a1.queries
        wait_until(lambda: self.a1.queries >= queries + 2, STEP_TIMEOUT, "two more agent replies")
        self.assertEqual(self.states(), ("up", "drain", "drain", "up"))
        self.assertEqual(split("operator drain, agent ready"), {"s2": 200})
        operator("ready")
        self.assertEqual(split("operator ready again"), {"s1": 100, "s2": 100})

        # Agent down while the health checks pass: out until the agent says up.
        agent_says("down", "agent state up -> down")
        self.assertEqual(self.states(), ("up", "ready", "ready", "down"))
        self.assertEqual(self.pool_servers(), {"up": 1, "down": 1, "unchecked": 0, "drain": 0, "maint": 0})
        self.assertEqual(split("agent down, checks pass"), {"s2": 200})
        agent_says("up", "agent state down -> up")
        self.assertEqual(split("agent up again"), {"s1": 100, "s2": 100})

        # Operator maint: no checks and no agent queries; ready starts both again.
        operator("maint")
        off = lb.log_offset()
        time.sleep(AGENT_INTERVAL)  # a query in flight may still land
        queries = self.a1.queries
        time.sleep(5 * AGENT_INTERVAL)
        self.assertEqual(self.a1.queries, queries, "the agent was queried in maint")
        self.assertEqual(self.states()[1:3], ("maint", "maint"))
        self.assertEqual(split("operator maint"), {"s2": 200})
        operator("ready")
        wait_until(lambda: self.a1.queries > queries, STEP_TIMEOUT, "the agent queried after maint")
        lb.wait_log(r"server p/s1 is UP", since=off)
        wait_until(lambda: self.states() == ("up", "ready", "ready", "up"), STEP_TIMEOUT, "s1 ready and up")
        self.assertEqual(split("operator ready after maint"), {"s1": 100, "s2": 100})
        for what, a, b in figures:
            print("agent and operator: %s: split over %d sessions s1 %d, s2 %d" % (what, a + b, a, b))

    def start_agent_process(self, config_path, log_path):
        log = open(log_path, "wb")
        self.addCleanup(log.close)
        proc = subprocess.Popen([SMTPLB_BIN, "agent", "-f", config_path], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT)

        self.addCleanup(stop_process, proc, STEP_TIMEOUT)

        def agent_log():
            with open(log_path, "rb") as f:
                return f.read()

        wait_until(lambda: b"listening on" in agent_log() or proc.poll() is not None,
                   STEP_TIMEOUT, "smtplb agent to listen")
        self.assertIsNone(proc.poll(), agent_log())
        return proc

    def test_smtplb_agent_from_the_queue(self):
        d = tempfile.mkdtemp(prefix="smtplb-agent-q-")
        self.addCleanup(shutil.rmtree, d, True)
        queue = os.path.join(d, "queue")
        for sub in ("incoming", "active", "deferred/A", "deferred/B"):
            os.makedirs(os.path.join(queue, sub))

        def deferred(n):
            """Makes the deferred queue hold n messages (spread over two hash directories)."""
            have = sorted(os.path.join(r, f) for r, _, fs in os.walk(os.path.join(queue, "deferred")) for f in fs)
            for extra in have[n:]:
                os.unlink(extra)
            for i in range(len(have), n):
                with open(os.path.join(queue, "deferred", "AB"[i % 2], "Q%05d" % i), "w") as f:
                    f.write("x")

        self.a1.close()  # smtplb agent takes s1's agent port
        cfg_path = os.path.join(d, "agent.toml")
        with open(cfg_path, "w") as f:
            f.write('[agent]\naddress = "127.0.0.2"\nport = %d\nqueue_directory = "%s"\nrefresh = "100ms"\n'
                    '[queue]\nlow = 5\nhigh = 25\nfloor = 10\ndrain = 40\n' % (self.a1.port, queue))
        r = subprocess.run([SMTPLB_BIN, "agent", "-f", cfg_path, "--once"], capture_output=True, text=True,
                           timeout=STEP_TIMEOUT)
        self.assertEqual((r.returncode, r.stdout), (0, "ready up 100% #incoming=0 active=0 deferred=0\n"), r)
        self.start_agent_process(cfg_path, os.path.join(d, "agent.log"))

        self.admin_path = os.path.join(d, "admin.sock")
        lb = self.smtplb(make_config([(self.s1, {"weight": 100}), (self.s2, {"weight": 100})],
                                     health={"agent_port": self.a1.port,
                                             "agent_interval": "%dms" % (AGENT_INTERVAL * 1000)},
                                     extra='\n[admin]\nsocket = "%s"\nlisten = ""\n' % self.admin_path),
                         up=["p/s1", "p/s2"])
        port = lb.port()
        figures = []
        def agent_says():
            try:
                with socket.create_connection(("127.0.0.2", self.a1.port), timeout=2) as c:
                    data = b""
                    while True:
                        chunk = c.recv(512)
                        if not chunk:
                            return data.decode("ascii", "replace").strip()
                        data += chunk
            except OSError:
                return ""

        for n, words, count in ((0, "ready up 100%", 600), (15, "ready up 55%", 1550), (30, "ready up 10%", 1100),
                                (45, "drain 10%", 300), (0, "ready up 100%", 600)):
            off = lb.log_offset()
            deferred(n)
            # The files appear one by one, so the agent may count a few on the way (and smtplb
            # log that); first the agent must count exactly n, then smtplb must apply its words.
            line = "%s #incoming=0 active=0 deferred=%d" % (words, n)
            wait_until(lambda: agent_says() == line, STEP_TIMEOUT, "smtplb agent to say %r" % line)
            if figures:  # the first answer changes nothing (100%, up)
                lb.wait_log(re.escape('server p/s1 agent says "%s #incoming=0 active=0 deferred=' % words) + r"\d+",
                            since=off)
            split, fail = sessions(port, count)
            self.assertEqual(fail, [])
            share = split.get("s1", 0) / float(count)
            figures.append((n, words, split.get("s1", 0), split.get("s2", 0), share))
            pct = int(words.split()[-1].rstrip("%"))
            expect = 0.0 if "drain" in words else pct / (pct + 100.0)
            self.assertAlmostEqual(share, expect, delta=0.01, msg=(n, words, split))
        for n, words, a, b, share in figures:
            print("smtplb agent: deferred=%d -> '%s': split s1 %d, s2 %d (s1 share %.3f)" % (n, words, a, b, share))


if __name__ == "__main__":
    main()
