"""The fixed VHD Azure takes, and our reader of VHD footers."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from imaging.boot import verify
from imaging.formats import identity, vhd

SIZE = 67_000_000  # not a whole number of MiB


def _disk(path: Path) -> Path:
    """A raw disk with data at its start and in its last sector, holes between."""
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.write(os.urandom(1 << 20))
        f.seek(SIZE - 512)
        f.write(os.urandom(512))
    return path


def test_a_fixed_vhd_is_the_disk_rounded_to_a_mib_plus_a_footer_and_stays_sparse(tmp_path: Path) -> None:
    raw = _disk(tmp_path / "disk.raw")
    out = tmp_path / "a.vhd"
    done = vhd.write_fixed(raw, "raw", SIZE, out, identity.fingerprint(raw), desc="vhd")
    footer = vhd.check_fixed(out)
    assert (footer.disk_type, footer.kind, footer.checksum_ok, footer.mib_aligned) == (
        2,
        "fixed",
        True,
        True,
    )
    assert footer.current_size == 64 << 20 == done["capacity"] and out.stat().st_size == (64 << 20) + 512
    assert out.stat().st_blocks * 512 < 2 << 20  # the padding and the holes cost nothing
    # qemu-img probes a fixed VHD as raw; told its format, it reads the disk exactly.
    assert '"format": "raw"' in subprocess.run(["qemu-img", "info", "--output=json", out], capture_output=True,
                                               text=True, check=True).stdout  # fmt: skip
    compare = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "vpc", raw, out], capture_output=True, text=True
    )
    assert compare.returncode == 0 and "Images are identical" in compare.stdout
    assert verify.disk_format(out) == "vpc" and verify.disk_format(raw) == "raw"
    # The same disk, the same bytes.
    again = tmp_path / "b.vhd"
    vhd.write_fixed(raw, "raw", SIZE, again, identity.fingerprint(raw), desc="vhd")
    assert out.read_bytes() == again.read_bytes()


def test_our_footer_is_the_one_qemu_img_writes_for_azure(tmp_path: Path) -> None:
    """Microsoft's guide makes Azure's VHD with qemu-img (fixed, force_size): same footer, byte
    for byte, once qemu-img's random UUID and time are given the derived ones."""
    padded = tmp_path / "padded.raw"
    with open(padded, "wb") as f:
        f.truncate(64 << 20)
    theirs = tmp_path / "qemu.vhd"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed,force_size=on",
                    padded, theirs], check=True)  # fmt: skip
    identity.stamp(theirs, "vpc", "seed", theirs.name)
    ours = vhd.footer(64 << 20, identity.derived_uuid("seed", "vhd"))
    assert theirs.read_bytes()[-512:] == ours


def test_the_reader_tells_fixed_from_dynamic_and_refuses_what_azure_would(tmp_path: Path) -> None:
    dynamic = tmp_path / "d.vhd"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vpc", dynamic, "64M"], check=True)
    found = vhd.read_footer(dynamic)
    assert found is not None and (found.disk_type, found.kind, found.checksum_ok) == (3, "dynamic", True)
    with pytest.raises(vhd.VhdError, match=r"d.vhd: disk type 3 \(dynamic\), not 2 \(fixed\)"):
        vhd.check_fixed(dynamic)
    odd = tmp_path / "odd.vhd"
    with open(odd, "wb") as f:
        f.truncate(1000 * 1024)
        f.seek(1000 * 1024)
        f.write(vhd.footer(1000 * 1024 - 512, identity.derived_uuid("x", "vhd")))
    with pytest.raises(
        vhd.VhdError, match=r"size 1023488 is not a whole number of MiB; file is 1024512 bytes"
    ):
        vhd.check_fixed(odd)
    bad = bytearray(vhd.footer(1 << 20, identity.derived_uuid("x", "vhd")))
    bad[100] ^= 1
    assert vhd.parse_footer(bytes(bad)) is not None and not vhd.parse_footer(bytes(bad)).checksum_ok  # type: ignore[union-attr]
    assert vhd.read_footer(_disk(tmp_path / "plain.raw")) is None
    tiny = tmp_path / "tiny"
    tiny.write_bytes(b"conectix")
    assert vhd.read_footer(tiny) is None
