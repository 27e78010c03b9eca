"""Launchers run a training job somewhere and return its result. ``RayLauncher`` is the default:
local ``ray.init()``, or a cluster when ``DRIFTLOOP_RAY_ADDRESS`` is set; it asks for a GPU when
the cluster has one, and the job then trains on CUDA. A declared trainer is imported inside the job
from the feature repo folder the job carries (Ray workers do not share the driver's ``sys.path``)."""

from __future__ import annotations

import logging
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from driftloop.core.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainJob:
    """What to train: the model's features and task, the trainer (None = built-in) and where it lives."""

    model: str  # the declared model's name (names the Ray task)
    features: list[str]
    task: str
    classes: list[str] = field(default_factory=list)
    trainer: str | None = None  # "module:function" in ``repo``
    repo: str | None = None  # the feature repo folder, put on sys.path to import the trainer
    seed: int = 0
    epochs: int = 40


@dataclass
class JobResult:
    model: Any  # the trained torch nn.Module, on CPU, in eval mode
    history: list[float]
    device: str
    seconds: float
    started_us: int
    finished_us: int


def train_job(train_df: pd.DataFrame, valid_df: pd.DataFrame, job: TrainJob) -> JobResult:
    """The training job body (runs inside a Ray task, or in-process)."""
    import torch  # noqa: PLC0415 - heavy; only the job needs it

    from driftloop.retrain.trainers import fit, load_trainer  # noqa: PLC0415

    started = time.time_ns() // 1000
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(1)
    kw: dict[str, Any] = {"features": list(job.features), "task": job.task, "seed": job.seed, "device": device,
                          "classes": list(job.classes)}
    history: list[float] = []
    if job.trainer:
        if job.repo and job.repo not in sys.path:
            sys.path.insert(0, job.repo)
        model = load_trainer(job.trainer)(train_df, valid_df, **kw)
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"trainer {job.trainer} returned {type(model).__name__}, not a torch nn.Module")
    else:
        model, history = fit(train_df, valid_df, epochs=job.epochs, **kw)
    model = model.cpu().eval()
    return JobResult(model, history, device, time.perf_counter() - t0, started, time.time_ns() // 1000)


class Launcher(ABC):
    @abstractmethod
    def run(self, train_df: pd.DataFrame, valid_df: pd.DataFrame, job: TrainJob) -> JobResult: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class LocalLauncher(Launcher):
    """Runs the job in this process (tests of the controller logic, no Ray)."""

    def run(self, train_df: pd.DataFrame, valid_df: pd.DataFrame, job: TrainJob) -> JobResult:
        return train_job(train_df, valid_df, job)


class RayLauncher(Launcher):
    def __init__(self, settings: Settings):
        import ray  # noqa: PLC0415

        self.ray = ray
        if not ray.is_initialized():
            if settings.ray_address:
                ray.init(address=settings.ray_address, log_to_driver=False)
            else:
                ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        self.gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        self.remote = ray.remote(num_cpus=1, num_gpus=self.gpus, max_retries=1)(train_job)
        log.info("Ray ready: %s (training on %s)", ray.cluster_resources(), "GPU" if self.gpus else "CPU")

    def run(self, train_df: pd.DataFrame, valid_df: pd.DataFrame, job: TrainJob) -> JobResult:
        return self.ray.get(self.remote.options(name=f"train-{job.model}").remote(train_df, valid_df, job))

    def close(self) -> None:
        self.ray.shutdown()
