"""Settings for every driftloop process: environment variables prefixed ``DRIFTLOOP_``."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """One place for every knob; defaults run the embedded one-machine stack."""

    model_config = SettingsConfigDict(env_prefix="DRIFTLOOP_", env_file=".env", extra="ignore")

    data_dir: Path = Field(Path(".driftloop"), description="All local state lives under this folder.")
    bootstrap_servers: str | None = Field(None, description="Kafka brokers; unset = embedded Tansu.")
    topic_prefix: str = "dl."
    partitions: int = Field(4, ge=1)
    replication_factor: int = Field(1, ge=1)

    repo: Path | None = Field(None, description="The feature repo: Feast definitions and model declarations "
                                                "(your own folder); unset = <data_dir>/feature_repo.")
    model_overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description='Per-model knobs over the declared ones, e.g. '
        '{"churn": {"min_labels": 1500, "drift_window": 500}} (JSON in DRIFTLOOP_MODEL_OVERRIDES).')
    mlflow_tracking_uri: str | None = Field(None, description="Unset = sqlite under data_dir.")
    ray_address: str | None = Field(None, description="Unset = local ray.init().")
    spark_remote: str | None = Field(None, description="Spark Connect URL (sc://host:15002); unset = embedded pysail.")
    redis_url: str | None = Field(None, description="Feast online store on Redis (host:port[,db=N]); unset = sqlite.")
    registry_url: str | None = Field(None, description="Feast SQL registry (SQLAlchemy URL, e.g. "
                                                        "postgresql+psycopg://u:p@host/db); unset = a file.")

    max_future_s: float = Field(
        60.0, gt=0, description="How far an event's time may be ahead of the streams worker's clock: later ones "
        "are dead-lettered (reason future) and never move the watermark, so a producer with a wrong clock cannot "
        "push it further ahead and dead-letter everyone else's events as late. 60 s is far beyond NTP skew and "
        "outcome events stamped a little ahead, yet refuses clocks minutes or hours off "
        "(time zones, units). A producer ahead by less still takes that much of the lateness of the other "
        "producers of its partitions: set it below the topics' lateness where producers are not trusted.")

    streams_commit_s: float = Field(1.0, ge=0, description="How often the streams worker commits: Delta rows, state "
                                    "records and offsets of every batch since the last commit (online rows are "
                                    "written with each batch). Longer: fewer, larger Delta commits; 0: every batch.")
    serving_batch_size: int = Field(5000, ge=1, description="Most records per serving batch (a backlog is scored "
                                                           "in batches this size).")
    serving_linger_s: float = Field(0.05, ge=0, description="Longest wait for a serving batch's first record; the "
                                                           "batch is what has arrived by then.")
    serving_alias_poll_s: float = Field(5.0, gt=0, description="Fallback poll of the champion alias.")
    serving_shadow: bool = Field(True, description="Score the challenger beside the champion (predictions.shadow).")
    serving_max_score_s: float = Field(2.0, gt=0, description="A version taking longer to score its reference sample "
                                                             "(the warm-up) is refused (check latency).")
    train_workers: int = Field(1, ge=1, description="Ray Train workers per training job (data-parallel).")
    train_gpu: bool | None = Field(None, description="Train on GPUs: unset = when the Ray cluster reports one.")
    train_max_failures: int = Field(2, ge=0, description="Ray Train restarts of a failed training run (it resumes "
                                    "from its last epoch checkpoint).")
    train_storage: str | None = Field(None, description="Ray Train run storage (checkpoints; a path or URI every "
                                      "Ray node reaches); unset = <data_dir>/ray_results.")
    retrain_concurrency: int = Field(2, ge=1, description="Retrain requests of different models handled at once "
                                     "(one at a time per model).")
    retrain_max_attempts: int = Field(3, ge=1, description="Attempts at one retrain request before it ends failed.")
    retrain_backoff_s: float = Field(5.0, ge=0, description="Wait before a request's second attempt (doubling).")
    state_db: str | None = Field(None, description="SQLAlchemy URL of driftloop's own state (retrain requests, the "
                                 "alias ledger); unset = sqlite under data_dir.")
    train_budget_s: float | None = Field(None, gt=0, description="Training compute seconds a model may use per day "
                                         "unless its RetrainPolicy(compute_budget_s=...) says; unset = no quota.")
    retrain_wait_s: float = Field(180.0, gt=0, description="How long a request may wait for fresh labels.")

    metrics_port: int = Field(0, ge=0, description="Prometheus port of this worker; 0 = none.")
    metrics_host: str = Field("127.0.0.1", description="Address /metrics listens on (0.0.0.0 in containers).")
    webhook_port: int = Field(0, ge=0, description="Drift alert webhook port; 0 = pick a free one.")
    webhook_host: str = Field("127.0.0.1", description="Address the alert webhook listens on (0.0.0.0 to expose it).")
    webhook_token: str | None = Field(None, description="Bearer token / HMAC key of the alert webhook; unset = one "
                                      "generated once into <data_dir>/webhook.token (mode 0600).")
    webhook_max_skew_s: float = Field(300.0, gt=0, description="How old a signed request's timestamp may be.")
    webhook_rate_per_s: float = Field(5.0, gt=0, description="Alert webhook requests per second per sender.")
    webhook_burst: int = Field(20, ge=1, description="Requests a sender may send at once before the rate applies.")
    notify_urls: list[str] = Field(default_factory=list, description="Outbound webhooks (JSON list in "
                                   "DRIFTLOOP_NOTIFY_URLS): drift detected, retrain requested, model promoted, "
                                   "rejected or rolled back, HMAC-signed.")
    notify_secret: str | None = Field(None, description="HMAC key of outbound webhooks; unset = the webhook token.")
    notify_max_attempts: int = Field(6, ge=1, description="Tries per outbound webhook before it is given up.")
    drift_report_every: int = Field(10, ge=1, description="An Evidently HTML report for every breached window and "
                                    "for one in this many others.")
    drift_report_keep: int = Field(30, ge=1, description="HTML drift reports kept per model (oldest deleted; "
                                   "about 4 MB each).")
    log_level: str = "INFO"

    @field_validator("topic_prefix")
    @classmethod
    def _prefix_ok(cls, v: str) -> str:
        if any(c.isspace() for c in v):
            raise ValueError("topic_prefix must not contain whitespace")
        return v

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> Settings:
        """A copy with ``update`` applied; derived paths are computed again (``data_dir`` may change)."""
        paths = {k: Path(v) for k, v in (update or {}).items() if k in ("data_dir", "repo") and isinstance(v, str)}
        copy = super().model_copy(update={**(update or {}), **paths}, deep=deep)
        copy.__dict__.pop("root", None)
        return copy

    @cached_property
    def root(self) -> Path:
        """Absolute data directory, created on first use."""
        p = self.data_dir.expanduser().resolve()
        p.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def offline_dir(self) -> Path:
        return self.root / "offline"

    @property
    def feature_repo_dir(self) -> Path:
        return self.repo.expanduser().resolve() if self.repo else self.root / "feature_repo"

    @property
    def declarations_file(self) -> Path:
        """What ``driftloop apply`` resolved from the repo: declared topics and models (workers read it)."""
        return self.root / "declarations.json"

    @property
    def run_dir(self) -> Path:
        p = self.root / "run"
        p.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def drift_dir(self) -> Path:
        """The drift worker's state (episodes, alert keys, reference statistics) and HTML reports."""
        p = self.root / "drift"
        p.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def stack_file(self) -> Path:
        return self.root / "stack.json"

    @property
    def state_url(self) -> str:
        """driftloop's own state database: retrain requests and the alias ledger."""
        return self.state_db or f"sqlite:///{self.root / 'state.db'}"

    @property
    def train_storage_path(self) -> str:
        """Where Ray Train keeps runs and their checkpoints (one run per retrain request)."""
        return self.train_storage or str(self.root / "ray_results")

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.root / 'mlflow.db'}"

    def topic(self, name: str) -> str:
        """Full topic name for a logical one, e.g. ``topic("labels") -> "dl.labels"``."""
        return f"{self.topic_prefix}{name}"


def get_settings(**overrides: object) -> Settings:
    """Fresh settings from the environment, with explicit overrides on top."""
    return Settings(**overrides)  # type: ignore[arg-type]
