"""Runner availability is answered without importing any runtime into the harness process
(the measuring parent), and the answer is still the truth the runtime itself would give."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from runners.base import get_runner_class, probe_runtime
from runners.onnx import PROVIDERS
from tests.conftest import ROOT

# Everything a runtime drags in that must never land in the harness process.
RUNTIME_MODULES = ("llama_cpp", "mlx", "mlx_lm", "onnxruntime", "onnxruntime_genai", "torch", "transformers",
                   "accelerate")
# What a built-in runner needs installed to be available.
NEEDS = {"llama.cpp": ("llama_cpp",), "torch": ("torch", "transformers", "accelerate"),
         "onnxruntime": ("onnxruntime_genai",), "mlx": ("mlx", "mlx_lm")}


def installed(runtime: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in NEEDS[runtime])


def run_python(code: str) -> dict:
    """Run ``code`` in a fresh interpreter from the repository root; its last stdout line is JSON."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


CHECK_SYS_MODULES = f"""
imported = sorted(m for m in sys.modules if m.split(".")[0] in {RUNTIME_MODULES!r})
"""


def test_availability_of_every_runner_imports_no_runtime():
    code = """
import json, sys
from runners.base import get_runner_class, registered_runners
answers, cases = {}, {}
for name in sorted(registered_runners()):
    cls = get_runner_class(name)
    a = cls.available()
    answers[name] = {"available": a.available, "reason": a.reason, "version": a.version, "devices": a.devices}
    # every choice of every option with choices: covers ONNX's per-provider answer
    options = [{}] + [{key: c} for key, spec in cls.options.items() for c in (spec.choices or ())]
    cases[name] = [[o, cls.case_availability(o).available] for o in options]
""" + CHECK_SYS_MODULES + """
print(json.dumps({"imported": imported, "answers": answers, "cases": cases}))
"""
    out = run_python(code)
    assert out["imported"] == [], "availability imported a runtime into the harness process"
    assert set(NEEDS) <= set(out["answers"])
    for runtime in NEEDS:
        answer = out["answers"][runtime]
        assert answer["available"] == installed(runtime), (runtime, answer["reason"])
        if answer["available"]:
            assert answer["version"] and "cpu" in answer["devices"]
            default_case = out["cases"][runtime][0]
            assert default_case == [{}, True]
    onnx_cases = {o["provider"]: ok for o, ok in out["cases"]["onnxruntime"] if "provider" in o}
    assert set(onnx_cases) == set(PROVIDERS)
    assert onnx_cases["cpu"] == installed("onnxruntime")


def test_the_runners_command_imports_no_runtime():
    code = """
import json, sys
from click.testing import CliRunner
from harness.cli import cli
result = CliRunner().invoke(cli, ["runners", "--json"])
assert result.exit_code == 0, result.output
rows = {r["runtime"]: r for r in json.loads(result.output)}
""" + CHECK_SYS_MODULES + """
print(json.dumps({"imported": imported, "available": {k: r["available"] for k, r in rows.items()}}))
"""
    out = run_python(code)
    assert out["imported"] == []
    assert {k: out["available"][k] for k in NEEDS} == {k: installed(k) for k in NEEDS}


# --- the answers are the truth -------------------------------------------------------------
# Each truth script imports the runtime directly, written apart from the runners' probes.

TRUTH = {
    "llama.cpp": """
import importlib.metadata, json, llama_cpp
print(json.dumps({"version": importlib.metadata.version("llama-cpp-python"),
                  "gpu": bool(llama_cpp.llama_supports_gpu_offload())}))
""",
    "torch": """
import json, torch
print(json.dumps({"version": torch.__version__,
                  "cuda": torch.cuda.device_count() if torch.cuda.is_available() else 0,
                  "mps": bool(torch.backends.mps.is_available())}))
""",
    "onnxruntime": """
import json, onnxruntime_genai, onnxruntime
print(json.dumps({"version": onnxruntime_genai.__version__, "eps": onnxruntime.get_available_providers()}))
""",
    "mlx": """
import importlib.metadata, json, mlx.core as mx
gpu = mx.metal.is_available() or bool(getattr(mx, "cuda", None) and mx.cuda.is_available())
print(json.dumps({"version": importlib.metadata.version("mlx-lm"), "mlx": importlib.metadata.version("mlx"),
                  "gpu": gpu}))
""",
}


@pytest.mark.parametrize("runtime", sorted(TRUTH))
def test_availability_matches_what_the_runtime_says(runtime):
    cls = get_runner_class(runtime)
    avail = cls.available()
    if not installed(runtime):
        assert not avail.available and "not installed" in avail.reason and "fitbench[" in avail.install
        return
    assert avail.available, avail.reason
    assert "cpu" in avail.devices
    truth = run_python(TRUTH[runtime])
    if runtime == "llama.cpp":
        assert avail.version == truth["version"]
        assert (len(avail.devices) > 1) == truth["gpu"]
    elif runtime == "torch":
        assert avail.version.startswith(f"torch {truth['version']}, transformers ")
        assert sum(d.startswith("cuda:") for d in avail.devices) == truth["cuda"]
        assert ("mps" in avail.devices) == truth["mps"]
    elif runtime == "onnxruntime":
        assert avail.version == truth["version"]
        present = [name for name, (ep, _og, _pkg) in PROVIDERS.items() if ep in truth["eps"]]
        assert avail.devices == present and "CPUExecutionProvider" in avail.notes
        for provider in PROVIDERS:
            case = cls.case_availability({"provider": provider})
            assert case.available == (provider in present), provider
            if not case.available:
                assert provider in case.reason and "not present" in case.reason and case.install
    else:
        assert avail.version == truth["version"] and f"mlx {truth['mlx']}" in avail.notes
        assert ("gpu" in avail.devices) == truth["gpu"]


# --- the shared subprocess probe -----------------------------------------------------------

def test_a_probe_answers_from_another_process_once_per_key(tmp_path, monkeypatch):
    log = tmp_path / "probes.log"
    monkeypatch.setenv("FITBENCH_TEST_PROBE_LOG", str(log))
    key = str(tmp_path)  # unique to this test: nothing cached before it
    first = probe_runtime("fakeruntime 1.0", "fake_runners:probe_facts_ok", key=key)
    assert first.ok and first.facts["devices"] == ["cpu", "npu"]  # stdout chatter does not confuse it
    assert first.facts["pid"] != os.getpid()
    assert probe_runtime("fakeruntime 1.0", "fake_runners:probe_facts_ok", key=key) is first
    assert log.read_text().count("probed") == 1
    probe_runtime("fakeruntime 1.1", "fake_runners:probe_facts_ok", key=key + "-upgraded")
    assert log.read_text().count("probed") == 2  # a new version is probed again


@pytest.mark.parametrize("target, timeout, reason", [
    ("fake_runners:probe_facts_broken", 120, "fakeruntime 1.2 is installed but failed to import: "
                                             "ImportError: libfake.so.1: cannot open shared object file: "
                                             "No such file or directory"),
    ("fake_runners:probe_facts_hang", 2, "fakeruntime 1.2 is installed but importing it took longer than 2 s"),
    ("fake_runners:probe_facts_crash", 120, "fakeruntime 1.2 is installed but importing it crashed the "
                                            "interpreter (SIGSEGV)"),
    ("fake_runners:no_such_probe", 120, "fakeruntime 1.2 is installed but failed to import: AttributeError: "),
])
def test_a_failed_probe_is_one_clear_line(tmp_path, target, timeout, reason):
    probe = probe_runtime("fakeruntime 1.2", target, key=str(tmp_path), timeout=timeout)
    assert not probe.ok and probe.facts == {}
    assert probe.error.startswith(reason) and "\n" not in probe.error, probe.error


@pytest.mark.parametrize("runtime", sorted(NEEDS))
def test_an_installed_runtime_that_fails_to_import_is_unavailable_with_the_reason(monkeypatch, runtime):
    cls = get_runner_class(runtime)
    module = sys.modules[cls.__module__]
    monkeypatch.setattr(module, "missing_modules", lambda *names: [])  # "installed", whatever this machine has
    monkeypatch.setattr(module, "FACTS", "fake_runners:probe_facts_broken")
    for avail in (cls.available(), cls.case_availability({})):
        assert not avail.available and avail.install == module.INSTALL
        assert " is installed but failed to import: ImportError: libfake.so.1" in avail.reason, avail.reason
