"""GPU memory through NVML (a fake pynvml: this machine has no GPU), runtime allocator
figures through the worker's "done" message, and the offload verdict from weight bytes."""

from __future__ import annotations

import os
import sys
import types

import psutil
import pytest

from harness.fit import classify
from harness.measure.energy import NvmlEnergy
from harness.measure.gpu import NvmlMemory
from harness.measure.sampler import Sampler
from harness.results import RESULT_SCHEMA, TIMELINE_SCHEMA
from tests.test_suite_failures import run, scenario

GIB = 2**30


class FakeNvml(types.ModuleType):
    """Two GPUs of 80 GiB. ``procs`` maps a pid to the bytes it holds on GPU 0 (None: withheld by NVML)."""

    def __init__(self, procs=None, util_supported=True, procs_supported=True, children_of=None) -> None:
        super().__init__("pynvml")
        self.procs = procs or {}
        self.children_of = children_of  # list the children of this pid as using 1 GiB each
        self.used = [3 * GIB, 1 * GIB]
        self.util_supported, self.procs_supported = util_supported, procs_supported
        self.calls = {"procs": 0, "util": 0}

    def nvmlInit(self): pass
    def nvmlShutdown(self): pass
    def nvmlSystemGetDriverVersion(self): return "570.00"
    def nvmlDeviceGetName(self, h): return "NVIDIA Fake H200"
    def nvmlDeviceGetCount(self): return 2
    def nvmlDeviceGetHandleByIndex(self, i): return i
    def nvmlDeviceGetPowerUsage(self, h): return 100_000 + 50_000 * h  # mW
    def nvmlDeviceGetTotalEnergyConsumption(self, h): return 1_000

    def nvmlDeviceGetMemoryInfo(self, h):
        return types.SimpleNamespace(total=80 * GIB, used=self.used[h], free=80 * GIB - self.used[h])

    def nvmlDeviceGetUtilizationRates(self, h):
        self.calls["util"] += 1
        if not self.util_supported:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return types.SimpleNamespace(gpu=40 + 20 * h, memory=10)

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        self.calls["procs"] += 1
        if not self.procs_supported:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        procs = dict(self.procs) if h == 0 else {}
        if self.children_of is not None and h == 0:
            for child in psutil.Process(self.children_of).children():
                procs[child.pid] = GIB
        return [types.SimpleNamespace(pid=pid, usedGpuMemory=b) for pid, b in procs.items()]


def reader(monkeypatch, fake: FakeNvml, pid: int) -> NvmlMemory:
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    return NvmlMemory(NvmlEnergy(), pid)


def test_device_and_process_memory(monkeypatch):
    me = os.getpid()
    r = reader(monkeypatch, FakeNvml({me: 2 * GIB, os.getppid(): GIB}), me)
    assert r.available and r.total == 160 * GIB
    assert r.read() == {"gpu_used": 4 * GIB, "gpu_proc": 2 * GIB, "gpu_util": 50.0}


def test_process_without_a_cuda_context_holds_zero(monkeypatch):
    r = reader(monkeypatch, FakeNvml({os.getppid(): GIB}), os.getpid())
    assert r.read()["gpu_proc"] == 0


def test_unknowable_process_memory_is_null(monkeypatch):
    # NVML withholds the figure (usedGpuMemory None) ...
    assert reader(monkeypatch, FakeNvml({os.getpid(): None}), os.getpid()).read()["gpu_proc"] is None
    # ... or lists only PIDs of another namespace (a container): ours may be among them.
    foreign = 2**22 + 7  # above pid_max: exists in no namespace here
    assert reader(monkeypatch, FakeNvml({foreign: GIB}), os.getpid()).read()["gpu_proc"] is None


def test_unsupported_queries_are_dropped_after_the_first_failure(monkeypatch):
    fake = FakeNvml({os.getpid(): GIB}, util_supported=False, procs_supported=False)
    r = reader(monkeypatch, fake, os.getpid())
    first = r.read()
    assert first["gpu_used"] == 4 * GIB and first["gpu_proc"] is None and "gpu_util" not in first
    r.read()
    assert fake.calls == {"procs": 1, "util": 1}  # not asked again on every sample


def test_no_nvml_means_no_gpu_columns(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    r = NvmlMemory(NvmlEnergy(), os.getpid())
    assert not r.available and r.total is None and r.read() == {}
    assert "not installed" in r.reason


def test_sampler_records_gpu_memory_of_its_target(monkeypatch):
    me = os.getpid()
    fake = FakeNvml({me: 3 * GIB})
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    sampler = Sampler(me, 0.005, system_every=1).start()
    import time

    time.sleep(0.05)
    fake.used[0] = 9 * GIB
    fake.procs[me] = 7 * GIB
    time.sleep(0.05)
    tl = sampler.stop()
    assert tl.gpu_total == 160 * GIB
    assert tl.peak("gpu_used") == 10 * GIB and tl.peak("gpu_proc") == 7 * GIB
    assert tl.low("gpu_proc") == 3 * GIB and tl.peak("gpu_util") == 50.0


def test_sampler_on_this_machine_has_null_gpu_columns():
    tl = Sampler(os.getpid(), 0.005).start().stop()
    if tl.gpu_total is not None:
        pytest.skip("this machine has an NVIDIA GPU")
    assert all(v is None for v in tl.samples["gpu_used"])


def test_case_rows_carry_gpu_and_runtime_memory(tmp_path, tiny_gguf, monkeypatch):
    """A whole case in the real worker: NVML figures of the worker pid, allocator stats from "done"."""
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(children_of=os.getpid()))
    s = scenario(tiny_gguf, ["OffloadStatsRunner"], repetitions=2, gen_tokens=40,
                 models=[{"artifact": str(tiny_gguf), "runtime": "fake_runners:OffloadStatsRunner",
                          "options": {"token_delay": 0.01}}])
    results, df = run(s, tmp_path)
    assert (df["status"] == "ok").all() and len(df) == 2
    from harness.cli.present import case_line

    line = case_line(results[0], 1)
    assert "GPU 1,024 MiB (allocator 123)" in line and "40 MiB of weights on the host" in line
    row = df.iloc[0]
    assert row["runtime_peak_bytes"] == 123 << 20
    assert (row["offload_host_bytes"], row["offload_device_bytes"]) == (40 << 20, 60 << 20)
    assert row["gpu_total_bytes"] == 160 * GIB and row["gpu_used_peak_bytes"] == 4 * GIB
    assert row["gpu_proc_peak_bytes"] == GIB  # the worker is the listed child of this test process
    assert row["gpu_util_mean_pct"] == pytest.approx(50.0)
    assert row["gpu_power_mean_w"] == pytest.approx(250.0)  # 100 W + 150 W
    # The weights split between host and GPU is an offload verdict, whatever the layer counts say.
    assert row["fit_class"] in ("offload", "slow", "spill", "no_fit") and row["fit_offload"]
    assert "40 MiB of weights (40%) in host memory" in row["fit_reason"]


def test_runner_without_stats_or_with_broken_stats_still_gives_ok_rows(tmp_path, tiny_gguf):
    s = scenario(tiny_gguf, ["FakeRunner", "BrokenStatsRunner"])
    _, df = run(s, tmp_path)
    assert (df["status"] == "ok").all() and len(df) == 4
    assert df["runtime_peak_bytes"].isna().all() and df["offload_host_bytes"].isna().all()
    assert df["gpu_total_bytes"].isna().all() or df["gpu_total_bytes"].notna().all()


def ok_row(**kw):
    row = {"status": "ok", "rep_peak_rss_bytes": 1 * GIB, "decode_tok_s": 50.0, "ttft_s": 0.5,
           "read_bytes": 0, "artifact_size_bytes": GIB}
    row.update(kw)
    return row


def test_offload_from_weight_bytes():
    split = classify(ok_row(offload_host_bytes=3 * GIB, offload_device_bytes=1 * GIB), 16 * GIB)
    assert split.fit_class == "offload" and split.fit_offload and "75%" in split.fit_reason
    whole = classify(ok_row(offload_host_bytes=0, offload_device_bytes=4 * GIB), 16 * GIB)
    assert whole.fit_class == "fits" and not whole.fit_offload
    cpu_only = classify(ok_row(offload_host_bytes=None, offload_device_bytes=None, n_layers_device=0,
                               n_layers_total=30), 16 * GIB)
    assert cpu_only.fit_class == "fits"


def test_new_columns_are_in_the_schema():
    for name in ("runtime_peak_bytes", "offload_host_bytes", "offload_device_bytes", "gpu_total_bytes",
                 "gpu_used_peak_bytes", "gpu_proc_peak_bytes", "gpu_util_mean_pct", "gpu_power_mean_w"):
        assert name in RESULT_SCHEMA.names
    for name in ("gpu_used_bytes", "gpu_proc_bytes", "gpu_util_pct"):
        assert name in TIMELINE_SCHEMA.names
