"""Energy counters where the hardware tells them: CPU packages through Linux
powercap (RAPL), NVIDIA GPUs through NVML.

Both are cumulative counters read by the sampler next to memory; the suite
turns them into joules per phase. RAPL measures whole CPU packages (every
process on them), NVML whole GPUs: on a quiet machine that is the case's
energy, on a busy one an upper bound. Where nothing can be read (a VM
without powercap, as here; macOS without root) the figures are null and
``energy_note`` says why.

RAPL's ``energy_uj`` wraps at ``max_energy_range_uj``; a reading lower than
the previous one is a wrap, not a reset, and is unwrapped here.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

POWERCAP_ROOT = Path(os.environ.get("FITBENCH_POWERCAP_ROOT", "/sys/class/powercap"))
TOP_ZONE = re.compile(r"^intel-rapl:\d+$")  # packages; sub-zones (core, uncore, dram) are inside them


@dataclass
class _Zone:
    name: str
    energy_path: Path
    max_range: int
    last: int | None = None
    total: int = 0  # unwrapped microjoules since the first read


@dataclass
class RaplReader:
    """Sum of all CPU package energy counters, unwrapped, in microjoules since the first read."""

    root: Path = POWERCAP_ROOT
    zones: list[_Zone] = field(default_factory=list)
    reason: str | None = None

    def __post_init__(self) -> None:
        if not self.root.is_dir():
            self.reason = f"no RAPL powercap on this machine ({self.root} missing)"
            return
        for zone in sorted(self.root.iterdir()):
            if not TOP_ZONE.match(zone.name):
                continue
            try:
                max_range = int((zone / "max_energy_range_uj").read_text())
                int((zone / "energy_uj").read_text())
            except (OSError, ValueError) as exc:
                self.reason = f"RAPL counters in {zone} are not readable ({getattr(exc, 'strerror', exc)}; root may be needed)"
                continue
            label = (zone / "name").read_text().strip() if (zone / "name").exists() else zone.name
            self.zones.append(_Zone(label, zone / "energy_uj", max_range))
        if self.zones:
            self.reason = None
        elif self.reason is None:
            self.reason = f"no RAPL package zones under {self.root}"

    @property
    def available(self) -> bool:
        return bool(self.zones)

    def read_uj(self) -> int | None:
        if not self.zones:
            return None
        for z in self.zones:
            try:
                now = int(z.energy_path.read_text())
            except (OSError, ValueError):
                return None
            if z.last is not None:
                step = now - z.last
                if step < 0:  # the counter wrapped around max_energy_range_uj
                    step += z.max_range
                z.total += step
            z.last = now
        return sum(z.total for z in self.zones)


class NvmlEnergy:
    """Total energy of the visible NVIDIA GPUs (mJ since the first read) where NVML counts it,
    else integrated from power readings; also the current power draw in mW."""

    def __init__(self) -> None:
        self.handles: list = []
        self.reason: str | None = None
        self.counter = True
        self._first: int | None = None
        self._integrated = 0.0
        self._last_t: float | None = None
        try:
            import pynvml
        except ImportError:
            self.reason = "nvidia-ml-py is not installed (no GPU energy)"
            return
        self.nvml = pynvml
        try:
            pynvml.nvmlInit()
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception as exc:  # NVMLError and friends: no driver, no GPU
            self.reason = f"NVML unavailable: {exc}"
            return
        if not self.handles:
            self.reason = "no NVIDIA GPU"
            return
        try:
            for h in self.handles:
                pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
        except Exception:
            self.counter = False  # older GPUs: integrate power instead

    @property
    def available(self) -> bool:
        return bool(self.handles)

    def read(self, t: float) -> tuple[float | None, float | None]:
        """(energy in mJ since the first read, power in mW) at time ``t``."""
        if not self.handles:
            return None, None
        try:
            power = float(sum(self.nvml.nvmlDeviceGetPowerUsage(h) for h in self.handles))
            if self.counter:
                total = sum(self.nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self.handles)
                if self._first is None:
                    self._first = total
                return float(total - self._first), power
        except Exception:
            return None, None
        if self._last_t is not None:
            self._integrated += power * (t - self._last_t)  # mW x s = mJ
        self._last_t = t
        return self._integrated, power

    def temperatures(self) -> list[float]:
        """Each visible GPU's core temperature, degrees C (for the noise record)."""
        out = []
        for h in self.handles:
            try:
                out.append(float(self.nvml.nvmlDeviceGetTemperature(h, self.nvml.NVML_TEMPERATURE_GPU)))
            except Exception:  # NVMLError: not supported on this GPU
                pass
        return out


def interpolate(ts: list[float], values: list, t: float) -> float | None:
    """Linear interpolation of a cumulative counter at time ``t`` (counters are sampled coarsely)."""
    pts = [(a, b) for a, b in zip(ts, values) if b is not None]
    if not pts:
        return None
    if t <= pts[0][0]:
        return float(pts[0][1])
    for (t0, v0), (t1, v1) in zip(pts, pts[1:]):
        if t0 <= t <= t1:
            return float(v0) if t1 == t0 else v0 + (v1 - v0) * (t - t0) / (t1 - t0)
    return float(pts[-1][1])
