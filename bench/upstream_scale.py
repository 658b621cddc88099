"""GET /v1/fits at scale: time and server memory with ROWS rows stored for one artifact, on SQLite and PostgreSQL.

The store is filled through its ingest path, ``Store.submit`` (the call the
HTTP handler makes once a bundle has passed its checks: rows stored, each
judged by the server, and the per-(key, token) votes and per-key fits
updated in the same transaction), so the aggregate state is exactly what
that many real uploads leave; only the HTTP transport and the plausibility
checks are skipped. Rows are variants of one anonymised row of the sample
model (a crafted, consistent results file): TOKENS contributors, each
sending bundles of --per-bundle rows across CLASSES machine classes x
CONTEXTS contexts (one artifact, one runtime), decode and peak spread around
a centre. Then ``fitbench upstream serve`` runs in its own process and
answers GET /v1/fits?artifact_sha256=... QUERIES times; the JSON has the
latencies, the answer's size and the server's RSS (current and high-water).

PostgreSQL: a throwaway server (tests/postgres_server.py) unless --pg URL.

Usage: python bench/upstream_scale.py [--rows 1000000] [--stores sqlite,postgresql] [--out results/bench]
       (a quick smoke run: --rows 10000)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psutil  # noqa: E402

from harness.share.anonymise import Identity  # noqa: E402
from harness.share.contribute import build  # noqa: E402
from harness.share.upstream.store import Store  # noqa: E402
from tests.postgres_server import create_database, throwaway_postgres  # noqa: E402
from tests.upstream_helpers import SHA, free_port, wait_healthy, write_results  # noqa: E402

CLASSES = ["cpu-x86_64-16GiB", "cpu-x86_64-32GiB", "cpu-arm64-16GiB", "apple-m2-16GiB"]
CONTEXTS = [512, 1024, 2048, 4096, 8192]


def template_row(folder: Path) -> dict:
    return build([write_results(folder)], Identity(["bench-host"])).doc["rows"][0]


BULK_FROM_ROWS = 100_000  # --fill auto: bulk from this many rows on


def bundle_rows(template: dict, bundle: int, n: int, tokens: int, seed: int) -> list[dict]:
    """The rows of the bench's bundle number ``bundle`` (its own random stream: the same rows whichever
    path stores them, and in whatever order)."""
    rng = random.Random(seed * 1_000_003 + bundle)
    machine = f"{bundle % tokens:06d}-{(bundle // tokens) % 3}"  # each contributor: up to 3 machines
    batch = []
    for i in range(n):
        decode = rng.gauss(80.0, 4.0) if rng.random() > 0.01 else rng.uniform(1000, 5000)  # 1 % wild
        batch.append({**template, "run_id": f"b{bundle:07d}", "repetition": i, "machine_id": machine,
                      "machine_class": CLASSES[(bundle + i) % len(CLASSES)],
                      "n_ctx": CONTEXTS[(i // len(CLASSES)) % len(CONTEXTS)], "decode_tok_s": decode,
                      "peak_rss_bytes": int(rng.gauss(190, 5) * 2**20)})
    return batch


def submissions(rows: int, tokens: int, per_bundle: int, bulk_rows: int | None):
    """(token index, bench bundle numbers) per Store.submit call. Submit path: one bench bundle per call,
    tokens in turn. Bulk path: a token's bench bundles joined into calls of about ``bulk_rows`` rows (one
    transaction each), so the per-bundle work (the aggregate refresh of every key a bundle touches,
    which reads all of that token's rows there) is paid once per thousands of rows."""
    count = -(-rows // per_bundle)
    if not bulk_rows:
        for b in range(count):
            yield b % tokens, [b]
        return
    for t in range(tokens):
        group: list[int] = []
        for b in range(t, count, tokens):
            group.append(b)
            if len(group) * per_bundle >= bulk_rows:
                yield t, group
                group = []
        if group:
            yield t, group


def fill(store: Store, template: dict, rows: int, tokens: int, per_bundle: int, bulk_rows: int | None,
         seed: int = 7, at: tuple[int, ...] = (), reached=None) -> dict:
    """Store ``rows`` rows through Store.submit: the bench bundles of --per-bundle rows one call each
    (``bulk_rows`` None), or joined per token into calls of ``bulk_rows`` rows. The stored rows, votes
    and fits are the same either way; only the bundles table (and each row's bundle hash) differs.
    ``reached(done)`` is called once the store holds each count in ``at`` (a measurement while filling)."""
    ids = [store.issue_token(f"bench{i}", quota_bytes=2**40, status="active")[0] for i in range(tokens)]
    t0, done, calls, shown = time.perf_counter(), 0, 0, 0
    for t, group in submissions(rows, tokens, per_bundle, bulk_rows):
        batch = [r for b in group for r in bundle_rows(template, b, min(per_bundle, rows - b * per_bundle),
                                                        tokens, seed)]
        # the server hashes the request body before submit; a bench bundle is named by its numbers instead
        digest = hashlib.sha256(f"bench-{seed}-{rows}-{group}".encode()).hexdigest()
        store.submit({"bundle_version": 1, "rows": batch, "timeline": {}, "token_id": ids[t]}, digest)
        before, done, calls = done, done + len(batch), calls + 1
        if reached and any(before < a <= done for a in at):
            reached(done)
        if done * 20 // rows > shown:
            shown = done * 20 // rows
            rate = done / (time.perf_counter() - t0)
            print(f"  {done:,} rows stored ({rate:,.0f} rows/s, load {os.getloadavg()[0]:.2f})",
                  file=sys.stderr, flush=True)
    path = (f"bulk: Store.submit, {bulk_rows:,}-row bundles (one transaction each)" if bulk_rows
            else f"submit: Store.submit, {per_bundle:,}-row bundles")
    return {"rows": rows, "fill_path": path, "submit_calls": calls, "tokens": tokens,
            "fill_s": round(time.perf_counter() - t0, 1),
            "fill_rows_per_s": round(rows / (time.perf_counter() - t0)), "load_avg_1m_after_fill":
            round(os.getloadavg()[0], 2)}


@contextlib.contextmanager
def serve(db: str):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "upstream", "serve", "--db", db, "--port",
                             str(port), "--requests-per-minute", "1000000"], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        yield url, psutil.Process(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def high_water(proc: psutil.Process) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def measure(db: str, queries: int) -> dict:
    with serve(db) as (url, proc), httpx.Client(base_url=url, timeout=300) as http:
        rss_idle = proc.memory_info().rss
        times, size, answer = [], 0, {}
        for _ in range(queries):
            t = time.perf_counter()
            resp = http.get("/v1/fits", params={"artifact_sha256": SHA, "limit": 1000})
            times.append(time.perf_counter() - t)
            resp.raise_for_status()
            size, answer = len(resp.content), resp.json()
        t = time.perf_counter()
        rows = http.get(answer["fits"][0]["rows_url"] + "&limit=100")
        rows_s = time.perf_counter() - t
        times.sort()
        return {"fits_entries": len(answer["fits"]), "fits_total": answer["total"], "answer_bytes": size,
                "votes_in_first": answer["fits"][0]["votes"], "rows_in_first": answer["fits"][0]["rows"],
                "get_fits_p50_ms": round(statistics.median(times) * 1e3, 2),
                "get_fits_p95_ms": round(times[int(0.95 * (len(times) - 1))] * 1e3, 2),
                "get_fits_max_ms": round(times[-1] * 1e3, 2), "get_rows_page_ms": round(rows_s * 1e3, 2),
                "rows_page_status": rows.status_code,
                "server_rss_idle_mib": round(rss_idle / 2**20, 1),
                "server_rss_after_mib": round(proc.memory_info().rss / 2**20, 1),
                "server_rss_high_water_mib": round((high_water(proc) or 0) / 2**20, 1)}


def run_one(kind: str, args, template: dict, work: Path, pg_base: str | None, done_results: list, save) -> dict:
    if kind == "sqlite":
        db = str(work / "scale.sqlite")
    else:
        db = create_database(pg_base, f"scale_{os.getpid()}")
    bulk = args.bulk_rows if args.fill == "bulk" or (args.fill == "auto" and args.rows >= BULK_FROM_ROWS) else None
    print(f"{kind}: filling {args.rows:,} rows ({'bulk' if bulk else 'submit'} path)", file=sys.stderr, flush=True)
    store = Store(db)
    partial: list[dict] = []

    def reached(done: int) -> None:  # a measurement on the way: a fill cut short still leaves figures
        partial.append({"rows_stored": done, "load_avg_1m": round(os.getloadavg()[0], 2),
                        **measure(db, args.queries)})
        print(json.dumps(partial[-1]), file=sys.stderr, flush=True)
        save([*done_results, {"store": kind, "rows": args.rows, "unfinished": True, "on_the_way": partial}])

    at = tuple(int(a) for a in args.measure_at.split(",") if a.strip()) if args.measure_at else ()
    filled = fill(store, template, args.rows, args.tokens, args.per_bundle, bulk, at=at, reached=reached)
    if kind == "sqlite":
        size = sum(p.stat().st_size for p in work.glob("scale.sqlite*"))
    else:
        with store.db.read() as c:
            size = c.one("SELECT pg_database_size(current_database())")[0]
    store.close()
    result = {"store": kind, **filled, "db_bytes": size, "load_avg_1m_at_measure": round(os.getloadavg()[0], 2),
              **measure(db, args.queries), "on_the_way": partial}
    print(json.dumps(result), file=sys.stderr, flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows stored for the one artifact")
    ap.add_argument("--tokens", type=int, default=200, help="contributors (one vote each per key)")
    ap.add_argument("--per-bundle", type=int, default=500, help="rows per bundle")
    ap.add_argument("--fill", choices=("auto", "bulk", "submit"), default="auto",
                    help=f"how the store is filled: bulk (each token's rows in --bulk-rows bundles), submit "
                         f"(--per-bundle bundles, as uploads come); auto: bulk from {BULK_FROM_ROWS:,} rows")
    ap.add_argument("--bulk-rows", type=int, default=5000, help="rows per Store.submit call in the bulk fill")
    ap.add_argument("--queries", type=int, default=50, help="GET /v1/fits requests timed")
    ap.add_argument("--stores", default="sqlite,postgresql", help="comma list: sqlite, postgresql")
    ap.add_argument("--pg", help="an existing PostgreSQL server's base URL (default: start a throwaway one)")
    ap.add_argument("--out", type=Path, default=ROOT / "results/bench")
    ap.add_argument("--measure-at", default="",
                    help="comma list of row counts at which GET /v1/fits is also measured while filling")
    args = ap.parse_args()
    results: list[dict] = []

    def save(shown: list[dict]) -> None:
        args.out.mkdir(parents=True, exist_ok=True)
        load = os.getloadavg()
        (args.out / "upstream_scale.json").write_text(json.dumps({
            "machine": platform.platform(), "cpus": os.cpu_count(), "rows": args.rows,
            "load_avg_at_end": [round(x, 2) for x in load],
            "fill": "Store.submit (the ingest path, minus HTTP and plausibility); each result's fill_path says "
                    "which bundles", "results": shown}, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="upscale-") as tmp:
        work = Path(tmp)
        template = template_row(work)
        for kind in args.stores.split(","):
            if kind == "postgresql":
                with (contextlib.nullcontext(args.pg) if args.pg else throwaway_postgres(fsync=True)) as base:
                    results.append(run_one(kind, args, template, work, base, results, save))
            else:
                results.append(run_one(kind, args, template, work, None, results, save))
            save(results)
    print(f"wrote {args.out / 'upstream_scale.json'}")


if __name__ == "__main__":
    main()
