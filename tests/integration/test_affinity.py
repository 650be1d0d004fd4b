#!/usr/bin/env python3
"""Source affinity (algorithm = "source") through the real binary.

SMTPLB_AFFINITY_KEYS synthetic client addresses (default 20000; 4000 under a sanitizer),
half IPv4 (two per /24) and half IPv6 (two per /64), arrive through inbound PROXY v2
headers from a trusted loopback source; five backends name themselves in their greeting.
Every key (prefix) reaches one server; killing a server moves only its keys (and its
clients still get a 220); its keys come back with it; a reload that reorders the servers
and a second smtplb with the pool in another order agree on every key. /status?where and
`smtplb ctl where` say where an address goes. A greylisting simulation compares source
with roundrobin.

Clients and backends run on one asyncio loop in a thread of this process, many sessions
at a time."""

import asyncio
import ipaddress
import itertools
import json
import os
import random
import re
import shutil
import signal
import struct
import sys
import tempfile
import threading
import urllib.parse
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import STEP_TIMEOUT, TestCase, main, make_config, run_smtplb, wait_until  # noqa: E402

SANITIZED = "TSAN_OPTIONS" in os.environ or "ASAN_OPTIONS" in os.environ
KEYS = int(os.environ.get("SMTPLB_AFFINITY_KEYS", "4000" if SANITIZED else "20000"))
GREY_PREFIXES = max(200, KEYS // 10)
PARALLEL = 64  # client sessions in flight
TCP_RE = r"admin API \(read-only\) on http://127\.0\.0\.1:(\d+)/"
NAMES = ["mx-a", "mx-b", "mx-c", "mx-d", "mx-e"]
ARRIVALS = itertools.count()  # orders the PROXY headers all backends saw


def proxy_v2(src, sport=40000, dport=25):
    a = ipaddress.ip_address(src)
    b = ipaddress.ip_address("198.51.100.1" if a.version == 4 else "2001:db8:ffff::25")
    fam = 0x11 if a.version == 4 else 0x21
    body = a.packed + b.packed + struct.pack("!HH", sport, dport)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, fam]) + struct.pack("!H", len(body)) + body


def prefix_of(addr):
    a = ipaddress.ip_address(addr)
    return str(ipaddress.ip_network("%s/%d" % (addr, 24 if a.version == 4 else 64), strict=False))


def addresses(n):
    """n addresses: n/2 IPv4 in n/4 /24s, n/2 IPv6 in n/4 /64s; two of each prefix, far apart."""
    out = []
    for i in range(n // 4):
        net4 = (10 << 24) + (i << 8)  # 10.0.0.0/24, 10.0.1.0/24, ...
        out += [str(ipaddress.IPv4Address(net4 + 7)), str(ipaddress.IPv4Address(net4 + 201))]
        net6 = (0x20010db8 << 96) + ((i * 2654435761) % (1 << 32) << 64)
        out += [str(ipaddress.IPv6Address(net6 + 1)), str(ipaddress.IPv6Address(net6 + (0xbeef << 48) + 5))]
    return out


class Loop:
    """An asyncio loop in a thread: backends live on it; passes of clients run on it."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout=120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Backend(asyncio.Protocol):
    """One session of a scripted backend: greets with its name ("220 mx-a ESMTP"); with
    PROXY v1 in front (greylisting), learns the client (and notes it in server.arrivals)
    and answers RCPT with 450 for a prefix it has not seen yet, 250 afterwards. With
    server.greet "421" it greets with 421 and closes, with "silent" it never greets."""

    def __init__(self, server):
        self.server = server
        self.buf = b""
        self.prefix = None

    def connection_made(self, transport):
        self.t = transport
        self.server.conns.add(transport)
        if not self.server.greylist:
            transport.write(b"220 %s ESMTP\r\n" % self.server.name.encode())

    def connection_lost(self, exc):
        self.server.conns.discard(self.t)

    def data_received(self, data):
        self.buf += data
        while b"\r\n" in self.buf:
            line, self.buf = self.buf.split(b"\r\n", 1)
            self.line(line.decode("latin-1"))

    def line(self, line):
        s = self.server
        if line.startswith("PROXY "):
            self.prefix = prefix_of(line.split()[2])
            s.arrivals.append((next(ARRIVALS), line.split()[2]))
            if s.greet == "421":
                self.t.write(b"421 4.3.2 %s busy\r\n" % s.name.encode())
                self.t.close()
            elif s.greet != "silent":
                self.t.write(b"220 %s ESMTP\r\n" % s.name.encode())
        elif line[:4].upper() in ("EHLO", "HELO", "MAIL", "NOOP", "RSET"):
            self.t.write(b"250 ok\r\n")
        elif line[:4].upper() == "RCPT":
            if self.prefix in s.seen:
                self.t.write(b"250 ok\r\n")
            else:
                s.seen.add(self.prefix)
                self.t.write(b"450 4.2.0 greylisted, try again later\r\n")
        elif line[:4].upper() == "QUIT":
            self.t.write(b"221 bye\r\n")
            self.t.close()
        else:
            self.t.write(b"500 what\r\n")


class Server:
    def __init__(self, loop, name, greylist=False, port=0):
        self.loop, self.name, self.greylist = loop, name, greylist
        self.seen = set()
        self.conns = set()
        self.arrivals = []  # (order, client address) of each PROXY header
        self.greet = None  # None: 220; "421"; "silent"
        self.port = port
        self.start()

    def start(self):
        async def go():
            return await self.loop.loop.create_server(lambda: Backend(self), "127.0.0.1", self.port,
                                                      reuse_address=True)
        self.srv = self.loop.run(go())
        self.port = self.srv.sockets[0].getsockname()[1]

    def kill(self):
        """Stops listening and resets every open connection, as a crashed MTA."""
        async def go():
            self.srv.close()
            for t in list(self.conns):
                t.abort()
            await self.srv.wait_closed()
        self.loop.run(go())


class Client(asyncio.Protocol):
    """One client session: PROXY v2 header, read the greeting, then either leave
    (affinity passes) or try one transaction (greylisting)."""

    def __init__(self, src, transaction, done):
        self.src, self.transaction, self.done = src, transaction, done
        self.buf = b""
        self.greeting = None
        self.rcpt = None
        self.step = 0

    def connection_made(self, transport):
        self.t = transport
        transport.write(proxy_v2(self.src))

    def data_received(self, data):
        self.buf += data
        while b"\r\n" in self.buf:
            line, self.buf = self.buf.split(b"\r\n", 1)
            if line[3:4] == b"-":
                continue
            self.reply(line.decode("latin-1"))

    def reply(self, line):
        if self.greeting is None:
            self.greeting = line
            if not self.transaction or not line.startswith("220 "):
                self.finish()
                return
            self.t.write(b"EHLO client.example\r\n")
        elif self.step == 0:
            self.step = 1
            self.t.write(b"MAIL FROM:<bounce@sender.example>\r\n")
        elif self.step == 1:
            self.step = 2
            self.t.write(b"RCPT TO:<postmaster@rcpt.example>\r\n")
        elif self.step == 2:
            self.rcpt = line
            self.step = 3
            self.t.write(b"QUIT\r\n")
        else:
            self.finish()

    def connection_lost(self, exc):
        self.finish()

    def finish(self):
        if not self.done.done():
            self.done.set_result((self.greeting, self.rcpt))
        self.t.close()


async def run_pass(port, srcs, transaction=False):
    """Every address once, PARALLEL at a time: {address: (greeting, rcpt reply)}."""
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(PARALLEL)
    out = {}

    async def one(src):
        async with sem:
            for attempt in range(3):
                done = loop.create_future()
                try:
                    await loop.create_connection(lambda: Client(src, transaction, done), "127.0.0.1", port)
                    out[src] = await asyncio.wait_for(done, STEP_TIMEOUT)
                    return
                except (ConnectionError, OSError, asyncio.TimeoutError) as e:
                    out[src] = ("error: %r" % e, None)

    await asyncio.gather(*(one(s) for s in srcs))
    return out


def served_by(results):
    """{address: server name} from the greetings ("220 mx-a ESMTP")."""
    out = {}
    for src, (greeting, _) in results.items():
        m = re.match(r"220 (\S+) ESMTP", greeting or "")
        out[src] = m.group(1) if m else greeting
    return out


class AffinityTest(TestCase):

    def setUp(self):
        self.loop = Loop()
        self.addCleanup(self.loop.close)
        self.dir = tempfile.mkdtemp(prefix="smtplb-affinity-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def config(self, servers, order, pool, n=0, health=None):
        sock = os.path.join(self.dir, "admin%d.sock" % n)
        cfg = make_config([(name, "127.0.0.1", servers[name].port) for name in order], pool=pool,
                          health=health or {"interval": "300ms", "rise": 1, "fall": 1},
                          listener={"proxy_protocol": "v2", "trusted_proxies": ["127.0.0.0/8"]},
                          log={"access_log": False})
        return cfg + '\n[admin]\nsocket = "%s"\nlisten = "127.0.0.1:0"\n' % sock, sock

    def start(self, cfg):
        lb = self.smtplb(cfg, up=["p/" + n for n in NAMES])
        lb.admin_port = int(re.search(TCP_RE, lb.wait_log(TCP_RE, what="the admin TCP endpoint")[0]).group(1))
        return lb

    def where(self, lb, addr):
        url = "http://127.0.0.1:%d/status?where=%s" % (lb.admin_port, urllib.parse.quote(addr))
        return json.loads(urllib.request.urlopen(url, timeout=5).read().decode())

    def test_keys_stay_move_minimally_and_agree(self):
        """Each prefix on one server; kill one: only its keys move, all still get 220; it
        returns: its keys return; reload with the servers reordered: no change; a second
        smtplb with another order: the same server for every key."""
        servers = {n: Server(self.loop, n) for n in NAMES}
        for s in servers.values():
            self.addCleanup(s.kill)
        pool = {"algorithm": "source", "retries": 4}
        cfg, sock = self.config(servers, NAMES, pool)
        lb = self.start(cfg)
        srcs = addresses(KEYS)
        base = served_by(self.loop.run(run_pass(lb.port(), srcs), timeout=600))
        bad = {a: s for a, s in base.items() if s not in NAMES}
        self.assertEqual(bad, {}, "sessions without a server's greeting")
        # Every prefix on one server (both addresses of each prefix).
        per_prefix = {}
        for a, s in base.items():
            per_prefix.setdefault(prefix_of(a), set()).add(s)
        split = {p: s for p, s in per_prefix.items() if len(s) != 1}
        self.assertEqual(split, {}, "prefixes split over servers")
        load = {n: sum(1 for s in base.values() if s == n) for n in NAMES}
        mean = len(base) / len(NAMES)
        sys.stderr.write("affinity: %d addresses (%d prefixes, IPv4 and IPv6): per server %s, max/mean %.3f\n"
                         % (len(base), len(per_prefix), load, max(load.values()) / mean))
        self.assertLess(max(load.values()) / mean, 1.25)

        # Where does this sender go: the admin API and ctl say what the sessions saw.
        for a in srcs[:200]:
            w = self.where(lb, a)
            pool_answer = w["pools"][0]
            self.assertEqual(pool_answer["server"], base[a], (a, w))
            self.assertEqual(pool_answer["key"], prefix_of(a))
            self.assertEqual(pool_answer["preferences"][0], base[a])
        for a in (srcs[0], srcs[2]):
            r = run_smtplb(["ctl", "--socket", sock, "where", a])
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertIn("pool p (source, key %s): %s\n" % (prefix_of(a), base[a]), r.stdout)
        r = run_smtplb(["ctl", "--socket", sock, "where", "not-an-address"])
        self.assertEqual(r.returncode, 1)
        self.assertIn("where: not an IP address: not-an-address", r.stderr)

        # Kill one server: only its keys move, to their second preference, and get a 220.
        victim = "mx-c"
        second = {a: self.where(lb, a)["pools"][0]["preferences"][1] for a in srcs[:200] if base[a] == victim}
        servers[victim].kill()
        during = served_by(self.loop.run(run_pass(lb.port(), srcs), timeout=600))
        failed = {a: s for a, s in during.items() if s not in NAMES or s == victim}
        self.assertEqual(failed, {}, "clients without a 220 from a live server")
        moved_others = sum(1 for a in srcs if base[a] != victim and during[a] != base[a])
        moved = sum(1 for a in srcs if during[a] != base[a])
        on_victim = sum(1 for a in srcs if base[a] == victim)
        sys.stderr.write("affinity: %s killed: %d of %d keys moved (%d were on it), others moved: %d\n"
                         % (victim, moved, len(srcs), on_victim, moved_others))
        self.assertEqual(moved_others, 0)
        self.assertEqual(moved, on_victim)
        for a, s in second.items():
            self.assertEqual(during[a], s, a)

        # It comes back: exactly its keys return.
        servers[victim].start()
        lb.wait_log(r"server p/%s is UP" % victim, count=2, what="the killed server back UP")
        back = served_by(self.loop.run(run_pass(lb.port(), srcs), timeout=600))
        self.assertEqual(sum(1 for a in srcs if back[a] != base[a]), 0)

        # A reload that reorders the servers changes nothing.
        order = list(reversed(NAMES))
        order[1], order[3] = order[3], order[1]
        cfg2, _ = self.config(servers, order, pool)
        with open(lb.config_path, "w") as f:
            f.write(cfg2)
        lb.proc.send_signal(signal.SIGHUP)
        lb.wait_log(r"configuration reloaded: generation 2", what="the reload")
        wait_until(lambda: all(self.where(lb, a)["pools"][0]["server"] for a in srcs[:4]), STEP_TIMEOUT,
                   "servers usable after the reload")
        reloaded = served_by(self.loop.run(run_pass(lb.port(), srcs), timeout=600))
        self.assertEqual(sum(1 for a in srcs if reloaded[a] != base[a]), 0)

        # A second smtplb with the pool in yet another order agrees on every key.
        cfg3, _ = self.config(servers, ["mx-d", "mx-b", "mx-e", "mx-a", "mx-c"], pool, n=1)
        lb2 = self.start(cfg3)
        other = served_by(self.loop.run(run_pass(lb2.port(), srcs), timeout=600))
        agree = sum(1 for a in srcs if other[a] == base[a])
        sys.stderr.write("affinity: reload with reordered servers: %d keys changed; second smtplb (other order) "
                         "agrees on %d of %d\n" % (sum(1 for a in srcs if reloaded[a] != base[a]), agree, len(srcs)))
        self.assertEqual(agree, len(srcs))

    def test_retries_follow_the_keys_preferences(self):
        """The retries of one session (a 421 greeting, a silent one, then every server
        failing) go down the key's own preference list, as /status?where shows it, and never
        back to a server already tried. One check only and fall = 100: the servers stay UP,
        so every move here is a retry, not the table skipping a DOWN server."""
        servers = {n: Server(self.loop, n, greylist=True) for n in NAMES}  # PROXY v1: they see the client
        for s in servers.values():
            self.addCleanup(s.kill)
        pool = {"algorithm": "source", "proxy_protocol": "v1", "retries": 6, "banner_timeout": "300ms"}
        cfg, _ = self.config(servers, NAMES, pool, n=4, health={"interval": "10m", "rise": 1, "fall": 100})
        lb = self.start(cfg)
        srcs = addresses(120)[::2]  # one address per prefix: 30 IPv4 and 30 IPv6 keys
        prefs = {a: self.where(lb, a)["pools"][0]["preferences"] for a in srcs}
        for a in srcs:
            self.assertEqual(sorted(prefs[a]), NAMES, a)

        def attempts(addrs):
            """{address: the servers its sessions reached, in order}; forgets them."""
            seen = sorted((i, a, name) for name, s in servers.items() for i, a in s.arrivals)
            for s in servers.values():
                s.arrivals.clear()
            return {a: [name for _, b, name in seen if b == a] for a in addrs}

        victim = "mx-c"
        mine = [a for a in srcs if prefs[a][0] == victim]
        self.assertGreater(len(mine), 0)
        for mode in ("421", "silent"):
            servers[victim].greet = mode
            got = served_by(self.loop.run(run_pass(lb.port(), mine)))
            tried = attempts(mine)
            for a in mine:
                self.assertEqual(tried[a], prefs[a][:2], (mode, a))
                self.assertEqual(got[a], prefs[a][1], (mode, a))
            sys.stderr.write("affinity retries: %s greets %s: %d keys, each served by its second preference after one "
                             "try of %s\n" % (victim, mode, len(mine), victim))

        # Every server fails: each is tried once, in the key's order, never a second time,
        # and the client gets smtplb's 421 (retries = 6 would allow two more tries).
        for s in servers.values():
            s.greet = "421"
        some = srcs[:20]
        got = self.loop.run(run_pass(lb.port(), some))
        tried = attempts(some)
        for a in some:
            self.assertEqual(tried[a], prefs[a], a)
            self.assertTrue((got[a][0] or "").startswith("421 4.3.2 "), got[a])
        sys.stderr.write("affinity retries: every server 421: %d keys, each tried all 5 servers once in its own "
                         "order, then 421\n" % len(some))

    def greylisting(self, algorithm):
        """Share of second attempts accepted: each prefix's first try is greylisted (450) by
        the backend it reaches; the retry comes from another address of the same prefix."""
        servers = {n: Server(self.loop, n, greylist=True) for n in NAMES}
        for s in servers.values():
            self.addCleanup(s.kill)
        cfg, _ = self.config(servers, NAMES, {"algorithm": algorithm, "proxy_protocol": "v1"},
                             n=2 if algorithm == "source" else 3)
        lb = self.start(cfg)
        srcs = addresses(GREY_PREFIXES * 2)
        first = [a for i, a in enumerate(srcs) if i % 2 == 0]
        retry = [a for i, a in enumerate(srcs) if i % 2 == 1]
        # Retries come back in their own order (minutes later, as each sender's queue runs),
        # not in lockstep with the first attempts.
        random.Random(16).shuffle(retry)
        r1 = self.loop.run(run_pass(lb.port(), first, transaction=True), timeout=600)
        r2 = self.loop.run(run_pass(lb.port(), retry, transaction=True), timeout=600)
        greylisted = sum(1 for g, rcpt in r1.values() if rcpt and rcpt.startswith("450"))
        accepted = sum(1 for g, rcpt in r2.values() if rcpt and rcpt.startswith("250"))
        self.assertEqual(greylisted, len(first), "every first attempt greylisted")
        return accepted / len(retry), len(retry)

    def test_greylisting_retries_reach_the_same_server(self):
        source, n = self.greylisting("source")
        rr, _ = self.greylisting("roundrobin")
        sys.stderr.write("greylisting: %d prefixes, second attempts accepted: source %.2f%%, roundrobin %.2f%%\n"
                         % (n, source * 100, rr * 100))
        self.assertGreaterEqual(source, 0.99)
        self.assertLess(rr, 0.5)


if __name__ == "__main__":
    main()
