"""Disks and filesystems (30-bootable): image probing, ext/debugfs, sparse layout and placement, mounts, GRUB."""
