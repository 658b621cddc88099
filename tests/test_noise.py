"""Drift, noise and roofline: the system readers, the row figures and the flags (no model)."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from harness.fit import Thresholds, measurement_flags
from harness.measure.budget import CgroupFiles, open_budget
from harness.measure.cpuquota import QuotaUnavailable, open_cpu_quota
from harness.measure.noise import SystemNoise, cpuinfo_mhz, parse_proc_stat
from harness.measure.sampler import Timeline
from harness.metrics import ci95, rate_drift
from harness.rows import Roofline, _repetition_statistics, noise_columns, roofline_columns
from tests.fake_cgroupfs import CgroupV2Kernel

TICKS = os.sysconf("SC_CLK_TCK")


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# -- the system readers ------------------------------------------------------------------------------------

def test_cpufreq_thermal_and_proc_stat_are_read(tmp_path):
    write(tmp_path / "sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq", "2000000\n")
    write(tmp_path / "sys/devices/system/cpu/cpu1/cpufreq/scaling_cur_freq", "1000000\n")
    write(tmp_path / "sys/class/thermal/thermal_zone0/temp", "45000\n")
    write(tmp_path / "sys/class/thermal/thermal_zone1/temp", "-273000\n")  # a broken zone: skipped
    write(tmp_path / "sys/class/hwmon/hwmon0/temp1_input", "61500\n")
    write(tmp_path / "proc/stat", f"cpu  {TICKS} 0 {TICKS} 500 7 0 0 {TICKS // 2} 0 0\ncpu0 1 2 3\n")
    noise = SystemNoise(root=str(tmp_path))
    got = noise.read()
    noise.close()
    assert got["cpu_mhz"] == pytest.approx(1500.0)
    assert got["temp_c"] == pytest.approx(61.5)
    assert got["sys_busy_s"] == pytest.approx(2.0) and got["sys_steal_s"] == pytest.approx(0.5)
    assert noise.freq_fds == [] and noise.stat is None  # closed


def test_without_cpufreq_the_frequency_comes_from_cpuinfo_and_missing_sources_stay_null(tmp_path):
    write(tmp_path / "proc/cpuinfo", "processor\t: 0\ncpu MHz\t\t: 2445.404\n\nprocessor\t: 1\ncpu MHz\t\t: 2400.0\n")
    noise = SystemNoise(root=str(tmp_path))
    got = noise.read()
    assert got["cpu_mhz"] == pytest.approx((2445.404 + 2400.0) / 2)
    assert got["temp_c"] is None and "sys_busy_s" not in got
    assert noise.sources == ["cpuinfo"]


def test_proc_stat_busy_leaves_out_idle_iowait_and_steal():
    busy, steal = parse_proc_stat(b"cpu  100 20 30 1000 50 5 5 40 7 0\n")
    assert busy == pytest.approx(160 / TICKS) and steal == pytest.approx(40 / TICKS)
    assert cpuinfo_mhz(b"model name : x\ncpu MHz : 3000.5\n") == [3000.5]


def test_this_machine_gives_a_frequency_or_nothing_and_never_fails():
    noise = SystemNoise()
    got = noise.read()
    noise.close()
    assert got["cpu_mhz"] is None or got["cpu_mhz"] > 0
    if os.path.exists("/proc/stat"):
        assert got["sys_busy_s"] > 0


# -- statistics ----------------------------------------------------------------------------------------------

def test_ci95_is_a_student_t_interval():
    mean, half = ci95([10.0, 12.0, 14.0])
    assert mean == 12.0
    assert half == pytest.approx(4.303 * 2.0 / 3 ** 0.5)
    assert ci95([5.0]) is None


def test_rate_drift_compares_the_first_and_last_quarter_of_the_tokens():
    steady = [i * 0.01 for i in range(41)]
    assert rate_drift(steady) == pytest.approx(0.0, abs=1e-9)
    slowing = [i * 0.01 for i in range(21)] + [0.2 + i * 0.04 for i in range(1, 21)]  # 4x slower after half
    assert rate_drift(slowing) == pytest.approx(-0.75)
    assert rate_drift([0.0, 0.1, 0.2]) is None  # too few tokens to say


def rows_with(rates: list[float]) -> list[dict]:
    return [{"status": "ok", "repetition": i, "decode_tok_s": r, "turn": None} for i, r in enumerate(rates)]


def test_case_statistics_give_mean_ci_and_drift_on_every_row():
    rows = rows_with([100.0, 90.0, 80.0, 25.0]) + [{"status": "timeout", "repetition": None}]
    _repetition_statistics(rows)
    assert all(r["drift"] == pytest.approx(-0.75) for r in rows)
    assert rows[0]["decode_tok_s_mean"] == pytest.approx(73.75)
    assert rows[0]["decode_tok_s_ci95"] > 0
    single = rows_with([50.0])
    _repetition_statistics(single)
    assert single[0]["drift"] is None and single[0]["decode_tok_s_ci95"] is None


# -- the flags (fit.py) --------------------------------------------------------------------------------------

def test_drift_beyond_the_threshold_is_flagged_and_within_it_is_not():
    t = Thresholds()
    flagged = measurement_flags({"status": "ok", "drift": -0.75, "rep_drift": 0.01}, t)
    assert flagged.drift_flag is True and "-75%" in flagged.measurement_note
    quiet = measurement_flags({"status": "ok", "drift": -0.05, "rep_drift": 0.1}, t)
    assert quiet.drift_flag is False and quiet.measurement_note is None
    inside = measurement_flags({"status": "ok", "drift": 0.0, "rep_drift": -0.5, "repetition": 2}, t)
    assert inside.drift_flag is True and "within repetition 2" in inside.measurement_note
    assert measurement_flags({"status": "ok"}, t).drift_flag is None  # nothing measured: not judged
    assert measurement_flags({"status": "timeout", "drift": -0.9}, t).drift_flag is None


def test_noise_flags_steal_outside_load_and_a_wide_interval():
    t = Thresholds()
    base = {"status": "ok", "cpu_threads": 2}
    assert measurement_flags({**base, "steal_fraction": 0.0, "outside_load_cores": 0.1}, t).noise_flag is False
    loaded = measurement_flags({**base, "steal_fraction": 0.0, "outside_load_cores": 1.6}, t)
    assert loaded.noise_flag is True and "1.60 of 2 CPUs" in loaded.measurement_note
    assert measurement_flags({**base, "steal_fraction": 0.2}, t).noise_flag is True
    wide = measurement_flags({**base, "decode_tok_s_mean": 100.0, "decode_tok_s_ci95": 9.0}, t)
    assert wide.noise_flag is True and "CI" in wide.measurement_note
    assert measurement_flags({**base, "decode_tok_s_mean": 100.0, "decode_tok_s_ci95": 1.0}, t).noise_flag is False
    relaxed = Thresholds().merged({"max_outside_load": 0.9})
    assert measurement_flags({**base, "outside_load_cores": 1.6}, relaxed).noise_flag is False


# -- the noise record over a timeline --------------------------------------------------------------------

def test_noise_columns_take_deltas_between_the_marks_around_the_timed_span():
    tl = Timeline(0.01)
    # t, child cpu_s, system busy, steal (noise columns only at the marks: t=0, 1, 3, 10)
    for t, cpu, busy, steal, mhz in [(0, 0.0, 10.0, 1.0, 2400), (0.5, 0.4, None, None, None),
                                     (1, 0.5, 11.0, 1.0, 2400), (2, 2.0, None, None, None),
                                     (3, 4.5, 17.0, 1.2, 2000), (10, 5.0, 30.0, 5.0, 2400)]:
        tl.append({"t": t, "cpu_s": cpu, "sys_busy_s": busy, "sys_steal_s": steal, "cpu_mhz": mhz, "temp_c": None})
    got = noise_columns(tl, (1.0, 3.0), cpus=2)
    assert got["outside_load_cores"] == pytest.approx(((17 - 11) - (4.5 - 0.5)) / 2)
    assert got["steal_fraction"] == pytest.approx(0.2 / (2 * 2))
    assert got["cpu_mhz_min"] == 2000 and got["cpu_mhz_mean"] == pytest.approx(2200)
    whole = noise_columns(tl, (5.0, 5.5), cpus=2)  # fewer than two marks inside: the whole case
    assert whole["steal_fraction"] == pytest.approx(4.0 / (10 * 2))


def test_roofline_counts_weights_and_the_kv_read_at_the_mean_decode_depth():
    roof = Roofline(weights_bytes=100_000_000, kv_bytes_per_token=10_000, bandwidth_bytes_s=10e9,
                    bandwidth_source="numpy-read-2threads-256MiB")
    row = {"status": "ok", "prompt_tokens": 4000, "gen_tokens": 200, "decode_tok_s": 50.0}
    got = roofline_columns(row, roof)
    assert got["roofline_bytes_per_token"] == 100_000_000 + 10_000 * 4100
    assert got["roofline_tok_s"] == pytest.approx(10e9 / 141_000_000)
    assert got["roofline_efficiency"] == pytest.approx(50.0 / (10e9 / 141_000_000))
    assert got["mem_bandwidth_gbs"] == pytest.approx(10.0)
    split = roofline_columns({**row, "n_layers_device": 10, "n_layers_total": 30}, roof)
    assert "roofline_efficiency" not in split  # two memories: no single roofline
    no_bw = roofline_columns(row, Roofline(1, 1, None, None))
    assert "roofline_tok_s" not in no_bw and no_bw["roofline_bytes_per_token"] > 0
    assert roofline_columns({"status": "oom"}, roof) == {}


# -- CPU quotas against a simulated cgroupfs ---------------------------------------------------------------

ME = 4242


class V1Cpu(CgroupFiles):
    """A v1 cpu hierarchy: control files appear on mkdir, a quota below 1 ms is refused."""

    def mkdir(self, path: Path) -> None:
        path.mkdir()
        for name, text in (("cpu.cfs_quota_us", "-1\n"), ("cpu.cfs_period_us", "100000\n"), ("cgroup.procs", "")):
            (path / name).write_text(text)

    def __init__(self, mount: Path) -> None:
        self.mount = mount

    def write(self, path: Path, text: str) -> None:
        if not path.exists():
            raise OSError(errno.ENOENT, "no such file", str(path))
        if path.name == "cpu.cfs_quota_us" and int(text) < 1000:
            raise OSError(errno.EINVAL, "invalid", str(path))
        if path.name == "cgroup.procs":  # a process is in one cgroup: moving it takes it out of the others
            for procs in self.mount.rglob("cgroup.procs"):
                procs.write_text("".join(f"{p}\n" for p in procs.read_text().split() if p != text.strip()))
            text = path.read_text() + text.strip() + "\n"
        path.write_text(text)

    def rmdir(self, path: Path) -> None:
        if (path / "cgroup.procs").read_text().split():
            raise OSError(errno.EBUSY, "busy", str(path))
        shutil.rmtree(path)


def test_v1_quota_is_a_child_of_our_cpu_cgroup(tmp_path):
    files = V1Cpu(tmp_path / "cpu")
    home = tmp_path / "cpu" / "jobs"
    home.parent.mkdir()
    files.mkdir(home)
    quota = open_cpu_quota(0.25, tmp_path, proc_cgroup="2:cpu,cpuacct:/jobs\n0::/\n", files=files, cpus=2)
    assert quota.method == "cgroup-v1" and quota.cpus == pytest.approx(0.5)
    assert (quota.path / "cpu.cfs_quota_us").read_text() == "50000"
    quota.add(ME)
    assert (quota.path / "cgroup.procs").read_text().split() == ["4242"]
    quota.close()
    assert not quota.path.exists() and (home / "cgroup.procs").read_text().split() == ["4242"]


def test_v2_quota_in_the_true_root_enables_the_cpu_controller(tmp_path):
    kernel = CgroupV2Kernel(tmp_path / "cg")
    kernel.place("/", ME)
    quota = open_cpu_quota(0.25, kernel.root, proc_cgroup=kernel.proc_cgroup(ME), files=kernel, cpus=4)
    assert quota.method == "cgroup-v2"
    assert (quota.path / "cpu.max").read_text().split() == ["100000", "100000"]
    quota.add(ME)
    assert kernel.cgroup_of(ME) == quota.path
    quota.close()
    assert kernel.cgroup_of(ME) == kernel.root and not quota.path.exists()


def test_v2_quota_beside_a_budget_that_moved_fitbench_into_its_leaf(tmp_path, monkeypatch):
    from harness.measure import budget as budget_module

    monkeypatch.setattr(budget_module, "_DELEGATED", [])
    kernel = CgroupV2Kernel(tmp_path / "cg")
    kernel.place("/app", ME)
    with pytest.raises(QuotaUnavailable, match="cpu controller"):  # fitbench shares /app: no children with cpu
        open_cpu_quota(0.5, kernel.root, proc_cgroup=kernel.proc_cgroup(ME), files=kernel, cpus=2)
    open_budget(200 << 20, kernel.root, proc_cgroup=kernel.proc_cgroup(ME), pid=ME, files=kernel,
                systemd=lambda: "no systemd")  # moves fitbench into /app/fitbench-parent
    quota = open_cpu_quota(0.5, kernel.root, proc_cgroup=kernel.proc_cgroup(ME), files=kernel, cpus=2)
    assert quota.path.parent == kernel.root / "app"
    assert (quota.path / "cpu.max").read_text().split() == ["100000", "100000"]


def test_a_quota_is_a_fraction_of_the_machine():
    with pytest.raises(ValueError, match="between 0 and 1"):
        open_cpu_quota(1.5)


# -- the bandwidth probe -------------------------------------------------------------------------------

def test_the_bandwidth_probe_streams_a_buffer_in_a_subprocess():
    from harness.measure.bandwidth import measure

    got = measure(copy=True, size=32 << 20, threads=2, passes=1)
    assert got["read_bytes_s"] > 0 and got["copy_bytes_s"] > 0
    assert got["buffer_bytes"] == 32 << 20 and got["source"].startswith("numpy-read-")


def test_the_bandwidth_is_cached_per_machine_and_a_failure_is_cached_too(tmp_path, monkeypatch):
    from harness.measure import bandwidth

    monkeypatch.setenv("FITBENCH_CACHE_DIR", str(tmp_path))
    calls = []

    def fake_measure(**_):
        calls.append(1)
        return {"read_bytes_s": 5e9, "source": "numpy-read-2threads-256MiB"}

    monkeypatch.setattr(bandwidth, "measure", fake_measure)
    assert bandwidth.machine_bandwidth("m1")["read_bytes_s"] == 5e9
    assert bandwidth.machine_bandwidth("m1")["read_bytes_s"] == 5e9 and len(calls) == 1  # from the cache
    assert (tmp_path / "bandwidth-m1.json").exists()

    def failing(**_):
        calls.append(1)
        raise RuntimeError("bandwidth probe failed: No module named 'numpy'")

    monkeypatch.setattr(bandwidth, "measure", failing)
    assert bandwidth.machine_bandwidth("m2") is None and bandwidth.machine_bandwidth("m2") is None
    assert len(calls) == 2  # the failure was cached: not retried every case
    monkeypatch.setenv("FITBENCH_BANDWIDTH", "0")
    assert bandwidth.machine_bandwidth("m1") is None


def test_the_run_summary_warns_about_drifting_and_noisy_cases():
    from types import SimpleNamespace

    from harness.cli.present import measurement_warnings

    case = SimpleNamespace(index=1, label="pp32+tg48 @ ctx256")
    drifting = SimpleNamespace(case=case, rows=[
        {"drift_flag": True, "noise_flag": False, "measurement_note": "decode drifted -78% from the first to the last "
                                                                      "repetition (max_drift 50%)"}] * 3)
    quiet = SimpleNamespace(case=case, rows=[{"drift_flag": False, "noise_flag": False}])
    [line] = measurement_warnings([drifting, quiet])
    assert "case 2" in line and "drift:" in line and "-78%" in line and line.count("decode drifted") == 1


def test_a_figure_cached_on_a_busy_machine_is_measured_again_when_it_is_quieter(tmp_path, monkeypatch):
    import json

    from harness.measure import bandwidth

    monkeypatch.setenv("FITBENCH_CACHE_DIR", str(tmp_path))
    cpus = os.cpu_count() or 1
    (tmp_path / "bandwidth-m.json").write_text(json.dumps(
        {"version": bandwidth.CACHE_VERSION, "read_bytes_s": 1e9, "source": "x", "load_avg": cpus * 10.0}))
    monkeypatch.setattr(bandwidth, "_load", lambda: cpus * 1.0)
    monkeypatch.setattr(bandwidth, "measure", lambda **_: {"read_bytes_s": 8e9, "source": "numpy-read-1threads-256MiB"})
    assert bandwidth.machine_bandwidth("m")["read_bytes_s"] == 8e9
    assert json.loads((tmp_path / "bandwidth-m.json").read_text())["load_avg"] == cpus * 1.0
    monkeypatch.setattr(bandwidth, "measure", lambda **_: pytest.fail("measured again"))
    assert bandwidth.machine_bandwidth("m")["read_bytes_s"] == 8e9  # the quieter figure stays
