"""The click model: a small MLP with the input standardisation built in (so serving needs raw features)."""

from __future__ import annotations

import io

import numpy as np
import torch
from torch import nn


class ClickMLP(nn.Module):
    def __init__(self, n_features: int, hidden: int = 32):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.net = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net((x - self.mean) / self.std))


def fit(x: np.ndarray, y: np.ndarray, epochs: int = 60, lr: float = 3e-3, batch: int = 256,
        device: str = "cpu", seed: int = 0) -> tuple[ClickMLP, list[float]]:
    """Train on (x, y); returns the CPU model and the per-epoch training log loss."""
    torch.manual_seed(seed)
    model = ClickMLP(x.shape[1])
    model.mean.copy_(torch.from_numpy(x.mean(0)))
    model.std.copy_(torch.from_numpy(x.std(0) + 1e-6))
    model.to(device)
    xt = torch.from_numpy(x).to(device)
    yt = torch.from_numpy(y.astype(np.float32)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.BCELoss()
    history = []
    for _ in range(epochs):
        perm = torch.randperm(len(xt), device=device)
        total = 0.0
        for i in range(0, len(xt), batch):
            idx = perm[i:i + batch]
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]).squeeze(1), yt[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        history.append(total / len(xt))
    return model.cpu().eval(), history


def to_onnx(model: ClickMLP, n_features: int) -> bytes:
    buf = io.BytesIO()
    torch.onnx.export(model, (torch.zeros(1, n_features),), buf, input_names=["x"], output_names=["score"],
                      dynamic_axes={"x": {0: "n"}, "score": {0: "n"}}, dynamo=False)
    return buf.getvalue()


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
