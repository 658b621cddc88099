"""What running a case through the fleet costs over running it locally, on this machine.

Starts a Ray cluster here (a head that runs nothing and one fitbench agent node), then runs the same
small scenario on the sample model locally (``run_suite``, as ``fitbench run`` does) and through the
fleet (``fitbench fleet run``'s code path), alternating rounds so both see the same background load.
Per case it reports the wall time the user waits (fleet: from submitting to the result being written,
per case, as the cases run one after another on the one node) and the case's own wall time inside
its worker (``case_wall_s``, identical code on both paths), and the difference: Ray's scheduling,
the task's start-up and the row's trip back. Writes results/bench/fleet.json.

Usage: python bench/fleet_overhead.py [--contexts 256,512] [--gen-tokens 8] [--rounds 2] [--out results/bench]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.fleet import launch  # noqa: E402
from harness.fleet.resources import agent_resources  # noqa: E402
from harness.measure.machine import fingerprint  # noqa: E402
from harness.preflight import check_scenario  # noqa: E402
from harness.results import ResultWriter  # noqa: E402
from harness.scenario import parse_contexts, parse_scenario  # noqa: E402
from harness.suite import new_run_id, run_suite  # noqa: E402

SAMPLE = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def local_round(sc, cases, artifacts, out: Path) -> tuple[float, list[dict]]:
    run_id = new_run_id()
    writer = ResultWriter(out / f"local-{run_id}.parquet")
    per_case, started = [], {}
    t0 = time.perf_counter()
    results = run_suite(cases, artifacts, fingerprint(), writer, run_id,
                        on_case_start=lambda c: started.__setitem__(c.key, time.perf_counter()),
                        on_case_end=lambda r: per_case.append({
                            "case": r.case.label, "status": r.status, "wall_s": time.perf_counter() - started[r.case.key],
                            "case_wall_s": r.rows[0].get("case_wall_s")}))
    assert all(r.status == "ok" for r in results), [r.error for r in results]
    return time.perf_counter() - t0, per_case


def fleet_round(sc, cases, artifacts, address: str, out: Path) -> tuple[float, list[dict]]:
    t0 = time.perf_counter()
    plan = launch.plan(address, cases, artifacts, None, force=False)
    per_case: list[dict] = []
    last = [time.perf_counter()]

    def on_case_end(o) -> None:
        now = time.perf_counter()
        per_case.append({"case": o.placement.case.label, "status": o.status, "wall_s": now - last[0],
                         "task_wall_s": o.wall_s, "case_wall_s": o.rows[0].get("case_wall_s")})
        last[0] = now

    def on_start(ds, todo, refused) -> None:
        last[0] = time.perf_counter()  # from submitting the cases

    try:
        _, summary = launch.run(sc, cases, artifacts, plan, out, address, False, False, 2, 60.0,
                                on_start=on_start, on_case_end=on_case_end)
    finally:
        plan.ray.shutdown()
    assert all(o.status == "ok" for o in summary.outcomes) and not summary.not_run, summary
    return time.perf_counter() - t0, per_case


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="256,512")
    ap.add_argument("--gen-tokens", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    args = ap.parse_args()
    from ray.cluster_utils import Cluster

    sc = parse_scenario({"name": "fleetbench", "models": [{"artifact": str(SAMPLE), "runtime": "llama.cpp"}],
                         "contexts": parse_contexts(args.contexts), "fill": 0.5, "gen_tokens": args.gen_tokens,
                         "warmup": 0, "repetitions": 1, "timeout": 600}, source="bench/fleet_overhead.py")
    artifacts = check_scenario(sc)
    cases = sc.cases()
    Path("/tmp/ray").mkdir(exist_ok=True)
    os.environ["RAY_worker_niceness"] = "0"  # as `fitbench fleet agent` starts its node
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, object_store_memory=80 << 20,
                                                                include_dashboard=False))
    rounds = []
    try:
        cluster.add_node(num_cpus=1, object_store_memory=80 << 20,
                         resources=agent_resources("bench-node", ["llama.cpp"], fingerprint().ram_bytes))
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.rounds):
                local_total, local_cases = local_round(sc, cases, artifacts, Path(tmp))
                fleet_total, fleet_cases = fleet_round(sc, cases, artifacts, cluster.address, Path(tmp))
                rounds.append({"local_total_s": local_total, "fleet_total_s": fleet_total,
                               "local_cases": local_cases, "fleet_cases": fleet_cases})
                print(f"round {i + 1}: local {local_total:.1f} s, fleet {fleet_total:.1f} s for {len(cases)} case(s)")
    finally:
        cluster.shutdown()

    def med(values: list[float]) -> float:
        return statistics.median(values)

    n = len(cases)
    local_per_case = [r["local_total_s"] / n for r in rounds]
    fleet_per_case = [r["fleet_total_s"] / n for r in rounds]
    local_case = [c["wall_s"] for r in rounds for c in r["local_cases"]]
    fleet_case = [c["wall_s"] for r in rounds for c in r["fleet_cases"]]
    task_overhead = [c["task_wall_s"] - c["case_wall_s"] for r in rounds for c in r["fleet_cases"]]
    local_inner = [c["wall_s"] - c["case_wall_s"] for r in rounds for c in r["local_cases"]]
    fleet_outer = [c["wall_s"] - c["case_wall_s"] for r in rounds for c in r["fleet_cases"]]
    summary = {
        "machine": fingerprint().machine_class, "cases": n, "rounds": args.rounds,
        "scenario": {"contexts": sc.contexts, "gen_tokens": sc.gen_tokens, "repetitions": 1, "warmup": 0},
        "per_case_wall_s": {"local": med(local_case), "fleet": med(fleet_case),
                            "difference": med(fleet_case) - med(local_case)},
        "per_case_including_connect_s": {"local": med(local_per_case), "fleet": med(fleet_per_case),
                                         "difference": med(fleet_per_case) - med(local_per_case)},
        "fleet_task_overhead_s": {"median": med(task_overhead), "max": max(task_overhead),
                                  "what": "task wall - case_wall_s: fingerprint, artifact inspection, result trip"},
        # The robust figure: time per case outside the case's own worker, so case-speed noise cancels.
        "outside_case_s": {"local": med(local_inner), "fleet": med(fleet_outer),
                           "difference": med(fleet_outer) - med(local_inner),
                           "what": "user-visible wall per case - case_wall_s (same worker code on both paths)"},
        "rounds_detail": rounds,
        "note": "one machine plays head and node; 2 shared cores, so absolute case times are noisy",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "fleet.json"
    path.write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "rounds_detail"}, indent=2))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
