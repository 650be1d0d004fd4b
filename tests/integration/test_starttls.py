#!/usr/bin/env python3
"""STARTTLS health checks: EHLO, STARTTLS, 220, TLS handshake, EHLO again
inside TLS, QUIT, 221; optional certificate verification; distinct DOWN reasons; the
expiry warning; and a STARTTLS client session (swaks) relayed through smtplb untouched.
Implicit TLS checks (tls = "implicit", port 465): the handshake first (after a PROXY
header), then greeting, EHLO and QUIT inside TLS, with the same verification and distinct
reasons; and a port-465 client (swaks --tls-on-connect) through smtplb with
handoff = "connect".

Certificates are made at test time with the openssl CLI (a CA, leaf certificates for the
right name, a wrong name, an IP address, an expired one via `openssl ca -startdate/-enddate`,
one that expires in 5 days, a self-signed one). The STARTTLS-capable fake server is in this
file (the harness's FakeSmtpServer speaks plaintext only); it uses Python's ssl module.
"""

import dataclasses
import os
import re
import select
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import CHECK_EHLO, STEP_TIMEOUT, TestCase, admin_request, main, make_config, wait_until  # noqa: E402

RIGHT_NAME = "mail.test"


# --------------------------------------------------------------------------------------
# Certificates (openssl CLI)
# --------------------------------------------------------------------------------------


class Pki:
    """A throw-away CA in a temporary directory and the certificates the tests need."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="smtplb-it-tls-")
        self.ca_key = self._path("ca.key")
        self.ca = self._path("ca.pem")
        self.key = self._path("server.key")
        self._openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                      "-keyout", self.ca_key, "-out", self.ca, "-days", "30", "-subj", "/CN=smtplb test CA",
                      "-addext", "basicConstraints=critical,CA:TRUE",
                      "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        self._openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-out", self.key)
        self._serial = 1
        self.good = self.leaf("good", RIGHT_NAME, "DNS:" + RIGHT_NAME)
        self.wrong = self.leaf("wrong", "wrong.test", "DNS:wrong.test")
        self.ip = self.leaf("ip", "backend", "IP:127.0.0.1")
        self.soon = self.leaf("soon", RIGHT_NAME, "DNS:" + RIGHT_NAME, days=5)
        self.expired = self.leaf("expired", RIGHT_NAME, "DNS:" + RIGHT_NAME,
                                 dates=("20200101000000Z", "20200201000000Z"))
        self.self_signed = self._path("self.pem")
        self._openssl("req", "-x509", "-key", self.key, "-out", self.self_signed, "-days", "30",
                      "-subj", "/CN=" + RIGHT_NAME, "-addext", "subjectAltName=DNS:" + RIGHT_NAME)

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def _openssl(self, *args: str):
        r = subprocess.run(["openssl", *args], cwd=self.dir, stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=30)
        if r.returncode != 0:
            raise AssertionError("openssl %s failed: %s" % (args[0], r.stderr))

    def leaf(self, label: str, cn: str, san: str, days: int = 30, dates: Optional[tuple] = None) -> str:
        """A certificate for `cn`/`san` signed by the CA; `dates` = (start, end) as
        YYYYMMDDHHMMSSZ makes any validity, e.g. one in the past (OpenSSL 3.0's
        `x509 -req` cannot set notBefore, `openssl ca` can)."""
        csr, out, ext = self._path(label + ".csr"), self._path(label + ".pem"), self._path(label + ".ext")
        with open(ext, "w") as f:
            f.write("basicConstraints=critical,CA:FALSE\nsubjectAltName=%s\n" % san)
        self._openssl("req", "-new", "-key", self.key, "-out", csr, "-subj", "/CN=" + cn)
        if dates is None:
            self._openssl("x509", "-req", "-in", csr, "-CA", self.ca, "-CAkey", self.ca_key, "-set_serial",
                          str(self._next_serial()), "-days", str(days), "-extfile", ext, "-out", out)
            return out
        db = self._path("ca-db")
        os.makedirs(db, exist_ok=True)
        open(os.path.join(db, "index.txt"), "a").close()
        with open(os.path.join(db, "serial"), "w") as f:
            f.write("%02X\n" % self._next_serial())
        cnf = self._path("ca.cnf")
        with open(cnf, "w") as f:
            f.write("[ca]\ndefault_ca = test_ca\n[test_ca]\ndatabase = %s/index.txt\nnew_certs_dir = %s\n"
                    "certificate = %s\nprivate_key = %s\nserial = %s/serial\ndefault_md = sha256\n"
                    "policy = anything\nunique_subject = no\n[anything]\ncommonName = supplied\n"
                    % (db, db, self.ca, self.ca_key, db))
        self._openssl("ca", "-batch", "-config", cnf, "-in", csr, "-out", out, "-notext", "-startdate", dates[0],
                      "-enddate", dates[1], "-extfile", ext)
        return out

    def _next_serial(self) -> int:
        self._serial += 1
        return self._serial

    def close(self):
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------------------
# A STARTTLS-capable fake SMTP server
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class TlsBehaviour:
    """cert: PEM certificate file (the key is Pki.key). offer_starttls: advertise it in EHLO.
    starttls_reply: the answer to STARTTLS; after a 220, `after_220` says what follows:
    "tls" (handshake), "garbage" (plaintext instead of a ServerHello), "close", "silent".
    ehlo_tls_reply: answer to EHLO inside TLS (None: a multi-line 250)."""
    cert: Optional[str] = None
    offer_starttls: bool = True
    starttls_reply: bytes = b"220 2.0.0 Ready to start TLS\r\n"
    after_220: str = "tls"
    ehlo_tls_reply: Optional[bytes] = None
    inject: bytes = b""  # plaintext sent in the same write as the reply to STARTTLS
    implicit: bool = False  # port 465: TLS from the first byte (then no STARTTLS offered)
    proxy: bool = False     # expect a PROXY v1 line before anything else (recorded)


class TlsConn:
    def __init__(self, index: int):
        self.index = index
        self.kind = "pending"           # "check" (first command EHLO <CHECK_EHLO>) or "session"
        self.commands: list = []        # (command line, inside TLS?)
        self.after_starttls = b""       # bytes that followed STARTTLS before our reply (pipelining)
        self.proxy_line: Optional[bytes] = None  # the PROXY header, when the behaviour expects one
        self.tls_version: Optional[str] = None
        self.tls_error: Optional[str] = None
        self.messages: list = []        # DATA bodies (raw, dot-stuffed, without the final dot)
        self.quit = False
        self.error: Optional[str] = None
        self.done = threading.Event()

    def __repr__(self):
        return "<TlsConn %d %s %r tls=%s tls_error=%s err=%s>" % (self.index, self.kind, self.commands,
                                                                 self.tls_version, self.tls_error, self.error)


class LineReader:
    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()

    def line(self) -> Optional[bytes]:
        while b"\n" not in self.buf:
            d = self.sock.recv(65536)
            if not d:
                return None
            self.buf += d
        line, _, rest = bytes(self.buf).partition(b"\n")
        self.buf = bytearray(rest)
        return line.rstrip(b"\r")


class StarttlsServer:
    """Listens on 127.0.0.1, port 0; one thread per connection; records TlsConn objects."""

    def __init__(self, name: str, behaviour: TlsBehaviour, key: str):
        self.name = name
        self.host = "127.0.0.1"
        self.behaviour = behaviour
        self.key = key
        self._lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._lsock.bind((self.host, 0))
        self._lsock.listen(64)
        self.port = self._lsock.getsockname()[1]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.conns: list = []
        self._socks: list = []
        self._threads: list = []
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True, name="tlsfake-%s" % name)
        self._acceptor.start()

    def snapshot(self) -> list:
        with self._lock:
            return list(self.conns)

    def checks(self) -> list:
        return [c for c in self.snapshot() if c.kind == "check"]

    def sessions(self) -> list:
        return [c for c in self.snapshot() if c.kind == "session"]

    def close(self):
        self._stop.set()
        self._lsock.close()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._acceptor.join(timeout=5)
        for t in list(self._threads):
            t.join(timeout=5)

    def _accept_loop(self):
        while not self._stop.is_set():
            try:
                r, _, _ = select.select([self._lsock], [], [], 0.1)
                if not r:
                    continue
                sock, _ = self._lsock.accept()
            except (OSError, ValueError):
                return
            with self._lock:
                conn = TlsConn(len(self.conns))
                self.conns.append(conn)
                self._socks.append(sock)
                t = threading.Thread(target=self._serve, args=(sock, conn, self.behaviour), daemon=True)
                self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    def _ehlo_reply(self, tls: bool) -> bytes:
        lines = [self.name, "PIPELINING", "SIZE 10240000"]
        if self.behaviour.offer_starttls and not tls and not self.behaviour.implicit:
            lines.append("STARTTLS")
        lines.append("8BITMIME")
        return "".join("250%s%s\r\n" % ("-" if i + 1 < len(lines) else " ", ln)
                       for i, ln in enumerate(lines)).encode()

    def _serve(self, sock: socket.socket, conn: TlsConn, b: TlsBehaviour):
        plain = sock
        try:
            sock.settimeout(30)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = False
            if b.proxy:
                header = b""
                while not header.endswith(b"\r\n") and len(header) < 108:
                    d = sock.recv(1)  # byte by byte: nothing after the header is consumed
                    if not d:
                        return
                    header += d
                conn.proxy_line = header
            if b.implicit:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                ctx.load_cert_chain(b.cert, self.key)
                try:
                    sock = ctx.wrap_socket(plain, server_side=True)
                except (ssl.SSLError, OSError) as e:
                    conn.tls_error = "%s: %s" % (type(e).__name__, e)
                    return
                with self._lock:
                    self._socks.append(sock)
                conn.tls_version = sock.version()
                tls = True
            sock.sendall(("220 %s ESMTP tlsfake\r\n" % self.name).encode())
            reader = LineReader(sock)
            while True:
                line = reader.line()
                if line is None:
                    return
                cmd = line.decode("latin-1")
                if conn.kind == "pending":
                    conn.kind = "check" if cmd.upper() == ("EHLO " + CHECK_EHLO).upper() else "session"
                conn.commands.append((cmd, tls))
                verb = cmd.split(" ", 1)[0].upper()
                if verb == "EHLO":
                    sock.sendall(b.ehlo_tls_reply if tls and b.ehlo_tls_reply is not None else self._ehlo_reply(tls))
                elif verb == "STARTTLS" and not tls:
                    if not b.offer_starttls:
                        sock.sendall(b"502 5.5.2 Error: command not recognized\r\n")
                        continue
                    conn.after_starttls = bytes(reader.buf)
                    sock.sendall(b.starttls_reply + b.inject)
                    if not b.starttls_reply.startswith(b"220"):
                        continue
                    if b.after_220 == "garbage":
                        # In answer to the ClientHello: plaintext sent along with the 220
                        # would be dropped by the check (see test_injected_plaintext).
                        sock.recv(65536)
                        sock.sendall(b"this is not a TLS record\r\n" * 4)
                        self._drain(sock)
                        return
                    if b.after_220 == "close":
                        return
                    if b.after_220 == "silent":
                        self._drain(sock)
                        return
                    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                    ctx.load_cert_chain(b.cert, self.key)
                    try:
                        sock = ctx.wrap_socket(plain, server_side=True)
                    except (ssl.SSLError, OSError) as e:
                        conn.tls_error = "%s: %s" % (type(e).__name__, e)
                        return
                    with self._lock:
                        self._socks.append(sock)
                    conn.tls_version = sock.version()
                    reader = LineReader(sock)
                    tls = True
                elif verb in ("MAIL", "RCPT", "RSET", "NOOP"):
                    sock.sendall(b"250 2.0.0 Ok\r\n")
                elif verb == "DATA":
                    sock.sendall(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    body = bytearray()
                    while True:
                        data_line = reader.line()
                        if data_line is None:
                            return
                        if data_line == b".":
                            break
                        body += data_line + b"\r\n"
                    conn.messages.append(bytes(body))
                    sock.sendall(b"250 2.0.0 Ok: queued as TLS%d\r\n" % len(conn.messages))
                elif verb == "QUIT":
                    conn.quit = True
                    sock.sendall(b"221 2.0.0 Bye\r\n")
                    return
                else:
                    sock.sendall(b"502 5.5.2 Error: command not recognized\r\n")
        except Exception as e:  # recorded for the test; never kills the server
            conn.error = "%s: %s" % (type(e).__name__, e)
        finally:
            for s in {id(sock): sock, id(plain): plain}.values():
                try:
                    s.close()
                except OSError:
                    pass
            with self._lock:
                self._socks = [s for s in self._socks if s is not sock and s is not plain]
            conn.done.set()

    @staticmethod
    def _drain(sock):
        while sock.recv(65536):
            pass


# --------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------


def config(fakes, **kw) -> str:
    """make_config() for StarttlsServer objects."""
    return make_config([(f.name, f.host, f.port) for f in fakes], **kw)


def down_reason(lb, label: str) -> str:
    line = lb.wait_log(r"server %s is DOWN: check failed" % re.escape(label))[0]
    return re.search(r"check failed \((.*)\), \d+ of \d+ servers up", line).group(1)


class StarttlsTest(TestCase):

    @classmethod
    def setUpClass(cls):
        cls.pki = Pki()

    @classmethod
    def tearDownClass(cls):
        cls.pki.close()

    def tls_fake(self, name: str, **kw) -> StarttlsServer:
        kw.setdefault("cert", self.pki.good)
        s = StarttlsServer(name, TlsBehaviour(**kw), self.pki.key)
        self.addCleanup(s.close)
        return s

    def test_check_passes_and_says_ehlo_again_inside_tls(self):
        """Without verification any certificate does; the check sends EHLO again after the
        handshake, then QUIT, all inside TLS, and never pipelines."""
        srv = self.tls_fake("s1")
        lb = self.smtplb(config([srv], health={"starttls": True}, log={"level": "debug"}),
                         up=["p/s1"])
        check = wait_until(lambda: srv.checks(), STEP_TIMEOUT, "a check")[0]
        self.assertTrue(check.done.wait(STEP_TIMEOUT))
        ehlo = "EHLO " + CHECK_EHLO
        self.assertEqual(check.commands, [(ehlo, False), ("STARTTLS", False), (ehlo, True), ("QUIT", True)])
        self.assertEqual(check.after_starttls, b"", "check pipelined after STARTTLS")
        self.assertTrue(check.quit)
        self.assertIsNone(check.tls_error)
        self.assertIsNone(check.error)
        self.assertEqual(check.tls_version, "TLSv1.3")
        tls_line = lb.wait_log(r"server p/s1 TLS: TLSv1\.3 \S+, certificate notAfter \d{4}-\d\d-\d\dT")[0]
        sys.stderr.write("\n  %s\n" % tls_line.split(": ", 1)[1])
        self.assertNotIn("certificate expires", lb.log())

    def test_injected_plaintext(self):
        """Plaintext that follows the 220 to STARTTLS (a man in the middle injecting an
        answer to the EHLO that comes next) is dropped, not taken as protected: the check
        answers to the real reply inside TLS."""
        srv = self.tls_fake("s1", inject=b"250 injected\r\n", ehlo_tls_reply=b"250 the real one\r\n")
        self.smtplb(config([srv], health={"starttls": True}), up=["p/s1"])
        check = srv.checks()[0]
        self.assertTrue(check.done.wait(STEP_TIMEOUT))
        self.assertEqual([c for c, _ in check.commands], ["EHLO " + CHECK_EHLO, "STARTTLS", "EHLO " + CHECK_EHLO,
                                                         "QUIT"])

    def test_check_duration(self):
        """Repeated STARTTLS checks (interval 200 ms) all pass; reports their duration."""
        srv = self.tls_fake("s1")
        lb = self.smtplb(config([srv], health={"starttls": True, "interval": "200ms"},
                                     log={"level": "debug"}), up=["p/s1"])
        lines = lb.wait_log(r"server p/s1 check passed \(\) in \d+ ms", count=10)
        ms = sorted(int(re.search(r"in (\d+) ms", ln).group(1)) for ln in lines)
        sys.stderr.write("\n  STARTTLS check duration over %d checks: min %d ms, median %d ms, max %d ms\n"
                         % (len(ms), ms[0], ms[len(ms) // 2], ms[-1]))
        self.assertNotIn("is DOWN", lb.log())
        for c in srv.checks()[:10]:
            self.assertTrue(c.done.wait(STEP_TIMEOUT))
            self.assertEqual(len(c.commands), 4, c)
            self.assertIsNone(c.error, c)

    def test_verify_passes_with_ca_and_name(self):
        """tls_verify with tls_ca_file and the right tls_server_name; and, with no server
        name, against the server's IP address (IP SAN)."""
        srv = self.tls_fake("named")
        self.smtplb(config([srv], health={"starttls": True, "tls_verify": True, "tls_ca_file": self.pki.ca,
                                               "tls_server_name": RIGHT_NAME}), up=["p/named"])
        ipok = self.tls_fake("ipok", cert=self.pki.ip)
        ipbad = self.tls_fake("ipbad", cert=self.pki.good)
        lb = self.smtplb(config([ipok, ipbad], health={"starttls": True, "tls_verify": True,
                                                            "tls_ca_file": self.pki.ca}),
                         up=["p/ipok"], down=["p/ipbad"])
        self.assertEqual(down_reason(lb, "p/ipbad"),
                         "tls verify: IP address mismatch (depth 0, subject CN=%s, expected 127.0.0.1)" % RIGHT_NAME)

    def test_failure_reasons(self):
        """Each STARTTLS failure marks the server DOWN with its own reason."""
        fakes = [
            self.tls_fake("good"),
            self.tls_fake("refused", starttls_reply=b"454 4.7.0 TLS not available due to local problem\r\n"),
            self.tls_fake("nostarttls", offer_starttls=False),
            self.tls_fake("garbage", after_220="garbage"),
            self.tls_fake("closes", after_220="close"),
            self.tls_fake("silent", after_220="silent"),
            self.tls_fake("ehlotls", ehlo_tls_reply=b"554 5.7.1 not with TLS\r\n"),
        ]
        down = ["p/" + f.name for f in fakes[1:]]
        lb = self.smtplb(config(fakes, health={"starttls": True, "timeout": "1s"}), up=["p/good"], down=down)
        expect = {
            "refused": "starttls 454 4.7.0 TLS not available due to local problem",
            "nostarttls": "starttls 502 5.5.2 Error: command not recognized",
            "silent": "timeout after 1s waiting for tls handshake",
            "ehlotls": "ehlo-tls 554 5.7.1 not with TLS",
        }
        for name, reason in expect.items():
            self.assertEqual(down_reason(lb, "p/" + name), reason)
        # EOF, or a reset when our ClientHello reached the already closed socket.
        self.assertRegex(down_reason(lb, "p/closes"),
                         r"^tls handshake: (unexpected eof while reading|connection reset by peer)$")
        garbage = down_reason(lb, "p/garbage")
        self.assertRegex(garbage, r"^tls handshake: [a-z]")
        sys.stderr.write("\n  garbage after 220: %s\n" % garbage)
        by_name = {f.name: f for f in fakes}
        # A refused STARTTLS ends the check: no handshake attempt, nothing more sent.
        refused = by_name["refused"].checks()[0]
        self.assertTrue(refused.done.wait(STEP_TIMEOUT))
        self.assertEqual([c for c, _ in refused.commands], ["EHLO " + CHECK_EHLO, "STARTTLS"])
        ehlotls = by_name["ehlotls"].checks()[0]
        self.assertTrue(ehlotls.done.wait(STEP_TIMEOUT))
        self.assertEqual(ehlotls.commands[-1], ("EHLO " + CHECK_EHLO, True))

    def test_verify_failures(self):
        """With verification an expired, a wrongly named and a self-signed certificate each
        fail with `tls verify:`; the check sends nothing inside TLS then."""
        fakes = [
            self.tls_fake("good"),
            self.tls_fake("expired", cert=self.pki.expired),
            self.tls_fake("wrongname", cert=self.pki.wrong),
            self.tls_fake("selfsigned", cert=self.pki.self_signed),
        ]
        lb = self.smtplb(config(fakes, health={"starttls": True, "tls_verify": True,
                                                    "tls_ca_file": self.pki.ca, "tls_server_name": RIGHT_NAME}),
                         up=["p/good"], down=["p/expired", "p/wrongname", "p/selfsigned"])
        expect = {
            "expired": "tls verify: certificate has expired (depth 0, subject CN=%s)" % RIGHT_NAME,
            "wrongname": "tls verify: hostname mismatch (depth 0, subject CN=wrong.test, expected %s)" % RIGHT_NAME,
            "selfsigned": "tls verify: self-signed certificate (depth 0, subject CN=%s)" % RIGHT_NAME,
        }
        for name, reason in expect.items():
            self.assertEqual(down_reason(lb, "p/" + name), reason)
        for f in fakes[1:]:
            c = f.checks()[0]
            self.assertTrue(c.done.wait(STEP_TIMEOUT))
            self.assertEqual([cmd for cmd, _ in c.commands], ["EHLO " + CHECK_EHLO, "STARTTLS"], f.name)
            self.assertIsNotNone(c.tls_error, "%s: the server should see the client's alert" % f.name)

    def test_expiry_warning_once(self):
        """A certificate expiring within 14 days is logged once (not at every check); an
        expired one, accepted without verification, too."""
        soon = self.tls_fake("soon", cert=self.pki.soon)
        old = self.tls_fake("old", cert=self.pki.expired)
        fine = self.tls_fake("fine")
        lb = self.smtplb(config([soon, old, fine], health={"starttls": True, "interval": "200ms"}),
                         up=["p/soon", "p/old", "p/fine"])
        wait_until(lambda: len(soon.checks()) >= 5 and len(old.checks()) >= 5, STEP_TIMEOUT, "5 checks each")
        lb.wait_log(r"server p/soon certificate expires in [45] days \(notAfter \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\)")
        lb.wait_log(r"server p/old certificate expired \d+ days ago \(notAfter 2020-02-01T00:00:00Z\)")
        log = lb.log()
        self.assertEqual(len(re.findall(r"p/soon certificate expires", log)), 1)
        self.assertEqual(len(re.findall(r"p/old certificate expired", log)), 1)
        self.assertNotIn("p/fine certificate", log)

    @unittest.skipUnless(shutil.which("swaks"), "swaks is not installed")
    def test_swaks_starttls_through_smtplb(self):
        """A client's own STARTTLS goes through smtplb untouched (it relays the TLS bytes)."""
        srv = self.tls_fake("s1")
        lb = self.smtplb(config([srv], health={"starttls": True}), up=["p/s1"])
        r = subprocess.run(["swaks", "--server", "127.0.0.1:%d" % lb.port(), "--tls", "--ehlo", "client.test",
                            "--from", "a@example.org", "--to", "a@b.c", "--timeout", "10"],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("TLS started", r.stdout)
        session = wait_until(lambda: srv.sessions(), STEP_TIMEOUT, "the swaks session")[0]
        self.assertTrue(session.done.wait(STEP_TIMEOUT))
        self.assertEqual(session.commands[:3], [("EHLO client.test", False), ("STARTTLS", False),
                                                ("EHLO client.test", True)])
        self.assertIn(("MAIL FROM:<a@example.org>", True), session.commands)
        self.assertEqual(len(session.messages), 1)
        self.assertTrue(session.quit)
        self.assertEqual(session.tls_version, "TLSv1.3")
        lb.wait_access(1, term="--", server="s1")


def unix_get(path: str, target: str) -> str:
    """GET on the admin socket; the body."""
    status, body = admin_request(path, "GET", target)
    assert status == 200, body[:200]
    return body


class ImplicitTlsTest(TestCase):

    @classmethod
    def setUpClass(cls):
        cls.pki = Pki()

    @classmethod
    def tearDownClass(cls):
        cls.pki.close()

    def tls_fake(self, name: str, **kw) -> StarttlsServer:
        kw.setdefault("cert", self.pki.good)
        kw.setdefault("implicit", True)
        s = StarttlsServer(name, TlsBehaviour(**kw), self.pki.key)
        self.addCleanup(s.close)
        return s

    def test_check_runs_inside_tls_from_the_first_byte(self):
        """The handshake first, then the greeting, EHLO and QUIT, all inside TLS; the
        certificate's notAfter is published like a STARTTLS check's."""
        srv = self.tls_fake("s1")
        admin_sock = os.path.join(self.pki.dir, "admin-a.sock")
        lb = self.smtplb(config([srv], health={"tls": "implicit"}, log={"level": "debug"},
                                extra='\n[admin]\nsocket = "%s"\nlisten = ""\n' % admin_sock), up=["p/s1"])
        check = wait_until(lambda: srv.checks(), STEP_TIMEOUT, "a check")[0]
        self.assertTrue(check.done.wait(STEP_TIMEOUT))
        ehlo = "EHLO " + CHECK_EHLO
        self.assertEqual(check.commands, [(ehlo, True), ("QUIT", True)])
        self.assertEqual(check.tls_version, "TLSv1.3")
        self.assertTrue(check.quit)
        self.assertIsNone(check.error)
        lb.wait_log(r"server p/s1 TLS: TLSv1\.3 \S+, certificate notAfter \d{4}-")
        m = re.search(r'(?m)^smtplb_server_tls_cert_not_after_seconds\{pool="p",server="s1"\} (\S+)$',
                      unix_get(admin_sock, "/metrics"))
        self.assertIsNotNone(m)
        self.assertGreater(float(m.group(1)), time.time())

    def test_failure_reasons_are_distinct(self):
        """With verification: a plaintext server (bad handshake), a wrong name and an expired
        certificate each mark the server DOWN with its own reason and metric label."""
        good = self.tls_fake("good")
        plain = self.tls_fake("plain", implicit=False)
        wrong = self.tls_fake("wrongname", cert=self.pki.wrong)
        expired = self.tls_fake("expired", cert=self.pki.expired)
        admin_sock = os.path.join(self.pki.dir, "admin-b.sock")
        lb = self.smtplb(config([good, plain, wrong, expired],
                                health={"tls": "implicit", "tls_verify": True, "tls_ca_file": self.pki.ca,
                                        "tls_server_name": RIGHT_NAME, "timeout": "2s"},
                                extra='\n[admin]\nsocket = "%s"\nlisten = ""\n' % admin_sock),
                         up=["p/good"], down=["p/plain", "p/wrongname", "p/expired"])
        reasons = {n: down_reason(lb, "p/" + n) for n in ("plain", "wrongname", "expired")}
        for n, r in reasons.items():
            sys.stderr.write("\n  implicit TLS, %s: %s" % (n, r))
        sys.stderr.write("\n")
        self.assertRegex(reasons["plain"], r"^tls handshake: [a-z]")
        self.assertEqual(reasons["wrongname"],
                         "tls verify: hostname mismatch (depth 0, subject CN=wrong.test, expected %s)" % RIGHT_NAME)
        self.assertEqual(reasons["expired"], "tls verify: certificate has expired (depth 0, subject CN=%s)" % RIGHT_NAME)
        metrics = unix_get(admin_sock, "/metrics")

        def failures(server, reason):
            m = re.search(r'(?m)^smtplb_server_check_failures_total\{pool="p",server="%s",reason="%s"\} (\d+)$'
                          % (server, reason), metrics)
            self.assertIsNotNone(m, (server, reason))
            return int(m.group(1))
        self.assertGreaterEqual(failures("plain", "tls"), 1)
        self.assertEqual(failures("plain", "tls_name") + failures("plain", "tls_expired"), 0)
        self.assertGreaterEqual(failures("wrongname", "tls_name"), 1)
        self.assertEqual(failures("wrongname", "tls") + failures("wrongname", "tls_expired"), 0)
        self.assertGreaterEqual(failures("expired", "tls_expired"), 1)
        self.assertEqual(failures("expired", "tls") + failures("expired", "tls_name"), 0)
        self.assertEqual(failures("good", "tls") + failures("good", "tls_name") + failures("good", "tls_expired"), 0)
        # Nothing but the ClientHello reached the plaintext server: no EHLO in clear.
        conns = plain.snapshot()
        self.assertTrue(conns)
        self.assertFalse([cmd for conn in conns for cmd, _ in conn.commands if cmd.startswith(("EHLO", "QUIT"))])
        self.assertTrue(all(conn.commands[0][0].startswith("\x16\x03") for conn in conns if conn.commands))

    def test_proxy_header_goes_first(self):
        """A pool that sends PROXY to its servers writes the header before the handshake."""
        srv = self.tls_fake("s1", proxy=True)
        self.smtplb(config([srv], health={"tls": "implicit"}, pool={"proxy_protocol": "v1"}), up=["p/s1"])
        conn = wait_until(lambda: srv.snapshot(), STEP_TIMEOUT, "a check")[0]
        self.assertTrue(conn.done.wait(STEP_TIMEOUT))
        self.assertRegex(conn.proxy_line, rb"^PROXY TCP4 127\.0\.0\.1 127\.0\.0\.1 \d+ %d\r\n$" % srv.port)
        self.assertEqual(conn.tls_version, "TLSv1.3")
        self.assertEqual(conn.commands, [("EHLO " + CHECK_EHLO, True), ("QUIT", True)])

    @unittest.skipUnless(shutil.which("swaks"), "swaks is not installed")
    def test_swaks_tls_on_connect_through_smtplb(self):
        """A port-465 client (swaks --tls-on-connect) delivers through smtplb with
        handoff = "connect": the client speaks first (the ClientHello), smtplb relays it."""
        srv = self.tls_fake("s1")
        lb = self.smtplb(config([srv], health={"tls": "implicit"}, pool={"handoff": "connect"}), up=["p/s1"])
        r = subprocess.run(["swaks", "--server", "127.0.0.1:%d" % lb.port(), "--tls-on-connect", "--ehlo",
                            "client.test", "--from", "a@example.org", "--to", "a@b.c", "--timeout", "10"],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("TLS started", r.stdout)
        session = wait_until(lambda: srv.sessions(), STEP_TIMEOUT, "the swaks session")[0]
        self.assertTrue(session.done.wait(STEP_TIMEOUT))
        self.assertEqual(session.commands[0], ("EHLO client.test", True))
        self.assertIn(("MAIL FROM:<a@example.org>", True), session.commands)
        self.assertEqual(len(session.messages), 1)
        self.assertTrue(session.quit)
        lb.wait_access(1, term="--", server="s1")


if __name__ == "__main__":
    main()
