"""What the HTTP API takes and gives: pydantic models (FastAPI's OpenAPI description is made from
them, so they are the contract schemathesis checks the service against), the checks a new request
passes against this service's instances, formats, targets and users, and what the description
needs besides what FastAPI reads from the code."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from imaging import config
from imaging.errors import ParameterError
from imaging.run.request import Request
from imaging.service.settings import Settings
from imaging.service.store import ImageRequest, Store, Transition

API_PREFIX = "/api/v1"
REQUEST_ID = r"^ir-[0-9a-f]{12}$"
NOTEBOOK = r"^[0-9]{2}-[a-z0-9-]{1,40}(\.(failed|attempt)-[0-9]{1,4})?$"
Vis = Literal["public", "private", "selected"]
StateName = Literal["pending", "approved", "running", "completed", "error", "denied", "cancelled"]


class Error(BaseModel):
    detail: str = Field(description="what went wrong, in one line")


class CreateRequest(BaseModel):
    """An image request, or with ``disk_format`` an export request."""

    model_config = ConfigDict(extra="forbid")

    instance: str = Field(
        min_length=1,
        max_length=80,
        description="instance id, as configured on the service, or CLOUD/INSTANCE in a configured cloud",
    )
    name: str = Field(
        min_length=1,
        max_length=255,
        description="the image's name: 1-255 printable characters, no control characters",
    )
    vis: Vis | None = Field(default=None, description="image requests: who may use the image (required)")
    shared_with: list[str] | None = Field(
        default=None, max_length=100, description="user names; only, and then required, when vis is selected"
    )
    disk_format: str | None = Field(
        default=None, max_length=16, description="export requests: raw, qcow2, ..."
    )
    target: str | None = Field(default=None, max_length=40, description="machine the disk is made for (kvm)")
    # What the CLI's export can set besides (checked by the run's own model, imaging/run/request.py):
    profile: str | None = Field(
        default=None, max_length=40, description="distro profile: auto or a profile's name"
    )
    clean: list[Annotated[str, Field(max_length=64)]] | None = Field(
        default=None,
        max_length=64,
        description="clean operations to add (name) or drop (-name), or all / none",
    )
    packages_install: list[Annotated[str, Field(max_length=100)]] | None = Field(
        default=None, max_length=100, description="packages to install in the guest"
    )
    packages_remove: list[Annotated[str, Field(max_length=100)]] | None = Field(
        default=None, max_length=100, description="packages to remove from the guest"
    )
    layout: Literal["aligned", "legacy"] | None = Field(
        default=None, description="partition 1 at 1 MiB (aligned) or at sector 63 (legacy)"
    )
    firmware: Literal["bios", "uefi", "hybrid"] | None = Field(
        default=None,
        description="what the disk boots under (default: hybrid where the target and guest boot both)",
    )
    boot_marker: str | None = Field(
        default=None,
        max_length=200,
        description="regular expression in the serial log that proves the boot, besides a login prompt",
    )
    destination: str | None = Field(
        default=None,
        max_length=40,
        description="image requests: s3 or a configured cloud (default: the service's)",
    )


class Patch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Literal["approve", "deny", "cancel"] = Field(
        description="approve (admins; on a request in error it resumes the run), deny (admins), cancel"
    )
    reason: str = Field(default="", max_length=500)
    # An admin's answer to the secret scan (25-secrets) when approving: findings that are meant
    # to be there, by fingerprint, and what the others do now.
    allow: list[Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]] = Field(
        default=[], max_length=1000, description="approve: fingerprints of secret-scan findings to allow"
    )
    secrets: Literal["fail", "warn", "clean", "off"] | None = Field(
        default=None, description="approve: the secret scan's policy for this request from now on"
    )


class TransitionOut(BaseModel):
    time: datetime
    actor: str
    from_: StateName | None = Field(serialization_alias="from")
    to: StateName
    stage: str | None
    reason: str

    @classmethod
    def of(cls, t: Transition) -> TransitionOut:
        return cls.model_validate(
            {
                "time": t.time,
                "actor": t.actor,
                "from_": t.from_state,
                "to": t.to_state,
                "stage": t.stage,
                "reason": t.reason,
            }  # fmt: skip
        )


class RequestOut(BaseModel):
    id: str
    owner: str
    instance: str
    name: str
    kind: Literal["image", "export"]
    vis: Vis | None
    shared_with: list[str]
    disk_format: str
    target: str
    options: dict[str, Any] = Field(description="profile, clean, packages, layout, destination: as asked")
    state: StateName
    stage: str | None = Field(description="the stage it is in (running) or failed at (error)")
    worker: str | None = Field(default=None, description="the worker (host:pid) that runs or last ran it")
    error: str | None
    created: datetime
    updated: datetime
    result: dict[str, Any] | None = Field(
        description="the run's result.json (path, sha256, boot, ...) and audit head"
    )
    links: dict[str, str]

    @classmethod
    def of(cls, req: ImageRequest, base: str) -> RequestOut:
        return cls(**_fields(req, base))


class RequestDetail(RequestOut):
    history: list[TransitionOut]

    @classmethod
    def of(cls, req: ImageRequest, base: str) -> RequestDetail:
        return cls(**_fields(req, base), history=[TransitionOut.of(t) for t in req.transitions])


def _fields(req: ImageRequest, base: str) -> dict[str, Any]:
    url = f"{base}/{req.id}"
    links = {
        "self": url,
        "notebooks": f"{url}/notebooks",
        "audit": f"{url}/audit",
        "report": f"{url}/report",
    }
    if req.state == "completed":
        links["artifact"] = f"{url}/artifact"
    return dict(
        id=req.id,
        owner=req.owner.name,
        instance=req.instance,
        name=req.name,
        kind=req.kind,
        vis=req.vis,
        shared_with=list(req.shared_with or []),
        disk_format=req.disk_format,
        target=req.target,
        options=dict(req.options or {}),
        state=req.state,
        stage=req.stage,
        worker=req.worker,
        error=req.error,
        created=req.created,
        updated=req.updated,
        result=req.result,
        links=links,
    )


class NotebookOut(BaseModel):
    name: str
    stage: str
    failed: bool = Field(description="an attempt that failed (kept for the record)")
    abandoned: bool = Field(
        default=False,
        description="a stage of an earlier attempt of the whole run, abandoned with its host and run again",
    )
    html: str | None = Field(description="URL of its HTML render")


class AuditEntry(BaseModel):
    n: int
    kind: str
    file: str
    sha256: str
    prev: str
    from_: str | None = Field(
        default=None, alias="from", description="moved entries: the file's name before"
    )
    hash: str


class AuditOut(BaseModel):
    run: str
    ok: bool
    head: str
    problems: list[str]
    entries: list[AuditEntry]


class UserOut(BaseModel):
    name: str
    role: Literal["user", "admin"]
    email: str | None


OPTIONS = ("profile", "clean", "packages_install", "packages_remove", "layout", "firmware", "boot_marker")


def validated(body: CreateRequest, settings: Settings, store: Store) -> dict[str, Any]:
    """The request's fields, checked against the service's instances, formats, targets, users and
    clouds, and then by the run's own Request model: the same checks and one-line errors as the
    CLI's, before anyone is asked to approve."""
    config.check_display_name(body.name)
    destination = None
    if body.disk_format is None:  # an image request: made for where it is published
        if not settings.publishing():
            raise ParameterError(
                "this service does not publish images: ask for an export (with disk_format)"
            )
        destination = settings.check_destination(body.destination or settings.default_destination())
    image_target, image_format = settings.image_machine(destination)
    disk_format = check_disk_format(body.disk_format) if body.disk_format is not None else image_format
    target = config.load_target(body.target or image_target or config.default_target(disk_format)).name
    config.check_target_format(target, disk_format)
    source = settings.source_of(body.instance)
    options = {k: getattr(body, k) for k in OPTIONS if getattr(body, k) is not None}
    if destination is None:
        if body.vis is not None or body.shared_with is not None or body.destination is not None:
            raise ParameterError(
                "vis, shared_with and destination belong to image requests (those without disk_format)"
            )
        check_limits(source, body.name, "export", disk_format, target)
        fields: dict[str, Any] = dict(instance=body.instance, name=body.name, kind="export", vis=None, shared_with=[],
                      disk_format=disk_format, target=target)  # fmt: skip
    else:
        fields = _image_fields(body, settings, store, target, disk_format)
        options["destination"] = destination
    Request.create(source=source, name=body.name, kind=fields["kind"], format=fields["disk_format"], target=target,
                   vis=fields["vis"] or "private", shared_with=fields["shared_with"], **options)  # fmt: skip
    return {**fields, "options": options}


def _image_fields(
    body: CreateRequest, settings: Settings, store: Store, target: str, disk_format: str
) -> dict[str, Any]:
    if body.vis is None:
        raise ParameterError("vis: required for an image request (public, private or selected)")
    shared = list(dict.fromkeys(body.shared_with or []))
    if body.vis != "selected" and shared:
        raise ParameterError("shared_with: only when vis is selected")
    if body.vis == "selected":
        if not shared:
            raise ParameterError("shared_with: required when vis is selected")
        try:
            [config.check_name(n) for n in shared]
        except ParameterError as e:
            raise ParameterError(f"shared_with: {e}") from None
        unknown = sorted(set(shared) - {u.name for u in store.users(shared)})
        if unknown:
            raise ParameterError(f"shared_with: unknown users {', '.join(map(repr, unknown))}")
    check_limits(settings.source_of(body.instance), body.name, "image", disk_format, target)
    return dict(instance=body.instance, name=body.name, kind="image", vis=body.vis, shared_with=shared,
                disk_format=disk_format, target=target)  # fmt: skip


def check_limits(source: str, name: str, kind: str, disk_format: str, target: str) -> None:
    """A request whose disk its format (or MBR) cannot hold is refused now, not at the end of
    its run (the run takes this service's defaults for everything but format and target)."""
    if source.startswith("sample:") or "://" in source:
        return  # a sample is built on first use, and small; a cloud's instance is sized as it is copied
    from imaging.clouds import acquire
    from imaging.errors import ImagingError
    from imaging.run import preflight
    from imaging.run.request import Request

    try:
        src = acquire.inspect(source)
    except ImagingError:
        return  # what is wrong with the source itself is the run's to report, as before
    request = Request.create(source=source, name=name, kind=kind, format=disk_format, target=target)
    preflight.check_export(request, src)


def check_disk_format(value: str) -> str:
    supported = ", ".join(f.value for f in config.ImageFormat)
    try:
        return config.ImageFormat(value).value
    except ValueError:
        raise ParameterError(f"unknown disk_format {value!r} (supported: {supported})") from None


def document(spec: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """What FastAPI cannot tell from the code: every error is a JSON Error whatever the route's own
    content type; which instances, formats and targets this service takes; and the links from a
    created request to the operations on it (schemathesis follows them)."""
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for path in spec["paths"].values():
        for op in path.values():
            for code, response in op["responses"].items():
                if code.startswith("4"):
                    response["content"] = error
                elif "text/html" in response.get("content", {}):
                    response["content"] = {"text/html": {"schema": {"type": "string"}}}
    fields = spec["components"]["schemas"]["CreateRequest"]["properties"]
    if settings.instances:
        fields["instance"]["enum"] = sorted(settings.instances)
    fields["disk_format"]["anyOf"][0]["enum"] = [f.value for f in config.ImageFormat]
    fields["target"]["anyOf"][0]["enum"] = config.available("targets")
    follow = {"request_id": "$response.body#/id"}
    created = spec["paths"][f"{API_PREFIX}/request_image/"]["post"]["responses"]["201"]
    created["links"] = {
        op: {"operationId": op, "parameters": follow}
        for op in ("show_request", "patch_request", "download_artifact", "list_notebooks", "audit_record")
    }
    return spec


def artifact_name(result: dict[str, Any]) -> str:
    """The artifact's name in its run's record: its path inside the run directory it was made in."""
    path, run_dir = str(result.get("path") or ""), str(result.get("run_dir") or "")
    if not path or not run_dir or not path.startswith(run_dir.rstrip("/") + "/"):
        return ""
    name = path[len(run_dir.rstrip("/")) + 1 :]
    return "" if ".." in name.split("/") else name
