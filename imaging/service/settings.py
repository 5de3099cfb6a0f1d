"""The request service's settings: a YAML file, then environment variables, validated on load.

Where the file is: ``--config FILE``, else ``$IMAGING_CONFIG``, else ``<state dir>/service.yaml``
when it exists (the state directory is ``$IMAGING_STATE``, default ``state/`` in the checkout).
Hosts that share a database read the same settings (the same file, or the same environment):
the database, the record store, the signing key of approve links, the clouds, SMTP.
Any field can come from the environment instead: ``IMAGING_DATABASE_URL``, ``IMAGING_PORT``,
``IMAGING_SMTP__HOST``, ``IMAGING_WORKER__CONCURRENCY`` (``__`` between a section and its field).
Only names that match a field are read, so the pipeline's own variables (``IMAGING_RUNS``,
``IMAGING_CACHE``) never clash. Unknown keys in the file are errors, as everywhere else.

Secrets (SMTP password, S3 keys, the signing key, a database URL with a password) are
``SecretStr``: they print as ``**********`` and never reach a log, a notebook or a child process
that does not need them (see :func:`secret_env_names`).
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from imaging import config
from imaging.clouds import settings as cloud_settings
from imaging.errors import ParameterError
from imaging.run import record
from imaging.service import postgres

ENV_PREFIX = "IMAGING_"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SMTP(_Strict):
    host: str = ""  # empty: no mail is sent (the service still works; approvals by PATCH)
    port: int = Field(default=25, ge=1, le=65535)
    sender: str = "imaging@localhost"
    username: str = ""
    password: SecretStr = SecretStr("")
    starttls: bool = False
    timeout: float = Field(default=30.0, gt=0)
    # A mail the server did not take for now (down, refusing, timed out) is sent again every
    # retry_seconds, for up to retry_for_seconds; 0: tried once.
    retry_seconds: float = Field(default=60.0, gt=0)
    retry_for_seconds: float = Field(default=86400.0, ge=0)


class Worker(_Strict):
    # Requests one worker process runs at once (threads; the work is in child processes).
    concurrency: int = Field(default=1, ge=1, le=16)
    # `serve` runs a worker in its own process, so one command gives a working service; false:
    # run `python -m imaging worker` (on this host or others) beside it.
    embedded: bool = True
    # How often an idle worker looks for jobs besides PostgreSQL's notifications.
    poll_seconds: float = Field(default=5.0, gt=0, le=60)
    # Every worker writes a heartbeat this often; one whose heartbeat is older than
    # stalled_seconds (killed, its host gone, cut off from the database) has its requests queued
    # again by any other worker or the API, to resume elsewhere.
    heartbeat_seconds: float = Field(default=10.0, ge=0.5, le=300)
    stalled_seconds: float = Field(default=30.0, ge=2, le=3600)
    # How often a running request is checked (cancelled? still this worker's?).
    check_seconds: float = Field(default=2.0, ge=0.2, le=60)
    # Lost workers in a row after which a request goes to error rather than run again.
    max_lost: int = Field(default=3, ge=1, le=100)
    # A worker whose runs directory cannot hold a request's source (and the disk made from it)
    # does not run it: the request waits this long in the queue, for a host with room (or this
    # one, once runs are removed), instead of failing here. See imaging/service/space.py.
    space_wait_seconds: float = Field(default=60.0, ge=1, le=3600)

    @model_validator(mode="after")
    def _beats(self) -> Worker:
        if self.stalled_seconds < 2 * self.heartbeat_seconds:
            raise ValueError(
                f"stalled_seconds ({self.stalled_seconds:g}) must be at least twice heartbeat_seconds "
                f"({self.heartbeat_seconds:g}): a live worker would be taken for lost"
            )
        return self


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: object) -> float | None:
    """Seconds of ``30d``, ``12h``, ``90m``, ``45s`` or a number of seconds; None (or ``never``,
    or empty) keeps forever."""
    if value is None or value == "" or value == "never":
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        m = _DURATION.fullmatch(str(value).strip())
        if m is None:
            raise ValueError(f"{value!r} is not a duration (like 30d, 12h, 90m, 45s, or never)")
        seconds = float(m.group(1)) * _UNIT[m.group(2)]
    if seconds <= 0:
        raise ValueError(f"{value!r}: a duration must be more than zero (never: keep forever)")
    return seconds


class Kept(_Strict):
    """How long a finished request's run is kept, per final state (seconds; None: forever),
    counted from the request's last change (the time it reached that state)."""

    completed: float | None = None
    error: float | None = None
    denied: float | None = None
    cancelled: float | None = None

    @field_validator("completed", "error", "denied", "cancelled", mode="before")
    @classmethod
    def _duration(cls, v: object) -> float | None:
        return parse_duration(v)


class Retention(Kept):
    """``retention:``: a finished request's run directory, log and artifacts on the host that
    ran it go after the time its state says; its record in the record store after ``store``'s
    (per state; a state not named there: as on the host), which may be longer. The request's
    row (its result, audit head and history) stays in the database. Nothing is removed unless
    set. See imaging/service/retention.py."""

    store: Kept = Kept()
    # How often each worker looks (its own runs directory; the store: any worker, each its turn).
    every: float = Field(default=3600.0, gt=0)

    @field_validator("every", mode="before")
    @classmethod
    def _every(cls, v: object) -> float | None:
        return parse_duration(v)

    def host_seconds(self, state: str) -> float | None:
        return getattr(self, state, None) if state in Kept.model_fields else None

    def store_seconds(self, state: str) -> float | None:
        if state not in Kept.model_fields:
            return None
        named = state in self.store.model_fields_set
        return getattr(self.store, state) if named else self.host_seconds(state)

    @model_validator(mode="after")
    def _store_not_shorter(self) -> Retention:
        for state in Kept.model_fields:
            host, store = self.host_seconds(state), self.store_seconds(state)
            if host is not None and store is not None and store < host:
                raise ValueError(
                    f"retention.store.{state} is shorter than retention.{state}: a host would serve a run "
                    "whose record is gone (make the store's at least as long)"
                )
        return self


class Publish(_Strict):
    """Where image requests go: a cloud named in ``clouds`` (``cloud``), or an S3-compatible
    object store (``bucket``); a request may name another destination of these."""

    cloud: str = ""  # the default destination: a configured ec2 or openstack cloud
    endpoint_url: str = ""  # empty: AWS itself
    bucket: str = ""  # empty: this service does not publish (image requests are refused)
    region: str = "us-east-1"
    prefix: str = "images/"
    access_key_id: SecretStr = SecretStr("")
    secret_access_key: SecretStr = SecretStr("")


class Web(_Strict):
    """The web page's sign-in (imaging/service/web.py)."""

    # A header the site's reverse proxy sets to the signed-in user's name (e.g. REMOTE_USER);
    # empty: people sign in with a link mailed to them. Set it only behind a proxy that removes
    # the header from what clients send.
    trusted_header: str = Field(default="", max_length=64, pattern=r"^[A-Za-z0-9_-]*$")
    signin_ttl_seconds: int = Field(default=900, ge=60, le=86400)  # how long a mailed link works
    session_seconds: int = Field(default=12 * 3600, ge=300, le=30 * 86400)  # a browser's session


_INSTANCE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")


class Settings(_Strict):
    state_dir: Path
    # PostgreSQL, shared by every host; empty: a private cluster in the state directory, reached
    # by its Unix socket only (one machine: serve starts and stops it).
    database_url: SecretStr = SecretStr("")
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    base_url: str = ""  # for links in mails; empty: http://<host>:<port>
    # Signs approval links; every host that mails or checks them needs the same. Empty: made
    # once in <state dir>/secret.key, for a one-machine service only (no database_url).
    secret_key: SecretStr = SecretStr("")
    approval_ttl_seconds: int = Field(default=7 * 24 * 3600, ge=60)
    # What a secret the scan finds in a guest does (25-secrets): auto is fail for a public image
    # and warn for every other request; fail, warn, clean or off for all. An admin may change it
    # for one request when approving it.
    secrets: Literal["auto", "fail", "warn", "clean", "off"] = "auto"
    # Instance ids a request may name, and the image each stands for (a path, sample:<name>, or
    # a cloud's instance, KIND://CLOUD/INSTANCE). A request may also name CLOUD/INSTANCE directly.
    instances: dict[str, str] = {}
    # The clouds instances come from and images go to: endpoints and credentials (secrets).
    clouds: dict[str, cloud_settings.Cloud] = {}
    smtp: SMTP = SMTP()
    worker: Worker = Worker()
    publish: Publish = Publish()
    web: Web = Web()
    # Where run records live (notebooks, audit chains, artifacts...): an S3-compatible store
    # every host reads and writes; no bucket: each run stays in its host's runs directory.
    records: record.StoreConfig = record.StoreConfig()
    # How long finished runs are kept, on the hosts and in the record store.
    retention: Retention = Retention()
    # The service's own log (serve, worker): text lines, or one JSON object a line (json) for a
    # log collector. The runs' logs are the runs' own.
    log_format: Literal["text", "json"] = "text"

    @field_validator("clouds")
    @classmethod
    def _clouds(cls, v: dict[str, Any]) -> dict[str, Any]:
        return cloud_settings.check_clouds(v)

    @model_validator(mode="after")
    def _instances(self) -> Settings:
        for key, source in self.instances.items():
            if not _INSTANCE_ID.fullmatch(key):
                raise ValueError(
                    f"instance id {key!r} has characters other than letters, digits, '.', '_', '-'"
                )
            if cloud_settings.is_cloud_source(source):
                try:
                    found = cloud_settings.parse_source(source)
                    cloud_settings.cloud_for(found.kind, found.cloud, self.clouds)
                except ParameterError as e:
                    raise ValueError(f"instance {key}: {e}") from None
            elif not (source.startswith("sample:") or Path(source).is_absolute()):
                raise ValueError(
                    f"instance {key}: source {source!r} must be an absolute path, sample:<name> or KIND://CLOUD/INSTANCE"
                )
        if self.publish.cloud:
            try:
                self.check_destination(self.publish.cloud)
            except ParameterError as e:
                raise ValueError(f"publish.cloud: {e}") from None
        return self

    def source_of(self, instance: str) -> str:
        """The SOURCE an instance id stands for: configured, or CLOUD/INSTANCE in a cloud."""
        if instance in self.instances:
            return self.instances[instance]
        cloud_name, sep, inner = instance.partition("/")
        cloud = self.clouds.get(cloud_name) if sep else None
        if cloud is None:
            raise ParameterError(f"unknown instance {instance!r}")
        source = f"{cloud.kind}://{cloud_name}/{inner}"
        cloud_settings.parse_source(source)
        return source

    def check_destination(self, name: str) -> str:
        """``s3`` (when a bucket is configured) or an ec2/openstack cloud."""
        if name == "s3":
            if not self.publish.bucket:
                raise ParameterError("destination s3: this service has no object store (publish.bucket)")
            return name
        cloud = self.clouds.get(name)
        if cloud is None or cloud.kind == "eucalyptus":
            known = ["s3"] * bool(self.publish.bucket) + sorted(
                n for n, c in self.clouds.items() if c.kind != "eucalyptus"
            )
            raise ParameterError(f"unknown destination {name!r} (known: {', '.join(known) or 'none'})")
        return name

    def default_destination(self) -> str:
        return self.publish.cloud or "s3"

    def image_machine(self, destination: str | None) -> tuple[str, str]:
        """The target and format an image published to ``destination`` is made for."""
        return cloud_settings.image_machine(self.clouds, destination)

    def clouds_used(self, source: str, destination: str | None) -> dict[str, Any]:
        """The clouds a run of this source (and destination) needs: all it gets to see."""
        names = set()
        if cloud_settings.is_cloud_source(source):
            names.add(cloud_settings.parse_source(source).cloud)
        if destination and destination != "s3":
            names.add(destination)
        return {n: self.clouds[n] for n in sorted(names) if n in self.clouds}

    @property
    def private_database(self) -> bool:
        return not self.database_url.get_secret_value()

    def cluster(self) -> postgres.Cluster:
        """The private cluster (used when no database_url is set)."""
        return postgres.Cluster(self.state_dir / "postgres")

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url.get_secret_value() or self.cluster().url

    @property
    def public_url(self) -> str:
        return (self.base_url or f"http://{self.host}:{self.port}").rstrip("/")

    def signing_key(self) -> str:
        """The key approval links are signed with: configured (the same on every host), or, for
        a one-machine service, made once in the state directory."""
        if self.secret_key.get_secret_value():
            return self.secret_key.get_secret_value()
        if not self.private_database:
            raise ParameterError(
                "secret_key is not set: hosts that share a database must sign approve links with the "
                "same key (set secret_key, or IMAGING_SECRET_KEY, to the same long random string on each)"
            )
        path = self.state_dir / "secret.key"
        if not path.exists():
            self.state_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(48) + "\n")
        return path.read_text().strip()

    def publishing(self) -> bool:
        return bool(self.publish.bucket or self.publish.cloud)


_EMAIL = re.compile(r"^[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+$")


def check_email(address: str) -> str:
    if not _EMAIL.fullmatch(address) or len(address) > 254:
        raise ParameterError(f"{address!r} is not an e-mail address")
    return address


def state_dir() -> Path:
    return Path(os.environ.get("IMAGING_STATE", config.PROJECT / "state"))


def _from_env(environ: dict[str, str]) -> dict[str, Any]:
    """The settings named by environment variables, nested by ``__``."""
    found: dict[str, Any] = {}
    for name, field in Settings.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            for sub in section.model_fields:
                key = f"{ENV_PREFIX}{name}__{sub}".upper()
                if key in environ:
                    found.setdefault(name, {})[sub] = environ[key]
        elif f"{ENV_PREFIX}{name}".upper() in environ and name not in ("instances", "clouds"):
            found[name] = environ[f"{ENV_PREFIX}{name}".upper()]
    if "IMAGING_STATE" in environ:
        found["state_dir"] = environ["IMAGING_STATE"]
    return found


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def load(path: str | os.PathLike[str] | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Settings from the YAML file (if any) and the environment; one-line errors."""
    env = dict(os.environ if environ is None else environ)
    chosen = Path(path) if path else Path(env["IMAGING_CONFIG"]) if env.get("IMAGING_CONFIG") else None
    from_env = _from_env(env)
    if chosen is None:
        default = Path(from_env.get("state_dir") or state_dir()) / "service.yaml"
        chosen = default if default.exists() else None
    data: dict[str, Any] = {}
    if chosen is not None:
        try:
            loaded = yaml.safe_load(chosen.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ParameterError(f"settings file not found: {chosen}") from None
        except yaml.YAMLError as e:
            raise ParameterError(f"{chosen}: not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict | None):
            raise ParameterError(f"{chosen}: expected a mapping at the top level")
        data = loaded or {}
    data = _merge(data, from_env)
    data.setdefault("state_dir", str(state_dir()))
    try:
        return Settings(**data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        source = str(chosen) if chosen else "settings"
        raise ParameterError(
            f"{source}: {where}: {first['msg'].removeprefix('Value error, ')}{more}"
        ) from None


def secret_env_names() -> set[str]:
    """Environment variables that may hold secrets: never passed on to a pipeline run."""
    names = {"IMAGING_DATABASE_URL", "IMAGING_SECRET_KEY", "IMAGING_CONFIG", cloud_settings.ENV, record.ENV}
    for section in ("SMTP", "PUBLISH", "RECORDS"):
        model = Settings.model_fields[section.lower()].annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        names |= {f"{ENV_PREFIX}{section}__{f}".upper() for f in model.model_fields}
    return names
