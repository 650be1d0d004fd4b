#!/usr/bin/env python3
"""smtpload: an SMTP load client that classifies every session.

Opens SESSIONS SMTP sessions in total against HOST:PORT, PARALLEL of them at a time,
and sends one message per session: EHLO, MAIL FROM, RCPT TO, DATA (a small body), QUIT.
Every session is bounded by --timeout and ends in exactly one class:

  ok                      the message was accepted (250 after the final dot) and QUIT got 221
  refused                 connect() was refused or reset
  closed_before_greeting  the server closed or reset the connection before any greeting byte
  bad_greeting            the greeting was not 220 (for example a balancer's own 421)
  cut_after_greeting      EOF, reset or timeout after a 220 greeting (or part of one) but
                          before the message was accepted
  cut_after_message       the message was accepted, then EOF, reset or timeout before 221
  rejected                a 4xx/5xx reply to EHLO, MAIL, RCPT, DATA or the final dot
                          (ordinary SMTP errors; the session then sends QUIT and closes)
  timeout                 no greeting byte (or no connection) within --timeout
  error                   anything else: a local error (EMFILE, EADDRNOTAVAIL, ...),
                          a malformed reply, or an unexpected reply code

It prints one JSON object on stdout: per-class counts, elapsed time, sessions/s,
latency percentiles of the ok sessions, the most frequent details per failure class,
and the commands run with --run-after (with the time they ran).

--timeline FILE writes one JSON line per session, sorted by start time:
  {"id": 17, "port": 40122, "start": 0.0132, "greeting": 0.0141, "end": 0.0163,
   "class": "ok", "detail": ""}
Times are seconds since "start_epoch" in the summary (add it to get Unix time, to
match them with a proxy's log); "port" is the client's local port, which is how a
proxy's access log names the client. A session "in flight" at time T is one with
start <= T < end. --buckets SECONDS adds to the summary a table of classes per
interval of end time, for reading by eye.

--run-after N CMD runs the shell command CMD once, as soon as N sessions have
finished (for example `--run-after 2000 "kill -9 1234"` to kill a backend mid-run);
it may be given several times. The command's start time is in the summary ("events")
on the same clock as the timeline.

Speed (2-core machine, 50 in parallel): one process drives about 3400 sessions/s
straight into smtp-sink and about 2000/s through a proxy sharing the machine;
--processes 2 gets about 3100/s through the proxy. --processes K splits the sessions
and the parallelism over K processes.

Exit status: 0 when every session was ok, 3 when some were not, 2 on bad usage,
1 when smtpload itself failed. Python 3.8+ standard library only; Linux (fork).
"""

import argparse
import asyncio
import collections
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time

CLASSES = ("ok", "refused", "closed_before_greeting", "bad_greeting", "cut_after_greeting",
           "cut_after_message", "rejected", "timeout", "error")

# Dialogue steps: what the next complete reply answers.
GREETING, EHLO, MAIL, RCPT, DATA, DOT, QUIT = range(7)
STEP_NAMES = ("greeting", "EHLO", "MAIL", "RCPT", "DATA", "end of data", "QUIT")
EXPECTED = (220, 250, 250, 250, 354, 250, 221)


class Script:
    """The bytes a session sends; shared by all sessions of a process."""

    def __init__(self, ehlo, sender, rcpt, body_size):
        self.ehlo = b"EHLO %s\r\n" % ehlo.encode()
        self.mail = b"MAIL FROM:<%s>\r\n" % sender.encode()
        self.rcpt = b"RCPT TO:<%s>\r\n" % rcpt.encode()
        self.data = b"DATA\r\n"
        head = (b"From: <%s>\r\nTo: <%s>\r\nSubject: smtpload\r\n\r\n" % (sender.encode(), rcpt.encode()))
        line = b"smtpload test message body, nothing to see here.\r\n"
        body = head
        while len(body) < body_size:
            body += line
        self.message = body + b".\r\n"  # no line starts with a dot: nothing to stuff
        self.quit = b"QUIT\r\n"


class Session(asyncio.Protocol):
    """One SMTP session; `result` is (class, detail) once it is decided."""

    __slots__ = ("script", "buf", "step", "saw_bytes", "t_greeting", "result", "transport", "done", "task",
                 "port", "clock")

    def __init__(self, script, done, clock):
        self.script = script
        self.buf = b""
        self.step = GREETING
        self.saw_bytes = False
        self.t_greeting = None
        self.result = None
        self.transport = None
        self.done = done
        self.task = None
        self.port = 0
        self.clock = clock

    # -- decisions ------------------------------------------------------------------------

    def decide(self, cls, detail="", abort=False):
        if self.result is not None:
            return
        self.result = (cls, detail)
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()
        if not self.done.done():
            self.done.set_result(None)

    def cut(self, how):
        """The connection ended (EOF, reset, timeout) before the dialogue did."""
        if self.step == GREETING:
            if not self.saw_bytes:
                if how == "timeout":
                    self.decide("timeout", "no greeting", abort=True)
                else:
                    self.decide("closed_before_greeting", how)
            elif self.buf.startswith(b"220"):
                self.decide("cut_after_greeting", how + " during the greeting", abort=True)
            else:
                self.decide("bad_greeting", how + " after partial greeting " + printable(self.buf), abort=True)
        elif self.step == QUIT:
            self.decide("cut_after_message", how + " waiting for the QUIT reply", abort=True)
        else:
            self.decide("cut_after_greeting", how + " waiting for the " + STEP_NAMES[self.step] + " reply",
                        abort=True)

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport
        try:
            self.port = transport.get_extra_info("sockname")[1]
        except (TypeError, IndexError):
            pass

    def data_received(self, data):
        if self.result is not None:
            return
        self.saw_bytes = True
        buf = self.buf + data if self.buf else data
        # A reply is complete at a line whose fourth byte is not '-'.
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            line = buf[start:nl]
            start = nl + 1
            if len(line) >= 4 and line[3:4] == b"-":
                continue
            reply_first = buf[:buf.find(b"\n") + 1]
            buf = buf[start:]
            start = 0
            self.reply(reply_first)
            if self.result is not None:
                return
        self.buf = buf
        if len(self.buf) > 65536:
            self.decide("error", "reply longer than 64 KiB", abort=True)

    def eof_received(self):
        self.cut("EOF")
        return False

    def connection_lost(self, exc):
        if self.result is None:
            self.cut("reset" if isinstance(exc, ConnectionResetError) else
                     ("EOF" if exc is None else "%s" % type(exc).__name__))

    def on_timeout(self):
        if self.result is not None:
            return
        if self.transport is None:  # still connecting: the connect wrapper decides
            self.result = ("timeout", "connect")
            if self.task is not None:
                self.task.cancel()
            return
        self.cut("timeout")

    # -- dialogue -------------------------------------------------------------------------

    def reply(self, first_line):
        code_txt = first_line[:3]
        if not code_txt.isdigit():
            self.decide("error", "malformed %s reply %s" % (STEP_NAMES[self.step], printable(first_line)), abort=True)
            return
        code = int(code_txt)
        step = self.step
        if code != EXPECTED[step] and not (step == RCPT and code == 251):
            text = "%s: %s" % (STEP_NAMES[step], printable(first_line))
            if step == GREETING:
                self.decide("bad_greeting", printable(first_line))
            elif 400 <= code < 600:
                if step == QUIT:
                    self.decide("error", text)
                else:
                    self.transport.write(self.script.quit)
                    self.decide("rejected", text)
            else:
                self.decide("error", "unexpected " + text, abort=True)
            return
        t = self.transport
        s = self.script
        if step == GREETING:
            self.t_greeting = self.clock()
            t.write(s.ehlo)
        elif step == EHLO:
            t.write(s.mail)
        elif step == MAIL:
            t.write(s.rcpt)
        elif step == RCPT:
            t.write(s.data)
        elif step == DATA:
            t.write(s.message)
        elif step == DOT:
            t.write(s.quit)
        else:
            self.step = QUIT + 1
            self.decide("ok")
            return
        self.step = step + 1


def printable(b):
    s = b.decode("latin-1").rstrip("\r\n")
    s = "".join(c if " " <= c < "\x7f" else "\\x%02x" % ord(c) for c in s)
    return s[:120]


# ---------------------------------------------------------------------------------------
# one process
# ---------------------------------------------------------------------------------------


async def drive(addr, ids, parallel, timeout, script, progress, progress_index):
    """Runs the sessions numbered `ids` with `parallel` at a time; returns their records."""
    loop = asyncio.get_running_loop()
    clock = time.time
    records = []
    it = iter(ids)
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET

    async def one(i):
        done = loop.create_future()
        p = Session(script, done, clock)
        p.task = asyncio.current_task()
        t0 = clock()
        timer = loop.call_later(timeout, p.on_timeout)
        try:
            try:
                await loop.create_connection(lambda: p, addr[0], addr[1], family=family)
            except asyncio.CancelledError:
                if p.result is None or p.result[0] != "timeout":
                    raise  # not our timeout
                task = asyncio.current_task()
                if hasattr(task, "uncancel"):
                    task.uncancel()
                if p.transport is not None:
                    p.transport.abort()
            except (ConnectionRefusedError, ConnectionResetError, ConnectionAbortedError) as e:
                p.result = ("refused", type(e).__name__)
            except OSError as e:
                p.result = ("error", "connect: %s" % (os.strerror(e.errno) if e.errno else e))
            if p.result is None:
                await done
        finally:
            timer.cancel()
        t1 = clock()
        records.append((i, p.port, t0, p.t_greeting, t1, p.result[0], p.result[1]))
        if progress is not None:
            progress[progress_index] += 1

    async def runner():
        for i in it:
            await one(i)

    await asyncio.gather(*(runner() for _ in range(parallel)))
    return records


def worker_main(addr, lo, hi, parallel, timeout, script_args, progress, index, conn):
    try:
        records = asyncio.run(drive(addr, range(lo, hi), parallel, timeout, Script(*script_args), progress, index))
        conn.send(("ok", records))
    except BaseException as e:  # reported by the parent
        conn.send(("failed", "%s: %s" % (type(e).__name__, e)))
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------


def parse_target(s):
    host, sep, port = s.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError("expected HOST:PORT, got %r" % s)
    host = host.strip("[]") or "127.0.0.1"
    try:
        info = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise argparse.ArgumentTypeError("cannot resolve %r: %s" % (host, e))
    return (info[0][4][0], int(port))


def percentile(sorted_values, q):
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, int(round(q / 100.0 * (len(sorted_values) - 1)))))
    return sorted_values[k]


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="smtpload.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example: smtpload.py -n 10000 -p 50 --timeline /tmp/t.jsonl 127.0.0.1:2525")
    ap.add_argument("target", type=parse_target, metavar="HOST:PORT", help="SMTP server or proxy to drive")
    ap.add_argument("-n", "--sessions", type=int, default=1000, help="sessions in total (default 1000)")
    ap.add_argument("-p", "--parallel", type=int, default=20, help="sessions at a time (default 20)")
    ap.add_argument("-t", "--timeout", type=float, default=10.0,
                    help="seconds one session may take, connect to QUIT reply (default 10)")
    ap.add_argument("-j", "--processes", type=int, default=1,
                    help="processes to spread the sessions and parallelism over (default 1)")
    ap.add_argument("--ehlo", default="smtpload.example", help="EHLO name (default smtpload.example)")
    ap.add_argument("--mail-from", default="load@example.org", help="envelope sender")
    ap.add_argument("--rcpt-to", default="sink@example.net", help="envelope recipient")
    ap.add_argument("--body-size", type=int, default=300, help="approximate message size in bytes (default 300)")
    ap.add_argument("--timeline", metavar="FILE", help="write one JSON line per session to FILE")
    ap.add_argument("--buckets", type=float, metavar="SECONDS",
                    help="add a per-interval table of classes (by end time) to the summary")
    ap.add_argument("--run-after", nargs=2, action="append", default=[], metavar=("N", "CMD"),
                    help="run shell command CMD once N sessions have finished (repeatable)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    a = ap.parse_args(argv)
    if a.sessions < 0 or a.parallel < 1 or a.processes < 1 or a.timeout <= 0:
        ap.error("--sessions >= 0, --parallel >= 1, --processes >= 1 and --timeout > 0 are required")
    events = []
    for n, cmd in a.run_after:
        if not n.isdigit():
            ap.error("--run-after N must be a number, got %r" % n)
        events.append({"after": int(n), "cmd": cmd})
    events.sort(key=lambda e: e["after"])

    k = max(1, min(a.processes, a.parallel, a.sessions or 1))
    script_args = (a.ehlo, a.mail_from, a.rcpt_to, a.body_size)
    ctx = multiprocessing.get_context("fork")
    progress = ctx.Array("q", k, lock=False)
    workers = []
    start = time.time()
    for w in range(k):
        lo, hi = a.sessions * w // k, a.sessions * (w + 1) // k
        par = a.parallel * (w + 1) // k - a.parallel * w // k
        rx, tx = ctx.Pipe(duplex=False)
        p = ctx.Process(target=worker_main, args=(a.target, lo, hi, par, a.timeout, script_args, progress, w, tx),
                        daemon=True)
        p.start()
        tx.close()
        workers.append((p, rx))

    # Coordinate: run the --run-after commands and show progress until every worker reports.
    pending = list(events)
    results = [None] * k
    last_note = time.time()
    running = []
    while any(r is None for r in results):
        for w, (p, rx) in enumerate(workers):
            if results[w] is None and rx.poll(0):
                try:
                    results[w] = rx.recv()
                except EOFError:
                    results[w] = ("failed", "worker %d exited with status %s" % (w, p.exitcode))
            elif results[w] is None and not p.is_alive() and not rx.poll(0):
                results[w] = ("failed", "worker %d exited with status %s" % (w, p.exitcode))
        finished = sum(progress)
        while pending and finished >= pending[0]["after"]:
            e = pending.pop(0)
            e["t"] = round(time.time() - start, 6)
            e["finished_at_run"] = finished
            running.append((e, subprocess.Popen(e["cmd"], shell=True, stdin=subprocess.DEVNULL)))
        now = time.time()
        if not a.quiet and now - last_note >= 1.0:
            last_note = now
            sys.stderr.write("smtpload: %d/%d sessions, %.0f/s\n" % (finished, a.sessions, finished / (now - start)))
        time.sleep(0.002)
    elapsed = time.time() - start
    for p, _ in workers:
        p.join(5)
    for e, proc in running:
        try:
            e["returncode"] = proc.wait(30)
        except subprocess.TimeoutExpired:
            e["returncode"] = None
    failed = [r[1] for r in results if r[0] != "ok"]
    if failed:
        sys.stderr.write("smtpload: %s\n" % "; ".join(failed))
        return 1
    records = sorted((rec for r in results for rec in r[1]), key=lambda r: r[2])

    counts = collections.OrderedDict((c, 0) for c in CLASSES)
    details = collections.defaultdict(collections.Counter)
    ok_ms = []
    for _, _, t0, _, t1, cls, detail in records:
        counts[cls] += 1
        if cls == "ok":
            ok_ms.append((t1 - t0) * 1000.0)
        else:
            details[cls][detail] += 1
    ok_ms.sort()
    summary = collections.OrderedDict()
    summary["target"] = "%s:%d" % a.target
    summary["sessions"] = len(records)
    summary["parallel"] = a.parallel
    summary["processes"] = k
    summary["elapsed_s"] = round(elapsed, 3)
    summary["sessions_per_s"] = round(len(records) / elapsed, 1) if elapsed > 0 else None
    summary["counts"] = counts
    summary["ok_latency_ms"] = {q: (round(percentile(ok_ms, n), 2) if ok_ms else None)
                                for q, n in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))}
    summary["details"] = {c: dict(d.most_common(5)) for c, d in details.items()}
    for e in events:
        e.setdefault("t", None)
    summary["events"] = events
    summary["start_epoch"] = round(start, 6)

    if a.buckets:
        table = collections.OrderedDict()
        for _, _, _, _, t1, cls, _ in records:
            b = "%.3f" % (int((t1 - start) / a.buckets) * a.buckets)
            table.setdefault(b, collections.Counter())[cls] += 1
        summary["buckets"] = {b: dict(c) for b, c in sorted(table.items(), key=lambda kv: float(kv[0]))}

    if a.timeline:
        with open(a.timeline, "w") as f:
            for i, port, t0, tg, t1, cls, detail in records:
                f.write(json.dumps({"id": i, "port": port, "start": round(t0 - start, 6),
                                    "greeting": None if tg is None else round(tg - start, 6),
                                    "end": round(t1 - start, 6), "class": cls, "detail": detail}) + "\n")

    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0 if counts["ok"] == len(records) else 3


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.stderr.write("smtpload: interrupted\n")
        sys.exit(130)
