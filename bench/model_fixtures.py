"""Model versions for the serving benchmarks and tests: tiny torch models of a declared model's features,
trained on synthetic vectors in well under a second, and deliberately broken versions of each kind
serving must refuse."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import torch
from torch import nn

from driftloop.core.declarations import ModelSpec
from driftloop.core.settings import Settings
from driftloop.features.repo import declarations
from driftloop.registry.versions import ONNX_PATH, client, register_version
from driftloop.retrain.trainers import to_onnx

BAD_KINDS = ("nan_outputs", "wrong_signature", "corrupted_artifact", "mismatched_features")


class TinyNet(nn.Module):
    """Standardised inputs → one hidden layer → the task's output (sigmoid, softmax or the value)."""

    def __init__(self, n_features: int, task: str = "binary", outputs: int = 1, hidden: int = 16):
        super().__init__()
        self.task = task
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.net = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net((x - self.mean) / self.std)
        if self.task == "binary":
            return torch.sigmoid(z)
        return torch.softmax(z, dim=1) if self.task == "multiclass" else z


def synthetic_xy(spec: ModelSpec, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative synthetic vectors of the model's width and labels of its task from a seed-dependent rule."""
    rng = np.random.default_rng(seed)
    x = rng.gamma(2.0, 1.0, (n, len(spec.features))).astype(np.float32)
    logit = (x - 2.0) @ rng.normal(0, 0.7, len(spec.features)) + rng.normal(0, 0.3, n)
    if spec.task == "multiclass":
        y = np.digitize(logit, np.quantile(logit, np.linspace(0, 1, spec.n_outputs + 1)[1:-1]))
    elif spec.task == "binary":
        y = rng.random(n) < 1 / (1 + np.exp(-logit))
    else:
        y = logit
    return x, y.astype(np.float32)


def fit(spec: ModelSpec, x: np.ndarray, y: np.ndarray, seed: int, steps: int = 60) -> tuple[TinyNet, list[float]]:
    torch.manual_seed(seed)
    model = TinyNet(x.shape[1], spec.task, spec.n_outputs)
    model.mean.copy_(torch.from_numpy(x.mean(0)))
    model.std.copy_(torch.from_numpy(x.std(0) + 1e-6))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    history = []
    for _ in range(steps):
        opt.zero_grad()
        out = model(xt)
        if spec.task == "binary":
            loss = nn.functional.binary_cross_entropy(out.squeeze(1), yt)
        elif spec.task == "multiclass":
            loss = nn.functional.nll_loss(torch.log(out + 1e-9), yt.long())
        else:
            loss = nn.functional.mse_loss(out.squeeze(1), yt)
        loss.backward()
        opt.step()
        history.append(loss.item())
    return model.eval(), history


def reference(spec: ModelSpec, model: nn.Module, x: np.ndarray, features: list[str]) -> pd.DataFrame:
    """The version's reference sample: the features and the model's own outputs."""
    ref = pd.DataFrame(x, columns=features)
    with torch.no_grad():
        out = model(torch.from_numpy(x)).numpy()
    if spec.task == "multiclass":
        for i in range(out.shape[1]):
            ref[f"p{i}"] = out[:, i]
        ref["score"] = out.argmax(1).astype("float64")
    else:
        ref["score"] = out.reshape(-1)
    return ref


def register_good(settings: Settings, seed: int, challenger: bool = True, onnx: bool = True,
                  model: str = "ctr") -> str:
    """Train a tiny model of declared model ``model`` (weights depend on ``seed``) and register it."""
    spec = declarations(settings).model(model)
    x, y = synthetic_xy(spec, 2000, seed)
    net, hist = fit(spec, x, y, seed)
    version, _ = register_version(settings, model, net, spec.features, reference(spec, net, x[:300], spec.features),
                                  onnx_bytes=to_onnx(net, x.shape[1]) if onnx else None, task=spec.task,
                                  params={"seed": seed, "kind": "synthetic"}, history=hist, challenger=challenger)
    return version


def register_bad(settings: Settings, kind: str, seed: int = 0, model: str = "ctr") -> str:
    """Register a version of ``model`` that must never be served; ``kind`` is one of BAD_KINDS."""
    if kind not in BAD_KINDS:
        raise ValueError(f"unknown bad model kind {kind!r}; one of {BAD_KINDS}")
    spec = declarations(settings).model(model)
    features, n = list(spec.features), len(spec.features)
    x, _ = synthetic_xy(spec, 300, seed)
    net = TinyNet(n, spec.task, spec.n_outputs)
    if kind == "nan_outputs":
        with torch.no_grad():
            net.net[-1].bias.fill_(float("nan"))
    elif kind == "mismatched_features":
        features[-1] = f"{features[-1]}_renamed"
    ref = reference(spec, net, x, features)
    blob = to_onnx(TinyNet(n + 2, spec.task, spec.n_outputs), n + 2) if kind == "wrong_signature" \
        else to_onnx(net, n)
    version, run_id = register_version(settings, model, net, features, ref, onnx_bytes=blob, task=spec.task,
                                       params={"kind": kind}, challenger=False)
    if kind == "corrupted_artifact":  # flip bytes of the stored ONNX copy after registration
        uri = client(settings).get_run(run_id).info.artifact_uri
        path = Path(urlparse(uri).path) / ONNX_PATH
        data = bytearray(path.read_bytes())
        data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
        path.write_bytes(bytes(data))
    return version
