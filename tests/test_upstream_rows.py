"""The project's own results reach its own upstream intact: rows made by harness.rows (the real producer,
fed synthetic worker messages and samples) for a quality-probed case, workflow sessions and a two-machine
fleet dataset pass the server's checks, keep their turns, and are judged by harness.fit on the server."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harness.fit import Thresholds
from harness.results import timeline_path_for
from harness.rows import failure_row
from harness.share import bundle as bundle_mod
from harness.share.anonymise import Identity
from harness.share.contribute import ContributeError, build, summary
from harness.share.upstream.store import Store
from harness.share.upstream.validate import check_bundle, check_row
from harness.workflow import Workflow
from tests.test_upstream import app_client, new_token, send
from tests.upstream_helpers import MiB, produce, sample_case, sample_machine, write_produced

IDENT = Identity(["alice-laptop"])
CHAT = Workflow("chat", 4, user_tokens=50, reply_tokens=8)
DOC = Workflow("document", 2, document_tokens=200, question_tokens=20, reply_tokens=8)


def _doc(*paths) -> dict:
    return build(list(paths), IDENT).doc


def _workflow_file(tmp_path: Path, **kw) -> Path:
    machine = sample_machine()
    chat, doc = sample_case(CHAT), dataclasses.replace(sample_case(DOC), index=1)
    return write_produced(tmp_path / "wf.parquet", [produce(chat, machine, "run-w", **kw),
                                                    produce(doc, machine, "run-w", **kw)])


# --- a quality-probed case ---------------------------------------------------------------------------------

def test_a_quality_probed_case_is_accepted_and_its_probe_stays_out_of_the_peak(tmp_path):
    path = write_produced(tmp_path / "q.parquet",
                          [produce(sample_case(), sample_machine(), "run-q", quality_peak=618 * MiB)])
    doc = _doc(path)
    tl, row = doc["timeline"], doc["rows"][0]
    probe = [r for r, p in zip(tl["rss_bytes"], tl["phase"]) if p == "quality"]
    assert probe and max(probe) > 1.5 * row["peak_rss_bytes"]  # the probe's samples travel, above the peak
    assert row["quality_ppl"] == 14.2
    assert check_bundle(doc["rows"], tl) == []
    client = app_client(tmp_path)
    resp = send(client, doc, new_token(client))
    assert resp.status_code == 201 and resp.json()["new_rows"] == 2, resp.text
    # the check still bites: a peak that is not the samples' before the probe is refused
    for claim in (max(probe), row["peak_rss_bytes"] // 2):
        rows = [{**r, "peak_rss_bytes": claim} for r in doc["rows"]]
        assert any("does not match the timeline's peak" in r for r in check_bundle(rows, tl))


# --- workflow sessions ---------------------------------------------------------------------------------------

def test_every_turn_row_is_sent_and_shows_in_fits_under_its_own_turn(tmp_path):
    path = _workflow_file(tmp_path)
    assert pq.read_table(path).num_rows == 16  # 2 reps x (4 turns + session) + 2 reps x (2 questions + session)
    doc = _doc(path)
    assert len(doc["rows"]) == 16
    assert check_bundle(doc["rows"], doc["timeline"]) == []
    client = app_client(tmp_path)
    resp = send(client, doc, new_token(client))
    assert resp.status_code == 201 and resp.json()["new_rows"] == 16, resp.text
    fits = client.get("/v1/fits").json()["fits"]
    keys = sorted((f["workflow_kind"], f["turn"] or 0) for f in fits)
    assert keys == [("chat", 0), ("chat", 1), ("chat", 2), ("chat", 3), ("chat", 4),
                    ("document", 0), ("document", 1), ("document", 2)]
    assert all(f["samples"] == 2 and f["machines"] == 1 for f in fits)
    # a turn's figures are its own: with KV reuse turn 3 prefilled 50 new tokens, not its whole context
    [turn3] = [f for f in fits if f["workflow_kind"] == "chat" and f["turn"] == 3]
    [row3] = [r for r in doc["rows"] if r.get("turn") == 3 and r["repetition"] == 0 and r["workflow_kind"] == "chat"]
    assert row3["processed_tokens"] == 50 < row3["prompt_tokens"]
    assert turn3["prefill_tok_s"]["median"] == pytest.approx(50 / row3["ttft_s"])
    assert turn3["prompt_tokens"]["median"] == row3["prompt_tokens"]
    [session] = [f for f in fits if f["workflow_kind"] == "chat" and f["turn"] is None]
    assert session["ttft_s"]["median"] == max(f["ttft_s"]["median"] for f in fits
                                              if f["workflow_kind"] == "chat" and f["turn"])


def test_turn_and_session_rows_must_follow_from_their_own_figures(tmp_path):
    doc = _doc(_workflow_file(tmp_path))
    rows, tl = doc["rows"], doc["timeline"]
    turn = next(r for r in rows if r.get("turn") == 2)
    assert check_row(turn) == []
    # a turn's prefill rate over its whole context is not what the producer wrote
    assert any("does not follow from 50 tokens" in r
               for r in check_row({**turn, "prefill_tok_s": turn["prompt_tokens"] / turn["ttft_s"]}))
    # a session row without its turns, or with figures they do not give, is refused
    sessions_only = [r for r in rows if r.get("turn") is None]
    assert any("a session is sent with each of its turns" in r for r in check_bundle(sessions_only, tl))
    faster = [{**r, "ttft_s": r["ttft_s"] / 2} if r.get("turn") is None else r for r in rows]
    assert any("ttft_s" in r and "does not follow from its turns" in r for r in check_bundle(faster, tl))


# --- the verdict is the server's ---------------------------------------------------------------------------

def test_the_server_judges_with_harness_fit_and_failures_feed_no_figure(tmp_path):
    rows, timeline = produce(sample_case(), sample_machine(), "run-s", decode=6.0)
    assert {r["fit_class"] for r in rows} == {"slow"}  # the producer's verdict: 6 tok/s < 10
    path = write_produced(tmp_path / "s.parquet", [(rows, timeline)])
    doc = _doc(path)
    claimed = [{**r, "fit_class": "fits", "fit_reason": "fast"} for r in doc["rows"]]
    # a failed row of the same case with figures a failure cannot have
    failed = {**claimed[0], "repetition": None, "status": "oom", "error": "killed", "decode_tok_s": 9999.0,
              "ttft_s": 1e-4, "prefill_tok_s": 1e6, "rep_peak_rss_bytes": 64 * 2**30}
    doc = {**doc, "rows": claimed + [failed]}
    assert check_bundle(doc["rows"], doc["timeline"]) == []
    store = Store(":memory:")
    assert store.submit(doc)["new_rows"] == 3
    [fit] = store.fits()
    assert fit["fit_classes"] == {"no_fit": 1}  # the case's worst row, as decided here
    assert fit["samples"] == 2 and fit["rows"] == 3
    assert fit["decode_tok_s"]["max"] == pytest.approx(6.0) and fit["ttft_s"]["min"] > 1e-3
    assert fit["peak_rss_bytes"]["max"] < 1 * 2**30
    # without the failure the server's verdict is slow, whatever the rows claim; its thresholds decide
    store = Store(":memory:")
    store.submit({**doc, "rows": claimed})
    assert store.fits()[0]["fit_class"] == "slow"
    lenient = Store(":memory:", Thresholds(min_decode_tok_s=5.0))
    lenient.submit({**doc, "rows": [{**r, "fit_class": "slow"} for r in claimed]})
    assert lenient.fits()[0]["fit_class"] == "fits"


def test_rows_measured_under_a_budget_stay_out_of_the_community_table(tmp_path):
    case = dataclasses.replace(sample_case(), budget_bytes=2 * 2**30)
    path = write_produced(tmp_path / "b.parquet", [produce(case, sample_machine(), "run-b")])
    doc = _doc(path)
    assert doc["rows"][0]["budget_requested_bytes"] == 2 * 2**30
    store = Store(":memory:")
    assert check_bundle(doc["rows"], doc["timeline"]) == [] and store.submit(doc)["new_rows"] == 2
    assert store.fits() == [] and store.stats()["rows"] == 2


# --- a fleet dataset -----------------------------------------------------------------------------------------

LAYOUTS = {  # (node, machine id, machine class) of each file
    "two machines": [("a", "machine-a", "cpu-x86_64-24GiB"), ("b", "machine-b", "cpu-x86_64-24GiB")],
    "two classes on one machine": [("a", "machine-a", "fake-a"), ("b", "machine-a", "fake-b")],
}


def _fleet(tmp_path: Path, layout: str = "two machines", timeline_machine_ids: bool = True) -> Path:
    """Two nodes of one fleet run: same run id, case key and sample times, different nodes and figures."""
    root = tmp_path / "tiny-run-f"
    root.mkdir()
    (root / "fleet.json").write_text("{}")
    for (node, machine_id, machine_class), decode, peak in zip(LAYOUTS[layout], (80.0, 60.0), (190 * MiB, 230 * MiB)):
        folder = root / f"machine_class={machine_class}"
        machine = sample_machine(machine_id, machine_class)
        path = write_produced(folder / f"node-{node}.parquet",
                              [produce(sample_case(), machine, "run-f", decode=decode, peak=peak)])
        if not timeline_machine_ids:  # a file written before the timeline had a machine_id column
            tl_path = timeline_path_for(path)
            table = pq.read_table(tl_path)
            i = table.schema.get_field_index("machine_id")
            table = table.set_column(i, table.schema.field(i), pa.nulls(table.num_rows, pa.string()))
            pq.write_table(table, tl_path)
    # the driver's own row for a case no node reported on: no machine measured it
    driver = dataclasses.replace(sample_machine(), machine_id=None)
    lost = failure_row(dataclasses.replace(sample_case(), index=1, n_ctx=1024), driver, "run-f", "lost", "node gone")
    write_produced(folder / "node-unplaced.parquet", [([lost], {})])
    return root


@pytest.mark.parametrize("layout, timeline_machine_ids", [("two machines", True), ("two machines", False),
                                                          ("two classes on one machine", True),
                                                          ("two classes on one machine", False)])
def test_two_nodes_of_one_fleet_run_are_accepted_with_both_timelines(tmp_path, layout, timeline_machine_ids):
    built = build([_fleet(tmp_path, layout, timeline_machine_ids)], IDENT)
    doc, tl = built.doc, built.doc["timeline"]
    assert len(doc["rows"]) == 4 and len(set(zip(tl["machine_id"], tl["machine_class"]))) == 2
    assert built.unmeasured == 1 and any("not sent: 1 row(s) no machine measured" in line for line in summary(built))
    nodes = sorted(set(zip(tl["machine_id"], tl["machine_class"])))
    a, b = sorted((sorted(t for t, *o in zip(tl["t_s"], tl["machine_id"], tl["machine_class"]) if tuple(o) == n)
                   for n in nodes), key=len)  # upstream ids are keyed by the install's salt: order them by length
    # the same sample times on both nodes (b runs longer: it decodes slower), and neither node's samples dropped
    assert len(a) > 50 and b[:len(a)] == a and len(a) + len(b) == len(tl["t_s"])
    assert check_bundle(doc["rows"], tl) == []
    client = app_client(tmp_path)
    resp = send(client, doc, new_token(client))
    assert resp.status_code == 201 and resp.json()["new_rows"] == 4, resp.text
    stats = client.get("/v1/stats").json()
    assert stats["timeline_cases"] == 2 and stats["machines"] == len({m for _, m, _ in LAYOUTS[layout]})
    fits = client.get("/v1/fits").json()["fits"]  # one fit, or one per class
    assert len(fits) == len({c for _, _, c in LAYOUTS[layout]}) and sum(f["samples"] for f in fits) == 4
    decode = sorted(f["decode_tok_s"]["median"] for f in fits)
    if len(fits) == 1:  # one token's two machines in one class: one vote, the median of their rows
        assert decode == [pytest.approx(70.0)] and fits[0]["votes"] == 1 and fits[0]["machines"] == 2
    else:
        assert decode == [pytest.approx(60.0), pytest.approx(80.0)]


def test_a_bundle_whose_samples_name_no_machine_is_refused_when_machines_share_the_case(tmp_path):
    doc = _doc(_fleet(tmp_path))
    timeline = {k: v for k, v in doc["timeline"].items() if k != "machine_id"}  # an older client's bundle
    reasons = check_bundle(doc["rows"], timeline)
    assert any("names no machine_id" in r for r in reasons), reasons
    # one machine's bundle without the column: its rows say whose samples they are
    mine = [r for r in doc["rows"] if r["machine_id"] == doc["rows"][0]["machine_id"]]
    keep = [i for i, m in enumerate(doc["timeline"]["machine_id"]) if m == mine[0]["machine_id"]]
    assert check_bundle(mine, {k: [v[i] for i in keep] for k, v in timeline.items()}) == []


# --- what contribute reads ---------------------------------------------------------------------------------

def test_result_arguments_go_through_expand_result_files(tmp_path):
    path = _workflow_file(tmp_path)
    from_glob = _doc(str(tmp_path / "*.parquet"))  # matches the timeline companion too
    assert len(from_glob["rows"]) == 16
    assert bundle_mod.content_hash(from_glob) == bundle_mod.content_hash(_doc(path))
    assert bundle_mod.content_hash(_doc(timeline_path_for(path))) == bundle_mod.content_hash(_doc(path))
    # a saved bundle and the file it came from are the same measurements: sent once
    saved = bundle_mod.write_bundle_file(_doc(path), tmp_path / "b.tar.gz")
    both = _doc(saved, path)
    assert len(both["rows"]) == 16 and len(both["timeline"]["t_s"]) == len(from_glob["timeline"]["t_s"])
    with pytest.raises(ContributeError, match="no result files there"):
        build([str(tmp_path / "nothing-*.parquet")], IDENT)


def test_rows_of_two_configurations_sharing_a_case_key_stay_two_rows(tmp_path):
    doc = _doc(_workflow_file(tmp_path))
    row = next(r for r in doc["rows"] if r.get("turn") is None)
    other = {**row, "options_json": json.dumps({"n_threads": 1})}
    assert bundle_mod.row_identity(row) != bundle_mod.row_identity(other)
    assert bundle_mod.row_identity(row) != bundle_mod.row_identity({**row, "turn": 1})
