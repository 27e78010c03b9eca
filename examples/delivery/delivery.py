"""Delivery time: Feast definitions and the ``eta`` model declaration (a regression model).

Orders are scored with the minutes their delivery will take; the delivery event that follows an order
(joined by its ``order_id``, within 30 s) carries the real minutes, the label. Couriers are identified
by an integer id. Topic names are logical; driftloop adds the configured prefix.
"""

from datetime import timedelta

import pandas as pd
from feast import Entity, FeatureService, Field, RequestSource, StreamFeatureView, ValueType
from feast.aggregation import Aggregation
from feast.on_demand_feature_view import on_demand_feature_view
from feast.types import Float64, Int64

from driftloop.core.declarations import DriftPolicy, Gate, Model, OutcomeLabel, RetrainPolicy, event_source

ORDER = "courier_id int, zone string, distance_km double, items int, hour int"
DELIVERY = "courier_id int, order_id string, minutes double"

courier = Entity(name="courier", join_keys=["courier_id"], value_type=ValueType.INT64,
                 description="The courier an order is assigned to.")

orders = event_source("events.orders", ORDER)
deliveries = event_source("events.deliveries", DELIVERY)

courier_orders = StreamFeatureView(
    name="courier_orders",
    entities=[courier],
    ttl=timedelta(hours=1),
    source=event_source("events.orders", ORDER, "courier_orders"),
    timestamp_field="event_timestamp",
    aggregations=[
        Aggregation(column="distance_km", function="count", time_window=timedelta(seconds=20),
                    slide_interval=timedelta(seconds=5), name="orders_20s"),
        Aggregation(column="distance_km", function="mean", time_window=timedelta(minutes=2),
                    slide_interval=timedelta(seconds=10), name="mean_distance_2m"),
    ],
    schema=[Field(name="courier_id", dtype=Int64), Field(name="orders_20s", dtype=Int64),
            Field(name="mean_distance_2m", dtype=Float64)],
    online=True,
)

courier_deliveries = StreamFeatureView(
    name="courier_deliveries",
    entities=[courier],
    ttl=timedelta(hours=1),
    source=event_source("events.deliveries", DELIVERY, "courier_deliveries"),
    timestamp_field="event_timestamp",
    aggregations=[
        Aggregation(column="minutes", function="mean", time_window=timedelta(minutes=5),
                    slide_interval=timedelta(seconds=30), name="mean_minutes_5m"),
        Aggregation(column="minutes", function="max", time_window=timedelta(seconds=20),
                    slide_interval=timedelta(seconds=5), name="max_minutes_20s"),
    ],
    schema=[Field(name="courier_id", dtype=Int64), Field(name="mean_minutes_5m", dtype=Float64),
            Field(name="max_minutes_20s", dtype=Float64)],
    online=True,
)

order_request = RequestSource(name="order_request", schema=[Field(name="distance_km", dtype=Float64),
                                                            Field(name="items", dtype=Int64),
                                                            Field(name="hour", dtype=Int64)])


@on_demand_feature_view(sources=[order_request], mode="pandas",
                        schema=[Field(name="order_distance_km", dtype=Float64),
                                Field(name="order_items", dtype=Float64), Field(name="is_peak", dtype=Float64)])
def order_features(inputs: pd.DataFrame) -> pd.DataFrame:
    """Request-time features of the scored order (Feast stores this function by value: keep what it uses inside)."""
    peak_hours = (11, 12, 13, 18, 19, 20)
    return pd.DataFrame({"order_distance_km": inputs["distance_km"].astype("float64"),
                         "order_items": inputs["items"].astype("float64"),
                         "is_peak": inputs["hour"].isin(peak_hours).astype("float64")}, index=inputs.index)


eta_v1 = FeatureService(name="eta_v1", features=[order_features, courier_orders, courier_deliveries])

eta = Model(
    name="eta",
    task="regression",
    metric="mae",
    description="Minutes from order to delivery.",
    source=orders,
    features=eta_v1,
    label=OutcomeLabel(source=deliveries, join_on="order_id", value_field="minutes",
                       window=timedelta(seconds=30)),
    generator="delivery_generator:DeliveryTraffic",
    gate=Gate(margin=0.05, slices=["is_peak"], slice_tolerance=0.1),
    drift=DriftPolicy(window=1000, share_threshold=0.75, persist_windows=3, performance_tolerance=0.3),
    retrain=RetrainPolicy(cooldown=timedelta(seconds=60), min_labels=2500),
)
