"""Usage metering: what the workers meter is appended to the state database and summed by `driftloop usage`,
against an independent pandas sum of the same additions."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from driftloop.app.cli import main
from driftloop.core.settings import Settings
from driftloop.core.usage import KINDS, UsageMeter, totals


def test_meter_sums_what_threads_add_and_usage_reports_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    s = Settings(data_dir=tmp_path)
    meter = UsageMeter(s, "serving", flush_s=0.05)
    rng = np.random.default_rng(3)
    adds = [(str(rng.choice(["a", "b"])), str(rng.choice(KINDS)), float(rng.uniform(0, 2))) for _ in range(4000)]

    def work(part: list[tuple[str, str, float]]) -> None:
        for m, k, v in part:
            meter.add(m, k, v)

    threads = [threading.Thread(target=work, args=(adds[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    meter.close()
    expected = pd.DataFrame(adds, columns=["model", "kind", "amount"]).groupby(["model", "kind"])["amount"].sum()
    got = totals(s)
    for (m, k), v in expected.items():
        assert got[m][k] == pytest.approx(v, rel=1e-9)

    assert main(["usage", "--json", "--data-dir", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["models"]["a"]["events"] == pytest.approx(expected["a"]["events"])
    later = datetime.fromtimestamp(time.time() + 3600, UTC).isoformat()
    assert main(["usage", "--since", later, "--data-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("no usage recorded since ")
    assert main(["usage", "--model", "b", "--data-dir", str(tmp_path)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["MODEL", "TRAINING", "S", "SCORING", "S", "EVENTS", "PREDICTIONS"]
    assert [r.split()[0] for r in table[1:]] == ["b"]
    assert float(table[1].split()[3]) == pytest.approx(expected["b"]["events"], abs=0.5)


def test_a_failed_write_keeps_the_sums_for_the_next_flush(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the state directory should be")
    meter = UsageMeter(Settings(data_dir=tmp_path, state_db=f"sqlite:///{blocked}/state.db"), "retrain")
    meter.add("m", "training_seconds", 5.0)
    assert meter.flush() == 0  # the database cannot be opened: nothing written, nothing dropped
    meter.s = Settings(data_dir=tmp_path)
    meter.add("m", "training_seconds", 2.5)
    assert meter.flush() == 1
    assert totals(meter.s)["m"]["training_seconds"] == pytest.approx(7.5)
    with pytest.raises(ValueError, match="unknown usage kind"):
        meter.add("m", "gpu_hours", 1.0)
