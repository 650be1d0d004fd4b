#!/usr/bin/env python3
"""The process drain (docs/ha.md): `smtplb ctl drain` without a server turns /healthz to
503 so that keepalived moves the virtual address away, while smtplb goes on accepting
and serving sessions exactly as before (no 421, listeners open, checks running);
`smtplb ctl ready` undoes it; a reload keeps it; SIGTERM still stops as always.
`smtplb ctl drain --wait QUIET` returns once no new session arrived for QUIET, and fails
after --timeout or when the drain is undone meanwhile. Also POST /state over both admin
endpoints, and ctl's usage errors.

Loopback only; every wait bounded; smtplb stopped by PID by the harness.
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import SmtpClient, main, server_of, wait_until  # noqa: E402
from test_admin import OK_QUIT, AdminTestCase, mail_session, short_session  # noqa: E402

ISO_RE = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
DRAIN_OUT_RE = r"^draining since %s: /healthz answers 503; new sessions are still served\n$" % ISO_RE
FAST = {"interval": "150ms", "timeout": "1s", "rise": 1, "fall": 1}


class Sessions(threading.Thread):
    """Short sessions (greeting, QUIT) one every `every` seconds for `seconds`; records
    the time each one got its greeting (smtplb has accepted it by then)."""

    def __init__(self, port, seconds, every=0.1):
        super().__init__(daemon=True)
        self.port, self.seconds, self.every = port, seconds, every
        self.accepted = []
        self.errors = []

    def run(self):
        end = time.monotonic() + self.seconds
        while time.monotonic() < end:
            try:
                c = SmtpClient(self.port)
                try:
                    if not c.greeting().startswith(b"220 "):
                        raise AssertionError("greeting")
                    self.accepted.append(time.monotonic())
                    if c.quit() != OK_QUIT:
                        raise AssertionError("QUIT")
                finally:
                    c.close()
            except (AssertionError, OSError) as e:
                self.errors.append(repr(e))
            time.sleep(self.every)


class DrainTest(AdminTestCase):

    def metric(self, name, **labels):
        return self.metrics().value(name, **labels)

    def test_drain_keeps_serving_and_ready_undoes_it(self):
        s1 = self.fake("s1")
        lb = self.start([s1], health=FAST, up=["p/s1"])
        self.assertEqual(self.metric("smtplb_draining"), 0)
        held = self.client(lb.port())
        self.assertEqual(server_of(held.greeting()), "s1")
        held.expect("EHLO held.test", 250)
        label = held.label()
        checks = len(s1.checks())

        off = lb.log_offset()
        self.assertRegex(self.ctl_ok("drain"), DRAIN_OUT_RE)
        lb.wait_log(r"info: process state ready -> draining \(cause: admin\): /healthz answers 503; listeners stay "
                    r"open and new sessions are served$", since=off, timeout=2)
        for tcp in (False, True):
            r = self.get("/healthz", tcp=tcp)
            self.assertEqual((r.status, r.body), (503, b"draining (smtplb ctl ready undoes it)\n"), r)
        st = self.status()
        self.assertEqual(st["state"], "draining")
        self.assertRegex(st["draining_since"], "^%s$" % ISO_RE)
        self.assertRegex(self.get("/status?format=text").text.splitlines()[0],
                         r"^smtplb \S+, generation 1, draining \(/healthz answers 503\)$")
        self.assertEqual(self.metric("smtplb_draining"), 1)

        # Served exactly as before: whole sessions, no 421, nothing refused.
        before = self.metric("smtplb_listener_connections_total", listener="mx")
        for i in range(10):
            self.assertEqual(mail_session(lb.port(), i)[0], "s1")
        m = self.metrics()
        self.assertEqual(m.value("smtplb_listener_connections_total", listener="mx"), before + 10)
        self.assertEqual(m.total("smtplb_listener_rejected_connections_total"), 0)
        self.assertEqual(m.total("smtplb_pool_no_server_total"), 0)
        # The session open before the drain finishes its message.
        r = held.send_message(b"Subject: during the drain\r\n\r\nbody\r\n")
        self.assertTrue(r.startswith(b"250 "), r)
        self.assertEqual(held.quit(), OK_QUIT)
        self.assertEqual(lb.wait_access(client=label)[0]["term"], "--")
        # Checks go on.
        wait_until(lambda: len(s1.checks()) >= checks + 2, 3, "checks during the drain")

        # Draining again changes nothing (one log line, same start time).
        since = st["draining_since"]
        self.assertRegex(self.ctl_ok("drain"), DRAIN_OUT_RE)
        self.assertEqual(self.status()["draining_since"], since)

        off = lb.log_offset()
        self.assertEqual(self.ctl_ok("ready"), "ready\n")
        lb.wait_log(r"info: process state draining -> ready \(cause: admin\)$", since=off, timeout=2)
        self.assertEqual(len(re.findall(r"process state ready -> draining", lb.log())), 1)
        r = self.get("/healthz")
        self.assertEqual((r.status, r.body), (200, b"ok\n"), r)
        st = self.status()
        self.assertEqual((st["state"], st["draining_since"]), ("running", None))
        self.assertEqual(self.metric("smtplb_draining"), 0)
        # Ready when not draining: 200, nothing logged.
        off = lb.log_offset()
        self.assertEqual(self.ctl_ok("ready"), "ready\n")
        time.sleep(0.2)
        self.assertNotIn("process state", lb.log()[off:])

    def test_drain_and_a_pool_without_server_are_both_named(self):
        s1 = self.fake("s1")
        lb = self.start([s1], health=FAST, up=["p/s1"])
        self.ctl_ok("drain")
        off = lb.log_offset()
        s1.behaviour = harness.Behaviour(greeting=b"421 4.3.2 busy\r\n")
        lb.wait_log(r"server p/s1 is DOWN", since=off)
        r = self.get("/healthz")
        self.assertEqual((r.status, r.text), (503, "pool p has no usable server\ndraining (smtplb ctl ready undoes "
                                                   "it)\n"), r)
        self.ctl_ok("ready")
        r = self.get("/healthz")
        self.assertEqual((r.status, r.text), (503, "pool p has no usable server\n"), r)
        off = lb.log_offset()
        s1.behaviour = harness.Behaviour()
        lb.wait_log(r"server p/s1 is UP", since=off)
        self.assertEqual(self.get("/healthz").status, 200)

    def test_reload_keeps_the_drain(self):
        lb = self.start([self.fake("s1")], up=["p/s1"])
        self.ctl_ok("drain")
        since = self.status()["draining_since"]
        self.assertEqual(self.ctl_ok("reload"), "reloaded: generation 2\n")
        off = lb.log_offset()
        os.kill(lb.pid, signal.SIGHUP)
        lb.wait_log(r"configuration reloaded: generation 3", since=off)
        st = self.status()
        self.assertEqual((st["generation"], st["state"], st["draining_since"]), (3, "draining", since))
        self.assertEqual(self.get("/healthz").status, 503)
        self.assertEqual(short_session(lb.port())[0], "s1")

    def test_sigterm_while_draining(self):
        """SIGTERM stops as always (listeners closed): /healthz says stopping, the drain
        can no longer be changed, the open session finishes, exit 0."""
        lb = self.start([self.fake("s1")], up=["p/s1"])
        self.ctl_ok("drain")
        held = self.client(lb.port())
        held.greeting()
        os.kill(lb.pid, signal.SIGTERM)
        lb.wait_log(r"stopping: listeners closed")
        r = self.get("/healthz")
        self.assertEqual((r.status, r.body), (503, b"stopping\n"), r)
        self.assertEqual(self.status()["state"], "stopping")
        self.assertEqual(self.metric("smtplb_draining"), 0)
        for cmd in ("ready", "drain"):
            r = self.ctl(cmd)
            self.assertEqual((r.returncode, r.stdout, r.stderr), (1, "", "smtplb ctl: error 503: stopping\n"), r)
        self.assertEqual(held.quit(), OK_QUIT)
        wait_until(lambda: not lb.alive(), harness.STEP_TIMEOUT, "smtplb to exit after the last session")
        self.assertEqual(lb.terminate(), 0)

    def test_state_endpoint(self):
        lb = self.start([self.fake("s1")], up=["p/s1"])
        r = self.call("POST", "/state", b"drain", tcp=True)
        self.assertEqual(r.status, 403, r)
        r = self.get("/state")
        self.assertEqual((r.status, r.headers.get("allow")), (405, "POST"), r)
        for body in (b"maint", b"", b"drained", b"ready now"):
            r = self.call("POST", "/state", body)
            self.assertEqual((r.status, r.body), (400, b"state must be drain or ready\n"), (body, r))
        self.assertEqual(self.get("/healthz").status, 200)
        r = self.call("POST", "/state", b"drain\r\n")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(self.get("/healthz").status, 503)
        self.assertEqual(self.call("POST", "/state", b"ready").body, b"ready\n")
        self.assertEqual(self.get("/healthz").status, 200)
        self.assertEqual(short_session(lb.port())[0], "s1")


class DrainWaitTest(AdminTestCase):

    def ctl_timed(self, *args, timeout=30):
        t0 = time.monotonic()
        r = self.ctl(*args, timeout=timeout)
        return r, t0, time.monotonic()

    def test_wait_returns_once_sessions_stop(self):
        """Sessions every 100 ms for 1.5 s after the drain: ctl returns 1 s after the last
        one was accepted (never before), counting the ones it saw."""
        lb = self.start([self.fake("s1")], up=["p/s1"])
        load = Sessions(lb.port(), 1.5)
        load.start()
        wait_until(lambda: load.accepted, 5, "a first session")
        r, t0, t1 = self.ctl_timed("drain", "--wait", "1s", "--timeout", "20s")
        load.join(10)
        self.assertEqual((r.returncode, r.stderr, load.errors), (0, "", []), r)
        lines = r.stdout.splitlines()
        self.assertRegex(lines[0] + "\n", DRAIN_OUT_RE)
        self.assertEqual(lines[1], "waiting until no new session arrives for 1s (at most 20s)")
        m = re.match(r"^no new session for 1s: (\d+) accepted while waiting, 0 still open$", lines[2])
        self.assertTrue(m, r.stdout)
        last = load.accepted[-1]
        self.assertGreater(last, t0 + 1.0, "the load did not outlast the quiet time")
        self.assertGreaterEqual(t1, last + 1.0, "ctl returned before 1 s without a new session")
        self.assertLess(t1, last + 3.0, "ctl returned late")
        during = [a for a in load.accepted if a > t0]
        self.assertGreaterEqual(int(m.group(1)), len(during) - 2, (during, r.stdout))
        self.assertLessEqual(int(m.group(1)), len(during), (during, r.stdout))
        self.assertEqual(self.status()["state"], "draining")

    def test_wait_without_traffic(self):
        self.start([self.fake("s1")], up=["p/s1"])
        r, t0, t1 = self.ctl_timed("drain", "--wait", "500ms")
        self.assertEqual((r.returncode, r.stderr), (0, ""), r)
        self.assertEqual(r.stdout.splitlines()[1:], ["waiting until no new session arrives for 500ms (at most 5m)",
                                                     "no new session for 500ms: 0 accepted while waiting, "
                                                     "0 still open"])
        self.assertGreaterEqual(t1 - t0, 0.5)
        self.assertLess(t1 - t0, 3)

    def test_wait_times_out_while_sessions_arrive(self):
        lb = self.start([self.fake("s1")], up=["p/s1"])
        load = Sessions(lb.port(), 4)
        load.start()
        self.addCleanup(load.join, 10)
        wait_until(lambda: load.accepted, 5, "a first session")
        r, t0, t1 = self.ctl_timed("drain", "--wait", "1s", "--timeout", "1500ms")
        self.assertEqual(r.returncode, 1, r)
        self.assertRegex(r.stderr, r"^smtplb ctl: new sessions still arrive after 1500ms \(\d+ accepted while "
                                   r"waiting\): has the address moved to the other node\?\n$")
        self.assertGreaterEqual(t1 - t0, 1.5)
        self.assertLess(t1 - t0, 3.5)
        self.assertEqual(self.status()["state"], "draining", "a timed-out wait leaves the drain on")

    def test_wait_ends_when_made_ready(self):
        lb = self.start([self.fake("s1")], up=["p/s1"])
        load = Sessions(lb.port(), 3)
        load.start()
        self.addCleanup(load.join, 10)
        p = subprocess.Popen([harness.SMTPLB_BIN, "ctl", "--socket", self.sock_path, "drain", "--wait", "10s"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: p.poll() is None and (p.kill(), p.wait(5)))
        wait_until(lambda: self.status()["state"] == "draining", 5, "the drain")
        self.ctl_ok("ready")
        out, err = p.communicate(timeout=5)
        self.assertEqual((p.returncode, err), (1, "smtplb ctl: smtplb is no longer draining (smtplb ctl ready?)\n"))

    def test_usage_errors(self):
        self.start([self.fake("s1")], up=["p/s1"])
        for args, msg in ((("drain", "--wait"), "--wait needs a duration such as 5s"),
                          (("drain", "--wait", "5"), "--wait needs a duration such as 5s, not 5"),
                          (("drain", "--wait", "0s"), "--wait needs a duration such as 5s, not 0s"),
                          (("drain", "--timeout", "5s"), "--timeout goes with --wait"),
                          (("drain", "--wait", "1s", "--timeout", "x"), "--timeout needs a duration such as 5s, not x"),
                          (("drain", "--now"), "unknown option for drain: --now"),
                          (("ready", "--wait", "1s"), "unknown option for ready: --wait"),
                          (("drain", "p/s1", "--wait", "1s"), "unknown command or wrong arguments: drain")):
            r = self.ctl(*args)
            self.assertEqual(r.returncode, 64, (args, r))
            self.assertEqual(r.stderr.splitlines()[0], "smtplb ctl: " + msg, (args, r))
        self.assertEqual(self.status()["state"], "running", "a usage error changed the state")


if __name__ == "__main__":
    main()
