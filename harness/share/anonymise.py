"""Strip what identifies a person from result rows, keep what makes them comparable.

Kept: machine class, CPU model and flags, core counts, RAM, GPU names,
runtime and versions, artifact file name, size and sha256, every figure.
Changed: the machine id is hashed again with an upstream salt (so upstream
ids cannot be joined with files shared elsewhere), paths become file names,
the host name, user name and home folder are cut out of every string, the
start time is rounded down to the hour and the OS to its kernel's major.minor.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import re
import socket
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

UPSTREAM_SALT = "fitbench-upstream-v1"
MAX_TEXT = 500  # free text (errors, reasons) is cut to this many characters

# /a/b/c.gguf or C:\a\b\c.gguf -> c.gguf (the last component survives; the folders may name a person)
_POSIX_PATH = re.compile(r"(?<![\w.~])(?:~|/)(?:[^\s'\"/:,;()\[\]{}]+/)+([^\s'\"/:,;()\[\]{}]*)")
_WIN_PATH = re.compile(r"\b[A-Za-z]:\\(?:[^\s'\"\\:,;()]+\\)+([^\s'\"\\:,;()]*)")
_SERIAL = re.compile(r"\b(?:GPU-[0-9a-fA-F-]{20,}|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})\b")
HASH_COLUMNS = ("run_id", "case_key", "artifact_sha256", "machine_id")
TEXT_COLUMNS = ("error", "fit_reason", "scenario", "model_label", "case_label", "energy_note", "options_json",
                "cpu_model", "gpu_names", "device", "kv_type", "n_ctx_meaning", "thresholds_json")


@dataclass
class Identity:
    """What must not leave the machine, found once."""
    words: list[str] = field(default_factory=list)

    @classmethod
    def here(cls) -> "Identity":
        words = set()
        for get in (socket.gethostname, getpass.getuser, lambda: socket.getfqdn()):
            try:
                value = get()
            except Exception:  # no user name in a container is normal
                continue
            if value and len(value) >= 3 and value not in ("localhost", "root"):
                words.add(value)
                words.add(value.split(".")[0])
        return cls(sorted((w for w in words if len(w) >= 3), key=len, reverse=True))


@dataclass
class Report:
    """What was changed, for the consent summary."""
    paths: int = 0
    identity_hits: int = 0
    serials: int = 0
    truncated: int = 0

    def lines(self) -> list[str]:
        return [f"paths cut to file names: {self.paths}", f"host/user names removed: {self.identity_hits}",
                f"serial numbers removed: {self.serials}", f"long texts shortened: {self.truncated}"]


def upstream_machine_id(local_id: str) -> str:
    return hashlib.sha256(f"{UPSTREAM_SALT}|{local_id}".encode()).hexdigest()[:16]


def scrub_text(text: str, ident: Identity, report: Report) -> str:
    home = str(Path.home())
    if len(home) > 1 and home in text:
        text = text.replace(home, "~")
        report.paths += 1
    text, n = _POSIX_PATH.subn(lambda m: m.group(1) or "<dir>", text)
    text, m = _WIN_PATH.subn(lambda m: m.group(1) or "<dir>", text)
    report.paths += n + m
    text, s = _SERIAL.subn("<serial>", text)
    report.serials += s
    for word in ident.words:
        if word in text:
            report.identity_hits += text.count(word)
            text = re.sub(re.escape(word), "<redacted>", text)
    if len(text) > MAX_TEXT:
        text, report.truncated = text[:MAX_TEXT - 1] + "…", report.truncated + 1
    return text


def coarse_os(text: str | None) -> str | None:
    if not text:
        return text
    match = re.match(r"^(\S+)\s+(\d+)\.(\d+)", text)
    return f"{match.group(1)} {match.group(2)}.{match.group(3)}" if match else text.split()[0]


def coarse_time(value: Any) -> Any:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if isinstance(value, datetime):
        return value.replace(minute=0, second=0, microsecond=0).isoformat()
    return value


def anonymise_row(row: dict, ident: Identity, report: Report) -> dict:
    out = dict(row)
    if out.get("artifact_path"):
        out["artifact_path"] = Path(str(out["artifact_path"]).replace("\\", "/")).name
        report.paths += 1
    if out.get("artifact_name"):
        out["artifact_name"] = Path(str(out["artifact_name"]).replace("\\", "/")).name
    if out.get("machine_id"):
        out["machine_id"] = upstream_machine_id(out["machine_id"])
    out["os"] = coarse_os(out.get("os"))
    out["started_at"] = coarse_time(out.get("started_at"))
    for name in TEXT_COLUMNS:
        if isinstance(out.get(name), str):
            out[name] = scrub_text(out[name], ident, report)
    return out


def leaks(rows: list[dict], ident: Identity) -> list[str]:
    """Last look before anything is sent: identifying words still in a text value (hashes excepted)."""
    found = set()
    home = str(Path.home())
    for row in rows:
        for name, value in row.items():
            if not isinstance(value, str) or name in HASH_COLUMNS:
                continue
            for word in ident.words:
                if re.search(rf"(?<![A-Za-z0-9]){re.escape(word)}(?![A-Za-z0-9])", value):
                    found.add(f"{word!r} in {name}")
            if len(home) > 1 and home in value:
                found.add(f"home folder in {name}")
    return sorted(found)


def environment_identity() -> Identity:
    ident = Identity.here()
    extra = os.environ.get("FITBENCH_REDACT", "")  # more words to cut, comma separated (e.g. a project name)
    ident.words = sorted(set(ident.words) | {w.strip() for w in extra.split(",") if len(w.strip()) >= 3},
                         key=len, reverse=True)
    return ident
