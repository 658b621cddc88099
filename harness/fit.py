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
import statistics
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
    "max_ttft_p90_s": "serving: N parallel sessions fit when the 90th-percentile TTFT over the sessions is at most "
                      "this (seconds; all prompts arrive together)",
    "min_user_tok_s": "serving: ... and the median session's decode rate is at least this (tok/s per user)",
    "max_kl": "degraded when the mean KL divergence from the quality reference is above this (nats/token; off by default)",
    "max_ppl_ratio": "degraded when perplexity / the reference's perplexity is above this, e.g. 1.05 (off by default)",
    "min_pass_rate": "degraded when the task-check pass rate is below this fraction, e.g. 0.8 (off by default)",
    "max_drift": "drift_flag when decode tok/s changed by more than this fraction from the first to the last "
                 "repetition, or from the first to the last quarter of one (throttling, a change of load)",
    "max_steal": "noise_flag when CPU steal took more than this fraction of the case's CPU time",
    "max_outside_load": "noise_flag when other processes kept more than this fraction of the logical CPUs busy",
    "max_ci": "noise_flag when the 95% confidence interval of mean decode tok/s is wider than +/- this fraction",
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
    # serving verdict of parallel sessions: the single-session speed targets, over users
    max_ttft_p90_s: float = 10.0
    min_user_tok_s: float = 10.0
    # quality targets: None = not judged
    max_kl: float | None = None
    max_ppl_ratio: float | None = None
    min_pass_rate: float | None = None
    # measurement flags (not fit classes): the figure may not say what it seems to
    max_drift: float = 0.20
    max_steal: float = 0.05
    max_outside_load: float = 0.25
    max_ci: float = 0.05

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


@dataclass
class MeasurementFlags:
    """Is a row's figure trustworthy? Not a fit class: a drifting or noisy case may still fit."""

    drift_flag: bool | None
    noise_flag: bool | None
    measurement_note: str | None

    def to_row(self) -> dict:
        return asdict(self)


@dataclass
class ServingVerdict:
    """Whether the row's N parallel sessions are served: in the user's words, "fits 4 users at context 2048"."""

    serving_fits: bool | None
    serving_reason: str

    def to_row(self) -> dict:
        return asdict(self)


def measurement_flags(row: dict, t: Thresholds = Thresholds()) -> MeasurementFlags:
    """Drift: decode changed beyond ``max_drift`` across the repetitions or within this one. Noise:
    steal or other processes' load beyond their thresholds, or a confidence interval wider than
    ``max_ci``. A figure that was not measured is not judged (its flag stays null when none was)."""
    if row.get("status") != "ok":
        return MeasurementFlags(None, None, None)
    notes: list[str] = []
    drift, rep_drift = row.get("drift"), row.get("rep_drift")
    drifted = None
    if drift is not None or rep_drift is not None:
        drifted = False
        if drift is not None and abs(drift) > t.max_drift:
            drifted = True
            notes.append(f"decode drifted {drift:+.0%} from the first to the last repetition "
                         f"(max_drift {t.max_drift:.0%})")
        if rep_drift is not None and abs(rep_drift) > t.max_drift:
            drifted = True
            notes.append(f"decode drifted {rep_drift:+.0%} within repetition {row.get('repetition')}")
    steal, outside = row.get("steal_fraction"), row.get("outside_load_cores")
    cpus = row.get("cpu_threads") or 1
    mean, ci = row.get("decode_tok_s_mean"), row.get("decode_tok_s_ci95")
    noisy = None
    if steal is not None or outside is not None or (mean and ci is not None):
        noisy = False
        if steal is not None and steal > t.max_steal:
            noisy = True
            notes.append(f"CPU steal {steal:.0%} of the case's CPU time (max_steal {t.max_steal:.0%})")
        if outside is not None and outside / cpus > t.max_outside_load:
            noisy = True
            notes.append(f"other processes kept {outside:.2f} of {cpus} CPUs busy "
                         f"(max_outside_load {t.max_outside_load:.0%})")
        if mean and ci is not None and ci / mean > t.max_ci:
            noisy = True
            notes.append(f"decode 95% CI ±{ci / mean:.1%} of the mean (max_ci ±{t.max_ci:.0%})")
    return MeasurementFlags(drifted, noisy, "; ".join(notes) or None)


SERVING_MEMORY = ("resident", "tight")  # the sessions' KV and weights stay in fast memory


def _users(n: int) -> str:
    return f"{n} user{'s' if n != 1 else ''}"


def serving_verdict(row: dict, t: Thresholds = Thresholds()) -> ServingVerdict:
    """A judged row (``classify`` ran first) -> the serving verdict of its ``parallel`` sessions: they
    fit when memory stays resident, the p90 TTFT over the sessions is at most ``max_ttft_p90_s`` and
    the median session decodes at ``min_user_tok_s`` or more."""
    n, n_ctx = row.get("parallel") or 1, row.get("n_ctx")
    where = f"{_users(n)} at context {n_ctx:,}" if n_ctx else _users(n)
    if row.get("status") != "ok":
        # a failure the fit class judged (OOM, killed, a timeout, the spill watchdog) does not serve them
        if row.get("fit_class") is not None:
            return ServingVerdict(False, f"does not fit {where}: {row.get('fit_reason') or row.get('status')}")
        return ServingVerdict(None, f"no serving verdict: {row.get('status')}")
    p90, user = row.get("ttft_p90_s"), row.get("user_decode_tok_s")
    misses = []
    if row.get("fit_memory") not in SERVING_MEMORY:
        misses.append(f"memory {row.get('fit_memory')}: {row.get('fit_reason') or ''}".rstrip(": "))
    if p90 is None or user is None:
        return ServingVerdict(None, f"no serving verdict for {where}: TTFT or decode rate not measured")
    if p90 > t.max_ttft_p90_s:
        misses.append(f"p90 TTFT {p90:.2f} s > {t.max_ttft_p90_s:g} s")
    if user < t.min_user_tok_s:
        misses.append(f"{user:.1f} tok/s per user < {t.min_user_tok_s:g}")
    if misses:
        return ServingVerdict(False, f"does not fit {where}: " + "; ".join(misses))
    return ServingVerdict(True, _serves(row))


def _serves(row: dict) -> str:
    """'fits 4 users at context 2,048: p90 TTFT …, … tok/s per user, … tok/s in all' from a served row."""
    n, n_ctx = row.get("parallel") or 1, row.get("n_ctx")
    where = f"{_users(n)} at context {n_ctx:,}" if n_ctx else _users(n)
    total = row.get("aggregate_decode_tok_s")
    return (f"fits {where}: p90 TTFT {row['ttft_p90_s']:.2f} s, {row['user_decode_tok_s']:.1f} tok/s per user"
            + (f", {total:.1f} tok/s in all" if total is not None and n > 1 else ""))


def case_serving(rows: list[dict]) -> tuple[bool | None, str]:
    """A case serves its users when every judged repetition does; the first that does not speaks.
    When all do, the reason quotes the medians over them, the figures the summary tables show."""
    judged = [r for r in rows if r.get("serving_fits") is not None]
    if not judged:
        return None, next((r.get("serving_reason") for r in rows if r.get("serving_reason")), "") or ""
    failing = next((r for r in judged if not r["serving_fits"]), None)
    if failing is not None:
        return False, failing.get("serving_reason") or ""
    keys = ("ttft_p90_s", "user_decode_tok_s", "aggregate_decode_tok_s")
    medians = {k: statistics.median(v) if (v := [r[k] for r in judged if r.get(k) is not None]) else None
               for k in keys}
    if medians["ttft_p90_s"] is None or medians["user_decode_tok_s"] is None:
        return True, judged[0].get("serving_reason") or ""
    return True, _serves({**judged[0], **medians})


def max_users(by_users: dict[int, bool | None]) -> int | None:
    """The largest user count served with every smaller tried count served too."""
    best = None
    for n in sorted(by_users):
        if not by_users[n]:
            break
        best = n
    return best


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


# --- constraints of `fitbench recommend` -------------------------------------------------------

@dataclass(frozen=True)
class Check:
    """One user constraint judged on one figure: passed True/False, or None when no figure decides it."""

    name: str  # memory | context | decode | ttft | quality
    passed: bool | None
    text: str
    shortfall: float = 0.0  # how far from passing, as a fraction of the target (0 unless failed)


CHECK_NAMES = ("memory", "context", "decode", "ttft", "quality")


def constraint_checks(fig: dict, budget_bytes: int, t: Thresholds, context: int) -> list[Check]:
    """Judge a candidate's figures at the asked ``context`` against the user's constraints.

    ``fig``: ``peak_bytes``, ``fit_class``/``fit_reason`` (a measured verdict at that context),
    ``decode_tok_s``, ``ttft_s``, ``quality_kl_mean``, ``quality_ppl_ratio``, ``task_pass_rate``,
    ``context_length`` (what the model was trained for). Memory is the one memory verdict
    (``memory_verdict``): above the budget fails, inside the headroom margin passes as tight.
    A measured no_fit or spill fails memory whatever the peak says."""
    checks = [_memory_check(fig, budget_bytes, t)]
    trained = fig.get("context_length")
    if trained:
        checks.append(Check("context", trained >= context,
                            f"trained for {trained:,} tokens" + ("" if trained >= context else f" < {context:,}"),
                            0.0 if trained >= context else (context - trained) / context))
    else:
        checks.append(Check("context", None, "trained context unknown"))
    decode, ttft = fig.get("decode_tok_s"), fig.get("ttft_s")
    if decode is None:
        timed_out = fig.get("fit_class") == "slow"
        checks.append(Check("decode", False if timed_out else None,
                            fig.get("fit_reason") or "" if timed_out else "no decode figure", 1.0 if timed_out else 0))
    else:
        ok = decode >= t.min_decode_tok_s
        checks.append(Check("decode", ok, f"{decode:,.1f} tok/s" + ("" if ok else f" < {t.min_decode_tok_s:g}"),
                            0.0 if ok else (t.min_decode_tok_s - decode) / t.min_decode_tok_s))
    if ttft is None:
        checks.append(Check("ttft", None, "no TTFT figure"))
    else:
        ok = ttft <= t.max_ttft_s
        checks.append(Check("ttft", ok, f"TTFT {ttft:,.2f} s" + ("" if ok else f" > {t.max_ttft_s:g} s"),
                            0.0 if ok else (ttft - t.max_ttft_s) / t.max_ttft_s))
    quality = _quality_check(fig, t)
    if quality is not None:
        checks.append(quality)
    return checks


def _memory_check(fig: dict, budget_bytes: int, t: Thresholds) -> Check:
    if fig.get("fit_class") in ("no_fit", "spill"):
        return Check("memory", False, f"{fig['fit_class']}: {fig.get('fit_reason') or ''}".strip(), 1.0)
    peak = fig.get("peak_bytes")
    if not peak:
        return Check("memory", None, "no peak figure")
    mem = memory_verdict(peak, budget_bytes, t.headroom)
    text = f"peak {peak / 2**20:,.0f} MiB"
    if mem.fit_class == "spill":
        return Check("memory", False, mem.reason or text, -(mem.headroom or 0.0))
    if mem.fit_class == "tight":
        return Check("memory", True, f"{text}, tight: {mem.reason}")
    return Check("memory", True, f"{text}, {mem.headroom:.0%} of the budget left")


def _quality_check(fig: dict, t: Thresholds) -> Check | None:
    targets = {"max_kl": "quality_kl_mean", "max_ppl_ratio": "quality_ppl_ratio", "min_pass_rate": "task_pass_rate"}
    wanted = {k: col for k, col in targets.items() if getattr(t, k) is not None}
    if not wanted:
        return None
    missed = quality_misses(fig, t)
    if missed:
        shortfall = 0.0
        for key, col in wanted.items():
            value, target = fig.get(col), getattr(t, key)
            if value is None or not target:
                continue
            miss = (value - target) / target if key != "min_pass_rate" else (target - value) / target
            shortfall = max(shortfall, miss)
        return Check("quality", False, ", ".join(missed), shortfall)
    known = [col for col in wanted.values() if fig.get(col) is not None]
    if not known:
        return Check("quality", None, "no quality figure against the reference")
    parts = []
    if fig.get("quality_kl_mean") is not None:
        parts.append(f"KL {fig['quality_kl_mean']:.4f}")
    if fig.get("quality_ppl_ratio") is not None:
        parts.append(f"perplexity {fig['quality_ppl_ratio']:.3f}x")
    if fig.get("task_pass_rate") is not None:
        parts.append(f"tasks {fig['task_pass_rate']:.0%}")
    return Check("quality", True, ", ".join(parts))


def constraints_verdict(checks: list[Check]) -> str:
    """pass (every constraint met), fail (one is missed), or unknown (none missed, one undecided)."""
    if any(c.passed is False for c in checks):
        return "fail"
    return "pass" if all(c.passed for c in checks) else "unknown"
