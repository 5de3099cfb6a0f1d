"""Distro profiles and cloud platforms: what differs between guests, as validated YAML.

``parameters/profiles/<name>.yaml`` says where a distro keeps what 20-migrate edits, how its
initrd is rebuilt, which clean operations it runs by default, and how to recognise it.
``parameters/platforms/<name>.yaml`` says what a cloud platform leaves in an instance (agent
files, config blocks, boot hooks) for 10-clean and 20-migrate to remove.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from imaging import config
from imaging.config import MirrorHost
from imaging.disk.files import Guest
from imaging.errors import GuestError, ParameterError

_GUEST_PATH = r"^/[A-Za-z0-9._+@/*-]*$"
GuestPath = Annotated[str, Field(pattern=_GUEST_PATH)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DetectRule(_Strict):
    file: GuestPath
    matches: str = ""  # a regular expression the file's text must match ("" = the file exists)

    @field_validator("matches")
    @classmethod
    def _regex(cls, v: str) -> str:
        re.compile(v)
        return v


class InitrdTool(_Strict):
    """How the guest's own tool rebuilds an initrd, run inside the guest (sandboxed)."""

    tool: GuestPath
    image: str  # guest path template, {version}
    # argv templates: {version}, {image}; an item holding {module} repeats once per module.
    argv: list[str]
    modules_file: GuestPath | None = None  # written with one module per line first (initramfs-tools)


class Packages(_Strict):
    install: list[str]  # argv prefix, package names follow
    remove: list[str]
    refresh: list[str] = []  # fetches the package index first (cloud images ship without one)
    cleanup: list[str] = []  # drops the downloaded packages afterwards (they would travel in the image)
    env: dict[Annotated[str, Field(pattern=r"^[A-Z_][A-Z0-9_]*$")], str] = {}
    # The only hosts an install reaches (through the sandbox's proxy), with package_mirrors of
    # parameters/defaults.yaml: the distro's own mirrors, whatever the guest's sources name.
    mirrors: list[MirrorHost] = []


class Profile(_Strict):
    name: str
    description: str
    detect: list[DetectRule]
    inittab: GuestPath | None = None
    securetty: GuestPath | None = None
    serial_getty: str | None = None  # the inittab line that gives a login on ttyS0
    xen_consoles: list[str] = ["xvc0", "hvc0"]
    modprobe_conf: GuestPath | None = None  # the single-file style (modprobe.conf)
    modprobe_d: GuestPath | None = None  # or a file of our own in modprobe.d
    fstab: GuestPath = "/etc/fstab"
    selinux_config: GuestPath | None = None
    rc_local: GuestPath | None = None
    shadow: GuestPath = "/etc/shadow"
    grub_legacy_conf: GuestPath | None = None  # write a GRUB legacy grub.conf (+ menu.lst, grub.cfg links)
    grub_dir: GuestPath = "/boot/grub"  # where 30-bootable installs GRUB 2 and its grub.cfg
    initrd: InitrdTool | None = None
    packages: Packages | None = None
    # The package whose kernel has every target's drivers (named when the guest's kernel lacks one).
    kernel_package: str | None = None
    # Who makes new SSH host keys on the first boot: systemd (a one-shot unit 20-migrate writes),
    # distro (its sshd start-up does, as CentOS's), auto (the unit if the guest runs systemd).
    ssh_host_keys: Literal["systemd", "distro", "auto"] = "auto"
    clean: list[str] = ["defaults"]


class Block(_Strict):
    begin: str  # regular expressions of the first and last line of a block the platform added
    end: str


class Platform(_Strict):
    name: str
    description: str
    files: list[GuestPath] = []  # agent files, directories, logs (globs allowed)
    config_files: list[GuestPath] = []  # files the platform adds blocks to
    blocks: list[Block] = []
    boot_hooks: list[str] = []  # regular expressions of rc.local lines that are the platform's


def _load(kind: str, name: str, model: type[BaseModel]) -> BaseModel:
    if (
        not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,39}", name)
        or not (config.parameters_dir() / kind / f"{name}.yaml").is_file()
    ):
        raise ParameterError(f"unknown {kind[:-1]} {name!r} (known: {', '.join(config.available(kind))})")
    path = config.parameters_dir() / kind / f"{name}.yaml"
    try:
        return model(**config._load_yaml(path))
    except ValidationError as e:
        raise ParameterError(config._one_line(e, str(path))) from None


@cache
def load_profile(name: str) -> Profile:
    profile = _load("profiles", name, Profile)
    assert isinstance(profile, Profile)
    return profile


@cache
def load_platform(name: str) -> Platform:
    platform = _load("platforms", name, Platform)
    assert isinstance(platform, Platform)
    return platform


@dataclass(frozen=True)
class Detected:
    profile: Profile
    reason: str


@dataclass(frozen=True)
class RuleCheck:
    profile: str
    rule: str  # "/etc/redhat-release matches 'release 5'"
    holds: bool


def _holds(guest: Guest, rule: DetectRule) -> bool:
    if not rule.matches:
        return guest.exists(rule.file)
    # Through a symlink too (resolved inside the guest); a directory or a device never matches.
    text = guest.read_text(rule.file) if guest.is_file(rule.file) else None
    return text is not None and re.search(rule.matches, text, re.MULTILINE) is not None


def _describe(rule: DetectRule) -> str:
    return f"{rule.file} matches {rule.matches!r}" if rule.matches else f"{rule.file} exists"


def _in_order() -> list[str]:
    return [n for n in config.available("profiles") if n != "generic"] + ["generic"]


def check_rules(guest: Guest) -> list[RuleCheck]:
    """Every detect rule of every profile, in detection order, and whether it holds: why the
    detected profile was chosen, and why the others were not."""
    return [
        RuleCheck(name, _describe(rule), _holds(guest, rule))
        for name in _in_order()
        for rule in load_profile(name).detect
    ]


def _os_name(guest: Guest) -> str:
    text = guest.read_text("/etc/os-release") if guest.is_file("/etc/os-release") else None
    m = re.search(r'^PRETTY_NAME="?([^"\n]*)', text or "", re.MULTILINE)
    name = re.sub(r"[^A-Za-z0-9 ._()/+-]", "", m.group(1) if m else "")[:60].strip()
    return f" ({name})" if name else ""


def detect(guest: Guest) -> Detected:
    """The first distro profile (in name order) whose every rule holds for the guest. ``generic``
    is never guessed: a guest no profile knows is an error that says how to make one."""
    for name in _in_order():
        profile = load_profile(name)
        if profile.detect and all(_holds(guest, rule) for rule in profile.detect):
            return Detected(profile, "; ".join(_describe(rule) for rule in profile.detect))
    raise GuestError(
        f"no profile knows this guest{_os_name(guest)}: propose one from the guest with notebooks/explore.ipynb "
        "(make lab) and save it under parameters/profiles/, or name one with --profile (generic: a KVM-style "
        "guest that needs no migration)"
    )


def resolve(guest: Guest, name: str) -> Detected:
    """``auto`` detects; any other name is taken as given."""
    if name == "auto":
        return detect(guest)
    return Detected(load_profile(name), "asked for by the request")
