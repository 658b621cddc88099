"""What an artifact is, read from the file itself: format, size, hash, architecture numbers.

GGUF headers are parsed here directly (using the ``gguf`` package's type
tables) rather than with ``gguf.GGUFReader``: the reader materialises every
vocabulary entry through numpy and takes seconds for a small model, while
walking the header takes milliseconds. The walk also proves the file is not
truncated: every tensor's data must lie inside the file.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

GGUF_MAGIC = b"GGUF"


class ArtifactError(ValueError):
    """The artifact is missing, unreadable, of an unknown format, or damaged."""


@dataclass
class ArtifactInfo:
    path: Path
    format: str
    size_bytes: int
    architecture: str | None = None
    quant: str | None = None
    n_params: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    embedding_length: int | None = None
    context_length: int | None = None
    head_dim: int | None = None
    vocab_size: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name


def inspect_artifact(path: Path) -> ArtifactInfo:
    """Identify and check an artifact; raise ArtifactError with a fix-it message."""
    if not path.exists():
        raise ArtifactError(f"artifact not found: {path}")
    if path.is_dir():
        return inspect_folder(path)
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ArtifactError(f"cannot read artifact {path}: {exc.strerror}") from exc
    if magic == GGUF_MAGIC:
        return _inspect_gguf(path)
    if path.suffix.lower() == ".gguf":
        raise ArtifactError(f"{path} is named .gguf but is not a GGUF file (bad magic {magic!r}); re-download or re-convert it")
    raise ArtifactError(f"{path}: unknown artifact format (expected a GGUF file)")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file; of a folder artifact, over its files' relative paths and their hashes."""
    if path.is_dir():
        digest = hashlib.sha256()
        for member in _folder_files(path):
            digest.update(f"{member.relative_to(path).as_posix()}\0{sha256_file(member, chunk)}\n".encode())
        return digest.hexdigest()
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# --- GGUF -----------------------------------------------------------------

# GGUF value types -> struct format of scalars (8 = string, 9 = array).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


# A header is untrusted input: counts and lengths are checked against the file
# size before anything is read or allocated, so a lying header costs nothing.
MAX_COUNT = 1 << 24  # tensors, metadata keys, array items, dimensions


class _Reader:
    def __init__(self, fh: BinaryIO, path: Path, size: int) -> None:
        self.fh, self.path, self.size = fh, path, size

    def count(self, n: int, what: str, min_bytes_each: int = 1) -> int:
        if n > MAX_COUNT or self.fh.tell() + n * min_bytes_each > self.size:
            raise ArtifactError(f"{self.path}: GGUF header claims {n:,} {what}, more than its {self.size:,} bytes "
                                "can hold: the file is truncated or damaged; re-download it")
        return n

    def take(self, n: int) -> bytes:
        if self.fh.tell() + n > self.size:
            raise ArtifactError(f"{self.path} is truncated inside its GGUF header; re-download it")
        data = self.fh.read(n)
        if len(data) != n:
            raise ArtifactError(f"{self.path} is truncated inside its GGUF header; re-download it")
        return data

    def scalar(self, fmt: str) -> Any:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.scalar("Q")).decode("utf-8", errors="replace")

    def value(self, vtype: int, keep: bool) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type = self.scalar("I")
            item_size = struct.calcsize(_SCALARS[item_type]) if item_type in _SCALARS else 8
            count = self.count(self.scalar("Q"), "array items", item_size)
            if item_type in _SCALARS and not keep:  # skip big arrays (vocabulary scores) unread
                self.fh.seek(count * item_size, 1)
                return count
            items = [self.value(item_type, keep) for _ in range(count)]
            return items if keep else count
        raise ArtifactError(f"{self.path}: unknown GGUF value type {vtype}; the file is damaged or newer than this fitbench")


def _inspect_gguf(path: Path) -> ArtifactInfo:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

    size = path.stat().st_size
    with path.open("rb") as fh:
        r = _Reader(fh, path, size)
        r.take(4)
        version = r.scalar("I")
        if version not in (2, 3):
            raise ArtifactError(f"{path}: unsupported GGUF version {version}")
        n_tensors = r.count(r.scalar("Q"), "tensors", 24)
        n_kv = r.count(r.scalar("Q"), "metadata keys", 12)
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string()
            vtype = r.scalar("I")
            meta[key] = r.value(vtype, keep=not key.startswith("tokenizer."))
        tensors = []
        for _ in range(n_tensors):
            name = r.string()
            dims = [r.scalar("Q") for _ in range(r.count(r.scalar("I"), "dimensions", 8))]
            ttype, offset = r.scalar("I"), r.scalar("Q")
            tensors.append((name, dims, ttype, offset))
        alignment = meta.get("general.alignment", 32)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or not 0 < alignment <= 1 << 20:
            raise ArtifactError(f"{path}: GGUF general.alignment {alignment!r} is not a sane alignment; the file is damaged")
        data_start = -(-fh.tell() // alignment) * alignment

    n_params = 0
    data_end = 0  # a GGUF without tensors (vocab-only) has no data section
    for name, dims, ttype, offset in tensors:
        n_elements = 1
        for d in dims:
            n_elements *= d
        n_params += n_elements
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        except (KeyError, ValueError):
            raise ArtifactError(f"{path}: tensor {name} has unknown type {ttype}; fitbench's gguf package may be too old") from None
        data_end = max(data_end, data_start + offset + n_elements // block * type_size)
    if data_end > size:
        raise ArtifactError(
            f"{path} is truncated: its tensors need {data_end:,} bytes but the file has {size:,}; re-download it"
        )

    arch = meta.get("general.architecture")
    def arch_key(k: str) -> Any:
        return meta.get(f"{arch}.{k}")

    quant = None
    if "general.file_type" in meta:
        try:
            quant = LlamaFileType(meta["general.file_type"]).name.removeprefix("MOSTLY_")
        except ValueError:
            quant = f"type{meta['general.file_type']}"
    heads = arch_key("attention.head_count")
    kv_heads = arch_key("attention.head_count_kv")
    small_meta = {k: v for k, v in meta.items() if not isinstance(v, list) and not k.startswith("tokenizer.")}
    embedding = arch_key("embedding_length")
    head_dim = arch_key("attention.key_length")
    if not isinstance(head_dim, int) and isinstance(heads, int) and isinstance(embedding, int) and heads:
        head_dim = embedding // heads
    vocab = arch_key("vocab_size") or meta.get("tokenizer.ggml.tokens")  # the token list's length
    return ArtifactInfo(
        path=path,
        format="gguf",
        size_bytes=size,
        architecture=arch,
        quant=quant,
        n_params=n_params,
        n_layers=arch_key("block_count"),
        n_heads=heads if isinstance(heads, int) else None,
        n_kv_heads=kv_heads if isinstance(kv_heads, int) else (heads if isinstance(heads, int) else None),
        embedding_length=embedding,
        context_length=arch_key("context_length"),
        head_dim=head_dim if isinstance(head_dim, int) else None,
        vocab_size=vocab if isinstance(vocab, int) else None,
        metadata=small_meta,
    )


# --- folders (Hugging Face checkpoints) ------------------------------------

def _folder_files(path: Path) -> list[Path]:
    """Regular files of a folder artifact, in a stable order; hidden files (caches, temp files) excluded."""
    return sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))


def inspect_folder(path: Path) -> ArtifactInfo:
    """A folder artifact: a Hugging Face checkpoint (config.json + safetensors) so far."""
    if (path / "config.json").is_file() and (any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))):
        return _inspect_hf(path)
    raise ArtifactError(f"artifact folder {path} is not a model fitbench knows "
                        "(a Hugging Face checkpoint needs config.json and *.safetensors)")


_SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                            "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _safetensors_params(path: Path) -> tuple[int, set[str]]:
    """Parameter count and element types from a safetensors header (8-byte length + JSON), without reading tensors."""
    import json

    size = path.stat().st_size
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ArtifactError(f"{path} is truncated (no safetensors header); re-download or re-convert it")
        n = struct.unpack("<Q", raw)[0]
        if n > min(size - 8, 100 << 20):
            raise ArtifactError(f"{path}: safetensors header claims {n:,} bytes; the file is truncated or damaged")
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            raise ArtifactError(f"{path}: safetensors header is not valid JSON; the file is damaged") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{path}: safetensors header is not a JSON object; the file is damaged")
    params, dtypes, data_end = 0, set(), 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            shape, offsets = t["shape"], t["data_offsets"]
            count = 1
            for d in shape:
                if not isinstance(d, int) or isinstance(d, bool) or d < 0:
                    raise ValueError(d)
                count *= d
            end = offsets[1]
            if not isinstance(end, int) or isinstance(end, bool) or end < 0:
                raise ValueError(end)
        except (TypeError, KeyError, IndexError, ValueError):
            raise ArtifactError(f"{path}: tensor {str(name)[:60]!r} has a malformed safetensors entry; the file is damaged") from None
        params += count
        dtypes.add(str(t.get("dtype"))[:16])
        data_end = max(data_end, end)
    if 8 + n + data_end > size:
        raise ArtifactError(f"{path} is truncated: its tensors need {8 + n + data_end:,} bytes but the file has {size:,}")
    return params, dtypes


def _inspect_hf(path: Path) -> ArtifactInfo:
    import json

    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}/config.json is not readable JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ArtifactError(f"{path}/config.json is not a JSON object")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config

    def num(*keys: str) -> int | None:
        for k in keys:
            v = text.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and 0 < v < 2**53:  # untrusted: sane positive sizes
                return v
        return None

    n_params, dtypes = 0, set()
    for shard in sorted(path.glob("*.safetensors")):
        p, d = _safetensors_params(shard)
        n_params += p
        dtypes |= d
    heads, embedding = num("num_attention_heads", "n_head"), num("hidden_size", "n_embd", "d_model")
    head_dim = num("head_dim") or (embedding // heads if heads and embedding else None)
    quant_cfg = config.get("quantization_config")
    if isinstance(quant_cfg, dict):
        quant = str(quant_cfg.get("quant_method") or "quantized")[:32]
    else:
        dtype = config.get("dtype") or config.get("torch_dtype")
        quant = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}.get(dtype if isinstance(dtype, str) else "") or (
            "/".join(sorted(dtypes)) if dtypes else None)
    return ArtifactInfo(
        path=path,
        format="hf",
        size_bytes=sum(p.stat().st_size for p in _folder_files(path)),
        architecture=config["model_type"][:64] if isinstance(config.get("model_type"), str) else None,
        quant=quant,
        n_params=n_params or None,
        n_layers=num("num_hidden_layers", "n_layer", "num_layers"),
        n_heads=heads,
        n_kv_heads=num("num_key_value_heads") or heads,
        embedding_length=embedding,
        context_length=num("max_position_embeddings", "n_positions"),
        head_dim=head_dim,
        vocab_size=num("vocab_size"),
        metadata={k: v for k, v in config.items() if isinstance(v, (str, float, bool)) or
                  (isinstance(v, int) and abs(v) < 2**53)},
    )
