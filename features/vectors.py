"""The model's input vector: request features from the impression + online features of ``ctr_v1``.

Serving and training both build vectors here, so what the model sees online is what it trained on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

FEATURE_SERVICE = "ctr_v1"
REQUEST_FEATURES = ["position", "bid", "is_mobile", "is_tablet"]
ONLINE_FEATURES = ["impressions_1m", "mean_bid_1m", "clicks_5m"]
FEATURE_COLUMNS = REQUEST_FEATURES + ONLINE_FEATURES


def request_features(imp: Mapping[str, Any]) -> dict[str, float]:
    return {
        "position": float(imp["position"]),
        "bid": float(imp["bid"]),
        "is_mobile": 1.0 if imp["device"] == "mobile" else 0.0,
        "is_tablet": 1.0 if imp["device"] == "tablet" else 0.0,
    }


def request_matrix(impressions: Iterable[Mapping[str, Any]]) -> np.ndarray:
    """REQUEST_FEATURES of each impression as a float32 matrix (serving's batch form of the above)."""
    return np.array([[f[c] for c in REQUEST_FEATURES] for f in map(request_features, impressions)],
                    np.float32).reshape(-1, len(REQUEST_FEATURES))


def to_matrix(df: pd.DataFrame) -> np.ndarray:
    """Float32 matrix in FEATURE_COLUMNS order; missing online values (no history) become 0."""
    return df[FEATURE_COLUMNS].astype("float64").fillna(0.0).to_numpy(np.float32)
