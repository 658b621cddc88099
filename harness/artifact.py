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

from harness.errors import FitbenchError
from harness.layout import Layout, from_config, from_gguf

GGUF_MAGIC = b"GGUF"


# The runner each artifact format runs in when none is named (bench, `run MODEL`, estimate).
FORMAT_RUNTIMES = {"gguf": "llama.cpp", "hf": "torch", "onnx": "onnxruntime", "mlx": "mlx"}


class ArtifactError(FitbenchError, ValueError):
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
    # sliding-window layers, experts, tied embeddings (harness.layout); None = all layers full, dense
    layout: Layout | None = None
    embedding_bytes: int | None = None  # GGUF: the token embedding matrix's bytes in the file
    # GGUF: bytes by ggml type (Q4_0, Q4_K, ...) of the weights a matrix product reads (2-D matrices,
    # 3-D expert stacks) with rows in multiples of 8, what llama.cpp's CPU repacking needs; embedding
    # lookups (token_embd, read by row) left out. harness.estimate decides which types get repacked.
    matmul_bytes: dict[str, int] = field(default_factory=dict)

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
    raise ArtifactError(f"{path}: unknown artifact format (expected a GGUF file, or a folder with "
                        "genai_config.json (ONNX) or config.json and safetensors (Hugging Face / MLX))")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file; for a folder artifact, of every file's relative path and sha256, sorted."""
    if path.is_dir():
        digest = hashlib.sha256()
        for file in folder_files(path):
            digest.update(f"{file.relative_to(path).as_posix()}\0{sha256_file(file, chunk)}\n".encode())
        return digest.hexdigest()
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def folder_files(path: Path) -> list[Path]:
    """The regular files of a folder artifact, sorted, hidden ones (.cache, .DS_Store) left out."""
    return sorted(p for p in path.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))


# --- folders: ONNX (onnxruntime-genai), MLX, Hugging Face ------------------

def inspect_folder(path: Path) -> ArtifactInfo:
    """A model folder: onnxruntime-genai (genai_config.json), MLX or Hugging Face (config.json)."""
    files = folder_files(path)
    size = sum(f.stat().st_size for f in files)
    if (path / "genai_config.json").is_file():
        return _inspect_onnx_folder(path, files, size)
    if (path / "config.json").is_file():
        return _inspect_safetensors_folder(path, files, size)
    raise ArtifactError(f"{path} is a folder without genai_config.json (ONNX) or config.json (Hugging Face / MLX); "
                        "point at a GGUF file or a converted model folder")


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ArtifactError(f"{path} is not readable JSON ({exc}); re-convert the model") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} is not a JSON object; re-convert the model")
    return data


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _inspect_onnx_folder(path: Path, files: list[Path], size: int) -> ArtifactInfo:
    config = _read_json(path / "genai_config.json")
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    decoder = model.get("decoder") if isinstance(model.get("decoder"), dict) else {}
    onnx_name = decoder.get("filename", "model.onnx")
    if not isinstance(onnx_name, str) or not (path / onnx_name).is_file():
        raise ArtifactError(f"{path}: genai_config.json names decoder {onnx_name!r}, which is not in the folder; "
                            "re-convert the model")
    heads = _int(decoder.get("num_attention_heads"))
    return ArtifactInfo(
        path=path, format="onnx", size_bytes=size,
        architecture=model.get("type") if isinstance(model.get("type"), str) else None,
        quant=_onnx_weight_bits(path / onnx_name),
        n_layers=_int(decoder.get("num_hidden_layers")),
        n_heads=heads,
        n_kv_heads=_int(decoder.get("num_key_value_heads")) or heads,
        embedding_length=_int(decoder.get("hidden_size")),
        context_length=_int(model.get("context_length")),
        head_dim=_int(decoder.get("head_size")),
        vocab_size=_int(model.get("vocab_size")),
        metadata={"files": len(files), "onnx": onnx_name},
    )


def _onnx_weight_bits(graph: Path) -> str | None:
    """int4/int8 from the weight names onnxruntime-genai's builder gives quantized
    MatMulNBits weights (``..._Q4``); None when the graph does not say."""
    if graph.stat().st_size > 64 << 20:  # weights inside the graph file: don't read it all
        return None
    data = graph.read_bytes()
    if b"MatMulNBits" not in data:
        return None
    for bits in (4, 8, 2):
        if f".weight_Q{bits}".encode() in data:
            return f"int{bits}"
    return "nbits"


def _inspect_safetensors_folder(path: Path, files: list[Path], size: int) -> ArtifactInfo:
    config = _read_json(path / "config.json")
    weights = [f for f in files if f.suffix == ".safetensors"]
    if not weights:
        raise ArtifactError(f"{path} has config.json but no .safetensors weights; re-convert or re-download the model")
    headers = [_safetensors_header(f) for f in weights]
    # mlx_lm.convert writes {"format": "mlx"} into every shard's metadata and a
    # "quantization" block (bits, group_size) into config.json.
    is_mlx = (any(h.get("__metadata__", {}).get("format") == "mlx" for h in headers)
              or isinstance(config.get("quantization"), dict))
    quant = None
    mlx_q = config.get("quantization")
    if isinstance(mlx_q, dict) and _int(mlx_q.get("bits")):
        quant = f"q{mlx_q['bits']}"
    elif isinstance(config.get("quantization_config"), dict):
        qc = config["quantization_config"]
        quant = str(qc.get("quant_method") or qc.get("bits") or "quantized")
    else:
        dtype = config.get("torch_dtype") or config.get("dtype")
        quant = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}.get(dtype, dtype) if isinstance(dtype, str) else None
    n_params = None
    if quant is None or quant in ("bf16", "f16", "f32"):  # packed quantized tensors do not count parameters
        n_params = 0
        for header in headers:
            for name, entry in header.items():
                if name != "__metadata__" and isinstance(entry, dict) and isinstance(entry.get("shape"), list):
                    count = 1
                    for d in entry["shape"]:
                        count *= d if isinstance(d, int) else 1
                    n_params += count
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    heads = _int(text.get("num_attention_heads"))
    hidden = _int(text.get("hidden_size"))
    head_dim = _int(text.get("head_dim")) or (hidden // heads if hidden and heads else None)
    return ArtifactInfo(
        path=path, format="mlx" if is_mlx else "hf", size_bytes=size,
        architecture=text.get("model_type") if isinstance(text.get("model_type"), str) else None,
        quant=quant, n_params=n_params,
        n_layers=_int(text.get("num_hidden_layers")),
        n_heads=heads,
        n_kv_heads=_int(text.get("num_key_value_heads")) or heads,
        embedding_length=hidden,
        context_length=_int(text.get("max_position_embeddings")),
        head_dim=head_dim,
        vocab_size=_int(text.get("vocab_size")),
        metadata={"files": len(files), "weights": len(weights)},
        layout=from_config({**text, "tie_word_embeddings": text.get("tie_word_embeddings",
                                                                    config.get("tie_word_embeddings"))}),
    )


def _safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON), checked against its size."""
    import json

    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise ArtifactError(f"{path} is truncated (no safetensors header); re-convert or re-download it")
            n = struct.unpack("<Q", raw)[0]
            if n > min(size - 8, 100 << 20):
                raise ArtifactError(f"{path}: safetensors header claims {n:,} bytes, more than the file holds; it is damaged")
            header = json.loads(fh.read(n))
    except ArtifactError:  # a ValueError too: let it through with its own message
        raise
    except OSError as exc:
        raise ArtifactError(f"cannot read {path}: {exc.strerror}") from exc
    except ValueError:
        raise ArtifactError(f"{path}: safetensors header is not JSON; the file is damaged") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{path}: safetensors header is not a JSON object; the file is damaged")
    end = max((e["data_offsets"][1] for k, e in header.items() if k != "__metadata__" and isinstance(e, dict)
               and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2
               and isinstance(e["data_offsets"][1], int)), default=0)
    if 8 + n + end > size:
        raise ArtifactError(f"{path} is truncated: its tensors need {8 + n + end:,} bytes but the file has {size:,}; "
                            "re-convert or re-download it")
    return header


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
    embedding_bytes = None
    matmul_bytes: dict[str, int] = {}
    for name, dims, ttype, offset in tensors:
        n_elements = 1
        for d in dims:
            n_elements *= d
        n_params += n_elements
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        except (KeyError, ValueError):
            raise ArtifactError(f"{path}: tensor {name} has unknown type {ttype}; "
                                "fitbench's gguf package may be too old") from None
        data_end = max(data_end, data_start + offset + n_elements // block * type_size)
        if name == "token_embd.weight":
            embedding_bytes = n_elements // block * type_size
        if _is_matmul_weight(name, dims):
            kind = GGMLQuantizationType(ttype).name
            matmul_bytes[kind] = matmul_bytes.get(kind, 0) + n_elements // block * type_size
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
        layout=from_gguf(meta, arch, arch_key("block_count"), {t[0] for t in tensors}),
        embedding_bytes=embedding_bytes,
        matmul_bytes=matmul_bytes,
    )


def _is_matmul_weight(name: str, dims: list[int]) -> bool:
    """A weight llama.cpp multiplies by (MUL_MAT: 2-D; MUL_MAT_ID: a 3-D ``*_exps`` stack) with rows
    (ne[1]) in multiples of 8. Embedding tables (``token_embd``, ``position_embd``, ...) are looked up
    by row (GET_ROWS), even when tied to the output: llama.cpp places the tensor by its first use."""
    if name.split(".")[0].endswith("_embd") or name.startswith("token_types"):
        return False
    if not (len(dims) == 2 or (len(dims) == 3 and "_exps" in name)):
        return False
    return dims[1] % 8 == 0

