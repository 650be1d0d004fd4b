#!/usr/bin/env python3
"""Health checks (docs/architecture.md): the SMTP dialogue, the DOWN reasons in the log, ejection
after `fall` failures, return after exactly `rise` good checks, no traffic to UNKNOWN or
DOWN servers."""

import os
import re
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (CHECK_EHLO, UNAVAILABLE, Behaviour, TestCase, log_time, main, make_config,  # noqa: E402
                     recv_until_eof, refused_port, server_of, wait_until)


def sessions_by_server(lb_port, n, test):
    """Runs n short sessions (greeting, QUIT); returns the fake server names in order."""
    names = []
    for _ in range(n):
        c = test.client(lb_port)
        names.append(server_of(c.greeting()))
        test.assertEqual(c.quit(), b"221 2.0.0 Bye\r\n")
    return names


class CheckDialogueTest(TestCase):

    def test_polite_dialogue(self):
        """The check reads the whole multi-line greeting (lines 150 ms apart) before EHLO,
        the whole multi-line EHLO reply before QUIT, and waits for 221."""
        srv = self.fake("polite", Behaviour(
            greeting=[(b"220-polite.test ESMTP\r\n", 0.15), (b"220-please wait\r\n", 0.15), (b"220 ready\r\n", 0)],
            ehlo_reply=[(b"250-polite.test\r\n", 0.15), (b"250-PIPELINING\r\n", 0.15), (b"250 8BITMIME\r\n", 0)]))
        lb = self.smtplb(make_config([srv]), up=["p/polite"])
        lb.wait_log(r"server p/polite is UP: check passed \(first check\), 1 of 1 servers up")
        check = srv.checks()[0]
        self.assertTrue(check.done.wait(5))
        self.assertEqual(check.early, b"", "check wrote before the greeting was complete (pregreet)")
        self.assertEqual(check.ehlo_early, b"", "check wrote before the EHLO reply was complete (pipelining)")
        self.assertEqual(check.commands, ["EHLO " + CHECK_EHLO, "QUIT"])
        self.assertTrue(check.quit)
        self.assertIsNone(check.error)

    def test_ehlo_name_defaults_to_hostname(self):
        srv = self.fake("s1")
        cfg = make_config([srv], global_={"hostname": CHECK_EHLO}, health={"ehlo_name": None})
        self.assertNotIn("ehlo_name", cfg)
        self.smtplb(cfg, up=["p/s1"])
        self.assertEqual(srv.checks()[0].commands, ["EHLO " + CHECK_EHLO, "QUIT"])

    def test_down_reasons(self):
        """Each kind of failure marks the server DOWN at its first check, with the reason."""
        hold, refused = refused_port()
        self.addCleanup(hold.close)
        cases = {
            "good": Behaviour(),
            "busy": Behaviour(greeting=b"421 4.3.2 All server ports are busy\r\n"),
            "ehlo502": Behaviour(ehlo_reply=b"502 5.5.2 Error: command not recognized\r\n"),
            "silent": Behaviour(never_greet=True),
            "closes": Behaviour(close_immediately=True),
            "slowehlo": Behaviour(ehlo_reply=[(b"250-slow\r\n", 3.0), (b"250 late\r\n", 0)]),
            "quit500": Behaviour(replies={"QUIT": b"500 5.5.1 no quitting\r\n"}),
            "garbage": Behaviour(greeting=b"hello there\r\n"),
        }
        fakes = {name: self.fake(name, b) for name, b in cases.items()}
        # A listener whose accept queue is full (backlog 0, one connection waiting): the
        # kernel drops further SYNs, so the check's connect never completes.
        full = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(full.close)
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        filler = socket.create_connection(full.getsockname(), timeout=2)
        self.addCleanup(filler.close)
        servers = list(fakes.values()) + [("refused", "127.0.0.1", refused),
                                          ("unanswered", "127.0.0.1", full.getsockname()[1])]
        down = [n for n in list(cases) + ["refused", "unanswered"] if n != "good"]
        lb = self.smtplb(make_config(servers, health={"timeout": "1s"}),
                         up=["p/good"], down=["p/" + n for n in down])
        expect = {
            "busy": "greeting 421 4.3.2 All server ports are busy",
            "ehlo502": "ehlo 502 5.5.2 Error: command not recognized",
            "silent": "timeout after 1s waiting for greeting",
            "closes": "connection closed during greeting",
            "slowehlo": "timeout after 1s waiting for ehlo",
            "quit500": "quit 500 5.5.1 no quitting",
            "refused": "connect: connection refused",
            "unanswered": "timeout after 1s waiting for connect",
            "garbage": "greeting: malformed reply line",
        }
        log = lb.log()
        for name, reason in expect.items():
            with self.subTest(server=name):
                self.assertRegex(log, r"warning: server p/%s is DOWN: check failed \(%s[^)]*\), \d of 10 servers up"
                                 % (name, re.escape(reason)))
        self.assertRegex(log, r"info: server p/good is UP: check passed \(first check\), \d of 10 servers up")

        # Sessions go to the one UP server only.
        self.assertEqual(sessions_by_server(lb.port(), 6, self), ["good"] * 6)
        for name, f in fakes.items():
            if name != "good":
                self.assertEqual(len(f.snapshot()), 1, "%s: only its health check connected" % name)
        self.assertEqual(len(fakes["good"].sessions()), 6)

    def test_unknown_server_gets_no_traffic(self):
        """Before its first check completes a server is UNKNOWN and takes no sessions: the
        client gets smtplb's 421. Once UP, sessions flow."""
        srv = self.fake("late", Behaviour(greeting_delay=1.5))
        lb = self.smtplb(make_config([srv], health={"timeout": "3s"}))
        wait_until(srv.snapshot, 5, "the first health check to connect")  # now in its 1.5 s wait
        s = self.sock(lb.port())
        self.assertEqual(recv_until_eof(s), UNAVAILABLE)
        s.close()
        self.assertEqual(len(srv.snapshot()), 1, "only the health check connected")
        self.assertNotIn("is UP", lb.log())
        srv.behaviour = Behaviour()  # later connections greet at once
        up = lb.wait_log(r"server p/late is UP", timeout=5)[0]
        self.assertGreaterEqual(log_time(up) - srv.snapshot()[0].t_accept, 1.4)
        self.assertEqual(sessions_by_server(lb.port(), 2, self), ["late", "late"])


class EjectAndReturnTest(TestCase):

    def test_eject_after_fall_and_return_after_rise(self):
        s1 = self.fake("s1")
        s2 = self.fake("s2")
        cfg = make_config([s1, s2], health={"interval": "200ms", "timeout": "1s", "rise": 3, "fall": 2})
        lb = self.smtplb(cfg, up=["p/s1", "p/s2"])

        # A session already open on s2 survives its ejection.
        held = self.client(lb.port())
        while server_of(held.greeting()) != "s2":
            held.quit()
            held = self.client(lb.port())
        self.assertEqual(held.cmd("NOOP"), b"250 2.0.0 Ok\r\n")

        # s2 starts failing its checks: after fall = 2 failures it is DOWN.
        off = lb.log_offset()
        s2.behaviour = Behaviour(ehlo_reply=b"502 5.5.2 Error: command not recognized\r\n")
        down = lb.wait_log(r"warning: server p/s2 is DOWN: check failed \(ehlo 502 5\.5\.2 Error: command not "
                           r"recognized\), 1 of 2 servers up", since=off, timeout=5)[0]
        text = lb.log()[off:]
        first_fail = re.search(r"server p/s2 check failed \(ehlo 502 [^)]*\), 1 of 2 failures before DOWN", text)
        self.assertIsNotNone(first_fail, text)
        self.assertLess(first_fail.start(), text.index(down))

        # While DOWN it gets no sessions.
        before = len(s2.sessions())
        self.assertEqual(sessions_by_server(lb.port(), 10, self), ["s1"] * 10)
        self.assertEqual(len(s2.sessions()), before)
        self.assertEqual(held.cmd("NOOP"), b"250 2.0.0 Ok\r\n")
        self.assertEqual(held.quit(), b"221 2.0.0 Bye\r\n")

        # It answers 250 again: UP after exactly rise = 3 good checks.
        off = lb.log_offset()
        good = Behaviour()
        s2.behaviour = good
        up = lb.wait_log(r"info: server p/s2 is UP: check passed, 2 of 2 servers up", since=off, timeout=5)[0]
        text = lb.log()[off:]
        i1 = text.find("server p/s2 check passed, 1 of 3 successes before UP")
        i2 = text.find("server p/s2 check passed, 2 of 3 successes before UP")
        self.assertTrue(0 <= i1 < i2 < text.index(up), text)
        up_at = log_time(up)
        passed = [c for c in s2.checks() if c.behaviour is good and c.quit and c.t_quit <= up_at + 0.05]
        self.assertEqual(len(passed), 3, "good checks before the UP line: %r" % passed)

        # And it takes sessions again (round-robin 1:1).
        names = sessions_by_server(lb.port(), 10, self)
        self.assertGreaterEqual(names.count("s2"), 4, names)
        self.assertGreaterEqual(names.count("s1"), 4, names)


if __name__ == "__main__":
    main()
