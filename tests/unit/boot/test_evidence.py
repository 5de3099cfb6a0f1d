"""What a boot shows: console failures, the DHCP lease on the wire, sshd's banner and host keys,
and the verdict a user would draw from them."""

from __future__ import annotations

import socket
import struct
import subprocess
import threading
from pathlib import Path

import pytest

from imaging.boot import evidence, verify
from imaging.guest import firstboot

SYSTEMD = (
    "[  OK  ] Started \x1b[0;1;39mssh.service\x1b[0m - OpenBSD Secure Shell server.\n"
    "[\x1b[0;1;31mFAILED\x1b[0m] Failed to start \x1b[0;1;39mnetworking.service\x1b[0m - Raise network interfaces.\n"
    "See 'systemctl status networking.service' for details.\n"
    "[FAILED] Failed to start networking.service - Raise network interfaces.\n"
    "[ TIME ] Timed out waiting for device /dev/xvda2.\n"
)
SYSV = "Starting sshd: [FAILED]\r\nStarting crond: [  OK  ]\r\nStarting OpenBSD Secure Shell server: sshd failed!\n"


def test_failed_units_are_read_from_systemd_and_init_scripts() -> None:
    assert evidence.failed_units(SYSTEMD) == [
        "[FAILED] Failed to start networking.service - Raise network interfaces.",
        "[ TIME ] Timed out waiting for device /dev/xvda2.",
    ]
    assert evidence.failed_units(SYSV) == [
        "Starting sshd: [FAILED]",
        "Starting OpenBSD Secure Shell server: sshd failed!",
    ]
    assert evidence.failed_units("[  OK  ] Reached target multi-user.target.\nlogin: ") == []


def _frame(op: int, message_type: int, yiaddr: bytes, ports: tuple[int, int] = (67, 68)) -> bytes:
    bootp = bytes([op, 1, 6, 0]) + bytes(12) + yiaddr + bytes(236 - 20) + b"\x63\x82\x53\x63"
    bootp += bytes([53, 1, message_type, 255])
    udp = struct.pack("!HHHH", *ports, 8 + len(bootp), 0) + bootp
    ip = bytes([0x45, 0]) + struct.pack("!H", 20 + len(udp)) + bytes(5) + bytes([17]) + bytes(10)
    return bytes(6) + bytes(6) + b"\x08\x00" + ip + udp


def _pcap(path: Path, frames: list[bytes], truncate_last: int = 0) -> None:
    data = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
    for f in frames:
        data += struct.pack("<IIII", 0, 0, len(f), len(f)) + f
    path.write_bytes(data[: len(data) - truncate_last])


def test_the_dhcp_lease_is_seen_on_the_wire(tmp_path: Path) -> None:
    pcap = tmp_path / "net.pcap"
    assert evidence.dhcp_lease(pcap) is None  # QEMU has not written it yet
    offer, ack = _frame(2, 2, bytes([10, 0, 2, 15])), _frame(2, 5, bytes([10, 0, 2, 15]))
    _pcap(pcap, [_frame(1, 1, bytes(4), (68, 67)), offer])
    assert evidence.dhcp_lease(pcap) is None  # an offer is not an address yet
    _pcap(pcap, [offer, ack], truncate_last=10)
    assert evidence.dhcp_lease(pcap) is None  # the ACK is still being written
    _pcap(pcap, [offer, ack])
    assert evidence.dhcp_lease(pcap) == "10.0.2.15"
    _pcap(pcap, [_frame(2, 5, bytes([10, 0, 2, 15]), (68, 67))])  # not from a server
    assert evidence.dhcp_lease(pcap) is None


def test_a_flooded_capture_is_read_in_bounded_steps_and_not_past_its_cap(tmp_path: Path) -> None:
    pcap = tmp_path / "net.pcap"
    noise = _frame(2, 2, bytes([10, 0, 2, 15]))  # offers, 5 MiB of them: more than one step
    _pcap(pcap, [noise] * (5 * 1024 * 1024 // (len(noise) + 16)) + [_frame(2, 5, bytes([10, 0, 2, 15]))])
    watch = evidence.DhcpWatch(pcap)
    assert watch.poll() is None and 0 < watch.offset <= 4 << 20  # one step read, the rest next time
    assert watch.poll() == "10.0.2.15"
    # A record claiming a frame longer than any QEMU writes ends the watch (no waiting for it).
    pcap.write_bytes(pcap.read_bytes()[:24] + struct.pack("<IIII", 0, 0, 1 << 30, 1 << 30) + bytes(100))
    watch = evidence.DhcpWatch(pcap)
    assert watch.poll() is None and watch.offset == evidence.PCAP_CAP


def _serve(reply: bytes) -> int:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(reply)
        server.close()

    threading.Thread(target=answer, daemon=True).start()
    return int(server.getsockname()[1])


def test_only_a_real_banner_counts_as_sshd() -> None:
    assert (
        evidence.ssh_banner(_serve(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"))
        == "SSH-2.0-OpenSSH_9.2p1 Debian-2"
    )
    # QEMU accepts the forwarded connection itself and closes it when nothing listens in the guest.
    assert evidence.ssh_banner(_serve(b"")) is None
    assert evidence.ssh_banner(_serve(b"HTTP/1.0 200 OK\r\n")) is None
    assert evidence.ssh_banner(evidence.free_port()) is None


def test_fingerprints_match_openssh(tmp_path: Path) -> None:
    for kind in ("ed25519", "rsa", "ecdsa"):
        key = tmp_path / kind
        subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", key], check=True)
        theirs = subprocess.run(
            ["ssh-keygen", "-lf", f"{key}.pub"], check=True, capture_output=True, text=True
        )
        assert firstboot.fingerprint(Path(f"{key}.pub").read_text()) == theirs.stdout.split()[1]
    with pytest.raises(ValueError):
        firstboot.fingerprint("ssh-ed25519 not*base64")


def _watch(
    tmp_path: Path, console: str, *, evidence_seen: bool = True, dhcp: str = "", banner: str = ""
) -> verify._Watch:
    w = verify._Watch(tmp_path / "serial.log", tmp_path / "net.pcap", 0, None)
    w.text, w.dhcp, w.banner = console, dhcp, banner
    if evidence_seen:
        w.evidence, w.evidence_kind = "debian login:", "login prompt"
    return w


def test_the_verdict_is_what_a_user_would_conclude(tmp_path: Path) -> None:
    want = evidence.Expect(ssh=True, dhcp=True, source_host_keys=("SHA256:old",))
    keys = ["ssh-ed25519 SHA256:new"]
    ok = _watch(tmp_path, "debian login: ", dhcp="10.0.2.15", banner="SSH-2.0-OpenSSH")
    assert verify._judge(ok, want, keys, 60, False) == ("booted", "login prompt", [])
    # A login prompt alone, with sshd and the network down: nobody can log in.
    down = _watch(tmp_path, SYSTEMD + "debian login: ")
    verdict, reason, reasons = verify._judge(down, want, [], 60, False)
    assert verdict == "degraded" and "networking.service" in reason
    assert "no address by DHCP: the network did not come up on the target's NIC" in reasons
    assert "sshd did not answer on port 22" in reasons
    reused = verify._judge(ok, want, ["ssh-rsa SHA256:old"], 60, False)
    assert reused[0] == "degraded" and "host key of the source (SHA256:old)" in reused[1]
    # A guest without sshd or DHCP is judged on the rest.
    assert (
        verify._judge(_watch(tmp_path, "login: "), evidence.Expect(ssh=False, dhcp=False), [], 60, False)[0]
        == "booted"
    )
    assert verify._judge(_watch(tmp_path, "", evidence_seen=False), want, [], 60, True)[0] == "failed"
    panic = _watch(tmp_path, "Kernel panic - not syncing: VFS")
    panic.fatal = "Kernel panic - not syncing: VFS"
    assert verify._judge(panic, want, [], 60, False)[:2] == ("failed", "boot failed")


def test_expectations_come_from_the_runs_records(tmp_path: Path) -> None:
    from imaging.workspace import Workspace

    ws = Workspace.open(tmp_path / "run")
    assert verify.expectations(ws) == evidence.Expect()  # convert: nothing known, nothing required
    ws.save_result("20-migrate", {"first_boot": {"ssh": True, "dhcp": ["eth0"], "why": {"sshd": "enabled"}}})
    ws.save_result("10-clean", {"ssh_host_keys": ["SHA256:a"]})
    got = verify.expectations(ws)
    assert (got.ssh, got.dhcp, got.source_host_keys) == (True, True, ("SHA256:a",))
