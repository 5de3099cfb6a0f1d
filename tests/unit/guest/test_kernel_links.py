"""The links GRUB's default entry follows: pointed at the chosen kernel by 20-migrate, kept by
the guest's own scripts (Debian, SUSE) or by imaging's hook (RHEL, Amazon), which runs here as
the guest's package tools would call it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from imaging.disk.files import Guest
from imaging.guest import kernel_links
from imaging.guest.profiles import load_profile


def _boot(root: Path, *names: str) -> Path:
    boot = root / "boot"
    boot.mkdir(parents=True, exist_ok=True)
    for name in names:
        (boot / name).write_text(name)
    return boot


def _apply(root: Path, profile: str, vmlinuz: str, initrd: str | None) -> kernel_links.Followed:
    with Guest(root) as g:
        edits, followed = kernel_links.plan(g, load_profile(profile), vmlinuz, initrd)
        for edit in edits:
            edit.apply(g)
        again, _ = kernel_links.plan(g, load_profile(profile), vmlinuz, initrd)
    assert again == []  # applied, nothing is left to do
    return followed


def test_debians_own_links_are_pointed_at_the_chosen_kernel(tmp_path: Path) -> None:
    _boot(tmp_path, "vmlinuz-6.1.0-9-cloud-amd64", "vmlinuz-6.1.0-9-amd64", "initrd.img-6.1.0-9-amd64")
    (tmp_path / "vmlinuz").symlink_to("boot/vmlinuz-6.1.0-9-cloud-amd64")
    followed = _apply(tmp_path, "debian", "/boot/vmlinuz-6.1.0-9-amd64", "/boot/initrd.img-6.1.0-9-amd64")
    assert (followed.kernel, followed.initrd, followed.kept_by) == (
        "/vmlinuz",
        "/initrd.img",
        "the guest's kernel scripts",
    )
    assert os.readlink(tmp_path / "vmlinuz") == "boot/vmlinuz-6.1.0-9-amd64"
    assert os.readlink(tmp_path / "initrd.img") == "boot/initrd.img-6.1.0-9-amd64"
    assert not (tmp_path / "etc" / "kernel").exists()  # linux-base keeps them: no hook


def test_suse_keeps_its_links_in_boot(tmp_path: Path) -> None:
    boot = _boot(tmp_path, "vmlinuz-6.4.0-150600.23-default", "initrd-6.4.0-150600.23-default")
    (boot / "vmlinuz").symlink_to("vmlinuz-6.4.0-150600.23-default")
    followed = _apply(
        tmp_path, "suse", "/boot/vmlinuz-6.4.0-150600.23-default", "/boot/initrd-6.4.0-150600.23-default"
    )
    assert (followed.kernel, followed.initrd) == ("/boot/vmlinuz", "/boot/initrd")
    assert os.readlink(boot / "initrd") == "initrd-6.4.0-150600.23-default"


def _hook(root: Path, *argv: str, via: str = kernel_links.HOOK) -> subprocess.CompletedProcess[str]:
    """The installed hook, run as the guest's tools run it: its /boot is ``root``'s."""
    return subprocess.run(
        ["bwrap", "--ro-bind", "/", "/", "--bind", root / "boot", "/boot", "--ro-bind", root / "etc", "/etc",
         "--dev", "/dev", "--", via, *argv],
        capture_output=True, text=True, check=True,
    )  # fmt: skip


def test_rhel_gets_a_hook_that_follows_installs_and_removals(tmp_path: Path) -> None:
    boot = _boot(tmp_path, "vmlinuz-5.14.0-427.el9.x86_64", "initramfs-5.14.0-427.el9.x86_64.img")
    followed = _apply(
        tmp_path, "rhel", "/boot/vmlinuz-5.14.0-427.el9.x86_64", "/boot/initramfs-5.14.0-427.el9.x86_64.img"
    )
    assert (followed.kernel, followed.initrd) == kernel_links.HOOK_PAIR and "hook" in followed.kept_by
    hook = tmp_path / kernel_links.HOOK.lstrip("/")
    assert hook.read_text() == kernel_links.HOOK_SCRIPT and os.access(hook, os.X_OK)
    for link in kernel_links.HOOK_LINKS:
        assert (tmp_path / link.lstrip("/")).resolve() == hook.resolve()
    assert os.readlink(boot / "vmlinuz") == "vmlinuz-5.14.0-427.el9.x86_64"
    # dnf installs a newer kernel: kernel-install's plugins made the kernel and initramfs first.
    _boot(tmp_path, "vmlinuz-5.14.0-503.el9.x86_64", "initramfs-5.14.0-503.el9.x86_64.img")
    _hook(tmp_path, "add", "5.14.0-503.el9.x86_64", "/boot/loader/entries", "/lib/modules/x/vmlinuz",
          via=kernel_links.HOOK_LINKS[1])  # fmt: skip
    assert os.readlink(boot / "vmlinuz") == "vmlinuz-5.14.0-503.el9.x86_64"
    assert os.readlink(boot / "initrd.img") == "initramfs-5.14.0-503.el9.x86_64.img"
    # One without its initrd yet leaves the links alone (the one they name still boots).
    _boot(tmp_path, "vmlinuz-5.14.0-570.el9.x86_64")
    assert (
        "unchanged" in _hook(tmp_path, "5.14.0-570.el9.x86_64", "/boot/vmlinuz-5.14.0-570.el9.x86_64").stderr
    )
    assert os.readlink(boot / "vmlinuz") == "vmlinuz-5.14.0-503.el9.x86_64"
    # Removing another kernel changes nothing; removing the linked one goes to the newest left.
    (boot / "vmlinuz-5.14.0-570.el9.x86_64").unlink()
    _hook(tmp_path, "5.14.0-427.el9.x86_64", via=kernel_links.HOOK_LINKS[0])
    assert os.readlink(boot / "vmlinuz") == "vmlinuz-5.14.0-503.el9.x86_64"
    (boot / "vmlinuz-5.14.0-503.el9.x86_64").unlink()
    _hook(tmp_path, "remove", "5.14.0-503.el9.x86_64", via=kernel_links.HOOK_LINKS[1])
    assert os.readlink(boot / "vmlinuz") == "vmlinuz-5.14.0-427.el9.x86_64"
    assert os.readlink(boot / "initrd.img") == "initramfs-5.14.0-427.el9.x86_64.img"


@pytest.mark.parametrize("profile", ["generic", "centos5", "rhel6"])
def test_profiles_whose_menu_follows_otherwise_get_no_links(tmp_path: Path, profile: str) -> None:
    _boot(tmp_path, "vmlinuz-2.6.32-754.el6.x86_64", "initramfs-2.6.32-754.el6.x86_64.img")
    with Guest(tmp_path) as g:
        edits, followed = kernel_links.plan(g, load_profile(profile), "/boot/vmlinuz-2.6.32-754.el6.x86_64",
                                            "/boot/initramfs-2.6.32-754.el6.x86_64.img")  # fmt: skip
    assert edits == [] and not followed.kernel and profile in followed.why_not


def test_a_file_where_a_link_would_go_is_left_alone(tmp_path: Path) -> None:
    boot = _boot(tmp_path, "vmlinuz-5.14.0-427.el9.x86_64", "initramfs-5.14.0-427.el9.x86_64.img", "vmlinuz")
    with Guest(tmp_path) as g:
        edits, followed = kernel_links.plan(g, load_profile("amazon"), "/boot/vmlinuz-5.14.0-427.el9.x86_64",
                                            "/boot/initramfs-5.14.0-427.el9.x86_64.img")  # fmt: skip
    assert edits == [] and "/boot/vmlinuz in the guest is not a link" in followed.why_not
    assert (boot / "vmlinuz").read_text() == "vmlinuz"
