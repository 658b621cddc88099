"""The sampler against a process whose memory use is known."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from harness.measure.sampler import (
    SYSTEM_PERIOD_S,
    TIMED_INTERVAL_S,
    USS_MAX_SHARE,
    USS_PERIOD_S,
    Sampler,
    Timeline,
    _Cadence,
)

ALLOC = """
import sys, time
sys.stdout.write("ready\\n"); sys.stdout.flush()
time.sleep(0.3)
ballast = bytearray(200 << 20)
for i in range(0, len(ballast), 4096):
    ballast[i] = 1
time.sleep(0.5)
del ballast
time.sleep(0.3)
sys.stdin.readline()
"""


def test_sampled_peak_matches_the_kernel_peak():
    proc = subprocess.Popen([sys.executable, "-c", ALLOC], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        sampler = Sampler(proc.pid, interval_s=0.01).start()
        time.sleep(1.4)
        vmhwm = sampler.read_vmhwm()
        timeline = sampler.stop()
    finally:
        proc.communicate("\n", timeout=10)
    rss = timeline.samples["rss"]
    assert vmhwm is not None and vmhwm > 200 << 20
    assert abs(max(rss) - vmhwm) / vmhwm < 0.03
    assert rss[-1] < max(rss) - (150 << 20)  # the drop after del is seen
    # about one sample per interval (the machine may be busy: allow a wide margin)
    assert 40 < len(timeline) <= 150
    assert timeline.samples["minflt"][-1] > timeline.samples["minflt"][0]
    assert any(v is not None for v in timeline.samples["uss"])
    # the memory guard's figure is in every sample, not only in the dearer system samples
    assert all(v is not None and v > 0 for v in timeline.samples["sys_available"])
    assert timeline.last("uss") is not None and timeline.last("pswpin") is not None  # the final sample has all


def test_sampler_stops_cleanly_when_the_process_is_gone():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.2)"])
    sampler = Sampler(proc.pid, interval_s=0.01).start()
    proc.wait()
    time.sleep(0.1)
    timeline = sampler.stop()
    assert len(timeline) >= 1


def test_timeline_deltas_and_windows():
    tl = Timeline(0.01)
    for t, flt, rss in [(1.0, 10, 100), (2.0, 15, 300), (3.0, 40, 200)]:
        tl.append({"t": t, "majflt": flt, "rss": rss})
    assert tl.delta("majflt", 1.5, 3.0) == 30
    assert tl.peak("rss", 2.5, 3.5) == 200
    assert tl.peak("rss") == 300
    assert tl.value_at("majflt", 0.0) == 10


def test_last_is_the_newest_reading_of_a_sparse_series():
    tl = Timeline(0.01)
    assert tl.last("sys_available") is None
    for t, available in [(1.0, 500), (2.0, None), (3.0, 300), (4.0, None), (5.0, None)]:
        tl.append({"t": t, "rss": 1, "sys_available": available})
    assert tl.samples["sys_available"][-1] is None and tl.last("sys_available") == 300
    assert tl.last("rss") == 1 and tl.last("uss") is None


def readings(cadence: _Cadence, interval: float, n: int) -> list[float]:
    """Times at which ``cadence`` reads over ``n`` samples on the grid, with up to 5% of jitter."""
    return [t for k in range(n) if cadence.due(t := k * interval + interval * (k * 7919 % 6) / 100)]


@pytest.mark.parametrize("interval_ms", [1, 5, 10, 15, 20, 25, 30, 45, 50, 80, 200])
def test_system_figures_come_at_least_every_50_ms_whatever_the_interval(interval_ms):
    interval = interval_ms / 1000
    times = readings(_Cadence(SYSTEM_PERIOD_S, interval), interval, 400)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert times[0] == 0 and max(gaps) <= max(SYSTEM_PERIOD_S, interval) + 0.06 * interval
    assert min(gaps) > min(SYSTEM_PERIOD_S, interval) / 2  # and not needlessly more often


def test_documented_cadences_at_the_default_interval():
    def every(cadence: _Cadence) -> set[int]:
        due = [k for k in range(300) if cadence.due(k * 0.01)]
        return {b - a for a, b in zip(due, due[1:])}

    assert every(_Cadence(SYSTEM_PERIOD_S, 0.01)) == {5}
    assert every(_Cadence(USS_PERIOD_S, 0.01)) == {25}
    assert every(_Cadence(0.01, 0.01)) == {1}  # system_every=1


def test_a_dear_uss_read_is_spaced_out_to_its_share_of_time():
    cadence = _Cadence(USS_PERIOD_S, 0.01)
    cadence.stretch(0.001, USS_MAX_SHARE)  # a small process: the base cadence stands
    assert cadence.period_s == USS_PERIOD_S
    cadence.stretch(0.040, USS_MAX_SHARE)  # a page-table walk of a few GiB
    assert cadence.period_s == pytest.approx(0.040 / USS_MAX_SHARE)
    due = [k for k in range(2000) if cadence.due(k * 0.01)]
    assert {b - a for a, b in zip(due, due[1:])} == {400}
    cadence.stretch(0.0, USS_MAX_SHARE)  # the process shrank
    assert cadence.period_s == USS_PERIOD_S


def test_a_mark_takes_a_full_sample_now_and_the_timed_grid_is_sparse():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        sampler = Sampler(proc.pid, interval_s=60.0).start()  # the grid alone would not sample again
        deadline = time.monotonic() + 10
        while len(sampler.timeline) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        sampler.mark()
        while len(sampler.timeline) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        tl = sampler.timeline
        assert len(tl) == 2  # the first sample, and the mark's
        marked = {c: tl.samples[c][1] for c in ("pswpin", "sys_busy_s", "sys_steal_s", "cpu_s")}
        assert all(v is not None for v in marked.values()), marked  # every figure, the noise record included
        sampler.timed(True)
        assert sampler._grid_s == 60.0  # never denser than asked
        dense = Sampler(proc.pid, interval_s=0.01)
        dense.timed(True)
        assert dense._grid_s == pytest.approx(TIMED_INTERVAL_S)
        assert dense.timeline.timed_interval_s == pytest.approx(TIMED_INTERVAL_S)
        dense.timed(False)
        assert dense._grid_s == pytest.approx(0.01)
        sampler.stop()
    finally:
        proc.kill()
        proc.wait()
