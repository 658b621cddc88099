"""Workflow scenarios: a multi-turn session instead of one prompt and one reply.

A workflow is a plan of turns. Each turn hands the runtime some new tokens
(a user message, a document, a question) and generates a reply; the next
turn continues the same conversation, so the context grows turn by turn.

- ``chat``: ``turns`` turns, each adding ``user_tokens`` and replying with
  ``reply_tokens``.
- ``document``: one long document (``document_tokens``) with the first of
  ``questions`` questions, then the other questions (``question_tokens``
  each) about it, each answered with ``reply_tokens``.

Runners that keep a KV/prompt cache continue the session with ``extend``
(only the new tokens are processed); the others replay the whole history
with ``generate`` every turn (``reuse_cache: false`` asks for the replay
everywhere, to measure what a cache saves). Both are what a user of that runtime would
see, and every turn row says which (``kv_reuse``).

This module is the plan only (what the tokens are, how long the session
is); the worker plays it and the suite turns it into rows.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from harness.errors import FitbenchError

KINDS = ("chat", "document")
REUSE_HELP = "false: replay the whole history every turn even where the runtime could reuse its cache"
FIELDS = {
    "chat": {"kind": "chat | document", "turns": "turns in the session",
             "user_tokens": "tokens each user message adds", "reply_tokens": "tokens generated per turn",
             "reuse_cache": REUSE_HELP},
    "document": {"kind": "chat | document", "document_tokens": "tokens of the document (the first turn)",
                 "questions": "questions asked about it, one per turn", "question_tokens": "tokens per question",
                 "reply_tokens": "tokens generated per answer", "reuse_cache": REUSE_HELP},
}
DEFAULTS = {"user_tokens": 200, "reply_tokens": 64, "question_tokens": 30}
MAX_TURNS = 1000
MAX_TOKENS = 1 << 24


class WorkflowError(FitbenchError, ValueError):
    """A bad workflow spec; ``field`` names the offending field (or '' for the whole spec)."""

    def __init__(self, field: str, message: str) -> None:
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}" if field else message)


@dataclass(frozen=True)
class Workflow:
    kind: str
    turns: int  # chat: turns; document: questions (one per turn)
    user_tokens: int = 0  # chat
    document_tokens: int = 0  # document
    question_tokens: int = 0  # document
    reply_tokens: int = 64
    reuse_cache: bool = True  # False: replay the history with generate() like a server without a prompt cache

    def new_tokens(self) -> list[int]:
        """Tokens each turn hands to the runtime (the first turn's include the BOS)."""
        if self.kind == "chat":
            return [self.user_tokens] * self.turns
        return [self.document_tokens + self.question_tokens] + [self.question_tokens] * (self.turns - 1)

    def context_before_reply(self) -> list[int]:
        """Tokens in the context when each turn's reply starts (history + this turn's new tokens)."""
        out, total = [], 0
        for i, n in enumerate(self.new_tokens()):
            total += n + (self.reply_tokens if i else 0)
            out.append(total)
        return out

    @property
    def session_tokens(self) -> int:
        """KV cells the whole session needs: every message and every reply."""
        return sum(self.new_tokens()) + self.turns * self.reply_tokens

    @property
    def label(self) -> str:
        replay = " replay" if not self.reuse_cache else ""
        if self.kind == "chat":
            return f"chat {self.turns}x(u{self.user_tokens}+r{self.reply_tokens}){replay}"
        return f"doc{self.document_tokens}+{self.turns}x(q{self.question_tokens}+r{self.reply_tokens}){replay}"

    def to_dict(self) -> dict:
        keep = FIELDS[self.kind]
        d = {k: v for k, v in asdict(self).items() if k in keep or k == "turns"}
        if self.kind == "document":
            d["questions"] = d.pop("turns")
        if self.reuse_cache:
            d.pop("reuse_cache")  # the default stays out of the case key, so keys of earlier runs still match
        return d

    def scaled_to(self, total_tokens: int) -> Workflow:
        """The same session shape filling ``total_tokens`` of context: chat messages or the document
        grow or shrink; the number of turns and the reply and question lengths stay (for `fitbench fit`)."""
        fixed = self.turns * self.reply_tokens
        if self.kind == "chat":
            return Workflow("chat", self.turns, user_tokens=max(1, (total_tokens - fixed) // self.turns),
                            reply_tokens=self.reply_tokens, reuse_cache=self.reuse_cache)
        document = max(1, total_tokens - fixed - self.turns * self.question_tokens)
        return Workflow("document", self.turns, document_tokens=document, question_tokens=self.question_tokens,
                        reply_tokens=self.reply_tokens, reuse_cache=self.reuse_cache)


def parse_workflow(raw: object) -> Workflow:
    """A mapping like ``{kind: chat, turns: 10, user_tokens: 200, reply_tokens: 64}`` -> Workflow."""
    if not isinstance(raw, dict):
        raise WorkflowError("", "must be a mapping like {kind: chat, turns: 10, user_tokens: 200, reply_tokens: 64}")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise WorkflowError("kind", f"must be one of {', '.join(KINDS)}, got {kind!r}")
    known = FIELDS[kind]
    for key in raw:
        if key not in known:
            raise WorkflowError(str(key), f"unknown field for a {kind} workflow (known: {', '.join(known)})")
    count_field = "turns" if kind == "chat" else "questions"
    if count_field not in raw:
        raise WorkflowError(count_field, f"missing; a {kind} workflow needs '{count_field}:' ({known[count_field]})")
    if kind == "document" and "document_tokens" not in raw:
        raise WorkflowError("document_tokens", "missing; give the document length in tokens, e.g. 4000")

    def number(key: str, minimum: int, maximum: int = MAX_TOKENS) -> int:
        value = raw.get(key, DEFAULTS.get(key))
        if isinstance(value, bool) or not isinstance(value, int):
            raise WorkflowError(key, f"must be an integer, got {value!r}"[:120])
        if not minimum <= value <= maximum:
            raise WorkflowError(key, f"must be between {minimum} and {maximum:,}, got {value}")
        return value

    turns = number(count_field, 1, MAX_TURNS)
    reply = number("reply_tokens", 2)
    reuse = raw.get("reuse_cache", True)
    if not isinstance(reuse, bool):
        raise WorkflowError("reuse_cache", f"must be true or false, got {reuse!r}"[:120])
    if kind == "chat":
        return Workflow("chat", turns, user_tokens=number("user_tokens", 1), reply_tokens=reply, reuse_cache=reuse)
    return Workflow("document", turns, document_tokens=number("document_tokens", 1),
                    question_tokens=number("question_tokens", 1), reply_tokens=reply, reuse_cache=reuse)


def parse_workflow_option(text: str, reply_tokens: int) -> Workflow:
    """``--workflow chat:10`` or ``document:5`` (turns or questions after the colon)."""
    match = re.fullmatch(r"\s*(chat|document|doc)\s*(?::\s*(\d+))?\s*", text)
    if not match:
        raise WorkflowError("", f"--workflow {text!r}: write it as chat:TURNS or document:QUESTIONS "
                                "(e.g. chat:10), or give a scenario file with a workflow")
    kind = "document" if match.group(1).startswith("doc") else "chat"
    count = int(match.group(2) or (10 if kind == "chat" else 5))
    if not 1 <= count <= MAX_TURNS:
        raise WorkflowError("", f"--workflow {text!r}: the number of turns must be between 1 and {MAX_TURNS}")
    if kind == "chat":
        return Workflow("chat", count, user_tokens=DEFAULTS["user_tokens"], reply_tokens=reply_tokens)
    return Workflow("document", count, document_tokens=1, question_tokens=DEFAULTS["question_tokens"],
                    reply_tokens=reply_tokens)


def round_up(n: int, step: int = 256) -> int:
    return -(-n // step) * step
