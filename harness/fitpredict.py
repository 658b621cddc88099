"""Max fit context by prediction, confirmed by full runs only at the boundaries.

``fitbench fit`` used to run a full generation at every probed context. Memory is far
cheaper to predict, but not from a bare load: llama.cpp allocates its KV cache at load
and its pages become resident only as they are written (the sample model's 8192 case
climbs from 370 to 476 MiB during its prefill), and without flash attention the score
buffer grows with the filled context too. So three short calibration cases measure how
the peak grows:

    peak(n_ctx, filled) = a + b * n_ctx + c * filled

two fills at one context give ``c`` (bytes per filled token: KV written plus scores),
a second context at the same fill gives ``b`` (bytes per configured token: what a
runtime touches at load, e.g. a torch StaticCache; about 0 for llama.cpp). The same
cases time the prefill (TTFT = k1 * filled + k2 * filled^2) and the decode step at
their depths (seconds per token = u + v * depth).

Every context of the grid then gets a predicted verdict (``fit.predicted_verdict``,
the same rules as a measured row). For each class the answer names (fits, tight,
slow, spill) the largest context with that class or better is known by prediction;
the confirmed ones (by default the max fit context; ``--confirm all`` for every
class) by full runs: at the predicted boundary and its grid neighbour above; when a
full run disagrees, the search gallops from there and bisects on full runs, so a
wrong prediction costs runs, never a wrong answer. Speed at depth is measured only
in these full runs, near the boundaries the answer prints.

The search assumes fit only worsens with context (as ``fitsearch`` does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from harness.fit import rank
from harness.fitsearch import max_fit_headline

ANSWER_CLASSES = ("fits", "tight", "slow", "spill")
CONFIRM = {"max-fit": ("fits",), "all": ANSWER_CLASSES, "none": ()}  # --confirm: classes whose boundary full runs confirm
CALIBRATION_CTX = 2048  # big enough that fills pass llama.cpp's 512-token micro-batch: growth is linear there


@dataclass(frozen=True)
class Point:
    """One measured case: its context, filled tokens, judged peak and timings."""

    n_ctx: int
    filled: int
    peak_bytes: float
    ttft_s: float | None = None
    decode_tok_s: float | None = None
    wall_s: float = 0.0
    fit_class: str | None = None
    reason: str = ""


@dataclass(frozen=True)
class Model:
    """Peak bytes and timings as functions of the configured and filled context."""

    a: float
    b: float  # bytes per configured token
    c: float  # bytes per filled token
    k1: float = 0.0  # prefill seconds per token
    k2: float = 0.0  # prefill seconds per token squared (attention over what is already there)
    u: float = 0.0  # decode seconds per token at depth 0
    v: float = 0.0  # decode seconds per token per token of depth
    overhead_s: float = 0.0  # a case's wall time besides prefill and decode (spawn, load, warm-up)

    def peak(self, n_ctx: int, filled: int) -> float:
        return self.a + self.b * n_ctx + self.c * filled

    def ttft(self, filled: int) -> float | None:
        return self.k1 * filled + self.k2 * filled * filled if self.k1 or self.k2 else None

    def decode(self, depth: float) -> float | None:
        step = self.u + self.v * depth
        return 1.0 / step if step > 0 else None

    def wall(self, filled: int, gen_tokens: int, warmup: int = 1) -> float:
        """Seconds a full case at this fill takes: each warm-up prefills too."""
        ttft = self.ttft(filled) or 0.0
        decode = self.decode(filled + gen_tokens / 2)
        return self.overhead_s + (1 + warmup) * ttft + (gen_tokens / decode if decode else 0.0)

    @classmethod
    def from_points(cls, points: list[Point], gen_tokens: int) -> Model:
        """Two fills at one context and one fill at another context (``calibration_plan``), each run
        without a warm-up."""
        same_ctx = sorted((p for p in points if p.n_ctx == points[0].n_ctx), key=lambda p: p.filled)
        lo, hi = same_ctx[0], same_ctx[-1]
        c = max(0.0, (hi.peak_bytes - lo.peak_bytes) / (hi.filled - lo.filled)) if hi.filled > lo.filled else 0.0
        other = next((p for p in points if p.n_ctx != lo.n_ctx), None)
        b = 0.0
        if other is not None:
            # the other context's peak with the fill difference taken out: what the context size adds
            b = max(0.0, (other.peak_bytes - c * (other.filled - lo.filled) - lo.peak_bytes) / (other.n_ctx - lo.n_ctx))
        a = lo.peak_bytes - b * lo.n_ctx - c * lo.filled
        k1, k2 = _through_origin_quadratic([(p.filled, p.ttft_s) for p in points if p.ttft_s])
        u, v = _line([(p.filled + gen_tokens / 2, 1.0 / p.decode_tok_s) for p in points if p.decode_tok_s])
        model = cls(a, b, c, k1, k2, u, v)
        spent = [p.wall_s - (model.wall(p.filled, gen_tokens, warmup=0) - model.overhead_s) for p in points if p.wall_s]
        return cls(a, b, c, k1, k2, u, v, max(0.0, sum(spent) / len(spent)) if spent else 0.0)


def _through_origin_quadratic(xy: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares t = k1 x + k2 x^2 (no constant: nothing to prefill takes no time); k2 >= 0."""
    if not xy:
        return 0.0, 0.0
    s11 = sum(x * x for x, _ in xy)
    s12 = sum(x ** 3 for x, _ in xy)
    s22 = sum(x ** 4 for x, _ in xy)
    r1 = sum(x * y for x, y in xy)
    r2 = sum(x * x * y for x, y in xy)
    det = s11 * s22 - s12 * s12
    if len(xy) >= 2 and det > 0:
        k1, k2 = (r1 * s22 - r2 * s12) / det, (s11 * r2 - s12 * r1) / det
        if k2 >= 0 and k1 >= 0:
            return k1, k2
    return r1 / s11, 0.0  # linear only


def _line(xy: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares y = u + v x with v >= 0 (a deeper cache never makes a step cheaper)."""
    if not xy:
        return 0.0, 0.0
    n = len(xy)
    mx, my = sum(x for x, _ in xy) / n, sum(y for _, y in xy) / n
    sxx = sum((x - mx) ** 2 for x, _ in xy)
    v = max(0.0, sum((x - mx) * (y - my) for x, y in xy) / sxx) if sxx else 0.0
    return my - v * mx, v


def calibration_plan(min_ctx: int, limit: int) -> list[tuple[int, int]]:
    """(n_ctx, prompt tokens) of the three calibration cases: fills of 1/4 and 3/4 at one context,
    1/4 of it again at half that context. Short prompts: the cost is three loads, not three fills."""
    c1 = max(min(CALIBRATION_CTX, limit), min(min_ctx, limit))
    c2 = c1 // 2 if c1 // 2 >= 64 else min(c1 * 2, limit)
    low, high = max(1, c1 // 4), max(2, c1 * 3 // 4)
    plan = [(c1, low), (c1, high)]
    if c2 != c1:
        plan.append((c2, min(low, c2 - 1)))
    return plan


def grid(min_ctx: int, limit: int, step: int) -> list[int]:
    """The contexts predicted: ``min_ctx``, then multiples of ``step`` above it, then ``limit``."""
    start = min(min_ctx, limit)
    out = [start] + list(range((start // step + 1) * step, limit, step))
    if limit not in out:
        out.append(limit)
    return out


@dataclass
class Boundary:
    """The largest context whose class is ``cls`` or better, and how it is known."""

    cls: str
    n_ctx: int | None  # None: no context in range is this good
    predicted: int | None  # where the prediction put it
    how: str  # "full run" | "prediction"
    occurs: bool  # some context really has this class (not only better ones)


@dataclass
class Answer:
    points: dict[int, Point] = field(default_factory=dict)  # full runs by context
    predicted: dict[int, tuple[str | None, float, str]] = field(default_factory=dict)  # n -> (class, peak, reason)
    boundaries: list[Boundary] = field(default_factory=list)
    calibration: list[Point] = field(default_factory=list)
    model: Model | None = None
    limit: int = 0

    @property
    def max_fit(self) -> int | None:
        fits = next((b for b in self.boundaries if b.cls == "fits"), None)
        return fits.n_ctx if fits and fits.occurs else None

    def summary(self) -> str:
        head = max_fit_headline(self.max_fit, self.limit)
        rest = [f"{b.cls} up to {b.n_ctx:,}" for b in self.boundaries if b.cls != "fits" and b.occurs and b.n_ctx]
        return head + (f" ({'; '.join(rest)})" if rest else "")


def predicted_boundaries(predicted: dict[int, str | None]) -> dict[str, int | None]:
    """For each answer class, the largest grid context predicted to have that class or better."""
    contexts = sorted(predicted)
    out: dict[str, int | None] = {}
    for cls in ANSWER_CLASSES:
        ok = [n for n in contexts if rank(predicted[n]) <= rank(cls)]
        out[cls] = ok[-1] if ok else None
    return out


def expected_runs(predicted: dict[int, str | None], classes: tuple[str, ...] = ANSWER_CLASSES) -> list[int]:
    """The full runs a right prediction needs: each confirmed boundary and its grid neighbour above
    (the smallest context when nothing is predicted good)."""
    contexts = sorted(predicted)
    runs: set[int] = set()
    for cls, guess in predicted_boundaries(predicted).items():
        if cls not in classes:
            continue
        if guess is None:
            runs.add(contexts[0])
        else:
            i = contexts.index(guess)
            runs.update(contexts[i:i + 2])
    return sorted(runs)


def confirm(predicted: dict[int, str | None], full: Callable[[int], Point], answer: Answer,
            classes: tuple[str, ...] = ANSWER_CLASSES) -> None:
    """Fill ``answer.boundaries``: for each answer class in ``classes``, the largest grid context measured
    with that class or better, found by full runs started at the predicted boundary. The other classes
    keep their predicted boundary (never below a better class's confirmed one), and say so, unless a
    full run already measured that context."""
    contexts = sorted(predicted)

    def measured(n: int) -> str | None:
        if n not in answer.points:
            answer.points[n] = full(n)
        return answer.points[n].fit_class

    floor: int | None = None  # the largest context a better class reaches
    for cls, guess in predicted_boundaries(predicted).items():
        if cls in classes:
            idx = _largest_good(contexts, contexts.index(guess) if guess is not None else -1,
                                lambda i, cls=cls: rank(measured(contexts[i])) <= rank(cls))
            n = contexts[idx] if idx >= 0 else None
            answer.boundaries.append(Boundary(cls, n, guess, "full run", n is not None and measured(n) == cls))
        else:
            n = guess if floor is None or (guess is not None and guess > floor) else floor
            point = answer.points.get(n) if n is not None else None
            seen = point.fit_class if point is not None else predicted.get(n) if n is not None else None
            answer.boundaries.append(Boundary(cls, n, guess, "full run" if point is not None else "prediction",
                                              n is not None and seen == cls))
        if n is not None:
            floor = n if floor is None else max(floor, n)


def _largest_good(contexts: list[int], start: int, good: Callable[[int], bool]) -> int:
    """The largest index i with good(i), for a predicate true up to some index and false after,
    starting from the guess ``start`` (-1: nothing predicted good). Checks the guess and its
    neighbour; when either disagrees, gallops away from the guess and bisects."""
    last = len(contexts) - 1
    if start < 0:
        if not good(0):
            return -1
        lo, hi = 0, None
    elif good(start):
        lo, hi = start, None
    else:
        lo, hi = None, start
    if hi is None:  # gallop up from a good index until one fails
        jump = 1
        while hi is None:
            nxt = min(lo + jump, last)
            if nxt == lo:
                return lo
            if good(nxt):
                lo, jump = nxt, jump * 2
            else:
                hi = nxt
    if lo is None:  # gallop down from a bad index until one holds
        jump = 1
        while lo is None:
            nxt = max(hi - jump, 0)
            if good(nxt):
                lo = nxt
            elif nxt == 0:
                return -1
            else:
                hi, jump = nxt, jump * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if good(mid):
            lo = mid
        else:
            hi = mid
    return lo
