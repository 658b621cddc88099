"""Memory budgets: put a case's worker under a memory limit where we may.

"Would this fit on a machine with N GB?" is answered best by running it with
N GB. The worker joins a fresh cgroup with that limit, so the kernel evicts
mmapped weights or OOM-kills it exactly as on a smaller machine. Swap is
limited to nothing, or a budget could be met by swapping. In order:

- ``cgroup-v1``: a child of fitbench's own memory cgroup (as on this VM, as root);
- ``cgroup-v2``: v2 forbids processes in a cgroup that hands controllers to
  its children ("no internal processes"), so fitbench first moves itself
  into a leaf ``<own>/fitbench-parent``, then enables the memory controller
  in ``<own>`` and makes each case a sibling ``<own>/fitbench-case-<id>``
  (needs root or a delegated cgroup; undone at exit);
- ``systemd-scope``: a transient ``systemd --user`` scope with ``MemoryMax``,
  for a user with neither;
- ``none``: the budget is only a yardstick for classification; ``note`` says why.

Every row says which (``budget_method``). Page-cache pages already charged to
another cgroup are not charged again, so the artifact's cached pages are
dropped before a budgeted case, or the model would look resident for free.
"""

from __future__ import annotations

import atexit
import errno
import functools
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Callable

CGROUP_ROOT = Path("/sys/fs/cgroup")
PARENT_LEAF = "fitbench-parent"  # where fitbench moves itself on cgroup v2
CASE_PREFIX = "fitbench-case-"
SYSTEMD_TIMEOUT_S = 10


class CgroupFiles:
    """The writes a budget makes to a cgroup tree, in one place so a test can stand in for the kernel."""

    def write(self, path: Path, text: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)  # no O_CREAT: a missing control file is an error
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    def mkdir(self, path: Path) -> None:
        path.mkdir()

    def rmdir(self, path: Path) -> None:
        path.rmdir()


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _words(path: Path) -> list[str]:
    return (_read(path) or "").split()


class NoBudget:
    """No enforcement: the budget only judges. ``note`` says why none could be made."""

    method = "none"
    enforced = False

    def __init__(self, limit_bytes: int, note: str | None = None) -> None:
        self.limit_bytes, self.note = limit_bytes, note

    def add(self, pid: int) -> None:
        pass

    def oom_killed(self) -> bool:
        return False

    def peak_bytes(self) -> int | None:
        return None

    def close(self) -> None:
        pass


class CgroupBudget(NoBudget):
    """One cgroup with a memory limit; ``method`` is 'cgroup-v1' or 'cgroup-v2'."""

    enforced = True

    def __init__(self, path: Path | None, method: str, limit_bytes: int, files: CgroupFiles | None = None,
                 note: str | None = None) -> None:
        super().__init__(limit_bytes, note)
        self.path, self.method, self.files = path, method, files or CgroupFiles()

    def add(self, pid: int) -> None:
        self.files.write(self.path / "cgroup.procs", str(pid))

    def oom_killed(self) -> bool:
        """Did the kernel OOM-kill something in this cgroup?"""
        name = "memory.oom_control" if self.method == "cgroup-v1" else "memory.events"
        text = (_read(self.path / name) or "") if self.path else ""
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and int(value) > 0:
                return True
        return False

    def peak_bytes(self) -> int | None:
        """The kernel's peak charge of the cgroup (page cache included); read it before ``close``."""
        name = "memory.max_usage_in_bytes" if self.method == "cgroup-v1" else "memory.peak"
        text = _read(self.path / name) if self.path else None
        return int(text) if text and text.strip().isdigit() else None

    def close(self) -> None:
        if self.path is None:
            return
        try:
            self.files.rmdir(self.path)
            return
        except OSError:
            pass
        # A leftover process (the worker's own child): v2 can kill the whole cgroup (Linux 5.14+).
        if self.method == "cgroup-v2" and (self.path / "cgroup.kill").exists():
            try:
                self.files.write(self.path / "cgroup.kill", "1")
            except OSError:
                return
            for _ in range(50):
                time.sleep(0.02)
                try:
                    self.files.rmdir(self.path)
                    return
                except OSError:
                    pass
        # still busy: the next reboot removes it


def _own_cgroup(proc_cgroup: str | None, controller: str | None) -> str | None:
    """The cgroup path for a v1 controller, or the v2 path (controller None), from /proc/self/cgroup text."""
    for line in (proc_cgroup or "").splitlines():
        _, controllers, path = line.split(":", 2)
        if controller is None and controllers == "":
            return path
        if controller is not None and controller in controllers.split(","):
            return path
    return None


def open_budget(limit_bytes: int, root: Path = CGROUP_ROOT, *, proc_cgroup: str | None = None,
                pid: int | None = None, files: CgroupFiles | None = None,
                systemd: Callable[[], str | None] | None = None) -> NoBudget:
    """The best budget this machine allows: a ``CgroupBudget``, a ``SystemdScopeBudget``, or a
    ``NoBudget`` whose ``note`` says why. ``root`` (the cgroup mount), ``proc_cgroup`` (this
    process's /proc/self/cgroup), ``pid`` (this process), ``files`` and ``systemd`` (the probe:
    None where ``systemd-run --user`` works, else why not) are for tests."""
    files = files or CgroupFiles()
    pid = os.getpid() if pid is None else pid
    if proc_cgroup is None:
        proc_cgroup = _read(Path("/proc/self/cgroup"))
    reasons: list[str] = []
    v1_own = _own_cgroup(proc_cgroup, "memory")
    if v1_own is not None and (root / "memory" / "memory.limit_in_bytes").exists():
        budget, reason = _v1_budget(root / "memory" / v1_own.lstrip("/"), limit_bytes, files)
        if budget:
            return budget
        reasons.append(reason)
    v2_own = _own_cgroup(proc_cgroup, None)
    v2_base = root if (root / "cgroup.controllers").exists() else root / "unified"
    if v2_own is not None and (v2_base / "cgroup.controllers").exists():
        budget, reason = _v2_budget(v2_base, v2_base / v2_own.lstrip("/"), pid, limit_bytes, files)
        if budget:
            return budget
        reasons.append(reason)
    if not reasons:
        reasons.append("no cgroup memory controller is mounted")
    why_not = (systemd or systemd_user_scope)()
    if why_not is None:
        return SystemdScopeBudget(limit_bytes, v2_base, note="; ".join(reasons))
    return NoBudget(limit_bytes, "; ".join([*reasons, why_not]))


def create_budget(limit_bytes: int, root: Path = CGROUP_ROOT) -> CgroupBudget | None:
    """An enforced budget of ``limit_bytes``, or None where none can be made (``open_budget`` says why)."""
    budget = open_budget(limit_bytes, root)
    return budget if isinstance(budget, CgroupBudget) else None


def _case_name() -> str:
    return f"{CASE_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _make_case(path: Path, limits: list[tuple[str, str]], method: str, limit_bytes: int,
               files: CgroupFiles) -> tuple[CgroupBudget | None, str]:
    """mkdir ``path`` and write ``limits`` in order; the first is required, the rest (swap) best-effort."""
    try:
        files.mkdir(path)
    except OSError as e:
        return None, f"{method}: cannot create {path}: {e.strerror or e}"
    notes = []
    for i, (name, value) in enumerate(limits):
        try:
            files.write(path / name, value)
        except OSError as e:
            if i == 0:
                try:
                    files.rmdir(path)
                except OSError:
                    pass
                return None, f"{method}: cannot write {path / name}: {e.strerror or e}"
            notes.append(f"swap not limited ({name}: {e.strerror or e})")
    return CgroupBudget(path, method, limit_bytes, files, "; ".join(notes) or None), ""


def _v1_budget(own: Path, limit_bytes: int, files: CgroupFiles) -> tuple[CgroupBudget | None, str]:
    limits = [("memory.limit_in_bytes", str(limit_bytes))]
    swap_accounted = (own / "memory.memsw.limit_in_bytes").exists()
    if swap_accounted:  # memory + swap: no room left for swap
        limits.append(("memory.memsw.limit_in_bytes", str(limit_bytes)))
    budget, why = _make_case(own / _case_name(), limits, "cgroup-v1", limit_bytes, files)
    if budget is not None and not swap_accounted and _swap_total() > 0:
        # Said, like v2's "swap not limited": with swap on, a v1 budget without memsw can be dodged by swapping.
        budget.note = "; ".join(filter(None, [budget.note, "swap not limited (no swap accounting: "
                                                           "memory.memsw.limit_in_bytes is absent)"]))
    return budget, why


def _swap_total() -> int:
    try:
        import psutil

        return psutil.swap_memory().total
    except Exception:  # noqa: BLE001 - unknown swap: say nothing rather than guess
        return 0


def _v2_budget(base: Path, own: Path, pid: int, limit_bytes: int,
               files: CgroupFiles) -> tuple[CgroupBudget | None, str]:
    parent = own.parent if own.name == PARENT_LEAF else own  # already moved there by an earlier budget
    if "memory" not in _words(parent / "cgroup.controllers"):
        return None, f"cgroup-v2: the memory controller is not available in {parent} (not delegated to it)"
    if "memory" not in _words(parent / "cgroup.subtree_control"):
        reason = _delegate(base, parent, pid, files)
        if reason:
            return None, reason
    # memory.swap.max exists only with swap accounting; without it the note says swap is not limited.
    limits = [("memory.max", str(limit_bytes)), ("memory.swap.max", "0")]
    return _make_case(parent / _case_name(), limits, "cgroup-v2", limit_bytes, files)


def _delegate(base: Path, parent: Path, pid: int, files: CgroupFiles) -> str | None:
    """Enable the memory controller for ``parent``'s children; None when done, else why not."""
    subtree = parent / "cgroup.subtree_control"
    if parent == base:  # the true root is exempt from the no-internal-process rule (a namespace's is not)
        try:
            files.write(subtree, "+memory")
            return None
        except OSError as e:
            if e.errno != errno.EBUSY:
                return f"cgroup-v2: cannot enable the memory controller in {parent}: {e.strerror or e}"
    leaf = parent / PARENT_LEAF
    try:
        files.mkdir(leaf)
    except FileExistsError:
        pass
    except OSError as e:
        return f"cgroup-v2: cannot create {leaf}: {e.strerror or e} (needs root or a delegated cgroup)"
    try:
        files.write(leaf / "cgroup.procs", str(pid))
        files.write(subtree, "+memory")
    except OSError as e:
        others = [p for p in _words(parent / "cgroup.procs") if p != str(pid)]
        _undo(parent, leaf, pid, files, disable=False)
        if e.errno == errno.EBUSY and others:
            return (f"cgroup-v2: {len(others)} other process(es) share fitbench's cgroup {parent}, so it cannot "
                    "hand its memory controller to sub-cgroups; start fitbench in a cgroup of its own")
        return f"cgroup-v2: cannot delegate the memory controller of {parent}: {e.strerror or e}"
    _DELEGATED.append((parent, leaf, pid, files))
    return None


def _undo(parent: Path, leaf: Path, pid: int, files: CgroupFiles, disable: bool) -> None:
    """Put ``parent`` back as it was: controller off, fitbench back in, the leaf gone (best-effort)."""
    steps = [(files.write, (parent / "cgroup.subtree_control", "-memory"))] if disable else []
    steps += [(files.write, (parent / "cgroup.procs", str(pid))), (files.rmdir, (leaf,))]
    for step, args in steps:
        try:
            step(*args)
        except OSError:
            return


_DELEGATED: list[tuple[Path, Path, int, CgroupFiles]] = []


@atexit.register
def release_delegations() -> None:
    """At exit: undo each delegation whose cgroup no longer has case cgroups (another run may use it)."""
    while _DELEGATED:
        parent, leaf, pid, files = _DELEGATED.pop()
        try:
            busy = any(p.name.startswith(CASE_PREFIX) for p in parent.iterdir())
        except OSError:
            continue
        if not busy:
            _undo(parent, leaf, pid, files, disable=True)


@functools.cache
def systemd_user_scope() -> str | None:
    """None if a ``systemd-run --user`` scope enforces MemoryMax here, else why not (asked once)."""
    if not shutil.which("systemd-run") or not shutil.which("busctl"):
        return "systemd-run: not installed"
    probe = ["systemd-run", "--user", "--scope", "--quiet", "-p", "MemoryMax=64M", "--", "sh", "-c",
             'cat "/sys/fs/cgroup$(sed -n "s/^0:://p" /proc/self/cgroup)/memory.max"']
    try:
        done = subprocess.run(probe, capture_output=True, text=True, timeout=SYSTEMD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"systemd-run --user: {e}"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["failed"])[-1]
        return f"systemd-run --user: {last}"
    if done.stdout.strip() != str(64 << 20):
        return "systemd-run --user: the user manager has no memory controller (MemoryMax would not be enforced)"
    return None


class SystemdScopeBudget(CgroupBudget):
    """A transient ``systemd --user`` scope with MemoryMax and no swap, for a user without a writable cgroup.

    A spawner can start the worker inside it (``command``), or an already started worker joins it
    (``add``: the same D-Bus call ``systemd-run --scope`` makes, naming the worker's pid)."""

    def __init__(self, limit_bytes: int, v2_base: Path = CGROUP_ROOT, note: str | None = None,
                 run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
                 proc_cgroup: Callable[[int], str | None] = lambda pid: _read(Path(f"/proc/{pid}/cgroup"))) -> None:
        super().__init__(None, "systemd-scope", limit_bytes, note=note)
        self.unit = f"{_case_name()}.scope"
        self.v2_base, self.run, self.proc_cgroup, self.launched = v2_base, run, proc_cgroup, False

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the scope; ``systemd-run --scope`` execs it, so the pid is the worker's."""
        self.launched = True
        return ["systemd-run", "--user", "--scope", "--quiet", f"--unit={self.unit}",
                "-p", f"MemoryMax={self.limit_bytes}", "-p", "MemorySwapMax=0", "--", *argv]

    def adopt_command(self, pid: int) -> list[str]:
        return ["busctl", "--user", "call", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                "org.freedesktop.systemd1.Manager", "StartTransientUnit", "ssa(sv)a(sa(sv))", self.unit, "fail",
                "3", "PIDs", "au", "1", str(pid), "MemoryMax", "t", str(self.limit_bytes), "MemorySwapMax", "t", "0",
                "0"]

    def add(self, pid: int) -> None:
        if not self.launched:
            done = self._call(self.adopt_command(pid))
            if done is None or done.returncode != 0:
                self._failed(f"could not start {self.unit}: {self._why(done)}")
                return
        # The job runs asynchronously: wait until the worker is in the scope, before it loads anything
        # (memory charged before the move stays charged where it was).
        for _ in range(250):
            own = _own_cgroup(self.proc_cgroup(pid), None) or ""
            if own.endswith("/" + self.unit):
                self.path = self.v2_base / own.lstrip("/")
                limit = (_read(self.path / "memory.max") or "").strip()
                # the kernel keeps limits in whole pages
                if not limit.isdigit() or abs(int(limit) - self.limit_bytes) >= os.sysconf("SC_PAGE_SIZE"):
                    self._failed(f"{self.unit} has memory.max {limit or 'unreadable'}, not {self.limit_bytes}")
                return
            time.sleep(0.02)
        self._failed(f"the worker did not appear in {self.unit} within 5 s")

    def oom_killed(self) -> bool:
        # systemd removes an empty scope's cgroup; the unit keeps its result until reset-failed.
        return super().oom_killed() or self._show("Result") == "oom-kill"

    def peak_bytes(self) -> int | None:
        peak = super().peak_bytes()
        shown = self._show("MemoryPeak")  # systemd 256+
        return peak if peak is not None else int(shown) if shown and shown.isdigit() else None

    def close(self) -> None:
        for verb in ("stop", "reset-failed"):
            self._call(["systemctl", "--user", "--quiet", verb, self.unit])

    def _show(self, prop: str) -> str | None:
        done = self._call(["systemctl", "--user", "show", f"--property={prop}", "--value", self.unit])
        return done.stdout.strip() if done is not None and done.returncode == 0 else None

    def _call(self, argv: list[str]) -> subprocess.CompletedProcess | None:
        try:
            return self.run(argv, capture_output=True, text=True, timeout=SYSTEMD_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired):
            return None

    @staticmethod
    def _why(done: subprocess.CompletedProcess | None) -> str:
        return "no answer" if done is None else ((done.stderr or "").strip().splitlines() or ["failed"])[-1]

    def _failed(self, why: str) -> None:
        """The worker runs unconstrained: say so in the rows rather than claim a budget."""
        self.method, self.enforced = "none", False
        self.note = f"systemd-scope: {why}" + (f"; {self.note}" if self.note else "")


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
