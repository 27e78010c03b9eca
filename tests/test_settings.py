import pytest
from pydantic import ValidationError

from driftloop.core.settings import Settings


def test_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = Settings()
    assert s.topic("labels") == "dl.labels"
    assert s.root == (tmp_path / ".driftloop").resolve() and s.root.is_dir()
    assert s.tracking_uri == f"sqlite:///{s.root / 'mlflow.db'}"
    assert s.bootstrap_servers is None


def test_env_prefix(tmp_path, monkeypatch):
    monkeypatch.setenv("DRIFTLOOP_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("DRIFTLOOP_TOPIC_PREFIX", "prod.")
    monkeypatch.setenv("DRIFTLOOP_PARTITIONS", "12")
    monkeypatch.setenv("DRIFTLOOP_MLFLOW_TRACKING_URI", "http://mlflow:5000")
    s = Settings()
    assert (s.root, s.topic("predictions"), s.partitions) == ((tmp_path / "d").resolve(), "prod.predictions", 12)
    assert s.tracking_uri == "http://mlflow:5000"


@pytest.mark.parametrize("env", [{"DRIFTLOOP_PARTITIONS": "0"}, {"DRIFTLOOP_TOPIC_PREFIX": "a b"},
                                 {"DRIFTLOOP_DRIFT_SHARE_THRESHOLD": "2"}])
def test_bad_values_fail_clearly(monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValidationError):
        Settings()
