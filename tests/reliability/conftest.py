"""Whole-loop fault tests (``make test-reliability``): each records figures with the ``figure`` fixture; the run
ends with a table of them, also written to ``<data dir>/reliability-figures.json`` for the README's table."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

FIGURES: list[dict[str, Any]] = []
OUT = Path(os.environ.get("DRIFTLOOP_FIGURES", ".driftloop/reliability-figures.json"))


@pytest.fixture
def figure(request: pytest.FixtureRequest) -> Callable[..., None]:
    """``figure(what, value, unit="", **detail)``: one figure of this test, printed at the end of the run."""

    def record(what: str, value: float | int, unit: str = "", **detail: Any) -> None:
        FIGURES.append({"test": request.node.name, "figure": what, "value": value, "unit": unit, **detail})

    return record


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FIGURES:
        return
    tr = terminalreporter
    tr.section("reliability figures")
    width = max(len(f["figure"]) for f in FIGURES)
    for f in FIGURES:
        value = f"{f['value']:.2f}" if isinstance(f["value"], float) else str(f["value"])
        tr.write_line(f"{f['figure']:<{width}}  {value:>10} {f['unit']:<8} ({f['test']})")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(FIGURES, indent=1))
    tr.write_line(f"written to {OUT}")
