"""``fitbench bench``: llama-bench's sweep -> cases, its records, and the command end to end."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from harness.artifact import ArtifactInfo
from harness.benchsweep import (
    BENCH_FIELDS,
    BenchCase,
    BenchError,
    Sweep,
    bench_records,
    expand,
    parse_list,
    runner_options,
    runtime_for,
)
from harness.cli.bench import bench
from harness.results import read_results
from tests.conftest import write_tiny_gguf
from tests.test_cli import assert_usage_error, fitbench


def test_parse_list():
    assert parse_list("-p", "512,1024") == [512, 1024]
    assert parse_list("-p", " 64 ") == [64]
    for bad in ("512,,1024", "512,x", ""):
        with pytest.raises(BenchError, match="-p"):
            parse_list("-p", bad)
    with pytest.raises(BenchError, match="at least 2"):
        parse_list("-n", "1", minimum=2)


def test_sweep_is_a_cross_product_with_llama_bench_context_rule(tmp_path):
    art = write_tiny_gguf(tmp_path / "m.gguf", context_length=8192)
    sweep = Sweep(models=[art], n_prompt=[64, 128], n_gen=[8], n_depth=[0, 256],
                  flags={"flash_attn": [False, True]}, repetitions=2)
    cases, scenarios = expand(sweep)
    assert len(cases) == 2 * 2 * 2 and len(scenarios) == 4
    assert [bc.case.index for bc in cases] == list(range(8))
    shapes = {(bc.n_prompt, bc.n_depth, bc.case.prompt_tokens, bc.case.n_ctx, bc.case.options["flash_attn"])
              for bc in cases}
    assert (128, 256, 384, 128 + 8 + 256, True) in shapes  # prompt = d + p; n_ctx = p + n + d
    assert (64, 0, 64, 72, False) in shapes
    assert len(shapes) == 8
    assert {bc.case.runtime for bc in cases} == {"llama.cpp"}
    assert {bc.case.repetitions for bc in cases} == {2}
    # -c raises the context, never lowers it below what the test needs
    big = expand(Sweep(models=[art], n_prompt=[64], n_gen=[8], n_ctx=1024))[0]
    assert [bc.case.n_ctx for bc in big] == [1024]
    small = expand(Sweep(models=[art], n_prompt=[64], n_gen=[8], n_ctx=16))[0]
    assert [bc.case.n_ctx for bc in small] == [72]


def test_runtime_inferred_from_the_format():
    for fmt, runtime in [("gguf", "llama.cpp"), ("onnx", "onnxruntime"), ("mlx", "mlx"), ("hf", "torch")]:
        assert runtime_for(ArtifactInfo(path=Path("x"), format=fmt, size_bytes=1), None) == runtime
    assert runtime_for(ArtifactInfo(path=Path("x"), format="gguf", size_bytes=1), "fake_runners:FakeRunner") \
        == "fake_runners:FakeRunner"


def test_flag_a_runtime_lacks_is_an_error():
    with pytest.raises(BenchError, match="-ngl: runtime .onnxruntime. cannot set it"):
        runner_options(Sweep(models=[], flags={"n_gpu_layers": [1]}), "onnxruntime")
    assert runner_options(Sweep(models=[], flags={"n_gpu_layers": [0], "flash_attn": [False]}), "onnxruntime") == {}
    with pytest.raises(BenchError, match="-fa: runtime 'onnxruntime'"):
        runner_options(Sweep(models=[], flags={"flash_attn": [False, True]}), "onnxruntime")
    assert runner_options(Sweep(models=[], flags={"n_threads": [2]}), "onnxruntime") == {"intra_op_num_threads": 2}
    assert runner_options(Sweep(models=[], flags={"type_k": ["q8_0", "f16"]}), "llama.cpp") == \
        {"type_k": ["q8_0", "f16"]}
    with pytest.raises(BenchError, match="-ctk q9"):
        runner_options(Sweep(models=[], flags={"type_k": ["q9"]}), "llama.cpp")


def test_shown_option_columns_are_the_varying_ones():
    assert Sweep(models=[], flags={"flash_attn": [False]}).shown_fields() == []
    assert Sweep(models=[], flags={"flash_attn": [False, True], "type_k": ["q8_0"]}).shown_fields() == \
        ["flash_attn", "type_k"]


def test_click_takes_multi_letter_single_dash_flags():
    ctx = bench.make_context("bench", ["-m", "a.gguf,b.gguf", "-ctk", "q8_0,f16", "-ctv", "f16", "-fa", "0,1",
                                       "-ngl", "99", "-c", "2048", "-o", "jsonl"])
    p = ctx.params
    assert (p["type_k"], p["type_v"], p["flash_attn"], p["n_gpu_layers"], p["n_ctx"], p["output"]) == \
        ("q8_0,f16", "f16", "0,1", "99", 2048, "jsonl")
    assert p["models"] == ("a.gguf,b.gguf",)


@pytest.mark.parametrize("args, words", [
    (["--runtime", "onnxruntime", "-ngl", "1"], ["-ngl", "onnxruntime"]),
    (["-ngl", "1,x"], ["-ngl", "'x'"]),
    (["-p", "64,,128"], ["-p"]),
    (["-ctk", "q9"], ["-ctk", "q9"]),
    (["-n", "1"], ["-n", "at least 2"]),
    (["--runtime", "ollama"], ["--runtime", "unknown runtime 'ollama'"]),
    (["-c", "99999"], ["-c/-p/-n/-d", "trained for"]),
    (["--runtime", "fake_runners:UnavailableRunner"], ["-m/--runtime", "not available"]),
])
def test_bad_flags_are_one_line_usage_errors(tmp_path, args, words):
    art = write_tiny_gguf(tmp_path / "m.gguf")
    assert_usage_error(fitbench("bench", "-m", str(art), *args, "--output-dir", str(tmp_path / "out")), *words)


def _rows(case, ttfts, e2es, decode):
    base = {"status": "ok", "kv_type": "f16/f16", "n_threads": 2, "artifact_arch": "llama",
            "artifact_n_params": 134_515_008, "artifact_quant": "Q4_1", "artifact_size_bytes": 98_000_000,
            "started_at": datetime(2026, 1, 1, tzinfo=timezone.utc), "fit_class": "fits", "fit_reason": "ok"}
    return [{**base, "repetition": i, "ttft_s": t, "e2e_s": e, "decode_tok_s": d, "peak_rss_bytes": 100 + i}
            for i, (t, e, d) in enumerate(zip(ttfts, e2es, decode))]


def test_records_carry_llama_bench_fields(tmp_path):
    art = write_tiny_gguf(tmp_path / "m.gguf")
    bc = expand(Sweep(models=[art], n_prompt=[64], n_gen=[8], n_depth=[32]))[0][0]
    assert isinstance(bc, BenchCase) and bc.case.prompt_tokens == 96
    pp, tg = bench_records(bc, _rows(bc.case, [0.5, 1.0], [1.2, 1.7], [10.0, 10.0]), "r.parquet")
    assert list(pp) == list(BENCH_FIELDS)
    assert (pp["test"], pp["n_prompt"], pp["n_gen"], pp["n_depth"]) == ("pp64 @ d32", 64, 0, 32)
    assert (tg["test"], tg["n_prompt"], tg["n_gen"]) == ("tg8 @ d32", 0, 8)
    assert pp["samples_ts"] == [96 / 0.5, 96 / 1.0]  # over the whole prompt, depth included
    assert pp["samples_ns"] == [500_000_000, 1_000_000_000] and pp["avg_ns"] == 750_000_000
    assert pp["avg_ts"] == pytest.approx(144.0) and pp["stddev_ts"] == pytest.approx(67.88, abs=0.01)
    assert tg["samples_ts"] == [10.0, 10.0] and tg["stddev_ts"] == 0
    assert tg["samples_ns"] == [pytest.approx(700_000_000, abs=1)] * 2
    assert (pp["type_k"], pp["flash_attn"], pp["n_gpu_layers"], pp["n_batch"]) == ("f16", False, 0, 2048)
    assert pp["model_type"] == "llama 135M Q4_1" and pp["model_filename"] == str(art.resolve())
    assert (pp["peak_rss_bytes"], pp["ttft_ms"], pp["fit_class"], pp["case_key"]) == (101, 750.0, "fits",
                                                                                       bc.case.key)
    assert pp["test_time"].startswith("2026-01-01T00:00:00")


def test_failed_case_records_have_no_rates(tmp_path):
    art = write_tiny_gguf(tmp_path / "m.gguf")
    bc = expand(Sweep(models=[art], n_prompt=[64], n_gen=[8]))[0][0]
    rows = [{"status": "oom", "error": "killed", "repetition": None, "fit_class": "no_fit", "fit_reason": "oom"}]
    pp, tg = bench_records(bc, rows, "r.parquet")
    assert pp["avg_ts"] is None and pp["samples_ts"] == [] and pp["status"] == "oom"
    assert tg["fit_class"] == "no_fit" and tg["error"] == "killed"


@pytest.mark.model
def test_bench_json_on_the_sample_model(tmp_path, sample_model):
    out = tmp_path / "out"
    proc = fitbench("bench", "-m", str(sample_model), "-p", "64", "-n", "8", "-r", "2", "-fa", "0,1", "-o", "json",
                    "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr
    records = json.loads(proc.stdout)  # stdout is clean JSON: progress went to stderr
    assert len(records) == 4 and len({r["case_key"] for r in records}) == 2
    assert {r["flash_attn"] for r in records} == {False, True}
    for r in records:
        assert set(BENCH_FIELDS) <= set(r)
        assert r["avg_ts"] > 0 and len(r["samples_ts"]) == 2 and len(r["samples_ns"]) == 2
        assert r["model_size"] > 0 and r["model_n_params"] > 0 and r["n_threads"] >= 1
        assert r["peak_rss_bytes"] > 0 and r["ttft_ms"] > 0 and r["fit_class"]
        assert Path(r["results_file"]).exists()
    assert {r["test"] for r in records} == {"pp64", "tg8"}
    results = Path(records[0]["results_file"])
    assert results.parent == out and results.name.startswith("bench-")
    rows = read_results(results).to_pylist()  # the Parquet a `fitbench run` writes: a row per repetition
    assert len(rows) == 4 and {r["case_key"] for r in rows} == {r["case_key"] for r in records}
    assert "[1/2]" in proc.stderr and "[2/2]" in proc.stderr  # progress on stderr


@pytest.mark.model
def test_bench_markdown_shows_only_varying_columns(tmp_path, sample_model):
    proc = fitbench("bench", "-m", str(sample_model), "-p", "16", "-n", "2", "-r", "1", "-fa", "0,1", "-ctk", "f16",
                    "--output-dir", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert all(line.startswith("|") and line.endswith("|") for line in lines)
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert "fa" in header and "type_k" not in header and "ngl" not in header
    assert {"model", "size", "params", "backend", "threads", "test", "t/s", "peak MiB", "TTFT ms", "fit"} <= set(header)
    assert len(lines) == 2 + 4  # header, rule, pp and tg of two cases
    assert any("| pp16 |" in line for line in lines) and any("| tg2 |" in line for line in lines)


def test_printers_csv_jsonl_and_markdown(tmp_path, capsys):
    from harness.cli.present import bench_columns, make_bench_printer

    art = write_tiny_gguf(tmp_path / "m.gguf")
    bc = expand(Sweep(models=[art], n_prompt=[64], n_gen=[8]))[0][0]
    records = bench_records(bc, _rows(bc.case, [0.5, 1.0], [1.2, 1.7], [10.0, 10.0]), "r.parquet")
    for fmt in ("csv", "jsonl", "md"):
        p = make_bench_printer(fmt)
        p.header(bench_columns(["flash_attn"], fmt, BENCH_FIELDS))
        for r in records:
            p.row(r)
        p.footer()
        lines = capsys.readouterr().out.splitlines()
        if fmt == "csv":
            assert lines[0].split(",") == list(BENCH_FIELDS) and len(lines) == 3
        elif fmt == "jsonl":
            assert [json.loads(line)["test"] for line in lines] == ["pp64", "tg8"]
        else:
            assert lines[0].split(" | ")[5] == "fa" and "| pp64 | 96.00 ± 45.25 |" in lines[2]


def test_run_an_artifact_is_the_default_test(tmp_path):
    from harness.benchsweep import default_scenario

    sc = default_scenario(write_tiny_gguf(tmp_path / "m.v1.gguf", context_length=2048))
    (case,) = sc.cases()
    assert (case.runtime, case.n_ctx, case.prompt_tokens, case.gen_tokens) == ("llama.cpp", 2048, 512, 128)
    assert sc.name == "run-m-v1"
    assert default_scenario(write_tiny_gguf(tmp_path / "big.gguf", context_length=131072)).contexts == [4096]


def test_run_an_artifact_takes_run_options_and_checks_it(tmp_path):
    art = write_tiny_gguf(tmp_path / "m.gguf")
    out = str(tmp_path / "out")
    assert_usage_error(fitbench("run", str(art), "--contexts", "99999", "-o", out), "trained for")
    assert_usage_error(fitbench("run", str(tmp_path / "missing.gguf"), "-o", out), "not found")


@pytest.mark.model
def test_run_the_sample_model_without_a_scenario(tmp_path, sample_model):
    out = tmp_path / "out"
    proc = fitbench("run", str(sample_model), "-r", "1", "-n", "4", "--contexts", "1024", "-o", str(out))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    (results,) = [p for p in out.glob("run-*.parquet") if not p.name.endswith(".timeline.parquet")]
    (row,) = read_results(results).to_pylist()
    assert (row["status"], row["n_ctx"], row["prompt_tokens"], row["runtime"]) == ("ok", 1024, 512, "llama.cpp")


def test_bench_jsonl_end_to_end_with_a_fake_runner(tmp_path):
    """The whole command without a real model: isolated cases, records streamed, Parquet written."""
    art = write_tiny_gguf(tmp_path / "m.gguf")
    out = tmp_path / "out"
    proc = fitbench("bench", "-m", str(art), "--runtime", "fake_runners:FakeRunner", "-p", "16,32", "-n", "4",
                    "-r", "2", "-o", "jsonl", "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]  # every stdout line is a record
    assert [r["test"] for r in records] == ["pp16", "tg4", "pp32", "tg4"]
    assert all(r["avg_ts"] > 0 and len(r["samples_ts"]) == 2 and r["fit_class"] for r in records)
    rows = read_results(Path(records[0]["results_file"])).to_pylist()
    assert sorted(r["prompt_tokens"] for r in rows) == [16, 16, 32, 32]
    assert "[2/2]" in proc.stderr
