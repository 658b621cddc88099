"""Plausibility: refuse rows no real run can produce, each with a reason that names the numbers.

The ceilings are deliberately generous (above the fastest hardware shipping
in 2026), so a real measurement is never refused; what they catch is typos,
unit mistakes and made-up figures. Rules (docs/sharing.md has the numbers):

1. roofline: decode reads every weight once per token (dense models; MoE
   read at least MOE_ACTIVE_FRACTION of them), so decode tok/s cannot exceed
   memory bandwidth / bytes read per token.
2. resident size: a run on the CPU maps and touches its weights, so its peak
   RSS cannot be far below the artifact (or the budget, when one was set).
3. prefill: a prompt costs at least 2 x params FLOPs per token, so TTFT
   cannot be shorter than that over the compute ceiling.
4. internal consistency: prefill and decode tok/s must follow from the
   row's own times and token counts, by the producer's definitions
   (harness/rows.py): a workflow turn prefilled its ``processed_tokens``
   (only the new tokens when the KV cache was reused), not its whole context.
5. sessions: a workflow's case-level row holds its worst turn's figures, so
   it travels with its turns and must follow from them.
0. every ``ok`` row comes with its timeline (``sampler_samples`` at least 1,
   and rule 6 checks the samples are there); every failed row says why
   (``error``): it counts as a verdict, never as a figure.
6. timelines: the raw samples of each case (per run, machine and case: the
   machines of a fleet run share run id and case keys) must reproduce the
   summary: sample count, peak RSS (which stops where a quality probe
   starts: the samples phased ``quality`` are not in it), lowest available
   memory, per-repetition and per-turn peaks and durations.

``check_bundle(rows, timeline)`` is the whole check: the reasons to refuse,
empty for a plausible bundle. The verdict is not decided here (verdict.py).
"""

from __future__ import annotations

import re
from collections import defaultdict

from harness.share.bundle import case_of, timeline_cases

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


def prefilled_tokens(row: dict) -> int | None:
    """The tokens a row's TTFT covers, as harness/rows.py defines its prefill rate: a turn's
    ``processed_tokens`` (what that turn prefilled), every other row's ``prompt_tokens``."""
    return row.get("processed_tokens") if row.get("turn") is not None else row.get("prompt_tokens")


def is_session(row: dict) -> bool:
    """A workflow's case-level row: its figures are its worst turn's, not a timing of their own."""
    return row.get("workflow_kind") is not None and row.get("turn") is None


def check_row(row: dict) -> list[str]:
    """Reasons this row is implausible (empty when plausible)."""
    reasons = []
    if row.get("status") != "ok":  # a failure is a verdict (no_fit for an OOM): it must say what failed
        if not isinstance(row.get("error"), str) or not row["error"].strip():
            reasons.append(f"status {row.get('status')!r} with no error: a failed row says why it failed")
        return reasons
    if not isinstance(row.get("sampler_samples"), int) or row["sampler_samples"] < 1:
        # the timeline is what the figures are checked against: a measurement without one is a claim
        reasons.append(f"an ok row needs its timeline: sampler_samples is {row.get('sampler_samples')!r}")
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
    if ttft is not None and ttft <= 0:
        reasons.append(f"TTFT {ttft} s is not positive")
    if is_session(row):
        return reasons  # 3 and 4 hold for each of its turns (check_sessions)
    # 3. prefill floor
    prompt = prefilled_tokens(row)
    if ttft is not None and ttft > 0 and prompt:
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


# How a session row's figures follow from its turns (harness/rows.py _session_row).
SESSION_FIGURES = (("ttft_s", max), ("decode_tok_s", min), ("prefill_tok_s", min), ("gen_tokens", sum),
                   ("processed_tokens", sum), ("rep_peak_rss_bytes", max))


def check_sessions(rows: list[dict]) -> list[str]:
    """Each finished session (an ``ok`` case-level workflow row) comes with all its turns, and its
    figures are theirs: the worst turn's TTFT, decode and prefill rate and peak, the turns' totals."""
    reasons = []
    turns: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        if row.get("turn") is not None and row.get("status") == "ok":
            turns[(*case_of(row), row.get("repetition"))].append(row)
    for row in rows:
        if not is_session(row) or row.get("status") != "ok":
            continue
        where = (f"session rep {row.get('repetition')} of case {str(row['case_key'])[:16]} "
                 f"of run {str(row['run_id'])[:24]}")
        mine = turns.get((*case_of(row), row.get("repetition")), [])
        numbers = sorted(t["turn"] for t in mine)
        if not numbers or row.get("turns") != len(numbers) or numbers != list(range(1, len(numbers) + 1)):
            reasons.append(f"{where}: has turn rows {numbers[:10]} but {row.get('turns')} turns: a session is sent "
                           "with each of its turns")
            continue
        for name, pick in SESSION_FIGURES:
            values = [t[name] for t in mine if t.get(name) is not None]
            if row.get(name) is None or not values:
                continue
            want = pick(values)
            if abs(row[name] - want) > CONSISTENCY_TOLERANCE * abs(want):
                reasons.append(f"{where}: {name} {row[name]:,.4g} does not follow from its turns ({want:,.4g})")
    return reasons


def _phase(row: dict) -> str | None:
    """The timeline phase of a row's own window (harness/rows.py _phase_spans); a session's is its turns'."""
    if row.get("status") != "ok" or row.get("repetition") is None or is_session(row):
        return None
    if row.get("turn") is not None:
        return f"rep{row['repetition']}/turn{row['turn']}"
    return f"rep{row['repetition']}"


def case_peak(rss: list, phases: list) -> int | None:
    """A case's peak RSS as the row producer defines it: every sample before the quality probe's first."""
    probe = next((j for j, p in enumerate(phases) if p == "quality"), len(phases))
    return max((v for v in rss[:probe] if v is not None), default=None)


def check_timelines(rows: list[dict], timeline: dict[str, list]) -> list[str]:
    """Recompute the sampled figures of every case from its raw samples and compare them with the rows."""
    reasons = []
    cases = timeline_cases(rows, timeline)
    by_case: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        by_case[case_of(row)].append(row)
    for run_id, machine_id, machine_class, case_key in cases:
        if machine_id is None:
            reasons.append(f"timeline case {str(case_key)[:16]} of run {str(run_id)[:24]} names no machine_id "
                           "(and class) and no single machine's rows own it")
        elif (run_id, machine_id, machine_class, case_key) not in by_case:
            reasons.append(f"timeline case {str(case_key)[:16]} of run {str(run_id)[:24]} on machine "
                           f"{str(machine_id)[:16]} ({str(machine_class)[:40]}) has no result rows")
    for key, case_rows in by_case.items():
        run_id, machine_id, machine_class, case_key = key
        where = f"case {case_key[:16]} of run {run_id[:24]}"
        first = case_rows[0]
        expected = first.get("sampler_samples") or 0
        idx = cases.get(key, [])
        if len(idx) != expected:
            reasons.append(f"{where} on machine {machine_id[:16]} ({machine_class[:40]}): the timeline has "
                           f"{len(idx)} samples, the rows say {expected}")
            continue
        if not idx:
            continue
        # this case's columns, sliced once (bundles carry thousands of samples per case)
        ts, rss, avail, phases = ([timeline[name][i] for i in idx] if name in timeline else [None] * len(idx)
                                  for name in ("t_s", "rss_bytes", "sys_available_bytes", "phase"))
        if any(t is None for t in ts) or any(b < a for a, b in zip(ts, ts[1:])):
            reasons.append(f"{where}: timeline times are missing or go backwards")
            continue
        peak = case_peak(rss, phases)
        for row in case_rows:
            if row.get("peak_rss_bytes") is not None and peak is not None and \
                    abs(row["peak_rss_bytes"] - peak) > TIMELINE_TOLERANCE * peak:
                reasons.append(f"{where}: peak_rss_bytes {_mib(row['peak_rss_bytes'])} does not match the "
                               f"timeline's peak {_mib(peak)} (before any quality probe)")
                break
        low = min((v for v in avail if v is not None), default=None)
        if low is not None and first.get("sys_available_min_bytes") is not None and \
                abs(first["sys_available_min_bytes"] - low) > TIMELINE_TOLERANCE * max(low, 1):
            reasons.append(f"{where}: sys_available_min_bytes does not match the timeline's lowest sample")
        by_phase: dict[str, list[int]] = defaultdict(list)
        for j, p in enumerate(phases):
            by_phase[p].append(j)
        for row in case_rows:
            phase = _phase(row)
            window = by_phase.get(phase) if phase else None
            if not window:  # a turn shorter than the sampling interval has no samples of its own
                continue
            label = f"{where} rep {row['repetition']}" + (f" turn {row['turn']}" if row.get("turn") else "")
            rep_peak = max((rss[j] for j in window if rss[j] is not None), default=None)
            if rep_peak is not None and row.get("rep_peak_rss_bytes") is not None and \
                    abs(row["rep_peak_rss_bytes"] - rep_peak) > TIMELINE_TOLERANCE * rep_peak:
                reasons.append(f"{label}: rep_peak_rss_bytes does not match the timeline")
            span = ts[window[-1]] - ts[window[0]]
            interval = (row.get("sampler_interval_ms") or 0) / 1e3
            if row.get("e2e_s") is not None and span > row["e2e_s"] * (1 + TIMELINE_TOLERANCE) + 2 * interval + 0.01:
                reasons.append(f"{label}: the timeline shows it lasting {span:.3f} s, longer than its "
                               f"e2e_s {row['e2e_s']:.3f} s")
    return reasons


def check_bundle(rows: list[dict], timeline: dict[str, list], limit: int = 20) -> list[str]:
    """Every reason to refuse a (structurally valid) bundle's rows and timeline; empty when plausible."""
    reasons = []
    for i, row in enumerate(rows):  # a NUL is no text a run writes, and PostgreSQL cannot store one
        if nul := [k for k, v in row.items() if isinstance(v, str) and "\x00" in v]:
            reasons.append(f"rows[{i}]: a NUL character in {', '.join(nul[:5])}")
    if nul := [k for k, col in timeline.items() if any(isinstance(v, str) and "\x00" in v for v in col)]:
        reasons.append(f"timeline: a NUL character in {', '.join(nul[:5])}")
    for i, row in enumerate(rows):
        turn = f", turn {row['turn']}" if row.get("turn") is not None else ""
        reasons += [f"rows[{i}] ({row.get('artifact_name')}, ctx {row.get('n_ctx')}, rep {row.get('repetition')}"
                    f"{turn}): {r}" for r in check_row(row)]
    reasons += check_sessions(rows)
    reasons += check_timelines(rows, timeline)
    return reasons[:limit] + ([f"... and {len(reasons) - limit} more"] if len(reasons) > limit else [])


def drop_unknown(doc: dict) -> dict:
    """The bundle with only the columns a client may send (harness/share/allowlist.py) that this schema
    knows: anything else, a newer client's column or one no fitbench would share, is checked by the
    signature but never stored."""
    from harness.results import RESULT_COLUMNS, TIMELINE_COLUMNS
    from harness.share.allowlist import SHARED_RESULT_COLUMNS, SHARED_TIMELINE_COLUMNS

    rows_kept = {c.name for c in RESULT_COLUMNS} & set(SHARED_RESULT_COLUMNS)
    timeline_kept = {c.name for c in (*RESULT_COLUMNS, *TIMELINE_COLUMNS)} & set(SHARED_TIMELINE_COLUMNS)
    return {**doc, "rows": [{k: v for k, v in row.items() if k in rows_kept} for row in doc["rows"]],
            "timeline": {k: v for k, v in doc["timeline"].items() if k in timeline_kept}}


def check_run_ids(doc: dict) -> str | None:
    """Why the bundle's run ids are not the client's re-derived ones (None when they all are): a run id
    in any other form may carry the run's start second, which the allow-list promises never leaves."""
    from harness.share.allowlist import RUN_ID_FORM

    found = [r.get("run_id") for r in doc["rows"]]
    found += [v for v in doc["timeline"].get("run_id", []) if isinstance(v, str)]  # a null is check_timelines'
    bad = [v for v in found if not isinstance(v, str) or not RUN_ID_FORM.match(v)]
    if not bad:
        return None
    return (f"run_id {str(bad[0])[:40]!r} is not a re-derived run id ({RUN_ID_FORM.pattern}): build the bundle "
            "with `fitbench contribute`, which derives it")
