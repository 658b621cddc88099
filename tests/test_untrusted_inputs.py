"""Inputs from outside are untrusted: scenario YAML, GGUF headers, result files.

Property-based: whatever hypothesis throws at the readers, they either
accept it or raise their own one-line error type; never another exception,
never a hang (hypothesis' deadline bounds each example).
"""

from __future__ import annotations

import io
import struct
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.artifact import ArtifactError, inspect_artifact
from harness.results import ResultsError, read_results
from harness.scenario import ScenarioError, load_scenario, parse_scenario
from tests.conftest import write_tiny_gguf

FUZZ = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
COUNTS: dict[str, int] = {}


def survives(name: str, error: type[Exception], read, *args) -> None:
    """``read(*args)`` either succeeds or raises ``error`` with a one-line message; counts the try."""
    COUNTS[name] = COUNTS.get(name, 0) + 1
    try:
        read(*args)
    except error as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 500


scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                    st.text(max_size=20), st.sampled_from(["512", "8GiB", "none", "llama.cpp", "q8_0"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                      max_leaves=12)
field_names = st.sampled_from(["name", "models", "contexts", "fill", "prompt_tokens", "gen_tokens", "warmup",
                               "repetitions", "timeout", "sampler_interval_ms", "budget", "thresholds", "bogus"])


@FUZZ
@given(st.dictionaries(field_names, values, max_size=8), st.booleans())
def test_scenario_parser_never_crashes(tmp_path, data, with_model):
    if with_model:
        art = write_tiny_gguf(tmp_path / "t.gguf")
        data = {**data, "models": [{"artifact": str(art), "runtime": "llama.cpp", "options": data.get("bogus", {})}]}
    survives("scenario structures", ScenarioError, lambda: parse_scenario(data, source="fuzz.yaml").cases())


@FUZZ
@given(st.text(max_size=300))
def test_scenario_text_never_crashes(tmp_path, text):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    survives("scenario texts", ScenarioError, load_scenario, path)


def test_yaml_bomb_is_cheap(tmp_path):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))
    bomb += "models: *i\ncontexts: *i\n"
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb)
    t0 = time.monotonic()
    with pytest.raises(ScenarioError):
        load_scenario(path)
    assert time.monotonic() - t0 < 2


def test_huge_numbers_are_refused(tmp_path):
    art = write_tiny_gguf(tmp_path / "t.gguf")
    for field, value in [("contexts", [10**30]), ("gen_tokens", 10**12), ("repetitions", 10**9), ("timeout", 1e300)]:
        data = {"models": [{"artifact": str(art), "runtime": "llama.cpp"}], "contexts": [512], field: value}
        with pytest.raises(ScenarioError, match="at most|between"):
            parse_scenario(data)


def _gguf_with_tensor() -> bytes:
    """A small valid GGUF: metadata plus one f32 tensor of 8 elements."""
    out = io.BytesIO()
    kv = [("general.architecture", 8, "llama"), ("llama.block_count", 4, 1)]
    out.write(b"GGUF" + struct.pack("<IQQ", 3, 1, len(kv)))
    for key, vtype, value in kv:
        out.write(struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", vtype))
        out.write(struct.pack("<Q", len(value)) + value.encode() if vtype == 8 else struct.pack("<I", value))
    name = b"w"
    out.write(struct.pack("<Q", len(name)) + name + struct.pack("<I", 1) + struct.pack("<Q", 8)
              + struct.pack("<I", 0) + struct.pack("<Q", 0))
    pad = -out.tell() % 32
    out.write(b"\0" * pad + b"\0" * 32)
    return out.getvalue()


@FUZZ
@given(st.data())
def test_gguf_reader_survives_damage(tmp_path, data):
    good = _gguf_with_tensor()
    blob = bytearray(good)
    for _ in range(data.draw(st.integers(1, 6))):
        kind = data.draw(st.sampled_from(["flip", "cut", "big"]))
        if kind == "cut":
            del blob[data.draw(st.integers(4, len(blob))):]
        elif kind == "flip" and len(blob) > 4:
            i = data.draw(st.integers(4, len(blob) - 1))
            blob[i] = data.draw(st.integers(0, 255))
        elif len(blob) >= 16:  # a lying count or length: 8 bytes of 0xff somewhere
            i = data.draw(st.integers(4, len(blob) - 8))
            blob[i:i + 8] = b"\xff" * 8
    path = tmp_path / "f.gguf"
    path.write_bytes(bytes(blob))
    survives("damaged GGUF headers", ArtifactError, inspect_artifact, path)


def test_gguf_fixture_is_valid(tmp_path):
    path = tmp_path / "ok.gguf"
    path.write_bytes(_gguf_with_tensor())
    assert inspect_artifact(path).n_params == 8


@FUZZ
@given(st.binary(max_size=2000))
def test_results_reader_survives_garbage(tmp_path, blob):
    path = tmp_path / "r.parquet"
    path.write_bytes(blob)
    COUNTS["garbage result files"] = COUNTS.get("garbage result files", 0) + 1
    with pytest.raises(ResultsError):
        read_results(path)


def test_results_reader_survives_damaged_parquet(tmp_path):
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"x": list(range(100))}).replace_schema_metadata({b"fitbench.schema_version": b"1.1"}), good)
    data = good.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 5):
        bad = tmp_path / f"cut{cut}.parquet"
        bad.write_bytes(data[:cut])
        with pytest.raises(ResultsError):
            read_results(bad)


@FUZZ
@given(values, st.binary(max_size=200), st.booleans())
def test_hf_folder_reader_survives_damage(tmp_path, config, header, well_formed_length):
    """A Hugging Face folder is untrusted too: any config.json and any safetensors header."""
    import json

    folder = tmp_path / "hf"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, default=str))
    length = len(header) if well_formed_length else int.from_bytes(header[:8].ljust(8, b"\0"), "little")
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", length) + header)
    survives("damaged HF folders", ArtifactError, inspect_artifact, folder)


@FUZZ
@given(st.dictionaries(st.text(max_size=8), values, max_size=4))
def test_safetensors_header_entries_are_checked(tmp_path, header):
    import json

    folder = tmp_path / "hf2"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    raw = json.dumps(header, default=str).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    survives("damaged safetensors headers", ArtifactError, inspect_artifact, folder)


def test_report_fuzz_counts(capsys):
    """Runs last in this module: prints how many inputs the properties above tried."""
    with capsys.disabled():
        print(f"\nfuzzed inputs: {COUNTS}")
