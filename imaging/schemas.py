"""What the HTTP API takes and gives (pydantic models; FastAPI's OpenAPI description is made from
these, so they are the contract schemathesis checks the service against)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .store import ImageRequest, Transition

REQUEST_ID = r"^ir-[0-9a-f]{12}$"
NOTEBOOK = r"^[0-9]{2}-[a-z0-9-]{1,40}(\.failed-[0-9]{1,4})?$"
Vis = Literal["public", "private", "selected"]
StateName = Literal["pending", "approved", "running", "completed", "error", "denied", "cancelled"]


class Error(BaseModel):
    detail: str = Field(description="what went wrong, in one line")


class CreateRequest(BaseModel):
    """An image request, or with ``disk_format`` an export request."""

    model_config = ConfigDict(extra="forbid")

    instance: str = Field(
        min_length=1, max_length=80, description="instance id, as configured on the service"
    )
    name: str = Field(min_length=1, max_length=80, description="letters, digits, '.', '_', '-'")
    vis: Vis | None = Field(default=None, description="image requests: who may use the image (required)")
    shared_with: list[str] | None = Field(
        default=None, max_length=100, description="user names; only, and then required, when vis is selected"
    )
    disk_format: str | None = Field(
        default=None, max_length=16, description="export requests: raw, qcow2, ..."
    )
    target: str | None = Field(default=None, max_length=40, description="machine the disk is made for (kvm)")


class Patch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Literal["approve", "deny", "cancel"] = Field(
        description="approve (admins; on a request in error it resumes the run), deny (admins), cancel"
    )
    reason: str = Field(default="", max_length=500)


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
    state: StateName
    stage: str | None = Field(description="the stage it is in (running) or failed at (error)")
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
    links = {"self": url, "notebooks": f"{url}/notebooks", "audit": f"{url}/audit"}
    if req.state == "completed":
        links["artifact"] = f"{url}/artifact"
    return dict(id=req.id, owner=req.owner.name, instance=req.instance, name=req.name, kind=req.kind, vis=req.vis,
                shared_with=list(req.shared_with or []), disk_format=req.disk_format, target=req.target,
                state=req.state, stage=req.stage, error=req.error, created=req.created, updated=req.updated,
                result=req.result, links=links)  # fmt: skip


class NotebookOut(BaseModel):
    name: str
    stage: str
    failed: bool = Field(description="an attempt that failed (kept for the record)")
    html: str | None = Field(description="URL of its HTML render")


class AuditEntry(BaseModel):
    n: int
    kind: str
    file: str
    sha256: str
    prev: str
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
