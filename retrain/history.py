"""``driftloop history MODEL``: for each retrain request, the chain trigger → data → run → metrics →
decision → alias moves, and the alias moves made by hand (manual promotions, rollbacks)."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from driftloop.core.requests import TERMINAL, RequestStore
from driftloop.core.settings import Settings
from driftloop.registry.ledger import moves
from driftloop.registry.versions import lineage


def _when(us: int | None) -> str:
    return "-" if not us else datetime.fromtimestamp(us / 1e6, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def chain(settings: Settings, model: str) -> dict[str, Any]:
    """The model's requests (with their transitions, data, lineage and alias moves) and its other moves."""
    all_moves = [asdict(m) for m in moves(settings, model)]
    requests = []
    for row in RequestStore(settings).of_model(model):
        item = {k: v for k, v in asdict(row).items() if k != "request"}
        item["evidence"] = row.request.get("evidence", {})
        item["lineage"] = lineage(settings, model, row.version) if row.version else None
        item["moves"] = [m for m in all_moves if m["request_id"] == row.request_id]
        requests.append(item)
    return {"model": model, "requests": requests, "manual_moves": [m for m in all_moves if not m["request_id"]]}


def _move_line(m: dict[str, Any]) -> str:
    was = f"v{m['from_version']}" if m["from_version"] else "(unset)"
    return f"{m['alias']} {was} → v{m['to_version']} at {_when(m['at_us'])} by {m['actor']}: {m['reason']}"


def render(c: dict[str, Any]) -> list[str]:
    """The chain as text lines."""
    lines = [f"{c['model']}: {len(c['requests'])} retrain requests"]
    for r in c["requests"]:
        ev = ", ".join(f"{k} {v}" for k, v in list(r["evidence"].items())[:4]) or "none"
        tries = f" after {r['attempt']} failed attempts" if r["attempt"] else ""
        lines.append(f"request {r['request_id']} ({r['reason']}) at {_when(r['created_us'])}: {r['state']}{tries}")
        lines.append(f"  trigger   {r['reason']}; evidence: {ev[:200]}")
        data = r["data"] or {}
        if data:
            rows = " / ".join(f"{k} {v:,}" for k, v in data.get("rows", {}).items())
            tables = ", ".join(f"{k}@{v}" for k, v in data.get("delta_versions", {}).items())
            lines.append(f"  data      {rows}; feature service {data.get('feature_service')}; Delta {tables}")
        lin = r["lineage"] or {}
        if r["version"]:
            params, code = lin.get("params", {}), lin.get("code", {})
            lines.append(f"  run       v{r['version']} (run {r['run_id']}) on {params.get('device', '?')}, "
                         f"trainer {code.get('trainer', '?')} sha256 {str(code.get('trainer_sha256'))[:12]}, "
                         f"driftloop {code.get('driftloop', '?')}, repo {code.get('repo_commit') or 'not in git'}, "
                         f"seed {params.get('seed')}")
            gate = lin.get("gate", {})
            shown = {k: v for k, v in gate.get("metrics", {}).items() if "." not in k}
            lines.append("  metrics   " + (", ".join(f"{k} {v:.4g}" for k, v in sorted(shown.items())) or "-"))
        if r["state"] in TERMINAL:
            why = "; ".join(f"{k}: {v}" for k, v in (r["checks"] or {}).items())
            lines.append(f"  decision  {r['state']}" + (f": {why}" if why else " (gate passed)"))
        for m in r["moves"]:
            lines.append(f"  alias     {_move_line(m)}")
    if c["manual_moves"]:
        lines.append("alias moves not made by a retrain request:")
        lines += [f"  {_move_line(m)}" for m in c["manual_moves"]]
    return lines
