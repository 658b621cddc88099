"""The contribution bundle: one JSON document, shared by `fitbench contribute` and the upstream server.

    {"bundle_version": 1, "schema_version": "1.1",
     "rows": [{result column: value, ...}, ...],          # anonymised result rows
     "timeline": {timeline column: [values...], ...},     # raw sampler samples, columnar
     "created_at": "...", "client": "fitbench 0.1.0",
     "token_id": "...", "signature": "<hex HMAC-SHA256>"}

What is *content* (rows, timeline, versions) is hashed canonically: sorted
keys, no whitespace, ASCII, no NaN. The content hash names the bundle and is
its idempotency key, so the same measurements sent twice, or with another
token, are one bundle. The signature covers the content hash and the token
id, so altering any row after signing, or re-attributing it, breaks it.

Validation here is structural (columns, types, sizes, schema version); the
server's plausibility rules live in harness/share/upstream/validate.py.

Both sides name a row and a case's samples the same way (``row_identity``,
``case_of``, ``timeline_cases``): a row by machine, run, case, repetition,
turn and configuration; a case's timeline by (run, machine id, machine
class, case), because the nodes of one fleet run share the run id, the case
keys and, often, the sample times.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import math
import re
import tarfile
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from harness.errors import FitbenchError
from harness.fit import ORDER
from harness.results import RESULT_COLUMNS, SCHEMA_VERSION, STATUSES, TIMELINE_COLUMNS

BUNDLE_VERSION = 1
CONTENT_KEYS = ("bundle_version", "schema_version", "rows", "timeline")
BUNDLE_MEMBER = "bundle.json"

# Caps that keep one bundle bounded; the server enforces them, the client checks first.
MAX_ROWS = 5_000
MAX_TIMELINE_SAMPLES = 500_000
MAX_STRING = 2_000  # characters in any one string value
MAX_BUNDLE_FILE = 64 * 2**20  # bytes of a bundle.tar.gz read from disk

REQUIRED_ROW = ("run_id", "case_key", "status", "machine_id", "machine_class", "runtime", "artifact_name",
                "artifact_sha256", "artifact_size_bytes", "n_ctx")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
MACHINE_CLASS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}$")
INT64 = (-(2**63), 2**63 - 1)


class BundleError(FitbenchError, ValueError):
    """The bundle is malformed; the message says what and where (one line)."""


def canonical(value: Any) -> bytes:
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()
    except ValueError as exc:
        raise BundleError(f"bundle has a value JSON cannot carry: {exc}") from None


def content_hash(doc: dict) -> str:
    return hashlib.sha256(canonical({k: doc.get(k) for k in CONTENT_KEYS})).hexdigest()


def signing_payload(doc: dict, digest: str | None = None) -> bytes:
    return f"fitbench-bundle-v{BUNDLE_VERSION}|{doc.get('token_id')}|{digest or content_hash(doc)}".encode()


def sign(doc: dict, token_id: str, secret: str) -> dict:
    signed = {**doc, "token_id": token_id}
    signed["signature"] = hmac.new(secret.encode(), signing_payload(signed), hashlib.sha256).hexdigest()
    return signed


def signature_ok(doc: dict, secret: str, digest: str | None = None) -> bool:
    given = doc.get("signature")
    if not isinstance(given, str):
        return False
    want = hmac.new(secret.encode(), signing_payload(doc, digest), hashlib.sha256).hexdigest()
    return hmac.compare_digest(given, want)


def json_value(value: Any) -> Any:
    """A Parquet cell as JSON carries it: timestamps as ISO text, NaN as null."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):  # numpy scalars
        return json_value(value.item())
    return value


# --- structural validation ---------------------------------------------------------------------------------

_CHECKS = {
    pa.string(): lambda v: isinstance(v, str),
    pa.int64(): lambda v: isinstance(v, int) and not isinstance(v, bool) and INT64[0] <= v <= INT64[1],
    pa.float64(): lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    pa.bool_(): lambda v: isinstance(v, bool),
}
_TYPE_WORDS = {pa.string(): "text", pa.int64(): "an integer", pa.float64(): "a finite number", pa.bool_(): "true/false"}


def _check_value(col, value: Any, where: str) -> None:
    if value is None:
        return
    if pa.types.is_timestamp(col.type):
        if not isinstance(value, str) or len(value) > 40:
            raise BundleError(f"{where}: {col.name} must be an ISO timestamp")
        try:
            datetime.fromisoformat(value)
        except ValueError:
            raise BundleError(f"{where}: {col.name} {value[:40]!r} is not an ISO timestamp") from None
        return
    if not _CHECKS[col.type](value):
        raise BundleError(f"{where}: {col.name} must be {_TYPE_WORDS[col.type]}, got {type(value).__name__}")
    if isinstance(value, str) and len(value) > MAX_STRING:
        raise BundleError(f"{where}: {col.name} is {len(value):,} characters; at most {MAX_STRING:,} are accepted")


def _version_tuple(text: Any) -> tuple[int, int]:
    if not isinstance(text, str) or not re.fullmatch(r"\d{1,4}\.\d{1,4}", text):
        raise BundleError(f"schema_version must look like MAJOR.MINOR, got {str(text)[:20]!r}")
    major, minor = text.split(".")
    return int(major), int(minor)


def validate(doc: Any) -> list[str]:
    """Check a bundle document's structure in place; returns notes (e.g. columns ignored). Raises BundleError."""
    if not isinstance(doc, dict):
        raise BundleError("a bundle is a JSON object with rows and timeline")
    if doc.get("bundle_version") != BUNDLE_VERSION:
        raise BundleError(f"bundle_version {str(doc.get('bundle_version'))[:20]!r} is not {BUNDLE_VERSION}; "
                          "upgrade fitbench")
    major, minor = _version_tuple(doc.get("schema_version"))
    ours = _version_tuple(SCHEMA_VERSION)
    if major != ours[0]:
        raise BundleError(f"schema_version {major}.{minor} is not readable here (this side reads {ours[0]}.x)")
    rows, timeline = doc.get("rows"), doc.get("timeline")
    if not isinstance(rows, list) or not rows:
        raise BundleError("rows must be a non-empty list")
    if len(rows) > MAX_ROWS:
        raise BundleError(f"{len(rows):,} rows in one bundle; at most {MAX_ROWS:,}: split the results")
    if not isinstance(timeline, dict):
        raise BundleError("timeline must be an object of columns")
    notes: list[str] = []
    known = {c.name: c for c in RESULT_COLUMNS}
    ignored: set[str] = set()
    for i, row in enumerate(rows):
        where = f"rows[{i}]"
        if not isinstance(row, dict):
            raise BundleError(f"{where} is not an object")
        for name, value in row.items():
            col = known.get(name)
            if col is None:
                if (major, minor) <= ours:  # a column this schema version must know
                    raise BundleError(f"{where}: column {str(name)[:60]!r} is not in schema {major}.{minor}")
                ignored.add(name)
                continue
            _check_value(col, value, where)
        missing = [k for k in REQUIRED_ROW if row.get(k) is None]
        if missing:
            raise BundleError(f"{where}: {', '.join(missing)} must be set")
        if row["status"] not in STATUSES:
            raise BundleError(f"{where}: status {row['status'][:30]!r} is not one of {', '.join(STATUSES)}")
        if row.get("fit_class") is not None and row["fit_class"] not in ORDER:
            raise BundleError(f"{where}: fit_class {row['fit_class'][:30]!r} is not one of {', '.join(ORDER)}")
        if not SHA256.match(row["artifact_sha256"]):
            raise BundleError(f"{where}: artifact_sha256 must be 64 lowercase hex digits")
        if not MACHINE_CLASS.match(row["machine_class"]):
            raise BundleError(f"{where}: machine_class {row['machine_class'][:40]!r} is not a machine class")
        if "/" in row["artifact_name"] or "\\" in row["artifact_name"]:
            raise BundleError(f"{where}: artifact_name must be a file name, not a path")
        if row.get("artifact_path") not in (None, row["artifact_name"]):
            raise BundleError(f"{where}: artifact_path must be stripped to the file name")
    if ignored:
        notes.append(f"columns newer than this schema ignored: {', '.join(sorted(ignored)[:10])}")
    _validate_timeline(timeline)
    return notes


def _validate_timeline(timeline: dict) -> None:
    known = {c.name: c for c in [*TIMELINE_COLUMNS, *BUNDLE_TIMELINE_COLUMNS]}
    length = None
    for name, values in timeline.items():
        col = known.get(name)
        if col is None:
            raise BundleError(f"timeline: column {str(name)[:60]!r} is not a timeline column")
        if not isinstance(values, list):
            raise BundleError(f"timeline.{name} must be a list")
        if length is None:
            length = len(values)
        elif len(values) != length:
            raise BundleError(f"timeline.{name} has {len(values):,} values, other columns {length:,}")
        if len(values) > MAX_TIMELINE_SAMPLES:
            raise BundleError(f"timeline has {len(values):,} samples; at most {MAX_TIMELINE_SAMPLES:,}")
        if not _column_ok(col.type, values):  # fast path failed: find the first bad value to name it
            check = _CHECKS[col.type]
            for j, value in enumerate(values):
                if value is not None and (not check(value) or (isinstance(value, str) and len(value) > 64)):
                    raise BundleError(f"timeline.{name}[{j}] must be {_TYPE_WORDS[col.type]}"
                                      + (" of at most 64 characters" if isinstance(value, str) else ""))
    if length and any(timeline.get(k) is None for k in ("run_id", "case_key", "t_s", "rss_bytes")):
        raise BundleError("timeline needs run_id, case_key, t_s and rss_bytes")


def _column_ok(kind: pa.DataType, values: list) -> bool:
    """A whole timeline column at C speed: its set of types, then its range (thousands of samples a case)."""
    types = set(map(type, values)) - {type(None)}
    present = [v for v in values if v is not None] if types else []
    if kind == pa.int64():
        return types <= {int} and (not present or (min(present) >= INT64[0] and max(present) <= INT64[1]))
    if kind == pa.float64():
        return types <= {int, float} and all(map(math.isfinite, present))
    if kind == pa.string():
        return types <= {str} and max(map(len, present), default=0) <= 64
    return types <= {bool}


# --- identities shared by the client and the server ----------------------------------------------------------

# Who took a case's samples is the machine and the class it ran as: the nodes of one fleet run share the run id,
# the case keys and often the sample times; two nodes on one machine (one agent per class) share the machine id.
# A bundle's timeline carries both (the results file's has machine_id only); the client attaches them per file.
BUNDLE_TIMELINE_COLUMNS = [c for c in RESULT_COLUMNS if c.name == "machine_class"]

# What tells one stored row from another: who measured, which run and case, which repetition and which turn
# of a workflow session (a session's turns share everything else), and the configuration the case key stands
# for (options, budget, workflow), so two configurations can never collapse into one row.
ROW_IDENTITY = ("machine_id", "machine_class", "run_id", "case_key", "repetition", "turn", "options_json",
                "budget_bytes", "workflow_json")


def row_identity(row: dict) -> tuple:
    return tuple(row.get(k) for k in ROW_IDENTITY)


def case_of(row: dict) -> tuple:
    """The case a row belongs to, as its timeline is keyed: (run_id, machine_id, machine_class, case_key)."""
    return row.get("run_id"), row.get("machine_id"), row.get("machine_class"), row.get("case_key")


def sample_owners(rows: list[dict], timeline: dict[str, list]) -> list[tuple]:
    """(machine_id, machine_class) of every timeline sample: its own columns where it has them (machine_id
    since schema 1.3, machine_class in bundles), else the one owner among the rows of its run and case
    (a file older than the column holds one machine's samples; each file of a fleet dataset is one node).
    (None, None) where no single owner is found."""
    n = len(timeline.get("t_s") or [])
    ids = timeline.get("machine_id") or [None] * n
    classes = timeline.get("machine_class") or [None] * n
    if all(ids) and all(classes):
        return list(zip(ids, classes))
    owners: dict[tuple, set] = defaultdict(set)
    for row in rows:
        owners[(row.get("run_id"), row.get("case_key"))].add((row.get("machine_id"), row.get("machine_class")))
    out = []
    for i, case in enumerate(zip(timeline.get("run_id") or [], timeline.get("case_key") or [])):
        mid, mc = ids[i], classes[i]
        if mid is None or mc is None:
            fit = [o for o in owners.get(case, ()) if mid in (None, o[0]) and mc in (None, o[1])]
            mid, mc = fit[0] if len(fit) == 1 else (None, None)
        out.append((mid, mc))
    return out[:n]


def with_owners(rows: list[dict], timeline: dict[str, list]) -> dict[str, list]:
    """The timeline with every sample's owner columns filled in (sample_owners)."""
    if not timeline:
        return timeline
    owners = sample_owners(rows, timeline)
    return {**timeline, "machine_id": [o[0] for o in owners], "machine_class": [o[1] for o in owners]}


def timeline_cases(rows: list[dict], timeline: dict[str, list]) -> dict[tuple, list[int]]:
    """Sample indices of each case, keyed like ``case_of``; machine None where no owner is known."""
    cases: dict[tuple, list[int]] = defaultdict(list)
    owners = sample_owners(rows, timeline)
    for i, (run_id, (mid, mc), case_key) in enumerate(zip(timeline.get("run_id") or [], owners,
                                                           timeline.get("case_key") or [])):
        cases[(run_id, mid, mc, case_key)].append(i)
    return dict(cases)


# --- bundle files ------------------------------------------------------------------------------------------

def write_bundle_file(doc: dict, path: Path) -> Path:
    """A .tar.gz with bundle.json (the exact document sent) and a README saying what it is."""
    data = json.dumps(doc, sort_keys=True, allow_nan=False).encode()
    readme = (f"fitbench contribution bundle\ncontent sha256: {content_hash(doc)}\nrows: {len(doc['rows'])}\n"
              f"submit with: fitbench contribute {path.name} --to URL\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for name, payload in ((BUNDLE_MEMBER, data), ("README.txt", readme)):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(payload), 0o644
            tar.addfile(info, io.BytesIO(payload))
    tmp.replace(path)
    return path


def read_bundle_file(path: Path) -> dict:
    try:
        if path.stat().st_size > MAX_BUNDLE_FILE:
            raise BundleError(f"{path}: larger than {MAX_BUNDLE_FILE // 2**20} MiB; not a fitbench bundle")
        with tarfile.open(path, "r:gz") as tar:
            member = tar.getmember(BUNDLE_MEMBER)
            if not member.isfile() or member.size > MAX_BUNDLE_FILE:
                raise BundleError(f"{path}: {BUNDLE_MEMBER} is not a plain file of sane size")
            raw = tar.extractfile(member).read()
        doc = json.loads(raw, parse_constant=_no_constants)
    except KeyError:
        raise BundleError(f"{path}: no {BUNDLE_MEMBER} inside; not a fitbench bundle") from None
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise BundleError(f"{path}: not a readable bundle.tar.gz ({exc})") from None
    except (ValueError, RecursionError) as exc:
        raise BundleError(f"{path}: {BUNDLE_MEMBER} is not valid JSON ({str(exc)[:100]})") from None
    return doc


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def parse_json(raw: bytes) -> Any:
    """JSON as the server accepts it: no NaN/Infinity, nesting bounded by the recursion limit."""
    return json.loads(raw, parse_constant=_no_constants)
