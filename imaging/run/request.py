"""What a run is asked to do: one validated model of every parameter, whatever asked (CLI, API,
explore.ipynb); the values not given come from parameters/defaults.yaml. Each stage notebook
receives the ones it declares (``notebook_parameters``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from imaging import config
from imaging.config import Layout, OvfVersion, Placement, VmdkSubformat
from imaging.errors import ParameterError
from imaging.samples import catalog


class Request(BaseModel):
    """Everything a run needs to know; the defaults come from parameters/defaults.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str = "export"
    source: str
    name: str
    format: str = "qcow2"
    target: str = ""  # "" = the default target for the format (parameters/defaults.yaml)
    out: str = ""
    snapshots: str
    layout: Layout
    firmware: str
    placement: Placement
    disk_size: str
    fs_type: str
    grub_timeout: int
    kernel_args: str
    boot_timeout: int
    boot_marker: str
    keep_work: bool
    vmdk_subformat: VmdkSubformat
    compress: bool
    ovf_version: OvfVersion
    accel: str = "auto"
    profile: str
    platforms: list[str]
    clean: list[str]
    remove_users: list[str]
    xen_console: str
    runlevel: int | None
    selinux: str
    enforcing_arg: bool
    root_password_hash_file: str
    packages_install: list[str]
    packages_remove: list[str]
    packages_room: str
    kernel: str
    # Runs made before 25-secrets existed have neither in their request.json.
    secrets: str = "auto"
    secrets_allow: list[str] = []
    # Image requests (kind image): who may see the published image; names when "selected".
    vis: str = "private"
    shared_with: list[str] = []
    # Where an image request's image goes: "s3" (the object store) or a configured cloud's name.
    destination: str = "s3"

    @classmethod
    def create(cls, **fields: Any) -> Request:
        """A request from explicit fields, the rest from the defaults; one-line errors."""
        defaults = config.load_defaults().model_dump(
            exclude={
                "pipelines",
                "stage_inputs",
                "target",
                "target_by_format",
                "sandbox",
                "package_mirrors",
                "stage_time",
            }
        )
        given = {k: v for k, v in fields.items() if v is not None}
        if "boot_marker" not in given and str(given.get("source", "")).startswith("sample:"):
            given["boot_marker"] = catalog.marker_for(str(given["source"]))
        if "profile" not in given and str(given.get("source", "")).startswith("sample:"):
            given["profile"] = catalog.profile_for(str(given["source"]))
        try:
            return cls(**{**defaults, **given})
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ParameterError(f"{where}: {first['msg'].removeprefix('Value error, ')}") from None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return config.check_display_name(v)

    @field_validator("destination")
    @classmethod
    def _destination(cls, v: str) -> str:
        if v != "s3" and not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,39}", v):
            raise ParameterError(f"destination {v!r} is neither s3 nor a cloud name")
        return v

    @property
    def slug(self) -> str:
        """The name's safe form: file names, run ids, object keys."""
        return config.slug(self.name)

    @field_validator("format")
    @classmethod
    def _format(cls, v: str) -> str:
        return config.check_format(v).value

    @field_validator("target")
    @classmethod
    def _target(cls, v: str) -> str:
        return config.load_target(v).name if v else v

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        config.pipeline_stages(v)
        return v

    @field_validator("kernel_args")
    @classmethod
    def _kernel_args(cls, v: str) -> str:
        return config.check_kernel_args(v)

    @field_validator("disk_size")
    @classmethod
    def _disk_size(cls, v: str) -> str:
        config.parse_disk_size(v)
        return v

    @field_validator("packages_room")
    @classmethod
    def _room(cls, v: str) -> str:
        if config.parse_disk_size(v)[0] != "absolute":
            raise ParameterError(f"packages_room {v!r} is not a size like 2G")
        return v

    @field_validator("boot_marker")
    @classmethod
    def _marker(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ParameterError(f"boot marker is not a regular expression: {e}") from None
        return v

    @field_validator("profile")
    @classmethod
    def _profile(cls, v: str) -> str:
        from imaging.guest.profiles import load_profile

        return v if v == "auto" else load_profile(v).name

    @field_validator("platforms")
    @classmethod
    def _platforms(cls, v: list[str]) -> list[str]:
        from imaging.guest.profiles import load_platform

        return [load_platform(p).name for p in v]

    @field_validator("clean")
    @classmethod
    def _clean(cls, v: list[str]) -> list[str]:
        from imaging.guest.clean import select

        select(["defaults", *v])  # unknown operations fail here, before any work
        return v

    @field_validator("remove_users")
    @classmethod
    def _users(cls, v: list[str]) -> list[str]:
        for user in v:
            if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", user) or user == "root":
                raise ParameterError(f"cannot remove user {user!r}: not a plain user name, or root")
        return v

    @field_validator("root_password_hash_file")
    @classmethod
    def _hash_file(cls, v: str) -> str:
        if not v:
            return v
        from imaging.guest.edits import check_crypt_hash

        try:
            check_crypt_hash(Path(v).read_text())
        except OSError as e:
            raise ParameterError(f"cannot read the root password hash file {v}: {e.strerror}") from None
        return str(Path(v).resolve())

    @field_validator("packages_install", "packages_remove")
    @classmethod
    def _packages(cls, v: list[str]) -> list[str]:
        from imaging.guest.initrd import check_package

        return [check_package(name) for name in v]

    @field_validator("kernel")
    @classmethod
    def _kernel(cls, v: str) -> str:
        if v and not re.fullmatch(r"[A-Za-z0-9._+-]{1,100}", v):
            raise ParameterError(f"not a kernel version: {v!r}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _default_target(cls, data: Any) -> Any:
        if (
            isinstance(data, dict)
            and not data.get("target")
            and isinstance(data.get("format", "qcow2"), str)
        ):
            try:
                data = {**data, "target": config.default_target(data.get("format", "qcow2"))}
            except ParameterError:
                pass  # an unknown format is reported by its own field
        return data

    @model_validator(mode="after")
    def _format_options(self) -> Request:
        config.check_target_format(
            self.target, self.format, self.vmdk_subformat.value if self.format == "vmdk" else ""
        )
        config.choose_firmware(self.firmware, config.load_target(self.target), self.layout)
        if self.compress and self.format != "qcow2":
            raise ParameterError(f"compress applies to qcow2 only, not {self.format}")
        if self.format == "ova" and self.vmdk_subformat is not VmdkSubformat.stream_optimized:
            raise ParameterError("an OVA holds a streamOptimized VMDK: vmdk_subformat cannot change that")
        return self

    @field_validator("secrets")
    @classmethod
    def _secrets(cls, v: str) -> str:
        if v not in ("auto", "fail", "warn", "clean", "off"):
            raise ParameterError(f"secrets must be auto, fail, warn, clean or off, not {v!r}")
        return v

    @field_validator("secrets_allow")
    @classmethod
    def _allow(cls, v: list[str]) -> list[str]:
        for fingerprint in v:
            if not re.fullmatch(r"[0-9a-f]{16}", fingerprint):
                raise ParameterError(f"not a finding's fingerprint (16 hex digits): {fingerprint!r}")
        return list(dict.fromkeys(v))

    @field_validator("accel")
    @classmethod
    def _accel(cls, v: str) -> str:
        if v not in ("auto", "kvm", "tcg"):
            raise ParameterError(f"accel must be auto, kvm or tcg, not {v!r}")
        return v

    @field_validator("vis")
    @classmethod
    def _vis(cls, v: str) -> str:
        if v not in ("public", "private", "selected"):
            raise ParameterError(f"vis must be public, private or selected, not {v!r}")
        return v

    @field_validator("shared_with")
    @classmethod
    def _shared_with(cls, v: list[str]) -> list[str]:
        return [config.check_name(name) for name in v]

    @model_validator(mode="after")
    def _shares(self) -> Request:
        if (self.vis == "selected") != bool(self.shared_with):
            raise ParameterError(
                "shared_with names the users an image is shared with when, and only when, vis is selected"
            )
        return self

    def notebook_parameters(self) -> dict[str, Any]:
        """Every field, upper-cased; NAME is the slug (stages name files after it) and
        DISPLAY_NAME the name as the user wrote it (the cloud image's name)."""
        values = {k.upper(): (v.value if hasattr(v, "value") else v) for k, v in self.model_dump().items()}
        return {**values, "NAME": self.slug, "DISPLAY_NAME": self.name}
