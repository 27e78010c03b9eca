"""Evidently HTML drift reports of a window against its reference, and their retention.

The monitor's verdicts come from :mod:`driftloop.drift.stats`; these reports are for people (Evidently's
``DataDriftPreset`` with its per-column plots). Given the version's :class:`ReferenceStats`, a report uses the
same column kinds, methods and thresholds; Evidently computes its own scores (its Jensen-Shannon uses the
natural log and its PSI its own bins), so its numbers can differ a little from the monitor's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from driftloop.drift.stats import ReferenceStats, write_atomic


def write_report(reference: pd.DataFrame, current: pd.DataFrame, columns: Sequence[str], path: Path, *,
                 stats: ReferenceStats | None = None, drift_share: float = 0.5) -> Path:
    """Write an Evidently ``DataDriftPreset`` HTML report of ``current`` vs ``reference`` over ``columns``
    (those present in both) to ``path``, atomically (a temporary sibling renamed over it); returns ``path``."""
    from evidently import DataDefinition, Dataset, Report  # noqa: PLC0415 - heavy; only report writers need it
    from evidently.presets import DataDriftPreset  # noqa: PLC0415

    cols = [c for c in columns if c in reference and c in current and (stats is None or c in stats.columns)]
    if not cols:
        raise ValueError("no column to report on: none of the columns is in both frames (and checked)")
    preset = DataDriftPreset(columns=cols, drift_share=drift_share)
    definition = DataDefinition()
    if stats is not None:
        refs = [stats.columns[c] for c in cols]
        preset = DataDriftPreset(columns=cols, drift_share=drift_share,
                                 per_column_method={r.name: r.method for r in refs},
                                 per_column_threshold={r.name: r.threshold for r in refs})
        definition = DataDefinition(numerical_columns=[r.name for r in refs if r.kind == "numeric"],
                                    categorical_columns=[r.name for r in refs if r.kind == "categorical"])
    snap = Report([preset]).run(current_data=Dataset.from_pandas(current[cols], data_definition=definition),
                                reference_data=Dataset.from_pandas(reference[cols], data_definition=definition))
    path = Path(path)
    write_atomic(path, snap.get_html_str(as_iframe=False))  # what Snapshot.save_html writes
    return path


def prune(folder: Path, keep: int) -> list[Path]:
    """Delete the oldest ``*.html`` files of ``folder`` (by modification time, then name) beyond the newest
    ``keep``; returns the deleted paths. Hidden (temporary) files are left alone."""
    if keep < 0:
        raise ValueError(f"keep must be ≥ 0, not {keep}")
    folder = Path(folder)
    if not folder.is_dir():
        return []
    files = []
    for f in folder.glob("*.html"):
        if f.name.startswith("."):
            continue
        try:
            files.append((f.stat().st_mtime_ns, f.name, f))
        except FileNotFoundError:  # deleted meanwhile
            continue
    files.sort()
    gone = [f for _, _, f in files[:max(len(files) - keep, 0)]]
    for f in gone:
        f.unlink(missing_ok=True)
    return gone
