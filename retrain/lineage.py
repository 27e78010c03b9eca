"""What code trained a version: driftloop's version, the feature repo's git commit, the trainer's hash."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import subprocess
from pathlib import Path
from typing import Any

from driftloop.core.declarations import ModelSpec


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def git_commit(folder: str | Path) -> str | None:
    """The commit checked out in ``folder`` (with ``+dirty`` when it has changes), None outside git."""
    try:
        sha = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain"], capture_output=True, text=True,
                               timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}+dirty" if dirty else sha


def code_version(spec: ModelSpec) -> dict[str, Any]:
    """driftloop's package version, the repo's git commit and the sha256 of the trainer's module file."""
    from driftloop.retrain import trainers  # noqa: PLC0415

    module_file: Path | None = Path(trainers.__file__)
    if spec.trainer:
        found = importlib.util.find_spec(spec.trainer.partition(":")[0])
        module_file = Path(found.origin) if found and found.origin else None
    return {"driftloop": importlib.metadata.version("driftloop"),
            "repo_commit": git_commit(spec.source_file and Path(spec.source_file).parent or "."),
            "trainer": spec.trainer or f"builtin:{spec.task}",
            "trainer_sha256": _sha256(module_file) if module_file else None}
