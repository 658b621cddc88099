"""`fitbench run` is the measuring parent: it must not carry analysis libraries or runtimes in its memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT, write_tiny_gguf

HEAVY = ["duckdb", "matplotlib", "pandas", "torch", "llama_cpp", "onnxruntime", "onnxruntime_genai", "mlx", "ray"]

PROBE = """
import json, sys
{body}
print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}} & set({heavy!r}))))
"""


def loaded_after(body: str) -> list[str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    proc = subprocess.run([sys.executable, "-c", PROBE.format(body=body, heavy=HEAVY)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_importing_the_command_line_loads_none_of_them():
    assert loaded_after("import harness.cli, harness.cli.run") == []


def test_a_whole_run_loads_none_of_them_in_the_parent(tmp_path):
    art = write_tiny_gguf(tmp_path / "tiny.gguf")
    scenario = tmp_path / "s.yaml"
    scenario.write_text(f"models:\n  - artifact: {art}\n    runtime: fake_runners:FakeRunner\n"
                        "contexts: [256]\nrepetitions: 1\ngen_tokens: 4\nwarmup: 0\n")
    body = (f"sys.argv = ['fitbench', 'run', {str(scenario)!r}, '-o', {str(tmp_path / 'out')!r}]\n"
            "from harness.cli import main\n"
            "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n")
    assert loaded_after(body) == []
    assert list((tmp_path / "out").glob("*.timeline.parquet"))  # the run really ran and wrote its rows
