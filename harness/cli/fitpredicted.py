"""``fitbench fit`` by prediction (the default method): three short calibration cases, a predicted
verdict for every context of the grid, full runs only at the boundaries (harness/fitpredict.py).

Results go to stdout; progress with the estimated time left to stderr.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Callable

from rich.markup import escape

from harness.cli.present import Markup, fit_markup, make_console, mib
from harness.fit import case_verdict, judged_peak, predicted_verdict
from harness.fitpredict import CONFIRM, Answer, Model, Point, calibration_plan, confirm, expected_runs, grid
from harness.scenario import Case

CALIBRATION_GEN_TOKENS = 8  # enough decode steps for a rate; the prefill is what calibration is for


def point_from(case: Case, rows: list[dict], wall_s: float) -> Point:
    """A finished case as a measured point: its verdict, judged peak and mean timings."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("repetition") is not None]
    cls, reason = case_verdict(rows)
    peaks = [p for p in (judged_peak(r) for r in rows) if p]

    def mean(key: str) -> float | None:
        values = [r[key] for r in ok if r.get(key)]
        return sum(values) / len(values) if values else None

    return Point(case.n_ctx, case.prompt_tokens, float(max(peaks)) if peaks else 0.0, mean("ttft_s"),
                 mean("decode_tok_s"), wall_s, cls, reason)


@dataclass
class Clock:
    """Estimated time left: the planned full runs not yet done, each costed by the model."""

    model: Model
    fill: float
    gen_tokens: int
    warmup: int
    repetitions: int

    def cost(self, n_ctx: int) -> float:
        filled = int(self.fill * n_ctx)
        per_rep = self.model.wall(filled, self.gen_tokens, warmup=0) - self.model.overhead_s
        warm = self.warmup * (self.model.ttft(filled) or 0.0)
        return self.model.overhead_s + warm + self.repetitions * per_rep

    def left(self, todo: list[int]) -> str:
        return duration(sum(self.cost(n) for n in todo))


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def predicted_fit(console: Any, case0: Case, run: Callable[[Case], tuple[list[dict], float]], limit: int,
                  smallest: int, step: int, budget_bytes: int, confirm_what: str) -> Answer:
    """Calibrate, predict every context, confirm the boundaries. ``run(case) -> (rows, wall_s)`` runs
    and records one case; ``budget_bytes`` is what verdicts are judged against."""
    err = make_console(stderr=True)
    started = time.perf_counter()
    answer = Answer(limit=limit)
    plan = calibration_plan(smallest, limit)
    for i, (n_ctx, prompt) in enumerate(plan):
        # Unconstrained: a budget would evict weights and hide the growth being measured. No warm-up:
        # memory needs none, and it would prefill the prompt twice.
        case = replace(case0, n_ctx=n_ctx, prompt_tokens=prompt, fill=None, gen_tokens=CALIBRATION_GEN_TOKENS,
                       repetitions=1, warmup=0, budget_bytes=None)
        err.print(f"fit: calibration {i + 1}/{len(plan)}: {prompt:,} tokens at context {n_ctx:,}")
        rows, wall = run(case)
        point = point_from(case, rows, wall)
        if not point.peak_bytes or point.fit_class in (None, "no_fit"):
            raise CalibrationFailed(f"calibration case {case.label} ended {point.fit_class or 'without a verdict'}: "
                                    f"{point.reason}")
        answer.calibration.append(point)
    model = Model.from_points(answer.calibration, CALIBRATION_GEN_TOKENS)
    answer.model = model
    console.print(
        f"  calibrated: peak = {mib(model.a)} MiB + {model.b:,.0f} B per configured token + {model.c:,.0f} B per "
        f"filled token; TTFT {model.ttft(int(case0.fill * limit)) or 0:.1f} s predicted at {limit:,}")

    contexts = grid(smallest, limit, step)
    predicted: dict[int, str | None] = {}
    for n in contexts:
        filled = int(case0.fill * n)
        depth = filled + case0.gen_tokens / 2
        v = predicted_verdict(model.peak(n, filled), model.ttft(filled), model.decode(depth), budget_bytes,
                              case0.thresholds)
        predicted[n] = v.fit_class
        answer.predicted[n] = (v.fit_class, model.peak(n, filled), v.fit_reason)
    classes = CONFIRM[confirm_what]
    clock = Clock(model, case0.fill, case0.gen_tokens, case0.warmup, case0.repetitions)
    planned = expected_runs(predicted, classes)
    done: list[int] = []

    def full(n: int) -> Point:
        todo = [m for m in planned if m not in done and m != n]
        err.print(f"fit: full run {len(done) + 1} (of {len(done) + 1 + len(todo)} planned) at context {n:,}, "
                  f"predicted {predicted[n]}; about {clock.left([n, *todo])} left "
                  f"({duration(time.perf_counter() - started)} so far)")
        case = replace(case0, n_ctx=n, prompt_tokens=int(case0.fill * n), fill=case0.fill)
        rows, wall = run(case)
        done.append(n)
        point = point_from(case, rows, wall)
        _, peak, _ = answer.predicted[n]
        console.print(Markup(f"  ctx {n:>6,}: {fit_markup(point.fit_class)} - {escape(point.reason)} "
                             f"[dim](predicted {escape(str(predicted[n]))}, peak {mib(peak)} MiB; "
                             f"measured {mib(point.peak_bytes)} MiB)[/]"))
        return point

    confirm(predicted, full, answer, classes)
    return answer


class CalibrationFailed(Exception):
    """A calibration case did not run: the prediction has nothing to stand on (the caller falls back)."""


def answer_lines(answer: Answer) -> list[str]:
    """The answer table: per class the largest context, how it is known, predicted vs measured peak."""
    lines = [f"{'class':<6} {'largest ctx':>11}  {'how':<10} {'predicted peak':>15} {'measured peak':>14} "
             f"{'decode':>12} {'TTFT':>8}"]
    for b in answer.boundaries:
        if b.n_ctx is None or not b.occurs:
            lines.append(f"{b.cls:<6} {'-':>11}  {'-':<10} {'':>15} {'':>14} {'':>12} {'':>8}  "
                         + ("none in range" if b.n_ctx is None else f"never {b.cls} (better up to {b.n_ctx:,})"))
            continue
        pred = answer.predicted.get(b.n_ctx)
        point = answer.points.get(b.n_ctx)
        measured = f"{mib(point.peak_bytes)} MiB" if point else ""
        decode = f"{point.decode_tok_s:.1f} tok/s" if point and point.decode_tok_s else ""
        ttft = f"{point.ttft_s:.2f} s" if point and point.ttft_s else ""
        moved = "" if b.predicted == b.n_ctx else f"  (predicted {b.predicted:,})" if b.predicted else "  (predicted none)"
        lines.append(f"{b.cls:<6} {b.n_ctx:>11,}  {b.how:<10} {(mib(pred[1]) + ' MiB') if pred else '':>15} "
                     f"{measured:>14} {decode:>12} {ttft:>8}{moved}")
    return lines
