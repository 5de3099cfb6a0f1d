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
from imaging.guest.files import Guest

# Enough to build an initrd or install packages (owners, modes, device nodes, setuid bits);
# not mount, ptrace, module loading, raw I/O or network administration.
_CAPABILITIES = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_MKNOD", "CAP_SETUID",
                 "CAP_SETGID", "CAP_SETFCAP", "CAP_SETPCAP")  # fmt: skip
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def describe(network: bool = False) -> str:
    net = "the host's network" if network else "no network"
    return f"bubblewrap: guest as /, minimal /dev, own /proc, read-only /sys, {net}, capabilities dropped"


def _resolver(root: Path) -> list[str]:
    """Bind the host's resolv.conf where the guest's resolver will read it, without leaving a
    trace in the guest: over the guest's own file, or into the sandbox's /run when the guest's
    is a link there (systemd-resolved, resolvconf). A guest with neither gets nothing: its
    package manager then says it cannot resolve the mirror."""
    host = Path("/etc/resolv.conf")
    if not host.is_file():
        return []
    with Guest(root) as g:
        real = g.realpath("/etc/resolv.conf")
        if real.startswith("/run/"):
            return ["--ro-bind", str(host), real]
        if g.is_file(real):
            return ["--ro-bind", str(host), real]
    return []


def argv(
    root: Path, command: list[str], *, network: bool = False, env: dict[str, str] | None = None
) -> list[str]:
    cmd = [
        "bwrap", "--bind", str(root), "/", "--dev", "/dev", "--proc", "/proc", "--ro-bind", "/sys", "/sys",
        "--tmpfs", "/run", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
        "--die-with-parent", "--new-session", "--clearenv", "--setenv", "PATH", PATH, "--setenv", "HOME", "/root",
        "--setenv", "LANG", "C", "--chdir", "/", "--cap-drop", "ALL",
    ]  # fmt: skip
    for cap in _CAPABILITIES:
        cmd += ["--cap-add", cap]
    for key, value in (env or {}).items():
        cmd += ["--setenv", key, value]
    if network:
        cmd += _resolver(root)
    else:
        cmd.append("--unshare-net")
    return [*cmd, "--", *command]


def run(
    root: Path,
    command: list[str],
    *,
    network: bool = False,
    timeout: float = 1800,
    env: dict[str, str] | None = None,
) -> tools.CommandResult:
    """Run ``command`` (a guest path and its arguments, no shell) with the guest as its root."""
    tools.require_tools(
        "bwrap", reason="run the guest's own tools in a sandbox", hint="apt install bubblewrap"
    )
    return tools.run(argv(root, command, network=network, env=env), timeout=timeout)
