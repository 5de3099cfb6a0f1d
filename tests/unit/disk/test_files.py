"""Guest paths resolve inside the guest: no symlink or '..' in an image reaches the host."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imaging.disk.files import Guest
from imaging.errors import GuestError


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


def test_realpath_keeps_a_leading_dot_at_the_top(guest: Guest) -> None:
    # openSUSE mounts its snapshots' subvolume on /.snapshots.
    (guest.root / ".snapshots").mkdir()
    (guest.root / "snaps").symlink_to(".snapshots")
    assert guest.realpath("/.snapshots") == "/.snapshots"
    assert guest.realpath("/snaps") == "/.snapshots"
    assert guest.realpath("/") == "/" and guest.realpath("/etc/..") == "/"


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


def test_files_that_are_not_files_are_refused_by_name_without_blocking(tmp_path: Path) -> None:
    root = tmp_path / "g"
    (root / "etc").mkdir(parents=True)
    os.mkfifo(root / "etc" / "inittab")  # no writer: a blocking open would wait forever
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(root / "etc" / "fstab"))
    with Guest(root) as g:
        with pytest.raises(
            GuestError, match=r"^/etc/inittab in the guest is a FIFO, not a regular file: refused$"
        ):
            g.read_text("/etc/inittab")
        with pytest.raises(GuestError, match="is a socket, not a regular file"):
            g.read_text("/etc/fstab")
        with pytest.raises(GuestError, match="is a FIFO, not a regular file"):
            g.write_text("/etc/inittab", "x")
        assert g.truncate("/etc/inittab") == 0  # only regular files are emptied


def test_a_huge_sparse_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    with open(tmp_path / "etc" / "os-release", "wb") as f:
        f.truncate(1 << 40)
    with Guest(tmp_path) as g, pytest.raises(GuestError) as e:
        g.read_text("/etc/os-release")
    assert str(e.value) == (
        "/etc/os-release in the guest is 1.0 TiB: more than the 8.0 MiB read from a guest file: refused"
    )


def test_symlink_loops_read_as_missing_and_are_noted(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "sysconfig").symlink_to("/etc/sysconfig")
    (tmp_path / "etc" / "a").symlink_to("b")
    (tmp_path / "etc" / "b").symlink_to("a")
    with Guest(tmp_path) as g:
        assert g.listdir("/etc/sysconfig") == [] and g.glob("/etc/sysconfig/network-scripts/ifcfg-*") == []
        assert g.read_text("/etc/a") is None and g.stat("/etc/a") is None
        assert g.lstat("/etc/sysconfig/selinux") is None
        assert g.realpath("/etc/b") == "/etc/b"
        assert "/etc/sysconfig: a symlink loop in the guest, skipped" in g.skipped
        assert "/etc/a: a symlink loop in the guest, skipped" in g.skipped


def test_a_tree_too_deep_is_refused_whole(tmp_path: Path) -> None:
    deep = tmp_path / "tmp" / "d"
    deep.mkdir(parents=True)
    fd = os.open(deep, os.O_RDONLY)
    for _ in range(400):  # each level made in the last one: a path can only be so long
        os.mkdir("d", dir_fd=fd)
        nxt = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    os.close(fd)
    (tmp_path / "tmp" / "shallow").mkdir()
    (tmp_path / "tmp" / "shallow" / "f").write_bytes(b"12345")
    with Guest(tmp_path) as g:
        assert g.tree_bytes("/tmp/shallow") == 5 and g.remove("/tmp/shallow") is not None
        with pytest.raises(
            GuestError, match=r"^/tmp/d in the guest is more than 256 directories deep: refused"
        ):
            g.remove("/tmp/d")
        with pytest.raises(GuestError, match="more than 256 directories deep"):
            g.tree_bytes("/tmp/d")
    assert deep.is_dir()  # refused before anything went


def test_editing_a_hard_linked_file_leaves_its_other_names_alone(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "home").mkdir()
    notes = tmp_path / "home" / "notes"
    notes.write_text("the user's own words\n")
    os.chmod(notes, 0o640)
    os.link(notes, tmp_path / "etc" / "inittab")
    os.link(notes, tmp_path / "home" / "log")
    os.setxattr(notes, "user.label", b"kept")
    with Guest(tmp_path) as g:
        g.write_text("/etc/inittab", "id:3:initdefault:\n")
        assert g.truncate("/home/log") == len("the user's own words\n")
    assert notes.read_text() == "the user's own words\n" and notes.stat().st_nlink == 1
    inittab = tmp_path / "etc" / "inittab"
    assert inittab.read_text() == "id:3:initdefault:\n" and (tmp_path / "home" / "log").read_bytes() == b""
    assert oct(inittab.stat().st_mode & 0o7777) == "0o640" and os.getxattr(inittab, "user.label") == b"kept"
    assert [p.name for p in (tmp_path / "etc").iterdir()] == ["inittab"]  # no temporary file left


def test_dotdot_links_resolve_while_the_host_renames_files(tmp_path: Path) -> None:
    # A rename anywhere on the host while openat2 walks a ".." makes the kernel answer EAGAIN
    # (it cannot prove the ".." stayed in the root). Debian's /var/spool/mail -> ../mail meets
    # this whenever another job renames files: a CI run failed 10-clean on it.
    (tmp_path / "g/var/mail").mkdir(parents=True)
    (tmp_path / "g/var/spool").mkdir()
    (tmp_path / "g/var/spool/mail").symlink_to("../mail")
    storm = "import os,sys\nd=sys.argv[1]\nopen(d+'/a','w').close()\nwhile True:\n os.rename(d+'/a',d+'/b'); os.rename(d+'/b',d+'/a')"
    renamers = []
    for i in range(3):
        (tmp_path / f"r{i}").mkdir()
        renamers.append(subprocess.Popen([sys.executable, "-c", storm, str(tmp_path / f"r{i}")]))
    try:
        time.sleep(0.3)
        with Guest(tmp_path / "g") as g:
            for _ in range(5000):  # about 300 of them meet a rename without the retry
                assert g.is_dir("/var/spool/mail")
    finally:
        for p in renamers:
            p.kill()
            p.wait()
