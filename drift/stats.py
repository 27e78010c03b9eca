"""Drift statistics whose reference side is computed once per model version and cached.

A check compares a window to a model version's reference sample column by column. Everything about the
reference a check needs (a quantile grid and the std for Wasserstein and KS, decile bins and their shares
for PSI, category shares for Jensen-Shannon, chi-square and categorical PSI) is summarised once by
:func:`reference_stats` and cached per version by :class:`ReferenceCache`, so :func:`check` only summarises
the window: one quantile pass, histogram or value count per column. Evidently recomputes the reference
side on every run, which is what makes it slow at scale.

Methods (score; drift when):

- ``wasserstein`` (numeric default): W1(reference, window) / std(reference), Evidently's "Wasserstein
  distance (normed)"; ≥ 0.1. W1 = ∫|Q_ref(u) − Q_win(u)| du over a grid of quantile levels (1000 even
  cells, the outer 1% and 0.1% refined so heavy tails count).
- ``psi``: Σ (w − r)·ln(w / r) over the reference deciles (outer bins open) or the categories; shares
  floored at 1e-4; ≥ 0.1.
- ``ks``: two-sample Kolmogorov-Smirnov p-value (Smirnov's asymptotic distribution, as scipy's
  ``ks_2samp`` for large samples), the reference CDF read off the quantile grid; < 0.05.
- ``jensenshannon`` (categorical default): Jensen-Shannon distance, base 2 (0..1); ≥ 0.1.
- ``chisquare``: Pearson chi-square p-value of the window's category counts against the reference
  shares; < 0.05.

A column is categorical when listed as such, when it is not numeric, or when the reference holds at most
10 distinct values (flags, positions), unless its configured method is numeric-only. Window values the
reference never held share one extra "unseen" bucket (for chi-square it gets a reference share of half a
reference row). Missing and non-finite values are dropped. A numeric column constant in the reference is
skipped (a categorical one is checked).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats as sps

log = logging.getLogger(__name__)

Kind = Literal["numeric", "categorical"]
METHODS: dict[str, tuple[str, ...]] = {  # method → the column kinds it fits
    "wasserstein": ("numeric",), "ks": ("numeric",), "psi": ("numeric", "categorical"),
    "jensenshannon": ("categorical",), "chisquare": ("categorical",)}
DEFAULT_THRESHOLDS = {"wasserstein": 0.1, "psi": 0.1, "ks": 0.05, "jensenshannon": 0.1, "chisquare": 0.05}
P_VALUES = frozenset({"ks", "chisquare"})  # scores that are p-values: below the threshold is drift
MAX_LEVELS = 10  # a numeric column with at most this many distinct reference values is categorical
PSI_BINS = 10
PSI_FLOOR = 1e-4
MIN_STD = 1e-3  # Evidently's floor of the Wasserstein norm
FORMAT = 1  # version of the cached form; bump when ColumnReference or the grid changes


def _grid() -> tuple[np.ndarray, np.ndarray]:
    """Quantile levels (cell midpoints) and cell widths: 1000 even cells, tails refined 10× and 100×."""
    edges = np.unique(np.concatenate([np.linspace(0, 1, 1001), np.linspace(0, 0.01, 101),
                                      np.linspace(0.99, 1, 101), np.linspace(0, 0.001, 101),
                                      np.linspace(0.999, 1, 101)]))
    return (edges[1:] + edges[:-1]) / 2, np.diff(edges)


LEVELS, WIDTHS = _grid()


@dataclass
class ColumnReference:
    """One column's reference summary, enough to score a window against it."""

    name: str
    kind: Kind
    method: str
    threshold: float
    std: float = 0.0  # numeric: reference std
    quantiles: list[float] = field(default_factory=list)  # numeric: reference quantiles at LEVELS
    edges: list[float] = field(default_factory=list)  # numeric: inner PSI bin edges (reference deciles)
    categories: list[Any] = field(default_factory=list)  # categorical: reference values, most frequent first
    values: Literal["number", "text"] = "number"  # categorical: how window values are matched
    shares: list[float] = field(default_factory=list)  # reference share per PSI bin / category
    rows: int = 0  # reference rows with a value (the sample size KS and chi-square need)

    @functools.cached_property
    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, pd.Index]:
        return (np.asarray(self.quantiles, np.float64), np.asarray(self.edges, np.float64),
                np.asarray(self.shares, np.float64), pd.Index(self.categories))

    def drifted(self, score: float) -> bool:
        return score < self.threshold if self.method in P_VALUES else score >= self.threshold

    def score(self, values: pd.Series) -> float:
        """The method's score of a window column against this reference; NaN when the window has no values."""
        if self.kind == "numeric":
            x = np.sort(_finite(values))
            if x.size == 0:
                return math.nan
            q, edges, shares, _ = self._arrays
            if self.method == "wasserstein":
                return float(np.dot(WIDTHS, np.abs(q - _quantiles(x))) / max(self.std, MIN_STD))
            if self.method == "ks":
                return _ks_pvalue(q, x, self.rows)
            return _psi(shares, np.bincount(np.searchsorted(edges, x, side="left"), minlength=len(shares)))
        counts = self.counts(values)
        if counts.sum() == 0:
            return math.nan
        ref = np.append(self._arrays[2], 0.0)  # the unseen bucket
        if self.method == "jensenshannon":
            return _js(ref, counts / counts.sum())
        if self.method == "chisquare":
            return _chisquare(ref, counts, self.rows)
        return _psi(ref, counts)

    def counts(self, values: pd.Series) -> np.ndarray:
        """Window counts per category, the unseen bucket last; missing values are left out."""
        raw, index = values.to_numpy(), self._arrays[3]
        keys = pd.to_numeric(values, errors="coerce").to_numpy(np.float64) if self.values == "number" else raw
        idx = index.get_indexer(keys)
        miss = np.flatnonzero(idx < 0)
        if miss.size:  # missing, unseen, or (text) a value that only matches as a string
            present = ~pd.isna(raw[miss])
            if self.values == "text" and present.any():
                idx[miss[present]] = index.get_indexer(raw[miss[present]].astype(str))
            idx = np.delete(idx, miss[~present])
        k = len(self.categories)
        return np.bincount(np.where(idx < 0, k, idx), minlength=k + 1)


def _quantiles(x: np.ndarray) -> np.ndarray:
    """Quantiles of sorted ``x`` at LEVELS, linearly interpolated (``np.quantile``'s default, without its
    per-level partitioning, which is 25× slower for this many levels)."""
    pos = LEVELS * (x.size - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, x.size - 1)
    return x[lo] + (x[hi] - x[lo]) * (pos - lo)


def _finite(values: pd.Series) -> np.ndarray:
    x = pd.to_numeric(values, errors="coerce").to_numpy(np.float64)
    return x[np.isfinite(x)]


def _psi(ref_shares: np.ndarray, counts: np.ndarray) -> float:
    r = np.maximum(ref_shares, PSI_FLOOR)
    w = np.maximum(counts / counts.sum(), PSI_FLOOR)
    return float(np.sum((w - r) * np.log(w / r)))


def _js(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance, base 2, of two share vectors."""
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))
    return math.sqrt(max((kl(p) + kl(q)) / 2, 0.0))


def _chisquare(ref: np.ndarray, counts: np.ndarray, rows: int) -> float:
    """Pearson chi-square p-value; the unseen bucket only counts when the window has unseen values."""
    if counts[-1] > 0:
        unseen = 0.5 / max(rows, 1)
        ref = np.append(ref[:-1] * (1 - unseen), unseen)
    else:
        ref, counts = ref[:-1], counts[:-1]
    keep = ref > 0
    expected = ref[keep] * counts.sum()
    if keep.sum() < 2:
        return 1.0
    stat = float(np.sum((counts[keep] - expected) ** 2 / expected))
    return float(sps.chi2.sf(stat, keep.sum() - 1))


def _ks_pvalue(q: np.ndarray, x: np.ndarray, rows: int) -> float:
    """KS p-value of a sorted window ``x`` against the reference CDF interpolated from quantiles ``q``."""
    k = np.searchsorted(q, x, side="right") - 1  # last grid quantile ≤ x
    inside = (k >= 0) & (k < len(q) - 1)
    kc = np.clip(k, 0, len(q) - 2)
    gap = q[kc + 1] - q[kc]
    frac = np.where(inside & (gap > 0), (x - q[kc]) / np.where(gap > 0, gap, 1.0), 0.0)
    f_ref = np.where(k < 0, 0.0, np.where(k >= len(q) - 1, 1.0,
                                          LEVELS[kc] + frac * (LEVELS[kc + 1] - LEVELS[kc])))
    n = x.size
    hi = np.searchsorted(x, x, side="right") / n  # window CDF at x and just below it
    lo = np.searchsorted(x, x, side="left") / n
    d = float(max(np.max(np.abs(f_ref - hi)), np.max(np.abs(f_ref - lo))))
    en = round(rows * n / (rows + n))
    return float(np.clip(sps.kstwo.sf(d, en), 0.0, 1.0))


@dataclass
class ReferenceStats:
    """A model version's reference summary: the checked columns, the reference rows, skipped columns."""

    columns: dict[str, ColumnReference]
    rows: int
    skipped: dict[str, str] = field(default_factory=dict)  # column → why it is not checked

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "rows": self.rows, "skipped": self.skipped,
                           "columns": [asdict(c) for c in self.columns.values()]})

    @classmethod
    def from_json(cls, text: str) -> ReferenceStats:
        """The stats :meth:`to_json` wrote; ValueError for another format."""
        d = json.loads(text)
        if d.get("format") != FORMAT:
            raise ValueError(f"reference stats format {d.get('format')!r}, expected {FORMAT}")
        cols = [ColumnReference(**c) for c in d["columns"]]
        return cls({c.name: c for c in cols}, int(d["rows"]), dict(d["skipped"]))


@dataclass
class WindowCheck:
    """One window's verdict: the drifted share of the checked columns and each column's score."""

    share: float
    columns: dict[str, dict[str, Any]]  # column → {score, threshold, drifted, method}
    rows: int

    @property
    def drifted_columns(self) -> list[str]:
        return [c for c, v in self.columns.items() if v["drifted"]]


def _method_error(name: str, method: str, kind: str | None = None) -> ValueError:
    if method not in METHODS:
        return ValueError(f"column {name!r}: unknown drift method {method!r}; use one of {', '.join(METHODS)}")
    fits = [m for m, kinds in METHODS.items() if kind in kinds]
    return ValueError(f"column {name!r} is {kind}: method {method!r} does not fit it; use one of {', '.join(fits)}")


def _kind(s: pd.Series, listed: bool, method: str | None) -> Kind:
    if listed or not pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s):
        return "categorical"
    if method is not None and METHODS.get(method) == ("numeric",):
        return "numeric"
    return "categorical" if s.nunique() <= MAX_LEVELS else "numeric"


def _column(s: pd.Series, name: str, kind: Kind, method: str, threshold: float) -> ColumnReference:
    if kind == "numeric":
        x = np.sort(_finite(s))
        edges = np.unique(np.quantile(x, np.linspace(0, 1, PSI_BINS + 1)[1:-1]))
        shares = np.bincount(np.searchsorted(edges, x, side="left"), minlength=edges.size + 1) / x.size
        return ColumnReference(name, kind, method, threshold, std=float(np.std(x)),
                               quantiles=_quantiles(x).tolist(), edges=edges.tolist(),
                               shares=shares.tolist(), rows=int(x.size))
    v = s.dropna()
    number = pd.api.types.is_numeric_dtype(v)  # bools included
    counts = (v.astype(np.float64) if number else v.astype(str)).value_counts()
    return ColumnReference(name, kind, method, threshold, categories=counts.index.tolist(),
                           values="number" if number else "text",
                           shares=(counts.to_numpy() / counts.sum()).tolist(), rows=int(counts.sum()))


def reference_stats(ref: pd.DataFrame, columns: Sequence[str], *, methods: dict[str, str] | None = None,
                    categorical: Sequence[str] | None = None, thresholds: dict[str, float] | None = None,
                    numeric_method: str = "wasserstein", categorical_method: str = "jensenshannon") -> ReferenceStats:
    """Summarise the reference sample's ``columns`` once (see the module doc for kinds and methods).

    ``methods`` and ``thresholds`` map column → method / threshold (default: the kind's method and the
    method's default threshold). ValueError for an unknown method, a method that does not fit its column,
    or configuration naming a column that is not checked."""
    methods, thresholds, listed = dict(methods or {}), dict(thresholds or {}), set(categorical or ())
    for default, kind in ((numeric_method, "numeric"), (categorical_method, "categorical")):
        if kind not in METHODS.get(default, ()):
            raise _method_error(f"<{kind} default>", default, kind)
    stray = sorted((set(methods) | set(thresholds) | listed) - set(columns))
    if stray:
        raise ValueError(f"drift configuration names columns that are not checked: {', '.join(stray)}")
    out: dict[str, ColumnReference] = {}
    skipped: dict[str, str] = {}
    for name in columns:
        if name not in ref:
            skipped[name] = "not in the reference sample"
            continue
        s, method = ref[name], methods.get(name)
        if method is not None and method not in METHODS:
            raise _method_error(name, method)
        kind = _kind(s, name in listed, method)
        method = method or (numeric_method if kind == "numeric" else categorical_method)
        if kind not in METHODS[method]:
            raise _method_error(name, method, kind)
        distinct = s.nunique()
        if distinct == 0 or (kind == "numeric" and len(_finite(s)) == 0):
            skipped[name] = "no values in the reference sample"
        elif distinct == 1 and name not in listed and pd.api.types.is_numeric_dtype(s) \
                and not pd.api.types.is_bool_dtype(s):
            skipped[name] = "constant in the reference sample"
        else:
            thr = float(thresholds.get(name, DEFAULT_THRESHOLDS[method]))
            if not math.isfinite(thr) or thr < 0:
                raise ValueError(f"column {name!r}: drift threshold must be a finite number ≥ 0, not {thr}")
            out[name] = _column(s, name, kind, method, thr)
    return ReferenceStats(out, len(ref), skipped)


def check(stats: ReferenceStats, window: pd.DataFrame) -> WindowCheck:
    """Score every checked column of ``window`` against the reference; columns missing from the window
    or without values in it are left out (and out of the share)."""
    cols: dict[str, dict[str, Any]] = {}
    for name, col in stats.columns.items():
        if name not in window:
            continue
        score = col.score(window[name])
        if math.isnan(score):
            continue
        cols[name] = {"score": score, "threshold": col.threshold, "drifted": col.drifted(score),
                      "method": col.method}
    share = sum(v["drifted"] for v in cols.values()) / len(cols) if cols else 0.0
    return WindowCheck(share, cols, len(window))


def config_key(columns: Sequence[str], config: dict[str, Any]) -> str:
    """A short hash of what the reference stats depend on besides the sample (columns, configuration)."""
    blob = json.dumps({"format": FORMAT, "columns": list(columns), **config}, sort_keys=True, default=sorted)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary sibling, then rename it over ``path`` (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class ReferenceCache:
    """Reference stats per (model, version, configuration): memory first, then
    ``<folder>/<model>/<version>-<config hash>.json``, else computed from ``load()`` and written there.

    ``computed`` counts computations and ``loaded`` disk reads (memory keeps the ``memory`` most recent)."""

    def __init__(self, folder: Path, memory: int = 32):
        self.folder = Path(folder)
        self.memory = memory
        self.computed = 0
        self.loaded = 0
        self._mem: OrderedDict[tuple[str, str, str], ReferenceStats] = OrderedDict()

    def path(self, model: str, version: str, key: str) -> Path:
        for part in (model, version):
            if not part or part in (".", "..") or "/" in part or "\\" in part:
                raise ValueError(f"unusable model name or version for a cache path: {part!r}")
        return self.folder / model / f"{version}-{key}.json"

    def get(self, model: str, version: str | int, load: Callable[[], pd.DataFrame], columns: Sequence[str],
            **config: Any) -> ReferenceStats:
        """The stats of ``model`` ``version`` for ``columns`` and ``config`` (keyword arguments of
        :func:`reference_stats`), computed at most once per version and configuration."""
        key = config_key(columns, config)
        mk = (model, str(version), key)
        if mk in self._mem:
            self._mem.move_to_end(mk)
            return self._mem[mk]
        path = self.path(model, str(version), key)
        stats = None
        if path.exists():
            try:
                stats = ReferenceStats.from_json(path.read_text(encoding="utf-8"))
                self.loaded += 1
            except (ValueError, KeyError, TypeError) as e:
                log.warning("%s unreadable (%s); recomputing", path, e)
        if stats is None:
            stats = reference_stats(load(), columns, **config)
            self.computed += 1
            write_atomic(path, stats.to_json())
        self._mem[mk] = stats
        while len(self._mem) > self.memory:
            self._mem.popitem(last=False)
        return stats
