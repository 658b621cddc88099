"""Background sampler of one child process: memory, paging, storage reads, CPU.

Runs as a thread in the parent (never in the measured process), reading
``/proc`` with ``os.pread`` on descriptors opened once, so a sample costs
tens of microseconds. Unique memory (USS, from ``smaps_rollup``) walks the
page tables and is much dearer, so it is read only every ``uss_every``
samples. On systems without ``/proc`` it falls back to psutil.

Counters (faults, swap pages, bytes read, CPU seconds) are cumulative; the
suite turns them into deltas per phase using the timestamps, which share
``time.perf_counter()``'s clock (CLOCK_MONOTONIC) with the child.
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from dataclasses import dataclass, field

import psutil

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

COLUMNS = (
    "t", "rss", "uss", "sys_available", "swap_used", "pswpin", "pswpout",
    "minflt", "majflt", "cpu_s", "read_bytes",
)


@dataclass
class Timeline:
    """Raw samples as parallel lists (cheap to append, easy to turn into Arrow columns)."""

    interval_s: float
    samples: dict[str, list] = field(default_factory=lambda: {c: [] for c in COLUMNS})
    vmhwm: int | None = None  # the kernel's own peak RSS of the child

    def __len__(self) -> int:
        return len(self.samples["t"])

    def append(self, row: dict) -> None:
        for c in COLUMNS:
            self.samples[c].append(row.get(c))

    def value_at(self, column: str, t: float) -> float | None:
        """Last non-null sample of ``column`` at or before ``t`` (the first one if none is)."""
        ts, values = self.samples["t"], self.samples[column]
        i = bisect.bisect_right(ts, t) - 1
        for j in range(max(i, 0), -1, -1):
            if values[j] is not None:
                return values[j]
        return next((v for v in values if v is not None), None)

    def delta(self, column: str, t0: float, t1: float) -> float | None:
        a, b = self.value_at(column, t0), self.value_at(column, t1)
        return None if a is None or b is None else b - a

    def window(self, column: str, t0: float, t1: float) -> list:
        return [v for t, v in zip(self.samples["t"], self.samples[column]) if t0 <= t <= t1 and v is not None]

    def peak(self, column: str, t0: float = float("-inf"), t1: float = float("inf")) -> float | None:
        values = self.window(column, t0, t1)
        return max(values) if values else None

    def low(self, column: str, t0: float = float("-inf"), t1: float = float("inf")) -> float | None:
        values = self.window(column, t0, t1)
        return min(values) if values else None


class _ProcReader:
    """Linux: one pread per file per sample on descriptors kept open."""

    def __init__(self, pid: int) -> None:
        self.fds: dict[str, int] = {}
        for name in ("statm", "stat", "io", "smaps_rollup"):
            try:
                self.fds[name] = os.open(f"/proc/{pid}/{name}", os.O_RDONLY)
            except OSError:
                pass  # e.g. io needs the same user or root; the column stays null
        self.meminfo = os.open("/proc/meminfo", os.O_RDONLY)
        self.vmstat = os.open("/proc/vmstat", os.O_RDONLY)

    def _read(self, fd: int, size: int = 8192) -> str:
        return os.pread(fd, size, 0).decode()

    def sample(self, with_uss: bool) -> dict:
        row: dict = {}
        statm = self._read(self.fds["statm"]).split()
        row["rss"] = int(statm[1]) * PAGE
        stat = self._read(self.fds["stat"])
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) "
        row["minflt"], row["majflt"] = int(fields[7]), int(fields[9])
        row["cpu_s"] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        if "io" in self.fds:
            for line in self._read(self.fds["io"]).splitlines():
                if line.startswith("read_bytes:"):
                    row["read_bytes"] = int(line.split()[1])
        if with_uss and "smaps_rollup" in self.fds:
            uss = 0
            for line in self._read(self.fds["smaps_rollup"]).splitlines():
                if line.startswith(("Private_Clean:", "Private_Dirty:", "Private_Hugetlb:")):
                    uss += int(line.split()[1]) * 1024
            row["uss"] = uss
        mem = {}
        for line in self._read(self.meminfo).splitlines():
            key, _, rest = line.partition(":")
            if key in ("MemAvailable", "SwapTotal", "SwapFree"):
                mem[key] = int(rest.split()[0]) * 1024
        row["sys_available"] = mem.get("MemAvailable")
        row["swap_used"] = mem.get("SwapTotal", 0) - mem.get("SwapFree", 0)
        for line in self._read(self.vmstat, 16384).splitlines():
            if line.startswith("pswpin "):
                row["pswpin"] = int(line.split()[1])
            elif line.startswith("pswpout "):
                row["pswpout"] = int(line.split()[1])
                break
        return row

    def vmhwm(self, pid: int) -> int | None:
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def close(self) -> None:
        for fd in [*self.fds.values(), self.meminfo, self.vmstat]:
            os.close(fd)
        self.fds = {}


class _PsutilReader:
    """Portable fallback (macOS, BSD): fewer fields, higher cost per sample."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)

    def sample(self, with_uss: bool) -> dict:
        mem = self.proc.memory_info()
        cpu = self.proc.cpu_times()
        vm, swap = psutil.virtual_memory(), psutil.swap_memory()
        row = {"rss": mem.rss, "cpu_s": cpu.user + cpu.system, "sys_available": vm.available,
               "swap_used": swap.used, "pswpin": swap.sin, "pswpout": swap.sout}
        if hasattr(mem, "pageins"):  # macOS counts page-ins, the closest to major faults
            row["majflt"] = mem.pageins
        if with_uss:
            try:
                row["uss"] = self.proc.memory_full_info().uss
            except psutil.AccessDenied:
                pass
        return row

    def vmhwm(self, pid: int) -> int | None:
        return None

    def close(self) -> None:
        pass


class Sampler:
    """Samples ``pid`` every ``interval_s`` seconds in a daemon thread until stopped."""

    def __init__(self, pid: int, interval_s: float = 0.01, uss_every: int = 25) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.uss_every = uss_every
        self.timeline = Timeline(interval_s)
        self.peak_rss = 0
        self.last_rss = 0
        self.requested = 0
        self._stop = threading.Event()
        self._reader = _ProcReader(pid) if os.path.exists(f"/proc/{pid}/statm") else _PsutilReader(pid)
        self._thread = threading.Thread(target=self._loop, name=f"sampler-{pid}", daemon=True)
        self.started_at: float | None = None

    def start(self) -> Sampler:
        self.started_at = time.perf_counter()
        self._thread.start()
        return self

    def _loop(self) -> None:
        n = 0
        next_at = time.perf_counter()
        while not self._stop.is_set():
            self.requested += 1
            if not self._take(with_uss=(n % self.uss_every == 0)):
                return  # the process is gone
            n += 1
            # Schedule on a fixed grid so slow samples do not stretch the interval.
            next_at += self.interval_s
            delay = next_at - time.perf_counter()
            if delay < 0:
                next_at = time.perf_counter()
                delay = 0
            self._stop.wait(delay)

    def _take(self, with_uss: bool) -> bool:
        t = time.perf_counter()
        try:
            row = self._reader.sample(with_uss)
        except (OSError, ValueError, IndexError, psutil.Error):
            return False
        row["t"] = t
        self.timeline.append(row)
        self.last_rss = row["rss"]
        self.peak_rss = max(self.peak_rss, row["rss"])
        return True

    def read_vmhwm(self) -> int | None:
        """The kernel's peak RSS; only readable while the child is alive (not yet reaped)."""
        self.timeline.vmhwm = self._reader.vmhwm(self.pid)
        return self.timeline.vmhwm

    def stop(self) -> Timeline:
        """Stop sampling; take one last sample first if the process still exists."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._take(with_uss=True)
        self._reader.close()
        return self.timeline
