"""Complete feature repos with model declarations, one folder per domain (``driftloop init --example NAME``)."""

from pathlib import Path

EXAMPLES = Path(__file__).parent
DEFAULT = "ads"  # the example a data dir without a configured repo is scaffolded from


def names() -> list[str]:
    return sorted(p.name for p in EXAMPLES.iterdir() if p.is_dir() and not p.name.startswith("_"))
