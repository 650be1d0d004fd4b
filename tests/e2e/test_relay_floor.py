#!/usr/bin/env python3
"""relay_floor, the benchmark's yardstick (tests/bench/relay_floor.cpp), relays correctly.

scripts/bench.py --floor compares smtplb with it, so it must be a real relay, not a
shortcut: every message smtp-source sends arrives at smtp-sink, one per connection and
many per connection; a client that half-closes after QUIT still gets the 221 before the
FIN, also when it sends QUIT and its FIN before the greeting; and 8 MB sent to a backend
that reads nothing for half a second all arrive, in order. Each mode is checked: plain, splice, and sockmap (skipped where this process may
not load BPF programs, that is without root).

Every process started here is stopped by PID; every wait is bounded; only 127.0.0.1 is used.
"""
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
import harness  # noqa: E402
from harness import SmtpSink, free_port, port_open, wait_until  # noqa: E402

BIN = os.environ.get("RELAY_FLOOR_BIN", "build/tests/bench/relay_floor")


@unittest.skipUnless(shutil.which("smtp-sink") and shutil.which("smtp-source"), "needs postfix (smtp-sink, smtp-source)")
class RelayFloor(unittest.TestCase):
    def start(self, mode, backend_port=None):
        work = tempfile.mkdtemp(prefix="relay-floor.")
        os.chmod(work, 0o755)  # smtp-sink runs as 'nobody' and writes below it
        self.addCleanup(shutil.rmtree, work, ignore_errors=True)
        sink = None
        if backend_port is None:
            sink = SmtpSink(dump_dir=os.path.join(work, "mail"))
            self.addCleanup(sink.stop)
            backend_port = sink.port
        port = free_port()
        err = open(os.path.join(work, "relay.err"), "w+")
        self.addCleanup(err.close)
        proc = subprocess.Popen([BIN, str(port), f"127.0.0.1:{backend_port}", mode], stdin=subprocess.DEVNULL,
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

    @staticmethod
    def read_to_eof(s):
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk

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
            return got, self.read_to_eof(s)

    def slow_backend(self):
        """A backend that greets, reads nothing for 0.5 s, then reads to EOF and answers with
        the byte count and SHA-256 of what it got. Returns (port, thread)."""
        ls = socket.socket()
        ls.bind(("127.0.0.1", 0))
        ls.listen(4)
        ls.settimeout(0.2)
        self.addCleanup(ls.close)

        def serve(conn):
            with conn:
                conn.settimeout(20)
                conn.sendall(b"220 slow\r\n")
                time.sleep(0.5)
                data = self.read_to_eof(conn)
                conn.sendall(b"%d %s\r\n" % (len(data), hashlib.sha256(data).hexdigest().encode()))

        stop = threading.Event()

        def accept_loop():  # the start-up probe takes a connection too
            while not stop.is_set():
                try:
                    conn, _ = ls.accept()
                except socket.timeout:
                    continue
                except OSError:
                    return
                conn.setblocking(True)
                threading.Thread(target=serve, args=(conn,), daemon=True).start()
        t = threading.Thread(target=accept_loop, daemon=True)
        t.start()
        self.addCleanup(t.join, 5)
        self.addCleanup(stop.set)
        return ls.getsockname()[1]

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
        for _ in range(5):  # QUIT and FIN before the greeting, maybe before the backend is up
            with socket.create_connection(("127.0.0.1", port), 5) as s:
                s.settimeout(5)
                s.sendall(b"QUIT\r\n")
                s.shutdown(socket.SHUT_WR)
                got = self.read_to_eof(s)
            self.assertRegex(got, rb"^220 [^\r]*\r\n221 ", got)

        # A backend that does not read for a while: the relay must hold what it cannot send.
        _, slow_port = self.start(mode, self.slow_backend())
        payload = os.urandom(8 << 20)
        with socket.create_connection(("127.0.0.1", slow_port), 5) as s:
            s.settimeout(20)
            self.assertEqual(s.recv(100), b"220 slow\r\n")
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            answer = self.read_to_eof(s)
        self.assertEqual(answer, b"%d %s\r\n" % (len(payload), hashlib.sha256(payload).hexdigest().encode()))

    def test_plain(self):
        self.check("plain")

    def test_splice(self):
        self.check("splice")

    def test_sockmap(self):
        self.check("sockmap")


if __name__ == "__main__":
    harness.run_tests()
