"""Measurements + thresholds -> fit class, with its components and the reason in words.

Components are judged separately, then the worst applicable class wins:

    no_fit > spill > offload > slow > degraded > tight > fits

- memory: peak RSS against the budget (the --budget, else the machine's RAM):
  ``resident`` with headroom, ``tight`` inside the headroom margin,
  ``over_budget`` above it (only possible when the budget was not enforced).
- spill: the worker read its own weights back from storage during a
  repetition (``read_bytes`` >= ``spill_read_fraction`` x artifact size), or
  the system swapped. Measured on this kind of box, a model that fits reads
  0 bytes while decoding; one squeezed by a cgroup reads about the whole
  model per token. TTFT alone misses this; bytes read do not.
- speed: decode tok/s below ``min_decode_tok_s`` or TTFT above ``max_ttft_s``.
- offload: fewer layers on the accelerator than the model has, when the
  runtime put any there (llama.cpp ``n_gpu_layers``); or weight bytes in
  host memory next to weight bytes on the accelerator (a torch/accelerate
  ``device_map`` that spilled layers to the CPU: ``offload_host_bytes``).
- quality: with a quality probe and targets (``max_kl``, ``max_ppl_ratio``,
  ``min_pass_rate``), a case that misses one is ``degraded``: it fits and
  may be fast, but its answers are worse than the user accepts. It ranks
  above ``tight`` (a wrong answer is worse than little headroom) and below
  ``slow`` and the memory failures, which say the case does not run as
  configured at all. A target whose figure was not measured is not judged.

Failed cases: ``oom``/``killed``/``load_error`` are ``no_fit``; a case the
spill watchdog stopped is ``spill``; a timeout is ``slow`` (it ran, too
slowly) unless it was reading its weights back (``spill``); crashes, runtime
errors, interruptions, unavailable runtimes and cases skipped by the
memory guard get no verdict (null).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields

ORDER = ("fits", "tight", "degraded", "slow", "offload", "spill", "no_fit")
NO_FIT_STATUSES = {"oom", "killed", "load_error"}
NO_VERDICT_STATUSES = {"crashed", "runtime_error", "interrupted", "unavailable", "skipped", "lost"}


THRESHOLD_HELP = {
    "headroom": "tight when peak memory is above (1 - headroom) x budget",
    "min_decode_tok_s": "slow below this decode rate (about reading speed; chat wants more)",
    "max_ttft_s": "slow when the first token takes longer than this many seconds",
    "spill_read_fraction": "spill when a repetition reads this fraction of the artifact (or more) back from storage",
    "spill_read_min_bytes": "... and at least this many bytes (a runtime loading its own code is not a spill)",
    "spill_swap_bytes": "spill when the system swaps this many bytes (in + out) during a repetition",
    "watchdog_read_factor": "stop a case early (spill) once it has re-read its artifact this many times after load",
    "max_kl": "degraded when the mean KL divergence from the quality reference is above this (nats/token; off by default)",
    "max_ppl_ratio": "degraded when perplexity / the reference's perplexity is above this, e.g. 1.05 (off by default)",
    "min_pass_rate": "degraded when the task-check pass rate is below this fraction, e.g. 0.8 (off by default)",
}
QUALITY_TARGETS = ("max_kl", "max_ppl_ratio", "min_pass_rate")


@dataclass(frozen=True)
class Thresholds:
    """Documented defaults; a scenario's ``thresholds:`` or ``--threshold NAME=VALUE`` override them."""

    headroom: float = 0.10
    min_decode_tok_s: float = 10.0
    max_ttft_s: float = 10.0
    spill_read_fraction: float = 0.5
    spill_read_min_bytes: int = 16 << 20
    spill_swap_bytes: int = 64 << 20
    watchdog_read_factor: float = 64.0
    # quality targets: None = not judged
    max_kl: float | None = None
    max_ppl_ratio: float | None = None
    min_pass_rate: float | None = None

    def merged(self, overrides: dict) -> Thresholds:
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown threshold {sorted(unknown)[0]!r} (known: {', '.join(sorted(known))})")
        values = {**asdict(self), **{k: v for k, v in overrides.items() if v is not None}}
        for key, value in values.items():
            if value is None and key in QUALITY_TARGETS:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"threshold {key!r} must be a non-negative number, got {value!r}")
        if values["min_pass_rate"] is not None and values["min_pass_rate"] > 1:
            raise ValueError(f"threshold 'min_pass_rate' is a fraction from 0 to 1, got {values['min_pass_rate']}")
        if values["headroom"] >= 1:
            raise ValueError(f"threshold 'headroom' is a fraction below 1, got {values['headroom']}")
        return Thresholds(**values)


@dataclass
class Verdict:
    fit_class: str | None
    fit_reason: str
    fit_memory: str | None = None  # resident | tight | over_budget | spill | no_fit
    fit_headroom: float | None = None  # (budget - peak) / budget
    fit_speed: str | None = None  # interactive | slow
    fit_offload: bool | None = None

    def to_row(self) -> dict:
        return asdict(self)


def worst(classes: list[str | None]) -> str | None:
    present = [c for c in classes if c is not None]
    return max(present, key=ORDER.index) if present else None


def case_verdict(rows: list[dict]) -> tuple[str | None, str]:
    """A case's verdict is its worst row's, with that row's reason. A workflow's case-level
    rows (``turn`` null) already carry their worst turn's verdict and number; turn rows alone
    (a session cut short) speak with their turn number."""
    case_level = [r for r in rows if r.get("turn") is None]
    if not case_level:
        rows = [{**r, "fit_reason": f"turn {r['turn']}: {r.get('fit_reason') or ''}"} for r in rows]
    else:
        rows = case_level
    cls = worst([r.get("fit_class") for r in rows])
    reason = next((r.get("fit_reason") for r in rows if r.get("fit_class") == cls), "") or ""
    return cls, reason


def worst_turn(turn_rows: list[dict]) -> dict | None:
    """The turn row that decides a session: the first turn with the worst class."""
    cls = worst([r.get("fit_class") for r in turn_rows])
    if cls is None:
        return None
    return min((r for r in turn_rows if r.get("fit_class") == cls), key=lambda r: r["turn"])


VERDICT_COLUMNS = ("fit_class", "fit_reason", "fit_memory", "fit_headroom", "fit_speed", "fit_offload")


def judge_sessions(rows: list[dict]) -> None:
    """Workflow case-level rows take the worst turn's verdict with its number ("turn 7: TTFT 12.3 s > 10 s");
    a failed session's row says in which turn it failed (``fit_turn`` set by the suite)."""
    for row in rows:
        if row.get("workflow_kind") is None or row.get("turn") is not None:
            continue
        if row.get("status") == "ok":
            decider = worst_turn([r for r in rows if r.get("turn") is not None
                                  and r.get("repetition") == row.get("repetition")])
            if decider is None:
                continue
            row.update({k: decider.get(k) for k in VERDICT_COLUMNS})
            row["fit_turn"] = decider["turn"]
        if row.get("fit_turn") is not None and row.get("fit_class") is not None:
            row["fit_reason"] = f"turn {row['fit_turn']}: {row.get('fit_reason') or ''}"


@dataclass(frozen=True)
class MemoryVerdict:
    """Peak memory against a budget: the one memory verdict (rows, catalog, estimate, upstream)."""

    fit_memory: str | None  # resident | tight | over_budget; None when the peak is unknown
    fit_class: str  # fits | tight | spill: a peak above the budget spills (or is killed, if enforced)
    headroom: float | None  # (budget - peak) / budget
    reason: str | None


def memory_verdict(peak_bytes: int | float | None, budget_bytes: int | float | None,
                   headroom_margin: float = Thresholds.headroom) -> MemoryVerdict:
    """Judge a peak (measured, or predicted by ``estimate``) against a budget. Above the budget is
    ``spill``: the memory had to come from somewhere slower (an enforced budget kills such a case
    instead, and that row is ``no_fit`` by its status). Within ``headroom_margin`` of it is ``tight``."""
    if not peak_bytes or not budget_bytes:
        return MemoryVerdict(None, "fits", None, None)
    headroom = (budget_bytes - peak_bytes) / budget_bytes
    mib = 2**20
    if headroom < 0:
        return MemoryVerdict("over_budget", "spill", headroom,
                             f"peak {peak_bytes / mib:,.0f} MiB is above the {budget_bytes / mib:,.0f} MiB budget")
    if headroom < headroom_margin:
        return MemoryVerdict("tight", "tight", headroom,
                             f"only {headroom:.0%} of the {budget_bytes / mib:,.0f} MiB budget left "
                             f"(margin {headroom_margin:.0%})")
    return MemoryVerdict("resident", "fits", headroom, None)


PEAK_COLUMNS = ("rep_peak_rss_bytes", "load_peak_rss_bytes", "peak_rss_bytes", "vmhwm_bytes")


def judged_peak(row: dict) -> int | None:
    """The peak a row's memory verdict is judged on: never below the load-time peak (a float32
    cast at load can peak above everything that follows). A turn row is judged on its own turn
    and the load, not on the whole session's peak (later turns would otherwise taint earlier ones);
    every other row also on the case's peak and the kernel's VmHWM (which a 10 ms sampler can miss)."""
    keys = PEAK_COLUMNS[:2] if row.get("turn") is not None else PEAK_COLUMNS
    values = [row.get(k) for k in keys if row.get(k)]
    return max(values) if values else None


def classify(row: dict, budget_bytes: int, t: Thresholds = Thresholds()) -> Verdict:
    """Judge one result row (a repetition, or a failed case's row)."""
    status = row.get("status")
    if status in NO_VERDICT_STATUSES:
        return Verdict(None, f"no verdict: the case ended with {status}")
    if status in NO_FIT_STATUSES:
        return Verdict("no_fit", f"{status}: {row.get('error') or 'did not run'}", fit_memory="no_fit")
    if status == "stopped":
        return Verdict("spill", row.get("error") or "stopped while reading its weights back from storage",
                       fit_memory="spill")
    artifact = row.get("artifact_size_bytes") or 0
    read = row.get("read_bytes") if status == "ok" else row.get("case_read_bytes")
    if status == "timeout":
        if read and artifact and read >= max(t.spill_read_fraction * artifact, t.spill_read_min_bytes):
            return Verdict("spill", f"timed out while reading {read / 2**20:,.0f} MiB back from storage",
                           fit_memory="spill")
        return Verdict("slow", "timed out before finishing", fit_speed="slow")
    if status != "ok":
        return Verdict(None, f"no verdict for status {status!r}")

    reasons: dict[str, str] = {}
    peak = judged_peak(row)
    mem = memory_verdict(peak, budget_bytes, t.headroom)
    memory, headroom = mem.fit_memory or "resident", mem.headroom
    if mem.fit_class != "fits":
        reasons[mem.fit_class] = mem.reason or ""

    swapped = ((row.get("swap_in_pages") or 0) + (row.get("swap_out_pages") or 0)) * 4096
    if artifact and read and read >= max(t.spill_read_fraction * artifact, t.spill_read_min_bytes):
        memory = "spill"
        reasons["spill"] = (f"read {read / 2**20:,.0f} MiB from storage during generation "
                            f"({read / artifact:.1f}x the {artifact / 2**20:,.0f} MiB artifact): "
                            "weights were evicted and re-read")
    elif swapped >= t.spill_swap_bytes:
        memory = "spill"
        reasons["spill"] = f"the system swapped {swapped / 2**20:,.0f} MiB during generation"

    decode, ttft = row.get("decode_tok_s"), row.get("ttft_s")
    speed = "interactive"
    slow_parts = []
    if decode is not None and decode < t.min_decode_tok_s:
        slow_parts.append(f"decode {decode:.1f} tok/s < {t.min_decode_tok_s:g}")
    if ttft is not None and ttft > t.max_ttft_s:
        slow_parts.append(f"TTFT {ttft:.1f} s > {t.max_ttft_s:g} s")
    if slow_parts:
        speed = "slow"
        reasons["slow"] = ", ".join(slow_parts)

    on_device, total = row.get("n_layers_device"), row.get("n_layers_total")
    host_bytes, device_bytes = row.get("offload_host_bytes"), row.get("offload_device_bytes")
    offload = bool(on_device) and total is not None and on_device < total
    if offload:
        reasons["offload"] = f"{on_device} of {total} layers on the accelerator, the rest on the host"
    elif host_bytes and device_bytes:
        offload = True
        share = host_bytes / (host_bytes + device_bytes)
        reasons["offload"] = (f"{host_bytes / 2**20:,.0f} MiB of weights ({share:.0%}) in host memory, "
                              f"{device_bytes / 2**20:,.0f} MiB on the accelerator")

    missed = quality_misses(row, t)
    if missed:
        reasons["degraded"] = "quality below target: " + ", ".join(missed)

    fit_class = worst(list(reasons)) or "fits"
    if fit_class == "fits":
        parts = ["resident" + (f" with {headroom:.0%} headroom" if headroom is not None else "")]
        if decode is not None:
            parts.append(f"{decode:.1f} tok/s decode")
        if ttft is not None:
            parts.append(f"TTFT {ttft:.2f} s")
        reason = ", ".join(parts)
    else:
        reason = "; ".join(reasons[c] for c in sorted(reasons, key=ORDER.index, reverse=True))
    return Verdict(fit_class, reason, memory, headroom, speed, offload)


def predicted_verdict(peak_bytes: float, ttft_s: float | None, decode_tok_s: float | None, budget_bytes: int,
                      t: Thresholds = Thresholds()) -> Verdict:
    """The verdict a case would get with these predicted figures (``harness.fitpredict``): judged by
    ``classify`` like a measured row, so a prediction and a measurement mean the same class."""
    row = {"status": "ok", "peak_rss_bytes": int(peak_bytes), "ttft_s": ttft_s, "decode_tok_s": decode_tok_s}
    return classify(row, budget_bytes, t)


def rank(cls: str | None) -> int:
    """Position in ORDER, fits first; no verdict (a crash, an error) ranks below no_fit."""
    return ORDER.index(cls) if cls in ORDER else len(ORDER)


def quality_misses(row: dict, t: Thresholds) -> list[str]:
    """The quality targets a row misses, in words; targets whose figure is missing are skipped."""
    missed = []
    kl, ratio, rate = row.get("quality_kl_mean"), row.get("quality_ppl_ratio"), row.get("task_pass_rate")
    if t.max_kl is not None and kl is not None and kl > t.max_kl:
        missed.append(f"KL {kl:.4f} > {t.max_kl:g}")
    if t.max_ppl_ratio is not None and ratio is not None and ratio > t.max_ppl_ratio:
        missed.append(f"perplexity {ratio:.3f}x the reference > {t.max_ppl_ratio:g}x")
    if t.min_pass_rate is not None and rate is not None and rate < t.min_pass_rate:
        missed.append(f"task pass rate {rate:.0%} < {t.min_pass_rate:.0%}")
    return missed


def max_fit_context(by_context: dict[int, str | None]) -> int | None:
    """The largest context whose verdict is ``fits`` with every smaller tried context fitting too."""
    best = None
    for n_ctx in sorted(by_context):
        if by_context[n_ctx] != "fits":
            break
        best = n_ctx
    return best


SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
              "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """'8GiB', '512 MiB', '1.5G', 123456 -> bytes. Bare G/M/K are binary, GB/MB decimal."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if not match or match.group(2).lower() not in SIZE_UNITS:
            raise ValueError(f"cannot read {text!r} as a memory size; write it like 8GiB, 512MiB or 1.5G")
        value = int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])
    if value <= 0:
        raise ValueError(f"a memory size must be positive, got {text!r}")
    return value
