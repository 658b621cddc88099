"""The only producer of result rows: ok repetitions, workflow turns and sessions, failures, timelines.

Every row of every kind of case starts from ``base_row`` (who measured what,
where) and is judged by ``judge_rows`` (fit.classify, the one verdict), so a
local run, a fleet node, a fleet driver writing a ``lost`` row and a skipped
case all write the same columns by the same definitions:

- ``case_rows``: what the parent heard from a worker (``protocol.CaseEvents``)
  plus the sampler's timeline -> one row per repetition, or per turn and per
  session for a workflow, and one failure row after them when the case did
  not end ``ok``;
- ``failure_row``: a case that never produced a worker report (skipped,
  unavailable, lost, a node's own failure);
- ``timeline_columns``: the raw samples with their phase, for the timeline file.

Every row of a case that ran also carries its noise record (steal, other
processes' load, frequency, temperature over the timed part), the case's
mean decode rate with its 95 % interval and its drift (first to last
repetition), its own drift within the repetition, and the roofline: decode
against what the memory bandwidth allows at that depth (``Roofline``).

Definitions that consumers (the upstream's validator among them) rely on:
the case's memory figures (``peak_rss_bytes``, ``vmhwm_bytes``) stop where a
quality probe starts, and the probe's samples carry the phase ``quality``; a
turn's prefill rate is over ``processed_tokens`` (what that turn prefilled).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from harness.fit import classify, judge_sessions, measurement_flags, serving_verdict
from harness.measure.energy import interpolate
from harness.metrics import ci95, parallel_timing, percentile, rate_drift, timing
from harness.protocol import CaseEvents, Rep, Turn
from harness.results import SCHEMA_VERSION
from runners.base import KV_SETTING_KEYS, MEMORY_STATS_KEYS, OptionError, UnknownRunner, get_runner_class

if TYPE_CHECKING:
    from harness.artifact import ArtifactInfo
    from harness.measure.machine import Machine
    from harness.measure.sampler import Timeline
    from harness.scenario import Case

Row = dict[str, Any]


@dataclass(frozen=True)
class Roofline:
    """What a decoded token must read, and how fast this machine's memory reads: from the artifact
    (harness/estimate.py) and harness/measure/bandwidth.py, found by the caller."""

    weights_bytes: int
    kv_bytes_per_token: int  # KV bytes per context position (K and V of every layer)
    bandwidth_bytes_s: float | None
    bandwidth_source: str | None
    gpu_bandwidth_bytes_s: float | None = None  # NVML's figure, used for a row whose model is all on the GPU


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


def _mean(values: list) -> float | None:
    return sum(values) / len(values) if values else None


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


# -- identity ---------------------------------------------------------------------------------------------

def base_row(case: Case, machine: Machine, run_id: str, started_at: datetime | None = None,
             artifact: ArtifactInfo | None = None, sha256: str | None = None) -> Row:
    """Who measured what, where: the columns every row of a case shares. Without ``artifact``
    (a fleet node that does not have the file) the artifact is known by its name only."""
    art = artifact
    row: Row = {
        "schema_version": SCHEMA_VERSION, "run_id": run_id, "scenario": case.scenario,
        "case_index": case.index, "case_key": case.key, "case_label": case.label,
        "started_at": started_at or datetime.now(timezone.utc),
        "model_label": case.model_label, "artifact_name": art.name if art else case.artifact.name,
        "artifact_path": str(art.path if art else case.artifact), "artifact_sha256": sha256,
        "runtime": case.runtime, "options_json": json.dumps(case.options, sort_keys=True),
        "n_ctx": case.n_ctx, "fill": case.fill, "prompt_tokens": case.prompt_tokens, "gen_tokens": case.gen_tokens,
        "warmup": case.warmup, "sampler_interval_ms": case.sampler_interval_ms,
        "budget_requested_bytes": case.budget_bytes,
        "machine_id": machine.machine_id, "machine_class": machine.machine_class, "cpu_model": machine.cpu_model,
        "cpu_flags": ",".join(machine.cpu_flags) or None, "cpu_cores": machine.cpu_cores,
        "cpu_threads": machine.cpu_threads, "ram_bytes": machine.ram_bytes,
        "gpu_names": ",".join(g.name for g in machine.gpus) or None, "os": machine.os,
        "python_version": machine.python_version, "fitbench_version": machine.fitbench_version,
        "sys_mem_total_bytes": machine.ram_bytes, "parallel": case.parallel,
    }
    if art is not None:
        row.update({
            "artifact_size_bytes": art.size_bytes, "artifact_format": art.format, "artifact_quant": art.quant,
            "artifact_arch": art.architecture, "artifact_n_params": art.n_params, "artifact_n_layers": art.n_layers,
            "artifact_n_kv_heads": art.n_kv_heads, "artifact_context_length": art.context_length,
            "artifact_n_heads": art.n_heads, "artifact_head_dim": art.head_dim,
        })
    row.update(requested_kv_settings(case))
    if case.workflow is not None:
        row.update(turns=case.workflow.turns, workflow_kind=case.workflow.kind,
                   workflow_json=json.dumps(case.workflow.to_dict(), sort_keys=True))
    return row


def requested_kv_settings(case: Case) -> Row:
    """kv_type_k, kv_type_v, attn_impl, flash_attn as the case's options ask for them (the runner
    maps its own options onto these columns), so a case that fails to load still says what it
    tried; a loaded case's rows then carry what the runtime reports."""
    try:
        asked = get_runner_class(case.runtime).kv_settings(case.options)
    except (UnknownRunner, OptionError):
        asked = {}
    return {key: asked.get(key) for key in KV_SETTING_KEYS}


# -- the verdict ------------------------------------------------------------------------------------------

def judge_rows(rows: list[Row], case: Case, machine: Machine, method: str) -> list[Row]:
    """Add the budget and fit columns to each row (fit.classify decides); a workflow's case-level
    rows then take their worst turn's verdict."""
    budget = case.budget_bytes or machine.ram_bytes
    thresholds = json.dumps(dataclasses.asdict(case.thresholds), sort_keys=True)
    for row in rows:
        verdict = classify(row, budget, case.thresholds)
        row.update(verdict.to_row(), budget_bytes=budget, budget_method=method, thresholds_json=thresholds)
        row.update(measurement_flags(row, case.thresholds).to_row())
        if case.workflow is None:
            row.update(serving_verdict(row, case.thresholds).to_row())
    if case.workflow is not None:
        judge_sessions(rows)
    return rows


def failure_row(case: Case, machine: Machine, run_id: str, status: str, error: str,
                artifact: ArtifactInfo | None = None, sha256: str | None = None, **extra: Any) -> Row:
    """The row of a case that failed before any worker reported: judged like every other row."""
    row = {**base_row(case, machine, run_id, artifact=artifact, sha256=sha256), "status": status, "error": error,
           **extra}
    return judge_rows([row], case, machine, "none")[0]


# -- rows from a worker's report --------------------------------------------------------------------------

def case_rows(case: Case, base: Row, ev: CaseEvents, tl: Timeline, status: str, error: str | None,
              exit_code: int | None, wall_s: float, t_spawn: float, roofline: Roofline | None = None) -> list[Row]:
    """Rows of a case whose worker ran: each finished repetition (or turn and session), and a
    failure row of its own after them when the case did not end ``ok``."""
    case_level = _case_columns(case, base, ev, tl, exit_code, wall_s, t_spawn)
    if case.workflow is not None:
        rows = turn_rows(case, case_level, ev, tl)
        if status != "ok":
            rows.append({**case_level, "repetition": None, "status": status, "error": error,
                         "fit_turn": failing_turn(case, ev)})
    else:
        prompt_tokens = ev.loaded.prompt_tokens if ev.loaded else case.prompt_tokens
        rows = [{**case_level, **_repetition_columns(rep, prompt_tokens, tl)} for rep in ev.timed_reps]
        if status != "ok":
            rows.append({**case_level, "repetition": None, "status": status, "error": error})
    _repetition_statistics(rows)
    for row in rows:
        row.update(roofline_columns(row, roofline))
    return rows


def _repetition_statistics(rows: list[Row]) -> None:
    """The case's mean decode rate with its 95 % interval, and its drift from the first repetition
    to the last, on every row (over the ok repetitions; a workflow's over its sessions)."""
    reps = sorted((r for r in rows if r.get("status") == "ok" and r.get("turn") is None
                   and r.get("decode_tok_s") is not None), key=lambda r: r["repetition"])
    rates = [r["decode_tok_s"] for r in reps]
    interval = ci95(rates)
    stats: Row = {"decode_tok_s_mean": interval[0] if interval else (rates[0] if rates else None),
                  "decode_tok_s_ci95": interval[1] if interval else None,
                  "drift": rates[-1] / rates[0] - 1 if len(rates) > 1 and rates[0] else None}
    for row in rows:
        row.update(stats)


def roofline_columns(row: Row, roofline: Roofline | None) -> Row:
    """Decode against the bandwidth bound: a token reads the weights and the KV cache up to its
    position (the repetition's mean decode depth: the prompt plus half the generated tokens)."""
    if roofline is None or row.get("status") != "ok":
        return {}
    depth = (row.get("prompt_tokens") or 0) + (row.get("gen_tokens") or 0) / 2
    per_token = int(roofline.weights_bytes + roofline.kv_bytes_per_token * depth)
    out: Row = {"roofline_bytes_per_token": per_token}
    on_device, total = row.get("n_layers_device"), row.get("n_layers_total")
    device = str(row.get("device") or "")
    on_gpu = bool(on_device) and on_device == total or device.startswith(("cuda", "gpu"))
    partly = bool(on_device) and total is not None and on_device < total
    bandwidth, source = ((roofline.gpu_bandwidth_bytes_s, "nvml-spec") if on_gpu
                         else (roofline.bandwidth_bytes_s, roofline.bandwidth_source))
    if bandwidth and not partly:  # a model split across two memories has no single roofline
        bound = bandwidth / per_token
        decode = row.get("decode_tok_s")
        out.update(mem_bandwidth_gbs=bandwidth / 1e9, mem_bandwidth_source=source,
                   roofline_tok_s=bound, roofline_efficiency=decode / bound if decode is not None else None)
    return out


def _case_columns(case: Case, base: Row, ev: CaseEvents, tl: Timeline, exit_code: int | None,
                  wall_s: float, t_spawn: float) -> Row:
    """Figures of the whole case, the same on each of its rows."""
    loaded, started = ev.loaded, ev.started
    info = loaded.info if loaded else {}
    # The quality probe runs after the repetitions: the case's memory figures stop where it starts.
    t_quality = ev.quality_start.t if ev.quality_start else float("inf")
    options = {**case.options}
    if info.get("n_threads"):
        options.setdefault("n_threads", info["n_threads"])
    row = {
        **base,
        "options_json": json.dumps(options, sort_keys=True),
        "runtime_version": info.get("runtime_version"), "device": info.get("device"),
        "n_layers_total": info.get("n_layers_total"), "n_layers_device": info.get("n_layers_device"),
        "kv_type": info.get("kv_type"), "n_threads": info.get("n_threads"),
        **{key: info[key] for key in KV_SETTING_KEYS if info.get(key) is not None},
        "n_ctx_runtime": info.get("n_ctx"), "n_ctx_meaning": info.get("n_ctx_meaning"),
        "runtime_extra_json": json.dumps(info["extra"], sort_keys=True, default=str) if info.get("extra") else None,
        "load_s": loaded.load_s if loaded else None, "case_wall_s": wall_s,
        "spawn_s": started.t - t_spawn if started else None,
        "import_s": loaded.t0 - started.t if started and loaded else None,
        "baseline_rss_bytes": started.baseline_rss if started else None,
        "runtime_rss_bytes": loaded.rss_after_import if loaded else None,
        "load_rss_bytes": loaded.rss_after_load if loaded else None,
        "load_peak_rss_bytes": _int(tl.peak("rss", float("-inf"), loaded.t1 if loaded else float("inf"))),
        "peak_rss_bytes": _int(tl.peak("rss", float("-inf"), t_quality)), "vmhwm_bytes": tl.vmhwm,
        "peak_uss_bytes": _int(tl.peak("uss", float("-inf"), t_quality)),
        "sys_available_min_bytes": _int(tl.low("sys_available")),
        "swap_used_max_bytes": _int(tl.peak("swap_used")),
        "case_major_faults": _int(tl.delta("majflt", t_spawn, float("inf"))),
        "case_read_bytes": _int(tl.delta("read_bytes", t_spawn, float("inf"))),
        "sampler_samples": len(tl), "exit_code": exit_code,
        **{key: (ev.done.memory if ev.done else {}).get(key) for key in MEMORY_STATS_KEYS},
        "gpu_total_bytes": tl.gpu_total, "gpu_used_peak_bytes": _int(tl.peak("gpu_used")),
        "gpu_proc_peak_bytes": _int(tl.peak("gpu_proc")),
        "sampler_timed_interval_ms": _scaled(tl.timed_interval_s, 1000),
        **noise_columns(tl, _timed_span(ev), base.get("cpu_threads") or 1),
    }
    if ev.quality is not None:
        row.update(quality_columns(ev.quality.columns))
        row["quality_case_key"] = case.key
        row["quality_peak_rss_bytes"] = _int(tl.peak("rss", t_quality, ev.quality.t))
    return row


def _timed_span(ev: CaseEvents) -> tuple[float, float]:
    """From the end of loading to the last timed repetition or turn: where disturbances matter."""
    ends = [rep.stamps[-1] for rep in ev.timed_reps] + [turn.stamps[-1] for turn in ev.turns]
    t0 = ev.loaded.t1 if ev.loaded else float("-inf")
    return t0, max(ends) if ends else float("inf")


NOISE_SLACK_S = 0.5  # the parent's mark after the last repetition arrives this late at most, usually ms


def noise_columns(tl: Timeline, span: tuple[float, float], cpus: int) -> Row:
    """Steal, other processes' load, frequency and temperature between the noise samples that
    bracket ``span`` (the marks at the phase boundaries); the whole case when fewer than two fall in it."""
    ts, busy = tl.samples["t"], tl.samples["sys_busy_s"]
    marks = [i for i, v in enumerate(busy) if v is not None]
    inside = [i for i in marks if span[0] - NOISE_SLACK_S <= ts[i] <= span[1] + NOISE_SLACK_S]
    picked = inside if len(inside) >= 2 else marks
    mhz = [tl.samples["cpu_mhz"][i] for i in picked if tl.samples["cpu_mhz"][i] is not None]
    temps = [tl.samples["temp_c"][i] for i in picked if tl.samples["temp_c"][i] is not None]
    out: Row = {"cpu_mhz_mean": _mean(mhz), "cpu_mhz_min": min(mhz) if mhz else None,
                "temp_c_max": max(temps) if temps else None}
    if len(picked) < 2:
        return out
    a, b = picked[0], picked[-1]
    wall = ts[b] - ts[a]
    steal = tl.samples["sys_steal_s"]
    cpu = tl.samples["cpu_s"]
    if wall <= 0:
        return out
    if steal[a] is not None and steal[b] is not None:
        out["steal_fraction"] = (steal[b] - steal[a]) / (wall * cpus)
    if cpu[a] is not None and cpu[b] is not None:
        out["outside_load_cores"] = max(0.0, ((busy[b] - busy[a]) - (cpu[b] - cpu[a])) / wall)
    return out


def quality_columns(payload: dict[str, Any]) -> Row:
    return {k: v for k, v in payload.items() if k.startswith(("quality_", "task_"))}


def _window_columns(tl: Timeline, t0: float, stamps: list[float], tokens: int) -> Row:
    """What a user saw between handing over ``tokens`` at ``t0`` and the last generated token:
    timing, memory, paging, CPU, GPU and energy from the timeline between those marks."""
    t1 = stamps[-1]
    tm = timing(t0, stamps, tokens)
    cpu = tl.delta("cpu_s", t0, t1)
    return {
        "status": "ok", "error": None, "gen_tokens": tm.gen_tokens,
        "ttft_s": tm.ttft_s, "prefill_tok_s": tm.prefill_tok_s, "decode_tok_s": tm.decode_tok_s,
        "itl_p50_s": tm.itl_p50_s, "itl_p90_s": tm.itl_p90_s, "itl_p99_s": tm.itl_p99_s, "e2e_s": tm.e2e_s,
        "rep_drift": rate_drift(stamps),
        **_paging_columns(tl, t0, t1),
        "cpu_util": cpu / (t1 - t0) if cpu is not None and t1 > t0 else None,
        "gpu_util_mean_pct": _mean(tl.window("gpu_util", t0, t1)),
        "gpu_power_mean_w": _scaled(_mean(tl.window("gpu_power_mw", t0, t1)), 1e-3),
        **energy_columns(tl, t0, stamps),
    }


def _paging_columns(tl: Timeline, t0: float, t1: float) -> Row:
    return {
        "major_faults": _int(tl.delta("majflt", t0, t1)), "minor_faults": _int(tl.delta("minflt", t0, t1)),
        "read_bytes": _int(tl.delta("read_bytes", t0, t1)),
        "swap_in_pages": _int(tl.delta("pswpin", t0, t1)), "swap_out_pages": _int(tl.delta("pswpout", t0, t1)),
    }


def _repetition_columns(rep: Rep, prompt_tokens: int, tl: Timeline) -> Row:
    row = {"repetition": rep.repetition, "prompt_tokens": prompt_tokens,
           **_window_columns(tl, rep.t_start, rep.stamps, prompt_tokens),
           "rep_peak_rss_bytes": _int(tl.peak("rss", rep.t_start, rep.stamps[-1])),
           "kv_session_bytes": rep.kv_session_bytes}
    if rep.sessions is None:  # one session: its own figures are the serving ones
        row.update(ttft_p50_s=row["ttft_s"], ttft_p90_s=row["ttft_s"], user_decode_tok_s=row["decode_tok_s"],
                   user_decode_min_tok_s=row["decode_tok_s"], aggregate_decode_tok_s=row["decode_tok_s"])
        return row
    return {**row, **_parallel_columns(rep.t_start, rep.sessions, prompt_tokens)}


def _parallel_columns(t_start: float, sessions: list[list[float]], prompt_tokens: int) -> Row:
    """N sessions of one repetition (metrics.parallel_timing). Like a workflow's session row, the
    standard timing columns are the worst user's: the slowest TTFT, the slowest session's decode;
    ``gen_tokens`` stays per session."""
    pt = parallel_timing(t_start, sessions, prompt_tokens)
    itl = pt.itl
    return {
        "gen_tokens": min(len(s) for s in sessions),
        "ttft_s": max(pt.session_ttft_s), "prefill_tok_s": pt.prefill_tok_s,
        "decode_tok_s": pt.user_decode_min_tok_s, "e2e_s": pt.e2e_s,
        "itl_p50_s": percentile(itl, 50) if itl else None, "itl_p90_s": percentile(itl, 90) if itl else None,
        "itl_p99_s": percentile(itl, 99) if itl else None,
        "ttft_p50_s": pt.ttft_p50_s, "ttft_p90_s": pt.ttft_p90_s, "user_decode_tok_s": pt.user_decode_tok_s,
        "user_decode_min_tok_s": pt.user_decode_min_tok_s, "aggregate_decode_tok_s": pt.aggregate_decode_tok_s,
        "session_ttft_s_json": json.dumps([round(t, 6) for t in pt.session_ttft_s]),
        "session_decode_tok_s_json": json.dumps([None if r is None else round(r, 3)
                                                 for r in pt.session_decode_tok_s]),
    }


def energy_columns(tl: Timeline, t0: float, stamps: list[float]) -> Row:
    """Joules for prefill and decode from the cumulative counters, interpolated at the phase edges."""
    out: Row = {"energy_source": tl.energy_source, "energy_note": tl.energy_note}
    ts = tl.samples["t"]

    def joules(t: float) -> float | None:
        cpu = interpolate(ts, tl.samples["cpu_energy_uj"], t)
        gpu = interpolate(ts, tl.samples["gpu_energy_mj"], t)
        if cpu is None and gpu is None:
            return None
        return (cpu or 0.0) / 1e6 + (gpu or 0.0) / 1e3

    e0, e1, e2 = joules(t0), joules(stamps[0]), joules(stamps[-1])
    if None in (e0, e1, e2):
        return out
    out["energy_prefill_j"] = e1 - e0
    out["energy_decode_j"] = e2 - e1
    out["energy_j_per_token"] = (e2 - e1) / (len(stamps) - 1) if len(stamps) > 1 else None
    out["avg_power_w"] = (e2 - e0) / (stamps[-1] - t0) if stamps[-1] > t0 else None
    return out


# -- workflow sessions ------------------------------------------------------------------------------------

def _turn_peak(tl: Timeline, t0: float, t1: float) -> float | None:
    """Peak RSS between the turn's marks; a turn shorter than the sampling interval gets the
    sample just before its end (memory at that turn, not a blank)."""
    peak = tl.peak("rss", t0, t1)
    return peak if peak is not None else tl.value_at("rss", t1) if len(tl) else None


def _turn_row(case_level: Row, turn: Turn, tl: Timeline) -> Row:
    """What the user of that turn saw: TTFT from handing over the turn's new tokens, the rate of
    prefilling what this turn processed, the reply's decode rate, memory between the turn's marks."""
    return {
        **case_level, "repetition": turn.repetition, "turn": turn.turn,
        **_window_columns(tl, turn.t_start, turn.stamps, turn.processed_tokens),
        "prompt_tokens": turn.context_tokens, "turn_new_tokens": turn.new_tokens,
        "context_tokens": turn.context_tokens, "processed_tokens": turn.processed_tokens, "kv_reuse": turn.kv_reuse,
        "rep_peak_rss_bytes": _int(_turn_peak(tl, turn.t_start, turn.stamps[-1])),
    }


def turn_rows(case: Case, case_level: Row, ev: CaseEvents, tl: Timeline) -> list[Row]:
    """Rows for every finished turn, and a case-level row (``turn`` null) for every finished session;
    an unfinished session keeps its finished turns."""
    wf = case.workflow
    assert wf is not None
    by_rep: dict[int, list[tuple[Turn, Row]]] = {}
    for turn in ev.turns:
        by_rep.setdefault(turn.repetition, []).append((turn, _turn_row(case_level, turn, tl)))
    out: list[Row] = []
    finished = {rep.repetition for rep in ev.reps}
    for rep in ev.reps:
        turns = by_rep.get(rep.repetition, [])
        out += [row for _, row in turns]
        if len(turns) == wf.turns:
            out.append(_session_row(case_level, rep.repetition, turns, tl))
    out += [row for repetition, turns in by_rep.items() if repetition not in finished for _, row in turns]
    return out


def _session_row(case_level: Row, repetition: int, turns: list[tuple[Turn, Row]], tl: Timeline) -> Row:
    """The whole session next to single-turn rows: its figures are the worst turn's (highest TTFT,
    slowest decode, highest peak), its totals the session's (time, bytes read, energy)."""
    t0, t1 = turns[0][0].t_start, turns[-1][0].stamps[-1]
    rows = [row for _, row in turns]
    gaps = [b - a for turn, _ in turns for a, b in zip(turn.stamps, turn.stamps[1:])]
    cpu = tl.delta("cpu_s", t0, t1)

    def total(key: str) -> float | None:
        values = [r[key] for r in rows if r.get(key) is not None]
        return sum(values) if values else None

    def extreme(key: str, pick: Any) -> float | None:
        values = [r[key] for r in rows if r.get(key) is not None]
        return pick(values) if values else None

    prefill_j, decode_j = total("energy_prefill_j"), total("energy_decode_j")
    return {
        **case_level, "repetition": repetition, "turn": None, "status": "ok", "error": None,
        "prompt_tokens": rows[-1]["context_tokens"], "gen_tokens": sum(r["gen_tokens"] for r in rows),
        "context_tokens": rows[-1]["context_tokens"], "processed_tokens": total("processed_tokens"),
        "turn_new_tokens": total("turn_new_tokens"), "kv_reuse": rows[-1]["kv_reuse"],
        # the worst turn's figures: what decides whether the session stays usable
        "ttft_s": extreme("ttft_s", max), "decode_tok_s": extreme("decode_tok_s", min),
        "prefill_tok_s": extreme("prefill_tok_s", min),
        "itl_p50_s": percentile(gaps, 50) if gaps else None, "itl_p90_s": percentile(gaps, 90) if gaps else None,
        "itl_p99_s": percentile(gaps, 99) if gaps else None, "e2e_s": t1 - t0,
        "rep_peak_rss_bytes": extreme("rep_peak_rss_bytes", max),
        **_paging_columns(tl, t0, t1),
        "cpu_util": cpu / (t1 - t0) if cpu is not None and t1 > t0 else None,
        "gpu_util_mean_pct": _mean(tl.window("gpu_util", t0, t1)),
        "gpu_power_mean_w": _scaled(_mean(tl.window("gpu_power_mw", t0, t1)), 1e-3),
        "energy_source": rows[0].get("energy_source"), "energy_note": rows[0].get("energy_note"),
        "energy_prefill_j": prefill_j, "energy_decode_j": decode_j,
        "energy_j_per_token": decode_j / len(gaps) if decode_j is not None and gaps else None,
        "avg_power_w": ((prefill_j or 0) + decode_j) / (t1 - t0) if decode_j is not None and t1 > t0 else None,
    }


def failing_turn(case: Case, ev: CaseEvents) -> int | None:
    """The turn a failed workflow case was in when it failed (1-based)."""
    if case.workflow is None or ev.loaded is None:
        return None
    finished = len(ev.reps)
    in_progress = [t for t in ev.turns if t.repetition == finished]
    return len(in_progress) + 1 if len(in_progress) < case.workflow.turns else None


# -- the timeline file ------------------------------------------------------------------------------------

def timeline_columns(case: Case, ev: CaseEvents, tl: Timeline | None, run_id: str, t_spawn: float,
                     machine_id: str | None) -> dict[str, list]:
    """The raw samples of one case with the phase each was taken in, keyed by run, machine and case."""
    if tl is None or not len(tl):
        return {}
    t_spawn = t_spawn or tl.samples["t"][0]
    spans = _phase_spans(ev)
    s = tl.samples
    n = len(tl)
    return {
        "run_id": [run_id] * n, "machine_id": [machine_id] * n, "case_key": [case.key] * n,
        "case_index": [case.index] * n,
        "t_s": [t - t_spawn for t in s["t"]], "phase": [_phase_of(t, spans) for t in s["t"]],
        "rss_bytes": s["rss"], "uss_bytes": s["uss"], "sys_available_bytes": s["sys_available"],
        "swap_used_bytes": s["swap_used"], "pswpin": s["pswpin"], "pswpout": s["pswpout"],
        "minflt": s["minflt"], "majflt": s["majflt"], "cpu_s": s["cpu_s"], "read_bytes": s["read_bytes"],
        "cpu_energy_uj": s["cpu_energy_uj"], "gpu_energy_mj": s["gpu_energy_mj"], "gpu_power_mw": s["gpu_power_mw"],
        "gpu_used_bytes": s["gpu_used"], "gpu_proc_bytes": s["gpu_proc"], "gpu_util_pct": s["gpu_util"],
        "cpu_mhz": s["cpu_mhz"], "temp_c": s["temp_c"], "sys_busy_s": s["sys_busy_s"], "sys_steal_s": s["sys_steal_s"],
    }


def _phase_spans(ev: CaseEvents) -> list[tuple[float, float, str]]:
    spans = []
    if ev.started is not None and ev.loaded is not None:
        spans.append((ev.started.t, ev.loaded.t0, "load"))  # imports count as loading
        spans.append((ev.loaded.t0, ev.loaded.t1, "load"))
    if ev.warmup is not None:
        spans.append((ev.warmup.t0, ev.warmup.t1, "warmup"))
    for rep in ev.timed_reps:
        spans.append((rep.t_start, rep.stamps[-1], f"rep{rep.repetition}"))
    for turn in ev.turns:  # workflows: one phase per turn, between the turn's marks
        spans.append((turn.t_start, turn.stamps[-1], f"rep{turn.repetition}/turn{turn.turn}"))
    if ev.quality_start is not None:
        # Everything from the probe's start to the end of the case is the probe's (its teardown
        # too): those samples are outside the case's memory figures, which stop at QualityStart.
        spans.append((ev.quality_start.t, float("inf"), "quality"))
    return spans


def _phase_of(t: float, spans: list[tuple[float, float, str]]) -> str:
    for t0, t1, name in spans:
        if t0 <= t <= t1:
            return name
    if spans and t > max(s[1] for s in spans):
        return "teardown"
    if spans and t < spans[0][0]:
        return "spawn"
    return "prompt"
