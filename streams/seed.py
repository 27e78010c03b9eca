"""A stream feature view added after its topic's events arrived starts from those events, not empty.

The streams worker keeps, per owner partition of a source topic, the views its state already covers
(state key ``_views|topic|partition``). When a partition is assigned and a view of its topic is not
listed, the worker replays that partition's accepted raw events from the bronze table through the
engine's view code (``FeatureEngine.seed``), in consumption order, up to what the state already
applied (each entity's ``_o``; later offsets the stream itself replays). That yields what the stream would have
written had the view existed from the start: the view's offline rows (one per event, as Chronon and
Tecton backfill a new feature from the log), each entity's online value and the window state the
stream continues from. The offline rows go through an idempotent sink of their own (app id ``seed``, so
its offsets never hide a row of the stream's own replay), then the online rows, the state records and
the marker: a crash in between repeats the seed, which skips entities whose state has the view.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.dataset as ds

from driftloop.core import delta
from driftloop.core.declarations import bronze_table
from driftloop.features.windows import ViewSpec

log = logging.getLogger(__name__)

CHUNK = 50_000
BRONZE_EXTRA = ("event_timestamp", "ingested_at", "_topic", "_partition", "_offset")


def marker(topic: str, partition: int) -> str:
    """State key listing the views whose history the state of an owner partition holds."""
    return f"_views|{topic}|{partition}"


def missing_views(by_topic: dict[str, list[ViewSpec]], partitions: dict[str, list[int]],
                  get: Any) -> dict[tuple[str, int], list[ViewSpec]]:
    """(topic, owner partition) → its views the state does not cover yet."""
    out = {}
    for topic, views in by_topic.items():
        for p in partitions.get(topic, ()):
            have = set((get(marker(topic, p)) or {}).get("views", ()))
            new = [v for v in views if v.name not in have]
            if new:
                out[(topic, p)] = new
    return out


def bronze_rows(offline_dir: Path, topic: str, owner: int, n: int) -> Iterator[tuple[int, Iterator[list[dict]]]]:
    """The accepted events an owner partition processed, from the topic's bronze table: per engine partition
    (``owner``, and the virtual partitions of records routed to it, ``_partition % n == owner``), its rows in
    offset order as the engine's rows (``_offset`` kept), in chunks. Nothing if the table does not exist."""
    dt = delta.open_table(offline_dir / bronze_table(topic))
    if dt is None:
        return
    table = dt.to_pyarrow_dataset().to_table(filter=(ds.field("_partition") == owner) | (ds.field("_partition") >= n))
    keep = [c for c in table.column_names if c not in BRONZE_EXTRA or c == "_offset"]
    for p in sorted(set(table.column("_partition").to_pylist())):
        if p % n != owner:
            continue
        part = table.filter(pc.equal(table["_partition"], p)).sort_by("_offset").select(keep)
        yield p, (part.slice(i, CHUNK).to_pylist() for i in range(0, part.num_rows, CHUNK))
