"""Trainers: the built-in MLP per task, a declared ``"module:function"`` trainer, and the ONNX export.

Every trainer maps ``(train_df, valid_df, features=, task=, seed=, device=, classes=)`` to a torch
``nn.Module`` taking float32 ``(n, len(features))`` raw feature values (missing as 0) and returning the
task's outputs: binary P(positive) ``(n,)`` or ``(n, 1)``, regression values in label units, multiclass
class probabilities ``(n, len(classes))``. The built-in modules carry their input (and, for regression,
target) standardisation, so serving feeds them raw features.
"""

from __future__ import annotations

import importlib
import io
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from driftloop.core.frames import to_matrix

HEADS = {"binary": "sigmoid", "regression": "identity", "multiclass": "softmax"}
# The built-in trainer's state after an epoch: epoch (done), model and optimizer state, the batch-order RNG
# state, the loss history and the best validation loss with its weights (CPU tensors; ``torch.save``-able).
FitState = dict[str, Any]


class TabularMLP(nn.Module):
    """A two-hidden-layer MLP with standardisation buffers and the task's output head."""

    def __init__(self, n_features: int, task: str, n_outputs: int = 1, hidden: int = 32):
        super().__init__()
        if task not in HEADS:
            raise ValueError(f"unknown task {task!r}; one of {sorted(HEADS)}")
        self.task = task
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.register_buffer("y_mean", torch.zeros(()))  # regression: the target's scale, so outputs are in
        self.register_buffer("y_std", torch.ones(()))  # label units
        self.net = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, n_outputs))

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (binary, multiclass) or the standardised value (regression)."""
        z = self.net((x - self.mean) / self.std)
        return z if self.task == "multiclass" else z.squeeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.raw(x)
        if self.task == "binary":
            return torch.sigmoid(z)
        if self.task == "multiclass":
            return torch.softmax(z, dim=-1)
        return z * self.y_std + self.y_mean

    def fit_scales(self, x: np.ndarray, y: np.ndarray) -> None:
        std = x.std(0)
        self.mean.copy_(torch.from_numpy(x.mean(0)))
        self.std.copy_(torch.from_numpy(np.where(std > 1e-6, std, 1.0).astype(np.float32)))
        if self.task == "regression":
            self.y_mean.fill_(float(y.mean()))
            self.y_std.fill_(float(y.std()) if y.std() > 1e-9 else 1.0)


class _Raw(nn.Module):
    """``model.raw`` as a module's forward, so a data-parallel wrapper (DDP) sees the training forward pass."""

    def __init__(self, model: TabularMLP):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.raw(x)


def _loss_fn(model: TabularMLP, raw: Callable[[torch.Tensor], torch.Tensor]
             ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if model.task == "binary":
        bce = nn.BCEWithLogitsLoss()
        return lambda x, y: bce(raw(x), y)
    if model.task == "multiclass":
        ce = nn.CrossEntropyLoss()
        return lambda x, y: ce(raw(x), y.long())
    mse = nn.MSELoss()
    return lambda x, y: mse(raw(x), (y - model.y_mean) / model.y_std)


def _cpu(obj: Any) -> Any:
    """A CPU copy of the tensors in a (nested) state dict."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def _world() -> tuple[int, int]:
    """(rank, world size) of the torch process group this process trains in; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def fit(train_df: pd.DataFrame, valid_df: pd.DataFrame, *, features: Sequence[str], task: str, seed: int = 0,
        device: str = "cpu", classes: Sequence[str] = (), epochs: int = 40, lr: float = 3e-3, batch: int = 256,
        hidden: int = 32, state: FitState | None = None, on_epoch: Callable[[FitState], None] | None = None,
        wrap: Callable[[nn.Module], nn.Module] | None = None) -> tuple[TabularMLP, list[float]]:
    """The built-in trainer: returns the CPU model of the epoch with the lowest validation loss (the last
    one without validation rows) and the per-epoch training loss.

    Resumable: ``on_epoch`` receives a :data:`FitState` (CPU tensors) after every epoch, and passing one
    back as ``state`` continues from that epoch to the same weights and history as an uninterrupted run.
    ``wrap`` wraps the module computing the training outputs (e.g. ``ray.train.torch.prepare_model``: DDP
    with several workers); in a torch process group of ``n`` ranks each rank trains on its ``1/n`` of
    every batch."""
    torch.manual_seed(seed)
    x, y = to_matrix(train_df, list(features)), train_df["label"].to_numpy(np.float32)
    model = TabularMLP(x.shape[1], task, len(classes) if task == "multiclass" else 1, hidden)
    model.fit_scales(x, y)
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    history: list[float] = []
    best, best_state, start = float("inf"), None, 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["rng"])
        history, best, best_state, start = list(state["history"]), state["best"], state["best_state"], state["epoch"]
    net = wrap(_Raw(model)) if wrap is not None else _Raw(model)
    loss_fn = _loss_fn(model, net)
    xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    xv = torch.from_numpy(to_matrix(valid_df, list(features))).to(device)
    yv = torch.from_numpy(valid_df["label"].to_numpy(np.float32)).to(device)
    rank, world = _world()
    for epoch in range(start, epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen).to(device)
        total = torch.zeros(2, dtype=torch.float64)  # loss sum, rows
        for i in range(0, len(xt), batch):
            idx = perm[i:i + batch]
            if len(idx) < world:  # too few rows for every rank: skipped by all
                continue
            idx = idx[rank::world]
            opt.zero_grad()
            loss = loss_fn(xt[idx], yt[idx])
            loss.backward()
            opt.step()
            total += torch.tensor([loss.item() * len(idx), len(idx)], dtype=torch.float64)
        if world > 1:
            torch.distributed.all_reduce(total)
        history.append(float(total[0] / max(float(total[1]), 1.0)))
        if len(xv):
            model.eval()
            with torch.no_grad():
                v = loss_fn(xv, yv).item()
            if v < best:
                best, best_state = v, _cpu(model.state_dict())
        if on_epoch is not None:
            on_epoch({"epoch": epoch + 1, "model": _cpu(model.state_dict()), "optimizer": _cpu(opt.state_dict()),
                      "rng": gen.get_state(), "history": list(history), "best": best, "best_state": best_state})
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.cpu().eval(), history


def load_trainer(ref: str) -> Callable[..., nn.Module]:
    """The declared trainer ``"module:function"`` (its module importable, e.g. the repo on ``sys.path``)."""
    mod, _, name = ref.partition(":")
    fn = getattr(importlib.import_module(mod), name)
    if not callable(fn):
        raise TypeError(f"trainer {ref!r} is not callable")
    return fn


def outputs(model: nn.Module, x: np.ndarray, n_outputs: int) -> np.ndarray:
    """The model's outputs on ``x``: ``(n,)`` for one output, ``(n, n_outputs)`` otherwise (float64)."""
    with torch.no_grad():
        out = model(torch.from_numpy(x))
    out = np.asarray(out.detach().cpu().numpy(), np.float64)
    return out.reshape(-1) if n_outputs == 1 else out.reshape(len(x), -1)


def to_onnx(model: nn.Module, n_features: int) -> bytes:
    """The model as ONNX: input ``x`` (n, n_features) float32, output ``score``, dynamic batch axis."""
    buf = io.BytesIO()
    torch.onnx.export(model, (torch.zeros(1, n_features),), buf, input_names=["x"], output_names=["score"],
                      dynamic_axes={"x": {0: "n"}, "score": {0: "n"}}, dynamo=False)
    return buf.getvalue()


def onnx_outputs(blob: bytes, x: np.ndarray, n_outputs: int) -> np.ndarray:
    """What the ONNX copy returns for ``x`` (onnxruntime, CPU), shaped like :func:`outputs`."""
    import onnxruntime as ort  # noqa: PLC0415

    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    out = np.asarray(sess.run(None, {sess.get_inputs()[0].name: x})[0], np.float64)
    return out.reshape(-1) if n_outputs == 1 else out.reshape(len(x), -1)


def checked_onnx(model: nn.Module, x: np.ndarray, n_outputs: int, atol: float = 1e-4) -> tuple[bytes | None, str]:
    """The ONNX copy when it exports and reproduces the torch outputs on ``x``; else None and why."""
    want = outputs(model, x, n_outputs)
    try:
        blob = to_onnx(model, x.shape[1])
        diff = float(np.max(np.abs(onnx_outputs(blob, x, n_outputs) - want), initial=0.0))
    except Exception as e:  # user modules may use ops the exporter does not know
        return None, f"export failed: {type(e).__name__}: {e}"[:300]
    if not diff <= atol * max(1.0, float(np.max(np.abs(want), initial=0.0))):  # NaN differs too
        return None, f"ONNX outputs differ from torch by {diff:.3g}"
    return blob, "ok"
