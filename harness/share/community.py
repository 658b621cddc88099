"""Merge community fits (an upstream's /v1/fits answer) into the local catalog.

Community entries are marked ``origin: community`` with ``options: community``,
so their catalog key never equals a local measurement's: local entries are
never touched, and a later `fitbench catalog update` never folds local runs
into a community entry. A new pull replaces the community entries it has
fresher figures for. The answer is untrusted input: every entry is checked
(types, ranges, finite numbers, a machine class and runtime of the published form)
and a malformed one is skipped and counted, never half-merged. Both shapes of an
aggregate's figures are read: {median, p25, p75, ...} and {median, mad, n, ...};
fields this fitbench does not know are ignored.

Like ``catalog update``, a pull keeps case-level fits only: a workflow
session's entry (its ``workflow`` spec is part of the catalog key) is
merged, the entries of its single turns (``turn`` set) are not.
"""

from __future__ import annotations

import math
import re
from typing import Any
from urllib.parse import urlparse

from harness.catalog import Catalog
from harness.fit import ORDER
from harness.share.bundle import MACHINE_CLASS
from harness.share.client import has_nonfinite

COMMUNITY = "community"
SHA256 = re.compile(r"^[0-9a-f]{64}$")
RUNTIME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
MAX_COUNT = 2**40  # samples, machines, runs: more than any upstream holds, less than a float's exact range


class Malformed(ValueError):
    """An aggregate that cannot be merged as it is."""


def _num(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
            and abs(value) < 2**53:
        return float(value)
    return None


def _median(spread: Any) -> float | None:
    """A figure's median; None where the figure or its median is absent. A figure of the wrong kind is Malformed."""
    if spread is None:
        return None
    if not isinstance(spread, dict):
        raise Malformed("a figure must be an object")
    value = spread.get("median")
    if value is not None and _num(value) is None:
        raise Malformed("a median must be a finite number")
    return _num(value)


def _band(spread: Any) -> list[float] | None:
    """The figure's spread: p25-p75 where given, else median ± MAD."""
    if not isinstance(spread, dict):
        return None
    low, high = _num(spread.get("p25")), _num(spread.get("p75"))
    if low is None or high is None:
        median, mad = _num(spread.get("median")), _num(spread.get("mad"))
        if median is None or mad is None or mad < 0:
            return None
        low, high = median - mad, median + mad
    return [round(low, 4), round(high, 4)]


def _count(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_COUNT:
        raise Malformed("a count must be a whole number")
    return value


def _entry_ok(f: Any) -> bool:
    return (isinstance(f, dict) and not has_nonfinite(f)
            and isinstance(f.get("artifact_sha256"), str) and bool(SHA256.match(f["artifact_sha256"]))
            and isinstance(f.get("machine_class"), str) and bool(MACHINE_CLASS.match(f["machine_class"]))
            and isinstance(f.get("runtime"), str) and bool(RUNTIME.match(f["runtime"]))
            and isinstance(f.get("n_ctx"), int) and not isinstance(f["n_ctx"], bool) and 0 < f["n_ctx"] < 2**31
            and f.get("fit_class") in ORDER
            and (f.get("workflow") is None or (isinstance(f["workflow"], str) and len(f["workflow"]) <= 2000))
            and (f.get("turn") is None or (isinstance(f["turn"], int) and not isinstance(f["turn"], bool))))


def _artifact(cat: Catalog, f: dict) -> str:
    art = f.get("artifact") if isinstance(f.get("artifact"), dict) else {}
    name = art.get("name") if isinstance(art.get("name"), str) and art["name"].strip() else f["artifact_sha256"][:12]
    aid = cat.artifact_id_for(f["artifact_sha256"], name)
    if aid not in cat.artifacts:
        fields = {"format": "format", "quant": "quant", "architecture": "arch", "size_bytes": "size_bytes",
                  "n_params": "n_params", "n_layers": "n_layers", "n_heads": "n_heads", "n_kv_heads": "n_kv_heads",
                  "head_dim": "head_dim", "context_length": "context_length"}
        entry = {"family": re.split(r"[-_.]", name)[0].lower()[:40], "sha256": f["artifact_sha256"],
                 "name": name[:200], "origin": COMMUNITY}
        for ours, theirs in fields.items():
            value = art.get(theirs)
            if isinstance(value, (str, int)) and not isinstance(value, bool) and len(str(value)) <= 64:
                entry[ours] = value
        cat.artifacts[aid] = entry
    return aid


def _entry(f: dict, source: str) -> dict:
    """The catalog entry of one aggregate, artifact id aside; raises Malformed (or a TypeError/ValueError
    from a value of the wrong kind) for anything it cannot take as it is."""
    decode, ttft, peak = _median(f.get("decode_tok_s")), _median(f.get("ttft_s")), _median(f.get("peak_rss_bytes"))
    prompt = _median(f.get("prompt_tokens"))
    band = _band(f.get("decode_tok_s"))
    samples, machines = _count(f.get("samples")), _count(f.get("machines"))
    runs = _count(f.get("runs")) if f.get("runs") is not None else samples
    if f.get("artifact") is not None and not isinstance(f["artifact"], dict):
        raise Malformed("artifact must be an object")
    versions = f.get("runtime_versions") or []
    if not isinstance(versions, list):
        raise Malformed("runtime_versions must be a list")
    measured = f.get("last_measured")
    entry = {
        "machine_class": f["machine_class"], "runtime": f["runtime"], "options": COMMUNITY,
        "n_ctx": f["n_ctx"], "prompt_tokens": int(prompt) if prompt is not None else None, "budget_bytes": None,
        "fit_class": f["fit_class"],
        "fit_reason": (f"community: {samples} sample(s) from {machines} machine(s)"
                       + (f", decode {decode:,.1f} tok/s (spread {band[0]:,.1f}-{band[1]:,.1f})"
                          if decode is not None and band else "")),
        "peak_rss_bytes": int(peak) if peak is not None else None,
        "decode_tok_s": round(decode, 4) if decode is not None else None,
        "ttft_s": round(ttft, 4) if ttft is not None else None,
        "runtime_version": ", ".join(v[:32] for v in versions[:5] if isinstance(v, str)) or None,
        "measured_at": measured[:40] if isinstance(measured, str) else "",
        "source": source, "origin": COMMUNITY,
        "samples": samples, "machines": machines,
        "spread": {k: b for k in ("decode_tok_s", "ttft_s", "peak_rss_bytes") if (b := _band(f.get(k)))},
        "count": runs,
    }
    if f.get("workflow") is not None:
        entry["workflow"] = f["workflow"]
    return entry


def merge_community(cat: Catalog, data: dict, url: str) -> dict[str, int]:
    counts = {"added": 0, "updated": 0, "unchanged": 0, "skipped": 0, "local_alongside": 0}
    source = f"{COMMUNITY}:{urlparse(url).netloc or url}"
    local = {(f["artifact"], f["machine_class"], f["runtime"], f["n_ctx"], f.get("workflow")) for f in cat.fits
             if f.get("origin") != COMMUNITY and f.get("budget_bytes") is None}
    index = {(f["artifact"], f["machine_class"], f["runtime"], f["n_ctx"], f.get("workflow")): f for f in cat.fits
             if f.get("origin") == COMMUNITY}
    fits = data.get("fits") if isinstance(data, dict) else None
    for f in fits if isinstance(fits, list) else []:
        if isinstance(f, dict) and "fit_class" in f and f["fit_class"] is None:
            continue  # a key whose every vote was set apart: nothing to merge, nothing wrong
        if not _entry_ok(f):
            counts["skipped"] += 1
            continue
        if f.get("turn") is not None:
            continue  # one turn of a session: the session's own entry carries its verdict
        try:
            entry = _entry(f, source)
        except (Malformed, TypeError, ValueError, OverflowError, AttributeError, KeyError):
            counts["skipped"] += 1
            continue
        aid = _artifact(cat, f)
        entry = {"artifact": aid, **entry}
        key = (aid, f["machine_class"], f["runtime"], f["n_ctx"], f.get("workflow"))
        if key in local:
            counts["local_alongside"] += 1
        existing = index.get(key)
        if existing is None:
            cat.fits.append(entry)
            index[key] = entry
            counts["added"] += 1
        elif existing == entry:
            counts["unchanged"] += 1
        else:
            existing.clear()
            existing.update(entry)
            counts["updated"] += 1
    return counts
