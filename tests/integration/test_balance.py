#!/usr/bin/env python3
"""Balancing: weighted round-robin, least connections, and correctness with workers = 2
under many parallel sessions."""

import collections
import hashlib
import os
import random
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import UNAVAILABLE, SmtpClient, TestCase, main, make_config, recv_until_eof, server_of  # noqa: E402


def short_session(port):
    c = SmtpClient(port)
    try:
        name = server_of(c.greeting())
        r = c.quit()
        if r != b"221 2.0.0 Bye\r\n":
            raise AssertionError("QUIT: %r" % r)
        return name
    finally:
        c.close()


class RoundRobinTest(TestCase):

    def run_weighted(self, workers):
        s1 = self.fake("s1")
        s2 = self.fake("s2")
        cfg = make_config([(s1, {"weight": 3}), (s2, {"weight": 1})], global_={"workers": workers})
        lb = self.smtplb(cfg, up=["p/s1", "p/s2"])
        names = [short_session(lb.port()) for _ in range(400)]
        lb.wait_access(count=400, term="--")
        count = collections.Counter(names)
        # The servers agree (health checks excluded: they are told apart by their EHLO name).
        self.assertEqual(len(s1.sessions()), count["s1"])
        self.assertEqual(len(s2.sessions()), count["s2"])
        access = collections.Counter(a["server"] for a in lb.access())
        self.assertEqual(access, count)
        return names, count

    def test_weights_3_to_1_one_worker_exact(self):
        """One worker, one smooth weighted round-robin: over any aligned window of
        sum(weights) = 4 sessions each server gets exactly its weight, so 400 sessions
        split exactly 300/100 and never in bursts (s1 s1 s2 s1 ...)."""
        names, count = self.run_weighted(1)
        self.assertEqual((count["s1"], count["s2"]), (300, 100))
        for i in range(0, 400, 4):
            self.assertEqual(names[i:i + 4].count("s2"), 1, "window %d: %r" % (i, names[i:i + 4]))

    def test_weights_3_to_1_two_workers(self):
        """Two workers each run their own smooth WRR over the sessions the kernel gives them
        (SO_REUSEPORT). Each worker's split is within 0.5 sessions of 3:1, so the total is
        within +-1 of 300/100; allow +-2."""
        names, count = self.run_weighted(2)
        self.assertEqual(count["s1"] + count["s2"], 400)
        self.assertLessEqual(abs(count["s1"] - 300), 2, count)


class WeightZeroTest(TestCase):

    def test_weight_zero_takes_no_sessions(self):
        """weight = 0: checked (and UP) but never picked; with only such servers, 421."""
        s0 = self.fake("zero")
        s1 = self.fake("one")
        lb = self.smtplb(make_config([(s0, {"weight": 0}), s1], pool={"algorithm": "leastconn"}),
                         up=["p/zero", "p/one"])
        self.assertEqual([short_session(lb.port()) for _ in range(6)], ["one"] * 6)
        self.assertEqual(s0.sessions(), [])
        self.assertEqual(len(s0.checks()), 1)

    def test_only_weight_zero_gives_421(self):
        s0 = self.fake("zero")
        lb = self.smtplb(make_config([(s0, {"weight": 0})]), up=["p/zero"])
        s = self.sock(lb.port())
        self.assertEqual(recv_until_eof(s), UNAVAILABLE)
        self.assertEqual(s0.non_checks(), [])


class LeastConnTest(TestCase):

    def test_prefers_server_with_fewer_open_sessions(self):
        s1 = self.fake("s1")
        s2 = self.fake("s2")
        lb = self.smtplb(make_config([s1, s2], pool={"algorithm": "leastconn"}), up=["p/s1", "p/s2"])
        held = []

        def open_one():
            c = self.client(lb.port())
            held.append(c)
            return server_of(c.greeting())

        # Ties go round-robin: four held sessions land two on each server.
        first = [open_one() for _ in range(4)]
        self.assertEqual(sorted(first), ["s1", "s1", "s2", "s2"], first)
        # End the sessions on s2: it now has 0 open, s1 has 2.
        ending = [c for c, n in zip(held, first) if n == "s2"]
        labels = [c.label() for c in ending]
        for c in ending:
            self.assertEqual(c.quit(), b"221 2.0.0 Bye\r\n")
        for label in labels:
            lb.wait_access(client=label, server="s2", term="--")
        # The access line is written just before the counter drops, in the same callback of
        # the same thread; a session that starts after it on that worker sees the new count.
        self.assertEqual([open_one(), open_one()], ["s2", "s2"])
        # Now 2:2 again; another 2 spread one each.
        self.assertEqual(sorted([open_one(), open_one()]), ["s1", "s2"])

    def test_weighted_leastconn(self):
        """Weight 3:1 with sessions held open: leastconn keeps open sessions near 3:1."""
        s1 = self.fake("s1")
        s2 = self.fake("s2")
        cfg = make_config([(s1, {"weight": 3}), (s2, {"weight": 1})], pool={"algorithm": "leastconn"})
        lb = self.smtplb(cfg, up=["p/s1", "p/s2"])
        names = []
        for _ in range(8):
            c = self.client(lb.port())
            names.append(server_of(c.greeting()))
        self.assertEqual(collections.Counter(names), {"s1": 6, "s2": 2}, names)


class ConcurrencyTest(TestCase):

    def test_two_workers_many_parallel_sessions(self):
        """workers = 2, two servers, 60 clients in parallel, each sends a distinct message:
        every one is accepted and arrives intact exactly once."""
        s1 = self.fake("s1")
        s2 = self.fake("s2")
        cfg = make_config([s1, s2], global_={"workers": 2})
        lb = self.smtplb(cfg, up=["p/s1", "p/s2"])
        self.assertIn("(2 workers, backlog ", lb.log())
        n = 60
        bodies = [b"Subject: m%d\r\n\r\n" % i + random.Random(i).randbytes(20_000).hex().encode() + b"\r\n"
                  for i in range(n)]
        results = [None] * n
        start = threading.Barrier(n)

        def worker(i):
            try:
                start.wait(timeout=10)
                c = SmtpClient(lb.port())
                try:
                    c.greeting()
                    r = c.send_message(bodies[i], sender="s%d@example.org" % i)
                    q = c.quit()
                    results[i] = (r[:4], q)
                finally:
                    c.close()
            except Exception as e:
                results[i] = ("error", repr(e))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        for i, r in enumerate(results):
            self.assertEqual(r, (b"250 ", b"221 2.0.0 Bye\r\n"), "client %d" % i)
        got = collections.Counter(m["sha256"] for m in s1.messages() + s2.messages())
        want = collections.Counter(hashlib.sha256(b).hexdigest() for b in bodies)
        self.assertEqual(got, want)
        access = lb.wait_access(count=n, term="--")
        self.assertEqual(len(access), n)
        self.assertGreater(len(s1.messages()), 0)
        self.assertGreater(len(s2.messages()), 0)


if __name__ == "__main__":
    main()
