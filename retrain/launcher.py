"""Launchers run a training job somewhere and return its result.

``RayTrainLauncher`` (the default) runs the job as a Ray Train run: a ``TorchTrainer`` on a local Ray
(or the cluster at ``DRIFTLOOP_RAY_ADDRESS`` through ``ray.init``), with ``ScalingConfig`` workers from
settings, a GPU when the cluster reports one (or as ``train_gpu`` says), ``FailureConfig`` restarts and a
checkpoint per epoch under ``<train_storage>/<run name>``. A run started again under the same name (a
restart after a failure, or a controller that was killed and calls ``run`` again) continues from its
latest checkpoint: Ray Train V2 (the default in Ray 2.60) restores a run's checkpoints by storage path
and name, and ``ray.train.get_checkpoint()`` hands the newest to the training function.

``RayJobsLauncher`` (chosen by :func:`make_launcher` when ``DRIFTLOOP_RAY_ADDRESS`` is set) submits the
same code through the Ray Jobs API with the run name as submission id, so a restarted controller
re-attaches to the job instead of submitting it twice. ``LocalLauncher`` trains in process (no Ray).

A declared trainer is imported inside the job from the feature repo folder the job names (Ray workers do
not share the driver's ``sys.path``); it runs whole and reports one final checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from driftloop.core.settings import Settings

log = logging.getLogger(__name__)

# Ray Train settings for short jobs (the environment of the driver wins): the controller polls its workers
# every 0.1 s instead of 2 s (a worker's ``report`` waits for that poll, so this bounds a checkpoint per epoch
# to ~0.1 s, and the end of a run is noticed sooner).
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}
# A local Ray has no preemptible nodes and no metrics scraper: no watcher or metrics actors to start.
LOCAL_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_METRICS_ENABLED": "0"}
JOBS_DIR = "driftloop-jobs"  # under the run storage: a job's inputs, attempt marks and result
CHECKPOINTS_KEPT = 2


@dataclass(frozen=True)
class TrainJob:
    """What to train: the model's features and task, the trainer (None = built-in) and where it lives."""

    model: str  # the declared model's name
    features: list[str]
    task: str
    classes: list[str] = field(default_factory=list)
    trainer: str | None = None  # "module:function" in ``repo``
    repo: str | None = None  # the feature repo folder, put on sys.path to import the trainer
    seed: int = 0
    epochs: int = 40
    run_name: str = ""  # the Ray Train run (and Ray job) name; the same name resumes that run

    @property
    def name(self) -> str:
        return self.run_name or f"{self.model}-{uuid.uuid4().hex[:12]}"


@dataclass
class JobResult:
    model: Any  # the trained torch nn.Module, on CPU, in eval mode
    history: list[float]
    device: str
    seconds: float
    started_us: int
    finished_us: int
    resumed_from_epoch: int = 0  # epochs restored from a checkpoint by the attempt that finished (0: fresh)
    restarts: int = 0  # attempts Ray Train restarted after a failure during this call


@dataclass(frozen=True)
class RunSettings:
    """The Ray Train knobs a job needs (they travel to a Ray Jobs entrypoint as JSON)."""

    storage: str
    workers: int = 1
    gpu: bool | None = None
    max_failures: int = 2

    @classmethod
    def of(cls, s: Settings) -> RunSettings:
        return cls(s.train_storage_path, s.train_workers, s.train_gpu, s.train_max_failures)


def use_gpu(resources: Mapping[str, float], setting: bool | None) -> bool:
    """Whether training asks for GPUs: the setting when given, else whether the cluster has one."""
    return setting if setting is not None else resources.get("GPU", 0) >= 1


def _kwargs(job: TrainJob, device: str) -> dict[str, Any]:
    return {"features": list(job.features), "task": job.task, "seed": job.seed, "device": device,
            "classes": list(job.classes)}


def _declared(train_df: pd.DataFrame, valid_df: pd.DataFrame, job: TrainJob, device: str) -> Any:
    """Run the declared trainer (its repo put on ``sys.path``) and check it returned a torch module."""
    import torch  # noqa: PLC0415 - heavy; only the job needs it

    from driftloop.retrain.trainers import load_trainer  # noqa: PLC0415

    if job.repo and job.repo not in sys.path:
        sys.path.insert(0, job.repo)
    model = load_trainer(job.trainer or "")(train_df, valid_df, **_kwargs(job, device))
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"trainer {job.trainer} returned {type(model).__name__}, not a torch nn.Module")
    return model


def train_job(train_df: pd.DataFrame, valid_df: pd.DataFrame, job: TrainJob) -> JobResult:
    """The training job body, in process (``LocalLauncher``)."""
    import torch  # noqa: PLC0415

    from driftloop.retrain.trainers import fit  # noqa: PLC0415

    started = time.time_ns() // 1000
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(1)
    history: list[float] = []
    if job.trainer:
        model = _declared(train_df, valid_df, job, device)
    else:
        model, history = fit(train_df, valid_df, epochs=job.epochs, **_kwargs(job, device))
    model = model.cpu().eval()
    return JobResult(model, history, device, time.perf_counter() - t0, started, time.time_ns() // 1000)


# --- storage (a local path or any URI pyarrow reaches) ---------------------------------------------------

def _fs(uri: str) -> tuple[Any, str]:
    import pyarrow.fs  # noqa: PLC0415

    return pyarrow.fs.FileSystem.from_uri(uri if "://" in uri else str(Path(uri).absolute()))


def _write(uri: str, data: bytes) -> None:
    fs, path = _fs(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def _read(uri: str) -> bytes | None:
    import pyarrow.fs  # noqa: PLC0415

    fs, path = _fs(uri)
    if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        return f.read()


def _names(uri: str) -> list[str]:
    import pyarrow.fs  # noqa: PLC0415

    fs, path = _fs(uri)
    if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        return []
    return [i.base_name for i in fs.get_file_info(pyarrow.fs.FileSelector(path))]


def _job_dir(storage: str, name: str) -> str:
    return f"{storage.rstrip('/')}/{JOBS_DIR}/{name}"


def fingerprint(train_df: pd.DataFrame, valid_df: pd.DataFrame, job: TrainJob) -> str:
    """What a checkpoint belongs to: the job's inputs and knobs (a checkpoint of other data is not resumed)."""
    h = hashlib.sha256(json.dumps({k: v for k, v in dataclasses.asdict(job).items() if k != "run_name"},
                                  sort_keys=True).encode())
    for df in (train_df, valid_df):
        cols = [c for c in [*job.features, "label"] if c in df.columns]
        h.update(pd.util.hash_pandas_object(df[cols], index=False).to_numpy().tobytes())
    return h.hexdigest()


# --- the Ray Train run -------------------------------------------------------------------------------------

def _train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Each Ray Train worker's function: resume from ``ray.train.get_checkpoint()``, train, report a
    checkpoint per epoch (built-in trainer) or one at the end (declared trainer)."""
    import ray.train  # noqa: PLC0415
    import ray.train.torch  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from driftloop.retrain.trainers import fit  # noqa: PLC0415

    job: TrainJob = config["job"]
    train_df, valid_df = config["train"], config["valid"]
    rank = ray.train.get_context().get_world_rank()
    started = time.time_ns() // 1000
    if rank == 0:
        _write(f"{config['job_dir']}/attempts/{config['token']}-{uuid.uuid4().hex[:8]}", str(started).encode())
    torch.set_num_threads(1)
    device = str(ray.train.torch.get_device())
    meta, state = _restore(ray.train.get_checkpoint(), config["fingerprint"])
    resumed = int(meta.get("epoch", 0))
    if meta.get("done"):
        return {"resumed_from_epoch": resumed}

    def report(meta: dict[str, Any], files: Mapping[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                for name, obj in files.items():
                    torch.save(obj, Path(d) / name)
                (Path(d) / "meta.json").write_text(json.dumps({**meta, "fingerprint": config["fingerprint"]}))
            ckpt = ray.train.Checkpoint.from_directory(d) if rank == 0 else None
            ray.train.report({"epoch": meta["epoch"], "done": meta.get("done", False)}, checkpoint=ckpt)

    history: list[float] = []
    if job.trainer:
        model = _declared(train_df, valid_df, job, device) if rank == 0 else None
        epoch = 1
    else:
        model, history = fit(train_df, valid_df, epochs=job.epochs, state=state, wrap=ray.train.torch.prepare_model,
                             on_epoch=lambda st: report({"epoch": st["epoch"]}, {"state.pt": st}),
                             **_kwargs(job, device))
        epoch = job.epochs
    report({"epoch": epoch, "done": True, "history": history, "device": device, "resumed_from_epoch": resumed,
            "finished_us": time.time_ns() // 1000}, {"model.pt": model.cpu().eval() if model is not None else None})
    return {"resumed_from_epoch": resumed}


def _restore(ckpt: Any, fp: str) -> tuple[dict[str, Any], Any]:
    """(meta, built-in trainer state) of the checkpoint to resume from; empty when none fits this job."""
    import torch  # noqa: PLC0415

    if ckpt is None:
        return {}, None
    with ckpt.as_directory() as d:
        meta = json.loads((Path(d) / "meta.json").read_text())
        if meta.get("fingerprint") != fp:
            log.warning("checkpoint %s belongs to other inputs: training from scratch", ckpt.path)
            return {}, None
        state = Path(d) / "state.pt"
        return meta, torch.load(state, map_location="cpu", weights_only=False) if state.exists() else None


@contextlib.contextmanager
def _keep_sigint() -> Iterator[None]:
    """``TorchTrainer.fit`` installs its own SIGINT handler in the main thread; put the caller's back after."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT) if main else None
    try:
        yield
    finally:
        if main and before is not None:
            signal.signal(signal.SIGINT, before)


def fit_on_ray(train_df: pd.DataFrame, valid_df: pd.DataFrame, job: TrainJob, rs: RunSettings) -> dict[str, Any]:
    """Run ``job`` as the Ray Train run ``job.run_name`` (Ray already initialised); its summary: the final
    checkpoint's path and meta, restarts, resumed epoch, start and end."""
    import ray  # noqa: PLC0415
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig  # noqa: PLC0415
    from ray.train.torch import TorchTrainer  # noqa: PLC0415

    for k, v in TRAIN_ENV.items():
        os.environ.setdefault(k, v)
    name = job.name
    job_dir, token = _job_dir(rs.storage, name), uuid.uuid4().hex[:12]
    gpu = use_gpu(ray.cluster_resources(), rs.gpu)
    config = {"job": job, "train": train_df, "valid": valid_df, "job_dir": job_dir, "token": token,
              "fingerprint": fingerprint(train_df, valid_df, job)}
    trainer = TorchTrainer(
        _train_loop, train_loop_config=config, scaling_config=ScalingConfig(num_workers=rs.workers, use_gpu=gpu),
        run_config=RunConfig(name=name, storage_path=rs.storage,
                             failure_config=FailureConfig(max_failures=rs.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT)))
    t0, submitted = time.perf_counter(), time.time_ns() // 1000
    with _keep_sigint():
        result = trainer.fit()
    seconds = time.perf_counter() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {name} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        meta = json.loads((Path(d) / "meta.json").read_text())
    starts = sorted(int(_read(f"{job_dir}/attempts/{n}") or b"0") for n in _names(f"{job_dir}/attempts")
                    if n.startswith(token))
    return {"checkpoint": result.checkpoint.path, "history": meta.get("history", []),
            "device": meta.get("device", "cpu"), "seconds": seconds, "started_us": starts[0] if starts else submitted,
            "finished_us": meta.get("finished_us", time.time_ns() // 1000), "restarts": max(len(starts) - 1, 0),
            "resumed_from_epoch": int((result.return_value or {}).get("resumed_from_epoch", 0)), "use_gpu": gpu}


def load_result(summary: Mapping[str, Any], job: TrainJob) -> JobResult:
    """The :class:`JobResult` of a run's summary: its model loaded from the final checkpoint (CPU, eval)."""
    import torch  # noqa: PLC0415
    from ray.train import Checkpoint  # noqa: PLC0415

    if job.repo and job.repo not in sys.path:  # a declared trainer's module class, to unpickle the model
        sys.path.insert(0, job.repo)
    with Checkpoint(summary["checkpoint"]).as_directory() as d:
        model = torch.load(Path(d) / "model.pt", map_location="cpu", weights_only=False)
    return JobResult(model.cpu().eval(), list(summary["history"]), summary["device"], float(summary["seconds"]),
                     int(summary["started_us"]), int(summary["finished_us"]), int(summary["resumed_from_epoch"]),
                     int(summary["restarts"]))


# --- launchers ------------------------------------------------------------------------------------------------

class Launcher(ABC):
    @abstractmethod
    def run(self, train_df: pd.DataFrame, valid_df: pd.DataFrame, job: TrainJob) -> JobResult: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class LocalLauncher(Launcher):
    """Runs the job in this process (tests of the controller logic, no Ray)."""

    def run(self, train_df: pd.DataFrame, valid_df: pd.DataFrame, job: TrainJob) -> JobResult:
        return train_job(train_df, valid_df, job)


def init_ray(address: str | None = None) -> bool:
    """Connect to ``address`` or start a local Ray of our own (2 CPUs, no dashboard; never a cluster that
    ``ray start`` left on this machine) unless Ray is up; True when this call started or joined it. Imports
    what a Ray Train run needs on the driver, so the first job does not pay for it."""
    import ray  # noqa: PLC0415

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        for k, v in {**TRAIN_ENV, **LOCAL_TRAIN_ENV}.items():
            os.environ.setdefault(k, v)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    import ray.data  # noqa: F401, PLC0415 - a Ray Train run reads Ray Data's context on the driver
    import ray.train.torch  # noqa: F401, PLC0415
    return True


class RayTrainLauncher(Launcher):
    """Each job is a Ray Train ``TorchTrainer`` run named by ``job.run_name``, on this process's Ray."""

    def __init__(self, settings: Settings):
        import ray  # noqa: PLC0415

        self.rs = RunSettings.of(settings)
        self.started = init_ray(settings.ray_address)
        log.info("Ray ready: %s (training on %s, %d worker(s))", ray.cluster_resources(),
                 "GPU" if use_gpu(ray.cluster_resources(), self.rs.gpu) else "CPU", self.rs.workers)

    def run(self, train_df: pd.DataFrame, valid_df: pd.DataFrame, job: TrainJob) -> JobResult:
        return load_result(fit_on_ray(train_df, valid_df, job, self.rs), job)

    def close(self) -> None:
        import ray  # noqa: PLC0415

        if self.started:
            ray.shutdown()


class RayJobsLauncher(Launcher):
    """Each job is a Ray job (submission id = the run name; ``<name>-2``… for attempts after a failed one)
    whose entrypoint runs :func:`fit_on_ray` on the cluster. Its inputs and result travel through the run
    storage, which the controller and every Ray node must reach. A run that is already submitted (a
    controller restarted mid-job) is waited for, not submitted again."""

    TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}

    def __init__(self, settings: Settings, python: str = "python", poll_s: float = 1.0):
        from ray.job_submission import JobSubmissionClient  # noqa: PLC0415

        self.rs = RunSettings.of(settings)
        self.client = JobSubmissionClient(settings.ray_address)
        self.python, self.poll_s = python, poll_s

    def _latest(self, name: str) -> tuple[int, str | None]:
        """(attempt number, status) of the newest submission of run ``name``; (0, None) when none."""
        n, status = 0, None
        while True:
            try:
                info = self.client.get_job_info(self.submission_id(name, n + 1))
            except RuntimeError as e:  # the SDK raises RuntimeError on any failed request
                if "404" not in str(e):
                    raise
                return n, status
            n, status = n + 1, str(info.status.value)

    @staticmethod
    def submission_id(name: str, attempt: int) -> str:
        return name if attempt == 1 else f"{name}-{attempt}"

    def submit(self, train_df: pd.DataFrame, valid_df: pd.DataFrame, job: TrainJob) -> str:
        """The submission id of run ``job.run_name``'s live or finished attempt, submitting one when there is
        none or the newest failed."""
        name = job.name
        attempt, status = self._latest(name)
        if status is not None and status != "FAILED" and status != "STOPPED":
            log.info("Ray job %s is %s: attaching", self.submission_id(name, attempt), status)
            return self.submission_id(name, attempt)
        sid, job_dir = self.submission_id(name, attempt + 1), _job_dir(self.rs.storage, name)
        for part, df in (("train", train_df), ("valid", valid_df)):
            buf = io.BytesIO()
            df.to_parquet(buf, index=False)
            _write(f"{job_dir}/{part}.parquet", buf.getvalue())
        _write(f"{job_dir}/job.json", json.dumps({"job": dataclasses.asdict(job) | {"run_name": name},
                                                  "settings": dataclasses.asdict(self.rs)}).encode())
        runtime_env = {"working_dir": job.repo} if job.repo and Path(job.repo).is_dir() else None
        self.client.submit_job(entrypoint=f"{self.python} -m driftloop.retrain.launcher {job_dir} {sid}",
                               submission_id=sid, runtime_env=runtime_env,
                               metadata={"driftloop_model": job.model, "driftloop_run": name})
        log.info("submitted Ray job %s", sid)
        return sid

    def wait(self, sid: str, timeout_s: float | None = None) -> str:
        """The job's terminal status."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while (status := str(self.client.get_job_status(sid).value)) not in self.TERMINAL:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"Ray job {sid} still {status} after {timeout_s} s")
            time.sleep(self.poll_s)
        return status

    def run(self, train_df: pd.DataFrame, valid_df: pd.DataFrame, job: TrainJob) -> JobResult:
        job = dataclasses.replace(job, run_name=job.name)
        sid = self.submit(train_df, valid_df, job)
        status = self.wait(sid)
        if status != "SUCCEEDED":
            info = self.client.get_job_info(sid)
            tail = self.client.get_job_logs(sid)[-2000:]
            raise RuntimeError(f"Ray job {sid} {status}: {info.message}\n{tail}")
        raw = _read(f"{_job_dir(self.rs.storage, job.run_name)}/result-{sid}.json")
        if raw is None:
            raise RuntimeError(f"Ray job {sid} succeeded without writing its result")
        return load_result(json.loads(raw), job)


def make_launcher(settings: Settings) -> Launcher:
    """The Ray Jobs launcher on a cluster (``DRIFTLOOP_RAY_ADDRESS``), a local Ray Train launcher otherwise."""
    return RayJobsLauncher(settings) if settings.ray_address else RayTrainLauncher(settings)


def main(argv: list[str]) -> None:
    """A Ray job's entrypoint: ``python -m driftloop.retrain.launcher JOB_DIR SUBMISSION_ID``."""
    job_dir, sid = argv[0], argv[1]
    spec = json.loads(_read(f"{job_dir}/job.json") or b"{}")
    job, rs = TrainJob(**spec["job"]), RunSettings(**spec["settings"])
    frames = [pd.read_parquet(io.BytesIO(_read(f"{job_dir}/{p}.parquet") or b"")) for p in ("train", "valid")]
    init_ray(os.environ.get("RAY_ADDRESS") or "auto")  # the cluster the job runs on
    summary = fit_on_ray(frames[0], frames[1], job, rs)
    _write(f"{job_dir}/result-{sid}.json", json.dumps(summary).encode())


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main(sys.argv[1:])
