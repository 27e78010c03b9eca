"""Structured one-line logging for every process."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

QUIET = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
_shown = warnings.showwarning


def quiet_warnings() -> None:
    """Hide library warnings that are not the user's business: deprecations inside the libraries we call,
    and Feast's "experimental" notices on every load (Feast re-arms its own filters on import, so this
    replaces the documented ``warnings.showwarning`` hook instead of adding a filter)."""

    def show(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        if issubclass(category, QUIET) or "experimental" in str(message):
            return
        _shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def setup_logging(level: str = "INFO", component: str = "driftloop") -> None:
    # MLflow configures its own handler on import, at INFO (schema migrations, run links): quiet unless debugging
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "DEBUG" if level.upper() == "DEBUG" else "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in logs and outputs
    fmt = f"%(asctime)s %(levelname)s {component} %(name)s: %(message)s"
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr, force=True)
    for noisy in ("aiokafka", "faust", "mode", "urllib3", "alembic", "mlflow", "feast", "httpx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    # MLflow logs each failed store query with its traceback before raising it; workers report a store outage once
    # (core.metrics.StoreHealth), so those lines only show when debugging
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.DEBUG if level.upper() == "DEBUG" else logging.CRITICAL)
