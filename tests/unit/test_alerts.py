"""Alert rules (deployments/prometheus) and the Grafana dashboard (deployments/grafana): promtool
checks and unit-tests the rules, every panel has a query that parses, and every metric and label
that a rule or a panel reads is in the metric schema (serving.metrics.SCHEMA)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tasks.metrics.dashboard import panel_queries
from tasks.metrics.promql import exposed_series, grouping_labels, selectors

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deployments" / "prometheus"
DASHBOARD = ROOT / "deployments" / "grafana" / "nodewise.json"
# Labels Prometheus adds to every series of a target: its own and file-based discovery's.
TARGET_LABELS = frozenset({"job", "instance", "app", "backend"})
REQUIRED_ALERTS = {
    "NodewiseHighErrorRate",
    "NodewiseLatencyP99OverTarget",
    "NodewiseDeploymentDegraded",
    "NodewiseDeploymentFailed",
    "NodewiseRestartBudgetNearlySpent",
    "NodewiseRolloutRolledBack",
    "NodewiseTargetDown",
}


def rules() -> list[dict]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool not found: install Debian's prometheus package (scripts/setup.sh does)")
    return found


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def schema() -> dict[str, frozenset[str]]:
    """Series name -> label names, for every metric of serving.metrics.SCHEMA plus ``up``."""
    try:
        from serving.metrics import SCHEMA
    except ImportError:
        pytest.skip("serving.metrics.SCHEMA does not exist yet: nothing to check names against")
    kinds = ((m.name, str(getattr(m.kind, "value", m.kind)).lower(), m.labels) for m in SCHEMA)
    return {**exposed_series(kinds), "up": frozenset()}


def unknown_names(expr: str, schema: dict[str, frozenset[str]]) -> list[str]:
    """What ``expr`` reads that the schema does not have: metrics, matched labels, grouping labels."""
    problems, known_labels = [], set(TARGET_LABELS)
    for selector in selectors(expr):
        if selector.metric not in schema:
            problems.append(f"metric {selector.metric}")
            continue
        labels = schema[selector.metric] | TARGET_LABELS
        known_labels |= labels
        problems += [f"label {label} of {selector.metric}" for label in sorted(selector.labels - labels)]
    problems += [f"grouping label {label}" for label in sorted(grouping_labels(expr) - known_labels)]
    return problems


# -- alert rules -----------------------------------------------------------------------------------
def test_promtool_checks_the_rules_and_the_example_config(promtool: str) -> None:
    checked = run(promtool, "check", "rules", str(PROMETHEUS / "alerts.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules())} rules found" in checked.stdout
    config = run(promtool, "check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr  # the rule_files path resolves too


def test_promtool_unit_tests_pass(promtool: str) -> None:
    tested = run(promtool, "test", "rules", str(PROMETHEUS / "alerts_test.yml"))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_has_a_severity_its_annotations_and_a_runbook_anchor() -> None:
    alerts = {rule["alert"]: rule for rule in rules()}
    assert set(alerts) >= REQUIRED_ALERTS
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert {"summary", "description", "runbook_url"} <= set(rule["annotations"]), name
        assert rule["annotations"]["runbook_url"] == f"docs/operations/runbook.md#{name.lower()}"
        # an alert's labels come from bounded metric labels and its own severity only
        assert set(rule["labels"]) == {"severity"}, name


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    cases = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    firing, quiet = set(), set()
    for case in cases:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in rules()}
    assert names - firing == set(), "never shown firing"
    assert names - quiet == set(), "never shown quiet"


def test_rules_read_only_metrics_and_labels_of_the_schema(schema: dict[str, frozenset[str]]) -> None:
    for rule in rules():
        assert unknown_names(rule["expr"], schema) == [], rule["alert"]


# -- dashboard -------------------------------------------------------------------------------------
def test_the_dashboard_has_a_datasource_and_a_model_variable_and_every_panel_a_query() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    assert variables["model"]["definition"] == "label_values(nodewise_model_info, model)"
    assert variables["model"]["allValue"] == ".+"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    queries = panel_queries(DASHBOARD)
    assert {title for title, _ in queries} == {p["title"] for p in panels}
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel["title"]
    assert all("$" not in expr for _, expr in queries)
    assert any('model=~".+"' in expr for _, expr in queries)


def test_panel_queries_refuses_a_panel_without_a_query(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"panels": [{"type": "row", "panels": [{"title": "Empty", "targets": []}]}]}))
    with pytest.raises(ValueError, match=r"'Empty'.*has no query"):
        panel_queries(path)
    path.write_text(json.dumps({"panels": [{"title": "Odd", "targets": [{"expr": "up{job=~'$job'}"}]}]}))
    with pytest.raises(ValueError, match="'Odd' uses a variable"):
        panel_queries(path)


def test_every_panel_query_parses(promtool: str, tmp_path: Path) -> None:
    # promtool parses PromQL in rule files: each query becomes a recording rule.
    records = [{"record": f"panel:{i}", "expr": expr} for i, (_, expr) in enumerate(panel_queries(DASHBOARD))]
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": records}]}))
    checked = run(promtool, "check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(records)} rules found" in checked.stdout


def test_panels_read_only_metrics_and_labels_of_the_schema(schema: dict[str, frozenset[str]]) -> None:
    for title, expr in panel_queries(DASHBOARD):
        assert unknown_names(expr, schema) == [], title


# -- reading PromQL --------------------------------------------------------------------------------
def test_selectors_and_grouping_labels_are_read_from_promql() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (model, le) (rate(a_bucket{route=~"/x|/y", model!="b{c}"}[5m])))'
        " > on (model) max by (model) (vllm:kv_cache_usage_perc offset 1m) and ignoring(job) up == 1e3"
    )
    assert [(s.metric, set(s.labels)) for s in selectors(expr)] == [
        ("a_bucket", {"route", "model"}),
        ("vllm:kv_cache_usage_perc", set()),
        ("up", set()),
    ]
    assert grouping_labels(expr) == {"model", "le", "job"}
    assert exposed_series([("r", "counter", ["m"]), ("d", "histogram", ["m"]), ("g", "gauge", [])]) == {
        "r_total": {"m"},
        "d_bucket": {"m", "le"},
        "d_sum": {"m"},
        "d_count": {"m"},
        "g": set(),
    }


def test_an_unknown_metric_or_label_is_reported() -> None:
    schema = {"nodewise_requests_total": frozenset({"model", "status"})}
    expr = 'sum by (modle) (rate(nodewise_requests_total{stauts="500"}[5m])) / nodewise_request_total'
    assert unknown_names(expr, schema) == [
        "label stauts of nodewise_requests_total",
        "metric nodewise_request_total",
        "grouping label modle",
    ]
