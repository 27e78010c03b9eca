"""The int8 copy: served only when its outputs on the reference sample stay within the declared tolerance
of the fp32 model, compared here with onnxruntime run directly on the registered fp32 ONNX bytes."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest

from driftloop.bench.model_fixtures import register_good
from driftloop.core.settings import Settings
from driftloop.features.repo import apply
from driftloop.registry.verify import load_scorer
from driftloop.registry.versions import ONNX_PATH, client, load_reference
from driftloop.retrain.trainers import onnx_outputs


@pytest.fixture
def registered(tmp_path: Path) -> tuple[Settings, str, list[str]]:
    s = Settings(data_dir=tmp_path)
    decls = apply(s)[2]
    version = register_good(s, seed=5)
    return s, version, list(decls.model("ctr").features)


def _reference(s: Settings, version: str, features: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The reference sample and the fp32 ONNX outputs on it, straight from the registered bytes."""
    x = load_reference(s, "ctr", version)[features].astype("float64").fillna(0.0).to_numpy(np.float32)
    run_id = client(s).get_model_version("ctr", version).run_id
    blob = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=ONNX_PATH)).read_bytes()
    return x, onnx_outputs(blob, x, 1)


def test_int8_serves_within_tolerance(registered):
    s, version, features = registered
    x, want = _reference(s, version, features)
    fp32 = load_scorer(s, "ctr", version, features)
    int8 = load_scorer(s, "ctr", version, features, int8_tolerance=0.05)
    assert (fp32.runtime, int8.runtime) == ("onnx", "onnx-int8")
    np.testing.assert_allclose(fp32.score(x), want, atol=1e-6)
    got = int8.score(x)
    assert np.max(np.abs(got - want)) <= 0.05
    assert not np.array_equal(got, want), "the int8 copy should not be the fp32 model itself"


def test_int8_beyond_tolerance_falls_back_to_fp32(registered):
    s, version, features = registered
    x, want = _reference(s, version, features)
    scorer = load_scorer(s, "ctr", version, features, int8_tolerance=1e-9)
    assert scorer.runtime == "onnx"
    np.testing.assert_allclose(scorer.score(x), want, atol=1e-6)
