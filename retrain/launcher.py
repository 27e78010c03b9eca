"""Launchers run a training job somewhere and return its result. ``RayLauncher`` is the default:
local ``ray.init()``, or a cluster when ``DRIFTLOOP_RAY_ADDRESS`` is set; it asks for a GPU when
the cluster has one, and the job then trains on CUDA."""

from __future__ import annotations

import io
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from driftloop.core.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class JobResult:
    state_dict: bytes
    history: list[float]
    device: str
    seconds: float
    started_us: int
    finished_us: int


def train_job(x: np.ndarray, y: np.ndarray, params: dict[str, Any]) -> JobResult:
    """The training job body (runs inside a Ray task, or in-process)."""
    import torch

    from driftloop.retrain.model import fit

    started = time.time_ns() // 1000
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(1)
    model, history = fit(x, y, device=device, **params)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return JobResult(buf.getvalue(), history, device, time.perf_counter() - t0, started, time.time_ns() // 1000)


class Launcher(ABC):
    @abstractmethod
    def run(self, x: np.ndarray, y: np.ndarray, params: dict[str, Any]) -> JobResult: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class LocalLauncher(Launcher):
    """Runs the job in this process (tests of the controller logic, no Ray)."""

    def run(self, x: np.ndarray, y: np.ndarray, params: dict[str, Any]) -> JobResult:
        return train_job(x, y, params)


class RayLauncher(Launcher):
    def __init__(self, settings: Settings):
        import ray

        self.ray = ray
        if not ray.is_initialized():
            if settings.ray_address:
                ray.init(address=settings.ray_address, log_to_driver=False)
            else:
                ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        self.gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        self.remote = ray.remote(num_cpus=1, num_gpus=self.gpus, max_retries=1)(train_job)
        log.info("Ray ready: %s (training on %s)", ray.cluster_resources(), "GPU" if self.gpus else "CPU")

    def run(self, x: np.ndarray, y: np.ndarray, params: dict[str, Any]) -> JobResult:
        return self.ray.get(self.remote.remote(x, y, params))

    def close(self) -> None:
        self.ray.shutdown()
