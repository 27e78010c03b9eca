"""A brute-force pandas/numpy reference of the stream feature views, written from the semantics in
``features/windows.py`` independently of the engine: for every event, aggregate all earlier-consumed
events of its entity (and itself) whose slide bucket lies in ``(b(t) - ceil(W/slide), b(t)]``; and of the
outcome label joins (``streams/engine.py``'s rule on complete data)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pandas as pd

from driftloop.core import delta
from driftloop.core.declarations import ModelSpec, bronze_table
from driftloop.core.settings import Settings
from driftloop.features.windows import ViewSpec

CHUNK = 512


def _window(ts: np.ndarray, x: np.ndarray, at: np.ndarray, upto: np.ndarray, slide: float, n: int) -> dict:
    """count/sum/min/max per query row ``k``: events ``j <= upto[k]`` in the window of time ``at[k]``."""
    b = np.floor((ts / 1e6) / slide)
    out = {"count": [], "sum": [], "min": [], "max": []}
    for lo in range(0, len(at), CHUNK):
        q = np.floor((at[lo:lo + CHUNK] / 1e6) / slide)[:, None]
        m = (np.arange(len(ts))[None, :] <= upto[lo:lo + CHUNK, None]) & (b[None, :] > q - n) & (b[None, :] <= q)
        out["count"].append(m.sum(1))
        out["sum"].append(np.where(m, x[None, :], 0.0).sum(1))
        out["min"].append(np.where(m, x[None, :], np.inf).min(1))
        out["max"].append(np.where(m, x[None, :], -np.inf).max(1))
    return {k: np.concatenate(v) if v else np.array([]) for k, v in out.items()}


def _values(ts: np.ndarray, x: np.ndarray, at: np.ndarray, upto: np.ndarray, view: ViewSpec) -> dict:
    cols = {}
    for a in view.aggs:
        w = _window(ts, x[a.column], at, upto, a.bucket_s, math.ceil(a.window_s / a.bucket_s))
        n = w["count"]
        if a.function == "count":
            cols[a.name] = n
        elif a.function == "mean":
            cols[a.name] = np.where(n > 0, w["sum"] / np.maximum(n, 1), np.nan)
        else:
            cols[a.name] = np.where(n > 0, w[a.function], np.nan)
    return cols


def numbers(col: pd.Series) -> np.ndarray:
    """A column as floats, 0 where a value is not a number (a count of a text column adds nothing up). Not
    ``pd.to_numeric(errors="coerce")``: pandas 2.3.3 segfaults on text such as '8397e3541862468690e3df9...'
    (an id that reads as a number with a huge exponent)."""
    if pd.api.types.is_numeric_dtype(col):
        return col.fillna(0.0).to_numpy(float)
    return np.array([float(v) if isinstance(v, int | float) and v == v else 0.0 for v in col], float)


def expected(events: list[dict], view: ViewSpec,
             transform: Callable[[pd.DataFrame], pd.DataFrame] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(offline rows keyed by ``event_id``, online rows keyed by entity) for ``events`` in consumption order."""
    df = pd.DataFrame(events)
    if transform is not None:
        df = transform(df)
    off, on = [], []
    for entity, g in df.groupby(view.entity_key, sort=False):
        ts = g["ts"].to_numpy(np.int64)
        x = {c: numbers(g[c]) for c in {a.column for a in view.aggs}}
        idx = np.arange(len(g))
        off.append(pd.DataFrame({"event_id": g["event_id"].to_numpy(), **_values(ts, x, ts, idx, view)}))
        last = np.array([ts.max()])
        on.append(pd.DataFrame({view.entity_key: [entity], "event_timestamp": last,
                                **_values(ts, x, last, np.array([len(g) - 1]), view)}))
    return pd.concat(off, ignore_index=True), pd.concat(on, ignore_index=True)


def offline_rows(settings: Settings, view: ViewSpec) -> pd.DataFrame:
    """The view's Delta rows joined to the bronze table's event ids through (topic, partition, offset)."""
    rows = delta.read(settings.offline_dir / view.name)
    bronze = delta.read(settings.offline_dir / bronze_table(view.topic),
                        ["event_id", "_topic", "_partition", "_offset"])
    return rows.merge(bronze, on=["_topic", "_partition", "_offset"], how="left", validate="one_to_one")


def assert_frames_match(got: pd.DataFrame, want: pd.DataFrame, key: str, columns: list[str]) -> None:
    """Same keys, and per column equal counts / float values within 1e-9 relative (summation order)."""
    assert got[key].is_unique, f"duplicate {key} in the store"
    assert set(got[key]) == set(want[key]), (
        f"{len(set(want[key]) - set(got[key]))} missing, {len(set(got[key]) - set(want[key]))} unexpected")
    m = got.set_index(key).loc[want[key], columns].reset_index(drop=True)
    for c in columns:
        a = pd.to_numeric(m[c], errors="coerce").to_numpy(float)
        b = pd.to_numeric(want[c], errors="coerce").to_numpy(float)
        bad = ~(np.isclose(a, b, rtol=1e-9, atol=1e-9) | (np.isnan(a) & np.isnan(b)))
        assert not bad.any(), f"{c}: {bad.sum()} of {len(a)} differ, e.g. got {a[bad][:3]} want {b[bad][:3]}"


def expected_labels(events: list[tuple[str, dict]], m: ModelSpec) -> pd.DataFrame:
    """An outcome-joined model's labels (columns event_id, key, label, ts) for complete data: per scored event,
    the earliest outcome naming it counts if it is at most the window later; binary: 1 if one counts, else 0;
    regression: its value; multiclass: its class index; no outcome that counts, no label."""
    lab = m.label
    scored = pd.DataFrame([r for t, r in events if t == m.topic])
    outcomes = pd.DataFrame([r for t, r in events if t == lab.topic])
    names = {lab.id_field: "event_id", "ts": "outcome_ts", **({lab.value_field: "value"} if lab.value_field else {})}
    first = outcomes[list(names)].sort_values("ts", kind="stable").drop_duplicates(lab.id_field).rename(columns=names)
    j = scored[["event_id", m.key, "ts"]].merge(first, on="event_id", how="left")
    counts = (j["outcome_ts"] - j["ts"]) <= lab.window_s * 1e6
    if m.task == "binary":
        j["label"] = counts.astype(float)
    else:
        j = j[counts].copy()
        j["label"] = (j["value"].map(lambda v: float(m.classes.index(str(v)))) if m.task == "multiclass"
                      else j["value"].astype(float))
    return pd.DataFrame({"event_id": j["event_id"], "key": j[m.key].astype(str), "label": j["label"],
                         "ts": j["ts"]}).reset_index(drop=True)


def assert_labels_match(settings: Settings, m: ModelSpec, want: pd.DataFrame) -> None:
    """The model's rows of the ``labels`` Delta table: one per scored event, equal to ``want``."""
    got = delta.read(settings.offline_dir / "labels")
    got = got[got["model_name"] == m.name]
    assert got["event_id"].is_unique, f"{m.name}: {got['event_id'].duplicated().sum()} labels written twice"
    assert set(got["event_id"]) == set(want["event_id"]), (
        f"{m.name}: {len(set(want['event_id']) - set(got['event_id']))} labels missing, "
        f"{len(set(got['event_id']) - set(want['event_id']))} unexpected")
    g = got.set_index("event_id").loc[want["event_id"]]
    assert (g["key"].to_numpy() == want["key"].to_numpy()).all()
    assert np.allclose(g["label"].to_numpy(float), want["label"].to_numpy(float), rtol=1e-12, atol=0)
    assert (g["ts"].to_numpy(np.int64) == want["ts"].to_numpy(np.int64)).all()
    assert (g["event_timestamp"] == pd.to_datetime(want["ts"].to_numpy(), unit="us", utc=True)).all()
