"""The composition matrix: every kind of case through every consumer.

Kinds, each from a real run wherever a real run can make it (the sample model
in llama.cpp; fake runners in the real worker process for the failures a
healthy runtime cannot be made to show on purpose):

  plain | budgeted, enforced (cgroup) | budgeted, yardstick (not enforced) |
  quality-probed | workflow chat | workflow document | oom | timeout |
  crashed | unavailable | skipped | interrupted (then resumed) | a fleet
  dataset of two machine classes (the fleet task body, without Ray)

Consumers: compare, report, catalog update, resume, contribute --dry-run, a
real upstream on loopback (every row accepted, turn rows under their own
keys) and catalog pull.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from harness.case import ENFORCE_BUDGET_ENV
from harness.measure.budget import create_budget
from harness.results import expand_result_files, read_results, timeline_path_for
from tests.conftest import ROOT, write_tiny_gguf
from tests.test_cli import fitbench
from tests.upstream_helpers import upstream_subprocess

pytestmark = pytest.mark.model

BASE = {"contexts": [512], "fill": 0.25, "gen_tokens": 8, "warmup": 0, "repetitions": 2, "timeout": 300}


def _cgroup_enforces() -> bool:
    budget = create_budget(1 << 30)
    if budget is None:
        return False
    method = getattr(budget, "method", "none")
    budget.close()
    return method != "none"


def _run(folder: Path, name: str, scenario: dict, *extra: str, env: dict | None = None) -> Path:
    """`fitbench run` of a scenario written from ``scenario``; returns its result file."""
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, **scenario}))
    proc = fitbench("run", str(path), "-o", str(folder / name), *extra, env=env)
    assert proc.returncode in (0, 1), proc.stderr + proc.stdout  # 1: some case failed, by design
    [result] = expand_result_files([str(folder / name / f"{name}-*.parquet")])
    return result


def _rows(path: Path) -> list[dict]:
    return read_results(path).to_pylist()


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, sample_model) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("matrix")
    model = {"artifact": str(sample_model), "runtime": "llama.cpp", "label": "q4_1"}
    files: dict[str, Path] = {}
    # plain, enforced budgets (1 GiB fits; 20 MiB cannot hold even the KV cache and buffers: oom), quality probe
    files["budgets"] = _run(folder, "budgets", {
        **BASE, "models": [model], "budget": ["none", "1GiB", "20MiB"],
        "quality": {"text": "stdlib", "tokens": 64, "window": 32, "top_k": 8}})
    # the same budgets as a yardstick only (what a machine without a writable cgroup does)
    files["yardstick"] = _run(folder, "yardstick", {**BASE, "models": [model], "budget": ["none", "1GiB", "150MiB"]},
                              env={ENFORCE_BUDGET_ENV: "0"})
    files["workflow"] = _run(folder, "workflow", _workflow_scenario(model))
    tiny = write_tiny_gguf(folder / "tiny.gguf")
    huge = write_tiny_gguf(folder / "huge.gguf", context_length=1 << 20, block_count=400, embedding_length=8192,
                           attention__head_count=64, attention__head_count_kv=64)
    fake = {**{k: v for k, v in BASE.items() if k != "fill"}, "repetitions": 1, "gen_tokens": 4, "contexts": [256],
            "prompt_tokens": 16}
    hang_env = {"FITBENCH_TEST_GRANDCHILD": str(folder / "grandchild.pid")}  # HangRunner writes its child's pid
    files["failures"] = _run(folder, "failures", env=hang_env, scenario={
        **fake, "timeout": 4,
        "models": [{"artifact": str(tiny), "runtime": "fake_runners:CrashRunner", "label": "crash"},
                   {"artifact": str(tiny), "runtime": "fake_runners:HangRunner", "label": "hang"},
                   # a provider this machine lacks: the real ONNX runner answers per case (unavailable row)
                   {"artifact": str(ROOT / "models" / "SmolLM2-135M-Instruct-onnx-int4"), "runtime": "onnxruntime",
                    "label": "qnn", "options": {"provider": "qnn"}}]})
    files["skipped"] = _run(folder, "skipped", {
        **fake, "contexts": [1 << 20], "models": [{"artifact": str(huge), "runtime": "llama.cpp", "label": "huge"}]})
    files["interrupted"] = _interrupted_then_resumed(folder, tiny, fake)
    files["fleet"] = _fleet_dataset(folder, sample_model)
    return files


def _workflow_scenario(model: dict) -> dict:
    return {"models": [model], "warmup": 0, "repetitions": 2, "timeout": 300,
            "workflow": [{"kind": "chat", "turns": 2, "user_tokens": 48, "reply_tokens": 8},
                         {"kind": "document", "document_tokens": 192, "questions": 2, "question_tokens": 16,
                          "reply_tokens": 8}]}


def _interrupted_then_resumed(folder: Path, tiny: Path, fake: dict) -> Path:
    """A real `fitbench run` stopped with SIGINT while its second case hangs, then `--resume`."""
    path = folder / "stop.yaml"
    path.write_text(yaml.safe_dump({"name": "stop", **fake, "timeout": 60, "models": [
        {"artifact": str(tiny), "runtime": "fake_runners:FakeRunner", "label": "ok"},
        {"artifact": str(tiny), "runtime": "fake_runners:HangRunner", "label": "hang"}]}))
    out = folder / "stop"
    hang_env = {"FITBENCH_TEST_GRANDCHILD": str(folder / "grandchild-stop.pid")}
    env = {**os.environ, **hang_env, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", str(path), "-o", str(out)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not glob.glob(f"{out}/stop-*[0-9a-f].parquet"):
        time.sleep(0.2)
    time.sleep(2.0)  # the hanging case is running now
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    [result] = expand_result_files([f"{out}/stop-*.parquet"])
    assert {r["status"] for r in _rows(result)} == {"ok", "interrupted"}
    # the interrupted file as the consumers would get it, before the resume replaces its row
    kept = folder / "interrupted"
    kept.mkdir()
    for src in (result, timeline_path_for(result)):
        shutil.copy2(src, kept / src.name)
    # resume: the interrupted case runs again (and hangs again: a timeout now, with a short limit)
    resumed = fitbench("run", str(path), "-o", str(out), "--resume", "--timeout", "3", env=hang_env)
    assert resumed.returncode in (0, 1), resumed.stderr + resumed.stdout
    assert {r["status"] for r in _rows(result)} == {"ok", "timeout"}  # the interrupted row was re-run
    return kept / result.name


def _fleet_dataset(folder: Path, sample_model: Path) -> Path:
    """Two machine classes of one fleet run: the Ray task body itself, on this machine, as two nodes."""
    from harness.fleet.dataset import FleetDataset
    from harness.fleet.remote import run_case_on_node
    from harness.scenario import parse_scenario
    from harness.suite import new_run_id

    sc = parse_scenario({"name": "fleet", **BASE, "repetitions": 1, "contexts": [256],
                         "models": [{"artifact": str(sample_model), "runtime": "llama.cpp", "label": "q4_1"}]})
    run_id = new_run_id()
    root = folder / "fleet" / f"fleet-{run_id}"
    dataset = FleetDataset(root, {"run_id": run_id, "scenario": "fleet"})
    for cls, node in (("fake-a", "node-a"), ("fake-b", "node-b")):
        for case in sc.cases():
            out = run_case_on_node(case, cls, run_id, False, None, node)
            assert out["status"] == "ok", out["error"]
            dataset.add(cls, node, out["rows"], out["timeline"])
    return root


def _by_status(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in rows:
        out.setdefault(row["status"], []).append(row)
    return out


def test_every_kind_of_case_is_a_row_with_one_verdict(matrix):
    budgets = _rows(matrix["budgets"])
    plain = [r for r in budgets if r["budget_requested_bytes"] is None]
    assert [r["status"] for r in plain] == ["ok", "ok"] and plain[0]["quality_ppl"] > 1
    assert plain[0]["budget_method"] == "none" and plain[0]["budget_bytes"] == plain[0]["ram_bytes"]
    one_gib = [r for r in budgets if r["budget_requested_bytes"] == 1 << 30]
    assert {r["status"] for r in one_gib} == {"ok"} and one_gib[0]["fit_class"] in ("fits", "slow")
    # quality does not depend on the budget: the budgeted case reuses the plain case's probe
    assert one_gib[0]["quality_ppl"] == plain[0]["quality_ppl"]
    assert one_gib[0]["quality_case_key"] == plain[0]["case_key"] != one_gib[0]["case_key"]
    tiny = [r for r in budgets if r["budget_requested_bytes"] == 20 << 20]
    if _cgroup_enforces():
        assert one_gib[0]["budget_method"] != "none"
        assert tiny[-1]["status"] in ("oom", "killed", "load_error") and tiny[-1]["fit_class"] == "no_fit"
    yard = _rows(matrix["yardstick"])
    assert {r["budget_method"] for r in yard} == {"none"}
    assert {r["budget_requested_bytes"] for r in yard} == {None, 1 << 30, 150 << 20}
    # the 150 MiB yardstick is below the sample's peak: judged over budget (spill), never fits/tight
    small = [r for r in yard if r["budget_requested_bytes"] == 150 << 20]
    assert small and all(r["fit_class"] == "spill" and r["fit_memory"] == "over_budget" for r in small)

    wf = _rows(matrix["workflow"])
    turns = [r for r in wf if r["turn"] is not None]
    sessions = [r for r in wf if r["turn"] is None]
    assert len(turns) == 2 * 2 + 2 * 2 and len(sessions) == 4  # chat 2 turns, document 2 questions; 2 reps
    assert all(r["processed_tokens"] <= r["context_tokens"] for r in turns)
    assert all(r["fit_turn"] is not None for r in sessions)

    failures = _by_status(_rows(matrix["failures"]))
    assert set(failures) == {"crashed", "timeout", "unavailable"}
    assert failures["timeout"][0]["fit_class"] == "slow" and failures["crashed"][0]["fit_class"] is None
    [skipped] = _rows(matrix["skipped"])
    assert skipped["status"] == "skipped" and skipped["fit_class"] is None and "estimated peak" in skipped["error"]
    stopped = _by_status(_rows(matrix["interrupted"]))
    assert set(stopped) == {"ok", "interrupted"} and stopped["interrupted"][0]["fit_class"] is None

    fleet = _rows_of_dataset(matrix["fleet"])
    assert {r["machine_class"] for r in fleet} == {"fake-a", "fake-b"} and {r["status"] for r in fleet} == {"ok"}
    # every row of every kind has the same columns by the same producer: identity is always there
    for rows in (budgets, yard, wf, fleet, skipped and [skipped]):
        for row in rows:
            assert row["schema_version"] and row["case_key"] and row["machine_class"] and row["run_id"]
            assert row["budget_bytes"] is not None and row["thresholds_json"]


def _rows_of_dataset(root: Path) -> list[dict]:
    return [row for path in expand_result_files([root]) for row in _rows(path)]


def _all_inputs(matrix) -> list[str]:
    """Every file the matrix wrote, named the obvious way: a glob that also matches the timelines."""
    return [str(p.parent / "*.parquet") for k, p in matrix.items() if k != "fleet"] + [str(matrix["fleet"])]


def test_compare_and_report_read_every_kind(matrix, tmp_path):
    proc = fitbench("compare", *_all_inputs(matrix), "--format", "json")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    json.loads(proc.stdout)
    # budgets that were only judged against (no cgroup) keep their three groups; a per-case
    # figure (peak RSS) is one figure per side, never tested as n repetitions
    again = tmp_path / "again"
    again.mkdir()
    for src in (matrix["yardstick"], timeline_path_for(matrix["yardstick"])):
        shutil.copy2(src, again / src.name)
    proc = fitbench("compare", str(matrix["yardstick"]), str(again / "*.parquet"), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    [cmp] = json.loads(proc.stdout)
    assert len({r["case"] for r in cmp["rows"]}) == 3
    peaks = [r for r in cmp["rows"] if r["metric"] == "peak RSS"]
    assert peaks and all(r["per_case"] and r["test"] == "none" and r["significant"] is None for r in peaks)
    report = tmp_path / "report.html"
    proc = fitbench("report", *_all_inputs(matrix), "-o", str(report))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert report.stat().st_size > 10_000


def test_catalog_update_takes_every_kind(matrix, tmp_path):
    catalog = tmp_path / "catalog.yaml"
    proc = fitbench("catalog", "update", *_all_inputs(matrix), "--catalog", str(catalog))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    fits = yaml.safe_load(catalog.read_text())["fits"]
    assert {f["machine_class"] for f in fits} >= {"fake-a", "fake-b"}
    assert any(f.get("workflow") for f in fits)
    shown = fitbench("catalog", "show", "--catalog", str(catalog), "--machine-class", "all")
    assert shown.returncode == 0, shown.stderr


def test_contribute_dry_run_sends_every_row(matrix, tmp_path):
    for name in ("budgets", "workflow", "fleet"):
        proc = fitbench("contribute", str(matrix[name]), "--dry-run", env={"XDG_CONFIG_HOME": str(tmp_path)})
        assert proc.returncode == 0, proc.stderr + proc.stdout


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    with upstream_subprocess(tmp_path_factory.mktemp("up") / "up.sqlite") as url:
        yield url


def test_a_real_upstream_accepts_every_kind_and_serves_them_under_their_own_keys(matrix, upstream, tmp_path):
    cfg = {"XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    sent = 0
    for name in ("budgets", "yardstick", "workflow", "failures", "fleet"):
        proc = fitbench("contribute", str(matrix[name]), "--yes", "--to", upstream, env=cfg)
        assert proc.returncode == 0, f"{name}: {proc.stderr}{proc.stdout}"
        sent += 1
    stats = httpx.get(f"{upstream}/v1/stats").json()
    wf_rows = _rows(matrix["workflow"])
    assert stats["rows"] >= len(wf_rows)
    fits = httpx.get(f"{upstream}/v1/fits", params={"limit": 1000}).json()
    entries = fits["fits"] if isinstance(fits, dict) else fits
    turns = {e.get("turn") for e in entries}
    assert {1, 2} <= turns and None in turns  # turn rows apart from the case-level rows
    classes = {e.get("machine_class") for e in entries}
    assert {"fake-a", "fake-b"} <= classes
    catalog = tmp_path / "catalog.yaml"
    pulled = fitbench("catalog", "pull", upstream, "--catalog", str(catalog))
    assert pulled.returncode == 0, pulled.stderr + pulled.stdout
    assert yaml.safe_load(catalog.read_text())["fits"]
