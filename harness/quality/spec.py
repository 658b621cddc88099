"""The scenario's ``quality:`` section, validated, and what a case worker needs from it.

    quality:
      text: stdlib          # or a UTF-8 text file (relative to the scenario)
      tokens: 1024          # tokens of the text scored (0: no perplexity, tasks only)
      window: 512           # tokens per window, each from an empty cache (cases need n_ctx >= window)
      top_k: 32             # reference log-probs kept per position for KL (plus a tail bucket)
      reference: f16        # label of a model in `models`, or {artifact, runtime, options}
      tasks: tasks.jsonl    # optional prompts with expected answers (see harness/tasks.py)

Quality targets (``max_kl``, ``max_ppl_ratio``, ``min_pass_rate``) live in
``thresholds:`` with the other fit thresholds.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import FitbenchError
from harness.quality.tasks import Task, TaskFileError, load_tasks
from harness.quality.text import EvalText, EvalTextError, load_eval_text

QUALITY_FIELDS = {
    "text": "'stdlib' (Python docstrings, the default) or a UTF-8 text file",
    "tokens": "tokens of the evaluation text to score (default 1024; 0 = no perplexity)",
    "window": "tokens per scoring window, each from an empty cache (default 512)",
    "top_k": "reference log-probs kept per position for the KL (default 32)",
    "reference": "label of a model in 'models', or {artifact, runtime, options}: the artifact KL is measured from",
    "tasks": "JSONL file of prompts with expected answers (exact, contains or regex)",
}


class QualitySpecError(FitbenchError, ValueError):
    def __init__(self, where: str, message: str) -> None:
        self.where, self.message = where, message
        super().__init__(message)


@dataclass(frozen=True)
class Reference:
    artifact: Path
    runtime: str
    options_json: str  # JSON, so the spec stays hashable
    label: str

    @property
    def options(self) -> dict[str, Any]:
        return json.loads(self.options_json)


@dataclass(frozen=True)
class QualitySpec:
    text: EvalText
    tokens: int = 1024
    window: int = 512
    top_k: int = 32
    reference: Reference | None = None
    tasks: tuple[Task, ...] = ()
    task_file: str | None = None
    task_sha256: str | None = None

    def worker_spec(self, reference_sha: str | None = None, cache_path: Path | None = None,
                    reference_error: str | None = None) -> dict[str, Any]:
        """What the case worker receives (JSON)."""
        return {
            "text": self.text.text, "text_id": self.text.text_id, "text_sha256": self.text.sha256,
            "tokens": self.tokens, "window": self.window, "top_k": self.top_k,
            "reference_name": self.reference.label if self.reference else None,
            "reference_sha256": reference_sha, "cache_path": str(cache_path) if cache_path else None,
            "reference_error": reference_error,
            "tasks": [t.to_spec() for t in self.tasks], "task_file": self.task_file, "task_sha256": self.task_sha256,
        }

    def cache_key(self, reference_sha: str) -> str:
        """Reference cache id: the reference artifact and runtime, the text, and how it is scored."""
        ref = self.reference
        ident = {"sha": reference_sha, "runtime": ref.runtime if ref else None,
                 "options": ref.options if ref else None, "text": self.text.sha256,
                 "tokens": self.tokens, "window": self.window, "top_k": self.top_k}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def cache_dir() -> Path:
    """Where reference top-k files are kept: $FITBENCH_CACHE, else ~/.cache/fitbench."""
    root = os.environ.get("FITBENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fitbench")
    return Path(root) / "quality"


def parse_quality(raw: Any, base_dir: Path | None, models: list) -> QualitySpec:
    """``models`` are the scenario's parsed ModelSpecs (for a reference named by label)."""
    if not isinstance(raw, dict):
        raise QualitySpecError("quality", "must be a mapping like {reference: f16, tokens: 1024}")
    for key in raw:
        if key not in QUALITY_FIELDS:
            raise QualitySpecError(f"quality.{key}", f"unknown field; known fields: {', '.join(sorted(QUALITY_FIELDS))}")
    text_src = raw.get("text", "stdlib")
    if not isinstance(text_src, str) or not text_src:
        raise QualitySpecError("quality.text", "must be 'stdlib' or a path to a UTF-8 text file")
    try:
        text = load_eval_text(text_src, base_dir)
    except EvalTextError as exc:
        raise QualitySpecError("quality.text", str(exc)) from None
    tokens = _int("quality.tokens", raw.get("tokens", 1024), 0, 1 << 20)
    window = _int("quality.window", raw.get("window", 512), 2, 1 << 20)
    top_k = _int("quality.top_k", raw.get("top_k", 32), 1, 1024)
    tasks: tuple[Task, ...] = ()
    task_file = task_sha = None
    if raw.get("tasks") is not None:
        if not isinstance(raw["tasks"], str):
            raise QualitySpecError("quality.tasks", "must be a path to a JSONL file")
        path = Path(raw["tasks"]).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        try:
            loaded, task_sha = load_tasks(path)
        except TaskFileError as exc:
            raise QualitySpecError("quality.tasks", str(exc)) from None
        tasks, task_file = tuple(loaded), path.name
    if tokens == 0 and not tasks:
        raise QualitySpecError("quality.tokens", "0 scores no text and there are no tasks: nothing to measure")
    reference = _reference(raw.get("reference"), base_dir, models)
    return QualitySpec(text, tokens, window, top_k, reference, tasks, task_file, task_sha)


def _reference(raw: Any, base_dir: Path | None, models: list) -> Reference | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        found = [m for m in models if m.label == raw]
        if not found:
            labels = ", ".join(m.label for m in models)
            raise QualitySpecError("quality.reference", f"no model labelled {raw!r} (labels: {labels}); "
                                                        "give a label or {artifact, runtime, options}")
        m = found[0]
        options = {k: (v[0] if isinstance(v, list) else v) for k, v in m.options.items()}  # a sweep's first value
        return Reference(m.artifact, m.runtime, json.dumps(options, sort_keys=True), m.label)
    if isinstance(raw, dict):
        from harness.scenario import ScenarioError, _parse_model

        try:
            m = _parse_model("<scenario>", "quality.reference", raw, base_dir)
        except ScenarioError as exc:
            raise QualitySpecError(exc.where, exc.message) from None
        return Reference(m.artifact, m.runtime, json.dumps(m.options, sort_keys=True), m.label)
    raise QualitySpecError("quality.reference", "must be a model label or {artifact, runtime, options}")


def _int(where: str, value: Any, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise QualitySpecError(where, f"must be an integer from {minimum} to {maximum:,}, got {value!r}")
    return value
