"""The next kernel the guest installs is the one that boots: links GRUB's first entry follows.

30-bootable installs the conversion host's GRUB with a menu of its own (the guest's may need a
GRUB patch the host lacks: RHEL's ``blscfg``). That menu is written once, so on its own it would
keep booting the kernel of the conversion day after every security update. Its first, default
entry therefore boots through two links, a kernel and its initrd, which the guest's own package
tools move to each kernel they install:

- Debian's and Ubuntu's linux-base keeps ``/vmlinuz`` and ``/initrd.img`` (``/boot/...`` with
  ``link_in_boot``), SUSE's kernel scripts ``/boot/vmlinuz`` and ``/boot/initrd``: the profile's
  ``kernel_links.kept`` names them, and they are only pointed at the kernel 20-migrate chose;
- the RHEL family and Amazon Linux keep none (their menu is BLS entries or grubby's edits of a
  grub.cfg), so 20-migrate installs a small hook where their kernel tools run one: a
  kernel-install plugin (RHEL 8+, Fedora, Amazon Linux 2023) and ``/etc/kernel/postinst.d`` and
  ``postrm.d`` (new-kernel-pkg on RHEL 7 and Amazon Linux 2, Debian's maintainer scripts). It
  keeps ``/boot/vmlinuz`` and ``/boot/initrd.img`` on the kernel installed last, as linux-base
  does, and on the newest left when that one is removed.

GRUB resolves the (relative) links itself; 30-bootable reads them back through GRUB's own
filesystem code to prove it.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from dataclasses import dataclass

from imaging.disk.files import Guest, unified_diff
from imaging.guest.profiles import Profile

HOOK = "/etc/kernel/postinst.d/zz-imaging-kernel-links"
# Where the same script is called from besides (links to it): kernel-install runs *.install
# plugins with "add|remove VERSION ...", Debian's and RHEL 7's scripts postrm.d with "VERSION".
HOOK_LINKS = (
    "/etc/kernel/postrm.d/zz-imaging-kernel-links",
    "/etc/kernel/install.d/95-imaging-kernel-links.install",
)
HOOK_PAIR = ("/boot/vmlinuz", "/boot/initrd.img")
HOOK_SCRIPT = r"""#!/bin/sh
# Written by imaging (20-migrate) when it converted this machine to a new disk. The disk's GRUB
# boots /boot/vmlinuz with /boot/initrd.img by default; this keeps both on the kernel installed
# last (on the newest left when that one is removed), as Debian's linux-base does for /vmlinuz.
# It runs as a kernel-install plugin (add|remove VERSION ...) and from /etc/kernel/postinst.d and
# postrm.d (VERSION [IMAGE]). It never fails a package transaction: a kernel without an initrd
# yet leaves the links where they were.
boot=/boot
case "${1:-}" in
add | remove) action=$1 version=${2:-} ;;
*)
    case "$0" in */postrm.d/*) action=remove ;; *) action=add ;; esac
    version=${1:-}
    ;;
esac
[ -n "$version" ] || exit 0

initrd_of() {
    for name in "initramfs-$1.img" "initrd.img-$1" "initrd-$1" "initrd-$1.img"; do
        if [ -s "$boot/$name" ]; then
            echo "$name"
            return 0
        fi
    done
    return 1
}

point() {
    [ -s "$boot/vmlinuz-$1" ] || return 1
    initrd=$(initrd_of "$1") || return 1
    ln -sfn "vmlinuz-$1" "$boot/vmlinuz" && ln -sfn "$initrd" "$boot/initrd.img"
}

if [ "$action" = add ]; then
    point "$version" || echo "imaging: no $boot/vmlinuz-$version with an initrd yet: $boot/vmlinuz unchanged" >&2
elif [ "$(readlink "$boot/vmlinuz")" = "vmlinuz-$version" ] || [ ! -e "$boot/vmlinuz" ]; then
    for left in $(ls "$boot" | sed -n 's/^vmlinuz-//p' | grep -vxF -- "$version" | sort -V -r); do
        point "$left" && break
    done
fi
exit 0
"""


@dataclass(frozen=True)
class LinkEdit:
    path: str
    what: str
    diff: str
    apply: Callable[[Guest], None]


@dataclass(frozen=True)
class Followed:
    """The links GRUB's first entry boots through, and who keeps them current."""

    kernel: str = ""
    initrd: str = ""
    kept_by: str = ""  # "the guest's kernel scripts", "imaging's hook (...)", or "" (not followed)
    why_not: str = ""


def _link_edit(g: Guest, link: str, target_path: str, what: str) -> list[LinkEdit]:
    target = posixpath.relpath(target_path, posixpath.dirname(link))
    if g.is_symlink(link) and g.readlink(link) == target:
        return []
    old = f"-{link} -> {g.readlink(link)}\n" if g.is_symlink(link) else ""
    diff = f"--- a{link}\n+++ b{link}\n@@ symlink @@\n{old}+{link} -> {target}\n"
    return [LinkEdit(link, what, diff, lambda guest: guest.symlink(target, link))]


def plan(g: Guest, profile: Profile, vmlinuz: str, initrd: str | None) -> tuple[list[LinkEdit], Followed]:
    """The links pointed at the chosen kernel ``vmlinuz`` and its ``initrd``, and the hook where
    the guest's tools keep none; nothing is followed for a profile that says so or a guest whose
    link paths hold something else."""
    links = profile.kernel_links
    if links is None:
        return [], Followed(why_not=f"profile {profile.name} follows no kernel links")
    if initrd is None:
        return [], Followed(why_not=f"{vmlinuz} has no initrd to link")
    kept = next((pair for pair in links.kept if g.is_symlink(pair[0])), None)
    kernel, image = kept or HOOK_PAIR
    for path in (kernel, image):
        if g.exists(path) and not g.is_symlink(path):
            return [], Followed(
                why_not=f"{path} in the guest is not a link: left alone, kernel updates not followed"
            )
    edits = [
        *_link_edit(
            g, kernel, vmlinuz, "points at the kernel chosen for the target (GRUB's default follows it)"
        ),
        *_link_edit(g, image, initrd, "points at that kernel's initrd"),
    ]
    if kept:
        return edits, Followed(kernel, image, "the guest's kernel scripts")
    old = (g.read_text(HOOK) or "") if g.is_file(HOOK) else ""
    if old != HOOK_SCRIPT:
        edits.append(LinkEdit(HOOK, f"keeps {kernel} and {image} on the kernel installed last",
                              unified_diff(HOOK, old, HOOK_SCRIPT),
                              lambda guest: guest.write_text(HOOK, HOOK_SCRIPT, 0o755)))  # fmt: skip
    for link in HOOK_LINKS:
        edits += _link_edit(g, link, HOOK, "the same hook, called on removal and by kernel-install")
    return edits, Followed(kernel, image, f"imaging's hook ({HOOK}, kernel-install's {HOOK_LINKS[1]})")
