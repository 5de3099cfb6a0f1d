"""The guest's first boot on the target: what it is set up to do, and what it needs to do it.

A cleaned instance has lost its SSH host keys and its machine-id, and it now boots on another
machine whose NIC has another name. Debian and Ubuntu do not make SSH host keys at boot (sshd then
fails to start); CentOS's sshd init script does. systemd treats a machine-id of ``uninitialized``
as a first boot (a new id, ``ConditionFirstBoot``); an empty file does not. A Xen guest's NIC is
``eth0``, on KVM or VirtualBox with predictable names it is ``ens3`` or ``enp0s3``, so its
``iface eth0`` configuration leaves the network down.

For the names we keep them stable (``net.ifnames=0``: the single NIC is ``eth0`` on every target)
rather than rewriting configurations to a predicted name, which depends on the PCI slot each
hypervisor picks (``ens3`` on QEMU's pc, ``enp0s3`` on VirtualBox, ``ens5`` on EC2) and cannot be
known for every target; configurations pinned to a MAC address are un-pinned by 10-clean.

A guest may configure its NICs by driver instead: Amazon Linux 2023's only systemd-networkd
configuration is amazon-ec2-net-utils' ``80-ec2.network`` (``Driver=ena ixgbevf vif``), which no
NIC of KVM's or VirtualBox's matches. Such a guest gets ``eth0`` configured by DHCP in a file of
ours (:func:`networkd_eth0`), so its network comes up on the target as on the cloud.

:func:`facts` reads what the guest will do (sshd enabled, interfaces configured for DHCP), which
50-verify then requires of the boot.
"""

from __future__ import annotations

import base64
import configparser
import fnmatch
import hashlib
import posixpath
import re
from dataclasses import dataclass, field

import yaml

from imaging.disk.files import Guest

SSH_KEYGEN_UNIT = "/etc/systemd/system/imaging-ssh-host-keys.service"
SSH_KEYGEN_UNIT_TEXT = """\
# Written by imaging (20-migrate): the source's SSH host keys were removed, and this distro does
# not make new ones at boot; without them sshd does not start.
[Unit]
Description=Make SSH host keys where there are none
Before=ssh.service sshd.service ssh.socket
ConditionPathExistsGlob=!/etc/ssh/ssh_host_*_key

[Service]
Type=oneshot
ExecStart={keygen} -A

[Install]
WantedBy=multi-user.target
"""
# udev names NICs by slot where these rules are; net.ifnames=0 keeps the kernel's eth0.
_PREDICTABLE_NAMES = (
    "/lib/udev/rules.d/80-net-setup-link.rules",
    "/usr/lib/udev/rules.d/80-net-setup-link.rules",
)
STABLE_NAMES_ARGS = ["net.ifnames=0", "biosdevname=0"]
# Where systemd-networkd reads .network files on the disk (/run is empty there), in its order: a
# name in /etc masks the same name in /usr/lib.
NETWORKD_DIRS = ("/etc/systemd/network", "/usr/lib/systemd/network", "/lib/systemd/network")
NETWORKD_ETH0 = "/etc/systemd/network/80-imaging-eth0.network"
NETWORKD_ETH0_TEXT = """\
# Written by imaging (20-migrate): this guest's systemd-networkd configures NICs by their driver
# ({drivers}), and the target's NIC is {nic}'s: eth0 (net.ifnames=0) gets its address by DHCP.
[Match]
Name=eth0

[Network]
DHCP=yes
"""
_DHCP_ON = ("yes", "true", "ipv4", "both")
_CONFIG_CAP = 1 << 20  # a network configuration file larger than this is not one


def runs_systemd(g: Guest) -> bool:
    """Whether the guest boots into systemd (its /sbin/init resolves, inside it, to systemd)."""
    return "systemd" in posixpath.basename(g.realpath("/sbin/init")) or (
        not g.exists("/sbin/init") and g.exists("/lib/systemd/systemd")
    )


def fingerprint(public_key: str) -> str:
    """OpenSSH's SHA256 fingerprint of a public key line (``type base64 [comment]``)."""
    blob = base64.b64decode(public_key.split()[1], validate=True)
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def host_key_fingerprints(g: Guest) -> list[str]:
    """The SHA256 fingerprints of the guest's SSH host keys (from their .pub files)."""
    found = []
    for path in g.glob("/etc/ssh/ssh_host_*_key.pub"):
        text = g.read_text(path) if g.is_file(path) else None
        try:
            found.append(fingerprint(text or ""))
        except (ValueError, IndexError):
            continue
    return sorted(found)


@dataclass(frozen=True)
class Facts:
    systemd: bool
    sshd: bool  # an sshd that starts at boot
    dhcp: list[str]  # interfaces configured to get an address by DHCP at boot
    eth_names: list[str]  # eth* interfaces named in network configurations
    predictable_names: bool  # udev would rename eth0 after the slot
    why: dict[str, str] = field(default_factory=dict)
    networkd_eth0: str = ""  # the text of NETWORKD_ETH0, when the guest needs it (counted in dhcp)


def _text(g: Guest, path: str) -> str:
    st = g.stat(path)
    if st is None or not g.is_file(path) or st.st_size > _CONFIG_CAP:
        return ""
    return g.read_text(path) or ""


def _ifupdown(g: Guest) -> tuple[set[str], set[str]]:
    text = "\n".join(
        _text(g, p) for p in ["/etc/network/interfaces", *g.glob("/etc/network/interfaces.d/*")]
    )
    started = set(re.findall(r"^\s*(?:auto|allow-hotplug)\s+(.+)$", text, re.MULTILINE))
    started = {name for line in started for name in line.split()}
    dhcp = set(re.findall(r"^\s*iface\s+(\S+)\s+inet6?\s+dhcp\b", text, re.MULTILINE)) & started
    named = set(re.findall(r"^\s*iface\s+(\S+)", text, re.MULTILINE))
    return dhcp, named


def _ifcfg(g: Guest) -> tuple[set[str], set[str]]:
    dhcp, named = set(), set()
    for path in [
        *g.glob("/etc/sysconfig/network-scripts/ifcfg-*"),
        *g.glob("/etc/sysconfig/network/ifcfg-*"),
    ]:
        values = dict(re.findall(r"^\s*([A-Z_]+)=[\"']?([^\"'\n]*)", _text(g, path), re.MULTILINE))
        name = values.get("DEVICE") or path.rsplit("ifcfg-", 1)[-1]
        named.add(name)
        if values.get("BOOTPROTO", "").lower() == "dhcp" and values.get("ONBOOT", "yes").lower() == "yes":
            dhcp.add(name)
    return dhcp, named


def _netplan(g: Guest) -> tuple[set[str], set[str]]:
    dhcp, named = set(), set()
    for path in g.glob("/etc/netplan/*.yaml"):
        try:
            doc = yaml.safe_load(_text(g, path)) or {}
        except yaml.YAMLError:
            continue
        ethernets = (doc.get("network") or {}).get("ethernets") or {} if isinstance(doc, dict) else {}
        for name, conf in ethernets.items() if isinstance(ethernets, dict) else []:
            conf = conf if isinstance(conf, dict) else {}
            real = str(conf.get("set-name") or name)
            named.add(real)
            if conf.get("dhcp4") in (True, "yes", "true") or conf.get("dhcp6") in (True, "yes", "true"):
                dhcp.add(real)
    return dhcp, named


def _ini(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    try:
        parser.read_string(text)
    except configparser.Error:
        pass
    return parser


def _networkd_nm(g: Guest) -> tuple[set[str], set[str]]:
    dhcp, named = set(), set()
    for path in g.glob("/etc/systemd/network/*.network"):
        ini = _ini(_text(g, path))
        name = ini.get("Match", "Name", fallback="")
        if name:
            named.add(name)
            if ini.get("Network", "DHCP", fallback="no").lower() in _DHCP_ON:
                dhcp.add(name)
    for path in g.glob("/etc/NetworkManager/system-connections/*"):
        ini = _ini(_text(g, path))
        name = ini.get("connection", "interface-name", fallback="")
        if name:
            named.add(name)
            if ini.get("ipv4", "method", fallback="auto") == "auto":
                dhcp.add(name)
    return dhcp, named


def networkd_eth0(g: Guest, nic_module: str) -> str:
    """Our .network for eth0 (:data:`NETWORKD_ETH0_TEXT`), or "" when not needed: the guest has
    systemd-networkd enabled, and its configurations by DHCP match NICs by driver, none of them
    ``nic_module`` (the target's). Called only when no configuration names an interface."""
    if not nic_module or not g.glob("/etc/systemd/system/*.wants/systemd-networkd.service"):
        return ""
    files: dict[str, str] = {}
    for directory in NETWORKD_DIRS:
        for path in g.glob(f"{directory}/*.network"):
            files.setdefault(posixpath.basename(path), path)
    drivers: list[str] = []
    for path in files.values():
        ini = _ini(_text(g, path))
        if ini.get("Network", "DHCP", fallback="no").lower() in _DHCP_ON:
            drivers += ini.get("Match", "Driver", fallback="").split()
    if not drivers or any(fnmatch.fnmatchcase(nic_module, d) for d in drivers):
        return ""
    return NETWORKD_ETH0_TEXT.format(drivers=" ".join(drivers), nic=nic_module)


def _sshd(g: Guest, systemd: bool) -> bool:
    if not g.exists("/usr/sbin/sshd"):
        return False
    if systemd:
        wants = [*g.glob("/etc/systemd/system/*.wants/ssh.service"), *g.glob("/etc/systemd/system/*.wants/sshd.service"),
                 *g.glob("/etc/systemd/system/*.wants/ssh.socket")]  # fmt: skip
        return bool(wants)
    return bool(g.glob("/etc/rc[2345].d/S*ssh*") or g.glob("/etc/rc.d/rc[345].d/S*sshd"))


def facts(g: Guest, nic_module: str = "") -> Facts:
    """What the guest will do on its first boot on a target whose NIC's driver is ``nic_module``."""
    systemd = runs_systemd(g)
    dhcp: set[str] = set()
    named: set[str] = set()
    for found in (_ifupdown(g), _ifcfg(g), _netplan(g), _networkd_nm(g)):
        dhcp |= found[0]
        named |= found[1]
    dhcp.discard("lo")
    ours = networkd_eth0(g, nic_module) if systemd and not named - {"lo"} else ""
    if ours:
        dhcp.add("eth0")
        named.add("eth0")
    eth = sorted(n for n in named if re.fullmatch(r"eth\d+", n))
    predictable = any(g.exists(p) for p in _PREDICTABLE_NAMES)
    sshd = _sshd(g, systemd)
    why = {
        "init": "systemd" if systemd else "not systemd (sysvinit or other)",
        "sshd": "enabled at boot" if sshd else "no sshd that starts at boot",
        "dhcp": ", ".join(sorted(dhcp)) or "no interface configured for DHCP",
    }
    if ours:
        why["networkd"] = f"its .network files match other NICs than {nic_module}'s: eth0 in {NETWORKD_ETH0}"
    if eth and predictable:
        why["names"] = (f"{', '.join(eth)} configured, but udev names NICs by slot: "
                        f"{' '.join(STABLE_NAMES_ARGS)} keeps eth0")  # fmt: skip
    return Facts(systemd, sshd, sorted(dhcp), eth, predictable, why, ours)


def kernel_args(found: Facts) -> list[str]:
    """Arguments that keep the configured interface names working on the target's NIC."""
    return STABLE_NAMES_ARGS if found.eth_names and found.predictable_names else []


def ssh_keygen_unit(g: Guest, found: Facts, how: str) -> str | None:
    """The one-shot unit that makes host keys on first boot (None when not needed or possible).
    ``how``: the profile's word: ``systemd`` (write the unit), ``distro`` (its sshd makes
    them), ``auto`` (the unit where the guest runs systemd and has sshd)."""
    if how == "distro" or not found.sshd or not (how == "systemd" or (how == "auto" and found.systemd)):
        return None
    keygen = next((p for p in ("/usr/bin/ssh-keygen", "/bin/ssh-keygen") if g.exists(p)), None)
    if keygen is None:
        return None
    return SSH_KEYGEN_UNIT_TEXT.format(keygen=keygen)
