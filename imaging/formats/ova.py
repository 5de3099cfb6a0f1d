"""OVA: a tar of the OVF descriptor, the streamOptimized disk and the manifest, in that order.

The descriptor is built with ElementTree (names from a request are escaped by it, never pasted
into a template) and follows what VirtualBox writes and VMware imports: OVF 1.0 with a SHA1
manifest by default, OVF 2.0 with SHA256 on request. Its virtual hardware is the appliance the
original procedure made: the target's CPUs, memory and guest OS type, a SATA AHCI controller
with the disk on port 0, an Intel PRO/1000 (e1000) NIC on NAT.

A disk that boots UEFI only (30-bootable's ``firmware: uefi``) gets a descriptor that says so to
both importers, as each writes it in its own exports: VMware's ``<vmw:Config vmw:key="firmware"
vmw:value="efi"/>`` at the end of the VirtualHardwareSection (virt-v2v reads the same), and
VirtualBox's machine settings (``vbox:Machine``, the last element of the VirtualSystem) with
``<Firmware type="EFI"/>``. VirtualBox, finding a ``vbox:Machine``, builds the VM from it rather
than from the hardware items, and attaches each disk its storage controllers name by the
``vbox:uuid`` of the DiskSection's Disk: so the settings carry the whole machine (CPUs, memory,
the NIC, the SATA controller with the disk). A hybrid or BIOS disk keeps the descriptor without
either: BIOS, both importers' default, boots it.

The DMTF's OVF and CIM schemas carry a "may reproduce with attribution" notice and an
indemnification clause, not a licence we can ship them under (and they cannot be fetched on
these machines), so :func:`check_ovf` checks the structure the schemas require instead: element
order, references between files, disks and hardware items, sizes.

The tar is ustar with fixed mtimes, owners and modes: the same disk gives the same OVA. The
disk is written in place (:func:`layout`, :func:`seal_ova`), never copied into the tar. ustar's
size field holds 11 octal digits, 8 GiB - 1 at most: a bigger member (the disk of a real
appliance) gets a GNU header, whose size field is base-256 (:func:`tar_header`). Never a PAX
extended header: VirtualBox refuses those. GNU tar, Python's tarfile and VirtualBox's own
reader (IPRT, whose writer uses base-256 sizes too) read base-256 sizes.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from imaging.config import Firmware, OvfVersion, Target
from imaging.errors import ImagingError
from imaging.formats.identity import FIXED_TIME, derived_uuid
from imaging.records import Record
from imaging.sparse import atomic_path

ENVELOPE = {OvfVersion.v1: "http://schemas.dmtf.org/ovf/envelope/1", OvfVersion.v2: "http://schemas.dmtf.org/ovf/envelope/2"}  # fmt: skip
CIM = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2"
RASD = f"{CIM}/CIM_ResourceAllocationSettingData"
VSSD = f"{CIM}/CIM_VirtualSystemSettingData"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
VBOX = "http://www.virtualbox.org/ovf/machine"
VMW = "http://www.vmware.com/schema/ovf"
STREAM_OPTIMIZED = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
DIGEST = {OvfVersion.v1: "SHA1", OvfVersion.v2: "SHA256"}
NETWORK = "NAT"
# The settings version of the vbox:Machine: 1.16 (VirtualBox 5.2) already had everything written
# here, and every VirtualBox since reads it (one that finds none assumes 1.15).
VBOX_SETTINGS = "1.16-linux"

# CIM resource types of the hardware items.
CPU, MEMORY, ETHERNET, DISK, OTHER_STORAGE = 3, 4, 10, 17, 20

_COPY = 4 << 20


class OvaError(ImagingError):
    """An OVA or its descriptor is not what it must be."""


def member_names(name: str) -> tuple[str, str, str]:
    """(descriptor, disk, manifest) member names for an appliance called ``name``."""
    return f"{name}.ovf", f"{name}-disk1.vmdk", f"{name}.mf"


@dataclass(frozen=True)
class OvfDisk:
    file: str
    file_size: int
    capacity: int  # bytes the guest sees
    populated: int  # bytes of data stored in the disk


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrib: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrib)
    if text is not None:
        element.text = text
    return element


def _item(parent: ET.Element, **fields: str) -> ET.Element:
    # CIM_ResourceAllocationSettingData is an xs:sequence in alphabetical order.
    item = _sub(parent, "Item")
    for key in sorted(fields):
        _sub(item, f"rasd:{key}", fields[key])
    return item


def build_ovf(name: str, target: Target, disk: OvfDisk, version: OvfVersion = OvfVersion.v1, *,
              firmware: Firmware | str = Firmware.bios, seed: str = "") -> bytes:  # fmt: skip
    """The OVF descriptor of a one-disk appliance called ``name`` for ``target``; a ``firmware``
    of uefi adds what VMware and VirtualBox need to boot it with EFI (VirtualBox's machine and
    disk ids derived from ``seed``, the disk's fingerprint).

    Written the way VirtualBox and VMware write theirs: elements in the default (envelope)
    namespace, attributes with the ``ovf:`` prefix. ElementTree cannot emit that from
    namespaced names, so the tree is built from prefixed names with the namespaces declared on
    the root; ElementTree still escapes every text and attribute value. :func:`check_ovf` parses
    the result with the namespaces resolved.
    """
    envelope = ET.Element("Envelope", {
        "ovf:version": version.value, "xml:lang": "en-US", "xmlns": ENVELOPE[version],
        "xmlns:ovf": ENVELOPE[version], "xmlns:rasd": RASD, "xmlns:vssd": VSSD, "xmlns:xsi": XSI,
        "xmlns:vbox": VBOX, "xmlns:vmw": VMW,
    })  # fmt: skip
    refs = _sub(envelope, "References")
    _sub(refs, "File", **{"ovf:href": disk.file, "ovf:id": "file1", "ovf:size": str(disk.file_size)})
    efi = Firmware(firmware) is Firmware.uefi
    machine_id, disk_id = derived_uuid(seed, "ova machine"), derived_uuid(seed, "ova disk")
    disks = _sub(envelope, "DiskSection")
    _sub(disks, "Info", "List of the virtual disks used in the package")
    _sub(disks, "Disk", **{
        "ovf:capacity": str(disk.capacity), "ovf:diskId": "vmdisk1", "ovf:fileRef": "file1",
        "ovf:format": STREAM_OPTIMIZED, "ovf:populatedSize": str(disk.populated),
        # VirtualBox's id of the disk, which its vbox:Machine attaches (as VirtualBox writes it:
        # no braces, where the machine's Image has them).
        **({"vbox:uuid": str(disk_id)} if efi else {}),
    })  # fmt: skip
    networks = _sub(envelope, "NetworkSection")
    _sub(networks, "Info", "Logical networks used in the package")
    net = _sub(networks, "Network", **{"ovf:name": NETWORK})
    _sub(net, "Description", "Logical network used by this appliance.")

    system = _sub(envelope, "VirtualSystem", **{"ovf:id": name})
    _sub(system, "Info", "A virtual machine")
    _sub(system, "Name", name)
    facts = target.ovf
    os_section = _sub(system, "OperatingSystemSection", **{"ovf:id": str(facts.os_id), "vmw:osType": facts.vmware_os_type})  # fmt: skip
    _sub(os_section, "Info", "The kind of installed guest operating system")
    _sub(os_section, "Description", facts.os_description)
    _sub(os_section, "vbox:OSType", facts.vbox_os_type, **{"ovf:required": "false"})

    hardware = _sub(system, "VirtualHardwareSection")
    _sub(hardware, "Info", "Virtual hardware requirements for a virtual machine")
    system_el = _sub(hardware, "System")
    for key, value in (("ElementName", "Virtual Hardware Family"), ("InstanceID", "0"),
                       ("VirtualSystemIdentifier", name), ("VirtualSystemType", facts.system_type)):  # fmt: skip
        _sub(system_el, f"vssd:{key}", value)
    cpus = f"{target.cpus} virtual CPU" + ("s" if target.cpus > 1 else "")
    _item(hardware, Caption=cpus, Description="Number of virtual CPUs", ElementName=cpus, InstanceID="1",
          ResourceType=str(CPU), VirtualQuantity=str(target.cpus))  # fmt: skip
    memory = f"{target.memory_mib} MB of memory"
    _item(hardware, AllocationUnits="MegaBytes", Caption=memory, Description="Memory Size", ElementName=memory,
          InstanceID="2", ResourceType=str(MEMORY), VirtualQuantity=str(target.memory_mib))  # fmt: skip
    # VirtualBox recognises a SATA controller by this caption and subtype.
    _item(hardware, Address="0", Caption="sataController0", Description="SATA Controller",
          ElementName="sataController0", InstanceID="3", ResourceSubType="AHCI",
          ResourceType=str(OTHER_STORAGE))  # fmt: skip
    _item(hardware, AutomaticAllocation="true", Caption=f"Ethernet adapter on '{NETWORK}'", Connection=NETWORK,
          ElementName=f"Ethernet adapter on '{NETWORK}'", InstanceID="4", ResourceSubType="E1000",
          ResourceType=str(ETHERNET))  # fmt: skip
    _item(hardware, AddressOnParent="0", Caption="disk1", Description="Disk Image", ElementName="disk1",
          HostResource="ovf:/disk/vmdisk1", InstanceID="5", Parent="3", ResourceType=str(DISK))  # fmt: skip
    if efi:
        # Another namespace's elements come after the items (xs:any ##other in the schema).
        _sub(hardware, "vmw:Config", **{"ovf:required": "false", "vmw:key": "firmware", "vmw:value": "efi"})
        _vbox_machine(system, name, target, machine_id, disk_id)
    ET.indent(envelope, "  ")
    return ET.tostring(envelope, encoding="utf-8", xml_declaration=True) + b"\n"


def _vbox_machine(
    system: ET.Element, name: str, target: Target, machine_id: uuid.UUID, disk_id: uuid.UUID
) -> None:
    """VirtualBox's settings of the appliance's machine, EFI firmware included, in the form its
    exports carry them (``ovf:required="false"``: other importers skip it; the ``ovf:Info`` first,
    or VMware's importer refuses the element). The machine is the hardware items' own: VirtualBox
    imports this machine instead of reading them."""
    machine = _sub(system, "vbox:Machine", **{
        "ovf:required": "false", "version": VBOX_SETTINGS, "uuid": f"{{{machine_id}}}", "name": name,
        "OSType": target.ovf.vbox_os_type, "snapshotFolder": "Snapshots",
    })  # fmt: skip
    _sub(machine, "ovf:Info", "Complete VirtualBox machine configuration in VirtualBox format")
    hardware = _sub(machine, "Hardware")
    cpu = _sub(hardware, "CPU", count=str(target.cpus))
    _sub(cpu, "PAE", enabled="true")
    _sub(cpu, "LongMode", enabled="true")
    _sub(hardware, "Memory", RAMSize=str(target.memory_mib))
    _sub(hardware, "Firmware", type="EFI")
    # The e1000 of the hardware items (VirtualBox's Intel PRO/1000 MT Desktop) on NAT.
    adapter = _sub(_sub(hardware, "Network"), "Adapter", slot="0", enabled="true", type="82540EM")
    _sub(adapter, "NAT")
    controllers = _sub(machine, "StorageControllers")
    sata = _sub(controllers, "StorageController", name="SATA", type="AHCI", PortCount="1",
                useHostIOCache="false", Bootable="true")  # fmt: skip
    attached = _sub(sata, "AttachedDevice", type="HardDisk", hotpluggable="false", port="0", device="0")
    _sub(attached, "Image", uuid=f"{{{disk_id}}}")


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def check_ovf(xml: bytes, files: dict[str, int], name: str | None = None) -> ET.Element:
    """Structural check of a descriptor against the files beside it (name -> size).

    Raises OvaError with the first problem: what the OVF schema and specification require of
    a one-system envelope (sections in order, unique ids, every reference resolved, sizes
    right, RASD and VSSD fields in schema order)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise OvaError(f"descriptor is not well-formed XML: {e}") from None
    ovf = root.tag[1:].split("}")[0] if root.tag.startswith("{") else ""
    if ovf not in ENVELOPE.values() or _local(root.tag) != "Envelope":
        raise OvaError(f"root element is {root.tag}, not an OVF Envelope")

    def o(tag: str) -> str:
        return f"{{{ovf}}}{tag}"

    order = [_local(c.tag) for c in root]
    if order[:1] != ["References"] or order[-1:] != ["VirtualSystem"] or order.count("VirtualSystem") != 1:
        raise OvaError(f"envelope children {order}: References first, one VirtualSystem last")
    file_ids: dict[str, str] = {}
    for f in root.findall(f"{o('References')}/{o('File')}"):
        fid, href, size = f.get(o("id")), f.get(o("href")), f.get(o("size"))
        if not fid or not href or fid in file_ids:
            raise OvaError(f"File element without a unique id and href: {f.attrib}")
        if href not in files:
            raise OvaError(f"File {fid} refers to {href}, which is not in the package")
        if size is not None and int(size) != files[href]:
            raise OvaError(f"File {href} is {files[href]} bytes, the descriptor says {size}")
        file_ids[fid] = href
    disk_ids, vbox_disks = set(), set()
    for d in root.findall(f"{o('DiskSection')}/{o('Disk')}"):
        did, ref, capacity = d.get(o("diskId")), d.get(o("fileRef")), d.get(o("capacity"))
        if not did or ref not in file_ids or not capacity or int(capacity) <= 0:
            raise OvaError(f"Disk element incomplete or referring to an unknown file: {d.attrib}")
        disk_ids.add(did)
        if d.get(f"{{{VBOX}}}uuid"):
            vbox_disks.add(d.get(f"{{{VBOX}}}uuid"))
    networks = {n.get(o("name")) for n in root.findall(f"{o('NetworkSection')}/{o('Network')}")}
    (system,) = root.iter(o("VirtualSystem"))
    if name is not None and system.get(o("id")) != name:
        raise OvaError(f"VirtualSystem id is {system.get(o('id'))!r}, not {name!r}")
    if _local(system[0].tag) != "Info":
        raise OvaError("VirtualSystem must start with Info")
    for section in system:
        if _local(section.tag).endswith("Section") and (
            not len(section) or _local(section[0].tag) != "Info"
        ):
            raise OvaError(f"{_local(section.tag)} must start with Info")
    _check_others_last(system, ovf, "VirtualSystem")
    (hardware,) = system.iter(o("VirtualHardwareSection"))
    _check_others_last(hardware, ovf, "VirtualHardwareSection")
    for system_el in hardware.iter(o("System")):
        _check_sorted(system_el, "System")
    items = {}
    for item in hardware.iter(o("Item")):
        _check_sorted(item, "Item")
        fields = {_local(c.tag): (c.text or "") for c in item}
        if "InstanceID" not in fields or "ResourceType" not in fields or fields["InstanceID"] in items:
            raise OvaError(f"hardware item without a unique InstanceID and a ResourceType: {fields}")
        items[fields["InstanceID"]] = fields
    for fields in items.values():
        if fields.get("Parent") and fields["Parent"] not in items:
            raise OvaError(f"item {fields['InstanceID']} has an unknown parent {fields['Parent']}")
        if fields["ResourceType"] == str(DISK):
            host = fields.get("HostResource", "").removeprefix("ovf:").removeprefix("/disk/")
            if host not in disk_ids:
                raise OvaError(f"disk item {fields['InstanceID']} refers to unknown disk {host!r}")
        if fields["ResourceType"] == str(ETHERNET) and fields.get("Connection") not in networks:
            raise OvaError(
                f"NIC item {fields['InstanceID']} is on unknown network {fields.get('Connection')!r}"
            )
    for machine in system.findall(f"{{{VBOX}}}Machine"):
        if not len(machine) or machine[0].tag != o("Info"):
            raise OvaError("vbox:Machine must start with ovf:Info")
        for image in (e for e in machine.iter() if _local(e.tag) == "Image"):
            if image.get("uuid", "").strip("{}") not in vbox_disks:
                raise OvaError(
                    f"vbox:Machine attaches disk {image.get('uuid')}, which no Disk's vbox:uuid names"
                )
    return root


def _check_others_last(element: ET.Element, ovf: str, what: str) -> None:
    # The OVF schema takes other namespaces' elements (vmw:Config, vbox:Machine) after its own.
    other = ""
    for child in element:
        if not child.tag.startswith(f"{{{ovf}}}"):
            other = other or _local(child.tag)
        elif other:
            raise OvaError(f"{what}: {_local(child.tag)} after {other}, another namespace's element")


def _check_sorted(element: ET.Element, what: str) -> None:
    names = [_local(c.tag) for c in element]
    if names != sorted(names):
        raise OvaError(f"{what} fields out of schema order: {names}")


def manifest(version: OvfVersion, digests: dict[str, str]) -> bytes:
    """``SHA1(file)= hex`` lines, as the OVF specification writes them."""
    algorithm = DIGEST[version]
    return "".join(f"{algorithm}({name})= {digest}\n" for name, digest in digests.items()).encode()


# The largest size ustar's 12-byte field holds: 11 octal digits and a terminator.
USTAR_MAX_SIZE = 8**11 - 1


def tar_header(name: str, size: int) -> bytes:
    """The 512-byte header of a regular file: ustar, or GNU (same layout, size in base-256)
    for a member over ustar's 8 GiB - 1. Fixed mtime, owner and mode: the same member gives the
    same bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, FIXED_TIME, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    # One 512-byte block per header is what layout() counts on: no ustar prefix split, no GNU
    # long-name record (names are at most 91 characters: config.check_name).
    if len(name.encode()) > tarfile.LENGTH_NAME:
        raise OvaError(f"member name {name!r} does not fit a tar header's 100 bytes")
    if size <= USTAR_MAX_SIZE:
        return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")
    return info.tobuf(format=tarfile.GNU_FORMAT, encoding="utf-8", errors="strict")


def _pad(n: int) -> bytes:
    return bytes(-n % tarfile.BLOCKSIZE)


@dataclass(frozen=True)
class Ova(Record):
    members: tuple[str, ...]
    manifest_digest: str
    disk_digest: str
    ovf_version: str
    firmware: str  # what the descriptor tells importers to boot it with: efi, or bios (their default)


@dataclass(frozen=True)
class Layout:
    """Where an OVA's parts go when its disk is written in place, before the descriptor (which
    names the disk's size) can be: the descriptor is padded to ``descriptor_size``."""

    descriptor_size: int
    disk_at: int  # offset of the disk's first byte in the tar


# The descriptor's only parts unknown before the disk is written: its size and populated size.
_MOST_DIGITS = 10**20 - 1  # no byte count has more digits (2**64 has 20)


def layout(name: str, target: Target, capacity: int, version: OvfVersion = OvfVersion.v1,
           firmware: Firmware | str = Firmware.bios) -> Layout:  # fmt: skip
    """The OVA's layout for a disk of ``capacity`` bytes: the descriptor's longest length (with
    both sizes at 20 digits; the ids derived from the disk are as long whatever it holds), so the
    disk's bytes can go straight to their place in the tar instead of being copied there
    afterwards (900 MB written once, not twice)."""
    disk_name = member_names(name)[1]
    most = OvfDisk(disk_name, _MOST_DIGITS, capacity, _MOST_DIGITS)
    longest = len(build_ovf(name, target, most, version, firmware=firmware))
    return Layout(longest, 2 * tarfile.BLOCKSIZE + longest + len(_pad(longest)))


def seal_ova(path: Path, at: Layout, name: str, target: Target, disk_size: int, populated: int,
             capacity: int, version: OvfVersion, disk_digest: str, *, firmware: Firmware | str = Firmware.bios,
             seed: str = "") -> Ova:  # fmt: skip
    """Complete the OVA at ``path`` around the disk already written at ``at.disk_at``: the
    descriptor (padded with trailing spaces to the layout's length; XML allows whitespace after
    the root element), the tar headers, then the manifest and the end of the archive."""
    ovf_name, disk_name, mf_name = member_names(name)
    ovf = build_ovf(name, target, OvfDisk(disk_name, disk_size, capacity, populated), version, firmware=firmware,
                    seed=seed)  # fmt: skip
    if len(ovf) > at.descriptor_size:
        raise OvaError(f"descriptor of {len(ovf)} bytes does not fit the {at.descriptor_size} laid out")
    ovf += b" " * (at.descriptor_size - len(ovf))
    check_ovf(ovf, {disk_name: disk_size}, name)
    mf = manifest(version, {ovf_name: hashlib.new(DIGEST[version].lower(), ovf).hexdigest(), disk_name: disk_digest})  # fmt: skip
    tail = _pad(disk_size) + tar_header(mf_name, len(mf)) + mf + _pad(len(mf))
    # End of archive: two zero blocks, then zeros to a whole record, as tar writes it.
    end = at.disk_at + disk_size + len(tail) + 2 * tarfile.BLOCKSIZE
    tail += bytes(2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE))
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(
            fd, tar_header(ovf_name, len(ovf)) + ovf + _pad(len(ovf)) + tar_header(disk_name, disk_size), 0
        )
        os.pwrite(fd, tail, at.disk_at + disk_size)
    finally:
        os.close(fd)
    booted = "efi" if Firmware(firmware) is Firmware.uefi else "bios"
    return Ova(
        (ovf_name, disk_name, mf_name), hashlib.sha256(mf).hexdigest(), disk_digest, version.value, booted
    )


def write_ova(out: Path, name: str, target: Target, disk: Path, populated: int, capacity: int,
              version: OvfVersion = OvfVersion.v1, *, firmware: Firmware | str = Firmware.bios,
              seed: str = "") -> Ova:  # fmt: skip
    """Pack a streamOptimized VMDK file a caller already has into the OVA ``out``."""
    at = layout(name, target, capacity, version, firmware)
    digest = hashlib.new(DIGEST[version].lower())
    with open(disk, "rb") as src, open(out, "wb") as dst:
        dst.seek(at.disk_at)
        while block := src.read(_COPY):
            dst.write(block)
            digest.update(block)
        size = src.tell()
    return seal_ova(out, at, name, target, size, populated, capacity, version, digest.hexdigest(),
                    firmware=firmware, seed=seed)  # fmt: skip


@dataclass(frozen=True)
class Member:
    name: str
    size: int
    offset: int  # of the data in the tar


def is_ova(path: Path) -> bool:
    """A tar whose first member is an OVF descriptor."""
    try:
        with open(path, "rb") as f:
            block = f.read(tarfile.BLOCKSIZE)
    except OSError:
        return False
    return block[257:262] == b"ustar" and block[:100].split(b"\0", 1)[0].endswith(b".ovf")


def members(path: Path) -> list[Member]:
    with tarfile.open(path, "r:") as tar:
        return [Member(m.name, m.size, m.offset_data) for m in tar.getmembers()]


def iter_member(path: Path, member: Member) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(member.offset)
        left = member.size
        while left:
            block = f.read(min(_COPY, left))
            if not block:
                raise OvaError(f"{path} is truncated inside {member.name}")
            left -= len(block)
            yield block


def check_ova(path: Path, name: str | None = None) -> dict[str, str]:
    """Member order, descriptor structure and manifest digests of an OVA; returns the digests."""
    found = members(path)
    names = [m.name for m in found]
    if len(found) != 3 or not names[0].endswith(".ovf") or not names[1].endswith(".vmdk") or not names[2].endswith(".mf"):  # fmt: skip
        raise OvaError(f"{path.name}: members {names}, expected the .ovf, the .vmdk, the .mf in that order")
    if any("/" in n or n.startswith(".") for n in names):
        raise OvaError(f"{path.name}: member names must be plain file names: {names}")
    ovf = b"".join(iter_member(path, found[0]))
    root = check_ovf(ovf, {m.name: m.size for m in found}, name)
    version = OvfVersion.v2 if root.tag.startswith(f"{{{ENVELOPE[OvfVersion.v2]}}}") else OvfVersion.v1
    listed = {}
    for line in b"".join(iter_member(path, found[2])).decode().splitlines():
        head, _, digest = line.partition("= ")
        algorithm, _, rest = head.partition("(")
        if algorithm != DIGEST[version] or not rest.endswith(")"):
            raise OvaError(f"{path.name}: manifest line {line!r} is not {DIGEST[version]}(file)= digest")
        listed[rest[:-1]] = digest
    if set(listed) != {names[0], names[1]}:
        raise OvaError(f"{path.name}: manifest lists {sorted(listed)}, not the descriptor and the disk")
    for m in found[:2]:
        h = hashlib.new(DIGEST[version].lower())
        for block in iter_member(path, m):
            h.update(block)
        if h.hexdigest() != listed[m.name]:
            raise OvaError(f"{path.name}: {m.name} does not match its manifest digest")
    return listed


def extract_disk(path: Path, dest_dir: Path) -> Path:
    """Copy the OVA's disk out of the tar (streamed) into ``dest_dir``; returns its path."""
    disk = next((m for m in members(path) if m.name.endswith(".vmdk")), None)
    if disk is None or "/" in disk.name or disk.name.startswith("."):
        raise OvaError(f"{path.name} holds no usable .vmdk member")
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / disk.name
    with atomic_path(target) as part, open(part, "wb") as f:
        for block in iter_member(path, disk):
            f.write(block)
    return target
