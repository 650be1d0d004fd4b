#!/usr/bin/env python3
"""Banner-gated handoff and smtplb's own 421 (docs/architecture.md, "A session").

Servers that must pass their health check but misbehave for client sessions: the config
checks once (interval 10m: the first check runs within 100 ms of start), so the test waits
for the UP line and then switches the fake server's behaviour for the connections that
follow, which are all client sessions."""

import os
import random
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (UNAVAILABLE, Behaviour, TestCase, client_label, main, make_config, recv_exact,  # noqa: E402
                     recv_reply, recv_until_eof, refused_port)

MULTI = b"220-multi.test ESMTP first line\r\n220-second line\r\n220 last line\r\n"


class GreetingTest(TestCase):

    def check_greeting(self, greeting, expected=None):
        srv = self.fake("g", Behaviour(greeting=greeting))
        lb = self.smtplb(make_config([srv]), up=["p/g"])
        expected = expected if expected is not None else b"".join(c for c, _ in greeting) \
            if isinstance(greeting, list) else greeting
        c = self.client(lb.port())
        got = recv_exact(c.sock, len(expected))
        self.assertEqual(got, expected)
        self.assertTrue(c.cmd("EHLO client.test").startswith(b"250-g\r\n"))
        self.assertEqual(c.quit(), b"221 2.0.0 Bye\r\n")
        a = lb.wait_access(server="g")[0]
        self.assertEqual(a["term"], "--")
        self.assertEqual(a["tries"], 1)
        conn = srv.sessions()[0]
        self.assertEqual(conn.commands, ["EHLO client.test", "QUIT"])

    def test_single_line_greeting_verbatim(self):
        self.check_greeting(b"220 single.test ESMTP Postfix (Debian/GNU) \t trailing  \r\n")

    def test_multi_line_greeting_verbatim(self):
        self.check_greeting(MULTI)

    def test_multi_line_greeting_in_pieces(self):
        """Lines arrive 150 ms apart: the rest of the greeting is relayed as it comes."""
        self.check_greeting([(b"220-multi.test ESMTP first\r\n", 0.15), (b"220-second\r\n", 0.15),
                             (b"220 third\r\n", 0)])

    def test_first_line_split_across_reads(self):
        """The first greeting line itself arrives in two pieces 200 ms apart."""
        self.check_greeting([(b"22", 0.2), (b"0 split.test ESMTP\r\n", 0)])

    def test_greeting_in_pieces_with_nagle_is_not_held(self):
        """A server that writes its greeting lines one by one with Nagle on (the fake
        server's sockets keep it on) can send a piece only once the previous one is ACKed.
        smtplb delays its ACKs only once the client talks, so the greeting is not held
        for the 40 ms delayed-ACK timer per piece. Median of 5 sessions, so one slow
        moment on a busy machine does not decide."""
        pieces = [(b"220-nagle.test one\r\n", 0), (b"220-two\r\n", 0), (b"220-three\r\n", 0), (b"220 four\r\n", 0)]
        expected = b"".join(p for p, _ in pieces)
        srv = self.fake("n", Behaviour(greeting=pieces))
        lb = self.smtplb(make_config([srv]), up=["p/n"])
        times = []
        for _ in range(5):
            t0 = time.monotonic()
            c = self.client(lb.port())
            self.assertEqual(recv_exact(c.sock, len(expected)), expected)
            times.append(time.monotonic() - t0)
            self.assertEqual(c.quit(), b"221 2.0.0 Bye\r\n")
        times.sort()
        self.assertLess(times[2], 0.030, "greeting times %s" % ["%.1f ms" % (t * 1000) for t in times])

    def test_bare_lf_greeting(self):
        self.check_greeting(b"220 lf.test ESMTP\n")


class SkipBadServerTest(TestCase):
    """A server that greets badly for a session is skipped; the client sees only the good
    server's greeting and the access line shows tries=2."""

    def setUp(self):
        # Weights 100:1 with smooth round-robin: the bad server is everyone's first pick for
        # the first 49 sessions, so every session here tries it first (deterministic).
        self.bad = self.fake("bad")
        self.good = self.fake("good", Behaviour(greeting=b"220 good.test ESMTP the good one\r\n"))
        cfg = make_config([(self.bad, {"weight": 100}), (self.good, {"weight": 1})],
                          pool={"retries": 3, "banner_timeout": "400ms"})
        self.lb = self.smtplb(cfg, up=["p/bad", "p/good"])

    def one_session(self, behaviour, min_tt_ms=0):
        before = len(self.bad.sessions())
        self.bad.behaviour = behaviour
        c = self.client(self.lb.port())
        t0 = time.monotonic()
        self.assertEqual(c.greeting(), b"220 good.test ESMTP the good one\r\n")
        waited = time.monotonic() - t0
        label = c.label()
        self.assertEqual(c.quit(), b"221 2.0.0 Bye\r\n")
        a = self.lb.wait_access(client=label)[0]
        self.assertEqual((a["server"], a["tries"], a["term"]), ("good", 2, "--"), a)
        self.assertGreaterEqual(a["Tt"], min_tt_ms)
        self.assertGreaterEqual(waited, min_tt_ms / 1000.0 - 0.05)
        bad = self.bad.wait_sessions(before + 1)[before]
        self.assertTrue(bad.done.wait(5), "smtplb did not close the failed server connection")
        self.assertEqual(bad.commands, [])  # the client's commands never went there
        self.assertEqual(len(self.good.sessions()), len([x for x in self.lb.access() if x["server"] == "good"]))
        return a

    def test_early_bytes_go_to_good_server_only(self):
        """Client bytes held before the greeting are not sent to a server that greets
        badly; they reach the good server after its greeting."""
        self.bad.behaviour = Behaviour(greeting=b"421 4.3.2 bad.test busy\r\n")
        s = self.sock(self.lb.port())
        s.sendall(b"EHLO early.test\r\n")
        buf = bytearray()
        self.assertEqual(recv_reply(s, buf), b"220 good.test ESMTP the good one\r\n")
        self.assertTrue(recv_reply(s, buf).startswith(b"250-good\r\n"))
        s.sendall(b"QUIT\r\n")
        self.assertEqual(recv_reply(s, buf), b"221 2.0.0 Bye\r\n")
        bad = self.bad.wait_sessions(1)[0]
        self.assertTrue(bad.done.wait(5))
        self.assertEqual((bad.early, bytes(bad.received), bad.commands), (b"", b"", []))
        good = self.good.sessions()[0]
        self.assertEqual(good.early, b"")
        self.assertEqual(good.commands, ["EHLO early.test", "QUIT"])

    def test_421_greeting_skipped(self):
        self.one_session(Behaviour(greeting=b"421 4.3.2 bad.test All server ports are busy\r\n"))

    def test_multiline_421_skipped(self):
        self.one_session(Behaviour(greeting=b"421-bad.test busy\r\n421 really\r\n"))

    def test_554_greeting_skipped(self):
        self.one_session(Behaviour(greeting=b"554 5.7.1 bad.test go away\r\n"))

    def test_silent_past_banner_timeout_skipped(self):
        self.one_session(Behaviour(never_greet=True), min_tt_ms=400)

    def test_slow_greeting_past_banner_timeout_skipped(self):
        self.one_session(Behaviour(greeting_delay=1.0), min_tt_ms=400)

    def test_close_before_greeting_skipped(self):
        self.one_session(Behaviour(close_immediately=True))

    def test_reset_before_greeting_skipped(self):
        self.one_session(Behaviour(reset_immediately=True))

    def test_garbage_greeting_skipped(self):
        self.one_session(Behaviour(greeting=b"HTTP/1.1 400 Bad Request\r\n"))

    def test_220_without_separator_skipped(self):
        self.one_session(Behaviour(greeting=b"2200 not a greeting\r\n"))


class RetriesTest(TestCase):

    def test_retries_zero(self):
        """retries = 0: one attempt only; a bad greeting means smtplb's 421, tries=1."""
        bad = self.fake("bad")
        good = self.fake("good")
        cfg = make_config([(bad, {"weight": 100}), (good, {"weight": 1})], pool={"retries": 0})
        lb = self.smtplb(cfg, up=["p/bad", "p/good"])
        bad.behaviour = Behaviour(greeting=b"421 4.3.2 bad.test busy\r\n")
        s = self.sock(lb.port())
        label = client_label(s)
        self.assertEqual(recv_until_eof(s), UNAVAILABLE)
        s.close()
        a = lb.wait_access(client=label)[0]
        self.assertEqual((a["tries"], a["term"]), (1, "SH"), a)
        self.assertEqual(good.non_checks(), [])

    def test_retries_limit(self):
        """retries = 2 with three bad servers and one good one that is picked last: the
        client gets 421 after 3 attempts; the good server is never reached."""
        bads = [self.fake("bad%d" % i) for i in range(3)]
        good = self.fake("good")
        cfg = make_config([(b, {"weight": 100}) for b in bads] + [(good, {"weight": 1})], pool={"retries": 2})
        lb = self.smtplb(cfg, up=["p/bad0", "p/bad1", "p/bad2", "p/good"])
        for b in bads:
            b.behaviour = Behaviour(greeting=b"421 4.3.2 busy\r\n")
        s = self.sock(lb.port())
        label = client_label(s)
        self.assertEqual(recv_until_eof(s), UNAVAILABLE)
        s.close()
        a = lb.wait_access(client=label)[0]
        self.assertEqual((a["tries"], a["term"]), (3, "SH"), a)
        self.assertEqual(sorted(len(b.non_checks()) for b in bads), [1, 1, 1])
        self.assertEqual(good.non_checks(), [])


class EarlyClientBytesTest(TestCase):

    def test_bytes_before_greeting_arrive_after_it(self):
        """A client that talks before the greeting: smtplb holds the bytes and delivers
        them after the greeting, never before (postscreen would call it pregreet)."""
        srv = self.fake("slow", Behaviour(greeting_delay=0.5))
        lb = self.smtplb(make_config([srv]), up=["p/slow"])
        s = self.sock(lb.port())
        s.sendall(b"EHLO early.test\r\n")
        buf = bytearray()
        self.assertEqual(recv_reply(s, buf), srv.default_greeting())
        self.assertTrue(recv_reply(s, buf).startswith(b"250-slow\r\n"))
        s.sendall(b"QUIT\r\n")
        self.assertEqual(recv_reply(s, buf), b"221 2.0.0 Bye\r\n")
        conn = srv.sessions()[0]
        self.assertTrue(conn.done.wait(5))
        self.assertEqual(conn.early, b"", "client bytes reached the server before its greeting")
        self.assertEqual(conn.commands, ["EHLO early.test", "QUIT"])

    def test_more_than_hold_limit_before_greeting(self):
        """10 000 bytes before the greeting (more than the 4 KiB hold buffer): smtplb stops
        reading the client, and all bytes still arrive, in order, after the greeting."""
        srv = self.fake("slow", Behaviour(greeting_delay=0.5, mode="raw"))
        lb = self.smtplb(make_config([srv]), up=["p/slow"])
        early = random.Random(5).randbytes(10_000)
        s = self.sock(lb.port())
        s.sendall(early)
        g = srv.default_greeting()
        self.assertEqual(recv_exact(s, len(g)), g)
        s.sendall(b"and after\r\n")
        s.shutdown(socket.SHUT_WR)
        self.assertEqual(recv_until_eof(s), b"")
        conn = srv.sessions()[0]
        self.assertTrue(conn.done.wait(5))
        self.assertEqual(conn.early, b"")
        self.assertEqual(bytes(conn.received), early + b"and after\r\n")


class UnavailableTest(TestCase):

    def read_421(self, lb):
        s = self.sock(lb.port())
        label = client_label(s)
        self.assertEqual(recv_until_eof(s), UNAVAILABLE)
        s.close()  # smtplb lingers (5 s at most) for the client's close before it logs
        return lb.wait_access(client=label)[0]

    def test_no_usable_server(self):
        """The only server refuses connections: DOWN, and a client reads exactly smtplb's
        421 line, then EOF."""
        hold, port = refused_port()
        self.addCleanup(hold.close)
        lb = self.smtplb(make_config([("dead", "127.0.0.1", port)]), down=["p/dead"])
        lb.wait_log(r"server p/dead is DOWN: check failed \(connect: connection refused\), 0 of 1 servers up")
        lb.wait_log(r"pool p has no usable server")
        a = self.read_421(lb)
        self.assertEqual((a["server"], a["tries"], a["term"]), ("-", 0, "SC"), a)
        self.assertEqual(a["bytes_out"], len(UNAVAILABLE))

    def test_client_that_talks_still_gets_421(self):
        """A client that sends a command at once still reads the whole 421 (no reset)."""
        hold, port = refused_port()
        self.addCleanup(hold.close)
        lb = self.smtplb(make_config([("dead", "127.0.0.1", port)]), down=["p/dead"])
        s = self.sock(lb.port())
        s.sendall(b"EHLO eager.test\r\n")
        self.assertEqual(recv_until_eof(s), UNAVAILABLE)

    def test_every_attempt_fails_greeting(self):
        """The one server passes its check, then greets 421 for sessions: after retries+1
        attempts the client gets smtplb's own 421 (not the server's text)."""
        srv = self.fake("busy")
        # fall above the attempts, so passive ejection does not end the retries early.
        lb = self.smtplb(make_config([srv], pool={"retries": 2}, health={"fall": 10}), up=["p/busy"])
        srv.behaviour = Behaviour(greeting=b"421 4.3.2 busy.test own text\r\n")
        a = self.read_421(lb)
        self.assertEqual((a["tries"], a["term"]), (3, "SH"), a)
        self.assertEqual(len(srv.non_checks()), 3)

    def test_every_attempt_times_out(self):
        srv = self.fake("mute")
        lb = self.smtplb(make_config([srv], pool={"retries": 1, "banner_timeout": "200ms"}), up=["p/mute"])
        srv.behaviour = Behaviour(never_greet=True)
        a = self.read_421(lb)
        self.assertEqual((a["tries"], a["term"]), (2, "sH"), a)
        self.assertGreaterEqual(a["Tt"], 400)

    def test_server_down_after_check_refuses(self):
        """Server passed its check, then stopped listening: connect refused on every try."""
        srv = self.fake("gone")
        lb = self.smtplb(make_config([srv], pool={"retries": 1}), up=["p/gone"])
        srv.close()
        a = self.read_421(lb)
        self.assertEqual((a["tries"], a["term"]), (2, "SC"), a)


class HandoffConnectTest(TestCase):

    def test_connect_mode_relays_without_gate(self):
        """handoff = "connect": plain L4 splice, even a 554 greeting reaches the client."""
        srv = self.fake("s1")
        lb = self.smtplb(make_config([srv], pool={"handoff": "connect"}), up=["p/s1"])
        srv.behaviour = Behaviour(greeting=b"554 5.3.2 s1 not today\r\n")
        c = self.client(lb.port())
        self.assertEqual(c.greeting(), b"554 5.3.2 s1 not today\r\n")
        self.assertEqual(c.quit(), b"221 2.0.0 Bye\r\n")
        a = lb.wait_access(server="s1")[0]
        self.assertEqual((a["tries"], a["term"]), (1, "--"))


if __name__ == "__main__":
    main()
