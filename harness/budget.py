"""Memory budgets: put a case's worker under a cgroup memory limit where we may.

"Would this fit on a machine with N GB?" is answered best by running it with
N GB. Where a cgroup memory controller is mounted and writable (v2, or v1
as on this kind of Linux VM), the worker joins a fresh child cgroup with
that limit, so the kernel evicts mmapped weights, swaps or OOM-kills it
exactly as on a smaller machine. Elsewhere the budget is only a yardstick
for classification, and every row says which (``budget_method``).

Page-cache pages already charged to another cgroup are not charged again,
so the artifact's cached pages are dropped before a budgeted case, or the
model would look resident for free.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


class CgroupBudget:
    """One child cgroup with a memory limit; ``method`` is 'cgroup-v1' or 'cgroup-v2'."""

    def __init__(self, path: Path, method: str, limit_bytes: int) -> None:
        self.path, self.method, self.limit_bytes = path, method, limit_bytes

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def oom_killed(self) -> bool:
        """Did the kernel OOM-kill something in this cgroup?"""
        name = "memory.oom_control" if self.method == "cgroup-v1" else "memory.events"
        try:
            for line in (self.path / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and int(value) > 0:
                    return True
        except OSError:
            pass
        return False

    def close(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass  # still busy (a leftover process): the next run's cleanup or a reboot removes it


def _own_cgroup(controller: str | None) -> str | None:
    """This process's cgroup path for a v1 controller, or the v2 path (controller None)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controller is None and controllers == "":
            return path
        if controller is not None and controller in controllers.split(","):
            return path
    return None


def create_budget(limit_bytes: int, root: Path = CGROUP_ROOT) -> CgroupBudget | None:
    """A cgroup limiting memory to ``limit_bytes``, or None where none can be made."""
    name = f"fitbench-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    v1_own = _own_cgroup("memory")
    v1_base = root / "memory"
    if v1_own is not None and (v1_base / "memory.limit_in_bytes").exists():
        budget = _try_make(v1_base / v1_own.lstrip("/") / name, "memory.limit_in_bytes", "cgroup-v1", limit_bytes)
        if budget:
            return budget
    v2_own = _own_cgroup(None)
    v2_base = root if (root / "cgroup.controllers").exists() else root / "unified"
    if v2_own is not None and (v2_base / "cgroup.controllers").exists():
        parent = v2_base / v2_own.lstrip("/")
        try:
            if "memory" in (parent / "cgroup.controllers").read_text().split():
                subtree = parent / "cgroup.subtree_control"
                if "memory" not in subtree.read_text().split():
                    subtree.write_text("+memory")
        except OSError:
            return None
        return _try_make(parent / name, "memory.max", "cgroup-v2", limit_bytes)
    return None


def _try_make(path: Path, limit_file: str, method: str, limit_bytes: int) -> CgroupBudget | None:
    try:
        path.mkdir()
    except OSError:
        return None
    try:
        (path / limit_file).write_text(str(limit_bytes))
    except OSError:
        try:
            path.rmdir()
        except OSError:
            pass
        return None
    return CgroupBudget(path, method, limit_bytes)


def drop_cached_pages(path: Path) -> None:
    """Ask the kernel to forget the file's cached pages (so a budgeted case pays to read them).
    A folder artifact (ONNX, MLX, Hugging Face) drops every file in it."""
    if path.is_dir():
        from harness.artifact import folder_files

        for file in folder_files(path):
            drop_cached_pages(file)
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        # Dirty pages (a freshly downloaded or extracted model) cannot be dropped until written back.
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except (OSError, AttributeError):
        pass
    finally:
        os.close(fd)
