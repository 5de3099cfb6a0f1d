"""The private PostgreSQL cluster of a one-machine service: ``serve`` with no ``database_url``.

Debian's PostgreSQL binaries, a cluster in ``<state dir>/postgres/data``, reached through a Unix
socket only (``listen_addresses`` is empty: no TCP at all) in a directory only its owner can
enter, with trust authentication (the socket's directory is the access control). ``serve``
starts it and stops it when it stops; other commands (``users``, ``db``, a ``worker`` beside
``serve``) use it while it runs, or start it for themselves and stop it again.

PostgreSQL refuses to run as root. Started by root, the cluster runs as root seen from outside
(its files stay root's, under a state directory that may be private to root) but in a user
namespace of its own whose only user is not root (``unshare --user``); nothing is chowned and
no other account is given access to the state directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from imaging import tools
from imaging.errors import CommandError, StoreError

DATABASE = "postgres"
USER = "imaging"
# The socket's path must fit in sun_path (107 bytes) with its name, ".s.PGSQL.5432".
_SOCKET_ROOM = 107 - len("/.s.PGSQL.5432")


def binary(tool: str) -> str:
    """A PostgreSQL server binary (initdb, pg_ctl): Debian keeps them out of PATH, per version."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise StoreError(
            f"PostgreSQL's {tool} is missing (apt package postgresql): install it, or set database_url", 503
        )
    return found[-1]


class Cluster:
    def __init__(self, root: Path, *, durable: bool = True, tcp_port: int | None = None) -> None:
        self.root = root
        # Tests and benchmarks that play several hosts reach it over TCP on loopback, as hosts
        # would reach a shared server; a service's own cluster has no TCP at all.
        self.tcp_port = tcp_port
        self.data = root / "data"
        self.log = root / "server.log"
        # fsync off only for throwaway clusters (tests, benchmarks): a crash may lose them.
        self.durable = durable
        self.socket_dir = root if len(str(root)) <= _SOCKET_ROOM else self._short_socket_dir()

    def _short_socket_dir(self) -> Path:
        digest = hashlib.sha256(str(self.root).encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"imaging-pg-{digest}"

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the cluster's database (the socket's directory as the host)."""
        if self.tcp_port:
            return f"postgresql+psycopg://{USER}@127.0.0.1:{self.tcp_port}/{DATABASE}"
        return f"postgresql+psycopg://{USER}@/{DATABASE}?host={self.socket_dir}"

    def _argv(self, tool: str, *args: str) -> list[str]:
        argv = [binary(tool), *args]
        if os.geteuid() == 0:  # the server's own check (geteuid() != 0) holds inside the namespace
            argv = ["unshare", "--user", "--map-user=1", "--map-group=1", *argv]
        return argv

    def _run(self, tool: str, *args: str, ok: tuple[int, ...] = (0,)) -> int:
        try:
            result = tools.run(self._argv(tool, *args), ok_codes=ok, record=False, env={"LC_ALL": "C.UTF-8"})
        except CommandError as e:
            raise StoreError(f"the private PostgreSQL cluster in {self.root}: {e}", 503) from None
        return result.exit_code

    def running(self) -> bool:
        if not (self.data / "PG_VERSION").exists():
            return False
        return self._run("pg_ctl", "-D", str(self.data), "status", ok=(0, 3, 4)) == 0

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def start(self) -> bool:
        """Make the cluster if it does not exist, start it unless it runs; True if started here."""
        with self._locked():
            self.root.chmod(0o700)
            if not (self.data / "PG_VERSION").exists():
                if self.data.exists() and any(self.data.iterdir()):  # an initdb that was interrupted
                    raise StoreError(f"{self.data} is not empty and not a cluster: remove it", 503)
                self._run("initdb", "-D", str(self.data), "-U", USER, "-A", "trust", "-E", "UTF8",
                          "--locale=C.UTF-8", "--no-instructions", *([] if self.durable else ["--no-sync"]))  # fmt: skip
                with open(self.data / "postgresql.conf", "a", encoding="utf-8") as conf:
                    conf.write("\ninclude_if_exists = 'imaging.conf'\n")
            if self.running():
                return False
            self.socket_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.socket_dir.chmod(0o700)
            # In the cluster's configuration, not pg_ctl's -o, which a shell parses.
            quoted = str(self.socket_dir).replace("'", "''")
            listen = (
                f"listen_addresses = '127.0.0.1'\nport = {self.tcp_port}"
                if self.tcp_port
                else "listen_addresses = ''"
            )
            settings = [listen, f"unix_socket_directories = '{quoted}'", "unix_socket_permissions = 0700"]
            if not self.durable:
                settings += ["fsync = off", "synchronous_commit = off", "full_page_writes = off"]
            (self.data / "imaging.conf").write_text("\n".join(settings) + "\n", encoding="utf-8")
            self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")
            return True

    def stop(self) -> None:
        with self._locked():
            if self.running():
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")


@contextlib.contextmanager
def running(cluster: Cluster) -> Iterator[Cluster]:
    """The cluster, started for the block if it was not running, and stopped after it then."""
    started = cluster.start()
    try:
        yield cluster
    finally:
        if started:
            cluster.stop()
