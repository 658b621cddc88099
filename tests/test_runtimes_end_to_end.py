"""`fitbench run` and `fitbench runners` with the onnxruntime-genai and MLX runners on the real
sample artifacts: ok rows, exact stamps, n_ctx recorded, providers that are absent or unknown."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from tests.conftest import ROOT
from tests.test_cli import assert_usage_error, fitbench

pytestmark = pytest.mark.model
ONNX = ROOT / "models" / "SmolLM2-135M-Instruct-onnx-int4"
MLX = ROOT / "models" / "SmolLM2-135M-Instruct-mlx-q4"


def scenario(tmp_path, models, **extra):
    for path in (ONNX, MLX):
        if not path.exists():
            pytest.fail(f"{path} is missing: run `make sample-models`")
    data = {"name": "tiny-runtimes", "models": models, "contexts": [128], "prompt_tokens": [24], "gen_tokens": 4,
            "warmup": 0, "repetitions": 1, "timeout": 600, **extra}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runtimes")
    path = scenario(tmp, [
        {"artifact": str(ONNX), "runtime": "onnxruntime", "label": "onnx", "options": {"provider": ["cpu", "cuda"]}},
        {"artifact": str(MLX), "runtime": "mlx", "label": "mlx"},
    ])
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    # MLX's Linux CPU backend is slow on a loaded 2-core box: more time than test_cli's helper allows.
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "run", str(path), "-o", str(tmp / "out")],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    [results] = [p for p in glob.glob(f"{tmp}/out/tiny-runtimes-*.parquet") if not p.endswith(".timeline.parquet")]
    return pd.read_parquet(results)


def test_ok_rows_with_exact_stamps_and_n_ctx(tiny_run):
    df = tiny_run
    ok = df[df["status"] == "ok"]
    assert sorted(ok["runtime"].unique()) == ["mlx", "onnxruntime"]
    assert (ok["gen_tokens"] == 4).all() and (ok["prompt_tokens"] == 24).all()
    assert (ok["n_ctx"] == 128).all() and (ok["n_ctx_runtime"] == 128).all()
    assert (ok["decode_tok_s"] > 0).all() and (ok["ttft_s"] > 0).all()
    meanings = dict(zip(ok["runtime"], ok["n_ctx_meaning"]))
    assert "max_length" in meanings["onnxruntime"] and "max_kv_size" in meanings["mlx"]
    assert set(ok["artifact_format"]) == {"onnx", "mlx"}


def test_provider_used_is_recorded(tiny_run):
    row = tiny_run[(tiny_run["runtime"] == "onnxruntime") & (tiny_run["status"] == "ok")].iloc[0]
    extra = json.loads(row["runtime_extra_json"])
    assert extra["execution_provider"] == "CPUExecutionProvider" and extra["max_length"] == 128
    assert row["device"] == "cpu"


def test_absent_provider_is_an_unavailable_row(tiny_run):
    df = tiny_run
    cuda = df[df["options_json"].str.contains('"cuda"')]
    assert len(cuda) == 1
    if cuda.iloc[0]["status"] == "ok":
        pytest.skip("this machine has the CUDA execution provider")
    assert cuda.iloc[0]["status"] == "unavailable"
    assert "not present" in cuda.iloc[0]["error"] and "install with" in cuda.iloc[0]["error"]


def test_unknown_provider_is_a_one_line_usage_error(tmp_path):
    path = scenario(tmp_path, [{"artifact": str(ONNX), "runtime": "onnxruntime", "options": {"provider": "tpu"}}])
    proc = fitbench("run", str(path), "-o", str(tmp_path / "out"))
    assert_usage_error(proc, "provider", "tpu")


def test_runners_lists_versions_devices_and_providers():
    proc = fitbench("runners", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["runtime"]: r for r in json.loads(proc.stdout)}
    assert rows["onnxruntime"]["available"] and "cpu" in rows["onnxruntime"]["devices"]
    assert "CPUExecutionProvider" in rows["onnxruntime"]["notes"]
    assert rows["mlx"]["available"] and rows["mlx"]["version"] and "cpu" in rows["mlx"]["devices"]
