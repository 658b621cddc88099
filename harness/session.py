"""Rows for a workflow case: one per turn, plus one case-level row per repetition.

Turn rows carry what the user of that turn saw: TTFT from handing over the
turn's new tokens, decode rate of its reply, and memory, paging and energy
from the sampler timeline between the turn's marks. The case-level row
(``turn`` null) stands for the whole session next to single-turn rows:
its figures are the worst turn's (highest TTFT, slowest decode, highest
peak), its totals the session's (time, bytes read, energy), and its verdict
the worst turn's with that turn's number (``fit_turn``).
"""

from __future__ import annotations

import json
from typing import Any

from harness.metrics import percentile, timing
from harness.sampler import Timeline
from harness.scenario import Case


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


def _turn_peak(tl: Timeline, t0: float, t1: float) -> float | None:
    """Peak RSS between the turn's marks; a turn shorter than the sampling interval gets the
    sample just before its end (memory at that turn, not a blank)."""
    peak = tl.peak("rss", t0, t1)
    return peak if peak is not None else tl.value_at("rss", t1) if len(tl) else None


def turn_rows(case: Case, case_level: dict[str, Any], ev: dict, tl: Timeline,
              energy_columns: Any) -> list[dict[str, Any]]:
    """Rows for every finished turn, and a case-level row for every finished session.
    ``energy_columns(tl, t0, stamps)`` is the suite's, so turns and single-turn rows count joules alike."""
    wf = case.workflow
    assert wf is not None
    common = {**case_level, "turns": wf.turns, "workflow_kind": wf.kind,
              "workflow_json": json.dumps(wf.to_dict(), sort_keys=True)}
    rows: list[dict[str, Any]] = []
    by_rep: dict[int, list[dict[str, Any]]] = {}
    for turn in ev.get("turns", []):
        t0, stamps = turn["t_start"], turn["stamps"]
        t1 = stamps[-1]
        tm = timing(t0, stamps, turn["processed_tokens"])
        cpu = tl.delta("cpu_s", t0, t1)
        row = {
            **common, "repetition": turn["repetition"], "turn": turn["turn"], "status": "ok", "error": None,
            "prompt_tokens": turn["context_tokens"], "gen_tokens": tm.gen_tokens,
            "turn_new_tokens": turn["new_tokens"], "context_tokens": turn["context_tokens"],
            "processed_tokens": turn["processed_tokens"], "kv_reuse": turn["kv_reuse"],
            "ttft_s": tm.ttft_s, "prefill_tok_s": tm.prefill_tok_s, "decode_tok_s": tm.decode_tok_s,
            "itl_p50_s": tm.itl_p50_s, "itl_p90_s": tm.itl_p90_s, "itl_p99_s": tm.itl_p99_s, "e2e_s": tm.e2e_s,
            "rep_peak_rss_bytes": _int(_turn_peak(tl, t0, t1)),
            "major_faults": _int(tl.delta("majflt", t0, t1)), "minor_faults": _int(tl.delta("minflt", t0, t1)),
            "read_bytes": _int(tl.delta("read_bytes", t0, t1)),
            "swap_in_pages": _int(tl.delta("pswpin", t0, t1)), "swap_out_pages": _int(tl.delta("pswpout", t0, t1)),
            "cpu_util": cpu / (t1 - t0) if cpu is not None and t1 > t0 else None,
            **energy_columns(tl, t0, stamps),
            "_gaps": [b - a for a, b in zip(stamps, stamps[1:])], "_span": (t0, t1),
        }
        rows.append(row)
        by_rep.setdefault(turn["repetition"], []).append(row)
    out: list[dict[str, Any]] = []
    for rep in ev.get("reps", []):
        turns = by_rep.get(rep["repetition"], [])
        out += turns
        if len(turns) == wf.turns:
            out.append(_session_row(common, rep["repetition"], turns, tl))
    done = {r["repetition"] for r in ev.get("reps", [])}
    out += [r for r in rows if r["repetition"] not in done]  # an unfinished session keeps its finished turns
    for r in out:
        r.pop("_gaps", None)
        r.pop("_span", None)
    return out


def _session_row(common: dict[str, Any], repetition: int, turns: list[dict[str, Any]], tl: Timeline) -> dict[str, Any]:
    t0, t1 = turns[0]["_span"][0], turns[-1]["_span"][1]
    gaps = [g for t in turns for g in t["_gaps"]]
    decode_steps = sum(len(t["_gaps"]) for t in turns)
    cpu = tl.delta("cpu_s", t0, t1)

    def total(key: str) -> float | None:
        values = [t[key] for t in turns if t.get(key) is not None]
        return sum(values) if values else None

    def extreme(key: str, pick: Any) -> float | None:
        values = [t[key] for t in turns if t.get(key) is not None]
        return pick(values) if values else None

    decode_j = total("energy_decode_j")
    return {
        **common, "repetition": repetition, "turn": None, "status": "ok", "error": None,
        "prompt_tokens": turns[-1]["context_tokens"], "gen_tokens": sum(t["gen_tokens"] for t in turns),
        "context_tokens": turns[-1]["context_tokens"], "processed_tokens": total("processed_tokens"),
        "turn_new_tokens": total("turn_new_tokens"), "kv_reuse": turns[-1]["kv_reuse"],
        # the worst turn's figures: what decides whether the session stays usable
        "ttft_s": extreme("ttft_s", max), "decode_tok_s": extreme("decode_tok_s", min),
        "prefill_tok_s": extreme("prefill_tok_s", min),
        "itl_p50_s": percentile(gaps, 50) if gaps else None, "itl_p90_s": percentile(gaps, 90) if gaps else None,
        "itl_p99_s": percentile(gaps, 99) if gaps else None, "e2e_s": t1 - t0,
        "rep_peak_rss_bytes": extreme("rep_peak_rss_bytes", max),
        "major_faults": _int(tl.delta("majflt", t0, t1)), "minor_faults": _int(tl.delta("minflt", t0, t1)),
        "read_bytes": _int(tl.delta("read_bytes", t0, t1)),
        "swap_in_pages": _int(tl.delta("pswpin", t0, t1)), "swap_out_pages": _int(tl.delta("pswpout", t0, t1)),
        "cpu_util": cpu / (t1 - t0) if cpu is not None and t1 > t0 else None,
        "energy_source": turns[0].get("energy_source"), "energy_note": turns[0].get("energy_note"),
        "energy_prefill_j": total("energy_prefill_j"), "energy_decode_j": decode_j,
        "energy_j_per_token": decode_j / decode_steps if decode_j is not None and decode_steps else None,
        "avg_power_w": ((total("energy_prefill_j") or 0) + decode_j) / (t1 - t0) if decode_j is not None and t1 > t0
        else None,
    }


def failing_turn(case: Case, ev: dict) -> int | None:
    """The turn a failed workflow case was in when it failed (1-based)."""
    if case.workflow is None or not ev.get("loaded"):
        return None
    finished = len(ev.get("reps", []))
    in_progress = [t for t in ev.get("turns", []) if t["repetition"] == finished]
    return len(in_progress) + 1 if len(in_progress) < case.workflow.turns else None
