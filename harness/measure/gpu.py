"""GPU memory and utilisation of NVIDIA GPUs through NVML, read by the sampler.

It reuses the NVML session that ``harness.measure.energy.NvmlEnergy`` opened (one
``nvmlInit``, one set of device handles) and adds, per sample:

- ``gpu_used``: memory in use on the visible GPUs, every process (summed);
- ``gpu_proc``: memory of the measured process itself, from
  ``nvmlDeviceGetComputeRunningProcesses``: what the case really holds,
  allocator cache and CUDA context included (torch's
  ``max_memory_allocated`` counts only live tensors);
- ``gpu_util``: GPU utilisation in percent (mean over the GPUs).

``gpu_total`` is read once. The sampler reads these with the system-wide
figures (every ``system_every`` samples, 50 ms by default), so a spike
shorter than that can be missed; the runtime's own allocator peak
(``runtime_peak_bytes``) is the exact complement for torch. Everything is ``None`` where NVML, a GPU or the
figure is not available (no driver, MIG slices without utilisation, a
container whose PID namespace hides the process from NVML).
"""

from __future__ import annotations

import os
from typing import Any

from harness.measure.energy import NvmlEnergy


def _pid_visible(pid: int) -> bool:
    """Whether ``pid`` exists in this PID namespace (NVML reports host PIDs)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class NvmlMemory:
    """Reads GPU memory of the device(s) and of process ``pid``; cheap enough for every system sample."""

    def __init__(self, session: NvmlEnergy, pid: int) -> None:
        self.nvml: Any = getattr(session, "nvml", None)
        self.handles: list = list(session.handles) if self.nvml is not None else []
        self.pid = pid
        self.reason: str | None = session.reason
        self.total: int | None = None
        self._util = True
        self._procs = True
        if not self.handles:
            return
        try:
            self.total = int(sum(self.nvml.nvmlDeviceGetMemoryInfo(h).total for h in self.handles))
        except Exception as exc:  # noqa: BLE001 - NVMLError: a device gone or not supported
            self.reason = f"NVML memory info unavailable: {exc}"
            self.handles = []

    @property
    def available(self) -> bool:
        return bool(self.handles)

    def read(self) -> dict[str, Any]:
        """{"gpu_used": bytes, "gpu_proc": bytes | None, "gpu_util": percent | None}; {} without NVML."""
        if not self.handles:
            return {}
        row: dict[str, Any] = {}
        try:
            row["gpu_used"] = int(sum(self.nvml.nvmlDeviceGetMemoryInfo(h).used for h in self.handles))
        except Exception:  # noqa: BLE001
            return {}
        if self._procs:
            row["gpu_proc"] = self._process_bytes()
        if self._util:
            try:
                rates = [self.nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self.handles]
                row["gpu_util"] = float(sum(rates)) / len(rates)
            except Exception:  # noqa: BLE001 - e.g. NOT_SUPPORTED on MIG: stop asking
                self._util = False
        return row

    def _process_bytes(self) -> int | None:
        """The measured process's GPU memory over all GPUs.

        0 when NVML lists other processes but not ours (no CUDA context yet);
        None when the figure cannot be known: NVML withholds it
        (``usedGpuMemory`` None) or lists only PIDs this namespace cannot see
        (a container without the host PID namespace)."""
        total, found, foreign = 0, False, False
        try:
            for h in self.handles:
                for proc in self.nvml.nvmlDeviceGetComputeRunningProcesses(h):
                    if proc.pid == self.pid:
                        used = getattr(proc, "usedGpuMemory", None)
                        if used is None:
                            return None
                        total += int(used)
                        found = True
                    elif not _pid_visible(proc.pid):
                        foreign = True
        except Exception:  # noqa: BLE001 - NOT_SUPPORTED (some MIG/vGPU setups): stop asking
            self._procs = False
            return None
        if found:
            return total
        return None if foreign else 0
