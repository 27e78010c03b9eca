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


@contextlib.contextmanager
def redis_server(password: str | None = None) -> Iterator[str]:
    """``host:port`` of a fresh in-memory redis-server (``,password=…`` appended when it requires one)."""
    exe = _find("redis-server")
    if exe is None:
        pytest.skip("redis-server not installed (apt-get install redis-server; .ci/run does this)")
    port = free_port()
    auth = ["--requirepass", password] if password else []
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             *auth], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        import redis

        r = redis.Redis(host="127.0.0.1", port=port, password=password)
        deadline = time.monotonic() + 20
        while True:
            try:
                r.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
        yield f"127.0.0.1:{port}" + (f",password={password}" if password else "")
    finally:
        proc.terminate()
        proc.wait(10)


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
