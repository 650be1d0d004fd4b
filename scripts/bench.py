#!/usr/bin/env python3
"""bench.py: smtplb side by side with a direct connection and HAProxy, on loopback.

Starts smtp-sink backends, then each target in front of them, and measures in one run
(targets take turns round by round, so a noisy machine hurts them alike):

  connect     smtp-source, one message per connection (connection rate, the hard case)
  persistent  smtp-source -d, many messages per connection (bytes through the relay)
  latency     sequential sessions: connect() to the end of the greeting, p50/p90/p99
  idle        RSS growth per idle proxied session (sessions held open after the greeting)

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
import os
import re
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smtplb", default="build/smtplb", help="smtplb binary (default build/smtplb)")
    ap.add_argument("--tests", default="connect,persistent,latency,idle",
                    help="comma list of connect,persistent,latency,idle")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--messages", type=int, default=10000)
    ap.add_argument("--sessions", type=int, default=50, help="parallel sessions, connect test")
    ap.add_argument("--length", type=int, default=512, help="message bytes, connect test")
    ap.add_argument("--persistent-sessions", type=int, default=20)
    ap.add_argument("--persistent-length", type=int, default=20000)
    ap.add_argument("--latency-sessions", type=int, default=2000)
    ap.add_argument("--idle-sessions", type=int, default=3000)
    ap.add_argument("--backends", type=int, default=2)
    ap.add_argument("--base-port", type=int, default=22025)
    ap.add_argument("--workers", default="1",
                    help="comma list of smtplb worker counts, one target each (default 1, like nbthread 1)")
    ap.add_argument("--access-log", action="store_true", help="also run smtplb with its access log on")
    ap.add_argument("--baseline", metavar="BINARY",
                    help="another smtplb build (an older commit, say), run as target 'baseline' with the same "
                         "configs (baseline-w2-log etc. when there are several variants)")
    ap.add_argument("--no-haproxy", action="store_true")
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
    tests = [t for t in a.tests.split(",") if t]
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
        time.sleep(2.0)  # health checks settle
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
    main()
