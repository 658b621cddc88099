"""The user's constraints in their own words (8GiB, 5s, 500ms, 15 tok/s), parsed and checked.

Every mistake is a ``RecommendError``: one line naming the option and what to write
instead, exit 2. Speed and latency targets left out take the fit thresholds' defaults
(``fitbench thresholds``), so a recommendation never calls a crawling model a fit.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import FitbenchError
from harness.fit import Thresholds, parse_size

RUNTIME_NAMES = {"any": None, "llama.cpp": "llama.cpp", "llama": "llama.cpp", "torch": "torch",
                 "onnx": "onnxruntime", "onnxruntime": "onnxruntime", "mlx": "mlx"}
TIME_UNITS = {"": 1.0, "s": 1.0, "sec": 1.0, "ms": 1e-3}
# Applied when a quality reference is known and no target was given (quality-aware by default):
# the targets scenarios/quality.yaml uses for the sample's quants.
DEFAULT_MAX_KL = 0.1
DEFAULT_MAX_PPL_RATIO = 1.10
MAX_CONTEXT = 1 << 24


class RecommendError(FitbenchError, ValueError):
    """A constraint or candidate set that cannot be answered; the message says what to change."""


@dataclass(frozen=True)
class Constraints:
    budget_bytes: int
    budget_origin: str  # "--budget" | "available memory" | "machine RAM"
    context: int
    thresholds: Thresholds
    users: int = 1
    runtime: str | None = None  # a runner name; None = any
    machine_class: str = "this"  # this | CLASS | all
    fill: float = 0.5
    quality_default: bool = False  # the quality targets are the defaults for a known reference
    tasks: Path | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def quality_targets(self) -> dict[str, float]:
        t = self.thresholds
        return {k: v for k, v in (("max_kl", t.max_kl), ("max_ppl_ratio", t.max_ppl_ratio),
                                  ("min_pass_rate", t.min_pass_rate)) if v is not None}

    def describe(self) -> str:
        t = self.thresholds
        parts = [f"budget {self.budget_bytes / 2**20:,.0f} MiB ({self.budget_origin})", f"context {self.context:,}",
                 f"decode >= {t.min_decode_tok_s:g} tok/s", f"TTFT <= {t.max_ttft_s:g} s"]
        quality = []
        if t.max_kl is not None:
            quality.append(f"KL <= {t.max_kl:g}")
        if t.max_ppl_ratio is not None:
            quality.append(f"perplexity <= {t.max_ppl_ratio:g}x the reference")
        if t.min_pass_rate is not None:
            quality.append(f"task pass rate >= {t.min_pass_rate:.0%}")
        if quality:
            parts.append(", ".join(quality) + (" (default for a known reference)" if self.quality_default else ""))
        if self.users != 1:
            parts.append(f"{self.users} users at once")
        if self.runtime:
            parts.append(f"runtime {self.runtime}")
        return ", ".join(parts)


def parse_budget(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise RecommendError(f"--budget {text}: {exc}") from None


def parse_seconds(option: str, text: str) -> float:
    """'5s', '500ms', '2.5' (seconds) -> seconds; anything else is an error naming the units."""
    match = re.fullmatch(r"\s*(-?[0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in TIME_UNITS:
        raise RecommendError(f"{option} {text}: cannot read it as a time; write it like 5s or 500ms")
    value = float(match.group(1)) * TIME_UNITS[match.group(2).lower()]
    if value <= 0:
        raise RecommendError(f"{option} {text}: a time limit must be above 0, e.g. 5s")
    return value


def parse_rate(option: str, text: str) -> float:
    """'15', '15tok/s', '15 tok/s' -> tokens per second, above 0."""
    match = re.fullmatch(r"\s*(-?[0-9]*\.?[0-9]+)\s*(tok/s|t/s|tokens/s)?\s*", str(text))
    if not match:
        raise RecommendError(f"{option} {text}: cannot read it as a speed; write it like 15 or 15tok/s")
    value = float(match.group(1))
    if value <= 0 or not math.isfinite(value):
        raise RecommendError(f"{option} {text}: a speed must be above 0 tokens per second, e.g. 15")
    return value


def parse_positive(option: str, text: str, upper: float | None = None, what: str = "a number") -> float:
    try:
        value = float(text)
    except ValueError:
        raise RecommendError(f"{option} {text}: not a number; write {what}") from None
    if not math.isfinite(value) or value < 0 or (upper is not None and value > upper):
        span = f"from 0 to {upper:g}" if upper is not None else "0 or more"
        raise RecommendError(f"{option} {text}: must be {span}; write {what}")
    return value


def parse_runtime(text: str) -> str | None:
    if text not in RUNTIME_NAMES:
        raise RecommendError(f"--runtime {text}: unknown runtime; use one of any, llama.cpp, torch, onnx, mlx")
    return RUNTIME_NAMES[text]


def parse_context(value: int) -> int:
    if value < 16 or value > MAX_CONTEXT:
        raise RecommendError(f"--context {value}: a context is {16:,} to {MAX_CONTEXT:,} tokens, e.g. 8192")
    return value


def build(*, budget: str | None, available_bytes: int, context: int, min_tok_s: str | None, max_ttft: str | None,
          max_kl: str | None, max_ppl_ratio: str | None, min_pass_rate: str | None, tasks: Path | None,
          users: int, runtime: str, machine_class: str, fill: float) -> Constraints:
    """The constraints from the command line's text. Quality defaults are added later
    (``with_quality_default``), once it is known whether a reference exists."""
    if users < 1:
        raise RecommendError(f"--users {users}: at least 1 user")
    if not 0 < fill <= 0.95:
        raise RecommendError(f"--fill {fill}: a fraction of the context above 0 and at most 0.95")
    if min_pass_rate is not None and tasks is None:
        raise RecommendError("--min-pass-rate needs --tasks FILE (the task checks the rate is measured on)")
    overrides: dict = {}
    if min_tok_s is not None:
        overrides["min_decode_tok_s"] = parse_rate("--min-tok-s", min_tok_s)
    if max_ttft is not None:
        overrides["max_ttft_s"] = parse_seconds("--max-ttft", max_ttft)
    if max_kl is not None:
        overrides["max_kl"] = parse_positive("--max-kl", max_kl, what="nats per token, e.g. 0.05")
    if max_ppl_ratio is not None:
        ratio = parse_positive("--max-ppl-ratio", max_ppl_ratio, what="a ratio of at least 1, e.g. 1.05")
        if ratio < 1:
            raise RecommendError(f"--max-ppl-ratio {max_ppl_ratio}: a ratio to the reference is at least 1, e.g. 1.05")
        overrides["max_ppl_ratio"] = ratio
    if min_pass_rate is not None:
        overrides["min_pass_rate"] = parse_positive("--min-pass-rate", min_pass_rate, 1, "a fraction, e.g. 0.8")
    if tasks is not None and not tasks.is_file():
        raise RecommendError(f"--tasks {tasks}: file not found; give a JSONL file of task checks")
    if budget is not None:
        budget_bytes, origin = parse_budget(budget), "--budget"
    else:
        budget_bytes, origin = available_bytes, "this machine's available memory"
    return Constraints(budget_bytes=budget_bytes, budget_origin=origin, context=parse_context(context),
                       thresholds=Thresholds().merged(overrides), users=users, runtime=parse_runtime(runtime),
                       machine_class=machine_class, fill=fill, tasks=tasks)


def with_quality_default(c: Constraints, reference_known: bool) -> Constraints:
    """Quality-aware by default: a known reference with no target given gets the default targets."""
    if not reference_known or c.quality_targets:
        return c
    from dataclasses import replace

    t = c.thresholds.merged({"max_kl": DEFAULT_MAX_KL, "max_ppl_ratio": DEFAULT_MAX_PPL_RATIO})
    return replace(c, thresholds=t, quality_default=True)
