#!/usr/bin/env python3
"""Failover (issue 3): passive ejection by failed client sessions, retries on other
servers, backup servers, per-server max_connections with a FIFO queue, the rate-limited
refusal warning, slow start after a server comes back, and the drain / maint admin states
from the configuration."""

import collections
import os
import re
import select
import signal
import socket
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (UNAVAILABLE, Behaviour, SmtpClient, TestCase, log_time, main, make_config,  # noqa: E402
                     recv_until_eof, server_of, wait_until)

BUSY = b"421 4.3.2 All server ports are busy\r\n"
BUSY_RE = r"greeting 421 4\.3\.2 All server ports are busy"


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def short_session(port):
    """Greeting, QUIT; returns (greeting, client label). Closes the client."""
    c = SmtpClient(port)
    try:
        g = c.greeting()
        label = c.label()
        r = c.quit()
        if r != b"221 2.0.0 Bye\r\n":
            raise AssertionError("QUIT: %r" % r)
        return g, label
    finally:
        c.close()


def names_of(port, n):
    """Runs n short sessions; returns the names of the fake servers that greeted."""
    return [server_of(short_session(port)[0]) for _ in range(n)]


def assert_silent(test, sock, seconds, what="the queued client"):
    """Nothing may arrive on sock for `seconds` (no greeting, no 421, no EOF)."""
    r, _, _ = select.select([sock], [], [], seconds)
    if r:
        test.fail("%s got %r within %.1fs" % (what, sock.recv(4096), seconds))


def wait_check_done(srv, timeout=5.0):
    """Waits until srv has seen one more connection than now (all its connections are
    checks in the tests that use this) and that connection is finished; so the next check
    is about one interval away."""
    n = len(srv.snapshot())
    wait_until(lambda: len(srv.snapshot()) > n and srv.snapshot()[-1].done.is_set(), timeout,
               "a health check of %s to finish" % srv.name)


def wait_first_check_done(srv, timeout=5.0):
    wait_until(lambda: srv.snapshot() and all(c.done.is_set() for c in srv.snapshot()), timeout,
               "the first health check of %s to finish" % srv.name)


# --------------------------------------------------------------------------------------
# 1-3: passive ejection
# --------------------------------------------------------------------------------------


class PassiveEjectionTest(TestCase):
    """Health checks are 10 minutes apart (one check at start), so only failed client
    sessions can take the server DOWN. fall = 2."""

    FALL = 2

    def eject(self, break_bad, reason_re, pool=None, counts_conns=True):
        good = self.fake("good")
        bad = self.fake("bad")
        lb = self.smtplb(make_config([bad, good], pool=pool, health={"fall": self.FALL}), up=["p/good", "p/bad"])
        wait_first_check_done(bad)
        break_bad(bad)

        failed = 0
        for _ in range(4 * self.FALL):
            g, label = short_session(lb.port())
            self.assertEqual(g, good.default_greeting(), "the client must only ever see the good server")
            a = lb.wait_access(client=label)[0]
            self.assertEqual((a["server"], a["term"]), ("good", "--"), a)
            self.assertIn(a["tries"], (1, 2), a)
            if a["tries"] == 2:
                failed += 1
                if failed < self.FALL:
                    self.assertNotRegex(lb.log(), r"server p/bad is DOWN")
            if failed == self.FALL:
                break
        self.assertEqual(failed, self.FALL, "round-robin should have sent %d sessions to bad" % self.FALL)

        down = lb.wait_log(r"warning: server p/bad is DOWN: %d failed sessions in a row \(%s\), 1 of 2 servers up"
                           % (self.FALL, reason_re), timeout=3)[0]
        log = lb.log()
        warns = [ln for ln in log.splitlines()
                 if re.search(r"warning: server p/bad session attempt failed \(%s\), \d of %d before DOWN"
                              % (reason_re, self.FALL), ln)]
        self.assertEqual([re.search(r"(\d) of %d before DOWN" % self.FALL, w).group(1) for w in warns],
                         [str(i + 1) for i in range(self.FALL)], warns)
        self.assertLess(log.index(warns[-1]), log.index(down))
        delay = log_time(down) - log_time(warns[-1])
        self.assertGreaterEqual(delay, 0)
        self.assertLess(delay, 1.0, "DOWN line %.3fs after the %d-th failure" % (delay, self.FALL))
        self.assertNotRegex(log, r"server p/bad check failed", "only one check ran: the data path ejected it")

        # DOWN: no further session goes to it, the client sees one attempt each.
        before = len(bad.non_checks())
        for _ in range(6):
            g, label = short_session(lb.port())
            self.assertEqual(g, good.default_greeting())
            a = lb.wait_access(client=label)[0]
            self.assertEqual((a["server"], a["tries"], a["term"]), ("good", 1, "--"), a)
        if counts_conns:
            self.assertEqual(len(bad.non_checks()), before)
            self.assertEqual(before, self.FALL, "bad got exactly one attempt per failed session")
        self.assertEqual(len(lb.wait_log(r"server p/bad is DOWN")), 1)
        return lb, bad

    def test_connection_refused(self):
        """The server's port is closed after its first check (and kept reserved, not
        listening, so nothing else takes it)."""
        holder = []

        def close_port(bad):
            bad.close()
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", bad.port))
            except OSError:
                s.close()
                return
            holder.append(s)
            self.addCleanup(s.close)

        self.eject(close_port, r"connect: connection refused", counts_conns=False)

    def test_greeting_421(self):
        def busy(bad):
            bad.behaviour = Behaviour(greeting=BUSY)

        self.eject(busy, BUSY_RE)

    def test_silent_past_banner_timeout(self):
        def silent(bad):
            bad.behaviour = Behaviour(never_greet=True)

        lb, bad = self.eject(silent, r"no greeting within 300ms", pool={"banner_timeout": "300ms"})
        for c in bad.non_checks():
            self.assertTrue(c.done.wait(5), "smtplb left a silent backend connection open")

    def test_eof_before_greeting(self):
        def closes(bad):
            bad.behaviour = Behaviour(close_immediately=True)

        self.eject(closes, r"closed before greeting")

    def test_reset_before_greeting(self):
        def resets(bad):
            bad.behaviour = Behaviour(reset_immediately=True)

        # The RST may come before libuv reports the connect as done: either step is named.
        self.eject(resets, r"(?:connect|greeting): connection reset by peer")

    def test_connect_timeout(self):
        def hangs(bad):
            # Twice: the first call can race with the fake's acceptor thread, which may
            # still accept one filler and leave a free slot in the accept queue (smtplb's
            # connect would then succeed and time out waiting for the greeting instead).
            # The second call runs with the acceptor already paused.
            bad.stop_accepting()
            bad.stop_accepting()

        self.eject(hangs, r"connect timeout after 300ms", pool={"connect_timeout": "300ms"}, counts_conns=False)


class PassiveCountTest(TestCase):

    def test_successful_session_resets_the_count(self):
        """fall = 2: fail, succeed, fail -> still UP (each warning says 1 of 2); a third
        failure right after the second makes it 2 of 2 and DOWN."""
        good = self.fake("good")
        flaky = self.fake("flaky")
        lb = self.smtplb(make_config([flaky, good], health={"fall": 2}), up=["p/good", "p/flaky"])
        wait_first_check_done(flaky)

        def until(pred, what):
            for _ in range(6):
                g, label = short_session(lb.port())
                a = lb.wait_access(client=label)[0]
                if pred(g, a):
                    return a
            self.fail("no session %s in 6 tries" % what)

        warn = r"warning: server p/flaky session attempt failed \(%s\), (\d) of 2 before DOWN" % BUSY_RE
        flaky.behaviour = Behaviour(greeting=BUSY)
        until(lambda g, a: a["tries"] == 2, "failed on flaky")
        flaky.behaviour = Behaviour()
        until(lambda g, a: server_of(g) == "flaky" and a["tries"] == 1, "served by flaky")
        flaky.behaviour = Behaviour(greeting=BUSY)
        until(lambda g, a: a["tries"] == 2, "failed on flaky again")
        time.sleep(0.3)
        log = lb.log()
        self.assertEqual(re.findall(warn, log), ["1", "1"], log)
        self.assertNotRegex(log, r"server p/flaky is DOWN")

        # Without a success in between, the next failure is the second in a row.
        until(lambda g, a: a["tries"] == 2, "failed on flaky a third time")
        lb.wait_log(r"server p/flaky is DOWN: 2 failed sessions in a row \(%s\), 1 of 2 servers up" % BUSY_RE)
        self.assertEqual(re.findall(warn, lb.log()), ["1", "1", "2"])

    def test_active_checks_bring_it_back(self):
        """Ejected by failed sessions; then the server heals and `rise` = 2 good checks
        bring it UP again, after which it takes sessions."""
        good = self.fake("good")
        bad = self.fake("bad")
        cfg = make_config([bad, good], health={"interval": "500ms", "timeout": "1s", "rise": 2, "fall": 2})
        lb = self.smtplb(cfg, up=["p/good", "p/bad"])
        # Break it just after a check ended, so the next check is >= 450 ms away: only the
        # data path can take it DOWN.
        wait_check_done(bad)
        off = lb.log_offset()
        bad.behaviour = Behaviour(greeting=BUSY)
        for _ in range(8):
            g, _ = short_session(lb.port())
            self.assertEqual(server_of(g), "good")
            if re.search(r"server p/bad is DOWN", lb.log()[off:]):
                break
        down = lb.wait_log(r"warning: server p/bad is DOWN: 2 failed sessions in a row \(%s\), 1 of 2 servers up"
                           % BUSY_RE, since=off, timeout=2)[0]
        healed = Behaviour()
        bad.behaviour = healed
        t_heal = time.time()
        up = lb.wait_log(r"info: server p/bad is UP: check passed, 2 of 2 servers up", since=off, timeout=5)[0]
        text = lb.log()[off:]
        step = text.find("server p/bad check passed, 1 of 2 successes before UP")
        self.assertTrue(text.index(down) < step < text.index(up), text)
        passed = [c for c in bad.checks() if c.behaviour is healed and c.quit and c.t_quit <= log_time(up) + 0.05]
        self.assertEqual(len(passed), 2, "good checks before the UP line: %r" % passed)
        self.assertGreater(log_time(up) - t_heal, 0.4, "UP needs two checks ~500 ms apart")
        names = names_of(lb.port(), 8)
        self.assertEqual(names.count("bad"), 4, names)


# --------------------------------------------------------------------------------------
# 4: retries
# --------------------------------------------------------------------------------------


class RetryTest(TestCase):

    def test_retries_go_to_other_servers(self):
        """Two servers greet 421, one is good. A client is retried on servers it has not
        tried yet: each bad server gets at most one attempt per client, tries = attempts,
        and it always ends on the good server."""
        bad1 = self.fake("bad1")
        bad2 = self.fake("bad2")
        good = self.fake("good")
        cfg = make_config([bad1, bad2, good], pool={"retries": 3}, health={"fall": 100})
        lb = self.smtplb(cfg, up=["p/bad1", "p/bad2", "p/good"])
        for s in (bad1, bad2):
            wait_first_check_done(s)
            s.behaviour = Behaviour(greeting=BUSY)
        seen_tries = []
        for i in range(6):
            n1, n2 = len(bad1.non_checks()), len(bad2.non_checks())
            g, label = short_session(lb.port())
            self.assertEqual(g, good.default_greeting())
            a = lb.wait_access(client=label)[0]
            d1 = len(bad1.non_checks()) - n1
            d2 = len(bad2.non_checks()) - n2
            with self.subTest(client=i):
                self.assertLessEqual(d1, 1, "bad1 tried twice by one client")
                self.assertLessEqual(d2, 1, "bad2 tried twice by one client")
                self.assertEqual((a["server"], a["term"], a["tries"]), ("good", "--", 1 + d1 + d2), a)
            seen_tries.append(a["tries"])
        # Smooth round-robin starts with the first server: the first client tries all three.
        self.assertEqual(seen_tries[0], 3, seen_tries)
        self.assertNotRegex(lb.log(), r"is DOWN")

    def test_all_bad_each_tried_once_then_421(self):
        """Two servers, both greet 421, retries = 1: each is tried once (not one twice),
        then the client gets smtplb's 421, term SH."""
        bad1 = self.fake("bad1")
        bad2 = self.fake("bad2")
        lb = self.smtplb(make_config([bad1, bad2], pool={"retries": 1}, health={"fall": 100}),
                         up=["p/bad1", "p/bad2"])
        for s in (bad1, bad2):
            wait_first_check_done(s)
            s.behaviour = Behaviour(greeting=BUSY)
        s = self.sock(lb.port())
        label = "%s:%d" % s.getsockname()[:2]
        self.assertEqual(recv_until_eof(s), UNAVAILABLE)
        s.close()
        a = lb.wait_access(client=label)[0]
        self.assertEqual((a["tries"], a["term"]), (2, "SH"), a)
        self.assertIn(a["server"], ("bad1", "bad2"), "the last server tried")
        self.assertRegex(lb.log(), r"listener mx: client %s answered 421 4\.3\.2: no server of pool p could take it "
                                   r"after 2 tries \(last: %s\)" % (re.escape(label), BUSY_RE))
        self.assertEqual((len(bad1.non_checks()), len(bad2.non_checks())), (1, 1))


# --------------------------------------------------------------------------------------
# 5: backup servers
# --------------------------------------------------------------------------------------


class BackupTest(TestCase):

    def test_backup_only_while_no_regular_server_is_up(self):
        r1 = self.fake("r1")
        r2 = self.fake("r2")
        b1 = self.fake("b1")
        cfg = make_config([r1, r2, (b1, {"backup": True})],
                          health={"interval": "200ms", "timeout": "1s", "rise": 1, "fall": 1})
        lb = self.smtplb(cfg, up=["p/r1", "p/r2", "p/b1"])

        names = names_of(lb.port(), 6)
        self.assertEqual(sorted(collections.Counter(names).items()), [("r1", 3), ("r2", 3)], names)

        r1.behaviour = Behaviour(greeting=BUSY)
        lb.wait_log(r"server p/r1 is DOWN: check failed")
        self.assertEqual(names_of(lb.port(), 6), ["r2"] * 6, "one regular server is still up")
        self.assertEqual(b1.sessions(), [])

        r2.behaviour = Behaviour(greeting=BUSY)
        lb.wait_log(r"server p/r2 is DOWN: check failed \(%s\), 1 of 3 servers up" % BUSY_RE)
        self.assertNotIn("has no usable server", lb.log(), "the backup is usable")
        held = self.client(lb.port())
        self.assertEqual(server_of(held.greeting()), "b1")
        labels = []
        for _ in range(5):
            g, label = short_session(lb.port())
            self.assertEqual(server_of(g), "b1")
            labels.append(label)
        for label in labels:
            a = lb.wait_access(client=label)[0]
            self.assertEqual((a["server"], a["tries"], a["term"]), ("b1", 1, "--"), a)

        off = lb.log_offset()
        r2.behaviour = Behaviour()
        lb.wait_log(r"server p/r2 is UP", since=off)
        n_b1 = len(b1.sessions())
        self.assertEqual(names_of(lb.port(), 6), ["r2"] * 6, "released: new sessions go to the regular server")
        self.assertEqual(len(b1.sessions()), n_b1)
        # The session already on the backup goes on.
        self.assertEqual(held.cmd("NOOP"), b"250 2.0.0 Ok\r\n")
        self.assertEqual(held.quit(), b"221 2.0.0 Bye\r\n")


# --------------------------------------------------------------------------------------
# 6: per-server max_connections and the queue; limit refusals in the log
# --------------------------------------------------------------------------------------


class QueueTest(TestCase):

    def setup_full(self, queue_timeout):
        self.srv = self.fake("s1")
        cfg = make_config([(self.srv, {"max_connections": 2})], pool={"queue_timeout": queue_timeout})
        self.lb = self.smtplb(cfg, up=["p/s1"])
        held = [self.client(self.lb.port()) for _ in range(2)]
        for c in held:
            self.assertEqual(server_of(c.greeting()), "s1")
        return held

    def test_released_slot_goes_to_the_waiter(self):
        held = self.setup_full("5s")
        c = self.client(self.lb.port())
        t_conn = time.monotonic()
        assert_silent(self, c.sock, 0.4)
        self.assertEqual(len(self.srv.non_checks()), 2, "the third client must not reach the server yet")
        # A command sent while queued is held and delivered after the greeting.
        c.sock.sendall(b"NOOP\r\n")
        t_rel = time.monotonic()
        held[0].quit()
        self.assertEqual(server_of(c.greeting()), "s1")
        waited = time.monotonic() - t_rel
        self.assertLess(waited, 0.5, "the freed slot went to the waiter only after %.2fs" % waited)
        self.assertEqual(c.reply(), b"250 2.0.0 Ok\r\n")
        label = c.label()
        self.assertEqual(c.quit(), b"221 2.0.0 Bye\r\n")
        a = self.lb.wait_access(client=label)[0]
        self.assertEqual((a["server"], a["tries"], a["term"]), ("s1", 1, "--"), a)
        self.assertGreaterEqual(a["Tw"], 350, a)
        self.assertLessEqual(a["Tw"], (time.monotonic() - t_conn) * 1000 + 50, a)
        # Never more than 2 sessions at the server at once: the third was accepted only
        # after the first had ended.
        conns = sorted(self.srv.non_checks(), key=lambda x: x.index)
        self.assertEqual(len(conns), 3)
        self.assertTrue(conns[0].quit)
        self.assertGreaterEqual(conns[2].t_accept, conns[0].t_quit - 0.01)
        self.assertEqual(conns[2].early, b"", "the held NOOP reached the server before its greeting")
        self.assertEqual(conns[2].commands, ["NOOP", "QUIT"])

    def test_queue_timeout(self):
        self.setup_full("1s")
        s = self.sock(self.lb.port())
        label = "%s:%d" % s.getsockname()[:2]
        t0 = time.monotonic()
        self.assertEqual(recv_until_eof(s, timeout=5), UNAVAILABLE)
        elapsed = time.monotonic() - t0
        s.close()
        self.assertGreaterEqual(elapsed, 0.9)
        self.assertLess(elapsed, 1.6)
        a = self.lb.wait_access(client=label)[0]
        self.assertEqual((a["term"], a["server"], a["tries"]), ("sQ", "-", 0), a)
        self.assertGreaterEqual(a["Tw"], 950, a)
        self.assertLess(a["Tw"], 1500, a)
        self.assertEqual(len(self.srv.non_checks()), 2)
        self.assertRegex(self.lb.log(), r"warning: listener mx: client %s answered 421 4\.3\.2: every server of pool p "
                                        r"stayed full for queue_timeout 1s" % re.escape(label))

    def test_fifo(self):
        """Waiters A, B, C arrive in that order; B gives up; the next freed slots go to A,
        then C."""
        held = self.setup_full("5s")
        a = self.client(self.lb.port())
        time.sleep(0.1)
        b = self.client(self.lb.port())
        time.sleep(0.1)
        c = self.client(self.lb.port())
        time.sleep(0.1)
        b_label = b.label()
        b.close()
        self.lb.wait_access(client=b_label, term="CQ")

        held[0].quit()
        self.assertEqual(server_of(a.greeting()), "s1")
        assert_silent(self, c.sock, 0.3, "C (behind A)")
        held[1].quit()
        self.assertEqual(server_of(c.greeting()), "s1")
        la, lc = a.label(), c.label()
        a.quit()
        c.quit()
        ra = self.lb.wait_access(client=la)[0]
        rc = self.lb.wait_access(client=lc)[0]
        self.assertEqual((ra["term"], rc["term"]), ("--", "--"))
        self.assertLess(ra["Tw"], rc["Tw"], (ra, rc))
        self.assertEqual(len(self.srv.sessions()), 4, "B never reached the server")

    def test_queue_timeout_zero_refuses_at_once(self):
        self.setup_full("0s")
        s = self.sock(self.lb.port())
        label = "%s:%d" % s.getsockname()[:2]
        t0 = time.monotonic()
        self.assertEqual(recv_until_eof(s, timeout=5), UNAVAILABLE)
        self.assertLess(time.monotonic() - t0, 0.3)
        s.close()
        a = self.lb.wait_access(client=label)[0]
        self.assertEqual((a["term"], a["Tw"], a["server"]), ("sQ", 0, "-"), a)


class QueueMoreTest(TestCase):

    def test_server_coming_up_serves_the_queue(self):
        """s1 (max_connections 1) is full and s2 DOWN: a client queues. When s2 comes UP
        the waiter goes to it at once rather than waiting for s1."""
        s1 = self.fake("s1")
        s2 = self.fake("s2", Behaviour(greeting=BUSY))
        cfg = make_config([(s1, {"max_connections": 1}), s2], pool={"queue_timeout": "5s"},
                          health={"interval": "200ms", "timeout": "1s", "rise": 1, "fall": 1})
        lb = self.smtplb(cfg, up=["p/s1"], down=["p/s2"])
        held = self.client(lb.port())
        self.assertEqual(server_of(held.greeting()), "s1")
        c = self.client(lb.port())
        assert_silent(self, c.sock, 0.4)
        off = lb.log_offset()
        s2.behaviour = Behaviour()
        up = lb.wait_log(r"server p/s2 is UP", since=off)[0]
        self.assertEqual(server_of(c.greeting()), "s2")
        self.assertLess(time.time() - log_time(up), 0.5, "the waiter was not served when s2 came UP")
        label = c.label()
        c.quit()
        a = lb.wait_access(client=label)[0]
        self.assertEqual((a["server"], a["tries"], a["term"]), ("s2", 1, "--"), a)
        self.assertGreaterEqual(a["Tw"], 350, a)
        self.assertEqual(held.cmd("NOOP"), b"250 2.0.0 Ok\r\n")

    def test_server_added_by_reload_serves_the_queue(self):
        """s1 (max_connections 1) is full and a client waits. A reload adds s2: once s2
        passes its check, the waiter goes to it, although the waiter was accepted under
        the configuration without s2 (a queued session looks in the newest one)."""
        s1 = self.fake("s1")
        s2 = self.fake("s2")
        health = {"interval": "200ms", "timeout": "1s", "rise": 1, "fall": 1}
        lb = self.smtplb(make_config([(s1, {"max_connections": 1})], pool={"queue_timeout": "8s"}, health=health),
                         up=["p/s1"])
        held = self.client(lb.port())
        self.assertEqual(server_of(held.greeting()), "s1")
        c = self.client(lb.port())
        assert_silent(self, c.sock, 0.3)
        off = lb.log_offset()
        tmp = lb.config_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(make_config([(s1, {"max_connections": 1}), s2], pool={"queue_timeout": "8s"}, health=health))
        os.replace(tmp, lb.config_path)
        os.kill(lb.pid, signal.SIGHUP)
        lb.wait_log(r"configuration reloaded: generation 2", since=off)
        up = lb.wait_log(r"server p/s2 is UP", since=off)[0]
        self.assertEqual(server_of(c.greeting()), "s2")
        self.assertLess(time.time() - log_time(up), 0.5, "the waiter was not served when s2 came UP")
        label = c.label()
        c.quit()
        a = lb.wait_access(client=label)[0]
        self.assertEqual((a["server"], a["tries"], a["term"]), ("s2", 1, "--"), a)
        self.assertEqual(held.cmd("NOOP"), b"250 2.0.0 Ok\r\n")

    def test_full_regular_server_does_not_spill_to_backup(self):
        """A regular server at its max_connections is still usable: new clients queue for
        it; the backup gets nothing."""
        r1 = self.fake("r1")
        b1 = self.fake("b1")
        cfg = make_config([(r1, {"max_connections": 1}), (b1, {"backup": True})], pool={"queue_timeout": "5s"})
        lb = self.smtplb(cfg, up=["p/r1", "p/b1"])
        held = self.client(lb.port())
        self.assertEqual(server_of(held.greeting()), "r1")
        c = self.client(lb.port())
        assert_silent(self, c.sock, 0.4)
        held.quit()
        self.assertEqual(server_of(c.greeting()), "r1")
        self.assertEqual(b1.non_checks(), [])

    def test_queue_across_workers(self):
        """workers = 2, one slot: the waiter may sit on the other worker than the session
        that frees the slot (the kernel spreads the clients); it is served promptly either
        way. Six hand-overs in a row."""
        srv = self.fake("s1")
        cfg = make_config([(srv, {"max_connections": 1})], pool={"queue_timeout": "5s"}, global_={"workers": 2})
        lb = self.smtplb(cfg, up=["p/s1"])
        holder = self.client(lb.port())
        self.assertEqual(server_of(holder.greeting()), "s1")
        labels = []
        for i in range(6):
            waiter = self.client(lb.port())
            assert_silent(self, waiter.sock, 0.15, "waiter %d" % i)
            t = time.monotonic()
            holder.quit()
            self.assertEqual(server_of(waiter.greeting()), "s1")
            self.assertLess(time.monotonic() - t, 0.5, "waiter %d served late" % i)
            labels.append(waiter.label())
            holder = waiter
        holder.quit()
        for label in labels:
            a = lb.wait_access(client=label)[0]
            self.assertEqual((a["server"], a["term"]), ("s1", "--"), a)
            self.assertGreaterEqual(a["Tw"], 100, a)

    def test_failed_attempt_queues_for_untried_full_server(self):
        s1 = self.fake("s1")
        s2 = self.fake("s2")
        cfg = make_config([(s1, {"max_connections": 1}), s2], pool={"queue_timeout": "5s"}, health={"fall": 100})
        lb = self.smtplb(cfg, up=["p/s1", "p/s2"])
        wait_first_check_done(s2)
        held = self.client(lb.port())
        while server_of(held.greeting()) != "s1":  # round-robin: at most one detour
            held.quit()
            held = self.client(lb.port())
        s2.behaviour = Behaviour(greeting=BUSY)
        n2 = len(s2.non_checks())
        c = self.client(lb.port())
        label = c.label()
        try:
            assert_silent(self, c.sock, 0.4)
            held.quit()
            self.assertEqual(server_of(c.greeting()), "s1")
            c.quit()
            a = lb.wait_access(client=label)[0]
            self.assertEqual((a["server"], a["tries"], a["term"]), ("s1", 2, "--"), a)
        finally:
            self.assertEqual(len(s2.non_checks()) - n2, 1, "s2 tried more than once by one client")


class RefusalLogTest(TestCase):

    def test_limit_refusals_logged_at_most_once_a_second(self):
        srv = self.fake("s1")
        # queue_timeout "0s": refused at once, not after waiting in the backlog.
        lb = self.smtplb(make_config([srv], listener={"max_connections": 1}, pool={"queue_timeout": "0s"}),
                         up=["p/s1"])
        held = self.client(lb.port())
        held.greeting()
        line = r"warning: listener mx: client 127\.0\.0\.1:\d+ answered 421 4\.3\.2: connection limit reached"

        def refused():
            s = self.sock(lb.port())
            self.assertEqual(recv_until_eof(s), UNAVAILABLE)
            s.close()

        t0 = time.monotonic()
        for _ in range(10):
            refused()
        elapsed = time.monotonic() - t0
        lb.wait_access(count=10, term="RC")
        first = lb.wait_log(line)[0]
        if elapsed < 0.9:
            self.assertEqual(len(lb.wait_log(line)), 1, "10 refusals within %.2fs" % elapsed)
        else:
            self.assertLessEqual(len(lb.wait_log(line)), 1 + int(elapsed))
        n = len(lb.wait_log(line))
        # Past the second, the next refusal is logged again.
        time.sleep(max(0.0, log_time(first) + 1.1 - time.time()))
        refused()
        lines = lb.wait_log(line, count=n + 1)
        self.assertGreaterEqual(log_time(lines[-1]) - log_time(lines[-2]), 1.0)
        self.assertEqual(held.cmd("NOOP"), b"250 2.0.0 Ok\r\n")


# --------------------------------------------------------------------------------------
# 7: slow start
# --------------------------------------------------------------------------------------


class SlowStartTest(TestCase):

    def bounce(self, lb, srv):
        """Takes srv DOWN by failing its checks, then lets it come back; returns the slow
        start log line."""
        off = lb.log_offset()
        srv.behaviour = Behaviour(greeting=BUSY)
        lb.wait_log(r"server p/%s is DOWN: check failed" % srv.name, since=off)
        srv.behaviour = Behaviour()
        lb.wait_log(r"server p/%s is UP: check passed, 2 of 2 servers up" % srv.name, since=off)
        return lb.wait_log(r"info: server p/%s slow start: weight ramps to 1 over " % srv.name, since=off)[0]

    def setup_pair(self, ramp):
        s1 = self.fake("s1")
        s2 = self.fake("s2")
        cfg = make_config([s1, s2], pool={"slow_start": ramp},
                          health={"interval": "200ms", "timeout": "1s", "rise": 1, "fall": 1})
        return s1, s2, self.smtplb(cfg, up=["p/s1", "p/s2"])

    def test_recovered_server_ramps_up(self):
        """slow_start = 20s: in the first ~2 s after coming back, s2 gets well under a
        quarter of 200 sessions (the ramp is at most 10% of its weight then)."""
        s1, s2, lb = self.setup_pair("20s")
        line = self.bounce(lb, s2)
        self.assertIn("over 20s", line)
        names = names_of(lb.port(), 200)
        spent = time.time() - log_time(line)
        count = collections.Counter(names)
        self.assertLess(count["s2"], 50, "%s within %.1fs of the slow start" % (dict(count), spent))
        # (s2's failed checks count as "silent" connections there: count real sessions.)
        self.assertEqual(len([c for c in s2.snapshot() if c.kind == "session"]), count["s2"])

    def test_no_slow_start_at_startup_and_full_weight_after_the_ramp(self):
        """slow_start = 2s: at startup there is no ramp (1:1 at once); after a bounce the
        share is small at first and back to 1:1 once the 2 s are over."""
        s1, s2, lb = self.setup_pair("2s")
        count = collections.Counter(names_of(lb.port(), 20))
        self.assertEqual((count["s1"], count["s2"]), (10, 10))
        self.assertNotIn("slow start", lb.log())

        line = self.bounce(lb, s2)
        names = names_of(lb.port(), 60)
        spent = time.time() - log_time(line)
        early = collections.Counter(names)
        if spent < 0.8:  # mean ramp under 20%: s2 must be clearly below half
            self.assertLess(early["s2"], 18, "%s within %.2fs of the slow start" % (dict(early), spent))

        time.sleep(max(0.0, log_time(line) + 2.2 - time.time()))
        late = collections.Counter(names_of(lb.port(), 200))
        self.assertLessEqual(abs(late["s2"] - 100), 3, late)
        self.assertEqual(len(lb.wait_log(r"slow start: weight ramps")), 1)


# --------------------------------------------------------------------------------------
# 8: admin state from the configuration
# --------------------------------------------------------------------------------------


class AdminStateTest(TestCase):

    def test_drain_and_maint(self):
        """drain: checked, no new sessions; maint: neither checked nor used."""
        r = self.fake("r")
        d = self.fake("d")
        m = self.fake("m")
        cfg = make_config([r, (d, {"state": "drain"}), (m, {"state": "maint"})],
                          health={"interval": "200ms", "timeout": "1s", "rise": 1, "fall": 1})
        lb = self.smtplb(cfg, up=["p/r", "p/d"])
        lb.wait_log(r"server p/m is in maintenance")
        lb.wait_log(r"server p/d is draining")
        self.assertEqual(names_of(lb.port(), 10), ["r"] * 10)
        wait_until(lambda: len(d.checks()) >= 3, 5, "repeated checks of the draining server")
        self.assertEqual(d.sessions(), [])
        self.assertEqual(m.snapshot(), [], "a server in maintenance gets no connection at all")
        self.assertNotRegex(lb.log(), r"server p/m is (UP|DOWN)")

    def test_only_drain_and_maint_servers_421(self):
        d = self.fake("d")
        m = self.fake("m")
        cfg = make_config([(d, {"state": "drain"}), (m, {"state": "maint"})])
        lb = self.smtplb(cfg, up=["p/d"])
        s = self.sock(lb.port())
        label = "%s:%d" % s.getsockname()[:2]
        self.assertEqual(recv_until_eof(s), UNAVAILABLE)
        s.close()
        a = lb.wait_access(client=label)[0]
        self.assertEqual((a["term"], a["tries"], a["server"]), ("SC", 0, "-"), a)
        self.assertRegex(lb.log(), r"listener mx: client %s answered 421 4\.3\.2: no usable server in pool p"
                         % re.escape(label))
        self.assertEqual(d.non_checks(), [])
        self.assertEqual(m.snapshot(), [])

    def test_backup_stands_in_for_drained_and_weight_zero_regulars(self):
        """Regular servers that are UP but drained or of weight 0 are not usable, so the
        backup takes the sessions."""
        d = self.fake("d")
        z = self.fake("z")
        b = self.fake("b")
        cfg = make_config([(d, {"state": "drain"}), (z, {"weight": 0}), (b, {"backup": True})])
        lb = self.smtplb(cfg, up=["p/d", "p/z", "p/b"])
        self.assertEqual(names_of(lb.port(), 4), ["b"] * 4)
        self.assertEqual((d.non_checks(), z.non_checks()), ([], []))

    def no_usable_server_error(self, other):
        r = self.fake("r")
        x = self.fake("x")
        cfg = make_config([r, (x, other)], health={"interval": "200ms", "timeout": "1s", "rise": 1, "fall": 1})
        lb = self.smtplb(cfg, up=["p/r"])
        r.behaviour = Behaviour(greeting=BUSY)
        lb.wait_log(r"server p/r is DOWN: check failed")
        s = self.sock(lb.port())
        self.assertEqual(recv_until_eof(s), UNAVAILABLE)
        s.close()
        lb.wait_log(r"error: pool p has no usable server: clients get 421 4\.3\.2", timeout=1)

    def test_no_usable_server_error_with_maint_server(self):
        self.no_usable_server_error({"state": "maint"})

    def test_no_usable_server_error_with_drained_server(self):
        self.no_usable_server_error({"state": "drain"})


if __name__ == "__main__":
    main()
