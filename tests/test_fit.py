"""Fit classification: thresholds at their edges, failures, components."""

from __future__ import annotations

import pytest

from harness.fit import Thresholds, classify, max_fit_context, parse_size, worst

MiB = 2**20
BUDGET = 1000 * MiB


def ok_row(**kw) -> dict:
    row = {"status": "ok", "peak_rss_bytes": 500 * MiB, "rep_peak_rss_bytes": 500 * MiB, "decode_tok_s": 50.0,
           "ttft_s": 1.0, "read_bytes": 0, "artifact_size_bytes": 100 * MiB, "swap_in_pages": 0,
           "swap_out_pages": 0, "n_layers_total": 30, "n_layers_device": 0}
    row.update(kw)
    return row


def test_fits_with_components():
    v = classify(ok_row(), BUDGET)
    assert (v.fit_class, v.fit_memory, v.fit_speed, v.fit_offload) == ("fits", "resident", "interactive", False)
    assert v.fit_headroom == pytest.approx(0.5)
    assert "50% headroom" in v.fit_reason


def test_headroom_edge_is_exact():
    t = Thresholds(headroom=0.10)
    assert classify(ok_row(rep_peak_rss_bytes=900 * MiB), BUDGET, t).fit_class == "fits"  # exactly 10% left
    assert classify(ok_row(rep_peak_rss_bytes=900 * MiB + 1), BUDGET, t).fit_class == "tight"


def test_speed_edges():
    t = Thresholds(min_decode_tok_s=10, max_ttft_s=5)
    assert classify(ok_row(decode_tok_s=10.0), BUDGET, t).fit_class == "fits"
    assert classify(ok_row(decode_tok_s=9.99), BUDGET, t).fit_class == "slow"
    assert classify(ok_row(ttft_s=5.0), BUDGET, t).fit_class == "fits"
    slow = classify(ok_row(ttft_s=5.01), BUDGET, t)
    assert slow.fit_class == "slow" and "TTFT 5.0 s > 5 s" in slow.fit_reason


def test_small_reads_of_a_small_artifact_are_not_spill():
    assert classify(ok_row(artifact_size_bytes=1000, read_bytes=10 << 20), BUDGET).fit_class == "fits"
    assert classify(ok_row(artifact_size_bytes=1000, read_bytes=16 << 20), BUDGET).fit_class == "spill"


def test_spill_from_bytes_read_and_from_swap():
    t = Thresholds(spill_read_fraction=0.5)
    assert classify(ok_row(read_bytes=50 * MiB - 1), BUDGET, t).fit_class == "fits"
    spill = classify(ok_row(read_bytes=50 * MiB), BUDGET, t)
    assert spill.fit_class == "spill" and spill.fit_memory == "spill" and "re-read" in spill.fit_reason
    assert classify(ok_row(swap_in_pages=(64 * MiB) // 4096), BUDGET).fit_class == "spill"


def test_over_budget_unenforced_is_spill_and_worst_wins():
    v = classify(ok_row(rep_peak_rss_bytes=1200 * MiB, decode_tok_s=2.0), BUDGET)
    assert v.fit_class == "spill" and v.fit_memory == "over_budget" and v.fit_speed == "slow"
    assert v.fit_reason.index("above the") < v.fit_reason.index("decode")  # worst reason first


def test_offload_only_when_some_layers_are_on_the_device():
    assert classify(ok_row(n_layers_device=20), BUDGET).fit_class == "offload"
    assert classify(ok_row(n_layers_device=30), BUDGET).fit_class == "fits"
    assert classify(ok_row(n_layers_device=None, n_layers_total=None), BUDGET).fit_class == "fits"  # no GPU data


@pytest.mark.parametrize("status, expected", [
    ("oom", "no_fit"), ("killed", "no_fit"), ("load_error", "no_fit"), ("stopped", "spill"),
    ("crashed", None), ("runtime_error", None), ("interrupted", None), ("unavailable", None),
])
def test_failed_cases(status, expected):
    assert classify({"status": status, "error": "x"}, BUDGET).fit_class == expected


def test_timeout_is_slow_unless_it_was_thrashing():
    assert classify({"status": "timeout"}, BUDGET).fit_class == "slow"
    row = {"status": "timeout", "case_read_bytes": 900 * MiB, "artifact_size_bytes": 100 * MiB}
    assert classify(row, BUDGET).fit_class == "spill"


def test_missing_measurements_do_not_crash():
    v = classify({"status": "ok"}, BUDGET)
    assert v.fit_class == "fits" and v.fit_headroom is None


def test_worst_and_max_fit_context():
    assert worst(["fits", "slow", None, "tight"]) == "slow"
    assert worst([None]) is None
    assert max_fit_context({512: "fits", 1024: "fits", 2048: "tight", 4096: "fits"}) == 1024
    assert max_fit_context({512: "no_fit"}) is None


def test_thresholds_merge_and_validation():
    t = Thresholds().merged({"min_decode_tok_s": 20})
    assert t.min_decode_tok_s == 20 and t.headroom == 0.10
    with pytest.raises(ValueError, match="unknown threshold"):
        Thresholds().merged({"speed": 1})
    with pytest.raises(ValueError, match="non-negative"):
        Thresholds().merged({"headroom": -1})
    with pytest.raises(ValueError, match="below 1"):
        Thresholds().merged({"headroom": 1.5})


@pytest.mark.parametrize("text, expected", [
    ("8GiB", 8 * 2**30), ("512 MiB", 512 * 2**20), ("1.5G", int(1.5 * 2**30)), ("2GB", 2 * 10**9), (4096, 4096),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "8 parsecs", "-1G", "0", ""])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_a_load_peak_above_the_budget_is_never_fits_or_tight():
    """A float32 cast at load can peak above everything after it: the verdict never judges below it."""
    from harness.fit import judged_peak

    mib = 2**20
    row = {"status": "ok", "rep_peak_rss_bytes": 100 * mib, "load_peak_rss_bytes": 300 * mib,
           "peak_rss_bytes": 300 * mib, "decode_tok_s": 50.0, "ttft_s": 0.1}
    assert judged_peak(row) == 300 * mib
    v = classify(row, 200 * mib)
    assert v.fit_class == "spill" and v.fit_memory == "over_budget" and "300 MiB" in v.fit_reason
    # the kernel's VmHWM catches a spike between two samples
    assert classify({**row, "load_peak_rss_bytes": 150 * mib, "peak_rss_bytes": 150 * mib,
                     "vmhwm_bytes": 250 * mib}, 200 * mib).fit_class == "spill"
    # a turn row is judged on its turn and the load, not on the whole session's peak
    turn = {**row, "turn": 1, "rep_peak_rss_bytes": 120 * mib, "load_peak_rss_bytes": 110 * mib,
            "peak_rss_bytes": 400 * mib, "vmhwm_bytes": 400 * mib}
    assert judged_peak(turn) == 120 * mib and classify(turn, 200 * mib).fit_class == "fits"


def test_memory_verdict_is_the_one_definition():
    from harness.fit import memory_verdict

    assert memory_verdict(None, 100).fit_class == "fits"
    assert memory_verdict(50, 100, 0.10).fit_memory == "resident"
    tight = memory_verdict(95, 100, 0.10)
    assert tight.fit_class == "tight" and abs(tight.headroom - 0.05) < 1e-9
    over = memory_verdict(101, 100, 0.10)
    assert over.fit_class == "spill" and over.fit_memory == "over_budget" and over.headroom < 0
