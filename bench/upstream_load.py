"""Bounded load test of `fitbench upstream serve` on loopback: many clients submitting at once.

A real results file (default: a tiny `fitbench run` of the sample model made here)
is turned into CLIENTS x BUNDLES distinct bundles (one machine per client, one
run per bundle, all other figures and the raw timeline as measured), each sent
TWICE so half the requests are repeats. Afterwards the server must hold exactly
CLIENTS x BUNDLES bundles and their rows: nothing lost, nothing duplicated.
A 429 or 503 (the server's admission control: --max-ingest bundles at once)
is retried after its Retry-After, as ``fitbench contribute`` does; the
latency of a send includes those waits.
Writes throughput and latency to results/bench/upstream.json.

Usage: python bench/upstream_load.py [--clients 50] [--bundles 20] [--results FILE] [--out results/bench]
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_ATTEMPTS = 60  # per send: a bundle the server keeps deferring counts as a failure after this
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import httpx  # noqa: E402
from upstream_helpers import free_port, wait_healthy  # noqa: E402

from harness.share import bundle as bundle_mod  # noqa: E402
from harness.share.contribute import build, parse_token  # noqa: E402
from harness.share.upstream.ingest import SIGNATURE_HEADER, body_signature  # noqa: E402


def real_results(folder: Path) -> Path:
    scenario = folder / "tiny.yaml"
    scenario.write_text(f"name: tiny\nmodels:\n  - artifact: {ROOT / 'models/SmolLM2-135M-Instruct.Q4_1.gguf'}\n"
                        "    runtime: llama.cpp\ncontexts: [256]\nfill: 0.5\ngen_tokens: 8\nwarmup: 1\n"
                        "repetitions: 2\ntimeout: 300\n")
    subprocess.run([sys.executable, "-m", "harness.cli", "run", str(scenario), "-o", str(folder)], check=True,
                   cwd=ROOT, stdout=subprocess.DEVNULL)
    return Path(next(p for p in glob.glob(f"{folder}/tiny-*.parquet") if not p.endswith(".timeline.parquet")))


def variant(doc: dict, run_id: str, machine_id: str) -> dict:
    run_id = "u1-" + hashlib.sha256(run_id.encode()).hexdigest()[:24]  # the form the client's run ids have
    rows = [{**r, "run_id": run_id, "machine_id": machine_id} for r in doc["rows"]]
    n = len(doc["timeline"]["run_id"])
    timeline = {**doc["timeline"], "run_id": [run_id] * n, "machine_id": [machine_id] * n}
    return {**doc, "rows": rows, "timeline": timeline}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--bundles", type=int, default=20, help="distinct bundles per client (each sent twice)")
    ap.add_argument("--results", type=Path, help="results file to vary (default: a tiny real run made now)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = args.results or real_results(tmp)
        base = build([source]).doc
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [sys.executable, "-m", "harness.cli", "upstream", "serve", "--db", str(tmp / "load.sqlite"),
             "--port", str(port), "--tokens-per-minute", "100000", "--bundles-per-minute", "100000",
             "--requests-per-minute", "1000000", "--open", "--no-quarantine"],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_healthy(url)
            # Bodies are made before the clock starts: this measures the server, not the signing.
            bodies: list[list[tuple[bytes, str]]] = []  # (body, its request signature header)
            for i in range(args.clients):
                token = parse_token(httpx.post(f"{url}/v1/tokens").json()["token"])
                signed = [gzip.compress(json.dumps(bundle_mod.sign(
                    variant(base, f"load-{i}-{j}", f"loadmachine{i:04d}"), *token)).encode(), 6)
                    for j in range(args.bundles)]
                bodies.append([(b, f"{token[0]}:{body_signature(token[1], b)}") for b in signed])
            latencies: list[float] = []
            failures: list[str] = []
            answers = {"new": 0, "duplicate": 0}
            deferred = [0]  # 429/503 answers retried after Retry-After
            lock = threading.Lock()

            def client(i: int) -> None:
                with httpx.Client(base_url=url, timeout=300) as http:
                    for body, signature in bodies[i]:
                        for _ in range(2):  # every bundle twice: the repeat must add nothing
                            t0 = time.perf_counter()
                            for _attempt in range(MAX_ATTEMPTS):
                                resp = http.post("/v1/bundles", content=body, headers={
                                    "content-type": "application/json", "content-encoding": "gzip",
                                    SIGNATURE_HEADER: signature})
                                if resp.status_code not in (429, 503):
                                    break
                                # as fitbench contribute does: the server's admission control says when
                                with lock:
                                    deferred[0] += 1
                                time.sleep(float(resp.headers.get("retry-after") or 1) * (0.5 + random.random()))
                            dt = time.perf_counter() - t0
                            with lock:
                                latencies.append(dt)
                                if resp.status_code == 201:
                                    answers["new"] += 1
                                elif resp.status_code == 200 and resp.json().get("duplicate"):
                                    answers["duplicate"] += 1
                                else:
                                    failures.append(f"{resp.status_code}: {resp.text[:200]}")

            threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            stats = httpx.get(f"{url}/v1/stats").json()
        finally:
            server.terminate()
            server.wait(timeout=60)

    expected_bundles = args.clients * args.bundles
    expected_rows = expected_bundles * len(base["rows"])
    lat = sorted(latencies)
    result = {
        "clients": args.clients, "bundles_per_client": args.bundles, "requests": len(latencies),
        "rows_per_bundle": len(base["rows"]), "timeline_samples_per_bundle": len(base["timeline"].get("t_s", [])),
        "body_bytes_gzip": len(bodies[0][0][0]), "wall_s": round(wall, 2),
        "requests_per_s": round(len(latencies) / wall, 1), "new_bundles_per_s": round(expected_bundles / wall, 1),
        "rows_per_s": round(expected_rows / wall, 1),
        # per bundle sent, waits after a 429/503 included
        "latency_p50_s": round(statistics.median(lat), 4), "latency_p95_s": round(lat[int(0.95 * (len(lat) - 1))], 4),
        "latency_max_s": round(lat[-1], 4),
        "answers": answers, "deferred_then_retried": deferred[0], "failures": len(failures), "failure_examples": failures[:3],
        "stored_bundles": stats["bundles"], "stored_rows": stats["rows"], "stored_machines": stats["machines"],
        "expected_bundles": expected_bundles, "expected_rows": expected_rows,
        "lost_rows": expected_rows - stats["rows"] if stats["rows"] < expected_rows else 0,
        "duplicated_rows": stats["rows"] - expected_rows if stats["rows"] > expected_rows else 0,
        "source": source.name, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_1m_at_end": round(os.getloadavg()[0], 1),  # a shared machine's numbers need this context
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "upstream.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    ok = not failures and stats["bundles"] == expected_bundles and stats["rows"] == expected_rows
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
