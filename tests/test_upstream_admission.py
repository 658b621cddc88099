"""The upstream's heavy work is admitted a few at a time and one per token (503 + Retry-After past that),
and what a bundle may hold is the client's allow-list: other columns are dropped, other run ids refused."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import psutil

import harness.share.upstream.app as app_mod
from harness.share import bundle as bundle_mod
from harness.share.upstream.app import Config, create_app
from harness.share.upstream.ratelimit import Limit, RateLimiter
from tests.test_upstream import make_bundle, wire_headers
from tests.test_upstream_trust import gzip_stream
from tests.upstream_helpers import MiB, ThreadServer

JSON = {"content-type": "application/json"}


def active_token(app) -> tuple[str, str]:
    return app.state.store.issue_token("test", status="active")


def post(http: httpx.Client, body: bytes, token, encoding: str | None = "gzip") -> httpx.Response:
    headers = {**JSON, **wire_headers(body, token), **({"content-encoding": encoding} if encoding else {})}
    return http.post("/v1/bundles", content=body, headers=headers)


def test_concurrent_bombs_from_one_token_cost_one_inflation(tmp_path):
    """8 signed bombs at once from one token: one is inflated (413), the others wait for nothing (503 while it
    runs, 429 after: a bomb costs its token several bundles); RSS grows by about one job; health answers."""
    cap = 16 * MiB
    app = create_app(Config(db=tmp_path / "up.sqlite", max_decoded=cap, bundle_limit=Limit(per_minute=1, burst=5)))
    token = active_token(app)
    bomb = gzip_stream(b"\0" * MiB for _ in range(256))  # 256 MiB of zeros, 16 x the cap
    me = psutil.Process()
    codes, health, peak, lock = [], [], [me.memory_info().rss], threading.Lock()
    done = threading.Event()
    with ThreadServer(app) as server:
        base = me.memory_info().rss

        def watch() -> None:
            with httpx.Client(base_url=server.url, timeout=60) as http:
                while not done.is_set():
                    health.append(http.get("/v1/health").status_code)
                    peak.append(me.memory_info().rss)

        def bomber(go: threading.Barrier) -> None:
            with httpx.Client(base_url=server.url, timeout=120) as http:
                go.wait()
                resp = post(http, bomb, token)
                with lock:
                    codes.append((resp.status_code, resp.headers.get("retry-after"), resp.json()["detail"]["error"]))

        go = threading.Barrier(8)
        watcher = threading.Thread(target=watch)
        bombers = [threading.Thread(target=bomber, args=(go,)) for _ in range(8)]
        watcher.start()
        for t in bombers:
            t.start()
        for t in bombers:
            t.join()
        done.set()
        watcher.join()
        after = httpx.get(f"{server.url}/v1/health").status_code
    statuses = sorted(c for c, _, _ in codes)
    assert statuses.count(413) == 1 and set(statuses) <= {413, 429, 503}, codes
    for status, retry_after, error in codes:
        if status in (429, 503):
            assert retry_after and int(retry_after) >= 1 and "\n" not in error, (status, retry_after, error)
    assert health and set(health) == {200} and after == 200
    grown = max(peak) - base
    assert grown < 3 * cap, f"RSS grew {grown / MiB:.0f} MiB with 8 bombs in flight (cap {cap / MiB:.0f} MiB)"


def test_busy_token_and_full_server_get_503_with_retry_after(tmp_path, monkeypatch):
    """While a bundle is being taken in, its token's next one is 503 at once, and with every slot taken
    another token's waits a short while, then is 503 too: never an unbounded queue. Both say when to retry."""
    entered, release = threading.Event(), threading.Event()
    real = app_mod.inflate

    def held_inflate(*args):  # the job holds its slot until the test lets it go
        entered.set()
        assert release.wait(60)
        return real(*args)

    monkeypatch.setattr(app_mod, "inflate", held_inflate)
    app = create_app(Config(db=tmp_path / "up.sqlite", max_ingest=1, ingest_wait=0.2))
    first, second = active_token(app), active_token(app)
    body = json.dumps(bundle_mod.sign(make_bundle(tmp_path), *first)).encode()
    answers = {}
    with ThreadServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        holder = threading.Thread(target=lambda: answers.setdefault("first", post(http, body, first, None)))
        holder.start()
        assert entered.wait(60)
        again = post(http, body, first, None)
        other = post(http, json.dumps(bundle_mod.sign(make_bundle(tmp_path, folder="o", run_id="other-run"), *second)).encode(),
                     second, None)
        assert http.get("/v1/health").status_code == 200 and http.get("/v1/stats").status_code == 200
        release.set()
        holder.join()
        later = post(http, json.dumps(bundle_mod.sign(make_bundle(tmp_path, folder="o", run_id="other-run"), *second)).encode(),
                     second, None)
    assert answers["first"].status_code == 201, answers["first"].text
    assert again.status_code == 503 and again.headers["retry-after"].isdigit(), again.text
    assert "already has a bundle being taken in" in again.json()["detail"]["error"]
    assert other.status_code == 503 and int(other.headers["retry-after"]) >= 1, other.text
    assert "as many bundles as it can" in other.json()["detail"]["error"]
    assert later.status_code == 201, later.text  # a 503 is not charged: the token is not locked out


def test_a_bomb_costs_its_token_several_bundles():
    now = [0.0]
    limiter = RateLimiter(Limit(per_minute=60, burst=5), clock=lambda: now[0])
    assert limiter.take("t") == 0.0
    limiter.penalise("t", 9)  # 4 left, then 9 more: 5 in debt
    assert limiter.take("t") == 6.0  # one request a second refills the debt and one more
    now[0] = 6.0
    assert limiter.take("t") == 0.0 and limiter.take("other") == 0.0


# --- the allow-list, enforced by the server -----------------------------------------------------------------

def send_doc(http: httpx.Client, doc: dict, token) -> httpx.Response:
    return post(http, json.dumps(bundle_mod.sign(doc, *token)).encode(), token, None)


def test_columns_off_the_allow_list_are_never_stored(tmp_path):
    db = tmp_path / "up.sqlite"
    app = create_app(Config(db=db))
    token = active_token(app)
    doc = make_bundle(tmp_path)
    planted = "PLANTED-c0ffee-secret"
    # columns of the results schema that the client never shares, as an old or altered client would send them
    doc["rows"] = [{**r, "task_results_json": json.dumps({"answer": planted}), "fleet_node_id": planted,
                    "scenario": planted} for r in doc["rows"]]
    with ThreadServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        resp = send_doc(http, doc, token)
        assert resp.status_code == 201, resp.text
        row = doc["rows"][0]
        stored = http.get("/v1/rows", params={"artifact_sha256": row["artifact_sha256"], "n_ctx": row["n_ctx"],
                                              "machine_class": row["machine_class"], "runtime": row["runtime"]})
    assert stored.status_code == 200 and stored.json()["total"] == len(doc["rows"])
    assert not {"task_results_json", "fleet_node_id", "scenario"} & set(stored.json()["rows"][0])
    app.state.store.close()
    on_disk = b"".join(p.read_bytes() for p in Path(tmp_path).glob("up.sqlite*"))
    assert planted.encode() not in on_disk


def test_a_run_id_not_in_the_re_derived_form_is_refused(tmp_path):
    app = create_app(Config(db=tmp_path / "up.sqlite"))
    token = active_token(app)
    doc = make_bundle(tmp_path)
    good = doc["rows"][0]["run_id"]
    leaky = "20261128T101502Z-aaaaaa"  # the local form: the run's start second
    n = len(doc["timeline"]["run_id"])
    old = {**doc, "rows": [{**r, "run_id": leaky} for r in doc["rows"]],
           "timeline": {**doc["timeline"], "run_id": [leaky] * n}}
    samples_only = {**doc, "timeline": {**doc["timeline"], "run_id": [good] * (n - 1) + [leaky]}}
    with ThreadServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        answers = [send_doc(http, old, token), send_doc(http, samples_only, token)]
        assert send_doc(http, doc, token).status_code == 201
    for resp in answers:
        assert resp.status_code == 422, resp.text
        error = resp.json()["detail"]["error"]
        assert leaky in error and "re-derived" in error and "fitbench contribute" in error and "\n" not in error
