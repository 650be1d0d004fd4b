#!/usr/bin/env python3
"""The data path's system calls per session, counted with strace on real traffic.

Not a timing test: it counts calls, which do not depend on how fast or loaded the machine
is. It guards the design in docs/architecture.md ("Relay and memory"): session sockets
are added to the worker's epoll set once and never modified on the common path, and they
are created non-blocking (no ioctl) with the connect result taken from the epoll event (no
getsockopt). smtp-source sends one message per connection through smtplb to smtp-sink;
strace -f -c is attached to smtplb for those sessions only.

Every process started here is stopped by PID; every wait is bounded; only 127.0.0.1 is used.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
import harness  # noqa: E402
from harness import Smtplb, SmtpSink, parse_access, wait_until  # noqa: E402

SESSIONS = 400


def strace_counts(path):
    """{syscall: (calls, errors)} from an `strace -c` summary."""
    counts = {}
    with open(path) as f:
        for line in f:
            m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(\d+)?\s*(\w+)\s*$", line)
            if m and m.group(3) != "total":
                counts[m.group(3)] = (int(m.group(1)), int(m.group(2) or 0))
    return counts


@unittest.skipUnless(shutil.which("smtp-sink") and shutil.which("smtp-source") and shutil.which("strace"),
                     "needs postfix (smtp-sink, smtp-source) and strace")
class SyscallsPerSession(unittest.TestCase):
    def test_one_message_per_connection(self):
        work = tempfile.mkdtemp(prefix="smtplb-sys.")
        self.addCleanup(shutil.rmtree, work, ignore_errors=True)
        sink = SmtpSink(backlog=256)
        self.addCleanup(sink.stop)
        # Checks every 10 minutes: the one at startup is over before strace attaches, so
        # every call counted belongs to a client session.
        lb = Smtplb(f"""
[global]
hostname = "lb.sys.test"
workers = 1

[log]
access_log = true

[listener.sys]
address = "127.0.0.1"
port = 0
pool = "sinks"

[pool.sinks.health_check]
interval = "10m"

[[pool.sinks.server]]
name = "s1"
address = "127.0.0.1"
port = {sink.port}
""", up=["sinks/s1"])
        self.enterContext(lb)
        port = lb.port("sys")

        summary = os.path.join(work, "strace.txt")
        tracer = subprocess.Popen(["strace", "-f", "-c", "-o", summary, "-p", str(lb.pid)],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        def stop_tracer():
            if tracer.poll() is None:
                tracer.send_signal(signal.SIGINT)
                try:
                    tracer.wait(10)
                except subprocess.TimeoutExpired:
                    tracer.kill()
                    tracer.wait(5)
        self.addCleanup(stop_tracer)
        # strace attaches to every thread of the process; give it a moment, then check it
        # is still there (ptrace may be refused).
        time.sleep(1.0)
        if tracer.poll() is not None:
            self.fail("strace could not attach: %s" % tracer.stderr.read().decode(errors="replace"))

        r = subprocess.run(["smtp-source", "-s", "10", "-m", str(SESSIONS), "-l", "512",
                            "-f", "a@sys.test", "-t", "b@sys.test", f"127.0.0.1:{port}"],
                           capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)
        wait_until(lambda: len([a for a in map(parse_access, lb.log().splitlines()) if a]) >= SESSIONS, 10,
                   "access lines")
        stop_tracer()
        counts = strace_counts(summary)
        sys.stderr.write("syscalls over %d sessions: %s\n" % (SESSIONS, sorted(counts.items())))

        def per_session(name):
            return counts.get(name, (0, 0))[0] / SESSIONS

        # Two sockets per session, each added once; nothing else touches the set on this
        # path (libuv's stream sockets took 6: ADD, the ADD/MOD retry, and DEL per socket).
        self.assertEqual(counts.get("accept4", (0, 0))[0] - counts.get("accept4", (0, 0))[1], SESSIONS)
        self.assertLessEqual(per_session("epoll_ctl"), 2.1, counts.get("epoll_ctl"))
        # Sockets are created and accepted non-blocking: no ioctl(FIONBIO) / fcntl.
        self.assertEqual(per_session("ioctl"), 0, counts.get("ioctl"))
        self.assertEqual(per_session("fcntl"), 0, counts.get("fcntl"))
        # The connect result comes from the epoll event; SO_ERROR is read only on failure.
        self.assertEqual(per_session("getsockopt"), 0, counts.get("getsockopt"))
        # TCP_NODELAY comes from the listener for accepted sockets: one for the server
        # socket, and TCP_QUICKACK once per established connection.
        self.assertLessEqual(per_session("setsockopt"), 3.0, counts.get("setsockopt"))
        # Each command and reply is one send: smtp-source's session is 7 turns, the last
        # (221) without a command after it. The access log adds one write per session.
        self.assertLessEqual(per_session("sendto") + per_session("writev"), 13.1, counts)
        self.assertLessEqual(per_session("write"), 1.1, counts.get("write"))
        # The total is reported, not asserted: epoll_wait and accept4 calls per session
        # depend on how many events each wake-up finds, that is on load and timing.
        total = sum(c for c, _ in counts.values()) / SESSIONS
        sys.stderr.write("%.1f system calls per session in all\n" % total)


if __name__ == "__main__":
    harness.main()
