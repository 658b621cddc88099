"""Contributing upstream: anonymising, bundle checks, plausibility, the server's answers, catalog pull.

Crafted (but internally consistent) result files here; tests/test_upstream_e2e.py does the same
with real runs of the sample model and a real `fitbench upstream serve`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import threading
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from harness.catalog import load_catalog, save_catalog, update_catalog
from harness.results import read_results
from harness.share import bundle as bundle_mod
from harness.share.anonymise import Identity, upstream_machine_id
from harness.share.community import merge_community
from harness.share.contribute import build, parse_token
from harness.share.upstream.app import Config, create_app
from harness.share.upstream.ingest import SIGNATURE_HEADER, body_signature
from harness.share.upstream.ratelimit import Limit
from harness.share.upstream.validate import check_bundle, check_row
from tests.test_cli import assert_usage_error, fitbench
from tests.upstream_helpers import MiB, ThreadServer, write_results

HOST = "alice-laptop"


def make_bundle(tmp_path: Path, **kw) -> dict:
    folder = tmp_path / kw.pop("folder", "r")
    folder.mkdir(exist_ok=True)
    return build([write_results(folder, **kw)], Identity([HOST])).doc


def app_client(tmp_path: Path, **cfg) -> TestClient:
    cfg.setdefault("open_tokens", True)
    return TestClient(create_app(Config(db=tmp_path / "up.sqlite", **cfg)), raise_server_exceptions=False)


def new_token(client: TestClient, approve: bool = True) -> tuple[str, str]:
    """A self-service token (open mode), approved by the operator unless told otherwise."""
    resp = client.post("/v1/tokens")
    assert resp.status_code == 201, resp.text
    token = parse_token(resp.json()["token"])
    if approve:
        assert client.app.state.store.set_status(token[0], "active")
    return token


def wire_headers(body: bytes, token: tuple[str, str] | None) -> dict:
    return {SIGNATURE_HEADER: f"{token[0]}:{body_signature(token[1], body)}"} if token else {}


def send(client: TestClient, doc: dict, token: tuple[str, str] | None, gz: bool = True,
         wire: tuple[str, str] | None = None):
    """POST a bundle signed with ``token``; the request body signed with ``wire`` (default: the same)."""
    signed = bundle_mod.sign(doc, *token) if token else doc
    body = json.dumps(signed).encode()
    headers = {"content-type": "application/json", "idempotency-key": bundle_mod.content_hash(signed)}
    if gz:
        body, headers["content-encoding"] = gzip.compress(body), "gzip"
    return client.post("/v1/bundles", content=body, headers={**headers, **wire_headers(body, wire or token)})


# --- anonymising and the bundle ----------------------------------------------------------------------------

def test_anonymising_strips_identity_and_keeps_what_compares(tmp_path):
    path = write_results(tmp_path, error=None, fit_reason=f"ran on {HOST} reading /home/alice/models/m.gguf")
    built = build([path], Identity([HOST]))
    text = bundle_mod.canonical(built.doc).decode()
    assert "/home/alice" not in text and HOST not in text and "d6657c6bd240a6e3" not in text
    row = built.doc["rows"][0]
    assert row["artifact_path"] == row["artifact_name"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert row["fit_reason"] == "ran on <redacted> reading m.gguf"
    assert row["machine_id"] == upstream_machine_id("d6657c6bd240a6e3")
    assert row["started_at"] == "2026-11-28T10:00:00+00:00" and row["os"] == "Linux 6.18"
    # what makes rows comparable is untouched
    local = read_results(path).to_pylist()[0]
    for key in ("machine_class", "runtime_version", "artifact_sha256", "decode_tok_s", "peak_rss_bytes", "cpu_model"):
        assert row[key] == local[key]
    assert len(built.doc["timeline"]["t_s"]) == local["sampler_samples"]
    assert check_bundle(built.doc["rows"], built.doc["timeline"]) == []


def test_bundle_file_round_trip_and_signature(tmp_path):
    doc = bundle_mod.sign(make_bundle(tmp_path), "tid", "secret")
    path = bundle_mod.write_bundle_file(doc, tmp_path / "b.tar.gz")
    again = bundle_mod.read_bundle_file(path)
    assert bundle_mod.content_hash(again) == bundle_mod.content_hash(doc)
    assert bundle_mod.signature_ok(again, "secret") and not bundle_mod.signature_ok(again, "other")
    again["rows"][0]["decode_tok_s"] += 1
    assert not bundle_mod.signature_ok(again, "secret")
    assert bundle_mod.content_hash({**doc, "created_at": "x", "token_id": "y"}) == bundle_mod.content_hash(doc)


@pytest.mark.parametrize("mutate, words", [
    (lambda d: d.update(schema_version="2.0"), "not readable here"),
    (lambda d: d.update(schema_version="one"), "MAJOR.MINOR"),
    (lambda d: d["rows"][0].update(no_such_column=1), "not in schema"),
    (lambda d: d["rows"][0].update(status="great"), "status"),
    (lambda d: d["rows"][0].update(artifact_sha256="abc"), "64 lowercase hex"),
    (lambda d: d["rows"][0].update(error="x" * 5000), "at most 2,000"),
    (lambda d: d["rows"][0].update(artifact_path="/home/alice/m.gguf"), "stripped"),
    (lambda d: d["rows"][0].update(n_ctx="512"), "n_ctx must be an integer"),
    (lambda d: d["rows"][0].update(fit_class="huge"), "fit_class"),
    (lambda d: d["timeline"]["t_s"].pop(), "values, other columns"),
    (lambda d: d.update(rows=[]), "non-empty"),
])
def test_structure_is_checked(tmp_path, mutate, words):
    doc = make_bundle(tmp_path)
    mutate(doc)
    with pytest.raises(bundle_mod.BundleError, match=words):
        bundle_mod.validate(doc)


# --- plausibility ------------------------------------------------------------------------------------------

def _reasons(tmp_path, **kw) -> list[str]:
    doc = make_bundle(tmp_path, **kw)
    return check_bundle(doc["rows"], doc["timeline"])


def test_plausible_rows_pass_and_each_rule_refuses_with_numbers(tmp_path):
    assert _reasons(tmp_path, folder="ok") == []
    # decode above the roofline: 2 TB/s over a 94 MiB artifact is ~20,300 tok/s
    [roof, *_] = _reasons(tmp_path, folder="a", decode=50_000.0)
    assert "roofline of 20,333.0 tok/s" in roof and "94 MiB" in roof
    [resident, *_] = _reasons(tmp_path, folder="b", peak=10 * MiB)
    assert "far below the 94 MiB" in resident
    # a summary that the timeline does not back
    reasons = _reasons(tmp_path, folder="c", peak_rss_bytes=400 * MiB)
    assert any("does not match the timeline's peak" in r for r in reasons)
    row = make_bundle(tmp_path, folder="d")["rows"][0]
    fast = {**row, "ttft_s": 1e-5, "prefill_tok_s": row["prompt_tokens"] / 1e-5, "e2e_s": 1e-5 + 7 / 80.0}
    assert any("shorter than prefill of 256 tokens could be" in r for r in check_row(fast))
    assert any("does not follow from" in r for r in check_row({**row, "prefill_tok_s": 1.0}))
    # a GPU run keeps its weights off the host: no resident-size floor there
    assert check_row({**row, "peak_rss_bytes": 10 * MiB, "device": "gpu", "n_layers_device": 30}) == []


def test_timeline_must_travel_with_the_rows(tmp_path):
    doc = make_bundle(tmp_path)
    doc["timeline"] = {}
    assert any("the timeline has 0 samples" in r for r in check_bundle(doc["rows"], doc["timeline"]))


# --- the server ----------------------------------------------------------------------------------------------

def test_submit_dedupe_tamper_and_aggregate(tmp_path):
    client = app_client(tmp_path)
    token = new_token(client)
    a = make_bundle(tmp_path, folder="a", run_id="run-a")
    b = make_bundle(tmp_path, folder="b", run_id="run-b", machine_id="other-machine-1", decode=60.0)
    first = send(client, a, token)
    assert first.status_code == 201 and first.json()["new_rows"] == 2, first.text
    again = send(client, a, token, gz=False)
    assert again.status_code == 200 and again.json()["duplicate"] and again.json()["new_rows"] == 0
    # the same rows inside a bigger bundle count once
    both = {**b, "rows": a["rows"] + b["rows"], "timeline": {k: a["timeline"][k] + b["timeline"][k]
                                                             for k in a["timeline"]}}
    mixed = send(client, both, token)
    assert mixed.status_code == 201 and mixed.json()["new_rows"] == 2 and mixed.json()["duplicate_rows"] == 2
    assert client.get("/v1/stats").json()["rows"] == 4
    # altered after signing
    signed = bundle_mod.sign(make_bundle(tmp_path, folder="c", run_id="run-c"), *token)
    signed["rows"][0]["decode_tok_s"] = 70.0
    tampered = send(client, signed, None, wire=token)
    assert tampered.status_code == 401 and "altered after it was signed" in tampered.json()["detail"]["error"]
    unknown = send(client, make_bundle(tmp_path, folder="d", run_id="run-d"), ("nope", "secret"))
    assert unknown.status_code == 401 and "did not issue" in unknown.json()["detail"]["error"]
    bad = send(client, make_bundle(tmp_path, folder="e", run_id="run-e", decode=90_000.0), token)
    assert bad.status_code == 422 and any("roofline" in r for r in bad.json()["detail"]["reasons"])
    assert client.get("/v1/stats").json()["rows"] == 4  # nothing refused got in
    [fit] = client.get("/v1/fits").json()["fits"]
    assert fit["machines"] == 2 and fit["samples"] == 4 and fit["runs"] == 2 and fit["fit_class"] == "fits"
    # one token: its two machines (60 and 80 tok/s) are one vote, their median
    assert fit["decode_tok_s"]["median"] == 70.0 and fit["decode_tok_s"]["min"] == 70.0 and fit["votes"] == 1
    assert fit["artifact"]["name"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert client.get("/v1/fits", params={"machine_class": "nvidia-h200-141GiB"}).json()["fits"] == []


def test_idempotency_key_cannot_be_reused_for_other_content(tmp_path):
    client = app_client(tmp_path)
    token = new_token(client)
    a, b = make_bundle(tmp_path, folder="a", run_id="ra"), make_bundle(tmp_path, folder="b", run_id="rb")
    assert send(client, a, token).status_code == 201
    body = json.dumps(bundle_mod.sign(b, *token)).encode()
    resp = client.post("/v1/bundles", content=body, headers={"content-type": "application/json",
                                                               "idempotency-key": bundle_mod.content_hash(a),
                                                               **wire_headers(body, token)})
    assert resp.status_code == 422 and "Idempotency-Key" in resp.json()["detail"]["error"]


def test_rate_limits_answer_429_with_retry_after(tmp_path):
    client = app_client(tmp_path, token_limit=Limit(per_minute=1, burst=2))
    assert [client.post("/v1/tokens").status_code for _ in range(3)] == [201, 201, 429]
    resp = client.post("/v1/tokens")
    assert int(resp.headers["retry-after"]) >= 1 and "rate limit" in resp.json()["detail"]["error"]


@pytest.mark.parametrize("body, headers, status, words", [
    (b"{not json", {}, 400, "malformed JSON"),
    (b'{"bundle_version": 1, "x": NaN}', {}, 400, "NaN"),
    (b"[" * 100_000 + b"]" * 100_000, {}, 400, "malformed JSON"),
    (b"[]", {}, 422, "JSON object"),
    (b"{}", {"content-type": "text/plain"}, 415, "application/json"),
    (b"x" * (2 * MiB), {}, 413, "byte limit"),
    (gzip.compress(b" " * (8 * MiB)), {"content-encoding": "gzip"}, 413, "decompressed"),
    (b"not gzip at all", {"content-encoding": "gzip"}, 400, "gzip"),
    (b"{}", {"content-encoding": "br"}, 415, "Content-Encoding"),
    (b"", {}, 400, "empty body"),
])
def test_bad_input_gets_a_4xx_with_a_reason(tmp_path, body, headers, status, words):
    client = app_client(tmp_path, max_body=1 * MiB, max_decoded=4 * MiB)
    signed = wire_headers(body, new_token(client))  # a real contributor's request: the checks after the token
    resp = client.post("/v1/bundles", content=body, headers={"content-type": "application/json", **headers,
                                                               **signed})
    assert resp.status_code == status, resp.text
    assert words in json.dumps(resp.json())


def test_wrong_schema_version_and_huge_strings_are_422(tmp_path):
    client = app_client(tmp_path)
    token = new_token(client)
    doc = make_bundle(tmp_path)
    resp = send(client, {**doc, "schema_version": "9.0"}, token)
    assert resp.status_code == 422 and "schema" in resp.json()["detail"]["error"]
    doc["rows"][0]["scenario"] = "s" * 100_000
    resp = send(client, doc, token)
    assert resp.status_code == 422 and "at most 2,000" in resp.json()["detail"]["error"]


def test_fuzzed_bodies_never_get_a_500(tmp_path):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    client = app_client(tmp_path, request_limit=Limit(per_minute=1e9, burst=10**9))
    token = new_token(client)
    valid = make_bundle(tmp_path)
    json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                               | st.text(max_size=30), lambda c: st.lists(c, max_size=4)
                               | st.dictionaries(st.text(max_size=10), c, max_size=4), max_leaves=20)
    columns = [c for c in valid["rows"][0]] + ["t_s", "rss_bytes", "bundle_version", "nonsense"]

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(raw=st.binary(max_size=200), column=st.sampled_from(columns), value=json_values,
           where=st.sampled_from(["row", "timeline", "top"]), sign=st.booleans())
    def check(raw, column, value, where, sign):
        for headers in ({}, wire_headers(raw, token)):
            assert client.post("/v1/bundles", content=raw,
                               headers={"content-type": "application/json", **headers}).status_code < 500
        doc = json.loads(json.dumps(valid))
        target = {"row": doc["rows"][0], "timeline": doc["timeline"], "top": doc}[where]
        target[column] = value
        resp = send(client, doc, token if sign else ("x", "y"))
        assert resp.status_code < 500, resp.text

    check()


def test_concurrent_submissions_lose_and_duplicate_nothing(tmp_path):
    """10 clients x 5 bundles (2 rows each) at once, each bundle sent twice: exactly 100 rows stored."""
    app = create_app(Config(db=tmp_path / "load.sqlite", open_tokens=True, token_limit=Limit(1e6, 10**6),
                            bundle_limit=Limit(1e6, 10**6), request_limit=Limit(1e6, 10**6)))
    base = make_bundle(tmp_path)
    errors: list[str] = []
    with ThreadServer(app) as server:
        def client(i: int) -> None:
            with httpx.Client(base_url=server.url, timeout=60) as http:
                issued = http.post("/v1/tokens")
                assert issued.status_code == 201, issued.text
                token = parse_token(issued.json()["token"])
                app.state.store.set_status(token[0], "active")
                for j in range(5):
                    doc = _variant(base, f"run-{i}-{j}", f"machine{i:03d}")
                    signed = json.dumps(bundle_mod.sign(doc, *token)).encode()
                    for _ in range(2):
                        resp = http.post("/v1/bundles", content=signed, headers={"content-type": "application/json",
                                                                                 **wire_headers(signed, token)})
                        if resp.status_code not in (200, 201):
                            errors.append(resp.text)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = httpx.get(f"{server.url}/v1/stats").json()
        [fit] = httpx.get(f"{server.url}/v1/fits").json()["fits"]
    assert errors == []
    assert stats["bundles"] == 50 and stats["rows"] == 100 and stats["machines"] == 10
    assert fit["samples"] == 100 and fit["machines"] == 10


def _variant(doc: dict, run_id: str, machine_id: str) -> dict:
    run_id = "u1-" + hashlib.sha256(run_id.encode()).hexdigest()[:24]  # the form the client's run ids have
    rows = [{**r, "run_id": run_id, "machine_id": machine_id} for r in doc["rows"]]
    n = len(doc["timeline"]["run_id"])
    timeline = {**doc["timeline"], "run_id": [run_id] * n, "machine_id": [machine_id] * n}
    return {**doc, "rows": rows, "timeline": timeline}


# --- catalog pull --------------------------------------------------------------------------------------------

def test_community_fits_merge_beside_local_ones(tmp_path):
    client = app_client(tmp_path)
    token = new_token(client)
    assert send(client, make_bundle(tmp_path, folder="a", run_id="r1"), token).status_code == 201
    assert send(client, make_bundle(tmp_path, folder="b", run_id="r2", machine_id="m2", n_ctx=1024),
                token).status_code == 201
    data = client.get("/v1/fits").json()
    cat = load_catalog(tmp_path / "catalog.yaml")
    local_rows = read_results(write_results(tmp_path / "local", run_id="local-1")).to_pylist()
    update_catalog(cat, [("local.parquet", local_rows)])
    local_before = [dict(f) for f in cat.fits]
    data["fits"].append({"artifact_sha256": "zz", "machine_class": "x"})  # malformed: skipped
    counts = merge_community(cat, data, "http://127.0.0.1:9")
    assert counts == {"added": 2, "updated": 0, "unchanged": 0, "skipped": 1, "local_alongside": 1}
    save_catalog(cat)
    cat = load_catalog(tmp_path / "catalog.yaml")
    assert [f for f in cat.fits if f.get("origin") != "community"] == local_before
    community = sorted((f for f in cat.fits if f.get("origin") == "community"), key=lambda f: f["n_ctx"])
    assert [(f["n_ctx"], f["samples"], f["machines"], f["options"]) for f in community] == \
        [(512, 2, 1, "community"), (1024, 2, 1, "community")]
    assert community[0]["source"] == "community:127.0.0.1:9" and community[0]["decode_tok_s"] == 80.0
    assert merge_community(cat, client.get("/v1/fits").json(), "http://127.0.0.1:9")["unchanged"] == 2
    # a later local update never folds into the community entries
    update_catalog(cat, [("local2.parquet", read_results(write_results(tmp_path / "l2", run_id="local-2")).to_pylist())])
    assert [f["count"] for f in cat.fits if f.get("origin") == "community"] == [1, 1]
    assert [f["count"] for f in cat.fits if f.get("origin") != "community"] == [2]


# --- the command line --------------------------------------------------------------------------------------

def test_cli_bad_input_and_unreachable_server(tmp_path):
    assert_usage_error(fitbench("contribute", str(tmp_path / "missing.parquet"), "--dry-run"), "missing.parquet")
    (tmp_path / "junk.parquet").write_text("junk")
    assert_usage_error(fitbench("contribute", str(tmp_path / "junk.parquet"), "--yes", "--to", "http://x"), "junk")
    path = write_results(tmp_path)
    assert_usage_error(fitbench("contribute", str(path)), "--to URL")
    assert_usage_error(fitbench("contribute", str(path), "--to", "http://127.0.0.1:9"), "--yes")
    env = {"XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    proc = fitbench("contribute", str(path), "--yes", "--retries", "2", "--to", f"http://127.0.0.1:{_closed_port()}",
                    env=env)
    assert proc.returncode == 2 and "no success after 2 attempt(s)" in proc.stderr, proc.stderr
    saved = next(tmp_path.glob("contribute-*.tar.gz"))
    assert f"saved as {saved}" in proc.stderr.replace("\n", "")
    run_id = bundle_mod.read_bundle_file(saved)["rows"][0]["run_id"]  # re-derived: no start second in it
    assert run_id.startswith("u1-") and "20261128" not in run_id
    assert_usage_error(fitbench("catalog", "pull", f"http://127.0.0.1:{_closed_port()}", "--retries", "1",
                                "--catalog", str(tmp_path / "c.yaml")), "no success")
    assert_usage_error(fitbench("catalog", "pull", "ftp://x", "--catalog", str(tmp_path / "c.yaml")), "http")


def _closed_port() -> int:
    from tests.upstream_helpers import free_port

    return free_port()


def test_serve_refuses_a_taken_port_and_every_command_has_help(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_usage_error(fitbench("upstream", "serve", "--port", str(port), "--db", str(tmp_path / "u.sqlite")),
                           "cannot listen", "--port")
    for args in (("contribute",), ("upstream", "serve"), ("catalog", "pull")):
        proc = fitbench(*args, "--help")
        assert proc.returncode == 0 and "Usage:" in proc.stdout


def test_cli_replaces_a_stored_token_the_server_forgot(tmp_path):
    cfg = tmp_path / "cfg"
    (cfg / "fitbench").mkdir(parents=True)
    path = write_results(tmp_path)
    with ThreadServer(create_app(Config(db=tmp_path / "u.sqlite", open_tokens=True))) as server:
        (cfg / "fitbench" / "token").write_text(json.dumps({server.url: "fbt1.gone.secret"}))
        proc = fitbench("contribute", str(path), "--yes", "--to", server.url, env={"XDG_CONFIG_HOME": str(cfg)})
        assert proc.returncode == 0, proc.stderr
        assert "asking for a new one" in proc.stderr and "2 new row(s)" in proc.stdout
        stored = json.loads((cfg / "fitbench" / "token").read_text())[server.url]
        assert stored != "fbt1.gone.secret" and (cfg / "fitbench" / "token").stat().st_mode & 0o077 == 0
        # a token given explicitly is the user's choice: refused, not swapped
        proc = fitbench("contribute", str(path), "--yes", "--to", server.url, "--token", "fbt1.gone.secret",
                        env={"XDG_CONFIG_HOME": str(cfg)})
        assert_usage_error(proc, "does not know the token")


def test_dry_run_shows_what_would_be_sent_and_writes_nothing(tmp_path):
    path = write_results(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = fitbench("contribute", str(path), "--dry-run", "--out", str(tmp_path / "b.tar.gz"), "--to", "http://x")
    assert proc.returncode == 0, proc.stderr
    for words in ("2 row(s) from 1 file(s)", "machine class: cpu-x86_64-24GiB", "llama.cpp 0.3.36",
                  "paths cut to file names", "dry run: nothing written, nothing sent"):
        assert words in proc.stdout
    assert "/home/alice" not in proc.stdout and sorted(p.name for p in tmp_path.iterdir()) == before
