"""Max fit context: the largest configured context that still ``fits``.

Doubling from a small context finds the first context that does not fit;
bisection (on a grid of ``step`` tokens) then narrows the boundary. Doubling
continues past it, up to the trained maximum, to show where the artifact
turns tight, slow, spill and no_fit. Every probe is an ordinary case (own
process, sampler, budget), and its rows are written like any run's.

The search assumes fit only worsens with context, which holds for memory
and speed: a longer filled context never needs less KV cache or less
attention work.

A workflow can be the probe (``fitbench fit --workflow chat:10``): at each
probed context the session keeps its shape (turns, reply and question
lengths) and its messages (chat) or document grow to fill the context, so
the answer reads "the largest context at which a 10-turn chat still fits
in every turn".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from harness.fit import ORDER
from harness.workflow import Workflow


@dataclass
class SearchResult:
    probes: dict[int, str | None] = field(default_factory=dict)  # n_ctx -> fit class
    reasons: dict[int, str] = field(default_factory=dict)
    max_fit: int | None = None
    limit: int = 0

    def first_at(self) -> dict[str, int]:
        """For each class worse than 'fits', the smallest probed context with that class or worse."""
        out: dict[str, int] = {}
        for n_ctx in sorted(self.probes):
            cls = self.probes[n_ctx]
            if cls is None or cls == "fits":
                continue
            for c in ORDER[1:ORDER.index(cls) + 1]:
                out.setdefault(c, n_ctx)
        return out

    def summary(self) -> str:
        head = max_fit_headline(self.max_fit, self.limit)
        turns = [f"{cls} from {n:,}" for cls, n in self.first_at().items() if cls in self.probes.values()]
        return head + (f" ({'; '.join(turns)})" if turns else "")


def workflow_at(wf: Workflow, n_ctx: int, fill: float) -> Workflow:
    """The probe session for context ``n_ctx``: ``wf``'s shape filling ``fill`` of it."""
    scaled = wf.scaled_to(int(fill * n_ctx))
    if scaled.session_tokens > n_ctx:
        raise ValueError(f"context {n_ctx:,} cannot hold a {wf.kind} session of {wf.turns} turns with "
                         f"{wf.reply_tokens}-token replies; raise --min-context or use fewer turns")
    return scaled


def snap(n: int, step: int) -> int:
    return max(step, int(round(n / step)) * step)


def search(probe: Callable[[int], tuple[str | None, str]], min_ctx: int, max_ctx: int, step: int) -> SearchResult:
    """``probe(n_ctx) -> (fit_class, reason)`` runs one case."""
    result = SearchResult(limit=max_ctx)

    def run(n: int) -> str | None:
        if n not in result.probes:
            result.probes[n], result.reasons[n] = probe(n)
        return result.probes[n]

    last_fit, first_bad = None, None
    n = min(min_ctx, max_ctx)
    while True:
        cls = run(n)
        if cls == "fits" and first_bad is None:
            last_fit = n
        elif first_bad is None:
            first_bad = n
        if cls in ("no_fit", None) or n >= max_ctx:
            break  # nothing bigger can do better
        n = min(n * 2, max_ctx)

    if first_bad is not None and last_fit is not None:
        lo, hi = last_fit, first_bad
        while hi - lo > step:
            mid = snap((lo + hi) // 2, step)
            if mid <= lo or mid >= hi:
                break
            if run(mid) == "fits":
                lo = mid
            else:
                hi = mid
        last_fit = lo
    result.max_fit = last_fit
    return result


def max_fit_headline(max_fit: int | None, limit: int) -> str:
    """The first words of a fit answer, the same for a search and a prediction."""
    if max_fit is None:
        return "does not fit at any probed context"
    if max_fit >= limit:
        return f"fits up to its trained maximum of {limit:,} tokens"
    return f"max fit context {max_fit:,} tokens"
