"""Commands end to end without a model: whole status lines, result globs, data shown as text, one verdict."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from harness.cli import cli, main
from harness.fit import memory_verdict
from harness.results import ResultWriter, timeline_path_for
from tests.conftest import ROOT, write_tiny_gguf

MiB = 2**20


def write_results(path: Path, machine_class: str = "cpu-x86_64-24GiB", decode: float = 50.0) -> Path:
    """A result file and its timeline companion, as `fitbench run` leaves them."""
    rows = [{"run_id": path.stem, "case_key": "k1", "case_index": 0, "case_label": "pp128+tg32 @ ctx512",
             "repetition": rep, "status": "ok", "model_label": "m", "artifact_name": "m.gguf",
             "artifact_sha256": "f" * 64, "artifact_format": "gguf", "runtime": "llama.cpp",
             "options_json": '{"n_threads": 2}', "n_ctx": 512, "prompt_tokens": 128, "gen_tokens": 32,
             "budget_bytes": 24 << 30, "ram_bytes": 24 << 30, "budget_method": "none", "decode_tok_s": decode + rep,
             "ttft_s": 0.5, "peak_rss_bytes": 300 * MiB, "fit_class": "fits", "fit_reason": "resident",
             "machine_class": machine_class, "machine_id": "m1",
             "started_at": datetime(2026, 12, 1, 10, tzinfo=timezone.utc)}
            for rep in range(3)]
    writer = ResultWriter(path)
    writer.add_case(rows, {"t_s": [0.0, 0.1], "case_index": [0, 0], "case_key": ["k1", "k1"],
                           "run_id": [path.stem] * 2, "rss_bytes": [MiB, 2 * MiB]})
    assert timeline_path_for(path).exists()
    return path


def invoke(*args: str, env: dict | None = None):
    result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    return result


def test_a_status_line_is_one_line_in_a_pipe_whatever_the_path_and_columns(tmp_path):
    results = write_results(tmp_path / "a.parquet")
    deep = tmp_path / ("d" * 100) / ("e" * 100) / ("f" * 100)
    deep.mkdir(parents=True)
    catalog = deep / "catalog.yaml"
    assert len(str(catalog)) > 300
    env = {**os.environ, "COLUMNS": "40", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "catalog", "update", str(results), "--catalog",
                           str(catalog)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    expected = (f"{catalog}: 1 added, 0 updated, 0 already there, 0 without a verdict "
                "(from 1 file(s)); 1 artifact(s), 1 fit(s)")
    assert proc.stdout.splitlines() == [expected]


def test_catalog_pull_status_line_is_one_line(tmp_path, monkeypatch):
    from harness.share import client

    fit = {"artifact_sha256": "a" * 64, "machine_class": "cpu-x86_64-24GiB", "runtime": "llama.cpp", "n_ctx": 512,
           "fit_class": "fits", "samples": 3, "machines": 1, "decode_tok_s": {"median": 50.0}}
    monkeypatch.setattr(client, "fetch_fits", lambda url, retry, say, **kw: {"fits": [fit]})
    catalog = tmp_path / ("c" * 200) / ("d" * 100) / "catalog.yaml"
    result = invoke("catalog", "pull", "https://upstream.example", "--catalog", str(catalog), env={"COLUMNS": "40"})
    assert result.exit_code == 0, result.output
    [line] = result.output.splitlines()
    assert line.startswith(f"{catalog}: community fits from https://upstream.example: 1 added, 0 updated")


def test_result_globs_take_timeline_companions_as_their_result_files(tmp_path):
    a, b = write_results(tmp_path / "a.parquet"), write_results(tmp_path / "b.parquet", decode=20.0)
    shell_glob = sorted(str(p) for p in tmp_path.glob("*.parquet"))  # what `results/*.parquet` expands to
    assert len(shell_glob) == 4 and str(timeline_path_for(a)) in shell_glob

    compared = invoke("compare", *shell_glob, "--format", "json")
    assert compared.exit_code == 0, compared.output
    [only] = json.loads(compared.output)  # a vs b; not a vs its own timeline, not b twice
    assert (only["baseline"], only["candidate"]) == ([str(a)], [str(b)])

    for args in (shell_glob, [str(tmp_path / "*.parquet")]):
        catalog = tmp_path / f"c{len(args)}.yaml"
        updated = invoke("catalog", "update", *args, "--catalog", str(catalog))
        assert updated.exit_code == 0, updated.output
        assert "from 2 file(s)" in updated.output

    self_only = CliRunner().invoke(cli, ["compare", str(a), str(timeline_path_for(a))])
    assert "nothing to compare" in str(self_only.exception)


def test_catalog_show_prints_data_never_reads_it_as_markup(tmp_path):
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({
        "artifacts": {"[bold]x": {"format": "gguf"}},
        "fits": [{"artifact": "[bold]x", "machine_class": "[/]", "runtime": "llama.cpp", "options": "community",
                  "n_ctx": 512, "prompt_tokens": 256, "budget_bytes": None, "fit_class": "fits",
                  "peak_rss_bytes": 300 * MiB, "decode_tok_s": 50.0, "ttft_s": 0.5, "count": 1}]}))
    for fmt in ("table", "markdown", "csv", "json"):
        shown = invoke("catalog", "show", "--catalog", str(catalog), "--machine-class", "[/]", "--format", fmt)
        assert shown.exit_code == 0, shown.output
        assert "[bold]x" in shown.output
    table = invoke("catalog", "show", "--catalog", str(catalog), "--machine-class", "all").output
    assert "[/]" in table and "[bold]x" in table


def test_plain_text_prints_as_written_with_no_escape_backslashes(capsys):
    """The console parses markup only in ``Markup`` strings, so a plain line is never escaped first:
    rich's ``escape`` on it printed "\\[llama.cpp]" (recommend's notes, bench's and run's lines)."""
    import ast

    from harness.cli.present import make_console

    make_console(stderr=True).print("fitbench: measuring x.gguf [llama.cpp] at context 4,096")
    assert capsys.readouterr().err.strip() == "fitbench: measuring x.gguf [llama.cpp] at context 4,096"
    cli_dir = Path(__file__).resolve().parents[1] / "harness" / "cli"
    for path in sorted(cli_dir.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "print":
                escaped = [a for a in node.args if isinstance(a, ast.Call) and getattr(a.func, "id", None) == "escape"]
                assert not escaped, f"{path.name}:{node.lineno}: print(escape(...)) shows backslashes"


def test_catalog_show_formats_and_the_budget_verdict(tmp_path):
    catalog = tmp_path / "catalog.yaml"
    invoke("catalog", "update", str(write_results(tmp_path / "a.parquet")), "--catalog", str(catalog))
    args = ("catalog", "show", "--catalog", str(catalog), "--machine-class", "cpu-x86_64-24GiB", "--budget", "320MiB")
    md = invoke(*args, "--format", "markdown").output.splitlines()
    assert md[2].startswith("| artifact | runtime | options | n_ctx |") and md[3].startswith("| --- |")
    assert "| fits | tight |" in md[4]  # measured fits; 300 of 320 MiB is within the 10% headroom
    rows = list(csv.DictReader(io.StringIO(invoke(*args, "-f", "csv").output)))
    assert rows[0]["peak_rss_bytes"] == str(300 * MiB) and rows[0]["budget_verdict"] == "tight"
    [entry] = json.loads(invoke(*args, "--format", "json").output)
    assert entry["budget_verdict"] == "tight" and "320 MiB budget" in entry["budget_reason"]
    roomy = json.loads(invoke(*args, "-f", "json", "--threshold", "headroom=0.01").output)
    assert roomy[0]["budget_verdict"] == "fits"


def test_estimate_judges_with_the_one_memory_verdict(tmp_path):
    art = write_tiny_gguf(tmp_path / "t.gguf", embedding_length=256, attention__head_count=4)

    def verdict(budget: int, *extra: str) -> dict:
        result = invoke("estimate", str(art), "-c", "512", "--budget", str(budget), "--format", "json", *extra)
        assert result.exit_code == 0, result.output
        [row] = json.loads(result.output)
        return row

    total = verdict(2**40)["total_bytes"]
    assert verdict(total - 1)["fit_class"] == "spill"  # over the budget spills; no_fit is for what fails to load
    assert verdict(int(total / 0.95))["fit_class"] == "tight"
    assert verdict(2 * total)["fit_class"] == "fits"
    assert verdict(2 * total, "--threshold", "headroom=0.6")["fit_class"] == "tight"
    assert verdict(total - 1)["fit_reason"] == memory_verdict(total, total - 1).reason


def test_every_expected_failure_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    def run(*args: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["fitbench", *args])
        with pytest.raises(SystemExit) as exit_info:
            main()
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert err.startswith("fitbench: error: ")
        return exit_info.value.code, err

    assert run("catalog", "show", "--catalog", str(tmp_path / "none.yaml"))[0] == 2  # a UsageError
    code, err = run("estimate", str(tmp_path / "missing.gguf"), "-c", "512")  # the artifact module's own error
    assert code == 2 and "missing.gguf" in err
    code, err = run("compare", str(tmp_path / "*.parquet"), "x.parquet")  # the results module's resolver
    assert code == 2 and "no result files" in err
    code, err = run("compare", "a", "b", "--by", "hostname")  # click's own usage error keeps its exit 2
    assert code == 2 and "machine_class" in err
    code, err = run("thresholds", "--format", "yaml")
    assert code == 2 and "--format" in err


@pytest.mark.parametrize("command", [["thresholds"], ["machine"], ["runners"]])
def test_info_commands_print_every_format(command):
    table = invoke(*command).output
    assert table.strip() and "Traceback" not in table
    md = invoke(*command, "--format", "markdown").output.splitlines()
    assert md[0].startswith("### ") and md[2].startswith("| ") and md[3].startswith("| --- ")
    rows = list(csv.DictReader(io.StringIO(invoke(*command, "-f", "csv").output)))
    assert rows and all(None not in r for r in rows)  # no row longer than the header
    data = json.loads(invoke(*command, "-f", "json").output)
    if command == ["thresholds"]:
        by_name = {r["name"]: r for r in data}
        assert by_name["headroom"]["default"] == 0.1 and by_name["max_kl"]["default"] is None  # "off" is null
    elif command == ["machine"]:
        assert data == json.loads(invoke("machine", "--json").output) and "machine_class" in data
    else:
        assert data == json.loads(invoke("runners", "--json").output)
        assert all(isinstance(r["formats"], list) for r in data)
