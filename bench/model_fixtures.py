"""Model versions for the serving benchmarks and tests: small click models trained on synthetic
vectors in about a second, and deliberately broken versions of each kind serving must refuse."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import torch

from driftloop.features.vectors import FEATURE_COLUMNS
from driftloop.registry import models
from driftloop.core.settings import Settings
from driftloop.retrain.model import ClickMLP, fit, to_onnx

BAD_KINDS = ("nan_outputs", "wrong_signature", "corrupted_artifact", "mismatched_features")


def synthetic_xy(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.column_stack([rng.integers(1, 6, n), rng.gamma(2.0, 0.6, n), rng.integers(0, 2, n), np.zeros(n),
                         rng.poisson(3, n), rng.gamma(2.0, 0.6, n), rng.poisson(1, n)]).astype(np.float32)
    logit = -1.0 - 0.4 * x[:, 0] + 0.8 * x[:, 1] + 0.3 * x[:, 6] + rng.normal(0, 0.3 * (1 + seed % 3), n)
    return x, (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)


def register_good(settings: Settings, seed: int, challenger: bool = True, onnx: bool = True) -> str:
    """Train a small model on synthetic data (its weights depend on ``seed``) and register it."""
    x, y = synthetic_xy(2000, seed)
    model, hist = fit(x, y, epochs=3, seed=seed)
    ref = pd.DataFrame(x[:300], columns=FEATURE_COLUMNS)
    with torch.no_grad():
        ref["score"] = model(torch.from_numpy(x[:300])).numpy().reshape(-1)
    version, _ = models.register_version(settings, model, FEATURE_COLUMNS, ref,
                                         onnx_bytes=to_onnx(model, len(FEATURE_COLUMNS)) if onnx else None,
                                         params={"seed": seed, "kind": "synthetic"}, history=hist,
                                         challenger=challenger)
    return version


def register_bad(settings: Settings, kind: str, seed: int = 0) -> str:
    """Register a version that must never be served; ``kind`` is one of BAD_KINDS."""
    n = len(FEATURE_COLUMNS)
    x, _ = synthetic_xy(300, seed)
    ref = pd.DataFrame(x, columns=FEATURE_COLUMNS)
    ref["score"] = 0.5
    model, features = ClickMLP(n), list(FEATURE_COLUMNS)
    if kind == "nan_outputs":
        with torch.no_grad():
            model.net[-1].bias.fill_(float("nan"))
    elif kind == "mismatched_features":
        features = [*FEATURE_COLUMNS[:-1], "clicks_1h"]
        ref = ref.rename(columns={FEATURE_COLUMNS[-1]: "clicks_1h"})
    elif kind not in BAD_KINDS:
        raise ValueError(f"unknown bad model kind {kind!r}; one of {BAD_KINDS}")
    onnx = to_onnx(ClickMLP(n + 2), n + 2) if kind == "wrong_signature" else to_onnx(model, n)
    version, run_id = models.register_version(settings, model, features, ref, onnx_bytes=onnx,
                                              params={"kind": kind}, challenger=False)
    if kind == "corrupted_artifact":  # flip bytes of the stored ONNX copy after registration
        uri = models.client(settings).get_run(run_id).info.artifact_uri
        path = Path(urlparse(uri).path) / models.ONNX_PATH
        blob = bytearray(path.read_bytes())
        blob[len(blob) // 2:len(blob) // 2 + 64] = bytes(64)
        path.write_bytes(bytes(blob))
    return version
