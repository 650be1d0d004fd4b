#!/usr/bin/env python3
"""bench.py: smtplb side by side with a direct connection and HAProxy, on loopback.

Starts smtp-sink backends, then each target in front of them, and measures in one run
(targets take turns round by round, so a noisy machine hurts them alike):

  connect     smtp-source, one message per connection (connection rate, the hard case)
  persistent  smtp-source -d, many messages per connection (bytes through the relay)
  latency     sequential sessions: connect() to the end of the greeting, p50/p90/p99
  idle        RSS growth per idle proxied session (sessions held open after the greeting)

and, at the edges of the load curve (--tests scale, or --quick for small counts in under a
minute), with HAProxy and smtplb taking turns, one at a time:

  concurrency as many sessions at once as RLIMIT_NOFILE allows: all greeted, then a message
              and QUIT each; RSS per session, the kernel's memory per socket, 100 000 on paper
  overload    200 ms-per-message backends behind per-server limits and a queue, at full
              capacity and at 3x: goodput ratio, and what each client beyond capacity saw
  storm       N connections within one second: time to greeting, accept queues,
              ListenOverflows/ListenDrops
  fleet       1 000 scripted servers checked every 2 s: CPU, the busiest 100 ms of checks
              against the average (first round, steady, after a reload), data-path rate

Per target it prints messages/s, the proxy's own CPU time per message (user+sys of all
its threads, from /proc/PID/stat) and the whole machine's busy CPU time per message (from
/proc/stat: the load generator, the backends and anything else running on the machine),
as medians over the rounds, and the ratios of smtplb to HAProxy.

--floor MODES adds the yardstick relay (tests/bench/relay_floor.cpp: no SMTP, no checks,
no timeouts, just a correct relay) as targets floor-plain, floor-splice, floor-sockmap:
the cost any relaying proxy pays here, and what relaying inside the kernel costs.

HAProxy runs with nbthread 1, mode tcp, balance leastconn and option smtpchk;
smtplb with the same shape (leastconn, SMTP checks every second, no access log unless
--access-log). Only loopback addresses are used; every process started is stopped.

Scheduling layout: the backends and the load generator stay in this script's session and
each proxy gets a session of its own. With
autogroup scheduling (kernel.sched_autogroup_enabled=1, the Debian default) that makes
"the load side" and each proxy separate scheduling groups, like separate machines sharing
two CPUs. The layout changes the results (notably for 2 worker threads); see
docs/performance.md.
"""
import argparse
import errno
import json
import os
import re
import resource
import select
import selectors
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid):
    """user+sys of a process and all its threads (the first line of /proc/PID/stat sums them)."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except OSError:
        return 0.0


def machine_busy_seconds():
    """CPU time the whole machine spent busy (user, nice, system, irq, softirq), all CPUs.
    It also counts the load generator and the backends, and it is the honest total for a
    proxy that moves work out of its own process (into kernel threads, say)."""
    v = [int(x) for x in open("/proc/stat").readline().split()[1:8]]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / TICK


def rss_bytes(pid):
    return int(open(f"/proc/{pid}/statm").read().split()[1]) * PAGE


def wait_port(port, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def read_greeting(sock):
    """Reads until the last line of the greeting (a line whose 4th byte is a space)."""
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed before the greeting ended")
        data += chunk
        lines = data.split(b"\r\n")
        if len(lines) > 1 and any(len(l) >= 4 and l[3:4] == b" " for l in lines[:-1]):
            return data


class Target:
    def __init__(self, name, port, argv, env=None):
        self.name, self.port, self.argv, self.env = name, port, argv, env
        self.proc = None

    def start(self, workdir):
        if self.argv is None:
            return
        log = open(os.path.join(workdir, f"{self.name}.log"), "w")
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        if not wait_port(self.port):
            log.close()
            tail = open(os.path.join(workdir, f"{self.name}.log")).read()[-2000:]
            raise SystemExit(f"bench: {self.name} did not listen on {self.port}:\n{tail}")

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def haproxy_config(path, port, backends):
    with open(path, "w") as f:
        f.write("global\n    maxconn 8000\n    nbthread 1\n")
        f.write("defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n")
        f.write(f"listen smtp\n    bind 127.0.0.1:{port}\n    balance leastconn\n    option smtpchk EHLO lb.example\n")
        for i, b in enumerate(backends, 1):
            f.write(f"    server s{i} {b} check inter 1s\n")


def haproxy_edge_config(path, port, backends, table):
    """HAProxy with a per-source stick table (conn_cur, conn_rate) and a limit no bench
    client reaches: the cost of tracking, as --edge measures it for smtplb."""
    haproxy_config(path, port, backends)
    with open(path) as f:
        text = f.read()
    text = text.replace("    balance leastconn\n",
                        f"    balance leastconn\n    stick-table type ipv6 size {table} expire 10m "
                        "store conn_cur,conn_rate(60s)\n    tcp-request connection track-sc0 src\n"
                        "    tcp-request connection reject if { sc0_conn_cur gt 100000 }\n"
                        "    tcp-request connection reject if { sc0_conn_rate gt 1000000 }\n")
    with open(path, "w") as f:
        f.write(text)


def smtplb_config(path, port, backends, workers, access_log, edge_table=0):
    with open(path, "w") as f:
        f.write(f'[global]\nhostname = "lb.example"\nworkers = {workers}\nmax_connections = 8000\n')
        if edge_table:
            f.write(f"max_tracked_clients = {edge_table}\n")
        f.write("\n")
        # Access lines are written at level info: with "warn" they would be filtered out
        # and the log-on variant would measure nothing but formatting them.
        level = "info" if access_log else "warn"
        f.write(f'[log]\nlevel = "{level}"\naccess_log = {"true" if access_log else "false"}\n\n')
        f.write(f'[listener.bench]\naddress = "127.0.0.1"\nport = {port}\npool = "sinks"\n')
        if edge_table:
            # Limits no bench client reaches: every session pays the lookup and the count.
            f.write('max_connections_per_ip = 100000\nmax_connection_rate_per_ip = "1000000/1s"\n')
        f.write("\n")
        f.write('[pool.sinks]\nalgorithm = "leastconn"\n\n[pool.sinks.health_check]\ninterval = "1s"\n\n')
        for i, b in enumerate(backends, 1):
            host, p = b.rsplit(":", 1)
            f.write(f'[[pool.sinks.server]]\nname = "s{i}"\naddress = "{host}"\nport = {p}\n\n')


def fill_table(port, n):
    """Opens and resets n connections from distinct loopback sources (127.1.0.0 up), so a
    per-client table holds n keys (one per source address)."""
    for i in range(n):
        src = "127.%d.%d.%d" % (1 + (i >> 16) % 250, (i >> 8) & 255, 1 + (i & 255) % 254)
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        try:
            s.bind((src, 0))
            s.connect(("127.0.0.1", port))
        except OSError:
            pass
        finally:
            s.close()


def refused_reply(port):
    """What a client over a limit of one session per address reads: opens one session from
    127.0.0.2 and holds it, then a second; returns the second's bytes until EOF."""
    first = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0))
    try:
        read_greeting(first)
        second = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0))
        out = b""
        try:
            while True:
                d = second.recv(4096)
                if not d:
                    break
                out += d
        except (socket.timeout, ConnectionResetError) as e:
            out += f" [{type(e).__name__}]".encode()
        finally:
            second.close()
        return out
    finally:
        first.close()


def run_load(target, a, persistent):
    args = ["smtp-source", "-s", str(a.sessions if not persistent else a.persistent_sessions),
            "-m", str(a.messages), "-l", str(a.length if not persistent else a.persistent_length),
            "-f", "bench@client.example", "-t", "sink@backend.example"]
    if persistent:
        args.append("-d")
    args.append(f"127.0.0.1:{target.port}")
    c0 = cpu_seconds(target.pid) if target.pid else 0.0
    m0 = machine_busy_seconds()
    t0 = time.monotonic()
    rc = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=600)
    dt = time.monotonic() - t0
    c1 = cpu_seconds(target.pid) if target.pid else 0.0
    m1 = machine_busy_seconds()
    if rc.returncode != 0:
        print(f"# {target.name}: smtp-source failed: {rc.stderr.strip()[:200]}", file=sys.stderr)
        return None
    return (a.messages / dt, ((c1 - c0) * 1e6 / a.messages) if target.pid else float("nan"),
            (m1 - m0) * 1e6 / a.messages)


def greeting_latency(port, n):
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        s = socket.create_connection(("127.0.0.1", port), 5)
        s.settimeout(5)
        read_greeting(s)
        samples.append((time.perf_counter() - t0) * 1e6)
        s.sendall(b"QUIT\r\n")
        s.close()
    samples.sort()
    return [samples[int(len(samples) * q) - 1] for q in (0.5, 0.9, 0.99)]


def idle_memory(target, k):
    """RSS growth per session for k sessions held open after their greeting.
    Returns (bytes per session, sessions greeted)."""
    time.sleep(0.5)
    before = rss_bytes(target.pid)
    sel = selectors.DefaultSelector()
    socks, greeted = [], 0
    try:
        for i in range(k):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", target.port))
            except BlockingIOError:
                pass
            sel.register(s, selectors.EVENT_READ)
            socks.append(s)
            if i % 200 == 199:
                time.sleep(0.05)  # a steady arrival rate, not one burst at the backlog
        end = time.monotonic() + 60
        while greeted < k and time.monotonic() < end:
            for key, _ in sel.select(1):
                try:
                    d = key.fileobj.recv(4096)
                except OSError:
                    d = b""
                greeted += d.startswith(b"220")
                sel.unregister(key.fileobj)
        time.sleep(0.5)
        after = rss_bytes(target.pid)
    finally:
        for s in socks:
            s.close()
        sel.close()
    time.sleep(1.0)  # let the proxy close the backend sides before the next target
    return (after - before) / max(greeted, 1), greeted


def print_ratios(name, ref, med):
    """rate, CPU and machine CPU per message of target `name` over target `ref`."""
    print(f"ratio {name}/{ref}: rate {ratio(med[name][0], med[ref][0])}, "
          f"CPU per message {ratio(med[name][1], med[ref][1])}, "
          f"machine CPU per message {ratio(med[name][2], med[ref][2])}")


def ratio(x, y):
    return f"{x / y:.2f}x" if y and y == y and x == x else "-"


# ---------------------------------------------------------------------------------------
# Scale and overload modes: concurrency, overload, storm, fleet. Their load generators and
# scripted backends run as separate processes (this script with --helper ROLE), so no
# process's own descriptor limit or CPU is the bottleneck of another's.
# ---------------------------------------------------------------------------------------

SCALE_TESTS = ("concurrency", "overload", "storm", "fleet")
CLASSIC_TESTS = ("connect", "persistent", "latency", "idle")
TEST_GROUPS = {"classic": CLASSIC_TESTS, "scale": SCALE_TESTS + ("idle",), "all": CLASSIC_TESTS + SCALE_TESTS}
IP_BIND_ADDRESS_NO_PORT = 24
PAUSE = object()


def helper_argv(role, *args):
    return [sys.executable, os.path.abspath(__file__), "--helper", role] + [str(x) for x in args]


class ClientSession:
    """One scripted SMTP client session (lockstep: each reply decides the next command)."""
    __slots__ = ("sock", "t0", "buf", "step", "first", "t_first", "outcome", "delivered", "deadline", "paused")

    def __init__(self):
        self.buf, self.step, self.first, self.t_first = b"", 0, None, None
        self.outcome, self.delivered, self.deadline, self.paused = None, [], 0.0, False


def dialogue(kind, messages, length):
    """The steps (expected reply code, what to send after it, counts as a delivery)."""
    if kind == "storm":
        return [(b"220", b"QUIT\r\n", False), (b"221", None, False)]
    body = b"From: <bench@client.example>\r\nSubject: bench\r\n\r\n" + b"x" * max(0, length - 60) + b"\r\n.\r\n"
    steps = [(b"220", PAUSE if kind == "hold" else b"EHLO client.example\r\n", False)]
    if kind == "hold":
        steps.append((None, b"EHLO client.example\r\n", False))  # sent on "go"
    steps.append((b"250", b"MAIL FROM:<bench@client.example>\r\n", False))
    for m in range(messages):
        steps += [(b"250", b"RCPT TO:<sink@backend.example>\r\n", False), (b"250", b"DATA\r\n", False),
                  (b"354", body, False),
                  (b"250", b"MAIL FROM:<bench@client.example>\r\n" if m + 1 < messages else b"QUIT\r\n", True)]
    steps.append((b"221", None, False))
    return steps


def client_helper(argv):
    """Scripted SMTP clients on one epoll set. kind: hold (open all, wait for every greeting,
    report, then on "go" from stdin send one message each and QUIT), storm (open at a fixed
    rate, time the greeting, QUIT), overload (a fixed number of clients, each starting a new
    session as soon as its last one ended, for a fixed time). Prints JSON results."""
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=("hold", "storm", "overload"))
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--rate", type=float, default=0.0, help="connects per second (0: all at once)")
    p.add_argument("--start", type=float, default=0.0, help="CLOCK_MONOTONIC time to begin at")
    p.add_argument("--duration", type=float, default=0.0)
    p.add_argument("--messages", type=int, default=1)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--first-timeout", type=float, default=15.0)
    p.add_argument("--reply-timeout", type=float, default=15.0)
    p.add_argument("--source", default="")
    o = p.parse_args(argv)
    steps = dialogue(o.kind, o.messages, o.length)
    ep = select.epoll()
    live = {}
    done = []
    now = time.monotonic
    if o.start:
        time.sleep(max(0.0, o.start - now()))
    t_begin = now()
    end = t_begin + o.duration if o.kind == "overload" else 0.0
    stats = {"first_connect": None, "last_connect": None}

    def finish(s, outcome):
        s.outcome = outcome
        try:
            ep.unregister(s.sock.fileno())
        except (OSError, ValueError):
            pass
        live.pop(s.sock.fileno(), None)
        s.sock.close()
        done.append(s)

    def open_one():
        s = ClientSession()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        s.sock = sock
        if o.source:
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((o.source, 0))
        s.t0 = now()
        stats["first_connect"] = stats["first_connect"] or s.t0
        stats["last_connect"] = s.t0
        s.deadline = s.t0 + o.first_timeout
        err = sock.connect_ex(("127.0.0.1", o.port))
        if err not in (0, errno.EINPROGRESS):
            s.t_first = now() - s.t0
            live[sock.fileno()] = s
            ep.register(sock.fileno(), select.EPOLLIN)
            finish(s, "refused" if err == errno.ECONNREFUSED else f"connect-{errno.errorcode.get(err, err)}")
            return
        live[sock.fileno()] = s
        ep.register(sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP)

    def advance(s):
        """Acts on every complete reply in the buffer."""
        while True:
            end_of_reply = -1
            pos = 0
            while True:
                i = s.buf.find(b"\r\n", pos)
                if i < 0:
                    break
                line = s.buf[pos:i]
                pos = i + 2
                if len(line) < 4 or line[3:4] != b"-":
                    end_of_reply = pos
                    first_line = line
                    break
            if end_of_reply < 0:
                return
            reply_start = s.buf[:end_of_reply]
            s.buf = s.buf[end_of_reply:]
            t = now()
            if s.first is None:
                s.first = reply_start.split(b"\r\n", 1)[0][:40].decode("latin-1")
                s.t_first = t - s.t0
            expect, send, delivery = steps[s.step]
            if not first_line.startswith(expect):
                code = first_line[:9].decode("latin-1")
                finish(s, f"reply {code}" if s.step == 0 else f"broken: {code} at step {s.step}")
                return
            if delivery:
                s.delivered.append(t)
            s.step += 1
            if send is None:
                finish(s, "served")
                return
            if send is PAUSE:
                s.paused = True
                s.deadline = float("inf")
                return
            try:
                s.sock.send(send)
            except OSError as e:
                finish(s, f"broken: {type(e).__name__}")
                return
            s.deadline = t + o.reply_timeout

    def on_event(fd, ev):
        s = live.get(fd)
        if s is None:
            return
        try:
            d = s.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as e:
            what = "reset" if isinstance(e, ConnectionResetError) else (
                "refused" if isinstance(e, ConnectionRefusedError) else type(e).__name__)
            if s.t_first is None:
                s.t_first = now() - s.t0
            finish(s, what if s.first is None else f"broken: {what}")
            return
        if not d:
            if s.t_first is None:
                s.t_first = now() - s.t0
            finish(s, "closed" if s.first is None else "broken: closed")
            return
        s.buf += d
        advance(s)

    def expire():
        t = now()
        for s in [s for s in live.values() if s.deadline < t]:
            if s.t_first is None:
                s.t_first = t - s.t0
            finish(s, "timeout" if s.first is None else "broken: timeout")

    opened, next_open, last_scan = 0, t_begin, t_begin
    target = o.count
    while True:
        t = now()
        if o.kind == "overload":
            # The first sessions start spread over --rate's ramp, so their messages do not finish in step;
            # then every client starts its next session as soon as the last one ended.
            while opened < o.count and (o.rate <= 0 or next_open <= t) and t < end:
                open_one()
                opened += 1
                next_open += 1.0 / o.rate if o.rate > 0 else 0
            while len(live) < opened and t < end:
                open_one()
        else:
            while opened < target and (o.rate <= 0 or next_open <= t):
                open_one()
                opened += 1
                next_open += 1.0 / o.rate if o.rate > 0 else 0
        if o.kind == "overload" and t >= end:
            # Sessions still open at the end are cut off and reported as a count only: their
            # outcome is unknown, and waiting for them would add a queue_timeout to every phase.
            stats["unfinished"] = len(live)
            for s in list(live.values()):
                s.sock.close()
                s.outcome = "unfinished"  # its messages delivered so far still count
                done.append(s)
            live.clear()
            break
        if o.kind != "overload" and opened >= target and all(s.paused for s in live.values()):
            break
        wait = 0.05 if opened >= target else max(0.0, min(0.05, next_open - now()))
        for fd, ev in ep.poll(wait):
            on_event(fd, ev)
        if now() - last_scan > 0.1:
            expire()
            last_scan = now()

    def summary(sessions):
        out = {}
        for s in sessions:
            out[s.outcome] = out.get(s.outcome, 0) + 1
        return out

    if o.kind == "hold":
        held = list(live.values())
        print(json.dumps({"phase": "greeted", "greeted": len(held), "outcomes": summary(done)}), flush=True)
        sys.stdin.readline()
        first_failures = list(done)
        done.clear()
        for s in held:
            s.paused = False
            s.step = 2  # steps[1] is the EHLO sent now; steps[2] expects its reply
            try:
                s.sock.send(steps[1][1])
            except OSError as e:
                finish(s, f"broken: {type(e).__name__}")
                continue
            s.deadline = now() + o.reply_timeout
        while live:
            for fd, ev in ep.poll(0.1):
                on_event(fd, ev)
            expire()
        print(json.dumps({"phase": "done", "outcomes": summary(done), "delivered": sum(len(s.delivered) for s in done),
                          "before_greeting": summary(first_failures)}), flush=True)
        return
    res = {"outcomes": summary(done), "first_connect": stats["first_connect"], "last_connect": stats["last_connect"],
           "unfinished": stats.get("unfinished", 0)}
    if o.kind == "storm":
        res["greet_ms"] = [round(s.t_first * 1000, 3) for s in done if s.outcome == "served"]
    else:
        res["sessions"] = [[round(s.t0, 4), round((s.t_first or 0) * 1000, 2), s.outcome, [round(x, 4) for x in s.delivered]]
                           for s in done]
    print(json.dumps(res), flush=True)


def sink_helper(argv):
    """A scripted SMTP backend (asyncio) on one or many loopback ports: 220, 250 to EHLO/HELO/
    MAIL/RCPT/RSET/NOOP and anything else, 354 to DATA, 250 --delay seconds after the
    message's end, 221 to QUIT. --record FILE: on SIGTERM, writes each connection's port
    and arrival time (CLOCK_MONOTONIC) there as JSON. Prints "ready" once listening."""
    import asyncio
    p = argparse.ArgumentParser()
    p.add_argument("--ports", required=True, help="FIRST-LAST or one port")
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--record", default="")
    o = p.parse_args(argv)
    first, _, last = o.ports.partition("-")
    ports = range(int(first), int(last or first) + 1)
    arrivals = []

    class Sink(asyncio.Protocol):
        def __init__(self, port):
            self.port, self.buf, self.in_data, self.waiting, self.tr = port, b"", False, False, None

        def connection_made(self, tr):
            self.tr = tr
            if o.record:
                arrivals.append((self.port, time.monotonic()))
            tr.write(b"220 sink.example ESMTP\r\n")

        def data_received(self, d):
            self.buf += d
            self.process()

        def delivered(self):
            self.waiting = False
            if not self.tr.is_closing():
                self.tr.write(b"250 2.0.0 Ok: queued\r\n")
                self.process()

        def process(self):
            while not self.waiting and not self.tr.is_closing():
                if self.in_data:
                    i = self.buf.find(b"\r\n.\r\n")
                    if i >= 0:
                        self.buf = self.buf[i + 5:]
                    elif self.buf.startswith(b".\r\n"):
                        self.buf = self.buf[3:]
                    else:
                        if len(self.buf) > 8:
                            self.buf = self.buf[-4:]  # keep what may start the end mark
                        return
                    self.in_data = False
                    if o.delay > 0:
                        self.waiting = True
                        asyncio.get_running_loop().call_later(o.delay, self.delivered)
                        return
                    self.tr.write(b"250 2.0.0 Ok: queued\r\n")
                    continue
                i = self.buf.find(b"\n")
                if i < 0:
                    return
                line, self.buf = self.buf[:i].rstrip(b"\r").upper(), self.buf[i + 1:]
                if line.startswith(b"EHLO"):
                    self.tr.write(b"250-sink.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
                elif line.startswith(b"DATA"):
                    self.in_data = True
                    self.buf = b"\r\n" + self.buf  # the end mark may follow at once
                    self.tr.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                elif line.startswith(b"QUIT"):
                    self.tr.write(b"221 2.0.0 Bye\r\n")
                    self.tr.close()
                else:
                    self.tr.write(b"250 2.0.0 Ok\r\n")

    async def run():
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, lambda: stop.done() or stop.set_result(None))
        servers = []
        for port in ports:
            servers.append(await loop.create_server(lambda port=port: Sink(port), "127.0.0.1", port,
                                                    backlog=4096, reuse_address=True))
        print("ready", flush=True)
        await stop
        for s in servers:
            s.close()

    asyncio.run(run())
    if o.record:
        with open(o.record, "w") as f:
            json.dump(arrivals, f)


def start_helper(role, *args, stdin=None):
    return subprocess.Popen(helper_argv(role, *args), stdin=stdin, stdout=subprocess.PIPE, text=True)


def start_storm_client(gen, port, count, start, source):
    """The storm's client process: the C++ generator GEN, or (None) this script's Python one."""
    if gen is None:
        return start_helper("client", "storm", "--port", port, "--count", count, "--rate", count,
                            "--start", start, "--source", source)
    return subprocess.Popen([gen, "--port", str(port), "--count", str(count), "--rate", str(count),
                             "--start", repr(start), "--source", source], stdout=subprocess.PIPE, text=True)


def start_sink(ports, delay=0.0, record=""):
    args = ["--ports", ports, "--delay", delay]
    if record:
        args += ["--record", record]
    proc = start_helper("sink", *args)
    if proc.stdout.readline().strip() != "ready":
        raise SystemExit(f"bench: the scripted sink on {ports} did not start")
    return proc


def stop_proc(proc, timeout=10):
    if proc and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_smtp_sinks(ports, maxconn):
    # The backends' listen backlog follows net.core.somaxconn (4096 on Debian 12; N with
    # --somaxconn N), as the proxies' do.
    backlog = open("/proc/sys/net/core/somaxconn").read().strip()
    sinks = []
    for port in ports:
        sinks.append(subprocess.Popen(["smtp-sink", "-u", "nobody", "-m", str(maxconn), f"127.0.0.1:{port}", backlog],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        if not wait_port(port):
            raise SystemExit(f"bench: smtp-sink did not start on {port}")
    return sinks


def scale_smtplb_config(path, listeners, pools, max_connections, level="warn"):
    """listeners: [(name, port, pool)]; pools: {name: (pool lines, [server lines per server])}."""
    with open(path, "w") as f:
        f.write(f'[global]\nhostname = "lb.example"\nworkers = 1\nmax_connections = {max_connections}\n\n')
        f.write(f'[log]\nlevel = "{level}"\naccess_log = false\n\n[admin]\nsocket = ""\n\n')
        for name, port, pool in listeners:
            f.write(f'[listener.{name}]\naddress = "127.0.0.1"\nport = {port}\npool = "{pool}"\n'
                    f'max_connections = {max_connections}\n\n')
        for name, (lines, servers) in pools.items():
            f.write(f'[pool.{name}]\nalgorithm = "leastconn"\n{lines}\n')
            f.write(f'[pool.{name}.health_check]\ninterval = "2s"\n\n')
            for i, (addr, extra) in enumerate(servers, 1):
                host, p = addr.rsplit(":", 1)
                f.write(f'[[pool.{name}.server]]\nname = "{name[0]}{i}"\naddress = "{host}"\nport = {p}\n{extra}\n')


def scale_haproxy_config(path, listens, maxconn, extra_defaults=""):
    """listens: [(name, port, [server lines])]."""
    with open(path, "w") as f:
        f.write(f"global\n    maxconn {maxconn}\n    nbthread 1\n")
        f.write(f"defaults\n    mode tcp\n    maxconn {maxconn}\n    timeout connect 5s\n    timeout client 60s\n"
                "    timeout server 60s\n    timeout check 10s\n")  # smtplb's default check timeout
        f.write(extra_defaults)
        for name, port, servers in listens:
            f.write(f"listen {name}\n    bind 127.0.0.1:{port}\n    balance leastconn\n"
                    "    option smtpchk EHLO lb.example\n")
            for i, line in enumerate(servers, 1):
                f.write(f"    server {name[0]}{i} {line}\n")


def log_problems(path, since):
    """Lines a proxy logged after offset `since` (smtplb runs at level warn here, so every
    line is a warning or an error; for HAProxy, its [WARNING] and [ALERT] lines)."""
    try:
        with open(path, errors="replace") as f:
            f.seek(since)
            lines = [l.rstrip() for l in f if l.strip()]
    except OSError:
        return []
    return lines


def file_size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def meminfo_kb(key):
    for line in open("/proc/meminfo"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def sockstat_tcp():
    """(sockets in use, buffer pages) from /proc/net/sockstat."""
    for line in open("/proc/net/sockstat"):
        if line.startswith("TCP:"):
            f = line.split()
            return int(f[f.index("inuse") + 1]), int(f[f.index("mem") + 1])
    return 0, 0


def slab_socket_bytes():
    """Bytes in the slab caches a TCP socket uses (root only: /proc/slabinfo), or None."""
    caches = ("TCP", "sock_inode_cache", "filp", "dentry", "eventpoll_epi", "eventpoll_pwq")
    try:
        total = 0
        for line in open("/proc/slabinfo"):
            f = line.split()
            if f and f[0] in caches:
                total += int(f[1]) * int(f[3])
        return total
    except (OSError, ValueError, IndexError):
        return None


def listen_counters():
    """ListenOverflows and ListenDrops from /proc/net/netstat (the whole network namespace)."""
    lines = open("/proc/net/netstat").read().splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            d = dict(zip(names.split()[1:], values.split()[1:]))
            return int(d.get("ListenOverflows", 0)), int(d.get("ListenDrops", 0))
    return 0, 0


def listen_backlog(port):
    """The listening socket's backlog as the kernel holds it (ss: Send-Q of a LISTEN socket)."""
    try:
        out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=5).stdout
        return int(out.split()[2])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


class AcceptQueueWatch:
    """Samples the accept queues of some listening sockets (ss: Recv-Q of a LISTEN socket) every
    20 ms in a thread and keeps each one's maximum: the kernel counts overflows for the whole
    network namespace only, so this shows whose queue filled up."""

    def __init__(self, ports):
        import threading
        self.ports, self.peak, self.stop_flag = ports, {p: 0 for p in ports}, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop_flag.is_set():
            try:
                out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, timeout=5).stdout
            except (OSError, subprocess.SubprocessError):
                return
            for line in out.splitlines():
                f = line.split()
                if len(f) >= 4:
                    port = int(f[3].rsplit(":", 1)[1]) if f[3].rsplit(":", 1)[1].isdigit() else 0
                    if port in self.peak:
                        self.peak[port] = max(self.peak[port], int(f[1]))
            self.stop_flag.wait(0.02)

    def stop(self):
        self.stop_flag.set()
        self.thread.join()
        return self.peak


def fd_limit(pid):
    try:
        for line in open(f"/proc/{pid}/limits"):
            if line.startswith("Max open files"):
                return int(line.split()[3])
    except (OSError, ValueError):
        pass
    return None


def open_fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def thread_cpu_seconds(pid, tid):
    try:
        fields = open(f"/proc/{pid}/task/{tid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except OSError:
        return 0.0


def pct(sorted_values, q):
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, max(0, int(round(len(sorted_values) * q)) - 1))]


def med(values):
    v = [x for x in values if x == x]
    return statistics.median(v) if v else float("nan")


def layout_line(a):
    return (f"# layout: load generator, backends and proxy co-located on this {os.cpu_count()}-CPU machine "
            f"({os.uname().nodename}, kernel {os.uname().release}), all on loopback"
            f"{' of a private network namespace' if a.somaxconn else ''}; "
            f"one proxy runs at a time in the scale modes")


NETNS_ENV = "SMTPLB_BENCH_NETNS"


def enter_private_netns(somaxconn):
    """--somaxconn N: the whole run moves into a new network namespace (unshare --net runs
    this script again there), where loopback is brought up and the two accept-queue sysctls,
    which are per namespace, are set to N. Everything the run starts lives and dies with it."""
    if os.environ.get(NETNS_ENV) != str(os.getppid()):
        if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
            raise SystemExit("bench: --somaxconn needs root, unshare and ip (a private network namespace)")
        env = dict(os.environ, **{NETNS_ENV: str(os.getpid())})
        sys.stdout.flush()
        r = subprocess.run(["unshare", "--net", "--", sys.executable, os.path.abspath(__file__), *sys.argv[1:]],
                           env=env)
        raise SystemExit(r.returncode)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    for key in ("net/core/somaxconn", "net/ipv4/tcp_max_syn_backlog"):
        with open(f"/proc/sys/{key}", "w") as f:
            f.write(str(somaxconn))


def proxies(a):
    names = ["smtplb"]
    if not a.no_haproxy and shutil.which("haproxy"):
        names.insert(0, "haproxy")
    return names


def start_proxy(name, work, tag, port, smtplb, smtplb_writer, haproxy_writer):
    cfg = os.path.join(work, f"{name}-{tag}." + ("toml" if name == "smtplb" else "cfg"))
    if name == "smtplb":
        smtplb_writer(cfg)
        t = Target(f"{name}-{tag}", port, [smtplb, "-f", cfg])
    else:
        haproxy_writer(cfg)
        t = Target(f"{name}-{tag}", port, ["haproxy", "-db", "-f", cfg])
    t.start(work)
    return t


# ----- concurrency -----------------------------------------------------------------------

def run_concurrency(a, smtplb, work, port0):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    reserve = 200
    n = a.concurrency_sessions or max(1, (hard - reserve) // 2)
    sink_ports = [port0 + 10, port0 + 11]
    backends = [f"127.0.0.1:{p}" for p in sink_ports]
    # Scripted sinks, one process per port: smtp-sink slows down badly with thousands of
    # connections open (its checks and sessions timed out here at 5000 per process).
    sinks = [start_sink(str(p)) for p in sink_ports]
    clients_procs = max(1, min(4, (n + 3299) // 3300))
    print(f"\n## concurrency: sessions open at once through one proxy process, every client greeted, "
          f"then one message of {a.length} B and QUIT each")
    print(f"# descriptor limit (RLIMIT_NOFILE, hard, inherited by the proxies): {hard}; a relayed session takes "
          f"2 descriptors; ({hard} - {reserve} reserved) / 2 = {(hard - reserve) // 2} sessions; running {n} "
          f"from {clients_procs} client processes, 2 scripted backends (one process each)")
    rows = {p: [] for p in proxies(a)}
    try:
        for rnd in range(a.rounds):
            for name in proxies(a):
                port = port0 + (1 if name == "smtplb" else 2)
                t = start_proxy(
                    name, work, "conc", port, smtplb,
                    lambda cfg: scale_smtplb_config(cfg, [("bench", port, "sinks")],
                                                    {"sinks": ("", [(b, "") for b in backends])}, n + 100),
                    lambda cfg: scale_haproxy_config(cfg, [("bench", port, [f"{b} check inter 2s" for b in backends])],
                                                     min(n + 10, (hard - 32) // 2)))  # HAProxy wants 2 x maxconn + 16
                logpath = os.path.join(work, f"{t.name}.log")
                try:
                    time.sleep(a.settle)
                    log0 = file_size(logpath)
                    rss0, fds0, lim = rss_bytes(t.pid), open_fds(t.pid), fd_limit(t.pid)
                    slab0, sock0, slabc0 = meminfo_kb("Slab"), sockstat_tcp(), slab_socket_bytes()
                    per = [n // clients_procs + (1 if i < n % clients_procs else 0) for i in range(clients_procs)]
                    procs = [start_helper("client", "hold", "--port", port, "--count", k, "--rate",
                                          3000 / clients_procs, "--length", a.length, "--source",
                                          f"127.0.1.{i + 1}", stdin=subprocess.PIPE)
                             for i, k in enumerate(per)]
                    first = [json.loads(p.stdout.readline() or "{}") for p in procs]
                    time.sleep(0.5)
                    rss1, fds1 = rss_bytes(t.pid), open_fds(t.pid)
                    slab1, sock1, slabc1 = meminfo_kb("Slab"), sockstat_tcp(), slab_socket_bytes()
                    for p in procs:
                        p.stdin.write("go\n")
                        p.stdin.flush()
                    final = [json.loads(p.stdout.readline() or "{}") for p in procs]
                    for p in procs:
                        p.wait(30)
                    time.sleep(0.5)
                    rss2 = rss_bytes(t.pid)
                    problems = log_problems(logpath, log0)
                finally:
                    t.stop()
                greeted = sum(f.get("greeted", 0) for f in first)
                refused = {}
                for f in first:
                    for k, v in f.get("outcomes", {}).items():
                        refused[k] = refused.get(k, 0) + v
                outcomes = {}
                for f in final:
                    for k, v in f.get("outcomes", {}).items():
                        outcomes[k] = outcomes.get(k, 0) + v
                delivered = sum(f.get("delivered", 0) for f in final)
                sockets = sock1[0] - sock0[0]
                kernel_per_socket = (slab1 - slab0) * 1024 / sockets if sockets > 0 else float("nan")
                slab_caches = ((slabc1 - slabc0) / sockets) if slabc0 is not None and sockets > 0 else float("nan")
                buf_per_socket = (sock1[1] - sock0[1]) * PAGE / sockets if sockets > 0 else float("nan")
                r = {"n": n, "greeted": greeted, "not_greeted": refused, "served": outcomes.get("served", 0),
                     "failed": {k: v for k, v in outcomes.items() if k != "served"}, "delivered": delivered,
                     "rss0": rss0, "rss1": rss1, "rss2": rss2, "per_session": (rss1 - rss0) / max(greeted, 1),
                     "fds0": fds0, "fds1": fds1, "limit": lim, "log": problems, "sockets": sockets,
                     "kernel_per_socket": kernel_per_socket, "slab_caches_per_socket": slab_caches,
                     "buf_per_socket": buf_per_socket}
                rows[name].append(r)
                print(f"# round {rnd + 1} {name}: {greeted}/{n} greeted, {r['served']} served to QUIT, "
                      f"{delivered} messages; RSS {rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MiB with all open "
                      f"({r['per_session']:.0f} B/session), {rss2 / 2**20:.1f} MiB after; fds {fds0} -> {fds1} of "
                      f"{lim}; not greeted {refused or 0}; failed after greeting {r['failed'] or 0}; "
                      f"{len(problems)} log lines")
    finally:
        for s in sinks:
            stop_proc(s)
    m = {name: {k: med([r[k] for r in rs]) for k in ("per_session", "rss1", "rss0", "kernel_per_socket",
                                                   "slab_caches_per_socket", "buf_per_socket")}
         for name, rs in rows.items() if rs}
    if "haproxy" in m:
        print(f"ratio smtplb/haproxy: RSS per session {ratio(m['smtplb']['per_session'], m['haproxy']['per_session'])}, "
              f"RSS with all sessions open {ratio(m['smtplb']['rss1'], m['haproxy']['rss1'])}")
    print(f"{'target':<9} {'round':>5} {'greeted':>13} {'served':>7} {'refused/err':>11} {'log':>4} "
          f"{'RSS idle':>9} {'RSS open':>9} {'B/session':>9}")
    for name, rs in rows.items():
        for i, r in enumerate(rs, 1):
            bad = sum(r["not_greeted"].values()) + sum(r["failed"].values())
            print(f"{name:<9} {i:>5} {r['greeted']:>6}/{r['n']:<6} {r['served']:>7} {bad:>11} {len(r['log']):>4} "
                  f"{r['rss0'] / 2**20:>7.1f}Mi {r['rss1'] / 2**20:>7.1f}Mi {r['per_session']:>9.0f}")
    for name, rs in rows.items():
        for r in rs:
            for k, v in list(r["not_greeted"].items()) + list(r["failed"].items()):
                print(f"# {name}: {v} sessions: {k}")
            for line in r["log"][:5]:
                print(f"# {name} log: {line[:200]}")
    s = m.get("smtplb")
    if s:
        user = s["per_session"]
        kern = s["kernel_per_socket"]
        paper = s["rss0"] + 100000 * user
        print(f"# 100 000 sessions on paper (smtplb, medians): RSS {s['rss0'] / 2**20:.1f} MiB at start + "
              f"100 000 x {user:.0f} B = {paper / 2**20:.1f} MiB: "
              f"{'fits' if paper <= 128 * 2**20 else 'does NOT fit'} in 128 MiB")
        print(f"# kernel, per TCP socket (outside RSS): {kern:.0f} B of slab (/proc/meminfo Slab over "
              f"{med([r['sockets'] for r in rows['smtplb']]):.0f} new sockets: clients', the proxy's both sides, "
              f"the backends'), of which {s['slab_caches_per_socket']:.0f} B in the TCP, sock_inode_cache, "
              f"filp, dentry and eventpoll caches; {s['buf_per_socket']:.0f} B of buffers idle "
              f"(/proc/net/sockstat mem). The proxy holds 2 sockets per session: 100 000 sessions need "
              f"about {200000 * kern / 2**20:.0f} MiB of kernel memory besides the RSS, "
              f"and 200 000 descriptors plus a few hundred (LimitNOFILE, fs.nr_open)")
    return rows


# ----- overload --------------------------------------------------------------------------

def run_overload(a, smtplb, work, port0):
    q = a.queue_timeout
    per_server, servers = a.overload_slots, 2
    cap = per_server * servers
    sink_ports = f"{port0 + 20}-{port0 + 19 + servers}"
    backends = [f"127.0.0.1:{port0 + 20 + i}" for i in range(servers)]
    sink = start_sink(sink_ports, delay=0.2)
    print(f"\n## overload: backends take 200 ms per message; {servers} servers x max_connections {per_server} = "
          f"{cap} sessions; queue_timeout {q * 1000:.0f} ms (HAProxy: maxconn {per_server} per server, timeout queue "
          f"{q * 1000:.0f} ms); {a.overload_messages} messages per session; {a.overload_seconds:.0f} s at {cap} "
          f"clients (full capacity), then {cap * 3} (3x)")
    res = {p: [] for p in proxies(a)}

    def phase(port, clients):
        p = start_helper("client", "overload", "--port", port, "--count", clients, "--rate",
                         clients / min(1.0, a.overload_warmup), "--duration",
                         a.overload_seconds, "--messages", a.overload_messages, "--length", a.length,
                         "--first-timeout", q + 10, "--reply-timeout", 10)
        out = json.loads(p.stdout.readline() or "{}")
        p.wait(30)
        sessions = out.get("sessions", [])
        t0 = min((s[0] for s in sessions), default=0.0)
        lo, hi = t0 + a.overload_warmup, t0 + a.overload_seconds
        n = sum(1 for s in sessions for d in s[3] if lo <= d < hi)
        return n / (hi - lo), sessions, out.get("unfinished", 0)

    try:
        for rnd in range(a.rounds):
            for name in proxies(a):
                port = port0 + (3 if name == "smtplb" else 4)
                t = start_proxy(
                    name, work, "over", port, smtplb,
                    lambda cfg: scale_smtplb_config(
                        cfg, [("bench", port, "slow")],
                        {"slow": (f'queue_timeout = "{int(q * 1000)}ms"\n',
                                  [(b, f"max_connections = {per_server}") for b in backends])}, 5000),
                    lambda cfg: scale_haproxy_config(
                        cfg, [("bench", port, [f"{b} maxconn {per_server} check inter 2s" for b in backends])], 5000,
                        extra_defaults=f"    timeout queue {int(q * 1000)}ms\n"))
                try:
                    time.sleep(a.settle)
                    full, _, _ = phase(port, cap)
                    over, sessions, unfinished = phase(port, cap * 3)
                finally:
                    t.stop()
                kinds = {}
                for s in sessions:
                    k = s[2]
                    if k == "unfinished":
                        continue
                    if k == "served":
                        k = "served at once" if s[1] < 50 else "served after waiting"
                    elif k.startswith("reply 421"):
                        k = "421 4.3.2" if k.startswith("reply 421 4.3.2") else k
                    kinds.setdefault(k, []).append(s[1])
                if unfinished:
                    kinds["still open at the end (not counted)"] = [0.0] * unfinished
                res[name].append((full, over, kinds))
    finally:
        stop_proc(sink)
    print("ratio of delivered messages/s at 3x to at full capacity (target >= 0.95): " + ", ".join(
        f"{name} {med([over / full if full else float('nan') for full, over, _ in rs]):.2f}x"
        for name, rs in res.items()))
    if "haproxy" in res and res["haproxy"]:
        print(f"ratio smtplb/haproxy, messages/s at 3x: "
              f"{ratio(med([r[1] for r in res['smtplb']]), med([r[1] for r in res['haproxy']]))}")
    print(f"{'target':<9} {'round':>5} {'msgs/s full':>11} {'msgs/s 3x':>10} {'ratio':>6}   what each session at 3x saw "
          f"(count, max ms to the first reply or close)")
    for name, rs in res.items():
        for i, (full, over, kinds) in enumerate(rs, 1):
            seen = "; ".join(f"{k} {len(v)}" + ("" if k.startswith("still") else f" (max {max(v):.0f} ms)")
                             for k, v in sorted(kinds.items()))
            print(f"{name:<9} {i:>5} {full:>11.1f} {over:>10.1f} {over / full if full else float('nan'):>5.2f}x   {seen}")
    limit = q * 1000 + 50
    for name, rs in res.items():
        for i, (_, _, kinds) in enumerate(rs, 1):
            refusals = kinds.get("421 4.3.2", [])
            late = sum(1 for x in refusals if x > limit)
            bad = {k: len(v) for k, v in kinds.items() if not k.startswith(("served", "421 4.3.2", "still open"))}
            print(f"# {name} round {i}: {len(refusals)} x 421 4.3.2, {late} later than queue_timeout + 50 ms "
                  f"({limit:.0f} ms); closed without reply, reset, timed out or other: {bad or 'none'}")
    return res


# ----- storm -----------------------------------------------------------------------------

def run_storm(a, smtplb, work, port0):
    n, k = a.storm_connections, a.storm_clients
    sink_ports = [port0 + 30, port0 + 31]
    backends = [f"127.0.0.1:{p}" for p in sink_ports]
    # Both proxies may hold as many sessions as their descriptors allow (HAProxy: maxconn;
    # smtplb: max_connections, past which it answers 421 4.3.2).
    limit = (resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 200) // 2
    # The C++ generator (tests/bench/storm_client, built with the tests) opens connections
    # several times faster than the Python client, which cannot open 20 000 in 1 s on a
    # 2-core machine; the Python one stays as the fallback.
    gen = os.path.join(os.path.dirname(smtplb), "tests", "bench", "storm_client")
    if not os.access(gen, os.X_OK):
        print(f"# no storm_client at {gen} (built with -DSMTPLB_TESTS=ON): using the slower Python client",
              file=sys.stderr)
        gen = None
    sinks = start_smtp_sinks(sink_ports, 10000)
    somax = open("/proc/sys/net/core/somaxconn").read().strip()
    synb = open("/proc/sys/net/ipv4/tcp_max_syn_backlog").read().strip()
    print(f"\n## storm: {n} connections opened within 1 s to an idle proxy by {k} client processes "
          f"({'tests/bench/storm_client' if gen else 'bench.py --helper client storm'}); each reads "
          f"the greeting, sends QUIT, reads 221 and closes (so the proxy never holds {n} sessions, which would "
          f"take {2 * n} descriptors); 2 smtp-sink backends; proxies limited to {limit} sessions "
          f"(descriptors); net.core.somaxconn {somax}, tcp_max_syn_backlog {synb}")
    res = {p: [] for p in ["direct"] + proxies(a)}
    try:
        for rnd in range(a.rounds):
            for name in (["direct"] if rnd == 0 else []) + proxies(a):
                port = port0 + (5 if name == "smtplb" else 6)
                if name == "direct":  # the load generator and one backend alone: the machine's own ceiling
                    t = Target("direct", sink_ports[0], None)
                else:
                    t = start_proxy(
                        name, work, "storm", port, smtplb,
                        lambda cfg: scale_smtplb_config(cfg, [("bench", port, "sinks")],
                                                        {"sinks": ("", [(b, "") for b in backends])}, limit),
                        lambda cfg: scale_haproxy_config(
                            cfg, [("bench", port, [f"{b} check inter 2s" for b in backends])], limit))
                port = t.port
                try:
                    time.sleep(a.settle)
                    backlog = listen_backlog(port)
                    watch = AcceptQueueWatch(sorted({port} | set(sink_ports)))
                    c0 = listen_counters()
                    start = time.monotonic() + 0.5
                    per = [n // k + (1 if i < n % k else 0) for i in range(k)]
                    procs = [start_storm_client(gen, port, c, start, f"127.0.2.{i + 1}") for i, c in enumerate(per)]
                    outs = [json.loads(p.stdout.readline() or "{}") for p in procs]
                    for p in procs:
                        p.wait(30)
                    c1 = listen_counters()
                finally:
                    peaks = watch.stop()
                    t.stop()
                lat = sorted(x for o in outs for x in o.get("greet_ms", []))
                outcomes = {}
                for o in outs:
                    for kk, v in o.get("outcomes", {}).items():
                        outcomes[kk] = outcomes.get(kk, 0) + v
                span = (max(o.get("last_connect") or 0 for o in outs) - min(o.get("first_connect") or 1e18 for o in outs))
                res[name].append({"greeted": len(lat), "p50": pct(lat, 0.5), "p99": pct(lat, 0.99),
                                  "max": lat[-1] if lat else float("nan"), "span": span, "backlog": backlog,
                                  "overflows": (c0[0], c1[0]), "drops": (c0[1], c1[1]),
                                  "queue": peaks.get(port, 0),
                                  "sink_queue": max(peaks.get(p, 0) for p in sink_ports) if name != "direct" else None,
                                  "other": {kk: v for kk, v in outcomes.items() if kk != "served"}})
    finally:
        for s in sinks:
            s.terminate()
        for s in sinks:
            s.wait(5)
    if "haproxy" in res and res["haproxy"]:
        print(f"ratio smtplb/haproxy: p50 to greeting {ratio(med([r['p50'] for r in res['smtplb']]), med([r['p50'] for r in res['haproxy']]))}, "
              f"p99 {ratio(med([r['p99'] for r in res['smtplb']]), med([r['p99'] for r in res['haproxy']]))}")
    print(f"{'target':<9} {'round':>5} {'greeted':>13} {'opened in':>9} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} "
          f"{'backlog':>7} {'queue max':>9} {'backends':>8} {'ListenOverflows':>17} {'ListenDrops':>17}")
    for name, rs in res.items():
        for i, r in enumerate(rs, 1):
            ov, dr = r["overflows"], r["drops"]
            print(f"{name:<9} {i:>5} {r['greeted']:>6}/{n:<6} {r['span']:>8.2f}s {r['p50']:>7.1f} {r['p99']:>7.1f} "
                  f"{r['max']:>7.1f} {r['backlog'] if r['backlog'] is not None else '-':>7} {r['queue']:>9} "
                  f"{r['sink_queue'] if r['sink_queue'] is not None else '-':>8} "
                  f"{ov[0]:>6}->{ov[1]:<6}+{ov[1] - ov[0]:<3} {dr[0]:>6}->{dr[1]:<6}+{dr[1] - dr[0]:<3}")
    for name, rs in res.items():
        for i, r in enumerate(rs, 1):
            if r["other"]:
                print(f"# {name} round {i}: not greeted: {r['other']}")
    print("# ListenOverflows/ListenDrops count the whole network namespace (the backends' listeners too); queue max: "
          "the longest accept queue seen on the target's listening socket (sampled every 20 ms), backends: the same "
          "for the backends' (a queue at its backlog overflows)")
    return res


# ----- fleet -----------------------------------------------------------------------------

def busiest_window(times, lo, hi, width=0.1):
    ts = sorted(t for t in times if lo <= t < hi)
    best, j = 0, 0
    for i, t in enumerate(ts):
        while ts[j] <= t - width:
            j += 1
        best = max(best, i - j + 1)
    avg = len(ts) * width / (hi - lo) if hi > lo else float("nan")
    return best, avg, len(ts)


def analyse_checks(arrivals, t_start, t_end, interval, t_reload=None):
    times = [t for _, t in arrivals if t_start <= t <= t_end]
    if not times:
        return None
    first = min(times)
    out = {"first_check_after_start": first - t_start}
    out["first"] = busiest_window(times, first, first + interval)
    steady_end = t_reload if t_reload else t_end
    out["steady"] = busiest_window(times, first + interval, steady_end)
    if t_reload:
        out["reload"] = busiest_window(times, t_reload, t_reload + interval)
        out["after_reload"] = busiest_window(times, t_reload + interval, t_end)
    per = {}
    for port, t in arrivals:
        if t_start <= t <= t_end:
            per.setdefault(port, []).append(t)
    gaps = sorted(b - a for ts in per.values() for a, b in zip(sorted(ts), sorted(ts)[1:]))
    out["servers"] = len(per)
    out["gap"] = (pct(gaps, 0.01), pct(gaps, 0.5), pct(gaps, 0.99))
    return out


def run_fleet(a, smtplb, work, port0):
    size, interval, secs = a.fleet_servers, 2.0, a.fleet_seconds
    fleet_first = port0 + 1000
    fleet_ports = f"{fleet_first}-{fleet_first + size - 1}"
    data_ports = [port0 + 40, port0 + 41]
    data_backends = [f"127.0.0.1:{p}" for p in data_ports]
    fleet_backends = [f"127.0.0.1:{fleet_first + i}" for i in range(size)]
    sinks = start_smtp_sinks(data_ports, 4096)
    reload_at = secs * 0.6 if secs >= 2.5 * interval else None
    print(f"\n## fleet: {size} scripted backends (one asyncio process, ports {fleet_ports}) in one pool, SMTP checks "
          f"every 2 s, {secs:.0f} s per proxy" + (f" (smtplb reloaded with SIGHUP at {reload_at:.0f} s)" if reload_at else "")
          + f"; then a connect test ({a.fleet_messages} messages, one per connection, {a.sessions} in parallel) "
          f"through a second listener with 2 smtp-sink backends, with the fleet's checks running and without the fleet")
    res = {p: [] for p in proxies(a)}
    smtplb_pools = {"sinks": ("", [(b, "") for b in data_backends]), "fleet": ("", [(b, "") for b in fleet_backends])}
    try:
        for rnd in range(a.rounds):
            for name in proxies(a):
                port, fport = port0 + (7 if name == "smtplb" else 8), port0 + (9 if name == "smtplb" else 12)
                def without_fleet():
                    t2 = start_proxy(
                        name, work, "nofleet", port, smtplb,
                        lambda cfg: scale_smtplb_config(cfg, [("data", port, "sinks")],
                                                        {"sinks": smtplb_pools["sinks"]}, 5000),
                        lambda cfg: scale_haproxy_config(cfg, [("data", port, [f"{b} check inter 2s" for b in data_backends])],
                                                         5000))
                    try:
                        time.sleep(a.settle)
                        a2 = argparse.Namespace(**vars(a))
                        a2.messages = a.fleet_messages
                        without = run_load(t2, a2, False)
                    finally:
                        t2.stop()
                    return without

                if rnd % 2:  # alternate the order, so neither side always runs on a warmer machine
                    without = without_fleet()
                record = os.path.join(work, f"fleet-{name}-{rnd}.json")
                fleet = start_sink(fleet_ports, record=record)
                try:
                    t_start = time.monotonic()
                    t = start_proxy(
                        name, work, "fleet", port, smtplb,
                        lambda cfg: scale_smtplb_config(cfg, [("data", port, "sinks"), ("fleet", fport, "fleet")],
                                                        smtplb_pools, 5000),
                        lambda cfg: scale_haproxy_config(
                            cfg, [("data", port, [f"{b} check inter 2s" for b in data_backends]),
                                  ("fleet", fport, [f"{b} check inter 2s" for b in fleet_backends])], 5000))
                    try:
                        time.sleep(1.0)
                        c0, m0 = cpu_seconds(t.pid), thread_cpu_seconds(t.pid, t.pid)
                        w0 = time.monotonic()
                        t_reload = None
                        if reload_at and name == "smtplb":
                            time.sleep(max(0.0, t_start + reload_at - time.monotonic()))
                            t_reload = time.monotonic()
                            t.proc.send_signal(signal.SIGHUP)
                        time.sleep(max(0.0, t_start + secs - time.monotonic()))
                        c1, m1 = cpu_seconds(t.pid), thread_cpu_seconds(t.pid, t.pid)
                        w1 = time.monotonic()
                        t_end = w1
                        a2 = argparse.Namespace(**vars(a))
                        a2.messages = a.fleet_messages
                        with_fleet = run_load(t, a2, False)
                    finally:
                        t.stop()
                finally:
                    stop_proc(fleet)
                arrivals = json.load(open(record))
                checks = analyse_checks(arrivals, t_start, t_end, interval, t_reload)
                if not rnd % 2:
                    without = without_fleet()
                res[name].append({"cpu": (c1 - c0) / (w1 - w0) * 100, "control": (m1 - m0) / (w1 - w0) * 100,
                                  "checks": checks, "with": with_fleet[0] if with_fleet else float("nan"),
                                  "without": without[0] if without else float("nan")})
    finally:
        for s in sinks:
            s.terminate()
        for s in sinks:
            s.wait(5)

    def peak(r, key):
        c = r["checks"]
        return c[key][0] / c[key][1] if c and key in c and c[key][1] else float("nan")

    if "haproxy" in res and res["haproxy"]:
        print(f"ratio smtplb/haproxy: process CPU {ratio(med([r['cpu'] for r in res['smtplb']]), med([r['cpu'] for r in res['haproxy']]))}, "
              f"busiest 100 ms over average, steady {ratio(med([peak(r, 'steady') for r in res['smtplb']]), med([peak(r, 'steady') for r in res['haproxy']]))}, "
              f"first round {ratio(med([peak(r, 'first') for r in res['smtplb']]), med([peak(r, 'first') for r in res['haproxy']]))}")
    print("data-path rate with the fleet's checks / without the fleet: " + ", ".join(
        f"{name} {med([r['with'] / r['without'] for r in rs]):.2f}x" for name, rs in res.items() if rs))
    print(f"{'target':<9} {'round':>5} {'CPU %':>6} {'ctl %':>6} {'first round':>17} {'steady':>17} {'after reload':>17} "
          f"{'gap p1/p50/p99 s':>18} {'msgs/s with':>11} {'without':>8}")
    for name, rs in res.items():
        for i, r in enumerate(rs, 1):
            c = r["checks"] or {}

            def w(key):
                v = c.get(key)
                return f"{v[0]:>3} max/{v[1]:>5.1f} avg" if v else "-"
            gap = c.get("gap")
            ctl = f"{r['control']:.1f}" if name == "smtplb" else "-"
            print(f"{name:<9} {i:>5} {r['cpu']:>6.1f} {ctl:>6} {w('first'):>17} {w('steady'):>17} {w('reload'):>17} "
                  f"{('%.2f/%.2f/%.2f' % gap) if gap else '-':>18} {r['with']:>11.0f} {r['without']:>8.0f}")
    print("# CPU %: the whole proxy process over the idle measurement (checks only), in % of one core; ctl %: "
          "smtplb's control-loop thread (the main thread) alone. Windows: the busiest 100 ms's checks and the "
          "average per 100 ms, for the first 2 s after the first check, the rest until the reload (or the end), "
          "and the 2 s after smtplb's reload. gap: time between two checks of one server.")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smtplb", default="build/smtplb", help="smtplb binary (default build/smtplb)")
    ap.add_argument("--tests", default=None,
                    help="comma list of connect,persistent,latency,idle (per message and per session) and "
                         "concurrency,overload,storm,fleet (scale and overload); groups: classic (the first four, "
                         "the default), scale (the last four and idle; the default with --quick), all")
    ap.add_argument("--quick", action="store_true",
                    help="smaller counts and one round (unless --rounds): the scale modes in under a minute")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 3; 1 with --quick)")
    ap.add_argument("--messages", type=int, default=10000)
    ap.add_argument("--sessions", type=int, default=50, help="parallel sessions, connect test")
    ap.add_argument("--length", type=int, default=512, help="message bytes, connect test")
    ap.add_argument("--persistent-sessions", type=int, default=20)
    ap.add_argument("--persistent-length", type=int, default=20000)
    ap.add_argument("--latency-sessions", type=int, default=2000)
    ap.add_argument("--idle-sessions", type=int, default=3000)
    ap.add_argument("--concurrency-sessions", type=int, default=0,
                    help="concurrency: sessions held at once (default: what the descriptor limit allows)")
    ap.add_argument("--overload-slots", type=int, default=10, help="overload: max_connections per server (2 servers)")
    ap.add_argument("--overload-messages", type=int, default=5, help="overload: messages per session")
    ap.add_argument("--overload-seconds", type=float, default=10.0, help="overload: seconds per phase")
    ap.add_argument("--overload-warmup", type=float, default=1.0,
                    help="overload: seconds at the start of a phase not counted in the rate (the first "
                         "sessions start spread over it, or over 1 s if it is longer)")
    ap.add_argument("--queue-timeout", type=float, default=2.0, help="overload: queue_timeout / timeout queue, s")
    ap.add_argument("--storm-connections", type=int, default=20000)
    ap.add_argument("--storm-clients", type=int, default=4, help="storm: client processes")
    ap.add_argument("--fleet-servers", type=int, default=1000)
    ap.add_argument("--fleet-seconds", type=float, default=30.0, help="fleet: seconds of checks per proxy")
    ap.add_argument("--fleet-messages", type=int, default=5000, help="fleet: messages in each connect test")
    ap.add_argument("--backends", type=int, default=2)
    ap.add_argument("--base-port", type=int, default=22025)
    ap.add_argument("--workers", default="1",
                    help="comma list of smtplb worker counts, one target each (default 1, like nbthread 1)")
    ap.add_argument("--access-log", action="store_true", help="also run smtplb with its access log on")
    ap.add_argument("--baseline", metavar="BINARY",
                    help="another smtplb build (an older commit, say), run as target 'baseline' with the same "
                         "configs (baseline-w2-log etc. when there are several variants)")
    ap.add_argument("--no-haproxy", action="store_true")
    ap.add_argument("--somaxconn", type=int, metavar="N", default=0,
                    help="run in a private network namespace (root; unshare and ip) whose net.core.somaxconn "
                         "and net.ipv4.tcp_max_syn_backlog are N, as a host tuned for accept storms would have "
                         "them; the host's own settings are not touched")
    ap.add_argument("--edge", type=int, metavar="KEYS", default=0,
                    help="also run smtplb-edge and haproxy-edge: per-client limits on (never reached by the "
                         "bench) and a client table filled with KEYS distinct addresses first; and show what a "
                         "client over a limit of one session per address reads from each")
    ap.add_argument("--floor", metavar="MODES", default="",
                    help="also run the yardstick relay (tests/bench/relay_floor.cpp): comma list of "
                         "plain,splice,sockmap (sockmap needs root)")
    ap.add_argument("--floor-bin", metavar="BINARY",
                    help="relay_floor binary (default: tests/bench/relay_floor next to --smtplb's build)")
    a = ap.parse_args()
    if a.somaxconn:
        enter_private_netns(a.somaxconn)
    if a.quick:
        for key, value in (("concurrency_sessions", 2000), ("overload_seconds", 2.5),
                           ("queue_timeout", 1.0), ("storm_connections", 5000), ("fleet_seconds", 5.0),
                           ("fleet_messages", 500), ("messages", 2000), ("latency_sessions", 500),
                           ("idle_sessions", 1000)):
            if getattr(a, key) == ap.get_default(key):
                setattr(a, key, value)
    a.settle = 0.5 if a.quick else 1.5  # seconds from a proxy's start to the first client
    if a.rounds is None:
        a.rounds = 1 if a.quick else 3
    if a.tests is None:
        a.tests = "scale" if a.quick else "classic"
    tests = []
    for t in a.tests.split(","):
        for u in TEST_GROUPS.get(t, (t,)):
            if u not in CLASSIC_TESTS + SCALE_TESTS:
                raise SystemExit(f"bench: unknown test {u!r}")
            if u not in tests:
                tests.append(u)
    floor_modes = [m for m in a.floor.split(",") if m]
    for m in floor_modes:
        if m not in ("plain", "splice", "sockmap"):
            raise SystemExit(f"bench: --floor takes plain, splice and sockmap, not {m!r}")
    if "sockmap" in floor_modes and os.geteuid() != 0:
        print("# floor-sockmap needs root (it loads a BPF program): left out", file=sys.stderr)
        floor_modes.remove("sockmap")
    for tool in ("smtp-sink", "smtp-source"):
        if not shutil.which(tool):
            raise SystemExit(f"bench: {tool} is missing (Debian package postfix)")
    smtplb = os.path.abspath(a.smtplb)
    if not os.access(smtplb, os.X_OK):
        raise SystemExit(f"bench: no smtplb binary at {smtplb} (scripts/build.sh builds one)")

    print(layout_line(a))
    classic = [t for t in tests if t in CLASSIC_TESTS]
    if classic or a.edge or floor_modes:
        run_classic(a, classic, floor_modes, smtplb)
    scale = [t for t in tests if t in SCALE_TESTS]
    if scale:
        work = tempfile.mkdtemp(prefix="smtplb-bench.")
        port0 = a.base_port + 300
        try:
            for t in scale:
                {"concurrency": run_concurrency, "overload": run_overload, "storm": run_storm,
                 "fleet": run_fleet}[t](a, smtplb, work, port0)
                sys.stdout.flush()
        finally:
            shutil.rmtree(work, ignore_errors=True)


def run_classic(a, tests, floor_modes, smtplb):
    work = tempfile.mkdtemp(prefix="smtplb-bench.")
    backends, sinks, targets = [], [], []
    try:
        for i in range(a.backends):
            port = a.base_port + i
            backends.append(f"127.0.0.1:{port}")
            sinks.append(subprocess.Popen(["smtp-sink", "-u", "nobody", "-m", "5000", f"127.0.0.1:{port}", "4096"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            if not wait_port(port):
                raise SystemExit(f"bench: smtp-sink did not start on {port}")
        port = a.base_port + 100
        targets.append(Target("direct", a.base_port, None))
        if not a.no_haproxy and shutil.which("haproxy"):
            cfg = os.path.join(work, "haproxy.cfg")
            haproxy_config(cfg, port, backends)
            targets.append(Target("haproxy", port, ["haproxy", "-db", "-f", cfg]))
            port += 1
        elif not a.no_haproxy:
            print("# haproxy is not installed: no comparison (apt-get install haproxy)", file=sys.stderr)
        if a.edge and not a.no_haproxy and shutil.which("haproxy"):
            cfg = os.path.join(work, "haproxy-edge.cfg")
            haproxy_edge_config(cfg, port, backends, a.edge)
            targets.append(Target("haproxy-edge", port, ["haproxy", "-db", "-f", cfg]))
            port += 1
        variants = [(int(w), False) for w in a.workers.split(",")]
        if a.access_log:
            variants.append((variants[0][0], True))
        for workers, log in variants:
            name = f"smtplb-w{workers}" + ("-log" if log else "") if len(variants) > 1 else "smtplb"
            cfg = os.path.join(work, f"{name}.toml")
            smtplb_config(cfg, port, backends, workers, log)
            targets.append(Target(name, port, [smtplb, "-f", cfg]))
            port += 1
        if a.edge:
            cfg = os.path.join(work, "smtplb-edge.toml")
            smtplb_config(cfg, port, backends, variants[0][0], False, edge_table=a.edge)
            targets.append(Target("smtplb-edge", port, [smtplb, "-f", cfg]))
            port += 1
        # The baseline runs in every variant too (workers, access log on/off), so before
        # and after compare in one run.
        for workers, log in variants if a.baseline else []:
            name = f"baseline-w{workers}" + ("-log" if log else "") if len(variants) > 1 else "baseline"
            cfg = os.path.join(work, f"{name}.toml")
            smtplb_config(cfg, port, backends, workers, log)
            targets.append(Target(name, port, [os.path.abspath(a.baseline), "-f", cfg]))
            port += 1
        floor = os.path.abspath(a.floor_bin or os.path.join(os.path.dirname(smtplb), "tests", "bench", "relay_floor"))
        if floor_modes and not os.access(floor, os.X_OK):
            raise SystemExit(f"bench: no relay_floor binary at {floor} (scripts/build.sh builds one)")
        for mode in floor_modes:
            targets.append(Target(f"floor-{mode}", port, [floor, str(port), ",".join(backends), mode]))
            port += 1
        for t in targets:
            t.start(work)
        time.sleep(2.0 if not a.quick else 1.0)  # health checks settle
        if a.edge:
            for t in targets:
                if t.name.endswith("-edge"):
                    t0 = time.monotonic()
                    fill_table(t.port, a.edge)
                    print(f"# {t.name}: table filled with {a.edge} client addresses in {time.monotonic() - t0:.0f}s",
                          file=sys.stderr)

        print(f"# {os.uname().nodename}: {os.cpu_count()} CPUs, kernel {os.uname().release}; "
              f"{a.backends} smtp-sink backends; medians of {a.rounds} rounds")
        hap = next((t for t in targets if t.name == "haproxy"), None)
        ours = [t for t in targets if t.name.startswith(("smtplb", "baseline")) and t.name != "smtplb-edge"]
        edge = next((t for t in targets if t.name == "smtplb-edge"), None)
        hap_edge = next((t for t in targets if t.name == "haproxy-edge"), None)
        for test in ("connect", "persistent"):
            if test not in tests:
                continue
            persistent = test == "persistent"
            res = {t.name: ([], [], []) for t in targets}
            for _ in range(a.rounds):
                for t in targets:
                    r = run_load(t, a, persistent)
                    if r:
                        for i in range(3):
                            res[t.name][i].append(r[i])
            if persistent:
                print(f"\n## persistent: {a.messages} messages x {a.persistent_length} B over "
                      f"{a.persistent_sessions} connections")
            else:
                print(f"\n## connect: {a.messages} messages x {a.length} B, one per connection, "
                      f"{a.sessions} in parallel")
            print(f"{'target':<16} {'msgs/s':>9} {'CPU us/msg':>11} {'machine us/msg':>15}")
            med = {}
            for t in targets:
                med[t.name] = tuple(statistics.median(v) if v else float("nan") for v in res[t.name])
                print(f"{t.name:<16} {med[t.name][0]:>9.0f} {med[t.name][1]:>11.1f} {med[t.name][2]:>15.1f}")
            floors = [t for t in targets if t.name.startswith("floor-")]
            if hap:
                for t in ours + floors:
                    print_ratios(t.name, "haproxy", med)
            if any(t.name == "floor-plain" for t in floors):
                for t in ours:
                    print_ratios(t.name, "floor-plain", med)
            if edge:
                print_ratios("smtplb-edge", ours[0].name, med)
            if hap_edge:
                print_ratios("haproxy-edge", "haproxy", med)
                print_ratios("smtplb-edge", "haproxy-edge", med)
        if "latency" in tests:
            print(f"\n## latency: {a.latency_sessions} sequential sessions, connect to end of greeting (us)")
            print(f"{'target':<16} {'p50':>7} {'p90':>7} {'p99':>7} {'p50 added':>10}")
            lat = {}
            for t in targets:
                lat[t.name] = greeting_latency(t.port, a.latency_sessions)
            for t in targets:
                p = lat[t.name]
                print(f"{t.name:<16} {p[0]:>7.0f} {p[1]:>7.0f} {p[2]:>7.0f} {p[0] - lat['direct'][0]:>10.0f}")
        if "idle" in tests:
            print(f"\n## idle: RSS growth per proxied session, {a.idle_sessions} sessions open after the greeting")
            for t in targets:
                if t.pid:
                    per, greeted = idle_memory(t, a.idle_sessions)
                    print(f"{t.name:<16} {per:>8.0f} bytes  ({greeted} of {a.idle_sessions} greeted)")
        if a.edge:
            print("\n## a client over a limit of one session per address reads:")
            cfgs = []
            for name in ("smtplb", "haproxy") if shutil.which("haproxy") and not a.no_haproxy else ("smtplb",):
                lport = port
                port += 1
                if name == "smtplb":
                    cfg = os.path.join(work, "limit1.toml")
                    smtplb_config(cfg, lport, backends, 1, False)
                    with open(cfg) as f:
                        text = f.read().replace('pool = "sinks"\n', 'pool = "sinks"\nmax_connections_per_ip = 1\n', 1)
                    with open(cfg, "w") as f:
                        f.write(text)
                    t = Target("smtplb-limit1", lport, [smtplb, "-f", cfg])
                else:
                    cfg = os.path.join(work, "limit1.cfg")
                    haproxy_edge_config(cfg, lport, backends, 1000)
                    with open(cfg) as f:
                        text = f.read().replace("sc0_conn_cur gt 100000", "sc0_conn_cur gt 1")
                    with open(cfg, "w") as f:
                        f.write(text)
                    t = Target("haproxy-limit1", lport, ["haproxy", "-db", "-f", cfg])
                targets.append(t)
                t.start(work)
                time.sleep(1.5)
                print(f"{name:<16} {refused_reply(lport)!r}")
            # The edge's own work per session, on its pure cores: far below what the
            # end-to-end rounds can resolve on a shared machine, so measured alone.
            cost = os.path.join(os.path.dirname(smtplb), "tests", "bench", "edge_cost")
            if os.path.exists(cost):
                print(f"\n## edge defences' own cost per session (tests/bench/edge_cost {a.edge}: best of 5)")
                out = subprocess.run([cost, str(a.edge)], capture_output=True, text=True, timeout=600).stdout
                print(out, end="")
                m = re.search(r"^per_session_ns ([\d.]+)", out, re.M)
                base = ours[0].name if "connect" in tests else None
                if m and base and base in med and med[base][1] == med[base][1]:
                    share = float(m.group(1)) / 1000 / med[base][1]
                    print(f"share of {base}'s CPU per message ({med[base][1]:.1f} us): {share * 100:.2f}%")
            else:
                print(f"# no edge_cost binary at {cost} (built with -DSMTPLB_TESTS=ON)", file=sys.stderr)
    finally:
        for t in targets:
            t.stop()
        for s in sinks:
            s.terminate()
        for s in sinks:
            try:
                s.wait(5)
            except subprocess.TimeoutExpired:
                s.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--helper":
        {"client": client_helper, "sink": sink_helper}[sys.argv[2]](sys.argv[3:])
    else:
        main()
