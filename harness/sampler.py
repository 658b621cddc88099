"""Background sampler of one child process: memory, paging, storage reads, CPU.

Runs as a thread in the parent (never in the measured process), reading
``/proc`` with ``os.pread`` on descriptors opened once, so a sample costs
about ten microseconds. Unique memory (USS, from ``smaps_rollup``) walks
the page tables (~1 ms for a few hundred MiB, under the target's mmap lock),
so it is read only every ``uss_every`` samples; system-wide memory and swap
every ``system_every``. On systems without ``/proc`` it falls back to psutil.

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

from harness.energy import NvmlEnergy, RaplReader
from harness.gpu import NvmlMemory

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

COLUMNS = (
    "t", "rss", "uss", "sys_available", "swap_used", "pswpin", "pswpout",
    "minflt", "majflt", "cpu_s", "read_bytes", "cpu_energy_uj", "gpu_energy_mj", "gpu_power_mw",
    "gpu_used", "gpu_proc", "gpu_util",
)


@dataclass
class Timeline:
    """Raw samples as parallel lists (cheap to append, easy to turn into Arrow columns)."""

    interval_s: float
    samples: dict[str, list] = field(default_factory=lambda: {c: [] for c in COLUMNS})
    vmhwm: int | None = None  # the kernel's own peak RSS of the child
    energy_source: str | None = None  # "rapl", "nvml", "rapl+nvml" or None
    energy_note: str | None = None  # why there is no (or only partial) energy data
    gpu_total: int | None = None  # memory of the visible NVIDIA GPUs (NVML), read once

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

    @staticmethod
    def _field(text: bytes, key: bytes) -> int | None:
        """The number after ``key`` in a /proc key-value file, without splitting every line."""
        i = text.find(key)
        if i < 0:
            return None
        start = i + len(key)
        end = text.find(b"\n", start)
        return int(text[start:end if end >= 0 else len(text)].split()[0])

    def sample(self, with_uss: bool, with_system: bool = True) -> dict:
        row: dict = {}
        pread = os.pread
        row["rss"] = int(pread(self.fds["statm"], 256, 0).split()[1]) * PAGE
        stat = pread(self.fds["stat"], 1024, 0)
        fields = stat[stat.rfind(b")") + 2:].split()  # after "pid (comm) "
        row["minflt"], row["majflt"] = int(fields[7]), int(fields[9])
        row["cpu_s"] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        if "io" in self.fds:
            row["read_bytes"] = self._field(pread(self.fds["io"], 512, 0), b"\nread_bytes:")
        if with_uss and "smaps_rollup" in self.fds:
            # ~1 ms for a few hundred MiB, and it holds the target's mmap lock: keep it rare.
            text = pread(self.fds["smaps_rollup"], 4096, 0)
            row["uss"] = sum((self._field(text, k) or 0) for k in (b"Private_Clean:", b"Private_Dirty:")) * 1024
        if with_system:
            mem = pread(self.meminfo, 4096, 0)
            available = self._field(mem, b"MemAvailable:")
            row["sys_available"] = available * 1024 if available is not None else None
            swap_total, swap_free = self._field(mem, b"SwapTotal:"), self._field(mem, b"SwapFree:")
            row["swap_used"] = ((swap_total or 0) - (swap_free or 0)) * 1024
            vm = pread(self.vmstat, 16384, 0)
            row["pswpin"], row["pswpout"] = self._field(vm, b"\npswpin "), self._field(vm, b"\npswpout ")
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

    def sample(self, with_uss: bool, with_system: bool = True) -> dict:
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

    def __init__(self, pid: int, interval_s: float = 0.01, uss_every: int = 100, system_every: int = 5,
                 energy: bool = True, gpu: bool = True) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.uss_every = uss_every
        self.system_every = system_every
        self.timeline = Timeline(interval_s)
        self.peak_rss = 0
        self.last_rss = 0
        self.requested = 0
        self._stop = threading.Event()
        self._reader = _ProcReader(pid) if os.path.exists(f"/proc/{pid}/statm") else _PsutilReader(pid)
        self._rapl = self._nvml = self._gpu = None
        session = NvmlEnergy() if energy or gpu else None  # one NVML session for energy and memory
        if energy:
            self._rapl, self._nvml = RaplReader(), session
            sources = [n for n, r in (("rapl", self._rapl), ("nvml", self._nvml)) if r.available]
            self.timeline.energy_source = "+".join(sources) or None
            self.timeline.energy_note = "; ".join(r.reason for r in (self._rapl, self._nvml) if r.reason) or None
        if gpu and session is not None and session.available:
            self._gpu = NvmlMemory(session, pid)
            self.timeline.gpu_total = self._gpu.total
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
            if not self._take(n % self.uss_every == 0, n % self.system_every == 0):
                return  # the process is gone
            n += 1
            # Schedule on a fixed grid so slow samples do not stretch the interval.
            next_at += self.interval_s
            delay = next_at - time.perf_counter()
            if delay < 0:
                next_at = time.perf_counter()
                delay = 0
            self._stop.wait(delay)

    def _take(self, with_uss: bool, with_system: bool = True) -> bool:
        t = time.perf_counter()
        try:
            row = self._reader.sample(with_uss, with_system)
        except (OSError, ValueError, IndexError, psutil.Error):
            return False
        row["t"] = t
        if with_system:
            if self._rapl is not None and self._rapl.available:
                row["cpu_energy_uj"] = self._rapl.read_uj()
            if self._nvml is not None and self._nvml.available:
                row["gpu_energy_mj"], row["gpu_power_mw"] = self._nvml.read(t)
            if self._gpu is not None:
                row.update(self._gpu.read())
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
