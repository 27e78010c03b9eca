"""``driftloop bench loop``: the closed loop on the embedded stack, drift onset → new champion serving.

Runs the demo (every example model, one drifting) in a data directory of its own and splits the
drifted model's loop into phases from the records it saw: detection, the retrain request, the Ray
Train run, evaluation and registration, promotion and the serving swap. Then Ray Train's overhead:
the same built-in trainer on the same frame in plain torch and through Ray Train.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from driftloop.app.demo import run_demo
from driftloop.core.settings import Settings

log = logging.getLogger(__name__)

# phase name → (from, to) marks: the promotion's timeline (request, handled, job_submitted, job_started,
# job_finished, registered, promoted) and the demo's own marks (onset_us, swapped_us)
PHASES = {
    "detect": ("onset_us", "request"),  # drift onset → the retrain request
    "queue": ("request", "handled"),  # the request waits for the controller
    "data": ("handled", "job_submitted"),  # fresh labels and the point-in-time training set
    "ray_start": ("job_submitted", "job_started"),  # Ray Train starts its controller and worker
    "train": ("job_started", "job_finished"),
    "evaluate_register": ("job_finished", "registered"),  # gate, ONNX copy, MLflow registration
    "promote": ("registered", "promoted"),
    "swap": ("promoted", "swapped_us"),  # serving's first prediction with the new champion
}


def phases(outcome: dict[str, Any]) -> dict[str, float | None]:
    """Seconds per phase of the loop (None where a mark is missing)."""
    marks = {**outcome.get("timeline", {}), **{k: v for k, v in outcome.items() if k.endswith("_us")}}
    return {name: round((marks[b] - marks[a]) / 1e6, 2) if a in marks and b in marks else None
            for name, (a, b) in PHASES.items()}


def run(settings: Settings, rate: float = 150.0, timeout: float = 900.0, drift_model: str | None = None,
        overhead_rows: int = 20_000) -> dict[str, Any]:
    from driftloop.bench.ray_overhead import measure  # noqa: PLC0415 - starts Ray

    data = settings.root / "bench" / "loop"
    s = settings.model_copy(update={"data_dir": data, "repo": None})  # a data directory of its own
    outcome: dict[str, Any] = {}
    closed = run_demo(s, rate=rate, timeout=timeout, drift_model=drift_model, outcome=outcome)
    ph = phases(outcome)
    loop_s = (round((outcome["swapped_us"] - outcome["onset_us"]) / 1e6, 2)
              if "swapped_us" in outcome and "onset_us" in outcome else None)
    print(f"[bench loop] loop closed: {closed}; drift onset → new champion serving: {loop_s} s (target <= 30 s)")
    for name, secs in ph.items():
        print(f"  {name:<18} {secs if secs is not None else '-':>8} s")
    over = measure(settings.model_copy(update={"data_dir": data / "overhead"}), rows=overhead_rows)
    print(f"[bench loop] same trainer, {overhead_rows} rows: plain torch {over['plain_s']:.2f} s, Ray Train "
          f"{over['ray_train_s']:.2f} s (+ Ray start {over['ray_init_s']:.2f} s): "
          f"overhead {over['ray_overhead_s']:.2f} s (target <= 10 s)")
    result = {"bench": "loop", "closed": closed, "loop_s": loop_s, "phases": ph, **over}
    print(json.dumps(result))
    return result
