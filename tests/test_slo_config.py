"""SLOs as code: deploy/prometheus/rules.yml and deploy/alertmanager/alertmanager.yml are valid for the real
tools (promtool, amtool), alert as documented on given series, route model alerts to the drift webhook, and
name only metrics that driftloop exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
ALERTMANAGER = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
ALERTS = {"DriftloopFeatureFreshnessSLO", "DriftloopPredictionLatencySLO", "DriftloopModelPerformanceDrop",
          "DriftloopDataDrift", "DriftloopWorkerDown", "DriftloopWorkerStalled", "DriftloopConsumerLagHigh",
          "DriftloopDeadLetterRate", "DriftloopRetrainFailed", "DriftloopStoreDown"}
MODEL_ALERTS = ("DriftloopModelPerformanceDrop", "DriftloopDataDrift")  # the ones a retrain can fix
RUNBOOK = re.compile(r"https://github\.com/driftloop/driftloop/blob/main/docs/runbooks/"
                     r"(performance-drop|data-drift|broker-outage|stuck-consumer|failed-retrain|rollback|store-outage)\.md")
WEBHOOK_URL = "http://drift:8000/v1/alerts/alertmanager"
TOKEN_FILE = "/etc/alertmanager/driftloop-webhook.token"


def tool(name: str) -> str:
    """The tool's path, or skip saying which Debian package brings it."""
    package = {"promtool": "prometheus", "amtool": "prometheus-alertmanager"}[name]
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package {package}; .ci/run installs it)")
    return path


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def alert_rules() -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rules():
        if "alert" in r:
            out.setdefault(r["alert"], []).append(r)
    return out


# --- Prometheus rules -------------------------------------------------------------------------------

def test_promtool_checks_the_rules():
    p = run(tool("promtool"), "check", "rules", str(RULES))
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"SUCCESS: {len(rules())} rules found" in p.stdout


def test_alerts_are_the_agreed_ones_with_severity_and_runbook():
    alerts = alert_rules()
    assert set(alerts) == ALERTS
    for name, rs in alerts.items():
        for r in rs:
            assert r["labels"]["severity"] in ("page", "ticket"), name
            assert RUNBOOK.fullmatch(r["annotations"]["runbook_url"]), (name, r["annotations"]["runbook_url"])
            assert r["annotations"]["summary"].strip() and r["annotations"]["description"].strip(), name
    for name in MODEL_ALERTS:  # grouped by model, so each alert instance names the model to retrain
        assert all(re.search(r"by \(model\b", r["expr"]) for r in alerts[name]), name


def exported_metrics() -> set[str]:
    """Every sample name the workers can export: the process registry after importing driftloop's metrics."""
    from prometheus_client import REGISTRY

    import driftloop.core.metrics  # noqa: F401 - registers driftloop's metrics in REGISTRY

    names = set()
    for fam in REGISTRY.collect():
        names.add(fam.name + "_total" if fam.type == "counter" else fam.name)
    return names


def test_rules_name_only_exported_metrics():
    used = set()
    for r in rules():
        used |= {re.sub(r"_(bucket|sum|count|created)$", "", m) for m in re.findall(r"driftloop_[a-z_]+", r["expr"])}
    assert used, "no driftloop metric found in the rules"
    assert used - exported_metrics() == set(), "rules name metrics that core/metrics.py does not define"
    recorded = {r["record"] for r in rules() if "record" in r}
    assert {m for r in rules() for m in re.findall(r"driftloop:[a-z0-9_:]+", r["expr"])} <= recorded


def render(text: str, values: dict[str, str]) -> str:
    """The few template forms the model alerts use, filled in by hand."""
    out = re.sub(r"\{\{\s*(\$labels\.\w+|\$value \| \w+)\s*\}\}", lambda m: values[m.group(1)], " ".join(text.split()))
    assert "{{" not in out, out
    return out


def annotations(name: str, values: dict[str, str]) -> dict[str, str]:
    (r,) = alert_rules()[name]
    return {k: render(v, values) for k, v in r["annotations"].items()}


def test_model_alerts_fire_for_the_model_beyond_its_limit_only(tmp_path):
    """Model a dropped 30% (tolerance 10%), model b 5%: only a's alert fires, once ``for`` has passed; drift
    share at its threshold fires (>=), below it not."""
    target = 'job="driftloop",instance="drift:9400"'
    series = {
        f'driftloop_model_performance_drop{{model="a",kind="realised",{target}}}': "0.3x30",
        f'driftloop_model_performance_drop{{model="a",kind="estimated",{target}}}': "0.02x30",
        f'driftloop_model_performance_drop{{model="b",kind="realised",{target}}}': "0.05x30",
        f'driftloop_model_performance_tolerance{{model="a",{target}}}': "0.1x30",
        f'driftloop_model_performance_tolerance{{model="b",{target}}}': "0.1x30",
        f'driftloop_drift_share{{model="a",{target}}}': "0.5x30",
        f'driftloop_drift_share{{model="b",{target}}}': "0.25x30",
        f'driftloop_drift_share_threshold{{model="a",{target}}}': "0.5x30",
        f'driftloop_drift_share_threshold{{model="b",{target}}}': "0.5x30",
    }
    drop = {"$labels.model": "a", "$labels.kind": "realised", "$value | humanizePercentage": "30%"}
    drift = {"$labels.model": "a", "$value | humanizePercentage": "50%"}
    (r,) = alert_rules()["DriftloopModelPerformanceDrop"]
    pending = "1m" if r.get("for") else None  # before `for` has passed nothing fires
    promtool_test(tmp_path, series, [
        *([{"eval_time": pending, "alertname": "DriftloopModelPerformanceDrop", "exp_alerts": []}] if pending else []),
        {"eval_time": "20m", "alertname": "DriftloopModelPerformanceDrop", "exp_alerts": [
            {"exp_labels": {"severity": "ticket", "model": "a", "kind": "realised"},
             "exp_annotations": annotations("DriftloopModelPerformanceDrop", drop)}]},
        {"eval_time": "20m", "alertname": "DriftloopDataDrift", "exp_alerts": [
            {"exp_labels": {"severity": "ticket", "model": "a"},
             "exp_annotations": annotations("DriftloopDataDrift", drift)}]}])


def test_a_worker_with_lag_and_no_progress_or_no_heartbeat_is_stalled(tmp_path):
    """streams has lag and committed nothing for 10 minutes; drift's loop stopped turning; serving has lag but
    progresses: the first two are stalled, serving is not."""
    series, minute = {}, "0+60x30"  # a timestamp kept current (one sample a minute)
    for comp, lag, progress, heartbeat in (("streams", "5x30", "0x30", minute), ("drift", "0x30", minute, "0x30"),
                                           ("serving", "5x30", minute, minute)):
        target = f'component="{comp}",instance="{comp}:9400",job="driftloop"'
        series[f'driftloop_consumer_lag{{{target},topic="t",partition="0"}}'] = lag
        series[f"driftloop_worker_progress_timestamp_seconds{{{target}}}"] = progress
        series[f"driftloop_worker_heartbeat_timestamp_seconds{{{target}}}"] = heartbeat
    expected = [{"exp_labels": {"severity": "page", "component": c, "instance": f"{c}:9400"},
                 "exp_annotations": annotations("DriftloopWorkerStalled", {"$labels.component": c,
                                                                           "$labels.instance": f"{c}:9400"})}
                for c in ("streams", "drift")]
    promtool_test(tmp_path, series, [{"eval_time": "10m", "alertname": "DriftloopWorkerStalled",
                                      "exp_alerts": expected}])


def promtool_test(tmp_path: Path, series: dict[str, str], alert_tests: list[dict[str, Any]]) -> None:
    """``promtool test rules`` of the rules on ``series`` (one sample a minute)."""
    tests = [{"interval": "1m", "input_series": [{"series": k, "values": v} for k, v in series.items()],
              "alert_rule_test": alert_tests}]
    unit = tmp_path / "rules_test.yml"
    unit.write_text(yaml.safe_dump({"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": tests}))
    p = run(tool("promtool"), "test", "rules", str(unit))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "SUCCESS" in p.stdout


# --- Alertmanager ----------------------------------------------------------------------------------

def test_amtool_checks_the_config():
    p = run(tool("amtool"), "check-config", str(ALERTMANAGER))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "SUCCESS" in p.stdout


def test_model_alerts_go_to_the_drift_webhook_with_its_token():
    cfg = yaml.safe_load(ALERTMANAGER.read_text())
    (hook,) = next(r for r in cfg["receivers"] if r["name"] == "driftloop")["webhook_configs"]
    assert hook["url"] == WEBHOOK_URL and hook["send_resolved"] is False and hook["max_alerts"] > 0
    assert hook["http_config"]["authorization"]["credentials_file"] == TOKEN_FILE
    amtool = tool("amtool")
    expected = {("DriftloopModelPerformanceDrop", "m"): "driftloop", ("DriftloopDataDrift", "m"): "driftloop",
                ("DriftloopPredictionLatencySLO", "m"): "default", ("DriftloopRetrainFailed", "m"): "default",
                ("DriftloopModelPerformanceDrop", None): "default", ("DriftloopWorkerDown", None): "default"}
    for (alert, model), receiver in expected.items():
        labels = [f"alertname={alert}", *([f"model={model}"] if model else [])]
        p = run(amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER}", "--verify.receivers",
                receiver, *labels)
        assert p.returncode == 0, (alert, model, p.stdout + p.stderr)
    driftloop_route = next(r for r in cfg["route"]["routes"] if r["receiver"] == "driftloop")
    assert driftloop_route["group_by"] == ["alertname", "model"]
