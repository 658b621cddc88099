"""Task checks: a small JSONL file of prompts with expected answers, run greedily.

One JSON object per line (blank lines and lines starting with ``#`` are skipped)::

    {"id": "capital", "prompt": "The capital of France is", "contains": "Paris"}
    {"prompt": "2 + 2 =", "regex": "^\\s*4\\b", "max_tokens": 4}
    {"prompt": "Say yes:", "exact": "yes", "ignore_case": true, "stop": "\\n"}

Exactly one of ``exact`` (the answer, stripped, equals it), ``contains`` or
``regex`` (``re.search``). Optional: ``id``, ``max_tokens`` (default 24),
``stop`` (a string or list: the answer is cut at the first one),
``ignore_case``. The prompt is tokenized by the runner as plain text.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness.errors import FitbenchError

MATCH_KINDS = ("exact", "contains", "regex")
KNOWN_FIELDS = {"id", "prompt", "max_tokens", "stop", "ignore_case", *MATCH_KINDS}
DEFAULT_MAX_TOKENS = 24
MAX_TASKS = 10_000


class TaskFileError(FitbenchError, ValueError):
    """A task file is wrong: the message names the file, the line and what to do."""


@dataclass(frozen=True)
class Task:
    id: str
    prompt: str
    kind: str  # exact | contains | regex
    expected: str
    max_tokens: int = DEFAULT_MAX_TOKENS
    stop: tuple[str, ...] = ()
    ignore_case: bool = False

    def to_spec(self) -> dict[str, Any]:
        return {**asdict(self), "stop": list(self.stop)}


def load_tasks(path: Path) -> tuple[list[Task], str]:
    """The tasks and the file's sha256; any problem is one TaskFileError line."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TaskFileError(f"{path}: task file not found; give a JSONL file of prompts and expected answers") from None
    except OSError as exc:
        raise TaskFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise TaskFileError(f"{path}: not UTF-8 text; a task file is JSONL, one JSON object per line") from None
    tasks: list[Task] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        tasks.append(parse_task(path, number, line, len(tasks)))
        if len(tasks) > MAX_TASKS:
            raise TaskFileError(f"{path}: more than {MAX_TASKS:,} tasks; task checks are meant to be small")
    if not tasks:
        raise TaskFileError(f"{path}: no tasks; add lines like "
                            '{"prompt": "The capital of France is", "contains": "Paris"}')
    ids = [t.id for t in tasks]
    dup = next((i for i in ids if ids.count(i) > 1), None)
    if dup is not None:
        raise TaskFileError(f"{path}: task id {dup!r} is used twice; ids must be unique")
    return tasks, hashlib.sha256(data).hexdigest()


def parse_task(path: Path, number: int, line: str, index: int) -> Task:
    where = f"{path}: line {number}"
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TaskFileError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno}); "
                            "each line must be one JSON object") from None
    if not isinstance(raw, dict):
        raise TaskFileError(f"{where}: must be a JSON object like {{\"prompt\": ..., \"contains\": ...}}")
    unknown = sorted(set(raw) - KNOWN_FIELDS)
    if unknown:
        raise TaskFileError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(sorted(KNOWN_FIELDS))})")
    prompt = raw.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise TaskFileError(f"{where}: missing or empty 'prompt' (a non-empty string)")
    kinds = [k for k in MATCH_KINDS if k in raw]
    if len(kinds) != 1:
        raise TaskFileError(f"{where}: give exactly one of 'exact', 'contains' or 'regex' "
                            f"(found {', '.join(kinds) or 'none'})")
    kind = kinds[0]
    expected = raw[kind]
    if not isinstance(expected, str) or (kind != "exact" and not expected):
        raise TaskFileError(f"{where}: {kind!r} must be a non-empty string")
    ignore_case = raw.get("ignore_case", False)
    if not isinstance(ignore_case, bool):
        raise TaskFileError(f"{where}: 'ignore_case' must be true or false")
    if kind == "regex":
        try:
            re.compile(expected, re.IGNORECASE if ignore_case else 0)
        except re.error as exc:
            raise TaskFileError(f"{where}: 'regex' does not compile: {exc}") from None
    max_tokens = raw.get("max_tokens", DEFAULT_MAX_TOKENS)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= 4096:
        raise TaskFileError(f"{where}: 'max_tokens' must be an integer from 1 to 4096")
    stop = raw.get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise TaskFileError(f"{where}: 'stop' must be a non-empty string or a list of them")
    task_id = raw.get("id", f"task{index + 1}")
    if not isinstance(task_id, (str, int)) or isinstance(task_id, bool):
        raise TaskFileError(f"{where}: 'id' must be a string")
    return Task(str(task_id), prompt, kind, expected, max_tokens, tuple(stop), ignore_case)


def answer_of(generated: str, stop: list[str] | tuple[str, ...]) -> str:
    """The generated text up to the first stop string."""
    cut = len(generated)
    for s in stop:
        at = generated.find(s)
        if at != -1:
            cut = min(cut, at)
    return generated[:cut]


def passes(task: dict[str, Any], answer: str) -> bool:
    kind, expected = task["kind"], task["expected"]
    if kind == "regex":
        return re.search(expected, answer, re.IGNORECASE if task["ignore_case"] else 0) is not None
    got, want = (answer.lower(), expected.lower()) if task["ignore_case"] else (answer, expected)
    if kind == "exact":
        return got.strip() == want.strip()
    return want in got
