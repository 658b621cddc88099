"""Every bad input ends in one line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, write_tiny_gguf


def fitbench(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {}), "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=900)  # a loaded 2-core CI box is slow


def assert_usage_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("fitbench: error: ")
    assert "Traceback" not in proc.stderr + proc.stdout
    for word in words:
        assert word in lines[0], lines[0]


def scenario_text(artifact: str, runtime: str = "fake_runners:FakeRunner", extra: str = "") -> str:
    return f"models:\n  - artifact: {artifact}\n    runtime: {runtime}\ncontexts: [256]\nrepetitions: 1\n{extra}"


@pytest.mark.parametrize(
    "text, words",
    [
        ("models: [\n contexts: 3\n", ["malformed YAML", "line"]),
        ("- just\n- a list\n", ["must be a mapping"]),
        (scenario_text("{art}", extra="repetitons: 2\n"), ["repetitons", "did you mean 'repetitions'"]),
        (scenario_text("{art}", extra="gen_tokens: many\n"), ["gen_tokens", "must be an integer"]),
        (scenario_text("{dir}/missing.gguf"), ["models[0].artifact", "not found"]),
        (scenario_text("{dir}/bad.gguf"), ["models[0].artifact", "not a GGUF file"]),
        (scenario_text("{dir}/cut.gguf"), ["models[0].artifact", "truncated"]),
        (scenario_text("{art}", runtime="ollama"), ["models[0].runtime", "unknown runtime 'ollama'", "llama.cpp"]),
        (scenario_text("{art}", runtime="fake_runners:UnavailableRunner"), ["not available", "pip install fakeruntime"]),
        (scenario_text("{art}", extra="contexts: [99999]\n"), ["contexts", "trained for"]),
    ],
)
def test_bad_scenarios(tmp_path, text, words):
    art = write_tiny_gguf(tmp_path / "ok.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"PK\x03\x04 not a model")
    (tmp_path / "cut.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    text = text.replace("contexts: [256]\n", "") if "contexts: [99999]" in text else text
    path = tmp_path / "s.yaml"
    path.write_text(text.format(art=art, dir=tmp_path))
    assert_usage_error(fitbench("run", str(path), "-o", str(tmp_path / "out")), *words)


def test_missing_scenario_file(tmp_path):
    assert_usage_error(fitbench("run", str(tmp_path / "nope.yaml")), "file not found")


def test_bad_contexts_override(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(scenario_text(str(write_tiny_gguf(tmp_path / "ok.gguf"))))
    assert_usage_error(fitbench("run", str(path), "--contexts", "512,lots"), "--contexts")


def test_unwritable_output(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(scenario_text(str(write_tiny_gguf(tmp_path / "ok.gguf"))))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_usage_error(fitbench("run", str(path), "-o", str(blocker / "sub")), "cannot create output folder")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores mode bits: make the folder path a file instead
            pytest.skip("running as root: permission bits do not stop writes")
        assert_usage_error(fitbench("run", str(path), "-o", str(ro)), "not writable")
    finally:
        ro.chmod(0o700)


def test_click_usage_errors_are_one_line_too():
    proc = fitbench("run")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1


def test_runners_and_machine_commands():
    proc = fitbench("runners", "--json")
    assert proc.returncode == 0, proc.stderr
    assert '"llama.cpp"' in proc.stdout
    proc = fitbench("machine", "--json")
    assert proc.returncode == 0, proc.stderr
    assert '"machine_class"' in proc.stdout
    assert fitbench("--help").returncode == 0
