"""The upstream store on both databases (SQLite and a throwaway PostgreSQL server): incremental aggregates
equal a full recomputation, one vote per token, robust statistics, paging and search, deleting, the
track-record rule, two ingest processes on one PostgreSQL, and what /v1/health must never wait for."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone

import pytest
from fastapi.testclient import TestClient

from harness.share.anonymise import Identity
from harness.share.contribute import build
from harness.share.upstream import aggregate
from harness.share.upstream.app import Config, create_app
from harness.share.upstream.store import Store
from harness.share.upstream.validate import check_bundle
from tests import postgres_server as pg
from tests.test_cli import assert_usage_error, fitbench
from tests.test_upstream import HOST, app_client, new_token, send
from tests.upstream_helpers import SHA, write_results

postgres_server, pg_url, store_target = pg.postgres_server, pg.pg_url, pg.store_target  # the fixtures


def doc_of(tmp_path, name: str, token: str | None = None, **kw) -> dict:
    folder = tmp_path / name
    folder.mkdir()
    doc = build([write_results(folder, run_id=kw.pop("run_id", f"run-{name}"), **kw)], Identity([HOST])).doc
    return {**doc, "token_id": token} if token else doc


def served(store: Store) -> list[dict]:
    return store.fits()


def rebuilt(store: Store) -> list[dict]:
    store.rebuild()
    return store.fits()


def test_incremental_aggregates_equal_a_recomputation_on_both_stores(tmp_path, store_target):
    store = Store(store_target)
    alice, _ = store.issue_token("alice", status="active")
    bob, _ = store.issue_token("bob", status="active")
    carol, _ = store.issue_token("carol", status="quarantined")
    docs = {
        "a1": doc_of(tmp_path, "a1", alice, machine_id="m-a1", decode=80.0),
        "a2": doc_of(tmp_path, "a2", alice, machine_id="m-a2", decode=70.0, n_ctx=1024),
        "b1": doc_of(tmp_path, "b1", bob, machine_id="m-b1", decode=90.0),
        "c1": doc_of(tmp_path, "c1", carol, machine_id="m-c1", decode=60.0),
    }
    results = {k: store.submit(d) for k, d in docs.items()}
    assert all(r["new_rows"] == 2 for r in results.values())
    assert store.submit(docs["a1"])["duplicate"]  # a repeat changes nothing
    fits = served(store)
    assert [(f["n_ctx"], f["votes"], f["machines"]) for f in fits] == [(512, 2, 2), (1024, 1, 1)]
    # one vote per token: alice's 512 rows and bob's are two votes, carol (quarantined) none
    assert fits[0]["decode_tok_s"]["median"] == pytest.approx(85.0) and fits[0]["decode_tok_s"]["n"] == 2
    assert fits[0]["rows_url"].startswith("/v1/rows?artifact_sha256=" + SHA)
    assert served(store) == rebuilt(store)
    assert store.set_status(carol, "active")
    assert served(store)[0]["votes"] == 3 and served(store) == rebuilt(store)
    assert store.set_status(bob, "revoked")
    assert served(store)[0]["votes"] == 2 and served(store) == rebuilt(store)
    done = store.delete_bundle(results["a2"]["bundle"])
    assert done == {"bundles": 1, "rows": 2, "keys": 1}
    assert [f["n_ctx"] for f in served(store)] == [512] and served(store) == rebuilt(store)
    assert store.delete_token(alice)["rows"] == 2
    [only] = served(store)
    assert only["votes"] == 1 and only["decode_tok_s"]["median"] == pytest.approx(60.0)
    assert served(store) == rebuilt(store)
    assert store.delete_bundle("0" * 64) is None and store.delete_token("nobody") is None
    store.close()


def test_one_token_is_one_vote_however_many_machines_it_names(tmp_path, store_target):
    store = Store(store_target)
    for i, decode in enumerate((78.0, 80.0, 82.0)):
        tid, _ = store.issue_token(status="active")
        store.submit(doc_of(tmp_path, f"h{i}", tid, machine_id=f"honest-{i}", decode=decode, reps=1))
    forger, _ = store.issue_token(status="active")
    for i in range(10):
        store.submit(doc_of(tmp_path, f"f{i}", forger, machine_id=f"forged-{i}", decode=8000.0, reps=1))
    [fit] = store.fits()
    assert fit["machines"] == 13 and fit["tokens"] == 4 and fit["votes"] == 3 and fit["outlier_votes"] == 1
    assert fit["decode_tok_s"]["median"] == pytest.approx(80.0) and fit["decode_tok_s"]["outliers"] == [8000.0]
    store.close()


def test_robust_statistics_set_apart_only_what_is_far_and_beyond_the_noise():
    assert aggregate.robust([78.0, 80.0, 82.0, 5000.0])[2] == {3}
    assert aggregate.robust([80.0, 80.0, 80.0, 84.0])[2] == set()  # within 10 %: noise between machines
    assert aggregate.robust([80.0, 80.0, 80.0, 200.0])[2] == {3}  # MAD 0: most votes agree exactly
    assert aggregate.robust([10.0, 1000.0])[2] == set()  # two votes: neither is the odd one out
    s = aggregate.spread([1.0, 2.0, 3.0, 10.0], outliers=[99.0])
    assert s["median"] == 2.5 and s["mad"] == 1.0 and s["n"] == 4 and s["outliers"] == [99.0]
    assert (s["min"], s["max"]) == (1.0, 10.0)
    assert aggregate.most_common_worst(aggregate.Counter({"fits": 2, "spill": 2})) == "spill"


def test_the_artifact_name_is_the_one_most_tokens_used_and_undated_rows_name_nothing(tmp_path, store_target):
    store = Store(store_target)
    for i in range(2):
        tid, _ = store.issue_token(status="active")
        store.submit(doc_of(tmp_path, f"g{i}", tid, machine_id=f"good-{i}"))
    evil, _ = store.issue_token(status="active")
    doc = doc_of(tmp_path, "e", evil, machine_id="evil")  # "None" once sorted above every date:
    doc["rows"] = [{**r, "artifact_name": "EVIL.gguf", "artifact_size_bytes": 1, "started_at": None}
                   for r in doc["rows"]]
    store.submit(doc)
    late, _ = store.issue_token(status="active")
    doc = doc_of(tmp_path, "l", late, machine_id="late")  # the latest, but one token of three naming it so
    doc["rows"] = [{**r, "artifact_name": "LATE.gguf", "started_at": "2099-01-01T00:00:00+00:00"} for r in doc["rows"]]
    store.submit(doc)
    [fit] = store.fits()
    assert fit["artifact"]["name"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and fit["artifact"]["size_bytes"] == 98362432
    assert store.artifacts("smol")[0]["artifact_name"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert store.artifacts("evil") == []
    store.close()


def test_fits_rows_and_artifacts_filter_and_page_over_http(tmp_path, store_target):
    client = TestClient(create_app(Config(db=store_target, open_tokens=True)), raise_server_exceptions=False)
    token = new_token(client)
    for n_ctx in (256, 512, 1024, 2048, 4096):
        assert send(client, doc_of(tmp_path, f"c{n_ctx}", n_ctx=n_ctx, run_id=f"r{n_ctx}"), token).status_code == 201
    first = client.get("/v1/fits", params={"limit": 2}).json()
    assert set(first) == {"generated_at", "schema_version", "fits", "total", "next_offset"}
    assert first["total"] == 5 and first["next_offset"] == 2 and [f["n_ctx"] for f in first["fits"]] == [256, 512]
    last = client.get("/v1/fits", params={"limit": 2, "offset": 4}).json()
    assert [f["n_ctx"] for f in last["fits"]] == [4096] and last["next_offset"] is None
    for params, total in (({"artifact": "smollm2-135m"}, 5), ({"artifact": SHA[:10]}, 5), ({"artifact": "100%_"}, 0),
                          ({"artifact_sha256": SHA, "machine_class": "cpu-x86_64-24GiB", "runtime": "llama.cpp"}, 5),
                          ({"runtime": "mlx"}, 0), ({"machine_class": "nvidia-h200-141GiB"}, 0)):
        assert client.get("/v1/fits", params=params).json()["total"] == total, params
    fit = first["fits"][1]
    for m in ("decode_tok_s", "ttft_s", "prefill_tok_s", "peak_rss_bytes"):
        assert {"median", "mad", "n", "outliers", "min", "max"} <= set(fit[m])
    assert {"votes", "tokens", "machines", "rows", "outlier_votes", "rows_url"} <= set(fit)
    rows = client.get(fit["rows_url"] + "&limit=1").json()
    assert rows["total"] == 2 and rows["next_offset"] == 1 and rows["rows"][0]["n_ctx"] == 512
    assert rows["rows"][0]["fit_class"] == "fits" and "claimed_fit_class" in rows["rows"][0]
    [art] = client.get("/v1/artifacts", params={"q": "Q4_1"}).json()
    assert art == {"artifact_sha256": SHA, "artifact_name": "SmolLM2-135M-Instruct.Q4_1.gguf",
                   "machine_classes": ["cpu-x86_64-24GiB"], "runtimes": ["llama.cpp"], "keys": 5}
    for bad in ({"limit": 0}, {"limit": 1001}, {"offset": -1}, {"artifact": "x" * 81}):
        assert client.get("/v1/fits", params=bad).status_code == 400, bad
    assert client.get("/v1/rows", params={"artifact_sha256": SHA}).status_code == 400
    client.app.state.store.close()


def test_health_and_reads_do_not_wait_for_an_ingest_in_progress(tmp_path):
    client = app_client(tmp_path)
    token = new_token(client)
    assert send(client, doc_of(tmp_path, "a"), token).status_code == 201
    store = client.app.state.store
    held, release = threading.Event(), threading.Event()

    def ingest_in_progress():  # the writer's lock and the database's write lock, held as an ingest holds them
        with store.db.write() as c:
            c.q("UPDATE token_state SET used_bytes = used_bytes")
            held.set()
            release.wait(60)

    writer = threading.Thread(target=ingest_in_progress)
    writer.start()
    try:
        assert held.wait(30)
        assert client.get("/v1/health").json()["ok"] is True
        assert client.get("/v1/fits").json()["total"] == 1  # WAL: a read sees the last commit, waits for nothing
        assert writer.is_alive()  # ... all while the write was still open
    finally:
        release.set()
        writer.join(30)


def test_the_sqlite_file_is_private_and_synchronous_full(tmp_path):
    store = Store(tmp_path / "up.sqlite")
    assert stat.S_IMODE(os.stat(tmp_path / "up.sqlite").st_mode) == 0o600
    with store.db.write() as c:
        assert c.one("PRAGMA synchronous")[0] == 2  # FULL
    store.close()


def test_an_ok_row_needs_its_timeline_and_a_failure_its_reason(tmp_path):
    doc = doc_of(tmp_path, "t")
    no_timeline = [{**r, "sampler_samples": 0} for r in doc["rows"]]
    assert any("needs its timeline" in r for r in check_bundle(no_timeline, {}))
    failed = [{**r, "status": "oom", "error": " "} for r in doc["rows"]]
    assert any("says why it failed" in r for r in check_bundle(failed, doc["timeline"]))


def test_a_quarantined_token_earns_its_vote_by_agreeing_over_time(tmp_path, store_target):
    store = Store(store_target)
    for i in range(2):
        tid, _ = store.issue_token(status="active")
        store.submit(doc_of(tmp_path, f"h{i}", tid, machine_id=f"h{i}", decode=80.0 + i))
    newcomer, _ = store.issue_token()
    liar, _ = store.issue_token()
    later = datetime.now(timezone.utc) + timedelta(hours=25)
    for i in range(3):
        store.submit(doc_of(tmp_path, f"n{i}", newcomer, machine_id="n", run_id=f"n{i}", decode=79.0))
        store.submit(doc_of(tmp_path, f"l{i}", liar, machine_id="l", run_id=f"l{i}", decode=900.0))
    assert not store.promote_if_earned(newcomer, 3, 24)  # not 24 hours yet
    assert not store.promote_if_earned(newcomer, 4, 0, at=later)  # not 4 bundles
    assert not store.promote_if_earned(liar, 3, 24, at=later)  # an outlier where it overlaps
    assert store.fits()[0]["votes"] == 2
    assert store.promote_if_earned(newcomer, 3, 24, at=later)
    assert store.token(newcomer)["status"] == "active" and store.fits()[0]["votes"] == 3
    refused, _ = store.issue_token()
    store.submit(doc_of(tmp_path, "r", refused, machine_id="r", decode=80.0))
    store.record_refusal(refused)
    assert not store.promote_if_earned(refused, 1, 0, at=later)
    store.close()


def test_delete_command_removes_a_bundle_or_a_token_and_recomputes(tmp_path):
    db = tmp_path / "up.sqlite"
    store = Store(db)
    tid, _ = store.issue_token(status="active")
    first = store.submit(doc_of(tmp_path, "a", tid, machine_id="a"))["bundle"]
    store.submit(doc_of(tmp_path, "b", tid, machine_id="b", n_ctx=1024))
    store.close()
    done = fitbench("upstream", "delete", "--db", str(db), "--bundle", first[:16])  # as contribute prints it
    assert done.returncode == 0 and "deleted 1 bundle(s), 2 row(s); 1 fit(s) recomputed" in done.stdout, done.stderr
    assert [f["n_ctx"] for f in Store(db).fits()] == [1024]
    assert fitbench("upstream", "delete", "--db", str(db), "--token", tid).returncode == 0
    assert Store(db).fits() == []
    assert_usage_error(fitbench("upstream", "delete", "--db", str(db)), "--bundle HASH or --token ID")
    assert_usage_error(fitbench("upstream", "delete", "--db", str(db), "--bundle", "nope"), "no bundle")


INGEST = """
import json, sys
from harness.share.upstream.store import Store
store = Store(sys.argv[1])
docs = json.load(open(sys.argv[2]))
print(json.dumps([store.submit(d)["duplicate"] for d in docs]))
"""


def test_two_ingest_processes_on_one_postgresql_store_once_and_lose_nothing(tmp_path, pg_url):
    store = Store(pg_url)
    tokens = [store.issue_token(status="active")[0] for _ in range(4)]
    shared = [doc_of(tmp_path, f"s{i}", tokens[i % 4], machine_id=f"s{i}", decode=70.0 + i) for i in range(6)]
    mine = {side: [doc_of(tmp_path, f"{side}{i}", tokens[i % 4], machine_id=f"{side}{i}", run_id=f"{side}{i}",
                          decode=75.0 + i) for i in range(4)] for side in "ab"}
    procs = []
    for side in "ab":
        path = tmp_path / f"{side}.json"
        path.write_text(json.dumps(shared + mine[side] if side == "a" else mine[side] + shared[::-1]))
        procs.append(subprocess.Popen([sys.executable, "-c", INGEST, pg_url, str(path)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()}))
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    duplicates = [json.loads(o[0]) for o in outs]
    # each shared bundle stored by exactly one of the two, every own bundle by its sender
    assert sum(d.count(False) for d in duplicates) == 6 + 8
    stats = store.stats()
    assert stats["bundles"] == 14 and stats["rows"] == 28
    fits = store.fits()
    assert fits == rebuilt(store) and fits[0]["tokens"] == 4 and fits[0]["machines"] == 14
    store.close()


@pytest.mark.parametrize("mutate", [lambda r: r.update(machine_class="cpu\x00x"), lambda r: r.update(prompt_tokens=2**70),
                                    lambda r: r.update(runtime_version="v\x00")], ids=["nul", "huge", "nul-optional"])
def test_values_a_database_cannot_hold_are_a_4xx_on_both_stores(tmp_path, store_target, mutate):
    client = TestClient(create_app(Config(db=store_target, open_tokens=True)), raise_server_exceptions=False)
    doc = doc_of(tmp_path, "x")
    for row in doc["rows"]:
        mutate(row)
    resp = send(client, doc, new_token(client))
    assert 400 <= resp.status_code < 500, resp.text
    assert client.get("/v1/stats").json()["rows"] == 0
    client.app.state.store.close()


def test_open_mode_promotes_a_token_when_its_bundle_completes_its_track_record(tmp_path):
    client = app_client(tmp_path, promote_bundles=2, promote_hours=0)
    for i in range(2):
        assert send(client, doc_of(tmp_path, f"h{i}", machine_id=f"h{i}", run_id=f"h{i}"),
                    new_token(client)).status_code == 201
    newcomer = new_token(client, approve=False)
    first = send(client, doc_of(tmp_path, "n0", machine_id="n", run_id="n0"), newcomer).json()
    assert "token_status" not in first and client.get("/v1/fits").json()["fits"][0]["votes"] == 2
    second = send(client, doc_of(tmp_path, "n1", machine_id="n", run_id="n1"), newcomer).json()
    assert second["token_status"] == "active" and client.get("/v1/fits").json()["fits"][0]["votes"] == 3
    never = app_client(tmp_path / "off", promote_bundles=1, promote_hours=0, auto_promote=False)
    token = new_token(never, approve=False)
    assert "token_status" not in send(never, doc_of(tmp_path, "o", run_id="o"), token).json()


def test_serve_and_token_commands_take_a_postgresql_url(tmp_path, pg_url):
    import httpx

    from tests.upstream_helpers import free_port, wait_healthy

    made = fitbench("upstream", "token", "create", "--db", pg_url, "--name", "pg")
    assert made.returncode == 0 and "active" in made.stdout, made.stderr
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "upstream", "serve", "--db", pg_url, "--port",
                             str(port)], env={**os.environ, "PYTHONPATH": os.getcwd()}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"http://127.0.0.1:{port}")
        answer = httpx.get(f"http://127.0.0.1:{port}/v1/fits").json()
        assert answer["fits"] == [] and answer["total"] == 0 and answer["next_offset"] is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    listed = fitbench("upstream", "token", "list", "--db", pg_url)
    assert listed.returncode == 0 and "pg" in listed.stdout
    down = pg_url.rsplit(":", 1)[0] + ":1/nothing"
    assert_usage_error(fitbench("upstream", "token", "list", "--db", down), "cannot")


def test_catalog_pull_follows_the_pages_of_v1_fits():
    from fastapi import FastAPI

    from harness.share.client import Retry, fetch_fits
    from tests.upstream_helpers import ThreadServer

    app, asked = FastAPI(), []

    @app.get("/v1/health")
    async def health() -> dict:
        return {"ok": True}

    @app.get("/v1/fits")
    async def fits(limit: int = 100, offset: int = 0) -> dict:
        asked.append((limit, offset))
        total = 2500
        page = [{"n": i} for i in range(offset, min(offset + limit, total))]
        return {"fits": page, "total": total, "next_offset": offset + len(page) if offset + len(page) < total else None}

    with ThreadServer(app) as server:
        data = fetch_fits(server.url, Retry(attempts=1), lambda msg: None)
    assert [f["n"] for f in data["fits"]] == list(range(2500)) and asked == [(1000, 0), (1000, 1000), (1000, 2000)]
