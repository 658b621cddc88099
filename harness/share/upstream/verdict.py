"""The server's verdict: every row judged again by harness.fit, with the server's thresholds.

The client only reports; the fit class it sent is kept in the row as signed
but never aggregated. ``judge`` runs the producer's own definitions
(``fit.classify``, which judges memory by ``fit.judged_peak`` and
``fit.memory_verdict``, then ``fit.judge_sessions`` for a workflow's
case-level rows) over copies of the rows, so a verdict here can only differ
from a local one by the thresholds, never by a second implementation.
Figures come only from ``ok`` rows (``figures``): a failed row counts in the
verdicts (an OOM is a ``no_fit``), never in a speed or memory figure.
"""

from __future__ import annotations

from collections import defaultdict

from harness.fit import VERDICT_COLUMNS, Thresholds, classify, judge_sessions, judged_peak
from harness.results import requested_budget
from harness.share.bundle import case_of


def budget_set(row: dict) -> bool:
    """A budget was asked for (enforced or a yardstick), by the project's one definition; such rows
    answer "does it fit in X", not "does it fit this machine", and stay out of the community table."""
    return requested_budget(row) is not None


def budget_of(row: dict) -> int | None:
    """What the row was judged against where it ran: the budget asked for, else the machine's RAM."""
    return row.get("budget_bytes") or row.get("ram_bytes")


def judge(rows: list[dict], thresholds: Thresholds | None = None) -> list[dict]:
    """The verdict columns of each row (same order as ``rows``, which are left as they are);
    ``thresholds`` default to harness.fit's documented ones."""
    thresholds = thresholds or Thresholds()
    judged = [{**row, **classify(row, budget_of(row), thresholds).to_row()} for row in rows]
    cases: dict[tuple, list[dict]] = defaultdict(list)
    for row in judged:
        cases[case_of(row)].append(row)
    for case_rows in cases.values():
        if any(r.get("workflow_kind") is not None for r in case_rows):
            judge_sessions(case_rows)  # a session's verdict is its worst turn's, as the producer decides it
    return [{k: row.get(k) for k in (*VERDICT_COLUMNS, "fit_turn")} for row in judged]


def figures(row: dict) -> dict | None:
    """The speed and memory figures a row may feed into the community table; None for a failed row."""
    if row.get("status") != "ok":
        return None
    return {"prompt_tokens": row.get("prompt_tokens"), "decode_tok_s": row.get("decode_tok_s"),
            "ttft_s": row.get("ttft_s"), "prefill_tok_s": row.get("prefill_tok_s"),
            "peak_rss_bytes": judged_peak(row)}

