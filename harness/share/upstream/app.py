"""The upstream HTTP API (FastAPI). Every refusal is a 4xx with a JSON reason; nothing a client sends is a 500.

    POST /v1/tokens    a quarantined submitter token, only with ``serve --open``   -> 201 {"token": ...}; else 403
    POST /v1/bundles   a signed bundle, JSON, optionally gzip-encoded           -> 201 new / 200 already had it
    GET  /v1/fits      aggregated community fits, paged:
                       ?artifact_sha256=&artifact=<name substring or sha256 prefix>&machine_class=&runtime=
                       &limit=(default 100, at most 1000)&offset=
                       -> {"generated_at", "schema_version", "fits": [...], "total": N, "next_offset": int|null}
    GET  /v1/rows      the stored rows of one key, paged (each fit's ``rows_url``):
                       ?artifact_sha256=&machine_class=&runtime=&n_ctx=&limit=&offset=
                       -> {"rows": [...], "total": N, "next_offset": int|null}
    GET  /v1/artifacts ?q=<name substring or sha256 prefix>&limit= -> [{"artifact_sha256", "artifact_name",
                       "machine_classes", "runtimes", "keys"}] (a search box)
    GET  /v1/stats     counts of bundles, rows, machines
    GET  /             the fit explorer page for people (page.py: the answers of /v1/artifacts and /v1/fits)
    GET  /v1/health    answered on the event loop: it never touches the store, so an ingest cannot hold it up

A fit entry (aggregate.py has the arithmetic) is one key: artifact x machine
class x runtime x context (x workflow and turn). It holds ``fit_class`` and
``fit_classes`` (verdicts by counted votes), ``votes``, ``tokens``,
``outlier_votes``, ``machines``, ``rows``, ``samples``, ``runs``,
``cases``, ``artifact`` {name, size_bytes, ...}, ``last_measured``,
``runtime_versions``, ``rows_url``, and for each of ``decode_tok_s``,
``ttft_s``, ``prefill_tok_s``, ``peak_rss_bytes`` (and ``prompt_tokens``)
{"median", "mad", "n", "outliers", "min", "max", "p25", "p75"} over the
counted votes (``outliers``: the values set apart).

Trust model. A row counts in ``/v1/fits`` only when it came in a bundle
signed by a token in good standing: one the operator issued (``fitbench
upstream token create``) or approved (``token approve``); ``token revoke``
refuses a token from then on and takes its rows out of the aggregates, and
``fitbench upstream delete`` removes a bundle or everything a token sent.
With ``serve --open`` anyone may ask ``POST /v1/tokens`` for a token, but it
starts quarantined: its bundles are checked and stored, never counted, until
the operator approves it or it earns a track record: at least 3 bundles
accepted over at least 24 hours (``--promote-after N``, ``--promote-hours
H``; ``--no-promote`` leaves approval to the operator), none refused as
implausible, and, on the keys where at least two active tokens have votes
(there must be one), agreement with them: none of its figures an outlier
among theirs and the same verdict. ``--open --no-quarantine`` makes tokens
active at once, for a private upstream whose every client is trusted. Whatever
a token sends is judged by the server (verdict.py recomputes every fit class
with the server's thresholds; validate.py refuses figures no real run can
produce; an ``ok`` row needs its timeline, a failed one its reason), and
counted as one vote per token per key: a token's machines and runs collapse
into one median value and one verdict (machine ids are the client's words:
they are counted, never votes), the served figures are medians over votes
with outliers (modified z-score over 3.5 and more than 10 % from the
median) set apart, and the verdict is the most common among the counted
votes, ties to the worse. So approval is a statement about who sends, never
about what is true, and one token, however many rows or machine ids it
invents, moves the table by one vote. Each token has a storage quota and a
bundle rate limit, both charged only after its signature is verified, so
knowing a token id (it is in every shared bundle) gives no power over its
owner. Addresses are the socket peer (IPv6 by its /64); ``X-Forwarded-For``
is read only from the proxies the operator names with ``--trust-proxy``.

Order of work for a bundle, cheapest first (ingest.py), everything past the
header checks in a worker thread: content type, encoding and signature header
-> body read with a byte cap and a time limit -> the HMAC of the body as sent
(``X-Fitbench-Signature``) against the token's secret, then its quota ->
admission, on the event loop: one heavy job per token and ``max_ingest`` at
once (a short wait for a slot, then 503 with Retry-After; never an unbounded
queue), then the token's rate limit is charged -> on the heavy job's own
threads: gzip inflated up to ``max_decoded`` (a bomb, 413, costs its token
``bomb_cost`` bundles) -> JSON value count and depth bounded on the bytes,
then parsed (finite numbers only) -> structure, the bundle's own signature,
columns off the client's allow-list dropped, run ids in the re-derived form,
plausibility -> stored, each row with the server's own verdict. So memory
stays near ``max_ingest`` x ``max_decoded`` whatever the clients send.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import anyio
from anyio import to_thread
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from harness.fit import Thresholds
from harness.results import SCHEMA_VERSION
from harness.share import bundle as bundle_mod
from harness.share.bundle import BundleError, content_hash
from harness.share.contribute import TOKEN_PREFIX
from harness.share.upstream import page as explorer
from harness.share.upstream.ingest import (
    BIG_JOB,
    SIGNATURE_HEADER,
    Refused,
    give_back_memory,
    inflate,
    parse_bounded,
    parse_signature_header,
    signature_matches,
)
from harness.share.upstream.ratelimit import Limit, RateLimiter, client_address, limit_key
from harness.share.upstream.store import DEFAULT_QUOTA, MAX_PAGE, BadRow, QuotaExceeded, Store
from harness.share.upstream.validate import check_bundle, check_run_ids, drop_unknown


@dataclass
class Config:
    db: Path | str = "upstream.sqlite"
    max_body: int = 16 * 2**20          # bytes on the wire
    max_decoded: int = 64 * 2**20       # bytes after gzip
    max_elements: int = 4_000_000       # JSON values in one bundle (bounded before parsing)
    max_depth: int = 32                 # JSON nesting (a bundle needs 4)
    body_timeout: float = 60.0          # seconds for the whole body to arrive
    max_ingest: int = 3                 # bundles inflated/parsed/stored at once (memory ~ max_ingest x max_decoded)
    ingest_queue: int = 8               # signed bundles that may wait for one of those slots ...
    ingest_wait: float = 5.0            # ... for at most this many seconds; then 503 with Retry-After
    bomb_cost: int = 10                 # a signed bundle over a cap (413) costs its token this many bundles
    open_tokens: bool = False           # POST /v1/tokens issues (quarantined) tokens to anyone
    quarantine: bool = True             # open-mode tokens wait for approval (False: a private upstream)
    quota_bytes: int = DEFAULT_QUOTA    # decoded bytes a new token may store
    promote_bundles: int = 3            # open mode: accepted bundles before a quarantined token may vote
    promote_hours: float = 24.0         # ... spread over at least this long
    auto_promote: bool = True           # False: only the operator approves
    trust_proxy: frozenset[str] = frozenset()  # peers whose X-Forwarded-For names the client
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
    # Heavy work (inflate, parse, check, store) is admitted ``max_ingest`` at a time and one per token, and runs
    # on its own threads: the default pool (40 threads) stays free for the sync endpoints, and memory is bounded
    # by about max_ingest x max_decoded whatever the clients send. Admission is decided on the event loop.
    admitted = anyio.CapacityLimiter(config.max_ingest)
    workers = anyio.CapacityLimiter(config.max_ingest)  # the threads those admitted jobs run on
    in_flight: set[str] = set()  # tokens with a heavy job admitted or waiting (touched on the event loop only)
    app = FastAPI(title="fitbench upstream", version="1", docs_url=None, redoc_url=None)
    app.state.store, app.state.config = store, config

    def charge(kind: str, key: str) -> None:
        wait = limits[kind].take(key)
        if wait:
            raise refuse(429, f"rate limit: too many {kind} requests; retry in {wait:.0f} s",
                         headers={"Retry-After": str(max(1, round(wait)))})

    def address(request: Request) -> str:
        peer = request.client.host if request.client else None
        return limit_key(client_address(peer, request.headers.get("x-forwarded-for"), config.trust_proxy))

    @app.exception_handler(RequestValidationError)
    async def _bad_query(request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": {"error": "bad request parameters", "reasons": [str(e.get("msg"))[:200]
                                                                                       for e in exc.errors()[:5]]}},
                            status_code=400)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):  # a bug in the server, never the client's input
        return JSONResponse({"detail": {"error": f"internal error: {type(exc).__name__}"}}, status_code=500)

    @app.get("/v1/health")
    async def health() -> dict:  # on the event loop: never queued behind ingest threads, never the store
        return {"ok": True, "schema_version": SCHEMA_VERSION, "bundle_version": bundle_mod.BUNDLE_VERSION}

    @app.post("/v1/tokens", status_code=201)
    async def tokens(request: Request) -> dict:
        if not config.open_tokens:
            raise refuse(403, "this upstream issues tokens only through its operator: ask them to run "
                              "`fitbench upstream token create --db DB` and send you the token (use --token)")
        charge("token", address(request))
        status = "quarantined" if config.quarantine else "active"
        token_id, secret = await run_in_threadpool(store.issue_token, None, config.quota_bytes, status)
        return {"token": f"{TOKEN_PREFIX}.{token_id}.{secret}", "token_id": token_id, "status": status}

    @app.post("/v1/bundles")
    async def bundles(request: Request) -> JSONResponse:
        charge("request", address(request))
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise refuse(415, f"send the bundle as application/json (got {ctype[:40] or 'no content type'!r})")
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity", "gzip"):
            raise refuse(415, f"Content-Encoding {encoding[:20]!r} is not supported; use gzip or none")
        idem_key = request.headers.get("idempotency-key")
        if idem_key is not None and len(idem_key) > 128:
            raise refuse(400, "Idempotency-Key is longer than 128 characters")
        try:  # a request with no usable signature header is refused before its body is read
            parse_signature_header(request.headers.get(SIGNATURE_HEADER))
        except Refused as exc:
            raise refuse(exc.status, exc.error) from None
        raw = await _read_body(request, config)
        try:  # the signature over the bytes as sent, in a worker thread: one HMAC, before any heavy work
            token_id = await run_in_threadpool(_authenticate, raw, request.headers.get(SIGNATURE_HEADER))
        except Refused as exc:
            raise refuse(exc.status, exc.error) from None
        # admission, on the event loop (no await between the checks and taking the token's place)
        if token_id in in_flight:
            raise busy(f"token {token_id} already has a bundle being taken in: send one at a time", 2)
        if admitted.statistics().tasks_waiting >= config.ingest_queue:
            raise busy("the server is taking in as many bundles as it can: retry later", 5)
        charge("bundle", token_id)  # only once the signature holds: a token id read from a bundle locks nobody out
        in_flight.add(token_id)
        try:
            acquired = False  # a short wait for a slot, never an unbounded queue
            with anyio.move_on_after(config.ingest_wait):
                await admitted.acquire()
                acquired = True
            if not acquired:
                raise busy("the server is taking in as many bundles as it can: retry later", 5)
            try:  # inflate, parse, check and store in one job on the heavy threads
                return await to_thread.run_sync(_ingest, raw, encoding, token_id, idem_key, limiter=workers)
            except Refused as exc:
                if exc.status == 413:  # over a cap once inflated or counted: a bomb costs its token several bundles
                    limits["bundle"].penalise(token_id, config.bomb_cost - 1)
                raise refuse(exc.status, exc.error) from None
            finally:
                admitted.release()
        finally:
            in_flight.discard(token_id)

    def busy(error: str, retry_after: int) -> HTTPException:
        return refuse(503, error, headers={"Retry-After": str(retry_after)})

    def _ingest(raw: bytes, encoding: str, token_id: str, idem_key: str | None) -> JSONResponse:
        big = False  # a job refused for size, or one that inflated a lot, gives its memory back to the OS
        try:
            decoded = inflate(raw, encoding, config.max_decoded)
            del raw
            big = len(decoded) > BIG_JOB
            doc = parse_bounded(decoded, config.max_elements, config.max_depth)
            return _accept(doc, token_id, len(decoded), idem_key)
        except Refused as exc:
            big = big or exc.status == 413
            raise
        finally:
            if big:
                doc = decoded = None
                give_back_memory()

    def _authenticate(raw: bytes, header: str | None) -> str:
        """The token that signed these bytes (its rate limit is charged by the caller, on admission)."""
        token_id, given = parse_signature_header(header)
        found = store.token(token_id)
        if found is None or found["status"] == "revoked":
            raise Refused(401, "signed with a token this server did not issue (or revoked); ask its operator")
        if not signature_matches(found["secret"], raw, given):
            raise Refused(401, "the request signature does not match the body: it was altered or signed with "
                               "another token")
        if found["used_bytes"] + len(raw) > found["quota_bytes"]:
            raise Refused(413, f"token {token_id} has used {found['used_bytes']:,} of its "
                               f"{found['quota_bytes']:,} byte quota: ask the operator")
        return token_id

    def _accept(doc, wire_token: str, size: int, idem_key: str | None) -> JSONResponse:
        try:
            notes = bundle_mod.validate(doc)
        except BundleError as exc:
            raise refuse(422, f"schema: {exc}") from None
        token_id = doc.get("token_id")
        if token_id != wire_token:
            raise refuse(401, "the bundle is signed with another token than the request")
        secret = store.secret_for(token_id)
        digest = content_hash(doc)
        try:
            signed = secret is not None and bundle_mod.signature_ok(doc, secret, digest)
        except (TypeError, ValueError):  # a non-ASCII signature: compare_digest refuses str beyond ASCII
            signed = False
        if not signed:
            raise refuse(401, "the signature does not match the content: the bundle was altered after it was signed")
        if idem_key is not None:
            earlier = store.bundle_for_key(idem_key)
            if earlier is not None and earlier != digest:
                raise refuse(422, "Idempotency-Key was already used for a different bundle")
            if earlier == digest:
                return JSONResponse(store.known(digest), status_code=200)
        if idem_key is None and (repeat := store.known(digest)) is not None:
            return JSONResponse(repeat, status_code=200)
        doc = drop_unknown(doc)  # verified as signed; what is not on the allow-list is not ours to store
        if (wrong := check_run_ids(doc)) is not None:
            raise refuse(422, wrong)
        try:
            reasons = check_bundle(doc["rows"], doc["timeline"])
        except (TypeError, ValueError, KeyError) as exc:  # a shape validate let through: the client's
            raise refuse(422, f"schema: a value of the wrong kind ({type(exc).__name__}: {str(exc)[:80]})") from None
        if reasons:
            store.record_refusal(token_id)  # signed by its owner: it counts against the track record
            raise refuse(422, "implausible measurements: the bundle is refused", reasons)
        try:
            result = store.submit(doc, digest, idem_key, size=size)
        except QuotaExceeded as exc:
            raise refuse(413, str(exc)) from None
        except BadRow as exc:  # a value the structure check let through that the database refuses: the client's
            raise refuse(422, f"schema: a value the store cannot hold ({str(exc)[:100]})") from None
        if config.open_tokens and config.auto_promote and not result["duplicate"]:
            if store.promote_if_earned(token_id, config.promote_bundles, config.promote_hours):
                result["token_status"] = "active"
        if notes:
            result["notes"] = notes
        return JSONResponse(result, status_code=200 if result["duplicate"] else 201)

    def text_arg(name: str, value: str | None) -> str | None:
        if value is not None and len(value) > 80:
            raise refuse(400, f"{name} is longer than 80 characters")
        return value or None

    def page(total: int, offset: int, count: int) -> int | None:
        return offset + count if offset + count < total else None

    @app.get("/v1/fits")
    async def fits(request: Request, machine_class: str | None = None, artifact_sha256: str | None = None,
                   runtime: str | None = None, artifact: str | None = None,
                   limit: int = Query(100, ge=1, le=MAX_PAGE), offset: int = Query(0, ge=0)) -> dict:
        charge("request", address(request))
        args = [text_arg(n, v) for n, v in (("machine_class", machine_class), ("artifact_sha256", artifact_sha256),
                                           ("runtime", runtime), ("artifact", artifact))]
        found, total = await run_in_threadpool(store.fits_page, *args, limit, offset)
        return {"generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "schema_version": SCHEMA_VERSION, "fits": found, "total": total,
                "next_offset": page(total, offset, len(found))}

    @app.get("/v1/rows")
    async def rows(request: Request, artifact_sha256: str, machine_class: str, runtime: str,
                   n_ctx: int = Query(..., ge=1), limit: int = Query(100, ge=1, le=MAX_PAGE),
                   offset: int = Query(0, ge=0)) -> dict:
        charge("request", address(request))
        for n, v in (("artifact_sha256", artifact_sha256), ("machine_class", machine_class), ("runtime", runtime)):
            text_arg(n, v)
        found, total = await run_in_threadpool(store.rows_page, artifact_sha256, machine_class, runtime, n_ctx,
                                               limit, offset)
        return {"rows": found, "total": total, "next_offset": page(total, offset, len(found))}

    @app.get("/v1/artifacts")
    async def artifacts(request: Request, q: str | None = None, limit: int = Query(20, ge=1, le=MAX_PAGE)) -> list:
        charge("request", address(request))
        return await run_in_threadpool(store.artifacts, text_arg("q", q), limit)

    @app.get("/v1/stats")
    async def stats() -> dict:
        return await run_in_threadpool(store.stats)

    def fits_answer(artifact_sha256: str, machine_class: str, runtime: str, limit: int, offset: int) -> dict:
        found, total = store.fits_page(machine_class, artifact_sha256, runtime, None, limit, offset)
        return {"fits": found, "total": total, "next_offset": page(total, offset, len(found))}

    # the fit explorer at /: the same store calls as /v1/artifacts and /v1/fits, so it shows their answers
    explorer.mount(app, lambda request: charge("request", address(request)), store.artifacts, fits_answer)
    return app


async def _read_body(request: Request, config: Config) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise refuse(400, "Content-Length is not a number")
        if int(declared) > config.max_body:
            raise refuse(413, f"body of {int(declared):,} bytes is over the {config.max_body:,} byte limit")
    chunks, size = [], 0
    try:
        with anyio.fail_after(config.body_timeout):  # a slow body holds a connection, not the server
            async for chunk in request.stream():  # counted as it arrives: a lying Content-Length cannot get past
                size += len(chunk)
                if size > config.max_body:
                    raise refuse(413, f"body is over the {config.max_body:,} byte limit")
                chunks.append(chunk)
    except TimeoutError:
        raise refuse(408, f"the body did not arrive within {config.body_timeout:g} s") from None
    if not size:
        raise refuse(400, "empty body: send a bundle")
    return b"".join(chunks)
