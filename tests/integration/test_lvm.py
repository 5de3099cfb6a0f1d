"""imaging.disk.lvm against volume groups the real lvm2 tools wrote, on loop devices of sparse files.

The tools run with a private configuration (LVM_SYSTEM_DIR): they see only this test's loop devices,
keep no hints, backups or devices file of the host's, and never touch device-mapper (activation = 0;
this host's kernel has none). What lvm2 refuses to create without device-mapper (thin pools,
snapshots) is written by ``vgcfgrestore --force`` from an edited ``vgcfgbackup``; the hostile cases
(sizes, nesting, garbage) by a small writer of metadata text with correct checksums (:func:`rewrite`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import string
import struct
import subprocess
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imaging import sparse
from imaging.disk import images, lvm
from imaging.errors import SourceError

MIB = 1 << 20

# Root, lvm2 and loop devices: the integration conftest fails the run without them.


def sh(*argv: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, f"{' '.join(argv)}: {proc.stderr}"
    return proc.stdout


class Lvm:
    """lvm2 commands over this test's loop devices only."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "lvm-etc"
        self.dir.mkdir()
        self.loops: dict[str, str] = {}  # device -> what it is ("a.img", "a.img p2")
        self.env = {**os.environ, "LVM_SYSTEM_DIR": str(self.dir), "LVM_SUPPRESS_FD_WARNINGS": "1"}

    def attach(self, image: Path, start: int = 0, size: int | None = None, *, name: str = "") -> str:
        limit = ["--sizelimit", str(size)] if size else []
        dev = sh("losetup", "--find", "--show", "-o", str(start), *limit, str(image)).strip()
        self.loops[dev] = name or image.name
        accept = ", ".join(f'"a|^{d}$|"' for d in self.loops)
        (self.dir / "lvm.conf").write_text(
            f'devices {{ filter = [ {accept}, "r|.*|" ] scan = [ "/dev" ] obtain_device_list_from_udev = 0\n'
            '  external_device_info_source = "none" hints = "none" use_devicesfile = 0 }\n'
            "activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }\n"
            f'global {{ activation = 0 locking_dir = "{self.dir}" }}\n'
            "backup { backup = 0 archive = 0 }\n"
        )
        return dev

    def __call__(self, *argv: str) -> str:
        return sh(*argv, env=self.env)

    def detach(self) -> None:
        for dev in list(self.loops):
            subprocess.run(["losetup", "-d", dev], capture_output=True)
            del self.loops[dev]

    def segments(self, vg: str) -> list[tuple[str, int, str, int, int]]:
        """(volume, segment start extent, what the PE range is on, first, last) as lvs reports them."""
        out = json.loads(
            self("lvs", "-a", "--reportformat", "json", "-o", "lv_name,seg_start_pe,seg_pe_ranges", vg)
        )
        rows = []
        for r in out["report"][0]["lv"]:
            for rng in r["seg_pe_ranges"].split():
                where, _, span = rng.rpartition(":")
                first, _, last = span.partition("-")
                rows.append((r["lv_name"].strip("[]"), int(r["seg_start_pe"]), self.loops.get(where, where),
                             int(first), int(last)))  # fmt: skip
        return sorted(rows)


@pytest.fixture
def tools(tmp_path: Path) -> Iterator[Lvm]:
    lvm_ = Lvm(tmp_path)
    try:
        yield lvm_
    finally:
        lvm_.detach()
        assert str(tmp_path) not in sh("losetup", "-a")


def disk(path: Path, size: int, script: str | None = None) -> Path:
    sparse.create_sparse(path, size)
    if script:
        subprocess.run(["sfdisk", "-q", str(path)], input=script, text=True, check=True, capture_output=True)
    return path


def ours(vg: lvm.VolumeGroup, names: dict[str, str]) -> list[tuple[str, int, str, int, int]]:
    """The segments as :func:`Lvm.segments` has them, from what lvm.py read."""
    pvs = {pv.name: pv for pv in vg.pvs}
    return sorted(
        (lv.name, s.start_extent, names[pvs[s.pv_name].uuid], s.pv_start_extent,
         s.pv_start_extent + s.extent_count - 1)
        for lv in vg.lvs for s in lv.segments if s.pv_name
    )  # fmt: skip


def pv_names(tools: Lvm, vg: str) -> dict[str, str]:
    out = json.loads(tools("pvs", "--reportformat", "json", "-o", "pv_name,pv_uuid", "-S", f"vg_name={vg}"))
    return {r["pv_uuid"]: tools.loops[r["pv_name"]] for r in out["report"][0]["pv"]}


def read(path: Path) -> list[lvm.VolumeGroup]:
    return lvm.read_volume_groups(path, images.read_partition_table(path))


def bytes_at(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        return os.pread(f.fileno(), length, offset)


def refused(path: Path) -> str:
    with pytest.raises(SourceError) as e:
        read(path)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_root_and_swap_on_a_logical_mbr_partition(tools: Lvm, tmp_path: Path) -> None:
    # What Debian's installer makes of "use the entire disk and set up LVM" on an MBR disk.
    boot, extended, lvm_ = "start=2048, size=32768, type=83", "start=34816, type=5", "start=36864, type=8e"
    path = disk(tmp_path / "d.img", 128 * MIB, f"label: dos\n{boot}\n{extended}\n{lvm_}\n")
    p5 = 36864 * 512
    dev = tools.attach(path, p5, 128 * MIB - p5, name="p5")
    tools("pvcreate", "-q", dev)
    tools("vgcreate", "-q", "debian-vg", dev)
    tools("lvcreate", "-q", "-an", "-Zn", "-L", "48M", "-n", "root", "debian-vg")
    tools("lvcreate", "-q", "-an", "-Zn", "-L", "16M", "-n", "swap_1", "debian-vg")
    expected = tools.segments("debian-vg")
    names = pv_names(tools, "debian-vg")
    tools.detach()

    assert lvm.is_lvm_member(path, p5) and not lvm.is_lvm_member(path, 2048 * 512)
    t0 = time.monotonic()
    (vg,) = read(path)
    print(f"read_volume_groups: {time.monotonic() - t0:.3f} s (sfdisk included)")
    assert vg.name == "debian-vg" and vg.extent_size == 4 * MIB
    (pv,) = vg.pvs
    assert (pv.name, pv.partition, pv.disk_offset, pv.pe_start) == ("pv0", 5, p5, MIB)
    assert [(lv.name, lv.size_bytes, lv.visible) for lv in vg.lvs] == [
        ("root", 48 * MIB, True),
        ("swap_1", 16 * MIB, True),
    ]
    root, swap = vg.lvs
    assert root.dm_name == "/dev/mapper/debian--vg-root"
    assert root.segments[0].disk_offset == p5 + MIB and swap.segments[0].disk_offset == p5 + MIB + 48 * MIB
    assert ours(vg, names) == expected
    table = lvm.volume_table(vg)
    assert table.column("volume") == ["root", "swap_1"]
    assert table.column("physical volume") == ["pv0 (partition 5)"] * 2
    assert table.column("disk offset") == [f"{p5 + MIB:,}", f"{p5 + 49 * MIB:,}"]
    for lv in vg.lvs:
        lvm.check_linear(lv)

    # A filesystem written into the volume by its disk offset, then copied out of it.
    content = tmp_path / "content"
    (content / "etc").mkdir(parents=True)
    (content / "etc" / "fstab").write_text("/dev/mapper/debian--vg-root / ext4 defaults 0 1\n")
    (content / "big").write_bytes(secrets.token_bytes(3 * MIB))
    offset = root.segments[0].disk_offset
    sh("mke2fs", "-q", "-F", "-t", "ext4", "-d", str(content), "-E", f"offset={offset}", str(path), "48M")
    assert path.stat().st_size == 128 * MIB
    assert images.probe(path, offset, root.size_bytes).type == "ext4"
    dest = tmp_path / "root.raw"
    seconds = lvm.copy_volume(path, root, dest)
    assert dest.stat().st_size == root.size_bytes
    subprocess.run(["e2fsck", "-fn", str(dest)], check=True, capture_output=True)
    assert dest.read_bytes() == bytes_at(path, offset, root.size_bytes)
    print(f"copy_volume of 48 MiB holding {sparse.data_bytes(dest) / MIB:.1f} MiB: {seconds:.3f} s")


def test_a_volume_in_two_segments_and_cost_following_the_data(tools: Lvm, tmp_path: Path) -> None:
    path = disk(tmp_path / "d.img", 4 << 30)
    dev = tools.attach(path)
    tools("pvcreate", "-q", dev)
    tools("vgcreate", "-q", "vg", dev)
    tools("lvcreate", "-q", "-an", "-Zn", "-L", "8M", "-n", "lv1", "vg")
    tools("lvcreate", "-q", "-an", "-Zn", "-L", "8M", "-n", "lv2", "vg")
    tools("lvextend", "-q", "-L", "+3G", "vg/lv1")
    expected = tools.segments("vg")
    names = pv_names(tools, "vg")
    tools.detach()

    (vg,) = read(path)
    assert ours(vg, names) == expected
    lv1 = next(lv for lv in vg.lvs if lv.name == "lv1")
    first, second = lv1.segments
    # lv2 took extents 2-3 of the PV: lv1 goes on from extent 4.
    assert (first.start_extent, first.pv_start_extent, first.extent_count) == (0, 0, 2)
    assert (second.start_extent, second.pv_start_extent, second.disk_offset) == (2, 4, MIB + 4 * 4 * MIB)
    assert second.lv_offset == 8 * MIB and lv1.size_bytes == 8 * MIB + (3 << 30)
    assert lvm.volume_table(vg).column("segment") == [1, 2, 1]
    # Marks at both ends of each segment, found again at their places in the volume.
    marks = {}
    with open(path, "r+b") as f:
        for s in lv1.segments:
            for at in (s.disk_offset, s.disk_offset + s.length - 4096):
                marks[at - s.disk_offset + s.lv_offset] = data = secrets.token_bytes(4096)
                os.pwrite(f.fileno(), data, at)
    dest = tmp_path / "lv1.raw"
    seconds = lvm.copy_volume(path, lv1, dest)
    print(f"copy_volume of a 3 GiB volume holding 16 KiB on a 4 GiB disk: {seconds:.3f} s")
    assert seconds < 2 and sparse.allocated_bytes(dest) < MIB
    for at, data in marks.items():
        assert bytes_at(dest, at, 4096) == data


def test_a_volume_group_over_two_gpt_partitions(tools: Lvm, tmp_path: Path) -> None:
    lvm_type = "E6D6D379-F507-44C2-A23C-238F2A3DF928"
    table = (
        f"label: gpt\nstart=2048, size=65536, type={lvm_type}\nstart=67584, size=86016, type={lvm_type}\n"
    )
    path = disk(tmp_path / "d.img", 80 * MIB, table)
    p1 = tools.attach(path, 2048 * 512, 65536 * 512, name="p1")
    p2 = tools.attach(path, 67584 * 512, 86016 * 512, name="p2")
    tools("pvcreate", "-q", p1, p2)
    tools("vgcreate", "-q", "-s", "1M", "pair", p1, p2)
    tools("lvcreate", "-q", "-an", "-Zn", "-L", "50M", "-n", "root", "pair")
    expected = tools.segments("pair")
    names = pv_names(tools, "pair")
    tools.detach()

    (vg,) = read(path)
    assert [(pv.partition, pv.disk_offset) for pv in vg.pvs] == [(1, 2048 * 512), (2, 67584 * 512)]
    (root,) = vg.lvs
    assert len(root.segments) == 2 and ours(vg, names) == expected
    with open(path, "r+b") as f:
        for s in root.segments:
            os.pwrite(f.fileno(), secrets.token_bytes(s.length), s.disk_offset)
    dest = tmp_path / "root.raw"
    lvm.copy_volume(path, root, dest)
    assert dest.read_bytes() == b"".join(bytes_at(path, s.disk_offset, s.length) for s in root.segments)


def test_a_physical_volume_on_another_disk_is_named(tools: Lvm, tmp_path: Path) -> None:
    a, b = disk(tmp_path / "a.img", 32 * MIB), disk(tmp_path / "b.img", 32 * MIB)
    da, db = tools.attach(a), tools.attach(b)
    tools("pvcreate", "-q", da, db)
    tools("vgcreate", "-q", "split", da, db)
    tools("lvcreate", "-q", "-an", "-Zn", "-L", "40M", "-n", "root", "split")
    uuid = tools("pvs", "--noheadings", "-o", "pv_uuid", db).strip()
    tools.detach()
    assert refused(a) == f"volume group split needs physical volume {uuid}, which is not on this disk"
    assert refused(b).startswith("volume group split needs physical volume ")


def _uuid() -> str:
    r = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(32))
    return "-".join(r[a:b] for a, b in ((0, 6), (6, 10), (10, 14), (14, 18), (18, 22), (22, 26), (26, 32)))


def _lv(name: str, visible: bool, *segment: str) -> str:
    status = '"READ", "WRITE", "VISIBLE"' if visible else '"READ", "WRITE"'
    body = "\n".join(segment)
    head = f'id = "{_uuid()}"\nstatus = [{status}]\nflags = []\nsegment_count = 1'
    return f"{name} {{\n{head}\nsegment1 {{\n{body}\n}}\n}}\n"


def _linear(count: int, pe: int) -> tuple[str, ...]:
    return ("start_extent = 0", f"extent_count = {count}", 'type = "striped"', "stripe_count = 1",
            f'stripes = ["pv0", {pe}]')  # fmt: skip


def _thin_pool(pool: str, count: int, meta_pe: int) -> str:
    """A thin pool's volumes as lvm2 writes them (lvcreate --type thin-pool on a host that has
    device-mapper): the pool, and its hidden metadata and data volumes from extent ``meta_pe``."""
    return (
        _lv(pool, True, "start_extent = 0", f"extent_count = {count}", 'type = "thin-pool"',
            f'metadata = "{pool}_tmeta"', f'pool = "{pool}_tdata"', "transaction_id = 1", "chunk_size = 128",
            'discards = "passdown"', "zero_new_blocks = 0")
        + _lv(f"{pool}_tmeta", False, *_linear(1, meta_pe)) + _lv(f"{pool}_tdata", False, *_linear(count, meta_pe + 1))
    )  # fmt: skip


def _restore_with(tools: Lvm, vg: str, tmp_path: Path, volumes: str) -> None:
    """Add ``volumes`` to ``vg``'s metadata: lvm2 creates no thin pool or snapshot without
    device-mapper, but vgcfgrestore writes what a backup says."""
    backup = tmp_path / f"{vg}.vg"
    tools("vgcfgbackup", "-q", "-f", str(backup), vg)
    text = backup.read_text()
    at = text.index("logical_volumes {") + len("logical_volumes {")
    backup.write_text(text[:at] + "\n" + volumes + text[at:])
    tools("vgcfgrestore", "-q", "--force", "-f", str(backup), vg)


def test_only_linear_volumes_are_taken(tools: Lvm, tmp_path: Path) -> None:
    path = disk(
        tmp_path / "d.img", 96 * MIB, "label: dos\nstart=2048, size=90112, type=8e\nstart=92160, type=8e\n"
    )
    p1 = tools.attach(path, 2048 * 512, 90112 * 512, name="p1")
    p2 = tools.attach(path, 92160 * 512, (196608 - 92160) * 512, name="p2")
    tools("pvcreate", "-q", p1, p2)
    tools("vgcreate", "-q", "mixed", p1, p2)
    tools("lvcreate", "-q", "-an", "-Zn", "-L", "8M", "-n", "root", "mixed", p1)
    tools(
        "lvcreate", "-q", "-an", "-Zn", "--type", "striped", "-i", "2", "-L", "8M", "-n", "stripes", "mixed"
    )
    # What lvm2 writes for them (lvcreate --type thin-pool / thin / --snapshot on a host that has it).
    extra = (
        _thin_pool("pool", 2, 3)
        + _lv("thin", True, "start_extent = 0", "extent_count = 4", 'type = "thin"', 'thin_pool = "pool"',
              "transaction_id = 0", "device_id = 1")
        + _lv("lvol0_pmspare", False, *_linear(1, 6)) + _lv("snap", False, *_linear(1, 7))
        + _lv("snapshot0", False, "start_extent = 0", "extent_count = 2", 'type = "snapshot"',
              "chunk_size = 8", 'origin = "root"', 'cow_store = "snap"')
    )  # fmt: skip
    _restore_with(tools, "mixed", tmp_path, extra)
    listed = tools("lvs", "-a", "--noheadings", "-o", "lv_name,segtype", "mixed")
    assert re.search(r"thin\s+thin\s*\n", listed) and re.search(r"pool\s+thin-pool\s*\n", listed)
    tools.detach()

    (vg,) = read(path)
    lvs = {lv.name: lv for lv in vg.lvs}
    lvm.check_linear(lvs["root"])
    tail = "only linear volumes can be read without activating them"
    for name, what in [
        ("stripes", "is striped over 2 physical volumes (segment type striped)"),
        ("thin", "is a thin volume (segment type thin)"),
        ("pool", "is a thin pool (segment type thin-pool)"),
        ("snapshot0", "is a snapshot (segment type snapshot)"),
        ("snap", "holds the changed blocks of a snapshot of root, not a filesystem"),
    ]:
        with pytest.raises(SourceError) as e:
            lvm.check_linear(lvs[name])
        assert str(e.value) == f"logical volume mixed/{name} {what}: {tail}"
        with pytest.raises(SourceError):
            lvm.copy_volume(path, lvs[name], tmp_path / "never.raw")
    assert not (tmp_path / "never.raw").exists()
    assert sorted(lv.name for lv in vg.lvs if lv.visible) == ["pool", "root", "stripes", "thin"]
    types = set(lvm.volume_table(vg).column("type"))
    assert types == {"linear", "striped x2", "thin-pool", "thin", "snapshot"}


# --- damaged and hostile images: one lvm2-made disk, copied and then broken ---------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("lvm-base")
    tools = Lvm(root)
    path = disk(root / "base.img", 64 * MIB)
    try:
        dev = tools.attach(path)
        tools("pvcreate", "-q", dev)
        tools("vgcreate", "-q", "base", dev)
        tools("lvcreate", "-q", "-an", "-Zn", "-L", "16M", "-n", "root", "base")
        tools("lvcreate", "-q", "-an", "-Zn", "-L", "40M", "-n", "home", "base")
    finally:
        tools.detach()
    yield path
    assert str(root) not in sh("losetup", "-a")


@pytest.fixture
def damaged(base: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "damaged.img"
    shutil.copyfile(base, copy)
    return copy


def _crc(data: bytes) -> int:
    return (zlib.crc32(data, 0xF597A6CF ^ 0xFFFFFFFF) ^ 0xFFFFFFFF) & 0xFFFFFFFF


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        os.pwrite(f.fileno(), bytes([os.pread(f.fileno(), 1, offset)[0] ^ 0x20]), offset)


def locn(path: Path) -> tuple[int, int]:
    """The committed text's (offset, size) in the metadata area at 4 KiB, where pvcreate puts it."""
    header = bytes_at(path, 4096, 512)
    assert header[4:20] == b" LVM2 x[5A%r0N*>"
    return struct.unpack_from("<QQ", header, 40)


def rewrite(path: Path, edit: Callable[[str], str], *, size: int | None = None) -> None:
    """Metadata text edited in place, its checksums made right again (the writer of hostile cases)."""
    offset, length = locn(path)
    text = edit(bytes_at(path, 4096 + offset, length).rstrip(b"\0").decode()).encode() + b"\0"
    with open(path, "r+b") as f:
        os.pwrite(f.fileno(), text, 4096 + offset)
        header = bytearray(os.pread(f.fileno(), 512, 4096))
        struct.pack_into("<QQI", header, 40, offset, len(text) if size is None else size, _crc(text))
        struct.pack_into("<I", header, 0, _crc(bytes(header[4:])))
        os.pwrite(f.fileno(), header, 4096)


def test_the_base_reads_and_the_writer_keeps_it_readable(damaged: Path) -> None:
    rewrite(damaged, lambda t: t.replace("base {", '# a comment, and an "escaped" string\nbase {'))
    (vg,) = read(damaged)
    assert [(lv.name, lv.size_bytes) for lv in vg.lvs] == [("root", 16 * MIB), ("home", 40 * MIB)]


def test_a_label_with_a_wrong_checksum(damaged: Path) -> None:
    flip(damaged, 512 + 40)  # in the PV's uuid
    assert refused(damaged) == f"{damaged}: LVM label in sector 1 has a wrong checksum: corrupt"


def test_a_metadata_header_with_a_wrong_checksum(damaged: Path) -> None:
    flip(damaged, 4096 + 44)
    assert refused(damaged) == f"{damaged}: LVM metadata area header has a wrong magic or checksum: corrupt"


def test_metadata_text_with_a_wrong_checksum(damaged: Path) -> None:
    offset, length = locn(damaged)
    flip(damaged, 4096 + offset + length // 2)
    assert refused(damaged) == f"{damaged}: LVM metadata text has a wrong checksum: corrupt"


def test_a_truncated_disk(damaged: Path) -> None:
    os.truncate(damaged, 40 * MIB)
    assert refused(damaged) == (
        f"{damaged}: volume group base: logical volume home ends at byte {57 * MIB:,} of the disk, "
        f"beyond the end of the image ({40 * MIB:,}): truncated?"
    )
    os.truncate(damaged, 6000)
    assert refused(damaged) == f"{damaged}: LVM metadata text is beyond the end of the image: truncated?"


# (text replaced, replacement, what the one line says)
HOSTILE = [
    (
        '"pv0", 4',
        '"pv0", 14',
        "logical volume home: a segment lies beyond the extents of physical volume pv0",
    ),
    (
        '"pv0", 4',
        '"pv7", 4',
        "logical volume home: a linear segment does not name one of its physical volumes",
    ),
    ("extent_size = 8192", "extent_size = 0", "volume group base: extent size 0 is out of bounds: corrupt"),
    ("extent_count = 10", "extent_count = 99999999999999999999", "LVM metadata has no valid extent_count"),
    ("start_extent = 0\nextent_count = 10", "start_extent = 1\nextent_count = 10", "overlapping or missing"),
    (
        '"pv0", 4',
        '"pv0", 0',
        "volume group base: logical volumes root and home share extents of pv0: corrupt",
    ),
    ("flags = []\ndev_size", 'flags = ["MISSING"]\ndev_size', "volume group base marks its physical volume"),
    ("seqno =", "flags = []\nseqno =", "cannot parse the metadata text: flags given twice on line"),
    (
        "base {",
        "base {\n" + "a {" * 20 + "}" * 20,
        "cannot parse the metadata text: nested too deep on line 2",
    ),
    ("base {", "base {\nx = [1, 2", "cannot parse the metadata text: expected a value on line 3"),
    ("base {", "base {\n\\", "metadata text: unexpected '\\\\' on line 2"),
    ("base {", "b\u00e9se {", "metadata text: unexpected '\u00e9' on line 1"),
    ("base {", "other {}\nbase {", "LVM metadata text holds no single, validly named volume group"),
    ("\n}\n# Generated", "\n# Generated", "cannot parse the metadata text: missing '}' on line"),
]


@pytest.mark.parametrize(("old", "new", "message"), HOSTILE)
def test_hostile_metadata_is_refused_in_one_line(damaged: Path, old: str, new: str, message: str) -> None:
    rewrite(damaged, lambda t: t.replace(old, new, 1))
    assert message in refused(damaged)


def test_extents_beyond_the_physical_volume_are_refused(damaged: Path) -> None:
    rewrite(
        damaged, lambda t: t.replace("pe_count = 15", "pe_count = 1000").replace('"pv0", 4', '"pv0", 900')
    )
    assert refused(damaged) == (
        f"{damaged}: volume group base: logical volume home ends beyond the end of its physical volume: "
        "corrupt"
    )


def test_a_text_size_beyond_its_area_is_refused(damaged: Path) -> None:
    rewrite(damaged, lambda t: t, size=1 << 40)
    assert (
        refused(damaged)
        == f"{damaged}: LVM metadata text ({locn(damaged)[0]}+{1 << 40}) is out of bounds: corrupt"
    )


def test_the_newest_of_two_copies_is_taken(tools: Lvm, tmp_path: Path) -> None:
    path = disk(tmp_path / "d.img", 32 * MIB)
    dev = tools.attach(path)
    tools("pvcreate", "-q", "--pvmetadatacopies", "2", dev)
    tools("vgcreate", "-q", "two", dev)
    tools("lvcreate", "-q", "-an", "-Zn", "-L", "8M", "-n", "root", "two")
    tools.detach()
    assert len(read(path)[0].lvs[0].segments) == 1
    # The first copy made older than the second (the one at the end of the disk): the second is taken.
    rewrite(
        path, lambda t: t.replace("seqno = 2", "seqno = 1").replace("extent_count = 2", "extent_count = 1")
    )
    assert read(path)[0].lvs[0].size_bytes == 8 * MIB
    rewrite(path, lambda t: t.replace("seqno = 1", "seqno = 3"))
    assert read(path)[0].lvs[0].size_bytes == 4 * MIB


def test_a_disk_without_lvm(tmp_path: Path) -> None:
    path = disk(tmp_path / "plain.img", 8 * MIB, "label: dos\nstart=2048, type=83\n")
    assert read(path) == [] and lvm.read_volume_groups(path, None) == []
    assert not lvm.is_lvm_member(path, 0) and not lvm.is_lvm_member(path, 1 << 40)


def test_metadata_wrapped_around_its_circular_buffer(tools: Lvm, tmp_path: Path) -> None:
    path = disk(tmp_path / "d.img", 64 * MIB)
    dev = tools.attach(path)
    tools("pvcreate", "-q", dev)
    tools("vgcreate", "-q", "ring", dev)
    tools("lvcreate", "-q", "-an", "-Zn", "-L", "8M", "-n", "root", "ring")
    # About 50 KB of text, rewritten until a copy runs past the end of the ~1 MiB area.
    tags = [f"--addtag=t{i}-{'x' * 100}" for i in range(450)]
    tools("vgchange", "-q", *tags, "ring")
    area = struct.unpack_from("<Q", bytes_at(path, 4096, 512), 32)[0]
    for n in range(80):
        tools("vgchange", "-q", f"--{'add' if n % 2 == 0 else 'del'}tag=flip", "ring")
        offset, length = locn(path)
        if offset + length > area:
            break
    else:
        pytest.fail("the metadata never wrapped")
    expected = tools.segments("ring")
    names = pv_names(tools, "ring")
    tools.detach()
    (vg,) = read(path)
    assert ours(vg, names) == expected and vg.seqno == n + 4
    flip(path, 4096 + 512 + (offset + length - area - 1) // 2)  # in the part that wrapped
    assert refused(path) == f"{path}: LVM metadata text has a wrong checksum: corrupt"


def test_parse_metadata() -> None:
    text = '# c\nvg {\n a = "x\\"y\n#" # note\n b = [ "p", 1, -2 ]\n c = []\n s { n = 3 }\n}\nv = 1\n'
    assert lvm.parse_metadata(text) == {
        "vg": {"a": 'x"y\n#', "b": ["p", 1, -2], "c": [], "s": {"n": 3}},
        "v": 1,
    }
    for bad, what in [
        ("a = [" + "1, " * 300_000 + "]", "too many values on line 1"),
        ("a { " * 9, "nested too deep on line 1"),
        ("a = [1, 2", "expected a value on line 1"),
        ("a = 1 }", "expected 'name =' or 'name {' on line 1"),
        ('a = "open', "unexpected '\"' on line 1"),
        ("a {\n", "missing '}' on line 2"),
    ]:
        with pytest.raises(SourceError) as e:
            lvm.parse_metadata(bad)
        assert str(e.value) == f"LVM metadata: cannot parse the metadata text: {what}"


# --- acquire: the root found in a volume group and copied out by its segments ------------------


BOOT_UUID = "2b1f5d0c-3b1a-4a53-9d0e-6f6b0f2b7c11"


def _installer_disk(tools: Lvm, tmp_path: Path) -> tuple[Path, lvm.LogicalVolume]:
    """Debian's "use the entire disk and set up LVM": /boot on p1, root and swap in debian-vg on
    p5, the root ext4 made by mke2fs at the volume's offset, fstab as the installer writes it."""
    script = "label: dos\nstart=2048, size=65536, type=83\nstart=67584, type=5\nstart=69632, type=8e\n"
    path = disk(tmp_path / "installed.img", 512 * MIB, script)
    p5 = 69632 * 512
    dev = tools.attach(path, p5, 512 * MIB - p5, name="p5")
    tools("pvcreate", "-q", dev)
    tools("vgcreate", "-q", "debian-vg", dev)
    tools("lvcreate", "-q", "-an", "-Zn", "-L", "16M", "-n", "swap_1", "debian-vg")
    tools("lvcreate", "-q", "-an", "-Zn", "-L", "200M", "-n", "root", "debian-vg")
    tools.detach()
    (vg,) = read(path)
    root = next(lv for lv in vg.lvs if lv.name == "root")
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "fstab").write_text(
        "/dev/mapper/debian--vg-root / ext4 errors=remount-ro 0 1\n"
        f"UUID={BOOT_UUID} /boot ext2 defaults 0 2\n"
        "/dev/mapper/debian--vg-swap_1 none swap sw 0 0\n"
    )
    (tree / "home" / "debian").mkdir(parents=True)
    (tree / "home" / "debian" / "data").write_bytes(secrets.token_bytes(MIB))
    offset = root.segments[0].disk_offset
    sh(
        "mke2fs",
        "-q",
        "-F",
        "-t",
        "ext4",
        "-L",
        "root",
        "-d",
        str(tree),
        "-E",
        f"offset={offset}",
        str(path),
        "200M",
    )
    boot = tmp_path / "boot-tree"
    (boot / "grub").mkdir(parents=True)
    (boot / "vmlinuz-6.1.0-9-amd64").write_bytes(b"kernel")
    (boot / "initrd.img-6.1.0-9-amd64").write_bytes(b"initrd")
    sh("mke2fs", "-q", "-F", "-t", "ext2", "-U", BOOT_UUID, "-d", str(boot), "-E", f"offset={2048 * 512}",
       str(path), "32M")  # fmt: skip
    return path, root


def test_acquire_finds_the_root_volume_and_copies_it_out(tools: Lvm, tmp_path: Path) -> None:
    from imaging.clouds import acquire
    from imaging.workspace import Workspace

    path, root = _installer_disk(tools, tmp_path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    src = acquire.inspect(str(path))
    assert (src.layout, src.fs_type) == ("lvm", "ext4")
    ws = Workspace.open(tmp_path / "run")
    instance = acquire.acquire(src, ws, hash_source=False)
    assert (instance.volume, instance.fs_type, instance.label) == ("debian-vg/root", "ext4", "root")
    assert instance.source_layout == "lvm" and instance.partition is None
    table = acquire.volume_table(instance)
    assert (
        sorted(table.column("volume")) == ["root", "swap_1"]
        and table.column("volume group") == ["debian-vg"] * 2
    )
    offset = root.segments[0].disk_offset
    assert instance.uuid == images.probe(path, offset, root.size_bytes).uuid
    sh("e2fsck", "-fn", str(ws.instance))
    # The separate /boot is merged into the root where fstab mounts it: the kernel is there now.
    assert [m.split(" (")[0] for m in instance.merged] == ["/boot: partition 1"]
    boot = sh("debugfs", "-R", "ls -p /boot", str(ws.instance))
    assert "vmlinuz-6.1.0-9-amd64" in boot and "initrd.img-6.1.0-9-amd64" in boot
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert str(tmp_path) not in sh("losetup", "-a")


def test_a_root_only_on_a_thin_volume_is_refused_in_one_line(tools: Lvm, tmp_path: Path) -> None:
    from imaging.clouds import acquire

    path = disk(tmp_path / "thin.img", 64 * MIB, "label: dos\nstart=2048, type=8e\n")
    dev = tools.attach(path, 2048 * 512, 64 * MIB - 2048 * 512, name="p1")
    tools("pvcreate", "-q", dev)
    tools("vgcreate", "-q", "rhel", dev)
    tools("lvcreate", "-q", "-an", "-Zn", "-L", "4M", "-n", "swap", "rhel")
    thin = _lv("root", True, "start_extent = 0", "extent_count = 8", 'type = "thin"', 'thin_pool = "pool00"',
               "transaction_id = 0", "device_id = 1")  # fmt: skip
    _restore_with(tools, "rhel", tmp_path, _thin_pool("pool00", 4, 2) + thin)
    tools.detach()
    with pytest.raises(SourceError) as e:
        acquire.inspect(str(path))
    message = str(e.value)
    assert "\n" not in message and "logical volume rhel/" in message and "thin" in message
    assert "only linear volumes can be read without activating them" in message
