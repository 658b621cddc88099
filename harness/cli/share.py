"""``fitbench contribute`` and ``fitbench upstream serve``: send measurements upstream, or be the upstream."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from harness.cli.options import UsageError
from harness.cli.present import make_console


@click.command("contribute")
@click.argument("results", nargs=-1, required=True)
@click.option("--to", "url", envvar="FITBENCH_UPSTREAM", metavar="URL",
              help="upstream to send to, e.g. http://127.0.0.1:8765 (env FITBENCH_UPSTREAM)")
@click.option("--out", "out", type=click.Path(path_type=Path), help="also write the bundle here (.tar.gz), "
              "for offline or pull-request submission")
@click.option("--dry-run", is_flag=True, help="show what would be sent and stop: nothing is written or sent")
@click.option("--yes", "-y", is_flag=True, help="consent without the prompt (for scripts)")
@click.option("--token", envvar="FITBENCH_TOKEN", help="submitter token (env FITBENCH_TOKEN; default: the one "
              "stored for this upstream, or a new one asked from it)")
@click.option("--retries", type=click.IntRange(1, 20), default=5, show_default=True, help="upload attempts")
@click.option("--allow-http", is_flag=True, help="allow a plain http:// URL to another machine (default: https, "
              "or http to this machine only): the token and the rows would cross the network unencrypted")
def contribute_cmd(results: tuple[str, ...], url: str | None, out: Path | None, dry_run: bool, yes: bool,
                   token: str | None, retries: int, allow_http: bool) -> None:
    """Send RESULTS (result files, globs, folders or saved bundles) upstream, anonymised.

    Only the columns on the published list (docs/shared-columns.md) are sent; their text
    goes through the scrubber (paths, host, user and real names, e-mails, tokens, serials),
    and run and machine ids are re-derived with this install's secret salt. Machine class,
    runtime versions, artifact sha256 and the raw timelines are kept so the upstream can
    check and recompute the figures. Shows what will be sent and asks first.
    """
    from harness.results import expand_result_files
    from harness.share import bundle as bundle_mod
    from harness.share.client import UpstreamError, secure_url
    from harness.share.contribute import Retry, build, column_lines, parse_token, send, stored_token, summary

    console, err = make_console(), make_console(stderr=True)
    paths: list[Path] = []
    for item in results:  # a saved bundle is sent as it is; anything else names result files
        found = [Path(item)] if item.endswith(".tar.gz") else expand_result_files([item])
        paths += [p for p in found if p not in paths]
    built = build(paths)
    for line in summary(built):
        console.print(line, markup=False, highlight=False)
    if dry_run:
        console.print("every column that would be sent, with its treatment and its value in the first row:")
        for line in column_lines(built):
            console.print(line)
        console.print("dry run: nothing written, nothing sent")
        return
    if url:
        secure_url(url, allow_http)  # before the consent prompt: refused URLs ask nothing
    if not url and not out:
        raise UsageError("say where the bundle goes: --to URL (or set FITBENCH_UPSTREAM) and/or --out bundle.tar.gz")
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError("no terminal to ask for consent: read the summary above and pass --yes to send it")
        if not click.confirm(f"send these {len(built.doc['rows'])} row(s)" + (f" to {url}" if url else "")
                             + (f" and write {out}" if out else "") + "?", default=False):
            err.print("fitbench: nothing sent")
            sys.exit(1)

    def say(msg: str) -> None:
        err.print(f"fitbench: {msg}", markup=False)

    retry = Retry(attempts=retries)
    doc = built.doc
    try:
        known = token or (stored_token(url) if url else None)
        if out:
            if known and not doc.get("signature"):
                doc = bundle_mod.sign(doc, *parse_token(known))
            bundle_mod.write_bundle_file(doc, out)
            console.print(f"bundle written: {out}" + ("" if known else " (unsigned: it is signed when sent)"),
                          markup=False)
        if url:
            answer = send(doc, url, token, retry, say, allow_http=allow_http)
    except UpstreamError as exc:
        saved = out if out and out.exists() else _save_unsent(doc, paths[0], built.content_hash)
        raise UpstreamError(f"{exc}; the bundle is saved as {saved}: send it later with "
                            f"fitbench contribute {saved} --to URL") from None
    if url:
        what = "already there (nothing added)" if answer.get("duplicate") else \
            f"{answer.get('new_rows')} new row(s), {answer.get('duplicate_rows')} already there"
        console.print(f"sent to {url}: bundle {built.content_hash[:16]}: {what}", markup=False)


def _save_unsent(doc: dict, near: Path, digest: str) -> Path:
    from harness.share import bundle as bundle_mod

    for folder in (near.parent, Path.cwd()):
        try:
            return bundle_mod.write_bundle_file(doc, folder / f"contribute-{digest[:12]}.tar.gz")
        except OSError:
            continue
    return Path("(could not be saved: no writable folder)")


@click.group()
def upstream() -> None:
    """The reference upstream service that collects contributed measurements."""


def _db_target(ctx, param, value: str):
    """A postgresql:// URL stays a string (a Path would fold its //); anything else is a SQLite file."""
    from harness.share.upstream.db import is_postgres

    return value if is_postgres(value) else Path(value)


DB_HELP = ("the store: a SQLite file (created if missing) or a PostgreSQL URL, "
           "postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE (needs psycopg, in the upstream extra)")


@upstream.command("serve")
@click.option("--db", "db", default="upstream.sqlite", show_default=True, callback=_db_target, metavar="FILE|URL",
              help=DB_HELP)
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True)
@click.option("--max-body-mib", type=click.FloatRange(min=0.01), default=16, show_default=True,
              help="largest request body accepted")
@click.option("--tokens-per-minute", type=click.FloatRange(min=0.01), default=10, show_default=True,
              help="tokens one address may be issued")
@click.option("--bundles-per-minute", type=click.FloatRange(min=0.01), default=120, show_default=True,
              help="bundles one token may submit")
@click.option("--requests-per-minute", type=click.FloatRange(min=0.01), default=1200, show_default=True,
              help="submissions and queries one address may make")
@click.option("--max-ingest", type=click.IntRange(min=1), default=3, show_default=True, metavar="N",
              help="bundles inflated, checked and stored at once (server memory grows to about N x 64 MiB); "
              "one per token, and a bundle that waits more than a few seconds for a slot gets 503 + Retry-After")
@click.option("--open", "open_tokens", is_flag=True, help="issue tokens to anyone who asks (POST /v1/tokens); "
              "they start quarantined: stored, not counted until `fitbench upstream token approve`")
@click.option("--no-quarantine", is_flag=True, help="with --open: self-service tokens count at once (a private "
              "upstream whose every client is trusted)")
@click.option("--quota-mib", type=click.FloatRange(min=0.01), default=256, show_default=True,
              help="storage quota of a self-service token")
@click.option("--trust-proxy", "trust_proxy", multiple=True, metavar="ADDR",
              help="a reverse proxy whose X-Forwarded-For names the client (repeatable; default: none)")
@click.option("--promote-after", type=click.IntRange(min=1), default=3, show_default=True, metavar="N",
              help="with --open: a quarantined token becomes active on its own after N accepted bundles (and "
              "--promote-hours, none refused, agreeing with active tokens where they overlap)")
@click.option("--promote-hours", type=click.FloatRange(min=0), default=24, show_default=True, metavar="H",
              help="with --open: ... spread over at least H hours since its first bundle")
@click.option("--no-promote", is_flag=True, help="with --open: never promote on a track record; only "
              "`fitbench upstream token approve` does")
def upstream_serve(db: Path | str, host: str, port: int, max_body_mib: float, tokens_per_minute: float,
                   bundles_per_minute: float, requests_per_minute: float, open_tokens: bool, no_quarantine: bool,
                   quota_mib: float, trust_proxy: tuple[str, ...], promote_after: int, promote_hours: float,
                   no_promote: bool, max_ingest: int) -> None:
    """Accept contribution bundles and serve aggregated community fits (GET /v1/fits) as JSON.

    Tokens come from the operator (`fitbench upstream token create`); with --open anyone may
    ask for one, and its rows count once the operator approves it."""
    import socket

    try:
        import uvicorn

        from harness.share.upstream.app import Config, create_app
        from harness.share.upstream.ratelimit import Limit
    except ImportError as exc:
        raise UsageError(f"the upstream server needs its extra ({exc.name} is missing): "
                         "pip install 'fitbench[upstream]'") from None
    if no_quarantine and not open_tokens:
        raise UsageError("--no-quarantine is about self-service tokens: it needs --open")
    try:
        app = create_app(Config(db=db, max_body=int(max_body_mib * 2**20), max_ingest=max_ingest,
                                token_limit=Limit(tokens_per_minute, max(1, int(tokens_per_minute // 2))),
                                bundle_limit=Limit(bundles_per_minute, max(1, int(bundles_per_minute // 2))),
                                request_limit=Limit(requests_per_minute, max(1, int(requests_per_minute // 2))),
                                open_tokens=open_tokens, quarantine=not no_quarantine, quota_bytes=int(quota_mib * 2**20),
                                trust_proxy=frozenset(trust_proxy), promote_bundles=promote_after,
                                promote_hours=promote_hours, auto_promote=not no_promote))
    except Exception as exc:  # sqlite3.Error, OSError, a PostgreSQL server that is down or refuses us
        raise UsageError(f"{redact(str(db))}: cannot open the database: {str(exc).strip()[:300]}") from None
    try:  # a taken port is the user's to fix: say so in one line rather than in uvicorn's log
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port or --host") \
            from None
    make_console().print(f"fitbench upstream on http://{host}:{port} (database {redact(str(db))}); Ctrl-C stops it",
                         markup=False)
    # the app reads X-Forwarded-For itself, only from --trust-proxy peers: uvicorn must not rewrite the client
    uvicorn.run(app, host=host, port=port, log_level="info", proxy_headers=False)


@upstream.group("token")
def token_group() -> None:
    """Issue, list, approve and revoke the submitter tokens of an upstream (run on its machine)."""


DB_OPTION = click.option("--db", "db", default="upstream.sqlite", show_default=True, callback=_db_target, metavar="FILE|URL",
                         help="the server's store: " + DB_HELP.removeprefix("the store: "))


def redact(db: str) -> str:
    from harness.share.upstream.db import redact as redact_url

    return redact_url(db)


def _store(db: Path | str, must_exist: bool = True):
    from harness.share.upstream.store import Store

    if must_exist and isinstance(db, Path) and not db.exists():
        raise UsageError(f"{db}: no such database; pass the server's --db")
    try:
        return Store(db)
    except Exception as exc:  # sqlite3.Error, OSError, a PostgreSQL server that is down or refuses us
        raise UsageError(f"{redact(str(db))}: cannot open the database: {str(exc).strip()[:300]}") from None


@token_group.command("create")
@DB_OPTION
@click.option("--name", help="who the token is for (shown by `token list`)")
@click.option("--quota-mib", type=click.FloatRange(min=0.01), default=256, show_default=True,
              help="how much this token may store")
def token_create(db: Path | str, name: str | None, quota_mib: float) -> None:
    """Issue an active token; give the printed token to the contributor (contribute --token)."""
    from harness.share.contribute import TOKEN_PREFIX

    store = _store(db, must_exist=False)
    token_id, secret = store.issue_token(name, int(quota_mib * 2**20), "active")
    store.close()
    make_console().print(f"token {token_id} ({name or 'unnamed'}), active\n{TOKEN_PREFIX}.{token_id}.{secret}",
                         markup=False, highlight=False)


@token_group.command("list")
@DB_OPTION
def token_list(db: Path | str) -> None:
    """Every token: status, quota and use, bundles sent."""
    store = _store(db)
    console = make_console()
    for t in store.tokens():
        console.print(f"{t['token_id']}  {t['status']:<11}  {t['used_bytes'] / 2**20:8.1f} / "
                      f"{t['quota_bytes'] / 2**20:.0f} MiB  {t['bundles']:5d} bundle(s)  {t['created_at']}  "
                      f"{t['name'] or ''}", markup=False, highlight=False)
    store.close()


def _set_status(db: Path | str, token_id: str, status: str, what: str) -> None:
    store = _store(db)
    found = store.set_status(token_id, status)
    store.close()
    if not found:
        raise UsageError(f"{db}: no token {token_id!r} (see `fitbench upstream token list`)")
    make_console().print(f"token {token_id} {what}", markup=False, highlight=False)


@token_group.command("approve")
@click.argument("token_id")
@DB_OPTION
def token_approve(token_id: str, db: Path | str) -> None:
    """Let a quarantined token's rows count in GET /v1/fits."""
    _set_status(db, token_id, "active", "approved: its rows now count")


@token_group.command("revoke")
@click.argument("token_id")
@DB_OPTION
def token_revoke(token_id: str, db: Path | str) -> None:
    """Refuse a token from now on and take its rows out of the aggregates (they stay stored)."""
    _set_status(db, token_id, "revoked", "revoked: refused from now on, its rows no longer count")


@upstream.command("delete")
@DB_OPTION
@click.option("--bundle", "bundle", metavar="HASH", help="remove one bundle: its content hash, or its first 12+ "
              "hex digits (`contribute` prints the first 16)")
@click.option("--token", "token_id", metavar="ID", help="remove every bundle this token sent (the token stays; "
              "`fitbench upstream token revoke ID` refuses it from now on)")
def upstream_delete(db: Path | str, bundle: str | None, token_id: str | None) -> None:
    """Remove a contribution: its rows and timelines leave the store and the aggregates they were in
    are recomputed (only those). A row stored by the bundle goes even when a later bundle repeated it:
    rows are stored once. The bytes are given back to the token's quota."""
    if (bundle is None) == (token_id is None):
        raise UsageError("say what to delete: --bundle HASH or --token ID (one of them)")
    store = _store(db)
    try:
        done = store.delete_bundle(bundle) if bundle else store.delete_token(token_id)
    finally:
        store.close()
    if done is None:
        what = f"no bundle (or more than one) whose hash starts {bundle!r}" if bundle else f"no token {token_id!r}"
        raise UsageError(f"{redact(str(db))}: {what} (see `fitbench upstream token list`)")
    make_console().print(f"deleted {done['bundles']} bundle(s), {done['rows']} row(s); {done['keys']} fit(s) "
                         "recomputed", markup=False, highlight=False)
