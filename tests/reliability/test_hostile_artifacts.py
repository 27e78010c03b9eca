"""Hostile model artifacts: while the champion serves under traffic, versions are promoted whose ONNX copy was
altered after registration, whose pickle would run code when loaded (registered with plain MLflow, and one
registered by driftloop whose pickle was replaced afterwards), whose input has another width, that return NaN
for some rows, and that take about 10 s per batch. None is ever served (the slow one is refused by the
warm-up check), no code of theirs runs, the champion keeps serving, and ``models.rejected`` says why."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import mlflow.pytorch
import onnx
import orjson
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from driftloop.app.producer import load_generator, produce
from driftloop.bench.model_fixtures import fit, reference, register_bad, register_good, synthetic_xy
from driftloop.bench.serving import read_all
from driftloop.core.kafka import make_producer
from driftloop.core.settings import Settings
from driftloop.core.topics import ensure_topics
from driftloop.features.repo import apply, declarations, init_repo
from driftloop.registry.aliases import promote
from driftloop.registry.versions import experiment, register_version
from driftloop.retrain.trainers import to_onnx
from tests.helpers import wait_for, worker

pytestmark = pytest.mark.reliability

MODEL = "ctr"


class Evil(nn.Module):
    """A model whose pickle runs a shell command when it is loaded."""

    def __init__(self, n: int, marker: Path):
        super().__init__()
        self.lin, self.marker = nn.Linear(n, 1), str(marker)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.lin(x)).squeeze(-1)

    def __reduce_ex__(self, protocol: object) -> tuple:
        return os.system, (f"touch {self.marker}",)


class HalfNaN(nn.Module):
    """The champion's net, NaN wherever the first feature is below 1."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = (x[:, :1] >= 1.0).float()
        return self.net(x) * keep / keep


def slow_onnx(n_features: int, iterations: int = 3_500_000) -> bytes:
    """An ONNX model looping ``iterations`` times over its input before answering (about 10 s here)."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond"], ["cond_out"]), helper.make_node("Tanh", ["acc"], ["acc_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("acc", TensorProto.FLOAT, ["n", n_features])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, ["n", n_features])])
    trips = helper.make_tensor("m", TensorProto.INT64, [], [iterations])
    nodes = [helper.make_node("Constant", [], ["m"], value=trips),
             helper.make_node("Constant", [], ["t"], value=helper.make_tensor("t", TensorProto.BOOL, [], [True])),
             helper.make_node("Loop", ["m", "t", "x"], ["acc_final"], body=body),
             helper.make_node("ReduceMean", ["acc_final"], ["mean"], keepdims=0, axes=[1]),
             helper.make_node("Sigmoid", ["mean"], ["score"])]
    graph = helper.make_graph(nodes, "slow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", n_features])],
                              [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["n"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _plain_mlflow_version(s: Settings, marker: Path) -> str:
    """A version registered with MLflow's own API (no driftloop checksum), its pickle running code on load."""
    spec = declarations(s).model(MODEL)
    with mlflow.start_run(experiment_id=experiment(s, MODEL).experiment_id):
        info = mlflow.pytorch.log_model(Evil(len(spec.features), marker), name="model", serialization_format="pickle",
                                        pip_requirements=["torch==2.13.0"])
    return str(mlflow.register_model(info.model_uri, MODEL, tags={"features": ",".join(spec.features),
                                                                  "task": spec.task}).version)


def _replaced_pickle_version(s: Settings, marker: Path) -> str:
    """A version registered by driftloop without an ONNX copy whose model file was replaced afterwards by a pickle
    that runs code."""
    spec = declarations(s).model(MODEL)
    x, y = synthetic_xy(spec, 500, 3)
    net, _ = fit(spec, x, y, 3)
    version, _ = register_version(s, MODEL, net, spec.features, reference(spec, net, x[:200], spec.features),
                                  onnx_bytes=None, task=spec.task, challenger=False)
    evil = Evil(len(spec.features), marker)
    newest = max((s.root / "mlartifacts").rglob("model.pt2"), key=lambda p: p.stat().st_mtime)
    torch.save(evil, newest)
    return version


def _half_nan_version(s: Settings) -> str:
    spec = declarations(s).model(MODEL)
    x, y = synthetic_xy(spec, 500, 4)
    net, _ = fit(spec, x, y, 4)
    bad = HalfNaN(net)
    version, _ = register_version(s, MODEL, bad, spec.features, reference(spec, bad, x[:200], spec.features),
                                  onnx_bytes=to_onnx(bad, x.shape[1]), task=spec.task, challenger=False)
    return version


def _slow_version(s: Settings) -> str:
    spec = declarations(s).model(MODEL)
    x, y = synthetic_xy(spec, 500, 5)
    net, _ = fit(spec, x, y, 5)
    blob = slow_onnx(len(spec.features))
    onnx.checker.check_model(onnx.load_from_string(blob))
    version, _ = register_version(s, MODEL, net, spec.features, reference(spec, net, x[:200], spec.features),
                                  onnx_bytes=blob, task=spec.task, challenger=False)
    return version


def test_hostile_versions_are_never_served(settings: Settings, tmp_path: Path, figure) -> None:
    repo = settings.root / "repo"
    init_repo(repo, "ads")
    s = Settings(**{**settings.model_dump(), "repo": repo})
    ensure_topics(s, sorted(apply(s)[2].topics))
    producer = make_producer(s)
    champion = promote(s, producer, MODEL, register_good(s, seed=1), reason="test").version
    markers = {k: tmp_path / f"{k}.ran" for k in ("plain_mlflow_pickle", "replaced_pickle")}
    hostile = {
        "altered_onnx": lambda: register_bad(s, "corrupted_artifact"),
        "plain_mlflow_pickle": lambda: _plain_mlflow_version(s, markers["plain_mlflow_pickle"]),
        "replaced_pickle": lambda: _replaced_pickle_version(s, markers["replaced_pickle"]),
        "wrong_signature": lambda: register_bad(s, "wrong_signature"),
        "nan_for_some_rows": lambda: _half_nan_version(s),
        "10s_per_batch": lambda: _slow_version(s),
    }
    refused: dict[str, dict] = {}
    sent = 0
    with worker(s, "serving") as serving:
        for kind, make in hostile.items():
            version = make()
            promote(s, producer, MODEL, version, reason=f"hostile: {kind}")
            refused[kind] = wait_for(lambda v=version: next(
                (r for m in read_all(s, "models.rejected", 10**6, timeout=0, idle_s=0.3)
                 if (r := orjson.loads(m.value()))["version"] == v), None), 90)
            sent += produce(s, [load_generator(s, MODEL, seed=sent)], rate=500, count=200, progress=False)
            preds = wait_for(lambda n=sent: (p := [orjson.loads(m.value()) for m in read_all(
                s, "predictions", 10**6, timeout=0, idle_s=0.3)]) and len(p) >= n and p, 60)
            assert {p["model_version"] for p in preds} == {champion}, f"{kind}: another version served"
            assert serving.poll() is None, f"the serving worker died on {kind}"
    assert not [k for k, m in markers.items() if m.exists()], "a hostile pickle ran code"
    checks = {k: sorted(r["checks"]) for k, r in refused.items()}
    assert all(checks.values()), checks
    assert any("latency" in c for c in checks["10s_per_batch"]), checks
    for kind, c in checks.items():
        figure(f"hostile artifact refused: {kind}", 1, "refused", checks=",".join(c)[:80])
    figure("hostile artifacts: served", 0, "versions")
    figure("hostile artifacts: code run by a pickle", 0, "runs")
