"""Structured one-line logging for every process."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str = "INFO", component: str = "driftloop") -> None:
    fmt = f"%(asctime)s %(levelname)s {component} %(name)s: %(message)s"
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr, force=True)
    for noisy in ("aiokafka", "faust", "mode", "urllib3", "alembic", "mlflow", "feast", "httpx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
