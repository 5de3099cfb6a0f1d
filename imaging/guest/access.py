"""Access to the guest's files for 10-clean and 20-migrate: the acquired instance mounted (by
:mod:`imaging.disk.mounts`) and seen through :class:`~imaging.guest.files.Guest`, whose every path
resolves inside the guest.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from imaging import sparse
from imaging.disk import ext
from imaging.disk.mounts import mounted
from imaging.guest.files import Guest
from imaging.workspace import Workspace


@contextlib.contextmanager
def reading(ws: Workspace) -> Iterator[Guest]:
    """The acquired instance, mounted read-only (no journal replay), for planning."""
    fs = ext.info(ext.device(ws.instance))
    with mounted(ws.instance, readonly=True, fstype=fs.fs_type, extra=["noload", "noexec"]) as root:
        with Guest(root) as g:
            yield g


@contextlib.contextmanager
def editing(ws: Workspace, *, grow: int = 0) -> Iterator[Guest]:
    """A copy of the instance, mounted read-write; renamed over ``work/instance.raw`` only when
    the block completes, so a failed or interrupted stage leaves the instance as it was. With
    ``grow``, the copy's filesystem has that much more room first (to install packages)."""
    fs = ext.info(ext.device(ws.instance))
    with sparse.atomic_path(ws.instance) as part:
        sparse.create_sparse(part, ws.instance.stat().st_size)
        sparse.copy_range(ws.instance, part, desc="copy instance")
        if grow:
            ext.grow(part, grow)
        with mounted(part, readonly=False, fstype=fs.fs_type) as root:
            with Guest(root) as g:
                yield g
        # Unmounted cleanly; a check proves it before the copy replaces the instance.
        ext.fsck(ext.device(part), repair=True, discard=True)
