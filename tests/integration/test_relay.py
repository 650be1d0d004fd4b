#!/usr/bin/env python3
"""Relay correctness: bytes pass unchanged both ways, large messages arrive intact, and a
slow reader is handled with backpressure (bounded memory)."""

import base64
import hashlib
import os
import random
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (Behaviour, TestCase, client_label, main, make_config, recv_exact,  # noqa: E402
                     recv_until_eof, wait_until)


def binary_blob(seed: int, size: int) -> bytes:
    """All 256 byte values, CRLF, bare LF, bare CR, NULs, a lone dot line, then random bytes."""
    rnd = random.Random(seed)
    head = (bytes(range(256)) + b"\r\n" + b"line\nbare lf\n" + b"bare cr\r" + b"\x00" * 16 +
            b"\r\n.\r\n" + b".\r\n" + bytes(range(255, -1, -1)) + b"\r\n\r\n")
    return head + rnd.randbytes(size - len(head))


class RelayTest(TestCase):

    def test_binary_both_ways_byte_exact(self):
        """Arbitrary bytes (all 256 values, CRLF, bare LF) go client->server and
        server->client unchanged; the half-close passes through in both directions."""
        to_client = binary_blob(1, 300_000)
        to_server = binary_blob(2, 200_000)
        greeting = b"220 raw.test ESMTP \x01\x7f\xfe odd bytes kept\r\n"
        srv = self.fake("raw", Behaviour(greeting=greeting, mode="raw", raw_send=to_client))
        lb = self.smtplb(make_config([srv]), up=["p/raw"])

        s = self.sock(lb.port())
        self.assertEqual(recv_exact(s, len(greeting)), greeting)
        sender = threading.Thread(target=lambda: (s.sendall(to_server), s.shutdown(socket.SHUT_WR)))
        sender.start()
        got = recv_until_eof(s, timeout=30)
        sender.join(timeout=30)
        self.assertEqual(len(got), len(to_client))
        self.assertTrue(got == to_client, "server->client bytes differ")

        conn = srv.sessions()[0]
        self.assertTrue(conn.done.wait(10))
        self.assertIsNone(conn.error)
        self.assertEqual(len(conn.received), len(to_server))
        self.assertTrue(bytes(conn.received) == to_server, "client->server bytes differ")
        self.assertEqual(conn.early, b"")

        a = lb.wait_access(client=s)[0]
        self.assertEqual(a["term"], "--")
        self.assertEqual(a["server"], "raw")
        self.assertEqual(a["tries"], 1)
        self.assertEqual(a["bytes_in"], len(to_server))
        self.assertEqual(a["bytes_out"], len(greeting) + len(to_client))

    def urgent_case(self, then_fin: bool):
        """TCP urgent data makes read() stop short of the mark with bytes still queued:
        a short read is then no proof the socket is drained (edge-triggered events).
        Everything but the out-of-band byte reaches the server, FIN or not."""
        greeting = b"220 urg.test ESMTP\r\n"
        srv = self.fake("urg", Behaviour(greeting=greeting, mode="raw"))
        lb = self.smtplb(make_config([srv]), up=["p/urg"])
        s = self.sock(lb.port())
        self.assertEqual(recv_exact(s, len(greeting)), greeting)
        s.sendall(b"AAAA")
        s.send(b"X", socket.MSG_OOB)
        s.sendall(b"BBBB\r\n")
        if then_fin:
            s.shutdown(socket.SHUT_WR)
        wait_until(lambda: srv.sessions() and bytes(srv.sessions()[0].received) == b"AAAABBBB\r\n", 5,
                   "all ordinary bytes at the server (got %r)" %
                   (bytes(srv.sessions()[0].received) if srv.sessions() else b""))
        if then_fin:
            conn = srv.sessions()[0]
            self.assertTrue(conn.done.wait(10))
            self.assertEqual(bytes(conn.received), b"AAAABBBB\r\n")
            self.assertEqual(recv_until_eof(s), b"")
            self.assertEqual(lb.wait_access(client=s)[0]["term"], "--")

    def test_urgent_data_without_fin(self):
        self.urgent_case(then_fin=False)

    def test_urgent_data_then_fin(self):
        self.urgent_case(then_fin=True)

    def test_echo_many_small_writes(self):
        """Many small writes in both directions interleave correctly (echo server)."""
        srv = self.fake("echo", Behaviour(mode="echo"))
        lb = self.smtplb(make_config([srv]), up=["p/echo"])
        s = self.sock(lb.port())
        g = srv.default_greeting()
        self.assertEqual(recv_exact(s, len(g)), g)
        rnd = random.Random(7)
        for i in range(200):
            piece = rnd.randbytes(rnd.randint(1, 3000))
            s.sendall(piece)
            self.assertEqual(recv_exact(s, len(piece)), piece, "echo %d" % i)
        s.shutdown(socket.SHUT_WR)
        self.assertEqual(recv_until_eof(s), b"")
        lb.wait_access(client=s, term="--")

    def test_20mb_message_through_data(self):
        """A 20 MB message (dot-stuffed lines, 8-bit bytes) arrives intact at the server."""
        srv = self.fake("sink")
        lb = self.smtplb(make_config([srv]), up=["p/sink"])
        rnd = random.Random(3)
        lines = base64.encodebytes(rnd.randbytes(15 * 1024 * 1024)).split(b"\n")
        out = []
        for i, ln in enumerate(lines):
            if i % 97 == 0:
                ln = b"." + ln            # needs dot-stuffing
            elif i % 101 == 0:
                ln = b"\xe4\xf6\xfc 8bit " + ln
            out.append(ln)
        body = b"Subject: big\r\n\r\n" + b"\r\n".join(out) + b"\r\n"
        self.assertGreater(len(body), 20_000_000)
        c = self.client(lb.port())
        c.greeting()
        t0 = time.monotonic()
        r = c.send_message(body)
        self.assertTrue(r.startswith(b"250 "), r)
        self.assertTrue(c.quit().startswith(b"221"))
        msg = srv.wait_messages(1)[0]
        self.assertEqual(msg["size"], len(body))
        self.assertEqual(msg["sha256"], hashlib.sha256(body).hexdigest())
        a = lb.wait_access(server="sink", term="--")[0]
        self.assertGreater(a["bytes_in"], len(body))
        sys.stderr.write("20 MB message relayed in %.2fs\n" % (time.monotonic() - t0))

    def test_slow_reader_bounded_memory(self):
        """The server sends 50 MB to a client that reads slowly. smtplb must apply
        backpressure: its RSS stays within 16 MiB of the baseline, and every byte arrives."""
        size = 50 * 1024 * 1024
        srv = self.fake("blast", Behaviour(mode="blast", blast_size=size))
        lb = self.smtplb(make_config([srv]), up=["p/blast"])
        g = srv.default_greeting()

        # Warm-up session so that one-time allocations are in the baseline.
        srv.behaviour = Behaviour(mode="blast", blast_size=2 * 1024 * 1024)
        w = self.sock(lb.port())
        recv_exact(w, len(g))
        w.sendall(b"GO\r\n")
        self.assertEqual(len(recv_until_eof(w, timeout=30)), 2 * 1024 * 1024)
        w.close()
        lb.wait_access(term="--")
        srv.behaviour = Behaviour(mode="blast", blast_size=size)
        baseline = lb.rss_kib()

        samples = []
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                try:
                    samples.append(lb.rss_kib())
                except (OSError, AssertionError):
                    return
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            s = self.sock(lb.port())
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            self.assertEqual(recv_exact(s, len(g)), g)
            s.sendall(b"GO\r\n")
            time.sleep(1.5)  # not reading at all: smtplb must stop reading the server
            h = hashlib.sha256()
            total = 0
            since_pause = 0
            deadline = time.monotonic() + 45
            s.settimeout(15)
            while True:
                d = s.recv(65536)
                if not d:
                    break
                h.update(d)
                total += len(d)
                since_pause += len(d)
                if since_pause >= 1024 * 1024:  # ~1 MiB per 0.1 s pause: ~10 MB/s
                    since_pause = 0
                    time.sleep(0.1)
                self.assertLess(time.monotonic(), deadline, "slow read took too long")
            label = client_label(s)
            s.shutdown(socket.SHUT_WR)
        finally:
            stop.set()
            sampler.join(timeout=5)
        conn = srv.sessions()[-1]
        self.assertTrue(conn.done.wait(10))
        self.assertIsNone(conn.error)
        self.assertEqual(total, size)
        self.assertEqual(h.hexdigest(), conn.sent_sha256)
        peak = max(samples)
        sys.stderr.write("RSS baseline %d KiB, peak %d KiB (+%d KiB), %d samples\n"
                         % (baseline, peak, peak - baseline, len(samples)))
        self.assertLess(peak - baseline, 16 * 1024, "smtplb buffered the slow reader's data")
        a = lb.wait_access(client=label)[0]
        self.assertEqual(a["bytes_out"], len(g) + size)
        self.assertEqual(a["term"], "--")

    def test_slow_server_reader_bounded_memory(self):
        """The other direction: a client uploads 40 MB to a server that reads slowly.
        smtplb stops reading the client instead of buffering: RSS stays within 16 MiB."""
        size = 40 * 1024 * 1024
        srv = self.fake("slow", Behaviour(mode="hash", read_pause=0.1))
        lb = self.smtplb(make_config([srv]), up=["p/slow"])
        baseline = lb.rss_kib()
        samples = []
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                try:
                    samples.append(lb.rss_kib())
                except (OSError, AssertionError):
                    return
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        h = hashlib.sha256()
        try:
            s = self.sock(lb.port())
            g = srv.default_greeting()
            self.assertEqual(recv_exact(s, len(g)), g)
            s.settimeout(30)
            base = random.Random(9).randbytes(1 << 20)
            for i in range(size >> 20):
                block = b"%08d" % i + base[8:]
                h.update(block)
                s.sendall(block)
            s.shutdown(socket.SHUT_WR)
            self.assertEqual(recv_until_eof(s, timeout=30), b"")
            label = client_label(s)
        finally:
            stop.set()
            sampler.join(timeout=5)
        conn = srv.sessions()[0]
        self.assertTrue(conn.done.wait(10))
        self.assertEqual((conn.received_size, conn.received_sha256), (size, h.hexdigest()))
        peak = max(samples)
        sys.stderr.write("RSS baseline %d KiB, peak %d KiB (+%d KiB)\n" % (baseline, peak, peak - baseline))
        self.assertLess(peak - baseline, 16 * 1024, "smtplb buffered the upload")
        a = lb.wait_access(client=label)[0]
        self.assertEqual((a["bytes_in"], a["term"]), (size, "--"))


if __name__ == "__main__":
    main()
