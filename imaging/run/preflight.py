"""What can be told about a request's run before the run exists: how big its bootable disk will
be, and whether the format asked for (and the disk's MBR) can hold it. The command line and the
request service ask here first, so that a disk over a limit is refused at once, not at the end
of the run; 30-bootable and 40-export check again on the disk they have."""

from __future__ import annotations

from imaging.clouds.acquire import Source
from imaging.config import choose_firmware, load_target, parse_disk_size
from imaging.disk import bootable
from imaging.formats import limits
from imaging.run.request import Request


def bootable_disk_bytes(request: Request, src: Source) -> int | None:
    """The size of the disk 30-bootable will make for ``request`` from ``src``; None when it
    cannot be told yet (a qcow2, VMDK... source: its filesystem is read only once converted).
    Raises the layout's own errors: a disk over the MBR's 2 TiB, a ``--disk-size`` smaller than
    the filesystem."""
    if src.fs_bytes:
        fs_bytes, block_size = src.fs_bytes, src.fs_block_size
    elif parse_disk_size(request.disk_size)[0] == "absolute":
        fs_bytes, block_size = 0, 4096  # the size asked for, whatever the filesystem
    else:
        return None
    # The firmware the target and request allow; a guest that cannot boot UEFI gets a smaller MBR disk.
    firmware = choose_firmware(request.firmware, load_target(request.target), request.layout)
    layout = bootable.plan_layout(
        fs_bytes, block_size, layout=request.layout, disk_size=request.disk_size, firmware=firmware
    )
    return layout.disk_bytes


def check_export(request: Request, src: Source) -> None:
    """Refuse, in one line, an export whose bootable disk its format (or MBR) cannot hold."""
    size = bootable_disk_bytes(request, src)
    if size is not None:
        limits.check_fits(size, request.format, request.vmdk_subformat, what="the bootable disk")
