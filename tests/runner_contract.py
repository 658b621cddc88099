"""Checks every runner with a real runtime must pass, shared by the per-runtime test files:
exact stamps, a real prefill per call, greedy tokens that agree with logits(), and
extend() that equals re-prefilling the whole history."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from harness.worker.prompt import build_prompt


def greedy(runner: Any, stream) -> list[int]:
    """Drain a generate()/extend() stream, collecting the token sampled at each stamp."""
    tokens = []
    for _stamp in stream:
        tokens.append(runner.last_token)
    return tokens


def check_exact_stamps(runner: Any, prompt_len: int, n: int) -> None:
    prompt = build_prompt(runner.tokenize, prompt_len)
    t0 = time.perf_counter()
    stamps = list(runner.generate(prompt, n))
    assert len(stamps) == n
    assert t0 < stamps[0] and stamps == sorted(stamps)


def check_logits_agree_with_greedy(runner: Any, prompt_len: int, n: int, tolerance: float) -> None:
    """logits() of prompt + generated history: shape (len, vocab), float32, and each greedy
    token is the argmax of its row (or within ``tolerance`` of it: batched prefill and
    one-token decode take different kernels, so near-ties may flip)."""
    prompt = build_prompt(runner.tokenize, prompt_len)
    tokens = greedy(runner, runner.generate(prompt, n))
    assert len(tokens) == n and all(isinstance(t, int) for t in tokens)
    history = prompt + tokens[:-1]
    logits = runner.logits(history)
    assert logits.dtype == np.float32 and logits.ndim == 2 and logits.shape[0] == len(history)
    assert logits.shape[1] >= max(history) + 1
    rows = logits[len(prompt) - 1:]
    exact = 0
    for row, token in zip(rows, tokens):
        assert row[token] >= row.max() - tolerance, (token, int(row.argmax()), row[token], row.max())
        exact += int(row.argmax()) == token
    assert exact >= n - 1  # a flip is a rare near-tie, never the rule


def check_extend_equals_reprefill(runner: Any, prompt_len: int, n: int) -> None:
    prompt = build_prompt(runner.tokenize, prompt_len)
    first = greedy(runner, runner.generate(prompt, n))
    new = runner.tokenize(" river mountain lantern")
    extended = greedy(runner, runner.extend(new, n))
    # The reference: everything so far, prefilled from an empty cache.
    reference = greedy(runner, runner.generate(prompt + first + new, n))
    assert extended == reference
