"""The upstream HTTP API (FastAPI). Every refusal is a 4xx with a JSON reason; nothing a client sends is a 500.

    POST /v1/tokens    issue a submitter token (rate limited per address)       -> 201 {"token": ...}
    POST /v1/bundles   a signed bundle, JSON, optionally gzip-encoded           -> 201 new / 200 already had it
    GET  /v1/fits      aggregated community fits (?machine_class=&artifact_sha256=&runtime=)
    GET  /v1/stats     counts of bundles, rows, machines
    GET  /v1/health

Bundles are read with a byte cap (before and after gzip), parsed without
NaN, checked for structure, signature, then plausibility, and stored whole,
each row with the server's own verdict (verdict.py: harness.fit with
``Config.thresholds``, never the client's).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from harness.fit import Thresholds
from harness.results import SCHEMA_VERSION
from harness.share import bundle as bundle_mod
from harness.share.bundle import BundleError, content_hash
from harness.share.contribute import TOKEN_PREFIX
from harness.share.upstream.ratelimit import Limit, RateLimiter
from harness.share.upstream.store import Store
from harness.share.upstream.validate import check_bundle


@dataclass
class Config:
    db: Path | str = "upstream.sqlite"
    max_body: int = 16 * 2**20          # bytes on the wire
    max_decoded: int = 64 * 2**20       # bytes after gzip
    token_limit: Limit = field(default_factory=lambda: Limit(per_minute=10, burst=5))      # per address
    bundle_limit: Limit = field(default_factory=lambda: Limit(per_minute=120, burst=60))   # per token
    request_limit: Limit = field(default_factory=lambda: Limit(per_minute=1200, burst=600))  # per address
    thresholds: Thresholds = field(default_factory=Thresholds)  # the verdicts of the community table


def refuse(status: int, error: str, reasons: list[str] | None = None, headers: dict | None = None) -> HTTPException:
    detail = {"error": error, **({"reasons": reasons} if reasons else {})}
    return HTTPException(status_code=status, detail=detail, headers=headers)


def create_app(config: Config | None = None) -> FastAPI:
    config = config or Config()
    store = Store(config.db, config.thresholds)
    limits = {"token": RateLimiter(config.token_limit), "bundle": RateLimiter(config.bundle_limit),
              "request": RateLimiter(config.request_limit)}
    app = FastAPI(title="fitbench upstream", version="1", docs_url=None, redoc_url=None)
    app.state.store, app.state.config = store, config

    def limit(kind: str, key: str) -> None:
        wait = limits[kind].take(key)
        if wait:
            raise refuse(429, f"rate limit: too many {kind} requests; retry in {wait:.0f} s",
                         headers={"Retry-After": str(max(1, round(wait)))})

    def address(request: Request) -> str:
        return request.client.host if request.client else "unknown"

    @app.exception_handler(RequestValidationError)
    async def _bad_query(request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": {"error": "bad request parameters", "reasons": [str(e.get("msg"))[:200]
                                                                                       for e in exc.errors()[:5]]}},
                            status_code=400)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):  # a bug in the server, never the client's input
        return JSONResponse({"detail": {"error": f"internal error: {type(exc).__name__}"}}, status_code=500)

    @app.get("/v1/health")
    def health() -> dict:
        return {"ok": True, "schema_version": SCHEMA_VERSION, "bundle_version": bundle_mod.BUNDLE_VERSION}

    @app.post("/v1/tokens", status_code=201)
    async def tokens(request: Request) -> dict:
        limit("token", address(request))
        token_id, secret = await run_in_threadpool(store.issue_token)
        return {"token": f"{TOKEN_PREFIX}.{token_id}.{secret}", "token_id": token_id}

    @app.post("/v1/bundles")
    async def bundles(request: Request) -> JSONResponse:
        limit("request", address(request))
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise refuse(415, f"send the bundle as application/json (got {ctype[:40] or 'no content type'!r})")
        raw = await _read_body(request, config)
        raw = _decode(raw, request.headers.get("content-encoding", "identity").lower(), config)
        try:
            doc = bundle_mod.parse_json(raw)
        except (ValueError, RecursionError) as exc:
            raise refuse(400, f"malformed JSON: {str(exc)[:120]}") from None
        return await run_in_threadpool(_accept, doc, request.headers.get("idempotency-key"))

    def _accept(doc, idem_key: str | None) -> JSONResponse:
        try:
            notes = bundle_mod.validate(doc)
        except BundleError as exc:
            raise refuse(422, f"schema: {exc}") from None
        token_id = doc.get("token_id")
        if not isinstance(token_id, str) or not token_id or len(token_id) > 64:
            raise refuse(401, "the bundle is not signed with a submitter token; get one from POST /v1/tokens")
        limit("bundle", token_id)
        secret = store.secret_for(token_id)
        if secret is None:
            raise refuse(401, "signed with a token this server did not issue; get one from POST /v1/tokens")
        digest = content_hash(doc)
        if not bundle_mod.signature_ok(doc, secret, digest):
            raise refuse(401, "the signature does not match the content: the bundle was altered after it was signed")
        if idem_key is not None:
            if len(idem_key) > 128:
                raise refuse(400, "Idempotency-Key is longer than 128 characters")
            earlier = store.bundle_for_key(idem_key)
            if earlier is not None and earlier != digest:
                raise refuse(422, "Idempotency-Key was already used for a different bundle")
            if earlier == digest:
                return JSONResponse(store.known(digest), status_code=200)
        if idem_key is None and (repeat := store.known(digest)) is not None:
            return JSONResponse(repeat, status_code=200)
        reasons = check_bundle(doc["rows"], doc["timeline"])
        if reasons:
            raise refuse(422, "implausible measurements: the bundle is refused", reasons)
        result = store.submit(doc, digest, idem_key)
        if notes:
            result["notes"] = notes
        return JSONResponse(result, status_code=200 if result["duplicate"] else 201)

    @app.get("/v1/fits")
    async def fits(request: Request, machine_class: str | None = None, artifact_sha256: str | None = None,
                   runtime: str | None = None) -> dict:
        limit("request", address(request))
        for name, value in (("machine_class", machine_class), ("artifact_sha256", artifact_sha256),
                            ("runtime", runtime)):
            if value is not None and len(value) > 80:
                raise refuse(400, f"{name} is longer than 80 characters")
        found = await run_in_threadpool(store.fits, machine_class, artifact_sha256, runtime)
        return {"generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "schema_version": SCHEMA_VERSION, "fits": found}

    @app.get("/v1/stats")
    async def stats() -> dict:
        return await run_in_threadpool(store.stats)

    return app


async def _read_body(request: Request, config: Config) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise refuse(400, "Content-Length is not a number")
        if int(declared) > config.max_body:
            raise refuse(413, f"body of {int(declared):,} bytes is over the {config.max_body:,} byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():  # counted as it arrives: a lying Content-Length cannot get past
        size += len(chunk)
        if size > config.max_body:
            raise refuse(413, f"body is over the {config.max_body:,} byte limit")
        chunks.append(chunk)
    if not size:
        raise refuse(400, "empty body: send a bundle")
    return b"".join(chunks)


def _decode(raw: bytes, encoding: str, config: Config) -> bytes:
    if encoding in ("", "identity"):
        if len(raw) > config.max_decoded:
            raise refuse(413, "bundle too large")
        return raw
    if encoding != "gzip":
        raise refuse(415, f"Content-Encoding {encoding[:20]!r} is not supported; use gzip or none")
    inflate = zlib.decompressobj(wbits=31)
    try:
        out = inflate.decompress(raw, config.max_decoded)
        if inflate.unconsumed_tail:  # more than the cap would come out: a gzip bomb or just too big
            raise refuse(413, f"bundle is over {config.max_decoded:,} bytes once decompressed")
        out += inflate.flush()
    except zlib.error as exc:
        raise refuse(400, f"body is not valid gzip: {exc}") from None
    if not inflate.eof:
        raise refuse(400, "gzip body is truncated")
    return out
