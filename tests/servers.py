"""Throwaway Redis and PostgreSQL servers on loopback for the scale-out store tests.

Each starts from the binaries on this machine (``.ci/run`` installs redis-server when it can) and stops
at the end; a missing binary skips the tests that need it, saying which and how to get it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

from driftloop.core.broker import free_port


def _find(name: str) -> str | None:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None)
    return found


class RedisServer:
    """A redis-server on loopback (appending to a file under ``dir`` when given, so a restart keeps the data)."""

    def __init__(self, password: str | None = None, dir: str | None = None):
        exe = _find("redis-server")
        if exe is None:
            pytest.skip("redis-server not installed (apt-get install redis-server; .ci/run does this)")
        self.exe, self.password, self.dir, self.port = exe, password, dir, free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The ``redis_url`` setting: ``host:port`` (``,password=…`` when it requires one)."""
        return f"127.0.0.1:{self.port}" + (f",password={self.password}" if self.password else "")

    def start(self) -> RedisServer:
        import redis

        persist = ["--dir", self.dir, "--appendonly", "yes", "--appendfsync", "always"] if self.dir else \
            ["--appendonly", "no"]
        auth = ["--requirepass", self.password] if self.password else []
        self.proc = subprocess.Popen([self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      *persist, *auth], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        r = redis.Redis(host="127.0.0.1", port=self.port, password=self.password)
        deadline = time.monotonic() + 20
        while True:
            try:
                r.ping()
                return self
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@contextlib.contextmanager
def redis_server(password: str | None = None) -> Iterator[str]:
    """``redis_url`` of a fresh in-memory redis-server."""
    server = RedisServer(password).start()
    try:
        yield server.url
    finally:
        server.stop()


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A SQLAlchemy URL (psycopg 3) of a fresh PostgreSQL cluster (run as ``postgres`` when we are root)."""
    initdb, pg_ctl = _find("initdb"), _find("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found (apt-get install postgresql)")
    as_user: list[str] = []
    data = tempfile.mkdtemp(prefix="dl-pg-")
    if os.geteuid() == 0:  # postgres refuses to run as root
        runuser = shutil.which("runuser")
        if runuser is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
        shutil.chown(data, "postgres")
        as_user = [runuser, "-u", "postgres", "--"]
    port = free_port()
    subprocess.run([*as_user, initdb, "-D", data, "-A", "trust", "-U", "postgres"], check=True,
                   capture_output=True)
    opts = f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run([*as_user, pg_ctl, "-D", data, "-o", opts, "-l", f"{data}/log", "-w", "start"], check=True,
                   capture_output=True)
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)
