"""Distro profiles and cloud platforms: what differs between guests, as validated YAML.

``parameters/profiles/<name>.yaml`` says where a distro keeps what 20-migrate edits, how its
initrd is rebuilt, which clean operations it runs by default, and how to recognise it: by the
ids its os-release gives (``os_release``), or by files (``detect``) for the releases before
os-release. A profile may name a ``base`` and say only where it differs from it (``ubuntu`` from
``debian``); how it is recognised is always its own.
``parameters/platforms/<name>.yaml`` says what a cloud platform leaves in an instance (agent
files, config blocks, boot hooks) for 10-clean and 20-migrate to remove.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from imaging import config
from imaging.config import MirrorHost
from imaging.disk.files import Guest
from imaging.errors import GuestError, ParameterError
from imaging.guest import osrelease
from imaging.guest.osrelease import OsInfo

_GUEST_PATH = r"^/[A-Za-z0-9._+@/*-]*$"


def _plain(path: str) -> str:
    # Each one resolves inside the guest anyway; a "..", "." or "//" here would only say
    # something other than what is meant.
    if path != "/" and (path.endswith("/") or any(p in ("", ".", "..") for p in path.split("/")[1:])):
        raise ValueError(f"{path!r} is not a plain guest path (no '.', '..', '//' or trailing '/')")
    return path


GuestPath = Annotated[str, Field(pattern=_GUEST_PATH), AfterValidator(_plain)]
OsId = Annotated[str, Field(pattern=r"^[a-z0-9._-]{1,40}$")]
OsVersion = Annotated[str, Field(pattern=r"^[A-Za-z0-9._~-]{1,40}$")]


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


class OsRelease(_Strict):
    """The guest's own word for what it is (os-release(5)), which this profile is written for."""

    # Each ID with the VERSION_IDs the profile was written for ("9" takes 9.4, not 90); an empty
    # list takes every version (a rolling release). Another version is converted with a warning.
    ids: dict[OsId, list[OsVersion]] = {}
    # ID_LIKE words (besides the ids) for which this profile stands in when no profile names the
    # guest's ID: converted with a warning.
    like: list[OsId] = []


class InitrdTool(_Strict):
    """How the guest's own tool rebuilds an initrd, run inside the guest (sandboxed)."""

    tool: GuestPath
    # Where older releases keep the same tool: the first of tool and these the guest has is {tool}.
    alternatives: list[GuestPath] = []
    image: str  # guest path template, {version}
    # argv templates: {tool}, {version}, {image}, {modules} (all, space-separated, in one
    # argument); an item holding {module} repeats once per module.
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


class KernelLinks(_Strict):
    """Links to the kernel and initrd the guest boots next, which the default entry of
    30-bootable's menu follows (guest/kernel_links.py)."""

    # (kernel, initrd) pairs the guest's own kernel scripts keep on the kernel installed last;
    # the first the guest has is followed. None of them there: imaging's hook keeps its own.
    kept: list[tuple[GuestPath, GuestPath]] = []


class Efi(_Strict):
    """How the guest boots under UEFI (guest/firmware.py). Paths are the guest's, glob patterns
    allowed; the first found of each is taken."""

    boots: bool = True  # false: the distribution's kernels do not boot under UEFI
    why: str = ""  # said when UEFI is refused
    shim: list[GuestPath] = []  # shim signed by Microsoft's UEFI CA
    grub: list[GuestPath] = []  # GRUB signed by the distribution's key, which shim carries
    mok: list[GuestPath] = []  # MokManager
    packages: list[str] = []  # what installs them, when missing (in the sandbox, as --install)


class Profile(_Strict):
    name: str
    description: str
    base: str | None = None  # the profile this one says only its differences from
    detect: list[DetectRule] = []
    os_release: OsRelease | None = None
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
    grub_dir: GuestPath = "/boot/grub"  # where the guest's own GRUB 2 is (imaging's: /boot/imaging-grub)
    initrd: InitrdTool | None = None
    packages: Packages | None = None
    # The package whose kernel has every target's drivers (named when the guest's kernel lacks one).
    kernel_package: str | None = None
    # Who makes new SSH host keys on the first boot: systemd (a one-shot unit 20-migrate writes),
    # distro (its sshd start-up does, as CentOS's), auto (the unit if the guest runs systemd).
    ssh_host_keys: Literal["systemd", "distro", "auto"] = "auto"
    # null: the menu does not follow kernel updates (the guest's own grub.conf does, GRUB legacy).
    kernel_links: KernelLinks | None = KernelLinks()
    efi: Efi = Efi()
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


def _data(kind: str, name: str) -> dict[str, Any]:
    if (
        not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,39}", name)
        or not (config.parameters_dir() / kind / f"{name}.yaml").is_file()
    ):
        raise ParameterError(f"unknown {kind[:-1]} {name!r} (known: {', '.join(config.available(kind))})")
    return config._load_yaml(config.parameters_dir() / kind / f"{name}.yaml")


def _load(kind: str, name: str, model: type[BaseModel], data: dict[str, Any] | None = None) -> BaseModel:
    path = config.parameters_dir() / kind / f"{name}.yaml"
    try:
        return model(**(_data(kind, name) if data is None else data))
    except ValidationError as e:
        raise ParameterError(config._one_line(e, str(path))) from None


# How a profile is recognised is its own: a base's rules would make it claim the base's guests.
_OWN = frozenset({"name", "description", "base", "detect", "os_release"})


def _merge(base: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """``own`` over ``base``: mappings key by key (ubuntu changes only packages' mirrors), lists
    and values whole (null unsets)."""
    out = dict(base)
    for key, value in own.items():
        old = out.get(key)
        out[key] = _merge(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return out


def _profile_data(name: str, below: tuple[str, ...] = ()) -> dict[str, Any]:
    data = _data("profiles", name)
    base = data.get("base")
    if base is None:
        return data
    if not isinstance(base, str) or base in (*below, name) or len(below) >= 4:
        raise ParameterError(
            f"profile {name}: base {base!r} is not a profile it can build on (a loop, or too deep)"
        )
    inherited = {k: v for k, v in _profile_data(base, (*below, name)).items() if k not in _OWN}
    return _merge(inherited, data)


@cache
def load_profile(name: str) -> Profile:
    profile = _load("profiles", name, Profile, _profile_data(name))
    assert isinstance(profile, Profile)
    return profile


def build(data: dict[str, Any]) -> Profile:
    """A profile not saved yet (a proposal), on its base as loading would put it."""
    base = data.get("base")
    if isinstance(base, str):
        data = _merge({k: v for k, v in _profile_data(base).items() if k not in _OWN}, data)
    return Profile(**data)


@cache
def load_platform(name: str) -> Platform:
    platform = _load("platforms", name, Platform)
    assert isinstance(platform, Platform)
    return platform


@dataclass(frozen=True)
class Detected:
    profile: Profile
    reason: str
    # What was taken for granted, one line: a version or a distro the profile was not written
    # for ("" when the guest is one it knows). The records and notebooks show it as a warning.
    assumed: str = ""


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


def _ids(profile: Profile) -> dict[str, list[str]]:
    return profile.os_release.ids if profile.os_release else {}


def _likes(profile: Profile, word: str) -> bool:
    return word in _ids(profile) or (profile.os_release is not None and word in profile.os_release.like)


def check_rules(guest: Guest) -> list[RuleCheck]:
    """Every detect rule of every profile, in detection order, and whether it holds: why the
    detected profile was chosen, and why the others were not."""
    info = osrelease.read(guest)
    checks = []
    for name in _in_order():
        profile = load_profile(name)
        if ids := _ids(profile):
            known = "; ".join(f"{i} {', '.join(v) or 'any version'}" for i, v in ids.items())
            holds = info.id in ids and osrelease.known(info.version, ids[info.id])
            checks.append(RuleCheck(name, f"/etc/os-release ID and VERSION_ID: {known}", holds))
        if profile.os_release and profile.os_release.like:
            likes = ", ".join(profile.os_release.like)
            checks.append(
                RuleCheck(
                    name, f"/etc/os-release ID_LIKE: {likes}", any(_likes(profile, w) for w in info.like)
                )
            )
        checks += [RuleCheck(name, _describe(rule), _holds(guest, rule)) for rule in profile.detect]
    return checks


def _choose(profiles: list[Profile], ident: str, version: str) -> tuple[Profile, str, bool]:
    """Of the profiles that take ``ident``: (the one written for ``version``, or else the one
    for the nearest version below it, or else the first; that version; whether it is known)."""
    best: tuple[tuple[int, ...], Profile, str] | None = None
    for p in profiles:
        versions = _ids(p).get(ident)
        if versions is not None and osrelease.known(version, versions):
            return p, version, True
        below = [v for v in versions or [] if osrelease.version_key(v) <= osrelease.version_key(version)]
        if below:
            top = max(below, key=osrelease.version_key)
            if best is None or osrelease.version_key(top) > best[0]:
                best = (osrelease.version_key(top), p, top)
    return (best[1], best[2], False) if best else (profiles[0], "", False)


def _by_os_release(info: OsInfo, ordered: list[Profile]) -> Detected | None:
    seen = f"os-release: ID {info.id}, VERSION_ID {info.version or '(none)'}"
    if claiming := [p for p in ordered if info.id in _ids(p)]:
        profile, near, known = _choose(claiming, info.id, info.version)
        if known:
            return Detected(profile, seen)
        written = ", ".join(_ids(profile)[info.id])
        treated = f"treated as {info.id} {near}" if near else f"treated as profile {profile.name}"
        return Detected(profile, seen, f"{info}: profile {profile.name} is written for {info.id} {written}, not "
                                       f"{info.version or 'one without a VERSION_ID'}; {treated}")  # fmt: skip
    for word in info.like:
        if claiming := [p for p in ordered if _likes(p, word)]:
            profile = _choose(claiming, word, info.version)[0]
            return Detected(profile, f"os-release: ID_LIKE {' '.join(info.like)}",
                            f"{info}: no profile is written for {info.id or 'its ID'}; treated as {profile.name}, "
                            f"the profile for its ID_LIKE {word}")  # fmt: skip
    return None


def detect(guest: Guest) -> Detected:
    """The profile for the guest, in this order, each in profile name order (``generic`` last):

    1. the one whose os-release ``ids`` name the guest's ID (at a version it lists, else the one
       for the nearest version below, with a warning);
    2. one whose ``like`` or ids name a word of the guest's ID_LIKE (with a warning);
    3. the first whose every ``detect`` rule holds: the releases before os-release (CentOS 5 and
       6), which need no warning; a guest whose os-release names an ID no profile knows gets one.

    ``generic`` is never guessed: a guest no profile knows is an error that says how to go on."""
    info = osrelease.read(guest)
    ordered = [load_profile(name) for name in _in_order()]
    if found := _by_os_release(info, ordered):
        return found
    for profile in ordered:
        if profile.detect and all(_holds(guest, rule) for rule in profile.detect):
            reason = "; ".join(_describe(rule) for rule in profile.detect)
            assumed = (f"{info}: no profile is written for {info.id}; treated as {profile.name}, whose files it has "
                       f"({reason})") if info.id else ""  # fmt: skip
            return Detected(profile, reason, assumed)
    named = f" ({info.name})" if info.name else ""
    raise GuestError(
        f"no profile knows this guest{named}: propose one from the guest with notebooks/explore.ipynb "
        "(make lab) and save it under parameters/profiles/, or name one with --profile (generic: a KVM-style "
        "guest that needs no migration)"
    )


def resolve(guest: Guest, name: str) -> Detected:
    """``auto`` detects; any other name is taken as given."""
    if name == "auto":
        return detect(guest)
    return Detected(load_profile(name), "asked for by the request")
