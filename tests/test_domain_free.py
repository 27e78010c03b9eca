"""The engine never names a domain: only examples/, tests/ and bench/ may mention the ad example's words."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALLOWED = {"examples", "tests", "bench"}
SKIP = {".venv", ".git", ".driftloop", "build", "dist"}
# word-ish: a letter on neither side, so ``user_clicks`` and ``ctr_v1`` match but ``threads`` and ``forbid`` do not
DOMAIN = re.compile(r"(?<![a-z])(impressions?|clicks?|clicked|bids?|ad_ids?|ads|ctr)(?![a-z])", re.IGNORECASE)


def engine_modules() -> list[Path]:
    """Every .py of the engine: all folders of the repository but the allowed ones (and tooling)."""
    out = sorted(ROOT.glob("*.py"))
    for top in sorted(ROOT.iterdir()):
        if top.is_dir() and top.name not in ALLOWED | SKIP and not top.name.startswith(".") \
                and not top.name.endswith(".egg-info"):
            out += sorted(f for f in top.rglob("*.py") if not SKIP & set(f.relative_to(ROOT).parts))
    return out


def offenders() -> list[str]:
    return [f"{f.relative_to(ROOT)}:{n}: {line.strip()[:100]}" for f in engine_modules()
            for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1) if DOMAIN.search(line)]


def test_the_pattern_is_word_ish() -> None:
    hits = ["impressions_1m", "user_clicks", "ctr_v1", "CTR", "ad_id", "bid", "Ads", "clicked", "mean_bid_1m"]
    misses = ["threads", "forbid", "loads", "bidirectional", "clickhouse", "adsorb", "ctrl", "sidebar"]
    assert all(DOMAIN.search(w) for w in hits) and not any(DOMAIN.search(w) for w in misses)


def test_engine_modules_are_found() -> None:
    names = {str(f.relative_to(ROOT)) for f in engine_modules()}
    assert {"core/declarations.py", "app/cli.py", "features/repo.py"} <= names
    assert not any(n.startswith(("examples/", "tests/", "bench/", ".venv/")) for n in names)


def test_no_engine_module_names_a_domain() -> None:
    bad = offenders()
    assert not bad, f"{len(bad)} line(s) outside examples/, tests/, bench/ name the ad domain:\n" + "\n".join(bad)
