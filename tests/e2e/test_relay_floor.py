#!/usr/bin/env python3
"""relay_floor, the benchmark's yardstick (tests/bench/relay_floor.cpp), relays correctly.

scripts/bench.py --floor compares smtplb with it, so it must be a real relay, not a
shortcut: every message smtp-source sends arrives at smtp-sink, one per connection and
many per connection, and a client that half-closes after QUIT still gets the 221 before
the FIN. Each mode is checked: plain, splice, and sockmap (skipped where this process may
not load BPF programs, that is without root).

Every process started here is stopped by PID; every wait is bounded; only 127.0.0.1 is used.
"""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
from harness import SmtpSink, free_port, port_open, wait_until  # noqa: E402

BIN = os.environ.get("RELAY_FLOOR_BIN", "build/tests/bench/relay_floor")


@unittest.skipUnless(shutil.which("smtp-sink") and shutil.which("smtp-source"), "needs postfix (smtp-sink, smtp-source)")
class RelayFloor(unittest.TestCase):
    def start(self, mode):
        work = tempfile.mkdtemp(prefix="relay-floor.")
        os.chmod(work, 0o755)  # smtp-sink runs as 'nobody' and writes below it
        self.addCleanup(shutil.rmtree, work, ignore_errors=True)
        sink = SmtpSink(dump_dir=os.path.join(work, "mail"))
        self.addCleanup(sink.stop)
        port = free_port()
        err = open(os.path.join(work, "relay.err"), "w+")
        self.addCleanup(err.close)
        proc = subprocess.Popen([BIN, str(port), f"127.0.0.1:{sink.port}", mode], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err)

        def stop():
            if proc.poll() is None:
                proc.kill()
            proc.wait(5)
        self.addCleanup(stop)
        wait_until(lambda: proc.poll() is not None or port_open(port), 5, "relay_floor listening")
        if proc.poll() is not None:
            err.seek(0)
            said = err.read().strip()
            if mode == "sockmap" and "not permitted" in said:
                self.skipTest("no permission to load BPF programs here: " + said)
            self.fail(f"relay_floor {mode} exited {proc.returncode}: {said}")
        return sink, port

    def source(self, port, *args):
        r = subprocess.run(["smtp-source", *args, "-f", "a@floor.test", "-t", "b@floor.test", f"127.0.0.1:{port}"],
                           capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertNotIn("lost connection", r.stderr)

    def half_close_quit(self, port):
        """Sends QUIT, shuts down its write side at once, and reads to EOF."""
        with socket.create_connection(("127.0.0.1", port), 5) as s:
            s.settimeout(5)
            got = b""
            while b"\r\n" not in got:
                chunk = s.recv(4096)
                self.assertTrue(chunk, "closed before the greeting")
                got += chunk
            s.sendall(b"QUIT\r\n")
            s.shutdown(socket.SHUT_WR)
            rest = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                rest += chunk
            return got, rest

    def check(self, mode):
        sink, port = self.start(mode)
        self.source(port, "-s", "10", "-m", "200", "-l", "512")
        self.source(port, "-d", "-s", "4", "-m", "40", "-l", "20000")
        wait_until(lambda: len(sink.messages()) >= 240, 10, "240 messages at smtp-sink")
        self.assertEqual(len(sink.messages()), 240)
        for _ in range(20):
            greeting, rest = self.half_close_quit(port)
            self.assertTrue(greeting.startswith(b"220"), greeting)
            self.assertTrue(rest.startswith(b"221"), rest)

    def test_plain(self):
        self.check("plain")

    def test_splice(self):
        self.check("splice")

    def test_sockmap(self):
        self.check("sockmap")


if __name__ == "__main__":
    unittest.main(verbosity=2)
