import pytest
from pydantic import ValidationError

from driftloop.app.supervisor import settings_env
from driftloop.core.declarations import Declarations, LabelSpec, ModelSpec
from driftloop.core.settings import Settings
from driftloop.features.repo import RepoError, with_overrides


def test_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = Settings()
    assert s.topic("labels") == "dl.labels"
    assert s.root == (tmp_path / ".driftloop").resolve() and s.root.is_dir()
    assert s.tracking_uri == f"sqlite:///{s.root / 'mlflow.db'}"
    assert s.bootstrap_servers is None
    assert s.repo is None and s.feature_repo_dir == s.root / "feature_repo"
    assert s.declarations_file == s.root / "declarations.json"
    assert s.model_overrides == {}


def test_env_prefix(tmp_path, monkeypatch):
    monkeypatch.setenv("DRIFTLOOP_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("DRIFTLOOP_TOPIC_PREFIX", "prod.")
    monkeypatch.setenv("DRIFTLOOP_PARTITIONS", "12")
    monkeypatch.setenv("DRIFTLOOP_MLFLOW_TRACKING_URI", "http://mlflow:5000")
    s = Settings()
    assert (s.root, s.topic("predictions"), s.partitions) == ((tmp_path / "d").resolve(), "prod.predictions", 12)
    assert s.tracking_uri == "http://mlflow:5000"


def test_repo_and_model_overrides_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DRIFTLOOP_REPO", "my_repo")
    monkeypatch.setenv("DRIFTLOOP_MODEL_OVERRIDES", '{"eta": {"min_labels": 1500, "drift_window": 500}}')
    s = Settings()
    assert s.feature_repo_dir == (tmp_path / "my_repo").resolve()
    assert s.model_overrides == {"eta": {"min_labels": 1500, "drift_window": 500}}


def test_removed_per_model_settings_are_gone(monkeypatch):
    """Per-model knobs live in the model declarations now; old variables are ignored, not applied."""
    monkeypatch.setenv("DRIFTLOOP_MODEL_NAME", "x")
    monkeypatch.setenv("DRIFTLOOP_DRIFT_SHARE_THRESHOLD", "2")
    s = Settings()
    for gone in ("model_name", "label_window_s", "drift_share_threshold", "drift_window", "min_labels_first",
                 "train_max_rows"):
        assert gone not in Settings.model_fields and not hasattr(s, gone)


@pytest.mark.parametrize("env", [{"DRIFTLOOP_PARTITIONS": "0"}, {"DRIFTLOOP_TOPIC_PREFIX": "a b"},
                                 {"DRIFTLOOP_MODEL_OVERRIDES": '{"eta": 3}'}])
def test_bad_values_fail_clearly(monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValidationError):
        Settings()


def test_children_see_the_parents_settings(tmp_path, monkeypatch):
    """The supervisor passes its settings to workers as DRIFTLOOP_* variables: they read back equal."""
    monkeypatch.chdir(tmp_path)
    parent = Settings(data_dir=tmp_path / "d", repo=tmp_path / "r", partitions=3,
                      model_overrides={"eta": {"min_labels": 10, "slices": ["is_peak"]}})
    for k, v in settings_env(parent).items():
        if k.startswith("DRIFTLOOP_"):
            monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path / "d")  # another working directory: the paths are absolute
    child = Settings()
    assert child.model_dump() == {**parent.model_dump(), "data_dir": parent.root, "repo": parent.feature_repo_dir}


def _decls() -> Declarations:
    label = LabelSpec(kind="outcome", topic="events.b", id_field="a_id", value_field="v", window_s=30.0)
    spec = ModelSpec(name="eta", task="regression", metric="mae", higher_is_better=False, topic="events.a", key="k",
                     feature_service="svc", features=["f1", "f2"], label=label, min_labels=2500)
    return Declarations(models={"eta": spec})


def test_model_overrides_apply_over_the_declared_knobs():
    s = Settings(model_overrides={"eta": {"min_labels": 100, "drift_window": 50}})
    eta = with_overrides(_decls(), s).models["eta"]
    assert (eta.min_labels, eta.drift_window, eta.features) == (100, 50, ["f1", "f2"])
    assert with_overrides(_decls(), Settings()).models["eta"].min_labels == 2500


@pytest.mark.parametrize("over, words", [({"ctr2": {"min_labels": 1}}, "unknown model 'ctr2'"),
                                         ({"eta": {"min_label": 1}}, "unknown knobs ['min_label']")])
def test_model_overrides_name_what_is_unknown(over, words):
    with pytest.raises(RepoError) as e:
        with_overrides(_decls(), Settings(model_overrides=over))
    assert len(e.value.problems) == 1 and words in e.value.problems[0]
