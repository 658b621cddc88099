"""Deterministic prompts of an exact token count, made with the runner's own tokenizer.

The text is plain English-like prose from a fixed word list and a fixed
seed, so every run, machine and runtime sees the same prompt, and its
token count is exact: "TTFT at 8192 filled" really processed 8192 tokens.
"""

from __future__ import annotations

import random
from typing import Callable

WORDS = (
    "the model reads a long document about memory and speed on small machines while the cache grows "
    "with every token and the planner checks whether weights stay resident or spill to storage when "
    "context gets large people choose local models by task budget runtime and quality so a benchmark "
    "must measure real generations at real lengths instead of guessing from parameter counts "
    "river mountain lantern harbor garden window engine signal market orbit meadow canyon violet "
    "thunder compass journal ladder marble pepper silver timber velvet winter yellow zebra anchor "
    "bridge candle desert feather glacier hammer island jungle kettle lemon mirror needle ocean "
    "pillow quartz rocket saddle tunnel umbrella valley wagon"
).split()
SEED = 20261128


def prompt_text(n_words: int, seed: int = SEED) -> str:
    rng = random.Random(seed)
    sentences, count = [], 0
    while count < n_words:
        length = rng.randint(6, 18)
        words = [rng.choice(WORDS) for _ in range(length)]
        sentences.append(" ".join(words).capitalize() + ".")
        count += length
    return " ".join(sentences)


def build_prompt(tokenize: Callable[[str], list[int]], n_tokens: int, seed: int = SEED) -> list[int]:
    """Exactly ``n_tokens`` token ids (BOS included when the tokenizer adds one)."""
    if n_tokens < 1:
        raise ValueError("a prompt needs at least one token")
    n_words = n_tokens + 16
    while True:
        tokens = tokenize(prompt_text(n_words, seed))
        if len(tokens) >= n_tokens:
            return tokens[:n_tokens]
        n_words *= 2
