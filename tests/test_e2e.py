"""End-to-end: the embedded stack from the CLI, and the demo loop."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import psutil
import pytest

pytestmark = pytest.mark.e2e


def cli(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "driftloop.app.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _ours(data_dir: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline", "environ"]):
        try:
            env = p.info["environ"] or {}
            if env.get("DRIFTLOOP_DATA_DIR") == data_dir and p.pid != os.getpid():
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


@pytest.mark.slow  # 2-3 minutes; the demo below covers `up` and producing, this adds tail/down and the CLI
def test_up_produce_tail_down(tmp_path):
    data = str((tmp_path / "stack").resolve())
    env = {**os.environ, "DRIFTLOOP_DATA_DIR": data, "DRIFTLOOP_MODEL_OVERRIDES": '{"ctr": {"min_labels": 1000}}'}
    env.pop("DRIFTLOOP_BOOTSTRAP_SERVERS", None)
    up = cli("up", "--detach", env=env)
    assert up.returncode == 0, up.stderr[-3000:]
    info = json.loads((tmp_path / "stack" / "stack.json").read_text())
    assert set(info["workers"]) == {"streams", "serving", "drift", "retrain"} and info["webhook_url"]
    try:
        prod = cli("produce", "--rate", "500", "--duration", "30", env=env)
        assert prod.returncode == 0, prod.stderr[-2000:]
        deadline = time.monotonic() + 120
        preds: list[dict] = []
        while not preds and time.monotonic() < deadline:
            cli("produce", "--rate", "500", "--duration", "3", env=env)
            tail = cli("tail", "predictions", "--from-beginning", "--max", "3", "--timeout", "10", env=env)
            preds = [json.loads(line) for line in tail.stdout.splitlines() if line.strip().startswith("{")]
        assert len(preds) == 3 and all(p["model_name"] == "ctr" and p["model_version"] for p in preds)
        garbage = subprocess.run(
            [sys.executable, "-c", "from confluent_kafka import Producer; p = Producer({'bootstrap.servers': "
             f"'{info['bootstrap_servers']}'}}); p.produce('dl.events.impressions', key=b'u', value=b'{{oops');"
             "p.flush(10)"], capture_output=True, timeout=60)
        assert garbage.returncode == 0
        dlq = cli("tail", "dlq", "--from-beginning", "--timeout", "20", env=env)
        assert any("bad_json" in line and "{oops" in line for line in dlq.stdout.splitlines()), dlq.stdout[-2000:]
        assert psutil.pid_exists(info["workers"]["streams"])  # nothing stopped
    finally:
        down = cli("down", env=env, timeout=60)
    assert down.returncode == 0
    time.sleep(1)
    assert not _ours(data), [p.info["cmdline"] for p in _ours(data)]
    assert not (tmp_path / "stack" / "stack.json").exists()


@pytest.mark.slow  # 6-8 minutes on 2 cores (Ray Train starts two processes per retrain); `make demo` runs it too,
# and tests/test_third_model.py keeps a whole stack with a Ray Train retrain in the default suite
def test_demo_closes_the_loop(tmp_path):
    env = {**os.environ, "DRIFTLOOP_DATA_DIR": str(tmp_path / "demo")}
    env.pop("DRIFTLOOP_BOOTSTRAP_SERVERS", None)
    r = cli("demo", "--timeout", "840", env=env, timeout=900)
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-4000:])
    assert "LOOP CLOSED" in r.stdout
    html = (tmp_path / "demo" / "reports" / "demo.html").read_text()
    assert "data:image/png;base64" in html and "serving swapped" in html
    assert "Model ctr" in html and "Model eta" in html  # both examples ran on one stack
    assert "eta_after_onset: kept its champion" in r.stdout
    noisy = re.compile(r"Warning|warnings\.warn|\|FAIL\||Traceback")
    noise = [ln for ln in (r.stdout + r.stderr).splitlines() if noisy.search(ln)]
    assert noise == [], noise[:10]  # nothing the user did not cause: no library warnings, no librdkafka FAIL lines
