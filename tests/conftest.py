"""Shared fixtures: the real sample model, a tiny valid GGUF for fake runners, scenario files."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

# Fake runners live in tests/ and are named in scenarios as "fake_runners:Class";
# spawned workers inherit sys.path, so they find them too.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def sample_model() -> Path:
    if not SAMPLE_MODEL.exists():
        pytest.fail(f"sample model missing at {SAMPLE_MODEL}: run `make sample-models` (or `make test`)")
    return SAMPLE_MODEL


def _gguf_string(s: str) -> bytes:
    data = s.encode()
    return struct.pack("<Q", len(data)) + data


def write_tiny_gguf(path: Path, context_length: int = 4096, **dims: int) -> Path:
    """A structurally valid GGUF with metadata and no tensors: enough for preflight checks.
    ``dims`` adds architecture numbers, e.g. embedding_length=8192, attention__head_count=64."""
    kv = [
        ("general.architecture", 8, _gguf_string("fake")),
        ("fake.context_length", 4, struct.pack("<I", context_length)),
        ("fake.block_count", 4, struct.pack("<I", dims.pop("block_count", 2))),
    ]
    kv += [(f"fake.{k.replace('__', '.')}", 4, struct.pack("<I", v)) for k, v in dims.items()]
    body = b"GGUF" + struct.pack("<IQQ", 3, 0, len(kv))
    for key, vtype, value in kv:
        body += _gguf_string(key) + struct.pack("<I", vtype) + value
    path.write_bytes(body)
    return path


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    return write_tiny_gguf(tmp_path / "tiny.gguf")


@pytest.fixture
def write_scenario(tmp_path: Path):
    """Write a scenario dict (or raw text) to a YAML file and return its path."""

    def _write(data, name: str = "scenario.yaml") -> Path:
        path = tmp_path / name
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
        return path

    return _write


@pytest.fixture(autouse=True, scope="session")
def _own_config_folder(tmp_path_factory):
    """Tests never read or write the user's ~/.config/fitbench (tokens, the install's salt and machine seed)."""
    import os

    before = os.environ.get("XDG_CONFIG_HOME")
    os.environ["XDG_CONFIG_HOME"] = str(tmp_path_factory.mktemp("xdg-config"))
    yield
    if before is None:
        os.environ.pop("XDG_CONFIG_HOME", None)
    else:
        os.environ["XDG_CONFIG_HOME"] = before
