"""Real servers on loopback for the service's tests: the imaging service itself (a process), an
SMTP server whose mails the tests read (aiosmtpd), an S3-compatible server (moto), a gate that
makes a server go away and come back (:class:`Gate`), and the world of many conversion hosts
(:func:`hosts_world`: PostgreSQL, S3, the API and two worker hosts)."""

from __future__ import annotations

import contextlib
import email
import email.policy
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import yaml
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from imaging import config

SMTP_USER, SMTP_PASSWORD = "mailer", "smtp-Pa55word-never-logged"
S3_KEY_ID, S3_SECRET = "AKIAIMAGINGTEST", "s3-secret-key-never-in-a-notebook"


def unbooted_parameters(root: Path, kind: str = "export") -> Path:
    """A copy of parameters/ under ``root`` (for ``IMAGING_PARAMETERS``) whose pipeline ``kind``
    is an export without its boot check: every stage to 40-export's artifact, no 50-verify. For
    the tests of what survives a fault, where the boot is not what is tested and is most of a
    run's time (a QEMU boot under TCG)."""
    from tests.integration.bounded import parameters

    target = parameters(root)
    defaults = yaml.safe_load((target / "defaults.yaml").read_text())
    defaults["pipelines"][kind] = [s for s in config.pipeline_stages("export") if s != "50-verify"]
    (target / "defaults.yaml").write_text(yaml.safe_dump(defaults))
    return target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60, step: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(step)


class Mailbox:
    """aiosmtpd handler: keeps every message; LOGIN/PLAIN with one user and password."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.lock = threading.Lock()
        # A server that refuses for now (full, greylisting, restarting): every mail gets a 451.
        self.refusing = False
        self.refused = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd's name
        if self.refusing:
            with self.lock:
                self.refused += 1
            return "451 4.3.0 not now, try again later"
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        with self.lock:
            self.messages.append(msg)  # type: ignore[arg-type]
        return "250 OK"

    def wait(self, subject: str, to: str | None = None, timeout: float = 30) -> EmailMessage:
        def find() -> EmailMessage | None:
            with self.lock:
                for m in self.messages:
                    if subject in str(m["Subject"]) and (to is None or m["To"] == to):
                        return m
            return None

        found: EmailMessage = wait_for(f"a mail about {subject!r}", find, timeout)
        return found


def _authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
    ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
        SMTP_USER.encode(),
        SMTP_PASSWORD.encode(),
    )
    return AuthResult(success=ok)


@contextmanager
def smtp_server() -> Iterator[tuple[Mailbox, int]]:
    box = Mailbox()
    port = free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port, authenticator=_authenticate,
                            auth_require_tls=False)  # fmt: skip
    controller.start()
    try:
        yield box, port
    finally:
        controller.stop()


@contextmanager
def s3_server() -> Iterator[str]:
    """moto in server mode: a real S3-compatible HTTP endpoint on loopback."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for("the S3 server", lambda: _up(url + "/"), 60)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


class Gate:
    """A TCP forwarder on loopback in front of a server. Shut, the server is gone for its
    clients (connections refused, open ones cut) while it keeps its data, as a restarted S3
    service keeps its objects (moto keeps them in memory only: restarting it would lose them);
    opened again, on the same port, it is back."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.port = free_port()
        self.lock = threading.Lock()
        self.conns: set[socket.socket] = set()
        self.listener: socket.socket | None = None
        self.open()

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def shut(self) -> None:
        with self.lock:
            listener, self.listener = self.listener, None
            conns, self.conns = self.conns, set()
        if listener is not None:
            listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # shut
            try:
                server = socket.create_connection(("127.0.0.1", self.target), timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self.lock:
                if self.listener is not listener:
                    client.close()
                    server.close()
                    return
                self.conns |= {client, server}
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        # Either side done: both ends closed (HTTP needs no half-open connection).
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with self.lock:
            self.conns -= {src, dst}
        src.close()
        dst.close()


def s3_client(url: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id=S3_KEY_ID,
                        aws_secret_access_key=S3_SECRET)  # fmt: skip


def _up(url: str) -> bool:
    try:
        httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return False
    return True


class Service:
    """``python -m imaging serve`` as a process, with its own state directory and users."""

    def __init__(
        self, root: Path, runs: Path, config: dict[str, Any], env: dict[str, str] | None = None
    ) -> None:
        self.root, self.runs = root, runs
        self.state = root / "state"
        self.state.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_file = root / "service.yaml"
        self.config_file.write_text(yaml.safe_dump({"port": self.port, **config}))
        self.env = {**os.environ, "IMAGING_STATE": str(self.state), "IMAGING_RUNS": str(runs),
                    "IMAGING_PROGRESS": "0", **(env or {})}  # fmt: skip
        self.log = root / "server.log"
        self.tokens: dict[str, str] = {}
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "imaging", *args], capture_output=True, text=True,
                              env=self.env, timeout=timeout, check=True)  # fmt: skip

    def add_user(self, name: str, *, admin: bool = False, email: str | None = None) -> str:
        args = ["users", "add", name, "--config", str(self.config_file)]
        args += (["--admin"] if admin else []) + (["--email", email] if email else [])
        self.tokens[name] = self.cli(*args).stdout.strip()
        return self.tokens[name]

    def start(self, *extra: str) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "imaging", "serve", "--config", str(self.config_file), *extra],
                stdout=log,
                stderr=log,
                env=self.env,
            )
        wait_for(
            "the service",
            lambda: (
                self.proc is not None and (self.proc.poll() is not None or _up(self.url + "/openapi.json"))
            ),
        )
        assert self.proc.poll() is None, self.log.read_text()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=120)
        # serve without a database_url stops the private PostgreSQL it started
        assert not (self.state / "postgres" / "data" / "postmaster.pid").exists(), (
            "the private cluster runs on"
        )

    def worker_argv(self, *extra: str) -> list[str]:
        return [sys.executable, "-m", "imaging", "worker", "--config", str(self.config_file), *extra]

    def worker(self, *extra: str) -> subprocess.Popen[bytes]:
        with open(self.root / "worker.log", "ab") as log:
            return subprocess.Popen(self.worker_argv(*extra), stdout=log, stderr=log, env=self.env)

    def history(self, request_id: str) -> list[dict[str, Any]]:
        with self.client("root") as c:
            found: list[dict[str, Any]] = c.get(f"/api/v1/request_image/{request_id}").json()["history"]
        return found

    def client(self, user: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.tokens[user]}"}, timeout=60
        )

    def wait_state(
        self, user: str, request_id: str, states: set[str], timeout: float = 400
    ) -> dict[str, Any]:
        with self.client(user) as c:
            last: dict[str, Any] = {}

            def reached() -> dict[str, Any] | None:
                last.update(c.get(f"/api/v1/request_image/{request_id}").json())
                return dict(last) if last.get("state") in states else None

            try:
                found: dict[str, Any] = wait_for(
                    f"{request_id} to be {'/'.join(sorted(states))}", reached, timeout, 0.5
                )
            except AssertionError:
                raise AssertionError(f"{request_id} is {last.get('state')} ({last.get('error')})") from None
            return found


def approve_link(message: EmailMessage) -> str:
    body = message.get_content()
    m = re.search(r"(http://\S+/api/v1/approve\?token=\S+)", body)
    assert m, body
    return m.group(1)


def started_stages(run: Path) -> list[str]:
    import json

    history = json.loads((run / "state.json").read_text())["history"]
    return [h["stage"] for h in history if h["state"] == "running"]


def assert_no_secrets(service: Service, mailbox: Mailbox, extra: list[str]) -> None:
    """No bearer token, approval token, password or cloud credential (``extra``) in a notebook,
    its metadata, a run's command log or report, the run's other files, or the service's logs."""
    secrets = [*service.tokens.values(), SMTP_PASSWORD, *extra]
    for m in mailbox.messages:
        secrets += re.findall(r"token=(\S+)", m.get_content())  # approval and sign-in links
    # Everything but the artifacts, the signing key, the settings file (which holds the passwords)
    # and the database's own files (it keeps tokens only as their hashes).
    files = [
        p
        for p in service.root.rglob("*")
        if p.is_file() and p.suffix not in (".raw", ".qcow2", ".key", ".yaml") and "postgres" not in p.parts
    ]
    assert any(p.name == "commands.jsonl" for p in files) and any(p.suffix == ".ipynb" for p in files)
    assert any(p.name == "server.log" for p in files)
    assert any(p.name == "report.html" for p in files)
    for path in files:
        text = path.read_text(errors="replace")
        for secret in secrets:
            assert secret not in text, f"a secret is in {path}"


# The world of many conversion hosts: two worker processes that share nothing but the database
# (PostgreSQL on loopback) and the record store (moto's S3 on loopback, behind a Gate), each
# with its own state and runs directories as separate hosts would have, and the API on a third
# runs directory (tests/integration/test_hosts.py, tests/campaigns/).
HEARTBEAT, STALLED = 1.0, 6.0


@dataclass
class Host:
    """A conversion host: its own settings file, state and runs directories, one worker."""

    name: str
    root: Path
    env: dict[str, str]
    config_file: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log_path = self.root / "worker.log"
        before = log_path.read_bytes().count(b" started (") if log_path.exists() else 0
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "imaging", "worker", "--config", str(self.config_file)],
                                         stdout=log, stderr=log, env=self.env)  # fmt: skip
        wait_for(f"worker {self.name}", lambda: log_path.read_bytes().count(b" started (") > before, 60)

    @property
    def worker_pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def worker_name(self) -> str:
        return f"{socket.gethostname()}:{self.worker_pid}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=150)


@dataclass
class World:
    api: Service
    hosts: dict[str, Host]
    database: str
    s3_url: str
    cluster: Any  # imaging.service.postgres.Cluster
    s3: Gate
    mailbox: Mailbox | None


def host_settings(
    database: str, s3_url: str, *, keep_inputs: bool = False, stalled: float = STALLED
) -> dict[str, Any]:
    return {
        "database_url": database,
        "secret_key": "one-signing-key-for-every-host-of-this-test",
        "instances": {"i-sample": "sample:kvm"},
        "records": {"endpoint_url": s3_url, "bucket": "records", "access_key_id": S3_KEY_ID,
                    "secret_access_key": S3_SECRET, "keep_inputs": keep_inputs},
        "worker": {"embedded": False, "concurrency": 1, "heartbeat_seconds": HEARTBEAT,
                   "stalled_seconds": stalled, "poll_seconds": 1, "check_seconds": 1},
    }  # fmt: skip


@contextmanager
def hosts_world(
    root: Path, *, mail: bool = False, smtp_retry: float = 2.0, stalled: float = STALLED, boot: bool = True
) -> Iterator[World]:
    """PostgreSQL, S3 (behind a Gate), the API (users alice and root, an admin) and two worker
    hosts, not started: host ``a`` keeps no input disks in the store, host ``b`` keeps them.
    ``mail``: an SMTP server too, every host sending to it, root's address on it. ``stalled``:
    the workers' stalled_seconds (their lease is a heartbeat less). ``boot=False``: every host's
    export pipeline ends at 40-export (:func:`unbooted_parameters`; a request's result then has
    ``verified`` null and no boot verdict)."""
    from imaging.service import postgres

    site = {} if boot else {"IMAGING_PARAMETERS": str(unbooted_parameters(root))}

    cluster = postgres.Cluster(root / "postgres", durable=False, tcp_port=free_port())
    cluster.start()
    try:
        with contextlib.ExitStack() as stack:
            s3_direct = stack.enter_context(s3_server())
            gate = Gate(int(s3_direct.rsplit(":", 1)[1]))
            stack.callback(gate.shut)
            s3_url = f"http://127.0.0.1:{gate.port}"
            s3_client(s3_url).create_bucket(Bucket="records")
            extra: dict[str, Any] = {}
            mailbox = None
            if mail:
                mailbox, smtp_port = stack.enter_context(smtp_server())
                extra["smtp"] = {"host": "127.0.0.1", "port": smtp_port, "username": SMTP_USER,
                                 "password": SMTP_PASSWORD, "retry_seconds": smtp_retry}  # fmt: skip

            def conf(keep: bool = False) -> dict[str, Any]:
                return {**host_settings(cluster.url, s3_url, keep_inputs=keep, stalled=stalled), **extra}

            # The API on a third host: its own runs directory, no worker.
            api = Service(root / "api", root / "api" / "runs", conf(), site)
            create = subprocess.run([sys.executable, "-m", "imaging", "db", "upgrade", "--config", str(api.config_file)],
                                    capture_output=True, text=True, env=api.env, timeout=120)  # fmt: skip
            assert create.returncode == 0 and "schema none -> " in create.stderr, create.stderr
            api.add_user("alice")
            api.add_user("root", admin=True, email="root@example.org" if mail else None)
            hosts: dict[str, Host] = {}
            for name, keep in (("a", False), ("b", True)):
                home = root / name
                home.mkdir()
                config_file = home / "service.yaml"
                config_file.write_text(yaml.safe_dump(conf(keep)))
                env = {**os.environ, "IMAGING_STATE": str(home / "state"), "IMAGING_RUNS": str(home / "runs"),
                       "IMAGING_PROGRESS": "0", **site}  # fmt: skip
                hosts[name] = Host(name, home, env, config_file)
            try:
                api.start()
                yield World(api, hosts, cluster.url, s3_url, cluster, gate, mailbox)
            finally:
                for host in hosts.values():
                    host.stop()
                api.stop()
    finally:
        cluster.stop()
