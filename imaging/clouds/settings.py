"""The clouds a run may copy instances out of and publish images to: their endpoints and
credentials, validated on load, and the ``SOURCE`` URIs that name an instance in one of them.

The request service keeps these in its settings (``clouds:`` in service.yaml) and hands a run
only the clouds its request uses, in the environment (``IMAGING_CLOUDS``: a JSON object, or the
path of a YAML/JSON file holding one); the CLI reads the same variable. Never a notebook
parameter: the executed notebooks, the run's records and the logs name a cloud, never its keys.

``SOURCE`` URIs (the host part is the cloud's name in the settings, not a host name):

- ``eucalyptus://CLOUD/i-0123abcd``: the instance's root disk, copied from its node controller over SSH;
- ``ec2://CLOUD/i-0123456789abcdef0``: AWS or Eucalyptus through the EC2 and EBS direct APIs;
- ``openstack://CLOUD/<server uuid>``: a Nova snapshot of the server, downloaded from Glance.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from imaging import config
from imaging.errors import ParameterError

ENV = "IMAGING_CLOUDS"
KINDS = ("eucalyptus", "ec2", "openstack")
CLOUD_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
# What an instance id looks like in each cloud: anything else is refused before a cloud is asked.
INSTANCE_ID = {
    "eucalyptus": re.compile(r"^i-[0-9a-fA-F]{8,17}$"),
    "ec2": re.compile(r"^i-[0-9a-f]{8,17}$"),
    "openstack": re.compile(
        r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$"
    ),
}
_ACCOUNT = re.compile(r"^[0-9]{12}$")
_USER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Publishes(_Strict):
    """A cloud images are published to: what they are made for unless a request says."""

    image_target: str
    image_format: str

    @model_validator(mode="after")
    def _image_machine(self) -> _Publishes:
        try:
            config.check_target_format(config.load_target(self.image_target).name, self.image_format)
        except ParameterError as e:
            raise ValueError(f"image_target/image_format: {e}") from None
        return self


def _users_map(v: dict[str, str], what: str, pattern: re.Pattern[str] | None = None) -> dict[str, str]:
    for user, value in v.items():
        if not _USER.fullmatch(user):
            raise ValueError(f"{user!r} is not a user name")
        if pattern is not None and not pattern.fullmatch(value):
            raise ValueError(f"user {user}: {value!r} is not {what}")
    return v


class Eucalyptus(_Strict):
    """Node controllers reached over SSH; the instance's root disk is read from the node's
    instances directory (``parameters/clouds/eucalyptus.yaml`` says where in it)."""

    kind: Literal["eucalyptus"]
    nodes: list[str] = Field(min_length=1)  # host or host:port, searched in order for the instance
    user: str = "root"
    key_file: Path  # the private key to log in with (its passphrase-less file)
    known_hosts: Path  # the nodes' host keys, as the operator has checked them
    instances_dir: str = "/var/lib/eucalyptus/instances"
    timeout: float = Field(default=30.0, gt=0, le=600)
    # The stream compressed on the node (zstd -1, or gzip -1 where the node has no zstd): "auto"
    # compresses with zstd where both ends have it (see docs/clouds.md); YAML's on/off are booleans.
    compress: Literal["auto", "on", "off"] = "auto"

    @field_validator("compress", mode="before")
    @classmethod
    def _compress(cls, v: object) -> object:
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @field_validator("nodes")
    @classmethod
    def _nodes(cls, v: list[str]) -> list[str]:
        for node in v:
            host, _, port = node.rpartition(":") if ":" in node else (node, "", "22")
            if (
                not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", host)
                or not port.isdigit()
                or not 0 < int(port) < 65536
            ):
                raise ValueError(f"node {node!r} is not host or host:port")
        return v

    @field_validator("instances_dir")
    @classmethod
    def _dir(cls, v: str) -> str:
        if not v.startswith("/") or not re.fullmatch(r"[A-Za-z0-9/._-]+", v) or ".." in v:
            raise ValueError(f"instances_dir {v!r} must be a plain absolute path")
        return v.rstrip("/") or "/"


class EC2(_Publishes):
    """AWS, or Eucalyptus by its endpoints: EC2 for instances, volumes, snapshots and images; EBS
    direct for the snapshots' blocks."""

    kind: Literal["ec2"]
    region: str = "us-east-1"
    endpoint_url: str = ""  # empty: AWS
    ebs_endpoint_url: str = ""  # empty: AWS's EBS direct endpoint of the region
    access_key_id: SecretStr = SecretStr("")
    secret_access_key: SecretStr = SecretStr("")
    snapshot_timeout: float = Field(default=3600.0, gt=0)  # a snapshot not completed by then fails the run
    poll_seconds: float = Field(default=5.0, gt=0, le=300)
    # Blocks fetched or written at once, at most: reads start at 8 and widen while EBS does not
    # throttle (ec2.Window). AWS: at ~100 ms a read, 64 in flight is ~640 blocks/s (~330 MB/s),
    # under the account's 5,000 GetSnapshotBlock requests per second.
    block_workers: int = Field(default=64, ge=1, le=128)
    max_attempts: int = Field(default=8, ge=1, le=30)  # per call, throttling and 5xx retried with backoff
    architecture: Literal["x86_64", "i386", "arm64"] = "x86_64"
    root_device: str = "/dev/xvda"
    accounts: dict[str, str] = {}  # service user -> account id, for launch permissions (vis selected)
    # What an image published here is made for when the request names no target or format: EC2's
    # instances are Nitro machines (NVMe, ENA), and EBS takes a raw disk's blocks. A Eucalyptus
    # cloud reached through its EC2 API runs KVM or Xen guests: it sets ``image_target: kvm``.
    image_target: str = "aws"
    image_format: str = "raw"

    @field_validator("accounts")
    @classmethod
    def _accounts(cls, v: dict[str, str]) -> dict[str, str]:
        return _users_map(v, "a 12-digit account id", _ACCOUNT)


class OpenStack(_Publishes):
    """Nova (compute) for the snapshot, Glance (image) for the download and for publishing.

    ``auth`` is what openstacksdk takes for ``auth_type`` (for ``password``: auth_url, username,
    password, project_name, user_domain_name, project_domain_name); ``auth_type: none`` with the
    two endpoints reaches services that run without Keystone."""

    kind: Literal["openstack"]
    auth_type: str = "password"
    auth: dict[str, SecretStr] = {}
    region: str = ""
    compute_endpoint: str = ""  # empty: from the service catalogue
    image_endpoint: str = ""
    image_timeout: float = Field(default=3600.0, gt=0)  # the snapshot must be active by then
    poll_seconds: float = Field(default=2.0, gt=0, le=300)
    keep_snapshot: bool = False  # the server's snapshot image stays in Glance after the download
    projects: dict[str, str] = {}  # service user -> project id, the image's members (vis selected)
    # What an image published here is made for when the request names no target or format.
    image_target: str = "openstack"
    image_format: str = "qcow2"

    @field_validator("projects")
    @classmethod
    def _projects(cls, v: dict[str, str]) -> dict[str, str]:
        return _users_map(v, "a project id", re.compile(r"^[A-Za-z0-9_-]{1,64}$"))


Cloud = Annotated[Eucalyptus | EC2 | OpenStack, Field(discriminator="kind")]
_CLOUDS: TypeAdapter[dict[str, Cloud]] = TypeAdapter(dict[str, Cloud])


def check_clouds(clouds: dict[str, Any]) -> dict[str, Any]:
    for name in clouds:
        if not CLOUD_NAME.fullmatch(name):
            raise ValueError(f"cloud name {name!r}: use 1-40 lower-case letters, digits and '-'")
    return clouds


def parse_clouds(data: Any, where: str) -> dict[str, Eucalyptus | EC2 | OpenStack]:
    """Cloud settings from plain data; one-line errors that never quote a secret."""
    if not isinstance(data, dict):
        raise ParameterError(f"{where}: expected a mapping of cloud names to their settings")
    try:
        return check_clouds(_CLOUDS.validate_python(data))
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ParameterError(f"{where}: {loc}: {first['msg'].removeprefix('Value error, ')}") from None
    except ValueError as e:
        raise ParameterError(f"{where}: {e}") from None


def dump_clouds(clouds: dict[str, Eucalyptus | EC2 | OpenStack]) -> str:
    """The clouds as JSON with their secrets in clear: for a run's environment only."""

    def reveal(value: Any) -> Any:
        if isinstance(value, SecretStr):
            return value.get_secret_value()
        if isinstance(value, dict):
            return {k: reveal(v) for k, v in value.items()}
        if isinstance(value, list):
            return [reveal(v) for v in value]
        if isinstance(value, Path):
            return str(value)
        return value

    return json.dumps({name: reveal(dict(c)) for name, c in clouds.items()})


def image_machine(
    clouds: dict[str, Eucalyptus | EC2 | OpenStack], destination: str | None
) -> tuple[str, str]:
    """The target and format an image published to ``destination`` is made for unless its request
    names them: the cloud's ``image_target`` and ``image_format``; ``("", "qcow2")`` for the object
    store, an export or an unknown name (the format's default target; the unknown name is reported
    where it is checked)."""
    cloud = clouds.get(destination or "")
    if cloud is None or isinstance(cloud, Eucalyptus):
        return "", "qcow2"
    return cloud.image_target, cloud.image_format


def from_environment(environ: dict[str, str] | None = None) -> dict[str, Eucalyptus | EC2 | OpenStack]:
    """The clouds this run may use: ``IMAGING_CLOUDS`` (JSON text, or a YAML/JSON file's path)."""
    env = os.environ if environ is None else environ
    value = env.get(ENV, "").strip()
    if not value:
        return {}
    if value.startswith("{"):
        try:
            data = json.loads(value)
        except ValueError:
            raise ParameterError(f"{ENV} is not a JSON object") from None
        return parse_clouds(data, ENV)
    try:
        data = yaml.safe_load(Path(value).read_text(encoding="utf-8"))
    except OSError as e:
        raise ParameterError(f"{ENV}: cannot read {value}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ParameterError(f"{value}: not valid YAML: {str(e).splitlines()[0]}") from None
    if isinstance(data, dict) and set(data) == {"clouds"}:
        data = data["clouds"]
    return parse_clouds(data, value)


@dataclass(frozen=True)
class CloudSource:
    """A ``SOURCE`` URI taken apart: which kind of cloud, which of the configured ones, which instance."""

    kind: str
    cloud: str
    instance: str

    def __str__(self) -> str:
        return f"{self.kind}://{self.cloud}/{self.instance}"


_URI = re.compile(r"^(?P<kind>[a-z0-9]+)://(?P<cloud>[^/]*)/(?P<instance>[^/]*)$")


def is_cloud_source(source: str) -> bool:
    return "://" in source


def parse_source(source: str) -> CloudSource:
    """``ec2://aws/i-0123...`` -> CloudSource; one-line errors for anything else."""
    m = _URI.fullmatch(source)
    if not m:
        raise ParameterError(f"source {source!r} is not KIND://CLOUD/INSTANCE (kinds: {', '.join(KINDS)})")
    kind, cloud, instance = m["kind"], m["cloud"], m["instance"]
    if kind not in KINDS:
        raise ParameterError(f"source {source!r}: unknown cloud kind {kind!r} (known: {', '.join(KINDS)})")
    if not CLOUD_NAME.fullmatch(cloud):
        raise ParameterError(f"source {source!r}: {cloud!r} is not a cloud name")
    if not INSTANCE_ID[kind].fullmatch(instance):
        raise ParameterError(f"source {source!r}: {instance!r} is not a {kind} instance id")
    return CloudSource(kind, cloud, instance)


def cloud_for(
    kind: str, name: str, clouds: dict[str, Eucalyptus | EC2 | OpenStack] | None = None
) -> Eucalyptus | EC2 | OpenStack:
    """The settings of cloud ``name``, which must be of ``kind``."""
    found = from_environment() if clouds is None else clouds
    cloud = found.get(name)
    if cloud is None:
        known = ", ".join(sorted(found)) or "none"
        raise ParameterError(f"no cloud {name!r} is configured (configured: {known})")
    if cloud.kind != kind:
        raise ParameterError(f"cloud {name!r} is a {cloud.kind} cloud, not {kind}")
    return cloud
