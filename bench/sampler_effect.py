"""Does the measurer move the measurement? The default sampler vs the sparsest, on decode.

Interleaved rounds on llama.cpp with as many threads as logical CPUs (the
worst case: the sampler's thread competes with the model's for every core).
Each round runs the same case twice through the real harness, once with the
default sampler (``sampler_interval_ms`` 10, 50 ms while timed) and once with
the sparsest (one sample a minute: only the marks at phase boundaries), in
ABBA order so a machine that speeds up or slows down over a round hits both
alike. The figure is the ratio of decode tok/s (default / sparsest) per
round; the report gives their geometric mean and its 95 % t-interval over the
rounds. Rounds continue until the interval is narrower than ``--target``
(±3 %) or ``--max-rounds`` is reached. ``results/bench/sampler_effect.json``.

On a shared or loaded machine the interval is wide and says so: the load
average at the start and the end is in the report, and ``under_load`` is set
when it was above 1.5 at the start (at the end it is the bench's own two busy
threads: on 2 cores about 2, whatever else ran).

Usage: python bench/sampler_effect.py [--max-rounds 30] [--min-rounds 4] [--gen 128] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.measure.machine import fingerprint  # noqa: E402
from harness.metrics import t_critical  # noqa: E402
from harness.preflight import check_scenario  # noqa: E402
from harness.results import ResultWriter  # noqa: E402
from harness.scenario import parse_scenario  # noqa: E402
from harness.suite import run_suite  # noqa: E402

DEFAULT_MS = 10.0
SPARSEST_MS = 60_000.0  # one sample a minute: in practice only the phase-boundary marks


def run_once(model: Path, interval_ms: float, prompt: int, gen: int, threads: int, reps: int, mach) -> dict:
    s = parse_scenario({
        "name": "sampler-effect", "contexts": [prompt + gen], "prompt_tokens": [prompt], "gen_tokens": gen,
        "warmup": 1, "repetitions": reps, "timeout": 900, "sampler_interval_ms": interval_ms,
        "models": [{"artifact": str(model), "runtime": "llama.cpp", "options": {"n_threads": threads}}],
    })
    with tempfile.TemporaryDirectory() as tmp:
        result = run_suite(s.cases(), check_scenario(s), mach, ResultWriter(Path(tmp) / "s.parquet"), "bench")[0]
    rows = [r for r in result.rows if r["status"] == "ok"]
    if len(rows) != reps:
        raise SystemExit(f"sampler_effect: the case failed: {result.error}")
    return {"decode_tok_s": statistics.median(r["decode_tok_s"] for r in rows),
            "samples": rows[0]["sampler_samples"], "outside_load_cores": rows[0].get("outside_load_cores"),
            "steal_fraction": rows[0].get("steal_fraction")}


def interval(log_ratios: list[float]) -> tuple[float, float, float] | None:
    """(geometric mean ratio, low, high) of the 95 % t-interval over the rounds' log ratios."""
    if len(log_ratios) < 2:
        return None
    mean = statistics.fmean(log_ratios)
    half = t_critical(len(log_ratios) - 1) * statistics.stdev(log_ratios) / math.sqrt(len(log_ratios))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3, help="repetitions per run (the round's figure is their median)")
    ap.add_argument("--threads", type=int, default=None, help="default: every logical CPU")
    ap.add_argument("--min-rounds", type=int, default=4)
    ap.add_argument("--max-rounds", type=int, default=30)
    ap.add_argument("--target", type=float, default=0.03, help="stop once the 95%% interval is within ±this")
    args = ap.parse_args()
    if not args.model.exists():
        raise SystemExit(f"sampler_effect: model not found at {args.model}; run `make sample-models`")
    threads = args.threads or os.cpu_count() or 1
    mach = fingerprint()
    load_start = os.getloadavg()[0]
    t0 = time.perf_counter()
    rounds: list[dict] = []
    found = None
    for n in range(args.max_rounds):
        order = [DEFAULT_MS, SPARSEST_MS] if n % 2 == 0 else [SPARSEST_MS, DEFAULT_MS]  # ABBA
        got = {}
        for ms in order:
            got[ms] = run_once(args.model, ms, args.prompt, args.gen, threads, args.reps, mach)
        ratio = got[DEFAULT_MS]["decode_tok_s"] / got[SPARSEST_MS]["decode_tok_s"]
        rounds.append({"ratio": ratio, "default": got[DEFAULT_MS], "sparsest": got[SPARSEST_MS],
                       "load_avg_1m": os.getloadavg()[0]})
        found = interval([math.log(r["ratio"]) for r in rounds])
        width = "" if found is None else f", ratio {found[0]:.3f} [{found[1]:.3f}, {found[2]:.3f}]"
        print(f"round {n + 1}: default/sparsest decode {ratio:.3f}{width}", flush=True)
        if found and len(rounds) >= args.min_rounds and found[2] / found[0] - 1 < args.target \
                and 1 - found[1] / found[0] < args.target:
            break
    load_end = os.getloadavg()[0]
    report = {
        "what": f"decode tok/s, sampler {DEFAULT_MS:g} ms (default) / {SPARSEST_MS:g} ms (sparsest), llama.cpp, "
                f"{threads} threads, pp{args.prompt}+tg{args.gen}, {args.reps} repetitions per run, ABBA rounds",
        "model": args.model.name, "machine": mach.machine_class, "cpu_threads": mach.cpu_threads,
        "rounds": len(rounds), "ratio": found[0] if found else None,
        "ci95": [found[1], found[2]] if found else None,
        "ci_within_target": bool(found and found[2] / found[0] - 1 < args.target and 1 - found[1] / found[0] < args.target),
        "target": args.target, "load_avg_start": load_start, "load_avg_end": load_end,
        "under_load": load_start > 1.5, "wall_s": time.perf_counter() - t0, "per_round": rounds,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "sampler_effect.json"
    path.write_text(json.dumps(report, indent=2))
    if found:
        print(f"sampler effect on decode: {found[0]:.3f} (95% CI {found[1]:.3f}-{found[2]:.3f}) over {len(rounds)} "
              f"rounds; load average {load_start:.2f} -> {load_end:.2f}"
              + (" (UNDER LOAD: not a figure)" if report["under_load"] else ""))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
