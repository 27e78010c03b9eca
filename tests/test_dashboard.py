"""The provisioned Grafana dashboard (deploy/grafana/dashboards/driftloop.json): every query names only metrics
that driftloop's workers export (read from prometheus_client's registry, not from the source), each part of the
loop has a panel, every model panel follows the `model` variable, and every query parses (promtool)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "driftloop.json"
DATASOURCES = ROOT / "deploy" / "grafana" / "datasources" / "prometheus.yml"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
MODEL_VARIABLE = "label_values(driftloop_serving_model_version, model)"
# Grafana's variables, as promtool gets them: a model name and a range
GRAFANA_VARIABLES = {"model": "m", "__rate_interval": "5m", "__interval": "5m", "__range": "5m"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# each part of the loop and the metrics its panels must show
PARTS = {
    "freshness": {"driftloop_feature_freshness_seconds_bucket"},
    "throughput": {"driftloop_events_in_total", "driftloop_predictions_total", "driftloop_scored_events_total"},
    "latency": {"driftloop_prediction_latency_seconds_bucket"},
    "drift": {"driftloop_drift_share", "driftloop_drift_share_threshold"},
    "performance": {"driftloop_model_performance", "driftloop_model_performance_reference"},
    "serving version": {"driftloop_serving_model_version", "driftloop_model_swaps_total"},
    "retrains": {"driftloop_retrain_requests_total", "driftloop_training_runs_total"},
    "consumer lag and dead letters": {"driftloop_consumer_lag", "driftloop_dlq_total"},
    "usage": {"driftloop_training_compute_seconds_total", "driftloop_scoring_compute_seconds_total"},
}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows and the panels of collapsed rows included."""
    for p in dashboard["panels"]:
        yield p
        yield from p.get("panels", [])


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target and annotation; template variables give their query too."""
    for p in panels(dashboard):
        for t in p.get("targets", []):
            yield f"panel {p['id']} {p['title']!r} {t['refId']}", t["expr"]
    for a in dashboard["annotations"]["list"]:
        if "expr" in a:
            yield f"annotation {a['name']!r}", a["expr"]
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            yield f"variable {v['name']}", q
            yield f"variable {v['name']} definition", v["definition"]


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bdriftloop_[a-z0-9_]+", expr))


def exported() -> set[str]:
    """Every sample name the workers' registry can expose, by metric type (counters as ``_total``, histograms
    as ``_bucket``/``_sum``/``_count``)."""
    from prometheus_client import REGISTRY

    import driftloop.core.metrics  # noqa: F401 - registers driftloop's metrics in REGISTRY

    names = set()
    for fam in REGISTRY.collect():
        if fam.type == "counter":
            names.add(f"{fam.name}_total")
        elif fam.type == "histogram":
            names |= {fam.name + s for s in HISTOGRAM_SUFFIXES}
        else:
            names.add(fam.name)
    return {n for n in names if n.startswith("driftloop_")}


def test_every_query_names_only_exported_metrics(dashboard):
    known = exported()
    used: dict[str, set[str]] = {}
    for where, expr in queries(dashboard):
        for name in metric_names(expr):
            used.setdefault(name, set()).add(where)
        other = set(re.findall(r"\b[a-z_][a-z0-9_]*(?=\{)", expr)) - metric_names(expr)
        assert other <= {"up"}, (where, other)  # series selectors other than driftloop's: `up` only
        assert not re.search(r"\bdriftloop:", expr), (where, "recording rules are Prometheus-side; query metrics")
    assert len(used) >= 25
    unknown = {name: sorted(where) for name, where in used.items() if name not in known}  # a histogram's bare
    assert unknown == {}  # name is unknown too: it is queried through _bucket, _sum and _count


def test_each_part_of_the_loop_has_a_panel(dashboard):
    shown = {name for p in panels(dashboard) for t in p.get("targets", []) for name in metric_names(t["expr"])}
    missing = {part: sorted(names - shown) for part, names in PARTS.items() if names - shown}
    assert missing == {}
    titles = " ".join(p["title"].lower() for p in panels(dashboard))
    for word in ("freshness", "throughput", "latency", "drift", "performance", "serving version", "retrain"):
        assert word in titles, word


def test_model_panels_follow_the_model_variable(dashboard):
    (var,) = [v for v in dashboard["templating"]["list"] if v["name"] == "model"]
    assert var["definition"] == MODEL_VARIABLE and var["query"]["query"] == MODEL_VARIABLE
    assert var["includeAll"] and var["multi"]
    top = dashboard["panels"]
    (start,) = [i for i, p in enumerate(top) if p["type"] == "row" and p.get("repeat") == "model"]
    assert "$model" in top[start]["title"]
    row = top[start + 1:next((i for i in range(start + 1, len(top)) if top[i]["type"] == "row"), len(top))]
    exprs = [t["expr"] for p in row for t in p["targets"]]
    assert len(row) >= 10 and len(exprs) >= 20
    assert [e for e in exprs if 'model=~"$model"' not in e] == []
    for p in dashboard["panels"][:start]:  # above the per-model row: the pipeline, not a model
        assert all("$model" not in t["expr"] for t in p.get("targets", [])), p["title"]


def test_panels_use_the_provisioned_datasource_and_fit_the_grid(dashboard):
    (source,) = [s for s in yaml.safe_load(DATASOURCES.read_text())["datasources"] if s["type"] == "prometheus"]
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    for p in panels(dashboard):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for ds in [p.get("datasource"), *(t.get("datasource") for t in p.get("targets", []))]:
            if ds is not None:
                assert ds == {"type": "prometheus", "uid": source["uid"]}, p["title"]
    assert dashboard["uid"] == "driftloop" and dashboard["templating"]["list"][0]["datasource"]["uid"] == source["uid"]


def promql(expr: str) -> str:
    """The query as Grafana sends it, for one model and a 5 m range."""
    out = re.sub(r"\$\{?(\w+)\}?", lambda m: GRAFANA_VARIABLES[m.group(1)], expr)
    assert "$" not in out, out
    return out


def test_every_query_parses(dashboard, tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus; .ci/run installs it)")
    exprs = [promql(e) for where, e in queries(dashboard) if not where.startswith("variable")]
    assert len(exprs) >= 40
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query_{i}", "expr": e}
                                                          for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    p = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in p.stdout
