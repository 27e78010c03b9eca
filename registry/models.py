"""MLflow model registry access shared by serving, drift and retrain: versions, aliases, scorers.

A registered version holds the torch model, an ONNX copy (``onnx/model.onnx``) whose sha256 is the
version tag ``onnx_sha256``, the feature list it was trained on (tag ``features``) and a reference
sample (``reference/reference.parquet``: the features and the model's own scores on held-out rows),
which the drift monitor compares live windows to and serving verifies a version on before swapping.

Promotion moves the ``champion`` alias (never the deprecated stages), records the version it replaced
(tag ``previous_champion``, which ``rollback`` follows) and announces it on ``models.promoted``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import onnxruntime as ort
import pandas as pd
from confluent_kafka import Producer
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from driftloop.core.contracts import ModelPromoted, now_us
from driftloop.core.kafka import flush_or_raise, produce_event
from driftloop.core.settings import Settings

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
ONNX_PATH = "onnx/model.onnx"
REFERENCE_PATH = "reference/reference.parquet"
PREVIOUS_TAG = "previous_champion"


def client(settings: Settings) -> MlflowClient:
    mlflow.set_tracking_uri(settings.tracking_uri)
    return MlflowClient(settings.tracking_uri)


def init_store(settings: Settings) -> None:
    """Create the tracking/registry database once, before several workers open it at the same time
    (concurrent first opens of one sqlite file race in MLflow's schema migration)."""
    client(settings).search_registered_models(max_results=1)


def alias_version(settings: Settings, alias: str = CHAMPION, name: str | None = None) -> str | None:
    """The version an alias points to, or None when unset (or no such model)."""
    try:
        return str(client(settings).get_model_version_by_alias(name or settings.model_name, alias).version)
    except MlflowException:
        return None


# --- registering and promoting versions ----------------------------------------------------------

def register_version(settings: Settings, model: Any, features: Sequence[str], reference: pd.DataFrame, *,
                     onnx_bytes: bytes | None, params: Mapping[str, Any] | None = None,
                     metrics: Mapping[str, float] | None = None, history: Sequence[float] = (),
                     name: str | None = None, challenger: bool = True) -> tuple[str, str]:
    """Log one trained torch model as a new registered version; returns (version, run id).

    ``reference`` holds the feature columns and a ``score`` column (the model's own outputs).
    Without ``onnx_bytes`` the version has no ONNX copy and serving falls back to torch."""
    import mlflow.pytorch  # noqa: PLC0415 - torch is heavy; only writers need it

    name = name or settings.model_name
    c = client(settings)
    exp = mlflow.set_experiment(name)
    tags = {"features": ",".join(features)}
    with mlflow.start_run(experiment_id=exp.experiment_id) as run, tempfile.TemporaryDirectory() as tmp:
        mlflow.log_params({"features": ",".join(features), **(params or {})})
        if metrics:
            mlflow.log_metrics(dict(metrics))
        for i, v in enumerate(history):
            mlflow.log_metric("epoch_train_logloss", v, step=i)
        mlflow.pytorch.log_model(model, name="model", pip_requirements=["torch==2.13.0"],
                                 input_example=reference[list(features)].to_numpy("float32")[:5])
        if onnx_bytes is not None:
            onnx_file = Path(tmp) / "model.onnx"
            onnx_file.write_bytes(onnx_bytes)
            mlflow.log_artifact(str(onnx_file), artifact_path="onnx")
            tags["onnx_sha256"] = hashlib.sha256(onnx_bytes).hexdigest()
        ref_file = Path(tmp) / "reference.parquet"
        reference.to_parquet(ref_file)
        mlflow.log_artifact(str(ref_file), artifact_path="reference")
        run_id = run.info.run_id
    mv = mlflow.register_model(f"runs:/{run_id}/model", name, tags=tags)
    if challenger:
        c.set_registered_model_alias(name, CHALLENGER, mv.version)
    return str(mv.version), run_id


def promote(settings: Settings, producer: Producer, version: str, *, reason: str,
            metrics: Mapping[str, float] | None = None, request_id: str | None = None,
            timeline: dict[str, int] | None = None, name: str | None = None,
            record_previous: bool = True) -> ModelPromoted:
    """Move ``champion`` to ``version`` and announce it on ``models.promoted`` (serving follows)."""
    name = name or settings.model_name
    c = client(settings)
    mv = c.get_model_version(name, version)  # raises for an unknown version
    previous = alias_version(settings, CHAMPION, name)
    if record_previous and previous is not None and previous != str(version):
        c.set_model_version_tag(name, str(version), PREVIOUS_TAG, previous)
    c.set_registered_model_alias(name, CHAMPION, str(version))
    timeline = {**(timeline or {}), "promoted": now_us()}
    ev = ModelPromoted(model_name=name, version=str(version), previous_version=previous, run_id=mv.run_id,
                       metrics=dict(metrics or {}), reason=reason, request_id=request_id, timeline=timeline)
    produce_event(producer, settings, "models.promoted", ev, name)
    flush_or_raise(producer)
    log.info("champion %s v%s (was %s): %s", name, version, previous, reason)
    return ev


class RollbackError(Exception):
    """There is nothing to roll back to."""


def rollback(settings: Settings, producer: Producer, name: str | None = None,
             to: str | None = None) -> ModelPromoted:
    """Move ``champion`` back to the version it replaced (or to ``to``) and announce it."""
    name = name or settings.model_name
    current = alias_version(settings, CHAMPION, name)
    if current is None:
        raise RollbackError(f"model {name!r} has no champion")
    target = to or (client(settings).get_model_version(name, current).tags or {}).get(PREVIOUS_TAG)
    if target is None:
        raise RollbackError(f"{name} v{current} replaced no earlier champion; name a version with --to")
    if str(target) == current:
        raise RollbackError(f"{name} v{current} is already the champion")
    try:
        return promote(settings, producer, str(target), reason="rollback", name=name, record_previous=False)
    except MlflowException as e:
        raise RollbackError(f"{name} has no version {target}: {e.message}") from e


# --- loading verified scorers --------------------------------------------------------------------

class ModelCheckError(Exception):
    """A version failed a check and must not be served; ``check`` names which."""

    def __init__(self, check: str, message: str):
        super().__init__(message)
        self.check = check


@dataclass
class Scorer:
    """A loaded, verified model version that scores float32 matrices (one row per record)."""

    name: str
    version: str
    run_id: str
    features: list[str]
    runtime: str  # "onnx" or "torch"
    fn: Callable[[np.ndarray], np.ndarray]

    def score(self, x: np.ndarray) -> np.ndarray:
        return self.fn(x)


def _onnx_fn(blob: bytes, n_features: int, where: str) -> Callable[[np.ndarray], np.ndarray]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    try:
        sess = ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own types for corrupt models
        raise ModelCheckError("artifact", f"{where}: cannot load the ONNX copy: {e}") from e
    inputs = sess.get_inputs()
    width = inputs[0].shape[-1] if inputs and inputs[0].shape else None
    if len(inputs) != 1 or width != n_features:
        raise ModelCheckError("signature", f"{where}: ONNX input {[(i.name, i.shape) for i in inputs]} does not "
                                           f"take {n_features} features")
    name = inputs[0].name
    return lambda x: sess.run(None, {name: x})[0].reshape(-1)


def _torch_fn(uri: str, where: str) -> Callable[[np.ndarray], np.ndarray]:
    import mlflow.pytorch  # noqa: PLC0415
    import torch  # noqa: PLC0415

    torch.set_num_threads(1)
    try:
        model = mlflow.pytorch.load_model(uri, map_location="cpu")
        if isinstance(model, torch.export.ExportedProgram):
            model = model.module()
        with contextlib.suppress(NotImplementedError):  # an exported graph module has no eval mode
            model.eval()
    except Exception as e:
        raise ModelCheckError("artifact", f"{where}: cannot load the torch model: {e}") from e

    def fn(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy().reshape(-1)

    return fn


def load_scorer(settings: Settings, version: str, features: list[str], name: str | None = None,
                verify_reference: bool = True) -> Scorer:
    """Download, verify and warm up one pinned version.

    Checks, each a ``ModelCheckError`` naming it: ``signature`` (trained on other features, or an
    ONNX input of another width), ``checksum`` (the ONNX bytes are not the ones registered),
    ``artifact`` (cannot be loaded), ``outputs`` (non-finite, out of [0, 1] or misshaped scores on
    the version's reference sample)."""
    name = name or settings.model_name
    where = f"{name} v{version}"
    c = client(settings)
    mv = c.get_model_version(name, version)
    tags = mv.tags or {}
    if tags.get("features", ",".join(features)).split(",") != features:
        raise ModelCheckError("signature", f"{where}: trained on {tags['features']}, serving {features}")
    try:
        path = Path(mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=ONNX_PATH))
    except (MlflowException, OSError):
        path = None
    if path is not None:
        blob = path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != tags.get("onnx_sha256"):
            raise ModelCheckError("checksum", f"{where}: the ONNX copy does not match its registered sha256")
        runtime, fn = "onnx", _onnx_fn(blob, len(features), where)
    else:
        runtime, fn = "torch", _torch_fn(f"models:/{name}/{version}", where)
    scorer = Scorer(name, str(version), mv.run_id, features, runtime, fn)
    x = np.zeros((4, len(features)), np.float32)
    if verify_reference:
        try:
            x = load_reference(settings, version, name)[features].astype("float64").fillna(0.0).to_numpy(np.float32)
        except (MlflowException, OSError, KeyError) as e:
            log.warning("%s: no usable reference sample (%s); verifying on zeros", where, e)
    for _ in range(3):  # the first runs also warm the runtime up
        try:
            out = scorer.score(x)
        except Exception as e:
            raise ModelCheckError("signature", f"{where}: scoring the reference sample failed: {e}") from e
    if out.shape != (len(x),) or not np.all(np.isfinite(out)) or out.min() < 0 or out.max() > 1:
        bad = int(np.sum(~np.isfinite(out))) if out.shape == (len(x),) else -1
        raise ModelCheckError("outputs", f"{where}: scores on the reference sample are not finite probabilities "
                                         f"(shape {out.shape}, {bad} non-finite)")
    return scorer


def load_reference(settings: Settings, version: str, name: str | None = None) -> pd.DataFrame:
    mv = client(settings).get_model_version(name or settings.model_name, version)
    path = mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=REFERENCE_PATH)
    return pd.read_parquet(path)
