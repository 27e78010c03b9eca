"""Model declarations: what a data scientist writes next to the Feast definitions of a feature repo.

A repo module declares models at module level, like Feast objects::

    from driftloop.core.declarations import Model, OutcomeLabel

    churn = Model(name="churn", task="binary", metric="auc", source=sessions_source,
                  features=churn_features, label=OutcomeLabel(source=cancellations_source, join_on="session_id",
                                                              window=timedelta(days=30)))

``driftloop apply`` collects them (``features/declare_apply.py``), checks them against the Feast objects and
writes the resolved form, a :class:`Declarations` snapshot (topics with their schemas, models with
their feature lists), to ``<data_dir>/declarations.json``; every worker reads that snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

Task = Literal["binary", "multiclass", "regression"]

# primary metric -> (tasks it fits, higher is better)
METRICS: dict[str, tuple[tuple[str, ...], bool]] = {
    "log_loss": (("binary", "multiclass"), False),
    "auc": (("binary",), True),
    "accuracy": (("binary", "multiclass"), True),
    "brier": (("binary",), False),
    "rmse": (("regression",), False),
    "mae": (("regression",), False),
    "r2": (("regression",), True),
}

# event schema types (the DDL words a source's ``JsonFormat(schema_json=...)`` may use) -> canonical type
SCHEMA_TYPES = {"string": "string", "str": "string", "double": "double", "float": "double",
                "int": "int", "integer": "int", "bigint": "int", "long": "int", "boolean": "bool", "bool": "bool"}
ENVELOPE = ("event_id", "ts", "schema_version")  # every event carries these; a schema need not list them
SCHEMA_VERSION_TAG = "driftloop.schema_version"


def parse_schema(ddl: str) -> dict[str, str]:
    """``"account_id string, amount double"`` → ``{"account_id": "string", "amount": "double"}``; envelope
    fields dropped."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in ddl.split(",")):
        if not part:
            continue
        words = part.split()
        if len(words) != 2 or words[1].lower() not in SCHEMA_TYPES:
            raise ValueError(f"schema field {part!r}: write 'name type' with type one of "
                             f"{sorted(set(SCHEMA_TYPES))}")
        if words[0] in out:
            raise ValueError(f"schema field {words[0]!r} is declared twice")
        if words[0] not in ENVELOPE:
            out[words[0]] = SCHEMA_TYPES[words[1].lower()]
    return out


# --- what users write ------------------------------------------------------------------------------

@dataclass
class OutcomeLabel:
    """The label comes from an outcome topic joined to the scored event by an id field within a window.

    Binary: positive when an outcome arrives within ``window`` of the scored event, negative once the
    window closed. Regression / multiclass: the outcome's ``value_field``; no outcome, no label."""

    source: Any  # Feast KafkaSource of the outcome topic
    join_on: str  # the outcome's field holding the scored event's event_id
    window: timedelta = timedelta(seconds=5)
    value_field: str | None = None


@dataclass
class FieldLabel:
    """The label is a field of records on a labels topic, each naming the scored event it labels."""

    source: Any  # Feast KafkaSource of the labels topic
    event_id_field: str  # the field holding the scored event's event_id
    value_field: str = "label"


@dataclass
class Gate:
    margin: float = 0.001  # the challenger must beat the champion on the primary metric by this much
    slices: list[str] = field(default_factory=list)  # feature columns whose slices may not get worse
    slice_tolerance: float = 0.05  # relative: a slice's metric may be at most this much worse than the champion's
    slice_min_rows: int = 50  # slices with fewer holdout rows are not judged
    calibration_tolerance: float = 0.1  # binary/multiclass: expected calibration error; regression: |mean bias|/std
    shadow_min_rows: int = 200  # labelled shadow predictions before live (shadow) results count in the gate


# drift methods by column kind; "auto" picks by window size (see DriftPolicy)
AUTO_LARGE_REFERENCE = 1000
DRIFT_METHODS = {"wasserstein": "numeric", "psi": "numeric", "ks": "numeric",
                 "jensenshannon": "categorical", "chisquare": "categorical"}


@dataclass
class DriftPolicy:
    window: int = 1500  # predictions per window (a window closes at this count ...)
    window_time: timedelta | None = timedelta(minutes=5)  # ... or after this much event time, whichever first
    min_rows: int = 200  # a window closed by time is checked only with at least this many predictions
    share_threshold: float = 0.5  # drifted-column share that makes a window drifted
    persist_windows: int = 2  # consecutive breached windows that start a drift episode (one retrain request)
    recover_windows: int = 3  # consecutive healthy windows that end it
    performance_tolerance: float = 0.1  # relative drop of the primary metric that triggers on its own
    methods: dict[str, str] = field(default_factory=dict)  # column -> one of DRIFT_METHODS (per-column override)
    categorical: list[str] = field(default_factory=list)  # columns compared as categories (besides auto-detected)
    # "auto" (Evidently's rule): a reference sample of more than 1000 rows uses Wasserstein (numeric) and
    # Jensen-Shannon (categorical) distances, a smaller one the KS and chi-square tests
    numeric_method: str = "auto"
    categorical_method: str = "auto"


@dataclass
class ServingPolicy:
    # serve an int8 dynamically quantized ONNX copy when its outputs on the version's reference sample
    # stay within this absolute tolerance of the fp32 model's (None: serve fp32)
    int8_tolerance: float | None = None


@dataclass
class RetrainPolicy:
    cooldown: timedelta = timedelta(minutes=2)
    budget_per_day: int = 24
    compute_budget_s: float | None = None  # training compute seconds per day; None = DRIFTLOOP_TRAIN_BUDGET_S
    min_labels: int = 3000  # labelled events before the first champion (and a retrain) trains
    max_rows: int = 20000
    epochs: int = 40


@dataclass
class Model:
    """One model: what it scores, with which features, how it is labelled and trained."""

    name: str
    task: str
    metric: str
    source: Any  # Feast KafkaSource of the scored topic (its JsonFormat schema_json is the event schema)
    features: Any  # Feast FeatureService
    label: OutcomeLabel | FieldLabel
    trainer: str | None = None  # "module:function" in the repo; None = the built-in trainer for the task
    classes: list[str] = field(default_factory=list)  # multiclass: the label values, in output order
    description: str = ""
    generator: str | None = None  # "module:Class" in the repo making test traffic (driftloop produce, demo)
    gate: Gate = field(default_factory=Gate)
    drift: DriftPolicy = field(default_factory=DriftPolicy)
    retrain: RetrainPolicy = field(default_factory=RetrainPolicy)
    serving: ServingPolicy = field(default_factory=ServingPolicy)


# --- the resolved form every worker reads ----------------------------------------------------------

class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TopicSpec(_Spec):
    """A declared event topic: its schema (field → type), accepted schema version and message key."""

    name: str  # logical topic name (the configured prefix is added)
    fields: dict[str, str]
    version: int = 1
    key: str  # the field the topic is keyed (partitioned) by
    key_type: str = "string"
    lateness_s: float = 5.0


class LabelSpec(_Spec):
    kind: Literal["outcome", "field"]
    topic: str
    id_field: str  # outcome: the join field; field: the scored event id field
    value_field: str | None = None
    window_s: float = 5.0


class ModelSpec(_Spec):
    name: str
    task: Task
    metric: str
    higher_is_better: bool
    topic: str  # scored topic (logical)
    key: str  # entity join key = the scored topic's key
    key_type: str = "string"
    feature_service: str
    features: list[str]  # model input columns, in order
    request_fields: list[str] = Field(default_factory=list)  # event fields the on-demand views read
    label: LabelSpec
    trainer: str | None = None
    classes: list[str] = Field(default_factory=list)
    description: str = ""
    generator: str | None = None
    gate_margin: float = 0.001
    slices: list[str] = Field(default_factory=list)
    slice_tolerance: float = 0.05
    slice_min_rows: int = 50
    calibration_tolerance: float = 0.1
    shadow_min_rows: int = 200
    drift_window: int = 1500
    drift_share_threshold: float = 0.5
    drift_persist_windows: int = 2
    drift_window_s: float | None = 300.0
    drift_min_rows: int = 200
    drift_recover_windows: int = 3
    drift_methods: dict[str, str] = Field(default_factory=dict)
    drift_categorical: list[str] = Field(default_factory=list)
    drift_numeric_method: str = "auto"
    drift_categorical_method: str = "auto"
    performance_tolerance: float = 0.1
    retrain_cooldown_s: float = 120.0
    retrain_budget_per_day: int = 24
    train_budget_s: float | None = None  # training compute seconds per day (None: the setting, or no quota)
    min_labels: int = 3000
    train_max_rows: int = 20000
    epochs: int = 40
    int8_tolerance: float | None = Field(None, gt=0)
    source_file: str = ""

    @property
    def n_outputs(self) -> int:
        return len(self.classes) if self.task == "multiclass" else 1

    def drift_method(self, kind: str, reference_rows: int) -> str:
        """The declared default method for ``kind`` ("numeric" | "categorical"); "auto" by the reference
        sample's size, as Evidently decides: Wasserstein / Jensen-Shannon above 1000 rows, KS / chi-square
        tests at or below."""
        method = self.drift_numeric_method if kind == "numeric" else self.drift_categorical_method
        if method != "auto":
            return method
        large = reference_rows > AUTO_LARGE_REFERENCE
        if kind == "numeric":
            return "wasserstein" if large else "ks"
        return "jensenshannon" if large else "chisquare"


class Declarations(_Spec):
    """Everything ``driftloop apply`` resolved: declared topics and models."""

    topics: dict[str, TopicSpec] = Field(default_factory=dict)
    models: dict[str, ModelSpec] = Field(default_factory=dict)
    repo: str = ""

    def model(self, name: str) -> ModelSpec:
        try:
            return self.models[name]
        except KeyError:
            raise KeyError(f"unknown model {name!r}; declared: {sorted(self.models) or 'none'}") from None

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)

    @classmethod
    def load(cls, path: Path) -> Declarations:
        """The snapshot at ``path``; an empty one when nothing was applied yet."""
        if not path.exists():
            return cls()
        return cls.model_validate(orjson.loads(path.read_bytes()))

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(self.to_json())
        tmp.replace(path)


def event_source(topic: str, schema: str, table: str | None = None, *, name: str | None = None, version: int = 1,
                 lateness: timedelta = timedelta(seconds=5)) -> Any:
    """A Feast ``KafkaSource`` for a declared event topic.

    ``schema`` (``"field type, ..."``; types string, double, int, bool) is the topic's one event schema
    and ``version`` the ``schema_version`` its events carry; give every source of a topic the same two.
    ``table`` is the Delta table the streams worker writes from it (a stream feature view's name for the
    view's source; default the topic's raw-event table ``bronze_<last part of the topic>``), relative to
    the data directory's ``offline`` folder; ``lateness`` is the watermark delay."""
    from feast import FileSource, KafkaSource  # noqa: PLC0415 - keep this module light for the workers
    from feast.data_format import DeltaFormat, JsonFormat  # noqa: PLC0415

    parse_schema(schema)  # fail where it is declared
    table = table or bronze_table(topic)
    return KafkaSource(
        name=name or f"{table}_source", topic=topic, kafka_bootstrap_servers="driftloop",
        timestamp_field="event_timestamp", message_format=JsonFormat(schema_json=schema),
        batch_source=FileSource(name=f"{table}_offline", path=table, file_format=DeltaFormat(),
                                timestamp_field="event_timestamp", created_timestamp_column="created"),
        watermark_delay_threshold=lateness, tags={SCHEMA_VERSION_TAG: str(version)})


def bronze_table(topic: str) -> str:
    """The Delta table of a topic's accepted raw events."""
    return f"bronze_{topic.split('.')[-1]}"
