"""The quality probe on the real sample model: llama.cpp logits, repeatable perplexity,
agreement with torch on numerically close artifacts, and the whole path through `fitbench run`.

Short texts (128-256 tokens) keep this to well under a minute of CPU on 2 cores.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from harness.quality import probe as Q
from harness.quality.text import stdlib_text
from runners.llama_cpp import LlamaCppRunner
from tests.conftest import ROOT
from tests.test_cli import fitbench

pytestmark = pytest.mark.model
HF_DIR = ROOT / "models" / "SmolLM2-135M-Instruct-hf"
TEXT = stdlib_text().text


@pytest.fixture
def llama(sample_model):
    runner = LlamaCppRunner()
    runner.prepare()
    runner.load(sample_model, 256, {"n_batch": 64})  # several batches per window: exercises the batching
    yield runner
    runner.close()


def test_llama_logits_are_per_position_causal_and_match_greedy(llama):
    import llama_cpp

    tokens = Q.eval_tokens(llama, TEXT, 100)
    full = llama.logits(tokens)
    assert full.shape == (100, llama._llama.n_vocab()) and full.dtype == np.float32 and np.isfinite(full).all()
    # causal: a prefix scored alone gives the same predictions as inside the longer sequence
    prefix = llama.logits(tokens[:40])
    np.testing.assert_allclose(prefix, full[:40], atol=0.05)
    assert (prefix.argmax(1) == full[:40].argmax(1)).all()
    # the last row is what generate()'s greedy sampler picks from
    for _ in llama.generate(tokens, 1):
        pass
    assert int(full[-1].argmax()) == llama_cpp.llama_sampler_sample(llama._sampler, llama._llama.ctx, -1)
    # rows predict the next token: the text's own next tokens are far likelier than chance
    lp = full - np.log(np.exp(full - full.max(1, keepdims=True)).sum(1, keepdims=True)) - full.max(1, keepdims=True)
    assert np.exp(-lp[np.arange(99), tokens[1:]].mean()) < 100  # perplexity, vs 49152 for chance


def test_logits_refuse_more_tokens_than_the_context(llama):
    from runners.base import RunnerError

    with pytest.raises(RunnerError, match="300 tokens do not fit the loaded context of 256"):
        llama.logits([1] * 300)


def test_greedy_answers_through_logits_and_detokenize(llama):
    assert llama.detokenize(llama.tokenize(" Hello world")).strip() == "Hello world"
    prompt = llama.tokenize("The capital of France is")
    answer = Q.greedy(llama, prompt, 6, [])  # the runner's own greedy loop
    assert "Paris" in answer
    assert Q.greedy_by_logits(llama, prompt, 3, []) == llama.detokenize(llama.greedy_tokens(prompt, 3))


def test_same_text_same_perplexity_across_two_loads(sample_model):
    ppls = []
    for _ in range(2):
        runner = LlamaCppRunner()
        runner.prepare()
        runner.load(sample_model, 256, {})
        tokens = Q.eval_tokens(runner, TEXT, 192)
        ppls.append(float(np.exp(Q.score(runner, tokens, 96, 32)["nll"].mean())))
        runner.close()
    assert abs(ppls[0] - ppls[1]) / ppls[0] < 0.01, ppls


def test_llama_cpp_and_torch_agree_on_numerically_close_artifacts(sample_model):
    """The HF checkpoint is the sample GGUF's own weights dequantized, so llama.cpp on the Q4_1 and
    torch fp32 on the HF folder differ only by arithmetic (llama.cpp quantizes activations to 8
    bits for Q4_1 dot products). Measured: PPL within 0.6%, KL 0.003, top-1 96%."""
    from tests.torch_reference import TransformersScorer

    torch_scorer = TransformersScorer(HF_DIR, "float32", threads=2)
    torch_tokens = Q.eval_tokens(torch_scorer, TEXT, 256)
    ref = Q.score(torch_scorer, torch_tokens, 256, 32)
    runner = LlamaCppRunner()
    runner.prepare()
    runner.load(sample_model, 256, {})
    tokens = Q.eval_tokens(runner, TEXT, 256)
    assert tokens == torch_tokens  # the same tokenizer, so KL is defined
    got = Q.score(runner, tokens, 256, 32, {k: ref[k] for k in ("top_ids", "top_lp", "tail_lp")})
    runner.close()
    ppl_ref, ppl = np.exp(ref["nll"].mean()), np.exp(got["nll"].mean())
    assert abs(ppl / ppl_ref - 1) < 0.03, (ppl, ppl_ref)
    assert got["kl"].mean() < 0.02 and got["agree"].mean() > 0.9, (got["kl"].mean(), got["agree"].mean())


def test_fitbench_run_with_a_quality_probe_on_the_real_model(tmp_path, sample_model):
    (tmp_path / "tasks.jsonl").write_text(
        '{"id": "paris", "prompt": "The capital of France is", "contains": "Paris", "max_tokens": 4}\n'
        '{"id": "impossible", "prompt": "The capital of France is", "exact": "Berlin", "max_tokens": 2}\n')
    scenario = {
        "name": "quality-real", "contexts": [256], "prompt_tokens": 32, "gen_tokens": 4, "repetitions": 1,
        "warmup": 0,
        "models": [{"artifact": str(sample_model), "runtime": "llama.cpp", "label": "q4_1"}],
        "quality": {"tokens": 128, "window": 128, "reference": "q4_1", "tasks": "tasks.jsonl"},
        "thresholds": {"min_pass_rate": 1.0, "min_decode_tok_s": 0.1, "max_ttft_s": 600},
    }
    (tmp_path / "s.yaml").write_text(json.dumps(scenario))
    proc = fitbench("run", str(tmp_path / "s.yaml"), "-o", str(tmp_path / "out"),
                    env={"FITBENCH_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr + proc.stdout
    path = next(p for p in (tmp_path / "out").glob("*.parquet") if not p.name.endswith(".timeline.parquet"))
    row = pq.read_table(path).to_pandas().iloc[0]
    assert row["status"] == "ok" and not isinstance(row["quality_error"], str)
    assert row["quality_positions"] == 127 and 1 < row["quality_ppl"] < 100
    assert row["quality_kl_mean"] < 1e-4 and row["quality_top1_agree"] == 1.0  # itself as the reference
    assert row["quality_text_id"].startswith("stdlib-docstrings-v1-py")
    assert row["task_passed"] == 1 and row["task_count"] == 2
    assert row["fit_class"] == "degraded" and "task pass rate 50% < 100%" in row["fit_reason"]
    answers = {r["id"]: r for r in json.loads(row["task_results_json"])}
    assert answers["paris"]["passed"] and "Paris" in answers["paris"]["answer"]
    assert row["quality_peak_rss_bytes"] > 0 and row["peak_rss_bytes"] > 0
