"""The quality probe, worker side: perplexity, KL from a reference, top-1 agreement, task checks.

Runs inside the case worker after the timed repetitions, through the
runner's ``logits(tokens)`` (and ``detokenize`` for tasks), so it works for
every runtime that exposes logits. Needs numpy only.

Scoring. The evaluation text is tokenized by the runner and cut to
``tokens`` tokens, then split into consecutive windows of ``window`` tokens;
each window is evaluated from an empty cache and every position but the
last predicts the next token of the same window. The window size is fixed
by the scenario, never by the case's n_ctx, so perplexities of different
cases, artifacts and runtimes are comparable.

KL divergence. The reference's next-token distribution P is stored per
position as its top-k log-probabilities plus one tail bucket (the remaining
mass), as llama.cpp's ``--kl-divergence-base`` stores full logits but much
smaller. For the measured artifact's Q, over the same k token ids:

    KL(P || Q) ~= sum_j p_j (log p_j - log q_j) + p_tail (log p_tail - log q_tail)

with q_tail = 1 - sum_j q_j. Merging the tail into one bucket can only lower
KL (the log-sum inequality), so this is a lower bound of the full-vocabulary
KL; with k=32 the tail mass is usually small and the bound tight. Top-1
agreement: the artifact's most likely token equals the reference's.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from harness.errors import FitbenchError
from harness.quality.tasks import answer_of, passes

ROW_CHUNK = 64  # rows of (n, n_vocab) turned to float64 at a time: bounds the probe's own memory
TINY = 1e-30


class QualityError(FitbenchError):
    """The probe cannot give a figure (e.g. the tokenizers differ); recorded in quality_error."""


def eval_tokens(runner: Any, text: str, n_tokens: int) -> list[int]:
    tokens = list(runner.tokenize(text))[:n_tokens]
    if len(tokens) < 2:
        raise QualityError("the evaluation text gives fewer than 2 tokens")
    return tokens


def windows(tokens: list[int], window: int) -> list[list[int]]:
    parts = [tokens[i:i + window] for i in range(0, len(tokens), window)]
    return [p for p in parts if len(p) >= 2]


def tokens_sha256(tokens: list[int]) -> str:
    return hashlib.sha256(np.asarray(tokens, dtype=np.int64).tobytes()).hexdigest()


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    x = rows.astype(np.float64)
    if not np.isfinite(x).all():
        raise QualityError("the runtime returned non-finite logits")
    m = x.max(axis=1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))


def score(runner: Any, tokens: list[int], window: int, top_k: int,
          reference: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Per scored position: nll, the top-k ids/log-probs and tail log-mass, and against a
    reference (arrays from ``load_reference``) the KL and whether the top-1 tokens agree."""
    nll, top_ids, top_lp, tail_lp, kl, agree = [], [], [], [], [], []
    pos = 0
    for part in windows(tokens, window):
        logits = runner.logits(part)
        if getattr(logits, "shape", None) is None or logits.shape[0] != len(part):
            raise QualityError(f"logits() returned shape {getattr(logits, 'shape', None)} for {len(part)} tokens")
        targets = np.asarray(part[1:])
        for i0 in range(0, len(part) - 1, ROW_CHUNK):
            i1 = min(i0 + ROW_CHUNK, len(part) - 1)
            lp = _log_softmax(np.asarray(logits[i0:i1]))
            rows = np.arange(i1 - i0)
            nll.append(-lp[rows, targets[i0:i1]])
            k = min(top_k, lp.shape[1])
            ids = np.argpartition(-lp, k - 1, axis=1)[:, :k]
            vals = lp[rows[:, None], ids]
            order = np.argsort(-vals, axis=1, kind="stable")
            ids, vals = np.take_along_axis(ids, order, 1), np.take_along_axis(vals, order, 1)
            top_ids.append(ids.astype(np.int32))
            top_lp.append(vals.astype(np.float32))
            tail_lp.append(np.log(np.clip(1.0 - np.exp(vals).sum(1), TINY, None)).astype(np.float32))
            if reference is not None:
                n = i1 - i0
                kl.append(kl_topk(reference["top_lp"][pos:pos + n], reference["tail_lp"][pos:pos + n],
                                  lp[rows[:, None], reference["top_ids"][pos:pos + n]]))
                agree.append(ids[:, 0] == reference["top_ids"][pos:pos + n, 0])
            pos += i1 - i0
        del logits
    out = {"nll": np.concatenate(nll), "top_ids": np.concatenate(top_ids), "top_lp": np.concatenate(top_lp),
           "tail_lp": np.concatenate(tail_lp)}
    if reference is not None:
        out["kl"], out["agree"] = np.concatenate(kl), np.concatenate(agree)
    return out


def kl_topk(ref_lp: np.ndarray, ref_tail_lp: np.ndarray, q_lp_at_ref: np.ndarray) -> np.ndarray:
    """KL(P||Q) per row over the reference's top-k ids plus one tail bucket (see the module doc)."""
    ref_lp = ref_lp.astype(np.float64)
    p = np.exp(ref_lp)
    head = (p * (ref_lp - q_lp_at_ref)).sum(axis=1)
    p_tail = np.exp(ref_tail_lp.astype(np.float64))
    q_tail = np.clip(1.0 - np.exp(q_lp_at_ref).sum(axis=1), TINY, None)
    tail = np.where(p_tail > TINY, p_tail * (np.log(np.clip(p_tail, TINY, None)) - np.log(q_tail)), 0.0)
    return np.maximum(head + tail, 0.0)  # rounding can make an identical distribution a hair negative


# --- the reference cache ---------------------------------------------------------------

def save_reference(path: Path, tokens: list[int], scored: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Atomically, so a reader never sees half a cache file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.savez_compressed(fh, tokens=np.asarray(tokens, dtype=np.int64), top_ids=scored["top_ids"],
                            top_lp=scored["top_lp"], tail_lp=scored["tail_lp"], nll=scored["nll"],
                            meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    os.replace(tmp, path)


def load_reference(path: Path) -> dict[str, Any]:
    try:
        with np.load(path) as data:
            ref = {k: data[k] for k in ("tokens", "top_ids", "top_lp", "tail_lp", "nll")}
            ref["meta"] = json.loads(bytes(data["meta"]).decode())
    except (OSError, KeyError, ValueError) as exc:
        raise QualityError(f"reference cache {path.name} is unreadable ({exc}); delete it to recompute") from None
    return ref


def check_same_tokens(tokens: list[int], ref: dict[str, Any]) -> None:
    """KL needs both artifacts to see the same token ids; refuse clearly otherwise."""
    ref_tokens = ref["tokens"].tolist()
    if tokens == ref_tokens:
        return
    first = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), min(len(tokens), len(ref_tokens)))
    name = ref["meta"].get("reference", "the reference")
    mine = tokens[first] if first < len(tokens) else "end"
    theirs = ref_tokens[first] if first < len(ref_tokens) else "end"
    raise QualityError(
        f"tokenizer differs from {name}: the evaluation text tokenizes differently at token {first} "
        f"({mine} vs {theirs}; {len(tokens)} vs {len(ref_tokens)} tokens); KL and top-1 agreement need "
        "artifacts with the same tokenizer, so they are not computed")


# --- the probe -----------------------------------------------------------------------

def reference_probe(runner: Any, q: dict[str, Any]) -> dict[str, Any]:
    """Score the reference artifact and write its top-k cache (``q['cache_path']``)."""
    tokens = eval_tokens(runner, q["text"], q["tokens"])
    scored = score(runner, tokens, q["window"], q["top_k"])
    ppl = float(np.exp(scored["nll"].mean()))
    meta = {"reference": q["reference_name"], "reference_sha256": q.get("reference_sha256"), "ppl": ppl,
            "text_id": q["text_id"], "text_sha256": q["text_sha256"], "window": q["window"],
            "top_k": q["top_k"], "tokens_sha256": tokens_sha256(tokens),
            "tail_mass_mean": float(np.exp(scored["tail_lp"].astype(np.float64)).mean())}
    save_reference(Path(q["cache_path"]), tokens, scored, meta)
    return {"ppl": ppl, "positions": int(len(scored["nll"])), "tail_mass_mean": meta["tail_mass_mean"]}


def case_probe(runner: Any, q: dict[str, Any]) -> dict[str, Any]:
    """Perplexity, and KL/top-1 against the reference cache when there is one; then the tasks.
    Every failure becomes a quality_error (or task_error) value: the speed figures stay valid."""
    out: dict[str, Any] = {"quality_text_id": q["text_id"], "quality_text_sha256": q["text_sha256"],
                           "quality_window": q["window"], "quality_top_k": q["top_k"]}
    errors: list[str] = []
    t0 = time.perf_counter()
    if q.get("tokens"):
        try:
            out.update(_perplexity_and_kl(runner, q, errors))
        except QualityError as exc:
            errors.append(str(exc))
        out["quality_s"] = time.perf_counter() - t0
    if q.get("tasks"):
        t1 = time.perf_counter()
        try:
            out.update(run_tasks(runner, q["tasks"]))
        except QualityError as exc:
            errors.append(f"tasks: {exc}")
        out["task_file"], out["task_sha256"] = q.get("task_file"), q.get("task_sha256")
        out["task_s"] = time.perf_counter() - t1
    out["quality_error"] = "; ".join(errors) or None
    return out


def _perplexity_and_kl(runner: Any, q: dict[str, Any], errors: list[str]) -> dict[str, Any]:
    tokens = eval_tokens(runner, q["text"], q["tokens"])
    out: dict[str, Any] = {"quality_tokens_sha256": tokens_sha256(tokens)}
    ref = None
    if q.get("cache_path"):
        out["quality_reference"] = q.get("reference_name")
        out["quality_reference_sha256"] = q.get("reference_sha256")
        if q.get("reference_error"):
            errors.append(f"no KL: {q['reference_error']}")
        else:
            try:
                ref = load_reference(Path(q["cache_path"]))
                check_same_tokens(tokens, ref)
            except QualityError as exc:
                errors.append(str(exc))
                ref = None
    scored = score(runner, tokens, q["window"], q["top_k"],
                   {k: ref[k] for k in ("top_ids", "top_lp", "tail_lp")} if ref else None)
    nll = scored["nll"].astype(np.float64)
    out.update(quality_positions=int(len(nll)), quality_nll_mean=float(nll.mean()),
               quality_ppl=float(np.exp(nll.mean())))
    if ref is not None:
        kl = scored["kl"]
        out.update(quality_kl_mean=float(kl.mean()), quality_kl_median=float(np.median(kl)),
                   quality_kl_p99=float(np.percentile(kl, 99)), quality_top1_agree=float(scored["agree"].mean()),
                   quality_ppl_ratio=out["quality_ppl"] / ref["meta"]["ppl"],
                   quality_reference_ppl=float(ref["meta"]["ppl"]))
    return out


def greedy(runner: Any, prompt: list[int], max_new: int, stop: list[str]) -> str:
    """Greedy answer: the runner's ``greedy_tokens`` where it has one, else decoding through
    ``logits()`` alone, so any runner with logits can run tasks (re-scoring the whole sequence
    per token: fine for short answers). There, a token that detokenizes to nothing is an
    end/control token: the answer ends."""
    from runners.base import overrides

    if overrides(runner, "greedy_tokens"):
        return runner.detokenize(runner.greedy_tokens(list(prompt), max_new))
    return greedy_by_logits(runner, prompt, max_new, stop)


def greedy_by_logits(runner: Any, prompt: list[int], max_new: int, stop: list[str]) -> str:
    tokens, new = list(prompt), []
    for _ in range(max_new):
        nxt = int(np.argmax(runner.logits(tokens)[-1]))
        if runner.detokenize([nxt]) == "":
            break
        new.append(nxt)
        tokens.append(nxt)
        if stop and any(s in runner.detokenize(new) for s in stop):
            break
    return runner.detokenize(new)


def run_tasks(runner: Any, tasks: list[dict[str, Any]]) -> dict[str, Any]:
    results = []
    for task in tasks:
        prompt = list(runner.tokenize(task["prompt"]))
        answer = answer_of(greedy(runner, prompt, task["max_tokens"], task["stop"]), task["stop"])
        results.append({"id": task["id"], "passed": passes(task, answer), "answer": answer[:200]})
    passed = sum(r["passed"] for r in results)
    return {"task_count": len(results), "task_passed": passed, "task_pass_rate": passed / len(results),
            "task_results_json": json.dumps(results)}
