"""Renders the chart's monitoring objects and lists the metrics they name, for tests/it/deploy/monitoring.rs.

`monitoring_check.py OUT.json` renders deploy/helm/kiam-rs with real Helm (helm-python-sdk) with
the PodMonitors, the PrometheusRule and the dashboard ConfigMap enabled (in a namespace of their
own), lints it, validates the ConfigMap against the Kubernetes schemas (kubernetes-validate) and
the two custom resources against the shape the Prometheus Operator's CRDs require (checked here:
no schema for them is at hand), and checks that the default render has none of them. It writes
every problem found, and the metric names each alert expression and each dashboard query uses,
read by a small PromQL tokenizer (`metric_names`); the Rust test asserts that a running agent and
server export each of them.
"""

import json
import re
import sys
from pathlib import Path

import helm_python
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "deploy/helm/kiam-rs"
DASHBOARD = ROOT / "dashboards/kiam-rs.json"
RELEASE, NAMESPACE, MONITORING = "kiam", "kube-system", "monitoring"

VALUES = {
    "monitoring": {
        "podMonitor": {"enabled": True, "namespace": MONITORING, "labels": {"release": "prometheus"}},
        "prometheusRule": {"enabled": True, "namespace": MONITORING, "labels": {"release": "prometheus"}},
        "dashboard": {"enabled": True, "namespace": MONITORING, "annotations": {"grafana_folder": "kiam"}},
    }
}

# Words of PromQL that are not metric names: aggregations and the modifiers that take a label
# list, binary operators, and literals.
AGGREGATIONS = {"sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values", "group", "limitk", "limit_ratio"}
LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = AGGREGATIONS | LABEL_LISTS | {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan", "Inf", "NaN"}
TOKEN = re.compile(
    r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`'  # strings
    r"|\{[^}]*\}|\[[^\]]*\]"  # label matchers, ranges and subqueries
    r"|\d+(?:\.\d+)?(?:[eE][+-]?\d+)?[smhdwy]?"  # numbers and durations
    r"|[A-Za-z_:][A-Za-z0-9_:]*"  # identifiers
    r"|\S"
)
IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*$")

# The tokenizer on expressions whose answer is known.
SELF_TEST = {
    'sum by (code) (rate(kiam_sts_errors_total{code=~"Throttl.*"}[5m])) or sum(x_total)': ["kiam_sts_errors_total", "x_total"],
    "histogram_quantile(0.99, sum by (le) (rate(a_bucket[5m] offset 1h)))": ["a_bucket"],
    "(b > 0) - time() < 30 * 86400 or c{pod=~\"x-(agent|server)-.*\"} == 1": ["b", "c"],
    "a / on (pod) group_left (node) b unless ignoring (x) c": ["a", "b", "c"],
    "max_over_time(d[1h:5m]) > bool 1e3": ["d"],
}


def metric_names(expr):
    """The metric names an expression selects: identifiers not followed by `(`, outside label
    matchers and strings, that are neither keywords nor the labels of by/without/on/ignoring/
    group_left/group_right lists."""
    tokens = TOKEN.findall(expr)
    names, i = [], 0
    while i < len(tokens):
        tok = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        if tok in LABEL_LISTS and nxt == "(":
            i = tokens.index(")", i) + 1
            continue
        if tok == "offset":
            i += 2
            continue
        if IDENT.match(tok) and tok not in KEYWORDS and nxt != "(" and tok not in names:
            names.append(tok)
        i += 1
    return names


def render(values):
    files = helm_python.Chart.load(str(CHART)).render(values=values, name=RELEASE, namespace=NAMESPACE)
    return [d for name in sorted(files) if name.endswith(".yaml") for d in yaml.safe_load_all(files[name]) if d]


def check_podmonitor(obj, errors):
    spec = obj.get("spec", {})
    name = obj["metadata"].get("name")
    if obj["metadata"].get("namespace") != MONITORING:
        errors.append(f"PodMonitor {name}: not in the namespace the values name")
    if spec.get("namespaceSelector") != {"matchNames": [NAMESPACE]}:
        errors.append(f"PodMonitor {name}: does not select the release's namespace")
    if not spec.get("selector", {}).get("matchLabels"):
        errors.append(f"PodMonitor {name}: no selector.matchLabels")
    endpoints = spec.get("podMetricsEndpoints") or []
    if not endpoints or any(e.get("port") != "metrics" or not e.get("path") for e in endpoints):
        errors.append(f"PodMonitor {name}: podMetricsEndpoints must name the metrics port and a path")
    if obj["metadata"].get("labels", {}).get("release") != "prometheus":
        errors.append(f"PodMonitor {name}: monitoring.podMonitor.labels not applied")


DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
RULE_KEYS = {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}


def check_rule(obj, errors):
    """The PrometheusRule CRD's shape: spec.groups[] {name, rules[] {alert, expr, for, labels,
    annotations}}, unique group names, durations Prometheus parses, string label values."""
    if obj["metadata"].get("namespace") != MONITORING:
        errors.append("PrometheusRule: not in the namespace the values name")
    alerts = {}
    groups = obj.get("spec", {}).get("groups")
    if not isinstance(groups, list) or not groups:
        errors.append("PrometheusRule: spec.groups must be a non-empty list")
        return alerts
    if len({g.get("name") for g in groups}) != len(groups):
        errors.append("PrometheusRule: group names must be unique")
    for group in groups:
        if set(group) - {"name", "interval", "rules"} or not group.get("name") or not group.get("rules"):
            errors.append(f"PrometheusRule group {group.get('name')}: needs a name and rules, and nothing else")
        for rule in group.get("rules") or []:
            label = f"alert {rule.get('alert')}"
            if set(rule) - RULE_KEYS:
                errors.append(f"{label}: unknown keys {sorted(set(rule) - RULE_KEYS)}")
            if not re.match(r"^[A-Z][A-Za-z0-9]*$", str(rule.get("alert"))):
                errors.append(f"{label}: alert must be a CamelCase name")
            expr = rule.get("expr")
            if not isinstance(expr, str) or not expr.strip():
                errors.append(f"{label}: expr must be a non-empty string")
                continue
            for pair in ("()", "{}", "[]"):
                if expr.count(pair[0]) != expr.count(pair[1]):
                    errors.append(f"{label}: unbalanced {pair} in {expr!r}")
            if "for" in rule and not DURATION.match(str(rule["for"])):
                errors.append(f"{label}: for {rule['for']!r} is not a duration")
            labels, notes = rule.get("labels", {}), rule.get("annotations", {})
            if labels.get("severity") not in ("warning", "critical"):
                errors.append(f"{label}: severity must be warning or critical")
            if not all(isinstance(v, str) for v in list(labels.values()) + list(notes.values())):
                errors.append(f"{label}: label and annotation values must be strings")
            if not notes.get("summary") or not notes.get("description"):
                errors.append(f"{label}: needs a summary and a description")
            if rule["alert"] in alerts:
                errors.append(f"{label}: defined twice")
            alerts[rule["alert"]] = {"expr": expr, "severity": labels.get("severity"), "metrics": metric_names(expr)}
    return alerts


def dashboard_queries(dashboard):
    """Every target expression of the dashboard, by panel title."""
    out = {}
    for panel in dashboard.get("panels", []):
        for target in panel.get("targets", []):
            out[f"{panel.get('title')} ({target.get('refId')})"] = target["expr"]
    return out


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: monitoring_check.py OUT.json")
    errors = []
    for expr, want in SELF_TEST.items():
        if metric_names(expr) != want:
            errors.append(f"tokenizer: {expr!r} gave {metric_names(expr)}, not {want}")
    lint = helm_python.lint(str(CHART), values=VALUES, namespace=NAMESPACE, strict=True)
    errors.extend(f"lint: {e}" for e in lint.get("errors") or [])
    errors.extend(f"lint: {m}" for m in lint.get("messages") or [] if m.get("severity", 0) > 1)
    version = kubernetes_validate.latest_version()
    objects = render(VALUES)
    kinds = {}
    for obj in objects:
        kinds.setdefault(obj["kind"], []).append(obj)
    alerts, dashboard = {}, {}
    for obj in kinds.get("PodMonitor", []):
        check_podmonitor(obj, errors)
    if sorted(o["metadata"]["name"] for o in kinds.get("PodMonitor", [])) != ["kiam-agent", "kiam-server"]:
        errors.append("want one PodMonitor per component")
    rules = kinds.get("PrometheusRule", [])
    if len(rules) != 1:
        errors.append(f"want one PrometheusRule, got {len(rules)}")
    for obj in rules:
        alerts = check_rule(obj, errors)
    maps = [o for o in kinds.get("ConfigMap", []) if o["metadata"]["name"] == "kiam-dashboard"]
    for obj in maps:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"ConfigMap kiam-dashboard: {'.'.join(map(str, e.path))}: {e.message}")
        meta = obj["metadata"]
        if meta.get("labels", {}).get("grafana_dashboard") != "1" or meta.get("namespace") != MONITORING:
            errors.append("ConfigMap kiam-dashboard: lacks the sidecar label or the namespace the values name")
        shipped = json.loads(obj["data"]["kiam-rs.json"])
        if shipped != json.loads(DASHBOARD.read_text()):
            errors.append("ConfigMap kiam-dashboard: differs from dashboards/kiam-rs.json")
        dashboard = {title: {"expr": e, "metrics": metric_names(e)} for title, e in dashboard_queries(shipped).items()}
    if len(maps) != 1:
        errors.append(f"want one dashboard ConfigMap, got {len(maps)}")
    default_kinds = {o["kind"] for o in render({})}
    if default_kinds & {"PodMonitor", "PrometheusRule"} or any(
        o["kind"] == "ConfigMap" and o["metadata"]["name"] == "kiam-dashboard" for o in render({})
    ):
        errors.append("monitoring objects rendered by default: they must be opt-in")
    report = {"errors": errors, "alerts": alerts, "dashboard": dashboard, "kubernetes_version": version}
    Path(sys.argv[1]).write_text(json.dumps(report))


if __name__ == "__main__":
    main()
