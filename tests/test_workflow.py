"""Workflow (multi-turn) scenarios on fake runners: plan, validation, per-turn rows, worst-turn verdict,
failures mid-session, resume, compare and report with turn rows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from harness.analyse.compare import Side, compare
from harness.analyse.report import build
from harness.fit import case_verdict, judge_sessions
from harness.fitsearch import workflow_at
from harness.measure.machine import fingerprint
from harness.preflight import check_scenario
from harness.results import ResultWriter
from harness.scenario import ScenarioError, parse_scenario, validate_cases
from harness.suite import run_suite
from harness.workflow import WorkflowError, parse_workflow, parse_workflow_option
from tests.conftest import ROOT, write_tiny_gguf
from tests.test_cli import fitbench

CHAT = {"kind": "chat", "turns": 4, "user_tokens": 20, "reply_tokens": 4}


def scenario(art: Path, runner: str = "FakeExtendRunner", workflow=CHAT, **extra) -> dict:
    return {"name": "wf", "models": [{"artifact": str(art), "runtime": f"fake_runners:{runner}",
                                      "options": extra.pop("options", {})}],
            "workflow": workflow, "warmup": 0, "repetitions": 1, **extra}


def run(art: Path, tmp_path: Path, **kw) -> pd.DataFrame:
    s = parse_scenario(scenario(art, **kw), source="wf.yaml")
    writer = ResultWriter(tmp_path / "wf.parquet")
    run_suite(s.cases(), check_scenario(s), fingerprint(), writer, "run-1")
    return pd.read_parquet(writer.results_path)


# --- the plan --------------------------------------------------------------------------------------

def test_chat_and_document_plans():
    chat = parse_workflow({"kind": "chat", "turns": 3, "user_tokens": 100, "reply_tokens": 10})
    assert chat.new_tokens() == [100, 100, 100]
    assert chat.context_before_reply() == [100, 210, 320]
    assert chat.session_tokens == 330 and chat.label == "chat 3x(u100+r10)"
    doc = parse_workflow({"kind": "document", "document_tokens": 1000, "questions": 3, "question_tokens": 20,
                          "reply_tokens": 8})
    assert doc.new_tokens() == [1020, 20, 20]
    assert doc.context_before_reply() == [1020, 1048, 1076]
    assert doc.session_tokens == 1084
    assert doc.to_dict() == {"kind": "document", "document_tokens": 1000, "questions": 3, "question_tokens": 20,
                             "reply_tokens": 8}


def test_scaled_to_a_context_keeps_the_shape():
    chat = parse_workflow_option("chat:10", reply_tokens=16)
    scaled = workflow_at(chat, 2048, 0.9)
    assert scaled.turns == 10 and scaled.reply_tokens == 16
    assert scaled.session_tokens <= int(0.9 * 2048) and scaled.user_tokens == 1843 // 10 - 16
    doc = workflow_at(parse_workflow_option("document:5", reply_tokens=16), 4096, 0.5)
    assert doc.session_tokens == 2048 and doc.turns == 5
    with pytest.raises(ValueError, match="cannot hold a chat session of 100 turns"):
        workflow_at(parse_workflow_option("chat:100", 16), 512, 0.9)
    with pytest.raises(WorkflowError, match="chat:TURNS"):
        parse_workflow_option("chit-chat", 16)


@pytest.mark.parametrize("workflow, where, message", [
    ({"kind": "talk", "turns": 3}, "workflow.kind", "must be one of chat, document"),
    ({"kind": "chat"}, "workflow.turns", "missing"),
    ({"kind": "chat", "turns": 0}, "workflow.turns", "between 1 and"),
    ({"kind": "chat", "turns": 2, "questions": 3}, "workflow.questions", "unknown field for a chat workflow"),
    ({"kind": "document", "questions": 3}, "workflow.document_tokens", "missing"),
    ({"kind": "chat", "turns": 2, "reply_tokens": "many"}, "workflow.reply_tokens", "must be an integer"),
    ({"kind": "chat", "turns": 2, "reuse_cache": "no"}, "workflow.reuse_cache", "must be true or false"),
    ([CHAT, {"kind": "document", "questions": 2}], "workflow[1].document_tokens", "missing"),
    ("chat", "workflow", "must be a mapping"),
])
def test_bad_workflows_name_the_field(tiny_gguf, workflow, where, message):
    with pytest.raises(ScenarioError) as err:
        parse_scenario(scenario(tiny_gguf, workflow=workflow), source="wf.yaml")
    assert err.value.where == where and message in err.value.message


def test_workflow_excludes_prompt_fields_and_needs_a_context_that_holds_the_session(tiny_gguf):
    with pytest.raises(ScenarioError, match="wf.yaml: fill: a workflow sets its own prompt"):
        parse_scenario(scenario(tiny_gguf, fill=0.5), source="wf.yaml")
    s = parse_scenario(scenario(tiny_gguf, contexts=[64]), source="wf.yaml")
    with pytest.raises(ScenarioError, match=r"workflow: context 64 cannot hold the chat 4x\(u20\+r4\) session "
                                            r"\(96 tokens"):
        validate_cases(s)
    # without contexts, each workflow gets its own session length (rounded up)
    s = parse_scenario(scenario(tiny_gguf, workflow=[CHAT, {"kind": "document", "document_tokens": 300,
                                                            "questions": 2}]), source="wf.yaml")
    cases = s.cases()
    assert [c.n_ctx for c in cases] == [256, 512]
    assert cases[0].label == "chat 4x(u20+r4) @ ctx256" and cases[0].prompt_tokens == 20 * 4 + 4 * 3
    assert cases[0].key != cases[1].key
    replay = parse_scenario(scenario(tiny_gguf, workflow={**CHAT, "reuse_cache": False}), source="wf.yaml").cases()[0]
    assert replay.label == "chat 4x(u20+r4) replay @ ctx256" and replay.key != cases[0].key


def test_cli_reports_a_bad_workflow_in_one_line(tiny_gguf, write_scenario):
    path = write_scenario(scenario(tiny_gguf, workflow={"kind": "chat", "turns": -1}))
    result = fitbench("run", str(path), "-o", str(path.parent / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "workflow.turns: must be between 1" in result.stderr


# --- verdicts ----------------------------------------------------------------------------------------

def test_session_verdict_is_the_first_worst_turn_with_its_number():
    rows = [{"workflow_kind": "chat", "repetition": 0, "turn": t, "status": "ok", "fit_class": c, "fit_reason": r}
            for t, c, r in [(1, "fits", "ok"), (2, "tight", "only 8% left"), (3, "slow", "TTFT 12.3 s > 10 s"),
                            (4, "slow", "TTFT 13.0 s > 10 s")]]
    summary = {"workflow_kind": "chat", "repetition": 0, "turn": None, "status": "ok", "fit_class": "fits",
               "fit_reason": "recomputed"}
    rows.append(summary)
    judge_sessions(rows)
    assert summary["fit_class"] == "slow" and summary["fit_turn"] == 3
    assert summary["fit_reason"] == "turn 3: TTFT 12.3 s > 10 s"
    assert case_verdict(rows) == ("slow", "turn 3: TTFT 12.3 s > 10 s")
    # a session cut short has only turn rows: they speak with their numbers
    assert case_verdict(rows[:2]) == ("tight", "turn 2: only 8% left")


# --- end to end on fakes ---------------------------------------------------------------------------

def test_turn_rows_with_extend_and_the_worst_turn_decides(tiny_gguf, tmp_path):
    df = run(tiny_gguf, tmp_path, options={"turn_delays": "0,0,0.8,0"}, thresholds={"max_ttft_s": 0.5},
             repetitions=2)
    turns = df[df["turn"].notna()]
    summary = df[df["turn"].isna()]
    assert len(turns) == 8 and len(summary) == 2  # 4 turns + 1 case-level row per repetition
    assert list(turns["turn"]) == [1, 2, 3, 4] * 2
    assert turns["kv_reuse"].all() and (turns["workflow_kind"] == "chat").all()
    assert list(turns["context_tokens"][:4]) == [20, 44, 68, 92]
    # with the cache reused, each later turn processes its new tokens (+ the last reply token) only
    assert list(turns["processed_tokens"][:4]) == [20, 21, 21, 21]
    assert list(turns["gen_tokens"][:4]) == [4, 4, 4, 4]
    assert list(turns["fit_class"][:4]) == ["fits", "fits", "slow", "fits"]
    assert (summary["fit_class"] == "slow").all() and (summary["fit_turn"] == 3).all()
    assert summary["fit_reason"].str.startswith("turn 3: TTFT").all()
    first = summary.iloc[0]
    assert first["ttft_s"] == turns["ttft_s"][:4].max() and first["gen_tokens"] == 16
    assert first["prompt_tokens"] == 92 and json.loads(first["workflow_json"])["turns"] == 4
    assert turns["rep_peak_rss_bytes"].notna().all()
    tl = pq.read_table(tmp_path / "wf.timeline.parquet").to_pandas()
    # Turn 3 lasts 0.8 s in both repetitions; the others may end between two 10 ms samples.
    assert {"rep0/turn3", "rep1/turn3"} <= set(tl["phase"])
    assert all(p.startswith(("rep0/turn", "rep1/turn")) for p in set(tl["phase"]) if p.startswith("rep"))


@pytest.mark.parametrize("runner, workflow", [("FakeRunner", CHAT),
                                              ("FakeExtendRunner", {**CHAT, "reuse_cache": False})])
def test_runners_without_extend_replay_the_history(tiny_gguf, tmp_path, runner, workflow):
    df = run(tiny_gguf, tmp_path, runner=runner, workflow=workflow)
    turns = df[df["turn"].notna()]
    assert len(turns) == 4 and not turns["kv_reuse"].any()
    assert list(turns["processed_tokens"]) == list(turns["context_tokens"]) == [20, 44, 68, 92]


def test_a_failure_mid_session_keeps_the_finished_turns_and_names_the_turn(tiny_gguf, tmp_path):
    df = run(tiny_gguf, tmp_path, options={"fail_turn": 3})
    turns = df[df["turn"].notna()]
    assert list(turns["turn"]) == [1, 2]
    [failed] = df[df["turn"].isna()].to_dict("records")
    assert failed["status"] == "oom" and failed["fit_class"] == "no_fit" and failed["fit_turn"] == 3
    assert failed["fit_reason"].startswith("turn 3: oom")


def test_report_has_the_per_turn_plot(tiny_gguf, tmp_path):
    run(tiny_gguf, tmp_path)
    plots = build([tmp_path / "wf.parquet"], tmp_path / "r.html")
    assert "turns" in plots
    page = (tmp_path / "r.html").read_text()
    assert "Workflows: turn by turn" in page and "energy (J/token)" in page


# --- resume --------------------------------------------------------------------------------------------

def test_an_interrupted_workflow_suite_resumes_with_every_turn_once(tmp_path):
    art = write_tiny_gguf(tmp_path / "t.gguf")
    path = tmp_path / "wf.yaml"
    import yaml

    data = scenario(art, options={"token_delay": 0.02}, repetitions=2)
    data["workflow"] = [CHAT, {"kind": "chat", "turns": 3, "user_tokens": 10, "reply_tokens": 4},
                        {"kind": "document", "document_tokens": 40, "questions": 3, "question_tokens": 5,
                         "reply_tokens": 4}]
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    cmd = [sys.executable, "-m", "harness.cli", "run", str(path), "-o", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # interrupt once the first case is written
        files = [p for p in out.glob("wf-*.parquet") if not p.name.endswith(".timeline.parquet")] if out.exists() else []
        if files and len(pd.read_parquet(files[0])) >= 1:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    done = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    [results] = [p for p in out.glob("wf-*.parquet") if not p.name.endswith(".timeline.parquet")]
    df = pd.read_parquet(results)
    assert (df["status"] == "ok").all()
    assert not df.duplicated(["case_key", "repetition", "turn"]).any()
    assert len(df) == 2 * (4 + 1) + 2 * (3 + 1) + 2 * (3 + 1)


# --- compare ---------------------------------------------------------------------------------------------

def _turn_run(path: Path, ttft: list[float], fit3: str = "fits") -> Path:
    rows = []
    for rep in range(3):
        for turn in (1, 2, 3, None):
            t = max(ttft) if turn is None else ttft[turn - 1]
            rows.append({
                "run_id": path.stem, "case_key": "wk", "case_index": 0, "case_label": "chat 3x(u20+r4) @ ctx256",
                "repetition": rep, "turn": turn, "status": "ok", "model_label": "m", "artifact_name": "a.gguf",
                "artifact_sha256": "f" * 64, "runtime": "llama.cpp", "runtime_version": "1", "options_json": "{}",
                "n_ctx": 256, "prompt_tokens": 68 if turn is None else 20 + 24 * (turn - 1), "gen_tokens": 4,
                "budget_bytes": 1 << 30, "budget_method": "none", "ttft_s": t * (1 + 0.001 * rep),
                "decode_tok_s": 50.0 + rep, "fit_class": fit3 if turn in (3, None) else "fits",
                "machine_class": "c", "machine_id": "m", "workflow_kind": "chat",
                "workflow_json": json.dumps({"kind": "chat", "turns": 3, "user_tokens": 20, "reply_tokens": 4}),
            })
    w = ResultWriter(path)
    w.add_case(rows, {})
    return path


def test_compare_matches_turn_by_turn(tmp_path):
    a = _turn_run(tmp_path / "a.parquet", [0.1, 0.2, 0.3])
    b = _turn_run(tmp_path / "b.parquet", [0.1, 0.2, 0.6], fit3="slow")
    cmp = compare(Side("a", [a]), Side("b", [b]))
    cases = {r["case"] for r in cmp.rows}
    assert {"m llama.cpp chat 3x(u20+r4) @ ctx256 turn 3", "m llama.cpp chat 3x(u20+r4) @ ctx256"} <= cases
    ttft = {r["case"]: r for r in cmp.rows if r["metric"] == "TTFT"}
    assert ttft["m llama.cpp chat 3x(u20+r4) @ ctx256 turn 3"]["regression"]
    assert not ttft["m llama.cpp chat 3x(u20+r4) @ ctx256 turn 1"]["regression"]
    worse = [r for r in cmp.rows if r["kind"] == "fit" and r["worse"]]
    assert {r["case"] for r in worse} == {"m llama.cpp chat 3x(u20+r4) @ ctx256 turn 3",
                                          "m llama.cpp chat 3x(u20+r4) @ ctx256"}
    assert not cmp.unmatched_baseline and not cmp.unmatched_candidate


def test_a_session_never_matches_a_different_session_or_a_single_turn_case(tmp_path):
    a = _turn_run(tmp_path / "a.parquet", [0.1, 0.2, 0.3])
    rows = pq.read_table(a).to_pylist()
    spec = json.dumps({"kind": "chat", "turns": 3, "user_tokens": 20, "reply_tokens": 4, "reuse_cache": False})
    replay = [{**r, "workflow_json": spec} for r in rows]
    single = [{**r, "workflow_json": None, "workflow_kind": None} for r in rows if r["turn"] is None]
    for name, other in (("replay", replay), ("single", single)):
        w = ResultWriter(tmp_path / f"{name}.parquet")
        w.add_case(other, {})
        cmp = compare(Side("a", [a]), Side(name, [tmp_path / f"{name}.parquet"]))
        assert not cmp.rows and len(cmp.unmatched_baseline) == 4


def test_files_without_a_turn_column_still_compare(tmp_path):
    rows = pq.read_table(_turn_run(tmp_path / "wf.parquet", [0.1, 0.2, 0.3])).to_pylist()
    single = [{**r, "workflow_json": None, "workflow_kind": None} for r in rows if r["turn"] is None]
    new = tmp_path / "new.parquet"
    ResultWriter(new).add_case(single, {})
    old = tmp_path / "old.parquet"
    pq.write_table(pq.read_table(new).drop(["turn", "workflow_json"]), old)  # keeps the schema metadata
    assert "turn" not in pq.read_schema(old).names
    cmp = compare(Side("old", [old]), Side("new", [new]))
    assert {r["case"] for r in cmp.rows} == {"m llama.cpp chat 3x(u20+r4) @ ctx256"}
    assert not cmp.unmatched_baseline and not cmp.unmatched_candidate
    assert not any("lacks" in n and "turn" in n for n in cmp.notes)
    # and a file with workflow turns next to the old one: its turns and sessions are its own
    cmp = compare(Side("old", [old]), Side("wf", [tmp_path / "wf.parquet"]))
    assert not cmp.rows and len(cmp.unmatched_candidate) == 4


def test_workflow_flag_of_fit_runs_sessions(tmp_path):
    art = write_tiny_gguf(tmp_path / "t.gguf", context_length=1024)
    result = fitbench("fit", str(art), "--runtime", "fake_runners:FakeExtendRunner", "--workflow", "chat:3",
                      "--min-context", "256", "--max-context", "512", "-n", "4", "--step", "256", "-o",
                      str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # rich wraps long lines
    assert "a chat session of 3 turns" in text and "fits up to its trained maximum" in text
    [path] = [p for p in (tmp_path / "out").glob("*.parquet") if not p.name.endswith(".timeline.parquet")]
    df = pd.read_parquet(path)
    assert set(df["n_ctx"]) == {256, 512} and set(df["turn"].dropna()) == {1, 2, 3}
    bad = fitbench("fit", str(art), "--runtime", "fake_runners:FakeExtendRunner", "--workflow", "chat:500",
                   "--min-context", "256", "-o", str(tmp_path / "out"))
    assert bad.returncode == 2 and "cannot hold a chat session of 500 turns" in bad.stderr
