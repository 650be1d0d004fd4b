#!/usr/bin/env python3
"""The operator's kit against a running smtplb: the Grafana dashboard
(packaging/grafana/smtplb-dashboard.json) and the Prometheus alerting rules
(packaging/prometheus/smtplb.rules.yml) use only metrics, labels and label values that
smtplb's /metrics really has.

The dashboard must be valid JSON with the panels an operator needs (sessions, rates,
per-server health and connections, check latency, refusals by reason), every panel on
the ${datasource} variable, and every expression valid PromQL (promtool parses them as
recording rules, Grafana's variables replaced). Then one smtplb with two pools (one
server up, one down) relays a session and is scraped on its read-only endpoint; every
metric name in the dashboard and the rules must be among the names it exports, every
label they match on or aggregate by must be one of that metric's labels, and every
label value they compare with `=` must occur. (The promtool unit tests of the rules are
tests/prometheus/smtplb.rules.test.yml.)
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import Behaviour, main  # noqa: E402
from test_admin import AdminTestCase, mail_session  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
DASHBOARD = os.path.join(ROOT, "packaging", "grafana", "smtplb-dashboard.json")
RULES = os.path.join(ROOT, "packaging", "prometheus", "smtplb.rules.yml")
METRIC_RE = re.compile(r"\b((?:smtplb|process)_[a-z0-9_]+)\b")
SELECTOR_RE = re.compile(r"\b((?:smtplb|process)_[a-z0-9_]+)\{([^}]*)\}")
MATCHER_RE = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"\s*')
GROUPING_RE = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? \S+$")
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
# Added by Prometheus at scrape time, or by histogram_quantile's input.
TARGET_LABELS = {"instance", "job"}


def dashboard_panels(dash):
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def dashboard_exprs(dash):
    return [(p["title"], t["expr"]) for p in dashboard_panels(dash) for t in p.get("targets", [])]


def grafana_to_promql(expr):
    return expr.replace("$__rate_interval", "5m").replace('"$instance"', '".*"')


def rules_exprs(text):
    """The `expr:` values of a rules file (block scalars or one line), without YAML."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^(\s*)expr:\s*(.*)$", lines[i])
        i += 1
        if not m:
            continue
        if m.group(2) not in ("|", ">"):
            out.append(m.group(2))
            continue
        block = []
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(m.group(1))):
            block.append(lines[i].strip())
            i += 1
        out.append(" ".join(block))
    return out


def exported(text):
    """{metric name: {label: set of values}} of a /metrics text."""
    out = {}
    for ln in text.splitlines():
        if not ln or ln.startswith("#"):
            continue
        m = SAMPLE_RE.match(ln)
        assert m, ln
        labels = out.setdefault(m.group(1), {})
        for k, v in LABEL_RE.findall(m.group(2) or ""):
            labels.setdefault(k, set()).add(v)
    return out


class DashboardTest(AdminTestCase):

    def test_dashboard_json(self):
        with open(DASHBOARD) as f:
            dash = json.load(f)
        self.assertEqual((dash["title"], dash["uid"]), ("smtplb", "smtplb-overview"))
        variables = {v["name"]: v for v in dash["templating"]["list"]}
        self.assertEqual(variables["datasource"]["type"], "datasource")
        self.assertEqual(variables["datasource"]["query"], "prometheus")
        self.assertEqual(variables["instance"]["definition"], "label_values(smtplb_build_info, instance)")
        ids = set()
        for p in dashboard_panels(dash):
            with self.subTest(panel=p["title"]):
                self.assertNotIn(p["id"], ids)
                ids.add(p["id"])
                self.assertEqual(set(p["gridPos"]), {"h", "w", "x", "y"})
                self.assertLessEqual(p["gridPos"]["x"] + p["gridPos"]["w"], 24)
                if p["type"] == "row":
                    continue
                self.assertEqual(p["datasource"], {"type": "prometheus", "uid": "${datasource}"})
                self.assertTrue(p["targets"])
                for t in p["targets"]:
                    self.assertTrue(t["expr"].strip())
                    self.assertIn('instance=~"$instance"', t["expr"], "every query follows the instance choice")
        # What the operator needs, by the metric that shows it.
        exprs = " ".join(e for _, e in dashboard_exprs(dash))
        for what, needle in (("open sessions", "smtplb_listener_current_connections"),
                             ("session rate", "rate(smtplb_listener_connections_total"),
                             ("per-server health", "smtplb_server_up"),
                             ("per-server connections", "smtplb_server_current_connections"),
                             ("check latency", "smtplb_server_check_duration_seconds_bucket"),
                             ("refusals by reason", "sum by (listener, reason) "
                                                    "(rate(smtplb_listener_rejected_connections_total")):
            self.assertIn(needle, exprs, what)

    def test_expressions_parse(self):
        """promtool parses every dashboard expression (as a recording rule) and the rules."""
        if not shutil.which("promtool"):
            self.skipTest("promtool not installed (Debian package prometheus)")
        with open(DASHBOARD) as f:
            dash = json.load(f)
        tmp = tempfile.mkdtemp(prefix="smtplb-kit-")
        self.addCleanup(shutil.rmtree, tmp, True)
        path = os.path.join(tmp, "dashboard.rules.yml")
        with open(path, "w") as f:
            f.write("groups:\n  - name: dashboard\n    rules:\n")
            for i, (_, expr) in enumerate(dashboard_exprs(dash)):
                f.write("      - record: dashboard:expr%d\n        expr: %s\n"
                        % (i, json.dumps(grafana_to_promql(expr))))
        for p in (path, RULES):
            r = subprocess.run(["promtool", "check", "rules", p], capture_output=True, text=True, timeout=30)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            self.assertIn("SUCCESS", r.stdout)

    def test_names_exist_in_metrics_of_a_running_smtplb(self):
        up = self.fake("up")
        down = self.fake("down", Behaviour(greeting=b"421 4.3.2 busy\r\n"))
        extra = ('\n[listener.mx2]\naddress = "127.0.0.1"\nport = 0\npool = "q"\n'
                 '[pool.q]\n[pool.q.health_check]\ninterval = "10m"\nehlo_name = "%s"\n'
                 '[[pool.q.server]]\nname = "down"\naddress = "127.0.0.1"\nport = %d\n' % (harness.CHECK_EHLO,
                                                                                          down.port))
        lb = self.start([up], extra=extra, up=["p/up"], down=["q/down"])
        mail_session(lb.port(), 1)
        lb.wait_access(count=1)
        r = self.get("/metrics", tcp=True)
        self.assertEqual(r.status, 200, r)
        have = exported(r.text)

        with open(DASHBOARD) as f:
            sources = [("dashboard: " + title, expr) for title, expr in dashboard_exprs(json.load(f))]
        with open(RULES) as f:
            sources += [("rules", e) for e in rules_exprs(f.read())]
        self.assertGreaterEqual(len([s for s in sources if s[0] == "rules"]), 7)
        checked = set()
        for where, expr in sources:
            with self.subTest(where=where, expr=expr):
                names = set(METRIC_RE.findall(expr))
                self.assertTrue(names, "no smtplb metric in the expression")
                for n in names:
                    self.assertIn(n, have, "smtplb exports no %s" % n)
                checked |= names
                for name, matchers in SELECTOR_RE.findall(expr):
                    for label, op, value in MATCHER_RE.findall(matchers):
                        if label in TARGET_LABELS:
                            continue
                        self.assertIn(label, have[name], "%s has no label %s" % (name, label))
                        if op == "=" and "$" not in value:
                            self.assertIn(value, have[name][label], "%s{%s} never has %r" % (name, label, value))
                known = set(TARGET_LABELS) | {"le"}
                for n in names:
                    known |= set(have[n])
                for group in GROUPING_RE.findall(expr):
                    for label in (x.strip() for x in group.split(",") if x.strip()):
                        self.assertIn(label, known, "no metric of the expression has label %s" % label)
        self.assertGreaterEqual(len(checked), 15, sorted(checked))


if __name__ == "__main__":
    main()
