"""Talking to an upstream, which is untrusted: https, capped answers, retries, strict JSON.

- A URL to a host other than this machine must be https (``allow_http`` overrides, for a
  lab network that knows what it is doing); plain http to 127.0.0.1, ::1 or localhost is fine.
- An answer is read as a stream and cut off past ``MAX_ANSWER`` bytes (after decompression),
  with a one-line error, so a hostile server cannot fill the client's memory.
- Answers are parsed with non-finite numbers (NaN, Infinity, ``1e999``) and integers past
  64 bits turned into ``NONFINITE``, a value no number check accepts: the reader skips what
  holds one instead of crashing on it.
- Retries on network errors, 429 (honouring Retry-After) and 5xx, with jittered backoff.
"""

from __future__ import annotations

import ipaddress
import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit

from harness.errors import FitbenchError

MAX_ANSWER = 32 * 2**20  # bytes of one answer, decompressed
MAX_PAGES = 50  # pages of /v1/fits followed before stopping
PAGE_SIZE = 1000  # fits asked for per page (a server that pages may send fewer)
MAX_FITS = 200_000  # aggregates taken from one pull


class UpstreamError(FitbenchError):
    """An expected failure talking to an upstream (unreachable, refused, not an upstream): one line, exit 2."""


class _NonFinite:
    """Where an answer held NaN, Infinity, 1e999 or an integer past 64 bits: no number check accepts it."""

    def __repr__(self) -> str:
        return "NONFINITE"


NONFINITE = _NonFinite()


def _float(text: str) -> Any:
    value = float(text)
    return value if math.isfinite(value) else NONFINITE


def _int(text: str) -> Any:
    return int(text) if len(text.lstrip("-")) <= 18 else NONFINITE


def parse_answer(raw: bytes) -> Any:
    """JSON as an upstream may send it; raises ValueError on what is not JSON."""
    try:
        return json.loads(raw, parse_constant=lambda name: NONFINITE, parse_float=_float, parse_int=_int)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def has_nonfinite(value: Any, depth: int = 0) -> bool:
    if value is NONFINITE or depth > 20 or (isinstance(value, float) and not math.isfinite(value)):
        return True
    if isinstance(value, dict):
        return any(has_nonfinite(v, depth + 1) for v in value.values())
    if isinstance(value, list):
        return any(has_nonfinite(v, depth + 1) for v in value)
    return False


@dataclass
class Answer:
    """An upstream's answer, read whole (under the cap)."""
    status_code: int
    content: bytes
    headers: dict[str, str] = field(default_factory=dict)
    reason_phrase: str = ""

    def json(self) -> Any:
        return parse_answer(self.content)

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


@dataclass
class Retry:
    attempts: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    timeout_s: float = 30.0


def base_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise UpstreamError(f"{url[:80]!r} is not an http(s) URL, e.g. https://upstream.example or "
                            "http://127.0.0.1:8765")
    for suffix in ("/v1/fits", "/v1/bundles", "/v1"):
        url = url.removesuffix(suffix)
    return url


def is_loopback(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def secure_url(url: str, allow_http: bool = False) -> str:
    """The upstream's base URL, refused if it would send or read in the clear over a network."""
    url = base_url(url)
    if url.startswith("http://") and not allow_http and not is_loopback(url):
        raise UpstreamError(f"{url} is plain http to another host: tokens and answers would cross the network in "
                            "the clear; use https, or pass --allow-http if this network is yours")
    return url


def _httpx():
    try:
        import httpx
    except ImportError:
        raise UpstreamError("talking to an upstream needs httpx: pip install 'fitbench[upstream]'") from None
    return httpx


def _read_capped(httpx, method: str, url: str, timeout: float, cap: int, **kw) -> Answer:
    with httpx.stream(method, url, timeout=timeout, **kw) as resp:
        try:
            declared = int(resp.headers.get("content-length", "0"))
        except ValueError:
            declared = 0
        if declared > cap:
            raise UpstreamError(f"{url}: the answer is {declared:,} bytes; more than the {cap // 2**20} MiB a "
                                "fitbench upstream sends (is it one?)")
        chunks, size = [], 0
        for chunk in resp.iter_bytes():
            size += len(chunk)
            if size > cap:
                raise UpstreamError(f"{url}: the answer is larger than {cap // 2**20} MiB; a fitbench upstream "
                                    "sends less (is it one?)")
            chunks.append(chunk)
        return Answer(resp.status_code, b"".join(chunks), dict(resp.headers), resp.reason_phrase)


def request(method: str, url: str, retry: Retry, on_retry: Callable[[str], None] | None = None,
            cap: int = MAX_ANSWER, **kw) -> Answer:
    """One HTTP request with retries on network errors, 429 and 5xx; returns the final answer, read under ``cap``."""
    httpx = _httpx()
    last = "no attempt made"
    for attempt in range(1, retry.attempts + 1):
        try:
            resp = _read_capped(httpx, method, url, retry.timeout_s, cap, **kw)
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {str(exc)[:120] or 'no answer'}"
            wait = None
        else:
            if resp.status_code != 429 and resp.status_code < 500:
                return resp
            last = f"HTTP {resp.status_code}: {reason(resp)}"
            wait = _retry_after(resp)
        if attempt == retry.attempts:
            break
        delay = wait if wait is not None else min(retry.max_backoff_s, retry.backoff_s * 2 ** (attempt - 1))
        delay = min(retry.max_backoff_s, delay) * (1 + 0.2 * random.random())  # jitter: clients don't retry in step
        if on_retry:
            on_retry(f"attempt {attempt} failed ({last}); retrying in {delay:.1f} s")
        time.sleep(delay)
    raise UpstreamError(f"{url}: no success after {retry.attempts} attempt(s): {last}")


def _retry_after(resp: Answer) -> float | None:
    try:
        value = float(resp.headers.get("retry-after"))
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value >= 0 else None


def reason(resp: Answer) -> str:
    """The server's reason for a refusal, in one short line."""
    try:
        body = resp.json()
    except ValueError:
        text = resp.text[:200] or resp.reason_phrase
    else:
        detail = body.get("detail") if isinstance(body, dict) else None
        if isinstance(detail, dict):
            reasons = detail.get("reasons") if isinstance(detail.get("reasons"), list) else []
            text = str(detail.get("error", "")) + (": " + "; ".join(str(r) for r in reasons[:5]) if reasons else "")
        else:
            text = str(detail or body)
    return " ".join(text.split())[:300]


def fetch_fits(url: str, retry: Retry, say: Callable[[str], None], allow_http: bool = False, **params) -> dict:
    """Every page of GET /v1/fits (following ``next_offset`` up to MAX_PAGES), as one {"fits": [...]}."""
    root = secure_url(url, allow_http)
    query = {"limit": PAGE_SIZE, **{k: v for k, v in params.items() if v}}
    fits: list = []
    offset = None
    for _ in range(MAX_PAGES):
        resp = request("GET", f"{root}/v1/fits", retry, on_retry=say,
                       params={**query, **({"offset": offset} if offset is not None else {})})
        if resp.status_code != 200:
            raise UpstreamError(f"{root}/v1/fits: HTTP {resp.status_code}: {reason(resp)}")
        try:
            data = resp.json()
        except ValueError:
            raise UpstreamError(f"{root}/v1/fits did not answer JSON; is it a fitbench upstream?") from None
        if not isinstance(data, dict) or not isinstance(data.get("fits"), list):
            raise UpstreamError(f"{root}/v1/fits: answer has no 'fits' list; is it a fitbench upstream?")
        fits += data["fits"][:MAX_FITS - len(fits)]
        following = data.get("next_offset")
        if not isinstance(following, int) or isinstance(following, bool) or following <= (offset or 0) \
                or not data["fits"]:
            break  # the last page (or an answer that would loop)
        if len(fits) >= MAX_FITS:
            say(f"stopped at {MAX_FITS:,} fits; pull by --machine-class for the rest")
            break
        offset = following
    else:
        say(f"stopped after {MAX_PAGES} pages; pull by --machine-class for the rest")
    return {"fits": fits}
