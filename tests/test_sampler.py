"""The sampler against a process whose memory use is known."""

from __future__ import annotations

import subprocess
import sys
import time

from harness.sampler import Sampler

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
    assert timeline.samples["sys_available"][0] > 0


def test_sampler_stops_cleanly_when_the_process_is_gone():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.2)"])
    sampler = Sampler(proc.pid, interval_s=0.01).start()
    proc.wait()
    time.sleep(0.1)
    timeline = sampler.stop()
    assert len(timeline) >= 1


def test_timeline_deltas_and_windows():
    from harness.sampler import Timeline

    tl = Timeline(0.01)
    for t, flt, rss in [(1.0, 10, 100), (2.0, 15, 300), (3.0, 40, 200)]:
        tl.append({"t": t, "majflt": flt, "rss": rss})
    assert tl.delta("majflt", 1.5, 3.0) == 30
    assert tl.peak("rss", 2.5, 3.5) == 200
    assert tl.peak("rss") == 300
    assert tl.value_at("majflt", 0.0) == 10
