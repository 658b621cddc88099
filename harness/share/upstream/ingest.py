"""The costly steps of taking a bundle in, in the order that keeps them cheap for the server.

Each runs in a worker thread (never on the event loop) and stops at its cap:
the wire signature over the raw body first (HMAC of the bytes as sent, so an
unknown or forged token costs one hash, not a decompression); then gzip
inflated in slices up to ``max_decoded`` bytes; then the element count and
nesting depth bounded on the bytes (C-speed counts) before ``json.loads``
builds any object; numbers must be finite (``1e999`` is refused, not inf).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import hmac
import json
import re
import zlib
from itertools import accumulate

SIGNATURE_HEADER = "x-fitbench-signature"  # "<token id>:<hex HMAC-SHA256 of the body as sent>"
SLICE = 1 << 20
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


# glibc keeps what a thread freed in that thread's arena; a bomb's megabytes would stay in the RSS of each
# worker thread that ever inflated one. malloc_trim hands them back (absent elsewhere: nothing to do).
try:
    _TRIM = getattr(ctypes.CDLL(ctypes.util.find_library("c") or None), "malloc_trim", None)
except (OSError, TypeError):  # no C library to load by that name (Windows)
    _TRIM = None
BIG_JOB = 8 * SLICE  # decoded bytes past which a finished job gives its memory back


def give_back_memory() -> None:
    if _TRIM is not None:
        _TRIM(0)


class Refused(Exception):
    """A 4xx for the client: ``status`` and a one-line ``error``."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status, self.error = status, error


def body_signature(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def parse_signature_header(value: str | None) -> tuple[str, str]:
    """(token id, signature) from the header; a missing, non-ASCII or malformed one is a 401."""
    if not value:
        raise Refused(401, f"the request is not signed: send {SIGNATURE_HEADER}: <token id>:<HMAC of the body> "
                           "(fitbench contribute does)")
    if not value.isascii() or value.count(":") != 1:
        raise Refused(401, f"{SIGNATURE_HEADER} must be ASCII <token id>:<hex signature>")
    token_id, sig = value.split(":")
    if not token_id or len(token_id) > 64 or not re.fullmatch(r"[0-9a-f]{64}", sig):
        raise Refused(401, f"{SIGNATURE_HEADER} must be <token id>:<64 hex digits>")
    return token_id, sig


def signature_matches(secret: str, body: bytes, given: str) -> bool:
    return hmac.compare_digest(body_signature(secret, body).encode(), given.encode())


def inflate(raw: bytes, encoding: str, max_decoded: int) -> bytes:
    """The body decompressed, never holding more than ``max_decoded`` bytes of output."""
    if encoding in ("", "identity"):
        if len(raw) > max_decoded:
            raise Refused(413, f"bundle is over {max_decoded:,} bytes")
        return raw
    out, size = [], 0
    gz = zlib.decompressobj(wbits=31)
    try:
        for start in range(0, len(raw), SLICE):
            data = raw[start:start + SLICE]
            while data:
                # at most a slice out per call: zlib's own output buffer never grows to the whole cap
                piece = gz.decompress(data, min(SLICE, max_decoded + 1 - size))
                size += len(piece)
                out.append(piece)
                if size > max_decoded:  # a gzip bomb, or just too big: stop before holding more
                    raise Refused(413, f"bundle is over {max_decoded:,} bytes once decompressed")
                data = gz.unconsumed_tail
                if gz.eof:
                    break
            if gz.eof:
                break
        piece = gz.flush(max_decoded + 1 - size) if not gz.eof else b""
        size += len(piece)
        out.append(piece)
    except zlib.error as exc:
        raise Refused(400, f"body is not valid gzip: {exc}") from None
    if size > max_decoded:
        raise Refused(413, f"bundle is over {max_decoded:,} bytes once decompressed")
    if not gz.eof:
        raise Refused(400, "gzip body is truncated")
    return b"".join(out)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows here")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def parse_bounded(raw: bytes, max_elements: int, max_depth: int):
    """JSON from bytes, refused (400/413) before parsing when it would be too many values or too deep."""
    # every value but the first is preceded by a comma or opens a container: an upper bound
    elements = raw.count(b",") + raw.count(b"[") + raw.count(b"{") + 1
    if elements > max_elements:
        raise Refused(413, f"bundle has up to {elements:,} JSON values; at most {max_elements:,}")
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKET)
    depth = max(accumulate(_STEP[b] for b in brackets), default=0)
    if depth > max_depth:
        raise Refused(400, f"malformed JSON: nested {depth} deep; at most {max_depth}")
    try:
        return json.loads(raw, parse_constant=_no_constant, parse_float=_finite)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise Refused(400, f"malformed JSON: {str(exc)[:120]}") from None
