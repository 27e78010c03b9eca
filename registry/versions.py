"""Registered model versions on MLflow: the store, aliases, registering a trained version, its reference sample.

A registered version holds the torch model (the sha256 of its files is the version tag ``torch_sha256``: a
pickle is loaded only if its bytes are the ones registered), an ONNX copy (``onnx/model.onnx``) whose sha256
is the version tag ``onnx_sha256``, the feature list it was trained on (tag ``features``), its task (tag
``task``) and a reference sample (``reference/reference.parquet``: the features and the model's own
scores on held-out rows), which the drift monitor compares live windows to and serving verifies a
version on before swapping. Every newly registered version gets the ``challenger`` alias.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    RESOURCE_DOES_NOT_EXIST,
    TEMPORARILY_UNAVAILABLE,
    ErrorCode,
)

from driftloop.core.settings import Settings

CHAMPION = "champion"
CHALLENGER = "challenger"
ONNX_PATH = "onnx/model.onnx"
REFERENCE_PATH = "reference/reference.parquet"
LINEAGE_PATH = "lineage.json"
NOT_FOUND = {ErrorCode.Name(INVALID_PARAMETER_VALUE), ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)}  # alias or model unset


def client(settings: Settings) -> MlflowClient:
    """The MLflow client of ``settings.tracking_uri`` (tracking and registry), also made MLflow's default
    tracking URI (the registry follows it)."""
    mlflow.set_tracking_uri(settings.tracking_uri)
    return MlflowClient(settings.tracking_uri, registry_uri=settings.tracking_uri)


def init_store(settings: Settings) -> None:
    """Create the tracking/registry database once, before several workers open it at the same time
    (concurrent first opens of one sqlite file race in MLflow's schema migration)."""
    client(settings).search_registered_models(max_results=1)


TORCH_SHA256 = "torch_sha256"  # version tag: the sha256 of the logged torch model's files (tree_sha256)


def tree_sha256(root: Path) -> str:
    """One sha256 over the files of a logged model under ``root`` (relative paths and contents, in path order;
    not ``registered_model_meta``, which the registry adds when the version is registered)."""
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "registered_model_meta"):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def experiment(settings: Settings, name: str) -> Any:
    """The model's MLflow experiment, made active (created on first use). On a local store its artifacts go
    under ``<data_dir>/mlartifacts`` — MLflow's default is ``./mlruns`` of whatever the working directory is;
    a tracking server keeps its own artifact root."""
    c = client(settings)
    exp = c.get_experiment_by_name(name)
    if exp is None and not settings.tracking_uri.startswith(("http://", "https://", "databricks")):
        try:
            c.create_experiment(name, artifact_location=(settings.root / "mlartifacts" / name).resolve().as_uri())
        except MlflowException:  # created meanwhile by another process
            pass
    return mlflow.set_experiment(name)


def alias_version(settings: Settings, name: str, alias: str = CHAMPION) -> str | None:
    """The version an alias of model ``name`` points to, or None when unset (or no such model). Any other
    failure (the store locked or unreachable) raises: "no champion" is never guessed from an outage."""
    try:
        return str(client(settings).get_model_version_by_alias(name, alias).version)
    except MlflowException as e:
        if e.error_code in NOT_FOUND:
            return None
        raise


def registry_outage(error: BaseException) -> bool:
    """Whether ``error`` (or one it was raised from) says the MLflow store is unavailable rather than wrong."""
    e: BaseException | None = error
    while e is not None:
        if isinstance(e, MlflowException) and e.error_code == ErrorCode.Name(TEMPORARILY_UNAVAILABLE):
            return True
        e = e.__cause__ or e.__context__
    return False


def registry_answers(settings: Settings) -> bool:
    """Whether the MLflow store answers a read now (a locked sqlite file waits MLflow's busy timeout, 20 s)."""
    try:
        client(settings).search_experiments(max_results=1)
    except Exception:  # noqa: BLE001 - any failure means "not now"
        return False
    return True


def register_version(settings: Settings, name: str, model: Any, features: Sequence[str], reference: pd.DataFrame, *,
                     onnx_bytes: bytes | None, task: str = "binary", params: Mapping[str, Any] | None = None,
                     metrics: Mapping[str, float] | None = None, history: Sequence[float] = (),
                     tags: Mapping[str, str] | None = None, lineage: Mapping[str, Any] | None = None,
                     challenger: bool = True) -> tuple[str, str]:
    """Log one trained torch model as a new registered version of ``name``; returns (version, run id).

    ``reference`` holds the feature columns and a ``score`` column (the model's own outputs; for a
    multiclass model, one ``p<i>`` column per class besides). Without ``onnx_bytes`` the version has no
    ONNX copy and serving falls back to torch. ``tags`` go on the run and the version; ``lineage`` (what
    triggered it, the data, code, params and gate decision) is logged as ``lineage.json``. Everything is
    logged before the version is registered, so a version never exists without its artifacts."""
    import mlflow.pytorch  # noqa: PLC0415 - torch is heavy; only writers need it

    c = client(settings)
    exp = experiment(settings, name)
    version_tags = {"features": ",".join(features), "task": task, **(tags or {})}
    with mlflow.start_run(experiment_id=exp.experiment_id) as run, tempfile.TemporaryDirectory() as tmp:
        mlflow.log_params({"features": ",".join(features), "task": task, **(params or {})})
        mlflow.set_tags(dict(tags or {}))
        if lineage is not None:
            mlflow.log_dict(dict(lineage), LINEAGE_PATH)
        if metrics:
            mlflow.log_metrics(dict(metrics))
        for i, v in enumerate(history):
            mlflow.log_metric("epoch_train_loss", v, step=i)
        info = mlflow.pytorch.log_model(model, name="model", pip_requirements=["torch==2.13.0"],
                                        input_example=reference[list(features)].to_numpy("float32")[:5])
        version_tags[TORCH_SHA256] = tree_sha256(Path(mlflow.artifacts.download_artifacts(
            artifact_uri=info.model_uri, dst_path=str(Path(tmp) / "torch"))))
        if onnx_bytes is not None:
            onnx_file = Path(tmp) / "model.onnx"
            onnx_file.write_bytes(onnx_bytes)
            mlflow.log_artifact(str(onnx_file), artifact_path="onnx")
            version_tags["onnx_sha256"] = hashlib.sha256(onnx_bytes).hexdigest()
        ref_file = Path(tmp) / "reference.parquet"
        reference.to_parquet(ref_file)
        mlflow.log_artifact(str(ref_file), artifact_path="reference")
        run_id = run.info.run_id
    mv = mlflow.register_model(f"runs:/{run_id}/model", name, tags=version_tags)
    if challenger:
        c.set_registered_model_alias(name, CHALLENGER, mv.version)
    return str(mv.version), run_id


def load_reference(settings: Settings, name: str, version: str) -> pd.DataFrame:
    mv = client(settings).get_model_version(name, version)
    path = mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=REFERENCE_PATH)
    return pd.read_parquet(path)


def run_metric(settings: Settings, name: str, version: str, key: str) -> float | None:
    """A metric the version's training run logged (e.g. ``holdout_log_loss``), or None."""
    mv = client(settings).get_model_version(name, version)
    value = client(settings).get_run(mv.run_id).data.metrics.get(key)
    return None if value is None else float(value)


def registered_for(settings: Settings, name: str, request_id: str) -> tuple[str, str] | None:
    """(version, run id) of the version already registered for retrain request ``request_id``, if any."""
    try:
        found = client(settings).search_model_versions(f"name = '{name}' and tag.request_id = '{request_id}'")
    except MlflowException:
        return None
    return (str(found[0].version), found[0].run_id) if found else None


def lineage(settings: Settings, name: str, version: str) -> dict[str, Any] | None:
    """The ``lineage.json`` a version's run logged, or None (versions registered by hand have none)."""
    mv = client(settings).get_model_version(name, version)
    try:
        return mlflow.artifacts.load_dict(f"runs:/{mv.run_id}/{LINEAGE_PATH}")
    except (MlflowException, OSError):
        return None
