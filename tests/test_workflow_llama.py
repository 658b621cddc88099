"""Workflows on the real sample model in llama.cpp: extend() reuses the KV cache correctly, and a
multi-turn case writes per-turn rows that processed only the new tokens."""

from __future__ import annotations

import pandas as pd
import pytest

from harness.measure.machine import fingerprint
from harness.preflight import check_scenario
from harness.results import ResultWriter
from harness.scenario import parse_scenario
from harness.suite import run_suite
from harness.worker.prompt import SEED, build_prompt
from runners.base import RunnerError
from runners.llama_cpp import LlamaCppRunner

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def runner(sample_model):
    r = LlamaCppRunner()
    r.load(sample_model, 512, {"n_threads": 2})
    yield r
    r.close()


def cached_tokens(r: LlamaCppRunner) -> int:
    import llama_cpp

    return int(llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(r._llama.ctx), 0)) + 1


def message(r: LlamaCppRunner, n: int, i: int) -> list[int]:
    return build_prompt(r.tokenize, n + 1, SEED + i)[1:]  # no BOS mid-conversation


def counting(r: LlamaCppRunner, start: int, stop: int) -> list[int]:
    return r.tokenize(" " + ", ".join(str(i) for i in range(start, stop)) + ",")[1:]


def test_extend_gives_the_same_greedy_tokens_as_replaying_the_history(runner):
    # Counting text: the model is sure of the next token. On random prose the top two logits of this
    # 135M model can be 0.1 apart, and a 21-token batch and a 68-token batch round differently
    # (seen: extend and replay agree to about 0.5 in the logits but pick different tokens at a near-tie).
    first = runner.tokenize(", ".join(str(i) for i in range(1, 21)) + ",")
    list(runner.generate(first, 8))
    reply1 = runner.generated
    user2, user3 = counting(runner, 40, 46), counting(runner, 70, 74)
    list(runner.extend(user2, 8))
    reply2 = runner.generated
    # the cache holds the whole history: only the last reply token and the new message were decoded
    assert cached_tokens(runner) == len(first) + 8 + len(user2) + 7
    list(runner.extend(user3, 8))
    reply3 = runner.generated
    assert len(reply2) == len(reply3) == 8
    assert runner._llama.detokenize(reply2).decode().startswith(" 46, 47")  # it really continued the session

    list(runner.generate(first + reply1 + user2, 8))
    assert runner.generated == reply2
    list(runner.generate(first + reply1 + user2 + reply2 + user3, 8))
    assert runner.generated == reply3


def test_extend_needs_a_session_and_room_in_the_context(runner):
    fresh = LlamaCppRunner()
    with pytest.raises(RunnerError, match="call generate"):
        next(fresh.extend([1, 2], 4))
    list(runner.generate(build_prompt(runner.tokenize, 400), 4))
    with pytest.raises(RunnerError, match="context full: the session needs 5[0-9]{2} KV cells, n_ctx is 512"):
        runner.extend(message(runner, 120, 3), 4)


def test_a_workflow_case_writes_turn_rows_that_reuse_the_cache(sample_model, tmp_path):
    s = parse_scenario({
        "name": "wf-real",
        "models": [{"artifact": str(sample_model), "runtime": "llama.cpp", "options": {"n_threads": 2}}],
        "workflow": [{"kind": "chat", "turns": 3, "user_tokens": 32, "reply_tokens": 8},
                     {"kind": "document", "document_tokens": 200, "questions": 2, "question_tokens": 10,
                      "reply_tokens": 8}],
        "warmup": 0, "repetitions": 1,
    }, source="wf-real")
    writer = ResultWriter(tmp_path / "wf.parquet")
    results = run_suite(s.cases(), check_scenario(s), fingerprint(), writer, "real")
    assert [r.status for r in results] == ["ok", "ok"]
    df = pd.read_parquet(writer.results_path)
    chat = df[df["workflow_kind"] == "chat"]
    turns = chat[chat["turn"].notna()]
    assert list(turns["turn"]) == [1, 2, 3] and turns["kv_reuse"].all()
    assert list(turns["context_tokens"]) == [32, 72, 112]
    assert list(turns["processed_tokens"]) == [32, 33, 33]  # TTFT covers the new tokens only
    assert (turns["ttft_s"] > 0).all() and turns["decode_tok_s"].notna().all() and turns["fit_class"].notna().all()
    assert turns["rep_peak_rss_bytes"].notna().all()
    [summary] = chat[chat["turn"].isna()].to_dict("records")
    assert int(summary["fit_turn"]) in (1, 2, 3)
    assert summary["fit_reason"].startswith(f"turn {int(summary['fit_turn'])}: ")
    doc = df[(df["workflow_kind"] == "document") & df["turn"].notna()]
    assert list(doc["processed_tokens"]) == [210, 11] and list(doc["context_tokens"]) == [210, 228]
