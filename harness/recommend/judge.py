"""Each candidate judged at the asked context: its figures with their source, the checks, the pick.

Figures come from the candidate's observations on the machine class asked about, preferring
``measured`` rows to ``catalog`` entries to ``community`` fits. An observation at exactly the
asked context decides everything it measured. Otherwise memory and speed are monotone in the
context: a pass measured at a *larger* context holds at the asked one, and a miss measured at a
*smaller* one holds too; anything else stays undecided. Undecided memory is predicted by
``harness.estimate`` (and marked so); a prediction never makes a pick, it orders ``--measure``.
Quality against a reference does not depend on the context: any observation of the candidate gives it.

The checks themselves are ``harness.fit.constraint_checks``: this module only gathers figures.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from harness.fit import Check, constraint_checks
from harness.recommend.candidates import Candidate, Observation
from harness.recommend.constraints import Constraints

ORIGIN_RANK = {"measured": 0, "catalog": 1, "community": 2}
FIGURES = ("peak_bytes", "decode_tok_s", "ttft_s")
CHECK_FIGURE = {"memory": "peak_bytes", "decode": "decode_tok_s", "ttft": "ttft_s"}
QUALITY_KEYS = ("quality_kl_mean", "quality_ppl_ratio", "task_pass_rate")


@dataclass
class Figure:
    value: float | None
    origin: str  # measured | catalog | community | predicted
    where: str


@dataclass
class Assessment:
    candidate: Candidate
    machine_class: str
    budget_bytes: int
    figures: dict[str, Figure] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    verdict: str = "unknown"  # pass | fail | unknown
    predicted_fail: bool = False  # the only miss is a prediction
    front: bool = False
    samples: int = 0
    machines: int | None = None

    def value(self, name: str) -> float | None:
        fig = self.figures.get(name)
        return fig.value if fig else None

    @property
    def quality_score(self) -> float | None:
        """One quality number from 0 to 1 (1 = as good as the reference): the task pass rate where
        measured, else exp(-KL), else reference perplexity / perplexity."""
        rate, kl, ratio = (self.value(k) for k in ("task_pass_rate", "quality_kl_mean", "quality_ppl_ratio"))
        if rate is not None:
            return rate
        if kl is not None:
            return math.exp(-kl)
        if ratio:
            return 1 / ratio
        return None

    @property
    def per_gib(self) -> float | None:
        """Intelligence per GB: the quality score per GiB of peak memory."""
        q, peak = self.quality_score, self.value("peak_bytes")
        return q / (peak / 2**30) if q is not None and peak else None

    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.passed is False]

    def miss_size(self) -> tuple[int, float]:
        """Constraints not shown to pass (missed or undecided), then how far the misses are, each capped
        at one constraint's worth (a TTFT 5x over the limit is not five misses)."""
        fails = self.failed()
        undecided = [c for c in self.checks if c.passed is None]
        return len(fails) + len(undecided), sum(min(c.shortfall, 1.0) for c in fails)


def class_budget(c: Constraints, machine_class: str, this_class: str, observations: list[Observation]) -> int:
    """The budget for a machine class: --budget if given; this machine: its available memory; another
    class: the RAM its rows report, else the size in its name (cpu-x86_64-24GiB)."""
    if c.budget_origin == "--budget" or machine_class == this_class:
        return c.budget_bytes
    ram = next((o.ram_bytes for o in observations if o.machine_class == machine_class and o.ram_bytes), None)
    if ram:
        return int(ram)
    match = re.search(r"(\d+)GiB$", machine_class)
    return int(match.group(1)) << 30 if match else c.budget_bytes


def assess(cand: Candidate, c: Constraints, machine_class: str, budget_bytes: int,
           predict=None) -> Assessment:
    """``predict(candidate, n_ctx) -> (peak_bytes, how)`` supplies a predicted peak (harness.estimate)."""
    a = Assessment(cand, machine_class, budget_bytes)
    obs = sorted((o for o in cand.observations if o.machine_class == machine_class and o.users == c.users),
                 key=lambda o: (ORIGIN_RANK[o.origin], o.n_ctx))
    exact = [o for o in obs if o.n_ctx == c.context]
    larger = [o for o in obs if o.n_ctx > c.context]
    smaller = [o for o in obs if o.n_ctx < c.context]
    quality = _quality(cand, machine_class)
    fig_quality = {k: v.value for k, v in quality.items()}

    if exact:
        o = exact[0]
        checks = _checks(o, fig_quality, cand, c, budget_bytes)
        for name in FIGURES:
            a.figures[name] = Figure(getattr(o, name), o.origin, _at(o))
        used = [o]
    else:
        # a pass at a larger context holds here; a miss at a smaller one does too
        up = min(larger, key=lambda o: (ORIGIN_RANK[o.origin], o.n_ctx), default=None)
        down = max(smaller, key=lambda o: (-ORIGIN_RANK[o.origin], o.n_ctx), default=None)
        up_checks = {k.name: k for k in _checks(up, fig_quality, cand, c, budget_bytes)} if up else {}
        down_checks = {k.name: k for k in _checks(down, fig_quality, cand, c, budget_bytes)} if down else {}
        base = _checks(None, fig_quality, cand, c, budget_bytes)
        checks, used = [], []
        for check in base:
            chosen, source = check, None
            if up_checks.get(check.name) and up_checks[check.name].passed:
                chosen, source = up_checks[check.name], up
            elif down_checks.get(check.name) and down_checks[check.name].passed is False:
                chosen, source = down_checks[check.name], down
            checks.append(chosen)
            figure = CHECK_FIGURE.get(check.name)
            if figure and source is not None:
                bound = "upper bound" if source is up else "lower bound"
                if figure == "decode_tok_s":
                    bound = "lower bound" if source is up else "upper bound"
                a.figures[figure] = Figure(getattr(source, figure), source.origin, f"{_at(source)}, {bound}")
                used.append(source)
    for key, fig in quality.items():
        a.figures[key] = fig
    checks = _predict_memory(a, checks, cand, c, budget_bytes, predict)
    a.checks = checks
    verdict = "fail" if any(k.passed is False for k in checks) else (
        "pass" if all(k.passed for k in checks) else "unknown")
    fails = [k for k in checks if k.passed is False]
    peak_fig = a.figures.get("peak_bytes")
    a.predicted_fail = (bool(fails) and all(k.name == "memory" for k in fails)
                        and peak_fig is not None and peak_fig.origin == "predicted")
    if verdict == "pass" and any(f.origin == "predicted" for f in a.figures.values()):
        verdict = "unknown"
    a.verdict = verdict
    used = list({id(o): o for o in used}.values())
    a.samples = sum(o.samples for o in used)
    machines = [o.machines for o in used if o.machines is not None]
    a.machines = max(machines) if machines else None
    return a


def _at(o: Observation) -> str:
    return f"{o.where} @ctx {o.n_ctx:,}"


def _checks(o: Observation | None, quality: dict, cand: Candidate, c: Constraints, budget: int) -> list[Check]:
    fig = dict(quality)
    fig["context_length"] = cand.context_length
    if o is not None:
        fig.update(peak_bytes=o.peak_bytes, decode_tok_s=o.decode_tok_s, ttft_s=o.ttft_s, fit_class=o.fit_class,
                   fit_reason=o.fit_reason)
    return constraint_checks(fig, budget, c.thresholds, c.context)


def _predict_memory(a: Assessment, checks: list[Check], cand: Candidate, c: Constraints, budget: int,
                    predict) -> list[Check]:
    memory = next(k for k in checks if k.name == "memory")
    if memory.passed is not None or predict is None:
        return checks
    predicted = predict(cand, c.context)
    if predicted is None:
        return checks
    peak, how = predicted
    judged = next(k for k in constraint_checks({"peak_bytes": peak}, budget, c.thresholds, c.context)
                  if k.name == "memory")
    a.figures["peak_bytes"] = Figure(peak, "predicted", how)
    replaced = Check("memory", judged.passed, f"predicted: {judged.text}", judged.shortfall)
    return [replaced if k.name == "memory" else k for k in checks]


def _quality(cand: Candidate, machine_class: str) -> dict[str, Figure]:
    """Quality against the reference, from any observation (this machine class's first)."""
    out: dict[str, Figure] = {}
    obs = sorted(cand.observations, key=lambda o: (o.machine_class != machine_class, ORIGIN_RANK[o.origin]))
    for key in QUALITY_KEYS:
        o = next((o for o in obs if o.quality.get(key) is not None), None)
        if o is not None:
            out[key] = Figure(o.quality[key], o.origin, o.where)
    return out


# --- the pick, the closest miss, the front --------------------------------------------------------

# Decode rates this close to the fastest are a tie: one short measured case varies about this much
# between runs (Q4_1 at 93.1 tok/s in one run, 79.7 in the next; Q8_0 82.8 and 83.8), and no user
# feels the difference. Among the tied, quality decides, then memory.
SPEED_TIE = 0.10


def pick(assessments: list[Assessment]) -> Assessment | None:
    """Among the candidates that meet every constraint on measured figures, those within ``SPEED_TIE``
    of the fastest decode rate; of them the best quality, then the least memory, then the fastest."""
    passing = [a for a in assessments if a.verdict == "pass"]
    if not passing:
        return None
    fastest = max(a.value("decode_tok_s") or 0.0 for a in passing)
    near = [a for a in passing if (a.value("decode_tok_s") or 0.0) >= fastest * (1 - SPEED_TIE)]
    return max(near, key=lambda a: (a.quality_score or 0.0, -(a.value("peak_bytes") or 0.0),
                                    a.value("decode_tok_s") or 0.0))


def closest(assessments: list[Assessment]) -> Assessment | None:
    """When nothing passes: the candidate that misses (or leaves undecided) the fewest constraints, by the least."""
    missing = [a for a in assessments if a.verdict == "fail"]
    return min(missing, key=lambda a: (a.predicted_fail, *a.miss_size(), a.candidate.label), default=None)


def mark_front(assessments: list[Assessment]) -> None:
    """Pareto front of quality (up), decode speed (up) and peak memory (down), over candidates whose
    speed and memory were measured; quality counts where both candidates have it."""
    pool = [a for a in assessments if a.value("decode_tok_s") is not None and a.value("peak_bytes") is not None
            and a.figures["peak_bytes"].origin != "predicted"]
    for a in assessments:
        a.front = False
    for a in pool:
        a.front = not any(_dominates(b, a) for b in pool if b is not a)


def _dominates(b: Assessment, a: Assessment) -> bool:
    pairs = [(b.value("decode_tok_s"), a.value("decode_tok_s")), (-b.value("peak_bytes"), -a.value("peak_bytes"))]
    qa, qb = a.quality_score, b.quality_score
    if qa is not None:
        if qb is None:
            return False  # b cannot be shown to be as good
        pairs.append((qb, qa))
    return all(x >= y for x, y in pairs) and any(x > y for x, y in pairs)


def predictor(fill: float):
    """Peak predictions from ``harness.estimate`` (weights + KV + compute buffers + runtime overhead)."""
    from harness.artifact import ArtifactError, inspect_artifact
    from harness.estimate import EstimateError, estimate

    def predict(cand: Candidate, n_ctx: int) -> tuple[int, str] | None:
        info = cand.info
        if info is None and cand.path is not None:
            try:
                info = cand.info = inspect_artifact(cand.path)
            except ArtifactError:
                return None
        if info is None:
            return None
        try:
            e = estimate(info, n_ctx, cand.runtime, fill=fill, options=cand.options)
        except (EstimateError, KeyError, ValueError):
            return None
        mib = 2**20
        return e.total_bytes, (f"harness.estimate at ctx {n_ctx:,} filled {fill:.0%}: weights {e.weights_bytes / mib:,.0f}"
                               f" + KV {e.kv_bytes / mib:,.0f} + compute {e.compute_bytes / mib:,.0f}"
                               f" + runtime {e.overhead_bytes / mib:,.0f} MiB")

    return predict
