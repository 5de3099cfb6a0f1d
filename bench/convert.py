"""Each output format from one disk: ``imaging convert`` against the bare ``qemu-img convert``
(for GCE's tar.gz, against the command GCE's guide gives: ``tar --format=oldgnu -Sczf``).

The disk is 3 GiB raw with ~1.3 GB of data (bench.common.mixed_disk). For every format, in the
same process and page cache, alternately: the bare tool as everyone runs it (``-O vmdk -o
subformat=streamOptimized`` for vmdk and ova, ``-c`` for compressed qcow2), the stage's
conversion step (``export.export`` called in this process, as the bare tool runs; its
``convert_seconds``: conversion and identity stamping, without check and sha256), and the whole
``python -m imaging convert`` command (notebook kernel, checks, sha256 and all). Times are medians of ``REPEAT`` runs (the
machine's two cores are shared), each after a ``sync`` and with the disk's data in
the page cache; sizes are the artifacts'.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import WORK, mixed_disk, run  # noqa: E402
from imaging import config, sparse  # noqa: E402
from imaging.formats import export
from imaging.workspace import Workspace  # noqa: E402

REPEAT = int(os.environ.get("IMAGING_BENCH_REPEAT", "3"))
# format (our --format and options) -> the bare qemu-img arguments it is measured against
CASES: list[tuple[str, list[str], list[str]]] = [
    ("vmdk", [], ["-O", "vmdk", "-o", "subformat=streamOptimized"]),
    ("ova", [], ["-O", "vmdk", "-o", "subformat=streamOptimized"]),
    ("qcow2", [], ["-O", "qcow2"]),
    ("qcow2", ["--compress"], ["-O", "qcow2", "-c"]),
    ("vmdk", ["--vmdk-subformat", "monolithicSparse"], ["-O", "vmdk", "-o", "subformat=monolithicSparse"]),
    ("vdi", [], ["-O", "vdi"]),
    ("vhd", [], ["-O", "vpc"]),
    ("vhdx", [], ["-O", "vhdx"]),
    ("raw", [], ["-O", "raw"]),
    # Azure's fixed VHD, against the qemu-img command Microsoft's guide gives for it.
    ("vhd", ["--target", "azure"], ["-O", "vpc", "-o", "subformat=fixed,force_size=on"]),
    ("gce", [], ["tar"]),  # GCE's guide: tar --format=oldgnu -Sczf disk.tar.gz disk.raw
]


def settle(disk: Path) -> None:
    """The same start for every timed run: earlier runs' dirty pages flushed, and the disk's
    data read back into the page cache. These machines reclaim idle page cache within seconds
    (kdamond), so the same qemu-img run took 0.45 s or 2.7 s depending on the pause before it."""
    os.sync()
    fd = os.open(disk, os.O_RDONLY)
    try:
        for offset, length in sparse.data_extents(fd):
            for pos in range(offset, offset + length, 16 << 20):
                os.pread(fd, min(16 << 20, offset + length - pos), pos)
    finally:
        os.close(fd)


def bare(disk: Path, args: list[str], out: Path) -> tuple[float, int]:
    out.unlink(missing_ok=True)
    if args == ["tar"]:  # the disk as disk.raw (a hard link), gzip on one core
        with tempfile.TemporaryDirectory(dir=out.parent) as named:
            os.link(disk, Path(named) / "disk.raw")
            settle(disk)
            t0 = time.perf_counter()
            run("tar", "--format=oldgnu", "-Sczf", out, "-C", named, "disk.raw")
            return time.perf_counter() - t0, out.stat().st_size
    settle(disk)
    t0 = time.perf_counter()
    run("qemu-img", "convert", "-f", "raw", *args, disk, out)
    return time.perf_counter() - t0, out.stat().st_size


def ours(disk: Path, fmt: str, options: list[str], out_dir: Path, runs: Path) -> float:
    """Wall time of the whole command (notebook kernel, checks, sha256 and all)."""
    env = {**os.environ, "IMAGING_RUNS": str(runs), "IMAGING_PROGRESS": "0"}
    settle(disk)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "imaging", "convert", str(disk), "--format", fmt, *options, "--name", "bench",
         "--out", str(out_dir)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"imaging convert --format {fmt} failed:\n{proc.stderr[-2000:]}")
    return wall


def step(disk: Path, fmt: str, options: list[str], out_dir: Path, ws: Workspace) -> tuple[float, int]:
    """The stage's conversion step in this process, as bare qemu-img runs: (seconds, size)."""
    subformat = (
        options[options.index("--vmdk-subformat") + 1]
        if "--vmdk-subformat" in options
        else "streamOptimized"
    )
    target = options[options.index("--target") + 1] if "--target" in options else config.default_target(fmt)
    settle(disk)
    source = export.input_disk(ws, "convert", str(disk))
    artifact = export.export(ws, "bench", fmt, out_dir, disk=source, compress="--compress" in options,
                             vmdk_subformat=subformat, target=target)  # fmt: skip
    return artifact.convert_seconds, artifact.size_bytes


def main(only: list[str] | None = None) -> list[tuple[str, str, str]]:
    """Every case, or those whose label starts with one of ``only`` (``vhd``, ``gce``...)."""
    os.environ["IMAGING_PROGRESS"] = "0"
    WORK.mkdir(parents=True, exist_ok=True)
    disk = mixed_disk(WORK / "mixed-3g.img")
    data = sparse.data_bytes(disk)
    rows = [("convert: the disk", f"{data / 1e9:.2f} GB of data", "3 GiB raw; medians of "
             f"{REPEAT} runs, alternating with the bare qemu-img convert in the same process")]  # fmt: skip
    sparse.sha256(disk, desc=None)  # page cache
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        base = Path(tmp)
        for fmt, options, tool in CASES:
            label = " ".join([fmt, *options])
            if only and not any(label.startswith(o) for o in only):
                continue
            t_bare, t_wall, t_step = [], [], []
            size_bare = size_ours = 0
            ws = Workspace.open(base / "ws")
            for i in range(REPEAT):
                t, size_bare = bare(disk, tool, base / "bare.img")
                t_bare.append(t)
                (base / "bare.img").unlink()
                s, size_ours = step(disk, fmt, options, base / "step", ws)
                t_step.append(s)
                shutil.rmtree(base / "step")
                t_wall.append(ours(disk, fmt, options, base / f"out{i}", base / "runs"))
                shutil.rmtree(base / f"out{i}")
            mb, mw, ms = (statistics.median(x) for x in (t_bare, t_wall, t_step))
            rows.append((
                f"convert --format {label}",
                f"{ms:.2f} s ({ms / mb:.2f}x)",
                f"{'GNU tar --format=oldgnu -Sczf' if tool == ['tar'] else 'qemu-img ' + ' '.join(tool)}: {mb:.2f} s; whole command {mw:.2f} s ({mw / mb:.2f}x); "
                f"size {size_ours / 1e6:.0f} MB, {size_ours / size_bare:.3f}x the plain tool's {size_bare / 1e6:.0f} MB",
            ))  # fmt: skip
    return rows


if __name__ == "__main__":
    for row in main(sys.argv[1:]):
        print(" | ".join(row), flush=True)
