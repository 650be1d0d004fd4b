#!/usr/bin/env python3
"""Signals: TERM/INT stop smtplb with exit 0, also with sessions open; HUP does not."""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (Behaviour, TestCase, client_label, connect, main, make_config, recv_until_eof,  # noqa: E402
                     server_of, wait_until)

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

    def test_sigterm_with_open_sessions(self):
        """Three relaying sessions and one waiting for a greeting: SIGTERM ends them all,
        clients see a clean EOF, the access lines say KD / KH, exit status 0."""
        srv = self.fake("s1")
        mute = self.fake("mute")
        cfg = make_config([srv], extra=SLOW_POOL % mute.port)
        lb = self.smtplb(cfg, up=["p/s1", "q/mute"])
        mute.behaviour = Behaviour(never_greet=True)

        relaying = [self.client(lb.port()) for _ in range(3)]
        for c in relaying:
            self.assertEqual(server_of(c.greeting()), "s1")
        self.assertEqual(relaying[0].cmd("NOOP"), b"250 2.0.0 Ok\r\n")
        waiting = self.sock(lb.port("slow"))
        wait_until(lambda: mute.non_checks(), 5, "the session's connection to the mute server")
        labels = [c.label() for c in relaying]
        wlabel = client_label(waiting)

        self.assertEqual(lb.terminate(signal.SIGTERM, timeout=10), 0, "exit status after SIGTERM")
        for c in relaying:
            self.assertEqual(recv_until_eof(c.sock, timeout=5), b"")
        self.assertEqual(recv_until_eof(waiting, timeout=5), b"")
        log = lb.log()
        self.assertIn("received SIGTERM, stopping", log)
        self.assertIn("smtplb stopped", log)
        for label in labels:
            self.assertEqual(lb.wait_access(client=label, timeout=1)[0]["term"], "KD")
        self.assertEqual(lb.wait_access(client=wlabel, timeout=1)[0]["term"], "KH")
        # Server sides were closed too.
        for conn in srv.non_checks() + mute.non_checks():
            self.assertTrue(conn.done.wait(5), conn)
        # And nothing listens any more.
        with self.assertRaises(ConnectionRefusedError):
            connect(lb.port(), timeout=5).close()

    def test_sigint_stops(self):
        srv = self.fake("s1")
        lb = self.smtplb(make_config([srv], global_={"workers": 2}), up=["p/s1"])
        c = self.client(lb.port())
        c.greeting()
        self.assertEqual(lb.terminate(signal.SIGINT, timeout=10), 0)
        self.assertIn("received SIGINT, stopping", lb.log())
        self.assertEqual(recv_until_eof(c.sock, timeout=5), b"")

    def test_sigterm_idle(self):
        srv = self.fake("s1")
        lb = self.smtplb(make_config([srv]), up=["p/s1"])
        self.assertEqual(lb.terminate(signal.SIGTERM, timeout=10), 0)

    def test_sighup_keeps_running(self):
        """HUP must never stop smtplb nor cut sessions (reload keeps everything running)."""
        srv = self.fake("s1")
        lb = self.smtplb(make_config([srv]), up=["p/s1"])
        c = self.client(lb.port())
        c.greeting()
        off = lb.log_offset()
        os.kill(lb.pid, signal.SIGHUP)
        lb.wait_log(r"SIGHUP", since=off)
        self.assertTrue(lb.alive())
        self.assertEqual(c.cmd("NOOP"), b"250 2.0.0 Ok\r\n")
        c2 = self.client(lb.port())
        self.assertEqual(server_of(c2.greeting()), "s1")
        self.assertEqual(c2.quit(), b"221 2.0.0 Bye\r\n")
        self.assertEqual(c.quit(), b"221 2.0.0 Bye\r\n")


if __name__ == "__main__":
    main()
