"""How long `compare` takes over a million result rows (synthetic, written here).

Two sides of 500,000 rows each: 100,000 cases x 5 repetitions, every column
of the real schema present. Prints and writes results/bench/compare.json.

Usage: python bench/compare_speed.py [--rows 1000000] [--out results/bench]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.analyse.compare import Side, compare  # noqa: E402
from harness.results import RESULT_SCHEMA, SCHEMA_VERSION, write_atomic  # noqa: E402


def synthetic(n_rows: int, reps: int, slowdown: float, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    n_cases = n_rows // reps
    case = np.repeat(np.arange(n_cases), reps)
    n_ctx = 512 * (1 + case % 16)
    cols = {name: pa.nulls(len(case), RESULT_SCHEMA.field(name).type) for name in RESULT_SCHEMA.names}
    cols.update({
        "schema_version": pa.array([SCHEMA_VERSION] * len(case)),
        "run_id": pa.array([f"run{seed}"] * len(case)),
        "case_key": pa.array([f"k{c}" for c in case]),
        "case_label": pa.array([f"pp{n // 2}+tg32 @ ctx{n}" for n in n_ctx]),
        "model_label": pa.array([f"model{c % 5000}" for c in case]),
        "artifact_sha256": pa.array([f"{c % 5000:064x}" for c in case]),
        "artifact_name": pa.array([f"model{c % 5000}.gguf" for c in case]),
        "runtime": pa.array(["llama.cpp"] * len(case)),
        "runtime_version": pa.array(["0.3.36"] * len(case)),
        "options_json": pa.array(['{"n_threads": 2, "type_k": "f16"}'] * len(case)),
        "n_ctx": pa.array(n_ctx), "prompt_tokens": pa.array(case + 1),  # one key per case
        "gen_tokens": pa.array(np.full(len(case), 32)), "status": pa.array(["ok"] * len(case)),
        "repetition": pa.array(np.tile(np.arange(reps), n_cases)),
        "decode_tok_s": pa.array(rng.normal(80 * slowdown, 2, len(case))),
        "prefill_tok_s": pa.array(rng.normal(300, 5, len(case))),
        "ttft_s": pa.array(rng.normal(1.0, 0.02, len(case))),
        "peak_rss_bytes": pa.array(np.full(len(case), 300 << 20)),
        "fit_class": pa.array(["fits"] * len(case)), "budget_method": pa.array(["none"] * len(case)),
        "machine_class": pa.array(["cpu-x86_64-24GiB"] * len(case)), "machine_id": pa.array(["m"] * len(case)),
    })
    return pa.table({name: cols[name] for name in RESULT_SCHEMA.names}, schema=RESULT_SCHEMA)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="total rows over both sides")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        a, b = Path(tmp) / "a.parquet", Path(tmp) / "b.parquet"
        write_atomic(synthetic(args.rows // 2, 5, 1.0, 1), a)
        write_atomic(synthetic(args.rows // 2, 5, 0.97, 2), b)
        t_write = time.perf_counter() - t0
        t0 = time.perf_counter()
        cmp = compare(Side("a", [a]), Side("b", [b]), 2.0)
        t_compare = time.perf_counter() - t0
    report = {"rows": args.rows, "cases_per_side": args.rows // 2 // 5, "write_s": t_write, "compare_s": t_compare,
              "matched_cases": sum(1 for r in cmp.rows if r["metric"] == "decode"), "regressions": len(cmp.regressions(2.0))}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
