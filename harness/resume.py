"""Resuming a suite: which cases a results file already holds, and a lock per results file.

A case is done when its results hold as many ``ok`` repetitions as the case
asks for, or a final failure (load error, OOM, crash, timeout, ... — running
it again would only repeat it). Interrupted cases and half-finished ones are
dropped and run again, so the resumed file ends with the rows an
uninterrupted run would have written, each exactly once.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from harness.results import ResultsError, read_results, timeline_path_for
from harness.scenario import Case

RETRY_STATUSES = {"interrupted", "lost"}  # lost: a fleet node died with the case


def latest_results(output_dir: Path, scenario: str) -> Path | None:
    candidates = [p for p in output_dir.glob(f"{scenario}-*.parquet") if not p.name.endswith(".timeline.parquet")]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def done_case_keys(rows: list[dict[str, Any]], cases: list[Case]) -> set[str]:
    wanted = {c.key: c.repetitions for c in cases}
    ok: dict[str, set] = {}
    failed: set[str] = set()
    for row in rows:
        key = row.get("case_key")
        if row.get("turn") is not None:
            continue  # a workflow's turns: its session is done when the case-level row is there
        if row.get("status") == "ok":
            ok.setdefault(key, set()).add(row.get("repetition"))
        elif row.get("status") not in RETRY_STATUSES:
            failed.add(key)
    return {k for k, reps in wanted.items() if len(ok.get(k, ())) >= reps or k in failed}


def load_for_resume(path: Path, cases: list[Case]) -> tuple[str, list[dict], pa.Table | None, set[str]]:
    """(run id, rows to keep, timeline to keep, keys of finished cases) from an earlier run's file."""
    table = read_results(path)
    rows = table.to_pylist()
    if not rows:
        raise ResultsError(f"{path} holds no rows; start a new run without --resume")
    run_id = rows[0]["run_id"]
    done = done_case_keys(rows, cases)
    keep = [r for r in rows if r.get("case_key") in done]
    timeline = None
    tl_path = timeline_path_for(path)
    if tl_path.exists():
        try:
            tl = pq.read_table(tl_path)
            timeline = tl.filter(pc.is_in(tl["case_key"], pa.array(sorted(done), pa.string())))
        except (OSError, pa.ArrowException):
            timeline = None  # the summary rows are what matter; a damaged timeline is not fatal
    return run_id, keep, timeline, done


class RunLock:
    """An exclusive lock next to a results file, so two runs never write the same file."""

    def __init__(self, results_path: Path) -> None:
        self.path = results_path.with_name(f".{results_path.name}.lock")
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise ResultsError(f"another fitbench run (pid {holder}) is writing "
                               f"{self.path.name.removeprefix('.').removesuffix('.lock')}; "
                               "wait for it or choose another -o") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)  # the file stays: unlinking it would race with a waiting run
