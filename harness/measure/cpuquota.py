"""A CPU quota on a running process: what a throttled laptop or a noisy neighbour does to a case.

Used to prove the drift flag on a real case (tests/test_drift_real.py) and
available to benches: ``open_cpu_quota(fraction)`` makes a child cgroup of
this process's own cpu cgroup whose processes may use ``fraction`` of the
machine's logical CPUs, and ``add(pid)`` moves a process (every thread of
it) there, mid-case if wanted. In order:

- ``cgroup-v1``: ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` under the v1
  cpu controller (as on the project's VM, as root);
- ``cgroup-v2``: ``cpu.max`` (``QUOTA PERIOD``) in a child of this process's
  cgroup (or, after a budget moved fitbench into its leaf, of the cgroup
  above it), once the cpu controller is handed to that cgroup's children;
  v2's no-internal-process rule allows that only in the true root or in a
  cgroup without processes of its own;
- ``None`` where neither can be made, with the reason (``QuotaUnavailable``).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from harness.errors import FitbenchError
from harness.measure.budget import CGROUP_ROOT, PARENT_LEAF, CgroupFiles, _own_cgroup, _read, _words

PERIOD_US = 100_000


class QuotaUnavailable(FitbenchError):
    """No cgroup cpu controller this process may write; the message says why."""


class CpuQuota:
    """One cgroup with a CPU quota; ``close`` moves its processes back out and removes it."""

    def __init__(self, path: Path, method: str, quota_us: int, period_us: int, files: CgroupFiles,
                 home: Path) -> None:
        self.path, self.method, self.quota_us, self.period_us = path, method, quota_us, period_us
        self.files, self.home = files, home  # home: where its processes go back to

    @property
    def cpus(self) -> float:
        return self.quota_us / self.period_us

    def add(self, pid: int) -> None:
        self.files.write(self.path / "cgroup.procs", str(pid))  # the whole thread group

    def close(self) -> None:
        for pid in _words(self.path / "cgroup.procs"):
            try:
                self.files.write(self.home / "cgroup.procs", pid)
            except OSError:
                pass  # already gone
        try:
            self.files.rmdir(self.path)
        except OSError:
            pass

    def __enter__(self) -> CpuQuota:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_cpu_quota(fraction: float, root: Path = CGROUP_ROOT, *, proc_cgroup: str | None = None,
                   files: CgroupFiles | None = None, cpus: int | None = None) -> CpuQuota:
    """A cgroup whose processes may use ``fraction`` of the ``cpus`` logical CPUs (0 < fraction <= 1).
    ``root``, ``proc_cgroup`` and ``files`` are for tests (tests/fake_cgroupfs.py)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"a CPU quota is a fraction of the machine between 0 and 1, got {fraction}")
    files = files or CgroupFiles()
    cpus = cpus or os.cpu_count() or 1
    quota = max(1000, int(fraction * cpus * PERIOD_US))  # the kernel's minimum quota is 1 ms
    if proc_cgroup is None:
        proc_cgroup = _read(Path("/proc/self/cgroup"))
    name = f"fitbench-quota-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    reasons = []
    v1_own = _own_cgroup(proc_cgroup, "cpu")
    v1_home = root / "cpu" / (v1_own or "").lstrip("/")
    if v1_own is not None and (v1_home / "cpu.cfs_quota_us").exists():
        path = v1_home / name
        try:
            files.mkdir(path)
            files.write(path / "cpu.cfs_period_us", str(PERIOD_US))
            files.write(path / "cpu.cfs_quota_us", str(quota))
            return CpuQuota(path, "cgroup-v1", quota, PERIOD_US, files, v1_home)
        except OSError as e:
            _remove(files, path)
            reasons.append(f"cgroup-v1: cannot set a quota under {v1_home}: {e.strerror or e}")
    v2_own = _own_cgroup(proc_cgroup, None)
    v2_base = root if (root / "cgroup.controllers").exists() else root / "unified"
    if v2_own is not None and (v2_base / "cgroup.controllers").exists():
        home = v2_base / v2_own.lstrip("/")
        parent = home.parent if home.name == PARENT_LEAF else home  # a budget moved fitbench into a leaf
        reason = _enable_cpu(parent, files)
        if reason:
            reasons.append(reason)
        else:
            path = parent / name
            try:
                files.mkdir(path)
                files.write(path / "cpu.max", f"{quota} {PERIOD_US}")
                return CpuQuota(path, "cgroup-v2", quota, PERIOD_US, files, home)
            except OSError as e:
                _remove(files, path)
                reasons.append(f"cgroup-v2: cannot set cpu.max under {parent}: {e.strerror or e}")
    raise QuotaUnavailable("; ".join(reasons) or "no cgroup cpu controller is mounted")


def _enable_cpu(parent: Path, files: CgroupFiles) -> str | None:
    """Hand the cpu controller to ``parent``'s children: allowed in the true root and in a cgroup
    without processes of its own (v2's no-internal-process rule); None when done, else why not."""
    if "cpu" in _words(parent / "cgroup.subtree_control"):
        return None
    if "cpu" not in _words(parent / "cgroup.controllers"):
        return f"cgroup-v2: the cpu controller is not available in {parent} (not delegated to it)"
    try:
        files.write(parent / "cgroup.subtree_control", "+cpu")
        return None
    except OSError as e:
        return (f"cgroup-v2: cannot enable the cpu controller for the children of {parent}: {e.strerror or e} "
                "(a budgeted run moves fitbench into a leaf first; or run fitbench in a cgroup of its own)")


def _remove(files: CgroupFiles, path: Path) -> None:
    try:
        files.rmdir(path)
    except OSError:
        pass
