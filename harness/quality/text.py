"""The evaluation text for the quality probe: already on every machine, or the user's own.

No network and no copied corpus: by default the text is assembled from the
Python standard library's own docstrings, deterministically (a pinned
module list, names sorted, a fixed length in characters). Docstrings change
between Python versions, so the text id names the Python minor version and
every row records the text's sha256: two quality numbers are comparable when
their ``quality_text_sha256`` match, whatever machine measured them.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path

from harness.errors import FitbenchError

# Pure-Python modules with prose docstrings, present in every CPython build
# (no platform-only modules). Changing this list changes the text: bump TEXT_VERSION.
STDLIB_MODULES = (
    "argparse", "base64", "bisect", "calendar", "collections", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "enum", "fnmatch", "fractions", "functools", "glob", "gzip", "heapq",
    "hmac", "html", "http.client", "imaplib", "inspect", "ipaddress", "json", "logging", "mailbox",
    "pathlib", "pickle", "pprint", "queue", "random", "sched", "secrets", "shlex", "shutil", "smtplib",
    "statistics", "string", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize",
    "traceback", "urllib.parse", "uuid", "warnings", "wave", "weakref", "zipfile",
)
TEXT_VERSION = 1
STDLIB_CHARS = 200_000  # far more than any scoring needs; the token count cuts it further


class EvalTextError(FitbenchError, ValueError):
    """The user's evaluation text cannot be used."""


@dataclass(frozen=True)
class EvalText:
    text_id: str  # e.g. stdlib-docstrings-v1-py3.11, or file:NAME
    sha256: str
    text: str


def stdlib_text(chars: int = STDLIB_CHARS) -> EvalText:
    modules = [importlib.import_module(name) for name in STDLIB_MODULES]
    # Every module's own docstring first (varied prose even in a short prefix), then the members'.
    parts = [inspect.cleandoc(m.__doc__) for m in modules if m.__doc__]
    for module in modules:
        parts.extend(_member_docs(module))
    text = "\n\n".join(parts)[:chars]
    version = f"py{sys.version_info.major}.{sys.version_info.minor}"
    return EvalText(f"stdlib-docstrings-v{TEXT_VERSION}-{version}", _sha(text), text)


def _member_docs(module) -> list[str]:
    """Docstrings of a module's public classes and functions (and their methods), by sorted name."""
    docs: list[str] = []
    for name in sorted(vars(module)):
        obj = vars(module)[name]
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if obj.__doc__:
            docs.append(inspect.cleandoc(obj.__doc__))
        if inspect.isclass(obj):
            for meth_name in sorted(vars(obj)):
                meth = vars(obj)[meth_name]
                if not meth_name.startswith("_") and inspect.isfunction(meth) and meth.__doc__:
                    docs.append(inspect.cleandoc(meth.__doc__))
    return docs


def file_text(path: Path) -> EvalText:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvalTextError(f"evaluation text {path} not found; give a UTF-8 text file or 'stdlib'") from None
    except UnicodeDecodeError:
        raise EvalTextError(f"evaluation text {path} is not UTF-8 text") from None
    except OSError as exc:
        raise EvalTextError(f"cannot read evaluation text {path}: {exc.strerror or exc}") from None
    if not text.strip():
        raise EvalTextError(f"evaluation text {path} is empty; give a file with some prose")
    return EvalText(f"file:{path.name}", _sha(text), text)


def load_eval_text(source: str, base_dir: Path | None = None) -> EvalText:
    """``stdlib`` (the default) or a path, relative to the scenario's folder first."""
    if source == "stdlib":
        return stdlib_text()
    path = Path(source).expanduser()
    if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
        path = base_dir / path
    return file_text(path)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
