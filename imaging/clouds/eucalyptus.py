"""An instance's root disk copied off its Eucalyptus node controller over SSH (the original's path).

The nodes are searched in the order configured for the instance's directory under the node's
instances directory (``<instances_dir>/<user>/<instance>/`` in Eucalyptus 2, the original's
``/usr/local/eucalyptus/<user>/<instance>/root``; ``<instances_dir>/work/<user>/<instance>/`` from
Eucalyptus 3 on). Its ``root`` (or ``disk``) file comes through OpenSSH's own ``ssh`` client
running ``dd`` on the node (at ``scp``'s speed: paramiko's SFTP in Python was 4x slower), by
default through ``zstd -1`` on both ends over a network (a sparse disk's holes then cost next to
nothing), sparse on arrival (zero blocks stay holes), with progress; at the same time the node computes the
file's sha256, and the copy is kept only when its size and sha256 match the node's.

A cut copy keeps what arrived (clouds/resume.py); the next attempt asks the node for the rest
only (``dd`` from that byte on), and hashes the kept bytes and the rest as one file.

Host keys are checked against the known_hosts file the operator gives, never learnt: an unknown
host or a host key that differs refuses the connection, in one line. No shell string is built
from anything but the configured directory and names the node itself listed, each quoted.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import os
import re
import shlex
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from imaging import tools
from imaging.clouds.resume import Cut, Partial, resumable_download
from imaging.clouds.settings import CloudSource, Eucalyptus
from imaging.clouds.transfer import Fetched
from imaging.errors import CommandError, ParameterError, SourceError
from imaging.progress import bytes_bar

# Where a node keeps an instance's directory, under its instances directory ("*": the user).
INSTANCE_DIRS = ("work/*/{instance}", "*/{instance}")
# The root disk's file in that directory, by Eucalyptus version.
DISK_NAMES = ("root", "disk")
_CHUNK = 1 << 20  # read, hashed and written a MiB at a time: the most the copy holds in memory
# The node's packer and our unpacker, by name.
PACKERS = {
    "zstd": ("zstd -1 -c -q", ["zstd", "-d", "-c", "-q"]),
    "gzip": ("gzip -1 -c", ["gzip", "-d", "-c"]),
}
_SSH_FAILED = 255  # ssh's own failures (connection, host key, login); anything else is the node's command
_HASH_FAILED = 97  # the node's command: the copy went through, its hasher failed
# OpenSSH names a key's type in capitals in its warnings; known_hosts and our messages name it so.
_KEY_TYPES = {"ED25519": "ssh-ed25519", "RSA": "ssh-rsa", "ECDSA": "ecdsa-sha2-nistp256", "DSA": "ssh-dss"}


@dataclass(frozen=True)
class Found:
    node: str
    path: str
    size: int
    mtime: int
    packer: str  # the best packer the node has: "zstd" or "gzip"
    hasher: str  # "openssl" where the node has it (SHA-NI: 4x less CPU than coreutils' sha256sum), or "sha256sum"


def _address(node: str) -> tuple[str, int]:
    host, _, port = node.rpartition(":") if ":" in node else (node, "", "22")
    return host, int(port)


def ssh_argv(cloud: Eucalyptus, node: str) -> list[str]:
    """OpenSSH's client for ``node``: host keys from the operator's known_hosts only, never learnt
    or asked about, logged in with the configured key only (no agent, no user config)."""
    tools.require_tools("ssh", reason="copy an instance off its node", hint="apt install openssh-client")
    if not cloud.known_hosts.is_file():
        raise ParameterError(f"known_hosts file {cloud.known_hosts} does not exist")
    if not cloud.key_file.is_file():
        raise ParameterError(f"SSH key file {cloud.key_file} does not exist")
    host, port = _address(node)
    alive = max(1, round(cloud.timeout / 3))
    return ["ssh", "-F", "/dev/null", "-T", "-e", "none", "-p", str(port), "-l", cloud.user,
            "-i", str(cloud.key_file), "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", "UpdateHostKeys=no",
            "-o", f"UserKnownHostsFile={cloud.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", f"ConnectTimeout={max(1, round(cloud.timeout))}",
            # AES-GCM ahead of OpenSSH's default ChaCha20: with AES-NI (any x86 server of the last
            # decade) it takes half the CPU on each end, and the copy is bound by that CPU (5 GiB
            # through ssh on loopback: 8.0 s against 11.0 s). Others stay as the fallback.
            "-o", "Ciphers=^aes128-gcm@openssh.com,aes256-gcm@openssh.com",
            # A link that stops answering ends the copy after about the configured timeout.
            "-o", f"ServerAliveInterval={alive}", "-o", "ServerAliveCountMax=3",
            "--", host]  # fmt: skip


def _refusal(cloud: Eucalyptus, node: str, stderr: str) -> SourceError:
    """ssh's failure to connect or log in, in one line."""
    changed = re.search(
        r"The fingerprint for the (\w+) key sent by the remote host is\s+(\S+?)\.?\s", stderr
    )
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr and changed:
        kind = _KEY_TYPES.get(changed[1], changed[1].lower())
        return SourceError(
            f"node {node}: its host key ({kind} {changed[2]}) does not match {cloud.known_hosts}: refusing to connect"
        )
    if "Host key verification failed" in stderr or "host key is known for" in stderr:
        return SourceError(f"node {node} is not in {cloud.known_hosts}: refusing to connect")
    if "Permission denied" in stderr:
        return SourceError(
            f"node {node}: {cloud.user} cannot log in with {cloud.key_file} (authentication failed)"
        )
    if "Load key" in stderr:
        return SourceError(f"node {node}: SSH key file {cloud.key_file} cannot be read: {_last(stderr)}")
    return SourceError(f"node {node}: cannot connect: {_last(stderr)}")


def _last(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return lines[-1][:200] if lines else "ssh failed"


def _ssh(cloud: Eucalyptus, node: str, command: str) -> str:
    """``command``'s output on the node (short output only)."""
    try:
        result = tools.run(
            [*ssh_argv(cloud, node), command], ok_codes=(0, _SSH_FAILED), timeout=cloud.timeout * 3
        )
    except CommandError as e:
        raise SourceError(f"node {node}: {e}") from None
    if result.exit_code == _SSH_FAILED:
        raise _refusal(cloud, node, result.stderr)
    return result.stdout


def _find_on(cloud: Eucalyptus, node: str, instance: str) -> Found | None:
    """The instance's root disk on this node, or None. The instances directory and the instance
    id are plain names (settings checked them): the globs below are safe to leave unquoted."""
    dirs = " ".join(
        f"{cloud.instances_dir.rstrip('/')}/{p.format(instance=instance)}" for p in INSTANCE_DIRS
    )
    script = (
        "for t in zstd openssl; do command -v $t >/dev/null 2>&1 && printf '%s ' $t; done; echo; "
        f"for d in {dirs}; do for n in {' '.join(DISK_NAMES)}; do "
        'if [ -f "$d/$n" ]; then stat -L -c "%s %Y" -- "$d/$n" && printf "%s\\n" "$d/$n"; exit; fi; '
        "done; done"
    )
    lines = _ssh(cloud, node, script).split("\n", 2)
    if len(lines) < 3 or not lines[2]:
        return None
    size, mtime = (int(n) for n in lines[1].split())
    has = lines[0].split()
    return Found(node, lines[2][:-1], size, mtime, "zstd" if "zstd" in has else "gzip",
                 "openssl" if "openssl" in has else "sha256sum")  # fmt: skip


def find(src: CloudSource, cloud: Eucalyptus) -> Found:
    """Where the instance's root disk is; SourceError when no node has it."""
    for node in cloud.nodes:
        found = _find_on(cloud, node, src.instance)
        if found is not None:
            return found
    raise SourceError(
        f"instance {src.instance} is on none of the nodes of {src.cloud} ({', '.join(cloud.nodes)})"
    )


def locate(src: CloudSource, cloud: Eucalyptus) -> tuple[str, str, int]:
    """(node, path, size) of the instance's root disk; SourceError when no node has it."""
    found = find(src, cloud)
    return found.node, found.path, found.size


def packer_for(cloud: Eucalyptus, found: Found) -> str | None:
    """The packer to compress the stream with, or None. "auto" takes zstd -1 where both ends have
    it and the node is not on loopback: there the copy is bound by the CPU (SSH's ciphers), and
    zstd's work on both ends cost more than the bytes it saved (the real-files disk: 1.15x scp
    packed, 1.02x not); over a network its holes and files cross packed. gzip -1 (about 30 MB/s
    here) pays only on links slower than that, so only ``compress: on`` takes it."""
    if cloud.compress == "off":
        return None
    if cloud.compress == "auto" and (found.packer != "zstd" or _loopback(found.node)):
        return None
    local = PACKERS[found.packer][1][0]
    if tools.which(local) is None:
        if cloud.compress == "on":
            raise ParameterError(f"compress is on, but {local} is not installed here (apt install {local})")
        return None
    return found.packer


def _loopback(node: str) -> bool:
    host = _address(node)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _open_pipe() -> tuple[int, int]:
    r, w = os.pipe()
    with contextlib.suppress(OSError):  # a MiB in flight between the tools and us (64 KiB by default)
        fcntl.fcntl(r, fcntl.F_SETPIPE_SZ, _CHUNK)
    return r, w


def _remote_command(found: Found, start: int, packer: str | None) -> str:
    """The node's side of a copy, in one session: ``dd`` of the file from ``start`` on (packed),
    and the whole file's sha256 on stderr, computed at the same time. A cut ends ``dd`` (SIGPIPE):
    the hasher is stopped with it rather than left reading the rest of a disk of hundreds of GiB.
    Exit ``_HASH_FAILED``: the copy went through, the hasher did not. The path is absolute (it
    starts with the instances directory): no option can start it."""
    path = shlex.quote(found.path)
    dd = f"dd if={path} bs=1M skip={start} iflag=skip_bytes status=none"
    if packer:
        dd = f"{dd} | {PACKERS[packer][0]}"
    hasher = {"openssl": "openssl dgst -sha256 -r", "sha256sum": "sha256sum --"}[found.hasher]
    return (f"{hasher} {path} >&2 & h=$!; {dd}; r=$?; "
            f"if [ $r -ne 0 ]; then kill $h 2>/dev/null; exit $r; fi; wait $h || exit {_HASH_FAILED}")  # fmt: skip


def _node_sha256(stderr: str) -> str:
    """The hasher's line among whatever else the session wrote to stderr."""
    found = re.findall(r"^([0-9a-f]{64})[ *]", stderr, re.MULTILINE)
    return found[-1] if found else ""


class _Stream:
    """The node's file from ``start`` on: ``ssh`` (and the unpacker) each in a thread, writing into a
    pipe this process reads; closing it ends them (SIGPIPE)."""

    def __init__(self, argv: list[str], found: Found, start: int, packer: str | None) -> None:
        command = _remote_command(found, start, packer)
        self.results: dict[str, tools.CommandResult | BaseException] = {}
        self.threads: list[threading.Thread] = []
        r, w = _open_pipe()
        if packer:
            r2, w2 = _open_pipe()
            self._start("unpack", PACKERS[packer][1], stdin_fd=r, stdout_fd=w2)
            r = r2
        self._start("ssh", [*argv, command], stdout_fd=w)
        self.fd = r

    def _start(self, name: str, argv: list[str], **fds: int) -> None:
        def go() -> None:
            try:
                self.results[name] = tools.run(argv, ok_codes=range(256), **fds)  # type: ignore[arg-type]
            except BaseException as e:  # reported by wait()
                self.results[name] = e

        thread = threading.Thread(target=go, name=f"node {name}", daemon=True)
        thread.start()
        self.threads.append(thread)

    def chunks(self) -> Iterator[memoryview]:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while True:
            got = 0
            while got < _CHUNK and (n := os.readv(self.fd, [view[got:]])):
                got += n
            if got:
                yield view[:got]
            if got < _CHUNK:
                return

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        for thread in self.threads:
            thread.join()

    def failure(self) -> tuple[str, str] | None:
        """(which, why) when ssh or the unpacker failed, else None; after close()."""
        for name in ("ssh", "unpack"):
            result = self.results.get(name)
            if isinstance(result, BaseException):
                return name, str(result)
            if result is not None and result.exit_code != 0:
                return name, f"{result.exit_code}: {_last(result.stderr)}"
        return None


def _copy(cloud: Eucalyptus, src: CloudSource, found: Found, part: Partial, digest: hashlib._Hash) -> str:
    """The rest of the file into ``part``; returns the node's sha256 of the whole file."""
    start = part.prefix()
    part.hash_prefix(digest, start)
    packer = packer_for(cloud, found)
    stream = _Stream(ssh_argv(cloud, found.node), found, start, packer)
    at = start
    what = f"copy of {src.instance} from {found.node}"
    desc = f"copy {src.instance} from {found.node}" + (f" (resumed at {start:,})" if start else "")
    try:
        with bytes_bar(found.size, desc) as bar:
            bar.update(start)
            for chunk in stream.chunks():
                if at + len(chunk) > found.size:
                    raise SourceError(f"{found.node}: {found.path} grew while it was copied: nothing kept")
                digest.update(chunk)
                part.write(at, chunk)
                at += len(chunk)
                bar.update(len(chunk))
    finally:
        stream.close()
    failed = stream.failure()
    if failed and failed[0] == "ssh" and failed[1].startswith(f"{_SSH_FAILED}:"):
        # The node was found over this same link a moment ago: whatever ssh says now, the link
        # went away, and what arrived is good.
        raise Cut(
            f"{what} was cut after {at:,} of {found.size:,} bytes ({failed[1].partition(': ')[2]}): "
            f"the {at:,} bytes that arrived are kept, and imaging resume fetches the rest"
        )
    if failed and failed[0] == "ssh" and failed[1].startswith(f"{_HASH_FAILED}:"):
        raise SourceError(
            f"{found.node}: {found.hasher} on the node failed: {failed[1].partition(': ')[2]}: nothing kept"
        )
    if failed:
        raise SourceError(
            f"{what} failed after {at:,} of {found.size:,} bytes: {failed[0]} {failed[1]}; nothing kept"
        )
    if at != found.size:
        raise SourceError(
            f"{what} ended after {at:,} of {found.size:,} bytes (the node's file shrank): nothing kept"
        )
    result = stream.results["ssh"]
    assert isinstance(result, tools.CommandResult)  # failure() saw it end with 0
    theirs = _node_sha256(result.stderr)
    if not theirs:
        raise SourceError(f"{found.node}: {found.hasher} on the node printed no sha256: nothing kept")
    return theirs


def fetch(src: CloudSource, cloud: Eucalyptus, dest: Path) -> Fetched:
    """Copy the instance's root disk to ``dest`` (raw, sparse); checked against the node's sha256.
    A cut copy keeps what arrived: the next call for the same file fetches only the rest."""
    t0 = time.monotonic()
    found = find(src, cloud)
    identity = {"cloud": "eucalyptus", "node": found.node, "path": found.path, "size": found.size,
                "mtime": found.mtime}  # fmt: skip
    with resumable_download(dest, found.size, identity) as part:
        digest = hashlib.sha256()
        theirs = _copy(cloud, src, found, part, digest)
        if theirs != digest.hexdigest():
            raise SourceError(
                f"copy of {src.instance} from {found.node} does not match the node's sha256 "
                f"({theirs} != {digest.hexdigest()}): nothing kept"
            )
        data = part.data_bytes
    return Fetched(
        source=str(src), cloud=src.cloud, kind="eucalyptus", path=str(dest), format="raw", size_bytes=found.size,
        data_bytes=data, digest=f"sha256:{digest.hexdigest()}", verified="size and sha256 computed on the node",
        seconds=round(time.monotonic() - t0, 3), where=f"{found.node}:{found.path}",
    )  # fmt: skip
