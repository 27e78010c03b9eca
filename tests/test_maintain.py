"""``driftloop maintain`` on real Delta tables while a writer appends (as the streams worker does)."""

from __future__ import annotations

import threading

import pyarrow as pa
import pytest

from driftloop.core import delta
from driftloop.core.settings import Settings
from driftloop.features.maintenance import maintain, maintain_table


def _batch(i: int, n: int = 50) -> pa.Table:
    return pa.table({"user_id": [f"u{j % 7}" for j in range(n)], "x": [float(i)] * n,
                     "_offset": list(range(i * n, (i + 1) * n))})


def test_compacts_checkpoints_and_vacuums_while_a_writer_appends(tmp_path):
    s = Settings(data_dir=tmp_path)
    table = s.offline_dir / "user_impressions"
    for i in range(30):
        delta.append(table, _batch(i), {"streams:events.impressions:0": i})
    stop = threading.Event()
    written = [30]
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            while not stop.is_set():
                i = written[0]
                delta.append(table, _batch(i), {"streams:events.impressions:0": i})
                written[0] += 1
        except BaseException as e:  # surfaced below
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    try:
        reports = maintain(s)
    finally:
        stop.set()
        t.join(30)
    assert not errors, errors
    assert written[0] > 30, "the writer never ran beside the maintenance"
    (r,) = reports
    assert r.table == "user_impressions" and r.compacted_away >= 30 and r.files_after < r.files_before
    assert (table / "_delta_log" / f"{r.version:020d}.checkpoint.parquet").exists()
    rows = delta.read(table)
    assert len(rows) == 50 * written[0] and rows["_offset"].is_unique  # nothing lost, nothing doubled
    assert delta.applied_offsets(table, ["streams:events.impressions:0"]) == {
        "streams:events.impressions:0": written[0] - 1}  # the idempotency marks survive
    vac = maintain_table(table, retention_hours=0)  # now nothing reads the old files: vacuum removes them
    assert vac.vacuumed >= 30
    assert len(delta.read(table)) == 50 * written[0]


def test_rejects_a_retention_that_would_break_readers(tmp_path):
    with pytest.raises(ValueError, match="at least 1"):
        maintain(Settings(data_dir=tmp_path), retention_hours=0.1)
