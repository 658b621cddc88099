"""Energy readers on fixtures: a fake powercap sysfs tree (with counter wrap) and a fake NVML."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from harness.measure.energy import NvmlEnergy, RaplReader, interpolate
from harness.measure.sampler import Timeline
from harness.rows import energy_columns


def zone(root: Path, name: str, energy: int, max_range: int = 1_000_000, label: str = "package-0") -> Path:
    z = root / name
    z.mkdir(parents=True)
    (z / "energy_uj").write_text(f"{energy}\n")
    (z / "max_energy_range_uj").write_text(f"{max_range}\n")
    (z / "name").write_text(label + "\n")
    return z


def test_rapl_sums_packages_ignores_subzones_and_unwraps(tmp_path):
    p0 = zone(tmp_path, "intel-rapl:0", 900_000)
    p1 = zone(tmp_path, "intel-rapl:1", 10, label="package-1")
    zone(tmp_path, "intel-rapl:0:0", 5, label="core")  # inside package 0: must not count twice
    r = RaplReader(tmp_path)
    assert r.available and r.reason is None and len(r.zones) == 2
    assert r.read_uj() == 0
    (p0 / "energy_uj").write_text("950000\n")
    (p1 / "energy_uj").write_text("110\n")
    assert r.read_uj() == 50_000 + 100
    (p0 / "energy_uj").write_text("20000\n")  # wrapped: 950000 -> 1000000 -> 20000
    assert r.read_uj() == 50_000 + 100 + 70_000


def test_rapl_missing_or_unreadable_says_why(tmp_path):
    assert "missing" in RaplReader(tmp_path / "nope").reason
    z = zone(tmp_path, "intel-rapl:0", 1)
    (z / "energy_uj").write_text("not a number")
    r = RaplReader(tmp_path)
    assert not r.available and "not readable" in r.reason
    assert r.read_uj() is None


def test_this_machine_reports_null_with_a_reason():
    r = RaplReader()
    if r.available:
        pytest.skip("this machine has RAPL")
    assert r.reason


class FakeNvml(types.ModuleType):
    def __init__(self, counter: bool = True) -> None:
        super().__init__("pynvml")
        self.energy = 1_000_000
        self.counter = counter

    def nvmlInit(self): pass
    def nvmlDeviceGetCount(self): return 1
    def nvmlDeviceGetHandleByIndex(self, i): return i
    def nvmlDeviceGetPowerUsage(self, h): return 250_000  # 250 W in mW

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        if not self.counter:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return self.energy


def test_nvml_energy_counter_and_power_integration(monkeypatch):
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    n = NvmlEnergy()
    assert n.available and n.counter
    assert n.read(0.0) == (0.0, 250_000.0)
    fake.energy += 5_000  # 5 J in mJ
    assert n.read(1.0)[0] == 5_000.0
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(counter=False))
    n = NvmlEnergy()
    assert not n.counter
    n.read(0.0)
    assert n.read(2.0)[0] == pytest.approx(500_000.0)  # 250 W for 2 s = 500 J


def test_nvml_absent(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    n = NvmlEnergy()
    assert not n.available and "not installed" in n.reason


def test_joules_per_phase_from_coarse_samples():
    tl = Timeline(0.05)
    for t, uj in [(0.0, 0), (1.0, 20_000_000), (2.0, 30_000_000), (3.0, 40_000_000)]:
        tl.append({"t": t, "cpu_energy_uj": uj})
    tl.energy_source = "rapl"
    # prompt handed over at 0.5 s, first token at 1.5 s, 11 tokens until 2.5 s
    cols = energy_columns(tl, 0.5, [1.5 + 0.1 * i for i in range(11)])
    assert cols["energy_prefill_j"] == pytest.approx(15.0)  # 10 J -> 25 J
    assert cols["energy_decode_j"] == pytest.approx(10.0)  # 25 J -> 35 J
    assert cols["energy_j_per_token"] == pytest.approx(1.0)
    assert cols["avg_power_w"] == pytest.approx(12.5)
    assert interpolate([0.0, 1.0], [None, None], 0.5) is None


def test_no_counters_means_null_figures():
    tl = Timeline(0.05)
    tl.append({"t": 0.0})
    tl.energy_note = "no RAPL powercap on this machine"
    cols = energy_columns(tl, 0.0, [0.1, 0.2])
    assert "energy_decode_j" not in cols and cols["energy_note"]
