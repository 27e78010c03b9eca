"""Serving's feature vectors (the online reader's ``read_matrix`` path on driftloop's stores, its generic
``online_read`` path, and the on-demand views computed through Feast's public API) equal Feast's own
``get_online_features`` over the model's feature service:
the ads example (string entity, a pandas on-demand view over request fields) and an integer-keyed repo
(a batch feature view, a python on-demand view reading request fields and a view feature)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from driftloop.bench.online import _fill
from driftloop.core.declarations import ModelSpec
from driftloop.core.frames import to_matrix
from driftloop.core.settings import Settings
from driftloop.features.repo import apply, init_repo
from driftloop.features.vectors import Vectorizer

INT_REPO = '''
from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, FileSource, RequestSource, ValueType
from feast.data_format import DeltaFormat
from feast.on_demand_feature_view import on_demand_feature_view
from feast.types import Float64, Int64

from driftloop.core.declarations import Model, OutcomeLabel, event_source

account = Entity(name="account", join_keys=["account_id"], value_type=ValueType.INT64)
payments = event_source("events.payments", "account_id int, amount double, merchant string")
refunds = event_source("events.refunds", "account_id int, payment_id string")
account_stats = FeatureView(
    name="account_stats", entities=[account], ttl=timedelta(days=1), online=True,
    schema=[Field(name="account_id", dtype=Int64), Field(name="balance", dtype=Float64),
            Field(name="payments_7d", dtype=Int64)],
    source=FileSource(name="account_stats_offline", path="account_stats", file_format=DeltaFormat(),
                      timestamp_field="event_timestamp"))
payment = RequestSource(name="payment", schema=[Field(name="amount", dtype=Float64)])


@on_demand_feature_view(sources=[account_stats, payment], mode="python",
                        schema=[Field(name="amount_share", dtype=Float64), Field(name="big", dtype=Float64)])
def payment_features(inputs: dict) -> dict:
    return {"amount_share": [a / (b + 1.0) if b is not None else -1.0
                             for a, b in zip(inputs["amount"], inputs["balance"])],
            "big": [1.0 if a > 100 else 0.0 for a in inputs["amount"]]}


fraud_v1 = FeatureService(name="fraud_v1", features=[account_stats[["payments_7d"]], payment_features])
fraud = Model(name="fraud", task="binary", metric="log_loss", source=payments, features=fraud_v1,
              label=OutcomeLabel(source=refunds, join_on="payment_id"))
'''


def feast_matrix(store, spec: ModelSpec, events: list[dict]) -> np.ndarray:
    """Feast's own online vectors for ``events`` (entity key and request fields), missing = 0."""
    rows = [{spec.key: ev[spec.key], **{f: ev[f] for f in spec.request_fields}} for ev in events]
    got = store.get_online_features(features=store.get_feature_service(spec.feature_service),
                                    entity_rows=rows).to_df()
    return to_matrix(got, spec.features)


def test_ads_vectors_equal_feast(tmp_path):
    init_repo(tmp_path / "repo", "ads")
    store, _plan, decls = apply(Settings(data_dir=tmp_path / "data", repo=tmp_path / "repo"))
    spec = decls.models["ctr"]
    rng = np.random.default_rng(3)
    _fill(store, 500, rng)
    users = ["u1", "u7", "u1", "nobody", "u499", "u0"]  # repeats and a user with no values
    events = [{"user_id": u, "position": int(rng.integers(1, 6)), "bid": float(rng.gamma(2.0, 0.6)),
               "device": ("mobile", "desktop", "tablet")[i % 3]} for i, u in enumerate(users)]
    vec = Vectorizer(store, spec)
    assert vec.reader.fast  # driftloop's store: one read_matrix call
    got = vec.matrix(events)
    assert got.shape == (6, len(spec.features)) and got.dtype == np.float32
    assert np.array_equal(got, feast_matrix(store, spec, events))
    online = [spec.features.index(f) for f in ("impressions_1m", "mean_bid_1m", "clicks_5m")]
    assert not got[3, online].any() and got[0, online].any()
    assert vec.matrix([]).shape == (0, len(spec.features))


def test_int_keys_batch_views_and_python_on_demand_views_equal_feast(tmp_path):
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "fraud.py").write_text(INT_REPO)
    store, _plan, decls = apply(Settings(data_dir=tmp_path / "data", repo=tmp_path / "repo"))
    spec = decls.models["fraud"]
    assert (spec.key, spec.key_type, spec.features) == ("account_id", "int", ["payments_7d", "amount_share", "big"])
    now = pd.Timestamp.now(tz="UTC")
    store.write_to_online_store("account_stats", pd.DataFrame({
        "account_id": [1, 2, 3], "balance": [10.0, 250.5, 0.0], "payments_7d": [4, 0, 9],
        "event_timestamp": [now] * 3, "created": [now] * 3}))
    events = [{"account_id": a, "amount": amt, "merchant": "m"} for a, amt in
              [(1, 5.0), (2, 300.0), (99, 120.0), (3, 1.5), (1, 0.0)]]  # account 99 has no values
    vec = Vectorizer(store, spec)
    got = vec.matrix(events)
    assert np.array_equal(got, feast_matrix(store, spec, events))
    # and by hand: payments_7d from the store, amount / (balance + 1) (-1 without a balance), amount > 100
    want = np.array([[4, 5 / 11, 0], [0, 300 / 251.5, 1], [0, -1, 1], [9, 1.5, 0], [4, 0, 0]], np.float32)
    assert np.allclose(got, want, atol=1e-6)
    # the reader read the on-demand view's input (balance) besides the service's own column
    assert set(vec.reader.columns) == {("account_stats", "payments_7d"), ("account_stats", "balance")}
    assert vec.reader.fast
    vec.reader.fast = False  # the store's online_read (the path of every other Feast online store) agrees
    assert np.array_equal(vec.matrix(events), got)


def test_to_matrix_orders_columns_and_fills_missing():
    df = pd.DataFrame({"b": [1, None], "a": [0.5, 2.0], "c": [True, False]})
    assert np.array_equal(to_matrix(df, ["a", "b", "c"]), np.array([[0.5, 1, 1], [2, 0, 0]], np.float32))
