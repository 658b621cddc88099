"""One case from the parent: spawn the worker, budget it, sample it, watch it, collect its rows.

The worker is a fresh ``python -m harness.worker`` process (harness/spawn.py);
what it says arrives as ``harness.protocol`` messages, what the sampler saw is a
Timeline, and ``harness.rows`` turns both into the case's judged rows. Whatever
happens to the child (load error, exception, crash, kill, hang) becomes a row
with a status.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import psutil

from harness.artifact import ArtifactInfo, sha256_file
from harness.estimate import EstimateError, estimate, estimate_case
from harness.measure.bandwidth import gpu_bandwidth, machine_bandwidth
from harness.measure.budget import NoBudget, drop_cached_pages, open_budget
from harness.measure.machine import Machine
from harness.measure.sampler import Sampler, Timeline
from harness.protocol import (
    CaseEvents,
    Done,
    Failed,
    Loaded,
    Quality,
    QualityStart,
    Rep,
    Started,
    Turn,
    Warmup,
    WorkerSpec,
    WorkflowPlan,
)
from harness.rows import Roofline, base_row, case_rows, failure_row, judge_rows, timeline_columns
from harness.scenario import Case
from harness.spawn import EXIT_GRACE_S, WorkerProcess
from runners.base import get_runner_class, parallel_unavailable

POLL_S = 0.1  # how often the parent wakes while waiting (it blocks, it never spins)
# "0": judge cases against their budget without enforcing it (a yardstick), even where a
# cgroup could: what a machine without a writable cgroup does, on purpose.
ENFORCE_BUDGET_ENV = "FITBENCH_ENFORCE_BUDGET"


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
    events: CaseEvents = field(default_factory=CaseEvents)
    machine_id: str | None = None

    def timeline_columns(self, run_id: str) -> dict[str, list]:
        """The case's samples for the timeline file (empty when no worker ran)."""
        return timeline_columns(self.case, self.events, self.timeline, run_id, self.t_spawn, self.machine_id)


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


def worker_spec(case: Case, quality: dict[str, Any] | None = None) -> WorkerSpec:
    """What the case's worker runs."""
    wf = case.workflow
    return WorkerSpec(
        runtime=case.runtime, artifact=str(case.artifact), options=case.options, n_ctx=case.n_ctx,
        prompt_tokens=case.prompt_tokens, gen_tokens=case.gen_tokens, warmup=case.warmup,
        repetitions=case.repetitions, quality=quality,
        workflow=WorkflowPlan(wf.new_tokens(), wf.reply_tokens, wf.reuse_cache) if wf else None,
        parallel=case.parallel)


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
    """Run one case in its own worker and return its judged rows and timeline.
    Raises SuiteInterrupted (carrying the interrupted case's result) on Ctrl-C / SIGTERM."""
    hashes = hashes or ArtifactHashes()
    sha = hashes.get(artifact.path)
    runner_cls = get_runner_class(case.runtime)
    availability = runner_cls.case_availability(case.options)
    no_parallel = parallel_unavailable(runner_cls, case.parallel)
    if availability.available and no_parallel:
        row = failure_row(case, machine, run_id, "unavailable", no_parallel, artifact=artifact, sha256=sha)
        return CaseResult(case, "unavailable", no_parallel, [row])
    if not availability.available:
        error = f"{availability.reason}; install with: {availability.install}"
        row = failure_row(case, machine, run_id, "unavailable", error, artifact=artifact, sha256=sha)
        return CaseResult(case, "unavailable", error, [row])
    base = base_row(case, machine, run_id, datetime.now(timezone.utc), artifact, sha)
    roofline = roofline_inputs(case, artifact, machine)  # before the worker: the probe must not compete with it

    log_fd, log_path = tempfile.mkstemp(prefix="fitbench-case-", suffix=".log")
    os.close(log_fd)
    budget: NoBudget | None = None
    if case.budget_bytes is not None:
        if os.environ.get(ENFORCE_BUDGET_ENV, "1") == "0":
            budget = NoBudget(case.budget_bytes, f"{ENFORCE_BUDGET_ENV}=0: judged against it only")
        else:
            drop_cached_pages(case.artifact)
            budget = open_budget(case.budget_bytes)
    t_spawn = time.perf_counter()
    worker = WorkerProcess(Path(log_path))
    if budget is not None:
        budget.add(worker.pid)  # before the worker loads anything; a scope that fails turns into "none" here
    contained = budget is not None and budget.enforced
    worker.start(worker_spec(case, quality))
    sampler = Sampler(worker.pid, case.sampler_interval_ms / 1000).start()
    progress = Progress()
    watch = Watchdog(case, artifact.size_bytes, machine.ram_bytes, contained)

    ev = CaseEvents()
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
                    ev.add(Quality(t=time.perf_counter(), columns={
                        "quality_error": f"the quality probe took longer than {case.timeout:g} s "
                                         "(the case timeout); lower quality.tokens or the tasks"}))
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
            ev.add(message)
            sampler.mark()  # a phase boundary: the kernel's counters at its edge
            if isinstance(message, Loaded):
                progress.phase = "warm-up" if case.warmup else "generating"
                watch.loaded(sampler.timeline)
                sampler.timed(True)
            elif isinstance(message, Warmup):
                progress.phase = "generating"
            elif isinstance(message, Rep):
                progress.repetition = len(ev.reps)
            elif isinstance(message, QualityStart):
                progress.phase = "quality"
                sampler.timed(False)
                deadline = time.perf_counter() + case.timeout  # the probe gets its own allowance
                sampler.read_vmhwm()  # the case's peak, before the probe's own arrays
            elif isinstance(message, Turn):
                progress.extra["turn"] = message.turn
            elif isinstance(message, Started):
                progress.phase = "loading"
            elif isinstance(message, (Done, Failed)):
                if isinstance(message, Failed):
                    status, error = message.status, message.error
                if ev.quality_start is None:
                    sampler.read_vmhwm()
                break
    except KeyboardInterrupt:
        interrupted = True
        status, error = "interrupted", "stopped by the user (Ctrl-C / SIGTERM) while the case ran"
    finally:
        timeline = sampler.stop()
        worker.finish(graceful=ev.finished and not interrupted)
        budget_peak = None
        if budget is not None:
            if status == "runtime_error" and budget.oom_killed():
                status, error = "oom", f"out of memory inside the {case.budget_bytes / 2**20:,.0f} MiB budget ({error})"
            budget_peak = budget.peak_bytes()
            budget.close()

    wall_s = time.perf_counter() - t_spawn
    error = _with_log_tail(status, error, log_path)
    rows = case_rows(case, base, ev, timeline, status, error, worker.exitcode, wall_s, t_spawn, roofline)
    for row in rows:
        row.update(reused_quality or {}, ru_maxrss_bytes=worker.ru_maxrss, budget_peak_bytes=budget_peak,
                   budget_note=budget.note if budget is not None else None)
    judge_rows(rows, case, machine, budget.method if budget is not None else "none")
    peak = rows[0].get("peak_rss_bytes") if ev.quality_start and rows else sampler.peak_rss
    result = CaseResult(case, status, error, rows, timeline, peak or None, timeline.vmhwm, wall_s, t_spawn, ev,
                        machine.machine_id)
    if interrupted:
        raise SuiteInterrupted(result)
    return result


def roofline_inputs(case: Case, artifact: ArtifactInfo, machine: Machine) -> Roofline | None:
    """Bytes a decoded token reads (weights, KV per position) and the machine's bandwidth, measured once
    per machine and cached (harness/measure/bandwidth.py); None when the artifact cannot be estimated."""
    try:
        est = estimate(artifact, 1, case.runtime, options=case.options)
    except (EstimateError, KeyError, ValueError):
        return None
    if machine.mem_bandwidth_gbs is None:
        found = machine_bandwidth(machine.machine_id)
        if found:
            machine.mem_bandwidth_gbs, machine.mem_bandwidth_source = found["read_bytes_s"] / 1e9, found["source"]
    gpu = gpu_bandwidth() if machine.gpus else None
    return Roofline(est.weights_bytes, est.kv_bytes_per_position,
                    machine.mem_bandwidth_gbs * 1e9 if machine.mem_bandwidth_gbs else None,
                    machine.mem_bandwidth_source, gpu["read_bytes_s"] if gpu else None)


def _death_status(worker: WorkerProcess, timeline: Timeline, machine: Machine,
                  budget: NoBudget | None) -> tuple[str, str]:
    code = worker.join(EXIT_GRACE_S)
    if code is None:
        return "runtime_error", "the worker closed its pipe but did not exit"
    if code < 0:
        sig = signal.Signals(-code)
        if sig == signal.SIGKILL and budget is not None and budget.oom_killed():
            return "oom", (f"killed by the kernel OOM killer inside the {budget.limit_bytes / 2**20:,.0f} MiB budget "
                           f"({budget.method})")
        if sig == signal.SIGKILL:
            low = timeline.low("sys_available")
            if low is not None and low < 0.05 * machine.ram_bytes:
                return "oom", (f"killed by SIGKILL with system memory nearly exhausted ({low / 2**20:.0f} MiB available): "
                               "the OOM killer")
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
        guess = estimate_case(case, artifact)
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
        available = timeline.last("sys_available")
        if not self.contained and available is not None and available < self.MIN_AVAILABLE_FRACTION * self.ram_bytes:
            return (f"memory guard: system available memory fell to {available / 2**20:,.0f} MiB; "
                    "stopped to protect the machine (use --budget to measure under a limit instead)")
        return None


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


