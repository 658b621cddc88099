"""Strip what identifies a person from result rows, keep what makes them comparable.

Only the columns on the published list (harness/share/allowlist.py, documented in
docs/shared-columns.md) leave the machine, each by its treatment there. Free text goes
through ``scrub_text``: the home folder becomes ``~``, paths (spaces, Windows and ``~``
paths included) are cut to their last component, URLs, e-mail addresses, IP addresses,
token-like strings and serials are replaced, and the host, user and real names are cut
out whatever their case. Ids are re-derived with keyed hashes (HMAC-SHA256) under this
install's random salt, kept in the config folder next to the submitter token: the
upstream ids cannot be computed from a results file shared elsewhere, nor the run's
start second read back from its run id.
"""

from __future__ import annotations

import getpass
import hashlib
import hmac
import json
import math
import os
import re
import socket
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from harness.share import allowlist as al
from harness.userconfig import install_secret

SALT_NAME = "upstream-salt"  # the install's secret salt, in the config folder next to the token
MAX_TEXT = 500  # free text (errors, reasons) is cut to this many characters

# A path component may hold spaces (not at its ends); the last one (the file name) is kept.
_SEG = r"[^\s/\\'\"<>|:;,()\[\]{}](?:[^/\\'\"<>|:;,()\[\]{}\n]*[^\s/\\'\"<>|:;,()\[\]{}])?"
_LAST = r"([^\s/\\'\"<>|:;,()\[\]{}]*)"
# /a/b c/d.gguf, ~/a/d.gguf, ~alice/a/d.gguf -> d.gguf
_POSIX_PATH = re.compile(rf"(?:(?<![\w.])~[\w.-]*|(?<![\w.~/\\]))/(?:{_SEG}/)+{_LAST}")
# C:\a\b c\d.gguf, C:/a/d.gguf, \\server\share\d.gguf -> d.gguf
_WIN_PATH = re.compile(rf"(?:\b[A-Za-z]:[\\/]+|\\{{2,}})(?:{_SEG}[\\/]+)+{_LAST}")  # doubled \\ too: JSON text
_URL = re.compile(r"\b[a-z][a-z0-9+.-]{1,15}://[^\s'\"<>]+", re.I)
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.])")
_SERIAL = re.compile(r"\b(?:GPU-[0-9a-fA-F-]{20,}|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})\b")
# API keys and tokens: the well-known prefixes, and any unbroken run of 24+ letters and digits that mixes
# upper case, lower case and digits (model names break their runs with - . _, hex digests have no upper case)
_SECRET = re.compile(r"\b(?:(?:ghp|gho|ghu|ghs|ghr|github_pat|glpat|hf|sk|pk|rk|xox[abposr]|npm|pypi)[-_][\w-]{12,}"
                     r"|AKIA[0-9A-Z]{16}|fbt1\.[\w-]+\.[\w-]+"
                     r"|(?=[A-Za-z0-9+/]*[A-Z])(?=[A-Za-z0-9+/]*[a-z])(?=[A-Za-z0-9+/]*[0-9])[A-Za-z0-9+/]{24,}={0,2})"
                     r"(?![\w-])")
_BUILTIN_TEXT = re.compile(r"^stdlib-docstrings-v\d+-py\d+\.\d+$")


@dataclass
class Identity:
    """What must not leave the machine, found once: the words to cut, and the salt that keys the ids."""
    words: list[str] = field(default_factory=list)
    salt: str | None = None  # None: this install's salt, made on first use (harness/userconfig.py)

    @classmethod
    def here(cls) -> "Identity":
        words = set()
        for get in (socket.gethostname, getpass.getuser, socket.getfqdn, lambda: Path.home().name, _real_name):
            try:
                value = get() or ""
            except Exception:  # no user name in a container is normal
                continue
            if value.lower() in ("localhost", "root", "localhost.localdomain"):
                continue
            words.add(value)
            words.update(value.split(".")[:1] + value.split())
        return cls(_longest_first(words))

    def key(self) -> bytes:
        if self.salt is None:
            self.salt = install_secret(SALT_NAME)
        return self.salt.encode()


def _real_name() -> str:
    import pwd  # not on Windows: the caller skips it

    return pwd.getpwuid(os.getuid()).pw_gecos.split(",")[0]


def _longest_first(words) -> list[str]:
    return sorted({w.strip() for w in words if len(w.strip()) >= 3}, key=lambda w: (-len(w), w))


@dataclass
class Report:
    """What was changed, for the consent summary."""
    paths: int = 0
    identity_hits: int = 0
    serials: int = 0
    secrets: int = 0
    truncated: int = 0
    dropped_values: int = 0  # codes not in their published form, not sent
    columns_not_sent: set[str] = field(default_factory=set)

    def lines(self) -> list[str]:
        return [f"paths cut to file names: {self.paths}", f"host/user names removed: {self.identity_hits}",
                f"serial numbers removed: {self.serials}",
                f"addresses, e-mails and token-like strings removed: {self.secrets}",
                f"values not in their published form left out: {self.dropped_values}",
                f"long texts shortened: {self.truncated}"]


def keyed(ident: Identity, kind: str, value: str) -> str:
    """HMAC-SHA256 of ``value`` under the install's salt: stable here, uncomputable elsewhere."""
    return hmac.new(ident.key(), f"{kind}|{value}".encode(), hashlib.sha256).hexdigest()


def upstream_machine_id(local_id: str, ident: Identity | None = None) -> str:
    return keyed(ident or Identity(), "machine", local_id)[:16]


def upstream_run_id(run_id: str, ident: Identity) -> str:
    return "u1-" + keyed(ident, "run", run_id)[:24]


def _words_pattern(ident: Identity, bounded: bool) -> re.Pattern | None:
    if not ident.words:
        return None
    alternatives = "|".join(re.escape(w) for w in ident.words)
    return re.compile(rf"(?<![A-Za-z0-9])(?:{alternatives})(?![A-Za-z0-9])" if bounded else f"(?:{alternatives})",
                      re.I)


def _home_pattern() -> re.Pattern | None:
    home = str(Path.home())
    return re.compile(re.escape(home), re.I) if len(home) > 1 else None


def scrub_text(text: str, ident: Identity, report: Report) -> str:
    if (home := _home_pattern()) is not None:
        text, n = home.subn("~", text)
        report.paths += n
    for pattern, mark in ((_URL, "<url>"), (_EMAIL, "<email>"), (_SECRET, "<secret>"), (_IPV4, "<ip>")):
        text, n = pattern.subn(mark, text)
        report.secrets += n
    text, n = _WIN_PATH.subn(lambda m: m.group(1) or "<dir>", text)
    text, m = _POSIX_PATH.subn(lambda m: m.group(1) or "<dir>", text)
    report.paths += n + m
    text, s = _SERIAL.subn("<serial>", text)
    report.serials += s
    if (words := _words_pattern(ident, bounded=False)) is not None:  # any case, inside longer words too
        text, n = words.subn("<redacted>", text)
        report.identity_hits += n
    if len(text) > MAX_TEXT:
        text, report.truncated = text[:MAX_TEXT - 1] + "…", report.truncated + 1
    return text


def scrub_json(text: str, ident: Identity, report: Report) -> str:
    """Every key and string of a JSON document through the scrubber; text that is not JSON, as text."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return scrub_text(text, ident, report)

    def walk(value: Any) -> Any:
        if isinstance(value, str):
            return scrub_text(value, ident, report)
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, dict):
            return {scrub_text(str(k), ident, report): walk(v) for k, v in value.items()}
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value

    clean = walk(doc)
    return text if clean == doc else json.dumps(clean, sort_keys=True)


def is_code(value: str, ident: Identity) -> bool:
    """A short machine-made word that names no one and holds no secret."""
    if not al.CODE_FORM.match(value):
        return False
    words = _words_pattern(ident, bounded=True)
    return not ((words and words.search(value)) or _SECRET.search(value) or _EMAIL.search(value)
                or _SERIAL.search(value) or _IPV4.search(value) or "://" in value)


def coarse_os(text: str | None) -> str | None:
    if not text:
        return text
    match = re.match(r"^(\S+)\s+(\d+)\.(\d+)", text)
    return f"{match.group(1)} {match.group(2)}.{match.group(3)}" if match else text.split()[0]


def coarse_time(value: Any) -> Any:
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    if isinstance(value, datetime):
        return value.replace(minute=0, second=0, microsecond=0).isoformat()
    return None


def file_name(value: str, ident: Identity, report: Report) -> str:
    name = value.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    if name != value:
        report.paths += 1
    return scrub_text(name, ident, report)


def treat(shared: al.Shared, value: Any, ident: Identity, report: Report) -> Any:
    """One value as its column's treatment sends it (None: not sent)."""
    kind = shared.treatment
    if value is None:
        return None
    if kind == al.TIME:
        return coarse_time(value)
    if not isinstance(value, str):  # numbers and true/false are what the table is made of
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value if isinstance(value, (bool, int, float)) else None
    if kind == al.KEEP:  # a text where a number belongs
        report.dropped_values += 1
        return None
    if kind == al.TEXT:
        return scrub_text(value, ident, report)
    if kind == al.JSON:
        return scrub_json(value, ident, report)
    if kind == al.HASH:
        return value if al.HASH_FORM.match(value) else keyed(ident, "hash", value)
    if kind == al.RUN_ID:
        return upstream_run_id(value, ident)
    if kind == al.MACHINE_ID:
        return upstream_machine_id(value, ident)
    if kind == al.FILE_NAME:
        return file_name(value, ident, report)
    if kind == al.TIME:
        return coarse_time(value)
    if kind == al.QUALITY_TEXT:
        return value if _BUILTIN_TEXT.match(value) else ("file" if value.startswith("file:") else None)
    if kind == al.OS:
        value = coarse_os(value) or ""
    if kind in (al.CODE, al.OS) and is_code(value, ident):
        return value
    report.dropped_values += 1  # a code that is not one, or a text where a number belongs
    return None


def anonymise_row(row: dict, ident: Identity, report: Report) -> dict:
    """The row as it may leave the machine: allow-listed columns only, each by its treatment."""
    out = {}
    for name, value in row.items():
        shared = al.SHARED_RESULT_COLUMNS.get(name)
        if shared is None:
            if value is not None:
                report.columns_not_sent.add(name)
            continue
        out[name] = treat(shared, value, ident, report)
    if out.get("artifact_path") is not None:  # a path is sent as the artifact's file name, never more
        out["artifact_path"] = out.get("artifact_name")
    return out


def anonymise_timeline(timeline: dict[str, list], ident: Identity, report: Report) -> dict[str, list]:
    """Timeline columns on the list, each by its treatment (text columns hold few distinct values: each once)."""
    out: dict[str, list] = {}
    for name, values in timeline.items():
        shared = al.SHARED_TIMELINE_COLUMNS.get(name)
        if shared is None:
            report.columns_not_sent.add(f"timeline.{name}")
            continue
        if shared.treatment == al.KEEP:
            out[name] = [v if not isinstance(v, str) else None for v in values]
            continue
        seen: dict[Any, Any] = {}
        out[name] = [seen[v] if v in seen else seen.setdefault(v, treat(shared, v, ident, report)) for v in values]
    return out


def leaks(rows: list[dict], ident: Identity) -> list[str]:
    """Last look before anything is sent: identifying words still in a text value (hashed ids excepted)."""
    found = set()
    words = _words_pattern(ident, bounded=True)
    home = _home_pattern()
    hashed = (al.HASH, al.RUN_ID, al.MACHINE_ID)
    for row in rows:
        for name, value in row.items():
            shared = al.SHARED_RESULT_COLUMNS.get(name)
            if not isinstance(value, str) or (shared and shared.treatment in hashed):
                continue
            if words is not None:
                found.update(f"{m.group(0)!r} in {name}" for m in words.finditer(value))
            if home is not None and home.search(value):
                found.add(f"home folder in {name}")
    return sorted(found)


def environment_identity() -> Identity:
    ident = Identity.here()
    extra = os.environ.get("FITBENCH_REDACT", "")  # more words to cut, comma separated (e.g. a project name)
    ident.words = _longest_first(set(ident.words) | {w.strip() for w in extra.split(",")})
    return ident
