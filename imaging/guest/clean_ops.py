"""The clean operations and their registry. Each finds what it would do and returns it as
actions; none changes anything itself (clean.apply does, so the dry run and the real run are the
same list).

The registry first (checked once, as operations register), then the data, then one short
function per operation.
"""

from __future__ import annotations

import posixpath
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from imaging.disk.files import Guest, unified_diff
from imaging.guest import firstboot
from imaging.guest.edits import redact_shadow
from imaging.guest.profiles import Block, Platform, Profile


@dataclass(frozen=True)
class Action:
    op: str
    path: str
    action: Literal["remove", "truncate", "edit"]
    bytes: int = 0
    diff: str = field(default="", repr=False)
    new_text: str | None = field(default=None, repr=False)


@dataclass
class Context:
    guest: Guest
    profile: Profile
    platforms: list[Platform]
    remove_users: list[str]


@dataclass(frozen=True)
class Operation:
    name: str
    heading: str
    default: bool
    order: int
    find: Callable[[Context], list[Action]]


REGISTRY: dict[str, Operation] = {}
_NAME = re.compile(r"^[a-z0-9-]+$")


def operation(name: str, heading: str, *, default: bool = True, order: int = 50) -> Callable[..., object]:
    """Register a clean operation (checked here, once: unique plain names, headings without a
    trailing period)."""

    def register(find: Callable[[Context], list[Action]]) -> Callable[[Context], list[Action]]:
        if not _NAME.fullmatch(name) or name in REGISTRY or name in ("defaults", "all", "none"):
            raise ValueError(f"bad or duplicate clean operation name {name!r}")
        if not heading or heading.endswith("."):
            raise ValueError(f"clean operation {name}: heading must be non-empty without a trailing period")
        REGISTRY[name] = Operation(name, heading, default, order, find)
        return find

    return register


HISTORY_FILES = (
    ".ash_history", ".bash_history", ".history", ".lesshst", ".mysql_history", ".node_repl_history",
    ".psql_history", ".python_history", ".sh_history", ".sqlite_history", ".viminfo", ".wget-hsts",
    ".zsh_history",
)  # fmt: skip
SSH_HOST_KEYS = "/etc/ssh/ssh_host_*"
UDEV_RULES = ("/etc/udev/rules.d/70-persistent-net.rules", "/etc/udev/rules.d/70-persistent-cd.rules")
IFCFG = ("/etc/sysconfig/network-scripts/ifcfg-*", "/etc/sysconfig/network/ifcfg-*")
HWADDR = re.compile(r"^\s*(HWADDR|MACADDR)\s*=.*\n?", re.MULTILINE)
MAC_KEY = re.compile(
    r"^\s*(MACAddress|PermanentMACAddress)\s*=.*\n?", re.MULTILINE
)  # systemd-networkd [Match]
NM_MAC = re.compile(r"^\s*mac-address\s*=.*\n?", re.MULTILINE)  # NetworkManager [ethernet]
DHCP_LEASES = ("/var/lib/dhcp", "/var/lib/dhclient", "/var/lib/NetworkManager/dhclient", "/var/lib/dhcpcd")
# NetworkManager's own DHCP client (the default on RHEL 8+, Fedora, Amazon Linux 2023) keeps its
# leases beside the rest of its state (internal-<uuid>-eth0.lease), which must stay.
NM_LEASES = "/var/lib/NetworkManager/*.lease"
CLOUD_INIT = (
    "/var/lib/cloud/instance",
    "/var/lib/cloud/instances",
    "/var/lib/cloud/data",
    "/var/lib/cloud/sem",
)
# NetworkManager's secret_key seeds the machine's stable IPv6 addresses and cloned MACs
# (RHEL 8+, Fedora, SUSE): shared, every instance made from the image would have the same ones.
RANDOM_SEEDS = ("/var/lib/random-seed", "/var/lib/systemd/random-seed", "/var/lib/urandom/random-seed",
                "/var/lib/NetworkManager/secret_key")  # fmt: skip
# Log names that are rotated copies (removed) rather than the live log (emptied).
ROTATED = re.compile(r"(\.\d+|\.gz|\.bz2|\.xz|\.zst|\.old|-\d{8}(\.gz)?|\.journal~?)$")
MAIL = ("/var/spool/mail", "/var/mail")
CRASH = ("/var/crash", "/var/lib/systemd/coredump")
PACKAGE_CACHES = ("/var/cache/yum", "/var/cache/dnf", "/var/cache/apt/archives")
ACCOUNT_FILES = ("/etc/passwd", "/etc/shadow", "/etc/group", "/etc/gshadow")


def _homes(g: Guest) -> list[str]:
    homes = ["/root"] if g.exists("/root") else []
    for name in g.listdir("/home"):
        st = g.lstat(f"/home/{name}")
        if st is not None and stat.S_ISDIR(st.st_mode):
            homes.append(f"/home/{name}")
    return homes


def _remove(op: str, g: Guest, path: str) -> list[Action]:
    st = g.lstat(path)
    if st is None:
        return []
    size = st.st_size if stat.S_ISREG(st.st_mode) else g.tree_bytes(path) if stat.S_ISDIR(st.st_mode) else 0
    return [Action(op, path, "remove", size)]


def _contents(op: str, g: Guest, directory: str) -> list[Action]:
    return [a for name in g.listdir(directory) for a in _remove(op, g, posixpath.join(directory, name))]


def _edit(op: str, g: Guest, path: str, change: object) -> list[Action]:
    """An edit of a regular file (through guest symlinks to its target)."""
    assert callable(change)
    old = g.read_text(path) if g.exists(path) else None
    if old is None:
        return []
    new = change(old)
    if new == old:
        return []
    show = redact_shadow if path in ("/etc/shadow", "/etc/gshadow") else (lambda t: t)
    return [Action(op, path, "edit", 0, unified_diff(path, show(old), show(new), g.realpath(path)), new)]


@operation("bash-history", "Remove the shell and tool histories of every user")
def bash_history(ctx: Context) -> list[Action]:
    return [
        a
        for home in _homes(ctx.guest)
        for f in HISTORY_FILES
        for a in _remove("bash-history", ctx.guest, f"{home}/{f}")
    ]


@operation("ssh-userdir", "Remove every user's .ssh directory (authorized keys, key pairs, known hosts)")
def ssh_userdir(ctx: Context) -> list[Action]:
    return [a for home in _homes(ctx.guest) for a in _remove("ssh-userdir", ctx.guest, f"{home}/.ssh")]


@operation("ssh-hostkeys", "Remove the SSH host keys, which every instance must make its own")
def ssh_hostkeys(ctx: Context) -> list[Action]:
    return [a for p in ctx.guest.glob(SSH_HOST_KEYS) for a in _remove("ssh-hostkeys", ctx.guest, p)]


@operation("logfiles", "Empty log files, keeping their owner and mode, and remove rotated logs")
def logfiles(ctx: Context) -> list[Action]:
    actions: list[Action] = []
    todo = ["/var/log"]
    while todo:
        directory = todo.pop()
        for name in ctx.guest.listdir(directory):
            path = posixpath.join(directory, name)
            st = ctx.guest.lstat(path)
            if st is None or stat.S_ISLNK(st.st_mode):
                continue
            if stat.S_ISDIR(st.st_mode):
                todo.append(path)
            elif stat.S_ISREG(st.st_mode) and ROTATED.search(name):
                actions.append(Action("logfiles", path, "remove", st.st_size))
            elif stat.S_ISREG(st.st_mode) and st.st_size:
                actions.append(Action("logfiles", path, "truncate", st.st_size))
    return sorted(actions, key=lambda a: a.path)


@operation("machine-id", "Reset the machine ID, which the first boot makes anew")
def machine_id(ctx: Context) -> list[Action]:
    # systemd makes a new one at boot only from "uninitialized" (which also makes it a first
    # boot); an empty file does not. Without systemd an empty file is what D-Bus's tools expect.
    g = ctx.guest
    st = g.lstat("/etc/machine-id")
    actions = []
    if st is not None and stat.S_ISREG(st.st_mode):
        if firstboot.runs_systemd(g):
            actions += _edit("machine-id", g, "/etc/machine-id", lambda t: "uninitialized\n")
        elif st.st_size:
            actions.append(Action("machine-id", "/etc/machine-id", "truncate", st.st_size))
    # D-Bus's copy: a file holding the old id goes (dbus makes it again, or reads systemd's);
    # a link to /etc/machine-id stays, it follows the new one.
    dbus = g.lstat("/var/lib/dbus/machine-id")
    if dbus is not None and not stat.S_ISLNK(dbus.st_mode):
        actions += _remove("machine-id", g, "/var/lib/dbus/machine-id")
    return actions


@operation("udev-persistent-net", "Remove udev's persistent rules that tie interface names to MAC addresses")
def udev_persistent_net(ctx: Context) -> list[Action]:
    return [a for p in UDEV_RULES for a in _remove("udev-persistent-net", ctx.guest, p)]


def _without_mac_match(text: str) -> str:
    """netplan: a file that pins one interface to its MAC address (cloud-init's, on every cloud)
    matches any Ethernet NIC by name instead (``e*``: eth0, ens3, enp0s3, eno1), keeping its
    ``set-name``: an instance whose NIC was ``ens3`` on OpenStack gets its network, under the same
    name, on VirtualBox's ``enp0s3``. Several pinned interfaces: their ``match: {macaddress}``
    and ``set-name`` go, and each is found by its name."""
    if len(re.findall(r"^\s*macaddress\s*:", text, re.MULTILINE)) == 1:
        return re.sub(r"^(\s*)macaddress\s*:.*$", r'\1name: "e*"', text, flags=re.MULTILINE)
    out: list[str] = []
    for line in text.splitlines(keepends=True):
        if re.match(r"^\s*(macaddress|set-name)\s*:", line):
            continue
        out.append(line)
    # A match: that is left empty would match every interface: remove it too.
    kept: list[str] = []
    for i, line in enumerate(out):
        nxt = out[i + 1] if i + 1 < len(out) else ""
        indent = len(line) - len(line.lstrip())
        if re.match(r"^\s*match\s*:\s*$", line) and len(nxt) - len(nxt.lstrip()) <= indent:
            continue
        kept.append(line)
    return "".join(kept)


@operation("net-hwaddr", "Remove the MAC addresses network configurations are pinned to")
def net_hwaddr(ctx: Context) -> list[Action]:
    g = ctx.guest
    actions = [
        a
        for pattern in IFCFG
        for p in g.glob(pattern)
        for a in _edit("net-hwaddr", g, p, lambda t: HWADDR.sub("", t))
    ]
    for p in g.glob("/etc/netplan/*.yaml"):
        actions += _edit("net-hwaddr", g, p, _without_mac_match)
    for p in [*g.glob("/etc/systemd/network/*.network"), *g.glob("/etc/systemd/network/*.link")]:
        actions += _edit("net-hwaddr", g, p, lambda t: MAC_KEY.sub("", t))
    for p in g.glob("/etc/NetworkManager/system-connections/*"):
        actions += _edit("net-hwaddr", g, p, lambda t: NM_MAC.sub("", t))
    return actions


@operation("dhcp-client-state", "Remove DHCP clients' leases, which name the old network and address")
def dhcp_client_state(ctx: Context) -> list[Action]:
    g = ctx.guest
    return [*(a for d in DHCP_LEASES for a in _contents("dhcp-client-state", g, d)),
            *(a for p in g.glob(NM_LEASES) for a in _remove("dhcp-client-state", g, p))]  # fmt: skip


@operation("cloud-init", "Remove cloud-init's state of this instance, so the next boot is a first boot")
def cloud_init(ctx: Context) -> list[Action]:
    return [a for p in CLOUD_INIT for a in _remove("cloud-init", ctx.guest, p)]


@operation(
    "random-seed",
    "Remove the saved random seed and NetworkManager's secret key, which instances must not share",
)
def random_seed(ctx: Context) -> list[Action]:
    return [a for p in RANDOM_SEEDS for a in _remove("random-seed", ctx.guest, p)]


@operation("tmp-files", "Empty /tmp and /var/tmp")
def tmp_files(ctx: Context) -> list[Action]:
    return _contents("tmp-files", ctx.guest, "/tmp") + _contents("tmp-files", ctx.guest, "/var/tmp")


@operation("mnt", "Empty /mnt, where the cloud mounted the instance's ephemeral disk")
def mnt(ctx: Context) -> list[Action]:
    return _contents("mnt", ctx.guest, "/mnt")


@operation("mail-spool", "Empty the users' mail spools")
def mail_spool(ctx: Context) -> list[Action]:
    return [a for d in MAIL for a in _contents("mail-spool", ctx.guest, d)]


@operation("crash-data", "Remove crash dumps")
def crash_data(ctx: Context) -> list[Action]:
    return [a for d in CRASH for a in _contents("crash-data", ctx.guest, d)]


@operation("package-cache", "Remove downloaded packages and package metadata caches", default=False)
def package_cache(ctx: Context) -> list[Action]:
    return [a for d in PACKAGE_CACHES for a in _contents("package-cache", ctx.guest, d)]


def _without_blocks(text: str, begin: str, end: str) -> str:
    out, inside = [], False
    for line in text.splitlines(keepends=True):
        if not inside and re.search(begin, line):
            inside = True
        if not inside:
            out.append(line)
        elif re.search(end, line):
            inside = False
    return "".join(out)


@operation(
    "platform-files", "Remove the cloud platform's agent files, logs and configuration blocks", order=40
)
def platform_files(ctx: Context) -> list[Action]:
    actions: list[Action] = []
    for platform in ctx.platforms:
        for pattern in platform.files:
            actions += [a for p in ctx.guest.glob(pattern) for a in _remove("platform-files", ctx.guest, p)]
        edited = set()
        for path in platform.config_files:
            real = ctx.guest.realpath(path) if ctx.guest.exists(path) else path
            if real in edited:  # /etc/rc.local and /etc/rc.d/rc.local are one file on CentOS
                continue
            edited.add(real)

            def strip(text: str, blocks: list[Block] = platform.blocks) -> str:
                for block in blocks:
                    text = _without_blocks(text, block.begin, block.end)
                return text

            actions += _edit("platform-files", ctx.guest, path, strip)
    return actions


def _without_users(text: str, users: set[str]) -> str:
    return "".join(line for line in text.splitlines(keepends=True) if line.split(":", 1)[0] not in users)


@operation("user-account", "Remove the named users' accounts, home directories and mail", default=False)
def user_account(ctx: Context) -> list[Action]:
    users = set(ctx.remove_users)
    if not users:
        return []
    actions: list[Action] = []
    for path in ACCOUNT_FILES:
        actions += _edit("user-account", ctx.guest, path, lambda t: _without_users(t, users))
    for user in sorted(users):
        actions += _remove("user-account", ctx.guest, f"/home/{user}")
        actions += [a for d in MAIL for a in _remove("user-account", ctx.guest, f"{d}/{user}")]
    return actions
