"""recommend --measure with fake runners in real worker processes: fewest cases, reuse, order, stop."""

from __future__ import annotations

from pathlib import Path

from harness.recommend import constraints as cons
from harness.recommend.candidates import Candidate, Observation, gather
from harness.recommend.judge import assess, pick, predictor
from harness.recommend.measure import MeasureSettings, measure, sweep_contexts
from harness.results import expand_result_files, read_results
from tests.conftest import write_tiny_gguf

FAKE = "fake_runners:FakeRunner"
MiB = 2**20


def test_sweep_contexts_double_up_to_the_asked_one():
    assert sweep_contexts(4096) == [512, 1024, 2048, 4096]
    assert sweep_contexts(1000) == [512, 1000]
    assert sweep_contexts(256) == [256]


def test_measure_runs_the_fewest_cases_and_reuses_them(tmp_path: Path):
    from harness.measure.machine import fingerprint

    gguf = write_tiny_gguf(tmp_path / "m.gguf", block_count=2, embedding_length=64, attention__head_count=4)
    mc = fingerprint().machine_class
    fast = Candidate("m.gguf", FAKE, {"token_delay": 0.001}, path=gguf, context_length=4096)
    slow = Candidate("m.gguf", FAKE, {"token_delay": 0.2}, path=gguf, context_length=4096)
    fat = Candidate("m.gguf", FAKE, {"alloc_mb": 400, "token_delay": 0.001}, path=gguf, context_length=4096)
    # measured before at a smaller context: 25 tok/s passes there, but it cannot beat the fast one here
    known_slow = Candidate("m.gguf", FAKE, {"token_delay": 0.04}, path=gguf, context_length=4096)
    known_slow.observations.append(Observation("measured", mc, 512, "earlier.parquet row 0", decode_tok_s=25.0,
                                               peak_bytes=50 * MiB, ttft_s=0.1))
    cands = [fast, slow, fat, known_slow]
    c = cons.build(budget="300MiB", available_bytes=8 << 30, context=1024, min_tok_s="20", max_ttft=None,
                   max_kl=None, max_ppl_ratio=None, min_pass_rate=None, tasks=None, users=1, runtime="any",
                   machine_class="this", fill=0.25)
    notes: list[str] = []
    out = tmp_path / "results"
    report = measure(cands, c, MeasureSettings(output=out, gen_tokens=4, timeout=120), mc, c.budget_bytes,
                     predictor(0.25), notes.append)
    assert report.cases_run == 3, report.steps
    assert report.exhaustive_at_context == 4 and report.exhaustive_sweep == 8
    by_label = {a.candidate.label: a for a in (assess(x, c, mc, c.budget_bytes) for x in cands)}
    assert by_label[fast.label].verdict == "pass"
    assert [k.name for k in by_label[slow.label].failed()] == ["decode"]
    assert [k.name for k in by_label[fat.label].failed()] == ["memory"]
    assert any("cannot come within 10% of the pick" in s for s in report.steps)
    assert pick(list(by_label.values())).candidate is fast
    # the rows landed in Parquet through the suite, and a second run reuses them: nothing to run
    [path] = expand_result_files([out])
    table = read_results(path)
    assert table.num_rows >= 3 and set(table.column("status").to_pylist()) == {"ok"}
    again = gather([], [(str(path), table.to_pylist())], None, None)
    for cand in again:
        cand.path, cand.context_length = gguf, 4096
    second = measure(again, c, MeasureSettings(output=tmp_path / "second", gen_tokens=4, timeout=120), mc,
                     c.budget_bytes, predictor(0.25), notes.append)
    assert second.cases_run == 0 and all("decided by earlier measurements" in s for s in second.steps)
