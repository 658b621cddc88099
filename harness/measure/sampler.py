"""Background sampler of one child process: memory, paging, storage reads, CPU.

Runs as a thread in the parent (never in the measured process), reading
``/proc`` with ``os.pread`` on descriptors opened once. What is read how
often follows from what a read costs (measured on the project's Linux VM,
as multiples of reading ``statm``; ``stat`` 2.7x, ``io`` 1.5x):

- every sample (``interval_s``, 10 ms by default): RSS, faults, CPU, bytes
  read, and system available memory and swap in use from ``/proc/meminfo``
  (4x: as dear as the process's own reads, and what the memory guard needs
  fresh);
- every ``SYSTEM_PERIOD_S`` (50 ms) of wall time, or every sample when the
  interval is longer: swap-in/out counters from ``/proc/vmstat`` (14x),
  energy and GPU memory;
- every ``USS_PERIOD_S`` (250 ms: the 25th sample at 10 ms), stretched so it
  takes at most ``USS_MAX_SHARE`` (1%) of wall time: unique memory (USS)
  from ``smaps_rollup``, which walks the page tables under the target's mmap
  lock (about 2 ms per 100 MiB resident, 300-6000x ``statm``);
- every ``NOISE_PERIOD_S`` (1 s): what disturbs the measurement (CPU
  frequency, temperature, the system's busy and steal CPU time;
  ``harness.measure.noise``);
- now, when the parent calls ``mark()`` (it does on every message from the
  worker: the phase boundaries), every figure: the kernel's cumulative
  counters at the edges of each timed window, however sparse the grid;
- once more when sampling stops, every figure.

During timed windows (``timed(True)``, from load to the last repetition) the
grid is no denser than ``TIMED_INTERVAL_S`` (100 ms): the timeline still shows
a prefill's memory steps, the kernel keeps the true peak (VmHWM), the marks
give exact phase deltas, and the sampler's own CPU (2.6-2.8 % of a core at
10 ms on the project's VM) drops to about a tenth where it could slow decode
(at 50 ms, decode on every core still lost 2.5 %: each wake-up delays one of
the threads llama.cpp waits for at every barrier).

On systems without ``/proc`` it falls back to psutil. Columns read less often
are null in between: ``Timeline.last`` gives a series' newest reading.

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

from harness.measure.energy import NvmlEnergy, RaplReader
from harness.measure.gpu import NvmlMemory
from harness.measure.noise import NOISE_PERIOD_S, SystemNoise

SYSTEM_PERIOD_S = 0.05  # vmstat swap counters, energy, GPU: at least this often (wall time)
USS_PERIOD_S = 0.25  # unique memory at most this often...
USS_MAX_SHARE = 0.01  # ...and rarer still when one smaps_rollup read costs more than this share of the wait
TIMED_INTERVAL_S = 0.1  # the densest grid while the worker is timed (marks add the phase edges)

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

COLUMNS = (
    "t", "rss", "uss", "sys_available", "swap_used", "pswpin", "pswpout",
    "minflt", "majflt", "cpu_s", "read_bytes", "cpu_energy_uj", "gpu_energy_mj", "gpu_power_mw",
    "gpu_used", "gpu_proc", "gpu_util", "cpu_mhz", "temp_c", "sys_busy_s", "sys_steal_s",
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
    timed_interval_s: float | None = None  # the grid while timed (None: never switched)

    def __len__(self) -> int:
        return len(self.samples["t"])

    def append(self, row: dict) -> None:
        for c in COLUMNS:
            self.samples[c].append(row.get(c))

    def last(self, column: str) -> float | None:
        """The newest non-null sample of ``column``: the current reading of a series that is not read
        every sample (``sys_available`` is, ``uss`` and the vmstat/energy/GPU columns are not)."""
        for value in reversed(self.samples[column]):
            if value is not None:
                return value
        return None

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
        """One sample; ``with_system`` adds the vmstat swap counters, ``with_uss`` unique memory."""
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
            # ~2 ms per 100 MiB resident, holding the target's mmap lock: kept rare (USS_MAX_SHARE).
            text = pread(self.fds["smaps_rollup"], 4096, 0)
            row["uss"] = sum((self._field(text, k) or 0) for k in (b"Private_Clean:", b"Private_Dirty:")) * 1024
        mem = pread(self.meminfo, 4096, 0)
        available = self._field(mem, b"MemAvailable:")
        row["sys_available"] = available * 1024 if available is not None else None
        swap_total, swap_free = self._field(mem, b"SwapTotal:"), self._field(mem, b"SwapFree:")
        row["swap_used"] = ((swap_total or 0) - (swap_free or 0)) * 1024
        if with_system:
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
        row = {"rss": mem.rss, "cpu_s": cpu.user + cpu.system, "sys_available": psutil.virtual_memory().available}
        if with_system:
            swap = psutil.swap_memory()
            row.update(swap_used=swap.used, pswpin=swap.sin, pswpout=swap.sout)
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


class _Cadence:
    """When a dearer reading is due, for a sampler on a grid of ``interval_s``: read now if waiting
    for the next sample would leave more than ``period_s`` since the last reading (a quarter
    interval of slack absorbs the scheduler's jitter). So at 10 ms, 50 ms is every 5th sample."""

    def __init__(self, period_s: float, interval_s: float) -> None:
        self.base_s = self.period_s = period_s
        self.interval_s = interval_s
        self.last = float("-inf")

    def due(self, now: float) -> bool:
        if now - self.last + self.interval_s > self.period_s + self.interval_s / 4:
            self.last = now
            return True
        return False

    def stretch(self, cost_s: float, max_share: float) -> None:
        """Space the readings so that one costing ``cost_s`` takes at most ``max_share`` of the time."""
        self.period_s = max(self.base_s, cost_s / max_share)


class Sampler:
    """Samples ``pid`` every ``interval_s`` seconds in a daemon thread until stopped.

    ``system_every`` / ``uss_every`` (in samples) override ``SYSTEM_PERIOD_S`` / ``USS_PERIOD_S``;
    the USS cadence is stretched whatever it is, so its reads keep to ``USS_MAX_SHARE``."""

    def __init__(self, pid: int, interval_s: float = 0.01, uss_every: int | None = None,
                 system_every: int | None = None, energy: bool = True, gpu: bool = True,
                 noise: bool = True) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self._system = _Cadence(system_every * interval_s if system_every else SYSTEM_PERIOD_S, interval_s)
        self._uss = _Cadence(uss_every * interval_s if uss_every else USS_PERIOD_S, interval_s)
        self._noise_cadence = _Cadence(NOISE_PERIOD_S, interval_s)
        self._grid_s = interval_s  # the current grid: interval_s, or TIMED_INTERVAL_S while timed
        self._wake = threading.Event()  # stop() and mark() cut the wait short
        self._marked = False
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
        self._noise = SystemNoise(nvml=session if session is not None and session.available else None) \
            if noise else None
        self._thread = threading.Thread(target=self._loop, name=f"sampler-{pid}", daemon=True)
        self.started_at: float | None = None

    def start(self) -> Sampler:
        self.started_at = time.perf_counter()
        self._thread.start()
        return self

    def timed(self, on: bool) -> None:
        """The worker's timed windows start (``True``) or end: the grid is no denser than
        ``TIMED_INTERVAL_S`` in between (called from the parent's thread; the next wait uses it)."""
        self._grid_s = max(self.interval_s, TIMED_INTERVAL_S) if on else self.interval_s
        if on:
            self.timeline.timed_interval_s = self._grid_s

    def mark(self) -> None:
        """Take a full sample now (a phase boundary), from the sampler's own thread."""
        self._marked = True
        self._wake.set()

    def _loop(self) -> None:
        next_at = time.perf_counter()
        while not self._stop.is_set():
            self.requested += 1
            now = time.perf_counter()
            marked, self._marked = self._marked, False
            if not self._take(self._uss.due(now), marked or self._system.due(now),
                              marked or self._noise_cadence.due(now)):
                return  # the process is gone
            # Schedule on a fixed grid so slow samples do not stretch the interval.
            next_at += self._grid_s
            delay = next_at - time.perf_counter()
            if delay < 0:
                next_at = time.perf_counter()
                delay = 0
            if self._wake.wait(delay):
                self._wake.clear()
                if self._marked:
                    next_at = time.perf_counter()  # the grid restarts from the mark

    def _take(self, with_uss: bool, with_system: bool = True, with_noise: bool = False) -> bool:
        t = time.perf_counter()
        try:
            row = self._reader.sample(with_uss, with_system)
        except (OSError, ValueError, IndexError, psutil.Error):
            return False
        if with_uss:  # its cost grows with the target's resident memory
            self._uss.stretch(time.perf_counter() - t, USS_MAX_SHARE)
        row["t"] = t
        if with_system:
            if self._rapl is not None and self._rapl.available:
                row["cpu_energy_uj"] = self._rapl.read_uj()
            if self._nvml is not None and self._nvml.available:
                row["gpu_energy_mj"], row["gpu_power_mw"] = self._nvml.read(t)
            if self._gpu is not None:
                row.update(self._gpu.read())
        if with_noise and self._noise is not None:
            row.update(self._noise.read())
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
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._take(with_uss=True, with_noise=True)
        self._reader.close()
        if self._noise is not None:
            self._noise.close()
        return self.timeline
