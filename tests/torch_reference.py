"""A minimal transformers scorer with the runner's quality surface (tokenize, logits, detokenize).

Used by the cross-runtime agreement test and bench/quality_agreement.py to score
the HF checkpoint with torch directly; the torch *runner* (runners/torch.py)
lives on another branch. Not a fake: it runs the real model in real torch.
"""

from __future__ import annotations

from pathlib import Path


class TransformersScorer:
    def __init__(self, model_dir: Path, dtype: str = "float32", threads: int | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        self.model.eval()

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def logits(self, tokens: list[int]):
        with self._torch.inference_mode():
            out = self.model(self._torch.tensor([tokens]), use_cache=False).logits[0]
        return out.float().numpy()

    def detokenize(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)
