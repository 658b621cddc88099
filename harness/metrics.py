"""Token timestamps -> the timing figures of one repetition.

Definitions (the same for every runtime):
- TTFT: from handing the prompt to the runtime to the first generated token,
  prefill included.
- prefill tok/s: prompt tokens / TTFT.
- decode tok/s: tokens after the first / time from the first to the last
  token (so the first token is not counted twice, unlike mlx-lm).
- inter-token latency: gaps between consecutive tokens, p50/p90/p99.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass


@dataclass
class Timing:
    ttft_s: float
    prefill_tok_s: float
    decode_tok_s: float | None
    itl_p50_s: float | None
    itl_p90_s: float | None
    itl_p99_s: float | None
    e2e_s: float
    gen_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100] (numpy's default method)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def timing(t_start: float, stamps: list[float], prompt_tokens: int) -> Timing:
    if not stamps:
        raise ValueError("no tokens were generated")
    if stamps[0] < t_start or any(b < a for a, b in zip(stamps, stamps[1:])):
        raise ValueError("token timestamps must not go backwards")
    ttft = stamps[0] - t_start
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    decode_time = stamps[-1] - stamps[0]
    return Timing(
        ttft_s=ttft,
        prefill_tok_s=prompt_tokens / ttft if ttft > 0 else math.inf,
        decode_tok_s=len(gaps) / decode_time if gaps and decode_time > 0 else None,
        itl_p50_s=percentile(gaps, 50) if gaps else None,
        itl_p90_s=percentile(gaps, 90) if gaps else None,
        itl_p99_s=percentile(gaps, 99) if gaps else None,
        e2e_s=stamps[-1] - t_start,
        gen_tokens=len(stamps),
    )


@dataclass
class Summary:
    n: int
    mean: float
    stdev: float
    median: float
    cv: float  # coefficient of variation (stdev / mean)


def summarize(values: list[float]) -> Summary | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    mean = statistics.fmean(values)
    stdev = statistics.stdev(values) if len(values) > 1 else 0.0
    return Summary(len(values), mean, stdev, statistics.median(values), stdev / mean if mean else 0.0)


# two-sided 95 % critical values of Student's t for df = 1..30; 1.96 beyond
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_critical(df: float) -> float:
    if df < 1:
        return math.inf
    return T_975[int(df) - 1] if df < 31 else 1.96  # floor: conservative for fractional Welch df


def ci95(values: list[float]) -> tuple[float, float] | None:
    """(mean, half-width of its 95 % confidence interval), Student t over the values; None with
    fewer than two."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    return mean, t_critical(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def rate_drift(stamps: list[float], part: float = 0.25) -> float | None:
    """Relative change of the token rate from the first ``part`` of a generation's gaps to its last
    (rate_last / rate_first - 1); None with fewer than 8 gaps (two per part)."""
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    k = int(len(gaps) * part)
    if k < 2:
        return None
    first, last = sum(gaps[:k]), sum(gaps[-k:])
    if first <= 0 or last <= 0:
        return None
    return first / last - 1  # equal counts: the rates' ratio is the inverse of the times'
@dataclass
class ParallelTiming:
    """N sessions started together (all prompts handed over at ``t_start``).

    - TTFT per session: its first token minus ``t_start``, queueing behind the other prompts included.
    - The shared decode phase starts at the last session's first token (from then on every step
      decodes a token of every session). A session's decode tok/s is its tokens in that phase over
      the time from its start to that session's last token; the aggregate is all sessions' tokens in
      the phase over the phase (llama-batched-bench's S_TG). An early session's wait for the later
      prompts shows in its TTFT neighbours' and its inter-token latency, not in its decode rate.
    """

    session_ttft_s: list[float]
    session_decode_tok_s: list[float | None]
    ttft_p50_s: float
    ttft_p90_s: float
    user_decode_tok_s: float | None  # the median session's
    user_decode_min_tok_s: float | None  # the slowest session's
    aggregate_decode_tok_s: float | None
    prefill_tok_s: float  # every session's prompt over the time until the last first token
    itl: list[float]  # gaps within each session, all sessions together
    e2e_s: float


def parallel_timing(t_start: float, sessions: list[list[float]], prompt_tokens: int) -> ParallelTiming:
    if not sessions or any(not s for s in sessions):
        raise ValueError("every session needs at least one generated token")
    for stamps in sessions:
        if stamps[0] < t_start or any(b < a for a, b in zip(stamps, stamps[1:])):
            raise ValueError("token timestamps must not go backwards")
    ttfts = [s[0] - t_start for s in sessions]
    shared = max(s[0] for s in sessions)
    end = max(s[-1] for s in sessions)
    rates: list[float | None] = []
    phase_tokens = 0
    for stamps in sessions:
        n = sum(1 for t in stamps if t > shared)
        phase_tokens += n
        rates.append(n / (stamps[-1] - shared) if n and stamps[-1] > shared else None)
    known = [r for r in rates if r is not None]
    last_first = max(ttfts)
    return ParallelTiming(
        session_ttft_s=ttfts, session_decode_tok_s=rates,
        ttft_p50_s=percentile(ttfts, 50), ttft_p90_s=percentile(ttfts, 90),
        user_decode_tok_s=statistics.median(known) if known else None,
        user_decode_min_tok_s=min(known) if known else None,
        aggregate_decode_tok_s=phase_tokens / (end - shared) if phase_tokens and end > shared else None,
        prefill_tok_s=len(sessions) * prompt_tokens / last_first if last_first > 0 else math.inf,
        itl=[b - a for s in sessions for a, b in zip(s, s[1:])],
        e2e_s=end - t_start,
    )
