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


def request_frame(imps: pd.DataFrame) -> pd.DataFrame:
    """REQUEST_FEATURES (float64) from impression columns ``position``, ``bid``, ``device``."""
    device = imps["device"]
    return pd.DataFrame({"position": imps["position"].astype("float64"), "bid": imps["bid"].astype("float64"),
                         "is_mobile": (device == "mobile").astype("float64"),
                         "is_tablet": (device == "tablet").astype("float64")}, index=imps.index)


def request_matrix(impressions: Iterable[Mapping[str, Any]]) -> np.ndarray:
    """REQUEST_FEATURES of each impression as a float32 matrix (serving's batch form of the above)."""
    df = pd.DataFrame(list(impressions), columns=["position", "bid", "device"])
    return request_frame(df).to_numpy(np.float32).reshape(-1, len(REQUEST_FEATURES))


def to_matrix(df: pd.DataFrame) -> np.ndarray:
    """Float32 matrix in FEATURE_COLUMNS order; missing online values (no history) become 0."""
    return df[FEATURE_COLUMNS].astype("float64").fillna(0.0).to_numpy(np.float32)
