"""Runs a scenario's cases in order, each through ``harness.case.run_case``, writing as it goes.

The suite orders nothing it does not have to: it prepares a quality
reference once, lets cases of one artifact/runtime/options share one quality
probe, skips cases whose estimate is far above free memory, and writes each
case's rows and timeline before the next case starts, so an interrupted or
crashed run loses nothing already measured.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from harness.artifact import ArtifactInfo
from harness.case import ArtifactHashes, CaseResult, Progress, SuiteInterrupted, obviously_too_big, run_case, worker_spec
from harness.measure.machine import Machine
from harness.quality.reference import ReferenceResult, prepare_reference
from harness.results import ResultWriter
from harness.rows import failure_row, quality_columns
from harness.scenario import Case

# What other modules import from here (the CLI, fleet, benches): the suite's public face.
__all__ = ["ArtifactHashes", "CaseResult", "Progress", "SuiteInterrupted", "new_run_id", "record", "run_case",
           "run_suite", "worker_spec"]


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


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
    for n, case in enumerate(cases):
        if n and case.cooldown_s:
            on_note(f"cooling down {case.cooldown_s:g} s before case {case.index + 1}")
            time.sleep(case.cooldown_s)  # Ctrl-C here is a KeyboardInterrupt: nothing of this case ran yet
        on_case_start(case)
        stop: SuiteInterrupted | None = None
        too_big = None if force else obviously_too_big(case, artifacts[case.artifact])
        if too_big:
            art = artifacts[case.artifact]
            row = failure_row(case, machine, run_id, "skipped", too_big, artifact=art, sha256=hashes.get(art.path))
            result = CaseResult(case, "skipped", too_big, [row])
        else:
            quality, reused = _quality_for(case, reference, probed)
            try:
                result = run_case(case, artifacts[case.artifact], machine, run_id, hashes,
                                  lambda p, c=case: on_progress(c, p), quality=quality, reused_quality=reused)
            except SuiteInterrupted as interrupted:
                stop, result = interrupted, interrupted.args[0]
            got = result.events.quality.columns if result.events.quality else {}
            measured = got.get("quality_ppl") is not None or got.get("task_count")
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


def record(writer: ResultWriter, result: CaseResult, run_id: str) -> None:
    """Write a finished (or failed, or interrupted) case's rows and timeline."""
    writer.add_case(result.rows, result.timeline_columns(run_id))


