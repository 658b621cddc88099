"""``fitbench recommend --measure``: the fewest cases that decide the undecided candidates.

1. Every earlier row is reused: the output folder's results are read before anything runs, so a
   candidate a measurement already decides costs nothing.
2. The undecided candidates are ordered by their predicted chance of passing: the margin of their
   predicted peak (``harness.estimate``) under the budget.
3. A candidate predicted far above the budget (``SKIP_FACTOR`` x, beyond the estimator's error) is
   not run; one that cannot come within the pick's tie band (``judge.SPEED_TIE``: its decode speed
   measured at a smaller context, an upper bound, is already more than 10 % slower) is not run either.
4. Otherwise one case at the asked context measures every constraint at once; a candidate stops at
   its first failed constraint (nothing more is run for it).
5. When nothing passes, the closest candidate's context is bisected (``harness.fitsearch``) to say
   how much context it does hold, instead of sweeping every context.

Cases go through the suite (``harness.suite.run_suite``), so they land in Parquet like any run.
They run without a cgroup and their peak is judged against the budget (a quality probe cannot run
under a budget). GPU offload is not bisected here: this only runs on the machine it is on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from harness.errors import FitbenchError
from harness.fitsearch import search
from harness.recommend.candidates import Candidate, _observation
from harness.recommend.constraints import Constraints
from harness.recommend.judge import SPEED_TIE, Assessment, assess

SKIP_FACTOR = 1.5  # predicted peak this far above the budget is a miss whatever the estimator's error
MIN_BISECT_CONTEXT = 256


@dataclass
class MeasureSettings:
    output: Path
    gen_tokens: int = 16
    repetitions: int = 1
    timeout: float = 600.0
    reference: Path | None = None
    reference_runtime: str | None = None
    quality_tokens: int = 512
    step: int = 256


@dataclass
class MeasureReport:
    cases_run: int = 0
    wall_s: float = 0.0
    exhaustive_at_context: int = 0  # every runnable candidate at the asked context
    exhaustive_sweep: int = 0  # ... at every context of a doubling sweep up to it
    sweep_contexts: list[int] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)
    results_path: Path | None = None
    max_context: dict[str, int | None] = field(default_factory=dict)  # closest candidate -> bisected context

    def to_dict(self) -> dict:
        return {"cases_run": self.cases_run, "wall_s": round(self.wall_s, 1),
                "exhaustive_at_context": self.exhaustive_at_context, "exhaustive_sweep": self.exhaustive_sweep,
                "sweep_contexts": self.sweep_contexts, "steps": self.steps,
                "results": str(self.results_path) if self.results_path else None, "max_context": self.max_context}


def sweep_contexts(context: int) -> list[int]:
    """The contexts a doubling sweep from 512 (or less) up to ``context`` would run."""
    out, n = [], min(512, context)
    while n < context:
        out.append(n)
        n *= 2
    return out + [context]


def decode_upper_bound(cand: Candidate, c: Constraints, machine_class: str) -> float | None:
    """Decode speed measured at a smaller context on this machine: the asked context is no faster."""
    speeds = [o.decode_tok_s for o in cand.observations if o.machine_class == machine_class and o.users == c.users
              and o.n_ctx <= c.context and o.decode_tok_s is not None]
    return max(speeds) if speeds else None


class Measurer:
    """Runs cases through the suite and turns their rows into observations of the candidates."""

    def __init__(self, c: Constraints, s: MeasureSettings, note: Callable[[str], None]) -> None:
        from harness.measure import machine as machine_mod
        from harness.results import ResultWriter
        from harness.suite import new_run_id

        self.c, self.s, self.note = c, s, note
        self.machine = machine_mod.fingerprint()
        self.run_id = new_run_id()
        s.output.mkdir(parents=True, exist_ok=True)
        self.writer = ResultWriter(s.output / f"recommend-{self.run_id}.parquet")
        self.count = 0
        self.wall = 0.0

    def run(self, cand: Candidate, n_ctx: int) -> None:
        """One case of ``cand`` at ``n_ctx``; its observation is added to the candidate."""
        from harness.preflight import check_scenario
        from harness.scenario import parse_scenario
        from harness.suite import run_suite

        c, s = self.c, self.s
        data = {"name": "recommend", "contexts": [n_ctx], "fill": c.fill, "gen_tokens": s.gen_tokens,
                "repetitions": s.repetitions, "warmup": 1, "timeout": s.timeout,
                "models": [{"artifact": str(cand.path), "runtime": cand.runtime, "label": cand.path.name,
                            "options": {**cand.options, **cand.run_options}}]}
        wants_quality = bool(c.quality_targets) and not any(o.quality for o in cand.observations)
        if wants_quality and (s.reference is not None or c.tasks is not None):
            quality: dict = {"tokens": s.quality_tokens if s.reference is not None else 0,
                             "window": min(s.quality_tokens, n_ctx)}
            if s.reference is not None:
                quality["reference"] = {"artifact": str(s.reference), "runtime": s.reference_runtime}
            if c.tasks is not None:
                quality["tasks"] = str(c.tasks.resolve())
            data["quality"] = quality
        sc = replace(parse_scenario(data, source="fitbench recommend --measure"), thresholds=c.thresholds)
        artifacts = check_scenario(sc)
        case = replace(sc.cases()[0], index=self.count)
        self.count += 1
        started = time.monotonic()
        self.note(f"measuring {cand.label} at context {n_ctx:,} ({case.label})")
        run_suite([case], artifacts, self.machine, self.writer, self.run_id, on_note=self.note)
        self.wall += time.monotonic() - started
        numbered = [(i, r) for i, r in enumerate(self.writer.rows) if r.get("case_key") == case.key
                    and r.get("run_id") == self.run_id and r.get("turn") is None]
        obs = _observation(str(self.writer.results_path), numbered) if numbered else None
        if obs is not None:
            cand.observations.append(obs)


def measure(candidates: list[Candidate], c: Constraints, s: MeasureSettings, machine_class: str, budget: int,
            predict, note: Callable[[str], None]) -> MeasureReport:
    report = MeasureReport(sweep_contexts=sweep_contexts(c.context))
    runnable = [cand for cand in candidates if cand.path is not None and cand.path.exists()]
    report.exhaustive_at_context = len(runnable)
    report.exhaustive_sweep = len(runnable) * len(report.sweep_contexts)
    measurer: Measurer | None = None

    def chance(cand: Candidate) -> float:
        a = assess(cand, c, machine_class, budget, predict)
        peak = a.value("peak_bytes")
        return (budget - peak) / budget if peak else 0.0

    undecided = [cand for cand in runnable if assess(cand, c, machine_class, budget, predict).verdict != "pass"
                 and _undecided(assess(cand, c, machine_class, budget, predict))]
    for cand in sorted(runnable, key=lambda x: x.label):
        if cand not in undecided:
            note(f"{cand.label}: decided by earlier measurements, not run")
            report.steps.append(f"{cand.label}: decided by earlier measurements")
    for cand in sorted(undecided, key=chance, reverse=True):
        a = assess(cand, c, machine_class, budget, predict)
        peak = a.figures.get("peak_bytes")
        if peak is not None and peak.origin == "predicted" and peak.value > SKIP_FACTOR * budget:
            report.steps.append(f"{cand.label}: not run, predicted peak {peak.value / 2**20:,.0f} MiB is over "
                                f"{SKIP_FACTOR:g}x the budget")
            note(report.steps[-1])
            continue
        best = _best_speed(candidates, c, machine_class, budget, predict)
        bound = decode_upper_bound(cand, c, machine_class)
        # within the pick's tie band a slower candidate can still win on quality or memory: only one
        # below it is out
        if best is not None and bound is not None and bound < best * (1 - SPEED_TIE):
            report.steps.append(f"{cand.label}: not run, decode at most {bound:,.1f} tok/s (measured at a smaller "
                                f"context) cannot come within {SPEED_TIE:.0%} of the pick's {best:,.1f}")
            note(report.steps[-1])
            continue
        if measurer is None:
            measurer = Measurer(c, s, note)
            report.results_path = measurer.writer.results_path
        try:
            measurer.run(cand, c.context)
        except FitbenchError as exc:
            report.steps.append(f"{cand.label}: cannot run here: {exc}")
            note(report.steps[-1])
            continue
        after = assess(cand, c, machine_class, budget, predict)
        first_miss = next((k for k in after.checks if k.passed is False), None)
        report.steps.append(f"{cand.label}: ran context {c.context:,}: {after.verdict}"
                            + (f" (first miss: {first_miss.name}: {first_miss.text})" if first_miss else ""))
        note(report.steps[-1])

    assessed = [assess(cand, c, machine_class, budget, predict) for cand in candidates]
    if not any(a.verdict == "pass" for a in assessed):
        _bisect_closest(assessed, c, s, machine_class, budget, predict, report, measurer, note)
    if measurer is not None:
        report.cases_run, report.wall_s = measurer.count, measurer.wall
    return report


def _undecided(a: Assessment) -> bool:
    return a.verdict == "unknown" or a.predicted_fail


def _best_speed(candidates, c, machine_class, budget, predict) -> float | None:
    speeds = [a.value("decode_tok_s") for a in (assess(x, c, machine_class, budget, predict) for x in candidates)
              if a.verdict == "pass"]
    return max(speeds) if speeds else None


def _bisect_closest(assessed: list[Assessment], c: Constraints, s: MeasureSettings, machine_class: str, budget: int,
                    predict, report: MeasureReport, measurer: Measurer | None, note) -> None:
    """Nothing passes: how much context does the closest candidate hold, when only context-bound
    constraints (memory, TTFT) are what it misses? Bisected, not swept."""
    from harness.recommend.judge import closest

    near = closest(assessed)
    if near is None or near.predicted_fail or near.candidate.path is None:
        return
    missed = {k.name for k in near.failed()}
    if not missed <= {"memory", "ttft"}:
        return
    cand = near.candidate
    low = min(MIN_BISECT_CONTEXT, c.context // 2)
    if low < 16:
        return
    if measurer is None:
        measurer = Measurer(c, s, note)
        report.results_path = measurer.writer.results_path

    def probe(n_ctx: int) -> tuple[str | None, str]:
        at = replace(c, context=n_ctx)
        a = assess(cand, at, machine_class, budget, None)
        if a.verdict == "unknown":
            try:
                measurer.run(cand, n_ctx)
            except FitbenchError as exc:
                return None, str(exc)
            a = assess(cand, at, machine_class, budget, None)
        miss = next((k for k in a.checks if k.passed is False), None)
        if miss is None:
            return ("fits" if a.verdict == "pass" else None), "meets every constraint"
        return ("spill" if miss.name == "memory" else "slow"), miss.text

    found = search(probe, low, c.context - 1 if c.context - 1 > low else c.context, max(16, min(s.step, c.context // 8)))
    report.max_context[cand.label] = found.max_fit
    report.steps.append(f"{cand.label}: context bisected over {len(found.probes)} probe(s): "
                        + (f"meets every constraint up to {found.max_fit:,}" if found.max_fit
                           else f"misses even at {low:,}"))
    note(report.steps[-1])
    if measurer is not None:
        report.cases_run, report.wall_s = measurer.count, measurer.wall
