"""The demo's HTML report: per model, score against outcome, the primary metric, drift share and serving
version over time (matplotlib PNGs), with the loop's timeline and summary."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

CHUNK = 300  # labelled predictions per point of the metric curve


@dataclass
class ModelSection:
    """``preds``: t (s since start), score, label (NaN if none), version; ``drift``: t, drift_share."""

    name: str
    task: str
    metric: str
    preds: pd.DataFrame
    drift: pd.DataFrame
    threshold: float
    score_fn: Callable[[pd.DataFrame], float]


def _png(fig: plt.Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _figure(sec: ModelSection, onset_s: float | None) -> str:
    fig, ax = plt.subplots(4, 1, figsize=(10, 9), sharex=True)
    p = sec.preds.sort_values("t")
    ax[0].plot(p["t"], p["score"].rolling(500, min_periods=50).mean(), label="mean prediction (rolling 500)")
    lab = p.dropna(subset=["label"])
    if len(lab):
        ax[0].plot(lab["t"], lab["label"].rolling(500, min_periods=50).mean(), color="C2", label="mean outcome")
        chunks = [lab.iloc[i:i + CHUNK] for i in range(0, len(lab) - CHUNK + 1, CHUNK)]
        ax[1].plot([c["t"].iloc[-1] for c in chunks], [sec.score_fn(c) for c in chunks], color="C3", marker=".",
                   label=f"{sec.metric} per {CHUNK} labelled predictions")
    if len(sec.drift):
        ax[2].step(sec.drift["t"], sec.drift["drift_share"], where="post", label="drift share")
        ax[2].axhline(sec.threshold, color="C3", ls=":", label="threshold")
    if len(p):
        ax[3].plot(p["t"], p["version"].astype(float), drawstyle="steps-post", label="serving model version")
    for a in ax:
        if onset_s is not None:
            a.axvline(onset_s, color="k", ls="--", lw=1, label="drift onset")
        if a.get_legend_handles_labels()[0]:
            a.legend(loc="upper left")
    ax[3].set_xlabel("seconds since start")
    return _png(fig)


def write_report(path: Path, sections: list[ModelSection], timeline: list[tuple[str, float]],
                 summary: dict[str, object], onset_s: float | None) -> Path:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:+.1f} s</td></tr>" for k, v in timeline)
    summ = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
                   for k, v in summary.items())
    imgs = "".join(f"<h2>Model {html.escape(s.name)} ({s.task}, {s.metric})</h2>"
                   f"<img src='data:image/png;base64,{_figure(s, onset_s)}'/>" for s in sections)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>driftloop demo</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}td{{padding:2px 12px}}</style></head>
<body><h1>driftloop demo</h1><h2>Timeline (seconds since drift onset)</h2><table>{rows}</table>
<h2>Summary</h2><table>{summ}</table>{imgs}</body></html>""")
    return path
