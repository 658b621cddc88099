"""One prepared check of the torch runner and the NVML sampler on a CUDA GPU (e.g. a lent H200).

Weights cannot travel to that machine, so a small Llama (about 200M
parameters, random weights, bf16) and a word-level tokenizer are made on the
spot in a temporary folder. Then, through the real harness (spawned worker,
sampler, result rows), two cases run:

  full      device=cuda, dtype=bfloat16, StaticCache of 2048, half filled
  offload   the same with device_map=auto and max_gpu_memory at ~45% of the
            weights, so accelerate keeps the remaining layers in host memory

Checks (each reported with its numbers):
  1. both cases give ok rows on cuda;
  2. NVML's memory of the worker process agrees with torch's allocator peak:
     0 <= gpu_proc_peak - runtime_peak <= 1 GiB + 25% of runtime_peak
     (NVML also counts the CUDA context, cuBLAS workspaces and the caching
     allocator's reserved-but-free blocks; torch.cuda.max_memory_allocated
     counts live tensors only). Where NVML cannot see the worker's PID (a
     container without the host PID namespace) the device-wide growth over
     the idle baseline is compared instead, and the report says so;
  3. the offload case reports offload_host_bytes > 0, fewer layers on the
     GPU than the model has, fit_offload true and fit class offload (or worse),
     and a smaller allocator peak than the full case.

Writes gpu_check.json (and the Parquet rows) to $OUT, else results/gpu_check/.
Exit 0 when every check passes, 1 when one fails, 2 when something needed is
missing. Needs torch, transformers, accelerate, nvidia-ml-py and the harness's
own dependencies (psutil, PyYAML, pyarrow): `pip install -e '.[torch]'`.

Without a CUDA GPU (or with --dry-run) it builds a tiny model and runs only
the full case on the CPU, to prove the script and the pipeline work; GPU
checks are reported as skipped. Budget: well under 8 minutes on either.

Usage: python bench/gpu_check.py [--dry-run] [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)  # the spawned worker runs `python -m harness.worker` from the current folder

GIB = 2**30
NEEDED = ("torch", "transformers", "accelerate", "tokenizers", "psutil", "yaml", "pyarrow")
N_CTX, GEN_TOKENS, REPETITIONS = 2048, 32, 2


def build_model(folder: Path, gpu: bool) -> dict:
    """A random-weight Llama and a word-level tokenizer covering the harness's prompt words."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from harness.worker.prompt import WORDS

    words = sorted(set(WORDS) | {w.capitalize() for w in WORDS} | {".", ",", "?", "!"})
    vocab = {tok: i for i, tok in enumerate(["[UNK]", "[BOS]", "[EOS]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]")
    dims = (dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                 num_key_value_heads=4, vocab_size=8192) if gpu else
            dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024))
    config = LlamaConfig(**dims, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(folder))
    fast.save_pretrained(str(folder))
    n_params = sum(p.numel() for p in model.parameters())
    del model
    return {**dims, "n_params": n_params, "weights_bytes": 2 * n_params}


def nvml_device_used() -> int | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        used = sum(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).used
                   for i in range(pynvml.nvmlDeviceGetCount()))
        pynvml.nvmlShutdown()
        return int(used)
    except Exception:
        return None


def run_cases(folder: Path, out: Path, gpu: bool, offload_cap: int) -> list[dict]:
    from harness.measure.machine import fingerprint
    from harness.preflight import check_scenario
    from harness.results import ResultWriter, read_results
    from harness.scenario import parse_scenario
    from harness.suite import new_run_id, run_suite

    models = [{"artifact": str(folder), "runtime": "torch", "label": "full",
               "options": {"device": "cuda" if gpu else "cpu", "dtype": "bfloat16"}}]
    if gpu:
        models.append({"artifact": str(folder), "runtime": "torch", "label": "offload",
                       "options": {"device": "cuda", "dtype": "bfloat16", "device_map": "auto",
                                   "max_gpu_memory": f"{offload_cap // 2**20}MiB"}})
    scenario = parse_scenario({
        "name": "gpu-check", "models": models, "contexts": [N_CTX if gpu else 512], "fill": 0.5,
        "gen_tokens": GEN_TOKENS, "warmup": 1, "repetitions": REPETITIONS, "timeout": 240,
    }, source="gpu_check")
    artifacts = check_scenario(scenario)
    writer = ResultWriter(out / "gpu_check.parquet")

    def progress(case):
        print(f"  case {case.model_label}: {case.label} ...", flush=True)

    run_suite(scenario.cases(), artifacts, fingerprint(), writer, new_run_id(), on_case_start=progress, force=True)
    return read_results(writer.results_path).to_pylist()


KEEP = ("model_label", "status", "error", "device", "n_layers_total", "n_layers_device", "n_ctx_runtime",
        "n_ctx_meaning", "kv_type", "prompt_tokens", "gen_tokens", "load_s", "ttft_s", "prefill_tok_s",
        "decode_tok_s", "peak_rss_bytes", "vmhwm_bytes", "runtime_peak_bytes", "offload_host_bytes",
        "offload_device_bytes", "gpu_total_bytes", "gpu_used_peak_bytes", "gpu_proc_peak_bytes",
        "gpu_util_mean_pct", "gpu_power_mean_w", "fit_class", "fit_reason", "fit_offload", "energy_source")


def check(checks: list, name: str, passed: bool | None, detail: str) -> None:
    checks.append({"check": name, "passed": passed, "detail": detail})
    mark = {True: "PASS", False: "FAIL", None: "SKIP"}[passed]
    print(f"  [{mark}] {name}: {detail}", flush=True)


def judge(rows: list[dict], gpu: bool, baseline_used: int | None) -> list[dict]:
    checks: list[dict] = []
    by = {}
    for r in rows:
        by.setdefault(r["model_label"], []).append(r)
    full = by.get("full", [])
    ok = bool(full) and all(r["status"] == "ok" for r in full)
    check(checks, "full case ok", ok, "; ".join(f"{r['status']} {r.get('error') or ''}".strip() for r in full))
    if not gpu:
        check(checks, "cpu row has peak memory", ok and all(r["peak_rss_bytes"] for r in full),
              f"peak RSS {[r['peak_rss_bytes'] for r in full]}")
        for name in ("nvml agrees with torch allocator", "offload reported"):
            check(checks, name, None, "no CUDA GPU (dry run)")
        return checks
    if ok:
        r = full[0]
        check(checks, "full case on cuda", r["device"] == "cuda" and r["n_layers_device"] == r["n_layers_total"],
              f"device {r['device']}, {r['n_layers_device']}/{r['n_layers_total']} layers on the GPU")
        alloc, proc = r["runtime_peak_bytes"], r["gpu_proc_peak_bytes"]
        source = "NVML per-process"
        if proc is None and r["gpu_used_peak_bytes"] is not None and baseline_used is not None:
            proc, source = r["gpu_used_peak_bytes"] - baseline_used, "NVML device growth over idle (PID not visible)"
        if alloc is None or proc is None:
            check(checks, "nvml agrees with torch allocator", False, f"allocator peak {alloc}, NVML {proc}: missing")
        else:
            gap = proc - alloc
            limit = GIB + 0.25 * alloc
            check(checks, "nvml agrees with torch allocator", 0 <= gap <= limit,
                  f"{source} {proc / 2**20:,.0f} MiB vs torch max_memory_allocated {alloc / 2**20:,.0f} MiB: "
                  f"gap {gap / 2**20:,.0f} MiB (allowed 0..{limit / 2**20:,.0f})")
    off = by.get("offload", [])
    if not off or any(r["status"] != "ok" for r in off):
        check(checks, "offload reported", False, "; ".join(f"{r['status']} {r.get('error') or ''}" for r in off) or "no rows")
    else:
        r = off[0]
        host, dev = r["offload_host_bytes"] or 0, r["offload_device_bytes"] or 0
        fine = (host > 0 and dev > 0 and r["fit_offload"] and r["fit_class"] in ("offload", "spill", "no_fit")
                and (r["n_layers_device"] or 0) < (r["n_layers_total"] or 0))
        check(checks, "offload reported", fine,
              f"host {host / 2**20:,.0f} MiB, GPU {dev / 2**20:,.0f} MiB, layers {r['n_layers_device']}/"
              f"{r['n_layers_total']}, fit {r['fit_class']} ({r['fit_reason']})")
        if ok and r["runtime_peak_bytes"] and full[0]["runtime_peak_bytes"]:
            check(checks, "offload lowers the GPU peak", r["runtime_peak_bytes"] < full[0]["runtime_peak_bytes"],
                  f"{r['runtime_peak_bytes'] / 2**20:,.0f} MiB vs {full[0]['runtime_peak_bytes'] / 2**20:,.0f} MiB")
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU: checks the script, not the GPU")
    parser.add_argument("--out", type=Path,
                        default=Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "results" / "gpu_check")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "python": platform.python_version()}
    t0 = time.perf_counter()
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        report.update(status="missing_deps", missing=missing, hint="pip install -e '.[torch]'")
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
        print(f"gpu_check: missing {', '.join(missing)}: pip install -e '.[torch]'", file=sys.stderr)
        return 2
    import torch

    gpu = torch.cuda.is_available() and not args.dry_run
    report.update(mode="gpu" if gpu else "cpu-dry-run", torch=torch.__version__,
                  cuda=torch.version.cuda, gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                  if torch.cuda.is_available() else [], nvml=importlib.util.find_spec("pynvml") is not None)
    if not gpu and not args.dry_run:
        print("gpu_check: torch sees no CUDA GPU; running the CPU dry run instead", flush=True)
    print(f"gpu_check: mode {report['mode']}, torch {torch.__version__}, GPUs {report['gpus'] or 'none'}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fitbench-gpu-check-") as tmp:
        folder = Path(tmp) / "random-llama"
        t = time.perf_counter()
        report["model"] = build_model(folder, gpu)
        report["model"]["build_s"] = round(time.perf_counter() - t, 1)
        print(f"  model: {report['model']['n_params'] / 1e6:.0f}M params, built in {report['model']['build_s']} s", flush=True)
        cap = int(0.45 * report["model"]["weights_bytes"])
        report["offload_max_gpu_memory_bytes"] = cap if gpu else None
        report["baseline_gpu_used_bytes"] = baseline = nvml_device_used() if gpu else None
        rows = run_cases(folder, args.out, gpu, cap)
    report["rows"] = [{k: r.get(k) for k in KEEP} for r in rows]
    report["checks"] = judge(rows, gpu, baseline)
    failed = [c for c in report["checks"] if c["passed"] is False]
    report["status"] = "fail" if failed else "pass"
    report["elapsed_s"] = round(time.perf_counter() - t0, 1)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    for r in report["rows"]:
        print(f"  {r['model_label']:8} {r['status']:6} ttft {r['ttft_s'] or 0:.3f} s  decode {r['decode_tok_s'] or 0:.1f} tok/s"
              f"  torch peak {(r['runtime_peak_bytes'] or 0) / 2**20:,.0f} MiB"
              f"  NVML proc {(r['gpu_proc_peak_bytes'] or 0) / 2**20:,.0f} MiB"
              f"  host {(r['offload_host_bytes'] or 0) / 2**20:,.0f} MiB  fit {r['fit_class']}", flush=True)
    print(f"gpu_check: {report['status']} in {report['elapsed_s']} s -> {args.out / 'gpu_check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
