"""The demo's HTML report: score, log loss, drift share and serving version over time (matplotlib PNGs)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _png(fig: plt.Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def write_report(path: Path, preds: pd.DataFrame, drift: pd.DataFrame, timeline: list[tuple[str, float]],
                 summary: dict[str, object], onset_s: float | None) -> Path:
    """``preds``: t (s since start), score, label (nan if none), version; ``drift``: t, drift_share."""
    figs = []
    fig, ax = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    p = preds.sort_values("t")
    ax[0].plot(p["t"], p["score"].rolling(500, min_periods=50).mean(), label="mean score (rolling 500)")
    lab = p.dropna(subset=["label"])
    if len(lab):
        s = np.clip(lab["score"].to_numpy(), 1e-7, 1 - 1e-7)
        y = lab["label"].to_numpy()
        ll = pd.Series(-(y * np.log(s) + (1 - y) * np.log(1 - s))).rolling(500, min_periods=50).mean()
        ax[1].plot(lab["t"], ll, color="C3", label="log loss (rolling 500 labelled)")
        ax[0].plot(lab["t"], pd.Series(y).rolling(500, min_periods=50).mean(), color="C2", label="click rate")
    for a in ax:
        if onset_s is not None:
            a.axvline(onset_s, color="k", ls="--", lw=1, label="drift onset")
        a.legend(loc="upper left")
    ax[1].set_xlabel("seconds since start")
    figs.append(("Score and log loss", _png(fig)))

    fig, ax = plt.subplots(2, 1, figsize=(10, 4.5), sharex=True)
    if len(drift):
        ax[0].step(drift["t"], drift["drift_share"], where="post", label="drift share")
        ax[0].axhline(summary.get("drift_threshold", 0.5), color="C3", ls=":", label="threshold")
    ax[1].plot(p["t"], p["version"].astype(float), drawstyle="steps-post", label="serving model version")
    for a in ax:
        if onset_s is not None:
            a.axvline(onset_s, color="k", ls="--", lw=1)
        a.legend(loc="upper left")
    ax[1].set_xlabel("seconds since start")
    figs.append(("Drift share and serving version", _png(fig)))

    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:+.1f} s</td></tr>" for k, v in timeline)
    summ = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
                   for k, v in summary.items())
    imgs = "".join(f"<h2>{t}</h2><img src='data:image/png;base64,{b}'/>" for t, b in figs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>driftloop demo</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}td{{padding:2px 12px}}</style></head>
<body><h1>driftloop demo</h1><h2>Timeline (seconds since drift onset)</h2><table>{rows}</table>
<h2>Summary</h2><table>{summ}</table>{imgs}</body></html>""")
    return path
