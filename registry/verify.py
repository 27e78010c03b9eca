"""Loading a pinned version for serving, verified before it may serve.

With ``int8_tolerance`` the ONNX copy is also quantized (onnxruntime's dynamic int8 quantization) and
the int8 model serves when its outputs on the reference sample stay within that absolute tolerance of
the fp32 model's; otherwise fp32 serves, and the log says why.

Checks, each a ``ModelCheckError`` naming it: ``signature`` (trained on other features, or an ONNX input
of another width), ``checksum`` (the ONNX bytes, or without an ONNX copy the torch model's files, are not
the ones registered), ``artifact`` (cannot be loaded, or a pickled torch model: unpickling can run code),
``latency`` (scoring the reference sample takes longer than allowed), ``outputs`` (scores on the version's
reference sample that do not fit its task: binary probabilities in [0, 1], finite regression values,
multiclass rows of probabilities).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import onnxruntime as ort
from mlflow.exceptions import MlflowException

from driftloop.core.settings import Settings
from driftloop.registry.versions import ONNX_PATH, TORCH_SHA256, client, load_reference, tree_sha256

log = logging.getLogger(__name__)


class ModelCheckError(Exception):
    """A version failed a check and must not be served; ``check`` names which."""

    def __init__(self, check: str, message: str):
        super().__init__(message)
        self.check = check


@dataclass
class Scorer:
    """A loaded, verified model version scoring float32 matrices: one output row per input row
    (shape ``(n,)`` for binary and regression, ``(n, classes)`` for multiclass)."""

    name: str
    version: str
    run_id: str
    features: list[str]
    runtime: str  # "onnx" or "torch"
    fn: Callable[[np.ndarray], np.ndarray]
    task: str = "binary"

    def score(self, x: np.ndarray) -> np.ndarray:
        return self.fn(x)


def quantize_int8(blob: bytes) -> bytes:
    """An int8 dynamically quantized copy of an ONNX model (weights int8, activations quantized at run time)."""
    import onnx  # noqa: PLC0415
    from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "int8.onnx"
        quantize_dynamic(onnx.load_from_string(blob), out, weight_type=QuantType.QInt8)
        return out.read_bytes()


def _int8_or_fp32(scorer: Scorer, blob: bytes, x: np.ndarray, tolerance: float, outputs: int) -> Scorer:
    """The int8 copy of ``scorer`` when its outputs on ``x`` stay within ``tolerance``; else ``scorer``."""
    where = f"{scorer.name} v{scorer.version}"
    try:
        fn = _onnx_fn(quantize_int8(blob), len(scorer.features), where, outputs)
        diff = float(np.max(np.abs(fn(x) - scorer.score(x)), initial=0.0))
    except Exception as e:  # a graph the quantizer cannot handle serves in fp32
        log.warning("%s: no int8 copy (%s); serving fp32", where, e)
        return scorer
    if not diff <= tolerance:
        log.warning("%s: int8 outputs differ by up to %.3g on the reference sample (tolerance %g); serving fp32",
                    where, diff, tolerance)
        return scorer
    log.info("%s: serving the int8 copy (max difference %.3g on the reference sample)", where, diff)
    return Scorer(scorer.name, scorer.version, scorer.run_id, scorer.features, "onnx-int8", fn, scorer.task)


def _onnx_fn(blob: bytes, n_features: int, where: str, outputs: int) -> Callable[[np.ndarray], np.ndarray]:
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
    return lambda x: _shape(sess.run(None, {name: x})[0], outputs)


def _shape(out: np.ndarray, outputs: int) -> np.ndarray:
    return out.reshape(-1) if outputs == 1 else out.reshape(len(out), -1)


def _verified_torch_model(uri: str, where: str, sha256: str, local: Path) -> Any:
    import mlflow.pytorch  # noqa: PLC0415
    import torch  # noqa: PLC0415

    try:
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(local)))
    except (MlflowException, OSError) as e:
        raise ModelCheckError("artifact", f"{where}: cannot download the torch model: {e}") from e
    if tree_sha256(root) != sha256:
        raise ModelCheckError("checksum", f"{where}: the torch model's files do not match their registered sha256")
    if any(root.rglob("*.pth")) or not any(root.rglob("*.pt2")):
        raise ModelCheckError("artifact", f"{where}: a pickled torch model (loading it can run code); driftloop "
                                          "loads ONNX or torch.export (pt2) models only")
    torch.set_num_threads(1)
    try:
        model = mlflow.pytorch.load_model(str(root), map_location="cpu")
        if isinstance(model, torch.export.ExportedProgram):
            model = model.module()
        with contextlib.suppress(NotImplementedError):  # an exported graph module has no eval mode
            model.eval()
    except Exception as e:
        raise ModelCheckError("artifact", f"{where}: cannot load the torch model: {e}") from e
    return model


def _torch_fn(uri: str, where: str, outputs: int, sha256: str | None) -> Callable[[np.ndarray], np.ndarray]:
    """The torch model's scoring function, loaded only from the bytes driftloop registered (``sha256``, the
    ``torch_sha256`` tag) and only as a ``torch.export`` program: unpickling a model can run any code."""
    import torch  # noqa: PLC0415

    if sha256 is None:
        raise ModelCheckError("checksum", f"{where}: no ONNX copy and no torch_sha256 tag (not registered by "
                                          "driftloop): its torch model is not loaded")
    local = Path(tempfile.mkdtemp(prefix="driftloop-torch-"))
    try:
        model = _verified_torch_model(uri, where, sha256, local)
    finally:
        shutil.rmtree(local, ignore_errors=True)

    def fn(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return _shape(model(torch.from_numpy(x)).numpy(), outputs)

    return fn


def check_outputs(out: np.ndarray, n: int, task: str, outputs: int, where: str) -> None:
    """Raise ``ModelCheckError("outputs")`` unless ``out`` are valid outputs of the task for ``n`` rows."""
    want = (n,) if outputs == 1 else (n, outputs)
    bad = ""
    if out.shape != want:
        bad = f"shape {out.shape}, expected {want}"
    elif not np.all(np.isfinite(out)):
        bad = f"{int(np.sum(~np.isfinite(out)))} non-finite values"
    elif task == "binary" and (out.min() < 0 or out.max() > 1):
        bad = "scores outside [0, 1]"
    elif task == "multiclass" and (out.min() < 0 or not np.allclose(out.sum(axis=1), 1.0, atol=1e-3)):
        bad = "rows that are not probability distributions"
    if bad:
        raise ModelCheckError("outputs", f"{where}: outputs on the reference sample do not fit a {task} model: {bad}")


def load_scorer(settings: Settings, name: str, version: str, features: list[str], task: str = "binary",
                outputs: int = 1, verify_reference: bool = True, int8_tolerance: float | None = None,
                max_score_s: float | None = None) -> Scorer:
    """Download, verify and warm up one pinned version of model ``name`` (its int8 copy, see above);
    ``max_score_s``: the longest a warm-up run over the reference sample may take."""
    where = f"{name} v{version}"
    mv = client(settings).get_model_version(name, version)
    tags = mv.tags or {}
    if tags.get("features", ",".join(features)).split(",") != features:
        raise ModelCheckError("signature", f"{where}: trained on {tags['features']}, serving {features}")
    if tags.get("task", task) != task:
        raise ModelCheckError("signature", f"{where}: a {tags['task']} model, declared {task}")
    try:
        path = Path(mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=ONNX_PATH))
    except (MlflowException, OSError):
        path = None
    blob = None
    if path is not None:
        blob = path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != tags.get("onnx_sha256"):
            raise ModelCheckError("checksum", f"{where}: the ONNX copy does not match its registered sha256")
        runtime, fn = "onnx", _onnx_fn(blob, len(features), where, outputs)
    else:
        runtime, fn = "torch", _torch_fn(f"models:/{name}/{version}", where, outputs, tags.get(TORCH_SHA256))
    scorer = Scorer(name, str(version), mv.run_id, features, runtime, fn, task)
    x = np.zeros((4, len(features)), np.float32)
    if verify_reference:
        try:
            ref = load_reference(settings, name, version)
            x = ref[features].astype("float64").fillna(0.0).to_numpy(np.float32)
        except (MlflowException, OSError, KeyError) as e:
            log.warning("%s: no usable reference sample (%s); verifying on zeros", where, e)
    for _ in range(3):  # the first runs also warm the runtime up
        t0 = time.perf_counter()
        try:
            out = scorer.score(x)
        except Exception as e:
            raise ModelCheckError("signature", f"{where}: scoring the reference sample failed: {e}") from e
        took = time.perf_counter() - t0
        if max_score_s is not None and took > max_score_s:
            raise ModelCheckError("latency", f"{where}: scoring its {len(x)}-row reference sample took {took:.1f}s "
                                             f"> {max_score_s:g}s (DRIFTLOOP_SERVING_MAX_SCORE_S)")
    check_outputs(out, len(x), task, outputs, where)
    if int8_tolerance is not None and blob is not None:
        scorer = _int8_or_fp32(scorer, blob, x, int8_tolerance, outputs)
        if scorer.runtime == "onnx-int8":
            check_outputs(scorer.score(x), len(x), task, outputs, where)
    return scorer
