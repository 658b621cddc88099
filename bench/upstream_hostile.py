"""`fitbench upstream serve` under a hostile client: does an honest contributor still get through?

One real server on loopback (its default limits; ``--trust-proxy 127.0.0.1`` so each
simulated client is its own address through X-Forwarded-For, as behind a reverse proxy).
Measured in two phases of the same length, in one run:

  quiet    /v1/health probed every 50 ms (open loop), and an honest contributor sending a new real
           bundle (a tiny run of the sample model, re-keyed per bundle) every 0.5 s;
  hostile  the same, while two hostile addresses each send at the per-address request
           rate the server allows: one with its own operator-issued token (signed gzip bombs,
           JSON element and nesting bombs, garbage, each a valid signature over its bytes),
           one with none (bombs with forged or missing signatures, wrong content types).

p50/p95/max latency of health and of the honest ingest per phase, hostile/quiet p95 ratios,
the server's peak RSS per phase and the hostile answers by status code go to
results/bench/upstream_hostile.json. Every honest bundle must be stored (201) in both phases.
Bounded: --duration seconds per phase, loopback only.

Usage: python bench/upstream_hostile.py [--duration 20] [--hostile-rate 20] [--results FILE] [--out results/bench]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import httpx  # noqa: E402
import psutil  # noqa: E402
from upstream_helpers import free_port, wait_healthy  # noqa: E402
from upstream_load import real_results, variant  # noqa: E402

from harness.share import bundle as bundle_mod  # noqa: E402
from harness.share.contribute import build  # noqa: E402
from harness.share.upstream.ingest import SIGNATURE_HEADER, body_signature  # noqa: E402
from harness.share.upstream.store import Store  # noqa: E402

MiB = 2**20
HONEST, HOSTILE_TOKEN, HOSTILE_ANON = "198.51.100.5", "203.0.113.10", "203.0.113.20"


def gzip_stream(pieces) -> bytes:
    gz = zlib.compressobj(9, zlib.DEFLATED, 31)
    return b"".join(gz.compress(p) for p in pieces) + gz.flush()


def hostile_payloads(token: tuple[str, str], victim_id: str) -> dict[str, list[tuple[bytes, dict]]]:
    """(body, headers) per attack; the token stream signs its bytes, the anonymous one cannot."""
    zeros = gzip_stream(b"\0" * MiB for _ in range(1024))                           # 1 GiB in ~1 MiB
    elements = gzip_stream([b"["] + [b"[]," * 100_000] * 200 + [b"[]]"])            # 60 MiB of [[],...]
    deep = gzip_stream([b"[" * 200_000, b"]" * 200_000])                             # nesting 200,000
    garbage = random.Random(7).randbytes(256 * 1024)
    json_h = {"content-type": "application/json"}

    def signed(body: bytes, encoding: str | None = "gzip") -> tuple[bytes, dict]:
        headers = {**json_h, SIGNATURE_HEADER: f"{token[0]}:{body_signature(token[1], body)}"}
        return body, {**headers, **({"content-encoding": encoding} if encoding else {})}

    forged = {SIGNATURE_HEADER: f"{victim_id}:{'0' * 64}"}  # the honest token's id, read from a shared bundle
    return {
        "token": [signed(zeros), signed(elements), signed(deep), signed(garbage), signed(garbage, None)],
        "anon": [(zeros, {**json_h, "content-encoding": "gzip", **forged}), (elements, {**json_h, **forged}),
                 (garbage, {**json_h, "content-encoding": "gzip"}), (garbage, {"content-type": "text/plain"}),
                 (b"{" * 4096, {**json_h, SIGNATURE_HEADER: "x" * 500})],
    }


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * (len(values) - 1) + 0.5))]


def summary(values: list[float]) -> dict:
    r = lambda v: None if v is None else round(v * 1000, 2)  # noqa: E731
    return {"n": len(values), "p50_ms": r(percentile(values, 0.5)), "p95_ms": r(percentile(values, 0.95)),
            "max_ms": r(max(values) if values else None)}


def run_phase(url: str, duration: float, honest: list[tuple[bytes, dict]], hostile: dict | None, rate: float,
              server: psutil.Process) -> dict:
    stop = time.monotonic() + duration
    health, ingest, honest_status, hostile_status = [], [], Counter(), Counter()
    peak_rss, failed = [server.memory_info().rss], [0]
    lock = threading.Lock()

    def prober() -> None:
        """A probe every 50 ms whether or not the last one answered (open loop), each timed from when it
        was due, so a stalled server shows as slow probes, not as missing ones; no answer in 10 s counts 10 s."""

        def one(due: float) -> None:
            try:
                ok = http.get("/v1/health").status_code == 200
            except httpx.HTTPError:
                ok = False
            dt = time.perf_counter() - due
            with lock:
                health.append(dt if ok else max(dt, 10.0))
                failed[0] += not ok
                peak_rss.append(server.memory_info().rss)

        with httpx.Client(base_url=url, timeout=10, limits=httpx.Limits(max_connections=32)) as http, \
                ThreadPoolExecutor(32) as pool:
            i, start = 0, time.perf_counter()
            while time.monotonic() < stop:
                pool.submit(one, start + i * 0.05)
                i += 1
                time.sleep(max(0.0, start + i * 0.05 - time.perf_counter()))

    def contributor() -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            for body, headers in honest:
                if time.monotonic() >= stop:
                    break
                t0 = time.perf_counter()
                status = http.post("/v1/bundles", content=body, headers={**headers, "x-forwarded-for": HONEST}
                                   ).status_code
                dt = time.perf_counter() - t0
                with lock:
                    ingest.append(dt)
                    honest_status[status] += 1
                time.sleep(max(0.0, 0.5 - dt))

    def attacker(stream: str, address: str) -> None:
        """Requests started at ``rate`` per second whatever the answers take (a pool keeps the pace)."""
        payloads = hostile[stream]

        def one(i: int) -> None:
            if time.monotonic() >= stop:  # queued behind slow answers past the phase: not sent
                with lock:
                    hostile_status[f"{stream} not sent (client behind)"] += 1
                return
            body, headers = payloads[i % len(payloads)]
            try:
                status = http.post("/v1/bundles", content=body, headers={**headers, "x-forwarded-for": address}
                                   ).status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            with lock:
                hostile_status[f"{stream} {status}"] += 1

        with httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(max_connections=16)) as http, \
                ThreadPoolExecutor(16) as pool:
            i, start = 0, time.monotonic()
            while time.monotonic() < stop:
                pool.submit(one, i)
                i += 1
                time.sleep(max(0.0, start + i / rate - time.monotonic()))

    threads = [threading.Thread(target=prober), threading.Thread(target=contributor)]
    if hostile:
        threads += [threading.Thread(target=attacker, args=(s, a)) for s, a in (("token", HOSTILE_TOKEN),
                                                                                  ("anon", HOSTILE_ANON))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"health": {**summary(health), "failed_or_timed_out": failed[0]}, "honest_ingest": summary(ingest),
            "honest_answers": {str(k): v for k, v in sorted(honest_status.items())},
            "hostile_answers": dict(sorted(hostile_status.items())) if hostile else {},
            "server_peak_rss_mib": round(max(peak_rss) / MiB, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per phase (quiet, then hostile)")
    ap.add_argument("--hostile-rate", type=float, default=20.0,
                    help="requests per second from EACH hostile address (default: the server's per-address limit, "
                         "1200 a minute)")
    ap.add_argument("--results", type=Path, help="results file for the honest bundles (default: a tiny real run)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = args.results or real_results(tmp)
        db = tmp / "hostile.sqlite"
        store = Store(db)  # the operator issues both tokens, as `fitbench upstream token create` does
        honest_token = store.issue_token("honest", status="active")
        hostile_token = store.issue_token("hostile", status="active")
        store.close()
        base = build([source]).doc
        per_phase = int(args.duration / 0.5) + 2
        honest: list[tuple[bytes, dict]] = []
        for j in range(2 * per_phase):
            doc = bundle_mod.sign(variant(base, f"honest-{j}", "honestmachine"), *honest_token)
            body = gzip.compress(json.dumps(doc).encode(), 6)
            honest.append((body, {"content-type": "application/json", "content-encoding": "gzip",
                                  SIGNATURE_HEADER: f"{honest_token[0]}:{body_signature(honest_token[1], body)}"}))
        hostile = hostile_payloads(hostile_token, honest_token[0])
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "harness.cli", "upstream", "serve", "--db", str(db), "--port", str(port),
             "--trust-proxy", "127.0.0.1"],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_healthy(url)
            server = psutil.Process(proc.pid)
            load_before = os.getloadavg()[0]
            quiet = run_phase(url, args.duration, honest[:per_phase], None, args.hostile_rate, server)
            attacked = run_phase(url, args.duration, honest[per_phase:], hostile, args.hostile_rate, server)
            stats = httpx.get(f"{url}/v1/stats").json()
        finally:
            proc.terminate()
            proc.wait(timeout=60)

    def ratio(key: str) -> float | None:
        a, b = attacked[key]["p95_ms"], quiet[key]["p95_ms"]
        return round(a / b, 2) if a is not None and b else None

    sent = sum(quiet["honest_answers"].values()) + sum(attacked["honest_answers"].values())
    stored_ok = quiet["honest_answers"].get("201", 0) + attacked["honest_answers"].get("201", 0)
    result = {
        "duration_s_per_phase": args.duration, "hostile_rate_per_address_per_s": args.hostile_rate,
        "hostile_addresses": 2, "quiet": quiet, "hostile": attacked,
        "p95_ratio_hostile_over_quiet": {"health": ratio("health"), "honest_ingest": ratio("honest_ingest")},
        "honest_bundles_sent": sent, "honest_bundles_stored": stored_ok, "stored_bundles": stats["bundles"],
        "honest_body_bytes_gzip": len(honest[0][0]), "source": source.name,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_1m_before": round(load_before, 1),
        "load_average_1m_at_end": round(os.getloadavg()[0], 1),  # a shared machine's numbers need this context
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "upstream_hostile.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    ok = sent > 0 and stored_ok == sent == stats["bundles"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
