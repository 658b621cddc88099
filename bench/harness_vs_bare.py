"""Benchmark the measurer: fitbench vs a bare llama-cpp-python loop vs llama-bench.

Same model, threads, prompt length and generation length for all three; the
three are interleaved round by round so drift on a shared machine hits them
alike, and compared as ratios of medians from one run. Writes
``harness.json`` and ``harness.md`` into ``--out``.

- fitbench: the real path (scenario -> isolated worker -> sampler -> rows).
- bare: the same low-level greedy loop, in its own fresh process, no harness.
- llama-bench: ``pp<P>`` for prefill and ``tg<G> @ d<P>`` for decode at the
  same depth as fitbench's decode (after a P-token prompt).

Usage: python bench/harness_vs_bare.py --out results/bench [--llama-bench PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.measure.machine import fingerprint  # noqa: E402
from harness.preflight import check_scenario  # noqa: E402
from harness.results import ResultWriter  # noqa: E402
from harness.scenario import parse_scenario  # noqa: E402
from harness.suite import run_suite  # noqa: E402

BARE_LOOP = r"""
import json, sys, time
import llama_cpp
model, n_prompt, n_gen, threads, reps = sys.argv[1], *map(int, sys.argv[2:6])
n_ctx = n_prompt + n_gen
llm = llama_cpp.Llama(model_path=model, n_ctx=n_ctx, n_batch=min(2048, n_ctx), n_ubatch=512,
                      n_threads=threads, n_threads_batch=threads, verbose=False)
ctx = llm.ctx
smpl = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
llama_cpp.llama_sampler_chain_add(smpl, llama_cpp.llama_sampler_init_greedy())
text = b" ".join(b"word%d" % i for i in range(n_prompt * 2))
toks = llm.tokenize(text)[:n_prompt]
arr = (llama_cpp.llama_token * n_prompt)(*toks)
one = (llama_cpp.llama_token * 1)()
out = []
for rep in range(reps + 1):  # the first is the warm-up
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    t0 = time.perf_counter()
    assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(arr, n_prompt)) == 0
    one[0] = llama_cpp.llama_sampler_sample(smpl, ctx, -1)
    t1 = time.perf_counter()
    for i in range(n_gen - 1):
        assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(one, 1)) == 0
        one[0] = llama_cpp.llama_sampler_sample(smpl, ctx, -1)
    t2 = time.perf_counter()
    if rep:
        out.append({"prefill_tok_s": n_prompt / (t1 - t0), "decode_tok_s": (n_gen - 1) / (t2 - t1)})
print(json.dumps(out))
"""


def run_fitbench(model: Path, n_prompt: int, n_gen: int, threads: int, reps: int) -> list[dict]:
    s = parse_scenario({
        "name": "bench", "contexts": [n_prompt + n_gen], "prompt_tokens": [n_prompt], "gen_tokens": n_gen,
        "warmup": 1, "repetitions": reps, "timeout": 900,
        "models": [{"artifact": str(model), "runtime": "llama.cpp", "options": {"n_threads": threads}}],
    })
    with tempfile.TemporaryDirectory() as tmp:
        results = run_suite(s.cases(), check_scenario(s), fingerprint(), ResultWriter(Path(tmp) / "b.parquet"), "bench")
    rows = [r for r in results[0].rows if r["status"] == "ok"]
    if len(rows) != reps:
        raise SystemExit(f"fitbench case failed: {results[0].error}")
    keep = ("prefill_tok_s", "decode_tok_s", "peak_rss_bytes", "vmhwm_bytes", "ru_maxrss_bytes", "spawn_s",
            "import_s", "load_s", "case_wall_s", "sampler_samples", "sampler_interval_ms")
    return [{k: r[k] for k in keep} for r in rows]


def sampler_cost(interval_ms: float, seconds: float = 3.0) -> dict:
    """CPU the sampler thread costs the harness process, sampling a 300 MiB idle process."""
    from harness.measure.sampler import Sampler

    proc = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(300 << 20); time.sleep(60)"])
    try:
        time.sleep(1.0)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        timeline = Sampler(proc.pid, interval_ms / 1000).start()
        time.sleep(seconds)
        timeline = timeline.stop()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    finally:
        proc.kill()
        proc.wait()
    return {"interval_ms": interval_ms, "cpu_fraction_of_core": cpu / wall, "samples": len(timeline),
            "asked": round(wall / (interval_ms / 1000))}


def quick_wall_time() -> float:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "harness.cli", "run", str(ROOT / "scenarios" / "quick.yaml"), "-o", tmp],
                       cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - t0


def run_bare(model: Path, n_prompt: int, n_gen: int, threads: int, reps: int) -> list[dict]:
    out = subprocess.run([sys.executable, "-c", BARE_LOOP, str(model), str(n_prompt), str(n_gen), str(threads),
                          str(reps)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_llama_bench(binary: Path, model: Path, n_prompt: int, n_gen: int, threads: int, reps: int) -> list[dict]:
    def once(*args: str) -> list[float]:
        # -fa 0: llama-bench turns flash attention on by default ("auto"); fitbench's llama.cpp
        # runner and llama-cpp-python default to off. Measured here, FA on CPU makes pp512 ~20%
        # faster and tg64 @ d512 ~33% slower, so a default-vs-default comparison is meaningless.
        out = subprocess.run([str(binary), "-m", str(model), "-t", str(threads), "-r", str(reps), "-o", "json",
                              "-fa", "0", *args], capture_output=True, text=True, check=True)
        return [s for test in json.loads(out.stdout) for s in test["samples_ts"]]

    pp = once("-p", str(n_prompt), "-n", "0")
    tg = once("-p", "0", "-n", str(n_gen), "-d", str(n_prompt))
    return [{"prefill_tok_s": a, "decode_tok_s": b} for a, b in zip(pp, tg)]


def median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def cv(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.stdev(values) / statistics.fmean(values) if len(values) > 1 else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--llama-bench", type=Path, default=ROOT / ".cache" / "llama.cpp" / "build" / "bin" / "llama-bench")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="default: physical cores")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="also time the whole scenarios/quick.yaml")
    args = ap.parse_args()
    if not args.model.exists():
        raise SystemExit(f"bench: model not found at {args.model}; run `make sample-models`")
    from runners.llama_cpp import default_threads

    threads = args.threads or default_threads()
    methods = {"fitbench": [], "bare": []}
    have_lb = args.llama_bench.exists()
    if have_lb:
        methods["llama-bench"] = []
    else:
        print(f"bench: no llama-bench at {args.llama_bench} (run `make llama-bench`); comparing with the bare loop only")
    t_start = time.perf_counter()
    for rnd in range(args.rounds):
        for name in methods:
            print(f"round {rnd + 1}/{args.rounds}: {name} ...", flush=True)
            if name == "fitbench":
                methods[name] += run_fitbench(args.model, args.prompt, args.gen, threads, args.reps)
            elif name == "bare":
                methods[name] += run_bare(args.model, args.prompt, args.gen, threads, args.reps)
            else:
                methods[name] += run_llama_bench(args.llama_bench, args.model, args.prompt, args.gen, threads, args.reps)

    report: dict = {
        "what": f"pp{args.prompt} and tg{args.gen} @ depth {args.prompt}, {threads} threads, "
                f"{args.rounds} rounds x {args.reps} repetitions, interleaved",
        "model": args.model.name, "machine": fingerprint().machine_class, "wall_s": time.perf_counter() - t_start,
        "methods": {}, "ratios": {},
    }
    for name, rows in methods.items():
        report["methods"][name] = {k: {"median": median(rows, k), "cv": cv(rows, k), "n": len(rows)}
                                   for k in ("prefill_tok_s", "decode_tok_s")}
    for other in [m for m in methods if m != "fitbench"]:
        for k in ("prefill_tok_s", "decode_tok_s"):
            a, b = median(methods["fitbench"], k), median(methods[other], k)
            report["ratios"][f"{k} fitbench/{other}"] = a / b if a and b else None
    fb = methods["fitbench"]
    gaps = [abs(r["peak_rss_bytes"] - r["vmhwm_bytes"]) / r["vmhwm_bytes"] for r in fb if r.get("vmhwm_bytes")]
    report["sampled_peak_vs_vmhwm_max_rel_gap"] = max(gaps) if gaps else None
    gaps = [abs(r["peak_rss_bytes"] - r["ru_maxrss_bytes"]) / r["ru_maxrss_bytes"] for r in fb if r.get("ru_maxrss_bytes")]
    report["sampled_peak_vs_ru_maxrss_max_rel_gap"] = max(gaps) if gaps else None
    decode_cv = cv(fb, "decode_tok_s") or 0.0
    report["repeatability"] = {
        "decode_cv": decode_cv,
        "prefill_cv": cv(fb, "prefill_tok_s"),
        # 95% CI half-width of the mean within 2%: n >= (1.96 * CV / 0.02)^2
        "repetitions_for_2pct_ci": math.ceil((1.96 * decode_cv / 0.02) ** 2),
    }
    report["startup_s"] = {k: median(fb, k) for k in ("spawn_s", "import_s", "load_s", "case_wall_s")}
    print("sampler cost ...", flush=True)
    report["sampler"] = [sampler_cost(10.0), sampler_cost(1.0)]
    if args.quick:
        print("timing scenarios/quick.yaml ...", flush=True)
        report["quick_yaml_wall_s"] = quick_wall_time()

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "harness.json").write_text(json.dumps(report, indent=2))
    lines = ["# fitbench harness benchmark\n", f"{report['what']}, model {report['model']}, {report['machine']}\n",
             "| method | prefill tok/s (median, CV) | decode tok/s (median, CV) |", "|---|---|---|"]
    for name, m in report["methods"].items():
        p, d = m["prefill_tok_s"], m["decode_tok_s"]
        lines.append(f"| {name} | {p['median']:.1f} ({p['cv'] or 0:.1%}) | {d['median']:.1f} ({d['cv'] or 0:.1%}) |")
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in report["ratios"].items() if v is not None]
    lines.append(f"\nsampled peak RSS vs kernel VmHWM, largest gap: {report['sampled_peak_vs_vmhwm_max_rel_gap']:.2%}; "
                 f"vs getrusage ru_maxrss (what /usr/bin/time -v reports): "
                 f"{report['sampled_peak_vs_ru_maxrss_max_rel_gap'] or 0:.2%}")
    rep = report["repeatability"]
    lines.append(f"decode tok/s CV over {len(fb)} repetitions: {rep['decode_cv']:.1%}; repetitions for a ±2% 95% CI: "
                 f"{rep['repetitions_for_2pct_ci']}")
    st = report["startup_s"]
    lines.append(f"per case: spawn {st['spawn_s']:.2f} s + runtime import {st['import_s']:.2f} s + model load "
                 f"{st['load_s']:.2f} s; whole case {st['case_wall_s']:.1f} s")
    for smp in report["sampler"]:
        lines.append(f"sampler at {smp['interval_ms']:g} ms: {smp['cpu_fraction_of_core']:.2%} of one core, "
                     f"{smp['samples']} samples taken of {smp['asked']} asked")
    if "quick_yaml_wall_s" in report:
        lines.append(f"scenarios/quick.yaml wall time: {report['quick_yaml_wall_s']:.0f} s")
    (args.out / "harness.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwritten: {args.out / 'harness.json'}, {args.out / 'harness.md'}")


if __name__ == "__main__":
    main()
