"""Plausibility: refuse rows no real run can produce, each with a reason that names the numbers.

The ceilings are deliberately generous (above the fastest hardware shipping
in 2026), so a real measurement is never refused; what they catch is typos,
unit mistakes and made-up figures. Rules (see the README for the numbers):

1. roofline: decode reads every weight once per token (dense models; MoE
   read at least MOE_ACTIVE_FRACTION of them), so decode tok/s cannot exceed
   memory bandwidth / bytes read per token.
2. resident size: a run on the CPU maps and touches its weights, so its peak
   RSS cannot be far below the artifact (or the budget, when one was set).
3. prefill: a prompt costs at least 2 x params FLOPs per token, so TTFT
   cannot be shorter than that over the compute ceiling.
4. internal consistency: prefill and decode tok/s must follow from the
   row's own times and token counts.
5. timelines: the raw samples must reproduce the summary (sample count,
   peak RSS, lowest available memory, per-repetition peaks and durations).
"""

from __future__ import annotations

import re
from collections import defaultdict

# Ceilings per machine-class prefix: bytes/s of memory bandwidth and FLOP/s.
BANDWIDTH_CEILING = {"nvidia": 10e12, "amd": 10e12, "apple": 1.2e12, "cpu": 2e12}
COMPUTE_CEILING = {"nvidia": 10e15, "amd": 10e15, "apple": 1e14, "cpu": 2e14}
DEFAULT_CLASS = "nvidia"  # unknown prefixes get the most generous ceilings
MOE_ACTIVE_FRACTION = 0.03
MOE_ARCH = re.compile(r"moe|mixtral|deepseek|gpt-?oss|dbrx|arctic|jamba|grok|llama4|hunyuan|ernie4_5_moe", re.I)
MIN_RESIDENT_FRACTION = 0.5
CONSISTENCY_TOLERANCE = 0.02
TIMELINE_TOLERANCE = 0.01


def _ceiling(table: dict[str, float], machine_class: str) -> float:
    return table.get(machine_class.split("-")[0], table[DEFAULT_CLASS])


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def check_row(row: dict) -> list[str]:
    """Reasons this row is implausible (empty when plausible)."""
    reasons = []
    if row.get("status") != "ok":
        return reasons
    mc, size = row["machine_class"], row["artifact_size_bytes"]
    decode, ttft, e2e = row.get("decode_tok_s"), row.get("ttft_s"), row.get("e2e_s")
    if size <= 0:
        return ["artifact_size_bytes must be positive"]
    # 1. roofline
    if decode is not None:
        fraction = MOE_ACTIVE_FRACTION if MOE_ARCH.search(row.get("artifact_arch") or "") else 1.0
        bandwidth = _ceiling(BANDWIDTH_CEILING, mc)
        roof = bandwidth / (size * fraction)
        if decode > roof or decode <= 0:
            reasons.append(f"decode {decode:,.1f} tok/s is above the memory-bandwidth roofline of {roof:,.1f} tok/s "
                           f"for a {_mib(size)} artifact on {mc} ({bandwidth / 1e12:g} TB/s ceiling)"
                           if decode > 0 else f"decode {decode} tok/s is not positive")
    # 2. resident size
    on_cpu = (row.get("device") in (None, "cpu")) and not (row.get("n_layers_device") or 0)
    peak = max(row.get("peak_rss_bytes") or 0, row.get("vmhwm_bytes") or 0, row.get("ru_maxrss_bytes") or 0)
    if on_cpu and peak:
        limit = size
        if row.get("budget_bytes") and row.get("budget_method") not in (None, "none"):
            limit = min(size, row["budget_bytes"])
        if peak < MIN_RESIDENT_FRACTION * limit:
            reasons.append(f"peak memory {_mib(peak)} is far below the {_mib(limit)} the weights occupy on the CPU "
                           f"(floor {MIN_RESIDENT_FRACTION:.0%})")
    # 3. prefill floor
    prompt = row.get("prompt_tokens")
    if ttft is not None:
        if ttft <= 0:
            reasons.append(f"TTFT {ttft} s is not positive")
        elif prompt:
            params = row.get("artifact_n_params") or size / 4  # at most 4 bytes a parameter
            flops = _ceiling(COMPUTE_CEILING, mc)
            floor = 2 * params * prompt / flops
            if ttft < floor:
                reasons.append(f"TTFT {ttft * 1e3:.3f} ms is shorter than prefill of {prompt:,} tokens could be: "
                               f"{floor * 1e3:.3f} ms at {flops / 1e12:g} TFLOP/s for {params / 1e6:,.0f}M parameters")
    # 4. consistency with the row's own numbers
    if ttft and ttft > 0 and prompt and row.get("prefill_tok_s") is not None:
        want = prompt / ttft
        if abs(row["prefill_tok_s"] - want) > CONSISTENCY_TOLERANCE * want:
            reasons.append(f"prefill {row['prefill_tok_s']:,.1f} tok/s does not follow from {prompt} tokens in "
                           f"{ttft:.4f} s ({want:,.1f})")
    gen = row.get("gen_tokens")
    if decode and ttft is not None and e2e is not None and gen and gen > 1:
        if e2e < ttft:
            reasons.append(f"e2e {e2e:.4f} s is shorter than TTFT {ttft:.4f} s")
        elif e2e > ttft:
            want = (gen - 1) / (e2e - ttft)
            if abs(decode - want) > CONSISTENCY_TOLERANCE * want:
                reasons.append(f"decode {decode:,.1f} tok/s does not follow from {gen} tokens between "
                               f"{ttft:.4f} s and {e2e:.4f} s ({want:,.1f})")
    return reasons


def check_timelines(rows: list[dict], timeline: dict[str, list]) -> list[str]:
    """Recompute the sampled figures of every case from its raw samples and compare them with the rows."""
    reasons = []
    n = len(timeline.get("t_s") or [])
    cases: dict[tuple, list[int]] = defaultdict(list)
    for i in range(n):
        cases[(timeline["run_id"][i], timeline["case_key"][i])].append(i)
    by_case: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        by_case[(row["run_id"], row["case_key"])].append(row)
    for key in cases:
        if key not in by_case:
            reasons.append(f"timeline case {key[1][:16]} of run {key[0][:24]} has no result rows")
    for (run_id, case_key), case_rows in by_case.items():
        where = f"case {case_key[:16]} of run {run_id[:24]}"
        first = case_rows[0]
        expected = first.get("sampler_samples") or 0
        idx = cases.get((run_id, case_key), [])
        if len(idx) != expected:
            reasons.append(f"{where}: the timeline has {len(idx)} samples, the rows say {expected}")
            continue
        if not idx:
            continue
        # this case's columns, sliced once (bundles carry thousands of samples per case)
        ts, rss, avail, phases = ([timeline[name][i] for i in idx] if name in timeline else [None] * len(idx)
                                  for name in ("t_s", "rss_bytes", "sys_available_bytes", "phase"))
        if any(t is None for t in ts) or any(b < a for a, b in zip(ts, ts[1:])):
            reasons.append(f"{where}: timeline times are missing or go backwards")
            continue
        peak = max((v for v in rss if v is not None), default=None)
        for row in case_rows:
            if row.get("peak_rss_bytes") is not None and peak is not None and \
                    abs(row["peak_rss_bytes"] - peak) > TIMELINE_TOLERANCE * peak:
                reasons.append(f"{where}: peak_rss_bytes {_mib(row['peak_rss_bytes'])} does not match the "
                               f"timeline's peak {_mib(peak)}")
                break
        low = min((v for v in avail if v is not None), default=None)
        if low is not None and first.get("sys_available_min_bytes") is not None and \
                abs(first["sys_available_min_bytes"] - low) > TIMELINE_TOLERANCE * max(low, 1):
            reasons.append(f"{where}: sys_available_min_bytes does not match the timeline's lowest sample")
        by_phase: dict[str, list[int]] = defaultdict(list)
        for j, p in enumerate(phases):
            by_phase[p].append(j)
        for row in case_rows:
            if row.get("status") != "ok" or row.get("repetition") is None:
                continue
            rep = by_phase.get(f"rep{row['repetition']}")
            if not rep:
                continue
            rep_peak = max((rss[j] for j in rep if rss[j] is not None), default=None)
            if rep_peak is not None and row.get("rep_peak_rss_bytes") is not None and \
                    abs(row["rep_peak_rss_bytes"] - rep_peak) > TIMELINE_TOLERANCE * rep_peak:
                reasons.append(f"{where} rep {row['repetition']}: rep_peak_rss_bytes does not match the timeline")
            span = ts[rep[-1]] - ts[rep[0]]
            interval = (row.get("sampler_interval_ms") or 0) / 1e3
            if row.get("e2e_s") is not None and span > row["e2e_s"] * (1 + TIMELINE_TOLERANCE) + 2 * interval + 0.01:
                reasons.append(f"{where} rep {row['repetition']}: the timeline shows the repetition lasting "
                               f"{span:.3f} s, longer than its e2e_s {row['e2e_s']:.3f} s")
    return reasons


def check_bundle(rows: list[dict], timeline: dict[str, list], limit: int = 20) -> list[str]:
    reasons = []
    for i, row in enumerate(rows):
        reasons += [f"rows[{i}] ({row.get('artifact_name')}, ctx {row.get('n_ctx')}, rep {row.get('repetition')}): {r}"
                    for r in check_row(row)]
    reasons += check_timelines(rows, timeline)
    return reasons[:limit] + ([f"... and {len(reasons) - limit} more"] if len(reasons) > limit else [])
