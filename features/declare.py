"""Resolve a repo's model declarations against its Feast objects, finding every problem before anything is written.

The result (:class:`~driftloop.core.declarations.Declarations`) names, per declared event topic, its one
schema, schema version and key, and per model its scored topic, key, feature columns (in the feature
service's order), request fields and label rule. Each problem is one line naming the file and object.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
from feast import FeatureService, FeatureView, KafkaSource, OnDemandFeatureView, ValueType
from feast.stream_feature_view import StreamFeatureView

from driftloop.core.declarations import (
    DRIFT_METHODS,
    METRICS,
    SCHEMA_VERSION_TAG,
    Declarations,
    FieldLabel,
    LabelSpec,
    Model,
    ModelSpec,
    OutcomeLabel,
    TopicSpec,
    parse_schema,
)
from driftloop.features.repo import RepoError, RepoObjects, on_path

NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]{0,63}$")
KEY_TYPES = {ValueType.STRING: "string", ValueType.INT64: "int", ValueType.INT32: "int"}
# Feast value types a request field may have, by the event schema type that feeds it
FEAST_FITS = {"string": {ValueType.STRING}, "int": {ValueType.INT64, ValueType.INT32, ValueType.FLOAT,
                                                    ValueType.DOUBLE},
              "double": {ValueType.DOUBLE, ValueType.FLOAT}, "bool": {ValueType.BOOL}}


def _topic_of(source: Any) -> TopicSpec | str:
    """A KafkaSource's topic spec (key filled in later), or the problem with it."""
    if not isinstance(source, KafkaSource):
        return f"expected a Feast KafkaSource (driftloop.core.declarations.event_source), got {type(source).__name__}"
    fmt = source.kafka_options.message_format
    schema_json = getattr(fmt, "schema_json", None)
    if not schema_json:
        return f"source {source.name!r}: give the event schema as JsonFormat(schema_json='field type, ...')"
    try:
        fields = parse_schema(schema_json)
        version = int((source.tags or {}).get(SCHEMA_VERSION_TAG, "1"))
    except ValueError as e:
        return f"source {source.name!r}: {e}"
    lateness = source.kafka_options.watermark_delay_threshold
    return TopicSpec(name=source.kafka_options.topic, fields=fields, version=version, key="",
                     lateness_s=lateness.total_seconds() if lateness else 0.0)


class _Resolver:
    def __init__(self, objs: RepoObjects, repo: Path):
        self.objs = objs
        self.repo = repo
        self.problems: list[str] = []
        self.topics: dict[str, TopicSpec] = {}
        self.topic_owner: dict[str, tuple[Any, str, str]] = {}  # topic → (object, kind, source) that first declared it
        self.keys: dict[str, tuple[str, str, str]] = {}  # topic → (key, key type, who said so)
        views = [o for o in objs.feast if isinstance(o, (FeatureView, OnDemandFeatureView))]
        self.views: dict[str, Any] = {v.name: v for v in views}

    def duplicates(self) -> None:
        """Two different Feast objects of one kind and name (e.g. two examples' files defining the same view)."""
        seen: dict[tuple[str, str], Any] = {}
        for o in self.objs.feast:
            k = (type(o).__name__, getattr(o, "name", "?"))
            if k in seen and seen[k] != o:
                self.problem(o, k[0], f"also defined, differently, in {self.objs.where(seen[k])}: names of one kind "
                                      "must be unique in a repo")
            seen.setdefault(k, o)

    def problem(self, obj: Any, kind: str, text: str) -> None:
        self.problems.append(f"{self.objs.where(obj)}: {kind} {getattr(obj, 'name', '?')}: {text}")

    def topic(self, source: Any, obj: Any, kind: str) -> TopicSpec | None:
        spec = _topic_of(source)
        if isinstance(spec, str):
            self.problem(obj, kind, spec)
            return None
        have = self.topics.get(spec.name)
        if have is None:
            self.topics[spec.name] = spec
            self.topic_owner[spec.name] = (obj, kind, source.name)
        elif (have.fields, have.version) != (spec.fields, spec.version):
            self.problem(obj, kind, f"source {source.name!r} declares topic {spec.name} with another schema or "
                                    f"version than source {self.topic_owner[spec.name][2]!r}: one schema per topic")
            return None
        return self.topics[spec.name]

    def key(self, topic: TopicSpec, key: str, key_type: str, who: str, obj: Any, kind: str) -> bool:
        if key not in topic.fields:
            self.problem(obj, kind, f"{topic.name} is keyed by {key!r} ({who}) but its schema has no such field "
                                    f"(fields: {', '.join(topic.fields)})")
            return False
        if topic.fields[key] != key_type:
            self.problem(obj, kind, f"{topic.name} field {key!r} is {topic.fields[key]} but {who} makes it a "
                                    f"{key_type} key")
            return False
        have = self.keys.setdefault(topic.name, (key, key_type, who))
        if have[0] != key:
            self.problem(obj, kind, f"{topic.name} would be keyed by {key!r} ({who}) and by {have[0]!r} ({have[2]}):"
                                    " a topic has one key, the entity its events are partitioned by")
            return False
        return True

    def entity_key(self, view: Any) -> tuple[str, str] | None:
        cols = view.entity_columns
        if len(cols) != 1:
            self.problem(view, type(view).__name__, "exactly one entity join key is supported")
            return None
        vt = cols[0].dtype.to_value_type()
        if vt not in KEY_TYPES:
            self.problem(view, type(view).__name__, f"entity key {cols[0].name!r} must be a string or integer")
            return None
        return cols[0].name, KEY_TYPES[vt]

    # --- stream views ---------------------------------------------------------------------------

    def on_demand_views(self) -> None:
        """Each on-demand view must run as Feast stores it: its function is kept by value in the registry, so a
        module-level name it reads is gone there. Run the stored copy once on a one-row sample."""
        samples = {ValueType.STRING: "a", ValueType.INT64: 1, ValueType.INT32: 1, ValueType.DOUBLE: 1.0,
                   ValueType.FLOAT: 1.0, ValueType.BOOL: True}
        for v in self.views.values():
            if not isinstance(v, OnDemandFeatureView):
                continue
            row = {f: [samples.get(t, 1.0)] for f, t in v.get_request_data_schema().items()}
            for proj in v.source_feature_view_projections.values():
                row.update({f.name: [1.0] for f in proj.features})
            try:
                OnDemandFeatureView.from_proto(v.to_proto()).transform_arrow(pa.table(row))
            except Exception as e:
                self.problem(v, "OnDemandFeatureView", f"does not run as Feast stores it ({type(e).__name__}: {e}); "
                                                       "its function is stored by value: define or import what it "
                                                       "uses inside the function")

    def stream_views(self) -> None:
        for v in self.views.values():
            if not isinstance(v, StreamFeatureView):
                continue
            t = self.topic(v.stream_source, v, "StreamFeatureView")
            ek = self.entity_key(v)
            if t is not None and ek is not None:
                self.key(t, ek[0], ek[1], f"the entity of view {v.name}", v, "StreamFeatureView")

    # --- models ---------------------------------------------------------------------------------

    def model(self, m: Model) -> ModelSpec | None:
        k = "Model"
        n = len(self.problems)
        if not isinstance(m.name, str) or not NAME.match(m.name):
            self.problem(m, k, "name must start with a letter and use letters, digits, '_' or '-' (64 at most)")
        if m.task not in ("binary", "multiclass", "regression"):
            self.problem(m, k, f"task {m.task!r} is not binary, multiclass or regression")
        elif m.metric not in METRICS or m.task not in METRICS[m.metric][0]:
            fits = [x for x, (tasks, _) in METRICS.items() if m.task in tasks]
            self.problem(m, k, f"metric {m.metric!r} does not fit task {m.task} (use one of {', '.join(fits)})")
        if m.task == "multiclass" and len(m.classes) < 2:
            self.problem(m, k, "a multiclass model needs classes=[...] (at least two label values)")
        if m.task != "multiclass" and m.classes:
            self.problem(m, k, f"classes are for multiclass models, not {m.task}")
        scored = self.topic(m.source, m, k)
        features, key, request = self.features(m)
        if scored is not None and key is not None:
            self.key(scored, key[0], key[1], f"the entity of model {m.name}", m, k)
            for f, vt in request.items():
                if f not in scored.fields:
                    self.problem(m, k, f"request feature {f!r} is not a field of {scored.name} "
                                       f"(fields: {', '.join(scored.fields)})")
                elif vt not in FEAST_FITS[scored.fields[f]]:
                    self.problem(m, k, f"request feature {f!r} is {vt.name} but {scored.name} declares it "
                                       f"{scored.fields[f]}")
        label = self.label(m, scored, key)
        for s in m.gate.slices:
            if s not in features:
                self.problem(m, k, f"gate slice {s!r} is not one of the model's features")
        for what, ref in (("trainer", m.trainer), ("generator", m.generator)):
            if ref:
                self.importable(m, what, ref)
        self.drift_policy(m, k, features)
        if len(self.problems) > n or scored is None or key is None or label is None:
            return None
        d, r = m.drift, m.retrain
        try:
            return ModelSpec(
                name=m.name, task=m.task, metric=m.metric, higher_is_better=METRICS[m.metric][1],  # type: ignore
                topic=scored.name, key=key[0], key_type=key[1], feature_service=m.features.name,
                features=features, request_fields=sorted(request), label=label, trainer=m.trainer,
                classes=[str(c) for c in m.classes], description=m.description, generator=m.generator,
                gate_margin=m.gate.margin, slices=list(m.gate.slices), slice_tolerance=m.gate.slice_tolerance,
                slice_min_rows=m.gate.slice_min_rows, calibration_tolerance=m.gate.calibration_tolerance,
                shadow_min_rows=m.gate.shadow_min_rows,
                drift_window=d.window, drift_share_threshold=d.share_threshold,
                drift_persist_windows=d.persist_windows, performance_tolerance=d.performance_tolerance,
                drift_window_s=d.window_time.total_seconds() if d.window_time else None,
                drift_min_rows=d.min_rows, drift_recover_windows=d.recover_windows,
                drift_methods=dict(d.methods), drift_categorical=list(d.categorical),
                drift_numeric_method=d.numeric_method, drift_categorical_method=d.categorical_method,
                retrain_cooldown_s=r.cooldown.total_seconds(), retrain_budget_per_day=r.budget_per_day,
                train_budget_s=r.compute_budget_s,
                min_labels=r.min_labels, train_max_rows=r.max_rows, epochs=r.epochs,
                int8_tolerance=m.serving.int8_tolerance,
                source_file=self.objs.where(m))
        except ValueError as e:
            self.problem(m, k, str(e).replace("\n", " "))
            return None

    def drift_policy(self, m: Model, k: str, features: list[str]) -> None:
        """Drift columns (features and ``score``) and methods must exist; windows and runs must be positive."""
        d, columns = m.drift, [*features, "score"]
        for col, method in d.methods.items():
            if col not in columns:
                self.problem(m, k, f"drift method for {col!r}: not a model column ({', '.join(columns)})")
            if method not in DRIFT_METHODS:
                self.problem(m, k, f"drift method {method!r} for {col!r}: use one of {', '.join(DRIFT_METHODS)}")
        for col in d.categorical:
            if col not in columns:
                self.problem(m, k, f"drift categorical column {col!r}: not a model column ({', '.join(columns)})")
        for kind, method in (("numeric", d.numeric_method), ("categorical", d.categorical_method)):
            if method != "auto" and DRIFT_METHODS.get(method) != kind:
                self.problem(m, k, f"drift {kind}_method {method!r}: use auto or one of "
                             f"{', '.join(x for x, v in DRIFT_METHODS.items() if v == kind)}")
        for what in ("window", "min_rows", "persist_windows", "recover_windows"):
            if getattr(d, what) < 1:
                self.problem(m, k, f"drift {what} must be at least 1")
        if d.window_time is not None and d.window_time.total_seconds() <= 0:
            self.problem(m, k, "drift window_time must be positive (or None)")

    def features(self, m: Model) -> tuple[list[str], tuple[str, str] | None, dict[str, ValueType]]:
        """The service's feature columns in order, its one entity key, and the request fields it reads."""
        svc = m.features
        if not isinstance(svc, FeatureService):
            self.problem(m, "Model", f"features must be a Feast FeatureService, got {type(svc).__name__}")
            return [], None, {}
        cols: list[str] = []
        keys: set[tuple[str, str]] = set()
        request: dict[str, ValueType] = {}
        in_service = {p.name for p in svc.feature_view_projections}
        for p in svc.feature_view_projections:
            view = self.views.get(p.name)
            if view is None:
                self.problem(m, "Model", f"feature service {svc.name!r} uses {p.name!r}, which no file of the "
                                         "repo defines")
                continue
            declared = {f.name for f in view.features}
            for f in p.features:
                if f.name not in declared:
                    self.problem(m, "Model", f"feature service {svc.name!r}: unknown feature {f.name!r} of "
                                             f"{p.name} (it has {', '.join(sorted(declared))})")
                elif f.name in cols:
                    self.problem(m, "Model", f"feature service {svc.name!r}: feature {f.name!r} appears twice; "
                                             "feature names must be unique within a model")
                else:
                    cols.append(f.name)
            if isinstance(view, OnDemandFeatureView):
                request.update(view.get_request_data_schema())
                for src in view.source_feature_view_projections:
                    if src not in in_service:
                        self.problem(m, "Model", f"on-demand view {view.name!r} reads view {src!r}, which feature "
                                                 f"service {svc.name!r} does not include")
            else:
                ek = self.entity_key(view)
                if ek is not None:
                    keys.add(ek)
        if len(keys) != 1:
            self.problem(m, "Model", f"the views of feature service {svc.name!r} must share one entity key, the key "
                                     f"of the scored events (found {sorted(k for k, _ in keys) or 'none'})")
            return cols, None, request
        return cols, keys.pop(), request

    def label(self, m: Model, scored: TopicSpec | None, key: tuple[str, str] | None) -> LabelSpec | None:
        lab, k = m.label, "Model"
        if not isinstance(lab, (OutcomeLabel, FieldLabel)):
            self.problem(m, k, "label must be an OutcomeLabel or a FieldLabel")
            return None
        t = self.topic(lab.source, m, k)
        if t is None:
            return None
        if scored is not None and t.name == scored.name:
            self.problem(m, k, f"the label topic is the scored topic {t.name}")
            return None
        id_field = lab.join_on if isinstance(lab, OutcomeLabel) else lab.event_id_field
        value = lab.value_field
        ok = True
        if id_field not in t.fields or t.fields[id_field] != "string":
            self.problem(m, k, f"label join field {id_field!r} (the scored event's event_id) is not a string field of "
                               f"{t.name} (fields: {', '.join(t.fields)})")
            ok = False
        if m.task == "binary" and isinstance(lab, OutcomeLabel):
            if value is not None:
                self.problem(m, k, "a binary outcome label is the outcome's arrival: leave value_field unset")
                ok = False
        elif value is None:
            self.problem(m, k, f"a {m.task} label needs value_field (a field of {t.name})")
            ok = False
        elif value not in t.fields:
            self.problem(m, k, f"label value field {value!r} is not a field of {t.name} "
                               f"(fields: {', '.join(t.fields)})")
            ok = False
        elif m.task == "regression" and t.fields[value] not in ("double", "int"):
            self.problem(m, k, f"label value field {value!r} must be a number for regression")
            ok = False
        if isinstance(lab, OutcomeLabel) and lab.window.total_seconds() <= 0:
            self.problem(m, k, "label window must be positive")
            ok = False
        # the label is joined in the scored entity's state: the label topic must be keyed like the scored one
        if key is not None and not self.key(t, key[0], key[1], f"the label topic of model {m.name}", m, k):
            ok = False
        if not ok:
            return None
        return LabelSpec(kind="outcome" if isinstance(lab, OutcomeLabel) else "field", topic=t.name,
                         id_field=id_field, value_field=value,
                         window_s=lab.window.total_seconds() if isinstance(lab, OutcomeLabel) else 0.0)

    def importable(self, m: Model, what: str, ref: str) -> None:
        mod, _, fn = ref.partition(":")
        if not mod or not fn:
            self.problem(m, "Model", f"{what} {ref!r} must be 'module:name'")
            return
        on_path(self.repo)
        try:
            obj = getattr(importlib.import_module(mod), fn)
        except Exception as e:
            self.problem(m, "Model", f"{what} {ref!r} does not import: {type(e).__name__}: {e}")
            return
        if not callable(obj):
            self.problem(m, "Model", f"{what} {ref!r} is not callable")

    def compatibility(self, old: Declarations) -> None:
        """A deployed model's topics keep their fields and types unless the schema version is bumped."""
        used = {t: n for n, m in old.models.items() for t in (m.topic, m.label.topic)}
        for name, before in old.topics.items():
            after = self.topics.get(name)
            if name not in used or after is None or after.version != before.version:
                continue
            changes = [f"removes field {f!r}" if f not in after.fields else
                       f"changes field {f!r} from {typ} to {after.fields[f]}"
                       for f, typ in before.fields.items() if after.fields.get(f) != typ]
            if changes:
                obj, kind, source = self.topic_owner[name]
                self.problem(obj, kind, f"source {source!r}: topic {name} {', '.join(changes)}, which breaks the "
                                        f"contract of deployed model {used[name]!r}: bump the schema version of "
                                        f"every source of the topic (event_source(..., version={before.version + 1}))")


def resolve(objs: RepoObjects, repo: Path, old: Declarations | None = None) -> Declarations:
    """The repo's declarations, or RepoError with one line per problem."""
    r = _Resolver(objs, repo)
    r.duplicates()
    r.stream_views()
    r.on_demand_views()
    models: dict[str, ModelSpec] = {}
    for m in objs.models:
        if m.name in models:
            r.problem(m, "Model", "declared twice")
            continue
        spec = r.model(m)
        if spec is not None:
            models[m.name] = spec
    if old is not None:
        r.compatibility(old)
    topics = {}
    for name, t in r.topics.items():
        if name in r.keys:
            key, key_type, _ = r.keys[name]
            topics[name] = t.model_copy(update={"key": key, "key_type": key_type})
    if r.problems:
        raise RepoError(r.problems)
    return Declarations(topics=topics, models=models, repo=str(repo))
