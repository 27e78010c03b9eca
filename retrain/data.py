"""A retrain's data: the labels that fit the task, split in time order."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from driftloop.core.declarations import ModelSpec

log = logging.getLogger(__name__)

HOLDOUT_SHARE = 0.2
VALID_SHARE = 0.1  # of the rows before the holdout
MIN_ROWS = 200
SEED = 0


def split(df: pd.DataFrame, seed: int = SEED) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(train, valid, holdout) of a frame ordered oldest first: the newest 20 % hold out, a seeded 10 %
    of the rest validates."""
    cut = int(len(df) * (1 - HOLDOUT_SHARE))
    rest, hold = df.iloc[:cut], df.iloc[cut:]
    valid_idx = rest.sample(frac=VALID_SHARE, random_state=seed).index
    return rest.drop(index=valid_idx), rest.loc[valid_idx], hold


def usable_labels(df: pd.DataFrame, spec: ModelSpec) -> pd.DataFrame:
    """The rows whose label fits the task (finite; binary 0/1; multiclass a class index)."""
    y = pd.to_numeric(df["label"], errors="coerce")
    ok = np.isfinite(y)
    if spec.task == "binary":
        ok &= y.isin([0.0, 1.0])
    elif spec.task == "multiclass":
        ok &= (y == y.round()) & (y >= 0) & (y < spec.n_outputs)
    if not ok.all():
        log.warning("%s: %d rows with labels that do not fit a %s model dropped", spec.name, int((~ok).sum()),
                    spec.task)
    return df[ok].assign(label=y[ok].astype("float64"))
