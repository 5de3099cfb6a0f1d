"""Guest paths resolve inside the guest: no symlink or '..' in an image reaches the host."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from imaging.errors import GuestError
from imaging.guest.files import Guest


@pytest.fixture
def guest(tmp_path: Path) -> Guest:
    root = tmp_path / "guest"
    (root / "etc" / "rc.d").mkdir(parents=True)
    (root / "etc" / "selinux").mkdir()
    (root / "etc" / "sysconfig").mkdir()
    (root / "etc" / "rc.d" / "rc.local").write_text("touch /var/lock/subsys/local\n")
    (root / "etc" / "rc.local").symlink_to("rc.d/rc.local")
    (root / "etc" / "selinux" / "config").write_text("SELINUX=enforcing\n")
    (root / "etc" / "sysconfig" / "selinux").symlink_to("../selinux/config")
    (root / "etc" / "passwd").write_text("root:x:0:0:guest\n")
    (root / "etc" / "hostile").symlink_to("/etc/hostname")  # absolute: the host's, if followed naively
    (root / "etc" / "up").symlink_to("../../../../../../../etc/hostname")
    (root / "hostetc").symlink_to("/etc")
    return Guest(root)


def host_state() -> str:
    return hashlib.sha256(Path("/etc/hostname").read_bytes() + Path("/etc/passwd").read_bytes()).hexdigest()


def test_absolute_symlinks_resolve_in_the_guest(guest: Guest) -> None:
    before = host_state()
    assert guest.read_text("/etc/hostile") is None  # the guest has no /etc/hostname
    assert guest.read_text("/etc/up") is None
    assert guest.read_text("/hostetc/passwd") == "root:x:0:0:guest\n"  # the guest's own /etc
    guest.write_text("/hostetc/../../../hostname-x", "in the guest")  # '..' stops at the guest's root
    assert (guest.root / "hostname-x").read_text() == "in the guest"
    assert not Path("/hostname-x").exists()
    guest.write_text("/etc/hostile", "stays in the guest\n")  # creates the guest's /etc/hostname
    assert (guest.root / "etc" / "hostname").read_text() == "stays in the guest\n"
    assert guest.truncate("/hostetc/passwd") > 0
    assert host_state() == before


def test_edits_follow_guest_symlinks_to_their_targets(guest: Guest) -> None:
    diff = guest.edit("/etc/sysconfig/selinux", lambda t: t.replace("enforcing", "disabled"))
    assert "(-> /etc/selinux/config)" in diff and "+SELINUX=disabled" in diff
    assert os.readlink(guest.root / "etc" / "sysconfig" / "selinux") == "../selinux/config"
    assert (guest.root / "etc" / "selinux" / "config").read_text() == "SELINUX=disabled\n"
    guest.edit("/etc/rc.local", lambda t: t + "echo more\n")
    assert (guest.root / "etc" / "rc.local").is_symlink()
    assert guest.realpath("/etc/rc.local") == "/etc/rc.d/rc.local"


def test_removal_never_follows_a_symlink(guest: Guest, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep")
    (guest.root / "var").mkdir()
    (guest.root / "var" / "link").symlink_to(outside)
    removed = guest.remove("/var/link")
    assert removed is not None and removed.kind == "symlink"
    assert (outside / "precious").read_text() == "keep"
    assert guest.truncate("/etc/rc.local") == 0  # a symlink: left alone
    with pytest.raises(GuestError):
        guest.remove("/")


def test_glob_and_relative_paths(guest: Guest) -> None:
    assert guest.glob("/etc/*") == sorted(
        [
            "/etc/hostile",
            "/etc/passwd",
            "/etc/rc.d",
            "/etc/rc.local",
            "/etc/selinux",
            "/etc/sysconfig",
            "/etc/up",
        ]
    )
    with pytest.raises(GuestError, match="absolute"):
        guest.read_text("etc/passwd")
