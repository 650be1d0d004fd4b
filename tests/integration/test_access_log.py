#!/usr/bin/env python3
"""Access log: every session gets exactly one line, with workers = 1 and 2, in text and
JSON, and a process stopped right after its last session has written them all (the
workers hand their lines to a log writer thread, which drains at exit)."""

import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (SmtpClient, TestCase, client_label, main, make_config,  # noqa: E402
                     parse_access, recv_until_eof)

SESSIONS = 200
THREADS = 8


class AccessLogTest(TestCase):

    def run_sessions(self, port: int) -> list:
        """SESSIONS short sessions (greeting, QUIT, close), THREADS at a time; returns the
        client labels. smtplb ends a session when the client closes after the server's
        EOF, so the last ones may still be ending when this returns."""
        labels, errors = [], []
        lock = threading.Lock()

        def worker(count):
            try:
                for _ in range(count):
                    c = SmtpClient(port)
                    try:
                        c.greeting()
                        label = client_label(c.sock)
                        c.expect("QUIT", 221)
                        recv_until_eof(c.sock)
                    finally:
                        c.sock.close()
                    with lock:
                        labels.append(label)
            except Exception as e:  # reported by the main thread
                with lock:
                    errors.append(repr(e))

        threads = [threading.Thread(target=worker, args=(SESSIONS // THREADS,)) for _ in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        self.assertEqual(errors, [])
        self.assertEqual(len(labels), SESSIONS)
        return labels

    def check_stop_writes_all(self, workers: int, fmt: str):
        s1, s2 = self.fake("s1"), self.fake("s2")
        cfg = make_config([s1, s2], global_={"workers": workers}, log={"format": fmt})
        lb = self.smtplb(cfg, up=["p/s1", "p/s2"])
        labels = self.run_sessions(lb.port())
        # At once, with the last lines possibly still in the workers' batches.
        self.assertEqual(lb.terminate(), 0)
        lines = lb.log().splitlines()
        if fmt == "json":
            objs = [json.loads(ln) for ln in lines]
            access = [o for o in objs if "term" in o]
            clients = [a["client"] for a in access]
            stopped = [i for i, o in enumerate(objs) if o.get("msg") == "smtplb stopped"]
        else:
            access = [a for a in (parse_access(ln) for ln in lines) if a]
            clients = [a["client"] for a in access]
            stopped = [i for i, ln in enumerate(lines) if ln.endswith("info: smtplb stopped")]
        self.assertEqual(sorted(clients), sorted(labels), "exactly one access line per session")
        self.assertTrue(all(a["term"] == "--" for a in access))
        # "smtplb stopped" is the last line, after every access line.
        self.assertEqual(stopped, [len(lines) - 1])

    def test_one_worker(self):
        self.check_stop_writes_all(1, "text")

    def test_two_workers(self):
        self.check_stop_writes_all(2, "text")

    def test_two_workers_json(self):
        self.check_stop_writes_all(2, "json")

    def test_lines_appear_promptly(self):
        """A line is written within a moment of its session's end, not at the next batch."""
        s1 = self.fake("s1")
        lb = self.smtplb(make_config([s1], global_={"workers": 2}), up=["p/s1"])
        for _ in range(3):
            c = self.client(lb.port())
            c.greeting()
            label = client_label(c.sock)
            c.expect("QUIT", 221)
            recv_until_eof(c.sock)
            c.sock.close()  # the session ends here
            start = time.monotonic()
            lb.wait_access(client=label, timeout=2)
            self.assertLess(time.monotonic() - start, 1.0)


if __name__ == "__main__":
    main()
