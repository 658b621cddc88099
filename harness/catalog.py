"""The catalog: a human-readable, diffable YAML file of artifacts and their measured fits.

    artifacts:            id -> what the artifact is (from its own metadata)
    fits:                 one entry per (artifact, machine class, runtime, options,
                          context, prompt length, budget): the latest verdict and
                          figures, with every run id that measured it

Folding results in is idempotent: a run already listed under an entry is
skipped; a newer measurement of the same key replaces the figures and adds
its run id (so ``count`` says how many runs agree on the key); an older one
only adds its run id. Writes are atomic. A catalog that cannot be read is an
error, never silently replaced.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.errors import FitbenchError
from harness.fit import ORDER, Thresholds, judged_peak, memory_verdict, worst

CATALOG_VERSION = 1
DEFAULT_CATALOG = Path("catalog.yaml")
# "workflow" (a multi-turn session's shape) is absent for single-turn fits, so older entries keep their keys.
KEY_FIELDS = ("artifact", "machine_class", "runtime", "options", "n_ctx", "prompt_tokens", "budget_bytes", "workflow")


def default_catalog_path(near: Path | None = None) -> Path:
    """$FITBENCH_CATALOG, else catalog.yaml in the cwd, else next to (or above) ``near``."""
    if os.environ.get("FITBENCH_CATALOG"):
        return Path(os.environ["FITBENCH_CATALOG"])
    candidates = [DEFAULT_CATALOG] + ([near / "catalog.yaml", near.parent / "catalog.yaml"] if near else [])
    return next((c for c in candidates if c.exists()), DEFAULT_CATALOG)


class CatalogError(FitbenchError, ValueError):
    """The catalog file is unreadable or malformed; the message says where."""


@dataclass
class Catalog:
    path: Path
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)
    fits: list[dict[str, Any]] = field(default_factory=list)

    def artifact_id_for(self, sha256: str | None, name: str) -> str:
        for aid, art in self.artifacts.items():
            if sha256 and art.get("sha256") == sha256:
                return aid
        base = re.sub(r"[^a-z0-9]+", "-", Path(name).stem.lower()).strip("-") or "artifact"
        aid = base if base not in self.artifacts else f"{base}-{(sha256 or 'x')[:8]}"
        return aid

    def resolve(self, artifact_id: str) -> Path | None:
        art = self.artifacts.get(artifact_id)
        if art and art.get("path"):
            path = Path(art["path"])
            return path if path.is_absolute() else (self.path.parent / path).resolve()
        return None


def load_catalog(path: Path) -> Catalog:
    if not path.exists():
        return Catalog(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise CatalogError(f"{path}: malformed YAML{where}; fix it or move it aside (it is never overwritten)") from None
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read: {exc.strerror}") from None
    if data is None:
        return Catalog(path)
    if not isinstance(data, dict):
        raise CatalogError(f"{path}: a catalog is a mapping with 'artifacts' and 'fits'")
    version = data.get("catalog_version", CATALOG_VERSION)
    if version != CATALOG_VERSION:
        raise CatalogError(f"{path}: catalog_version {version!r} is not {CATALOG_VERSION}; upgrade fitbench")
    artifacts = data.get("artifacts") or {}
    fits = data.get("fits") or []
    if not isinstance(artifacts, dict) or not all(isinstance(v, dict) for v in artifacts.values()):
        raise CatalogError(f"{path}: 'artifacts' must map ids to mappings")
    if not isinstance(fits, list) or not all(isinstance(f, dict) for f in fits):
        raise CatalogError(f"{path}: 'fits' must be a list of mappings")
    for i, entry in enumerate(fits):
        missing = [k for k in ("artifact", "machine_class", "runtime", "n_ctx") if k not in entry]
        if missing:
            raise CatalogError(f"{path}: fits[{i}] lacks {', '.join(missing)}")
        if entry["artifact"] not in artifacts:
            raise CatalogError(f"{path}: fits[{i}] names artifact {entry['artifact']!r}, which is not under 'artifacts'")
        if isinstance(entry["n_ctx"], bool) or not isinstance(entry["n_ctx"], int) or entry["n_ctx"] < 1:
            raise CatalogError(f"{path}: fits[{i}] has n_ctx {entry['n_ctx']!r}; it is a positive whole number")
        if entry.get("fit_class") not in ORDER:
            raise CatalogError(f"{path}: fits[{i}] has fit_class {entry.get('fit_class')!r}; "
                               f"it is one of {', '.join(ORDER)}")
    return Catalog(path, dict(artifacts), list(fits))


def save_catalog(cat: Catalog) -> None:
    data = {
        "catalog_version": CATALOG_VERSION,
        "artifacts": {k: cat.artifacts[k] for k in sorted(cat.artifacts)},
        "fits": sorted(cat.fits, key=lambda f: tuple(str(f.get(k)) for k in ("artifact", "machine_class", "runtime",
                                                                                "options", "budget_bytes"))
                       + (f.get("n_ctx") or 0, f.get("prompt_tokens") or 0)),
    }
    text = ("# fitbench catalog: artifacts and measured fits. Written by `fitbench catalog update`;\n"
            "# safe to review and diff. Sizes in bytes, speeds in tokens per second, times in seconds.\n")
    text += yaml.safe_dump(data, sort_keys=False, width=120)
    cat.path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cat.path.parent, prefix=f".{cat.path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, cat.path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _key(entry: dict) -> tuple:
    return tuple(entry.get(k) for k in KEY_FIELDS)


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None and v == v]
    return float(statistics.median(values)) if values else None


def update_catalog(cat: Catalog, results: list[tuple[str, list[dict]]]) -> dict[str, int]:
    """Fold result rows (per source file) into the catalog; returns counts of what changed."""
    counts = {"added": 0, "updated": 0, "unchanged": 0, "skipped": 0}
    index = {_key(f): f for f in cat.fits}
    for source, rows in results:
        cases: dict[tuple, list[dict]] = {}
        for row in rows:
            if row.get("turn") is not None:
                continue  # a workflow's turn rows: its case-level rows carry the session's verdict
            if (row.get("parallel") or 1) > 1:
                counts["skipped"] += 1  # N users at once is a serving answer, not one user's fit
                continue
            if row.get("fit_class") is None and row.get("status") == "ok":
                counts["skipped"] += 1  # written before fit classes existed
                continue
            cases.setdefault((row.get("run_id"), row.get("case_key")), []).append(row)
        for (run_id, _), case_rows in cases.items():
            first = case_rows[0]
            verdict = worst([r.get("fit_class") for r in case_rows])
            if verdict is None:
                counts["skipped"] += 1
                continue
            aid = _ensure_artifact(cat, first)
            ok = [r for r in case_rows if r.get("status") == "ok"]
            budget = first.get("budget_bytes") if _set_budget(first) else None
            entry = {
                "artifact": aid,
                "machine_class": first.get("machine_class"),
                "runtime": first.get("runtime"),
                "options": first.get("options_json") or "{}",
                "n_ctx": first.get("n_ctx"),
                "prompt_tokens": first.get("prompt_tokens"),
                "budget_bytes": budget,
                "fit_class": verdict,
                "fit_reason": next((r.get("fit_reason") for r in case_rows if r.get("fit_class") == verdict), None),
                # the peak the verdict was judged on (load peak and VmHWM included), not only the sampled one
                "peak_rss_bytes": max((judged_peak(r) or 0 for r in case_rows), default=None) or None,
                "decode_tok_s": _round(_median([r.get("decode_tok_s") for r in ok])),
                "ttft_s": _round(_median([r.get("ttft_s") for r in ok])),
                **quality_entry(case_rows),
                "runtime_version": first.get("runtime_version"),
                "measured_at": str(max(r.get("started_at") for r in case_rows)),
                "source": Path(source).name,
                "runs": [run_id],
                "count": 1,
            }
            if first.get("workflow_json"):
                entry["workflow"] = first["workflow_json"]
            existing = index.get(_key(entry))
            if existing is None:
                cat.fits.append(entry)
                index[_key(entry)] = entry
                counts["added"] += 1
            elif run_id in existing.get("runs", []):
                counts["unchanged"] += 1
            else:
                runs = sorted(set(existing.get("runs", [])) | {run_id})
                if entry["measured_at"] >= str(existing.get("measured_at", "")):
                    existing.update(entry)
                existing["runs"], existing["count"] = runs, len(runs)
                counts["updated"] += 1
    return counts


def quality_entry(rows: list[dict]) -> dict:
    """The quality figures of a case (null when it had no probe), and which text they were measured on."""
    row = next((r for r in rows if r.get("quality_text_sha256")), None)
    if row is None:
        return {}
    entry = {
        "quality_text": f"{row.get('quality_text_id')}@{row['quality_text_sha256'][:12]}",
        "quality_ppl": _round(row.get("quality_ppl")),
        "quality_reference": row.get("quality_reference"),
        "quality_kl": _round(row.get("quality_kl_mean")),
        "quality_top1": _round(row.get("quality_top1_agree")),
        "task_pass_rate": _round(row.get("task_pass_rate")),
    }
    return {k: v for k, v in entry.items() if v is not None}


def _relative_path(cat: Catalog, path: str | None) -> str | None:
    """Paths inside the catalog's own tree are kept relative, so a cloned repo's catalog still resolves."""
    if not path:
        return None
    root = cat.path.parent.resolve()
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return path


def _set_budget(row: dict) -> bool:
    """A budget counts as part of the key only if it was asked for (not just the machine's RAM)."""
    return row.get("budget_bytes") is not None and row.get("budget_bytes") != row.get("ram_bytes")


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _ensure_artifact(cat: Catalog, row: dict) -> str:
    aid = cat.artifact_id_for(row.get("artifact_sha256"), row.get("artifact_name") or "artifact")
    if aid not in cat.artifacts:
        cat.artifacts[aid] = {
            "family": re.split(r"[-_.]", (row.get("artifact_name") or aid))[0].lower(),
            "format": row.get("artifact_format"),
            "quant": row.get("artifact_quant"),
            "architecture": row.get("artifact_arch"),
            "size_bytes": row.get("artifact_size_bytes"),
            "sha256": row.get("artifact_sha256"),
            "n_params": row.get("artifact_n_params"),
            "n_layers": row.get("artifact_n_layers"),
            "n_heads": row.get("artifact_n_heads"),
            "n_kv_heads": row.get("artifact_n_kv_heads"),
            "head_dim": row.get("artifact_head_dim"),
            "context_length": row.get("artifact_context_length"),
            "path": _relative_path(cat, row.get("artifact_path")),
        }
        cat.artifacts[aid] = {k: v for k, v in cat.artifacts[aid].items() if v is not None}
    return aid


def query(cat: Catalog, machine_class: str | None = None, context: int | None = None,
          budget_bytes: int | None = None, headroom: float = Thresholds.headroom) -> list[dict]:
    """Entries for a machine class; with ``context``, per artifact/runtime/options the smallest
    measured context at or above it; with ``budget_bytes``, the verdict against that budget too:
    the measured class made no better than fit.memory_verdict of its peak (``headroom`` is the
    Thresholds' margin)."""
    entries = [f for f in cat.fits if machine_class is None or f.get("machine_class") == machine_class]
    if context is not None:
        best: dict[tuple, dict] = {}
        for f in entries:
            if (f.get("n_ctx") or 0) < context:
                continue
            k = (f["artifact"], f["runtime"], f.get("options"), f.get("budget_bytes"))
            if k not in best or f["n_ctx"] < best[k]["n_ctx"]:
                best[k] = f
        entries = list(best.values())
    out = []
    for f in entries:
        row = dict(f)
        if budget_bytes is not None:
            memory = memory_verdict(f.get("peak_rss_bytes"), budget_bytes, headroom)
            row["budget_verdict"] = worst([memory.fit_class, f.get("fit_class")])
            if memory.reason:
                row["budget_reason"] = memory.reason
        out.append(row)
    return sorted(out, key=lambda r: (ORDER.index(r.get("budget_verdict") or r["fit_class"]), r["artifact"], r["n_ctx"]))


def options_label(options_json: str | None) -> str:
    try:
        opts = json.loads(options_json or "{}")
    except json.JSONDecodeError:
        return options_json or ""
    opts.pop("n_threads", None)
    return ",".join(f"{k}={v}" for k, v in sorted(opts.items())) or "-"
