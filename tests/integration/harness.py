"""Integration test harness for smtplb (Python 3 standard library only).

Three pieces:

* FakeSmtpServer: a scripted SMTP server on 127.0.0.1 (or ::1), port 0, one thread per
  connection. Its `behaviour` (a Behaviour) may be replaced at any time; each new
  connection uses the behaviour current when it was accepted. It tells smtplb's health
  checks from client sessions by the first command: a check says `EHLO <CHECK_EHLO>`
  (every generated config sets that ehlo_name), a client session anything else.
* Smtplb: a context manager that writes a config into a temporary directory, runs the
  binary ($SMTPLB_BIN, default build/smtplb in this repository) in the foreground with
  its log in a file, parses the bound listener ports from the log, waits for the expected
  UP/DOWN lines, and on exit stops it (SIGTERM, then SIGKILL by PID) and checks that it
  neither crashed nor exited with an error nor wrote a sanitizer report.
* Client helpers: connect(), recv_exact(), recv_until_eof(), SmtpClient.

Every wait is bounded. Everything started is stopped by PID / closed, also on failure.
Set SMTPLB_KEEP=1 to keep the temporary directories (config and log) for debugging.

Test files end with main() (or run_tests() when they need no smtplb binary): a file whose
every case was skipped exits SKIP_EXIT (77), which CTest shows as Skipped, and each
skipped case prints a "SKIP: <test>: <reason>" line that scripts/test.sh lists at the end.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import pathlib
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from typing import Callable, Iterable, Optional, Sequence, Tuple, Union

# Postfix's tools (smtp-sink, smtp-source, postfix) are in /usr/sbin, which is not on a
# normal user's PATH: looked up there too, so that the tests run for any user.
os.environ["PATH"] = ":".join(
    [p for p in os.environ.get("PATH", "").split(":") if p] +
    [d for d in ("/usr/sbin", "/sbin") if d not in os.environ.get("PATH", "").split(":")])

# A test file with nothing to run here: CTest's SKIP_RETURN_CODE (tests/*/CMakeLists.txt).
SKIP_EXIT = 77

SMTPLB_BIN = os.environ.get("SMTPLB_BIN",
                            str(pathlib.Path(__file__).resolve().parents[2] / "build" / "smtplb"))
HOSTNAME = "lb.test"
CHECK_EHLO = "hc.smtplb.test"
UNAVAILABLE = ("421 4.3.2 %s Service not available, try again later\r\n" % HOSTNAME).encode()

# How long a single step may take before a test gives up. Generous: the machine may be
# busy running other tests in parallel.
STEP_TIMEOUT = 10.0

Chunks = Union[bytes, Sequence[tuple]]  # bytes, or [(bytes, delay_after_seconds), ...]


def wait_until(pred: Callable[[], object], timeout: float, what: str = "condition", interval: float = 0.02):
    """Polls pred() until it returns something truthy (returned) or timeout passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)


# Sanitizer builds (scripts/sanitize.sh) run with exitcode=66 in ASAN_OPTIONS, UBSAN_OPTIONS
# and TSAN_OPTIONS: smtplb itself never exits 66. A report fails the test even where a
# test expects smtplb to fail (an exit status other than 0) or would ignore the status.
SANITIZER_EXIT = 66
SANITIZER_RE = re.compile(r"ERROR: (?:Address|Leak)Sanitizer|WARNING: ThreadSanitizer|ThreadSanitizer: |"
                          r"\bruntime error: |SUMMARY: (?:Address|Leak|Thread|UndefinedBehavior)Sanitizer")


def sanitizer_problem(output: str, returncode: Optional[int] = None) -> Optional[str]:
    """Says what is wrong when `output` (an smtplb process's stdout/stderr) holds a
    sanitizer report or it exited with the sanitizers' exit status; None otherwise."""
    lines = [ln for ln in (output or "").splitlines() if SANITIZER_RE.search(ln)]
    if lines:
        return "sanitizer report: " + " | ".join(lines[:3])
    if returncode == SANITIZER_EXIT:
        return "exit status %d (the sanitizers' exitcode) without a report in the output" % SANITIZER_EXIT
    return None


def check_sanitizer(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Raises AssertionError when a finished smtplb run (subprocess.run with text output)
    reported a sanitizer error; returns r otherwise."""
    problem = sanitizer_problem((r.stdout or "") + (r.stderr or ""), r.returncode)
    if problem:
        raise AssertionError("smtplb %s: %s\n--- output ---\n%s%s" % (" ".join(map(str, r.args[1:])), problem,
                                                                      r.stdout or "", r.stderr or ""))
    return r


def free_port() -> int:
    """A port free right now on 127.0.0.1 (for peers that need their port up front)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.5).close()
        return True
    except OSError:
        return False


class SmtpSink:
    """A real Postfix smtp-sink on a free 127.0.0.1 port (as nobody when run as root).

    dump_dir: every message is dumped there (messages() lists them).
    stderr_path: its stderr is appended there (status() quotes it)."""

    def __init__(self, dump_dir: Optional[str] = None, stderr_path: Optional[str] = None, backlog: int = 1000):
        self.dump_dir = dump_dir
        self.stderr_path = stderr_path
        self.proc = None
        if dump_dir:
            os.makedirs(dump_dir, exist_ok=True)
            os.chmod(dump_dir, 0o777)  # smtp-sink drops to 'nobody' when run as root
        for _ in range(5):  # smtp-sink needs its port up front: retry if another took it
            self.port = free_port()
            args = ["smtp-sink"] + (["-u", "nobody"] if os.geteuid() == 0 else [])
            if dump_dir:
                args += ["-d", os.path.join(dump_dir, "msg.")]
            args += ["127.0.0.1:%d" % self.port, str(backlog)]
            err = open(stderr_path, "ab") if stderr_path else subprocess.DEVNULL
            try:
                self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
            finally:
                if stderr_path:
                    err.close()
            try:
                wait_until(lambda: self.proc.poll() is not None or port_open(self.port), 5, "smtp-sink")
            except AssertionError:
                pass
            if self.proc.poll() is None and port_open(self.port):
                return
            self.stop()
        raise RuntimeError("smtp-sink did not start")

    def messages(self) -> list:
        return sorted(glob.glob(os.path.join(self.dump_dir, "msg.*"))) if self.dump_dir else []

    def status(self) -> str:
        """'running', or how it ended, with what it said on stderr."""
        code = self.proc.poll()
        said = ""
        if self.stderr_path:
            with open(self.stderr_path, "rb") as f:
                said = f.read().decode("utf-8", "replace").strip()[-500:]
        return ("running" if code is None else "exited with %s" % code) + (" (stderr: %s)" % said if said else "")

    def stop(self):
        stop_process(self.proc)


def stop_process(proc: Optional[subprocess.Popen], timeout: float = 5) -> None:
    """Stops a process this test started, by its PID: SIGTERM, then SIGKILL if it has not
    exited within `timeout` seconds; reaps it either way."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def ipv6_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def refused_port(host: str = "127.0.0.1") -> tuple:
    """A socket bound to a port but not listening: connecting to it is refused, and the port
    stays reserved while the socket lives (no racy free-port guessing). Returns (sock, port);
    close the socket when done."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.bind((host, 0))
    return s, s.getsockname()[1]


# --------------------------------------------------------------------------------------
# Fake SMTP server
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Behaviour:
    """What a FakeSmtpServer does with one connection.

    greeting: bytes or [(bytes, delay_after), ...]; None = "220 <name> ESMTP fake\\r\\n".
    greeting_delay: seconds of silence before the first greeting byte.
    never_greet: say nothing; read (and record) until the peer closes.
    close_immediately / reset_immediately: close (FIN) or reset (RST) right after accept.
    ehlo_reply: reply to EHLO, bytes or chunks; None = a multi-line 250.
    mode (after the greeting, for client sessions; checks always get the check dialogue):
      "smtp"  a sink: EHLO/HELO/MAIL/RCPT/RSET/NOOP -> 250, DATA -> 354 + stores the
              message (dot-unstuffed; size and sha256), QUIT -> 221 and close.
      "raw"   sends raw_send (from a second thread) and records every byte received
              until EOF, then closes.
      "echo"  echoes everything back until EOF.
      "blast" sends blast_size bytes (distinct 1 MiB blocks), then FIN; records input.
      "mute"  records input, never answers.
      "hash"  reads until EOF keeping only size and sha256 (received_size/received_sha256),
              pausing read_pause seconds after each MiB (a slow reader); then closes.
      "reset" resets the connection (RST) once the client has said something.
    replies: overrides for smtp mode, e.g. {"MAIL": b"451 4.3.0 try later\\r\\n"}.
    """

    greeting: Optional[Chunks] = None
    greeting_delay: float = 0.0
    never_greet: bool = False
    close_immediately: bool = False
    reset_immediately: bool = False
    ehlo_reply: Optional[Chunks] = None
    mode: str = "smtp"
    raw_send: bytes = b""
    blast_size: int = 0
    read_pause: float = 0.0
    replies: dict = dataclasses.field(default_factory=dict)


class Conn:
    """What happened on one accepted connection."""

    def __init__(self, index: int, behaviour: Behaviour):
        self.index = index
        self.behaviour = behaviour
        self.t_accept = time.time()
        self.kind = "pending"        # "check", "session" (peer sent something else), "silent"
        self.greeting = b""          # bytes sent as greeting
        self.early = b""             # bytes received before the greeting was complete
        self.ehlo_early = b""        # bytes received while a multi-chunk EHLO reply was incomplete
        self.commands: list = []     # command lines (smtp mode and checks), without CRLF
        self.ehlo_codes: list = []   # first three digits of each EHLO reply sent
        self.messages: list = []     # dicts: size, sha256, body (when < 1 MiB)
        self.received = bytearray()  # raw bytes after the greeting (raw/echo/blast/mute/silent)
        self.sent_size = 0           # raw/blast: bytes sent after the greeting
        self.sent_sha256 = ""
        self.received_size = 0       # hash mode
        self.received_sha256 = ""
        self.quit = False            # QUIT answered with 221
        self.t_quit: Optional[float] = None
        self.peer_closed = False     # EOF seen from the peer
        self.error: Optional[str] = None
        self.done = threading.Event()

    def __repr__(self):
        return "<Conn %d %s cmds=%r early=%r err=%s>" % (self.index, self.kind, self.commands[:4], self.early[:40],
                                                        self.error)


def _chunks(value: Chunks) -> list:
    if isinstance(value, (bytes, bytearray)):
        return [(bytes(value), 0.0)]
    return [(bytes(c), float(d)) for c, d in value]


class FakeSmtpServer:
    """Scripted SMTP server. Use as a context manager or call close()."""

    def __init__(self, name: str = "s1", behaviour: Optional[Behaviour] = None, host: str = "127.0.0.1",
                 port: int = 0):
        self.name = name
        self.host = host
        self.behaviour = behaviour or Behaviour()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._lsock = socket.socket(family, socket.SOCK_STREAM)
        self._lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._lsock.bind((host, port))
        self._lsock.listen(512)
        self.port = self._lsock.getsockname()[1]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._fillers: list = []
        self.conns: list = []
        self._socks: list = []
        self._threads: list = []
        self._acceptor = threading.Thread(target=self._accept_loop, name="fake-%s-accept" % name, daemon=True)
        self._acceptor.start()

    # -- public -------------------------------------------------------------------------

    def default_greeting(self) -> bytes:
        return ("220 %s ESMTP fake\r\n" % self.name).encode()

    def default_ehlo(self) -> bytes:
        return ("250-%s\r\n250-PIPELINING\r\n250-SIZE 104857600\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n"
                % self.name).encode()

    def snapshot(self) -> list:
        with self._lock:
            return list(self.conns)

    def checks(self) -> list:
        return [c for c in self.snapshot() if c.kind == "check"]

    def sessions(self) -> list:
        """Connections that are not health checks (client sessions, including ones the peer
        dropped without a word, e.g. after a 421 greeting)."""
        return [c for c in self.snapshot() if c.kind in ("session", "silent")]

    def non_checks(self) -> list:
        """Every connection not (yet) known to be a health check, including ones whose peer
        has not said anything yet (held client sessions). Exact when no check is in flight,
        e.g. with the default one-check-only interval."""
        return [c for c in self.snapshot() if c.kind != "check"]

    def messages(self) -> list:
        return [m for c in self.snapshot() for m in c.messages]

    def wait_sessions(self, n: int, timeout: float = STEP_TIMEOUT) -> list:
        return wait_until(lambda: len(self.sessions()) >= n and self.sessions(), timeout,
                          "%d sessions at fake server %s" % (n, self.name))

    def wait_messages(self, n: int, timeout: float = STEP_TIMEOUT) -> list:
        return wait_until(lambda: len(self.messages()) >= n and self.messages(), timeout,
                          "%d messages at fake server %s" % (n, self.name))

    def stop_accepting(self, timeout: float = STEP_TIMEOUT) -> None:
        """Stops accepting and fills the kernel's accept queue, so that further connection
        attempts hang in SYN_SENT (the kernel drops their SYNs) - a connect timeout on
        loopback. The port stays bound until close()."""
        self._paused.set()
        self._lsock.listen(0)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fam = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.settimeout(0.3)
            try:
                s.connect((self.host, self.port))
            except socket.timeout:
                s.close()
                return
            self._fillers.append(s)
        raise AssertionError("could not fill the accept queue of %s" % self.name)

    def close(self):
        self._stop.set()
        for s in self._fillers:
            s.close()
        try:
            self._lsock.close()
        except OSError:
            pass
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

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- internals ----------------------------------------------------------------------

    def _accept_loop(self):
        while not self._stop.is_set():
            try:
                if self._paused.is_set():
                    time.sleep(0.1)
                    continue
                r, _, _ = select.select([self._lsock], [], [], 0.1)
                if not r:
                    continue
                sock, _ = self._lsock.accept()
            except (OSError, ValueError):
                return
            with self._lock:
                conn = Conn(len(self.conns), self.behaviour)
                self.conns.append(conn)
                self._socks.append(sock)
                t = threading.Thread(target=self._serve, args=(sock, conn), daemon=True,
                                     name="fake-%s-%d" % (self.name, conn.index))
                self._threads = [x for x in self._threads if x.is_alive()]
                self._threads.append(t)
            t.start()

    @staticmethod
    def _collect(sock: socket.socket, seconds: float) -> bytes:
        """Waits `seconds`, returning whatever the peer sends meanwhile."""
        got = b""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return got
            r, _, _ = select.select([sock], [], [], left)
            if r:
                d = sock.recv(65536)
                if not d:  # the peer is gone; what follows will fail or see EOF
                    return got
                got += d

    def _send_chunks(self, sock, conn: Conn, chunks: list, *, greeting: bool) -> bytes:
        early = b""
        for i, (data, delay) in enumerate(chunks):
            sock.sendall(data)
            if greeting:
                conn.greeting += data
            if delay and i + 1 < len(chunks):
                early += self._collect(sock, delay)
        return early

    def _serve(self, sock: socket.socket, conn: Conn):
        b = conn.behaviour
        try:
            sock.settimeout(60)
            if b.reset_immediately:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.kind = "silent"
                return
            if b.close_immediately:
                conn.kind = "silent"
                return
            if b.never_greet:
                conn.kind = "silent"
                self._read_to_eof(sock, conn, bytearray())
                return
            if b.greeting_delay:
                conn.early += self._collect(sock, b.greeting_delay)
            greeting = b.greeting if b.greeting is not None else self.default_greeting()
            conn.early += self._send_chunks(sock, conn, _chunks(greeting), greeting=True)
            buf = bytearray(conn.early)
            # Classify by the first line: a health check says EHLO <CHECK_EHLO>.
            while b"\n" not in buf and len(buf) < 64:
                d = sock.recv(65536)
                if not d:
                    conn.peer_closed = True
                    break
                buf += d
            first = bytes(buf.split(b"\n", 1)[0]).rstrip(b"\r")
            if first.upper() == ("EHLO " + CHECK_EHLO).upper().encode():
                conn.kind = "check"
                self._smtp(sock, conn, b, buf)
                return
            if not buf and conn.peer_closed:
                conn.kind = "silent"
                return
            conn.kind = "session"
            if b.mode == "smtp":
                self._smtp(sock, conn, b, buf)
            elif b.mode == "raw":
                self._raw(sock, conn, b, buf)
            elif b.mode == "echo":
                self._echo(sock, conn, buf)
            elif b.mode == "blast":
                self._blast(sock, conn, b, buf)
            elif b.mode == "mute":
                self._read_to_eof(sock, conn, buf)
            elif b.mode == "hash":
                self._hash(sock, conn, b, buf)
            elif b.mode == "reset":
                conn.received += buf
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                raise ValueError("unknown mode %r" % b.mode)
        except Exception as e:  # recorded for the test to look at; never kills the server
            conn.error = "%s: %s" % (type(e).__name__, e)
        finally:
            try:
                sock.close()
            except OSError:
                pass
            with self._lock:
                if sock in self._socks:
                    self._socks.remove(sock)
            conn.done.set()

    def _read_to_eof(self, sock, conn: Conn, buf: bytearray):
        conn.received += buf
        while True:
            d = sock.recv(1 << 20)
            if not d:
                conn.peer_closed = True
                return
            conn.received += d

    def _raw(self, sock, conn: Conn, b: Behaviour, buf: bytearray):
        def sender():
            sock.sendall(b.raw_send)
            conn.sent_size = len(b.raw_send)
            conn.sent_sha256 = hashlib.sha256(b.raw_send).hexdigest()

        t = threading.Thread(target=sender, daemon=True)
        t.start()
        self._read_to_eof(sock, conn, buf)
        t.join(timeout=60)

    def _hash(self, sock, conn: Conn, b: Behaviour, buf: bytearray):
        h = hashlib.sha256(buf)
        size = len(buf)
        since_pause = size
        while True:
            d = sock.recv(65536)
            if not d:
                conn.peer_closed = True
                break
            h.update(d)
            size += len(d)
            since_pause += len(d)
            if b.read_pause and since_pause >= (1 << 20):
                since_pause = 0
                time.sleep(b.read_pause)
        conn.received_size = size
        conn.received_sha256 = h.hexdigest()

    def _echo(self, sock, conn: Conn, buf: bytearray):
        if buf:
            sock.sendall(buf)
            conn.received += buf
        while True:
            d = sock.recv(65536)
            if not d:
                conn.peer_closed = True
                return
            conn.received += d
            sock.sendall(d)

    def _blast(self, sock, conn: Conn, b: Behaviour, buf: bytearray):
        conn.received += buf
        h = hashlib.sha256()
        base = random.Random(1234).randbytes(1 << 20)
        sent = 0
        i = 0
        while sent < b.blast_size:
            block = (b"%08d" % i + base[8:])[: b.blast_size - sent]
            sock.sendall(block)  # one call per MiB: the socket timeout bounds each block
            h.update(block)
            sent += len(block)
            i += 1
        conn.sent_size = sent
        conn.sent_sha256 = h.hexdigest()
        sock.shutdown(socket.SHUT_WR)
        self._read_to_eof(sock, conn, bytearray())

    def _smtp(self, sock, conn: Conn, b: Behaviour, buf: bytearray):
        while True:
            while b"\n" not in buf:
                d = sock.recv(65536)
                if not d:
                    conn.peer_closed = True
                    return
                buf += d
            line, _, rest = bytes(buf).partition(b"\n")
            buf = bytearray(rest)
            cmd = line.rstrip(b"\r").decode("latin-1")
            conn.commands.append(cmd)
            verb = cmd.split(" ", 1)[0].upper()
            if verb in b.replies:
                sock.sendall(b.replies[verb])
                if verb == "QUIT":
                    return
                continue
            if verb == "EHLO":
                reply = b.ehlo_reply if b.ehlo_reply is not None else self.default_ehlo()
                chunks = _chunks(reply)
                conn.ehlo_codes.append(chunks[0][0][:3].decode("latin-1"))
                early = self._send_chunks(sock, conn, chunks, greeting=False)
                conn.ehlo_early += early
                buf = bytearray(early) + buf
            elif verb == "HELO":
                sock.sendall(("250 %s\r\n" % self.name).encode())
            elif verb in ("MAIL", "RCPT", "RSET", "NOOP"):
                sock.sendall(b"250 2.0.0 Ok\r\n")
            elif verb == "DATA":
                sock.sendall(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                body, buf = self._read_data(sock, conn, buf)
                if body is None:
                    return
                msg = {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
                if len(body) < (1 << 20):
                    msg["body"] = body
                conn.messages.append(msg)
                sock.sendall(("250 2.0.0 Ok: queued as %s%d\r\n" % (self.name, len(conn.messages))).encode())
            elif verb == "QUIT":
                conn.quit = True
                conn.t_quit = time.time()
                sock.sendall(b"221 2.0.0 Bye\r\n")
                return
            else:
                sock.sendall(b"502 5.5.2 Error: command not recognized\r\n")

    @staticmethod
    def _read_data(sock, conn: Conn, buf: bytearray):
        """Reads a DATA body up to CRLF.CRLF; returns (unstuffed body incl. final CRLF, rest)."""
        data = bytearray(b"\r\n") + buf  # so a body that is just "." is found too
        scanned = 0
        while True:
            idx = data.find(b"\r\n.\r\n", max(0, scanned - 4))
            if idx >= 0:
                body = bytes(data[2:idx + 2]) if idx > 0 else b""
                rest = bytearray(data[idx + 5:])
                body = body.replace(b"\r\n..", b"\r\n.")
                if body.startswith(b".."):
                    body = body[1:]
                return body, rest
            scanned = len(data)
            d = sock.recv(1 << 20)
            if not d:
                conn.peer_closed = True
                return None, bytearray()
            data += d


# --------------------------------------------------------------------------------------
# Config generation
# --------------------------------------------------------------------------------------


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError("no TOML for %r" % (v,))


def _table(header: str, values: dict) -> str:
    lines = [header]
    for k, v in values.items():
        if v is None:  # None leaves the key out (smtplb's default applies)
            continue
        lines.append("%s = %s" % (k, toml_value(v)))
    return "\n".join(lines) + "\n"


def make_config(servers: Iterable, *, pool: Optional[dict] = None, health: Optional[dict] = None,
                listener: Optional[dict] = None, global_: Optional[dict] = None, log: Optional[dict] = None,
                pool_name: str = "p", listener_name: str = "mx", extra: str = "") -> str:
    """One listener and one pool. servers: FakeSmtpServer, or (name, host, port[, extra dict]),
    or (FakeSmtpServer, extra dict). Health checks default to one check only (interval 10m):
    tests that need repeated checks pass health={"interval": "200ms", ...}. Workers: 1, or
    $SMTPLB_TEST_WORKERS (to run a suite with more), unless global_ says otherwise."""
    g = {"hostname": HOSTNAME, "workers": int(os.environ.get("SMTPLB_TEST_WORKERS", "1"))}
    g.update(global_ or {})
    lg = {"level": "info", "access_log": True}
    lg.update(log or {})
    li = {"address": "127.0.0.1", "port": 0, "pool": pool_name}
    li.update(listener or {})
    po = {"algorithm": "roundrobin", "retries": 3, "connect_timeout": "2s", "banner_timeout": "3s"}
    po.update(pool or {})
    hc = {"interval": "10m", "timeout": "2s", "rise": 2, "fall": 2, "ehlo_name": CHECK_EHLO}
    hc.update(health or {})
    out = [_table("[global]", g), _table("[log]", lg), _table("[listener.%s]" % listener_name, li),
           _table("[pool.%s]" % pool_name, po), _table("[pool.%s.health_check]" % pool_name, hc)]
    for s in servers:
        more = {}
        if isinstance(s, tuple) and isinstance(s[0], FakeSmtpServer):
            s, more = s
        if isinstance(s, FakeSmtpServer):
            d = {"name": s.name, "address": s.host, "port": s.port}
        else:
            d = {"name": s[0], "address": s[1], "port": s[2]}
            if len(s) > 3:
                more = s[3]
        d.update(more)
        out.append(_table("[[pool.%s.server]]" % pool_name, d))
    return "\n".join(out) + extra


# --------------------------------------------------------------------------------------
# smtplb process
# --------------------------------------------------------------------------------------

ACCESS_RE = re.compile(
    r"client=(?P<client>\S+) listener=(?P<listener>\S+) pool=(?P<pool>\S+) server=(?P<server>\S+) "
    r"tries=(?P<tries>\d+) Tw=(?P<Tw>-?\d+) Tc=(?P<Tc>-?\d+) Tb=(?P<Tb>-?\d+) Tt=(?P<Tt>-?\d+) "
    r"bytes_in=(?P<bytes_in>\d+) bytes_out=(?P<bytes_out>\d+) term=(?P<term>\S\S)")
LISTEN_RE = re.compile(r"listener (\S+) listening on (\S+):(\d+) for pool")
LOG_TS_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:?\d\d) ")


def log_time(line: str) -> float:
    """Epoch seconds of a log line's timestamp."""
    import datetime
    m = LOG_TS_RE.match(line)
    if not m:
        raise ValueError("no timestamp in %r" % line)
    return datetime.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()


def parse_access(line: str) -> Optional[dict]:
    m = ACCESS_RE.search(line)
    if not m:
        return None
    d = m.groupdict()
    for k in ("tries", "Tw", "Tc", "Tb", "Tt", "bytes_in", "bytes_out"):
        d[k] = int(d[k])
    return d


def run_smtplb(args: Sequence[str], timeout: float = 20) -> subprocess.CompletedProcess:
    """Runs smtplb to completion (for --check, -V, ...); fails on a sanitizer report."""
    return check_sanitizer(subprocess.run([SMTPLB_BIN, *args], stdin=subprocess.DEVNULL, capture_output=True,
                                          text=True, timeout=timeout))


class Smtplb:
    """Runs smtplb with a generated config.

        with Smtplb(make_config([s1, s2]), up=["p/s1", "p/s2"]) as lb:
            sock = connect(lb.port())

    up / down: servers ("pool/name") whose UP / DOWN line must appear before the body runs.
    wrapper: a command that execs smtplb in the end (its arguments follow it), so the PID
    it starts with is smtplb's; e.g. unshare + mount for a private /etc/resolv.conf.
    On exit: SIGTERM, wait, SIGKILL by PID if needed; raises AssertionError when smtplb had
    died by itself, needed SIGKILL, exited non-zero or wrote a sanitizer report to its log
    (also when a test stopped it itself and accepted a non-zero exit), unless an exception
    is already on its way, in which case the log tail is printed to stderr for the test report.
    """

    def __init__(self, config: str, *, up: Sequence[str] = (), down: Sequence[str] = (), args: Sequence[str] = (),
                 start_timeout: float = STEP_TIMEOUT, wrapper: Sequence[str] = ()):
        self.config = config
        self.wrapper = list(wrapper)
        self.up = list(up)
        self.down = list(down)
        self.args = list(args)
        self.start_timeout = start_timeout
        self.proc: Optional[subprocess.Popen] = None
        self.dir: Optional[str] = None
        self.ports: dict = {}
        self.addresses: dict = {}
        self.returncode: Optional[int] = None
        self.killed = False
        self.died_early = False
        self._final_log: Optional[str] = None

    # -- lifecycle ----------------------------------------------------------------------

    def __enter__(self):
        self.dir = tempfile.mkdtemp(prefix="smtplb-it-")
        self.config_path = os.path.join(self.dir, "smtplb.toml")
        self.log_path = os.path.join(self.dir, "smtplb.log")
        with open(self.config_path, "w") as f:
            f.write(self.config)
        self._logf = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen([*self.wrapper, SMTPLB_BIN, "-f", self.config_path, *self.args], stdin=subprocess.DEVNULL,
                                         stdout=self._logf, stderr=subprocess.STDOUT)
            self.pid = self.proc.pid
            listeners = re.findall(r"^\[listener\.([^\]\s]+)\]", self.config, re.M)
            self.wait_log(LISTEN_RE, count=len(listeners), timeout=self.start_timeout,
                          what="listeners %s to be bound" % listeners)
            for m in LISTEN_RE.finditer(self.log()):
                self.ports[m.group(1)] = int(m.group(3))
                self.addresses[m.group(1)] = m.group(2).strip("[]")
            for label in self.up:
                self.wait_log(r"server %s is UP" % re.escape(label), timeout=self.start_timeout)
            for label in self.down:
                self.wait_log(r"server %s is DOWN" % re.escape(label), timeout=self.start_timeout)
        except BaseException:
            self._shutdown()
            self._dump_log()
            self._cleanup()
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        problems = self._shutdown()
        if exc_type is not None or problems:
            if problems:
                sys.stderr.write("\nsmtplb: %s\n" % "; ".join(problems))
            self._dump_log()
        self._cleanup()
        if problems and exc_type is None:
            raise AssertionError("smtplb: " + "; ".join(problems) + "\n--- log tail ---\n" + self._tail())
        return False

    def terminate(self, sig: int = signal.SIGTERM, timeout: float = STEP_TIMEOUT) -> Optional[int]:
        """Sends `sig` and waits for the exit; returns the exit code (None if it did not exit)."""
        if self.proc.poll() is None:
            os.kill(self.pid, sig)
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        return self.returncode

    def _shutdown(self) -> list:
        problems = []
        if self.proc is None:
            return problems
        if self.proc.poll() is not None and self.returncode is None:
            self.died_early = True
            problems.append("exited by itself with status %s" % self.proc.returncode)
        if self.proc.poll() is None:
            # SIGTERM drains gracefully (sessions a test left open would keep it up to
            # shutdown_grace); a second SIGTERM closes them at once, still exiting 0.
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=STEP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.killed = True
                problems.append("did not stop within %ss of SIGTERM; killed" % STEP_TIMEOUT)
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(timeout=STEP_TIMEOUT)
        self.returncode = self.proc.returncode
        if self.returncode != 0 and not self.died_early and not self.killed:
            problems.append("exit status %s after SIGTERM" % self.returncode)
        self._final_log = self.log()
        # The sanitizers write to stderr, which is the log file unless a subclass reads
        # the log from elsewhere (then stderr is in log_path): both are scanned.
        output = self._final_log
        try:
            with open(self.log_path, "rb") as f:
                stderr_text = f.read().decode("utf-8", "replace")
            if stderr_text != output:
                output += "\n" + stderr_text
        except (OSError, AttributeError):
            pass
        problem = sanitizer_problem(output, self.returncode)
        if problem:
            problems.append(problem)
        return problems

    def _cleanup(self):
        try:
            self._logf.close()
        except Exception:
            pass
        if self.dir and not os.environ.get("SMTPLB_KEEP"):
            shutil.rmtree(self.dir, ignore_errors=True)
        elif self.dir:
            sys.stderr.write("smtplb test files kept in %s\n" % self.dir)

    def _tail(self, n: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def _dump_log(self):
        sys.stderr.write("\n--- smtplb log (%s) ---\n%s\n--- end of smtplb log ---\n" % (self.dir, self._tail(200)))

    # -- observation --------------------------------------------------------------------

    def port(self, listener: str = "mx") -> int:
        return self.ports[listener]

    def log(self) -> str:
        if self._final_log is not None:
            return self._final_log
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_log(self, pattern, *, count: int = 1, timeout: float = STEP_TIMEOUT, what: Optional[str] = None,
                 since: int = 0) -> list:
        """Waits until `pattern` (regex) matches at least `count` log lines (from byte offset
        `since` of the log); returns the matching lines. Fails fast if smtplb exits."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            lines = [ln for ln in self.log()[since:].splitlines() if rx.search(ln)]
            if len(lines) >= count:
                return lines
            if not self.alive() and self._final_log is None:
                raise AssertionError("smtplb exited (status %s) while waiting for %s\n--- log tail ---\n%s"
                                     % (self.proc.poll(), what or rx.pattern, self._tail()))
            if time.monotonic() >= deadline:
                raise AssertionError("timed out after %.1fs waiting for %d x %s (have %d)\n--- log tail ---\n%s"
                                     % (timeout, count, what or rx.pattern, len(lines), self._tail()))
            time.sleep(0.02)

    def log_offset(self) -> int:
        return len(self.log())

    def access(self) -> list:
        return [a for a in (parse_access(ln) for ln in self.log().splitlines()) if a]

    def wait_access(self, count: int = 1, timeout: float = STEP_TIMEOUT, client=None, **match) -> list:
        """Waits for `count` access lines matching the given field values (and, with
        client=sock, the client address of that socket); returns them."""
        if client is not None:
            match["client"] = client if isinstance(client, str) else client_label(client)

        def found():
            got = [a for a in self.access() if all(str(a[k]) == str(v) for k, v in match.items())]
            return got if len(got) >= count else None

        try:
            return wait_until(found, timeout, "%d access lines matching %r" % (count, match))
        except AssertionError as e:
            raise AssertionError("%s\n--- log tail ---\n%s" % (e, self._tail())) from None

    def rss_kib(self) -> int:
        with open("/proc/%d/status" % self.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS for pid %d" % self.pid)


def client_label(sock: socket.socket) -> str:
    """How smtplb's access log names the client of this socket."""
    host, port = sock.getsockname()[:2]
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


# --------------------------------------------------------------------------------------
# client helpers
# --------------------------------------------------------------------------------------


def connect(port: int, host: str = "127.0.0.1", timeout: float = STEP_TIMEOUT) -> socket.socket:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect((host, port))
    except BaseException:
        s.close()
        raise
    return s


def recv_exact(sock: socket.socket, n: int, timeout: float = STEP_TIMEOUT) -> bytes:
    """Reads exactly n bytes (fewer only on EOF)."""
    deadline = time.monotonic() + timeout
    out = bytearray()
    while len(out) < n:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            d = sock.recv(n - len(out))
        except socket.timeout:
            raise AssertionError("timed out reading %d bytes, got %d: %r" % (n, len(out), bytes(out[:200])))
        if not d:
            break
        out += d
    return bytes(out)


def admin_request(path: str, method: str, target: str, body: bytes = b"",
                  timeout: float = STEP_TIMEOUT) -> Tuple[int, str]:
    """One request to the admin API on the unix socket `path`, on its own connection:
    (status, body text)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(b"%s %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                  % (method.encode(), target.encode(), len(body)) + body)
        raw = recv_until_eof(s, timeout=timeout)
    finally:
        s.close()
    head, _, text = raw.partition(b"\r\n\r\n")
    m = re.match(rb"HTTP/1\.1 (\d+) ", head)
    if not m:
        raise AssertionError("not an HTTP response: %r" % raw[:200])
    return int(m.group(1)), text.decode("utf-8", "replace")


def recv_until_eof(sock: socket.socket, timeout: float = STEP_TIMEOUT, limit: int = 1 << 30) -> bytes:
    deadline = time.monotonic() + timeout
    out = bytearray()
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            d = sock.recv(1 << 20)
        except socket.timeout:
            raise AssertionError("no EOF within %.1fs; got %d bytes: %r" % (timeout, len(out), bytes(out[:200])))
        except ConnectionResetError:
            raise AssertionError("connection reset (instead of FIN) after %d bytes: %r" % (len(out), bytes(out[:200])))
        if not d:
            return bytes(out)
        out += d
        if len(out) > limit:
            raise AssertionError("more than %d bytes before EOF" % limit)


def recv_reply(sock: socket.socket, buf: Optional[bytearray] = None, timeout: float = STEP_TIMEOUT) -> bytes:
    """Reads one whole (multi-line) SMTP reply; returns its raw bytes. `buf` keeps bytes that
    arrived after it (pass the same bytearray for a session)."""
    if buf is None:
        buf = bytearray()
    deadline = time.monotonic() + timeout
    pos = 0
    while True:
        nl = buf.find(b"\n", pos)
        if nl >= 0:
            line = bytes(buf[pos:nl + 1])
            pos = nl + 1
            if len(line) < 4 or line[3:4] != b"-":
                reply = bytes(buf[:pos])
                del buf[:pos]
                return reply
            continue
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            d = sock.recv(65536)
        except socket.timeout:
            raise AssertionError("timed out waiting for a reply; have %r" % bytes(buf[:300]))
        if not d:
            raise AssertionError("EOF while waiting for a reply; have %r" % bytes(buf[:300]))
        buf += d


def dot_stuff(body: bytes) -> bytes:
    """Wire form of a message body (which must end with CRLF) for DATA, without the final dot."""
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed


class SmtpClient:
    """A minimal SMTP client over a plain socket, with exact access to the bytes."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = STEP_TIMEOUT):
        self.sock = connect(port, host, timeout)
        self.buf = bytearray()
        self.timeout = timeout

    def reply(self) -> bytes:
        return recv_reply(self.sock, self.buf, self.timeout)

    def cmd(self, line: str) -> bytes:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def expect(self, line: str, code: int) -> bytes:
        r = self.cmd(line)
        if not r.startswith(str(code).encode()):
            raise AssertionError("%r: expected %d, got %r" % (line, code, r))
        return r

    def greeting(self) -> bytes:
        return self.reply()

    def send_message(self, body: bytes, sender: str = "a@example.org", rcpt: str = "b@example.org",
                     ehlo: str = "client.test") -> bytes:
        """EHLO, MAIL, RCPT, DATA; returns the reply to the final dot."""
        self.expect("EHLO " + ehlo, 250)
        self.expect("MAIL FROM:<%s>" % sender, 250)
        self.expect("RCPT TO:<%s>" % rcpt, 250)
        self.expect("DATA", 354)
        wire = dot_stuff(body) + b".\r\n"
        view = memoryview(wire)
        for i in range(0, len(wire), 1 << 20):
            self.sock.sendall(view[i:i + (1 << 20)])
        return self.reply()

    def quit(self) -> bytes:
        r = self.cmd("QUIT")
        self.close()
        return r

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def label(self) -> str:
        return client_label(self.sock)


def server_of(greeting: bytes) -> str:
    """The fake server's name from its default greeting "220 NAME ESMTP fake"."""
    m = re.match(rb"220[ -](\S+)", greeting)
    return m.group(1).decode() if m else "?"


# --------------------------------------------------------------------------------------
# unittest glue
# --------------------------------------------------------------------------------------


class TestCase(unittest.TestCase):
    """Adds fake() and smtplb() that register their own cleanup."""

    def fake(self, name: str = "s1", behaviour: Optional[Behaviour] = None, host: str = "127.0.0.1",
             port: int = 0) -> FakeSmtpServer:
        s = FakeSmtpServer(name, behaviour, host, port)
        self.addCleanup(s.close)
        return s

    def smtplb(self, config: str, **kw) -> Smtplb:
        lb = Smtplb(config, **kw)
        lb.__enter__()
        self.addCleanup(self._stop_smtplb, lb)
        return lb

    def _stop_smtplb(self, lb: Smtplb):
        # When the test has failed already, print smtplb's log for the report.
        result = getattr(getattr(self, "_outcome", None), "result", None)
        failed = any(test is self for test, _ in getattr(result, "failures", []) + getattr(result, "errors", []))
        lb.__exit__(AssertionError if failed else None, None, None)

    def client(self, port: int, host: str = "127.0.0.1") -> SmtpClient:
        c = SmtpClient(port, host)
        self.addCleanup(c.close)
        return c

    def sock(self, port: int, host: str = "127.0.0.1") -> socket.socket:
        s = connect(port, host)
        self.addCleanup(s.close)
        return s


def run_tests(after: Optional[Callable[[], None]] = None):
    """unittest.main, then one "SKIP: <test>: <reason>" line per skipped case, then exit:
    SKIP_EXIT when every case was skipped (nothing could run here: CTest says Skipped),
    0 when the cases that ran passed, 1 otherwise (also when there was no case at all).
    `after` runs before the exit (a report of timings, say)."""
    result = unittest.main(verbosity=2, exit=False).result
    if after:
        after()
    sys.stderr.flush()
    for test, reason in result.skipped:
        # A skip in setUpClass is reported for "setUpClass (module.Class)": named like a case.
        m = re.match(r"^(\w+) \(([\w.]+)\)$", test.id())
        print("SKIP: %s: %s" % ("%s.%s" % (m.group(2), m.group(1)) if m else test.id(), reason), flush=True)
    if not result.wasSuccessful():
        sys.exit(1)
    if result.skipped and len(result.skipped) >= result.testsRun:
        sys.exit(SKIP_EXIT)
    sys.exit(0 if result.testsRun else 1)


def main(after: Optional[Callable[[], None]] = None):
    if not os.access(SMTPLB_BIN, os.X_OK):
        sys.stderr.write("smtplb binary not found at %s (set SMTPLB_BIN)\n" % SMTPLB_BIN)
        sys.exit(1)
    run_tests(after)
