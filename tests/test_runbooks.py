"""The runbooks (``docs/runbooks/``) and the producer guide name only things that exist: each of the seven runbooks
names the alerts that lead there, every alert and recording rule named is defined in
``deploy/prometheus/rules.yml`` (and every alert's ``runbook_url`` links a runbook that names it), every
``driftloop_*`` metric named is registered by ``driftloop.core.metrics``, and every ``driftloop ...`` command
in their ``sh`` blocks parses with the real CLI parser, and every query of their ``promql`` blocks with promtool."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

from driftloop.app.cli import build_parser
from driftloop.core import metrics

ROOT = Path(__file__).resolve().parents[1]
RUNBOOKS = ROOT / "docs" / "runbooks"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
# runbook → the alerts that lead there (fixed names, see deploy/prometheus/rules.yml)
LEADS = {
    "performance-drop": {"DriftloopModelPerformanceDrop"},
    "data-drift": {"DriftloopDataDrift"},
    "stuck-consumer": {"DriftloopWorkerDown", "DriftloopWorkerStalled", "DriftloopConsumerLagHigh"},
    "broker-outage": {"DriftloopDeadLetterRate"},
    "failed-retrain": {"DriftloopRetrainFailed"},
    "store-outage": {"DriftloopStoreDown"},
    "rollback": {"DriftloopModelPerformanceDrop"},  # reached from performance-drop after a bad promotion
}
DOCS = sorted({*RUNBOOKS.glob("*.md"), *(RUNBOOKS / f"{name}.md" for name in LEADS)}) + [ROOT / "docs" / "producers.md"]
ALERT = re.compile(r"\bDriftloop[A-Z][A-Za-z0-9]+\b")
RECORDED = re.compile(r"\bdriftloop:[a-z0-9_:]*[a-z0-9_]")
METRIC = re.compile(r"(?<![\w.$-])driftloop_[a-z0-9_]*[a-z0-9]\b")
PROMQL_BLOCK = re.compile(r"^( *)```promql\n(.*?)^\1```", re.S | re.M)
SH_BLOCK = re.compile(r"^( *)```sh\n(.*?)^\1```", re.S | re.M)  # also indented, in a list item
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
PLACEHOLDERS = {"MODEL": "ctr", "VERSION": "3", "VIEW": "user_impressions", "TOPIC": "dlq"}
# the series each kind of metric family exposes (prometheus_client names a counter's family without ``_total``)
SERIES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
          "summary": ("", "_sum", "_count", "_created"), "gauge": ("",), "info": ("_info",), "stateset": ("",),
          "gaugehistogram": ("_bucket", "_gsum", "_gcount"), "unknown": ("",)}


def _exported() -> set[str]:
    """Every metric name a query or a reader may use: each family's series, and a histogram's or summary's
    family name (prose names the histogram)."""
    names: set[str] = set()
    for registry in (REGISTRY, metrics.JOBS):  # JOBS: the batch jobs' textfile metrics
        for family in registry.collect():
            base = family.name.removesuffix("_total") if family.type == "counter" else family.name
            names.update(base + suffix for suffix in SERIES[family.type])
            if family.type in ("histogram", "summary"):
                names.add(base)
    return {n for n in names if n.startswith("driftloop_")}


def _rules() -> dict:
    assert RULES.exists(), f"{RULES.relative_to(ROOT)} is missing: the runbooks' alerts must be defined there"
    return yaml.safe_load(RULES.read_text())


def _alert_rules() -> dict[str, dict]:
    """Alert name → its rule (deploy/prometheus/rules.yml)."""
    return {r["alert"]: r for g in _rules()["groups"] for r in g.get("rules", []) if "alert" in r}


def _commands(doc: Path) -> list[tuple[int, list[str]]]:
    """(line number, argv after ``driftloop``) of every ``driftloop`` command in the document's ``sh`` blocks:
    continuation lines joined, environment assignments skipped, each command of a pipeline or list."""
    text = doc.read_text()
    out = []
    for block in SH_BLOCK.finditer(text):
        first = text.count("\n", 0, block.start(2)) + 1
        lines = [line.strip() for line in block.group(2).splitlines()]
        i = 0
        while i < len(lines):
            start, line = first + i, lines[i]
            while line.endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line[:-1] + " " + lines[i]
            i += 1
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            words, command = list(lexer), []
            for w in [*words, ";"]:
                if w in ("|", "||", "&&", ";", "&", ">", ">>", "<"):
                    while command and ENV_ASSIGNMENT.match(command[0]):
                        command.pop(0)
                    if command and command[0] == "driftloop":
                        out.append((start, [PLACEHOLDERS.get(a, a) for a in command[1:]]))
                    command = []
                else:
                    command.append(w)
    return out


def _queries(doc: Path) -> list[tuple[int, str]]:
    """(line number, query) of every query in the document's ``promql`` blocks: one a line, indented lines
    continue the one before."""
    text = doc.read_text()
    out: list[tuple[int, str]] = []
    for block in PROMQL_BLOCK.finditer(text):
        first = text.count("\n", 0, block.start(2)) + 1
        for i, line in enumerate(block.group(2).splitlines()):
            line = line.removeprefix(block.group(1))
            if line[:1].isspace() and out:
                out[-1] = (out[-1][0], f"{out[-1][1]} {line.strip()}")
            elif line.strip():
                out.append((first + i, line.strip()))
    return out


@pytest.mark.parametrize("name", sorted(LEADS))
def test_runbook_exists_and_names_the_alerts_that_lead_there(name: str):
    doc = RUNBOOKS / f"{name}.md"
    assert doc.exists(), f"{doc.relative_to(ROOT)} is missing"
    text = doc.read_text()
    missing = LEADS[name] - set(ALERT.findall(text))
    assert not missing, f"{doc.name} does not name the alert(s) that lead there: {sorted(missing)}"
    for section in ("## What it means", "## Confirm", "## Fix", "## Verify"):
        assert any(line.startswith(section) for line in text.splitlines()), f"{doc.name} has no {section!r} section"
    assert _commands(doc), f"{doc.name} names no `driftloop` command in a ```sh block"


def test_every_alert_named_is_defined_in_the_rules():
    defined = set(_alert_rules())
    named = {doc.name: set(ALERT.findall(doc.read_text())) for doc in DOCS}
    assert set().union(*named.values()), "the documents name no alert"
    unknown = {name: sorted(alerts - defined) for name, alerts in named.items() if alerts - defined}
    assert not unknown, f"alerts not in {RULES.relative_to(ROOT)} (defined: {sorted(defined)}): {unknown}"


def test_every_recording_rule_named_is_defined():
    recorded = {r["record"] for g in _rules()["groups"] for r in g.get("rules", []) if "record" in r}
    named = {doc.name: set(RECORDED.findall(doc.read_text())) for doc in DOCS}
    assert set().union(*named.values()), "the documents name no recording rule"
    unknown = {name: sorted(found - recorded) for name, found in named.items() if found - recorded}
    assert not unknown, f"recording rules not in {RULES.relative_to(ROOT)} (recorded: {sorted(recorded)}): {unknown}"


def test_every_alert_links_a_runbook_that_names_it():
    rules = _alert_rules()
    assert rules, f"{RULES.relative_to(ROOT)} defines no alert"
    for alert, rule in rules.items():
        url = (rule.get("annotations") or {}).get("runbook_url", "")
        m = re.search(r"docs/runbooks/([\w-]+\.md)", url)
        assert m, f"{alert}: runbook_url {url!r} does not point at docs/runbooks/<name>.md"
        doc = RUNBOOKS / m.group(1)
        assert doc.exists(), f"{alert}: its runbook {doc.relative_to(ROOT)} does not exist"
        assert alert in doc.read_text(), f"{alert}: its runbook {doc.name} does not name it"


def test_every_metric_named_is_exported():
    exported = _exported()
    named = {doc.name: set(METRIC.findall(doc.read_text())) for doc in DOCS}
    assert len(set().union(*named.values())) >= 10, "the documents name hardly any metric"
    unknown = {name: sorted(found - exported) for name, found in named.items() if found - exported}
    assert not unknown, f"metrics that driftloop.core.metrics does not register: {unknown}"


def test_every_command_parses_with_the_cli():
    parser = build_parser()
    failures, parsed = [], 0
    for doc in DOCS:
        for line, argv in _commands(doc):
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    args = parser.parse_args(argv)
            except SystemExit:
                failures.append(f"{doc.relative_to(ROOT)}:{line}: `driftloop {shlex.join(argv)}` does not parse: "
                                f"{err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else 'exit'}")
                continue
            assert callable(args.fn)
            parsed += 1
    assert not failures, "\n".join(failures)
    assert parsed >= 30, f"only {parsed} commands found in the documents' sh blocks"


def test_every_promql_query_parses(tmp_path):
    """Each query, as a recording rule of a scratch rules file, passes ``promtool check rules``."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus; .ci/run installs it): queries not checked")
    found = {f"{doc.relative_to(ROOT)}:{line}": query for doc in DOCS for line, query in _queries(doc)}
    assert len(found) >= 20, f"only {len(found)} queries found in the documents' promql blocks"
    rules = [{"record": f"doc_query_{i}", "expr": query} for i, query in enumerate(found.values())]
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "docs", "rules": rules}]}))
    p = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, "\n".join([(p.stdout + p.stderr).strip(), "queries:",
                                         *(f"  doc_query_{i} = {at}: {q}" for i, (at, q) in enumerate(found.items()))])
