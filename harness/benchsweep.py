"""llama-bench's sweep (``-p 512 -n 128 -d 0,4096 -fa 0,1 ...``) -> fitbench scenario cases, and a
finished case -> llama-bench's JSON records.

Every comma list sweeps as a cross product, like llama-bench. fitbench measures one prompt
and one generation per case, so one case per (model, options, n_prompt, n_gen, n_depth)
gives both of llama-bench's tests: ``pp`` is the prefill rate over the whole prompt of
n_depth + n_prompt tokens (from an empty cache; llama-bench times only the n_prompt tokens
after the depth), ``tg`` the decode rate over the generated tokens. The case's context is
llama-bench's rule: max(-c, n_prompt + n_gen + n_depth).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from harness.artifact import FORMAT_RUNTIMES, ArtifactInfo, inspect_artifact
from harness.errors import FitbenchError
from harness.fit import case_serving, case_verdict
from harness.scenario import Case, Scenario, parse_scenario
from runners.base import OptionError, UnknownRunner, get_runner_class

SCENARIO_NAME = "bench"
MIN_CTX = 16  # the smallest context a scenario accepts


class BenchError(FitbenchError):
    """A bad bench flag or value: one line naming the flag, exit 2."""


def _flag_bool(text: str) -> bool:
    value = {"0": False, "1": True, "off": False, "on": True, "false": False, "true": True}.get(text.lower())
    if value is None:
        raise ValueError("expected 0 or 1")
    return value


def _mlx_kv_bits(text: str) -> int | None:
    """-ctk/-ctv for MLX: q8_0/q8 -> 8-bit, q4_0/q4 -> 4-bit group quantization (mlx-lm's own format,
    not llama.cpp's blocks); f16/f32/bf16 -> an unquantized cache in the model's compute dtype."""
    text = str(text).lower()
    if text in ("f16", "f32", "bf16"):
        return None
    bits = text.removesuffix("_0").removesuffix("_1").removeprefix("q")
    if not bits.isdigit():
        raise BenchError(f"{text!r} is not a KV type MLX can use (q8_0, q4_0, q8, q4 or f16)")
    return int(bits)


@dataclass(frozen=True)
class Flag:
    """A llama-bench flag that becomes a runner option: its option name per runtime, with a value
    translation where the runtime spells the setting differently (torch -fa 0 is eager attention)."""

    flag: str
    field: str  # llama-bench's JSON field name
    title: str  # llama-bench's markdown column heading
    parse: Callable[[str], Any]
    runtimes: dict[str, str | tuple[str, Callable[[Any], Any]]]  # runtime -> runner option [, value map]
    default: Any = None  # llama.cpp runner's default: a column only shows values other than this
    lacks: dict[str, str] = field(default_factory=dict)  # runtime -> why it has no such setting

    def option_for(self, runtime: str) -> tuple[str, Callable[[Any], Any]] | None:
        target = self.runtimes.get(runtime)
        if target is None:
            return None
        return (target, lambda v: v) if isinstance(target, str) else target


ONNX_FIXED = ("onnxruntime-genai fixes the KV type and the attention operator when the model is built "
              "(onnxruntime_genai.models.builder); build another model instead")
FLAGS: tuple[Flag, ...] = (
    Flag("-t", "n_threads", "threads", int,
         {"llama.cpp": "n_threads", "torch": "n_threads", "onnxruntime": "intra_op_num_threads"}),
    Flag("-b", "n_batch", "n_batch", int, {"llama.cpp": "n_batch"}, 2048),
    Flag("-ngl", "n_gpu_layers", "ngl", int, {"llama.cpp": "n_gpu_layers"}, 0),
    Flag("-fa", "flash_attn", "fa", _flag_bool,
         {"llama.cpp": "flash_attn", "torch": ("attn_implementation", lambda on: "sdpa" if on else "eager")}, False,
         lacks={"mlx": "mlx always runs its fused attention (mx.fast.scaled_dot_product_attention)",
                "onnxruntime": ONNX_FIXED}),
    Flag("-ctk", "type_k", "type_k", str, {"llama.cpp": "type_k", "mlx": ("kv_bits", _mlx_kv_bits)}, "f16",
         lacks={"torch": "torch keeps the KV cache in the model's dtype; choose that with the scenario option dtype",
                "onnxruntime": ONNX_FIXED}),
    Flag("-ctv", "type_v", "type_v", str, {"llama.cpp": "type_v", "mlx": ("kv_bits", _mlx_kv_bits)}, "f16",
         lacks={"torch": "torch keeps the KV cache in the model's dtype; choose that with the scenario option dtype",
                "onnxruntime": ONNX_FIXED}),
)
FLAG_BY_FIELD = {f.field: f for f in FLAGS}


def parse_list(flag: str, text: str, kind: Callable[[str], Any] = int, minimum: int | None = None) -> list:
    """``512,1024`` -> [512, 1024]; anything else is one line naming the flag."""
    items = [item.strip() for item in str(text).split(",")]
    if not items or any(not item for item in items):
        raise BenchError(f"{flag} {text!r}: give a comma-separated list without empty items, e.g. 0,1")
    values = []
    for item in items:
        try:
            value = kind(item)
        except ValueError:
            what = "integers" if kind is int else "values"
            raise BenchError(f"{flag} {text!r}: {item!r} is not valid; give comma-separated {what}") from None
        if minimum is not None and value < minimum:
            raise BenchError(f"{flag} {text!r}: values must be at least {minimum}, got {value}")
        if value not in values:  # `-fa 0,0` is one case, not two with the same key
            values.append(value)
    return values


@dataclass
class Sweep:
    """What the command line asked for, parsed: every list is swept."""

    models: list[Path]
    n_prompt: list[int] = field(default_factory=lambda: [512])
    n_gen: list[int] = field(default_factory=lambda: [128])
    n_depth: list[int] = field(default_factory=lambda: [0])
    n_ctx: int | None = None
    flags: dict[str, list] = field(default_factory=dict)  # Flag.field -> values, only the flags given
    runtime: str | None = None
    repetitions: int = 5
    timeout: float = 600.0
    parallel: list[int] = field(default_factory=lambda: [1])  # sessions at once (llama-batched-bench's -npl)

    def shown_fields(self) -> list[str]:
        """Option columns the table shows: the flags given with more than one value or a non-default
        one (llama-bench shows only what differs from its defaults)."""
        return [f.field for f in FLAGS if f.field != "n_threads" and f.field in self.flags
                and self.flags[f.field] != [f.default]] + (["pl"] if self.parallel != [1] else [])


def runtime_for(info: ArtifactInfo, runtime: str | None) -> str:
    if runtime:
        return runtime
    found = FORMAT_RUNTIMES.get(info.format)
    if found is None:
        raise BenchError(f"-m {info.path}: no runtime known for {info.format} artifacts; give --runtime")
    return found


def runner_options(sweep: Sweep, runtime: str) -> dict[str, Any]:
    """The runner options for one runtime: a list where a flag sweeps. A flag the runtime lacks is an error."""
    try:
        cls = get_runner_class(runtime)
    except UnknownRunner as exc:
        raise BenchError(f"--runtime: {exc}") from None
    options: dict[str, Any] = {}
    set_by: dict[str, str] = {}
    for name, values in sweep.flags.items():
        flag = FLAG_BY_FIELD[name]
        target = flag.option_for(cls.name) or flag.option_for(runtime)
        if target is None or target[0] not in cls.options:
            if values == [flag.default]:  # e.g. `-fa 0` for onnxruntime: asks for nothing the runtime lacks
                continue
            why = flag.lacks.get(cls.name) or f"no such option (only {', '.join(sorted(flag.runtimes))})"
            raise BenchError(f"{flag.flag}: runtime {cls.name!r} cannot set it: {why}")
        option, translate = target
        converted = []
        for value in values:
            try:
                converted.append(translate(value))
                cls.validate_options({option: converted[-1]})
            except (OptionError, BenchError) as exc:
                raise BenchError(f"{flag.flag} {value}: {exc}") from None
        merged = converted if len(converted) > 1 else converted[0]
        if option in options and options[option] != merged:  # MLX quantizes K and V together: one kv_bits
            raise BenchError(f"{flag.flag}: runtime {cls.name!r} sets {set_by[option]} and {flag.flag} with one "
                             f"option ({option}); give both the same values")
        options[option], set_by[option] = merged, flag.flag
    return options


def shapes(sweep: Sweep) -> list[tuple[int, int, int, int]]:
    """(n_prompt, n_gen, n_depth, n_ctx) per test shape, n_ctx = max(-c, p + n + d) like llama-bench."""
    out = []
    for p in sweep.n_prompt:
        for n in sweep.n_gen:
            for d in sweep.n_depth:
                if p + d < 1:
                    raise BenchError("-p/-d: the prompt needs at least one token (n_prompt + n_depth >= 1)")
                out.append((p, n, d, max(sweep.n_ctx or 0, p + n + d, MIN_CTX)))
    return out


@dataclass(frozen=True)
class BenchCase:
    """A case and the llama-bench shape it stands for."""

    case: Case
    n_prompt: int
    n_depth: int


def expand(sweep: Sweep, inspect: Callable[[Path], ArtifactInfo] = inspect_artifact
           ) -> tuple[list[BenchCase], list[Scenario]]:
    """The sweep's cases, one artifact's together, and the scenarios they came from (for preflight)."""
    out: list[BenchCase] = []
    scenarios: list[Scenario] = []
    for model in sweep.models:
        runtime = runtime_for(inspect(model), sweep.runtime)
        options = runner_options(sweep, runtime)
        for p, n, d, n_ctx in shapes(sweep):
            sc = parse_scenario({
                "name": SCENARIO_NAME,
                "models": [{"artifact": str(model), "runtime": runtime, "label": model.stem, "options": options}],
                "contexts": [n_ctx], "prompt_tokens": [d + p], "gen_tokens": n,
                "repetitions": sweep.repetitions, "warmup": 1, "timeout": sweep.timeout,
                "parallel": sweep.parallel,
            }, source="fitbench bench")
            scenarios.append(sc)
            for case in sc.cases():
                out.append(BenchCase(replace(case, index=len(out)), p, d))
    return out, scenarios


# -- records ------------------------------------------------------------------------------------------

BENCH_FIELDS = (
    "model_filename", "model_type", "model_size", "model_n_params", "backends", "n_batch", "n_threads",
    "type_k", "type_v", "n_gpu_layers", "flash_attn", "n_prompt", "n_gen", "n_depth", "test_time",
    "avg_ns", "stddev_ns", "avg_ts", "stddev_ts", "samples_ns", "samples_ts",
    "test", "peak_rss_bytes", "ttft_ms", "fit_class", "fit_reason", "status", "error", "case_key", "results_file",
    # parallel sessions: llama-batched-bench's pl and speed_tg/speed_pp (all sessions together), fitbench's own
    "pl", "speed_pp", "speed_tg", "user_ts", "ttft_p90_ms", "kv_session_bytes", "serving_fits", "serving_reason",
)


def _stats(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (llama-bench's: n - 1; 0 for one sample)."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def test_label(kind: str, tokens: int, depth: int) -> str:
    """llama-bench's test name: ``pp512``, ``tg128``, ``pp512 @ d4096``."""
    return f"{kind}{tokens}" + (f" @ d{depth}" if depth else "")


def bench_records(bc: BenchCase, rows: list[dict], results_file: str) -> list[dict]:
    """One llama-bench record for pp and one for tg from a finished case's rows (fitbench's fields added)."""
    case = bc.case
    reps = [r for r in rows if r.get("status") == "ok" and r.get("repetition") is not None]
    first = rows[0] if rows else {}
    cls = get_runner_class(case.runtime)
    try:
        opts = cls.validate_options(case.options)  # with the runner's defaults, as llama-bench reports them
    except OptionError:
        opts = dict(case.options)
    kv = (first.get("kv_type") or "").split("/")
    fit_class, fit_reason = case_verdict(rows) if rows else (None, "")
    peaks = [r["peak_rss_bytes"] for r in rows if r.get("peak_rss_bytes") is not None]
    ttfts = [r["ttft_s"] for r in reps if r.get("ttft_s") is not None]
    started = first.get("started_at")
    serving, serving_reason = case_serving(rows) if rows else (None, "")
    common = {
        "model_filename": str(case.artifact),
        "model_type": " ".join(str(x) for x in (first.get("artifact_arch"), _params(first.get("artifact_n_params")),
                                                first.get("artifact_quant")) if x),
        "model_size": first.get("artifact_size_bytes"), "model_n_params": first.get("artifact_n_params"),
        "backends": case.runtime,
        "n_batch": opts.get("n_batch"), "n_threads": first.get("n_threads") or opts.get("n_threads"),
        "type_k": first.get("kv_type_k") or opts.get("type_k") or (kv[0] or None),
        "type_v": first.get("kv_type_v") or opts.get("type_v") or (kv[-1] or None),
        "n_gpu_layers": opts.get("n_gpu_layers"),
        "flash_attn": first.get("flash_attn") if first.get("flash_attn") is not None else opts.get("flash_attn"),
        "n_depth": bc.n_depth,
        "test_time": started.isoformat() if hasattr(started, "isoformat") else started,
        "peak_rss_bytes": max(peaks) if peaks else None,
        "ttft_ms": sum(ttfts) / len(ttfts) * 1000 if ttfts else None,
        "fit_class": fit_class, "fit_reason": fit_reason,
        "status": "ok" if reps and all(r.get("status") == "ok" for r in rows) else
        next((r.get("status") for r in rows if r.get("status") != "ok"), "failed"),
        "error": next((r.get("error") for r in rows if r.get("error")), None),
        "case_key": case.key, "results_file": results_file,
        "pl": case.parallel, "speed_pp": _mean_of(reps, "prefill_tok_s"),
        "speed_tg": _mean_of(reps, "aggregate_decode_tok_s"), "user_ts": _mean_of(reps, "user_decode_tok_s"),
        "ttft_p90_ms": _scaled(_mean_of(reps, "ttft_p90_s"), 1000), "kv_session_bytes": _last_of(reps, "kv_session_bytes"),
        "serving_fits": serving, "serving_reason": serving_reason,
    }
    pp_s = [r["ttft_s"] for r in reps if r.get("ttft_s")]
    # One session: llama-bench's per-stream rates. N sessions: pp over every session's prompt (all of
    # them were waited for), tg the median user's decode rate (speed_tg holds all sessions together).
    rate_key = "decode_tok_s" if case.parallel == 1 else "user_decode_tok_s"
    tg = [(r["e2e_s"] - r["ttft_s"], r[rate_key]) for r in reps
          if r.get(rate_key) and r.get("e2e_s") is not None and r.get("ttft_s") is not None]
    pp_rates = ([case.prompt_tokens / s for s in pp_s] if case.parallel == 1
                else [r["prefill_tok_s"] for r in reps if r.get("ttft_s")])
    return [
        _record(common, "pp", bc.n_prompt, bc.n_prompt, 0, pp_s, pp_rates),
        _record(common, "tg", case.gen_tokens, 0, case.gen_tokens, [s for s, _ in tg], [ts for _, ts in tg]),
    ]


def _record(common: dict, kind: str, tokens: int, n_prompt: int, n_gen: int, seconds: list[float],
            rates: list[float]) -> dict:
    avg_ns, stddev_ns = _stats([s * 1e9 for s in seconds])
    avg_ts, stddev_ts = _stats(rates)
    record = {**common, "n_prompt": n_prompt, "n_gen": n_gen, "test": test_label(kind, tokens, common["n_depth"]),
              "avg_ns": None if avg_ns is None else int(avg_ns),
              "stddev_ns": None if stddev_ns is None else int(stddev_ns),
              "avg_ts": avg_ts, "stddev_ts": stddev_ts,
              "samples_ns": [int(s * 1e9) for s in seconds], "samples_ts": rates}
    return {key: record.get(key) for key in BENCH_FIELDS}


def _mean_of(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def _last_of(rows: list[dict], key: str) -> Any:
    return next((r[key] for r in reversed(rows) if r.get(key) is not None), None)


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def _params(n: int | None) -> str | None:
    """135M, 7B: llama-bench's model_type size word."""
    if not n:
        return None
    return f"{n / 1e9:.0f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


# -- `fitbench run MODEL`: the default test ---------------------------------------------------------

DEFAULT_RUN_CTX = 4096  # llama.cpp's usual default context; a model trained for less gets its own


def default_scenario(artifact: Path) -> Scenario:
    """``fitbench run MODEL.gguf``: llama-bench's default test (pp512 + tg128, no depth) at the
    model's trained context capped at DEFAULT_RUN_CTX, with the runtime its format implies."""
    info = inspect_artifact(artifact)
    n_ctx = min(info.context_length or DEFAULT_RUN_CTX, DEFAULT_RUN_CTX)
    gen = 128
    name = ("run-" + "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in artifact.stem))[:64]
    return parse_scenario({
        "name": name,
        "models": [{"artifact": str(artifact), "runtime": runtime_for(info, None), "label": artifact.stem}],
        "contexts": [n_ctx], "prompt_tokens": [max(1, min(512, n_ctx - gen))], "gen_tokens": gen,
    }, source=str(artifact))
