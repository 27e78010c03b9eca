"""Gating a version outside a retrain: the champion's outputs on a holdout, and the checked manual moves
behind ``driftloop promote`` and ``driftloop rollback``.

A manual promotion passes the same gate as a retrained challenger (``retrain/gate.py``): against the
champion on the model's most recent labelled holdout, with the version's shadow results where serving
scored it as ``challenger``. A rollback skips the metric gate but not the artifact checks (checksum,
signature, outputs on its reference sample). Both are recorded in the alias ledger.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from confluent_kafka import Producer
from mlflow.exceptions import MlflowException

from driftloop.core.contracts import ModelPromoted
from driftloop.core.declarations import ModelSpec
from driftloop.core.frames import to_matrix
from driftloop.core.settings import Settings
from driftloop.features.training import training_set
from driftloop.registry.aliases import ROLLBACK, promote, rollback_target
from driftloop.registry.verify import ModelCheckError, load_scorer
from driftloop.registry.versions import CHAMPION, alias_version, client
from driftloop.retrain.data import HOLDOUT_SHARE, usable_labels
from driftloop.retrain.gate import GateResult, run_gate
from driftloop.retrain.shadow import shadow_result

log = logging.getLogger(__name__)


class RefusedError(Exception):
    """A manual promotion or rollback the checks refused; ``checks`` says which failed and why."""

    def __init__(self, message: str, checks: dict[str, str] | None = None):
        super().__init__(message)
        self.checks = checks or {}


def champion_outputs(settings: Settings, spec: ModelSpec, x: np.ndarray,
                     exclude: str | None = None) -> tuple[str | None, np.ndarray | None, str]:
    """(champion version, its outputs on ``x``, why it has none): a champion that cannot score these inputs
    (e.g. trained on features no longer declared) counts as none."""
    version = alias_version(settings, spec.name, CHAMPION)
    if version is None or version == exclude:
        return None, None, ""
    try:
        champ = load_scorer(settings, spec.name, version, list(spec.features), spec.task, spec.n_outputs,
                            verify_reference=False)
        return version, champ.score(x), ""
    except (ModelCheckError, MlflowException) as e:
        note = f"champion v{version} cannot score this holdout: {e}"
        log.warning("%s: %s; the challenger is gated against nothing", spec.name, note)
        return None, None, note


def recent_holdout(settings: Settings, spec: ModelSpec, share: float = HOLDOUT_SHARE) -> pd.DataFrame:
    """The model's most recent labelled rows (the newest ``share`` of its training window), as a retrain's
    holdout would be."""
    df = usable_labels(training_set(settings, spec, None, spec.train_max_rows)[0], spec)
    return df.iloc[int(len(df) * (1 - share)):].reset_index(drop=True)


def _checked(settings: Settings, spec: ModelSpec, version: str, what: str) -> np.ndarray:
    """Artifact checks of ``version``: it loads, its checksum and signature match, and its outputs on its
    reference sample fit the task; raises RefusedError naming the failed check."""
    try:
        return load_scorer(settings, spec.name, version, list(spec.features), spec.task, spec.n_outputs)
    except ModelCheckError as e:
        raise RefusedError(f"{what} refused: {e}", {e.check: str(e)}) from e
    except MlflowException as e:
        raise RefusedError(f"{what} refused: {spec.name} has no version {version}: {e.message}",
                           {"version": e.message}) from e


def gate_version(settings: Settings, spec: ModelSpec, version: str) -> GateResult:
    """The gate of an already registered ``version`` against the champion on the most recent holdout."""
    scorer = _checked(settings, spec, version, f"promoting {spec.name} v{version}")
    hold = recent_holdout(settings, spec)
    if hold.empty:
        raise RefusedError(f"promoting {spec.name} v{version} refused: no labelled events to gate it on",
                           {"labels": "no labelled events"})
    x = to_matrix(hold, list(spec.features))
    champ_version, champ_out, _ = champion_outputs(settings, spec, x, exclude=version)
    shadow = None
    if champ_version is not None:
        created_us = int(client(settings).get_model_version(spec.name, version).creation_timestamp) * 1000
        shadow = shadow_result(settings, spec, version, champ_version, created_us)
    return run_gate(spec, hold, scorer.score(x), champ_out, champion_version=champ_version, shadow=shadow)


def promote_checked(settings: Settings, producer: Producer, spec: ModelSpec, version: str, *, reason: str,
                    actor: str) -> ModelPromoted:
    """``driftloop promote``: gate ``version`` like a retrained challenger, then move ``champion``."""
    if alias_version(settings, spec.name, CHAMPION) == str(version):
        raise RefusedError(f"{spec.name} v{version} is already the champion")
    gate = gate_version(settings, spec, version)
    if not gate.passed:
        raise RefusedError(f"promoting {spec.name} v{version} refused by the gate", gate.failed)
    return promote(settings, producer, spec.name, str(version), reason=f"manual: {reason}", actor=actor,
                   metrics=gate.metrics)


def rollback_checked(settings: Settings, producer: Producer, spec: ModelSpec, *, to: str | None = None,
                     reason: str = "", actor: str) -> ModelPromoted:
    """``driftloop rollback``: move ``champion`` back (to the version it replaced, or ``to``) after the
    artifact checks; the metric gate is skipped."""
    current, target = rollback_target(settings, spec.name) if to is None else (
        alias_version(settings, spec.name, CHAMPION), str(to))
    if current == target:
        raise RefusedError(f"{spec.name} v{target} is already the champion")
    _checked(settings, spec, target, f"rolling {spec.name} back to v{target}")
    return promote(settings, producer, spec.name, target, reason=f"{ROLLBACK}: {reason or 'manual rollback'}",
                   actor=actor)
