"""Running the guest's own tools (mkinitrd, update-initramfs, yum) inside the guest.

The original procedure chroots into the image as root with the host's /dev, /proc and /sys bound
in, which lets a hostile image's tool reach every host device and process. We run the tool with
bubblewrap instead: the guest as ``/``, a minimal /dev (null, zero, random, tty...), a fresh /proc
of its own PID namespace, /sys read-only, no network unless a package install needs it, a new
session, most capabilities dropped, and killed if we die. Those mounts exist only in the sandbox's
own mount namespace: the kernel unbinds them when the tool exits, on every exit path.
"""

from __future__ import annotations

from pathlib import Path

from imaging import tools

# Enough to build an initrd or install packages (owners, modes, device nodes, setuid bits);
# not mount, ptrace, module loading, raw I/O or network administration.
_CAPABILITIES = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_MKNOD", "CAP_SETUID",
                 "CAP_SETGID", "CAP_SETFCAP", "CAP_SETPCAP")  # fmt: skip
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def describe(network: bool = False) -> str:
    net = "the host's network" if network else "no network"
    return f"bubblewrap: guest as /, minimal /dev, own /proc, read-only /sys, {net}, capabilities dropped"


def argv(root: Path, command: list[str], *, network: bool = False) -> list[str]:
    cmd = [
        "bwrap", "--bind", str(root), "/", "--dev", "/dev", "--proc", "/proc", "--ro-bind", "/sys", "/sys",
        "--tmpfs", "/run", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
        "--die-with-parent", "--new-session", "--clearenv", "--setenv", "PATH", PATH, "--setenv", "HOME", "/root",
        "--setenv", "LANG", "C", "--chdir", "/", "--cap-drop", "ALL",
    ]  # fmt: skip
    for cap in _CAPABILITIES:
        cmd += ["--cap-add", cap]
    if not network:
        cmd.append("--unshare-net")
    return [*cmd, "--", *command]


def run(
    root: Path, command: list[str], *, network: bool = False, timeout: float = 1800
) -> tools.CommandResult:
    """Run ``command`` (a guest path and its arguments, no shell) with the guest as its root."""
    tools.require_tools(
        "bwrap", reason="run the guest's own tools in a sandbox", hint="apt install bubblewrap"
    )
    return tools.run(argv(root, command, network=network), timeout=timeout)
