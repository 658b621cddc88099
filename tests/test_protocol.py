"""The parent <-> worker messages: every message survives the pipe, and a bad line is refused by name."""

from __future__ import annotations

import pytest

from harness.protocol import (
    KINDS,
    CaseEvents,
    Done,
    Exit,
    Failed,
    Loaded,
    ProtocolError,
    Quality,
    QualityStart,
    Rep,
    Started,
    Turn,
    WorkerSpec,
    WorkflowPlan,
    decode,
    encode,
)

MESSAGES = [
    WorkerSpec(runtime="llama.cpp", artifact="/m.gguf", options={"n_threads": 2}, n_ctx=512, prompt_tokens=128,
               gen_tokens=8, workflow=WorkflowPlan([64, 16], 8, reuse_cache=False), sys_path=["/x"]),
    Exit(), Started(pid=7, baseline_rss=None, t=1.5),
    Loaded(load_s=0.2, t0=1.0, t1=1.2, info={"device": "cpu"}, prompt_tokens=128, rss_after_load=10),
    Rep(repetition=0, t_start=2.0, stamps=[2.1, 2.2]), QualityStart(t=3.0),
    Quality(t=4.0, columns={"quality_ppl": 9.5}), Failed(status="oom", error="MemoryError"), Done(memory={}),
    Turn(repetition=0, turn=1, t_start=1.0, stamps=[1.1], new_tokens=64, processed_tokens=64, context_tokens=64,
         kv_reuse=True),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: m.KIND)
def test_every_message_round_trips(message):
    line = encode(message)
    assert line.endswith("\n") and line.count("\n") == 1
    assert decode(line) == message


def test_every_kind_is_tested():
    assert {m.KIND for m in MESSAGES} | {"warmup", "reference"} == set(KINDS)


@pytest.mark.parametrize("line, words", [
    ("not json", "not a worker message"),
    ('["nope", {}]', "not a worker message"),
    ('["started", {"pid": 1, "baseline_rss": 2, "t": 0, "typo": 3}]', "unknown fields ['typo']"),
])
def test_a_bad_line_is_refused_by_name(line, words):
    with pytest.raises(ProtocolError, match=words.replace("[", r"\[").replace("]", r"\]")):
        decode(line)


def test_case_events_collects_in_order():
    ev = CaseEvents()
    for m in MESSAGES[2:5] + [Rep(repetition=0, t_start=0, stamps=[1.0], session=True), MESSAGES[-1]]:
        ev.add(m)
    assert ev.started and ev.loaded and len(ev.reps) == 2 and len(ev.timed_reps) == 1 and len(ev.turns) == 1
    assert not ev.finished
    ev.add(Failed(status="crashed", error="x"))
    assert ev.finished and ev.failed.status == "crashed"
