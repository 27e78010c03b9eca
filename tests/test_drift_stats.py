"""Drift statistics against independent computations (scipy, pandas), the reference cache, HTML reports."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from scipy.spatial.distance import jensenshannon

from driftloop.drift.reports import prune, write_report
from driftloop.drift.stats import ReferenceCache, ReferenceStats, check, reference_stats

CATS = np.array(["red", "green", "blue", "black", "white"])
P = np.array([0.4, 0.25, 0.15, 0.12, 0.08])


def frame(rng: np.random.Generator, n: int, shift: float = 0.0) -> pd.DataFrame:
    """Numeric columns of several shapes and categorical ones; ``shift`` moves every column."""
    q = (1 - shift) * P + shift * P[::-1]
    return pd.DataFrame({
        "normal": rng.normal(shift, 1.0, n), "lognormal": rng.lognormal(shift, 1.0, n),
        "expo": rng.exponential(1.0 + shift, n), "pareto": (1 + shift) * rng.pareto(2.5, n),
        "colour": rng.choice(CATS, n, p=q), "position": rng.choice(4, n, p=q[:4] / q[:4].sum()).astype(float),
        "flag": (rng.random(n) < 0.3 + shift / 2).astype(np.int64)})


NUMERIC = ["normal", "lognormal", "expo", "pareto"]
CATEGORICAL = ["colour", "position", "flag"]


@pytest.fixture(scope="module")
def data() -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(7)
    return {"ref": frame(rng, 20_000), "same": frame(rng, 5_000), "shifted": frame(rng, 5_000, shift=0.4)}


def scored(data: dict[str, pd.DataFrame], window: str, **config) -> dict[str, dict]:
    return check(reference_stats(data["ref"], list(data["ref"]), **config), data[window]).columns


def shares(ref: pd.Series, cur: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Category shares of both, aligned over the union of their values (pandas)."""
    both = pd.concat([ref.value_counts(normalize=True), cur.value_counts(normalize=True)], axis=1).fillna(0.0)
    return both.iloc[:, 0].to_numpy(), both.iloc[:, 1].to_numpy()


def test_kinds_and_skips() -> None:
    ref = pd.DataFrame({"x": np.arange(100.0), "flag": [0, 1] * 50, "s": ["a", "b"] * 50, "const": 1.0,
                        "const_s": "k", "nan": np.nan, "listed": np.arange(100.0)})
    st = reference_stats(ref, [*ref, "absent"], categorical=["listed"])
    assert {c: r.kind for c, r in st.columns.items()} == {
        "x": "numeric", "flag": "categorical", "s": "categorical", "const_s": "categorical", "listed": "categorical"}
    assert set(st.skipped) == {"const", "nan", "absent"}
    assert st.columns["x"].method == "wasserstein" and st.columns["s"].method == "jensenshannon"
    assert reference_stats(ref, ["flag"], methods={"flag": "ks"}).columns["flag"].kind == "numeric"


@pytest.mark.parametrize(("config", "message"), [
    ({"methods": {"x": "wasserstien"}}, "unknown drift method 'wasserstien'"),
    ({"methods": {"s": "wasserstein"}}, "column 's' is categorical: method 'wasserstein' does not fit it"),
    ({"methods": {"x": "chisquare"}}, "column 'x' is numeric: method 'chisquare' does not fit it"),
    ({"numeric_method": "jensenshannon"}, "method 'jensenshannon' does not fit it"),
    ({"thresholds": {"y": 0.2}}, "names columns that are not checked: y"),
])
def test_bad_configuration(config: dict, message: str) -> None:
    ref = pd.DataFrame({"x": np.arange(100.0), "s": ["a", "b"] * 50})
    with pytest.raises(ValueError, match=message) as e:
        reference_stats(ref, ["x", "s"], **config)
    assert "\n" not in str(e.value)


def test_wasserstein_matches_scipy(data: dict[str, pd.DataFrame]) -> None:
    ref = data["ref"]
    for window in ("same", "shifted"):
        cols = scored(data, window)
        for c in NUMERIC:
            want = sps.wasserstein_distance(ref[c], data[window][c]) / np.std(ref[c])
            # the quantile grid misses the extreme tail: a little, next to the 0.1 threshold, on a Pareto tail
            assert cols[c]["score"] == pytest.approx(want, rel=0.05, abs=0.005), (window, c)
            assert cols[c]["drifted"] is (window == "shifted"), (window, c, want)


def test_ks_matches_scipy(data: dict[str, pd.DataFrame]) -> None:
    cfg = {"methods": dict.fromkeys(NUMERIC, "ks")}
    for window in ("same", "shifted"):
        cols = scored(data, window, **cfg)
        for c in NUMERIC:
            want = sps.ks_2samp(data["ref"][c], data[window][c], method="asymp").pvalue
            assert cols[c]["score"] == pytest.approx(want, abs=0.02), (window, c)
            assert cols[c]["drifted"] is bool(want < 0.05)


def hand_psi(ref: pd.Series, cur: pd.Series) -> float:
    """PSI over the reference deciles (pandas cut, outer bins open), shares floored at 1e-4."""
    edges = [-np.inf, *np.unique(ref.quantile(np.arange(1, 10) / 10)), np.inf]
    r = pd.cut(ref, edges).value_counts(normalize=True, sort=False).clip(lower=1e-4)
    w = pd.cut(cur, edges).value_counts(normalize=True, sort=False).clip(lower=1e-4)
    return float(((w - r) * np.log(w / r)).sum())


def test_psi_matches_pandas(data: dict[str, pd.DataFrame]) -> None:
    cfg = {"methods": dict.fromkeys([*NUMERIC, "colour"], "psi")}
    for window in ("same", "shifted"):
        cols = scored(data, window, **cfg)
        for c in NUMERIC:
            assert cols[c]["score"] == pytest.approx(hand_psi(data["ref"][c], data[window][c]), rel=1e-9)
            # deciles are coarse: PSI of a Pareto scaled by 1.4 stays near 0.07 (Wasserstein: 0.27)
            assert cols[c]["drifted"] is (window == "shifted" and c != "pareto"), (window, c)
        r, w = (np.maximum(s, 1e-4) for s in shares(data["ref"]["colour"], data[window]["colour"]))
        assert cols["colour"]["score"] == pytest.approx(float(np.sum((w - r) * np.log(w / r))), rel=1e-9)


def test_jensenshannon_matches_scipy(data: dict[str, pd.DataFrame]) -> None:
    unseen = data["same"].assign(colour=lambda d: d["colour"].where(d.index % 10 > 0, "purple"))
    for window, cur in (("same", data["same"]), ("shifted", data["shifted"]), ("unseen", unseen)):
        cols = check(reference_stats(data["ref"], list(data["ref"])), cur).columns
        for c in CATEGORICAL:
            want = jensenshannon(*shares(data["ref"][c], cur[c]), base=2)
            assert cols[c]["score"] == pytest.approx(want, rel=1e-9, abs=1e-12), (window, c)
            assert cols[c]["drifted"] is (window == "shifted" or (window == "unseen" and c == "colour"))


def test_chisquare_matches_scipy(data: dict[str, pd.DataFrame]) -> None:
    cfg = {"methods": dict.fromkeys(CATEGORICAL, "chisquare")}
    for window in ("same", "shifted"):
        cols = scored(data, window, **cfg)
        for c in CATEGORICAL:
            r, w = shares(data["ref"][c], data[window][c])
            n = len(data[window])
            want = sps.chisquare(w * n, r * n).pvalue
            assert cols[c]["score"] == pytest.approx(want, rel=1e-6, abs=1e-300), (window, c)
            assert cols[c]["drifted"] is bool(want < 0.05)
    one_unseen = data["same"].assign(colour=lambda d: d["colour"].where(d.index > 0, "purple"))
    st = reference_stats(data["ref"], ["colour"], methods={"colour": "chisquare"})
    assert check(st, one_unseen).columns["colour"]["score"] < 0.05  # never seen in 20k reference rows


def test_window_share_and_roundtrip(data: dict[str, pd.DataFrame]) -> None:
    st = reference_stats(data["ref"], list(data["ref"]))
    again = ReferenceStats.from_json(st.to_json())
    assert again == st
    for window in ("same", "shifted"):
        got, want = check(again, data[window]), check(st, data[window])
        assert got == want
    assert check(st, data["same"]).share == 0.0 and check(st, data["shifted"]).share == 1.0
    partial = data["same"].drop(columns=["normal"]).assign(colour=np.nan)
    res = check(st, partial)
    assert set(res.columns) == set(data["ref"]) - {"normal", "colour"} and res.rows == len(partial)
    with pytest.raises(ValueError, match="format"):
        ReferenceStats.from_json('{"format": 0}')


def test_check_is_fast() -> None:
    rng = np.random.default_rng(1)
    base = frame(rng, 100_000)
    ref = pd.concat({f"{c}{i}": base[c] for i in range(3) for c in base}, axis=1)  # 21 columns
    st = reference_stats(ref, list(ref))
    win = ref.sample(10_000, random_state=1)
    check(st, win)
    t0 = time.perf_counter()
    check(st, win)
    elapsed = time.perf_counter() - t0
    print(f"check of a 10k × {len(st.columns)} window: {elapsed:.3f}s")
    assert elapsed < 1.0


def test_cache_computes_once_per_version(tmp_path: Path, data: dict[str, pd.DataFrame]) -> None:
    loads: list[str] = []

    def load(version: str):
        def inner() -> pd.DataFrame:
            loads.append(version)
            return data["ref"]
        return inner

    cols = list(data["ref"])
    first = ReferenceCache(tmp_path)
    a = first.get("m", "1", load("1"), cols)
    assert first.get("m", "1", load("1"), cols) is a and first.computed == 1
    second = ReferenceCache(tmp_path)  # another process: reads the file
    assert second.get("m", 1, load("1"), cols) == a and (second.computed, second.loaded) == (0, 1)
    second.get("m", "2", load("2"), cols)  # a new version
    second.get("m", "1", load("1"), cols, thresholds={"normal": 0.3})  # another configuration
    assert loads == ["1", "2", "1"] and second.computed == 2
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "m").iterdir()) == ["1", "1", "2"]
    path = next((tmp_path / "m").glob("2-*.json"))
    path.write_text("{broken")
    third = ReferenceCache(tmp_path)
    third.get("m", "2", load("2"), cols)  # unreadable file → recomputed and rewritten
    assert third.computed == 1 and ReferenceStats.from_json(path.read_text()) == third.get("m", "2", load("2"), cols)
    with pytest.raises(ValueError, match="cache path"):
        third.get("../x", "1", load("1"), cols)


def test_report_written_and_pruned(tmp_path: Path, data: dict[str, pd.DataFrame]) -> None:
    ref, cur = data["ref"].head(2000), data["shifted"].head(500)
    st = reference_stats(ref, list(ref))
    out = write_report(ref, cur, list(ref), tmp_path / "reports" / "w3.html", stats=st)
    html = out.read_text(encoding="utf-8")
    assert out.exists() and "<html" in html.lower() and "colour" in html
    assert [p.name for p in out.parent.iterdir()] == ["w3.html"]  # no temporary left behind
    for i, name in enumerate(["w0.html", "w1.html", "w2.html"]):
        (out.parent / name).write_text("old")
        os.utime(out.parent / name, (1_000 + i, 1_000 + i))
    (out.parent / "notes.txt").write_text("kept")
    gone = prune(out.parent, keep=2)
    assert sorted(p.name for p in gone) == ["w0.html", "w1.html"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["notes.txt", "w2.html", "w3.html"]
    assert prune(tmp_path / "missing", keep=1) == []
