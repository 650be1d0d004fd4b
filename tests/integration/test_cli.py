#!/usr/bin/env python3
"""Command line (smtplb(8)): --check, -q, -V, exit codes 0 / 1 / 64 / 78."""

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import SMTPLB_BIN, TestCase, check_sanitizer, main, make_config, run_smtplb  # noqa: E402

BAD = """\
[global]
workers = 100
bogus = 1

[listener.mx]
address = "127.0.0.1"
port = 0
pool = "nope"

[pool.p]
connect_timeout = "5 parsecs"
algorithm = "random"

[[pool.p.server]]
name = "s1"
address = "127.0.0.1"
port = 2525
"""

ERROR_LINE = re.compile(r"^(?P<file>.+):(?P<line>\d+):(?P<col>\d+): (?P<msg>.+)$")


class CliTest(TestCase):

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="smtplb-cli-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def write(self, name, text):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def good_config(self):
        return self.write("good.toml", make_config([("s1", "127.0.0.1", 2525)]))

    def errors(self, text):
        out = []
        for line in text.splitlines():
            m = ERROR_LINE.match(line)
            if m:
                out.append((m.group("file"), int(m.group("line")), int(m.group("col")), m.group("msg")))
        return out

    def test_check_reports_every_error(self):
        path = self.write("bad.toml", BAD)
        r = run_smtplb(["--check", "-f", path])
        self.assertEqual(r.returncode, 78, r)
        errs = self.errors(r.stderr)
        self.assertEqual({e[0] for e in errs}, {path}, r.stderr)
        got = {(e[1], e[2]) for e in errs}
        # workers value, unknown key, undefined pool, bad duration, bad algorithm
        self.assertEqual(got, {(2, 11), (3, 1), (8, 8), (11, 19), (12, 13)}, r.stderr)
        by_line = {e[1]: e[3] for e in errs}
        self.assertIn("workers", by_line[2])
        self.assertIn("bogus", by_line[3])
        self.assertIn("nope", by_line[8])
        self.assertIn("5 parsecs", by_line[11])
        self.assertIn("algorithm", by_line[12])
        self.assertNotIn("test is successful", r.stdout + r.stderr)

    def test_check_short_option(self):
        path = self.write("bad.toml", BAD)
        r = run_smtplb(["-c", "-f", path])
        self.assertEqual(r.returncode, 78)
        self.assertEqual(len(self.errors(r.stderr)), 5, r.stderr)

    def test_toml_syntax_error(self):
        path = self.write("syntax.toml", "[global\nworkers = 1\n")
        r = run_smtplb(["--check", "-f", path])
        self.assertEqual(r.returncode, 78)
        errs = self.errors(r.stderr)
        self.assertTrue(errs, r.stderr)
        self.assertEqual(errs[0][:2], (path, 1))

    def test_missing_file(self):
        """A file that is not there is said to be missing, with no LINE:COL as if it had
        a syntax error; without --check smtplb also names the -f option."""
        path = os.path.join(self.dir, "missing.toml")
        r = run_smtplb(["--check", "-f", path])
        self.assertEqual(r.returncode, 78)
        self.assertEqual(r.stderr, "%s: the file does not exist\n" % path)
        r = run_smtplb(["-f", path])
        self.assertEqual(r.returncode, 78)
        self.assertEqual(r.stderr, "%s: the file does not exist\nsmtplb: not started (-f names the configuration "
                         "file, default /etc/smtplb/smtplb.toml)\n" % path)
        r = run_smtplb(["--check", "-f", self.dir])
        self.assertEqual((r.returncode, r.stderr), (78, "%s: this is a directory, not a file\n" % self.dir))

    def test_bad_config_without_check_does_not_start(self):
        path = self.write("bad.toml", BAD)
        r = run_smtplb(["-f", path])
        self.assertEqual(r.returncode, 78)
        self.assertEqual(len(self.errors(r.stderr)), 5, r.stderr)
        self.assertIn("not started", r.stderr)

    def test_check_good_file(self):
        path = self.good_config()
        r = run_smtplb(["--check", "-f", path])
        self.assertEqual(r.returncode, 0, r)
        self.assertEqual(r.stdout, "configuration file %s test is successful\n" % path)
        self.assertEqual(r.stderr, "")

    def test_check_good_file_quiet(self):
        path = self.good_config()
        for args in (["--check", "-q", "-f", path], ["-c", "--quiet", "--config", path], ["-q", "-c", "-f", path]):
            with self.subTest(args=args):
                r = run_smtplb(args)
                self.assertEqual((r.returncode, r.stdout, r.stderr), (0, "", ""))

    def test_check_does_not_bind(self):
        """--check validates only: a fixed port that is busy does not matter."""
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen(1)
            path = self.write("busy.toml", make_config([("s1", "127.0.0.1", 2525)],
                                                       listener={"port": busy.getsockname()[1]}))
            r = run_smtplb(["--check", "-f", path])
            self.assertEqual(r.returncode, 0, r)

    def test_version(self):
        for opt in ("-V", "--version"):
            with self.subTest(opt=opt):
                r = run_smtplb([opt])
                self.assertEqual(r.returncode, 0)
                self.assertRegex(r.stdout, r"^smtplb \d+\.\d+\.\d+\S*\n$")

    def test_help(self):
        r = run_smtplb(["--help"])
        self.assertEqual(r.returncode, 0)
        self.assertIn("usage: smtplb", r.stdout)

    def test_usage_errors_exit_64(self):
        for args in (["--bogus"], ["-x"], ["-f"], ["--log-level", "loud"], ["extra-argument"]):
            with self.subTest(args=args):
                r = run_smtplb(args)
                self.assertEqual(r.returncode, 64, r)
                self.assertIn("usage:", r.stderr)
                self.assertEqual(r.stdout, "")

    def test_runtime_bind_failure_exits_1(self):
        """The listener's port is taken (by a socket without SO_REUSEPORT): exit 1, with
        the reason in the log."""
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen(1)
            path = self.write("busy.toml", make_config([("s1", "127.0.0.1", 2525)],
                                                       listener={"port": busy.getsockname()[1]}))
            try:
                r = subprocess.run([SMTPLB_BIN, "-f", path], stdin=subprocess.DEVNULL, capture_output=True,
                                   text=True, timeout=10)
            except subprocess.TimeoutExpired as e:  # it started anyway: a bug; it was killed by run()
                self.fail("smtplb started on a busy port: %s" % e)
            check_sanitizer(r)
            self.assertEqual(r.returncode, 1, r)
            self.assertIn("cannot bind", r.stderr)


if __name__ == "__main__":
    main()
