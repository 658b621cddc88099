"""Runs a scenario's cases in order, one isolated child process per case.

For each case the parent spawns a worker, samples it, enforces the timeout,
turns what it saw into result rows and writes them before starting the next
case. Whatever happens to the child (load error, exception, crash, kill,
hang) becomes a row with a status; the suite goes on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import psutil

from harness.artifact import ArtifactInfo, sha256_file
from harness.budget import CgroupBudget, create_budget, drop_cached_pages
from harness.child import EXIT_GRACE_S, WorkerProcess
from harness.energy import interpolate
from harness.estimate import EstimateError, estimate
from harness.fit import classify, judge_sessions
from harness.machine import Machine
from harness.metrics import timing
from harness.qualityref import ReferenceResult, prepare_reference
from harness.results import SCHEMA_VERSION, ResultWriter
from harness.sampler import Sampler, Timeline
from harness.scenario import Case
from harness.session import failing_turn, turn_rows
from runners.base import MEMORY_STATS_KEYS, get_runner_class

POLL_S = 0.1  # how often the parent wakes while waiting (it blocks, it never spins)


@dataclass
class CaseResult:
    case: Case
    status: str
    error: str | None
    rows: list[dict[str, Any]]
    timeline: Timeline | None = None
    peak_rss: int | None = None
    vmhwm: int | None = None
    wall_s: float = 0.0
    t_spawn: float = 0.0
    events: dict[str, Any] = field(default_factory=dict)


@dataclass
class Progress:
    """What the live display shows; updated by the suite while a case runs."""

    phase: str = "starting"
    repetition: int = 0
    peak_rss: int = 0
    rss: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class SuiteInterrupted(Exception):
    """Ctrl-C or SIGTERM during a case; the interrupted case has a row already."""


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


class ArtifactHashes:
    """sha256 per artifact, computed once per run (it reads the whole file)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int, float], str] = {}

    def get(self, path: Path) -> str:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime)
        if key not in self._cache:
            self._cache[key] = sha256_file(path)
        return self._cache[key]


def run_suite(
    cases: list[Case],
    artifacts: dict[Path, ArtifactInfo],
    machine: Machine,
    writer: ResultWriter,
    run_id: str,
    on_case_start: Callable[[Case], None] = lambda case: None,
    on_progress: Callable[[Case, Progress], None] = lambda case, p: None,
    on_case_end: Callable[[CaseResult], None] = lambda result: None,
    force: bool = False,
    on_note: Callable[[str], None] = lambda text: None,
) -> list[CaseResult]:
    hashes = ArtifactHashes()
    results = []
    reference = _quality_reference(cases, on_note)
    probed: dict[str, dict[str, Any]] = {}  # quality group -> the columns its probe gave
    for case in cases:
        on_case_start(case)
        stop: SuiteInterrupted | None = None
        too_big = None if force else obviously_too_big(case, artifacts[case.artifact])
        if too_big:
            base = _base_row(case, artifacts[case.artifact], machine, run_id, datetime.now(timezone.utc), hashes)
            result = CaseResult(case, "skipped", too_big, [{**base, "status": "skipped", "error": too_big}])
            judge(result.rows, case, machine, "none")
        else:
            quality, reused = _quality_for(case, reference, probed)
            try:
                result = run_case(case, artifacts[case.artifact], machine, run_id, hashes,
                                  lambda p, c=case: on_progress(c, p), quality=quality, reused_quality=reused)
            except SuiteInterrupted as interrupted:
                stop, result = interrupted, interrupted.args[0]
            got = (result.events or {}).get("quality")
            measured = got and (got.get("quality_ppl") is not None or got.get("task_count"))
            if measured and case.quality_group not in probed:
                probed[case.quality_group] = {**quality_columns(got), "quality_case_key": case.key}
        record(writer, result, run_id)
        on_case_end(result)
        results.append(result)
        if stop is not None:
            raise stop
    return results


def _quality_reference(cases: list[Case], on_note: Callable[[str], None]) -> ReferenceResult | None:
    spec = next((c.quality for c in cases if c.quality is not None), None)
    if spec is None:
        return None
    ref = prepare_reference(spec, timeout=max(c.timeout for c in cases), on_status=on_note)
    if ref is not None and ref.error:
        on_note(f"quality reference failed, no KL this run: {ref.error}")
    return ref


def _quality_for(case: Case, reference: ReferenceResult | None,
                 probed: dict[str, dict[str, Any]]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The probe spec for a case's worker, or the columns an earlier case of the same
    artifact/runtime/options measured (the probe does not depend on the case's context)."""
    if case.quality is None:
        return None, None
    if case.quality_group in probed:
        return None, probed[case.quality_group]
    if case.budget_bytes is not None:
        # The probe's own arrays (n_vocab floats per position) would count against the budget
        # and could turn a fitting case into an OOM; an unbudgeted case measures quality.
        return None, {"quality_error": "not probed under a memory budget; add an unbudgeted case (budget: [none, ...])"}
    spec = reference.worker_spec(case.quality) if reference is not None else case.quality.worker_spec()
    return spec, None


def quality_columns(payload: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in payload.items() if k.startswith(("quality_", "task_"))}


def record(writer: ResultWriter, result: CaseResult, run_id: str) -> None:
    """Write a finished (or failed, or interrupted) case's rows and timeline."""
    writer.add_case(result.rows, timeline_columns(result, run_id))


def run_case(
    case: Case,
    artifact: ArtifactInfo,
    machine: Machine,
    run_id: str,
    hashes: ArtifactHashes | None = None,
    on_progress: Callable[[Progress], None] = lambda p: None,
    quality: dict[str, Any] | None = None,
    reused_quality: dict[str, Any] | None = None,
) -> CaseResult:
    hashes = hashes or ArtifactHashes()
    started_at = datetime.now(timezone.utc)
    base = _base_row(case, artifact, machine, run_id, started_at, hashes)
    availability = get_runner_class(case.runtime).case_availability(case.options)
    if not availability.available:
        error = f"{availability.reason}; install with: {availability.install}"
        return CaseResult(case, "unavailable", error, [{**base, "status": "unavailable", "error": error}])

    log_fd, log_path = tempfile.mkstemp(prefix="fitbench-case-", suffix=".log")
    os.close(log_fd)
    spec = {
        "runtime": case.runtime, "artifact": str(case.artifact), "options": case.options,
        "n_ctx": case.n_ctx, "prompt_tokens": case.prompt_tokens, "gen_tokens": case.gen_tokens,
        "warmup": case.warmup, "repetitions": case.repetitions, "quality": quality,
        "workflow": ({"new_tokens": case.workflow.new_tokens(), "reply_tokens": case.workflow.reply_tokens,
                      "reuse_cache": case.workflow.reuse_cache} if case.workflow else None),
    }
    budget = None
    if case.budget_bytes is not None:
        drop_cached_pages(case.artifact)
        budget = create_budget(case.budget_bytes)
    t_spawn = time.perf_counter()
    worker = WorkerProcess(Path(log_path))
    if budget is not None:
        budget.add(worker.pid)
    worker.start(spec)
    sampler = Sampler(worker.pid, case.sampler_interval_ms / 1000).start()
    progress = Progress()
    watch = Watchdog(case, artifact.size_bytes, machine.ram_bytes, budget is not None)

    events: dict[str, Any] = {"reps": [], "turns": []}
    status, error = "ok", None
    deadline = t_spawn + case.timeout
    interrupted = False
    try:
        while True:
            progress.peak_rss, progress.rss = sampler.peak_rss, sampler.last_rss
            on_progress(progress)
            if time.perf_counter() > deadline:
                if progress.phase == "quality":
                    # The timed part is done and valid: a slow probe costs its own figures only.
                    events["quality"] = {"quality_error": f"the quality probe took longer than {case.timeout:g} s "
                                                          "(the case timeout); lower quality.tokens or the tasks",
                                         "t": time.perf_counter()}
                    break
                status, error = "timeout", f"case exceeded its timeout of {case.timeout:g} s (phase: {progress.phase})"
                break
            stop = watch.check(sampler.timeline)
            if stop:
                status, error = "stopped", stop
                break
            try:
                message = worker.poll(POLL_S)
            except EOFError:
                status, error = _death_status(worker, sampler.timeline, machine, budget)
                break
            if message is None:
                continue
            kind, payload = message
            events[kind] = payload
            if kind == "started":
                progress.phase = "loading"
            elif kind == "loaded":
                progress.phase = "warm-up" if case.warmup else "generating"
                watch.loaded(sampler.timeline)
            elif kind == "warmup":
                progress.phase = "generating"
            elif kind == "rep":
                events["reps"].append(payload)
                progress.repetition = len(events["reps"])
            elif kind == "quality_start":
                progress.phase = "quality"
                deadline = time.perf_counter() + case.timeout  # the probe gets its own allowance
                sampler.read_vmhwm()  # the case's peak, before the probe's own arrays
            elif kind == "turn":
                events["turns"].append(payload)
                progress.extra["turn"] = payload["turn"]
            elif kind in ("done", "error"):
                if kind == "error":
                    status, error = payload["status"], payload["error"]
                if "quality_start" not in events:
                    sampler.read_vmhwm()
                break
    except KeyboardInterrupt:
        interrupted = True
        status, error = "interrupted", "stopped by the user (Ctrl-C / SIGTERM) while the case ran"
    finally:
        timeline = sampler.stop()
        worker.finish(graceful=("done" in events or "error" in events) and not interrupted)
        if budget is not None:
            if status == "runtime_error" and budget.oom_killed():
                status, error = "oom", f"out of memory inside the {case.budget_bytes / 2**20:,.0f} MiB budget ({error})"
            budget.close()

    wall_s = time.perf_counter() - t_spawn
    error = _with_log_tail(status, error, log_path)
    rows = _rows(case, base, events, timeline, status, error, worker.exitcode, wall_s, t_spawn)
    if reused_quality:
        for row in rows:
            row.update(reused_quality)
    for row in rows:
        row["ru_maxrss_bytes"] = worker.ru_maxrss
    judge(rows, case, machine, budget.method if budget else "none")
    peak = rows[0].get("peak_rss_bytes") if "quality_start" in events and rows else sampler.peak_rss
    result = CaseResult(case, status, error, rows, timeline, peak or None, timeline.vmhwm, wall_s, t_spawn, events)
    if interrupted:
        raise SuiteInterrupted(result)
    return result


def _death_status(worker: WorkerProcess, timeline: Timeline, machine: Machine,
                  budget: CgroupBudget | None) -> tuple[str, str]:
    code = worker.join(EXIT_GRACE_S)
    if code is None:
        return "runtime_error", "the worker closed its pipe but did not exit"
    if code < 0:
        sig = signal.Signals(-code)
        if sig == signal.SIGKILL and budget is not None and budget.oom_killed():
            return "oom", f"killed by the kernel OOM killer inside the {budget.limit_bytes / 2**20:,.0f} MiB budget ({budget.method})"
        if sig == signal.SIGKILL:
            low = timeline.low("sys_available")
            if low is not None and low < 0.05 * machine.ram_bytes:
                return "oom", f"killed by SIGKILL with system memory nearly exhausted ({low / 2**20:.0f} MiB available): the OOM killer"
            return "killed", "killed by SIGKILL from outside fitbench (OOM killer or a user)"
        return "crashed", f"native crash: the worker died with {sig.name}"
    return "crashed", f"the worker exited with code {code} without reporting"


SKIP_FACTOR = 1.5  # "obviously": the estimate is this far above what is free


def obviously_too_big(case: Case, artifact: ArtifactInfo) -> str | None:
    """Before a case without a budget: skip it if its estimated peak is far above available memory,
    so the harness never walks the user's machine into swap-death by default."""
    if case.budget_bytes is not None:
        return None  # a cgroup (or the verdict) contains it
    try:
        guess = estimate(artifact, case.n_ctx, case.runtime, str(case.options.get("type_k", "f16")),
                         bool(case.options.get("flash_attn", False)), fill=case.prompt_tokens / case.n_ctx)
    except EstimateError:
        return None
    available = psutil.virtual_memory().available
    if guess.total_bytes > SKIP_FACTOR * available:
        return (f"skipped: estimated peak {guess.total_bytes / 2**30:,.1f} GiB is far above the "
                f"{available / 2**30:,.1f} GiB available; pass --force to run it anyway, or --budget to measure it contained")
    return None


class Watchdog:
    """Ends a case early when waiting for the timeout would only hurt.

    - Thrash: a budgeted, mmapped model that no longer fits re-reads its
      weights from storage for every token and is never killed by the kernel
      (seen here: 130 MiB for the 98 MB sample, still thrashing after 300 s).
      Once the worker has read ``watchdog_read_factor`` x the artifact after
      loading, the verdict (spill) is clear: stop.
    - Machine safety: with no cgroup to contain it, a case that drives system
      available memory under 2% of RAM is stopped before it takes the
      user's machine into swap-death.
    """

    MIN_AVAILABLE_FRACTION = 0.02
    MIN_READ_BYTES = 256 << 20  # reading code and data files is not thrash, however small the artifact

    def __init__(self, case: Case, artifact_bytes: int, ram_bytes: int, contained: bool) -> None:
        self.limit = (max(case.thresholds.watchdog_read_factor * artifact_bytes, self.MIN_READ_BYTES)
                      if artifact_bytes else None)
        self.artifact_bytes, self.ram_bytes, self.contained = artifact_bytes, ram_bytes, contained
        self.read_at_load: int | None = None

    def loaded(self, timeline: Timeline) -> None:
        samples = timeline.samples["read_bytes"]
        self.read_at_load = samples[-1] if samples else None

    def check(self, timeline: Timeline) -> str | None:
        if not len(timeline):
            return None
        read = timeline.samples["read_bytes"][-1]
        if self.limit and self.read_at_load is not None and read is not None and read - self.read_at_load >= self.limit:
            since = read - self.read_at_load
            return (f"spill watchdog: read {since / 2**20:,.0f} MiB from storage after loading "
                    f"({since / self.artifact_bytes:.1f}x the artifact); stopped instead of waiting for the timeout")
        available = timeline.samples["sys_available"][-1]
        if not self.contained and available is not None and available < self.MIN_AVAILABLE_FRACTION * self.ram_bytes:
            return (f"memory guard: system available memory fell to {available / 2**20:,.0f} MiB; "
                    "stopped to protect the machine (use --budget to measure under a limit instead)")
        return None


def judge(rows: list[dict[str, Any]], case: Case, machine: Machine, method: str) -> None:
    """Add the budget and fit columns to each row."""
    budget = case.budget_bytes or machine.ram_bytes
    thresholds = json.dumps(dataclasses.asdict(case.thresholds), sort_keys=True)
    for row in rows:
        verdict = classify(row, budget, case.thresholds)
        row.update(verdict.to_row(), budget_bytes=budget, budget_method=method, thresholds_json=thresholds)
    if case.workflow is not None:
        judge_sessions(rows)


def _with_log_tail(status: str, error: str | None, log_path: str) -> str | None:
    """Attach the runtime's last words (e.g. a GGML_ASSERT) to a failure, then drop the log."""
    try:
        text = Path(log_path).read_text(errors="replace") if status != "ok" else ""
    finally:
        Path(log_path).unlink(missing_ok=True)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if status != "ok" and lines:
        tail = " | ".join(lines[-3:])[-400:]
        error = f"{error} [runtime log: {tail}]"
    return error


def _base_row(case: Case, art: ArtifactInfo, m: Machine, run_id: str, started_at: datetime,
              hashes: ArtifactHashes) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION, "run_id": run_id, "scenario": case.scenario,
        "case_index": case.index, "case_key": case.key, "case_label": case.label, "started_at": started_at,
        "model_label": case.model_label, "artifact_name": art.name, "artifact_path": str(art.path),
        "artifact_size_bytes": art.size_bytes, "artifact_sha256": hashes.get(art.path),
        "artifact_format": art.format, "artifact_quant": art.quant, "artifact_arch": art.architecture,
        "artifact_n_params": art.n_params, "artifact_n_layers": art.n_layers,
        "artifact_n_kv_heads": art.n_kv_heads, "artifact_context_length": art.context_length,
        "artifact_n_heads": art.n_heads, "artifact_head_dim": art.head_dim,
        "runtime": case.runtime, "options_json": json.dumps(case.options, sort_keys=True),
        "n_ctx": case.n_ctx, "fill": case.fill, "prompt_tokens": case.prompt_tokens, "gen_tokens": case.gen_tokens,
        "warmup": case.warmup, "sampler_interval_ms": case.sampler_interval_ms,
        "machine_id": m.machine_id, "machine_class": m.machine_class, "cpu_model": m.cpu_model,
        "cpu_flags": ",".join(m.cpu_flags), "cpu_cores": m.cpu_cores, "cpu_threads": m.cpu_threads,
        "ram_bytes": m.ram_bytes, "gpu_names": ",".join(g.name for g in m.gpus) or None, "os": m.os,
        "python_version": m.python_version, "fitbench_version": m.fitbench_version,
        "sys_mem_total_bytes": m.ram_bytes,
    }


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


def _mean(values: list) -> float | None:
    return sum(values) / len(values) if values else None


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def runtime_memory_columns(ev: dict) -> dict[str, int | None]:
    """The runner's allocator figures from the worker's "done" message (absent after a failure)."""
    memory = (ev.get("done") or {}).get("memory") or {}
    return {key: memory.get(key) for key in MEMORY_STATS_KEYS}


def _rows(case: Case, base: dict, ev: dict, tl: Timeline, status: str, error: str | None,
          exit_code: int | None, wall_s: float, t_spawn: float) -> list[dict[str, Any]]:
    loaded = ev.get("loaded") or {}
    started = ev.get("started")
    info = loaded.get("info") or {}
    # The quality probe runs after the repetitions: the case's memory figures stop where it starts.
    t_quality = (ev.get("quality_start") or {}).get("t", float("inf"))
    options = {**case.options}
    if info.get("n_threads"):
        options.setdefault("n_threads", info["n_threads"])
    case_level = {
        **base,
        "options_json": json.dumps(options, sort_keys=True),
        "runtime_version": info.get("runtime_version"), "device": info.get("device"),
        "n_layers_total": info.get("n_layers_total"), "n_layers_device": info.get("n_layers_device"),
        "kv_type": info.get("kv_type"), "n_threads": info.get("n_threads"),
        "n_ctx_runtime": info.get("n_ctx"), "n_ctx_meaning": info.get("n_ctx_meaning"),
        "runtime_extra_json": json.dumps(info["extra"], sort_keys=True, default=str) if info.get("extra") else None,
        "load_s": loaded.get("load_s"), "case_wall_s": wall_s,
        "spawn_s": started["t"] - t_spawn if started else None,
        "import_s": loaded["t0"] - started["t"] if started and loaded else None,
        "baseline_rss_bytes": (ev.get("started") or {}).get("baseline_rss"),
        "load_rss_bytes": loaded.get("rss_after_load"),
        "peak_rss_bytes": _int(tl.peak("rss", float("-inf"), t_quality)), "vmhwm_bytes": tl.vmhwm,
        "peak_uss_bytes": _int(tl.peak("uss", float("-inf"), t_quality)),
        "sys_available_min_bytes": _int(tl.low("sys_available")),
        "swap_used_max_bytes": _int(tl.peak("swap_used")),
        "case_major_faults": _int(tl.delta("majflt", t_spawn, float("inf"))),
        "case_read_bytes": _int(tl.delta("read_bytes", t_spawn, float("inf"))),
        "sampler_samples": len(tl), "exit_code": exit_code,
        **runtime_memory_columns(ev),
        "gpu_total_bytes": tl.gpu_total, "gpu_used_peak_bytes": _int(tl.peak("gpu_used")),
        "gpu_proc_peak_bytes": _int(tl.peak("gpu_proc")),
    }
    if ev.get("quality"):
        case_level.update(quality_columns(ev["quality"]))
        case_level["quality_case_key"] = case.key
        case_level["quality_peak_rss_bytes"] = _int(tl.peak("rss", t_quality, ev["quality"]["t"]))
    if case.workflow is not None:
        rows = turn_rows(case, case_level, ev, tl, energy_columns)
        if status != "ok":
            rows.append({**case_level, "repetition": None, "status": status, "error": error,
                         "turns": case.workflow.turns, "workflow_kind": case.workflow.kind,
                         "workflow_json": json.dumps(case.workflow.to_dict(), sort_keys=True),
                         "fit_turn": failing_turn(case, ev)})
        return rows
    rows = []
    for rep in ev["reps"]:
        t0, stamps = rep["t_start"], rep["stamps"]
        t1 = stamps[-1]
        tm = timing(t0, stamps, loaded.get("prompt_tokens", case.prompt_tokens))
        cpu = tl.delta("cpu_s", t0, t1)
        rows.append({
            **case_level, "repetition": rep["repetition"], "status": "ok", "error": None,
            "prompt_tokens": loaded.get("prompt_tokens", case.prompt_tokens), "gen_tokens": tm.gen_tokens,
            "ttft_s": tm.ttft_s, "prefill_tok_s": tm.prefill_tok_s, "decode_tok_s": tm.decode_tok_s,
            "itl_p50_s": tm.itl_p50_s, "itl_p90_s": tm.itl_p90_s, "itl_p99_s": tm.itl_p99_s, "e2e_s": tm.e2e_s,
            "rep_peak_rss_bytes": _int(tl.peak("rss", t0, t1)),
            "major_faults": _int(tl.delta("majflt", t0, t1)), "minor_faults": _int(tl.delta("minflt", t0, t1)),
            "read_bytes": _int(tl.delta("read_bytes", t0, t1)),
            "swap_in_pages": _int(tl.delta("pswpin", t0, t1)), "swap_out_pages": _int(tl.delta("pswpout", t0, t1)),
            "cpu_util": cpu / (t1 - t0) if cpu is not None and t1 > t0 else None,
            "gpu_util_mean_pct": _mean(tl.window("gpu_util", t0, t1)),
            "gpu_power_mean_w": _scaled(_mean(tl.window("gpu_power_mw", t0, t1)), 1e-3),
            **energy_columns(tl, t0, stamps),
        })
    if status != "ok":
        # The failure is a row of its own, after any repetitions that did finish.
        rows.append({**case_level, "repetition": None, "status": status, "error": error})
    return rows


def energy_columns(tl: Timeline, t0: float, stamps: list[float]) -> dict[str, Any]:
    """Joules for prefill and decode from the cumulative counters, interpolated at the phase edges."""
    out: dict[str, Any] = {"energy_source": tl.energy_source, "energy_note": tl.energy_note}
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


def timeline_columns(result: CaseResult, run_id: str) -> dict[str, list]:
    tl = result.timeline
    if tl is None or not len(tl):
        return {}
    t_spawn = result.t_spawn or tl.samples["t"][0]
    spans = _phase_spans(result.events)
    s = tl.samples
    n = len(tl)
    return {
        "run_id": [run_id] * n, "case_key": [result.case.key] * n, "case_index": [result.case.index] * n,
        "t_s": [t - t_spawn for t in s["t"]], "phase": [_phase_of(t, spans) for t in s["t"]],
        "rss_bytes": s["rss"], "uss_bytes": s["uss"], "sys_available_bytes": s["sys_available"],
        "swap_used_bytes": s["swap_used"], "pswpin": s["pswpin"], "pswpout": s["pswpout"],
        "minflt": s["minflt"], "majflt": s["majflt"], "cpu_s": s["cpu_s"], "read_bytes": s["read_bytes"],
        "cpu_energy_uj": s["cpu_energy_uj"], "gpu_energy_mj": s["gpu_energy_mj"], "gpu_power_mw": s["gpu_power_mw"],
        "gpu_used_bytes": s["gpu_used"], "gpu_proc_bytes": s["gpu_proc"], "gpu_util_pct": s["gpu_util"],
    }


def _phase_spans(ev: dict) -> list[tuple[float, float, str]]:
    spans = []
    started = (ev.get("started") or {}).get("t")
    loaded = ev.get("loaded")
    if started is not None and loaded:
        spans.append((started, loaded["t0"], "load"))  # imports count as loading
        spans.append((loaded["t0"], loaded["t1"], "load"))
    if ev.get("warmup"):
        spans.append((ev["warmup"]["t0"], ev["warmup"]["t1"], "warmup"))
    for rep in ev.get("reps", []):
        if not rep.get("session"):
            spans.append((rep["t_start"], rep["stamps"][-1], f"rep{rep['repetition']}"))
    for turn in ev.get("turns", []):  # workflows: one phase per turn, between the turn's marks
        spans.append((turn["t_start"], turn["stamps"][-1], f"rep{turn['repetition']}/turn{turn['turn']}"))
    if ev.get("quality_start") and ev.get("quality"):
        spans.append((ev["quality_start"]["t"], ev["quality"]["t"], "quality"))
    return spans


def _phase_of(t: float, spans: list[tuple[float, float, str]]) -> str:
    for t0, t1, name in spans:
        if t0 <= t <= t1:
            return name
    if spans and t > spans[-1][1]:
        return "teardown"
    if spans and t < spans[0][0]:
        return "spawn"
    return "prompt"
