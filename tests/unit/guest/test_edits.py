"""The migrate edits: each changes only the lines it names."""

from __future__ import annotations

import pytest

from imaging.errors import ParameterError
from imaging.guest import edits
from imaging.samples import xen

UUID = "e054cdd7-c0ed-5a22-b4e7-a1b3b52c3a2a"


def test_inittab_moves_the_xen_getty_to_serial() -> None:
    new = edits.inittab(
        xen.INITTAB, ["xvc0", "hvc0"], "S0:2345:respawn:/sbin/agetty ttyS0 115200 vt100", None
    )
    assert "xvc0" not in new
    assert new.endswith("S0:2345:respawn:/sbin/agetty ttyS0 115200 vt100\n")
    old_lines = [x for x in xen.INITTAB.splitlines() if "xvc0" not in x]
    assert all(line in new.splitlines() for line in old_lines)  # everything else kept
    assert edits.inittab(new, ["xvc0"], "S0:2345:respawn:/sbin/agetty ttyS0 115200 vt100", None) == new


def test_inittab_runlevel_and_removal() -> None:
    new = edits.inittab(xen.INITTAB, ["xvc0"], None, 5)
    assert "id:5:initdefault:" in new and "id:3:initdefault:" not in new
    assert "ttyS0" not in new and "xvc0" not in new
    assert "l3:3:wait:/etc/rc.d/rc 3" in new  # other lines with a 3 untouched


def test_securetty() -> None:
    assert edits.securetty("console\ntty1") == "console\ntty1\nttyS0\n"
    assert edits.securetty("console\nttyS0\n") == "console\nttyS0\n"


def test_modprobe_conf_for_virtualbox_is_the_originals() -> None:
    extra = ["alias snd-card-0 snd-intel8x0", "options snd-card-0 index=0"]
    new = edits.modprobe_conf("alias scsi_hostadapter xenblk\nalias eth0 xennet\noptions foo bar=1\n",
                              ["ata_piix", "ahci"], "e1000", extra, "virtualbox")  # fmt: skip
    assert "xen" not in new
    assert "options foo bar=1\n" in new
    assert "alias eth0 e1000\nalias scsi_hostadapter ata_piix\nalias scsi_hostadapter1 ahci\n" in new
    assert new.count("alias snd-card-0 snd-intel8x0") == 1
    again = edits.modprobe_conf(new, ["ata_piix", "ahci"], "e1000", extra, "virtualbox")
    assert again.count("alias eth0") == 1 and again.count("snd-intel8x0") == 1


def test_fstab() -> None:
    text = (
        "/dev/xvda1 / ext3 defaults 1 1\n/dev/xvda2 /mnt ext3 defaults 0 0\nnone /proc proc defaults 0 0\n"
        "# a comment\ntmpfs /dev/shm tmpfs defaults 0 0\nnfs.example:/home /home nfs defaults 0 0\n"
    )
    new = edits.fstab(text, UUID, "root", "openstack").splitlines()
    assert new[0] == f"UUID={UUID} / ext3 defaults 1 1"
    assert new[1].startswith("# not on the openstack target") and new[1].endswith(
        "/dev/xvda2 /mnt ext3 defaults 0 0"
    )
    assert new[2:] == ["none /proc proc defaults 0 0", "# a comment", "tmpfs /dev/shm tmpfs defaults 0 0",
                       "nfs.example:/home /home nfs defaults 0 0"]  # fmt: skip
    labelled = "LABEL=root / ext3 defaults 1 1\n"
    assert edits.fstab(labelled, UUID, "root", "kvm") == labelled


def test_fstab_mounts_the_new_esp_by_its_volume_id() -> None:
    ubuntu = "LABEL=cloudimg-rootfs / ext4 discard 0 1\nLABEL=UEFI /boot/efi vfat umask=0077 0 1\n"
    new = edits.fstab(ubuntu, UUID, "cloudimg-rootfs", "kvm", esp_uuid="1A2B-3C4D").splitlines()
    assert new == ["LABEL=cloudimg-rootfs / ext4 discard 0 1",
                   "# the ESP is a new partition (imaging, 20-migrate): LABEL=UEFI /boot/efi vfat umask=0077 0 1",
                   "UUID=1A2B-3C4D /boot/efi vfat umask=0077 0 1"]  # fmt: skip
    # Already by that volume id (the source's ESP, kept): unchanged; none there: added.
    kept = f"UUID={UUID} / ext4 defaults 0 1\nUUID=1A2B-3C4D /boot/efi vfat umask=0077 0 1\n"
    assert edits.fstab(kept, UUID, "", "kvm", esp_uuid="1A2B-3C4D") == kept
    added = edits.fstab(f"UUID={UUID} / ext4 defaults 0 1\n", UUID, "", "kvm", esp_uuid="1A2B-3C4D")
    assert added.endswith("\nUUID=1A2B-3C4D /boot/efi vfat umask=0077 0 1\n")


def test_fstab_keeps_the_roots_subvolumes_and_names_what_was_merged() -> None:
    # Fedora's btrfs (/home a subvolume of the root's filesystem) and a RHEL install whose /boot
    # partition and swap volume were beside an LVM root.
    fedora = (
        f"UUID={UUID} / btrfs subvol=root,compress=zstd:1 0 0\nUUID={UUID} /home btrfs subvol=home 0 0\n"
    )
    assert edits.fstab(fedora, UUID, "fedora", "kvm") == fedora
    rhel = (
        "/dev/mapper/rhel-root / xfs defaults 0 0\nUUID=0b8c1f2e-7d5a-4c3b-9e1f-2a3b4c5d6e7f /boot xfs defaults 0 0\n"
        "/dev/mapper/rhel-swap none swap defaults 0 0\n"
    )
    new = edits.fstab(rhel, UUID, "", "virtualbox", ("/boot",)).splitlines()
    assert new[0] == f"UUID={UUID} / xfs defaults 0 0"
    assert new[1].startswith("# merged into the root filesystem (imaging, 00-acquire): UUID=0b8c1f2e")
    assert new[2].startswith("# not on the virtualbox target (imaging, 20-migrate): /dev/mapper/rhel-swap")


@pytest.mark.parametrize("mode", ["disabled", "permissive"])
def test_selinux(mode: str) -> None:
    text = "# comment SELINUX=enforcing stays\nSELINUX=enforcing\nSELINUXTYPE=targeted\n"
    assert (
        edits.selinux(text, mode)
        == f"# comment SELINUX=enforcing stays\nSELINUX={mode}\nSELINUXTYPE=targeted\n"
    )
    assert edits.selinux(text, "keep") == text


def test_boot_hooks_go_with_their_loops() -> None:
    new = edits.without_hooks(xen.RC_LOCAL, ["169\\.254\\.169\\.254", "atmo_boot"])
    assert "169.254" not in new and "sleep 2" not in new and "done" not in new and "atmo_boot" not in new
    assert "touch /var/lock/subsys/local" in new and 'echo "$(date) booted"' in new
    assert "## Atmosphere system" in new  # block markers are 10-clean's business
    nested = "until curl 169.254.169.254; do\n  if x; then\n    y\n  fi\ndone\nkeep\n"
    assert edits.without_hooks(nested, ["169\\.254"]) == "keep\n"


def test_root_password() -> None:
    crypt_hash = "$6$saltsalt$" + "x" * 86
    shadow = "root:$1$old$abc:15000:0:99999:7:::\nalice:!!:15000:0:99999:7:::\n"
    new = edits.shadow_root(shadow, edits.check_crypt_hash(crypt_hash + "\n"), 20000)
    assert new.splitlines()[0] == f"root:{crypt_hash}:20000:0:99999:7:::"
    assert new.splitlines()[1] == "alice:!!:15000:0:99999:7:::"
    assert crypt_hash not in edits.redact_shadow(new)
    for bad in ("hunter2", "$6$", "root:x", ""):
        with pytest.raises(ParameterError, match="crypt"):
            edits.check_crypt_hash(bad)


def test_grub_legacy() -> None:
    conf = edits.grub_legacy([("6.1.0-1", "/boot/vmlinuz-6.1.0-1", "/boot/initrd-6.1.0-1.img")], UUID, "CentOS",
                             "ro console=ttyS0 enforcing=0")  # fmt: skip
    assert "title CentOS (6.1.0-1)\n\troot (hd0,0)\n" in conf
    assert f"\tkernel /boot/vmlinuz-6.1.0-1 root=UUID={UUID} ro console=ttyS0 enforcing=0\n" in conf
    assert "\tinitrd /boot/initrd-6.1.0-1.img\n" in conf
