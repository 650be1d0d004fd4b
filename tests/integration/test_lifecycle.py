#!/usr/bin/env python3
"""Lifecycle (issue 5): graceful stop with a client inside DATA, sd_notify messages and
their order (path and abstract socket), log.target = "file" with SIGUSR1 reopen
(logrotate style) and a bad log path, journald priority prefixes under JOURNAL_STREAM,
and the open-files limit raised to the hard limit.

The plain cases use the harness's Smtplb; the ones that need a special environment
(NOTIFY_SOCKET, JOURNAL_STREAM, a lowered RLIMIT_NOFILE, a log file instead of stderr)
start it through EnvSmtplb below, which differs only in how the process is started and
where its log is read, and is stopped the same way (SIGTERM, SIGKILL by PID). Every wait
is bounded; only 127.0.0.1.
"""

import os
import re
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (LISTEN_RE, SMTPLB_BIN, STEP_TIMEOUT, Behaviour, Smtplb, TestCase, connect,  # noqa: E402
                     main, make_config, recv_until_eof, run_smtplb, server_of, wait_until)

OK_QUIT = b"221 2.0.0 Bye\r\n"
BODY_HEAD = b"".join(b"Subject: line %04d before the signal\r\n" % i for i in range(50))
BODY_TAIL = b"".join(b"line %04d after the signal\r\n" % i for i in range(2000))


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


class EnvSmtplb(Smtplb):
    """The harness's Smtplb with control over the process start: extra environment
    (None values remove a variable), a preexec_fn, JOURNAL_STREAM set to the log file's
    device:inode (journal=True), and the log read from `file_log` (log.target = "file")
    instead of stderr. Stopping and checking the exit are the harness's."""

    def __init__(self, config, *, env=None, preexec_fn=None, journal=False, file_log=None, **kw):
        super().__init__(config, **kw)
        self.env = env or {}
        self.preexec_fn = preexec_fn
        self.journal = journal
        self.file_log = file_log

    def __enter__(self):
        self.dir = tempfile.mkdtemp(prefix="smtplb-it-")
        self.config_path = os.path.join(self.dir, "smtplb.toml")
        self.log_path = os.path.join(self.dir, "smtplb.log")  # stdout and stderr
        with open(self.config_path, "w") as f:
            f.write(self.config)
        self._logf = open(self.log_path, "wb")
        env = dict(os.environ)
        for k in ("NOTIFY_SOCKET", "JOURNAL_STREAM"):
            env.pop(k, None)
        for k, v in self.env.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        if self.journal:
            st = os.fstat(self._logf.fileno())
            env["JOURNAL_STREAM"] = "%d:%d" % (st.st_dev, st.st_ino)
        try:
            self.proc = subprocess.Popen([SMTPLB_BIN, "-f", self.config_path, *self.args], stdin=subprocess.DEVNULL,
                                         stdout=self._logf, stderr=subprocess.STDOUT, env=env,
                                         preexec_fn=self.preexec_fn)
            self.pid = self.proc.pid
            listeners = re.findall(r"^\[listener\.([^\]\s]+)\]", self.config, re.M)
            self.wait_log(LISTEN_RE, count=len(listeners), timeout=self.start_timeout,
                          what="listeners %s to be bound" % listeners)
            for m in LISTEN_RE.finditer(self.log()):
                self.ports[m.group(1)] = int(m.group(3))
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

    def log(self):
        if self.file_log is None:
            return super().log()
        if self._final_log is not None:
            return self._final_log
        try:
            with open(self.file_log, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def stderr_text(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")


class NotifySocket:
    """An AF_UNIX datagram socket standing in for systemd's notify socket. A thread
    records every message as (CLOCK_MONOTONIC in µs at receipt, text, on_message(text))."""

    def __init__(self, address, on_message=None):
        self.address = address  # a path, or "\0name" for the abstract namespace
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.on_message = on_message or (lambda text: None)
        self.messages = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="notify")
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            r, _, _ = select.select([self.sock], [], [], 0.1)
            if not r:
                continue
            data = self.sock.recv(65536)
            now_us = time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6
            text = data.decode("utf-8", "replace")
            try:
                extra = self.on_message(text)
            except Exception as e:  # recorded for the test to see
                extra = "on_message failed: %r" % e
            with self._lock:
                self.messages.append((now_us, text, extra))

    def texts(self):
        with self._lock:
            return [t for _, t, _ in self.messages]

    def wait(self, n, timeout=STEP_TIMEOUT):
        wait_until(lambda: len(self.texts()) >= n, timeout, "%d notify messages (have %r)" % (n, self.texts()))
        with self._lock:
            return list(self.messages)

    def close(self):
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def fields(text):
    """sd_notify message -> dict (one VAR=VALUE per line)."""
    return dict(line.split("=", 1) for line in text.split("\n") if line)


def refused(port):
    """True when a connection to port is refused. A connection reset instead counts as
    not refused yet: it was caught in the accept queue of a listener being closed."""
    try:
        connect(port, timeout=1).close()
        return False
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        return False


def wait_exit(lb, timeout):
    """Waits for smtplb to exit by itself; returns its exit status (None on timeout)."""
    try:
        lb.returncode = lb.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    return lb.returncode


def start_data(test, port):
    """A client inside DATA: greeting, EHLO, MAIL, RCPT, DATA, the first lines of a body."""
    c = test.client(port)
    test.assertEqual(server_of(c.greeting()), "s1")
    c.expect("EHLO client.test", 250)
    c.expect("MAIL FROM:<a@example.org>", 250)
    c.expect("RCPT TO:<b@example.org>", 250)
    c.expect("DATA", 354)
    c.sock.sendall(BODY_HEAD)
    return c


class LifecycleTestCase(TestCase):

    def env_smtplb(self, config, **kw):
        lb = EnvSmtplb(config, **kw)
        lb.__enter__()
        self.addCleanup(self._stop_smtplb, lb)
        return lb

    def tmpdir(self):
        d = tempfile.mkdtemp(prefix="smtplb-lifecycle.")
        self.addCleanup(shutil.rmtree, d, ignore_errors=True)
        return d


# --------------------------------------------------------------------------------------
# graceful stop
# --------------------------------------------------------------------------------------


class GracefulStopTest(LifecycleTestCase):

    def test_client_inside_data_finishes_after_sigterm(self):
        srv = self.fake("s1")
        lb = self.smtplb(make_config([srv], global_={"shutdown_grace": "20s"}), up=["p/s1"])
        c = start_data(self, lb.port())
        wait_until(lambda: srv.sessions() and srv.sessions()[0].commands[-1:] == ["DATA"], 5,
                   "the fake server to be inside DATA")
        label = c.label()
        off = lb.log_offset()
        os.kill(lb.pid, signal.SIGTERM)
        lb.wait_log(r"stopping: listeners closed, 1 open sessions may finish within shutdown_grace 20s", since=off)
        # New clients are refused while the session goes on.
        wait_until(lambda: refused(lb.port()), 5, "the listener to close")
        self.assertTrue(lb.alive())
        c.sock.sendall(BODY_TAIL + b".\r\n")
        self.assertEqual(c.reply(), b"250 2.0.0 Ok: queued as s11\r\n")
        self.assertTrue(refused(lb.port()))
        t_quit = time.monotonic()
        self.assertEqual(c.quit(), OK_QUIT)
        # It then exits 0 on its own, long before shutdown_grace.
        self.assertEqual(wait_exit(lb, 10), 0)
        self.assertLess(time.monotonic() - t_quit, 5)
        self.assertEqual([m["body"] for m in srv.messages()], [BODY_HEAD + BODY_TAIL])
        a = lb.wait_access(client=label, timeout=1)[0]
        self.assertEqual((a["server"], a["term"]), ("s1", "--"))
        self.assertNotIn("shutdown_grace passed", lb.log())
        self.assertIn("smtplb stopped", lb.log())

    def test_shutdown_grace_cuts_a_client_inside_data(self):
        srv = self.fake("s1")
        lb = self.smtplb(make_config([srv], global_={"shutdown_grace": "1s"}), up=["p/s1"])
        c = start_data(self, lb.port())
        wait_until(lambda: srv.sessions() and srv.sessions()[0].commands[-1:] == ["DATA"], 5,
                   "the fake server to be inside DATA")
        label = c.label()
        t0 = time.monotonic()
        os.kill(lb.pid, signal.SIGTERM)
        # The client stays inside DATA (say nothing more): after 1 s it is closed.
        self.assertEqual(recv_until_eof(c.sock, timeout=10), b"")
        self.assertEqual(wait_exit(lb, 10), 0)
        self.assertGreaterEqual(time.monotonic() - t0, 0.9)
        self.assertLess(time.monotonic() - t0, 6)
        a = lb.wait_access(client=label, timeout=1)[0]
        self.assertEqual((a["server"], a["term"]), ("s1", "KD"))
        self.assertIn("shutdown_grace passed: closing the 1 remaining sessions", lb.log())
        # The backend saw the connection end without a final dot: no message.
        wait_until(lambda: srv.sessions()[0].done.is_set(), 5, "the backend connection to end")
        self.assertEqual(srv.messages(), [])


# --------------------------------------------------------------------------------------
# sd_notify
# --------------------------------------------------------------------------------------


class NotifyTest(LifecycleTestCase):

    def run_notify(self, bind_address, notify_env):
        srv = self.fake("s1")
        holder = {}

        def on_message(text):
            # When READY=1 first arrives, the listener must already accept connections.
            if "READY=1" not in text or "checked_ready" in holder:
                return None
            holder["checked_ready"] = True
            lb = holder.get("lb")
            m = LISTEN_RE.search(lb.log()) if lb else None
            if not m:
                return "no listening line yet"
            try:
                connect(int(m.group(3)), timeout=2).close()
            except OSError as e:
                return "connect failed: %r" % e
            return "listening"

        ns = NotifySocket(bind_address, on_message)
        self.addCleanup(ns.close)
        lb = EnvSmtplb(make_config([srv]), env={"NOTIFY_SOCKET": notify_env})
        holder["lb"] = lb
        lb.__enter__()
        self.addCleanup(self._stop_smtplb, lb)
        lb.wait_log(r"server p/s1 is UP")

        msgs = ns.wait(1)
        self.assertEqual(len(msgs), 1, ns.texts())
        ready = fields(msgs[0][1])
        self.assertEqual(ready.get("READY"), "1", msgs[0][1])
        self.assertIn("generation 1", ready.get("STATUS", ""))
        self.assertEqual(msgs[0][2], "listening", "READY=1 came before the listener accepted")

        # A good reload: RELOADING=1 with MONOTONIC_USEC, then READY=1 naming generation 2.
        off = lb.log_offset()
        os.kill(lb.pid, signal.SIGHUP)
        lb.wait_log(r"configuration reloaded: generation 2", since=off)
        msgs = ns.wait(3)
        reloading = fields(msgs[1][1])
        self.assertEqual(reloading.get("RELOADING"), "1", msgs[1][1])
        self.assertRegex(reloading.get("MONOTONIC_USEC", ""), r"^\d+$", msgs[1][1])
        lag_us = msgs[1][0] - int(reloading["MONOTONIC_USEC"])
        self.assertTrue(-1e5 <= lag_us < 5e6, "MONOTONIC_USEC %s is %.0f µs off CLOCK_MONOTONIC"
                        % (reloading["MONOTONIC_USEC"], lag_us))
        ready2 = fields(msgs[2][1])
        self.assertEqual(ready2.get("READY"), "1", msgs[2][1])
        self.assertIn("generation 2", ready2.get("STATUS", ""))
        self.assertNotIn("fail", ready2.get("STATUS", ""))

        # A bad reload: RELOADING=1, then READY=1 whose STATUS says it failed.
        with open(lb.config_path, "a") as f:
            f.write("\n[pool.p\n")
        off = lb.log_offset()
        os.kill(lb.pid, signal.SIGHUP)
        lb.wait_log(r"reload failed", since=off)
        msgs = ns.wait(5)
        bad = fields(msgs[3][1])
        self.assertEqual(bad.get("RELOADING"), "1", msgs[3][1])
        self.assertRegex(bad.get("MONOTONIC_USEC", ""), r"^\d+$")
        ready3 = fields(msgs[4][1])
        self.assertEqual(ready3.get("READY"), "1", msgs[4][1])
        self.assertIn("reload failed", ready3.get("STATUS", ""))
        self.assertIn("generation 2", ready3.get("STATUS", ""))

        # SIGTERM: STOPPING=1, and nothing after it.
        self.assertEqual(lb.terminate(signal.SIGTERM), 0)
        msgs = ns.wait(6)
        self.assertEqual(fields(msgs[5][1]), {"STOPPING": "1"})
        time.sleep(0.2)
        self.assertEqual(len(ns.texts()), 6, ns.texts())

    def test_notify_socket_path(self):
        d = self.tmpdir()
        path = os.path.join(d, "notify")
        self.run_notify(path, path)

    def test_notify_socket_abstract(self):
        name = "smtplb-test-%s" % uuid.uuid4().hex
        self.run_notify("\0" + name, "@" + name)

    def test_no_notify_socket_no_messages(self):
        """Without NOTIFY_SOCKET nothing is sent (and nothing fails)."""
        srv = self.fake("s1")
        lb = self.env_smtplb(make_config([srv]), up=["p/s1"])
        off = lb.log_offset()
        os.kill(lb.pid, signal.SIGHUP)
        lb.wait_log(r"configuration reloaded: generation 2", since=off)
        self.assertEqual(lb.terminate(signal.SIGTERM), 0)
        self.assertNotRegex(lb.log(), r"(?im)error: |notify")


# --------------------------------------------------------------------------------------
# log targets
# --------------------------------------------------------------------------------------


class LogFileTest(LifecycleTestCase):

    def session(self, lb):
        c = self.client(lb.port())
        self.assertEqual(server_of(c.greeting()), "s1")
        label = c.label()
        self.assertEqual(c.quit(), OK_QUIT)
        return label

    def test_file_target_and_sigusr1_reopen(self):
        d = self.tmpdir()
        path = os.path.join(d, "smtplb.log")
        srv = self.fake("s1")
        lb = self.env_smtplb(make_config([srv], log={"target": "file", "file": path}), file_log=path, up=["p/s1"])
        first = self.session(lb)
        lb.wait_access(client=first)
        # Nothing of it on stderr.
        self.assertNotIn("listening on", lb.stderr_text())
        self.assertNotIn(first, lb.stderr_text())

        # logrotate: rename, then SIGUSR1.
        rotated = path + ".1"
        os.rename(path, rotated)
        os.kill(lb.pid, signal.SIGUSR1)
        try:
            wait_until(lambda: os.path.exists(path), 5, "the log file to be created again")
        except AssertionError as e:
            with open(rotated, "rb") as f:
                tail = f.read().decode("utf-8", "replace")[-3000:]
            raise AssertionError("%s; smtplb %s; the rotated file ends with:\n%s"
                                 % (e, "running" if lb.alive() else "exited (%s)" % lb.proc.poll(), tail)) from None
        lb.wait_log(r"info: received SIGUSR1: log file reopened")
        old_size = os.path.getsize(rotated)
        with open(rotated, "rb") as f:
            old_text = f.read().decode()
        self.assertIn(first, old_text)
        second = self.session(lb)
        lb.wait_access(client=second)  # in the new file (lb.log() reads `path`)
        os.kill(lb.pid, signal.SIGHUP)
        lb.wait_log(r"configuration reloaded: generation 2")
        time.sleep(1.5)  # the file sink flushes info lines every second
        self.assertEqual(os.path.getsize(rotated), old_size, "the rotated file got new lines")
        new_text = lb.log()
        self.assertNotIn(first, new_text)
        self.assertIn(second, new_text)
        self.assertIn("configuration reloaded: generation 2", new_text)
        self.assertEqual(lb.stderr_text(), "")

        # log.file changes only at a restart: a warning, and lines stay in this file.
        other = os.path.join(d, "other.log")
        with open(lb.config_path, "w") as f:
            f.write(make_config([srv], log={"target": "file", "file": other}))
        os.kill(lb.pid, signal.SIGHUP)
        lb.wait_log(r"warning: reload: log\.target(, log\.file)? and log\.(file|format) take effect at the next restart")
        lb.wait_log(r"configuration reloaded: generation 3")
        self.assertFalse(os.path.exists(other))

    def test_bad_log_path_exits_1(self):
        d = self.tmpdir()
        path = os.path.join(d, "missing-dir", "smtplb.log")
        srv = self.fake("s1")
        cfg = os.path.join(d, "smtplb.toml")
        with open(cfg, "w") as f:
            f.write(make_config([srv], log={"target": "file", "file": path}))
        r = run_smtplb(["-f", cfg], timeout=STEP_TIMEOUT)  # bounded; nothing left running
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertEqual(r.stderr, "smtplb: cannot open log file %s: No such file or directory\n" % path)
        self.assertEqual(srv.snapshot(), [], "it ran health checks before failing")
        # --check does not open the file: the configuration itself is valid.
        self.assertEqual(run_smtplb(["--check", "-q", "-f", cfg]).returncode, 0)


class JournalStreamTest(LifecycleTestCase):

    def start(self, **kw):
        ok = self.fake("s1")
        bad = self.fake("s2", Behaviour(close_immediately=True))
        lb = self.env_smtplb(make_config([ok, bad]), up=["p/s1"], down=["p/s2"], **kw)
        # An error line too: a reload of a broken file.
        with open(lb.config_path, "a") as f:
            f.write("\n[pool.p\n")
        off = lb.log_offset()
        os.kill(lb.pid, signal.SIGHUP)
        lb.wait_log(r"reload failed", since=off)
        self.assertEqual(lb.terminate(signal.SIGTERM), 0)
        return lb.log().splitlines()

    def test_priority_prefixes_when_stderr_is_the_journal(self):
        lines = self.start(journal=True)
        self.assertTrue(lines)
        for ln in lines:
            self.assertRegex(ln, r"^<[3-7]>\S", "every line has a priority prefix")
            self.assertNotRegex(ln, r"^<\d>\d{4}-\d\d-\d\dT", "no timestamp under journald")
        # After the prefix, the level word may be there or not ("<6>info: ..." or "<6>...");
        # when it is, it matches the priority.
        word = {"6": "info", "4": "warning", "3": "error"}
        for ln in lines:
            m = re.match(r"<(\d)>(info|warning|error): ", ln)
            if m:
                self.assertEqual(word.get(m.group(1)), m.group(2), ln)

        def has(prio, level, rx):
            return any(re.match(r"<%s>(%s: )?%s" % (prio, level, rx), ln) for ln in lines)
        self.assertTrue(has(6, "info", r"smtplb stopped$"), lines)
        self.assertTrue(has(6, "info", r"listener mx listening on 127\.0\.0\.1:\d+ for pool p"), lines)
        self.assertTrue(has(6, "info", r"server p/s1 is UP: "), lines)
        self.assertTrue(has(4, "warning", r"server p/s2 is DOWN: "), lines)
        self.assertTrue(has(3, "error", r"reload failed "), lines)

    def test_no_prefix_without_journal_stream(self):
        lines = self.start(env={"JOURNAL_STREAM": None})
        self.check_plain(lines)

    def test_no_prefix_when_journal_stream_names_another_file(self):
        st = os.stat("/")
        lines = self.start(env={"JOURNAL_STREAM": "%d:%d" % (st.st_dev, st.st_ino)})
        self.check_plain(lines)

    def check_plain(self, lines):
        self.assertTrue(lines)
        ts = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:?\d\d "
        for ln in lines:
            self.assertRegex(ln, ts + r"(info|warning|error): ")
        self.assertTrue(any(re.search(ts + r"warning: server p/s2 is DOWN", ln) for ln in lines))


# --------------------------------------------------------------------------------------
# open files
# --------------------------------------------------------------------------------------


class OpenFilesTest(LifecycleTestCase):

    def test_soft_limit_raised_to_hard_limit(self):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard <= 256:
            self.skipTest("hard RLIMIT_NOFILE %s" % hard)
        srv = self.fake("s1")
        lb = self.env_smtplb(make_config([srv]), up=["p/s1"],
                             preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)))
        lb.wait_log(r"info: open files limit %d \(about %d sessions\)" % (hard, hard // 2))
        with open("/proc/%d/limits" % lb.pid) as f:
            row = [ln for ln in f if ln.startswith("Max open files")][0]
        self.assertEqual(row.split()[3:5], [str(hard), str(hard)], row)
        # This test's own limit is untouched.
        self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE), (soft, hard))



class WorkerCountTest(LifecycleTestCase):

    def test_workers_0_follows_the_affinity_mask(self):
        """workers = 0 runs one worker per CPU the process may use: started on one CPU of
        a larger machine, it runs one worker (it took every CPU of the machine before)."""
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            self.skipTest("needs 2 CPUs to tell the affinity mask from the machine")
        srv = self.fake("s1")
        lb = self.env_smtplb(make_config([srv], global_={"workers": 0}), up=["p/s1"],
                             preexec_fn=lambda: os.sched_setaffinity(0, {cpus[0]}))
        lb.wait_log(r"info: workers = 0: running 1 workers \(1 CPUs in the affinity mask; ")
        names = []
        for tid in os.listdir("/proc/%d/task" % lb.pid):
            with open("/proc/%d/task/%s/comm" % (lb.pid, tid)) as f:
                names.append(f.read().strip())
        # Worker threads are named smtplb-w<N> (the log writer smtplb-log; sanitizers and
        # libuv's pool may add threads of their own).
        workers = sorted(n for n in names if re.fullmatch(r"smtplb-w\d+", n))
        self.assertEqual(workers, ["smtplb-w0"], names)
        self.assertIn("smtplb-log", names)
        self.assertEqual(set(os.sched_getaffinity(0)), set(cpus), "this test's own mask is untouched")


if __name__ == "__main__":
    main()
