"""A throwaway PostgreSQL server for the upstream store tests (session-scoped), from the Debian binaries.

``initdb`` into a fresh folder under /tmp, ``pg_ctl start`` on a free loopback
port (its socket in that folder, fsync off: nothing here needs to survive),
run as the ``postgres`` user when the tests run as root (the server refuses
root). Each test gets its own database (``pg_url``). Without the binaries
the PostgreSQL tests skip locally and FAIL in CI (``CI`` set): `.ci/run`
installs the ``postgresql`` package, so a missing server there is a defect.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from tests.upstream_helpers import free_port


def pg_bindir() -> Path | None:
    """Where initdb and pg_ctl are: $FITBENCH_PG_BIN, the newest /usr/lib/postgresql/*/bin, or $PATH."""
    candidates = [os.environ.get("FITBENCH_PG_BIN", "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True)
    which = shutil.which("pg_ctl")
    candidates.append(str(Path(which).parent) if which else "")
    for folder in filter(None, candidates):
        if (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    return None


def _missing(why: str):
    if os.environ.get("CI"):
        pytest.fail(f"{why}: CI must run the PostgreSQL store tests (.ci/run installs the postgresql package)")
    pytest.skip(f"{why} (apt-get install postgresql); CI runs these")


class NoPostgres(Exception):
    """No server can be started here: the reason."""


@contextlib.contextmanager
def throwaway_postgres(fsync: bool = False):
    """Start a PostgreSQL server in a fresh folder under /tmp on a free loopback port; yields its base URL
    (no database: append /postgres or one you create) and removes everything on exit. Used by the tests
    and by bench/upstream_scale.py. Raises NoPostgres when there are no binaries or no user to run them."""
    bindir = pg_bindir()
    if bindir is None:
        raise NoPostgres("no PostgreSQL binaries (initdb, pg_ctl)")
    root = Path(tempfile.mkdtemp(prefix="fitbench-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root: run it as the package's user
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root, ignore_errors=True)
            raise NoPostgres("running as root and there is no 'postgres' user to run the server as") from None
        os.chown(root, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, log, port = root / "data", root / "server.log", free_port()

    def run(*args: str) -> None:
        done = subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120)
        if done.returncode:
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{Path(args[0]).name} failed ({done.returncode}): {done.stderr[-2000:]} {tail}")

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "fitbench", "--auth=trust", "-E", "UTF8", "--no-sync")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
            f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync={'on' if fsync else 'off'} "
            "-c max_connections=200", "start")
        yield f"postgresql://fitbench@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def create_database(base_url: str, name: str | None = None) -> str:
    """A fresh, empty database on the server at ``base_url``; its URL."""
    import psycopg

    name = name or f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{base_url}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"{base_url}/{name}"


@pytest.fixture(scope="session")
def postgres_server():
    """The base URL (no database) of a PostgreSQL server that lives as long as the test session."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _missing("psycopg is not installed (the upstream extra)")
    try:
        with throwaway_postgres() as url:
            yield url
    except NoPostgres as exc:
        _missing(str(exc))


@pytest.fixture
def pg_url(postgres_server):
    """A fresh, empty database on the session's server, for one test."""
    return create_database(postgres_server)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_target(request, tmp_path):
    """Where a Store lives, once per backend: a SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        return tmp_path / "up.sqlite"
    return request.getfixturevalue("pg_url")
