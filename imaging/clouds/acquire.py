"""Stage 00-acquire: a source image becomes ``work/instance.raw``, a sparse copy of its root filesystem.

The source is never written to, not even by a filesystem check: e2fsck runs on our copy. A
partitionless filesystem (how clouds keep instance roots) is copied as it is; from an already
partitioned disk, the root partition is cut out. qcow2/vmdk/vdi/vhd(x) sources go through
qemu-img first.

A source is a local image, ``sample:NAME``, or an instance in a cloud (``eucalyptus://``,
``ec2://``, ``openstack://CLOUD/INSTANCE``, see ``clouds/settings.py``): its disk is first copied
out of the cloud into ``work/`` by the cloud's module, checked there, and then taken like a local
image; the copy goes once the instance is acquired.

A source that boots by UEFI has an EFI system partition: it is copied whole beside the root, to
``work/esp.raw``, and checked there (``disk/source_esp.py``). What is wrong with the disk but does not
stop us (a GPT with a missing or damaged header, an ESP not cleanly unmounted) is recorded in
the instance's ``warnings``.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import posixpath
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from imaging import sparse, tools
from imaging.clouds import settings as cloud_settings
from imaging.clouds.transfer import Fetched
from imaging.disk import btrfs, ext, filesystems, flatten, images, lvm, source_esp
from imaging.disk.files import Guest
from imaging.errors import ParameterError, SourceError, SpaceError
from imaging.records import Record, Text, human_bytes
from imaging.samples import catalog
from imaging.tables import Table
from imaging.workspace import Workspace

# Headroom on top of the estimate: metadata, the journal replay of e2fsck, rounding.
MARGIN = 64 << 20


@dataclass(frozen=True)
class Source(Record):
    """The source image as found, before anything is copied."""

    source: str
    path: str
    format: str
    virtual_size: int
    file_bytes: int
    data_bytes: int
    layout: (
        str  # "filesystem" (partitionless), "partitioned" or "lvm"; "" until a non-raw source is converted
    )
    fs_type: str
    uuid: str
    # The root filesystem's size and block size, from its superblock; 0 until a non-raw source
    # is converted. What the bootable disk's size follows (30-bootable).
    fs_bytes: int = 0
    fs_block_size: int = 0


@dataclass(frozen=True)
class Instance(Record):
    """The acquired root filesystem in ``work/instance.raw``."""

    path: str
    source: str
    source_format: str
    source_layout: str
    partition: int | None
    fs_type: str
    uuid: str
    label: str
    size_bytes: int
    used_bytes: int
    data_bytes: int
    block_size: int
    block_count: int
    fsck: str
    fsck_exit: int
    copy_seconds: float
    source_digest: str | None  # None under the pipeline: it is in the run's source.digest
    fetched: Fetched | None = None  # what was copied out of a cloud, and how it was checked
    subvolume: str = ""  # btrfs: the root subvolume's path from the top level ("" = the top level)
    subvolume_is_default: bool = False  # and whether it is the default one (no rootflags needed)
    write_options: list[str] = dataclasses.field(default_factory=list)  # the guest's own (btrfs compression)
    snapshots_dropped: list[str] = dataclasses.field(default_factory=list)  # btrfs snapshots not kept
    volume: str = ""  # LVM: the root's volume group/logical volume, copied out by its segments
    merged: list[str] = dataclasses.field(default_factory=list)  # other filesystems merged in (flatten.py)
    volumes: list[dict[str, object]] = dataclasses.field(default_factory=list)  # the LVM metadata read
    # The EFI system partition copied to work/esp.raw ({} when the disk has none): partition,
    # bytes, uuid (its volume id), label, path (from the run directory), files.
    esp: dict[str, object] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)  # what is odd but did not stop us


def _rows(table: Table) -> list[dict[str, object]]:
    return [dict(zip(table.columns, row, strict=True)) for row in table.rows]


def volume_table(instance: Instance | dict[str, object]) -> Table:
    """The LVM metadata 00-acquire read (volume groups, volumes, segments); empty without LVM."""
    rows = instance.volumes if isinstance(instance, Instance) else instance.get("volumes") or []
    if not rows:
        return Table([], ["volume group", "volume", "size", "segment", "type"])
    return Table.from_dicts(rows)  # type: ignore[arg-type]


def esp_table(instance: Instance | dict[str, object]) -> Table:
    """The EFI system partition 00-acquire copied to ``work/esp.raw``; empty when there is none."""
    found = instance.esp if isinstance(instance, Instance) else instance.get("esp") or {}
    columns = ["partition", "size", "volume id", "label", "files"]
    if not found:
        return Table([], columns)
    assert isinstance(found, dict)
    row = [
        found["partition"],
        human_bytes(int(found["bytes"])),
        found["uuid"],
        found["label"],
        found["files"],
    ]
    return Table([row], columns)


def warning_list(instance: Instance | dict[str, object]) -> Text:
    """What 00-acquire found odd in the source but took it anyway, one line each."""
    found = instance.warnings if isinstance(instance, Instance) else instance.get("warnings") or []
    assert isinstance(found, list)
    return Text("\n".join(str(w) for w in found), "(none)")


def _check_fs(path: Path, offset: int, length: int, where: str) -> images.Probe:
    found = images.probe(path, offset, length)
    if found.type is None:
        raise SourceError(
            f"{where} is neither a filesystem nor a partitioned disk image (blkid finds neither)"
        )
    if found.type not in filesystems.TYPES:
        raise SourceError(
            f"{where} holds a {found.type} filesystem, which cannot be placed "
            f"(supported: {', '.join(filesystems.TYPES)})"
        )
    return found


def _volumes(path: Path, table: images.PartitionTable | None, refused: list[str]) -> list[flatten.Found]:
    """The filesystems in the disk's LVM volume groups, read from their metadata (never activated)."""
    found = []
    for vg in lvm.read_volume_groups(path, table):
        for lv in vg.lvs:
            if not lv.visible:
                continue
            try:
                lvm.check_linear(lv)
            except SourceError as e:
                refused.append(str(e))
                continue
            first = lv.segments[0]
            p = images.probe(path, first.disk_offset, first.length)
            if p.type in filesystems.TYPES:
                found.append(flatten.Found(f"logical volume {vg.name}/{lv.name}", first.disk_offset, lv.size_bytes,
                                           p.type, p.uuid or "", p.label or "", volume=lv))  # fmt: skip
    return found


def _is_root(path: Path, c: flatten.Found, scratch: Path) -> bool:
    """Whether ``c`` holds /etc/fstab, read-only; a volume in several pieces is read from a copy."""
    if c.volume is None or len(c.volume.segments) == 1:
        return filesystems.exists(path, c.fs_type, "/etc/fstab", offset=c.offset, size=c.length)
    with tempfile.TemporaryDirectory(prefix="volume-", dir=scratch) as tmp:
        copy = Path(tmp) / "volume.raw"
        lvm.copy_volume(path, c.volume, copy, desc=f"read {c.where}")
        return filesystems.exists(copy, c.fs_type, "/etc/fstab")


def _find_root(
    path: Path, table: images.PartitionTable | None, scratch: Path
) -> tuple[flatten.Found, list[flatten.Found]]:
    """The root filesystem among the disk's partitions and logical volumes, and the others."""
    ss = table.sector_size if table else 512
    size = path.stat().st_size if path.is_file() else images.image_info(path, "raw").virtual_size
    found: list[flatten.Found] = []
    others: list[str] = []
    refused: list[str] = []
    for part in table.partitions if table else ():
        if (part.start + part.size) * ss > size:
            raise SourceError(
                f"{path}: partition {part.number} ends beyond the end of the image: truncated?"
            )
        p = images.probe(path, part.start * ss, part.size * ss)
        if p.type in filesystems.TYPES:
            where, offset, length = f"partition {part.number}", part.start * ss, part.size * ss
            found.append(
                flatten.Found(where, offset, length, p.type, p.uuid or "", p.label or "", part.number)
            )
        elif p.type and p.type != lvm.BLKID_TYPE:
            others.append(f"{p.type} on partition {part.number}")
    found += _volumes(path, table, refused)
    if not found:
        if refused:
            raise SourceError(f"{path}: {refused[0]}")
        detail = f" (found {', '.join(others)})" if others else ""
        raise SourceError(
            f"{path}: no partition or logical volume holds a filesystem to use as the root "
            f"(ext2/3/4, XFS, btrfs){detail}"
        )
    if len(found) > 1:
        # Several Linux filesystems (a separate /boot, /home): the root is the one with /etc/fstab.
        roots = [c for c in found if _is_root(path, c, scratch)]
        if len(roots) != 1:
            if not roots and refused:
                raise SourceError(f"{path}: {refused[0]}")
            raise SourceError(
                f"{path}: {len(found)} Linux filesystems and cannot tell which is the root filesystem"
            )
        return roots[0], [c for c in found if c is not roots[0]]
    return found[0], []


@dataclass(frozen=True)
class _Root:
    layout: str  # "filesystem", "partitioned" or "lvm"
    offset: int
    length: int
    partition: int | None
    probe: images.Probe
    fs: filesystems.FsInfo
    volume: lvm.LogicalVolume | None = None
    groups: tuple[lvm.VolumeGroup, ...] = ()
    others: tuple[flatten.Found, ...] = ()  # the disk's other filesystems (a separate /boot)
    esp: source_esp.Esp | None = None
    warnings: tuple[str, ...] = ()


def _locate_root(path: Path, scratch: Path | None = None) -> _Root:
    """Where the root filesystem is in a raw image (a partition, a logical volume, or the whole
    image), refusing what cannot be placed. ``scratch``: where a volume in pieces may be read."""
    size = path.stat().st_size if path.is_file() else images.image_info(path, "raw").virtual_size
    first = images.probe(path)
    volume: lvm.LogicalVolume | None = None
    groups: tuple[lvm.VolumeGroup, ...] = ()
    others: list[flatten.Found] = []
    number: int | None = None
    found_esp: source_esp.Esp | None = None
    warnings: list[str] = []
    if (first.type is None and first.pttype) or first.type == lvm.BLKID_TYPE:
        table = images.read_partition_table(path) if first.pttype else None
        if first.pttype and (table is None or not table.partitions):
            raise SourceError(f"{path}: has a {first.pttype} partition table with no partitions")
        if table is not None and table.label == "gpt":
            warnings += images.gpt_problems(path, table.sector_size)
        found, others = _find_root(path, table, scratch or Path(tempfile.gettempdir()))
        found_esp = source_esp.find_esp(path, table)
        probe = images.Probe(found.fs_type, None, found.uuid, found.label)
        number, volume = found.partition, found.volume
        layout, offset, length = "lvm" if volume else "partitioned", found.offset, found.length
        if volume:
            groups = tuple(lvm.read_volume_groups(path, table))
    else:
        probe = _check_fs(path, 0, size, str(path))
        layout, offset, length = "filesystem", 0, size
    fs_type = str(probe.type)
    try:
        fs = filesystems.of(fs_type).info(path, offset)
    except SourceError as e:
        detail = str(e)
        if fs_type in ext.TYPES:
            # Let e2fsck (read-only) say what is wrong: its words are what a person can act on.
            detail = "e2fsck: " + ext.fsck(ext.device(path, offset), repair=False, check=False).summary
        raise SourceError(f"{path}: the {fs_type} filesystem cannot be opened: {detail}") from None
    if fs.size_bytes > length:
        where = f"partition {number}" if number else f"logical volume {volume.name}" if volume else "image"
        raise SourceError(
            f"{path} is truncated: its {fs.fs_type} filesystem needs {fs.size_bytes:,} bytes, "
            f"the {where} has {length:,}"
        )
    return _Root(layout, offset, length, number, probe, fs, volume, groups, tuple(others), found_esp,
                 tuple(warnings))  # fmt: skip


def inspect(source: str) -> Source:
    """Look at the source without copying: format, sizes, and (raw) what it holds.

    Fails here, before any heavy work, on everything that can be told from outside: missing or
    unreadable, not an image, an image that refers to other files, a filesystem we cannot place,
    a truncated filesystem.
    """
    tools.require_tools(
        "qemu-img", "blkid", "sfdisk", "dumpe2fs",
        reason="inspect the source", hint="apt install qemu-utils util-linux fdisk e2fsprogs",
    )  # fmt: skip
    if cloud_settings.is_cloud_source(source):
        return _inspect_remote(source)
    path = images.check_source(catalog.resolve(source))
    info = images.image_info(path)
    images.check_self_contained(info)
    layout = fs_type = uuid = ""
    fs_bytes = fs_block_size = 0
    if info.format == "raw":
        data = sparse.data_bytes(path) if path.is_file() else info.virtual_size
        root = _locate_root(path)
        layout, fs_type, uuid = root.layout, root.probe.type or "", root.probe.uuid or ""
        fs_bytes, fs_block_size = root.fs.size_bytes, root.fs.block_size
    else:
        data = images.data_bytes_of(info)
    return Source(source, str(path), info.format, info.virtual_size, path.stat().st_size, data, layout, fs_type,
                  uuid, fs_bytes, fs_block_size)  # fmt: skip


def _inspect_remote(source: str) -> Source:
    """A cloud's instance, found (or refused: unknown, no such cloud, credentials refused)
    before any copy; its size where the cloud tells it without a copy."""
    from imaging.clouds import ec2, eucalyptus, openstack

    src = cloud_settings.parse_source(source)
    cloud = cloud_settings.cloud_for(src.kind, src.cloud)
    size = 0
    if isinstance(cloud, cloud_settings.Eucalyptus):
        size = eucalyptus.locate(src, cloud)[2]
    elif isinstance(cloud, cloud_settings.EC2):
        size = ec2.root_volume(src, cloud)[1]
    else:
        openstack.find_server(src, cloud)
    return Source(source, "", src.kind, size, 0, 0, "", "", "")


def fetch(source: str, ws: Workspace) -> Fetched:
    """Copy a cloud instance's disk into ``work/`` (``source.raw`` or ``source.qcow2``), checked."""
    from imaging.clouds import ec2, eucalyptus, openstack

    src = cloud_settings.parse_source(source)
    cloud = cloud_settings.cloud_for(src.kind, src.cloud)
    if isinstance(cloud, cloud_settings.Eucalyptus):
        return eucalyptus.fetch(src, cloud, ws.work / "source.raw")
    if isinstance(cloud, cloud_settings.EC2):
        return ec2.fetch(src, cloud, ws.work / "source.raw")
    return openstack.fetch(src, cloud, ws.work)


def acquire(src: Source, ws: Workspace, *, hash_source: bool = True, snapshots: str = "drop") -> Instance:
    """Copy the source's root filesystem to ``work/instance.raw``, check it (on the copy), describe it.

    ``hash_source``: compute the source's content digest here (:func:`imaging.sparse.content_digest`:
    it reads the data, not the holes), on the other core while copying. The pipeline passes False
    and digests the source itself, beside the stages. ``snapshots``: a btrfs guest's snapshots
    are dropped, or kept (``keep``); see btrfs.py for why dropping is the default.
    """
    if snapshots not in ("drop", "keep"):
        raise ParameterError(f"snapshots must be drop or keep, not {snapshots!r}")
    tools.require_tools(
        "e2fsck", "dumpe2fs", reason="check the instance's filesystem", hint="apt install e2fsprogs"
    )
    if cloud_settings.is_cloud_source(src.source):
        return _acquire_remote(src, ws, snapshots)
    # The copy, then the bootable disk: about twice the data, on the work filesystem.
    sparse.check_space(ws.work, 2 * src.data_bytes + MARGIN, "hold the instance and the bootable disk")
    digest: dict[str, str | None] = {"digest": None}
    hasher = threading.Thread(target=lambda: digest.update(digest=sparse.content_digest(Path(src.path))))
    if hash_source:
        hasher.start()
    try:
        instance = _acquire(src, ws, snapshots)
    finally:
        if hash_source:
            hasher.join()
    return dataclasses.replace(instance, source_digest=digest["digest"])


def _acquire_remote(src: Source, ws: Workspace, snapshots: str) -> Instance:
    """The cloud's disk into work/, then taken like a local image; the download goes afterwards.
    Its digest (computed as it arrived) is the run's source.digest."""
    # How much of the disk is data is known only once it is here (a sparse download holds only
    # that): a full disk says so in one line.
    try:
        fetched = fetch(src.source, ws)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise SpaceError(
            f"not enough free space in {ws.work} for the disk of {src.source}: nothing kept"
        ) from None
    try:
        local = dataclasses.replace(inspect(fetched.path), source=src.source)
        sparse.check_space(ws.work, 2 * local.data_bytes + MARGIN, "hold the instance and the bootable disk")
        instance = _acquire(local, ws, snapshots)
    finally:
        Path(fetched.path).unlink(missing_ok=True)
    with sparse.atomic_path(ws.root / "source.digest") as part:
        part.write_text(fetched.digest + "\n", encoding="utf-8")
    return dataclasses.replace(instance, source_digest=fetched.digest, fetched=fetched)


def _acquire(src: Source, ws: Workspace, snapshots: str = "drop") -> Instance:
    converted = ws.work / ".source.raw.part"
    ws.esp.unlink(missing_ok=True)  # an earlier attempt's: only the record says there is one
    with sparse.atomic_path(ws.instance) as part:
        try:
            if src.format == "raw":
                whole, seconds = Path(src.path), 0.0
            else:
                converted.unlink(missing_ok=True)
                seconds = images.qemu_convert(
                    Path(src.path), src.format, converted, "raw", desc=f"convert {src.format}"
                )
                whole = converted
            root = _locate_root(whole, ws.work)
            if whole == converted and root.layout == "filesystem":
                os.replace(converted, part)
                os.truncate(part, root.length)
            elif root.volume:
                # The volume's segments, each from its place on its physical volume.
                what = f"copy {root.volume.vg}/{root.volume.name}"
                seconds += lvm.copy_volume(whole, root.volume, part, desc=what)
            else:
                sparse.create_sparse(part, root.length)
                what = "copy root partition" if root.partition else "copy instance"
                seconds += sparse.copy_range(
                    whole, part, src_offset=root.offset, length=root.length, desc=what
                ).seconds
            fsmod = filesystems.of(root.fs.fs_type)
            if root.fs.size_bytes < root.length:
                # Bytes past the filesystem's end are not the instance's.
                os.truncate(part, root.fs.size_bytes)
            verdict = fsmod.tidy(part)
            found = _btrfs_root(part, snapshots) if fsmod is btrfs else ("", False, [], [])
            subvolume, is_default, dropped, options = found
            merged = _flatten(whole, part, root, subvolume, ws.work)
            # Last, so that a failure above leaves no ESP behind without its instance.
            found_esp, esp_warnings = _copy_esp(whole, root, ws)
        finally:
            converted.unlink(missing_ok=True)
        fs = fsmod.info(part)
        data = sparse.data_bytes(part)
    return Instance(
        path=str(ws.instance),
        source=src.source,
        source_format=src.format,
        source_layout=root.layout,
        partition=root.partition,
        fs_type=fs.fs_type,
        uuid=fs.uuid,
        label=fs.label,
        size_bytes=fs.size_bytes,
        used_bytes=fs.used_bytes,
        data_bytes=data,
        block_size=fs.block_size,
        block_count=fs.block_count,
        fsck=str(verdict),
        fsck_exit=verdict.exit_code,
        copy_seconds=round(seconds, 3),
        source_digest=None,
        subvolume=subvolume,
        subvolume_is_default=is_default,
        write_options=options,
        snapshots_dropped=dropped,
        volume=f"{root.volume.vg}/{root.volume.name}" if root.volume else "",
        merged=merged,
        volumes=[row for vg in root.groups for row in _rows(lvm.volume_table(vg))],
        esp=found_esp,
        warnings=[*root.warnings, *esp_warnings],
    )


def _copy_esp(disk: Path, root: _Root, ws: Workspace) -> tuple[dict[str, object], list[str]]:
    """The disk's ESP copied to ``work/esp.raw`` and checked, as the record has it; its warnings."""
    if root.esp is None:
        return {}, []
    with sparse.atomic_path(ws.esp) as part:
        files, warnings = source_esp.copy_esp(disk, root.esp, part)
    found = {"partition": root.esp.partition, "bytes": root.esp.length, "uuid": root.esp.uuid,
             "label": root.esp.label, "path": str(ws.esp.relative_to(ws.root)), "files": files}  # fmt: skip
    return found, warnings


def _flatten(disk: Path, image: Path, root: _Root, subvolume: str, scratch: Path) -> list[str]:
    """The disk's other filesystems that the root's fstab mounts, merged into our copy."""
    if not root.others:
        return []
    with filesystems.files(image, root.fs.fs_type, subvolume=subvolume, writable=False) as g:
        fstab = g.read_text("/etc/fstab") or ""
    return flatten.merge(
        image, root.fs.fs_type, subvolume, disk, flatten.to_merge(fstab, list(root.others)), scratch
    )


def _btrfs_root(image: Path, snapshots: str) -> tuple[str, bool, list[str], list[str]]:
    """The root subvolume of our btrfs copy, whether it is the default one, the snapshots dropped
    from it (see btrfs.py), and the compression the guest writes with."""
    root = btrfs.find_root(image)
    if root is None:
        raise SourceError(
            "no subvolume of the btrfs filesystem holds an /etc/fstab that mounts it at /: "
            "cannot tell which is the root"
        )
    with btrfs.top_level(image, writable=False) as top, Guest(top) as g:
        fstab = g.read_text(posixpath.join("/", root, "etc/fstab")) or ""
        is_default = btrfs.default_subvolume(top) == root
    options = btrfs.compression(fstab)
    if snapshots == "keep":
        return root, is_default, [], options
    keep = {root, *btrfs.fstab_subvolumes(fstab).values()}
    return root, is_default, btrfs.drop_snapshots(image, keep), options
