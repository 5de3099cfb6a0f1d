"""Stage 40-export: the bootable disk becomes the artifact a user asked for, as (sha256, path).

Every format comes from the same disk (the run's ``work/disk.raw``, or for ``convert`` a disk
the user already has, in any format qemu-img reads):

==========  ==========================================================================
raw         the disk itself (the run's: hard link; a user's: clone or sparse copy); qemu-img from other formats
qcow2       ``qemu-img convert``; compressed: :mod:`imaging.formats.qcow2` (clusters deflated on every core)
vmdk        streamOptimized: :mod:`imaging.formats.vmdk` (grains deflated on every core);
            monolithicSparse: ``qemu-img convert``
vdi         ``qemu-img convert`` (dynamic, qemu-img's default)
vhd         ``qemu-img convert -O vpc`` (dynamic, exact size: ``force_size``); fixed for a target that
            takes only fixed VHDs (Azure): :mod:`imaging.formats.vhd` (size rounded up to a MiB)
vhdx        ``qemu-img convert`` (dynamic)
ova         :mod:`imaging.formats.vmdk` then :mod:`imaging.formats.ova` (descriptor, disk, manifest)
gce         :mod:`imaging.formats.gce`: disk.raw in a gzipped GNU tar (GNU tar, pigz on every core)
==========  ==========================================================================

qemu-img's random identities (UUIDs, CIDs, timestamps) are replaced by ones derived from the
disk's content (:mod:`imaging.formats.identity`): the same disk always gives byte-identical artifacts.
The artifact is written under a hidden ``.part`` name inside ``--out`` and renamed when
complete and checked, with ``<file>.sha256`` beside it (``sha256sum -c`` reads it). A disk over
its format's size limit (:mod:`imaging.formats.limits`) is refused before anything is written.

The firmware 30-bootable made the disk boot with (``firmware``: bios, uefi or hybrid, in its
record; none in a run from before UEFI: bios) goes with the artifact: a UEFI-only disk's OVA
names EFI for VirtualBox and VMware, a GCE image of a UEFI or hybrid disk is recorded as needing
the guest OS feature ``UEFI_COMPATIBLE`` at import, a fixed VHD the Hyper-V generation its Azure
image must have; the record carries it on to 60-publish. A disk ``convert`` is given is taken for
a BIOS disk. Every format keeps the disk's last sector, where a GPT keeps its backup header, at
the end: the fixed VHD and GCE's ``disk.raw``, which pad the disk, are planned for by
:func:`imaging.formats.limits.size_multiple`.
"""

from __future__ import annotations

import contextvars
import errno
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imaging import sparse, tools
from imaging.config import (
    Firmware,
    ImageFormat,
    OvfVersion,
    VmdkSubformat,
    check_format,
    check_name,
    load_target,
)
from imaging.disk import images
from imaging.errors import ParameterError, SourceError
from imaging.formats import gce, identity, limits, ova, qcow2, vhd, vmdk
from imaging.records import Record
from imaging.samples import catalog
from imaging.workspace import Workspace

# Room on top of the data for metadata, tables and rounding.
_MARGIN = 64 << 20


def qemu_options(fmt: ImageFormat, *, vmdk_subformat: VmdkSubformat) -> list[str]:
    """What qemu-img is told for each format it writes (the argv after ``-O FORMAT``).

    Compressed qcow2 is not among them: :mod:`imaging.formats.qcow2` writes it, because qemu-img
    compresses on one core, and its ``-W -m`` (two cores: 25 s -> 16 s here) places clusters in
    whatever order they finish, so two conversions of one disk would differ."""
    if fmt is ImageFormat.vmdk:
        return ["-o", f"subformat={vmdk_subformat.value}"]
    if fmt is ImageFormat.vhdx:
        return ["-o", "subformat=dynamic"]
    if fmt is ImageFormat.vhd:
        # Without force_size qemu rounds the size to a CHS geometry: the guest would see
        # another disk size than the one built.
        return ["-o", "subformat=dynamic,force_size=on"]
    return []


def artifact_path(out: Path, name: str, fmt: ImageFormat) -> Path:
    """``out/<name>.<ext>``, refusing any name that would land elsewhere."""
    check_name(name)
    out = out.resolve()
    path = (out / f"{name}.{fmt.extension}").resolve()
    if path.parent != out:
        raise ParameterError(f"artifact {path} would not be inside {out}")
    return path


@dataclass(frozen=True)
class InputDisk(Record):
    """The bootable disk a conversion starts from."""

    path: str
    format: str
    virtual_size: int
    data_bytes: int
    origin: str  # "30-bootable" (the run's disk) or "convert" (a disk the user gave)
    firmware: str = "bios"  # what the disk boots with: bios, uefi or hybrid (see bootable_firmware)
    secure_boot: bool = False  # a UEFI disk whose boot chain is signed


def bootable_firmware(ws: Workspace) -> tuple[Firmware, bool]:
    """The firmware 30-bootable made the run's disk boot with, and whether with Secure Boot; a
    record without them (a run from before UEFI) is a BIOS disk's."""
    made = ws.result("30-bootable").get("disk", {}) if ws.has_result("30-bootable") else {}
    return Firmware(made.get("firmware", "bios")), bool(made.get("secure_boot", False))


def input_disk(ws: Workspace | None, kind: str = "export", source: str = "") -> InputDisk:
    """The run's bootable disk, or for ``convert`` runs the user's disk, checked: it must be
    an image qemu-img reads that refers to no other file (backing files, VMDK extents)."""
    if not kind.startswith("convert"):
        if ws is None or not ws.disk.exists():
            where = ws.disk if ws else "work/disk.raw"
            raise ParameterError(f"{where} does not exist: stage 30-bootable has not completed")
        size = ws.disk.stat().st_size
        firmware, secure_boot = bootable_firmware(ws)
        return InputDisk(str(ws.disk), "raw", size, sparse.data_bytes(ws.disk), "30-bootable", firmware.value,
                         secure_boot)  # fmt: skip
    tools.require_tools("qemu-img", reason="read the disk", hint="apt install qemu-utils")
    path = images.check_source(catalog.resolve(source))  # the same checks as any source
    info = images.image_info(path)
    images.check_self_contained(info)
    data = sparse.data_bytes(path) if info.format == "raw" else images.data_bytes_of(info)
    if info.virtual_size <= 0:
        raise SourceError(f"{path}: the disk is empty")
    return InputDisk(str(path), info.format, info.virtual_size, data, "convert")


@dataclass(frozen=True)
class Artifact(Record):
    sha256: str
    path: str
    format: str
    size_bytes: int
    virtual_size: int
    seconds: float
    convert_seconds: float  # the conversion alone (what bench/ compares with bare qemu-img)
    check: str
    tool: str
    input: str
    input_format: str
    details: dict[str, Any] = field(default_factory=dict)
    firmware: str = "bios"  # the disk's (bios, uefi, hybrid): what 60-publish tells the cloud
    secure_boot: bool = False

    @property
    def pair(self) -> tuple[str, str]:
        """(sha256, path): what the original design handed back."""
        return self.sha256, self.path


def _link_or_copy(src: Path, dst: Path, *, ours: bool) -> str:
    """A raw artifact is the disk itself. The run's own disk (nothing writes to it after stage
    30, and it goes with work/) is hard-linked when out/ shares its filesystem. A disk the user
    gave (``convert``) is never linked, or writing to one would change the other: it is cloned
    where the filesystem shares blocks copy-on-write (btrfs, XFS), else copied sparse."""
    if ours:
        try:
            os.link(src, dst)
            return "hard link of the run's disk"
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
    return sparse.clone_or_copy(src, dst, desc="copy raw")


def export(ws: Workspace, name: str, fmt: str, out: str | Path, *, disk: InputDisk | None = None,
           target: str = "kvm", vmdk_subformat: str = "streamOptimized", compress: bool = False,
           ovf_version: str = "1.0") -> Artifact:  # fmt: skip
    """Write the bootable disk as ``out/<name>.<format>``; return its sha256 and path."""
    tools.require_tools("qemu-img", reason="convert the disk", hint="apt install qemu-utils")
    image_format = check_format(fmt)
    subformat, version = VmdkSubformat(vmdk_subformat), OvfVersion(ovf_version)
    if compress and image_format is not ImageFormat.qcow2:
        raise ParameterError(f"compress applies to qcow2 only, not {image_format.value}")
    disk = disk or input_disk(ws)
    limits.check_fits(disk.virtual_size, image_format, subformat)  # before anything is written
    src = Path(disk.path)
    out_dir = Path(out) if out else ws.root / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = artifact_path(out_dir, name, image_format)
    if path == src.resolve():
        raise ParameterError(f"{path} is the input disk itself: choose another --out or --name")
    fixed_vhd = image_format is ImageFormat.vhd and load_target(target).subformat(image_format) == "fixed"
    sparse.check_space(out_dir, space_needed(disk.data_bytes), f"write {path.name}")
    t0 = time.monotonic()
    details: dict[str, Any] = {}
    tag = ws.id  # this run's own partial files, none of another's
    with sparse.atomic_path(path, tag=tag) as part:
        if image_format is ImageFormat.raw and disk.format == "raw":
            tool = _link_or_copy(src, part, ours=disk.origin == "30-bootable")
        elif fixed_vhd:
            tool = "qemu-img convert -O vpc -n into a fixed VHD (imaging.formats.vhd)"
            details = vhd.write_fixed(src, disk.format, disk.virtual_size, part, identity.fingerprint(src, disk.format),
                                      desc=f"convert to fixed {image_format.value}")  # fmt: skip
            # Azure's image of a fixed VHD says which Hyper-V generation boots it (its firmware).
            details["hyper_v_generation"] = HYPER_V_GENERATION[Firmware(disk.firmware)]
        elif image_format is ImageFormat.gce:
            tool = f"GNU tar --format=oldgnu --sparse | pigz -{gce.LEVEL} ({os.cpu_count()} threads)"
            details = _write_gce(ws, src, disk, part, path, name)
        elif ours_to_write(image_format, subformat, compress):
            module = "imaging.formats.qcow2" if image_format is ImageFormat.qcow2 else "imaging.formats.vmdk"
            tool = f"{module} ({vmdk.DEFLATE}, {os.cpu_count()} threads)"
            details = _write_ours(ws, src, disk.format, part, path, name, image_format, target, version,
                                  Firmware(disk.firmware))  # fmt: skip
        else:
            tool = f"qemu-img convert -O {image_format.qemu_format}"
            options = qemu_options(image_format, vmdk_subformat=subformat)
            stamped = image_format.qemu_format in ("vdi", "vpc", "vhdx", "vmdk")
            with ThreadPoolExecutor(1) as side:  # the identities' seed is read while qemu-img works
                seeding = side.submit(identity.fingerprint, src, disk.format) if stamped else None
                images.qemu_convert(src, disk.format, part, image_format.qemu_format, options=options,
                             desc=f"convert to {image_format.value}")  # fmt: skip
                if seeding is not None:
                    details["identities"] = identity.stamp(part, image_format.qemu_format, seeding.result(), path.name)  # fmt: skip
        convert_seconds = time.monotonic() - t0  # the step the benchmark sets beside qemu-img's
        # The flush and qemu-img check beside the sha256 (a tool on one core, hashing on the
        # other); the check's command still lands in this stage's command log (copied context).
        # A raw artifact's sha256 is the one cost here that follows the virtual size (sha256
        # cannot skip its holes: they are hashed as zeros, on one core); its content digest,
        # which the audit chain keeps and checks, reads only the data, on the other core.
        with ThreadPoolExecutor(2) as side:
            checking = side.submit(
                contextvars.copy_context().run, _flush_and_check, part, image_format, details
            )
            listing = (
                side.submit(sparse.content_digest, part, workers=1)
                if image_format is ImageFormat.raw
                else None
            )
            digest = details.pop("sha256", None) or sparse.sha256(part, desc=f"sha256 {path.name}")
            check = checking.result()
            if listing is not None:
                details["content_digest"] = listing.result()
    seconds = time.monotonic() - t0
    sparse.fsync_dir(path.parent)  # the artifact's name is on disk too, before its .sha256 says so
    sparse.write_sha256_file(path, digest, tag=tag)
    virtual = details.get("capacity") or _virtual_size(path, image_format)
    return Artifact(
        sha256=digest, path=str(path), format=image_format.value, size_bytes=path.stat().st_size,
        virtual_size=int(virtual), seconds=round(seconds, 3), convert_seconds=round(convert_seconds, 3),
        check=check, tool=tool, input=disk.path, input_format=disk.format, details=details,
        firmware=disk.firmware, secure_boot=disk.secure_boot,
    )  # fmt: skip


def space_needed(data_bytes: int) -> int:
    """Room for the artifact of a disk holding ``data_bytes``, whatever the format: its data
    plus 1/128 (a streamOptimized grain that does not compress takes 129 sectors for 128, the
    worst of any format here) and room for metadata. An OVA's disk is written in its place in
    the tar: one copy, not two."""
    return data_bytes + data_bytes // 128 + _MARGIN


def ours_to_write(fmt: ImageFormat, subformat: VmdkSubformat, compress: bool) -> bool:
    """The formats whose compression we do on every core instead of qemu-img on one."""
    if fmt is ImageFormat.vmdk:
        return subformat is VmdkSubformat.stream_optimized
    return fmt is ImageFormat.ova or (fmt is ImageFormat.qcow2 and compress)


# The Hyper-V generation of the Azure image made from a fixed VHD, by the disk's firmware:
# generation 1 boots BIOS, generation 2 UEFI (``az image create --hyper-v-generation``).
HYPER_V_GENERATION = {Firmware.bios: "V1", Firmware.uefi: "V2", Firmware.hybrid: "V1 or V2"}
# What GCE must be told at import to boot an image with UEFI (and so as a Shielded VM).
GCE_UEFI_FEATURE = "UEFI_COMPATIBLE"


def _write_gce(
    ws: Workspace, src: Path, disk: InputDisk, part: Path, final: Path, name: str
) -> dict[str, Any]:
    """disk.raw in GCE's tar.gz; a disk that is not raw is unpacked first (qemu-img, fast)."""
    raw = src
    converted = ws.work / ".input.raw.part"
    try:
        if disk.format != "raw":
            sparse.check_space(ws.work, disk.data_bytes + _MARGIN, f"unpack the {disk.format} disk")
            images.qemu_convert(src, disk.format, converted, "raw", desc=f"unpack {disk.format}")
            raw = converted
        packed = gce.write(raw, disk.virtual_size, part, ws.work, desc=f"tar.gz {final.name}")
    finally:
        converted.unlink(missing_ok=True)
    details: dict[str, Any] = {"capacity": packed.capacity, "padded_bytes": packed.padded_bytes,
                               "tar_bytes": packed.tar_bytes, "members": [gce.MEMBER], "gce_seconds": packed.seconds}  # fmt: skip
    # GCE boots an image with UEFI only if its import says the guest can: a BIOS-only disk needs
    # nothing, a hybrid one boots either way but a Shielded VM wants UEFI.
    features = [GCE_UEFI_FEATURE] if Firmware(disk.firmware) is not Firmware.bios else []
    details["guest_os_features"] = features
    details["import"] = " ".join(["gcloud compute images create", name, f"--source-uri=gs://BUCKET/{final.name}",
                                  *(f"--guest-os-features={f}" for f in features)])  # fmt: skip
    return details


def _write_ours(ws: Workspace, src: Path, src_format: str, part: Path, final: Path, name: str,
                fmt: ImageFormat, target: str, version: OvfVersion, firmware: Firmware) -> dict[str, Any]:  # fmt: skip
    """A compressed qcow2, a streamOptimized VMDK, or one packed into an OVA, from any disk."""
    raw = src
    converted = ws.work / ".input.raw.part"
    try:
        if src_format != "raw":  # our writer reads raw; qemu-img unpacks the rest (fast)
            sparse.check_space(ws.work, images.data_bytes_of(images.image_info(src, src_format)) + _MARGIN,
                               f"unpack the {src_format} disk")  # fmt: skip
            images.qemu_convert(src, src_format, converted, "raw", desc=f"unpack {src_format}")
            raw = converted
        if fmt is ImageFormat.qcow2:
            packed_qcow2 = qcow2.write_compressed(raw, part, desc=f"qcow2 {final.name}")
            return {"clusters": packed_qcow2.clusters, "uncompressed_clusters": packed_qcow2.uncompressed,
                    "qcow2_seconds": packed_qcow2.seconds}  # fmt: skip
        if not fmt.is_archive:
            written = vmdk.write_stream_optimized(
                raw, part, extent_name=final.name, desc=f"vmdk {final.name}"
            )
            return {"cid": written.cid, "grains": written.grains, "vmdk_seconds": written.seconds,
                    "sha256": written.digests["sha256"]}  # fmt: skip
        algorithm = ova.DIGEST[version].lower()
        appliance = load_target(target)
        at = ova.layout(name, appliance, raw.stat().st_size, version, firmware)
        disk_name = ova.member_names(name)[1]
        seed = identity.fingerprint(raw)  # the VMDK's CID and VirtualBox's ids in the descriptor
        written = vmdk.write_stream_optimized(raw, part, extent_name=disk_name, cid=identity.derived_cid(seed),
                                              digests=(algorithm,), desc=f"vmdk {final.name}", at=at.disk_at)  # fmt: skip
        packed = ova.seal_ova(part, at, name, appliance, written.size_bytes, written.grains * vmdk.GRAIN,
                              written.capacity_bytes, version, written.digests[algorithm], firmware=firmware,
                              seed=seed)  # fmt: skip
        return {"cid": written.cid, "grains": written.grains, "vmdk_seconds": written.seconds,
                "capacity": written.capacity_bytes, "members": list(packed.members), "disk_at": at.disk_at,
                "ovf_version": packed.ovf_version, "disk_digest": packed.disk_digest,
                "ovf_firmware": packed.firmware}  # fmt: skip
    finally:
        converted.unlink(missing_ok=True)


def _qemu_check(path: Path, qemu_format: str) -> str:
    result = tools.run(["qemu-img", "check", "-f", qemu_format, path], ok_codes=(0, 63), timeout=3600)
    if result.exit_code == 63:  # the format has no consistency check in qemu-img (vpc)
        return f"qemu-img check does not support {qemu_format}; qemu-img info reads it"
    lines = [x for x in result.stdout.splitlines() if x.strip()]
    return lines[0] if lines else "ok"


def _flush_and_check(path: Path, fmt: ImageFormat, details: dict[str, Any]) -> str:
    # The artifact is what the user keeps: on disk before it takes its final name, so a crash
    # cannot leave a final-named file whose blocks never reached the disk.
    sparse.flush(path)
    return _check(path, fmt, details)


def _check(path: Path, fmt: ImageFormat, details: dict[str, Any]) -> str:
    if fmt is ImageFormat.raw:
        return "raw (nothing to check)"
    if fmt is ImageFormat.gce:
        return gce.check(path, int(details["capacity"]))
    if fmt.is_archive:
        found = ova.members(path)
        if [m.name for m in found] != details.get("members"):
            raise ova.OvaError(
                f"{path.name}: members {[m.name for m in found]}, expected {details.get('members')}"
            )
        # qemu-img reads the disk where it lies in the tar (the raw driver's offset and size).
        inside = {"driver": "vmdk", "file": {"driver": "raw", "offset": found[1].offset, "size": found[1].size,
                                             "file": {"driver": "file", "filename": str(path.resolve())}}}  # fmt: skip
        disk = tools.run(["qemu-img", "check", "json:" + json.dumps(inside)], timeout=3600).stdout.strip()
        return f"members in order {', '.join(m.name for m in found)}; descriptor checked; disk: {disk}"
    if fmt is ImageFormat.vhd:
        images.image_info(path, "vpc")  # qemu-img has no check for vpc: at least it must open
        footer = vhd.read_footer(path)
        if footer is None or not footer.checksum_ok:
            raise vhd.VhdError(f"{path.name}: no VHD footer with a good checksum at its end")
        if footer.kind == "fixed":
            vhd.check_fixed(path)
        return (f"VHD footer read back: {footer.kind} (disk type {footer.disk_type}), {footer.current_size} bytes"
                f"{' (a whole number of MiB)' if footer.mib_aligned else ''}, checksum good")  # fmt: skip
    return _qemu_check(path, fmt.qemu_format)


def _virtual_size(path: Path, fmt: ImageFormat) -> int:
    info = json.loads(tools.check_output(["qemu-img", "info", "--output=json", "-f", fmt.qemu_format, path]))
    return int(info["virtual-size"])
