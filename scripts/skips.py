#!/usr/bin/env python3
"""Prints what a test run skipped, and why, from CTest's JUnit files (ctest --output-junit).

    usage: scripts/skips.py NAME=JUNIT.xml ...     (NAME: a label for that run, e.g. build)

Two kinds of skip: a whole test CTest reports as Skipped (it exited with its
SKIP_RETURN_CODE, 77: nothing in it could run here), and single cases skipped inside a
test that ran (the Python tests print "SKIP: <case>: <reason>" for each, see
tests/integration/harness.py; the package tests print "SKIP: <reason>"). Run by
scripts/test.sh after the tests, so that a skip is never mistaken for a pass.
"""

import collections
import os
import re
import sys
import xml.etree.ElementTree as ET

SKIP_LINE = re.compile(r"^SKIP: (?:(?P<case>[\w.]+): )?(?P<reason>.*)$")


def short(case):
    # "__main__.Class.test_x" -> "Class.test_x"
    return case[len("__main__."):] if case.startswith("__main__.") else case


def read(path):
    """[(test name, skipped whole?, [(case, reason)], CTest's own message)]"""
    out = []
    for tc in ET.parse(path).getroot().iter("testcase"):
        skipped = tc.find("skipped")
        text = tc.findtext("system-out") or ""
        cases = []
        for line in text.splitlines():
            m = SKIP_LINE.match(line.strip())
            if m:
                cases.append((short(m.group("case") or ""), m.group("reason")))
        message = skipped.get("message", "") if skipped is not None else ""
        if skipped is not None or cases:
            out.append((tc.get("name"), skipped is not None, cases, message))
    return out


def main(argv):
    runs = []
    for arg in argv:
        name, _, path = arg.partition("=")
        if not path:
            sys.exit("usage: scripts/skips.py NAME=JUNIT.xml ...")
        if os.path.exists(path):
            runs.append((name, path))
    for name, path in runs:
        root = ET.parse(path).getroot()
        total = int(root.get("tests", "0"))
        items = read(path)
        whole = [i for i in items if i[1]]
        partial = [i for i in items if not i[1]]
        ncases = sum(len(i[2]) for i in partial)
        print("skips (%s): %d of %d tests skipped whole, %d case%s skipped inside tests that ran"
              % (name, len(whole), total, ncases, "" if ncases == 1 else "s"))
        for test, _, cases, message in whole:
            reasons = collections.Counter(r for _, r in cases) or collections.Counter([message or "no reason given"])
            why = "; ".join(r if n == 1 else "%s (%d cases)" % (r, n) for r, n in reasons.items())
            print("  skipped  %s: %s" % (test, why))
        for test, _, cases, _ in partial:
            for case, reason in cases:
                print("  1 case   %s: %s: %s" % (test, case or "-", reason))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
