"""Fleet logic without a cluster: resources, placement, the partitioned dataset and its resume, the CLI's errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from harness.analyse.compare import expand, split_by
from harness.cli import cli, main
from harness.fleet import FleetError, require_ray
from harness.fleet.dataset import FleetDataset, latest_dataset, read_dataset, result_files
from harness.fleet.placement import choose_classes, place
from harness.fleet.resources import CLASS_PREFIX, RAM_MIB, RUNTIME_PREFIX, SLOT, agent_resources, case_resources, parse_nodes
from harness.results import RESULT_SCHEMA
from harness.scenario import parse_scenario

ROOT = Path(__file__).resolve().parents[1]


def node_info(node_id: str, cls: str, runtimes: list[str], ram_gib: int = 16, alive: bool = True) -> dict:
    return {"NodeID": node_id, "Alive": alive, "NodeManagerAddress": "10.0.0.1", "NodeManagerPort": 1234,
            "NodeManagerHostname": "box", "Resources": {"CPU": 4.0, **agent_resources(cls, runtimes, ram_gib << 30)}}


@pytest.fixture
def cases(tiny_gguf):
    sc = parse_scenario({"name": "fl", "models": [{"artifact": str(tiny_gguf), "runtime": "fake_runners:FakeRunner"}],
                         "contexts": [256, 512], "fill": 0.5, "gen_tokens": 4, "warmup": 0, "repetitions": 2})
    return sc.cases()


def test_agent_resources_round_trip():
    res = agent_resources("apple-m3-16GiB", ["llama.cpp", "mlx"], 16 << 30)
    assert res == {SLOT: 1, CLASS_PREFIX + "apple-m3-16GiB": 1, RUNTIME_PREFIX + "llama.cpp": 1,
                   RUNTIME_PREFIX + "mlx": 1, RAM_MIB: 16384}
    nodes = parse_nodes([
        {"NodeID": "head", "Alive": True, "Resources": {"CPU": 2.0}},  # not an agent
        node_info("b" * 56, "cpu-x86_64-24GiB", ["llama.cpp"], 24, alive=False),
        node_info("a" * 56, "apple-m3-16GiB", ["llama.cpp", "mlx"]),
    ])
    assert [(n.machine_class, n.alive, n.runtimes, n.ram_bytes) for n in nodes] == [
        ("apple-m3-16GiB", True, ("llama.cpp", "mlx"), 16 << 30), ("cpu-x86_64-24GiB", False, ("llama.cpp",), 24 << 30)]
    with pytest.raises(ValueError, match="machine class"):
        agent_resources("bad class/x", ["llama.cpp"], 1 << 30)


def test_case_resources_take_the_whole_slot_and_the_estimate():
    assert case_resources("c", "llama.cpp", 300 << 20) == {SLOT: 1, CLASS_PREFIX + "c": 1,
                                                           RUNTIME_PREFIX + "llama.cpp": 1, RAM_MIB: 300}
    assert RAM_MIB not in case_resources("c", "llama.cpp", None)


def test_placement_per_class_with_refusals(cases):
    rt = "fake_runners:FakeRunner"
    nodes = parse_nodes([node_info("a" * 56, "big", [rt], 64), node_info("b" * 56, "small", [rt], 1),
                         node_info("c" * 56, "other", ["llama.cpp"], 64),
                         node_info("d" * 56, "dead", [rt], 64, alive=False)])
    classes = choose_classes(nodes, None)
    assert classes == ["big", "other", "small"]  # the dead node's class is not offered
    with pytest.raises(ValueError, match="no live fitbench agent of machine class dead"):
        choose_classes(nodes, ["big", "dead"])
    guess = {c.key: (2 << 30 if c.n_ctx == 512 else 100 << 20) for c in cases}
    placed, refused = place(cases, classes, nodes, lambda c: guess[c.key])
    assert sorted((p.machine_class, p.case.n_ctx) for p in placed) == [("big", 256), ("big", 512), ("small", 256)]
    assert {(r.machine_class, r.case.n_ctx, r.status) for r in refused} == {
        ("other", 256, "unavailable"), ("other", 512, "unavailable"), ("small", 512, "skipped")}
    assert all(p.resources[SLOT] == 1 and p.resources[CLASS_PREFIX + p.machine_class] == 1 for p in placed)
    forced, refused = place(cases, ["small"], nodes, lambda c: guess[c.key], force=True)
    assert len(forced) == 2 and not refused
    assert RAM_MIB not in next(p for p in forced if p.case.n_ctx == 512).resources  # Ray could never place it


def _rows(case, cls: str, status: str = "ok", reps: int = 2) -> list[dict]:
    base = {"run_id": "r1", "scenario": "fl", "case_index": case.index, "case_key": case.key, "case_label": case.label,
            "machine_class": cls, "runtime": case.runtime, "n_ctx": case.n_ctx}
    if status != "ok":
        return [{**base, "status": status, "repetition": None}]
    return [{**base, "status": "ok", "repetition": i, "decode_tok_s": 10.0 + i} for i in range(reps)]


def test_dataset_is_partitioned_by_class_and_writes_each_case_once(tmp_path, cases):
    ds = FleetDataset.create(tmp_path, "fl", "r1", {"machine_classes": ["a", "b"]})
    assert ds.add("a", "node1", _rows(cases[0], "a"), {})
    assert not ds.add("a", "node2", _rows(cases[0], "a"), {})  # a retried duplicate is dropped
    assert ds.add("b", "node3", _rows(cases[0], "b"), {})
    files = result_files(ds.root)
    assert [f.relative_to(ds.root).as_posix() for f in files] == [
        "machine_class=a/node-node1.parquet", "machine_class=b/node-node3.parquet"]
    assert all(pq.read_schema(f).names == RESULT_SCHEMA.names for f in files)
    assert json.loads((ds.root / "fleet.json").read_text())["run_id"] == "r1"
    assert expand([str(ds.root)]) == files  # compare and report read the folder
    assert read_dataset(ds.root).num_rows == 4
    assert expand([str(tmp_path)]) == files
    assert [s.label for s in split_by(files, "machine_class")] == ["machine_class=a", "machine_class=b"]


def test_resume_keeps_finished_drops_lost_and_leaves_other_classes(tmp_path, cases):
    ds = FleetDataset.create(tmp_path, "fl", "r1", {})
    ds.add("a", "n1", _rows(cases[0], "a"), {})
    ds.add("a", "n1", _rows(cases[1], "a", "ok", reps=1), {})  # half finished: 1 of 2 repetitions
    ds.add("b", "lost", _rows(cases[0], "b", "lost"), {})
    ds.add("b", "n2", _rows(cases[1], "b", "oom"), {})  # a final failure counts as done
    assert latest_dataset(tmp_path, "fl") == ds.root
    again = FleetDataset.resume(ds.root, cases, ["a"])  # class b is not part of this resume
    assert again.done == {("a", cases[0].key), ("b", cases[1].key)}
    rows = [r for f in result_files(ds.root) for r in pq.read_table(f).to_pylist()]
    assert sorted((r["machine_class"], r["case_index"], r["status"]) for r in rows) == [
        ("a", 0, "ok"), ("a", 0, "ok"), ("b", 0, "lost"), ("b", 1, "oom")]
    FleetDataset.resume(ds.root, cases, ["a", "b"])  # now b runs again: its lost case is dropped for the rerun
    rows = [r for f in result_files(ds.root) for r in pq.read_table(f).to_pylist()]
    assert ("b", 0, "lost") not in {(r["machine_class"], r["case_index"], r["status"]) for r in rows}


def test_missing_ray_is_one_line_with_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(FleetError, match=r"pip install 'fitbench\[fleet\]'"):
        require_ray()


def test_nothing_outside_the_fleet_package_imports_ray():
    code = ("import sys, harness.cli, harness.suite, harness.analyse.compare, harness.analyse.report, harness.fleet.launch; "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def _cli(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["fitbench", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


def test_fleet_run_without_address_or_ray_is_a_usage_error(monkeypatch, capsys, write_scenario, tiny_gguf):
    sc = write_scenario({"models": [{"artifact": str(tiny_gguf), "runtime": "fake_runners:FakeRunner"}],
                         "contexts": [256]})
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code, err = _cli(["fleet", "run", str(sc), "-o", str(sc.parent / "out")], monkeypatch, capsys)
    assert code == 2 and "--address" in err and "Traceback" not in err
    monkeypatch.setitem(sys.modules, "ray", None)
    code, err = _cli(["fleet", "run", str(sc), "--address", "auto", "-o", str(sc.parent / "out")], monkeypatch, capsys)
    assert code == 2 and "pip install 'fitbench[fleet]'" in err and len(err.strip().splitlines()) == 1


def test_agent_dry_run_prints_ray_start_with_resources(tmp_path):
    result = CliRunner().invoke(cli, ["fleet", "agent", "--address", "10.0.0.1:6379", "--machine-class", "lab-gpu",
                                      "--runtimes", "llama.cpp,torch", "--ram", "8GiB", "--models-dir", str(tmp_path),
                                      "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "ray start --address=10.0.0.1:6379" in result.output
    resources = json.loads(result.output.split("--resources=")[1].split("}")[0].strip("'") + "}")
    assert resources == agent_resources("lab-gpu", ["llama.cpp", "torch"], 8 << 30)
    from harness.fleet.agent import plan

    p = plan(False, "10.0.0.1:6379", 6379, 10001, "c", ["llama.cpp"], 1 << 30, None, 1 << 28, tmp_path, None, False)
    assert p.env == {"RAY_worker_niceness": "0", "FITBENCH_MODELS_DIR": str(tmp_path.resolve())}
    bad = CliRunner().invoke(cli, ["fleet", "agent", "--dry-run"])
    assert "exactly one of --head" in str(bad.exception)  # main() turns it into one line and exit 2


def test_compare_by_needs_two_classes(tmp_path, cases):
    ds = FleetDataset.create(tmp_path, "fl", "r1", {})
    ds.add("a", "n1", _rows(cases[0], "a"), {})
    result = CliRunner().invoke(cli, ["compare", str(ds.root), "--by", "machine_class"])
    assert result.exit_code != 0
    ds.add("b", "n2", _rows(cases[0], "b"), {})
    ok = CliRunner().invoke(cli, ["compare", str(ds.root), "--by", "machine_class", "--format", "json"])
    assert ok.exit_code == 0, ok.output
    data = json.loads(ok.output)
    assert data["sides"] == ["machine_class=a", "machine_class=b"] and len(data["matrix"]) == 1
    assert data["matrix"][0]["machine_class=b"]["decode_tok_s"] == pytest.approx(10.5)


@pytest.mark.parametrize("address, message", [("nohostport", "write it as ray://HOST:PORT"),
                                              ("127.0.0.1:1", "cannot reach the Ray cluster at 127.0.0.1:1")])
def test_fleet_status_bad_or_unreachable_address(monkeypatch, capsys, address, message):
    code, err = _cli(["fleet", "status", "--address", address], monkeypatch, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_case_child_gets_the_nodes_environment_not_rays(monkeypatch):
    from harness.fleet.remote import node_environment

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what Ray sets in a worker for a task with num_cpus=0
    node_environment({"PATH": "/bin"}, os.getpriority(os.PRIO_PROCESS, 0))
    assert "OMP_NUM_THREADS" not in os.environ
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    node_environment({"OMP_NUM_THREADS": "8"}, os.getpriority(os.PRIO_PROCESS, 0))  # the user set it for the agent: keep theirs
    assert os.environ["OMP_NUM_THREADS"] == "8"
