"""The web page (``/web/``): users ask for images and watch their runs, admins approve, in the
same FastAPI app as the API, server-rendered (Jinja2), usable without JavaScript but for the live
progress (static/progress.js polls a fragment every 3 s of the request's page).

Sign-in: a one-time link mailed to the user's address (signed with the service's key, used once:
its nonce is kept beside the approval links' ones), or, behind a reverse proxy that
authenticates, a trusted header (``web.trusted_header``, e.g. REMOTE_USER). A signed-in browser
holds a session cookie (HttpOnly, SameSite=Strict, signed, with a lifetime) that carries the
session's CSRF token; every form that changes something sends it back and is refused (403)
without it. A GET never changes state. Secrets (the link's token, the cookie) never reach a log:
the access log names the path only, and links travel in the mail and in forms' bodies.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, BackgroundTasks, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from pydantic import ValidationError
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError

from imaging import config
from imaging.errors import ImagingError, ParameterError, StoreError
from imaging.run import record
from imaging.service.notify import Mailer, facts
from imaging.service.schemas import REQUEST_ID, CreateRequest, artifact_name, validated
from imaging.service.settings import Settings
from imaging.service.store import Actor, ImageRequest, Store, UsedApproval, User, now

log = logging.getLogger("imaging.service.web")
HERE = Path(__file__).parent
WEB = "/web"
COOKIE = "imaging_session"
PAGE = 50  # requests per page of a list
_SESSION_SALT, _SIGNIN_SALT, _CSRF_SALT = "imaging.session.v1", "imaging.signin.v1", "imaging.csrf.v1"
STATES = ("pending", "approved", "running", "completed", "error", "denied", "cancelled")
LIVE = frozenset({"pending", "approved", "running"})
# Scripts from this origin only (progress.js); no inline script; forms post here only.
CSP = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'"  # noqa: E501
FIELDS = ("instance", "name", "kind", "disk_format", "target", "vis", "shared_with", "destination", "profile",
          "clean", "packages_install", "packages_remove", "layout", "firmware", "boot_marker")  # fmt: skip
_LISTS = ("shared_with", "clean", "packages_install", "packages_remove")


class WebError(ImagingError):
    """A page that cannot be shown: its HTTP status and one line for the person."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


async def _posted(request: Request) -> dict[str, list[str]]:
    """A form's fields (application/x-www-form-urlencoded), read before a (sync) route runs."""
    body = (await request.body()).decode("utf-8", "replace")
    try:
        return parse_qs(body, keep_blank_values=True, max_num_fields=2000)
    except ValueError:
        raise WebError("the form has too many fields", 400) from None


# Routes are plain functions (run in a thread: the store is synchronous); their forms come read.
Form = Annotated[dict[str, list[str]], Depends(_posted)]


@dataclass(frozen=True)
class Viewer:
    user: User
    csrf: str

    @property
    def actor(self) -> Actor:
        return Actor(self.user.name, self.user.role, self.user.id)

    @property
    def admin(self) -> bool:
        return self.user.role == "admin"


def install(app: FastAPI, store: Store, settings: Settings, mailer: Mailer, records: record.Reader) -> None:
    """The web page's routes, static files and error pages, in ``app``."""
    pages = Pages(store, settings, mailer, records)
    app.mount(f"{WEB}/static", StaticFiles(directory=HERE / "static"), name="web-static")
    app.include_router(pages.router())

    @app.exception_handler(WebError)
    async def web_error(request: Request, exc: WebError) -> Response:
        if exc.status == 401 and request.method == "GET" and not request.url.path.endswith("/progress"):
            return RedirectResponse(f"{WEB}/signin", 303)  # a page opened signed out: sign in first
        return pages.render(request, "error.html", None, {"message": str(exc)}, status=exc.status)


class Pages:
    def __init__(self, store: Store, settings: Settings, mailer: Mailer, records: record.Reader) -> None:
        self.store, self.settings, self.mailer, self.records = store, settings, mailer, records
        self.templates = Jinja2Templates(directory=HERE / "templates")
        self.secure = settings.public_url.startswith("https://")

    # sessions and CSRF

    def _serializer(self, salt: str) -> URLSafeTimedSerializer:
        return URLSafeTimedSerializer(self.settings.signing_key(), salt=salt)

    def viewer(self, request: Request) -> Viewer | None:
        header = self.settings.web.trusted_header
        if header and request.headers.get(header):
            name = request.headers[header]
            found = self.store.users([name])
            if not found:
                raise WebError(f"{header} names {name!r}, who is not a user of this service", 403)
            # No cookie to carry a token: the form's token is the user's, signed with the key.
            mac = hmac.new(self.settings.signing_key().encode(), f"{_CSRF_SALT}:{name}".encode(), "sha256")
            return Viewer(found[0], mac.hexdigest())
        cookie = request.cookies.get(COOKIE)
        if not cookie:
            return None
        try:
            data = self._serializer(_SESSION_SALT).loads(cookie, max_age=self.settings.web.session_seconds)
            uid, name, csrf = int(data["u"]), str(data["n"]), str(data["c"])
        except (BadSignature, KeyError, TypeError, ValueError):
            return None
        found = [u for u in self.store.users([name]) if u.id == uid]
        return Viewer(found[0], csrf) if found else None

    def signed_in(self, request: Request) -> Viewer:
        viewer = self.viewer(request)
        if viewer is None:
            raise WebError("sign in first", 401)
        return viewer

    def checked(self, form: dict[str, list[str]], viewer: Viewer) -> dict[str, list[str]]:
        """The posted form, its CSRF token checked (a form from another session is refused)."""
        sent = (form.get("csrf") or [""])[0]
        if not hmac.compare_digest(sent.encode(), viewer.csrf.encode()):
            raise WebError(
                "this form is out of date (its session ended): reload the page and try again", 403
            )
        return form

    def render(self, request: Request, name: str, viewer: Viewer | None, context: dict[str, Any],
               status: int = 200) -> HTMLResponse:  # fmt: skip
        response = self.templates.TemplateResponse(
            request, name, {"viewer": viewer, "web": WEB, **context}, status_code=status
        )
        response.headers["Content-Security-Policy"] = CSP
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"  # the sign-in page's URL holds its token
        return response

    def request_of(self, request_id: str, viewer: Viewer) -> ImageRequest:
        if not re.fullmatch(REQUEST_ID, request_id):
            raise WebError(f"no image request {request_id}", 404)
        try:
            return self.store.get(request_id, viewer.actor)
        except StoreError as e:
            raise WebError(str(e), e.status) from None

    def router(self) -> APIRouter:
        r = APIRouter(prefix=WEB, include_in_schema=False)

        @r.get("/")
        def home(request: Request) -> Response:
            return RedirectResponse(f"{WEB}/requests" if self.viewer(request) else f"{WEB}/signin", 303)

        @r.get("/signin")
        def signin_page(request: Request) -> Response:
            return self.render(request, "signin.html", None, {"sent": False})

        @r.post("/signin")
        def signin_mail(request: Request, form: Form, tasks: BackgroundTasks) -> Response:
            address = (form.get("email") or [""])[0].strip().lower()
            users = [u for u in self.store.users() if u.email and u.email.lower() == address]
            if users:
                tasks.add_task(self.mail_signin, users[0])
            # The same answer either way: the page does not tell who has an account.
            return self.render(request, "signin.html", None, {"sent": True})

        @r.get("/signin/link")
        def signin_confirm(request: Request, token: str = "") -> Response:
            user = self.signin_user(token, consume=False)
            return self.render(request, "signin_link.html", None, {"user": user, "token": token})

        @r.post("/signin/link")
        def signin(form: Form) -> Response:
            user = self.signin_user((form.get("token") or [""])[0], consume=True)
            data = {"u": user.id, "n": user.name, "c": secrets.token_urlsafe(24)}
            response = RedirectResponse(f"{WEB}/requests", 303)
            response.set_cookie(COOKIE, str(self._serializer(_SESSION_SALT).dumps(data)),
                                max_age=self.settings.web.session_seconds, path="/", httponly=True,
                                samesite="strict", secure=self.secure)  # fmt: skip
            log.info("web: %s signed in", user.name)
            return response

        @r.post("/signout")
        def signout(request: Request, form: Form) -> Response:
            self.checked(form, self.signed_in(request))
            response = RedirectResponse(f"{WEB}/signin", 303)
            response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict", secure=self.secure)
            return response

        @r.get("/requests")
        def requests(request: Request, state: str = "", page: int = 1) -> Response:
            viewer = self.signed_in(request)
            state_ = state if state in STATES else None
            page = max(1, min(page, 100_000))
            found = self.store.list_requests(viewer.actor, state_, PAGE + 1, (page - 1) * PAGE)
            return self.render(request, "requests.html", viewer, {
                "requests": found[:PAGE], "state": state_ or "", "states": STATES, "page": page,
                "more": len(found) > PAGE})  # fmt: skip

        @r.get("/requests/new")
        def new(request: Request) -> Response:
            viewer = self.signed_in(request)
            return self.render(request, "new.html", viewer, self.form_context({}, {}))

        @r.post("/requests")
        def create(request: Request, form: Form, tasks: BackgroundTasks) -> Response:
            viewer = self.signed_in(request)
            self.checked(form, viewer)
            # The name as typed (its own check says what is wrong with its spaces); the rest trimmed.
            values = {
                k: (form.get(k) or [""])[0] if k == "name" else (form.get(k) or [""])[0].strip()
                for k in FIELDS
            }
            body, errors = self.create_body(values)
            if body is not None:
                try:
                    req = self.store.create(viewer.actor, **validated(body, self.settings, self.store))
                except ParameterError as e:
                    errors = _field_error(str(e))
                else:
                    log.info("request %s created by %s (web)", req.id, viewer.user.name)
                    tasks.add_task(self.mailer.request_created, req)
                    return RedirectResponse(f"{WEB}/requests/{req.id}", 303)
            return self.render(request, "new.html", viewer, self.form_context(values, errors), status=422)

        @r.get("/requests/{request_id}")
        def show(request: Request, request_id: str) -> Response:
            viewer = self.signed_in(request)
            req = self.request_of(request_id, viewer)
            return self.render(request, "request.html", viewer, self.detail(req, viewer))

        @r.get("/requests/{request_id}/progress")
        def progress(request: Request, request_id: str) -> Response:
            # Polled by every open page of a live request: one narrow row, no history, no owner.
            viewer = self.signed_in(request)
            with self.store.session() as s:
                row = s.execute(select(*_LIGHT).where(ImageRequest.id == request_id)).one_or_none()
            if row is None or not (viewer.admin or row.owner_id == viewer.user.id):
                raise WebError(f"no image request {request_id}", 404)
            return self.render(request, "progress.html", viewer, {"req": row, "p": self.progress(row)})

        @r.post("/requests/{request_id}")
        def act(request: Request, request_id: str, form: Form) -> Response:
            viewer = self.signed_in(request)
            self.checked(form, viewer)
            req = self.request_of(request_id, viewer)
            status = (form.get("status") or [""])[0]
            if status not in ("approve", "deny", "cancel"):
                raise WebError("status: approve, deny or cancel", 422)
            allow = [f for f in form.get("allow", []) if re.fullmatch(r"[0-9a-f]{16}", f)]
            policy = (form.get("secrets") or [""])[0] or None
            if policy not in (None, "fail", "warn", "clean", "off"):
                raise WebError("secrets: fail, warn, clean or off", 422)
            if (allow or policy) and status != "approve":
                raise WebError("allow and secrets go with approve", 422)
            reason = (form.get("reason") or [""])[0][:500]
            try:
                self.store.transition(
                    req.id, status, viewer.actor, reason, allow=allow or None, secrets=policy
                )
            except StoreError as e:
                raise WebError(str(e), e.status) from None
            log.info("request %s: %s by %s (web)", req.id, status, viewer.user.name)
            return RedirectResponse(f"{WEB}/requests/{req.id}", 303)

        @r.get("/requests/{request_id}/artifact")
        def artifact(request: Request, request_id: str) -> Response:
            req = self.request_of(request_id, self.signed_in(request))
            name = artifact_name(req.result or {}) if req.state == "completed" else ""
            found = name and self.stream(req, name, "application/octet-stream", {
                "X-Checksum-Sha256": str((req.result or {}).get("sha256", "")),
                "Content-Disposition": f'attachment; filename="{name.rpartition("/")[2]}"'})  # fmt: skip
            if not found:
                raise WebError(f"request {req.id} has no artifact to download", 404)
            return found

        @r.get("/requests/{request_id}/report")
        def report(request: Request, request_id: str) -> Response:
            req = self.request_of(request_id, self.signed_in(request))
            found = self.stream(req, "report.html", "text/html; charset=utf-8", {})
            if found is None:
                raise WebError(f"request {req.id} has no report yet: its run has not ended", 404)
            return found

        @r.get("/requests/{request_id}/notebooks/{notebook}")
        def notebook(request: Request, request_id: str, notebook: str) -> Response:
            req = self.request_of(request_id, self.signed_in(request))
            found = None
            if re.fullmatch(r"[0-9]{2}-[a-z0-9-]{1,40}(\.(failed|attempt)-[0-9]{1,4})?", notebook):
                found = self.stream(req, f"notebooks/{notebook}.html", "text/html; charset=utf-8", {})
            if found is None:
                raise WebError(f"request {req.id} has no notebook {notebook}", 404)
            return found

        @r.get("/workers")
        def workers(request: Request) -> Response:
            viewer = self.signed_in(request)
            if not viewer.admin:
                raise WebError("the workers page is for admins", 403)
            with self.store.session() as s:
                rows = s.execute(text(_WORKERS)).mappings().all()
                queue = s.execute(text(_QUEUE)).mappings().all()
            return self.render(request, "workers.html", viewer, {"workers": rows, "queue": queue})

        return r

    # sign-in links

    def mail_signin(self, user: User) -> None:
        token = self._serializer(_SIGNIN_SALT).dumps({"u": user.id, "n": secrets.token_urlsafe(12)})
        link = f"{self.settings.public_url}{WEB}/signin/link?{urlencode({'token': token})}"
        minutes = self.settings.web.signin_ttl_seconds // 60
        self.mailer.send(user.email or "", "[imaging] your sign-in link", "\n".join([
            f"Sign in to imaging as {user.name} (a page with a button opens; the link works once, "
            f"for {minutes} minutes):", f"  {link}", "",
            "If you did not ask for it, ignore this mail."]) + "\n")  # fmt: skip

    def signin_user(self, token: str, *, consume: bool) -> User:
        try:
            data = self._serializer(_SIGNIN_SALT).loads(token, max_age=self.settings.web.signin_ttl_seconds)
            uid, nonce = int(data["u"]), str(data["n"])
        except SignatureExpired:
            raise WebError("this sign-in link has expired: ask for another", 410) from None
        except (BadSignature, KeyError, TypeError, ValueError):
            raise WebError("this sign-in link is not valid", 403) from None
        users = [u for u in self.store.users() if u.id == uid]
        if not users:
            raise WebError("this sign-in link's user is gone", 403)
        try:
            with self.store.session() as s:
                if s.get(UsedApproval, nonce) is not None:
                    raise WebError("this sign-in link was used already: ask for another", 409)
                if consume:  # the approval links' table of used nonces, "sign-in" for a request
                    s.add(UsedApproval(nonce=nonce, request_id="sign-in", used=now()))
        except IntegrityError:
            raise WebError("this sign-in link was used already: ask for another", 409) from None
        return users[0]

    # the request form

    def form_context(self, values: dict[str, str], errors: dict[str, str]) -> dict[str, Any]:
        return {
            "values": values, "errors": errors, "instances": sorted(self.settings.instances),
            "formats": [f.value for f in config.ImageFormat], "targets": config.available("targets"),
            "publishing": self.settings.publishing(), "profiles": config.available("profiles"),
        }  # fmt: skip

    def create_body(self, values: dict[str, str]) -> tuple[CreateRequest | None, dict[str, str]]:
        fields: dict[str, Any] = {}
        for k, v in values.items():
            if k == "kind" or not v:
                continue
            fields[k] = [x for x in re.split(r"[,\s]+", v) if x] if k in _LISTS else v
        if values.get("kind", "export") == "export":
            fields.setdefault("disk_format", "qcow2")
        else:
            fields.pop("disk_format", None)
        if "instance" not in fields:
            return None, {"instance": "required"}
        if "name" not in fields:
            return None, {"name": "required"}
        try:
            return CreateRequest(**fields), {}
        except ValidationError as e:
            first = e.errors()[0]
            where = str(first["loc"][0]) if first.get("loc") else ""
            return None, {where or "_": str(first.get("msg", "invalid")).removeprefix("Value error, ")}

    # a request's page

    def detail(self, req: ImageRequest, viewer: Viewer) -> dict[str, Any]:
        names: dict[str, int] = {}
        try:
            names = self.records.names(req.id, "")
        except ImagingError as e:
            log.warning("request %s: its record cannot be listed: %s", req.id, e)
        notebooks = sorted(n.removeprefix("notebooks/").removesuffix(".html") for n in names
                           if n.startswith("notebooks/") and n.endswith(".html"))  # fmt: skip
        return {"req": req, "described": facts(req),
                "p": self.progress(req), "notebooks": notebooks, "report": "report.html" in names,
                "scan": self.secret_scan(req) if viewer.admin else None}  # fmt: skip

    def secret_scan(self, req: ImageRequest) -> dict[str, Any] | None:
        try:
            found = self.records.open(req.id, "results/25-secrets.json")
            return json.loads(b"".join(found[0])) if found else None
        except (ImagingError, ValueError) as e:
            log.warning("request %s: its secret scan cannot be read: %s", req.id, e)
            return None

    def progress(self, req: Any) -> dict[str, Any]:
        """Stage n of m; while it runs here, the bytes of its work disks and the boot's console."""
        stages = config.pipeline_stages(req.kind)
        stage = (req.stage or "").split(".")[0]
        done = stages.index(stage) + (req.state != "running") if stage in stages else 0
        if req.state == "completed":
            done = len(stages)
        run = config.runs_dir() / req.id
        work, tail = 0, []
        if req.state == "running" and run.is_dir():
            work = sum(p.stat().st_blocks * 512 for p in (run / "work").glob("*") if p.is_file())
            serial = run / "verify" / "serial.log"
            if stage == "50-verify" and serial.is_file():
                with serial.open("rb") as f:
                    f.seek(max(0, serial.stat().st_size - 4096))
                    tail = f.read().decode("utf-8", "replace").splitlines()[-12:]
        return {"stages": stages, "n": min(done + (req.state == "running"), len(stages)), "m": len(stages),
                "percent": round(100 * done / len(stages)), "stage": req.stage, "bytes": work,
                "tail": tail, "live": req.state in LIVE}  # fmt: skip

    def stream(
        self, req: ImageRequest, name: str, media_type: str, headers: dict[str, str]
    ) -> Response | None:
        try:
            found = self.records.open(req.id, name)
        except ImagingError as e:
            raise WebError(str(e), 503) from None
        if found is None:
            return None
        chunks, size = found
        if media_type.startswith("text/html"):  # a rendered record: no script of it runs
            headers = {
                **headers,
                "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:",
            }
        return StreamingResponse(
            chunks, media_type=media_type, headers={**headers, "Content-Length": str(size)}
        )


def _field_error(message: str) -> dict[str, str]:
    """A one-line error of the checks, next to its field where it names one ("vis: required")."""
    head, sep, rest = message.partition(": ")
    if sep and head in FIELDS:
        return {head: rest}
    for field in ("name", "instance", "target", "destination", "profile", "clean", "layout", "firmware"):
        if re.match(rf"(unknown )?{field}\b", message):
            return {field: message}
    if "format" in message:
        return {"disk_format": message}
    return {"_": message}


# What a request's progress needs (the live part of its page).
_LIGHT = (ImageRequest.id, ImageRequest.owner_id, ImageRequest.kind, ImageRequest.state, ImageRequest.stage,
          ImageRequest.error)  # fmt: skip

# Procrastinate's workers with what each runs, and the requests waiting for one.
_WORKERS = """
SELECT w.id, w.last_heartbeat, r.id AS request_id, r.name, r.stage, r.worker
  FROM procrastinate_workers w
  LEFT JOIN procrastinate_jobs j ON j.worker_id = w.id AND j.status = 'doing'
  LEFT JOIN image_requests r ON r.id = j.args->>'request_id'
 ORDER BY w.id, r.id
"""
_QUEUE = """
SELECT r.id, r.name, r.updated, u.name AS owner
  FROM image_requests r JOIN users u ON u.id = r.owner_id
 WHERE r.state = 'approved' ORDER BY r.updated LIMIT 100
"""
