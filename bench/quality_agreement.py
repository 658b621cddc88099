"""Cross-runtime agreement of the quality probe: llama.cpp GGUFs against torch on the HF checkpoint.

Scores the same evaluation text (the stdlib docstrings) with transformers
(fp32 and bf16) on models/SmolLM2-135M-Instruct-hf and with llama.cpp on each
GGUF given, then reports perplexity, KL(torch fp32 || artifact) and top-1
agreement, plus a repeat of the first GGUF to show run-to-run spread. The HF
folder was dequantized from the Q4_1 sample, and the F16 GGUF was converted
back from it, so F16 GGUF vs HF fp32 differ only by arithmetic.

    .venv/bin/python bench/quality_agreement.py --out results/bench \
        models/SmolLM2-135M-Instruct.F16.gguf models/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.quality import probe as Q  # noqa: E402
from harness.quality.text import stdlib_text  # noqa: E402
from runners.llama_cpp import LlamaCppRunner  # noqa: E402
from tests.torch_reference import TransformersScorer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ggufs", nargs="+", type=Path)
    parser.add_argument("--hf", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct-hf")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    args = parser.parse_args()
    text = stdlib_text()
    rows = []

    def keep(scored):
        return {k: scored[k] for k in ("top_ids", "top_lp", "tail_lp")}

    def record(name, runtime, tokens, scored, seconds):
        row = {"artifact": name, "runtime": runtime, "positions": int(len(scored["nll"])),
               "ppl": float(np.exp(scored["nll"].mean())), "seconds": round(seconds, 1)}
        if "kl" in scored:
            row.update(kl_mean=float(scored["kl"].mean()), kl_p99=float(np.percentile(scored["kl"], 99)),
                       top1=float(scored["agree"].mean()))
        rows.append(row)
        print(json.dumps(row), flush=True)

    t0 = time.perf_counter()
    fp32 = TransformersScorer(args.hf, "float32")
    tokens = Q.eval_tokens(fp32, text.text, args.tokens)
    ref = Q.score(fp32, tokens, args.window, args.top_k)
    record(args.hf.name, "torch fp32 (reference)", tokens, ref, time.perf_counter() - t0)
    t0 = time.perf_counter()
    bf16 = TransformersScorer(args.hf, "bfloat16")
    record(args.hf.name, "torch bf16", tokens, Q.score(bf16, tokens, args.window, args.top_k, keep(ref)),
           time.perf_counter() - t0)
    del fp32, bf16

    for i, gguf in enumerate([*args.ggufs, args.ggufs[0]]):
        t0 = time.perf_counter()
        runner = LlamaCppRunner()
        runner.prepare()
        runner.load(gguf, args.window, {})
        mine = Q.eval_tokens(runner, text.text, args.tokens)
        if mine != tokens:
            raise SystemExit(f"{gguf.name} tokenizes the text differently from {args.hf.name}")
        scored = Q.score(runner, mine, args.window, args.top_k, keep(ref))
        runner.close()
        record(gguf.name, "llama.cpp" + (" (repeat)" if i == len(args.ggufs) else ""), mine, scored,
               time.perf_counter() - t0)

    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "quality_agreement.json"
    out.write_text(json.dumps({"text_id": text.text_id, "text_sha256": text.sha256, "tokens": args.tokens,
                               "window": args.window, "top_k": args.top_k, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
