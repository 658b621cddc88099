"""Timing definitions on known timestamps."""

from __future__ import annotations

import math

import pytest

from harness.metrics import percentile, summarize, timing


def test_timing_from_known_stamps():
    # prompt handed over at t=10.0, first token at 10.5, then one every 0.1 s
    stamps = [10.5 + 0.1 * i for i in range(11)]
    t = timing(10.0, stamps, prompt_tokens=1000)
    assert t.ttft_s == pytest.approx(0.5)
    assert t.prefill_tok_s == pytest.approx(2000)
    assert t.decode_tok_s == pytest.approx(10.0)  # 10 gaps in 1.0 s; the first token is not double counted
    assert t.itl_p50_s == pytest.approx(0.1)
    assert t.e2e_s == pytest.approx(1.5)
    assert t.gen_tokens == 11


def test_latency_percentiles_see_a_stall():
    stamps = [1.0, 1.1, 1.2, 2.2, 2.3]
    t = timing(0.0, stamps, prompt_tokens=10)
    assert t.itl_p50_s == pytest.approx(0.1)
    assert t.itl_p99_s > 0.9


def test_single_token_has_no_decode_rate():
    t = timing(0.0, [0.2], prompt_tokens=5)
    assert t.decode_tok_s is None and t.itl_p50_s is None
    assert t.ttft_s == pytest.approx(0.2)


def test_rejects_nonsense():
    with pytest.raises(ValueError):
        timing(0.0, [], 5)
    with pytest.raises(ValueError):
        timing(1.0, [0.5], 5)
    with pytest.raises(ValueError):
        timing(0.0, [0.5, 0.4], 5)


def test_percentile_matches_linear_interpolation():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 99) == 5
    assert percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 90) == pytest.approx(9.1)


def test_summarize():
    s = summarize([10.0, 12.0, None, math.nan, 14.0])
    assert (s.n, s.mean, s.median) == (3, 12.0, 12.0)
    assert s.stdev == pytest.approx(2.0)
    assert s.cv == pytest.approx(2 / 12)
    assert summarize([]) is None
