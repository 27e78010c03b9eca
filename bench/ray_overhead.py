"""Ray Train overhead: the same built-in trainer on the same synthetic frame, in plain torch and as a Ray Train run.

``plain_s`` is ``LocalLauncher`` (in process, no Ray); ``ray_init_s`` starting (or joining) Ray and warming the
launcher; ``ray_train_s`` one ``RayTrainLauncher.run`` (controller and worker processes, a checkpoint per epoch,
the model read back from the final checkpoint); ``ray_overhead_s`` = ``ray_train_s - plain_s``. Both runs use
the same seed, so their losses must agree (``same_history``).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from driftloop.core.settings import Settings
from driftloop.retrain.launcher import JOBS_DIR, LocalLauncher, RayTrainLauncher, TrainJob

log = logging.getLogger(__name__)

FEATURES = ["a", "b", "c", "d"]


def frame(rows: int, seed: int = 0) -> pd.DataFrame:
    """A binary task over four features (one with missing values), labels from a noisy linear score."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"a": rng.normal(size=rows), "b": rng.normal(5, 3, rows), "c": rng.integers(0, 4, rows) * 1.0,
                       "d": rng.exponential(2.0, rows)})
    df.loc[rng.random(rows) < 0.05, "c"] = np.nan
    z = df["a"] + (df["b"] - 5) / 3 - 0.5 * df["c"].fillna(0) + 0.2 * df["d"]
    df["label"] = (z + rng.normal(0, 0.5, rows) > 0).astype(float)
    return df


def measure(settings: Settings, rows: int = 20000, epochs: int | None = None) -> dict[str, Any]:
    """Train the built-in binary trainer on ``rows`` synthetic rows (90 % train, 10 % validation) in plain
    torch and through Ray Train; the timings in seconds."""
    df = frame(rows)
    cut = int(rows * 0.9)
    train, valid = df.iloc[:cut], df.iloc[cut:]
    job = TrainJob(model="bench", features=FEATURES, task="binary", seed=0, run_name=f"bench-{uuid.uuid4().hex[:8]}",
                   **({"epochs": epochs} if epochs else {}))
    t = time.perf_counter()
    plain = LocalLauncher().run(train, valid, job)
    plain_s = time.perf_counter() - t
    t = time.perf_counter()
    launcher = RayTrainLauncher(settings)
    ray_init_s = time.perf_counter() - t
    try:
        t = time.perf_counter()
        res = launcher.run(train, valid, job)
        ray_train_s = time.perf_counter() - t
    finally:
        launcher.close()
        storage = settings.train_storage_path
        if "://" not in storage:  # the bench's run folders are of no further use
            shutil.rmtree(Path(storage) / job.run_name, ignore_errors=True)
            shutil.rmtree(Path(storage) / JOBS_DIR / job.run_name, ignore_errors=True)
    out = {"plain_s": round(plain_s, 3), "ray_train_s": round(ray_train_s, 3), "ray_init_s": round(ray_init_s, 3),
           "ray_overhead_s": round(ray_train_s - plain_s, 3), "rows": rows, "epochs": job.epochs,
           "device": res.device, "same_history": res.history == plain.history}
    log.info("Ray Train overhead: %s", out)
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(json.dumps(measure(Settings(), *(int(a) for a in sys.argv[1:]))))
