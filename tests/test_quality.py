"""Quality probe: the maths, the evaluation text, task files, targets and the degraded class, and
the whole path through the suite with fake runners that expose logits (no runtime needed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from harness.fit import ORDER, Thresholds, classify, worst
from harness.quality import probe as Q
from harness.quality.tasks import TaskFileError, answer_of, load_tasks, passes
from harness.quality.text import EvalTextError, file_text, stdlib_text
from harness.scenario import ScenarioError, parse_scenario
from tests.test_cli import assert_usage_error, fitbench

sys.path.insert(0, str(Path(__file__).parent))
from fake_runners import LogitsRunner  # noqa: E402


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True)) - x.max(1, keepdims=True)


def exact_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(1)


def topk(lp: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = np.argsort(-lp, axis=1)[:, :k]
    vals = np.take_along_axis(lp, ids, 1)
    tail = np.log(np.clip(1 - np.exp(vals).sum(1), 1e-30, None))
    return ids, vals, tail


def test_topk_kl_is_exact_with_the_whole_vocabulary_and_a_lower_bound_otherwise():
    rng = np.random.default_rng(3)
    p, q = rng.normal(size=(20, 50)) * 2, rng.normal(size=(20, 50)) * 2
    lp, lq = log_softmax(p), log_softmax(q)
    exact = exact_kl(p, q)
    ids, vals, tail = topk(lp, 50)
    full = Q.kl_topk(vals, tail, np.take_along_axis(lq, ids, 1))
    np.testing.assert_allclose(full, exact, rtol=1e-6, atol=1e-9)
    ids, vals, tail = topk(lp, 8)
    approx = Q.kl_topk(vals, tail, np.take_along_axis(lq, ids, 1))
    assert (approx <= exact + 1e-9).all() and (approx > 0).all()
    same = Q.kl_topk(vals, tail, np.take_along_axis(lp, ids, 1))
    np.testing.assert_allclose(same, 0, atol=1e-9)


def _runner(noise: float = 0.0) -> LogitsRunner:
    r = LogitsRunner()
    r.load(Path("x"), 512, {"noise": noise})
    return r


def test_score_gives_perplexity_kl_and_top1_against_a_reference():
    tokens = _runner().tokenize("the quick brown fox jumps over the lazy dog " * 6)
    ref = Q.score(_runner(), tokens, 64, 8)
    # perplexity by hand: every window's positions but its last
    r = _runner()
    nll = []
    for part in Q.windows(tokens, 64):
        lp = log_softmax(r.logits(part))
        nll += [-lp[i, part[i + 1]] for i in range(len(part) - 1)]
    np.testing.assert_allclose(ref["nll"], nll, rtol=1e-6)
    keep = {k: ref[k] for k in ("top_ids", "top_lp", "tail_lp")}
    same = Q.score(_runner(), tokens, 64, 8, keep)
    assert same["kl"].max() < 1e-6  # the reference keeps float32 log-probs and same["agree"].all()
    kls = [Q.score(_runner(noise), tokens, 64, 8, keep)["kl"].mean() for noise in (0.3, 1.0, 3.0)]
    assert 0 < kls[0] < kls[1] < kls[2]  # more perturbation, more divergence


def test_a_different_tokenizer_is_refused_with_the_first_difference():
    ref = {"tokens": np.array([1, 2, 3, 4]), "meta": {"reference": "f16"}}
    Q.check_same_tokens([1, 2, 3, 4], ref)
    with pytest.raises(Q.QualityError, match=r"tokenizer differs from f16.*token 2 \(9 vs 3"):
        Q.check_same_tokens([1, 2, 9, 4], ref)


def test_reference_cache_round_trip(tmp_path):
    tokens = _runner().tokenize("some text to score, twice over " * 4)
    scored = Q.score(_runner(), tokens, 32, 4)
    Q.save_reference(tmp_path / "r.npz", tokens, scored, {"ppl": 3.0, "reference": "x"})
    back = Q.load_reference(tmp_path / "r.npz")
    assert back["tokens"].tolist() == tokens and back["meta"]["ppl"] == 3.0
    np.testing.assert_array_equal(back["top_ids"], scored["top_ids"])
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(Q.QualityError, match="unreadable"):
        Q.load_reference(tmp_path / "bad.npz")


def test_stdlib_text_is_deterministic_and_named_by_python_version(tmp_path):
    a, b = stdlib_text(), stdlib_text()
    assert a == b and len(a.text) == 200_000
    assert a.text_id == f"stdlib-docstrings-v1-py{sys.version_info.major}.{sys.version_info.minor}"
    (tmp_path / "t.txt").write_text("my own text\n")
    assert file_text(tmp_path / "t.txt").text_id == "file:t.txt"
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(EvalTextError, match="empty"):
        file_text(tmp_path / "empty.txt")
    with pytest.raises(EvalTextError, match="not found"):
        file_text(tmp_path / "missing.txt")


# --- task files --------------------------------------------------------------------------

def test_task_file_parses_and_matches(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('# comment\n{"prompt": "a", "contains": "Paris"}\n\n'
                    '{"id": "n", "prompt": "b", "regex": "^\\\\s*6", "stop": "\\n"}\n'
                    '{"prompt": "c", "exact": "Yes", "ignore_case": true, "max_tokens": 3}\n')
    tasks, sha = load_tasks(path)
    assert [t.id for t in tasks] == ["task1", "n", "task3"] and len(sha) == 64
    specs = [t.to_spec() for t in tasks]
    assert passes(specs[0], " It is Paris.") and not passes(specs[0], " paris")
    assert passes(specs[1], answer_of(" 6, 7\n8", ["\n"])) and not passes(specs[1], "7, 6")
    assert passes(specs[2], " yes ") and not passes(specs[2], "yes sir")


@pytest.mark.parametrize("content, words", [
    ("", "no tasks"),
    ("# only a comment\n", "no tasks"),
    ('{"prompt": "a", "contains": "x"\n', "line 1: malformed JSON"),
    ('{"prompt": "a", "contains": "x"}\n["a list"]\n', "line 2: must be a JSON object"),
    ('{"contains": "x"}\n', "missing or empty 'prompt'"),
    ('{"prompt": "a"}\n', "exactly one of 'exact', 'contains' or 'regex' (found none)"),
    ('{"prompt": "a", "exact": "x", "regex": "y"}\n', "found exact, regex"),
    ('{"prompt": "a", "regex": "("}\n', "does not compile"),
    ('{"prompt": "a", "contains": "x", "max_tokens": 0}\n', "'max_tokens' must be an integer"),
    ('{"prompt": "a", "contains": "x", "answer": 1}\n', "unknown field 'answer'"),
    ('{"id": "a", "prompt": "a", "contains": "x"}\n{"id": "a", "prompt": "b", "contains": "y"}\n', "used twice"),
])
def test_bad_task_files_are_one_line_errors(tmp_path, content, words):
    path = tmp_path / "t.jsonl"
    path.write_text(content)
    with pytest.raises(TaskFileError) as info:
        load_tasks(path)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_bad_task_file_in_a_scenario_exits_2_with_one_line(tmp_path, tiny_gguf):
    (tmp_path / "t.jsonl").write_text('{"prompt": "a", "contains": }\n')
    path = tmp_path / "s.yaml"
    path.write_text(f"models:\n  - {{artifact: {tiny_gguf}, runtime: 'fake_runners:LogitsRunner'}}\n"
                    "contexts: [256]\nquality: {tasks: t.jsonl}\n")
    assert_usage_error(fitbench("run", str(path), "-o", str(tmp_path / "out")), "quality.tasks", "line 1",
                       "malformed JSON")
    (tmp_path / "t.jsonl").write_text("")
    assert_usage_error(fitbench("run", str(path), "-o", str(tmp_path / "out")), "no tasks")


# --- scenario section, targets and the degraded class --------------------------------------

def _scenario(tiny_gguf: Path, **quality) -> dict:
    return {"models": [{"artifact": str(tiny_gguf), "runtime": "fake_runners:LogitsRunner", "label": "a"}],
            "contexts": [256], "quality": quality}


@pytest.mark.parametrize("quality, where, words", [
    ({"reference": "nope"}, "quality.reference", "no model labelled 'nope'"),
    ({"toknes": 5}, "quality.toknes", "unknown field"),
    ({"window": 1}, "quality.window", "integer from 2"),
    ({"text": "missing.txt"}, "quality.text", "not found"),
    ({"tokens": 0}, "quality.tokens", "nothing to measure"),
])
def test_bad_quality_sections(tiny_gguf, quality, where, words):
    with pytest.raises(ScenarioError) as info:
        parse_scenario(_scenario(tiny_gguf, **quality))
    assert info.value.where == where and words in info.value.message


def test_a_window_larger_than_every_context_is_a_usage_error(tmp_path, tiny_gguf):
    path = tmp_path / "s.yaml"
    path.write_text(json.dumps(_scenario(tiny_gguf, window=512)))
    assert_usage_error(fitbench("run", str(path), "-o", str(tmp_path / "out")), "quality.window",
                       "larger than every context (256)")


def test_quality_section_parses_with_a_reference_label(tiny_gguf):
    sc = parse_scenario(_scenario(tiny_gguf, reference="a", tokens=300, window=128, top_k=16))
    q = sc.cases()[0].quality
    assert q.reference.label == "a" and (q.tokens, q.window, q.top_k) == (300, 128, 16)
    assert q.text.text_id.startswith("stdlib-docstrings")


def test_degraded_sits_between_tight_and_slow():
    assert ORDER.index("tight") < ORDER.index("degraded") < ORDER.index("slow")
    assert worst(["fits", "degraded", "tight"]) == "degraded"
    assert worst(["degraded", "slow"]) == "slow"


def test_quality_targets_classify_degraded_and_missing_figures_are_not_judged():
    row = {"status": "ok", "peak_rss_bytes": 100 << 20, "decode_tok_s": 50.0, "ttft_s": 0.1,
           "quality_kl_mean": 0.08, "quality_ppl_ratio": 1.02, "task_pass_rate": 0.5}
    t = Thresholds().merged({"max_kl": 0.05, "max_ppl_ratio": 1.05, "min_pass_rate": 0.75})
    v = classify(row, 8 << 30, t)
    assert v.fit_class == "degraded"
    assert "KL 0.0800 > 0.05" in v.fit_reason and "task pass rate 50% < 75%" in v.fit_reason
    assert "perplexity" not in v.fit_reason
    assert classify({**row, "quality_kl_mean": None, "task_pass_rate": None}, 8 << 30, t).fit_class == "fits"
    assert classify(row, 8 << 30, Thresholds()).fit_class == "fits"  # no targets, no judgement
    assert classify({**row, "decode_tok_s": 1.0}, 8 << 30, t).fit_class == "slow"
    with pytest.raises(ValueError, match="min_pass_rate"):
        Thresholds().merged({"min_pass_rate": 80})


# --- through the suite, with fake runners that expose logits --------------------------------

def test_suite_runs_the_probe_once_per_artifact_with_a_cached_reference(tmp_path, tiny_gguf):
    (tmp_path / "text.txt").write_text("A small evaluation text, scored by fake runners. " * 20)
    (tmp_path / "tasks.jsonl").write_text('{"prompt": "ab", "regex": "."}\n{"prompt": "cd", "exact": "never"}\n')
    fake = "fake_runners:LogitsRunner"
    scenario = {
        "name": "q", "contexts": [128, 256], "prompt_tokens": 32, "gen_tokens": 4, "repetitions": 2, "warmup": 0,
        "models": [
            {"artifact": str(tiny_gguf), "runtime": fake, "label": "ref"},
            {"artifact": str(tiny_gguf), "runtime": fake, "label": "noisy", "options": {"noise": 2.0}},
            {"artifact": str(tiny_gguf), "runtime": "fake_runners:OtherTokenizerRunner", "label": "other"},
        ],
        "quality": {"text": "text.txt", "tokens": 400, "window": 128, "top_k": 8, "reference": "ref",
                    "tasks": "tasks.jsonl"},
        "thresholds": {"max_kl": 0.05},
    }
    (tmp_path / "s.yaml").write_text(json.dumps(scenario))
    env = {"FITBENCH_CACHE": str(tmp_path / "cache")}
    proc = fitbench("run", str(tmp_path / "s.yaml"), "-o", str(tmp_path / "out"), env=env)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "scoring the quality reference ref" in proc.stdout
    assert len(list((tmp_path / "cache" / "quality").glob("ref-*.npz"))) == 1
    results = [p for p in (tmp_path / "out").glob("q-*.parquet") if not p.name.endswith(".timeline.parquet")]
    df = pq.read_table(results[0]).to_pandas()
    by = {label: g for label, g in df.groupby("model_label")}
    ref, noisy, other = by["ref"], by["noisy"], by["other"]
    assert ref["quality_kl_mean"].max() < 1e-6 and (ref["quality_top1_agree"] == 1).all()
    assert (ref["quality_ppl_ratio"] == 1).all() and (ref["fit_class"] == "fits").all()
    assert (noisy["quality_kl_mean"] > 0.05).all() and (noisy["quality_top1_agree"] < 1).all()
    assert (noisy["fit_class"] == "degraded").all() and noisy["fit_reason"].str.contains("KL").all()
    # one probe per artifact/runtime/options: the second context reuses the first's figures
    assert noisy["quality_case_key"].nunique() == 1 and noisy["case_key"].nunique() == 2
    assert other["quality_kl_mean"].isna().all() and other["quality_ppl"].notna().all()
    assert other["quality_error"].str.contains("tokenizer differs from ref").all()
    assert (df["task_count"] == 2).all() and (df["task_pass_rate"] == 0.5).all()
    assert df["quality_text_id"].eq("file:text.txt").all() and df["quality_positions"].eq(3 * 127 + 15).all()
    # the report's intelligence density table and plot; the catalog's quality figures
    proc = fitbench("report", str(results[0]), "-o", str(tmp_path / "r.html"), "--png", str(tmp_path / "png"))
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "r.html").read_text()
    assert '<table id="quality">' in page and "noisy · fake_runners:LogitsRunner" in page
    assert (tmp_path / "png" / "quality_density.png").stat().st_size > 1000
    catalog = tmp_path / "catalog.yaml"
    assert fitbench("catalog", "update", str(results[0]), "--catalog", str(catalog)).returncode == 0
    assert "quality_kl:" in catalog.read_text() and "quality_text: file:text.txt@" in catalog.read_text()
    from harness.catalog import load_catalog, query

    fits = query(load_catalog(catalog))
    assert {f["fit_class"] for f in fits if f.get("quality_kl", 0) > 0.05} == {"degraded"}
    assert fitbench("catalog", "show", "--catalog", str(catalog), "--machine-class", "all").returncode == 0
    # a second run reuses the reference cache
    proc = fitbench("run", str(tmp_path / "s.yaml"), "-o", str(tmp_path / "out2"), env=env)
    assert proc.returncode == 0 and "scoring the quality reference" not in proc.stdout


def test_a_probe_slower_than_the_timeout_loses_its_figures_not_the_case(tmp_path, tiny_gguf):
    scenario = {
        "name": "slowq", "contexts": [128], "prompt_tokens": 16, "gen_tokens": 4, "repetitions": 2, "warmup": 0,
        "timeout": 4,
        "models": [{"artifact": str(tiny_gguf), "runtime": "fake_runners:LogitsRunner",
                    "options": {"logits_delay": 30.0}}],
        "quality": {"tokens": 64, "window": 64},
    }
    (tmp_path / "s.yaml").write_text(json.dumps(scenario))
    proc = fitbench("run", str(tmp_path / "s.yaml"), "-o", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    path = next(p for p in (tmp_path / "out").glob("*.parquet") if not p.name.endswith(".timeline.parquet"))
    df = pq.read_table(path).to_pandas()
    assert list(df["status"]) == ["ok", "ok"] and (df["fit_class"] == "fits").all()
    assert df["quality_error"].str.contains("quality probe took longer than 4 s").all()
    assert df["quality_ppl"].isna().all()
