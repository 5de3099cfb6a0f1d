"""Access to the guest's files for 10-clean and 20-migrate: the acquired instance mounted (by
:mod:`imaging.disk.mounts`) and seen through :class:`~imaging.disk.files.Guest`, whose every path
resolves inside the guest.

A btrfs guest is its root subvolume with the other subvolumes its fstab mounts (Fedora's
``home``) mounted where the guest mounts them, all from one loop device: cleaning reaches
``/home`` as the guest sees it.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import stat
from collections.abc import Iterator
from pathlib import Path

from imaging import sparse
from imaging.disk import btrfs, filesystems, images
from imaging.disk.files import Guest
from imaging.disk.mounts import attached, mounted
from imaging.errors import GuestError
from imaging.workspace import Workspace


@contextlib.contextmanager
def _subvolumes(
    device: Path, root: Path, subvolume: str, options: list[str], *, writable: bool
) -> Iterator[None]:
    """The other subvolumes fstab mounts, each on its directory as resolved inside the guest."""
    with Guest(root) as g, contextlib.ExitStack() as stack:
        fstab = g.read_text("/etc/fstab") or ""
        for mountpoint, subvol in sorted(
            btrfs.fstab_subvolumes(fstab).items(), key=lambda m: m[0].count("/")
        ):
            if mountpoint == "/" or subvol == subvolume or not mountpoint.startswith("/"):
                continue
            real = g.realpath(mountpoint)
            st = g.lstat(real)
            if real == "/" or st is None or not stat.S_ISDIR(st.st_mode):
                raise GuestError(
                    f"fstab mounts subvolume {subvol} on {mountpoint}, which is not a directory in the guest"
                )
            at = root / posixpath.relpath(real, "/")
            stack.enter_context(
                mounted(
                    device,
                    readonly=not writable,
                    fstype="btrfs",
                    extra=[*options, f"subvol={subvol}"],
                    at=at,
                )
            )
        yield


@contextlib.contextmanager
def _mounted_guest(image: Path, instance: dict[str, object], *, writable: bool) -> Iterator[Guest]:
    fs_type = str(instance.get("fs_type", "ext4"))
    fs = filesystems.of(fs_type)
    written = [str(o) for o in instance.get("write_options") or []]  # type: ignore[attr-defined]
    options = [*fs.mount_options(), *(written if writable else [*fs.READ_ONLY_OPTIONS, "noexec"])]
    if fs is not btrfs:
        with mounted(image, readonly=not writable, fstype=fs_type, extra=options) as root, Guest(root) as g:
            yield g
        return
    subvolume = str(instance.get("subvolume") or "")
    options.append(f"subvol={subvolume}" if subvolume else "subvolid=5")
    with (
        attached(image, readonly=not writable) as device,
        mounted(device, readonly=not writable, fstype=fs_type, extra=options) as root,
    ):
        others = [o for o in options if not o.startswith(("subvol=", "subvolid="))]
        with (
            _subvolumes(device, root, subvolume, others, writable=writable),
            Guest(root, mounts_inside=True) as g,
        ):
            yield g


def _instance(ws: Workspace) -> dict[str, object]:
    """What 00-acquire recorded; a run made before it recorded the type: probed."""
    if ws.has_result("00-acquire"):
        return ws.result("00-acquire")
    return {"fs_type": images.probe(ws.instance).type or "ext4"}


@contextlib.contextmanager
def reading(ws: Workspace) -> Iterator[Guest]:
    """The acquired instance, mounted read-only (no journal or log replay), for planning."""
    with _mounted_guest(ws.instance, _instance(ws), writable=False) as g:
        yield g


@contextlib.contextmanager
def editing(ws: Workspace, *, grow: int = 0) -> Iterator[Guest]:
    """A copy of the instance, mounted read-write; renamed over ``work/instance.raw`` only when
    the block completes, so a failed or interrupted stage leaves the instance as it was. With
    ``grow``, the copy's filesystem has that much more room first (to install packages)."""
    instance = _instance(ws)
    fs = filesystems.of(str(instance.get("fs_type", "ext4")))
    # The copy takes as much as the instance's data (and ``grow`` nothing until it is used).
    sparse.check_space(ws.work, sparse.data_bytes(ws.instance) + (16 << 20), "copy the instance to edit it")
    with sparse.atomic_path(ws.instance) as part:
        size = ws.instance.stat().st_size
        sparse.create_sparse(part, size)
        sparse.copy_range(ws.instance, part, desc="copy instance")
        if grow:
            os.truncate(part, size + grow)
            fs.grow(part, 0, size + grow)
        with _mounted_guest(part, instance, writable=True) as g:
            yield g
        # Unmounted cleanly; a check proves it before the copy replaces the instance.
        fs.tidy(part)
