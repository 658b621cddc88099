"""Resumable suites: Ctrl-C and SIGKILL mid-run, then --resume; every row exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from harness.results import ResultsError
from harness.resume import RunLock
from tests.conftest import ROOT, write_tiny_gguf

SCENARIO = """
name: resumable
models:
  - artifact: {art}
    runtime: fake_runners:FakeRunner
    options: {{token_delay: 0.05}}
contexts: [128, 256, 512, 1024]
fill: 0.5
gen_tokens: 8
warmup: 0
repetitions: 2
"""


def start(scenario: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    return subprocess.Popen([sys.executable, "-m", "harness.cli", "run", str(scenario), "-o", str(out), *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def results_file(out: Path) -> Path:
    [path] = [p for p in out.glob("resumable-*.parquet") if not p.name.endswith(".timeline.parquet")]
    return path


def wait_for_rows(out: Path, n: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = [p for p in out.glob("resumable-*.parquet") if not p.name.endswith(".timeline.parquet")]
        if files and len(pd.read_parquet(files[0])) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("rows did not appear")


@pytest.fixture
def scenario(tmp_path) -> Path:
    path = tmp_path / "resumable.yaml"
    path.write_text(SCENARIO.format(art=write_tiny_gguf(tmp_path / "t.gguf")))
    return path


def finished_rows(out: Path) -> pd.DataFrame:
    df = pd.read_parquet(results_file(out))
    return df


def assert_complete(df: pd.DataFrame) -> None:
    assert (df.status == "ok").all(), df[["case_index", "status"]]
    pairs = list(zip(df.case_index, df.repetition))
    assert pairs == [(i, r) for i in range(4) for r in range(2)]  # each once, in case order
    assert df.run_id.nunique() == 1


def test_sigkill_then_resume(tmp_path, scenario):
    out = tmp_path / "out"
    proc = start(scenario, out)
    wait_for_rows(out, 4, proc)  # two cases done
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, "the worker outlived a SIGKILLed harness"
    before = finished_rows(out)
    assert 4 <= len(before) < 8
    resumed = start(scenario, out, "--resume")
    stdout, stderr = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, stderr
    assert "already done" in stdout
    assert_complete(finished_rows(out))


def test_ctrl_c_records_interrupted_then_resume(tmp_path, scenario):
    out = tmp_path / "out"
    proc = start(scenario, out)
    wait_for_rows(out, 2, proc)
    time.sleep(0.3)  # into the second case
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    df = finished_rows(out)
    assert "interrupted" in set(df.status)
    resumed = start(scenario, out, "--resume")
    _, stderr = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, stderr
    assert_complete(finished_rows(out))


def test_resume_with_nothing_left_changes_nothing(tmp_path, scenario):
    out = tmp_path / "out"
    first = start(scenario, out)
    assert first.wait(timeout=120) == 0
    before = results_file(out).read_bytes()
    again = start(scenario, out, "--resume")
    stdout, _ = again.communicate(timeout=60)
    assert again.returncode == 0 and "4 of 4 case(s) already done" in stdout
    assert results_file(out).read_bytes() == before


def test_two_runs_cannot_write_one_file(tmp_path):
    target = tmp_path / "r.parquet"
    with RunLock(target):
        with pytest.raises(ResultsError, match="another fitbench run"):
            with RunLock(target):
                pass
    with RunLock(target):  # released
        pass
