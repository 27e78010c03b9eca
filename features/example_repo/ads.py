"""Example feature definitions for the ad domain: plain Feast, copied into the feature repo.

The streams engine reads these StreamFeatureViews from the Feast registry and computes them on Faust.
Topic names are logical; driftloop adds the configured prefix. Offline paths are relative to the repo.
"""

from datetime import timedelta

from feast import Entity, FeatureService, Field, FileSource, KafkaSource, StreamFeatureView, ValueType
from feast.aggregation import Aggregation
from feast.data_format import DeltaFormat, JsonFormat
from feast.types import Float64, Int64, String

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING,
              description="The person an ad is shown to.")


def stream(topic: str, schema_json: str, view: str) -> KafkaSource:
    """A view's stream source: the Kafka topic the streams engine consumes, and as ``batch_source`` the
    Delta table it appends the view's rows to (what training sets and ``feast materialize`` read)."""
    return KafkaSource(
        name=f"{view}_stream",
        topic=topic,
        kafka_bootstrap_servers="embedded",
        timestamp_field="event_timestamp",
        message_format=JsonFormat(schema_json=schema_json),
        batch_source=FileSource(name=f"{view}_offline", path=f"../offline/{view}", file_format=DeltaFormat(),
                                timestamp_field="event_timestamp", created_timestamp_column="created"),
        watermark_delay_threshold=timedelta(seconds=5),
    )


IMPRESSION = "user_id string, bid double, position int, ts bigint"
CLICK = "user_id string, impression_id string, ts bigint"

user_impressions = StreamFeatureView(
    name="user_impressions",
    entities=[user],
    ttl=timedelta(hours=1),
    source=stream("events.impressions", IMPRESSION, "user_impressions"),
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
    source=stream("events.clicks", CLICK, "user_clicks"),
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
    source=stream("events.impressions", IMPRESSION, "user_bid_stats"),
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

ctr_features = FeatureService(name="ctr_v1", features=[user_impressions, user_clicks])
