"""Frames to model inputs (no Feast here: Ray Train workers import this)."""

from __future__ import annotations

import numpy as np
import pandas as pd


def to_matrix(df: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """Float32 matrix of ``columns`` in order; missing values (no history) become 0."""
    return df[columns].astype("float64").fillna(0.0).to_numpy(np.float32)
