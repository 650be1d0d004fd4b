#!/usr/bin/env python3
"""A keepalived pair of smtplb nodes in network namespaces: crash, planned switch, node loss.

The pair is the one shipped in packaging/keepalived/: keepalived.conf as written (only the
track_process line names this build's binary and config, since both nodes' smtplb run in
one PID namespace here) and smtplb-ha-network.sh run unchanged on both nodes.

Topology (namespaces made here, named slbha<PID>-*, removed at the end; documentation
addresses only; nothing is changed in the host's namespace, which is checked):

    client 192.0.2.10 ──┐                     front bridge 192.0.2.0/24 (in "sw")
    lb1 eth0 192.0.2.11 ┤  virtual address 192.0.2.100 (keepalived)
    lb2 eth0 192.0.2.12 ┘
    lb1 eth1 198.51.100.11 ┐                  back bridge 198.51.100.0/24 (in "sw")
    lb2 eth1 198.51.100.12 ┤
    backend  198.51.100.20 ┘  smtp-sink :25

Each balancer namespace runs smtplb (listening on 192.0.2.100:25, read-only admin on
127.0.0.1:9925) and Debian's keepalived, which runs in the host's namespace with -s NS:
its track_process cannot subscribe to process events under `ip netns exec`.
The client (ha_load.py) starts one session to 192.0.2.100:25 every 20 ms.

Scenarios, on whichever node holds the address:
  crash          kill -9 of its smtplb. Target: new sessions succeed through the other node
                 within 1 s; only sessions open on the dead node, or started before the
                 address moved, fail.
  planned switch `smtplb ctl drain --wait 2s` there, then SIGTERM: the address moves, the
                 drained node serves new sessions until then, every session (each ~4 s
                 long, so some are still open on the old node when it stops) completes
                 its message: none refused, reset or cut.
  node loss      its front link goes down: the other node takes the address within
                 keepalived's dead interval (3 x advert_int + skew).
  reused port    (first run only) a client port that ended a session on one node opens
                 a session on the other, and the address moves back while it is open:
                 the old node's conntrack (TIME_WAIT) and TCP must not keep its packets.
  control        (first run only) the planned switch without smtplb-ha-network.sh's
                 forwarding rule on the new master: the sessions open on the old node at
                 the move are reset. This shows what the planned-switch test detects.

SMTPLB_HA_RUNS=N repeats the three scenarios N times (default 1); SMTPLB_HA_ONLY=NAME runs
one scenario; SMTPLB_KEEP=1 keeps the logs. Needs root, ip, nft, keepalived, curl and
smtp-sink; exits 77 (skipped) without them or where no network namespace can be made.
Every process started here is stopped by PID; every wait is bounded; the whole test stops
itself after SMTPLB_HA_BUDGET seconds (default 100 + 80 per run).
"""

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
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
SMTPLB_BIN = os.environ.get("SMTPLB_BIN", os.path.join(ROOT, "build", "smtplb"))
KEEPALIVED_CONF = os.path.join(ROOT, "packaging", "keepalived", "keepalived.conf")
NETWORK_SH = os.path.join(ROOT, "packaging", "keepalived", "smtplb-ha-network.sh")
LOAD = os.path.join(HERE, "ha_load.py")
SKIP = 77

VIP = "192.0.2.100"
CLIENT = "192.0.2.10"
BACKEND = "198.51.100.20"
NODES = {"lb1": {"front": "192.0.2.11", "back": "198.51.100.11"},
         "lb2": {"front": "192.0.2.12", "back": "198.51.100.12"}}  # "priority": read from keepalived.conf
ADVERT_INT = 1.0  # keepalived.conf's advert_int (checked below)
ACCESS_RE = re.compile(r"client=192\.0\.2\.10:(\d+) .* term=(\S\S)")
LOG_TS_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})([+-]\d\d:?\d\d) ")


class Failure(Exception):
    pass


class Budget(Exception):
    pass


def run(*args, check=True, timeout=20, **kw):
    r = subprocess.run(list(args), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise Failure("%s: exit %d: %s%s" % (" ".join(args), r.returncode, r.stdout, r.stderr))
    return r


def wait_until(pred, timeout, what, interval=0.02):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise Failure("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)


def log_time(line):
    import datetime
    m = LOG_TS_RE.match(line)
    if not m:
        return None
    tz = m.group(2).replace(":", "")
    return datetime.datetime.strptime(m.group(1) + tz, "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()


def host_state():
    """What this test must not change in the host's namespace."""
    out = []
    for args in (["ip", "-o", "addr"], ["ip", "-o", "link"], ["ip", "rule"], ["ip", "route", "show", "table", "all"],
                 ["nft", "list", "ruleset"]):
        out.append(run(*args, check=False).stdout)
    for key in ("net/ipv4/ip_forward", "net/ipv4/conf/all/arp_ignore", "net/ipv4/conf/all/arp_announce",
                "net/ipv4/conf/all/rp_filter"):
        with open("/proc/sys/" + key) as f:
            out.append(key + "=" + f.read())
    return out


class Pair:
    """The namespaces, the processes in them, and what the scenarios need."""

    def __init__(self, work):
        self.work = work
        self.prefix = "slbha%d" % os.getpid()
        self.ns = {n: "%s-%s" % (self.prefix, n) for n in ("sw", "cl", "lb1", "lb2", "be")}
        self.made = []
        self.procs = []  # (name, Popen)
        self.smtplb = {}  # node -> Popen
        self.keepalived = {}  # node -> Popen
        self.vrrp_pidfile = {}

    # -- namespaces -------------------------------------------------------------------

    def ip(self, ns, *args, check=True):
        return run("ip", "-n", self.ns[ns], *args, check=check)

    def nsexec(self, ns, *args, check=True, timeout=20):
        return run("ip", "netns", "exec", self.ns[ns], *args, check=check, timeout=timeout)

    def build(self):
        for role, name in self.ns.items():
            run("ip", "netns", "add", name)
            self.made.append(name)
            self.ip(role, "link", "set", "lo", "up")
        for br in ("front", "back"):
            self.ip("sw", "link", "add", br, "type", "bridge")
            self.ip("sw", "link", "set", br, "up")
        # (namespace, its interface, the switch's port, bridge, address)
        links = [("cl", "eth0", "cl", "front", CLIENT + "/24"),
                 ("lb1", "eth0", "lb1f", "front", NODES["lb1"]["front"] + "/24"),
                 ("lb2", "eth0", "lb2f", "front", NODES["lb2"]["front"] + "/24"),
                 ("lb1", "eth1", "lb1b", "back", NODES["lb1"]["back"] + "/24"),
                 ("lb2", "eth1", "lb2b", "back", NODES["lb2"]["back"] + "/24"),
                 ("be", "eth0", "be", "back", BACKEND + "/24")]
        for ns, ifname, port, br, addr in links:
            self.ip("sw", "link", "add", port, "type", "veth", "peer", "name", ifname, "netns", self.ns[ns])
            self.ip("sw", "link", "set", port, "master", br, "up")
            self.ip(ns, "addr", "add", addr, "dev", ifname)
            self.ip(ns, "link", "set", ifname, "up")

    def destroy(self):
        for name in reversed(self.made):
            run("ip", "netns", "del", name, check=False)
        self.made = []
        for node in NODES:  # keepalived -s NS makes /run/keepalived/NS
            shutil.rmtree("/run/keepalived/" + self.ns[node], ignore_errors=True)
        try:
            os.rmdir("/run/keepalived")
        except OSError:
            pass

    @staticmethod
    def remove_stale():
        """Namespaces left by an earlier run of this test that was killed (its PID is gone)."""
        for line in run("ip", "netns", "list", check=False).stdout.splitlines():
            m = re.match(r"(slbha(\d+)-(?:sw|cl|lb1|lb2|be))\b", line)
            if m and not os.path.exists("/proc/%s" % m.group(2)):
                run("ip", "netns", "del", m.group(1), check=False)
                shutil.rmtree("/run/keepalived/" + m.group(1), ignore_errors=True)

    # -- processes --------------------------------------------------------------------

    def spawn(self, name, args, log):
        f = open(log, "ab")
        try:
            p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
        finally:
            f.close()
        self.procs.append((name, p))
        return p

    def stop(self, p, sig=signal.SIGTERM, timeout=15):
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        return p.returncode

    def stop_all(self):
        for node, pidfile in self.vrrp_pidfile.items():
            pid = self._pid(pidfile)
            kp = self.keepalived.get(node)
            if kp and kp.poll() is None:
                self.stop(kp)
            if pid and os.path.exists("/proc/%d" % pid):  # keepalived's VRRP child, if it outlived its parent
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for _, p in reversed(self.procs):
            self.stop(p, timeout=5)

    @staticmethod
    def _pid(path):
        try:
            with open(path) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def smtplb_config(self, node):
        return os.path.join(self.work, node + ".toml")

    def admin_socket(self, node):
        return os.path.join(self.work, node + ".sock")

    def smtplb_log(self, node):
        return os.path.join(self.work, node + ".log")

    def ka_log(self, node):
        return os.path.join(self.work, "keepalived-%s.log" % node)

    def start_smtplb(self, node):
        p = self.spawn("smtplb " + node, ["ip", "netns", "exec", self.ns[node], SMTPLB_BIN, "-f",
                                          self.smtplb_config(node)], self.smtplb_log(node))
        self.smtplb[node] = p
        # `ip netns exec` execs smtplb: p.pid is smtplb's PID (keepalived's track_process
        # matches its command line).
        wait_until(lambda: p.poll() is not None or self.healthz(node) == 200, 10, "smtplb on %s to be healthy" % node)
        if p.poll() is not None:
            raise Failure("smtplb on %s exited %s" % (node, p.returncode))

    def healthz(self, node):
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(2)
                s.connect(self.admin_socket(node))
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = b""
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            return int(data.split(b" ", 2)[1])
        except (OSError, ValueError, IndexError):
            return None

    def setup(self):
        self.build()
        for node, peer in (("lb1", "lb2"), ("lb2", "lb1")):
            self.nsexec(node, "sh", NETWORK_SH, "up", NODES[peer]["back"])
        self.spawn("smtp-sink", ["ip", "netns", "exec", self.ns["be"], "smtp-sink", "-u", "nobody",
                                 BACKEND + ":25", "1000"], os.path.join(self.work, "smtp-sink.log"))
        with open(KEEPALIVED_CONF) as f:
            shipped = f.read()
        if not re.search(r"^\s*advert_int %g\s*$" % ADVERT_INT, shipped, re.M):
            raise Failure("keepalived.conf: advert_int is not %g (update ADVERT_INT)" % ADVERT_INT)
        for node in NODES:
            m = re.search(r"^@%s priority (\d+)$" % node, shipped, re.M)
            if not m:
                raise Failure("keepalived.conf: no `@%s priority N` line" % node)
            NODES[node]["priority"] = int(m.group(1))
        for node in NODES:
            with open(self.smtplb_config(node), "w") as f:
                f.write(SMTPLB_CONF % {"node": node, "socket": self.admin_socket(node), "vip": VIP,
                                       "backend": BACKEND})
            conf, n = re.subn(r"^(\s*)process smtplb$", r"\1process %s -f %s" % (SMTPLB_BIN, self.smtplb_config(node)),
                              shipped, flags=re.M)
            if n != 1:
                raise Failure("keepalived.conf: expected one `process smtplb` line, found %d" % n)
            path = os.path.join(self.work, "keepalived-%s.conf" % node)
            with open(path, "w") as f:
                f.write(conf)
            self.start_smtplb(node)
            self.vrrp_pidfile[node] = os.path.join(self.work, "keepalived-%s-vrrp.pid" % node)
            self.keepalived[node] = self.spawn("keepalived " + node, [
                "keepalived", "-n", "-l", "-D", "-G", "-P", "-f", path, "-i", node, "-s", self.ns[node],
                "-p", os.path.join(self.work, "keepalived-%s.pid" % node), "-r", self.vrrp_pidfile[node]],
                self.ka_log(node))

    def restore(self):
        """After a scenario, whatever it left: links up, the forwarding rules in place,
        both smtplb running, no client left."""
        for name, p in self.procs:
            if name.startswith("load ") and p.poll() is None:
                self.stop(p, timeout=30)
        for node, peer in (("lb1", "lb2"), ("lb2", "lb1")):
            self.ip("sw", "link", "set", node + "f", "up")
            self.nsexec(node, "sh", NETWORK_SH, "up", NODES[peer]["back"])
            if self.smtplb[node].poll() is not None:
                self.start_smtplb(node)

    # -- state ------------------------------------------------------------------------

    def has_vip(self, node):
        return (" %s/32 " % VIP) in self.ip(node, "-o", "-4", "addr", "show", "dev", "eth0").stdout

    def ka_state(self, node):
        with open(self.ka_log(node), errors="replace") as f:
            states = re.findall(r"\(smtp\) Entering (\w+) STATE", f.read())
        return states[-1] if states else None

    def wait_ready(self, timeout=20):
        """One node MASTER with the address, the other BACKUP, both smtplb healthy.
        Returns (master, backup)."""

        def ready():
            masters = [n for n in NODES if self.has_vip(n)]
            if len(masters) != 1:
                return None
            m = masters[0]
            b = "lb2" if m == "lb1" else "lb1"
            if self.ka_state(m) == "MASTER" and self.ka_state(b) == "BACKUP" and \
                    self.healthz(m) == 200 and self.healthz(b) == 200:
                return m, b
            return None

        return wait_until(ready, timeout, "a master and a backup", interval=0.1)

    def wait_vip(self, node, timeout):
        wait_until(lambda: self.has_vip(node), timeout, "the address on %s" % node, interval=0.01)
        return time.time()

    def access(self, node, since_offset=0):
        """[(client port, end time, term)] of the node's access lines written after the offset."""
        out = []
        with open(self.smtplb_log(node), errors="replace") as f:
            f.seek(since_offset)
            for line in f:
                m = ACCESS_RE.search(line)
                if m:
                    out.append((int(m.group(1)), log_time(line), m.group(2)))
        return out

    def log_size(self, node):
        return os.path.getsize(self.smtplb_log(node))

    def forwarded_packets(self, node):
        r = self.nsexec(node, "nft", "list", "chain", "ip", "smtplb_ha", "prerouting")
        m = re.search(r"counter packets (\d+) bytes \d+ meta mark set", r.stdout)
        if not m:
            raise Failure("no counter on the forwarding rule:\n" + r.stdout)
        return int(m.group(1))


SMTPLB_CONF = """\
[global]
hostname = "%(node)s.test"
workers = 2
shutdown_grace = "10s"

[admin]
socket = "%(socket)s"
listen = "127.0.0.1:9925"

[listener.mx]
address = "%(vip)s"
port = 25
pool = "sinks"

[pool.sinks]
connect_timeout = "2s"

[pool.sinks.health_check]
interval = "1s"

[[pool.sinks.server]]
name = "sink"
address = "%(backend)s"
port = 25
"""


class Load:
    """ha_load.py in the client namespace, one session every 20 ms (or `extra`)."""

    def __init__(self, pair, name, chunks, chunk_delay, extra=()):
        self.pair = pair
        self.out = os.path.join(pair.work, "load-%s.jsonl" % name)
        self.offsets = {n: pair.log_size(n) for n in NODES}
        self.proc = pair.spawn("load " + name, [
            "ip", "netns", "exec", pair.ns["cl"], sys.executable, LOAD, "%s:25" % VIP, "--out", self.out,
            "--interval", "0.02", "--duration", "60", "--timeout", "5", "--chunks", str(chunks),
            "--chunk-delay", str(chunk_delay), *extra], os.path.join(pair.work, "load-%s.log" % name))

    def records(self):
        recs = []
        if os.path.exists(self.out):
            with open(self.out) as f:
                for line in f:
                    if line.endswith("\n"):
                        recs.append(json.loads(line))
        return sorted(recs, key=lambda r: r["start"])

    def warm(self, n=50, timeout=10):
        wait_until(lambda: sum(r["class"] == "ok" for r in self.records()) >= n, timeout, "%d sessions through" % n,
                   interval=0.05)

    def finish(self):
        """Stops it (it waits for its open sessions, each step bounded by 5 s); returns
        the records with "node" (lb1, lb2 or None) from the access logs."""
        self.pair.stop(self.proc, timeout=30)
        if self.proc.returncode != 0:
            raise Failure("ha_load exited %s" % self.proc.returncode)
        recs = self.records()
        seen = {}
        for node in NODES:
            for port, end, term in self.pair.access(node, self.offsets[node]):
                seen.setdefault(port, []).append((end, node, term))
        for r in recs:
            r["node"] = r["term"] = None
            if r["port"] is None:
                continue
            cands = [c for c in seen.get(r["port"], []) if abs(c[0] - r["end"]) < 2]
            if cands:
                _, r["node"], r["term"] = min(cands, key=lambda c: abs(c[0] - r["end"]))
        return recs


def classes(recs):
    out = {}
    for r in recs:
        out[r["class"]] = out.get(r["class"], 0) + 1
    return ", ".join("%s %d" % kv for kv in sorted(out.items())) or "none"


def dead_interval(backup):
    """keepalived's master down interval for the backup: 3 x advert_int + skew."""
    return 3 * ADVERT_INT + (256 - NODES[backup]["priority"]) * ADVERT_INT / 256


# ------------------------------------------------------------------------------------------
# scenarios: each returns a printed line and raises Failure when an expectation fails
# ------------------------------------------------------------------------------------------


def crash(pair):
    m, b = pair.wait_ready()
    load = Load(pair, "crash-%d" % time.time_ns(), chunks=5, chunk_delay=0.05)
    load.warm()
    t0 = time.time()
    pair.smtplb[m].kill()
    pair.smtplb[m].wait(5)
    t_vip = pair.wait_vip(b, 5) - t0
    time.sleep(2)
    recs = load.finish()
    ok_after = [r for r in recs if r["start"] > t0 and r["class"] == "ok"]
    if not ok_after:
        raise Failure("crash: no session succeeded after the kill")
    first = ok_after[0]
    failed = [r for r in recs if r["class"] != "ok"]
    open_at_kill = [r for r in failed if r["start"] < t0]
    before_move = [r for r in failed if r["start"] >= t0]
    late = [r for r in failed if r["start"] > first["start"]]
    line = ("crash: kill -9 of %s's smtplb; address on %s after %.3f s; first successful session started %.3f s "
            "after the kill (greeting at %.3f s) through %s; %d of %d sessions failed: %d open on %s at the kill "
            "(%s), %d started before the address moved (%s), %d after the first success" % (
                m, b, t_vip, first["start"] - t0, first["greeting"] - t0, first["node"], len(failed), len(recs),
                len(open_at_kill), m, classes(open_at_kill), len(before_move), classes(before_move), len(late)))
    if first["node"] != b:
        raise Failure(line + "\nthe first session after the kill was not served by %s: %r" % (b, first))
    if first["start"] - t0 >= 1.0:
        raise Failure(line + "\ntarget missed: new sessions must succeed within 1 s of the kill")
    if late:
        raise Failure(line + "\nsessions failed after the first success: %r" % late[:5])
    unexpected = [r for r in failed if r["class"] not in ("refused", "reset", "eof")]
    if unexpected:
        raise Failure(line + "\nunexpected failures: %r" % unexpected[:5])
    return line


def planned(pair, forwarding=True):
    m, b = pair.wait_ready()
    if not forwarding:
        pair.nsexec(b, "nft", "delete", "table", "ip", "smtplb_ha")
    fwd0 = pair.forwarded_packets(b) if forwarding else 0
    # Sessions of ~4 s: some are still open on the old node when it is stopped.
    load = Load(pair, "planned-%d" % time.time_ns(), chunks=20, chunk_delay=0.2)
    load.warm(10)
    t0 = time.time()
    ctl = subprocess.run([SMTPLB_BIN, "ctl", "--socket", pair.admin_socket(m), "drain", "--wait", "2s",
                          "--timeout", "30s"], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=40)
    t_quiet = time.time() - t0
    if ctl.returncode != 0:
        raise Failure("ctl drain --wait: exit %d: %s%s" % (ctl.returncode, ctl.stdout, ctl.stderr))
    if not pair.has_vip(b):
        raise Failure("ctl drain --wait returned but the address is not on %s:\n%s" % (b, ctl.stdout))
    open_at_stop = int(re.search(r"(\d+) still open", ctl.stdout).group(1))
    code = pair.stop(pair.smtplb[m], timeout=15)
    time.sleep(1)
    recs = load.finish()
    failed = [r for r in recs if r["class"] != "ok"]
    on_b = [r for r in recs if r["node"] == b]
    if not on_b:
        raise Failure("planned switch: no session went through %s" % b)
    t_move = on_b[0]["start"]
    served_after = [r for r in recs if r["node"] == m and r["start"] > t0]
    open_at_move = [r for r in recs if r["node"] == m and r["start"] < t_move < r["end"]]
    unknown = [r for r in recs if r["node"] is None and r["class"] == "ok"]
    if not forwarding:
        spanning = [r for r in recs if r["start"] < t_move < r["end"] and r["node"] != b]
        cut = [r for r in spanning if r["class"] != "ok"]
        line = ("control, planned switch without the forwarding rule on %s: %d sessions were open on %s when the "
                "address moved (%.3f s after the drain); %d of them failed (%s)" % (
                    b, len(spanning), m, t_move - t0, len(cut), classes(cut)))
        if not cut:
            raise Failure(line + "\nexpected resets without the forwarding rule: the planned-switch check would "
                                 "not see them")
        return line
    fwd = pair.forwarded_packets(b) - fwd0
    line = ("planned switch: smtplb ctl drain on %s; address moved to %s after %.3f s; %s kept serving: %d new "
            "sessions after the drain; %d sessions open on %s at the move, %d of them completed; %d packets "
            "forwarded %s -> %s; ctl --wait returned after %.1f s (\"%s\"), then SIGTERM with %d sessions open; "
            "%d of %d sessions failed (%s)" % (
                m, b, t_move - t0, m, len(served_after), len(open_at_move), m,
                sum(r["class"] == "ok" for r in open_at_move), fwd, b, m, t_quiet, ctl.stdout.strip().splitlines()[-1],
                open_at_stop, len(failed), len(recs), classes(failed)))
    problems = []
    if failed:
        problems.append("failed sessions: %r" % failed[:5])
        if os.environ.get("SMTPLB_KEEP"):
            for node in NODES:
                with open(os.path.join(pair.work, "conntrack-%s-%d.txt" % (node, time.time())), "w") as f:
                    f.write(pair.nsexec(node, "cat", "/proc/net/nf_conntrack").stdout)
    if unknown:
        problems.append("successful sessions in neither access log: %r" % unknown[:3])
    if not served_after:
        problems.append("the drained node served no new session")
    if not open_at_move:
        problems.append("no session was open on %s when the address moved: the switch was not exercised" % m)
    if fwd <= 0:
        problems.append("no packet was forwarded to the old node")
    if open_at_stop <= 0:
        problems.append("no session was open on %s when it was stopped: the stop was not exercised" % m)
    if code != 0:
        problems.append("smtplb on %s exited %s after SIGTERM" % (m, code))
    if problems:
        raise Failure(line + "\n" + "\n".join(problems))
    return line


def ctl(pair, node, *args):
    r = run(SMTPLB_BIN, "ctl", "--socket", pair.admin_socket(node), *args, timeout=40)
    return r.stdout


def reused_port(pair):
    """A client port that ended a session on one node is used again, within the minutes
    its conntrack entry (TIME_WAIT) lives there, for a session on the other node, and the
    address moves back while it is open: the packets must still reach that session."""
    m, b = pair.wait_ready()
    port = 40000 + os.getpid() % 20000
    first = Load(pair, "reuse1-%d" % time.time_ns(), chunks=1, chunk_delay=0,
                 extra=("--sessions", "1", "--source-port", str(port)))
    wait_until(lambda: first.proc.poll() is not None, 15, "the first session")
    r1 = first.finish()
    if len(r1) != 1 or r1[0]["class"] != "ok" or r1[0]["node"] != m:
        raise Failure("reused port: the first session from port %d failed or missed %s: %r" % (port, m, r1))
    ctl(pair, m, "drain")
    pair.wait_vip(b, 10)
    ctl(pair, m, "ready")
    pair.wait_ready()
    second = Load(pair, "reuse2-%d" % time.time_ns(), chunks=20, chunk_delay=0.2,
                  extra=("--sessions", "1", "--source-port", str(port)))
    time.sleep(1)  # the session (~4 s) is under way
    t0 = time.time()
    ctl(pair, b, "drain")
    t_move = pair.wait_vip(m, 10) - t0
    wait_until(lambda: second.proc.poll() is not None, 20, "the second session")
    r2 = second.finish()
    ctl(pair, b, "ready")
    line = ("reused port: port %d ended a session on %s, then a session from it on %s was open when the address "
            "moved back to %s (%.3f s after the drain): %s (%s)" % (
                port, m, b, m, t_move, r2[0]["class"] if r2 else "no session", r2[0]["detail"] if r2 else ""))
    if len(r2) != 1 or r2[0]["class"] != "ok" or r2[0]["node"] != b:
        raise Failure(line + "\n%r" % r2)
    return line


def node_loss(pair):
    m, b = pair.wait_ready()
    load = Load(pair, "loss-%d" % time.time_ns(), chunks=5, chunk_delay=0.05)
    load.warm()
    t0 = time.time()
    pair.ip("sw", "link", "set", m + "f", "down")
    t_down = time.time()  # a session that had its greeting before this was open at the cut
    t_vip = pair.wait_vip(b, 10) - t0
    time.sleep(2)
    recs = load.finish()
    failed = [r for r in recs if r["class"] != "ok"]
    open_at_cut = [r for r in failed if r["greeting"] is not None and r["greeting"] < t_down]
    during = [r for r in failed if r not in open_at_cut]
    after = [r for r in recs if r["start"] > t0 + t_vip + 0.1]
    late = [r for r in after if r["class"] != "ok"]
    direct = [r for r in recs if r["start"] > t0 and r["class"] == "ok" and r["connected"] - r["start"] < 0.5]
    limit = dead_interval(b)
    line = ("node loss: front link of %s down; address on %s after %.3f s (dead interval 3 x %g s + skew = %.2f s); "
            "first session connecting at once started %.3f s after the cut; %d of %d sessions failed: %d open at "
            "the cut (%s), %d started during the takeover (%s)" % (
                m, b, t_vip, ADVERT_INT, limit, (direct[0]["start"] - t0) if direct else float("nan"),
                len(failed), len(recs), len(open_at_cut), classes(open_at_cut), len(during), classes(during)))
    if not limit - ADVERT_INT - 0.1 <= t_vip <= limit + 0.3:
        raise Failure(line + "\ntakeover outside [dead interval - advert_int, dead interval]")
    if late or not after:
        raise Failure(line + "\nsessions started after the takeover failed: %r" % late[:5])
    return line


def main():
    if os.geteuid() != 0:
        print("SKIP: needs root (it makes network namespaces)")
        return SKIP
    missing = [t for t in ("ip", "nft", "keepalived", "curl", "smtp-sink") if not shutil.which(t)]
    if missing:
        print("SKIP: needs %s (scripts/deps.sh test installs them)" % ", ".join(missing))
        return SKIP
    if not os.path.exists(SMTPLB_BIN):
        print("FAIL: no smtplb binary at %s" % SMTPLB_BIN)
        return 1
    probe = "slbha%d-probe" % os.getpid()
    r = run("ip", "netns", "add", probe, check=False)
    if r.returncode != 0:
        print("SKIP: cannot make a network namespace here: %s" % r.stderr.strip())
        return SKIP
    run("ip", "netns", "del", probe, check=False)
    runs = int(os.environ.get("SMTPLB_HA_RUNS", "1"))
    budget = int(os.environ.get("SMTPLB_HA_BUDGET", str(100 + 80 * runs)))

    def over_budget(*_):
        raise Budget("the test's time budget (%d s) ran out" % budget)

    signal.signal(signal.SIGALRM, over_budget)
    signal.signal(signal.SIGTERM, over_budget)
    Pair.remove_stale()
    before = host_state()
    work = tempfile.mkdtemp(prefix="smtplb-ha.")
    pair = Pair(work)
    failures = []
    started = time.monotonic()
    signal.alarm(budget)
    try:
        try:
            pair.setup()
            print("pair up: %s master, %s backup (%.1f s)" % (*pair.wait_ready(30), time.monotonic() - started))
            print("keepalived: vrrp_version 3, advert_int %g s, unicast, nopreempt, track_process (weight 0), "
                  "vrrp_script curl /healthz every 1 s (fall 1, rise 2, weight 0); priorities lb1 %d, lb2 %d" % (
                      ADVERT_INT, NODES["lb1"]["priority"], NODES["lb2"]["priority"]))
            sys.stdout.flush()
            for i in range(runs):
                steps = [("crash", crash), ("planned switch", planned), ("node loss", node_loss)]
                if i == 0:
                    steps.append(("reused port", reused_port))
                    steps.append(("control", lambda p: planned(p, forwarding=False)))
                only = os.environ.get("SMTPLB_HA_ONLY")  # e.g. "planned switch", when debugging
                steps = [st for st in steps if not only or st[0] == only]
                for name, fn in steps:
                    try:
                        print("run %d/%d %s" % (i + 1, runs, fn(pair)))
                    except Failure as e:
                        failures.append("run %d %s: %s" % (i + 1, name, e))
                        print("FAIL run %d/%d %s" % (i + 1, runs, e))
                    sys.stdout.flush()
                    pair.restore()
        except (Failure, Budget, subprocess.TimeoutExpired) as e:
            failures.append(str(e))
            print("FAIL %s" % e)
        finally:
            signal.alarm(0)
            pair.stop_all()
            pair.destroy()
    finally:
        if os.environ.get("SMTPLB_KEEP"):
            print("kept %s" % work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    after = host_state()
    if after != before:
        failures.append("the host's namespace changed")
        for a, b in zip(before, after):
            if a != b:
                print("host state before:\n%s\nafter:\n%s" % (a, b))
    left = [n for n in run("ip", "netns", "list", check=False).stdout.split() if n.startswith(pair.prefix)]
    if left:
        failures.append("namespaces left: %s" % left)
    print("%.0f s" % (time.monotonic() - started))
    if failures:
        print("%d failure(s)" % len(failures))
        return 1
    print("all scenarios passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
