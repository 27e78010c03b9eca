"""Ad click-through: Feast definitions and the ``ctr`` model declaration (a binary classifier).

Impressions are scored; a click on an impression within 5 s makes its label 1, else 0.
Topic names are logical; driftloop adds the configured prefix. Offline tables live in the data dir.
"""

from datetime import timedelta

import pandas as pd
from feast import Entity, FeatureService, Field, RequestSource, StreamFeatureView, ValueType
from feast.aggregation import Aggregation
from feast.on_demand_feature_view import on_demand_feature_view
from feast.types import Float64, Int64, String

from driftloop.core.declarations import DriftPolicy, Gate, Model, OutcomeLabel, RetrainPolicy, event_source

IMPRESSION = ("user_id string, ad_id string, campaign_id string, device string, country string, "
              "position int, bid double")
CLICK = "user_id string, impression_id string, ad_id string"

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING,
              description="The person an ad is shown to.")

impressions = event_source("events.impressions", IMPRESSION)
clicks = event_source("events.clicks", CLICK)

user_impressions = StreamFeatureView(
    name="user_impressions",
    entities=[user],
    ttl=timedelta(hours=1),
    source=event_source("events.impressions", IMPRESSION, "user_impressions"),
    timestamp_field="event_timestamp",
    aggregations=[
        Aggregation(column="bid", function="count", time_window=timedelta(minutes=1),
                    slide_interval=timedelta(seconds=10), name="impressions_1m"),
        Aggregation(column="bid", function="mean", time_window=timedelta(minutes=1),
                    slide_interval=timedelta(seconds=10), name="mean_bid_1m"),
    ],
    schema=[Field(name="user_id", dtype=String), Field(name="impressions_1m", dtype=Int64),
            Field(name="mean_bid_1m", dtype=Float64)],
    online=True,
)

user_clicks = StreamFeatureView(
    name="user_clicks",
    entities=[user],
    ttl=timedelta(hours=1),
    source=event_source("events.clicks", CLICK, "user_clicks"),
    timestamp_field="event_timestamp",
    aggregations=[
        Aggregation(column="impression_id", function="count", time_window=timedelta(minutes=5),
                    slide_interval=timedelta(seconds=30), name="clicks_5m"),
    ],
    schema=[Field(name="user_id", dtype=String), Field(name="clicks_5m", dtype=Int64)],
    online=True,
)

user_bid_stats = StreamFeatureView(
    name="user_bid_stats",
    entities=[user],
    ttl=timedelta(hours=1),
    source=event_source("events.impressions", IMPRESSION, "user_bid_stats"),
    timestamp_field="event_timestamp",
    aggregations=[
        Aggregation(column="bid", function="sum", time_window=timedelta(minutes=10),
                    slide_interval=timedelta(minutes=1), name="bid_sum_10m"),
        Aggregation(column="bid", function="min", time_window=timedelta(minutes=10),
                    slide_interval=timedelta(minutes=1), name="bid_min_10m"),
        Aggregation(column="bid", function="max", time_window=timedelta(minutes=10),
                    slide_interval=timedelta(minutes=1), name="bid_max_10m"),
    ],
    schema=[Field(name="user_id", dtype=String), Field(name="bid_sum_10m", dtype=Float64),
            Field(name="bid_min_10m", dtype=Float64), Field(name="bid_max_10m", dtype=Float64)],
    online=True,
)

ad_request = RequestSource(name="ad_request", schema=[Field(name="position", dtype=Int64),
                                                      Field(name="bid", dtype=Float64),
                                                      Field(name="device", dtype=String)])


@on_demand_feature_view(sources=[ad_request], mode="pandas",
                        schema=[Field(name="ad_position", dtype=Float64), Field(name="ad_bid", dtype=Float64),
                                Field(name="is_mobile", dtype=Float64), Field(name="is_tablet", dtype=Float64)])
def ad_request_features(inputs: pd.DataFrame) -> pd.DataFrame:
    """Request-time features of the scored impression."""
    return pd.DataFrame({"ad_position": inputs["position"].astype("float64"),
                         "ad_bid": inputs["bid"].astype("float64"),
                         "is_mobile": (inputs["device"] == "mobile").astype("float64"),
                         "is_tablet": (inputs["device"] == "tablet").astype("float64")}, index=inputs.index)


ctr_v1 = FeatureService(name="ctr_v1", features=[ad_request_features, user_impressions, user_clicks])

ctr = Model(
    name="ctr",
    task="binary",
    metric="log_loss",
    description="Probability that an impression is clicked within 5 s.",
    source=impressions,
    features=ctr_v1,
    label=OutcomeLabel(source=clicks, join_on="impression_id", window=timedelta(seconds=5)),
    generator="ads_generator:AdTraffic",
    gate=Gate(margin=0.001, slices=["is_mobile"]),
    # a click model's log loss over 1000 events is noisy, and its 5-minute features are still filling during
    # the first minutes of a fresh stack: a performance drop counts beyond 30 %
    drift=DriftPolicy(window=1000, share_threshold=0.8, persist_windows=2, performance_tolerance=0.3),
    retrain=RetrainPolicy(cooldown=timedelta(seconds=60), min_labels=2500),
)
