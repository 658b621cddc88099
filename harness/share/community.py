"""Merge community fits (an upstream's /v1/fits answer) into the local catalog.

Community entries are marked ``origin: community`` with ``options: community``,
so their catalog key never equals a local measurement's: local entries are
never touched, and a later `fitbench catalog update` never folds local runs
into a community entry. A new pull replaces the community entries it has
fresher figures for. The answer is untrusted input: every entry is checked
and a malformed one is skipped, never half-merged.

Like ``catalog update``, a pull keeps case-level fits only: a workflow
session's entry (its ``workflow`` spec is part of the catalog key) is
merged, the entries of its single turns (``turn`` set) are not.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlparse

from harness.catalog import Catalog
from harness.fit import ORDER

COMMUNITY = "community"
SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value else None


def _median(spread: Any) -> float | None:
    return _num(spread.get("median")) if isinstance(spread, dict) else None


def _band(spread: Any) -> list[float] | None:
    if not isinstance(spread, dict) or _num(spread.get("p25")) is None or _num(spread.get("p75")) is None:
        return None
    return [round(spread["p25"], 4), round(spread["p75"], 4)]


def _entry_ok(f: Any) -> bool:
    return (isinstance(f, dict) and isinstance(f.get("artifact_sha256"), str) and SHA256.match(f["artifact_sha256"])
            and isinstance(f.get("machine_class"), str) and 0 < len(f["machine_class"]) <= 64
            and isinstance(f.get("runtime"), str) and 0 < len(f["runtime"]) <= 64
            and isinstance(f.get("n_ctx"), int) and f["n_ctx"] > 0 and f.get("fit_class") in ORDER
            and isinstance(f.get("samples", 0), int) and isinstance(f.get("machines", 0), int)
            and (f.get("workflow") is None or (isinstance(f["workflow"], str) and len(f["workflow"]) <= 2000))
            and (f.get("turn") is None or (isinstance(f["turn"], int) and not isinstance(f["turn"], bool))))


def _artifact(cat: Catalog, f: dict) -> str:
    art = f.get("artifact") if isinstance(f.get("artifact"), dict) else {}
    name = art.get("name") if isinstance(art.get("name"), str) else f["artifact_sha256"][:12]
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


def merge_community(cat: Catalog, data: dict, url: str) -> dict[str, int]:
    counts = {"added": 0, "updated": 0, "unchanged": 0, "skipped": 0, "local_alongside": 0}
    source = f"{COMMUNITY}:{urlparse(url).netloc or url}"
    local = {(f["artifact"], f["machine_class"], f["runtime"], f["n_ctx"], f.get("workflow")) for f in cat.fits
             if f.get("origin") != COMMUNITY and f.get("budget_bytes") is None}
    index = {(f["artifact"], f["machine_class"], f["runtime"], f["n_ctx"], f.get("workflow")): f for f in cat.fits
             if f.get("origin") == COMMUNITY}
    for f in data.get("fits", []):
        if not _entry_ok(f):
            counts["skipped"] += 1
            continue
        if f.get("turn") is not None:
            continue  # one turn of a session: the session's own entry carries its verdict
        aid = _artifact(cat, f)
        decode, ttft, peak = _median(f.get("decode_tok_s")), _median(f.get("ttft_s")), _median(f.get("peak_rss_bytes"))
        prompt = _median(f.get("prompt_tokens"))
        band = _band(f.get("decode_tok_s"))
        entry = {
            "artifact": aid, "machine_class": f["machine_class"], "runtime": f["runtime"], "options": COMMUNITY,
            "n_ctx": f["n_ctx"], "prompt_tokens": int(prompt) if prompt is not None else None, "budget_bytes": None,
            "fit_class": f["fit_class"],
            "fit_reason": (f"community: {f.get('samples', 0)} sample(s) from {f.get('machines', 0)} machine(s)"
                           + (f", decode {decode:,.1f} tok/s (IQR {band[0]:,.1f}-{band[1]:,.1f})"
                              if decode is not None and band else "")),
            "peak_rss_bytes": int(peak) if peak is not None else None,
            "decode_tok_s": round(decode, 4) if decode is not None else None,
            "ttft_s": round(ttft, 4) if ttft is not None else None,
            "runtime_version": ", ".join(str(v)[:32] for v in (f.get("runtime_versions") or [])[:5]
                                         if isinstance(v, str)) or None,
            "measured_at": str(f.get("last_measured") or "")[:40],
            "source": source, "origin": COMMUNITY,
            "samples": f.get("samples", 0), "machines": f.get("machines", 0),
            "spread": {k: b for k in ("decode_tok_s", "ttft_s", "peak_rss_bytes") if (b := _band(f.get(k)))},
            "count": f.get("runs", f.get("samples", 0)) if isinstance(f.get("runs"), int) else f.get("samples", 0),
        }
        if f.get("workflow") is not None:
            entry["workflow"] = f["workflow"]
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
