"""Simulated cgroup trees in a temp folder, with the kernel's rules on writes.

``CgroupV2Kernel`` enforces what makes cgroup v2 budgets hard: a cgroup
holding processes cannot enable controllers for its children, and a cgroup
whose children have controllers cannot take processes ("no internal
processes"; the true root is exempt), each refused with EBUSY as the kernel
does. Control files appear on mkdir, a busy cgroup cannot be removed, and a
missing control file cannot be created. ``CgroupV1Kernel`` is the simpler
v1 memory hierarchy. Both implement ``harness.measure.budget.CgroupFiles``.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from harness.measure.budget import CgroupFiles

MEMORY_FILES = {"memory.max": "max\n", "memory.current": "0\n", "memory.peak": "0\n",
                "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n"}


def _err(code: int, path: Path) -> OSError:
    return OSError(code, os.strerror(code), str(path))


class CgroupV2Kernel(CgroupFiles):
    def __init__(self, root: Path, controllers: str = "cpu memory pids", swap: bool = True,
                 writable: bool = True, true_root: bool = True) -> None:
        self.root, self.swap, self.writable, self.true_root = root, swap, writable, true_root
        self.log: list[str] = []  # every accepted operation, in order
        root.mkdir(parents=True, exist_ok=True)
        for name, text in (("cgroup.controllers", controllers + "\n"), ("cgroup.subtree_control", "\n"),
                           ("cgroup.procs", "")):
            (root / name).write_text(text)

    # -- set-up and inspection (what the test does as "the system") --
    def place(self, cgroup: str, *pids: int) -> Path:
        """Create ``cgroup`` (a path like /app) if needed, as systemd would: every controller enabled
        down to it, none in it. Then put ``pids`` in it."""
        path = self.root / cgroup.strip("/")
        for parent in reversed([path, *path.parents]):
            if parent != self.root and self.root in parent.parents and not parent.exists():
                self._subtree(parent.parent, ["+" + c for c in self.words(parent.parent / "cgroup.controllers")])
                self._mkdir(parent)
        for pid in pids:
            self._move(path, str(pid))
        return path

    def proc_cgroup(self, pid: int) -> str:
        """/proc/PID/cgroup of a process, as the kernel writes it for a v2-only system."""
        where = self.cgroup_of(pid)
        return f"0::/{where.relative_to(self.root).as_posix() if where != self.root else ''}\n"

    def cgroup_of(self, pid: int) -> Path:
        for procs in self.root.rglob("cgroup.procs"):
            if str(pid) in procs.read_text().split():
                return procs.parent
        raise LookupError(pid)

    @staticmethod
    def words(path: Path) -> list[str]:
        return path.read_text().split()

    def exit(self, pid: int) -> None:
        """The process ends: it leaves its cgroup."""
        procs = self.cgroup_of(pid) / "cgroup.procs"
        procs.write_text("".join(f"{p}\n" for p in self.words(procs) if p != str(pid)))

    # -- CgroupFiles: what fitbench may do --
    def mkdir(self, path: Path) -> None:
        self._allowed(path)
        if path.exists():
            raise _err(errno.EEXIST, path)  # a FileExistsError
        self._mkdir(path)
        self.log.append(f"mkdir {self._rel(path)}")

    def rmdir(self, path: Path) -> None:
        self._allowed(path)
        if self.words(path / "cgroup.procs") or any(p.is_dir() for p in path.iterdir()):
            raise _err(errno.EBUSY, path)
        shutil.rmtree(path)
        self.log.append(f"rmdir {self._rel(path)}")

    def write(self, path: Path, text: str) -> None:
        self._allowed(path)
        if not path.exists():
            raise _err(errno.ENOENT, path)
        cgroup, name = path.parent, path.name
        if name == "cgroup.procs":
            self._move(cgroup, text.strip())
        elif name == "cgroup.subtree_control":
            self._subtree(cgroup, text.split())
        elif name == "cgroup.kill":
            (cgroup / "cgroup.procs").write_text("")  # every process in it dies
        else:
            if name.startswith("memory.") and not (text.strip() == "max" or text.strip().isdigit()):
                raise _err(errno.EINVAL, path)
            quota = text.split()
            if name == "cpu.max" and not (len(quota) == 2 and (quota[0] == "max" or quota[0].isdigit())
                                          and quota[1].isdigit() and (quota[0] == "max" or int(quota[0]) >= 1000)):
                raise _err(errno.EINVAL, path)  # "QUOTA PERIOD", the quota at least 1 ms
            path.write_text(text.strip() + "\n")
        self.log.append(f"write {self._rel(path)} {text.strip()}")

    # -- the kernel's rules --
    def _allowed(self, path: Path) -> None:
        if not self.writable:
            raise _err(errno.EACCES, path)

    def _exempt(self, cgroup: Path) -> bool:
        return cgroup == self.root and self.true_root

    def _mkdir(self, path: Path) -> None:
        path.mkdir()
        enabled = self.words(path.parent / "cgroup.subtree_control")
        (path / "cgroup.controllers").write_text(" ".join(enabled) + "\n")
        (path / "cgroup.subtree_control").write_text("\n")
        (path / "cgroup.procs").write_text("")
        (path / "cgroup.kill").write_text("")
        if "memory" in enabled:
            self._memory_files(path)
        if "cpu" in enabled:
            (path / "cpu.max").write_text("max 100000\n")

    def _memory_files(self, path: Path) -> None:
        for name, text in MEMORY_FILES.items():
            (path / name).write_text(text)
        if self.swap:
            (path / "memory.swap.max").write_text("max\n")

    def _move(self, cgroup: Path, pid: str) -> None:
        if self.words(cgroup / "cgroup.subtree_control") and not self._exempt(cgroup):
            raise _err(errno.EBUSY, cgroup / "cgroup.procs")
        for procs in self.root.rglob("cgroup.procs"):
            procs.write_text("".join(f"{p}\n" for p in self.words(procs) if p != pid))
        procs = cgroup / "cgroup.procs"
        procs.write_text(procs.read_text() + f"{pid}\n")

    def _subtree(self, cgroup: Path, changes: list[str]) -> None:
        enabled = self.words(cgroup / "cgroup.subtree_control")
        children = [p for p in cgroup.iterdir() if p.is_dir()]
        for change in changes:
            op, controller = change[0], change[1:]
            if op not in "+-" or controller not in self.words(cgroup / "cgroup.controllers"):
                raise _err(errno.ENOENT if op in "+-" else errno.EINVAL, cgroup / "cgroup.subtree_control")
            if op == "+" and self.words(cgroup / "cgroup.procs") and not self._exempt(cgroup):
                raise _err(errno.EBUSY, cgroup / "cgroup.subtree_control")  # the no-internal-process rule
            if op == "-" and any(controller in self.words(c / "cgroup.subtree_control") for c in children):
                raise _err(errno.EBUSY, cgroup / "cgroup.subtree_control")
            enabled = [c for c in enabled if c != controller] + ([controller] if op == "+" else [])
        (cgroup / "cgroup.subtree_control").write_text(" ".join(enabled) + "\n")
        for child in children:
            (child / "cgroup.controllers").write_text(" ".join(enabled) + "\n")
            if "memory" in enabled:
                if not (child / "memory.max").exists():
                    self._memory_files(child)
            else:
                for name in [*MEMORY_FILES, "memory.swap.max"]:
                    (child / name).unlink(missing_ok=True)

    def _rel(self, path: Path) -> str:
        return "/" + path.relative_to(self.root).as_posix()


class CgroupV1Kernel(CgroupFiles):
    """A v1 memory hierarchy mounted at ``root/memory``: no placement rules, just control files."""

    FILES = {"memory.limit_in_bytes": "9223372036854771712\n", "memory.memsw.limit_in_bytes": "9223372036854771712\n",
             "memory.max_usage_in_bytes": "0\n", "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
             "cgroup.procs": ""}

    def __init__(self, root: Path, own: str = "/jobs/me", swap_accounting: bool = True) -> None:
        self.swap_accounting = swap_accounting
        self.mount = root / "memory"
        self.mount.mkdir(parents=True)
        self._populate(self.mount)
        self.own = self.mount / own.strip("/")
        self.own.mkdir(parents=True)
        self._populate(self.own)
        self.proc_cgroup = f"4:memory:{own}\n1:cpu:/\n0::/\n"

    def _populate(self, path: Path) -> None:
        for name, text in self.FILES.items():
            if self.swap_accounting or "memsw" not in name:
                (path / name).write_text(text)

    def mkdir(self, path: Path) -> None:
        path.mkdir()
        self._populate(path)

    def rmdir(self, path: Path) -> None:
        if (path / "cgroup.procs").read_text().split():
            raise _err(errno.EBUSY, path)
        shutil.rmtree(path)

    def write(self, path: Path, text: str) -> None:
        if not path.exists():
            raise _err(errno.ENOENT, path)
        if path.name == "memory.memsw.limit_in_bytes" and \
                int(text) < int((path.parent / "memory.limit_in_bytes").read_text()):
            raise _err(errno.EINVAL, path)  # memory+swap may not be below memory
        path.write_text(text.strip() + "\n")
