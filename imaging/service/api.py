"""The HTTP API (``python -m imaging serve``): request_image create, list, show and approve.

Users ask, admins approve (by PATCH, or by the link in their mail, which opens a confirmation
page whose button approves), a worker on any conversion host runs the notebooks, and each run
leaves its audit record, read here from the record store (or, on one machine without one, from
the runs directory) whichever host ran it.
Authentication is a bearer token per user; roles are ``user`` and ``admin``. Every error is a
JSON body ``{"detail": "<one line>"}`` with its 4xx code. The access log names method, path and
status only: no query string (approval tokens), no header (bearer tokens).
"""


# No "from __future__ import annotations" here: FastAPI reads the route functions' annotations at
# runtime, and Auth, RequestId and Token are local to create_app.

import html
import json
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import BackgroundTasks, Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from imaging import __version__
from imaging.errors import ImagingError, ParameterError, StoreError
from imaging.run import audit, record
from imaging.service import approvals, web, worker
from imaging.service.metrics import add_monitoring
from imaging.service.notify import Mailer, options
from imaging.service.schemas import (
    API_PREFIX,
    NOTEBOOK,
    REQUEST_ID,
    AuditOut,
    CreateRequest,
    Error,
    NotebookOut,
    Patch,
    RequestDetail,
    RequestOut,
    StateName,
    UserOut,
    artifact_name,
    document,
    validated,
)
from imaging.service.settings import Settings
from imaging.service.store import Actor, ImageRequest, Store

log = logging.getLogger("imaging.service.api")
API = API_PREFIX  # short, for the routes below
NOT_JSON = "the body is not valid JSON"


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {400: "the body is not JSON", 401: "no bearer token, or an unknown one",
            403: "not allowed for this user (or link)", 404: "no such request (or not yours)",
            409: "not possible in the request's state", 410: "the link has expired",
            422: "the request's fields are not valid"}  # fmt: skip
    return {c: {"model": Error, "description": text[c]} for c in codes}


bearer = HTTPBearer(auto_error=False, description="a user's token (python -m imaging users add NAME)")


def fail(status: int, message: str) -> HTTPException:
    return HTTPException(status, message)


# Rendered records are static: no script of them runs (a guest's file names are in them).
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def _recovering(store: Store, mailer: Mailer, settings: Settings, stop: threading.Event) -> None:
    """The API too queues again the requests of lost workers, so their state tells the truth
    even while no other worker runs."""
    away = False  # said once while the database is away, not at every heartbeat
    while not stop.wait(settings.worker.heartbeat_seconds):
        try:
            worker.recover(store, mailer, settings)
        except StoreError as e:
            if not away:
                log.warning("recovering stalled requests: %s", e)
            away = True
        else:
            if away:
                log.info("recovering stalled requests again: the database answers")
            away = False


def create_app(settings: Settings, *, recover: bool = True) -> FastAPI:
    store = Store(settings.sqlalchemy_url)
    mailer = Mailer(settings, store)
    records = record.reader(settings.records if settings.records.bucket else None)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stop = threading.Event()
        thread = threading.Thread(target=_recovering, args=(store, mailer, settings, stop), daemon=True)
        if recover:
            thread.start()
        try:
            yield
        finally:
            stop.set()
            if recover:
                thread.join()
            store.close()

    app = FastAPI(
        title="imaging",
        version=__version__,
        lifespan=lifespan,
        description="Image and export requests of cloud instances: ask, approve, run, audit.",
    )
    app.state.store, app.state.settings, app.state.mailer = store, settings, mailer
    _handlers(app)
    add_monitoring(app, store, settings, records)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            app.openapi_schema = document(spec, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    web.install(app, store, settings, mailer, records)  # the web page, /web/
    base = f"{settings.public_url}{API}/request_image"

    def user(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Actor:
        if creds is None:
            raise HTTPException(401, "a bearer token is required", headers={"WWW-Authenticate": "Bearer"})
        found = store.user_by_token(creds.credentials)
        if found is None:
            raise HTTPException(401, "unknown bearer token", headers={"WWW-Authenticate": "Bearer"})
        return Actor(found.name, found.role, found.id)

    Auth = Annotated[Actor, Depends(user)]
    RequestId = Annotated[str, PathParam(pattern=REQUEST_ID, description="the request's id")]

    @app.post(
        f"{API}/request_image/",
        status_code=201,
        response_model=RequestDetail,
        responses=_errors(400, 401, 422),
        operation_id="create_request",
        summary="Ask for an image (vis) or an export (disk_format) of an instance",
    )
    def create(body: CreateRequest, actor: Auth, tasks: BackgroundTasks) -> RequestDetail:
        req = store.create(actor, **validated(body, settings, store))
        log.info("request %s created by %s", req.id, actor.name)
        tasks.add_task(mailer.request_created, req)
        return RequestDetail.of(req, base)

    @app.get(
        f"{API}/request_image/",
        response_model=list[RequestOut],
        responses=_errors(401, 422),
        operation_id="list_requests",
        summary="Requests: a user's own, or all for an admin",
    )
    def list_requests(
        actor: Auth,
        state: StateName | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    ) -> list[RequestOut]:
        return [RequestOut.of(r, base) for r in store.list_requests(actor, state, limit, offset)]

    @app.get(
        f"{API}/request_image/{{request_id}}",
        response_model=RequestDetail,
        responses=_errors(401, 404, 422),
        operation_id="show_request",
        summary="One request with its state history, stage and result",
    )
    def show(request_id: RequestId, actor: Auth) -> RequestDetail:
        return RequestDetail.of(store.get(request_id, actor), base)

    @app.patch(
        f"{API}/request_image/{{request_id}}",
        response_model=RequestDetail,
        responses=_errors(400, 401, 403, 404, 409, 422),
        operation_id="patch_request",
        summary="approve (admins; restarts a failed request at its failed stage), deny, cancel",
    )
    def patch(request_id: RequestId, body: Patch, actor: Auth) -> RequestDetail:
        store.get(request_id, actor)
        if (body.allow or body.secrets) and body.status != "approve":
            raise fail(422, "allow and secrets go with approve")
        req = store.transition(request_id, body.status, actor, body.reason, allow=body.allow,
                               secrets=body.secrets)  # fmt: skip
        log.info("request %s: %s by %s", request_id, body.status, actor.name)
        return RequestDetail.of(req, base)

    def stream(
        req: ImageRequest, name: str, media_type: str, headers: dict[str, str]
    ) -> StreamingResponse | None:
        try:
            found = records.open(req.id, name)
        except ImagingError as e:
            raise fail(503, str(e)) from None
        if found is None:
            return None
        chunks, size = found
        return StreamingResponse(chunks, media_type=media_type,
                                 headers={**headers, "Content-Length": str(size)})  # fmt: skip

    @app.get(
        f"{API}/request_image/{{request_id}}/artifact",
        response_class=StreamingResponse,
        responses={
            200: {"content": {"application/octet-stream": {}}, "description": "the artifact"},
            **_errors(401, 404, 409, 422),
        },
        operation_id="download_artifact",
        summary="Download the artifact (its owner and admins)",
    )
    def artifact(request_id: RequestId, actor: Auth) -> StreamingResponse:
        req = store.get(request_id, actor)
        if req.state != "completed":
            raise fail(409, f"request {req.id} is {req.state}: no artifact to download")
        result = req.result or {}
        name = artifact_name(result)
        sha = str(result.get("sha256", ""))
        filename = name.rpartition("/")[2] if name else ""
        found = name and stream(req, name, "application/octet-stream", {
            "X-Checksum-Sha256": sha, "Content-Disposition": f'attachment; filename="{filename}"'})  # fmt: skip
        if not found:
            raise fail(404, f"the artifact of {req.id} is no longer there")
        return found

    @app.get(
        f"{API}/request_image/{{request_id}}/notebooks",
        response_model=list[NotebookOut],
        responses=_errors(401, 404, 422),
        operation_id="list_notebooks",
        summary="The executed notebooks of the request's run",
    )
    def notebooks(request_id: RequestId, actor: Auth) -> list[NotebookOut]:
        req = store.get(request_id, actor)
        try:
            names = records.names(req.id, "notebooks/")
        except ImagingError as e:
            raise fail(503, str(e)) from None
        found = []
        for name in names:
            stem = name.removeprefix("notebooks/").removesuffix(".ipynb")
            if name.endswith(".ipynb") and re.fullmatch(NOTEBOOK, stem):
                html_ = f"notebooks/{stem}.html" in names
                found.append(NotebookOut(name=stem, stage=stem.split(".")[0], failed=".failed-" in stem,
                                         abandoned=".attempt-" in stem,
                                         html=f"{base}/{req.id}/notebooks/{stem}" if html_ else None))  # fmt: skip
        return sorted(found, key=lambda n: n.name)

    @app.get(
        f"{API}/request_image/{{request_id}}/notebooks/{{notebook}}",
        response_class=StreamingResponse,
        responses={
            200: {"content": {"text/html": {}}, "description": "the notebook as HTML"},
            **_errors(401, 404, 422),
        },
        operation_id="read_notebook",
        summary="An executed notebook, as HTML",
    )
    def notebook(request_id: RequestId, notebook: Annotated[str, PathParam(pattern=NOTEBOOK)],
                 actor: Auth) -> StreamingResponse:  # fmt: skip
        req = store.get(request_id, actor)
        found = stream(req, f"notebooks/{notebook}.html", "text/html; charset=utf-8",
                       {"Content-Security-Policy": CSP})  # fmt: skip
        if found is None:
            raise fail(404, f"request {req.id} has no notebook {notebook}")
        return found

    @app.get(
        f"{API}/request_image/{{request_id}}/report",
        response_class=StreamingResponse,
        responses={
            200: {"content": {"text/html": {}}, "description": "the run's report.html"},
            **_errors(401, 404, 409, 422),
        },
        operation_id="read_report",
        summary="The run's report for an auditor (written when the run ends, completed or failed)",
    )
    def run_report(request_id: RequestId, actor: Auth) -> StreamingResponse:
        req = store.get(request_id, actor)
        found = stream(req, "report.html", "text/html; charset=utf-8", {"Content-Security-Policy": CSP})
        if found is None:  # the request is there; its report is not yet
            raise fail(409, f"request {req.id} has no report yet: its run has not ended")
        return found

    @app.get(
        f"{API}/request_image/{{request_id}}/audit",
        response_model=AuditOut,
        responses=_errors(401, 404, 422),
        operation_id="audit_record",
        summary="The run's audit chain, verified now (every file read back from the record)",
    )
    def audit_record(request_id: RequestId, actor: Auth) -> AuditOut:
        req = store.get(request_id, actor)
        try:
            found = records.open(req.id, "audit.json")
            chain = json.loads(b"".join(found[0])) if found else None
            if chain is None:
                report = audit.Report(req.id, False, 0, audit.GENESIS, [f"run {req.id} has no audit.json"])
            else:
                report = audit.verify_chain(req.id, chain, lambda name, like: records.digest(req.id, name, like),
                                            (req.result or {}).get("audit_head"))  # fmt: skip
        except (ImagingError, ValueError) as e:
            raise fail(503, f"the audit record of {req.id} cannot be read: {e}") from None
        entries = chain["entries"] if chain else []
        return AuditOut(
            run=req.id, ok=report.ok, head=report.head, problems=report.problems, entries=entries
        )

    Token = Annotated[
        str, Query(min_length=1, max_length=1000, description="the signed token from the mail")
    ]

    @app.get(
        f"{API}/approve",
        response_class=HTMLResponse,
        responses={
            200: {"content": {"text/html": {}}, "description": "a confirmation page"},
            **_errors(403, 404, 409, 410, 422),
        },
        operation_id="approve_page",
        summary="The confirmation page of an approve link (changes nothing)",
    )
    def approve_page(token: Token) -> HTMLResponse:
        req, admin = _approval(store, settings, token, consume=False)
        rows = "".join(
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in _summary(req)
        )
        return _page(f"Approve request {req.id}?",
                     f"<table>{rows}</table><form method='post'><button type='submit'>Approve as "
                     f"{html.escape(admin.name)}</button></form>")  # fmt: skip

    @app.post(
        f"{API}/approve",
        response_class=HTMLResponse,
        responses={
            200: {"content": {"text/html": {}}, "description": "approved"},
            **_errors(403, 404, 409, 410, 422),
        },
        operation_id="approve_by_link",
        summary="Approve by the link from the mail (its confirmation page's button)",
    )
    def approve(token: Token) -> HTMLResponse:
        req, admin = _approval(store, settings, token, consume=True)
        log.info("request %s: approve by %s (mail link)", req.id, admin.name)
        return _page(
            f"Request {req.id} approved", f"<p>{html.escape(req.name)} is {html.escape(req.state)}.</p>"
        )

    @app.get(
        f"{API}/me",
        response_model=UserOut,
        responses=_errors(401),
        operation_id="whoami",
        summary="Who the token belongs to",
    )
    def me(actor: Auth) -> UserOut:
        (found,) = store.users([actor.name])
        return UserOut(name=found.name, role=found.role, email=found.email)  # type: ignore[arg-type]

    return app


def _approval(store: Store, settings: Settings, token: str, *, consume: bool) -> tuple[ImageRequest, Any]:
    approval = approvals.check_approval(settings.signing_key(), token, settings.approval_ttl_seconds)
    admins = [u for u in store.users(role="admin") if u.id == approval.admin_id]
    if not admins:
        raise approvals.ApprovalRefused("this approval link's admin is no longer an admin", 403)
    admin = admins[0]
    actor = Actor(admin.name, "admin", admin.id)
    if not consume:
        req = store.get(approval.request_id)
        if req.version != approval.version:
            raise approvals.ApprovalRefused(
                f"this approval link is out of date: the request is {req.state} now", 409
            )
        return req, admin
    req = store.transition(
        approval.request_id, "approve", actor, "approved by the link in the mail", approval=approval
    )
    return req, admin


def _summary(req: ImageRequest) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [
        ("request", req.id),
        ("owner", req.owner.name),
        ("name", req.name),
        ("instance", req.instance),
        ("kind", req.kind),
        ("format", req.disk_format),
        ("target", req.target),
        ("state", req.state),
    ]
    if req.kind == "image":
        rows += [("visibility", req.vis), ("shared with", ", ".join(req.shared_with) or "-")]
    rows += options(req)
    if req.error:
        rows += [("error", req.error), ("resumes at", req.stage or "the start")]
    return rows


def _page(title: str, body: str) -> HTMLResponse:
    text = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
            f"<body><h1>{html.escape(title)}</h1>{body}</body></html>")  # fmt: skip
    return HTMLResponse(text, headers={"Content-Security-Policy": "default-src 'none'; form-action 'self'"})


def _one_line(err: RequestValidationError) -> str:
    first = err.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    where = ".".join(loc)
    if first.get("type") == "extra_forbidden":
        return f"unknown field {where!r}"
    if first.get("type") == "json_invalid":
        return NOT_JSON
    msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


def _handlers(app: FastAPI) -> None:
    def body(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"detail": message}, status_code=status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 400 and "parsing the body" in str(
            exc.detail
        ):  # FastAPI's, for bytes not UTF-8
            return body(400, NOT_JSON)
        return body(exc.status_code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        message = _one_line(exc)
        # A body that is not JSON at all is a bad request; JSON with wrong fields, unprocessable.
        return body(400 if message == NOT_JSON else 422, message)

    @app.exception_handler(ParameterError)
    async def unprocessable(request: Request, exc: ParameterError) -> Response:
        return body(422, str(exc))

    @app.exception_handler(StoreError)
    async def refused(request: Request, exc: StoreError) -> Response:
        return body(exc.status, str(exc))

    @app.exception_handler(approvals.ApprovalRefused)
    async def bad_link(request: Request, exc: approvals.ApprovalRefused) -> Response:
        return body(exc.status, str(exc))

    @app.middleware("http")
    async def access_log(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        t0 = time.monotonic()
        response = await call_next(request)
        if response.status_code == 405:
            # Starlette names only the first route's methods where routes share a path.
            allowed = {
                m
                for r in app.routes
                if isinstance(r, APIRoute) and r.path_regex.match(request.url.path)
                for m in r.methods or ()
            }
            response.headers["Allow"] = ", ".join(sorted(allowed))
        # Path only: approval tokens travel in the query string, bearer tokens in a header.
        log.info(
            "%s %s %d %.0f ms",
            request.method,
            request.url.path,
            response.status_code,
            1000 * (time.monotonic() - t0),
        )
        return response
