"""Training on Ray Train: the device decision, the same losses and weights as plain torch, restarts of a failing
trainer, a run resumed from its checkpoints after its driver was killed, and the Ray Jobs path.

Real Ray (a local instance of 2 CPUs for this module) and real torch. Expected values come from
``LocalLauncher``, which runs the same trainer in this process without Ray.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from driftloop.core.broker import free_port
from driftloop.core.settings import Settings
from driftloop.retrain.launcher import (
    JobResult,
    LocalLauncher,
    RayJobsLauncher,
    RayTrainLauncher,
    TrainJob,
    make_launcher,
    use_gpu,
)

FEATURES = ["a", "b", "c"]

FLAKY = '''
from pathlib import Path

import torch
from torch import nn

CALLS = Path(__file__).with_name("calls.txt")


def train(train_df, valid_df, *, features, task, seed, device, classes):
    """Fails on its first two calls (counted in a file every worker process sees), then trains."""
    n = int(CALLS.read_text()) + 1 if CALLS.exists() else 1
    CALLS.write_text(str(n))
    if n <= 2:
        raise RuntimeError(f"flaky trainer: call {n} fails")
    torch.manual_seed(seed)
    x = torch.tensor(train_df[features].fillna(0).to_numpy(), dtype=torch.float32)
    y = torch.tensor(train_df["label"].to_numpy(), dtype=torch.float32)
    model = nn.Sequential(nn.Linear(len(features), 1), nn.Sigmoid())
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.binary_cross_entropy(model(x).squeeze(1), y).backward()
        opt.step()
    return model
'''

CHILD = '''
import sys
import pandas as pd
from driftloop.core.settings import Settings
from driftloop.retrain.launcher import RayTrainLauncher, TrainJob

data_dir, run_name, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
train, valid = pd.read_parquet(f"{data_dir}/train.parquet"), pd.read_parquet(f"{data_dir}/valid.parquet")
job = TrainJob(model="m", features=["a", "b", "c"], task="binary", seed=7, epochs=epochs, run_name=run_name)
RayTrainLauncher(Settings(data_dir=data_dir)).run(train, valid, job)
'''


def frame(n: int, seed: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, valid) of a binary task with a missing-value column."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(5, 3, n), "c": rng.integers(0, 4, n) * 1.0})
    df.loc[rng.random(n) < 0.05, "c"] = np.nan
    z = df["a"] + (df["b"] - 5) / 3 - 0.5 * df["c"].fillna(0)
    df["label"] = (z + rng.normal(0, 0.5, n) > -0.7).astype(float)
    cut = int(n * 0.9)
    return df.iloc[:cut], df.iloc[cut:]


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def rs(tmp_path_factory) -> Settings:
    return Settings(data_dir=tmp_path_factory.mktemp("raytrain") / "data", train_max_failures=2)


@pytest.fixture(scope="module")
def launcher(rs: Settings) -> Iterator[RayTrainLauncher]:
    la = RayTrainLauncher(rs)
    yield la
    la.close()


def test_use_gpu_follows_the_setting_then_the_cluster():
    assert use_gpu({"CPU": 2.0}, None) is False
    assert use_gpu({"CPU": 8.0, "GPU": 1.0}, None) is True
    assert use_gpu({"CPU": 8.0, "GPU": 0.5}, None) is False  # a fraction of a GPU is no GPU to train on
    assert use_gpu({"CPU": 8.0, "GPU": 4.0}, False) is False
    assert use_gpu({"CPU": 2.0}, True) is True


def test_make_launcher_without_an_address_is_local_ray_train(launcher: RayTrainLauncher, rs: Settings):
    assert isinstance(make_launcher(rs), RayTrainLauncher)  # joins this module's Ray


def test_ray_train_run_equals_plain_torch(launcher: RayTrainLauncher):
    train, valid = frame(3000)
    job = TrainJob(model="m", features=FEATURES, task="binary", seed=3, epochs=6, run_name=f"m-{uuid.uuid4().hex}")
    plain = LocalLauncher().run(train, valid, job)
    res = launcher.run(train, valid, job)
    assert isinstance(res, JobResult) and res.device == "cpu" and not res.model.training
    assert res.resumed_from_epoch == 0 and res.restarts == 0 and len(res.history) == 6
    assert res.history == plain.history and same_weights(res.model, plain.model)
    assert res.started_us <= res.finished_us and res.seconds > 0


@pytest.mark.slow
def test_failing_trainer_is_restarted_by_ray_train(launcher: RayTrainLauncher, tmp_path: Path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "flaky_trainer.py").write_text(textwrap.dedent(FLAKY))
    train, valid = frame(1000)
    job = TrainJob(model="m", features=FEATURES, task="binary", trainer="flaky_trainer:train", repo=str(repo),
                   run_name=f"m-{uuid.uuid4().hex}")
    res = launcher.run(train, valid, job)
    assert (repo / "calls.txt").read_text() == "3" and res.restarts == 2
    assert type(res.model).__name__ == "Sequential" and res.history == []
    (repo / "calls.txt").write_text("2")  # the in-process run: its one call succeeds
    assert same_weights(res.model, LocalLauncher().run(train, valid, job).model)


def _latest_epoch(run_dir: Path) -> int:
    """The newest epoch checkpointed under a Ray Train run folder (our meta.json in each checkpoint)."""
    return max((json.loads(m.read_text()).get("epoch", 0) for m in run_dir.glob("checkpoint_*/meta.json")),
               default=0)


@pytest.mark.slow
def test_run_resumes_after_its_driver_is_killed(launcher: RayTrainLauncher, rs: Settings, tmp_path: Path):
    """A driver SIGKILLed mid-training; the next ``run`` under the same name continues from the last epoch
    checkpoint and ends with the weights and losses of an uninterrupted run."""
    data_dir, epochs, name = tmp_path / "child", 30, f"m-{uuid.uuid4().hex}"
    data_dir.mkdir()
    train, valid = frame(30000)
    train.to_parquet(data_dir / "train.parquet")
    valid.to_parquet(data_dir / "valid.parquet")
    (tmp_path / "child.py").write_text(textwrap.dedent(CHILD))
    child = subprocess.Popen([sys.executable, str(tmp_path / "child.py"), str(data_dir), name, str(epochs)],
                             start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = Path(Settings(data_dir=data_dir).train_storage_path) / name
    try:
        deadline = time.monotonic() + 180
        while _latest_epoch(run_dir) < 3 and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        killed_at = _latest_epoch(run_dir)
        assert child.poll() is None and 3 <= killed_at < epochs, f"child ended early ({child.returncode})"
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # the driver and the local Ray it started
        child.wait()
    job = TrainJob(model="m", features=FEATURES, task="binary", seed=7, epochs=epochs, run_name=name)
    again = RayTrainLauncher(Settings(data_dir=data_dir))  # this module's Ray, the killed run's storage
    res = again.run(train, valid, job)
    assert killed_at <= res.resumed_from_epoch < epochs
    plain = LocalLauncher().run(train, valid, job)
    assert res.history == plain.history and same_weights(res.model, plain.model)
    done = again.run(train, valid, job)  # once finished, the same name only reads the final checkpoint
    assert done.resumed_from_epoch == epochs and same_weights(done.model, plain.model)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """A Ray head with its dashboard (the Jobs API; token auth off, bound to 127.0.0.1) in a temp dir of its own,
    so no other ``ray.init()`` on this machine finds it; the Jobs API address."""
    try:
        import ray.dashboard.optional_deps  # noqa: F401 - what `ray start --include-dashboard` needs
    except ImportError as e:
        pytest.skip(f"the Ray dashboard (Jobs API) needs ray[default]: {e}")
    temp = Path(f"/tmp/dlr{uuid.uuid4().hex[:6]}")
    port, dash = free_port(), free_port()
    head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", f"--port={port}",
                             "--num-cpus=2", "--include-dashboard=true", f"--dashboard-port={dash}",
                             "--dashboard-host=127.0.0.1", f"--temp-dir={temp}", "--disable-usage-stats"],
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dash}"
    try:
        from ray.job_submission import JobSubmissionClient
        deadline = time.monotonic() + 120
        while True:
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:
                if time.monotonic() > deadline or head.poll() is not None:
                    raise
                time.sleep(1)
        yield address
    finally:
        head.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # whatever of the head's processes is left
        head.wait()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_ray_jobs_run_and_reattach(ray_head: str, tmp_path: Path):
    s = Settings(data_dir=tmp_path / "data", ray_address=ray_head)
    jobs = make_launcher(s)
    assert isinstance(jobs, RayJobsLauncher)
    jobs.python = sys.executable  # the entrypoint's interpreter (this venv) on the local head
    train, valid = frame(2000)
    job = TrainJob(model="m", features=FEATURES, task="binary", seed=5, epochs=4, run_name=f"m-{uuid.uuid4().hex}")
    res = jobs.run(train, valid, job)
    plain = LocalLauncher().run(train, valid, job)
    assert res.history == plain.history and same_weights(res.model, plain.model)
    again = RayJobsLauncher(s, python=sys.executable).run(train, valid, job)  # a restarted controller
    assert same_weights(again.model, plain.model)
    ids = [j.submission_id for j in jobs.client.list_jobs() if (j.metadata or {}).get("driftloop_run") == job.run_name]
    assert ids == [job.run_name]  # attached, not submitted twice


@pytest.mark.slow
def test_two_workers_train_data_parallel(rs: Settings, launcher: RayTrainLauncher):
    """Two DDP workers each take half of every batch and average gradients: the losses and outputs of one."""
    train, valid = frame(2880)  # 2592 training rows: every batch splits in equal halves
    job = TrainJob(model="m", features=FEATURES, task="binary", seed=4, epochs=4, run_name=f"m-{uuid.uuid4().hex}")
    two = RayTrainLauncher(rs.model_copy(update={"train_workers": 2})).run(train, valid, job)
    plain = LocalLauncher().run(train, valid, job)
    np.testing.assert_allclose(two.history, plain.history, rtol=1e-5)
    x = torch.tensor(valid[FEATURES].fillna(0).to_numpy(), dtype=torch.float32)
    with torch.no_grad():
        np.testing.assert_allclose(two.model(x).numpy(), plain.model(x).numpy(), atol=1e-5)
