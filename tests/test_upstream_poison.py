"""Poisoning the community table (issue 17), replayed through real uvicorn on loopback: 10 forged rows from
one token (forged machine ids, claiming ``fits``) against 3 honest rows from 3 tokens change neither the
served verdict nor any median."""

from __future__ import annotations

import httpx
import pytest

from harness.share.contribute import build, parse_token
from harness.share.upstream.app import Config, create_app
from tests.test_upstream import HOST, send
from tests.upstream_helpers import MiB, ThreadServer, write_results

METRICS = ("decode_tok_s", "ttft_s", "prefill_tok_s", "peak_rss_bytes")
CTX = 4096
SMALL_RAM = {"ram_bytes": 160 * MiB, "budget_bytes": 160 * MiB}  # the honest machines: the model spills


def bundle(tmp_path, name: str, runs: list[dict]) -> dict:
    """One bundle of several result files (one a machine), each a single repetition at CTX."""
    from harness.share.anonymise import Identity

    folder = tmp_path / name
    folder.mkdir()
    paths = [write_results(folder, run_id=f"{name}-{i}", n_ctx=CTX, reps=1, **run) for i, run in enumerate(runs)]
    return build(paths, Identity([HOST])).doc


def token_for(http: httpx.Client, store) -> tuple[str, str]:
    resp = http.post("/v1/tokens")
    assert resp.status_code == 201, resp.text
    token = parse_token(resp.json()["token"])
    assert store.set_status(token[0], "active")  # approved: the attacker got through the operator
    return token


HONEST = [dict(machine_id=f"honest{i:010d}", decode=d, peak=p * MiB, **SMALL_RAM)
          for i, (d, p) in enumerate([(78.0, 180), (80.0, 190), (82.0, 200)])]
FORGED_IDS = [f"forged{i:010d}" for i in range(10)]
ATTACKS = {
    # the finding: failed rows marked fits with a 1 MiB peak skipped every rule and voted 10 times
    "oom rows claiming fits": [dict(machine_id=m, peak=1 * MiB, status="oom", error="out of memory",
                                    fit_class="fits") for m in FORGED_IDS],
    # extreme but each within the plausibility ceilings: 60x the decode, half the memory, claiming fits
    "extreme figures": [dict(machine_id=m, decode=5000.0, peak=100 * MiB, **SMALL_RAM) for m in FORGED_IDS],
    # an honest machine's very figures, on machines "with 24 GiB", so that the server's own verdict is fits
    "plausible copies": [dict(machine_id=m, decode=80.0, peak=190 * MiB) for m in FORGED_IDS],
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_ten_forged_rows_from_one_token_change_no_verdict_and_no_median(tmp_path, attack, capsys):
    app = create_app(Config(db=tmp_path / "up.sqlite", open_tokens=True))
    store = app.state.store
    with ThreadServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        for i, run in enumerate(HONEST):
            resp = send(http, bundle(tmp_path, f"honest{i}", [run]), token_for(http, store))
            assert resp.status_code == 201, resp.text
        [before] = http.get("/v1/fits").json()["fits"]
        forged = bundle(tmp_path, "forged", ATTACKS[attack])
        assert len(forged["rows"]) == 10 and len({r["machine_id"] for r in forged["rows"]}) == 10
        resp = send(http, forged, token_for(http, store))
        assert resp.status_code == 201 and resp.json()["new_rows"] == 10, resp.text
        [after] = http.get("/v1/fits").json()["fits"]
    assert before["fit_class"] == "spill" and before["votes"] == 3 and before["machines"] == 3
    assert after["fit_class"] == before["fit_class"] != "fits"
    for m in METRICS:
        assert after[m]["median"] == before[m]["median"], m
    # the forged machines are shown as machines, never votes
    assert after["machines"] == 13 and after["tokens"] == 4 and after["rows"] == 13
    counted = after["votes"] + after["outlier_votes"]
    assert counted == 4 and after["outlier_votes"] == (1 if attack == "extreme figures" else 0)
    if attack == "extreme figures":
        assert after["decode_tok_s"]["outliers"] == [5000.0] and after["decode_tok_s"]["n"] == 3
    if attack == "oom rows claiming fits":  # a failure is a verdict (no_fit), never a figure
        assert after["fit_classes"] == {"spill": 3, "no_fit": 1} and after["peak_rss_bytes"]["n"] == 3
    with capsys.disabled():
        print(f"\n[poison] {attack}: verdict {before['fit_class']} -> {after['fit_class']}, decode median "
              f"{before['decode_tok_s']['median']} -> {after['decode_tok_s']['median']}, peak median "
              f"{before['peak_rss_bytes']['median'] / MiB:.0f} -> {after['peak_rss_bytes']['median'] / MiB:.0f} MiB, "
              f"votes {after['votes']} (+{after['outlier_votes']} apart), machines {after['machines']}")
