"""A real Ray cluster on this machine: a head and two agent nodes advertising different (fake) machine classes.

The head runs no cases (it has no fitbench slot); the agents are ``ray.cluster_utils.Cluster`` nodes with
the resources ``fitbench fleet agent`` would advertise. Everything is driven through the real CLI in
subprocesses. Kept light for a 2-core box: one CPU per node, 80 MiB object stores, tiny cases, no timed
assertions; the cluster is always shut down and any process of its session left over is killed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import yaml

from harness.fleet.dataset import result_files
from harness.fleet.resources import agent_resources

# A real local Ray cluster (a head and agents): minutes, so `make unit` leaves these out.
pytestmark = pytest.mark.cluster

pytest.importorskip("ray", reason="fleet tests need fitbench[fleet]")

ROOT = Path(__file__).resolve().parents[1]
FITBENCH = [sys.executable, "-m", "harness.cli"]
FAKE = "fake_runners:FakeRunner"
CLASSES = ("fake-a", "fake-b")
WAIT_S = 900  # generous: other jobs share the two cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agent(cluster, machine_class: str):
    return cluster.add_node(num_cpus=1, object_store_memory=80 << 20,
                            resources=agent_resources(machine_class, ["llama.cpp", FAKE], 4 << 30))


@pytest.fixture(scope="module")
def ray_cluster():
    from ray.cluster_utils import Cluster

    mp = pytest.MonkeyPatch()
    # Case tasks (and their workers) find tests/fake_runners.py; nodes inherit this environment.
    mp.setenv("RAY_worker_niceness", "0")  # as `fitbench fleet agent` starts its node
    mp.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    Path("/tmp/ray").mkdir(exist_ok=True)  # Cluster records its address there
    client_port = _free_port()
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=0, object_store_memory=80 << 20, include_dashboard=False, ray_client_server_port=client_port))
    session = cluster.head_node.get_session_dir_path()
    try:
        cluster.nodes = {cls: _agent(cluster, cls) for cls in CLASSES}
        cluster.client_address = f"ray://127.0.0.1:{client_port}"
        yield cluster
    finally:
        cluster.shutdown()
        mp.undo()
        _kill_leftovers(session)


def _kill_leftovers(session: str) -> None:
    """Processes of this cluster's session that outlived shutdown (we started them; nothing else matches)."""
    left = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(session in arg for arg in p.info["cmdline"] or []):
                left.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=10)


def _fleet_run(scenario: Path, address: str, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([*FITBENCH, "fleet", "run", str(scenario), "--address", address, "-o", str(out), *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "COLUMNS": "200"})


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        output, _ = proc.communicate(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"fleet run did not finish in {WAIT_S} s:\n{output[-3000:]}")
    return proc.returncode, output


def _rows(out: Path) -> list[dict]:
    (dataset,) = [d for d in out.iterdir() if (d / "fleet.json").exists()]
    return [r for f in result_files(dataset) for r in pq.read_table(f).to_pylist()]


def _outcomes(rows: list[dict]) -> Counter:
    """(class, case key, status) -> rows; one case has one status per class, never two."""
    return Counter((r["machine_class"], r["case_key"], r["status"]) for r in rows)


@pytest.mark.model
def test_sample_model_runs_once_per_class_on_matching_nodes(ray_cluster, sample_model, tmp_path):
    scenario = tmp_path / "fleet-quick.yaml"
    scenario.write_text(yaml.safe_dump({
        "name": "fleetquick", "models": [{"artifact": str(sample_model), "runtime": "llama.cpp", "label": "smollm2"}],
        "contexts": [256, 512], "fill": 0.5, "gen_tokens": 8, "warmup": 0, "repetitions": 1, "timeout": 600}))
    out = tmp_path / "out"
    code, output = _finish(_fleet_run(scenario, ray_cluster.client_address, out))  # Ray Client, like a laptop would
    assert code == 0, output
    rows = _rows(out)
    node_of = {cls: node.node_id for cls, node in ray_cluster.nodes.items()}
    assert sorted(_outcomes(rows).values()) == [1, 1, 1, 1]  # 2 cases x 2 classes, each once
    assert {(r["machine_class"], r["status"]) for r in rows} == {("fake-a", "ok"), ("fake-b", "ok")}
    for r in rows:
        assert r["fleet_node_id"] == node_of[r["machine_class"]]  # it ran on a node of its class
        assert r["decode_tok_s"] > 0 and r["peak_rss_bytes"] > 0
    dataset = next(d for d in out.iterdir() if d.is_dir())
    timelines = sorted(p.name for p in dataset.rglob("*.timeline.parquet"))
    assert timelines == sorted(f"node-{node_of[c][:12]}.timeline.parquet" for c in CLASSES)

    cmp = subprocess.run([*FITBENCH, "compare", str(dataset), "--by", "machine_class", "--format", "json"], cwd=ROOT,
                         capture_output=True, text=True)
    assert cmp.returncode == 0, cmp.stderr
    data = json.loads(cmp.stdout)
    assert data["sides"] == ["machine_class=fake-a", "machine_class=fake-b"]
    assert len(data["matrix"]) == 2 and all(row[s]["fit"] for row in data["matrix"] for s in data["sides"])
    assert not data["comparisons"][0]["unmatched_baseline"] and not data["comparisons"][0]["unmatched_candidate"]
    report = subprocess.run([*FITBENCH, "report", str(dataset), "-o", str(tmp_path / "r.html")], cwd=ROOT,
                            capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    assert "fake-a" in (tmp_path / "r.html").read_text()


def _status(address: str) -> dict:
    out = subprocess.run([*FITBENCH, "fleet", "status", "--address", address, "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _wait_until_running(address: str, machine_class: str, proc: subprocess.Popen) -> dict:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the fleet run ended before a case ran on " + machine_class
        for run in _status(address)["runs"]:
            for node in run["nodes"]:
                if node["machine_class"] == machine_class and node.get("phase") == "generating":
                    return node
        time.sleep(1)
    pytest.fail(f"no case ran on {machine_class} within {WAIT_S} s")


def _slow_fake_scenario(tmp_path: Path, tiny_gguf: Path) -> Path:
    scenario = tmp_path / "fleet-fake.yaml"
    scenario.write_text(yaml.safe_dump({
        "name": "fleetfake", "models": [{"artifact": str(tiny_gguf), "runtime": FAKE, "options": {"token_delay": 0.25}}],
        "contexts": [256, 512], "fill": 0.5, "gen_tokens": 40, "warmup": 0, "repetitions": 1, "timeout": 600}))
    return scenario


def test_ctrl_c_keeps_what_finished_and_resume_completes_the_run(ray_cluster, tiny_gguf, tmp_path):
    address = ray_cluster.address
    scenario = _slow_fake_scenario(tmp_path, tiny_gguf)
    out = tmp_path / "interrupted"
    proc = _fleet_run(scenario, address, out)
    _wait_until_running(address, "fake-a", proc)
    proc.send_signal(signal.SIGINT)
    code, output = _finish(proc)
    assert code == 130 and "--resume" in output, output
    assert {r["status"] for r in _rows(out)} <= {"ok", "interrupted"}
    code, output = _finish(_fleet_run(scenario, address, out, "--resume"))
    assert code == 0, output
    rows = _rows(out)
    keys = {r["case_key"] for r in rows}
    assert len(keys) == 2
    assert _outcomes(rows) == Counter({(cls, key, "ok"): 1 for cls in CLASSES for key in keys})


def test_killed_node_is_retried_then_lost_then_resumed(ray_cluster, tiny_gguf, tmp_path):
    address = ray_cluster.address
    scenario = _slow_fake_scenario(tmp_path, tiny_gguf)

    # 1. A fake-b node dies mid-case and a new fake-b node joins: Ray retries the case there.
    out = tmp_path / "retried"
    proc = _fleet_run(scenario, address, out, "--lost-grace", "600")
    _wait_until_running(address, "fake-b", proc)
    ray_cluster.remove_node(ray_cluster.nodes["fake-b"], allow_graceful=False)
    ray_cluster.nodes["fake-b"] = _agent(ray_cluster, "fake-b")
    code, output = _finish(proc)
    assert code == 0, output
    rows = _rows(out)
    assert sorted(_outcomes(rows).items()) == sorted(
        {(cls, key, "ok"): 1 for cls in CLASSES for key in {r["case_key"] for r in rows}}.items())
    retried = [r for r in rows if r["machine_class"] == "fake-b" and r["fleet_node_id"] == ray_cluster.nodes["fake-b"].node_id]
    assert retried, "the killed case was not rerun on the replacement node"

    # 2. The fake-b node dies and none comes back: its running case is a lost row, the run says how to resume.
    out = tmp_path / "lost"
    proc = _fleet_run(scenario, address, out, "--lost-grace", "5")
    _wait_until_running(address, "fake-b", proc)
    ray_cluster.remove_node(ray_cluster.nodes["fake-b"], allow_graceful=False)
    code, output = _finish(proc)
    assert code == 1 and "--resume" in output, output
    rows = _rows(out)
    outcomes = _outcomes(rows)
    assert all(n == 1 for (cls, _, status), n in outcomes.items() if status != "ok")
    assert len([k for k in outcomes if k[0] == "fake-a" and k[2] == "ok"]) == 2
    assert any(k[0] == "fake-b" and k[2] == "lost" for k in outcomes)

    # 3. A fake-b agent is back: --resume runs only what is missing, and every case is there exactly once.
    ray_cluster.nodes["fake-b"] = _agent(ray_cluster, "fake-b")
    code, output = _finish(_fleet_run(scenario, address, out, "--resume"))
    assert code == 0, output
    rows = _rows(out)
    keys = {r["case_key"] for r in rows}
    assert len(keys) == 2
    assert _outcomes(rows) == Counter({(cls, key, "ok"): 1 for cls in CLASSES for key in keys})
