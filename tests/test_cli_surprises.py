"""The command line as a new user meets it: one stack per data directory, a running stack found from any
command, global options anywhere, one-line errors, no library noise, nothing written outside the data
directory, and a README whose command list is the real one."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from driftloop.app.cli import _settings_from_stack, main
from driftloop.core.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "driftloop.app.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=120)


def test_up_refuses_a_second_stack_on_the_same_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "data"
    holder = subprocess.Popen(  # a supervisor that holds the data directory's stack lock, as `up` does
        [sys.executable, "-c", "import sys, time; from driftloop.app.stackinfo import hold_stack_lock; "
         "from driftloop.core.settings import Settings; "
         f"f = hold_stack_lock(Settings(data_dir={str(data)!r})); print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        for args in (["up", "--detach"], ["up"]):
            t0 = time.monotonic()
            r = _cli(*args, "--data-dir", str(data))
            assert r.returncode == 1, r
            assert r.stderr.strip().splitlines() == [
                f"driftloop up: a stack is already running on {data.resolve()} (supervisor pid {holder.pid}); "
                "use it, or stop it with `driftloop down`"], r.stderr
            assert time.monotonic() - t0 < 60  # refused before anything starts
        assert not (data / "logs" / "broker.log").exists()
    finally:
        holder.kill()
        holder.wait()


def test_commands_find_the_running_stack_and_ignore_a_dead_ones(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path)
    s.root.mkdir(parents=True, exist_ok=True)
    info = {"bootstrap_servers": "127.0.0.1:1", "mlflow_uri": "sqlite:////x/mlflow.db", "supervisor_pid": os.getpid()}
    s.stack_file.write_text(json.dumps(info))
    found = _settings_from_stack(s)
    assert (found.bootstrap_servers, found.tracking_uri) == ("127.0.0.1:1", "sqlite:////x/mlflow.db")
    assert _settings_from_stack(s.model_copy(update={"bootstrap_servers": "other:9092"})).bootstrap_servers \
        == "other:9092"  # a configured broker wins
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    s.stack_file.write_text(json.dumps({**info, "supervisor_pid": int(dead.stdout)}))
    assert _settings_from_stack(s).bootstrap_servers is None  # a killed stack's file is not followed


def test_global_options_go_before_or_after_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--data-dir", str(tmp_path / "a"), "models", "--json"],
                 ["models", "--json", "--data-dir", str(tmp_path / "b")]):
        assert main(argv) == 0
        rows = json.loads(capsys.readouterr().out)
        assert [r["name"] for r in rows] == ["ctr"]
    assert (tmp_path / "a" / "declarations.json").exists() and (tmp_path / "b" / "declarations.json").exists()


def test_errors_are_one_line_without_library_noise(tmp_path: Path) -> None:
    r = _cli("models", "--data-dir", str(tmp_path), env={"DRIFTLOOP_PARTITIONS": "many"})
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("driftloop models: ")
    assert "partitions" in r.stderr and "Traceback" not in r.stderr
    r = _cli("history", "nosuch", "--data-dir", str(tmp_path))
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("driftloop history: ")
    assert "nosuch" in r.stderr and "Traceback" not in r.stderr
    r = _cli("models", "--data-dir", str(tmp_path))
    assert r.returncode == 0 and "ctr" in r.stdout
    noise = [ln for ln in r.stderr.splitlines() if re.search(r"Warning|warnings\.warn|FAIL", ln)]
    assert noise == [], noise


def test_registered_versions_write_nothing_outside_the_data_dir(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np
    import pandas as pd
    import torch

    from driftloop.registry.versions import register_version

    work, data = tmp_path / "cwd", tmp_path / "data"
    work.mkdir()
    monkeypatch.chdir(work)
    ref = pd.DataFrame({"a": np.arange(8.0), "b": np.ones(8), "score": np.zeros(8)})
    version, _ = register_version(Settings(data_dir=data), "m", torch.nn.Linear(2, 1), ["a", "b"], ref,
                                  onnx_bytes=None)
    assert version == "1"
    assert list(work.iterdir()) == []  # MLflow's default artifact root would be ./mlruns here
    assert any((data / "mlartifacts" / "m").rglob("MLmodel"))


def _readme_commands() -> set[str]:
    text = (ROOT / "README.md").read_text()
    block = text[text.index("## Using it"):]
    block = block[:block.index("\n## ", 3)]
    found = set()
    for line in block.splitlines():
        m = re.match(r"driftloop ((?:bench )?[a-z]+)", line.strip())
        if m:
            found.add(m.group(1))
    return found


def _choices(help_text: str) -> set[str]:
    """The subcommands an argparse usage line lists, e.g. ``{worker,init,...}``."""
    return set(re.search(r"\{([a-z,]+)\}", help_text).group(1).split(","))  # type: ignore[union-attr]


def test_readme_command_list_matches_driftloop_help() -> None:
    help_top = _cli("--help").stdout
    help_bench = _cli("bench", "--help").stdout
    commands = _choices(help_top)
    assert {"status", "usage", "promote", "rollback", "history"} <= commands
    expected = (commands - {"bench"}) | {f"bench {b}" for b in _choices(help_bench)}
    assert _readme_commands() == expected
