"""The OVF descriptor and the OVA's tar: structure, escaping, determinism, manifest."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from imaging import config
from imaging.config import OvfVersion
from imaging.formats import ova

OVF1 = "{http://schemas.dmtf.org/ovf/envelope/1}"
RASD = "{http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData}"
DISK = ova.OvfDisk("demo-disk1.vmdk", 123_456, 1 << 30, 64 << 20)


def descriptor(version: OvfVersion = OvfVersion.v1, target: str = "virtualbox") -> bytes:
    return ova.build_ovf("demo", config.load_target(target), DISK, version)


def test_descriptor_carries_the_appliance() -> None:
    xml = descriptor()
    root = ova.check_ovf(xml, {"demo-disk1.vmdk": 123_456}, "demo")
    assert xml.startswith(b"<?xml") and b'ovf:version="1.0"' in xml
    (file,) = root.iter(f"{OVF1}File")
    assert file.get(f"{OVF1}href") == "demo-disk1.vmdk" and file.get(f"{OVF1}size") == "123456"
    (disk,) = root.iter(f"{OVF1}Disk")
    assert disk.get(f"{OVF1}capacity") == str(1 << 30) and disk.get(f"{OVF1}populatedSize") == str(64 << 20)
    assert disk.get(f"{OVF1}format").endswith("vmdk.html#streamOptimized")
    (system,) = root.iter(f"{OVF1}VirtualSystem")
    assert system.get(f"{OVF1}id") == "demo" and system.find(f"{OVF1}Name").text == "demo"
    (os_section,) = root.iter(f"{OVF1}OperatingSystemSection")
    assert os_section.get(f"{OVF1}id") == "100"
    assert os_section.find("{http://www.virtualbox.org/ovf/machine}OSType").text == "Linux26_64"
    items = {
        i.find(f"{RASD}InstanceID").text: {c.tag.removeprefix(RASD): c.text for c in i}
        for i in root.iter(f"{OVF1}Item")
    }
    by_type = {v["ResourceType"]: v for v in items.values()}
    assert by_type["3"]["VirtualQuantity"] == "1"
    assert (by_type["4"]["VirtualQuantity"], by_type["4"]["AllocationUnits"]) == ("512", "MegaBytes")
    sata = by_type["20"]
    assert (sata["ResourceSubType"], sata["Caption"]) == ("AHCI", "sataController0")
    nic = by_type["10"]
    assert (nic["ResourceSubType"], nic["Connection"]) == ("E1000", "NAT")
    hdd = by_type["17"]
    assert hdd["Parent"] == sata["InstanceID"] and hdd["AddressOnParent"] == "0"
    assert hdd["HostResource"] == "ovf:/disk/vmdisk1"


def test_ovf_2_uses_its_namespace() -> None:
    xml = descriptor(OvfVersion.v2)
    root = ova.check_ovf(xml, {"demo-disk1.vmdk": 123_456}, "demo")
    assert root.tag == "{http://schemas.dmtf.org/ovf/envelope/2}Envelope"


DRIVERS = "storage_modules: [ahci]\ninitrd_modules: [ahci]\nnic_module: e1000\n"


def test_target_facts_reach_the_descriptor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "targets").mkdir()
    (tmp_path / "targets" / "big.yaml").write_text(
        "name: big\ndescription: 'x & <y>'\ndisk_controller: ahci\nnic: e1000\nmemory_mib: 2048\ncpus: 4\n"
        f"{DRIVERS}"
        "ovf: {os_id: 96, os_description: 'Debian <64> & co', vbox_os_type: Debian_64}\nformats: [ova]\n"
    )
    monkeypatch.setenv("IMAGING_PARAMETERS", str(tmp_path))
    config.load_target.cache_clear()
    try:
        xml = ova.build_ovf("demo", config.load_target("big"), DISK)
    finally:
        config.load_target.cache_clear()
    root = ova.check_ovf(xml, {"demo-disk1.vmdk": 123_456})
    assert b"Debian &lt;64&gt; &amp; co" in xml  # escaped by ElementTree, never pasted
    assert root.find(f".//{OVF1}OperatingSystemSection").get(f"{OVF1}id") == "96"
    assert b"<rasd:VirtualQuantity>2048</rasd:VirtualQuantity>" in xml and b"4 virtual CPUs" in xml


def test_bad_ovf_facts_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "targets").mkdir()
    (tmp_path / "targets" / "odd.yaml").write_text(
        f"name: odd\ndescription: x\ndisk_controller: ahci\nnic: e1000\n{DRIVERS}ovf: {{vbox_os_type: 'a b'}}\n"
    )
    monkeypatch.setenv("IMAGING_PARAMETERS", str(tmp_path))
    config.load_target.cache_clear()
    try:
        with pytest.raises(config.ParameterError, match="ovf.vbox_os_type"):
            config.load_target("odd")
    finally:
        config.load_target.cache_clear()


def _edit(xml: bytes, old: bytes, new: bytes) -> bytes:
    assert old in xml
    return xml.replace(old, new, 1)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (b'ovf:size="123456"', b'ovf:size="9"', "is 123456 bytes, the descriptor says 9"),
        (b'ovf:href="demo-disk1.vmdk"', b'ovf:href="other.vmdk"', "not in the package"),
        (b"<rasd:HostResource>ovf:/disk/vmdisk1", b"<rasd:HostResource>ovf:/disk/nope", "unknown disk"),
        (b"<rasd:Parent>3</rasd:Parent>", b"<rasd:Parent>9</rasd:Parent>", "unknown parent"),
        (
            b"<rasd:Connection>NAT</rasd:Connection>",
            b"<rasd:Connection>LAN</rasd:Connection>",
            "unknown network",
        ),
        (b"<rasd:Caption>disk1</rasd:Caption>", b"<rasd:Zzz>disk1</rasd:Zzz>", "out of schema order"),
        (b"<Envelope ", b"<Envelopes ", "not well-formed"),
    ],
)
def test_structure_check_catches(old: bytes, new: bytes, message: str) -> None:
    with pytest.raises(ova.OvaError, match=message):
        ova.check_ovf(_edit(descriptor(), old, new), {"demo-disk1.vmdk": 123_456})


VBOX = "{http://www.virtualbox.org/ovf/machine}"
VMW = "{http://www.vmware.com/schema/ovf}"


def uefi_descriptor(seed: str = "disk") -> bytes:
    return ova.build_ovf("demo", config.load_target("virtualbox"), DISK, firmware="uefi", seed=seed)


def test_a_uefi_disk_names_efi_to_vmware_and_virtualbox() -> None:
    xml = uefi_descriptor()
    root = ova.check_ovf(xml, {"demo-disk1.vmdk": 123_456}, "demo")
    (system,) = root.iter(f"{OVF1}VirtualSystem")
    (hardware,) = system.iter(f"{OVF1}VirtualHardwareSection")
    # VMware's (and virt-v2v's) key, after the items; VirtualBox's machine, last of the system.
    assert hardware[-1].tag == f"{VMW}Config" and hardware[-2].tag == f"{OVF1}Item"
    assert {k.removeprefix(VMW).removeprefix(OVF1): v for k, v in hardware[-1].attrib.items()} == {
        "required": "false", "key": "firmware", "value": "efi"}  # fmt: skip
    machine = system[-1]
    assert machine.tag == f"{VBOX}Machine" and machine.get(f"{OVF1}required") == "false"
    assert (machine.get("version"), machine.get("name"), machine.get("OSType")) == ("1.16-linux", "demo",
                                                                                   "Linux26_64")  # fmt: skip
    assert machine.find(f"{OVF1}Hardware/{OVF1}Firmware").get("type") == "EFI"
    assert machine.find(f"{OVF1}Hardware/{OVF1}Memory").get("RAMSize") == "512"
    assert machine.find(f"{OVF1}Hardware/{OVF1}CPU").get("count") == "1"
    adapter = machine.find(f"{OVF1}Hardware/{OVF1}Network/{OVF1}Adapter")
    assert (adapter.get("type"), adapter[0].tag) == ("82540EM", f"{OVF1}NAT")  # e1000 on NAT
    sata = machine.find(f"{OVF1}StorageControllers/{OVF1}StorageController")
    assert (sata.get("type"), sata[0].get("port"), sata[0].get("type")) == ("AHCI", "0", "HardDisk")
    # The machine's disk is the package's: VirtualBox matches the ids, without and with braces.
    (disk,) = root.iter(f"{OVF1}Disk")
    assert sata[0][0].get("uuid") == "{" + disk.get(f"{VBOX}uuid") + "}"
    assert uefi_descriptor() == xml and uefi_descriptor("other disk") != xml  # ids from the disk
    assert len(uefi_descriptor("other disk")) == len(xml)  # and always as long (ova.layout)


def test_a_hybrid_or_bios_disk_keeps_the_descriptor_bios_boots() -> None:
    target = config.load_target("virtualbox")
    plain = ova.build_ovf("demo", target, DISK)
    assert b"vbox:Machine" not in plain and b"vmw:Config" not in plain and b"vbox:uuid" not in plain
    for firmware in ("bios", "hybrid"):
        assert ova.build_ovf("demo", target, DISK, firmware=firmware, seed="disk") == plain


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (b'<Image uuid="{', b'<Image uuid="{0', "vbox:Machine attaches disk {0"),
        (b"<ovf:Info>Complete VirtualBox machine configuration in VirtualBox format</ovf:Info>", b"",
         "vbox:Machine must start with ovf:Info"),
        (b'<vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi" />\n',
         b'<vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi" /><Item><rasd:InstanceID>9'
         b"</rasd:InstanceID><rasd:ResourceType>1</rasd:ResourceType></Item>\n",
         "VirtualHardwareSection: Item after Config, another namespace's element"),
    ],
)  # fmt: skip
def test_structure_check_catches_in_a_uefi_descriptor(old: bytes, new: bytes, message: str) -> None:
    with pytest.raises(ova.OvaError, match=re.escape(message)):
        ova.check_ovf(_edit(uefi_descriptor(), old, new), {"demo-disk1.vmdk": 123_456})


def test_manifest_lines() -> None:
    assert (
        ova.manifest(OvfVersion.v1, {"a.ovf": "ab", "a.vmdk": "cd"})
        == b"SHA1(a.ovf)= ab\nSHA1(a.vmdk)= cd\n"
    )
    assert ova.manifest(OvfVersion.v2, {"a.ovf": "ab"}) == b"SHA256(a.ovf)= ab\n"


@pytest.fixture
def fake_vmdk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.vmdk"
    path.write_bytes(b"KDMV" + bytes(5000))
    return path


@pytest.mark.parametrize("version", [OvfVersion.v1, OvfVersion.v2])
def test_tar_order_determinism_and_manifest(tmp_path: Path, fake_vmdk: Path, version: OvfVersion) -> None:
    target = config.load_target("kvm")
    a, b = tmp_path / "a.ova", tmp_path / "b.ova"
    ra = ova.write_ova(a, "demo", target, fake_vmdk, 4096, 1 << 20, version)
    ova.write_ova(b, "demo", target, fake_vmdk, 4096, 1 << 20, version)
    assert a.read_bytes() == b.read_bytes()
    assert ra.members == ("demo.ovf", "demo-disk1.vmdk", "demo.mf")
    assert a.stat().st_size % tarfile.RECORDSIZE == 0
    with tarfile.open(a) as tar:
        infos = tar.getmembers()
        assert [i.name for i in infos] == ["demo.ovf", "demo-disk1.vmdk", "demo.mf"]
        for info in infos:
            assert (info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode) == (
                1_700_000_000, 0, 0, "root", "root", 0o644)  # fmt: skip
            assert info.isreg()
        assert tar.extractfile("demo-disk1.vmdk").read() == fake_vmdk.read_bytes()  # type: ignore[union-attr]
    digests = ova.check_ova(a, "demo")
    algorithm = "sha1" if version is OvfVersion.v1 else "sha256"
    assert digests["demo-disk1.vmdk"] == hashlib.new(algorithm, fake_vmdk.read_bytes()).hexdigest()
    assert ova.is_ova(a) and not ova.is_ova(fake_vmdk)
    out = ova.extract_disk(a, tmp_path / "x")
    assert out.name == "demo-disk1.vmdk" and out.read_bytes() == fake_vmdk.read_bytes()


def test_the_descriptor_laid_out_before_the_disk_holds_any_sizes(tmp_path: Path) -> None:
    # The disk goes to its place in the tar before the descriptor (which names its sizes) is
    # written: the room laid out must hold the descriptor whatever the sizes turn out to be.
    target = config.load_target("kvm")
    at = ova.layout("demo", target, 1 << 40)
    assert at.disk_at % tarfile.BLOCKSIZE == 0
    path = tmp_path / "a.ova"
    with open(path, "wb") as f:
        f.seek(at.disk_at)
        f.write(b"KDMV")
    ova.seal_ova(path, at, "demo", target, 4, 10**20 - 1, 1 << 40, OvfVersion.v1, "ab")
    descriptor, disk, _ = ova.members(path)
    assert (descriptor.size, disk.offset, disk.size) == (at.descriptor_size, at.disk_at, 4)
    text = b"".join(ova.iter_member(path, descriptor))
    assert text.rstrip(b" ").endswith(b"</Envelope>\n")
    ova.check_ovf(text, {"demo-disk1.vmdk": 4}, "demo")
    with pytest.raises(ova.OvaError, match="does not fit"):
        ova.seal_ova(path, ova.Layout(100, at.disk_at), "demo", target, 4, 4, 1 << 40, OvfVersion.v1, "ab")
    # A UEFI disk's descriptor is longer (VirtualBox's machine): laid out for, ids and all.
    efi = ova.layout("demo", target, 1 << 40, OvfVersion.v1, "uefi")
    with open(path, "wb") as f:
        f.seek(efi.disk_at)
        f.write(b"KDMV")
    sealed = ova.seal_ova(path, efi, "demo", target, 4, 10**20 - 1, 1 << 40, OvfVersion.v1, "ab", firmware="uefi",
                          seed="any disk")  # fmt: skip
    assert efi.descriptor_size > at.descriptor_size and sealed.firmware == "efi"
    descriptor, disk, _ = ova.members(path)
    assert (descriptor.size, disk.offset) == (efi.descriptor_size, efi.disk_at)
    ova.check_ovf(b"".join(ova.iter_member(path, descriptor)), {"demo-disk1.vmdk": 4}, "demo")


def test_tampered_disk_fails_the_manifest(tmp_path: Path, fake_vmdk: Path) -> None:
    path = tmp_path / "a.ova"
    ova.write_ova(path, "demo", config.load_target("kvm"), fake_vmdk, 4096, 1 << 20)
    (disk,) = [m for m in ova.members(path) if m.name.endswith(".vmdk")]
    with open(path, "r+b") as f:
        f.seek(disk.offset + 100)
        f.write(b"!")
    with pytest.raises(ova.OvaError, match="does not match its manifest digest"):
        ova.check_ova(path)


def test_descriptor_parses_as_plain_xml() -> None:
    # What an importer without namespace support sees: the conventional element names.
    root = ET.fromstring(descriptor())
    assert [c.tag.split("}")[1] for c in root] == [
        "References",
        "DiskSection",
        "NetworkSection",
        "VirtualSystem",
    ]


def test_member_sizes_past_ustar_go_in_base_256() -> None:
    # ustar's size field holds 11 octal digits (8 GiB - 1); past that the GNU header, never PAX.
    small, big = (
        ova.tar_header("a.vmdk", ova.USTAR_MAX_SIZE),
        ova.tar_header("a.vmdk", ova.USTAR_MAX_SIZE + 1),
    )
    assert small[257:265] == b"ustar\x0000" and small[124:136] == b"77777777777\0"
    assert big[257:265] == b"ustar  \0" and big[124:136] == b"\x80" + (8**11).to_bytes(11, "big")
    assert len(small) == len(big) == tarfile.BLOCKSIZE
    for header, size in ((small, ova.USTAR_MAX_SIZE), (big, ova.USTAR_MAX_SIZE + 1)):
        info = tarfile.TarInfo.frombuf(header, "utf-8", "strict")
        assert (info.name, info.size, info.type) == ("a.vmdk", size, tarfile.REGTYPE)
    with pytest.raises(ova.OvaError, match="does not fit"):
        ova.tar_header("x" * 101, 1)


def test_an_ova_whose_disk_is_over_8_gib(tmp_path: Path) -> None:
    # The tar around a 9 GiB disk, the disk itself left sparse: what readers we did not write
    # make of the headers (the whole conversion of such a disk: tests/integration/test_big_ova.py).
    target = config.load_target("virtualbox")
    size = (9 << 30) + 1234
    at = ova.layout("big", target, 10 << 30)
    path, again = tmp_path / "big.ova", tmp_path / "again.ova"
    for each in (path, again):
        with open(each, "wb") as f:
            f.seek(at.disk_at)
            f.write(b"KDMV")
            f.truncate(at.disk_at + size)
        ova.seal_ova(each, at, "big", target, size, size, 10 << 30, OvfVersion.v1, "ab")
    with open(path, "rb") as a, open(again, "rb") as b:  # the same disk, the same bytes around it
        for offset, length in ((0, at.disk_at), (at.disk_at + size - 512, 16 << 10)):
            assert os.pread(a.fileno(), length, offset) == os.pread(b.fileno(), length, offset)
    with open(path, "rb") as f:
        first, disk_header = f.read(512), os.pread(f.fileno(), 512, at.disk_at - 512)
    assert first[257:265] == b"ustar\x0000" and ova.is_ova(path)  # the descriptor's header: ustar
    assert disk_header[257:265] == b"ustar  \0" and disk_header[124] == 0x80
    assert path.stat().st_size % tarfile.RECORDSIZE == 0
    found = {m.name: m.size for m in ova.members(path)}  # Python's tarfile
    assert list(found) == ["big.ovf", "big-disk1.vmdk", "big.mf"] and found["big-disk1.vmdk"] == size
    listing = subprocess.run(["tar", "-tvf", path], capture_output=True, text=True, check=True)  # GNU tar
    assert [line.split()[2] for line in listing.stdout.splitlines()] == [str(v) for v in found.values()]
    assert listing.stderr == ""
    ovf = b"".join(ova.iter_member(path, ova.members(path)[0]))
    ova.check_ovf(ovf, {"big-disk1.vmdk": size}, "big")
    assert f'ovf:size="{size}"'.encode() in ovf
