"""Running the guest's own tools (mkinitrd, update-initramfs, apt, yum) inside the guest.

The original procedure chroots into the image as root with the host's /dev, /proc and /sys bound
in, which lets a hostile image's tool reach every host device, process and service. We run the
tool with bubblewrap instead, boxed in on every side:

- **a user namespace** whose ids map one to one onto the host's (so the guest's files keep
  their owners, and chown, setuid bits and file capabilities come out as the real ones), in
  which the tool's root is root over the guest's files only: it cannot make or open devices,
  mount, load modules, change the clock or the host's network, whatever it is granted inside,
  and it is granted only what building an initrd or installing packages needs;
- **the guest as /**, a minimal /dev, its own /proc (own PID namespace), and no host /sys (an
  empty read-only one): no DMI serials, no MAC addresses, no disk ids; the host's name, boot
  id and kernel command line are not shown either;
- **its own network namespace** with loopback only; a package install reaches the package
  mirrors through a proxy on its 127.0.0.1:3128, and nothing else (``mirrors.py``);
- **limits** on memory (no swap), processes and time (``limits.py``); a tool over one is
  killed, and the error says which;
- **killed with us**, and nothing of it outlives the command: its namespaces (and the mounts in
  them) go when its last process does, its control group is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from imaging import config, tools
from imaging.errors import CommandError
from imaging.guest import limits, mirrors

# What building an initrd or installing packages needs (owners, modes, setuid bits, file
# capabilities), as root of the user namespace only: not mount, ptrace, raw I/O, module
# loading or network administration.
_CAPABILITIES = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_SETUID", "CAP_SETGID",
                 "CAP_SETFCAP", "CAP_SETPCAP", "CAP_KILL")  # fmt: skip
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Every id maps to itself: the namespace changes what root may do, not whose files are whose.
_ID_MAP = "0 0 4294967295\n"


def configured_limits() -> limits.Limits:
    s = config.load_defaults().sandbox
    return limits.Limits(config.parse_disk_size(s.memory)[1], s.processes, s.seconds)


def describe(network: bool = False) -> str:
    net = "package mirrors only, through a proxy" if network else "no network"
    return (f"bubblewrap: user namespace, guest as /, minimal /dev, own /proc, no host /sys, {net}, "
            f"capabilities dropped; limits: {configured_limits().describe()}")  # fmt: skip


def mirror_hosts(profile_mirrors: Sequence[str]) -> list[str]:
    """The hosts a package install may reach: the profile's and the site's (defaults.yaml)."""
    return list(dict.fromkeys([*profile_mirrors, *config.load_defaults().package_mirrors]))


def argv(root: Path, command: list[str], *, masks: Path, info_fd: int, block_fd: int,
         network: bool = False, env: dict[str, str] | None = None) -> list[str]:  # fmt: skip
    cmd = [
        "bwrap", "--unshare-user", "--info-fd", str(info_fd), "--userns-block-fd", str(block_fd),
        "--bind", str(root), "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/sys", "--remount-ro", "/sys",
        "--tmpfs", "/run", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net",
        "--unshare-cgroup-try", "--hostname", "localhost", "--die-with-parent", "--new-session", "--clearenv",
        "--setenv", "PATH", PATH, "--setenv", "HOME", "/root", "--setenv", "LANG", "C", "--chdir", "/",
        "--cap-drop", "ALL",
    ]  # fmt: skip
    for name in ("boot_id", "cmdline"):  # identifiers of the host in /proc: neutral stand-ins
        target = "/proc/sys/kernel/random/boot_id" if name == "boot_id" else "/proc/cmdline"
        cmd += ["--ro-bind", str(masks / name), target]
    for cap in _CAPABILITIES:
        cmd += ["--cap-add", cap]
    proxy = {"http_proxy": mirrors.URL, "https_proxy": mirrors.URL, "HTTP_PROXY": mirrors.URL,
             "HTTPS_PROXY": mirrors.URL} if network else {}  # fmt: skip
    for key, value in {**proxy, **(env or {})}.items():
        cmd += ["--setenv", key, value]
    return [*cmd, "--", *command]


@contextlib.contextmanager
def _masks() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="imaging-sandbox-"))
    try:
        (directory / "boot_id").write_text(f"{uuid.uuid4()}\n")
        (directory / "cmdline").write_text("ro\n")
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class _Setup:
    """Outside the sandbox, while bubblewrap waits: map its ids, set its process limit, and for
    a package install open the proxy inside its network namespace; then let it go on."""

    def __init__(self, box: limits.Box, proxy: mirrors.MirrorProxy | None) -> None:
        self.box, self.proxy = box, proxy
        self.info_r, self.info_w = os.pipe()
        self.block_r, self.block_w = os.pipe()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="sandbox setup", daemon=True)

    def _run(self) -> None:
        pid = None
        try:
            data = b""
            while True:
                chunk = os.read(self.info_r, 4096)
                if not chunk:
                    return  # bubblewrap ended before its namespaces existed: its error says why
                data += chunk
                with contextlib.suppress(ValueError):
                    pid = int(json.loads(data)["child-pid"])
                    break
            for name in ("uid_map", "gid_map"):
                with open(f"/proc/{pid}/{name}", "w") as f:
                    f.write(_ID_MAP)
            self.box.contain(pid)
            if self.proxy is not None:
                netns = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
                try:
                    self.proxy.listen_in(netns)
                finally:
                    os.close(netns)
            os.write(self.block_w, b"1")
        except BaseException as e:
            self.error = e
            if pid is not None:  # never let it run unmapped or unlimited
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
        finally:
            os.close(self.block_w)
            os.close(self.info_r)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        for fd in (self.info_w, self.block_r):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.thread.join(timeout=10)


def run(
    root: Path,
    command: list[str],
    *,
    network: bool = False,
    env: dict[str, str] | None = None,
    mirror_list: Sequence[str] = (),
    reached: list[str] | None = None,
) -> tools.CommandResult:
    """Run ``command`` (a guest path and its arguments, no shell) with the guest as its root;
    with ``network``, only the hosts of ``mirror_list`` (and the site's package mirrors) are
    reachable, through the proxy, and ``reached`` gets a line saying where it went."""
    tools.require_tools(
        "bwrap", reason="run the guest's own tools in a sandbox", hint="apt install bubblewrap"
    )
    lim = configured_limits()
    proxy = mirrors.MirrorProxy(mirror_hosts(mirror_list)) if network else None
    with limits.Box(lim) as box, _masks() as masks:
        setup = _Setup(box, proxy)
        cmd = argv(
            root,
            command,
            masks=masks,
            info_fd=setup.info_w,
            block_fd=setup.block_r,
            network=network,
            env=env,
        )
        setup.start()
        try:
            return tools.run([*box.prefix, *cmd], timeout=lim.seconds, pass_fds=(setup.info_w, setup.block_r),
                             setup=box.join)  # fmt: skip
        except CommandError as e:
            raise _explained(e, box, setup, proxy) from None
        finally:
            setup.close()
            if proxy is not None:
                proxy.close()
                if reached is not None:
                    reached.append(proxy.describe())


class LimitReached(CommandError):
    """A sandboxed tool was stopped by one of its limits (or the sandbox could not be made)."""


def _explained(
    e: CommandError, box: limits.Box, setup: _Setup, proxy: mirrors.MirrorProxy | None
) -> CommandError:
    """The tool's failure, with the limit it ran into (or the sandbox's own failure) said."""
    if setup.error is not None:
        return LimitReached(f"the sandbox could not be set up: {setup.error}", e.result)
    why = box.why_killed()
    if why:
        return LimitReached(f"{e} ({why})", e.result)
    if " timed out after " in str(e):
        return LimitReached(f"{e} (the sandbox's time limit)", e.result)
    if proxy is not None and proxy.refused:
        return CommandError(
            f"{e} (refused by the mirror proxy: {', '.join(dict.fromkeys(proxy.refused))})", e.result
        )
    return e
