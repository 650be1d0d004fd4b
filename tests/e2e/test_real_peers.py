#!/usr/bin/env python3
"""End to end with real peers: swaks and smtp-source (Postfix) through smtplb to smtp-sink.

Every process started here is stopped by PID in tearDown; every wait is bounded; only
127.0.0.1 is used.
"""
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
import harness  # noqa: E402
from harness import Smtplb, SmtpSink, parse_access, wait_until  # noqa: E402


@unittest.skipUnless(shutil.which("smtp-sink") and shutil.which("smtp-source") and shutil.which("swaks"),
                     "needs postfix (smtp-sink, smtp-source) and swaks")
class RealPeers(unittest.TestCase):
    def setUp(self):
        self.work = tempfile.mkdtemp(prefix="smtplb-e2e.")
        os.chmod(self.work, 0o755)  # smtp-sink runs as 'nobody' and writes below it
        self.addCleanup(shutil.rmtree, self.work, ignore_errors=True)
        self.sinks = []
        for name in ("sink1", "sink2"):
            self.sinks.append(SmtpSink(dump_dir=os.path.join(self.work, name), backlog=256))
            self.addCleanup(self.sinks[-1].stop)
        servers = "".join(
            f'[[pool.sinks.server]]\nname = "s{i + 1}"\naddress = "127.0.0.1"\nport = {s.port}\n\n'
            for i, s in enumerate(self.sinks))
        self.lb = Smtplb(f"""
[global]
hostname = "lb.e2e.test"
workers = 2

[listener.e2e]
address = "127.0.0.1"
port = 0
pool = "sinks"

[pool.sinks]
algorithm = "roundrobin"

[pool.sinks.health_check]
interval = "500ms"

{servers}""", up=["sinks/s1", "sinks/s2"])
        self.enterContext(self.lb)
        self.port = self.lb.port("e2e")

    def sessions(self):
        return [a for a in map(parse_access, self.lb.log().splitlines()) if a]

    def test_swaks_delivers_through_smtplb(self):
        token = f"e2e-token-{os.getpid()}-{time.time_ns()}"
        r = subprocess.run(
            ["swaks", "--server", f"127.0.0.1:{self.port}", "--from", "a@example.org", "--to",
             "b@example.net", "--header", f"Subject: {token}", "--body", f"body {token}"],
            capture_output=True, text=True, timeout=30)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("250 2.0.0 Ok", r.stdout)
        # The greeting the client saw is smtp-sink's own, passed through verbatim.
        self.assertIn("<-  220 smtp-sink ESMTP", r.stdout)
        deadline = time.time() + 5
        found = []
        while time.time() < deadline and not found:
            for s in self.sinks:
                for f in s.messages():
                    with open(f, "rb") as fh:
                        if token.encode() in fh.read():
                            found.append(f)
            time.sleep(0.05)
        self.assertEqual(len(found), 1, "the message reached exactly one backend")
        self.lb.wait_log(r"term=--", timeout=5)
        sessions = self.sessions()
        self.assertEqual(len(sessions), 1)
        self.assertEqual(sessions[0]["tries"], 1)
        self.assertEqual(sessions[0]["term"], "--")

    def test_smtp_source_2000_messages_even_split(self):
        r = subprocess.run(
            ["smtp-source", "-s", "20", "-m", "2000", "-l", "512", "-f", "src@example.org", "-t",
             "dst@example.net", f"127.0.0.1:{self.port}"],
            capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stderr.strip(), "", "smtp-source reported errors")
        wait_until(lambda: len(self.sessions()) >= 2000, 10, "2000 access lines", interval=0.1)
        sessions = self.sessions()
        self.assertEqual(len(sessions), 2000)
        per_server = collections.Counter(s["server"] for s in sessions)
        self.assertEqual(set(per_server), {"s1", "s2"})
        # Smooth round-robin per worker: each worker alternates, so the two totals differ
        # by at most one per worker.
        self.assertLessEqual(abs(per_server["s1"] - per_server["s2"]), 2, per_server)
        self.assertTrue(all(s["tries"] == 1 for s in sessions), "every session took one try")
        # smtp-source closes with SO_LINGER 0 (a reset) after QUIT/221, logged as CD.
        terms = collections.Counter(s["term"] for s in sessions)
        self.assertLessEqual(set(terms), {"--", "CD"}, terms)
        delivered = [len(s.messages()) for s in self.sinks]
        self.assertEqual(sum(delivered), 2000, delivered)
        self.assertEqual(delivered, [per_server["s1"], per_server["s2"]])


if __name__ == "__main__":
    harness.main()
