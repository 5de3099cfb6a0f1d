"""Shared pieces of the benchmarks: test images, timing, a process-tree memory sampler."""

from __future__ import annotations

import os
import random
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from imaging import sparse
from imaging.disk import images, lvm
from imaging.samples import catalog

WORK = Path(os.environ.get("IMAGING_BENCH_DIR", "/var/tmp/imaging-bench"))


def load() -> float:
    """The machine's 1-minute load average (other work shares its two cores)."""
    return os.getloadavg()[0]


def run(*argv: object, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True, **kw)  # type: ignore[call-overload]


def timed(fn: Callable[[], object], repeat: int = 3, setup: Callable[[], object] | None = None) -> float:
    """Median wall time of ``fn`` over ``repeat`` runs (``setup`` runs untimed before each)."""
    times = []
    for _ in range(repeat):
        if setup:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def files_tree(root: Path, total_bytes: int, seed: int = 1) -> None:
    """A tree shaped like an OS root: mostly small files (mean ~60 KiB), a few big ones,
    symlinks and hard links."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    written = 0
    n = 0
    while written < total_bytes:
        d = root / f"d{n % 97:02d}" / f"s{n % 13}"
        d.mkdir(parents=True, exist_ok=True)
        bucket = rng.random()
        if bucket < 0.75:
            size = rng.randint(512, 8 << 10)
        elif bucket < 0.98:
            size = rng.randint(8 << 10, 128 << 10)
        else:
            size = rng.randint(128 << 10, 4 << 20)
        path = d / f"f{n}"
        path.write_bytes(rng.randbytes(size))
        if n % 50 == 0:
            (d / f"l{n}").symlink_to(path.name)
        if n % 70 == 0:
            os.link(path, d / f"h{n}")
        written += size
        n += 1


def ext3_with_files(path: Path, size: str, data_bytes: int) -> Path:
    """An ext3 instance image of ``size`` holding about ``data_bytes`` of files (cached)."""
    if path.exists():
        return path
    tree = path.with_suffix(".tree")
    shutil.rmtree(tree, ignore_errors=True)
    files_tree(tree, data_bytes)
    tmp = path.with_suffix(".tmp")
    run("mke2fs", "-q", "-F", "-t", "ext3", "-b", "4096", "-d", tree, tmp, size)
    shutil.rmtree(tree)
    tmp.rename(path)
    return path


def sample_with_data(path: Path, size: str, data_bytes: int) -> Path:
    """The bootable sample grown to ``size`` (sparse) with a ``data_bytes`` file added (cached)."""
    if path.exists():
        return path
    tmp = path.with_suffix(".tmp")
    shutil.copyfile(catalog.ensure_sample("kvm"), tmp)
    tmp.chmod(0o644)
    run("resize2fs", tmp, size)
    blob = path.with_suffix(".blob")
    rng = random.Random(2)
    with open(blob, "wb") as f:
        for _ in range(0, data_bytes, 1 << 20):
            f.write(rng.randbytes(1 << 20))
    run("debugfs", "-w", "-R", f"write {blob} /data.bin", tmp)
    blob.unlink()
    run("e2fsck", "-fy", tmp)
    tmp.rename(path)
    return path


def _pss(pid: int) -> int:
    # Proportional set size: a page shared by n processes counts 1/n in each, so the sum over the
    # tree is real memory (RSS would count a forked child's shared pages twice).
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise ValueError("no Pss")


class TreeMemory:
    """Samples the memory (PSS) of a process and all its descendants every 50 ms."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_total = 0
        self.peak_without_vm = 0
        self.peak_single = 0
        self.peak_single_name = ""
        self.peak_parts: list[tuple[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry))
        found, todo = [], [self.pid]
        while todo:
            p = todo.pop()
            found.append(p)
            todo.extend(children.get(p, []))
        return found

    def _loop(self) -> None:
        while not self._stop.is_set():
            total = without_vm = 0
            parts = []
            for pid in self._tree():
                try:
                    rss = _pss(pid)
                    name = Path(f"/proc/{pid}/comm").read_text().strip()
                except (OSError, ValueError):
                    continue
                total += rss
                parts.append((name, rss))
                if not name.startswith("qemu-system"):
                    without_vm += rss
                if rss > self.peak_single:
                    self.peak_single, self.peak_single_name = rss, name
            self.peak_total = max(self.peak_total, total)
            if without_vm > self.peak_without_vm:
                self.peak_without_vm = without_vm
                self.peak_parts = parts
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def mib(n: float) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def mixed_disk(path: Path, random_bytes: int = 600 << 20) -> Path:
    """A 3 GiB raw disk holding ~1.3 GB of data shaped like an OS image (cached): the host's
    /usr/share (text, compresses ~3:1) and random files (already-compressed packages, media)."""
    if path.exists():
        return path
    tree = path.with_suffix(".tree")
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    run("cp", "-a", "/usr/share", tree / "share")
    rng = random.Random(3)
    written, n = 0, 0
    (tree / "blobs").mkdir()
    while written < random_bytes:
        size = rng.randint(64 << 10, 16 << 20)
        (tree / "blobs" / f"b{n}").write_bytes(rng.randbytes(size))
        written, n = written + size, n + 1
    tmp = path.with_suffix(".tmp")
    run("mke2fs", "-q", "-F", "-t", "ext3", "-b", "4096", "-d", tree, tmp, "3G")
    shutil.rmtree(tree)
    tmp.rename(path)
    return path


# Where the real-files disk's files come from, in this order, until REAL_BYTES are taken: what an
# installed system is made of (programs, shared libraries, then docs, locales, icons, data).
REAL_SOURCES = ("/usr/bin", "/usr/sbin", "/usr/lib/x86_64-linux-gnu", "/usr/share", "/usr/lib")
REAL_BYTES = 1200 * 1000 * 1000


def _real_tree(tree: Path, budget: int) -> int:
    """Hard links (copies across filesystems) of the host's own files under ``tree``, walked in
    sorted order from REAL_SOURCES until ``budget`` bytes: the same host gives the same tree."""
    taken = 0
    seen: set[tuple[int, int]] = set()
    for top in REAL_SOURCES:
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            for name in sorted(filenames):
                src = Path(dirpath, name)
                try:
                    st = src.lstat()
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) in seen or not (src.is_symlink() or src.is_file()):
                    continue
                seen.add((st.st_dev, st.st_ino))
                dst = tree / src.relative_to("/")
                dst.parent.mkdir(parents=True, exist_ok=True)
                if src.is_symlink():
                    dst.symlink_to(os.readlink(src))
                    continue
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copy2(src, dst)
                taken += st.st_size
                if taken >= budget:
                    return taken
    return taken


def real_disk(path: Path, fs_size: str = "4G", disk_size: int = 5 << 30) -> Path:
    """A disk of real OS files (cached): about 1.2 GB of this host's /usr (programs, libraries,
    docs, locales) in a ``fs_size`` ext3, placed in partition 1 (at 1 MiB) of a ``disk_size``
    sparse raw disk with an MBR, as ``imaging export ... --format raw`` leaves an instance.
    Images people convert are made of such files, not of random bytes."""
    if path.exists():
        return path
    tree = path.with_suffix(".tree")
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    fs = path.with_suffix(".fs")
    try:
        _real_tree(tree, REAL_BYTES)
        run("mke2fs", "-q", "-F", "-t", "ext3", "-b", "4096", "-d", tree, fs, fs_size)
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    tmp = path.with_suffix(".tmp")
    sparse.create_sparse(tmp, disk_size)
    run(
        "sfdisk",
        "-q",
        tmp,
        input=f"label: dos\nstart=2048, size={fs.stat().st_size // 512}, type=83, bootable\n",
    )
    sparse.copy_range(fs, tmp, dst_offset=1 << 20, desc=None)
    fs.unlink()
    tmp.rename(path)
    return path


def incompressible_disk(path: Path, size: int, extents: list[tuple[int, int]], seed: int = 1) -> Path:
    """A sparse raw disk of ``size`` bytes whose ``extents`` ((offset, length), the rest holes)
    hold data no deflate shrinks, like media, archives and packages: an AES-128-CTR keystream,
    16 MiB per call (OpenSSL through ``cryptography``, 0.15 s per GiB here: writing it costs
    more than making it). The same seed gives the same disk."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    keystream = Cipher(algorithms.AES(seed.to_bytes(16, "big")), modes.CTR(bytes(16))).encryptor()
    zeros, block = memoryview(bytes(16 << 20)), bytearray(16 << 20)
    tmp = path.with_name(f".{path.name}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for offset, length in extents:
            for pos in range(offset, offset + length, len(block)):
                n = min(len(block), offset + length - pos)
                keystream.update_into(zeros[:n], block)
                os.pwrite(fd, memoryview(block)[:n], pos)
    finally:
        os.close(fd)
    tmp.rename(path)
    return path


def real_tree(tree: Path) -> Path:
    """The real-files disk's files (this host's /usr, about 1.2 GB) as a directory (cached)."""
    if not tree.exists():
        part = tree.with_suffix(".part")
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        _real_tree(part, REAL_BYTES)
        part.rename(tree)
    return tree


def filesystem_of(tree: Path, path: Path, fs_type: str, size: str = "3G") -> Path:
    """A partitionless ``fs_type`` filesystem holding ``tree`` (cached): made by the host's own
    mkfs, filled through a mount with rsync -aHAX, as an installer would leave it."""
    if path.exists():
        return path
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    run("truncate", "-s", size, tmp)
    mkfs = {
        "ext4": ["mke2fs", "-q", "-F", "-t", "ext4"],
        "xfs": ["mkfs.xfs", "-q", "-f"],
        "btrfs": ["mkfs.btrfs", "-q", "-f"],
    }
    run(*mkfs[fs_type], tmp)
    mnt = path.with_suffix(".mnt")
    mnt.mkdir(exist_ok=True)
    run("mount", "-o", "loop", tmp, mnt)
    try:
        run("rsync", "-aHAX", f"{tree}/", f"{mnt}/")
    finally:
        run("umount", mnt)
        mnt.rmdir()
    tmp.rename(path)
    return path


def lvm_disk(path: Path, disk_size: int, fs: Path) -> Path:
    """A ``disk_size`` sparse disk (cached): one LVM partition, VG ``bench`` with a swap volume and
    a root volume holding the bytes of ``fs``, made by lvm2 under a private configuration that
    sees only this disk's loop device (nothing activated)."""
    if path.exists():
        return path
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    sparse.create_sparse(tmp, disk_size)
    run("sfdisk", "-q", tmp, input="label: dos\nstart=2048, type=8e\n")
    conf = Path(tempfile.mkdtemp(prefix="lvm-"))
    dev = run("losetup", "--find", "--show", "-o", str(1 << 20), tmp).stdout.strip()
    try:
        (conf / "lvm.conf").write_text(
            f'devices {{ filter = [ "a|^{dev}$|", "r|.*|" ] obtain_device_list_from_udev = 0 hints = "none" '
            "use_devicesfile = 0 }\nactivation { udev_sync = 0 udev_rules = 0 }\n"
            f'global {{ activation = 0 locking_dir = "{conf}" }}\nbackup {{ backup = 0 archive = 0 }}\n'
        )
        env = {**os.environ, "LVM_SYSTEM_DIR": str(conf)}
        run("pvcreate", "-q", dev, env=env)
        run("vgcreate", "-q", "bench", dev, env=env)
        run("lvcreate", "-q", "-an", "-Zn", "-L", "1G", "-n", "swap", "bench", env=env)
        run("lvcreate", "-q", "-an", "-Zn", "-L", f"{fs.stat().st_size}b", "-n", "root", "bench", env=env)
    finally:
        run("losetup", "--detach", dev)
        shutil.rmtree(conf)
    (vg,) = lvm.read_volume_groups(tmp, images.read_partition_table(tmp))
    root = next(lv for lv in vg.lvs if lv.name == "root")
    sparse.copy_range(fs, tmp, dst_offset=root.segments[0].disk_offset, desc=None)
    tmp.rename(path)
    return path
