"""An instance's root disk copied off its Eucalyptus node controller over SSH (the original's path).

The nodes are searched in the order configured for the instance's directory under the node's
instances directory (``<instances_dir>/<user>/<instance>/`` in Eucalyptus 2, the original's
``/usr/local/eucalyptus/<user>/<instance>/root``; ``<instances_dir>/work/<user>/<instance>/`` from
Eucalyptus 3 on). Its ``root`` (or ``disk``) file comes over SFTP (or, with ``compress``,
through ``gzip -1`` on the node: a sparse disk's holes then cost next to nothing on a slow link,
but real data costs the node's CPU), sparse on arrival (zero blocks stay holes), with progress; at
the same time the node computes the file's sha256, and the copy is kept only when its size and
sha256 match the node's.

Host keys are checked against the known_hosts file the operator gives, never learnt: an unknown
host or a host key that differs refuses the connection, in one line. No shell string is built
from anything but the configured directory and names the node itself listed, each quoted.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import shlex
import stat
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from imaging.clouds.settings import CloudSource, Eucalyptus
from imaging.clouds.transfer import Fetched, sparse_download
from imaging.errors import ParameterError, SourceError
from imaging.progress import bytes_bar

# Where a node keeps an instance's directory, under its instances directory ("*": the user).
INSTANCE_DIRS = ("work/*/{instance}", "*/{instance}")
# The root disk's file in that directory, by Eucalyptus version.
DISK_NAMES = ("root", "disk")
_CHUNK = 1 << 20
_WINDOW = 32 << 20  # SFTP reads in flight and buffered at most, twice (two windows)
_REQUEST = 32 << 10  # paramiko's SFTP read request (SFTPFile.MAX_REQUEST_SIZE)


def _address(node: str) -> tuple[str, int]:
    host, _, port = node.rpartition(":") if ":" in node else (node, "", "22")
    return host, int(port)


def connect(cloud: Eucalyptus, node: str) -> Any:
    """An SSH connection to ``node``, its host key checked against the operator's known_hosts."""
    import paramiko

    host, port = _address(node)
    if not cloud.known_hosts.is_file():
        raise ParameterError(f"known_hosts file {cloud.known_hosts} does not exist")
    client = paramiko.SSHClient()
    client.load_host_keys(str(cloud.known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        key = paramiko.PKey.from_path(cloud.key_file)
    except FileNotFoundError:
        raise ParameterError(f"SSH key file {cloud.key_file} does not exist") from None
    except (paramiko.SSHException, ValueError) as e:
        raise ParameterError(f"SSH key file {cloud.key_file} cannot be read: {_line(e)}") from None
    try:
        client.connect(host, port, username=cloud.user, pkey=key, timeout=cloud.timeout,
                       banner_timeout=cloud.timeout, auth_timeout=cloud.timeout, look_for_keys=False,
                       allow_agent=False)  # fmt: skip
    except paramiko.BadHostKeyException as e:
        client.close()
        raise SourceError(
            f"node {node}: its host key ({e.key.get_name()} {e.key.fingerprint}) does not match "
            f"{cloud.known_hosts}: refusing to connect"
        ) from None
    except paramiko.AuthenticationException:
        client.close()
        raise SourceError(
            f"node {node}: {cloud.user} cannot log in with {cloud.key_file} (authentication failed)"
        ) from None
    except paramiko.SSHException as e:
        client.close()
        if "not found in known_hosts" in str(e):
            raise SourceError(f"node {node} is not in {cloud.known_hosts}: refusing to connect") from None
        raise SourceError(f"node {node}: SSH failed: {_line(e)}") from None
    except (TimeoutError, OSError) as e:
        client.close()
        raise SourceError(f"node {node}: cannot connect: {_line(e)}") from None
    return client


def _line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _find_on(sftp: Any, cloud: Eucalyptus, instance: str) -> str | None:
    """The path of the instance's root disk on this node, or None."""
    for pattern in INSTANCE_DIRS:
        parent, _, tail = pattern.partition("*")
        base = f"{cloud.instances_dir}/{parent}".rstrip("/")
        try:
            users = sorted(sftp.listdir(base))
        except OSError:
            continue
        for user in users:
            directory = f"{base}/{user}{tail.format(instance=instance)}"
            for name in DISK_NAMES:
                path = f"{directory}/{name}"
                try:
                    st = sftp.stat(path)
                except OSError:
                    continue
                if st.st_mode is not None and stat.S_ISREG(st.st_mode):
                    return path
    return None


def locate(src: CloudSource, cloud: Eucalyptus) -> tuple[str, str, int]:
    """(node, path, size) of the instance's root disk; SourceError when no node has it."""
    for node in cloud.nodes:
        client = connect(cloud, node)
        try:
            sftp = client.open_sftp()
            path = _find_on(sftp, cloud, src.instance)
            if path is not None:
                return node, path, int(sftp.stat(path).st_size or 0)
        finally:
            client.close()
    raise SourceError(
        f"instance {src.instance} is on none of the nodes of {src.cloud} ({', '.join(cloud.nodes)})"
    )


def _remote_sha256(client: Any, path: str, timeout: float, out: dict[str, str]) -> None:
    try:
        _, stdout, stderr = client.exec_command(f"sha256sum -- {shlex.quote(path)}", timeout=timeout)
        text = stdout.read().decode(errors="replace")
        status = stdout.channel.recv_exit_status()
        if status != 0:
            out["error"] = (
                f"sha256sum on the node failed: {_line(Exception(stderr.read().decode(errors='replace')))}"
            )
        else:
            out["sha256"] = text.split()[0] if text.split() else ""
    except Exception as e:  # reported by the copy, which fails the run
        out["error"] = f"sha256sum on the node failed: {_line(e)}"


@contextlib.contextmanager
def _stream(client: Any, cloud: Eucalyptus, path: str, size: int) -> Iterator[Iterator[bytes]]:
    """The file's bytes in order: over SFTP (paramiko's prefetch), or with ``compress`` through
    ``gzip -1`` on the node, inflated at most a MiB at a time (a MiB of deflated zeros is a GiB)."""
    if not cloud.compress:
        with client.open_sftp() as sftp:

            def window(start: int) -> tuple[Any, int, int]:
                # Its own handle, and every request of it sent at once: with paramiko's
                # max_concurrent_requests its request thread sleeps 10 ms whenever the limit is
                # reached, and whenever the reader drains what was requested so far paramiko takes
                # the prefetch for done and reads the rest one synchronous 32 KiB request at a time
                # (paramiko PR #2519): 3.6x slower. Asked for a window ahead, all its requests are
                # out long before it is read, so that cannot happen, and the link never idles
                # between windows; a handle per window drops whatever a window left behind.
                end = min(size, start + _WINDOW)
                f = sftp.open(path, "rb")
                f.seek(start)
                f.prefetch(end)
                return f, start, end

            def read() -> Iterator[bytes]:
                # A window at a time (two in flight): paramiko's prefetch of the whole file keeps
                # whatever has arrived and not been read in memory (2.2 GB for a 2 GiB disk here).
                starts = iter(range(0, size, _WINDOW))
                ahead = [window(s) for s in itertools.islice(starts, 2)]
                try:
                    while ahead:
                        f, done, end = ahead[0]
                        while done < end:
                            # In paramiko's own request size: a larger read() joins 32 KiB pieces by
                            # repeated bytes concatenation, and each piece scans every buffered one.
                            want = min(_CHUNK, end - done)
                            pieces = []
                            got = 0
                            while got < want:
                                piece = f.read(min(_REQUEST, want - got))
                                if not piece:
                                    break
                                pieces.append(piece)
                                got += len(piece)
                            if got:
                                yield b"".join(pieces)
                            if got < want:
                                return
                            done += got
                        ahead.pop(0)
                        f.close()
                        ahead.extend(window(s) for s in itertools.islice(starts, 1))
                finally:
                    for f, _, _ in ahead:
                        f.close()

            yield read()
        return
    _, stdout, stderr = client.exec_command(f"gzip -1 -c -- {shlex.quote(path)}", timeout=cloud.timeout)

    def inflate() -> Iterator[bytes]:
        z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        while packed := stdout.channel.recv(_CHUNK):
            chunk = z.decompress(packed, _CHUNK)
            while chunk:
                yield chunk
                chunk = z.decompress(z.unconsumed_tail, _CHUNK)
        status = stdout.channel.recv_exit_status()
        if status != 0 or not z.eof:
            detail = " ".join(stderr.read().decode(errors="replace").split())[:200]
            raise OSError(detail or "the stream was cut")  # reported with how far the copy got

    yield inflate()


def fetch(src: CloudSource, cloud: Eucalyptus, dest: Path) -> Fetched:
    """Copy the instance's root disk to ``dest`` (raw, sparse); checked against the node's sha256."""
    t0 = time.monotonic()
    node, path, size = locate(src, cloud)
    client = connect(cloud, node)
    try:
        remote: dict[str, str] = {}
        # The node hashes its file while we copy it: both read it once, at the same time.
        hasher = threading.Thread(
            target=_remote_sha256, args=(client, path, 24 * 3600.0, remote), daemon=True
        )
        hasher.start()
        digest = hashlib.sha256()
        got = 0
        try:
            with sparse_download(dest, size) as out, _stream(client, cloud, path, size) as chunks:
                with bytes_bar(size, f"copy {src.instance} from {node}") as bar:
                    for chunk in chunks:
                        if got + len(chunk) > size:
                            raise SourceError(f"{node}: {path} grew while it was copied: nothing kept")
                        digest.update(chunk)
                        out.write(got, chunk)
                        got += len(chunk)
                        bar.update(len(chunk))
                if got != size:
                    raise SourceError(
                        f"copy of {src.instance} from {node} ended after {got:,} of {size:,} bytes: nothing kept"
                    )
                hasher.join()
                if "error" in remote:
                    raise SourceError(f"{node}: {remote['error']}")
                if remote.get("sha256") != digest.hexdigest():
                    raise SourceError(
                        f"copy of {src.instance} from {node} does not match the node's sha256 "
                        f"({remote.get('sha256') or 'none'} != {digest.hexdigest()}): nothing kept"
                    )
                data = out.data_bytes
        except SourceError:
            raise
        except (TimeoutError, OSError, EOFError) as e:
            raise SourceError(
                f"copy of {src.instance} from {node} failed after {got:,} of {size:,} bytes: {_line(e)}; nothing kept"
            ) from None
        except Exception as e:  # paramiko's SSHException and kin: the connection went away
            if type(e).__module__.startswith("paramiko"):
                raise SourceError(
                    f"copy of {src.instance} from {node} failed after {got:,} of {size:,} bytes: {_line(e)}; "
                    "nothing kept"
                ) from None
            raise
    finally:
        client.close()
    return Fetched(
        source=str(src), cloud=src.cloud, kind="eucalyptus", path=str(dest), format="raw", size_bytes=size,
        data_bytes=data, digest=f"sha256:{digest.hexdigest()}", verified="size and sha256 computed on the node",
        seconds=round(time.monotonic() - t0, 3), where=f"{node}:{path}",
    )  # fmt: skip
