"""MLflow model registry access shared by serving, drift and retrain: aliases, ONNX scorers, references.

Each registered version has an ONNX copy (``onnx/model.onnx``) whose sha256 is the version tag
``onnx_sha256``, and a reference sample (``reference/reference.parquet``) the drift monitor compares to.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import onnxruntime as ort
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from driftloop.infra.settings import Settings

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
ONNX_PATH = "onnx/model.onnx"
REFERENCE_PATH = "reference/reference.parquet"


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


class ModelCheckError(Exception):
    """The artifact failed a check (checksum, signature, outputs); it must not be served."""


@dataclass
class OnnxScorer:
    """A loaded model version that scores float32 matrices."""

    name: str
    version: str
    run_id: str
    features: list[str]
    session: ort.InferenceSession

    def score(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"x": x})[0].reshape(-1)


def load_scorer(settings: Settings, version: str, features: list[str], name: str | None = None) -> OnnxScorer:
    """Download, verify (checksum, input width, finite outputs) and load one pinned version."""
    name = name or settings.model_name
    c = client(settings)
    mv = c.get_model_version(name, version)
    path = Path(mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=ONNX_PATH))
    blob = path.read_bytes()
    want = (mv.tags or {}).get("onnx_sha256")
    if want and hashlib.sha256(blob).hexdigest() != want:
        raise ModelCheckError(f"{name} v{version}: ONNX checksum mismatch")
    if (mv.tags or {}).get("features") and mv.tags["features"].split(",") != features:
        raise ModelCheckError(f"{name} v{version}: trained on {mv.tags['features']}, serving {features}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    try:
        sess = ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own types for corrupt models
        raise ModelCheckError(f"{name} v{version}: cannot load ONNX: {e}") from e
    scorer = OnnxScorer(name, version, mv.run_id, features, sess)
    probe = scorer.score(np.zeros((4, len(features)), np.float32))
    if probe.shape != (4,) or not np.all(np.isfinite(probe)):
        raise ModelCheckError(f"{name} v{version}: non-finite or misshaped outputs")
    return scorer


def load_reference(settings: Settings, version: str, name: str | None = None) -> pd.DataFrame:
    mv = client(settings).get_model_version(name or settings.model_name, version)
    path = mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=REFERENCE_PATH)
    return pd.read_parquet(path)
