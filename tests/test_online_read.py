"""Serving's online reader (sqlite fast path) returns what Feast's ``get_online_features`` returns."""

from __future__ import annotations

import numpy as np

from driftloop.bench.online import _fill
from driftloop.features.online_read import OnlineReader
from driftloop.features.repo import apply
from driftloop.features.vectors import FEATURE_SERVICE, ONLINE_FEATURES
from driftloop.core.settings import Settings


def feast_matrix(store, users: list[str]) -> np.ndarray:
    got = store.get_online_features(features=store.get_feature_service(FEATURE_SERVICE),
                                    entity_rows=[{"user_id": u} for u in users]).to_df()
    return got[ONLINE_FEATURES].astype("float64").fillna(0.0).to_numpy(np.float32)


def test_reader_equals_feast(tmp_path):
    store = apply(Settings(data_dir=tmp_path))
    _fill(store, 500, np.random.default_rng(3))
    reader = OnlineReader(store, FEATURE_SERVICE, ONLINE_FEATURES, "user_id")
    assert reader.sqlite is not None
    users = ["u1", "u7", "u1", "nobody", "u499", "u0"]  # repeats and a user with no values
    got = reader.matrix(users)
    assert got.shape == (6, len(ONLINE_FEATURES)) and not got[3].any()
    assert np.array_equal(got, feast_matrix(store, users))
    assert reader.matrix([]).shape == (0, len(ONLINE_FEATURES))
