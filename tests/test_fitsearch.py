"""Max-fit-context search against a known boundary (no runtime: the probe is a function)."""

from __future__ import annotations

from harness.fitsearch import search


def boundary_probe(limits: dict[str, int]):
    """fits below limits['tight'], then tight, slow, ... by context; records calls."""
    calls = []

    def probe(n):
        calls.append(n)
        cls = "fits"
        for name in ("tight", "slow", "spill", "no_fit"):
            if name in limits and n >= limits[name]:
                cls = name
        return cls, f"ctx {n}"

    return probe, calls


def test_doubling_then_bisection_finds_the_boundary():
    probe, calls = boundary_probe({"tight": 3000, "no_fit": 6000})
    r = search(probe, 512, 8192, step=256)
    assert r.max_fit == 2816  # the last 256-step below 3000
    assert r.probes[4096] == "tight" and r.probes[8192] == "no_fit"
    assert r.first_at()["no_fit"] == 8192 and r.first_at()["tight"] <= 3072
    assert len(calls) == len(set(calls)) < 12  # no probe twice
    assert "max fit context 2,816" in r.summary()


def test_fits_all_the_way():
    probe, _ = boundary_probe({})
    r = search(probe, 512, 8192, step=256)
    assert r.max_fit == 8192 and "trained maximum" in r.summary()


def test_does_not_fit_at_all():
    probe, calls = boundary_probe({"no_fit": 1})
    r = search(probe, 512, 8192, step=256)
    assert r.max_fit is None and calls == [512]
    assert "does not fit" in r.summary()


def test_stops_doubling_at_no_fit():
    probe, calls = boundary_probe({"slow": 1000, "no_fit": 2000})
    r = search(probe, 512, 65536, step=256)
    assert max(calls) == 2048 and r.max_fit is not None and r.max_fit < 1000
