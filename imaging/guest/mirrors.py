"""The only way out of a package install's sandbox: a proxy to the package mirrors.

A package install needs the network, and the network is where a hostile image's tools would
reach the host's own services (anything on 127.0.0.1, a database, a docker socket's TCP port),
the cloud's metadata service at 169.254.169.254 with its credentials, or the rest of the LAN.
So the sandbox gets a network namespace of its own with nothing in it but loopback, and on its
127.0.0.1:3128 this proxy, whose socket is made inside that namespace by a thread of ours that
steps in and out again. apt and yum honour ``http_proxy``/``https_proxy``; nothing in the
sandbox needs a resolver, since the proxy resolves the names.

The proxy forwards ``GET``/``HEAD`` of ``http://`` URLs and ``CONNECT`` (https) only to hosts on
the run's mirror list (the profile's ``mirrors``, and ``package_mirrors`` in
parameters/defaults.yaml), on ports 80 and 443, and only when the name resolves to an address
that is not loopback, link-local (the metadata service), multicast, unspecified or one of this
host's own. Anything else gets a 403 whose reason apt prints, and a line in the record.
"""

from __future__ import annotations

import contextlib
import ctypes
import fnmatch
import ipaddress
import os
import socket
import threading
from collections import Counter
from collections.abc import Sequence
from urllib.parse import urlsplit

import psutil

PORT = 3128
URL = f"http://127.0.0.1:{PORT}"
_CLONE_NEWNET = 0x40000000
_IP_FREEBIND = 15
_HEAD_LIMIT = 64 << 10
_IDLE = 120.0  # seconds a connection may stay silent
_LIBC = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _LIBC.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _host_addresses() -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    found = set()
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                with contextlib.suppress(ValueError):
                    found.add(ipaddress.ip_address(a.address.split("%")[0]))
    return found


def forbidden(address: str, own: set[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> str:
    """Why a package install may not reach ``address`` ('' when it may)."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address (the cloud's metadata service lives there)"
    if ip.is_multicast or ip.is_unspecified:
        return "not a host's address"
    if ip in own:
        return "this host's own address"
    return ""


class MirrorProxy:
    """Started with :meth:`listen_in` (a network namespace), stopped with :meth:`close`."""

    def __init__(self, hosts: Sequence[str]) -> None:
        self.hosts = [h.lower() for h in hosts]
        self.fetched: Counter[str] = Counter()
        self.refused: list[str] = []
        self._own = _host_addresses()
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()

    def allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return any(fnmatch.fnmatchcase(host, pattern) for pattern in self.hosts)

    def listen_in(self, netns: int) -> None:
        """Listen on 127.0.0.1:3128 inside the network namespace ``netns`` (a file descriptor)."""
        made: list[socket.socket | BaseException] = []

        def make() -> None:
            # setns changes this thread only, which ends here either way.
            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            try:
                _setns(netns)
                try:
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    # Loopback is brought up by bubblewrap after this: bind before it has its address.
                    sock.setsockopt(socket.SOL_IP, _IP_FREEBIND, 1)
                    sock.bind(("127.0.0.1", PORT))
                    sock.listen(64)
                    made.append(sock)
                finally:
                    _setns(own)
            except BaseException as e:
                made.append(e)
            finally:
                os.close(own)

        thread = threading.Thread(target=make, name="mirror proxy setup")
        thread.start()
        thread.join()
        if isinstance(made[0], BaseException):
            raise made[0]
        self._listener = made[0]
        threading.Thread(target=self._accept, name="mirror proxy", daemon=True).start()

    def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            for s in list(self._open):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def describe(self) -> str:
        """For the record: where the install went, and what it was refused."""
        went = ", ".join(f"{h} ({n})" for h, n in sorted(self.fetched.items())) or "nowhere"
        refused = f"; refused: {', '.join(dict.fromkeys(self.refused))}" if self.refused else ""
        return f"mirrors reached: {went}{refused}"

    def _accept(self) -> None:
        while (listener := self._listener) is not None:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            threading.Thread(
                target=self._serve, args=(client,), name="mirror proxy client", daemon=True
            ).start()

    def _track(self, *socks: socket.socket) -> None:
        with self._lock:
            self._open.update(socks)

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        self._track(client)
        try:
            client.settimeout(_IDLE)
            head, rest = _read_head(client)
            if head is None:
                return
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = (lines[0].split(" ", 2) + ["", ""])[:3]
            if method == "CONNECT":
                host, _, port_text = target.rpartition(":")
                host, path = host.strip("[]"), ""
            elif method in ("GET", "HEAD") and target.lower().startswith("http://"):
                url = urlsplit(target)
                host, port_text = url.hostname or "", str(url.port or 80)
                path = (url.path or "/") + (f"?{url.query}" if url.query else "")
            else:
                _reply(client, 405, "only GET, HEAD and CONNECT reach the package mirrors")
                return
            port = int(port_text) if port_text.isdigit() else 0
            why = self._check(host, port)
            if why:
                self.refused.append(f"{host}:{port} ({why})")
                _reply(client, 403, f"{host} is not a package mirror this run may reach: {why}")
                return
            upstream, why = self._connect(host, port)
            if upstream is None:
                if why:
                    _reply(client, 403, f"{host} is not a package mirror this run may reach: it is {why}")
                else:
                    _reply(client, 502, f"{host} cannot be reached")
                return
            self._track(upstream)
            self.fetched[host.lower()] += 1
            if method == "CONNECT":
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                if rest:
                    upstream.sendall(rest)
                _relay(client, upstream)
                return
            # One request per connection: the answer, then both ends close (apt reconnects).
            kept = [
                h
                for h in lines[1:]
                if h and not h.lower().startswith(("proxy-", "connection:", "keep-alive:"))
            ]
            request = "\r\n".join([f"{method} {path} HTTP/1.1", *kept, "Connection: close", "", ""])
            upstream.sendall(request.encode("latin-1"))
            _copy(upstream, client)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                if s is not None:
                    with self._lock:
                        self._open.discard(s)
                    s.close()

    def _check(self, host: str, port: int) -> str:
        if not host or not self.allowed(host):
            return "not on the mirror list"
        if port not in (80, 443):
            return f"port {port}"
        return ""

    def _connect(self, host: str, port: int) -> tuple[socket.socket | None, str]:
        """A connection to one of ``host``'s addresses that may be reached; else why not."""
        try:
            found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            return None, ""
        why = ""
        for family, kind, proto, _, address in found:
            if bad := forbidden(str(address[0]), self._own):
                self.refused.append(f"{host} at {address[0]} ({bad})")
                why = why or bad
                continue
            sock = socket.socket(family, kind, proto)
            sock.settimeout(30)
            try:
                sock.connect(address)
            except OSError:
                sock.close()
                continue
            sock.settimeout(_IDLE)
            return sock, ""
        return None, why


def _read_head(client: socket.socket) -> tuple[bytes | None, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > _HEAD_LIMIT:
            _reply(client, 431, "request head too large")
            return None, b""
        chunk = client.recv(65536)
        if not chunk:
            return None, b""
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _reply(client: socket.socket, code: int, reason: str) -> None:
    reason = reason.replace("\r", " ").replace("\n", " ")[:200]
    with contextlib.suppress(OSError):
        client.sendall(
            f"HTTP/1.1 {code} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
        )


def _copy(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(1 << 16):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def _relay(a: socket.socket, b: socket.socket) -> None:
    """Copy both ways (a tunnel) until both sides are done."""
    back = threading.Thread(target=_copy, args=(b, a), daemon=True)
    back.start()
    _copy(a, b)
    back.join()
