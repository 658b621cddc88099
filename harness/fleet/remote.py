"""The Ray task that runs one case on an agent node, through ``suite.run_case``.

Inside the task nothing changes from a local run: the case runs in its own
``python -m harness.worker`` child, sampled and judged by the same code, on
this node's own fingerprint (with the class the node advertises). The task
returns plain rows and timeline columns; the driver writes them. Whatever
goes wrong in here becomes rows too, so only the loss of the node or of the
task's process itself is left to Ray (which retries the task).
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

MODELS_DIR_ENV = "FITBENCH_MODELS_DIR"
PROGRESS_EVERY_S = 1.0  # how often a running case reports its phase and memory to the progress actor


def resolve_artifact(path: Path) -> Path | None:
    """The artifact on this node: the scenario's path if it is here, else the same name in the agent's models dir."""
    if path.exists():
        return path
    models_dir = os.environ.get(MODELS_DIR_ENV)
    if models_dir and (Path(models_dir) / path.name).exists():
        return Path(models_dir) / path.name
    return None


# What Ray sets in its worker processes that a local run would not have; the case's child must see the
# node's own environment (OMP_NUM_THREADS=1 would make a torch case single-threaded on a fleet node only).
RAY_WORKER_ENV = ("OMP_NUM_THREADS",)


def node_environment(parent_env: dict[str, str] | None = None, parent_nice: int | None = None) -> None:
    """Undo Ray's worker settings in this process (its children inherit them): take the values the
    agent's raylet (this worker's parent, started by the user) has, or remove them. Ray also runs its
    workers at niceness 15 (``fitbench fleet agent`` sets RAY_worker_niceness=0); a case measured at a
    lower priority than a local run would be slower for no reason of its own."""
    if parent_env is None or parent_nice is None:
        try:
            import psutil

            parent = psutil.Process(os.getppid())
            parent_env = parent.environ() if parent_env is None else parent_env
            parent_nice = parent.nice() if parent_nice is None else parent_nice
        except Exception:  # unreadable parent: dropping Ray's value is still closer to a local run
            parent_env = {} if parent_env is None else parent_env
    for key in RAY_WORKER_ENV:
        if key in parent_env:
            os.environ[key] = parent_env[key]
        else:
            os.environ.pop(key, None)
    if parent_nice is not None and hasattr(os, "getpriority") and os.getpriority(os.PRIO_PROCESS, 0) > parent_nice:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, parent_nice)
        except OSError:
            pass  # raising priority needs privileges; the agent's RAY_worker_niceness=0 is the real fix


def run_case_on_node(case: Any, machine_class: str, run_id: str, force: bool, progress: Any | None,
                     node_id: str) -> dict[str, Any]:
    """Run ``case`` here; returns {rows, timeline, status, error, wall_s, node_id, hostname}."""
    from harness.artifact import ArtifactError, inspect_artifact
    from harness.measure.machine import fingerprint
    from harness.rows import failure_row
    from harness.suite import ArtifactHashes, CaseResult, SuiteInterrupted, obviously_too_big, run_case

    node_environment()
    hostname = socket.gethostname()
    machine = replace(fingerprint(), machine_class=machine_class)
    t0 = time.perf_counter()
    _tell(progress, "case_started", node_id, hostname, machine_class, case.key, case.label, case.model_label)
    hashes = _hashes(ArtifactHashes)

    def failure(status: str, error: str, info: Any | None = None) -> dict[str, Any]:
        row = failure_row(case, machine, run_id, status, error, artifact=info,
                          sha256=hashes.get(info.path) if info is not None else None)
        return _result([row], {}, status, error, t0, node_id, hostname)

    artifact = resolve_artifact(case.artifact)
    if artifact is None:
        where = os.environ.get(MODELS_DIR_ENV)
        return failure("unavailable", f"artifact {case.artifact.name} is not on node {hostname} (looked at {case.artifact}"
                       + (f" and in {where}" if where else "") + "); copy it there or start the agent with --models-dir")
    case = replace(case, artifact=artifact)
    try:
        info = inspect_artifact(artifact)
    except ArtifactError as exc:
        return failure("load_error", str(exc))
    too_big = None if force else obviously_too_big(case, info)
    if too_big:
        return failure("skipped", too_big, info)

    last = [0.0, ""]

    def on_progress(p: Any) -> None:
        now = time.perf_counter()
        if p.phase != last[1] or now - last[0] >= PROGRESS_EVERY_S:
            last[:] = [now, p.phase]
            _tell(progress, "case_phase", node_id, p.phase, p.repetition, case.repetitions, p.rss)

    try:
        result: CaseResult = run_case(case, info, machine, run_id, hashes, on_progress)
    except SuiteInterrupted as stop:  # the driver cancelled the task (Ctrl-C): its rows say so
        result = stop.args[0]
    except Exception as exc:  # a bug must cost one case, not the run
        return failure("runtime_error", f"fitbench failed on node {hostname}: {exc!r} "
                       f"[{traceback.format_exc(limit=2).splitlines()[-1]}]", info)
    return _result(result.rows, result.timeline_columns(run_id), result.status, result.error, t0, node_id, hostname)


_HASHES: list = []


def _hashes(factory: Any) -> Any:
    """One sha256 cache per Ray worker process: Ray reuses it for the next case, which then skips
    re-reading a multi-GB artifact (the cache key has size and mtime, so a changed file is hashed again)."""
    if not _HASHES:
        _HASHES.append(factory())
    return _HASHES[0]


def _result(rows: list[dict], timeline: dict, status: str, error: str | None, t0: float, node_id: str,
            hostname: str) -> dict[str, Any]:
    for row in rows:
        row["fleet_node_id"] = node_id
    return {"rows": rows, "timeline": timeline, "status": status, "error": error,
            "wall_s": time.perf_counter() - t0, "node_id": node_id, "hostname": hostname}


def _tell(progress: Any | None, method: str, *args: Any) -> None:
    """Fire-and-forget to the progress actor; progress must never fail a case."""
    if progress is None:
        return
    try:
        getattr(progress, method).remote(*args)
    except Exception:
        pass


def task_body(case: Any, machine_class: str, run_id: str, force: bool, progress: Any | None) -> dict[str, Any]:
    """Entry point of the Ray task (wrapped with ``ray.remote`` by the driver)."""
    import ray

    return run_case_on_node(case, machine_class, run_id, force, progress, ray.get_runtime_context().get_node_id())
