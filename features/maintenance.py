"""``driftloop maintain``: compact, checkpoint and vacuum every Delta table of the offline store.

Safe while the streams worker appends: compaction is an ordinary Delta commit that only rewrites files
it read (delta-rs retries it when a concurrent commit conflicts), appends never conflict with it, and
vacuum removes only files unreferenced for longer than the retention (default 7 days, never below
1 hour), so readers of recent snapshots keep their files. The writers' app-transaction ids (the
idempotency marks) are part of the log and survive compaction and checkpoints.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from deltalake import DeltaTable
from deltalake.exceptions import CommitFailedError

from driftloop.core.delta import open_table
from driftloop.core.settings import Settings

log = logging.getLogger(__name__)

MIN_RETENTION_H = 1.0


@dataclass
class TableReport:
    table: str
    version: int
    files_before: int
    files_after: int
    compacted_away: int
    vacuumed: int
    seconds: float


def tables(root: Path) -> list[Path]:
    """Every Delta table directly under ``root``."""
    return sorted(p for p in root.iterdir() if (p / "_delta_log").is_dir()) if root.exists() else []


def _compact(dt: DeltaTable, attempts: int = 5) -> dict:
    for i in range(attempts):
        try:
            return dt.optimize.compact()
        except CommitFailedError as e:  # a concurrent commit touched what we rewrote: re-read and retry
            log.info("compaction of %s conflicted (%s); retrying", dt.table_uri, e)
            time.sleep(0.2 * (i + 1))
            dt.update_incremental()
    raise RuntimeError(f"compaction of {dt.table_uri} kept conflicting with concurrent writers")


def maintain_table(path: Path, retention_hours: float, vacuum: bool = True) -> TableReport:
    t = time.perf_counter()
    dt = open_table(path)
    if dt is None:
        raise FileNotFoundError(f"no Delta table at {path}")
    before = len(dt.file_uris())
    stats = _compact(dt)
    dt.create_checkpoint()
    dt.cleanup_metadata()
    removed = dt.vacuum(retention_hours=int(retention_hours), enforce_retention_duration=False,
                        dry_run=False) if vacuum else []
    report = TableReport(path.name, dt.version(), before, len(dt.file_uris()),
                         int(stats.get("numFilesRemoved", 0)), len(removed), round(time.perf_counter() - t, 2))
    log.info("maintained %s: %s", path.name, report)
    return report


def maintain(settings: Settings, retention_hours: float = 168.0, vacuum: bool = True) -> list[TableReport]:
    if retention_hours < MIN_RETENTION_H:
        raise ValueError(f"--retention-hours must be at least {MIN_RETENTION_H:g} (readers of recent "
                         "snapshots would lose their files)")
    return [maintain_table(p, retention_hours, vacuum) for p in tables(settings.offline_dir)]
