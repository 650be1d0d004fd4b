#!/usr/bin/env python3
"""`smtplb agent` against a real private Postfix: mail to an unreachable destination
fills the deferred queue, the agent's weight falls as it grows, and smtplb shifts new
sessions away from that Postfix (splits measured over whole round-robin cycles).

Postfix (127.0.0.1) relays example.net to a port nothing listens on, so every message
ends up deferred. smtplb agent runs as the postfix user (as smtplb-agent.service does; the
queue directories are mode 0700, owned by it), reads the queue directory and listens on
127.0.0.1 at the pool's agent_port; the other server is a fake SMTP server on 127.0.0.3
whose scripted agent always says "up 100%". Root only (Postfix's master); every process
is stopped by PID and every wait is bounded.
"""

import os
import pwd
import re
import shutil
import smtplib
import socket
import stat
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
from harness import (SMTPLB_BIN, STEP_TIMEOUT, FakeSmtpServer, Smtplb, make_config, stop_process,  # noqa: E402
                     wait_until)
from test_agent import ScriptedAgent, sessions  # noqa: E402

LOW, HIGH, FLOOR = 5, 45, 10


def agent_answer(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=STEP_TIMEOUT)
    try:
        data = b""
        while not data.endswith(b"\n"):
            d = s.recv(512)
            if not d:
                break
            data += d
        return data.decode().strip()
    finally:
        s.close()


@unittest.skipIf(postfix.available(), postfix.available())
class AgentPostfixTest(harness.TestCase):

    def test_deferred_queue_moves_sessions_away(self):
        unreachable = harness.free_port()
        with postfix.Postfix({"in": "{listen} inet n - n - - smtpd"},
                             main={"relay_transport": "smtp:[127.0.0.1]:%d" % unreachable,
                                   "smtp_connect_timeout": "2s"}) as pf:
            d = tempfile.mkdtemp(prefix="smtplb-agent-e2e-")
            self.addCleanup(shutil.rmtree, d, True)
            other = FakeSmtpServer("other", host="127.0.0.3")
            self.addCleanup(other.close)
            for _ in range(20):
                try:
                    scripted = ScriptedAgent("127.0.0.3", 0, "up 100%")
                    probe = socket.socket()
                    probe.bind(("127.0.0.1", scripted.port))
                    probe.close()
                    break
                except OSError:
                    scripted.close()
            self.addCleanup(scripted.close)
            agent_port = scripted.port
            # As smtplb-agent.service runs it: the postfix user (the mail_owner here too), the
            # only one that can list Postfix's queue directories (mode 0700).
            owner = pwd.getpwnam("postfix")
            for q in ("incoming", "active", "deferred"):
                st = os.stat(os.path.join(pf.queue_dir, q))
                self.assertEqual((st.st_uid, stat.S_IMODE(st.st_mode)), (owner.pw_uid, 0o700), q)
            os.chmod(d, 0o755)
            cfg = os.path.join(d, "agent.toml")
            with open(cfg, "w") as f:
                f.write('[agent]\naddress = "127.0.0.1"\nport = %d\nqueue_directory = "%s"\nrefresh = "200ms"\n'
                        '[queue]\nlow = %d\nhigh = %d\nfloor = %d\n' % (agent_port, pf.queue_dir, LOW, HIGH, FLOOR))
            os.chmod(cfg, 0o644)
            log_path = os.path.join(d, "agent.log")
            log = open(log_path, "wb")
            self.addCleanup(log.close)
            agent = subprocess.Popen(["setpriv", "--reuid=postfix", "--regid=postfix", "--clear-groups", SMTPLB_BIN,
                                      "agent", "-f", cfg], stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT)

            self.addCleanup(stop_process, agent, STEP_TIMEOUT)
            def agent_log():
                with open(log_path, "rb") as f:
                    return f.read()

            wait_until(lambda: b"listening on" in agent_log() or agent.poll() is not None,
                       STEP_TIMEOUT, "smtplb agent to listen")
            self.assertIsNone(agent.poll(), agent_log())
            with open("/proc/%d/status" % agent.pid) as f:
                uids = re.search(r"(?m)^Uid:\s+(\d+)\s+(\d+)", f.read()).groups()
            self.assertEqual(uids, (str(owner.pw_uid), str(owner.pw_uid)))

            lb = self.smtplb(make_config([("pf", "127.0.0.1", pf.ports["in"], {"weight": 100}),
                                          (other, {"weight": 100})],
                                         health={"agent_port": agent_port, "agent_interval": "200ms",
                                                 "timeout": "5s"}),
                             up=["p/pf", "p/other"])
            port = lb.port()
            figures = []
            sent = 0
            for total, count in ((0, 600), (25, 1550), (50, 1100)):
                if total > sent:
                    c = smtplib.SMTP("127.0.0.1", pf.ports["in"], timeout=STEP_TIMEOUT)
                    for i in range(sent, total):
                        c.sendmail("a@example.org", ["user%d@%s" % (i, postfix.RELAY_DOMAIN)],
                                   "Subject: %d\r\n\r\nto an unreachable destination\r\n" % i)
                    c.quit()
                    sent = total
                # Settled: every message deferred (one attempt each, connection refused).
                answer = wait_until(
                    lambda: (lambda a: a if a.endswith("deferred=%d" % total) and "incoming=0 active=0" in a
                             else None)(agent_answer(agent_port)),
                    60, "%d deferred messages" % total)
                pct = int(re.search(r"(\d+)%", answer).group(1))
                if total:  # smtplb logs a change of weight once, whatever the counts in the comment
                    lb.wait_log(re.escape('server p/pf agent says "%s #' % answer.split(" #")[0]),
                                timeout=STEP_TIMEOUT)
                split, fail = sessions(port, count)
                self.assertEqual(fail, [])
                pf_count = count - split.get("other", 0)
                share = pf_count / float(count)
                figures.append((total, answer, pf_count, split.get("other", 0), share))
                self.assertAlmostEqual(share, pct / (pct + 100.0), delta=0.01, msg=(answer, split))
            self.assertEqual([f[1].split(" #")[0] for f in figures], ["ready up 100%", "ready up 55%", "ready up 10%"])
            # Each message deferred once: the first ones "connect to ...: Connection refused", the
            # rest "delivery temporarily suspended: connect to ...: Connection refused".
            pf.wait_log(r"status=deferred \((delivery temporarily suspended: )?connect to 127\.0\.0\.1"
                        r"\[127\.0\.0\.1\]:%d: Connection refused\)" % unreachable, count=50)
            print("smtplb agent ran as user postfix (uid %d)" % owner.pw_uid)
            for total, answer, a, b, share in figures:
                print("postfix queue: %s -> split over %d sessions: postfix %d, other %d (postfix share %.3f)"
                      % (answer, a + b, a, b, share))


if __name__ == "__main__":
    harness.main()
