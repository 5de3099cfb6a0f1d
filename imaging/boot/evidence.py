"""What a boot shows, read the way a user would judge it: the console (a login prompt, the
image's marker, a panic, a unit or init script that FAILED), whether the guest got an address by
DHCP (from a capture of its NIC's traffic, not from anything the guest says), and whether its
sshd answers on a forwarded loopback port with a host key that is not one of the source's.
"""

from __future__ import annotations

import re
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path

from imaging import tools
from imaging.guest import firstboot

LOGIN = re.compile(r"^\S*\s*login:\s*$|\blogin:\s*$", re.MULTILINE)
# The boot went nowhere: nothing after these is a working machine.
FATAL = re.compile(
    r"Kernel panic - not syncing.*|initrd: .*not found.*|VFS: Unable to mount root fs.*|IMAGING-SAMPLE-FAILED.*|"
    r"No bootable device.*|error: no such device.*|error: file .* not found.*|"
    r"You are in emergency mode.*|Give root password for maintenance.*|Entering emergency mode.*"
)
# It booted, but something a user relies on did not start: systemd's status lines, sysvinit's and
# LSB init scripts' "[FAILED]" / "failed!", udev/systemd waiting for a disk that is not there.
UNIT_FAILED = re.compile(
    r"^.*\[\s*FAILED\s*\].*$|^.*\[\s*FAIL\s*\].*$|^.*\bfailed!\s*$|^.*\[\s*TIME\s*\] Timed out waiting for.*$",
    re.MULTILINE,
)
_ESCAPES = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|[@-Z\\-_])")


def plain(text: str) -> str:
    """Console text without terminal escapes (systemd colours its status words)."""
    return _ESCAPES.sub("", text).replace("\r", "")


def failed_units(text: str) -> list[str]:
    """Each console line that reports a unit or init script failing, once, in order."""
    seen: dict[str, None] = {}
    for m in UNIT_FAILED.finditer(plain(text)):
        seen.setdefault(" ".join(m.group(0).split())[:200], None)
    return list(seen)


@dataclass(frozen=True)
class Expect:
    """What the guest is expected to do on its first boot (from 20-migrate's look at it):
    True = required for a ``booted`` verdict, False = not expected, None = recorded if seen."""

    ssh: bool | None = None
    dhcp: bool | None = None
    source_host_keys: tuple[str, ...] = ()  # SHA256 fingerprints 10-clean removed: never to come back
    why: dict[str, str] = field(default_factory=dict)


# -- DHCP, from QEMU's filter-dump of the guest's NIC (pcap) ------------------------------------

_PCAP_HEADER = 24
_RECORD = struct.Struct("<IIII")


# The DHCP exchange is among a boot's first packets; a guest flooding its NIC makes QEMU's
# capture grow for as long as the boot lasts: it is read a bounded step at a time, once, and not
# past this much.
PCAP_CAP = 64 << 20
_PCAP_STEP = 4 << 20


class DhcpWatch:
    """Reads QEMU's capture as it grows, each byte once, and says when the guest got a lease."""

    def __init__(self, pcap: Path) -> None:
        self.pcap, self.offset, self.address = pcap, _PCAP_HEADER, ""

    def poll(self) -> str | None:
        """The address a DHCP server acknowledged to the guest (DHCPACK), or None (yet). A
        truncated last record is read again once it is complete."""
        if self.address or self.offset >= PCAP_CAP:
            return self.address or None
        try:
            with open(self.pcap, "rb") as f:
                f.seek(self.offset)
                data = f.read(min(_PCAP_STEP, PCAP_CAP - self.offset))
        except FileNotFoundError:
            return None
        pos = 0
        while pos + _RECORD.size <= len(data):
            _, _, length, _ = _RECORD.unpack_from(data, pos)
            frame = data[pos + _RECORD.size : pos + _RECORD.size + length]
            if len(frame) < length:
                if length > _PCAP_STEP:  # no frame is that long (QEMU's snaplen is 64 KiB)
                    self.offset = PCAP_CAP
                break
            pos += _RECORD.size + length
            if address := _dhcp_ack(frame):
                self.address = address
                break
        self.offset += pos
        return self.address or None


def dhcp_lease(pcap: Path) -> str | None:
    """The address a DHCP server acknowledged to the guest in the capture so far, or None."""
    watch = DhcpWatch(pcap)
    while True:
        before = watch.offset
        if (found := watch.poll()) is not None:
            return found
        if watch.offset == before:
            return None


def _dhcp_ack(frame: bytes) -> str | None:
    if len(frame) < 14 + 20 + 8 + 240 or frame[12:14] != b"\x08\x00":
        return None
    ip = frame[14:]
    header = (ip[0] & 0x0F) * 4
    if ip[9] != 17:  # UDP
        return None
    udp = ip[header:]
    if len(udp) < 8 or struct.unpack("!HH", udp[:4]) != (67, 68):
        return None
    bootp = udp[8:]
    if len(bootp) < 240 or bootp[0] != 2 or bootp[236:240] != b"\x63\x82\x53\x63":
        return None
    options = bootp[240:]
    i = 0
    while i + 1 < len(options) and options[i] != 255:
        if options[i] == 0:
            i += 1
            continue
        code, size = options[i], options[i + 1]
        if code == 53 and size == 1 and i + 2 < len(options) and options[i + 2] == 5:  # DHCPACK
            return ".".join(str(b) for b in bootp[16:20])
        i += 2 + size
    return None


# -- sshd, on the loopback port QEMU forwards to the guest's port 22 ------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ssh_banner(port: int, timeout: float = 2.0) -> str | None:
    """The SSH identification line the guest's sshd sends, or None. QEMU accepts the connection
    itself and closes it when nothing listens in the guest, so only a real banner counts."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            data = b""
            while b"\n" not in data and len(data) < 256:
                chunk = s.recv(256)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    line = data.split(b"\n", 1)[0].decode(errors="replace").strip()
    return line if line.startswith("SSH-") else None


def host_keys(port: int) -> list[str]:
    """The host keys the guest's sshd offers, as ``type SHA256:...`` (ssh-keyscan, once)."""
    result = tools.run(
        ["ssh-keyscan", "-T", "10", "-p", str(port), "-t", "rsa,ecdsa,ed25519", "127.0.0.1"],
        ok_codes=(0, 1),
        timeout=60,
    )
    keys = []
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and not line.startswith("#"):
            try:
                keys.append(f"{parts[1]} {firstboot.fingerprint(' '.join(parts[1:3]))}")
            except (ValueError, IndexError):
                continue
    return sorted(keys)
