#!/usr/bin/env python3
"""failover-compare.py: the kill -9 failover scenario against smtplb and HAProxy, side by side.

For each proxy (and each round) it:
  1. starts three `smtp-sink -u nobody 127.0.0.1:PORT 1000` backends on free ports,
  2. starts the proxy in front of them on a free 127.0.0.1 port, in the foreground:
     - smtplb: workers 2, leastconn, retries 3, connect_timeout 1s, banner_timeout 1s,
       health checks every 500ms, timeout 1s, fall 2, rise 2;
     - HAProxy (2.6): nbthread 2, mode tcp, balance leastconn, option smtpchk EHLO
       lb.example, retries 3, option redispatch, timeout connect 1s, servers with
       `check inter 500ms fall 2 rise 2`, logs (format iso, option tcplog) to stderr;
  3. waits until every backend is up (smtplb: its UP lines; HAProxy: port open, then
     three check intervals, since HAProxy 2.6 starts servers UP),
  4. runs scripts/smtpload.py (SESSIONS sessions, PARALLEL at a time) and `kill -9`s the
     first backend once KILL_AFTER sessions have finished,
  5. takes the time from the kill to the proxy's DOWN line for that backend
     (smtplb: `server sinks/s1 is DOWN`; HAProxy: `Server smtp/s1 is DOWN`, both with
     their own timestamps), then stops the proxy and the backends by PID.
It prints one row per proxy and round: the count of every smtpload class, kill->DOWN in
ms, "retried" (sessions the proxy had to send to a second backend, from its access log:
smtplb tries > 1, HAProxy tcplog retries %rc > 0), ok-session latency p99/max and
sessions/s. Classes are described in `scripts/smtpload.py --help`.

Usage:
  scripts/failover-compare.py [--sessions 10000] [--parallel 50] [--kill-after 2000]
      [--rounds 1] [--proxies smtplb,haproxy] [--smtplb BIN] [--haproxy BIN] [--keep]

  --smtplb defaults to $SMTPLB_BIN, else build/smtplb next to this script's repository.
  --keep   keeps the work directory (configs, proxy logs, smtpload summaries/timelines).

Needs smtp-sink (Debian package postfix) and haproxy; runs as root or not (smtp-sink
gets -u nobody only as root). Uses only 127.0.0.1. Not part of the test suite: a report
tool. The machine is shared and noisy; compare proxies within one run.
"""

import argparse
import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SMTPLOAD = os.path.join(HERE, "smtpload.py")
CLASSES = ("ok", "refused", "closed_before_greeting", "bad_greeting", "cut_after_greeting", "cut_after_message",
           "rejected", "timeout", "error")
SHORT = {"ok": "ok", "refused": "refused", "closed_before_greeting": "closed<greet", "bad_greeting": "bad_greet",
         "cut_after_greeting": "cut>greet", "cut_after_message": "cut>msg", "rejected": "rejected",
         "timeout": "timeout", "error": "error"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port):
    try:
        socket.create_connection(("127.0.0.1", port), 0.5).close()
        return True
    except OSError:
        return False


def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out after %ss waiting for %s" % (timeout, what))
        time.sleep(0.02)


def stop(proc, sig=signal.SIGTERM):
    """Stops one process we started, by PID."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, sig)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


def start_sink():
    for _ in range(5):  # the port is chosen before smtp-sink binds it: retry on a clash
        port = free_port()
        args = ["smtp-sink"] + (["-u", "nobody"] if os.geteuid() == 0 else []) + ["127.0.0.1:%d" % port, "1000"]
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with contextlib.suppress(RuntimeError):
            wait_for(lambda: proc.poll() is not None or port_open(port), 5, "smtp-sink on %d" % port)
        if proc.poll() is None and port_open(port):
            return proc, port
        stop(proc)
    raise RuntimeError("smtp-sink did not start")


def smtplb_config(port, backends):
    out = ['[global]\nhostname = "lb.example"\nworkers = 2\nmax_connections = 8000\n',
           '[log]\nlevel = "info"\naccess_log = true\n',
           '[listener.mx]\naddress = "127.0.0.1"\nport = %d\npool = "sinks"\n' % port,
           '[pool.sinks]\nalgorithm = "leastconn"\nretries = 3\nconnect_timeout = "1s"\nbanner_timeout = "1s"\n',
           '[pool.sinks.health_check]\ninterval = "500ms"\ntimeout = "1s"\nrise = 2\nfall = 2\n'
           'ehlo_name = "lb.example"\n']
    for i, b in enumerate(backends):
        out.append('[[pool.sinks.server]]\nname = "s%d"\naddress = "127.0.0.1"\nport = %d\n' % (i + 1, b))
    return "\n".join(out)


def haproxy_config(port, backends, threads):
    lines = ["global", "    log stderr format iso local0", "    maxconn 8000", "    nbthread %d" % threads,
             "defaults", "    mode tcp", "    log global", "    option tcplog", "    retries 3",
             "    option redispatch", "    timeout connect 1s", "    timeout client 5m", "    timeout server 5m",
             "listen smtp", "    bind 127.0.0.1:%d" % port, "    balance leastconn",
             "    option smtpchk EHLO lb.example"]
    for i, b in enumerate(backends):
        lines.append("    server s%d 127.0.0.1:%d check inter 500ms fall 2 rise 2" % (i + 1, b))
    return "\n".join(lines) + "\n"


def iso_time(s):
    return datetime.datetime.fromisoformat(s).timestamp()


PROXIES = {
    # name: (config writer, argv builder, DOWN line regex with a 'ts' group, UP lines to wait for)
    "smtplb": dict(down=re.compile(r"^(?P<ts>\S+) \w+: server sinks/s1 is DOWN"),
                   up=re.compile(r"server sinks/s\d is UP"),
                   retried=re.compile(r" tries=([2-9]|\d\d+) ")),
    "haproxy": dict(down=re.compile(r"^(?P<ts>\d{4}-\S+) Server smtp/s1 is DOWN"), up=None,
                    retried=re.compile(r" \d+/\d+/\d+/\d+/\+?[1-9]\d* \d+/\d+$")),
}


def run_one(name, a, work):
    sinks = []
    proxy = None
    logf = None
    try:
        for _ in range(3):
            sinks.append(start_sink())
        backends = [p for _, p in sinks]
        port = free_port()
        log_path = os.path.join(work, "%s.log" % name)
        cfg_path = os.path.join(work, "%s.%s" % (name, "toml" if name == "smtplb" else "cfg"))
        if name == "smtplb":
            cfg = smtplb_config(port, backends)
            argv = [a.smtplb, "-f", cfg_path]
        else:
            cfg = haproxy_config(port, backends, a.haproxy_threads)
            argv = [a.haproxy, "-db", "-f", cfg_path]
        with open(cfg_path, "w") as f:
            f.write(cfg)
        logf = open(log_path, "wb")
        proxy = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)

        def log():
            with open(log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")

        def alive_or_die():
            if proxy.poll() is not None:
                raise RuntimeError("%s exited with %s; log:\n%s" % (name, proxy.returncode, log()[-3000:]))

        wait_for(lambda: alive_or_die() or port_open(port), 10, "%s to listen on %d" % (name, port))
        if PROXIES[name]["up"] is not None:
            wait_for(lambda: len(PROXIES[name]["up"].findall(log())) >= 3, 10, "%s: 3 servers UP" % name)
        else:
            time.sleep(1.5)  # three check intervals: a backend that failed its checks would be DOWN by now
        if re.search(r"is DOWN", log()):
            raise RuntimeError("%s reports a backend DOWN before the run:\n%s" % (name, log()[-3000:]))

        victim = sinks[0][0]
        timeline = os.path.join(work, "%s.timeline.jsonl" % name)
        r = subprocess.run([sys.executable, SMTPLOAD, "-q", "-n", str(a.sessions), "-p", str(a.parallel),
                            "-j", str(a.processes), "-t", "10", "--timeline", timeline,
                            "--run-after", str(a.kill_after), "kill -9 %d" % victim.pid, "127.0.0.1:%d" % port],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
        if r.returncode not in (0, 3):
            raise RuntimeError("smtpload failed (%d): %s" % (r.returncode, r.stderr))
        with open(os.path.join(work, "%s.summary.json" % name), "w") as f:
            f.write(r.stdout)
        summary = json.loads(r.stdout)
        kill_t = summary["start_epoch"] + summary["events"][0]["t"]
        down_ms = None
        deadline = time.monotonic() + 5
        while down_ms is None and time.monotonic() < deadline:
            for line in log().splitlines():
                m = PROXIES[name]["down"].search(line)
                if m:
                    down_ms = (iso_time(m.group("ts")) - kill_t) * 1000.0
                    break
            else:
                time.sleep(0.05)
        alive_or_die()
        retried = len([ln for ln in log().splitlines() if PROXIES[name]["retried"].search(ln)])
        return summary, down_ms, retried
    finally:
        stop(proxy)
        if logf:
            logf.close()
        for p, _ in sinks:
            stop(p)


def fmt(v, spec="%d"):
    return "-" if v is None else spec % v


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="See the top of this file for what is run and measured.")
    ap.add_argument("--sessions", type=int, default=10000)
    ap.add_argument("--parallel", type=int, default=50)
    ap.add_argument("--kill-after", type=int, default=2000)
    ap.add_argument("--processes", type=int, default=2, help="smtpload processes (default 2)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--proxies", default="smtplb,haproxy")
    ap.add_argument("--smtplb", default=os.environ.get("SMTPLB_BIN") or os.path.join(HERE, "..", "build", "smtplb"))
    ap.add_argument("--haproxy", default="haproxy")
    ap.add_argument("--haproxy-threads", type=int, default=2, help="HAProxy nbthread (default 2, like workers)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    a = ap.parse_args()
    proxies = [p.strip() for p in a.proxies.split(",") if p.strip()]
    for p in proxies:
        if p not in PROXIES:
            ap.error("unknown proxy %r (known: %s)" % (p, ", ".join(PROXIES)))
    for tool in ["smtp-sink"] + (["haproxy"] if "haproxy" in proxies else []):
        if not shutil.which(tool if tool != "haproxy" else a.haproxy):
            ap.error("%s not found" % tool)
    if "smtplb" in proxies and not os.access(a.smtplb, os.X_OK):
        ap.error("smtplb binary %s not found (use --smtplb or SMTPLB_BIN)" % a.smtplb)

    work = tempfile.mkdtemp(prefix="failover-compare.")
    rows = []
    try:
        for rnd in range(a.rounds):
            for name in proxies:
                d = os.path.join(work, "round%d" % (rnd + 1))
                os.makedirs(d, exist_ok=True)
                sys.stderr.write("round %d: %s ...\n" % (rnd + 1, name))
                rows.append((name, rnd + 1) + run_one(name, a, d))
    finally:
        if a.keep:
            sys.stderr.write("work directory kept: %s\n" % work)
        else:
            shutil.rmtree(work, ignore_errors=True)

    print("kill -9 of 1 of 3 smtp-sink backends after %d of %d sessions, %d in parallel"
          % (a.kill_after, a.sessions, a.parallel))
    head = (["proxy", "round"] + [SHORT[c] for c in CLASSES] +
            ["kill->DOWN ms", "retried", "ok p99 ms", "ok max ms", "sess/s"])
    table = [head]
    for name, rnd, s, down_ms, retried in rows:
        lat = s["ok_latency_ms"]
        table.append([name, str(rnd)] + [str(s["counts"][c]) for c in CLASSES] +
                     [fmt(down_ms), str(retried), fmt(lat["p99"], "%.1f"), fmt(lat["max"], "%.1f"),
                      fmt(s["sessions_per_s"], "%.0f")])
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    for r in table:
        print("  ".join(c.rjust(w) if i > 0 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    for name, rnd, s, _, _ in rows:
        if s["details"]:
            print("%s round %d details: %s" % (name, rnd, json.dumps(s["details"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
