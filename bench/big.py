"""An appliance of a real size: a 10 GiB raw disk holding 8.8 GiB of data that does not compress
(bench.common.incompressible_disk: media, archives, packages are like that) to a
streamOptimized VMDK and to an OVA, against the bare ``qemu-img convert -O vmdk -o
subformat=streamOptimized`` run in the same process, as bench/convert.py measures the 3 GiB
disk. One run each (qemu-img alone takes minutes here); about 20 GB of scratch space (the disk and
one VMDK at a time), removed after; not run when there is not that much free.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import WORK, incompressible_disk  # noqa: E402
from bench.convert import bare, ours, step  # noqa: E402
from imaging import sparse  # noqa: E402
from imaging.workspace import Workspace  # noqa: E402

GiB, MiB = 1 << 30, 1 << 20
SIZE = 10 * GiB
# Eleven runs of 820 MiB of data spread over the disk, holes between: 8.8 GiB of data.
EXTENTS = [(i * (SIZE // 11) // MiB * MiB, 820 * MiB) for i in range(11)]
STREAM = ["-O", "vmdk", "-o", "subformat=streamOptimized"]
NEEDS = 21 * 10**9  # the disk's 8.8 GiB of data and one 9.5 GB VMDK at a time, and room to spare


def main() -> list[tuple[str, str, str]]:
    os.environ["IMAGING_PROGRESS"] = "0"
    WORK.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(WORK).free
    if free < NEEDS:  # the disk, then qemu-img's VMDK, then ours: said, not half run
        return [("convert: a real-size disk", "not run",
                 f"needs {NEEDS / 1e9:.0f} GB free in {WORK}, has {free / 1e9:.0f} GB")]  # fmt: skip
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        base = Path(tmp)
        disk = incompressible_disk(base / "big.raw", SIZE, EXTENTS)
        data = sparse.data_bytes(disk)
        rows = [("convert: a real-size disk", f"{data / GiB:.1f} GiB of data",
                 "10 GiB raw, data that does not compress (an AES-CTR keystream); one run each, "
                 "against the bare qemu-img convert in the same process")]  # fmt: skip
        t_bare, size_bare = bare(disk, STREAM, base / "bare.vmdk")
        (base / "bare.vmdk").unlink()
        ws = Workspace.open(base / "ws")
        for fmt in ("vmdk", "ova"):
            t_step, size_ours = step(disk, fmt, [], base / "step", ws)
            shutil.rmtree(base / "step")
            t_wall, _ = ours(disk, fmt, [], base / "out", base / "runs")
            shutil.rmtree(base / "out")
            rows.append((
                f"convert --format {fmt}, 8.8 GiB that does not compress",
                f"{t_step:.1f} s ({t_step / t_bare:.2f}x)",
                f"qemu-img {' '.join(STREAM)}: {t_bare:.1f} s ({data / t_bare / 1e6:.0f} MB/s); ours "
                f"{data / t_step / 1e6:.0f} MB/s; whole command {t_wall:.1f} s ({t_wall / t_bare:.2f}x); "
                f"{size_ours / 1e9:.2f} GB, {size_ours / size_bare:.3f}x qemu-img's {size_bare / 1e9:.2f} GB",
            ))  # fmt: skip
    return rows


if __name__ == "__main__":
    for row in main():
        print(" | ".join(row), flush=True)
