"""Machine fingerprint: stable, coarse, anonymous."""

from __future__ import annotations

import socket

from harness.measure.machine import GPU, fingerprint, machine_class


def test_fingerprint_is_stable_and_anonymous():
    a, b = fingerprint(), fingerprint()
    assert a.machine_id == b.machine_id and len(a.machine_id) == 16
    assert socket.gethostname() not in str(a.to_dict())
    assert a.ram_bytes > 0 and a.cpu_cores >= 1 and a.cpu_threads >= a.cpu_cores


def test_machine_classes():
    assert machine_class("Intel(R) Xeon(R)", "x86_64", 24 * 2**30 - 300 * 2**20, []) == "cpu-x86_64-24GiB"
    assert machine_class("Apple M3 Pro", "arm64", 18 * 2**30, []) == "apple-m3pro-18GiB"
    assert machine_class("x", "x86_64", 2**40, [GPU("NVIDIA H200", 141 * 2**30)]) == "nvidia-h200-141GiB"
    assert machine_class("x", "x86_64", 2**40, [GPU("NVIDIA GeForce RTX 4090", 24 * 2**30)] * 2) == "nvidia-2xrtx4090-24GiB"
    assert machine_class("Cortex", "arm64", 8 * 2**30, []) == "cpu-aarch64-8GiB"
