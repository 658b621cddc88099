"""What disturbs a measurement, read from the system: CPU frequency, temperature, steal, others' load.

Read by the sampler at a slow cadence (``NOISE_PERIOD_S``): none of these
change faster than a second matters for a case, and each read is dearer than
the per-sample ones (``/proc/cpuinfo`` about 30x ``statm`` on the project's
VM, ``/proc/stat`` about 7x). Every source is optional; a column whose source
this machine lacks stays null:

- frequency: the mean of ``scaling_cur_freq`` over the CPUs where cpufreq is
  exposed, else the mean of ``cpu MHz`` in ``/proc/cpuinfo`` (a VM's may be
  fixed; it is still what the guest is told);
- temperature: the hottest of ``/sys/class/thermal/thermal_zone*/temp`` and
  ``/sys/class/hwmon/hwmon*/temp*_input``, and the GPUs' through NVML when a
  session is given;
- ``/proc/stat``'s first line: the system's busy and steal CPU seconds,
  cumulative, so the suite can take deltas over a case (steal: time the
  hypervisor ran another guest on our CPUs; busy minus the child's own CPU
  time: the load from everything else).
"""

from __future__ import annotations

import glob
import os

NOISE_PERIOD_S = 1.0  # frequency, temperature, /proc/stat: at most this often (wall time)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
MAX_FREQ_FILES = 256  # a big server reads its first 256 CPUs' frequency, not all of them


def _open(path: str) -> int | None:
    try:
        return os.open(path, os.O_RDONLY)
    except OSError:
        return None


class SystemNoise:
    """Descriptors opened once; ``read()`` gives ``cpu_mhz``, ``temp_c``, ``sys_busy_s``, ``sys_steal_s``."""

    def __init__(self, root: str = "/", nvml=None) -> None:
        def under(pattern: str) -> list[str]:
            return sorted(glob.glob(os.path.join(root, pattern.lstrip("/"))))

        freq = under("/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_cur_freq")[:MAX_FREQ_FILES]
        self.freq_fds = [fd for fd in map(_open, freq) if fd is not None]
        self.cpuinfo = None if self.freq_fds else _open(os.path.join(root, "proc/cpuinfo"))
        temps = under("/sys/class/thermal/thermal_zone*/temp") + under("/sys/class/hwmon/hwmon*/temp*_input")
        self.temp_fds = [fd for fd in map(_open, temps) if fd is not None]
        self.stat = _open(os.path.join(root, "proc/stat"))
        self.nvml = nvml  # harness.measure.energy.NvmlEnergy or None: GPU temperature

    @property
    def sources(self) -> list[str]:
        found = ["cpufreq" if self.freq_fds else "cpuinfo" if self.cpuinfo is not None else None,
                 "thermal" if self.temp_fds else None, "proc-stat" if self.stat is not None else None]
        return [s for s in found if s]

    def read(self) -> dict:
        row: dict = {"cpu_mhz": self._mhz(), "temp_c": self._temp()}
        if self.stat is not None:
            try:
                busy, steal = parse_proc_stat(os.pread(self.stat, 4096, 0))
                row["sys_busy_s"], row["sys_steal_s"] = busy, steal
            except (OSError, ValueError, IndexError):
                pass
        return row

    def _mhz(self) -> float | None:
        values = []
        for fd in self.freq_fds:
            try:
                values.append(int(os.pread(fd, 64, 0)) / 1000)  # kHz
            except (OSError, ValueError):
                pass
        if not values and self.cpuinfo is not None:
            try:
                values = cpuinfo_mhz(os.pread(self.cpuinfo, 1 << 20, 0))
            except OSError:
                pass
        return sum(values) / len(values) if values else None

    def _temp(self) -> float | None:
        values = []
        for fd in self.temp_fds:
            try:
                milli = int(os.pread(fd, 64, 0))
            except (OSError, ValueError):
                continue
            if -40_000 < milli < 150_000:  # some zones report nonsense (e.g. -273 C): skip them
                values.append(milli / 1000)
        if self.nvml is not None:
            values += self.nvml.temperatures()
        return max(values) if values else None

    def close(self) -> None:
        for fd in [*self.freq_fds, *self.temp_fds, self.cpuinfo, self.stat]:
            if fd is not None:
                os.close(fd)
        self.freq_fds, self.temp_fds, self.cpuinfo, self.stat = [], [], None, None


def cpuinfo_mhz(text: bytes) -> list[float]:
    """Every ``cpu MHz`` in /proc/cpuinfo (x86; ARM kernels have none)."""
    out = []
    for line in text.split(b"\n"):
        if line.startswith(b"cpu MHz"):
            try:
                out.append(float(line.split(b":")[1]))
            except (IndexError, ValueError):
                pass
    return out


def parse_proc_stat(text: bytes) -> tuple[float, float]:
    """(busy, steal) CPU seconds of all CPUs from /proc/stat's ``cpu`` line. Busy is everything but
    idle, iowait and steal (guest time is already inside user/nice, so it is not added again)."""
    line = text[:text.index(b"\n")] if b"\n" in text else text
    fields = [int(x) for x in line.split()[1:]]
    fields += [0] * (8 - len(fields))
    user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq) / CLOCK_TICKS, steal / CLOCK_TICKS
