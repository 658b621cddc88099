"""How far the memory estimate is from measured peaks, across architectures and runtimes.

Builds small random-weight models of non-llama architectures on the spot (Gemma 3 with five of six
layers sliding, Qwen2 with use_sliding_window, Mistral with every layer sliding, a Mixtral-style
mixture of experts: tests/tiny_models.py; nothing is downloaded), converts them to GGUF with
llama.cpp's converter where it can, and runs each through fitbench's real case machinery at four
contexts (half filled), next to the sample model in every runtime available here. Every row holds
the estimate's breakdown, the measured peak RSS and the error; the summary the largest error.

Usage: python bench/estimate_accuracy.py [--out results/bench] [--contexts 512,1024,2048,4096]
       [--models-dir DIR] [--only gemma3,qwen2|none] [--no-sample] [--quants] [--no-gguf] [--no-run]
Writes OUT/estimate_accuracy.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from tiny_models import SPECS, build_in_child, find_converter, measure_peaks  # noqa: E402

SAMPLES = [("SmolLM2-135M-Instruct.Q4_1.gguf", "llama.cpp", {"n_threads": 1}),
           ("SmolLM2-135M-Instruct-hf", "torch", {"device": "cpu", "n_threads": 1}),
           ("SmolLM2-135M-Instruct-onnx-int4", "onnxruntime", {}),
           ("SmolLM2-135M-Instruct-mlx-q4", "mlx", {})]


def existing(models_dir: Path, names: list[str], gguf: bool) -> dict[str, Path]:
    """Tiny models already built in ``models_dir`` (and their GGUFs where a conversion worked)."""
    made = {}
    for n in names:
        folder = models_dir / f"tiny-{n}-hf"
        if (folder / "model.safetensors").is_file():
            made[n] = folder
            if gguf and (models_dir / f"tiny-{n}.f16.gguf").is_file():
                made[n + ".gguf"] = models_dir / f"tiny-{n}.f16.gguf"
    return made


def runnable(runtime: str) -> bool:
    from runners.base import get_runner_class

    try:
        return bool(get_runner_class(runtime).available().available)
    except Exception:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    ap.add_argument("--contexts", default="512,1024,2048,4096")
    ap.add_argument("--models-dir", type=Path, help="where the tiny models are built (default: a temp dir)")
    ap.add_argument("--only", help="comma-separated tiny architectures (default: all of " + ", ".join(SPECS) + ")")
    ap.add_argument("--no-sample", action="store_true", help="leave the sample model out")
    ap.add_argument("--quants", action="store_true",
                    help="add the sample's llama.cpp quants from `make quality-models` (F16, Q8_0, Q6_K, ...)")
    ap.add_argument("--no-gguf", action="store_true", help="do not convert the tiny models to GGUF")
    ap.add_argument("--no-run", action="store_true",
                    help="run nothing: re-estimate the cases already measured in --models-dir")
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    names = [n for n in args.only.split(",") if n != "none"] if args.only else list(SPECS)  # none: no tiny model
    models_dir = args.models_dir or Path(tempfile.mkdtemp(prefix="fitbench-tiny-"))
    t0 = time.time()
    gguf = not args.no_gguf and find_converter() is not None
    made = existing(models_dir, names, gguf)
    missing = [n for n in names if n not in made]
    if missing and not args.no_run:
        made.update(build_in_child(models_dir, missing, gguf=gguf))
    print(f"models {', '.join(sorted(made))} in {models_dir} ({time.time() - t0:.0f} s)", flush=True)
    # Most telling first (a long run stopped early keeps the most): every architecture in torch,
    # then in llama.cpp (Gemma 3 also with its SWA cache trimmed to the window), then the sample.
    runs: list[tuple[Path, str, dict]] = [(made[n], "torch", {"device": "cpu", "n_threads": 1}) for n in names
                                          if n in made]
    for name in names:
        if name + ".gguf" in made:
            runs.append((made[name + ".gguf"], "llama.cpp", {"n_threads": 1}))
            if made[name].joinpath("config.json").read_text().count("sliding_window_pattern"):
                runs.append((made[name + ".gguf"], "llama.cpp", {"n_threads": 1, "swa_full": False}))
    if not args.no_sample:
        runs += [(ROOT / "models" / a, rt, o) for a, rt, o in SAMPLES
                 if (ROOT / "models" / a).exists()]
    if args.quants:
        runs += [(q, "llama.cpp", {"n_threads": 1}) for q in sorted((ROOT / "models").glob("SmolLM2-135M-Instruct.*.gguf"))
                 if q.name != SAMPLES[0][0]]
    rows: list[dict] = []
    path = args.out / "estimate_accuracy.json"
    args.out.mkdir(parents=True, exist_ok=True)
    for artifact, runtime, options in runs:
        if not runnable(runtime):
            print(f"skip {artifact.name} in {runtime}: runtime not available here", flush=True)
            continue
        got = [r for r in measure_peaks(artifact, runtime, contexts, options, out_dir=models_dir, run=not args.no_run)
               if r["status"] is not None]
        for r in got:
            r["options"] = options
            err = f"{r['error']:+.1%}" if r["error"] is not None else r["status"]
            print(f"{artifact.name:40s} {runtime:12s} {json.dumps(options, sort_keys=True):40s} ctx {r['n_ctx']:>5}: "
                  f"estimate {r['estimate']['total_bytes'] / 2**20:7.1f} MiB, measured "
                  f"{(r['measured_peak_bytes'] or 0) / 2**20:7.1f} MiB  {err}", flush=True)
        rows += got
        write(path, rows, contexts, t0)  # after every artifact: a long run interrupted keeps what it measured
    print(json.dumps(write(path, rows, contexts, t0), default=str))
    print(markdown(rows, contexts))
    print(f"wrote {path}")


def markdown(rows: list[dict], contexts: list[int]) -> str:
    """The table for docs/catalog.md: estimate / measured MiB and the error, per context."""
    groups: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        opts = ", ".join(f"{k}={v}" for k, v in sorted(r["options"].items()) if k not in ("n_threads", "device"))
        groups.setdefault((r["artifact"], r["runtime"], opts), {})[r["n_ctx"]] = r
    head = "| artifact | runtime | options | " + " | ".join(f"{c:,}" for c in contexts) + " |"
    lines = [head, "|---" * (3 + len(contexts)) + "|"]
    for (art, rt, opts), by_ctx in groups.items():
        cells = []
        for c in contexts:
            r = by_ctx.get(c)
            if r is None or r["error"] is None:
                cells.append("-")
            else:
                cells.append(f"{r['estimate']['total_bytes'] / 2**20:,.0f} / {r['measured_peak_bytes'] / 2**20:,.0f} "
                             f"({r['error']:+.1%})")
        lines.append(f"| {art} | {rt} | {opts or '-'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(path: Path, rows: list[dict], contexts: list[int], t0: float) -> dict:
    errors = [abs(r["error"]) for r in rows if r["error"] is not None]
    worst = max((r for r in rows if r["error"] is not None), key=lambda r: abs(r["error"]), default=None)
    summary = {"cases": len(rows), "measured": len(errors), "max_abs_error": max(errors, default=None),
               "mean_abs_error": sum(errors) / len(errors) if errors else None,
               "worst": {k: worst[k] for k in ("artifact", "runtime", "options", "n_ctx", "error")} if worst else None,
               "within_10pct": sum(e <= 0.10 for e in errors),
               "load_avg": os.getloadavg(), "wall_s": round(time.time() - t0, 1), "contexts": contexts, "fill": 0.5}
    path.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1, default=str))
    return summary


if __name__ == "__main__":
    main()
