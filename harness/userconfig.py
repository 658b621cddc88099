"""This user's fitbench folder (``$XDG_CONFIG_HOME/fitbench``) and the per-install secrets kept in it.

A secret is random, made once, written owner-only (0600) and never leaves the machine:
the upstream salt that keys the ids a bundle carries, and the machine seed used where the
OS gives no machine id. Nothing in a results file can be used to recompute either.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from harness.errors import FitbenchError


class ConfigError(FitbenchError):
    """The config folder cannot hold a secret (read-only home, a file in the way)."""


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "fitbench"


def install_secret(name: str) -> str:
    """The install's secret ``name`` (64 hex digits), made on first use; raises ConfigError if it cannot be kept."""
    path = config_dir() / name
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read this install's {name} ({exc.strerror or exc}); set XDG_CONFIG_HOME "
                          "to a folder of your own") from None
    else:
        if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
            return text
        raise ConfigError(f"{path}: not a fitbench {name} (64 hex digits); move it aside and a new one is made")
    value = secrets.token_hex(32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # a secret: owner only
        with os.fdopen(fd, "w") as fh:
            fh.write(value + "\n")
        try:
            os.link(tmp, path)  # never replace one another process made meanwhile: the first one wins
        except FileExistsError:
            tmp.unlink()
            return install_secret(name)
        except OSError:  # a file system without hard links
            os.replace(tmp, path)
        else:
            tmp.unlink()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot keep this install's {name} ({exc.strerror or exc}); set XDG_CONFIG_HOME "
                          "to a writable folder") from None
    return value
