#!/usr/bin/env python3
"""End to end: smtplb sends the PROXY protocol to a real Postfix (smtpd and postscreen with
*_upstream_proxy_protocol = haproxy), and takes it from HAProxy in front of it.

    client 127.0.0.5 --swaks--> smtplb listener v2 --PROXY v2--> Postfix a (smtpd)
                                                               \\-> Postfix b (postscreen -> smtpd)
    client 127.0.0.5 --swaks--> smtplb listener v1 --PROXY v1--> Postfix c (smtpd)
    client 127.0.0.5 --> HAProxy send-proxy-v2 --> smtplb (proxy_protocol v2)  --v2--> a
    client 127.0.0.5 --> HAProxy send-proxy    --> smtplb (proxy_protocol any) --v2--> b

Postfix must log the real client, [127.0.0.5] with swaks' source port, for each path.
smtplb's health checks (1 s apart, 5 s timeout, postscreen_greet_wait 2 s, nobody on
postscreen's access list) must keep every server UP and leave Postfix's log free of
errors: each check is a LOCAL (v2) or self-addressed (v1) PROXY header, then the whole
greeting, EHLO, QUIT - logged as connect/disconnect from [127.0.0.1] with
`ehlo=1 quit=1 commands=2`.

One Postfix, one smtplb and one HAProxy serve the whole class; every process is stopped
by PID / `postfix stop` in the class cleanup, also on failure. Only loopback is used.
"""
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "integration"))
import postfix  # noqa: E402
import harness  # noqa: E402
from harness import Smtplb, log_time, parse_access, wait_until  # noqa: E402

CLIENT_IP = "127.0.0.5"  # on lo with the rest of 127.0.0.0/8; not the balancer's address
SCANNER_IP = "127.0.0.6"  # clients that connect and leave at once (their lost connections are expected)
CHECK_INTERVAL = 1.0
CHECK_ROUNDS = 5         # check rounds every server must pass while the test watches
GREET_WAIT = "2s"        # postscreen_greet_wait; the check timeout (5 s) must exceed it
SERVERS = ["v2/smtpd", "v2/postscreen", "v1/smtpd", "relay_smtpd/smtpd", "relay_postscreen/postscreen"]
# Words Postfix logs when a client (here: a health check) misbehaves or Postfix suffers.
BAD_WORDS = re.compile(r"lost connection|improper command pipelining|PREGREET|HANGUP|fatal|throttling|"
                       r"warning: haproxy|panic|error:", re.I)

PROXY_SMTPD = "{listen} inet n - n - - smtpd -o smtpd_upstream_proxy_protocol=haproxy"
PROXY_POSTSCREEN = ("{listen} inet n - n - 1 postscreen -o postscreen_upstream_proxy_protocol=haproxy"
                    " -o postscreen_greet_wait=" + GREET_WAIT + " -o postscreen_access_list=")


def missing():
    return postfix.available() or (None if shutil.which("swaks") else "needs swaks")


HAVE_HAPROXY = shutil.which("haproxy") is not None


class HAProxy:
    """HAProxy 2.6 in front of two smtplb listeners: send-proxy-v2 and send-proxy (v1)."""

    def __init__(self, backends):
        self.backends = backends  # frontend name -> (server line options, smtplb port)
        self.proc = None
        self.dir = tempfile.mkdtemp(prefix="smtplb-haproxy.")
        self.log_path = os.path.join(self.dir, "haproxy.log")

    def __enter__(self):
        try:
            for _ in range(5):  # a port picked free may be taken before haproxy binds it
                self.ports = {}
                for name in self.backends:
                    port = postfix.free_port()
                    while port in self.ports.values():
                        port = postfix.free_port()
                    self.ports[name] = port
                if self._start():
                    return self
                self._stop()
            raise RuntimeError("haproxy did not start:\n" + self.log())
        except BaseException:
            self.__exit__()
            raise

    def _start(self):
        cfg = ["global", "    nbthread 1", "defaults", "    mode tcp", "    timeout connect 5s",
               "    timeout client 60s", "    timeout server 60s"]
        for name, (options, target) in self.backends.items():
            cfg += ["frontend fe_" + name, "    bind 127.0.0.1:%d" % self.ports[name], "    default_backend be_" + name,
                    "backend be_" + name, "    server lb 127.0.0.1:%d %s" % (target, options)]
        path = os.path.join(self.dir, "haproxy.cfg")
        with open(path, "w") as f:
            f.write("\n".join(cfg) + "\n")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(["haproxy", "-db", "-f", path], stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)
        with contextlib.suppress(AssertionError):
            wait_until(lambda: self.proc.poll() is not None or all(
                postfix.listens(self.proc.pid, p) for p in self.ports.values()), 10, "haproxy listening")
        return self.proc.poll() is None and all(postfix.listens(self.proc.pid, p) for p in self.ports.values())

    def _stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log(self):
        with contextlib.suppress(OSError), open(self.log_path, errors="replace") as f:
            return f.read()
        return ""

    def __exit__(self, *exc):
        self._stop()
        shutil.rmtree(self.dir, ignore_errors=True)
        return False


@unittest.skipIf(missing(), missing())
class PostfixProxyProtocol(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.t0 = time.monotonic()
        cls.pf = cls.enterClassContext(postfix.Postfix(
            {"a": PROXY_SMTPD, "b": PROXY_POSTSCREEN, "c": PROXY_SMTPD},
            services=["smtpd pass - - n - - smtpd -o syslog_name=postfix/b",
                      "dnsblog unix - - n - 0 dnsblog",
                      "tlsproxy unix - - n - 0 tlsproxy"],
            # Log the client port too, so a session can be matched to smtplb's access line.
            main={"smtpd_client_port_logging": "yes"}))
        a, b, c = (cls.pf.ports[k] for k in "abc")
        cls.t_postfix = time.monotonic() - cls.t0

        def pool(name, version, servers):
            s = "".join('[[pool.%s.server]]\nname = "%s"\naddress = "127.0.0.1"\nport = %d\n\n' % (name, n, p)
                        for n, p in servers)
            return ('[pool.%s]\nalgorithm = "roundrobin"\nproxy_protocol = "%s"\n\n'
                    '[pool.%s.health_check]\ninterval = "%ds"\ntimeout = "5s"\n\n%s'
                    % (name, version, name, CHECK_INTERVAL, s))

        def listener(name, pool_name, proxy=None):
            extra = 'proxy_protocol = "%s"\ntrusted_proxies = ["127.0.0.1/32"]\n' % proxy if proxy else ""
            return '[listener.%s]\naddress = "127.0.0.1"\nport = 0\npool = "%s"\n%s\n' % (name, pool_name, extra)

        # One worker: round-robin then alternates exactly between the two v2 servers.
        config = ('[global]\nhostname = "lb.e2e.test"\nworkers = 1\n\n'
                  + listener("v2", "v2") + listener("v1", "v1")
                  + listener("from_haproxy_v2", "relay_smtpd", "v2")
                  + listener("from_haproxy_v1", "relay_postscreen", "any")
                  + pool("v2", "v2", [("smtpd", a), ("postscreen", b)])
                  + pool("v1", "v1", [("smtpd", c)])
                  + pool("relay_smtpd", "v2", [("smtpd", a)])
                  + pool("relay_postscreen", "v2", [("postscreen", b)]))
        # Debug level logs every check result, so check rounds can be counted.
        cls.lb = cls.enterClassContext(Smtplb(config, args=["--log-level", "debug"]))
        if HAVE_HAPROXY:
            cls.haproxy = cls.enterClassContext(HAProxy({
                "v2": ("send-proxy-v2", cls.lb.port("from_haproxy_v2")),
                "v1": ("send-proxy", cls.lb.port("from_haproxy_v1")),
            }))
        cls.t_ready = time.monotonic() - cls.t0

    # -- helpers ------------------------------------------------------------------------

    def wait_first_checks(self):
        """Every server's first check decides UP or DOWN at once; all must be UP."""
        for label in SERVERS:
            line = self.lb.wait_log(r"server %s is (UP|DOWN)" % re.escape(label), timeout=15)[0]
            self.assertIn("is UP", line, "first check of %s" % label)

    def swaks(self, port):
        """One message from CLIENT_IP; returns (Postfix queue id, smtplb access line)."""
        since = self.lb.log_offset()
        r = subprocess.run(["swaks", "--local-interface", CLIENT_IP, "--server", "127.0.0.1:%d" % port,
                            "--from", "a@example.org", "--to", "x@" + postfix.RELAY_DOMAIN, "--timeout", "30"],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        m = re.search(r"^<-  250 2\.0\.0 Ok: queued as (\w+)\r?$", r.stdout, re.M)
        self.assertTrue(m, "DATA was not answered 250:\n" + r.stdout)
        line = self.lb.wait_log(r"client=\S+ listener=", since=since, timeout=10)[0]
        return m.group(1), parse_access(line)

    def lb_lines(self, pattern):
        rx = re.compile(pattern)
        return [ln for ln in self.lb.log().splitlines() if rx.search(ln)]

    def assert_client_port(self, access):
        host, port = access["client"].rsplit(":", 1)
        self.assertEqual(host, CLIENT_IP, access)
        self.assertEqual(access["term"], "--", access)
        self.assertEqual(access["tries"], 1, access)
        return int(port)

    def assert_smtpd_saw(self, service, qid, port):
        """smtpd of `service` logged the session and queued the message as CLIENT_IP:port."""
        client = r"unknown\[%s\]:%d" % (re.escape(CLIENT_IP), port)
        self.pf.wait_log(r"postfix/%s/smtpd\[\d+\]: connect from %s$" % (service, client))
        self.pf.wait_log(r"postfix/%s/smtpd\[\d+\]: %s: client=%s$" % (service, qid, client))
        self.pf.wait_log(r"postfix/%s/smtpd\[\d+\]: disconnect from %s ehlo=1 mail=1 rcpt=1 data=1 quit=1 "
                         r"commands=5$" % (service, client))

    def assert_postscreen_saw(self, port, to_port):
        self.pf.wait_log(r"postfix/b/postscreen\[\d+\]: CONNECT from \[%s\]:%d to \[127\.0\.0\.1\]:%d$"
                         % (re.escape(CLIENT_IP), port, to_port))

    def assert_postfix_log_clean(self):
        # The scanner test's clients leave on purpose: Postfix rightly logs them as lost.
        bad = [ln for ln in self.pf.log().splitlines() if BAD_WORDS.search(ln) and "[%s]" % SCANNER_IP not in ln]
        self.assertEqual(bad, [], "Postfix logged trouble")

    # -- tests --------------------------------------------------------------------------

    def test_port_scanner_leaves_no_proxy_warning_in_postfix(self):
        """Clients that connect and close at once (a port scanner on port 25): smtplb is
        still connecting to Postfix when the client's FIN arrives. Postfix must see a PROXY
        header and then the end, an ordinary lost client, never a broken upstream
        ("warning: haproxy read: EOF")."""
        self.wait_first_checks()
        since = self.lb.log_offset()
        n = 20
        for _ in range(n):
            s = socket.socket()
            s.bind((SCANNER_IP, 0))
            s.connect(("127.0.0.1", self.lb.port("v2")))
            s.close()
        self.lb.wait_log(r"client=%s:\d+ listener=v2 " % re.escape(SCANNER_IP), since=since, count=n, timeout=15)
        # smtpd logs each as a disconnect, postscreen as a HANGUP or DISCONNECT, both by the
        # scanner's address (which only a PROXY header can have told them).
        self.pf.wait_log(r"(disconnect from unknown|DISCONNECT|HANGUP after \S+ from) \[%s\]"
                         % re.escape(SCANNER_IP), count=1, timeout=15)
        time.sleep(1)  # a late warning would follow the last disconnect within moments
        warnings = [ln for ln in self.pf.log().splitlines() if "warning: haproxy" in ln]
        self.assertEqual(warnings, [], "Postfix took smtplb for a broken upstream")

    def test_v2_pool_passes_the_client_to_smtpd_and_postscreen(self):
        self.wait_first_checks()
        got = {}
        for _ in range(2):  # one worker, round-robin: one session per server
            qid, access = self.swaks(self.lb.port("v2"))
            self.assertEqual(access["listener"], "v2")
            got[access["server"]] = (qid, self.assert_client_port(access))
        self.assertEqual(set(got), {"smtpd", "postscreen"})
        qid, port = got["smtpd"]
        self.assert_smtpd_saw("a", qid, port)
        qid, port = got["postscreen"]
        # The destination is the address the client connected to: smtplb's listener.
        self.assert_postscreen_saw(port, self.lb.port("v2"))
        self.assert_smtpd_saw("b", qid, port)
        self.assert_postfix_log_clean()

    def test_v1_pool_passes_the_client_to_smtpd(self):
        self.wait_first_checks()
        qid, access = self.swaks(self.lb.port("v1"))
        self.assertEqual((access["listener"], access["server"]), ("v1", "smtpd"))
        self.assert_smtpd_saw("c", qid, self.assert_client_port(access))
        self.assert_postfix_log_clean()

    @unittest.skipUnless(HAVE_HAPROXY, "needs haproxy")
    def test_client_from_haproxy_v2_reaches_postfix(self):
        self.wait_first_checks()
        qid, access = self.swaks(self.haproxy.ports["v2"])
        # smtplb took the client address from HAProxy's header and passed it on.
        self.assertEqual((access["listener"], access["server"]), ("from_haproxy_v2", "smtpd"))
        self.assert_smtpd_saw("a", qid, self.assert_client_port(access))
        self.assert_postfix_log_clean()

    @unittest.skipUnless(HAVE_HAPROXY, "needs haproxy")
    def test_client_from_haproxy_v1_reaches_postscreen(self):
        self.wait_first_checks()
        qid, access = self.swaks(self.haproxy.ports["v1"])
        self.assertEqual((access["listener"], access["server"]), ("from_haproxy_v1", "postscreen"))
        port = self.assert_client_port(access)
        # Source and destination come from HAProxy's v1 header: the destination is the
        # HAProxy frontend the client connected to, not smtplb's listener.
        self.assert_postscreen_saw(port, self.haproxy.ports["v1"])
        self.assert_smtpd_saw("b", qid, port)
        self.assert_postfix_log_clean()

    def test_checks_keep_every_server_up_and_postfix_quiet(self):
        self.wait_first_checks()

        def passes(label):
            return self.lb_lines(r"server %s check passed" % re.escape(label))

        wait_until(lambda: all(len(passes(s)) >= CHECK_ROUNDS for s in SERVERS), CHECK_ROUNDS * CHECK_INTERVAL + 20,
                   "%d passed check rounds per server" % CHECK_ROUNDS, interval=0.2)
        # Counted by time as well: after the first check (the UP line), CHECK_ROUNDS more
        # rounds start on the server's slot of the check grid, one interval apart, except the
        # step from the first check to the slot (between half an interval and one and a half;
        # and the UP line is logged at the end of the first dialogue): so they take at least
        # CHECK_ROUNDS - 1 intervals (less 10% for timer and log slack).
        for label in SERVERS:
            up = log_time(self.lb_lines(r"server %s is UP" % re.escape(label))[0])
            last = log_time(passes(label)[CHECK_ROUNDS - 1])
            self.assertGreaterEqual(last - up, (CHECK_ROUNDS - 1) * CHECK_INTERVAL * 0.9, label)
        log = self.lb.log()
        self.assertEqual(re.findall(r".*(?:is DOWN|check failed|before DOWN|attempt failed).*", log), [])
        self.assertEqual(len(re.findall(r"server \S+ is UP", log)), len(SERVERS), "each server came UP once")

        # Postfix's side: every check is one polite dialogue from the balancer's own
        # address (LOCAL / self-addressed header), never an error.
        lb_client = r"unknown\[127\.0\.0\.1\]:\d+"
        for service, checkers in (("a", 2), ("c", 1)):
            connects = self.pf.lines(r"postfix/%s/smtpd\[\d+\]: connect from %s$" % (service, lb_client))
            self.assertGreaterEqual(len(connects), checkers * CHECK_ROUNDS, service)
        self.assertGreaterEqual(len(self.pf.lines(r"postfix/b/postscreen\[\d+\]: CONNECT from \[127\.0\.0\.1\]")),
                                2 * CHECK_ROUNDS)
        disconnects = self.pf.lines(r"smtpd\[\d+\]: disconnect from %s" % lb_client)
        self.assertGreaterEqual(len(disconnects), len(SERVERS) * (CHECK_ROUNDS - 1))  # the latest may be in flight
        impolite = [ln for ln in disconnects if not ln.endswith(" ehlo=1 quit=1 commands=2")]
        self.assertEqual(impolite, [], "checks are EHLO + QUIT and nothing else")
        self.assert_postfix_log_clean()



@unittest.skipIf(missing(), missing())
class PostfixWithoutProxySupport(unittest.TestCase):
    """A PROXY pool in front of a Postfix that does not expect the header: its checks must
    keep the server out (clients would get Postfix's answer to the header as the answer to
    their first command) and say why."""

    ROUNDS = 5

    @classmethod
    def setUpClass(cls):
        cls.pf = cls.enterClassContext(postfix.Postfix({"plain": "{listen} inet n - n - - smtpd"}))
        port = cls.pf.ports["plain"]
        config = ('[global]\nhostname = "lb.e2e.test"\nworkers = 1\n\n'
                  '[listener.mx]\naddress = "127.0.0.1"\nport = 0\npool = "v1"\n\n')
        for v in ("v1", "v2"):
            config += ('[pool.%s]\nproxy_protocol = "%s"\n\n[pool.%s.health_check]\ninterval = "%ds"\n'
                       'timeout = "5s"\n\n[[pool.%s.server]]\nname = "plain"\naddress = "127.0.0.1"\nport = %d\n\n'
                       % (v, v, v, CHECK_INTERVAL, v, port))
        cls.lb = cls.enterClassContext(Smtplb(config, args=["--log-level", "debug"]))

    def results(self, label):
        """Waits for ROUNDS check results of `label`; returns its transition lines."""
        rx = re.compile(r"server %s (check |is (UP|DOWN))" % re.escape(label))
        wait_until(lambda: len([ln for ln in self.lb.log().splitlines() if rx.search(ln)]) >= self.ROUNDS,
                   self.ROUNDS * (CHECK_INTERVAL + 5) + 5, "%d check results of %s" % (self.ROUNDS, label))
        return [ln for ln in self.lb.log().splitlines() if re.search(r"server %s is (UP|DOWN)" % re.escape(label), ln)]

    def assert_kept_out(self, label):
        transitions = self.results(label)
        self.assertTrue(transitions and "is DOWN" in transitions[0], transitions)
        self.assertEqual([t for t in transitions if "is UP" in t], [], "came UP in %d rounds" % self.ROUNDS)

    def test_v2_header_to_plain_postfix_keeps_the_server_down(self):
        # Postfix answers the binary header with 500s and a 221 (the v2 signature holds
        # "QUIT\n") and closes.
        self.assert_kept_out("v2/plain")

    def test_v1_header_to_plain_postfix_keeps_the_server_down(self):
        self.assert_kept_out("v1/plain")

    def test_mismatch_reason_names_the_proxy_protocol(self):
        for label in ("v1/plain", "v2/plain"):
            self.results(label)
            failures = [ln for ln in self.lb.log().splitlines()
                        if re.search(r"server %s (is DOWN|check failed)" % re.escape(label), ln)]
            self.assertTrue(failures, label)
            self.assertTrue(all("PROXY protocol mismatch?" in ln for ln in failures), failures)

def report_timings():
    cls = PostfixProxyProtocol
    if hasattr(cls, "t_ready"):
        sys.stderr.write("timings: Postfix up %.1fs, all peers up %.1fs\n" % (cls.t_postfix, cls.t_ready))


if __name__ == "__main__":
    harness.main(after=report_timings)
