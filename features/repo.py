"""The Feast feature repo under the data directory: config, apply, and the store handle."""

from __future__ import annotations

import importlib.util
import logging
import shutil
import sys
from pathlib import Path

from feast import Entity, FeatureService, FeatureStore, FeatureView
from feast.data_source import DataSource
from feast.stream_feature_view import StreamFeatureView

from driftloop.infra.settings import Settings

log = logging.getLogger(__name__)

EXAMPLE_REPO = Path(__file__).parent / "example_repo"

FEATURE_STORE_YAML = """\
project: driftloop
provider: local
registry:
  registry_type: file
  path: {repo}/registry.db
  cache_ttl_seconds: 5
online_store:
  type: sqlite
  path: {repo}/online.db
offline_store:
  type: driftloop.features.delta_offline_store.DeltaOfflineStore
batch_engine:
  type: driftloop.features.materialize.PrecomputedRowsEngine
entity_key_serialization_version: 3
auth:
  type: no_auth
"""


def init_repo(settings: Settings, source: Path | None = None) -> Path:
    """Create the feature repo (definitions + ``feature_store.yaml``) if it does not exist yet."""
    repo = settings.feature_repo_dir
    repo.mkdir(parents=True, exist_ok=True)
    if not any(p.suffix == ".py" for p in repo.iterdir()):
        for f in (source or EXAMPLE_REPO).glob("*.py"):
            if f.name != "__init__.py":
                shutil.copy(f, repo / f.name)
    yaml = repo / "feature_store.yaml"
    if not yaml.exists():
        yaml.write_text(FEATURE_STORE_YAML.format(repo=repo))
    return repo


def load_definitions(repo: Path) -> list[object]:
    """Every Feast object defined at module level in the repo's ``*.py`` files.

    Like ``feast apply``, the repo folder is importable while loading, so one file may import another
    (``from ads import user``) and udfs pickled by reference can be loaded back by the workers."""
    kinds = (Entity, FeatureView, StreamFeatureView, FeatureService, DataSource)
    objects: list[object] = []
    on_path(repo)
    files = sorted(repo.glob("*.py"))
    for f in files:
        sys.modules.pop(f.stem, None)  # another repo's module of the same name
    for f in files:
        mod = sys.modules.get(f.stem) or importlib.import_module(f.stem)
        objects += [v for v in vars(mod).values() if isinstance(v, kinds) and v not in objects]
    return objects


def on_path(repo: Path) -> None:
    """Make the repo's modules importable (the registry pickles udfs by module reference)."""
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))


def apply(settings: Settings) -> FeatureStore:
    """`feast apply` for the data directory's repo (idempotent)."""
    repo = init_repo(settings)
    store = FeatureStore(repo_path=str(repo))
    objects = load_definitions(repo)
    store.apply(objects)  # type: ignore[arg-type]
    log.info("applied %d Feast objects from %s", len(objects), repo)
    return store


def open_store(settings: Settings) -> FeatureStore:
    repo = settings.feature_repo_dir
    on_path(repo)
    if not (repo / "feature_store.yaml").exists():
        return apply(settings)
    return FeatureStore(repo_path=str(repo))
