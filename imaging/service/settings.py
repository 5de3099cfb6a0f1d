"""The request service's settings: a YAML file, then environment variables, validated on load.

Where the file is: ``--config FILE``, else ``$IMAGING_CONFIG``, else ``<state dir>/service.yaml``
when it exists (the state directory is ``$IMAGING_STATE``, default ``state/`` in the checkout).
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
from typing import Any

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


class Worker(_Strict):
    # Requests one worker process runs at once (threads; the work is in child processes).
    concurrency: int = Field(default=1, ge=1, le=16)
    # `serve` runs a worker in its own process, so one command gives a working service; false:
    # run `python -m imaging worker` (on this host or others) beside it.
    embedded: bool = True
    poll_seconds: float = Field(default=2.0, gt=0, le=60)
    # A claimed request whose worker stops renewing this lease (killed, host gone) goes to
    # `error` when it expires, so an admin can approve it again to resume.
    lease_seconds: float = Field(default=60.0, ge=3, le=3600)


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


_INSTANCE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")


class Settings(_Strict):
    state_dir: Path
    database_url: SecretStr = SecretStr("")  # empty: SQLite in the state directory
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    base_url: str = ""  # for links in mails; empty: http://<host>:<port>
    secret_key: SecretStr = SecretStr("")  # signs approval links; empty: <state dir>/secret.key
    approval_ttl_seconds: int = Field(default=7 * 24 * 3600, ge=60)
    # Instance ids a request may name, and the image each stands for (a path, sample:<name>, or
    # a cloud's instance, KIND://CLOUD/INSTANCE). A request may also name CLOUD/INSTANCE directly.
    instances: dict[str, str] = {}
    # The clouds instances come from and images go to: endpoints and credentials (secrets).
    clouds: dict[str, cloud_settings.Cloud] = {}
    smtp: SMTP = SMTP()
    worker: Worker = Worker()
    publish: Publish = Publish()

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
    def sqlalchemy_url(self) -> str:
        url = self.database_url.get_secret_value()
        return url or f"sqlite:///{self.state_dir / 'imaging.db'}"

    @property
    def public_url(self) -> str:
        return (self.base_url or f"http://{self.host}:{self.port}").rstrip("/")

    def signing_key(self) -> str:
        """The key approval links are signed with: configured, or made once in the state directory."""
        if self.secret_key.get_secret_value():
            return self.secret_key.get_secret_value()
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
        if isinstance(section, type) and issubclass(section, _Strict):
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
    names = {"IMAGING_DATABASE_URL", "IMAGING_SECRET_KEY", "IMAGING_CONFIG", cloud_settings.ENV}
    for section in ("SMTP", "PUBLISH"):
        model = Settings.model_fields[section.lower()].annotation
        assert isinstance(model, type) and issubclass(model, _Strict)
        names |= {f"{ENV_PREFIX}{section}__{f}".upper() for f in model.model_fields}
    return names
