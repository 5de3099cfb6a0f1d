"""Profiles proposed from synthetic guests: each validates, loads back, and says what it found."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from imaging.disk.files import Guest
from imaging.errors import GuestError
from imaging.explore import proposal
from imaging.guest import profiles


def tree(root: Path, files: dict[str, str], links: dict[str, str] | None = None) -> Guest:
    for path, text in files.items():
        (root / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (root / path.lstrip("/")).write_text(text)
    for path, target in (links or {}).items():
        (root / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (root / path.lstrip("/")).symlink_to(target)
    return Guest(root)


def load(text: str) -> profiles.Profile:
    return profiles.Profile(**yaml.safe_load(text))


def test_a_sysvinit_xen_guest(tmp_path: Path) -> None:
    g = tree(tmp_path, {
        "/etc/redhat-release": "Scientific Linux release 5.5 (Boron)\n",
        "/etc/inittab": "id:3:initdefault:\n1:2345:respawn:/sbin/mingetty tty1\nco:2345:respawn:/sbin/agetty xvc0 9600 vt100-nav\n",
        "/sbin/agetty": "", "/etc/securetty": "xvc0\n", "/etc/modprobe.conf": "alias eth0 xennet\n",
        "/etc/selinux/config": "SELINUX=enforcing\n", "/etc/rc.d/rc.local": "", "/sbin/mkinitrd": "",
        "/boot/vmlinuz-2.6.18-194.el5xen": "", "/boot/initrd-2.6.18-194.el5xen.img": "",
        "/boot/grub/grub.conf": "default=0\ntitle SL (2.6.18-194.el5xen)\n", "/usr/bin/yum": "",
    }, {"/etc/rc.local": "rc.d/rc.local"})  # fmt: skip
    text = proposal.propose(g)
    p = load(text)
    assert p.name == "scientific-5" and p.detect[0].matches == "release 5"
    assert p.inittab == "/etc/inittab" and p.xen_consoles == ["xvc0"]
    assert p.serial_getty == "S0:2345:respawn:/sbin/agetty ttyS0 115200 vt100"
    assert p.modprobe_conf == "/etc/modprobe.conf" and p.modprobe_d is None
    assert p.grub_legacy_conf == "/boot/grub/grub.conf" and p.grub_dir == "/boot/grub2"
    assert p.initrd is not None and p.initrd.tool == "/sbin/mkinitrd"
    assert p.initrd.image == "/boot/initrd-{version}.img" and "--with={module}" in p.initrd.argv
    assert p.packages is not None and p.packages.install == ["yum", "-y", "install"]
    assert p.rc_local == "/etc/rc.local" and p.selinux_config == "/etc/selinux/config"
    assert "# kernels in /boot: 2.6.18-194.el5xen (Xen-only) (no modules)" in text
    assert "guessed" in text


def test_a_systemd_dracut_guest(tmp_path: Path) -> None:
    g = tree(tmp_path, {
        "/etc/os-release": 'NAME="Rocky Linux"\nVERSION_ID="9.3"\nID="rocky"\nPRETTY_NAME="Rocky Linux 9.3"\n',
        "/usr/lib/systemd/systemd": "", "/etc/modprobe.d/x.conf": "", "/usr/bin/dracut": "", "/usr/bin/dnf": "",
        "/etc/systemd/system/getty.target.wants/serial-getty@hvc0.service": "",
        "/boot/vmlinuz-5.14.0-362.el9.x86_64": "", "/boot/initramfs-5.14.0-362.el9.x86_64.img": "",
    }, {"/sbin/init": "../usr/lib/systemd/systemd"})  # fmt: skip
    text = proposal.propose(g)
    p = load(text)
    assert p.name == "rocky-9" and p.description == "Rocky Linux 9.3"
    assert p.detect == [] and p.os_release is not None and p.os_release.ids == {"rocky": ["9"]}
    assert p.inittab is None and p.xen_consoles == ["hvc0"] and "init system: systemd" in text
    assert p.modprobe_d == "/etc/modprobe.d/imaging-target.conf"
    assert p.initrd is not None and p.initrd.argv[:5] == ["/usr/bin/dracut", "--force", "--no-hostonly",
                                                         "--add-drivers", "{modules}"]  # fmt: skip
    assert p.initrd.image == "/boot/initramfs-{version}.img"
    assert (
        p.packages is not None
        and p.packages.install[0] == "dnf"
        and p.packages.refresh == ["dnf", "-y", "makecache"]
    )


def test_guest_text_cannot_add_keys(tmp_path: Path) -> None:
    g = tree(tmp_path, {"/etc/os-release": 'ID=evil\nPRETTY_NAME="x"\ninitrd: {}\nname: pwned\n"\n'})
    p = load(proposal.propose(g))
    assert p.name == "evil" and p.initrd is None


def test_an_empty_guest_still_gives_a_valid_profile(tmp_path: Path) -> None:
    p = load(proposal.propose(tree(tmp_path, {"/etc/fstab": ""})))
    assert p.name == "proposed" and p.initrd is None and p.packages is None


def test_rules_explain_detection(tmp_path: Path) -> None:
    g = tree(tmp_path, {"/etc/debian_version": "12.5\n", "/usr/sbin/update-initramfs": ""})
    assert profiles.detect(g).profile.name == "debian"
    checks = profiles.check_rules(g)
    assert ("centos5", False) in {(c.profile, c.holds) for c in checks}
    assert {c.rule for c in checks if c.profile == "debian" and c.holds} == {
        "/etc/debian_version exists",
        "/usr/sbin/update-initramfs exists",
    }


def test_a_guest_no_profile_knows_is_an_error_that_says_how_to_go_on(tmp_path: Path) -> None:
    g = tree(tmp_path, {"/etc/os-release": 'NAME="Arch Linux"\nPRETTY_NAME="Arch Linux <b>"\nID=arch\n'})
    with pytest.raises(GuestError) as e:
        profiles.detect(g)
    message = str(e.value)
    assert message.startswith("no profile knows this guest (Arch Linux b): propose one")
    assert "notebooks/explore.ipynb" in message and "--profile" in message and "\n" not in message
    # generic is never guessed, but a request may name it.
    assert profiles.resolve(g, "generic").profile.name == "generic"
