"""fitbench recommend without a model: constraints, checks, the pick, the front, sources, machine classes."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from harness.cli import cli, main
from harness.fit import Thresholds, constraint_checks, constraints_verdict
from harness.recommend import constraints as cons
from harness.recommend.candidates import Candidate, Observation, expand_artifacts, gather
from harness.recommend.judge import assess, closest, mark_front, pick
from harness.recommend.serve import serve_answers
from harness.results import ResultWriter
from tests.conftest import write_tiny_gguf

MiB = 2**20
MC = "cpu-x86_64-24GiB"


def rows(name: str, n_ctx: int = 4096, decode: float = 50.0, peak: int = 200 * MiB, kl: float | None = None,
         fit: str = "fits", run: str = "r1", machine_class: str = MC, reps: int = 2, status: str = "ok",
         runtime: str = "llama.cpp", **kw) -> list[dict]:
    out = []
    for rep in range(reps):
        out.append({
            "run_id": run, "case_key": f"{name}-{n_ctx}-{runtime}", "case_index": 0, "repetition": rep,
            "status": status, "artifact_name": name, "artifact_size_bytes": 90 * MiB, "artifact_format": "gguf",
            "artifact_context_length": 8192, "runtime": runtime, "options_json": '{"n_threads": 2, "n_batch": 2048}',
            "n_ctx": n_ctx, "prompt_tokens": n_ctx // 2, "gen_tokens": 16, "decode_tok_s": decode, "ttft_s": 1.0,
            "peak_rss_bytes": peak, "fit_class": fit, "fit_reason": fit, "machine_class": machine_class,
            "machine_id": f"id-{machine_class}", "ram_bytes": 24 << 30,
            "quality_kl_mean": kl, "started_at": datetime(2026, 12, 1, tzinfo=timezone.utc), **kw})
    return out


def write(path: Path, all_rows: list[dict]) -> Path:
    writer = ResultWriter(path)
    writer.add_case(all_rows, {})
    return path


def constraints(**kw) -> cons.Constraints:
    args = dict(budget="250MiB", available_bytes=8 << 30, context=4096, min_tok_s="20", max_ttft=None, max_kl=None,
                max_ppl_ratio=None, min_pass_rate=None, tasks=None, users=1, runtime="any", machine_class="this",
                fill=0.5)
    args.update(kw)
    return cons.build(**args)


# --- constraints in the user's words --------------------------------------------------------------

def test_times_and_sizes_in_the_users_units():
    assert cons.parse_seconds("--max-ttft", "5s") == 5.0
    assert cons.parse_seconds("--max-ttft", "800ms") == pytest.approx(0.8)
    assert cons.parse_seconds("--max-ttft", "2.5") == 2.5
    assert cons.parse_rate("--min-tok-s", "15tok/s") == 15.0
    c = constraints(max_ttft="500ms", max_kl="0.05")
    assert c.budget_bytes == 250 * MiB and c.thresholds.max_ttft_s == 0.5 and c.thresholds.max_kl == 0.05
    assert c.thresholds.min_decode_tok_s == 20.0
    assert constraints(budget=None).budget_bytes == 8 << 30  # this machine's available memory


@pytest.mark.parametrize("args, words", [
    (["--budget", "8XB"], "--budget 8XB: cannot read"),
    (["--budget", "0"], "--budget 0: a memory size must be positive"),
    (["--max-ttft", "5h"], "--max-ttft 5h: cannot read it as a time"),
    (["--max-ttft", "0s"], "must be above 0"),
    (["--min-tok-s", "-1"], "--min-tok-s -1: a speed must be above 0"),
    (["--max-kl", "-0.1"], "--max-kl -0.1: must be 0 or more"),
    (["--max-ppl-ratio", "0.9"], "a ratio to the reference is at least 1"),
    (["--min-pass-rate", "0.8"], "--min-pass-rate needs --tasks FILE"),
    (["--context", "0"], "--context 0: a context is"),
    (["--users", "0"], "--users 0: at least 1 user"),
    (["--runtime", "vllm"], "--runtime vllm: unknown runtime"),
    (["--measure", "--machine-class", "all"], "--measure measures this machine"),
    (["--reference", "/no/such/f16.gguf"], "--reference /no/such/f16.gguf: not found"),
])
def test_bad_constraints_are_one_line_errors_with_exit_2(args, words, capsys, tmp_path):
    results = write(tmp_path / "r.parquet", rows("a.gguf"))
    with pytest.raises(SystemExit) as exit_info:
        main(["recommend", "--results", str(results), "--catalog", str(tmp_path / "none.yaml"), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fitbench: error: ") and words in err, err


def test_no_candidates_is_an_error_with_exit_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["recommend", "--catalog", str(tmp_path / "empty.yaml")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no candidates" in err
    results = write(tmp_path / "r.parquet", rows("a.gguf"))
    with pytest.raises(SystemExit) as exit_info:  # nothing for that runtime
        main(["recommend", "--results", str(results), "--catalog", str(tmp_path / "e.yaml"), "--runtime", "mlx"])
    assert exit_info.value.code == 2 and "no candidates for runtime mlx" in capsys.readouterr().err


# --- the checks (decided in harness/fit.py) -------------------------------------------------------

def test_constraint_checks_judge_each_constraint_and_say_by_how_much():
    t = Thresholds().merged({"min_decode_tok_s": 20, "max_kl": 0.05})
    fig = {"peak_bytes": 300 * MiB, "decode_tok_s": 10.0, "ttft_s": 1.0, "quality_kl_mean": 0.1,
           "context_length": 8192}
    checks = {k.name: k for k in constraint_checks(fig, 250 * MiB, t, 4096)}
    assert checks["memory"].passed is False and checks["memory"].shortfall == pytest.approx(0.2)
    assert checks["decode"].passed is False and checks["decode"].shortfall == pytest.approx(0.5)
    assert checks["ttft"].passed and checks["context"].passed
    assert checks["quality"].passed is False and "KL 0.1000 > 0.05" in checks["quality"].text
    tight = {k.name: k for k in constraint_checks({"peak_bytes": 240 * MiB}, 250 * MiB, t, 4096)}
    assert tight["memory"].passed and "tight" in tight["memory"].text
    assert tight["decode"].passed is None and constraints_verdict(list(tight.values())) == "unknown"
    short = {k.name: k for k in constraint_checks({"context_length": 2048}, 250 * MiB, t, 4096)}
    assert short["context"].passed is False
    no_fit = {k.name: k for k in constraint_checks({"fit_class": "no_fit", "fit_reason": "oom"}, 1 << 30, t, 512)}
    assert no_fit["memory"].passed is False


# --- the pick, quality-aware, the front, the closest miss ----------------------------------------

def candidates_from(tmp_path: Path, all_rows: list[dict], catalog=None) -> list[Candidate]:
    path = write(tmp_path / "r.parquet", all_rows)
    from harness.results import read_results

    return gather([], [(str(path), read_results(path).to_pylist())], catalog, None)


def test_the_pick_never_misses_the_quality_target_even_if_fastest(tmp_path):
    cands = candidates_from(tmp_path, rows("q2.gguf", decode=90, peak=150 * MiB, kl=0.3, run="a")
                            + rows("q8.gguf", decode=40, peak=230 * MiB, kl=0.01, run="b")
                            + rows("q4.gguf", decode=60, peak=190 * MiB, kl=0.04, run="c"))
    c = cons.with_quality_default(constraints(max_kl="0.05"), True)
    assessed = [assess(x, c, MC, c.budget_bytes) for x in cands]
    chosen = pick(assessed)
    assert chosen.candidate.name == "q4.gguf"  # q2 is faster but misses KL
    q2 = next(a for a in assessed if a.candidate.name == "q2.gguf")
    assert q2.verdict == "fail" and [k.name for k in q2.failed()] == ["quality"]
    mark_front(assessed)
    assert {a.candidate.name for a in assessed if a.front} == {"q2.gguf", "q8.gguf", "q4.gguf"}
    assert q2.per_gib == pytest.approx(2.718281828 ** -0.3 / (150 / 1024))


def folder(path: Path) -> Path:
    path.mkdir()
    return path


def test_speeds_within_the_tie_band_are_equal_and_quality_then_memory_decides(tmp_path):
    """Measured on the sample's quants: the fastest of three passing quants changed between two runs of
    the same cases (93.1 vs 79.7 tok/s); within 10 % of the fastest, the better KL is the pick both times."""
    from harness.recommend.judge import SPEED_TIE

    assert SPEED_TIE == pytest.approx(0.10)
    c = cons.with_quality_default(constraints(max_kl="0.05", budget="400MiB"), True)
    for run, (q4_1, q8_0) in enumerate(((93.1, 82.8), (79.7, 83.8))):
        cands = candidates_from(folder(tmp_path / str(run)), rows("q4_1.gguf", decode=q4_1, peak=323 * MiB, kl=0.0028, run="a")
                                + rows("q8_0.gguf", decode=q8_0, peak=367 * MiB, kl=0.0037, run="b")
                                + rows("q3.gguf", decode=q4_1 * 1.2, peak=367 * MiB, kl=0.12, run="c"))
        chosen = pick([assess(x, c, MC, c.budget_bytes) for x in cands])
        assert chosen.candidate.name == "q4_1.gguf", run
    # clearly faster (beyond the band) still wins over better quality
    cands = candidates_from(folder(tmp_path / "far"), rows("fast.gguf", decode=100, peak=300 * MiB, kl=0.04, run="a")
                            + rows("good.gguf", decode=80, peak=300 * MiB, kl=0.001, run="b"))
    assert pick([assess(x, c, MC, c.budget_bytes) for x in cands]).candidate.name == "fast.gguf"
    # same speed and quality: less memory
    cands = candidates_from(folder(tmp_path / "mem"), rows("big.gguf", decode=80, peak=300 * MiB, kl=0.01, run="a")
                            + rows("small.gguf", decode=78, peak=200 * MiB, kl=0.01, run="b"))
    assert pick([assess(x, c, MC, c.budget_bytes) for x in cands]).candidate.name == "small.gguf"


def test_quality_aware_by_default_when_a_reference_is_known(tmp_path):
    c = cons.with_quality_default(constraints(), reference_known=True)
    assert c.quality_default and c.thresholds.max_kl == cons.DEFAULT_MAX_KL
    assert cons.with_quality_default(constraints(), reference_known=False).thresholds.max_kl is None
    assert cons.with_quality_default(constraints(max_kl="0.5"), True).thresholds.max_ppl_ratio is None


def test_a_dominated_candidate_is_off_the_front(tmp_path):
    cands = candidates_from(tmp_path, rows("good.gguf", decode=80, peak=150 * MiB, run="a")
                            + rows("worse.gguf", decode=40, peak=200 * MiB, run="b"))
    c = constraints()
    assessed = [assess(x, c, MC, c.budget_bytes) for x in cands]
    mark_front(assessed)
    assert {a.candidate.name: a.front for a in assessed} == {"good.gguf": True, "worse.gguf": False}


def test_nothing_passes_names_the_closest_and_what_it_misses(tmp_path):
    cands = candidates_from(tmp_path, rows("big.gguf", decode=80, peak=400 * MiB, run="a")
                            + rows("slow.gguf", decode=19, peak=100 * MiB, run="b"))
    c = constraints()
    assessed = [assess(x, c, MC, c.budget_bytes) for x in cands]
    assert pick(assessed) is None
    near = closest(assessed)
    assert near.candidate.name == "slow.gguf" and [k.name for k in near.failed()] == ["decode"]


def test_contexts_decide_only_where_they_bound_the_answer(tmp_path):
    c = constraints()
    larger_pass = candidates_from(tmp_path, rows("a.gguf", n_ctx=8192, decode=50, peak=200 * MiB))
    a = assess(larger_pass[0], c, MC, c.budget_bytes)
    assert a.verdict == "pass" and "upper bound" in a.figures["peak_bytes"].where
    smaller_fail = candidates_from(tmp_path, rows("b.gguf", n_ctx=1024, decode=50, peak=300 * MiB))
    b = assess(smaller_fail[0], c, MC, c.budget_bytes)
    assert b.verdict == "fail" and b.failed()[0].name == "memory"
    smaller_pass = candidates_from(tmp_path, rows("c.gguf", n_ctx=1024, decode=50, peak=150 * MiB))
    d = assess(smaller_pass[0], c, MC, c.budget_bytes)
    assert d.verdict == "unknown"  # fitting at 1024 says nothing about 4096


def test_evidence_names_the_file_and_rows(tmp_path):
    from harness.measure.machine import fingerprint

    here = fingerprint().machine_class
    path = write(tmp_path / "r.parquet", rows("a.gguf", run="x", machine_class=here)
                 + rows("b.gguf", run="y", decode=5, machine_class=here))
    result = CliRunner().invoke(cli, ["recommend", "--results", str(path), "--catalog", str(tmp_path / "n.yaml"),
                                      "-f", "json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["pick"]["artifact"] == "a.gguf"
    assert f"peak, tok/s, TTFT measured here: {path} rows 0, 2 @ctx 4,096" in data["pick"]["evidence"]
    b = next(x for x in data["candidates"] if x["artifact"] == "b.gguf")
    assert b["verdict"] == "fail" and b["check_decode"] is False and "decode" in b["misses"]
    for fmt in ("table", "markdown", "csv"):
        out = CliRunner().invoke(cli, ["recommend", "--results", str(path), "--catalog", str(tmp_path / "n.yaml"),
                                       "-f", fmt], catch_exceptions=False)
        assert out.exit_code == 0 and "a.gguf" in out.output


def test_users_only_rows_for_that_many_users_answer(tmp_path):
    cands = candidates_from(tmp_path, rows("a.gguf", run="x"))
    c4 = constraints(users=4)
    assert assess(cands[0], c4, MC, c4.budget_bytes).verdict == "unknown"  # one-user rows do not answer for 4
    assert assess(cands[0], constraints(), MC, 250 * MiB).verdict == "pass"
    obs = cands[0].observations[0]
    cands[0].observations.append(Observation(**{**obs.__dict__, "users": 4, "decode_tok_s": 12.0}))
    assert assess(cands[0], c4, MC, c4.budget_bytes).failed()[0].name == "decode"


# --- sources: community fits with their counts, machine classes side by side ----------------------

def community_catalog(tmp_path: Path) -> Path:
    data = {"catalog_version": 1,
            "artifacts": {"q4": {"name": "q4.gguf", "sha256": "a" * 64, "origin": "community", "size_bytes": 90 * MiB,
                                 "context_length": 8192}},
            "fits": [
                {"artifact": "q4", "machine_class": "apple-m3-16GiB", "runtime": "llama.cpp", "options": "community",
                 "n_ctx": 4096, "fit_class": "fits", "peak_rss_bytes": 200 * MiB, "decode_tok_s": 70.0,
                 "ttft_s": 0.4, "origin": "community", "source": "community:up.example", "samples": 9,
                 "machines": 4, "count": 9},
                {"artifact": "q4", "machine_class": "nvidia-h200-141GiB", "runtime": "llama.cpp",
                 "options": "community", "n_ctx": 4096, "fit_class": "fits", "peak_rss_bytes": 210 * MiB,
                 "decode_tok_s": 300.0, "ttft_s": 0.05, "origin": "community", "source": "community:up.example",
                 "samples": 1, "machines": 1, "count": 1}]}
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_community_fits_carry_their_sample_and_machine_counts(tmp_path):
    cat = community_catalog(tmp_path)
    out = CliRunner().invoke(cli, ["recommend", "--catalog", str(cat), "--machine-class", "apple-m3-16GiB",
                                   "--budget", "1GiB", "-f", "json"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    pick_ = json.loads(out.stdout)["pick"]
    assert pick_["artifact"] == "q4.gguf"
    assert "community: community (community:up.example): 9 sample(s) from 4 machine(s)" in pick_["evidence"]


def test_machine_classes_side_by_side_with_counts_and_one_sample_said(tmp_path):
    cat = community_catalog(tmp_path)
    dataset = tmp_path / "fleet-run"  # a fleet dataset: one folder per machine class, one file per node
    write(dataset / f"machine_class={MC}" / "node-a.parquet", rows("q4.gguf", decode=30, machine_class=MC))
    (dataset / "fleet.json").write_text("{}")
    out = CliRunner().invoke(cli, ["recommend", "--catalog", str(cat), "--results", str(dataset),
                                   "--machine-class", "all", "--budget", "1GiB", "-f", "json"],
                             catch_exceptions=False)
    assert out.exit_code == 0, out.output
    by_class = {r["machine_class"].split(" ")[0]: r for r in json.loads(out.stdout)["machine_classes"]}
    assert set(by_class) == {"apple-m3-16GiB", "nvidia-h200-141GiB", MC}
    assert by_class["apple-m3-16GiB"]["samples"] == 9 and by_class["apple-m3-16GiB"]["machines"] == 4
    assert by_class["nvidia-h200-141GiB"]["note"] == "from one sample only"
    assert by_class[MC]["decode_tok_s"] == 30 and by_class[MC]["pick_samples"] == 2


# --- artifacts on the command line ----------------------------------------------------------------

def test_a_folder_of_quants_expands_to_each_artifact(tmp_path):
    folder = tmp_path / "quants"
    folder.mkdir()
    for q in ("Q4_1", "Q8_0"):
        write_tiny_gguf(folder / f"m.{q}.gguf", block_count=2, embedding_length=64, attention__head_count=4)
    (folder / "notes").mkdir()
    (folder / "README.md").write_text("x")
    found = expand_artifacts([folder])
    assert sorted(i.name for i in found) == ["m.Q4_1.gguf", "m.Q8_0.gguf"]
    cands = gather([folder], [], None, None)
    assert {(x.name, x.runtime) for x in cands} == {("m.Q4_1.gguf", "llama.cpp"), ("m.Q8_0.gguf", "llama.cpp")}
    c = constraints()
    from harness.recommend.judge import predictor

    a = assess(cands[0], c, MC, c.budget_bytes, predictor(0.5))
    assert a.figures["peak_bytes"].origin == "predicted" and "harness.estimate" in a.figures["peak_bytes"].where
    assert a.verdict == "unknown"  # a prediction never makes a pick


# --- the ready-to-run answer ----------------------------------------------------------------------

def test_serve_answers_carry_the_measured_settings(tmp_path):
    gguf = tmp_path / "m.gguf"
    opts = {"type_k": "q8_0", "flash_attn": True, "n_gpu_layers": 20}
    [server, ollama] = serve_answers(gguf, "llama.cpp", opts, 4096, port=9000, which=lambda name: "/usr/bin/x")
    assert server.argv[:5] == ["llama-server", "-m", str(gguf.resolve()), "-c", "4096"]
    assert "-ctk" in server.argv and "q8_0" in server.argv and "-ngl" in server.argv and "-fa" in server.argv
    [py, _] = serve_answers(gguf, "llama.cpp", opts, 4096, which=lambda name: None, python="python")
    assert py.argv[:3] == ["python", "-m", "llama_cpp.server"] and py.argv[py.argv.index("--n_ctx") + 1] == "4096"
    assert py.argv[py.argv.index("--type_k") + 1] == "8" and "--flash_attn" in py.argv
    assert "PARAMETER num_ctx 4096" in ollama.files["Modelfile"] and "PARAMETER num_gpu 20" in ollama.files["Modelfile"]
    [mlx] = serve_answers(tmp_path / "mlx", "mlx", {}, 2048)
    assert mlx.argv[0] == "mlx_lm.server"
    [onnx] = serve_answers(tmp_path / "onnx", "onnxruntime", {}, 2048)
    assert json.loads(onnx.files["genai_config.json (merge)"]) == {"search": {"max_length": 2048}}


def test_options_for_the_artifacts_go_to_the_runtimes_that_know_them(tmp_path):
    gguf = write_tiny_gguf(tmp_path / "m.gguf", block_count=2, embedding_length=64, attention__head_count=4)
    [cand] = gather([gguf], [], None, None, {"n_threads": 1, "flash_attn": True, "dtype": "float32"})
    assert cand.options == {"flash_attn": True}  # threads do not make another candidate; dtype is torch's
    assert cand.run_options == {"n_threads": 1, "flash_attn": True}
    with pytest.raises(cons.RecommendError, match="--option"):
        gather([gguf], [], None, None, {"n_threads": "many"})


def test_the_closest_is_not_the_one_with_the_most_unknowns(tmp_path):
    here_rows = (rows("near.gguf", decode=15, peak=260 * MiB, run="a")
                 + rows("far.gguf", decode=None, peak=600 * MiB, run="b", status="timeout", fit="slow", reps=1))
    cands = candidates_from(tmp_path, here_rows)
    c = constraints()
    near = closest([assess(x, c, MC, c.budget_bytes) for x in cands])
    assert near.candidate.name == "near.gguf"  # far misses two and leaves TTFT undecided
