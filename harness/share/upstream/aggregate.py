"""The community table's arithmetic: one vote per token per key, robust statistics over the votes.

A key is artifact x machine class x runtime x context (and, for a workflow,
its session shape and turn). Within a key:

* **One vote per token.** ``vote`` collapses everything one token sent for
  the key (its machines, runs and repetitions: ``machine_id`` is a string the
  client chooses, so machines are counted and shown, never votes) into one
  value per figure, the median of its ``ok`` rows, and one verdict: each case
  (run x machine x case key) is its worst row, the token's verdict its most
  common case verdict, ties to the worse. Failed rows count in the verdict
  (an OOM is a ``no_fit``), never in a figure.
* **Robust statistics.** ``fit_entry`` takes, per figure, the median and the
  MAD of the votes. A vote is an *outlier* on a figure when its modified
  z-score ``0.6745 * |x - median| / MAD`` exceeds ``OUTLIER_Z`` = 3.5
  (Iglewicz & Hoaglin; a MAD of 0 means more than half the votes agree
  exactly, and then every vote off the median counts as beyond it) **and**
  it is more than ``NOISE_FLOOR`` = 10 % away from the median (machines of
  one class differ by that much; such votes are never outliers). A vote that is an outlier on
  any figure is an *outlier vote*: its values are shown apart (``outliers``)
  and it counts in nothing: neither the figures nor the verdict.
* **The verdict** is the most common verdict among the counted votes, ties to
  the worse one (a shared table should not flatter).
* **Names** come from votes too: the artifact name shown for a key is the one
  most tokens used (each token's name is that of its latest row with a valid
  ``started_at``; rows without one name nothing).
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from datetime import datetime, timezone
from urllib.parse import urlencode

from harness.fit import ORDER

OUTLIER_Z = 3.5
NOISE_FLOOR = 0.10
METRICS = ("decode_tok_s", "ttft_s", "prefill_tok_s", "peak_rss_bytes")
SPREAD_ONLY = ("prompt_tokens",)  # reported, never a reason to set a vote apart
MAX_LISTED_OUTLIERS = 50


def valid_time(value) -> str | None:
    """``started_at`` as a UTC ISO string; None when it is missing or not a date and time."""
    if isinstance(value, datetime):
        when = value
    elif isinstance(value, str) and 10 <= len(value) <= 40:
        try:
            when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    else:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).isoformat(timespec="seconds")


def most_common_worst(counts: Counter) -> str | None:
    """The most common verdict; ties go to the worse one."""
    return max(counts, key=lambda c: (counts[c], ORDER.index(c))) if counts else None


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def vote(rows: list[dict]) -> dict:
    """One token's vote in one key, from its stored rows there (the narrow columns of store.VOTE_COLUMNS)."""
    ok = [r for r in rows if r["status"] == "ok"]
    cases: dict[tuple, list[str]] = defaultdict(list)
    for r in rows:
        if r.get("fit_class") in ORDER:
            cases[(r["run_id"], r["machine_id"], r["machine_class"], r["case_key"])].append(r["fit_class"])
    verdicts = Counter(max(v, key=ORDER.index) for v in cases.values())
    named = [r for r in rows if r.get("started_at")]
    latest = max(named, key=lambda r: (r["started_at"], r["row_key"])) if named else None
    return {
        "values": {m: _median([r.get(m) for r in ok]) for m in (*METRICS, *SPREAD_ONLY)},
        "fit_class": most_common_worst(verdicts),
        "rows": len(rows), "samples": len(ok), "cases": len({(r["run_id"], r["machine_id"], r["machine_class"],
                                                               r["case_key"]) for r in rows}),
        "runs": len({(r["machine_id"], r["run_id"]) for r in rows}),
        "machines": sorted({r["machine_id"] for r in rows}),
        "runtime_versions": sorted({str(r["runtime_version"]) for r in rows if r.get("runtime_version")}),
        "workflow_kind": next((r["workflow_kind"] for r in rows if r.get("workflow_kind")), None),
        "name": latest["artifact_name"] if latest else None,
        "last_measured": latest["started_at"] if latest else None,
        "latest_row": latest["row_key"] if latest else None,
    }


def robust(values: list[float]) -> tuple[float, float, set[int]]:
    """(median, MAD, indices of the outliers) of ``values`` by the rule in the module docstring."""
    med = statistics.median(values)
    deviations = [abs(v - med) for v in values]
    mad = statistics.median(deviations)
    # MAD 0: more than half the votes agree exactly, and whatever is beyond the noise floor is set apart
    out = {i for i, d in enumerate(deviations)
           if d > NOISE_FLOOR * abs(med) and (mad == 0 or 0.6745 * d / mad > OUTLIER_Z)}
    return med, mad, out


def spread(values: list[float], outliers: list[float] | None = None) -> dict | None:
    """median, MAD, quartiles, range and count of counted votes; ``outliers``: this figure's votes set apart."""
    values = sorted(v for v in values if v is not None)
    if not values and not outliers:
        return None
    if not values:
        return {"median": None, "mad": None, "n": 0, "outliers": sorted(outliers)[:MAX_LISTED_OUTLIERS],
                "min": None, "max": None, "p25": None, "p75": None}
    med = statistics.median(values)
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {"median": med, "mad": statistics.median(abs(v - med) for v in values), "n": len(values),
            "outliers": sorted(outliers or [])[:MAX_LISTED_OUTLIERS], "min": values[0], "max": values[-1],
            "p25": q[0], "p75": q[2]}


def outliers_by_metric(votes: list[dict]) -> dict[str, set[int]]:
    """For each figure, the indices of the votes set apart on it."""
    judged: dict[str, set[int]] = {}
    for m in METRICS:
        have = [(i, v["values"][m]) for i, v in enumerate(votes) if v["values"].get(m) is not None]
        if have:
            judged[m] = {have[j][0] for j in robust([x for _, x in have])[2]}
    return judged


def agrees(mine: dict, others: list[dict]) -> bool:
    """Whether a vote agrees with the consensus of ``others``: not an outlier among them on any figure,
    and the same verdict as their counted votes give."""
    everyone = [*others, mine]
    judged = outliers_by_metric(everyone)
    if any(len(others) in out for out in judged.values()):
        return False
    apart = set().union(*judged.values())
    consensus = most_common_worst(Counter(v["fit_class"] for i, v in enumerate(others)
                                          if i not in apart and v["fit_class"]))
    return consensus is None or mine["fit_class"] == consensus


def rows_url(sha: str, machine_class: str, runtime: str, n_ctx: int) -> str:
    return "/v1/rows?" + urlencode({"artifact_sha256": sha, "machine_class": machine_class, "runtime": runtime,
                                    "n_ctx": n_ctx})


def fit_entry(key: list, votes: list[dict], artifact_of) -> dict:
    """The served fit of one key from the votes of the tokens in good standing; ``artifact_of(row_key)``:
    the artifact columns of a stored row (asked once: for the newest vote naming the winning name)."""
    sha, machine_class, runtime, n_ctx, workflow, turn = key
    judged = outliers_by_metric(votes)
    apart = set().union(*judged.values())
    counted = [v for i, v in enumerate(votes) if i not in apart]
    verdicts = Counter(v["fit_class"] for v in counted if v["fit_class"])
    names = Counter(v["name"] for v in votes if v["name"])
    name = min(names, key=lambda n: (-names[n], n)) if names else None
    named = [v for v in votes if v["name"] == name and v.get("latest_row")]
    newest = max(named, key=lambda v: (v["last_measured"], v["latest_row"])) if named else None
    artifact = (artifact_of(newest["latest_row"]) if newest else None) or {"name": name}
    times = [v["last_measured"] for v in counted if v["last_measured"]]
    entry = {
        "artifact_sha256": sha, "machine_class": machine_class, "runtime": runtime, "n_ctx": n_ctx,
        "workflow_kind": next((v["workflow_kind"] for v in votes if v["workflow_kind"]), None),
        "workflow": workflow, "turn": turn, "artifact": artifact,
        "votes": len(counted), "tokens": len(votes), "outlier_votes": len(apart),
        "samples": sum(v["samples"] for v in votes), "rows": sum(v["rows"] for v in votes),
        "cases": sum(v["cases"] for v in votes), "runs": sum(v["runs"] for v in votes),
        "machines": len({m for v in votes for m in v["machines"]}),
        "runtime_versions": sorted({x for v in votes for x in v["runtime_versions"]})[:20],
        "fit_class": most_common_worst(verdicts), "fit_classes": dict(verdicts),
        "last_measured": max(times) if times else None,
        "rows_url": rows_url(sha, machine_class, runtime, n_ctx),
    }
    for m in METRICS:
        entry[m] = spread([v["values"][m] for v in counted],
                          [votes[i]["values"][m] for i in judged.get(m, ())])
    for m in SPREAD_ONLY:
        entry[m] = spread([v["values"][m] for v in counted])
    return entry
