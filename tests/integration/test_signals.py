#!/usr/bin/env python3
"""Signals: TERM/INT drain gracefully and exit 0 (a second one stops at once); HUP reloads."""

import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (UNAVAILABLE, Behaviour, TestCase, client_label, connect, main, make_config,  # noqa: E402
                     recv_until_eof, server_of, wait_until)

SLOW_POOL = """
[listener.slow]
address = "127.0.0.1"
port = 0
pool = "q"

[pool.q]
banner_timeout = "30s"

[pool.q.health_check]
interval = "10m"
ehlo_name = "hc.smtplb.test"

[[pool.q.server]]
name = "mute"
address = "127.0.0.1"
port = %d
"""


class SignalTest(TestCase):

    def test_sigterm_drains_gracefully(self):
        """SIGTERM: listeners close at once; a session still waiting for its greeting gets
        smtplb's 421; relaying sessions go on to their natural end; then exit 0."""
        srv = self.fake("s1")
        mute = self.fake("mute")
        cfg = make_config([srv], extra=SLOW_POOL % mute.port)
        lb = self.smtplb(cfg, up=["p/s1", "q/mute"])
        mute.behaviour = Behaviour(never_greet=True)

        relaying = [self.client(lb.port()) for _ in range(3)]
        for c in relaying:
            self.assertEqual(server_of(c.greeting()), "s1")
        waiting = self.sock(lb.port("slow"))
        wait_until(lambda: mute.non_checks(), 5, "the session's connection to the mute server")
        wlabel = client_label(waiting)
        off = lb.log_offset()

        os.kill(lb.pid, signal.SIGTERM)
        lb.wait_log(r"stopping: listeners closed", since=off)
        # The session not handed off yet is told to come back later.
        self.assertEqual(recv_until_eof(waiting, timeout=5), UNAVAILABLE)
        waiting.close()  # smtplb waits (up to 5 s) for the client to close after its 421
        self.assertEqual(lb.wait_access(client=wlabel, timeout=5)[0]["term"], "KH")
        # New clients are refused at once.
        wait_until(lambda: refused(lb.port()), 5, "the listener to close")
        # Relaying sessions still work and end normally.
        self.assertTrue(lb.alive())
        labels = [c.label() for c in relaying]
        for c in relaying:
            self.assertEqual(c.cmd("NOOP"), b"250 2.0.0 Ok\r\n")
            self.assertEqual(c.quit(), b"221 2.0.0 Bye\r\n")
        self.assertEqual(wait_exit(lb, 10), 0)
        for label in labels:
            self.assertEqual(lb.wait_access(client=label, timeout=1)[0]["term"], "--")
        self.assertIn("smtplb stopped", lb.log())

    def test_shutdown_grace_is_enforced(self):
        srv = self.fake("s1")
        lb = self.smtplb(make_config([srv], global_={"shutdown_grace": "1s"}), up=["p/s1"])
        c = self.client(lb.port())
        c.greeting()
        t0 = time.monotonic()
        os.kill(lb.pid, signal.SIGTERM)
        self.assertEqual(wait_exit(lb, 10), 0)
        self.assertGreaterEqual(time.monotonic() - t0, 0.9)
        self.assertEqual(recv_until_eof(c.sock, timeout=5), b"")
        self.assertEqual(lb.wait_access(client=c.label(), timeout=1)[0]["term"], "KD")
        self.assertIn("shutdown_grace passed", lb.log())

    def test_second_sigterm_stops_at_once(self):
        srv = self.fake("s1")
        lb = self.smtplb(make_config([srv], global_={"workers": 2}), up=["p/s1"])
        c = self.client(lb.port())
        c.greeting()
        os.kill(lb.pid, signal.SIGINT)
        lb.wait_log(r"received SIGINT")
        t0 = time.monotonic()
        self.assertEqual(lb.terminate(signal.SIGTERM, timeout=10), 0)
        self.assertLess(time.monotonic() - t0, 5)
        self.assertIn("second stop signal", lb.log())
        self.assertEqual(recv_until_eof(c.sock, timeout=5), b"")

    def test_sigterm_idle(self):
        srv = self.fake("s1")
        lb = self.smtplb(make_config([srv]), up=["p/s1"])
        t0 = time.monotonic()
        self.assertEqual(lb.terminate(signal.SIGTERM, timeout=10), 0)
        self.assertLess(time.monotonic() - t0, 5)

    def test_sighup_reloads_and_keeps_sessions(self):
        """HUP reloads in place: the open session goes on, new ones are served."""
        srv = self.fake("s1")
        lb = self.smtplb(make_config([srv]), up=["p/s1"])
        c = self.client(lb.port())
        c.greeting()
        off = lb.log_offset()
        os.kill(lb.pid, signal.SIGHUP)
        lb.wait_log(r"configuration reloaded: generation 2", since=off)
        self.assertTrue(lb.alive())
        self.assertEqual(c.cmd("NOOP"), b"250 2.0.0 Ok\r\n")
        c2 = self.client(lb.port())
        self.assertEqual(server_of(c2.greeting()), "s1")
        self.assertEqual(c2.quit(), b"221 2.0.0 Bye\r\n")
        self.assertEqual(c.quit(), b"221 2.0.0 Bye\r\n")


def refused(port):
    try:
        connect(port, timeout=1).close()
        return False
    except ConnectionRefusedError:
        return True


def wait_exit(lb, timeout):
    """Waits for smtplb to exit by itself; returns its exit status (None on timeout)."""
    try:
        lb.returncode = lb.proc.wait(timeout=timeout)
    except Exception:
        return None
    return lb.returncode


if __name__ == "__main__":
    main()
