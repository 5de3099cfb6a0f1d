"""Where things live, and the YAML parameter sets (defaults, targets), validated on load.

Code holds mechanisms, ``parameters/*.yaml`` holds facts: a target's disk controller, a run's
defaults, which stages a request kind runs. Unknown keys are errors, not warnings.
"""

from __future__ import annotations

import os
import re
from enum import StrEnum
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from imaging.errors import ParameterError

PROJECT = Path(__file__).resolve().parent.parent


def parameters_dir() -> Path:
    return Path(os.environ.get("IMAGING_PARAMETERS", PROJECT / "parameters"))


def notebooks_dir() -> Path:
    return Path(os.environ.get("IMAGING_NOTEBOOKS", PROJECT / "notebooks"))


def runs_dir() -> Path:
    return Path(os.environ.get("IMAGING_RUNS", PROJECT / "runs"))


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "imaging"
    return Path(os.environ.get("IMAGING_CACHE", default))


class ImageFormat(StrEnum):
    """What ``--format`` takes; each knows its file extension and what qemu calls its disk."""

    raw = "raw"
    qcow2 = "qcow2"
    vmdk = "vmdk"
    vdi = "vdi"
    vhd = "vhd"
    vhdx = "vhdx"
    ova = "ova"
    gce = "gce"

    @property
    def extension(self) -> str:
        return "tar.gz" if self is ImageFormat.gce else self.value

    @property
    def qemu_format(self) -> str:
        """qemu's name for the disk format (of the disk inside, for an OVA or a GCE tarball)."""
        return {"vhd": "vpc", "ova": "vmdk", "gce": "raw"}.get(self.value, self.value)

    @property
    def is_archive(self) -> bool:
        """An OVA (descriptor, disk, manifest) and a GCE image (disk.raw in a gzipped tar) are
        archives holding a disk, not disk images."""
        return self in (ImageFormat.ova, ImageFormat.gce)


class VmdkSubformat(StrEnum):
    stream_optimized = (
        "streamOptimized"  # compressed grains, the OVA's disk; written by imaging.formats.vmdk
    )
    monolithic_sparse = "monolithicSparse"  # uncompressed, growable; written by qemu-img


class OvfVersion(StrEnum):
    v1 = "1.0"  # SHA1 manifest: what VirtualBox and VMware both import
    v2 = "2.0"  # SHA256 manifest


class Layout(StrEnum):
    aligned = "aligned"  # partition 1 at 1 MiB, as every partitioner has done since 2009
    legacy = "legacy"  # partition 1 at sector 63, ending on a cylinder, as in the original procedure


class Firmware(StrEnum):
    bios = "bios"  # MBR, GRUB for i386-pc: the original procedure's disk
    uefi = "uefi"  # GPT with an EFI system partition; Secure Boot where the guest has the signed chain
    hybrid = "hybrid"  # GPT with a BIOS boot partition and an ESP: boots under either firmware


# What firmware a disk made for each choice boots under.
FIRMWARE_PLATFORMS: dict[Firmware, tuple[str, ...]] = {
    Firmware.bios: ("bios",),
    Firmware.uefi: ("uefi",),
    Firmware.hybrid: ("bios", "uefi"),
}


def choose_firmware(asked: str, target: Target, layout: Layout | str = Layout.aligned) -> Firmware:
    """The firmware a disk for ``target`` gets: ``auto`` is hybrid where the target boots both (and
    the layout is GPT's), else the one it boots; an explicit choice the target or layout cannot
    boot is refused in one line."""
    layout = Layout(layout)
    boots = set(target.firmware)
    if asked in ("", "auto"):
        if layout is Layout.legacy or boots == {"bios"}:
            if "bios" not in boots:
                raise ParameterError(f"target {target.name} boots UEFI only; layout legacy is MBR for BIOS")
            return Firmware.bios
        return Firmware.hybrid if boots == {"bios", "uefi"} else Firmware.uefi
    try:
        chosen = Firmware(asked)
    except ValueError:
        raise ParameterError(f"firmware {asked!r} is not one of bios, uefi, hybrid") from None
    missing = [p for p in FIRMWARE_PLATFORMS[chosen] if p not in boots]
    if missing:
        raise ParameterError(
            f"firmware {chosen.value}: target {target.name} does not boot {' or '.join(missing).upper()} "
            f"(it boots {', '.join(sorted(boots)).upper()})"
        )
    if layout is Layout.legacy and chosen is not Firmware.bios:
        raise ParameterError(
            f"firmware {chosen.value} needs a GPT disk; layout legacy is the original MBR layout (use --firmware bios)"
        )
    return chosen


class Placement(StrEnum):
    copy = "copy"  # the instance's own filesystem, block-copied, checked and grown
    mkfs = "mkfs"  # a new filesystem, files copied across (the original procedure)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_MODULE = r"^[a-z0-9][a-z0-9_-]{0,63}$"


class OvfFacts(_Strict):
    """How an OVA names the target's guest OS and hardware family (see imaging/formats/ova.py)."""

    os_id: int = Field(default=100, ge=0, le=65535)  # CIM_OperatingSystem OsType: 100 = Linux 2.6.x 64-Bit
    os_description: str = "Linux 2.6.x 64-Bit"
    vbox_os_type: str = Field(
        default="Linux26_64", pattern=r"^[A-Za-z0-9_]+$"
    )  # VirtualBox's guest OS type id
    vmware_os_type: str = Field(
        default="other26xLinux64Guest", pattern=r"^[A-Za-z0-9_]+$"
    )  # VMware's guestId
    # Space-separated hardware families; an importer takes the first it knows.
    system_type: str = Field(
        default="virtualbox-2.2 vmx-10", pattern=r"^[A-Za-z0-9._-]+( [A-Za-z0-9._-]+)*$"
    )


Module = Annotated[str, Field(pattern=_MODULE)]
_DEVICE = r"^[a-z0-9][a-z0-9._-]{0,39}$"


class QemuDevice(_Strict):
    """How the boot check gives a guest one disk controller or NIC in QEMU."""

    # QEMU's -device values, in order; {drive} is the disk's drive id, {netdev} the network's.
    devices: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.,={}-]+$")]] = Field(min_length=1)
    modules: list[Module]  # the guest's drivers for it: one of them must be there


class Ovmf(_Strict):
    """A UEFI firmware for QEMU: its code (read-only) and the template of its variable store."""

    code: str = Field(pattern=r"^/[A-Za-z0-9._/-]+$")
    vars: str = Field(pattern=r"^/[A-Za-z0-9._/-]+$")


class QemuDevices(_Strict):
    """parameters/qemu.yaml: the disk controllers and NICs the boot check can attach, by name, and
    the UEFI firmware it boots with (plain, and with Secure Boot)."""

    controllers: dict[Annotated[str, Field(pattern=_DEVICE)], QemuDevice]
    nics: dict[Annotated[str, Field(pattern=_DEVICE)], QemuDevice]
    uefi: Ovmf | None = None
    secure_boot: Ovmf | None = None


class BootCheck(_Strict):
    """The machine 50-verify boots the artifact on, when QEMU has not got the target's own."""

    controller: Annotated[str, Field(pattern=_DEVICE)]  # a controller of parameters/qemu.yaml
    nic: Annotated[str, Field(pattern=_DEVICE)]  # a NIC of parameters/qemu.yaml
    note: str = ""  # why it differs from the target's machine (shown with the verdict)


_SUBFORMATS: dict[str, tuple[str, ...]] = {
    "vhd": ("dynamic", "fixed"),
    "vmdk": ("streamOptimized", "monolithicSparse"),
}


class Target(_Strict):
    name: str
    description: str
    # The machine as the target presents it to the guest. Unless boot: says otherwise, 50-verify
    # boots on the same (they must then be names of parameters/qemu.yaml).
    disk_controller: Annotated[str, Field(pattern=_DEVICE)]
    nic: Annotated[str, Field(pattern=_DEVICE)]
    memory_mib: int = Field(512, ge=64, le=65536)
    cpus: int = Field(1, ge=1, le=64)
    # What the guest needs to boot on this machine (used by 20-migrate):
    storage_modules: list[Module]  # aliased as scsi_hostadapter, in order
    initrd_modules: list[Module]  # everything the initrd must load
    nic_module: Module
    # Drivers the rebuilt initrd must be seen to carry (in its listing, or built into the kernel):
    # a cloud whose disk or NIC QEMU cannot show is checked this way.
    initrd_required: list[Module] = []
    modprobe_extra: list[str] = []  # further modprobe.conf lines (the original's VirtualBox sound setup)
    ovf: OvfFacts = Field(default_factory=OvfFacts)
    # The formats this machine boots or imports. An appliance format pins its machine (an OVA's
    # descriptor declares a SATA AHCI disk and an e1000 NIC): only targets with that machine list it.
    formats: list[ImageFormat]
    # The variant of a format this machine takes, where it takes only one (Azure: a fixed VHD).
    subformats: dict[ImageFormat, str] = {}
    boot: BootCheck | None = None  # the boot check's machine, when QEMU has not got the target's
    # The firmware the target's machines boot disks with (see choose_firmware).
    firmware: list[Literal["bios", "uefi"]] = Field(default=["bios", "uefi"], min_length=1)

    @field_validator("subformats")
    @classmethod
    def _subformats(cls, v: dict[ImageFormat, str]) -> dict[ImageFormat, str]:
        for fmt, sub in v.items():
            known = _SUBFORMATS.get(fmt.value, ())
            if sub not in known:
                raise ValueError(
                    f"{fmt.value} has no subformat {sub!r}"
                    + (f" (known: {', '.join(known)})" if known else "")
                )
        return v

    @property
    def boot_check(self) -> BootCheck:
        return self.boot or BootCheck(controller=self.disk_controller, nic=self.nic)

    def subformat(self, fmt: ImageFormat) -> str:
        """The variant of ``fmt`` this target takes ("" when it takes any, or the format has none)."""
        return self.subformats.get(fmt, "")


# work/esp.raw: the source's ESP (00-acquire), there only when the source has one.
StageInput = Literal["work/instance.raw", "work/esp.raw", "work/disk.raw", "artifact"]


# A host name, or a pattern of them (*.archive.ubuntu.com): what a package install may reach.
MirrorHost = Annotated[
    str,
    Field(
        pattern=r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$"
    ),
]


class SandboxLimits(_Strict):
    """What the guest's own tools (mkinitrd, apt, yum) may use, each command with its children."""

    memory: str = "2G"
    processes: int = Field(default=1024, ge=16, le=65536)
    seconds: int = Field(default=1800, ge=1, le=86400)

    @field_validator("memory")
    @classmethod
    def _memory(cls, v: str) -> str:
        if parse_disk_size(v)[0] != "absolute" or parse_disk_size(v)[1] < 64 << 20:
            raise ValueError(f"memory {v!r} is not a size of at least 64M")
        return v


class StageTime(_Strict):
    """A stage's time limit: ``seconds``, plus ``per_gib`` for each GiB of the source's data."""

    seconds: float = Field(ge=0.1)
    per_gib: float = Field(0, ge=0)

    def limit(self, data_bytes: int) -> float:
        return self.seconds + self.per_gib * data_bytes / (1 << 30)


class Defaults(_Strict):
    pipelines: dict[str, list[str]]
    # What a stage starts from that an earlier one made (see defaults.yaml).
    stage_inputs: dict[str, list[StageInput]] = {}
    # Site policy, not request parameters: the guest's tools' limits, the hosts a package
    # install may reach besides the profile's mirrors, and each stage's time limit.
    sandbox: SandboxLimits = SandboxLimits()
    package_mirrors: list[MirrorHost] = []
    stage_time: dict[str, StageTime] = {}
    # The target when a request names none: by its format, else the default.
    target: str = "kvm"
    target_by_format: dict[ImageFormat, str] = {}
    snapshots: Literal["drop", "keep"] = "drop"
    layout: Layout = Layout.aligned
    firmware: Literal["auto", "bios", "uefi", "hybrid"] = "auto"
    placement: Placement = Placement.copy
    disk_size: str = "auto"
    fs_type: Literal["keep", "ext2", "ext3", "ext4"] = "keep"
    grub_timeout: int = Field(1, ge=0, le=300)
    kernel_args: str = ""
    boot_timeout: int = Field(240, ge=5, le=3600)
    boot_marker: str = ""
    keep_work: bool = False
    # 10-clean and 20-migrate (see parameters/profiles, parameters/platforms):
    profile: str = "auto"
    platforms: list[str] = ["atmosphere", "eucalyptus"]
    clean: list[str] = []
    remove_users: list[str] = []
    xen_console: Literal["serial", "remove"] = "serial"
    runlevel: int | None = Field(default=None, ge=1, le=5)
    selinux: Literal["disabled", "permissive", "keep"] = "disabled"
    enforcing_arg: bool = False
    root_password_hash_file: str = ""
    packages_install: list[str] = []
    packages_remove: list[str] = []
    packages_room: str = "2G"
    kernel: str = ""
    vmdk_subformat: VmdkSubformat = VmdkSubformat.stream_optimized
    compress: bool = False
    ovf_version: OvfVersion = OvfVersion.v1
    # 25-secrets: fail, warn, clean (remove the files) or off; auto: fail for a public image,
    # warn for everything else. Findings allowed by their fingerprint do neither.
    secrets: Literal["auto", "fail", "warn", "clean", "off"] = "auto"
    secrets_allow: list[str] = []

    @model_validator(mode="after")
    def _known_stages(self) -> Defaults:
        known = {s for stages in self.pipelines.values() for s in stages}
        unknown = sorted(set(self.stage_inputs) - known)
        if unknown:
            raise ValueError(f"stage_inputs names stages no pipeline runs: {', '.join(unknown)}")
        return self

    @field_validator("kernel_args")
    @classmethod
    def _safe_kernel_args(cls, v: str) -> str:
        check_kernel_args(v)
        return v

    @field_validator("disk_size")
    @classmethod
    def _size(cls, v: str) -> str:
        parse_disk_size(v)
        return v


def _one_line(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: {where}: {first['msg']}{more}"


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParameterError(f"parameter file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ParameterError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ParameterError(f"{path}: expected a mapping at the top level")
    return data


@cache
def load_defaults() -> Defaults:
    path = parameters_dir() / "defaults.yaml"
    try:
        return Defaults(**_load_yaml(path))
    except ValidationError as e:
        raise ParameterError(_one_line(e, str(path))) from None


_SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")


def available(kind: str) -> list[str]:
    return sorted(p.stem for p in (parameters_dir() / kind).glob("*.yaml"))


@cache
def load_qemu_devices() -> QemuDevices:
    """QEMU's devices for the boot check; a parameter set without its own qemu.yaml (one made for
    other targets, say) uses the one shipped here."""
    path = parameters_dir() / "qemu.yaml"
    if not path.is_file():
        path = PROJECT / "parameters" / "qemu.yaml"
    try:
        return QemuDevices(**_load_yaml(path))
    except ValidationError as e:
        raise ParameterError(_one_line(e, str(path))) from None


@cache
def load_target(name: str) -> Target:
    if not _SLUG.fullmatch(name) or not (parameters_dir() / "targets" / f"{name}.yaml").is_file():
        raise ParameterError(f"unknown target {name!r} (known: {', '.join(available('targets'))})")
    path = parameters_dir() / "targets" / f"{name}.yaml"
    try:
        target = Target(**_load_yaml(path))
    except ValidationError as e:
        raise ParameterError(_one_line(e, str(path))) from None
    if target.name != name:
        raise ParameterError(f"{path}: name {target.name!r} does not match the file name")
    _check_boot_machine(target, path)
    asked = {_norm(m) for m in [*target.initrd_modules, target.nic_module]}
    if unasked := [m for m in target.initrd_required if _norm(m) not in asked]:
        raise ParameterError(
            f"{path}: initrd_required names {', '.join(unasked)}, which initrd_modules does not ask the initrd tool for"
        )
    for fmt in target.subformats:
        if fmt not in target.formats:
            raise ParameterError(f"{path}: subformats names {fmt.value}, which is not among its formats")
    return target


def _norm(module: str) -> str:
    return module.replace("-", "_")


def _check_boot_machine(target: Target, path: Path) -> None:
    """The boot check's controller and NIC must be ones QEMU is told how to attach, and the
    initrd must carry a driver for that controller, or the boot check could never pass."""
    devices, boot = load_qemu_devices(), target.boot_check
    where = "boot" if target.boot else "disk_controller/nic"
    for kind, name, known in (("controller", boot.controller, devices.controllers),
                              ("NIC", boot.nic, devices.nics)):  # fmt: skip
        if name not in known:
            raise ParameterError(
                f"{path}: {where}: {kind} {name!r} is not one the boot check knows "
                f"(parameters/qemu.yaml: {', '.join(sorted(known))})"
            )
    carried = {_norm(m) for m in [*target.initrd_modules, *target.initrd_required]}
    drivers = devices.controllers[boot.controller].modules
    if not carried & {_norm(m) for m in drivers}:
        raise ParameterError(
            f"{path}: the boot check's {boot.controller} disk needs {' or '.join(drivers)} in initrd_modules"
        )


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")


def check_name(name: str) -> str:
    """A request's name becomes a file name: letters, digits, '.', '_', '-', no '..'."""
    if not _NAME.fullmatch(name) or ".." in name:
        raise ParameterError(
            f"name {name!r} is not allowed: use 1-80 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no '/', '..', spaces or shell characters)"
        )
    return name


def check_run_id(run_id: str) -> str:
    """A run id names a directory under the runs directory, and nothing else (no path)."""
    if not _NAME.fullmatch(run_id) or ".." in run_id:
        raise ParameterError(
            f"run id {run_id!r} is not allowed: a run is named by 1-80 letters, digits, '.', '_' or '-' "
            f"and lives under the runs directory ({runs_dir()}), never at another path"
        )
    return run_id


def default_target(fmt: str) -> str:
    """The target a request for ``fmt`` gets when it names none (an OVA is an appliance)."""
    defaults = load_defaults()
    return defaults.target_by_format.get(check_format(fmt), defaults.target)


def check_target_format(target: str, fmt: str, subformat: str = "") -> None:
    """A format (and its variant) may only go with a target that boots it: an error before
    anything runs."""
    tgt, image_format = load_target(target), check_format(fmt)
    wanted = tgt.subformat(image_format)
    if subformat and wanted and subformat != wanted:
        raise ParameterError(
            f"target {tgt.name} takes {image_format.value} as {wanted} only, not {subformat}"
        )
    if image_format not in tgt.formats:
        fits = [name for name in available("targets") if image_format in load_target(name).formats]
        raise ParameterError(
            f"format {image_format.value} does not boot on target {tgt.name} ({tgt.disk_controller} disk, "
            f"{tgt.nic} NIC; it takes {', '.join(f.value for f in tgt.formats)}): "
            f"use a target for {image_format.value} ({', '.join(fits) or 'none'})"
        )


def check_display_name(name: str) -> str:
    """A request's name as its user wrote it: the image's name in the cloud and in mails.
    1-255 printable characters (any script, spaces inside), no control characters."""
    if not isinstance(name, str) or not 1 <= len(name) <= 255:
        raise ParameterError("name must be 1 to 255 characters")
    bad = next((c for c in name if not c.isprintable() and c != " "), None)
    if bad is not None:
        raise ParameterError(f"name {name!r} has a control or unprintable character ({bad!r})")
    if name != name.strip():
        raise ParameterError(f"name {name!r} starts or ends with white space")
    return name


def slug(name: str) -> str:
    """The safe form of a display name for file names, run ids and object keys: the name itself
    when it is one already, else its letters and digits joined by '-', shortened, with a short
    hash of the whole name so that two names never share a slug."""
    check_display_name(name)
    if _NAME.fullmatch(name) and ".." not in name and len(name) <= 60:
        return name
    import hashlib
    import unicodedata

    ascii_text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    words = re.sub(r"[^A-Za-z0-9]+", "-", ascii_text).strip("-")[:50].strip("-")
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{words}-{digest}" if words else f"image-{digest}"


def check_format(value: str) -> ImageFormat:
    try:
        return ImageFormat(value)
    except ValueError:
        known = ", ".join(f.value for f in ImageFormat)
        raise ParameterError(f"unknown format {value!r} (known: {known})") from None


_KERNEL_ARG = re.compile(r"^[A-Za-z0-9_.,:/=+@-]+$")


def check_kernel_args(value: str) -> str:
    """Kernel arguments end up in grub.cfg: plain words only, no quotes, braces or ';'."""
    for word in value.split():
        if not _KERNEL_ARG.fullmatch(word):
            raise ParameterError(f"kernel argument {word!r} has characters GRUB would interpret")
    return value


_SIZE = re.compile(r"^(\+)?(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_disk_size(value: str) -> tuple[str, int]:
    """'auto' -> ('auto', 0); '10G' -> ('absolute', bytes); '+1G' -> ('extra', bytes)."""
    if value.strip().lower() == "auto":
        return "auto", 0
    m = _SIZE.fullmatch(value.strip())
    if not m:
        raise ParameterError(f"disk size {value!r} is not 'auto', a size like 10G, or extra room like +1G")
    amount = int(float(m.group(2)) * _UNITS[m.group(3).upper()])
    return ("extra" if m.group(1) else "absolute"), amount


def stage_inputs(stage: str) -> list[str]:
    return list(load_defaults().stage_inputs.get(stage, []))


def pipeline_stages(kind: str) -> list[str]:
    stages = load_defaults().pipelines.get(kind)
    if not stages:
        raise ParameterError(f"unknown pipeline {kind!r} (known: {', '.join(load_defaults().pipelines)})")
    return stages
