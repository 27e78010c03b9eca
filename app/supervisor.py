"""The embedded stack behind ``driftloop up``: feature repo, broker, topics, and each worker as a
supervised child process (restarted with backoff if it crashes, at once if it exits to pick up new
declarations). ``<data-dir>/stack.json`` is written once everything is ready and removed on stop."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from driftloop.app.stackinfo import StackRunning, alive, hold_stack_lock, running_message, stack_locked
from driftloop.core.broker import EmbeddedBroker, free_port
from driftloop.core.settings import Settings
from driftloop.core.topics import ensure_topics
from driftloop.core.worker import RESTART_EXIT
from driftloop.drift.auth import load_or_create_token, token_path
from driftloop.features.repo import apply

log = logging.getLogger(__name__)

WORKERS = ("streams", "serving", "drift", "retrain")
MAX_BACKOFF_S = 30.0


@dataclass
class Child:
    name: str
    env: dict[str, str]
    log_file: Path
    proc: subprocess.Popen | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = field(default=0.0)
    argv: list[str] | None = None  # default: ``driftloop worker NAME``

    def start(self) -> None:
        out = open(self.log_file, "ab")  # noqa: SIM115 - the child owns it
        argv = self.argv or [sys.executable, "-m", "driftloop.app.cli", "worker", self.name]
        self.proc = subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.started_at = time.monotonic()
        log.info("started %s (pid %d)", self.name, self.proc.pid)

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds."""
        self.signal_group(signal.SIGTERM)
        if self.proc is not None:
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.signal_group(signal.SIGKILL)
                self.proc.wait()

    def signal_group(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as DRIFTLOOP_* variables, so children see exactly what the parent sees."""
    env = dict(os.environ)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # Feast points it at a temp dir that dies with this process
    for k, v in settings.model_dump().items():
        if v is None:
            continue
        if k == "data_dir":
            v = settings.root
        elif k == "repo":
            v = settings.feature_repo_dir
        env[f"DRIFTLOOP_{k.upper()}"] = json.dumps(v) if isinstance(v, (dict, list)) else str(v)
    return env


class Stack:
    def __init__(self, settings: Settings, workers: tuple[str, ...] = WORKERS):
        self.s = settings
        self.workers = workers
        self.broker: EmbeddedBroker | None = None
        self.children: list[Child] = []
        self.info: dict[str, Any] = {}
        self.stopping = False
        self.topics_for: float | None = None  # the declarations' mtime the topics were last ensured for
        self.lock: Any = None  # the data directory's stack lock while this stack runs

    def start(self, timeout: float = 180.0) -> dict[str, Any]:
        self.lock = hold_stack_lock(self.s)  # held until stop(): one stack per data directory
        try:
            return self._start(timeout)
        except BaseException:
            self.lock.close()
            raise

    def _start(self, timeout: float) -> dict[str, Any]:
        if self.s.stack_file.exists():
            self.s.stack_file.unlink()  # left by a stack that was killed
        logs = self.s.root / "logs"
        logs.mkdir(exist_ok=True)
        from driftloop.registry.versions import init_store  # noqa: PLC0415 - MLflow is slow to import

        apply(self.s)  # first: a repo with problems starts nothing (RepoError)
        if not self.s.bootstrap_servers:
            self.broker = EmbeddedBroker(log_file=logs / "broker.log").start()
            self.s = self.s.model_copy(update={"bootstrap_servers": self.broker.bootstrap_servers})
        try:
            self.ensure_topics()
        except ValueError as e:  # a model's scored and label topics differ in partition count
            self.stop()
            raise RuntimeError(str(e)) from e
        init_store(self.s)
        for f in self.s.run_dir.glob("*.ready"):
            f.unlink()
        webhook_port = self.s.webhook_port or free_port(self.s.webhook_host)
        load_or_create_token(self.s)  # before the workers: the drift worker reads it, users read stack.json
        token_file = "(DRIFTLOOP_WEBHOOK_TOKEN)" if self.s.webhook_token else token_path(self.s)
        host = "127.0.0.1" if self.s.webhook_host in ("0.0.0.0", "::") else self.s.webhook_host
        metrics_ports = {}
        for name in self.workers:
            metrics_ports[name] = free_port()
            s = self.s.model_copy(update={"metrics_port": metrics_ports[name], "webhook_port": webhook_port})
            self.children.append(Child(name, settings_env(s), logs / f"{name}.log"))
        if threading.current_thread() is threading.main_thread():  # SIGTERM while starting stops the children too
            signal.signal(signal.SIGTERM, _exit_on_term)
        try:
            for c in self.children:
                c.start()
            deadline = time.monotonic() + timeout
            while not all((self.s.run_dir / f"{c.name}.ready").exists() for c in self.children):
                self.supervise_once()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"workers not ready after {timeout}s; see {logs}")
                time.sleep(0.2)
        except BaseException:
            self.stop()
            raise
        self.info = {
            "bootstrap_servers": self.s.bootstrap_servers,
            "embedded_broker": self.broker is not None,
            "mlflow_uri": self.s.tracking_uri,
            "webhook_url": f"http://{host}:{webhook_port}/v1/alerts",
            "webhook_routes": {r or "generic": f"http://{host}:{webhook_port}/v1/alerts{r}"
                               for r in ("", "/alertmanager", "/grafana")},
            "webhook_docs": f"http://{host}:{webhook_port}/docs",
            "webhook_token_file": str(token_file),
            "metrics_ports": metrics_ports,
            "workers": {c.name: c.proc.pid for c in self.children if c.proc},
            "restarts": {c.name: c.restarts for c in self.children},
            "supervisor_pid": os.getpid(),
            "data_dir": str(self.s.root),
            "topic_prefix": self.s.topic_prefix,
        }
        self.s.stack_file.write_text(json.dumps(self.info, indent=2))
        log.info("stack ready: %s", self.s.stack_file)
        return self.info

    def ensure_topics(self) -> None:
        """driftloop's topics and the declared ones (core.topics); ValueError on a partition mismatch."""
        self.topics_for = self._declarations_stamp()
        ensure_topics(self.s)

    def _declarations_stamp(self) -> float | None:
        f = self.s.declarations_file
        return f.stat().st_mtime if f.exists() else None

    def supervise_once(self) -> None:
        """Restart crashed workers with exponential backoff, and workers that exited to pick up new
        declarations (``RESTART_EXIT``) at once."""
        now = time.monotonic()
        for c in self.children:
            if self.stopping or c.proc is None or c.proc.poll() is None:
                continue
            if c.proc.returncode == RESTART_EXIT and c.next_start == 0.0:
                log.info("%s exited to pick up new declarations; restarting it", c.name)
                if self._declarations_stamp() != self.topics_for:  # a model added while running may bring topics
                    try:
                        self.ensure_topics()
                    except (ValueError, RuntimeError, TimeoutError) as e:
                        log.error("topics of the new declarations: %s", e)
                self.restart(c)
                continue
            if c.next_start == 0.0:
                if now - c.started_at > 60:
                    c.restarts = 0
                delay = min(MAX_BACKOFF_S, 2.0 ** c.restarts)
                c.next_start = now + delay
                log.warning("%s exited with %s; restarting in %.0fs", c.name, c.proc.returncode, delay)
            elif now >= c.next_start:
                c.restarts += 1
                c.next_start = 0.0
                self.restart(c)

    def restart(self, c: Child) -> None:
        c.start()
        if self.info:
            self.info["workers"][c.name] = c.proc.pid  # type: ignore[union-attr]
            self.info["restarts"][c.name] = self.info["restarts"].get(c.name, 0) + 1
            self.s.stack_file.write_text(json.dumps(self.info, indent=2))

    def run_forever(self) -> None:
        def _stop(*_: object) -> None:
            self.stopping = True

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        try:
            while not self.stopping:
                self.supervise_once()
                time.sleep(0.5)
        finally:
            self.stop()

    def stop(self, grace: float = 15.0) -> None:
        self.stopping = True
        for c in self.children:
            c.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for c in self.children:
            if c.proc is None:
                continue
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs: SIGKILL", c.name, grace)
            c.signal_group(signal.SIGKILL)
            c.proc.wait()
        if self.broker:
            self.broker.stop()
        f = self.s.stack_file
        if f.exists() and json.loads(f.read_text()).get("supervisor_pid") == os.getpid():
            f.unlink()
        if self.lock is not None:
            self.lock.close()  # releases the data directory for the next stack
        log.info("stack stopped")


def _exit_on_term(*_: object) -> None:
    raise SystemExit(143)


def start_detached(settings: Settings, timeout: float = 180.0,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Start ``driftloop up`` in the background and return stack.json once it is ready; ``progress`` hears
    which workers are ready as that changes."""
    if stack_locked(settings):
        raise StackRunning(running_message(settings))
    logs = settings.root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if settings.stack_file.exists():
        settings.stack_file.unlink()
    out = open(logs / "supervisor.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "driftloop.app.cli", "up", "--timeout", str(timeout)],
                            env=settings_env(settings), stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    deadline, t0, said = time.monotonic() + timeout + 15, time.monotonic(), ""
    while time.monotonic() < deadline:
        if settings.stack_file.exists():
            return json.loads(settings.stack_file.read_text())
        ready = sorted(f.stem for f in settings.run_dir.glob("*.ready")) if settings.run_dir.exists() else []
        line = f"workers ready: {', '.join(ready) or 'none yet'} ({len(ready)}/{len(WORKERS)})"
        if progress and line != said:
            said = line
            progress(f"{line} after {time.monotonic() - t0:.0f}s")
        if proc.poll() is not None:
            out.close()
            tail = (logs / "supervisor.log").read_text(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(f"driftloop up exited with {proc.returncode}; see {logs / 'supervisor.log'}:\n"
                               + "\n".join(tail))
        time.sleep(0.3)
    proc.terminate()  # a stack that never became ready must not run on unseen (its supervisor stops its children)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    out.close()
    raise TimeoutError(f"stack not ready after {timeout}s; see {logs}")


def stop_stack(settings: Settings, timeout: float = 30.0) -> bool:
    """Stop a stack started by ``driftloop up``: SIGTERM its supervisor and wait for every worker."""
    if not settings.stack_file.exists():
        print(f"no stack running ({settings.stack_file} not found)")
        return True
    info = json.loads(settings.stack_file.read_text())
    pids = [info["supervisor_pid"], *info.get("workers", {}).values()]
    if alive(info["supervisor_pid"]):
        os.kill(info["supervisor_pid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for p in pids:
        if alive(p):
            try:
                os.killpg(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGKILL)
    if settings.stack_file.exists():
        settings.stack_file.unlink()
    print("stack stopped")
    return True
