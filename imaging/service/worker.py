"""The scheduler: claims approved requests and runs each one's pipeline in a child process.

A request runs as ``python -m imaging export SOURCE ... --run <request id>`` (or ``resume <id>``
when its run exists: approving a failed request again resumes it at the failed stage), so a run
that crashes or is killed is isolated from the worker. While it runs, the worker renews its lease
on the request and copies the stage the run's ``state.json`` names into the request.

Stopping: SIGTERM to the worker stops its children the way the CLI stops on SIGTERM (tools
killed, mounts released, partial files removed) and leaves the request in ``error``; a worker
killed outright takes its children along (PR_SET_PDEATHSIG sends them SIGTERM) and stops renewing
its lease, which then expires into ``error``. Either way, approving again resumes.

One worker process runs ``concurrency`` requests at once (threads; the work is in the children).
More hosts run more workers against a PostgreSQL store; the claim is one conditional UPDATE.
Celery (DESIGN's scale-out) can replace the claim loop later without touching the rest.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from imaging import config
from imaging.clouds import settings as cloud_settings
from imaging.errors import ParameterError, StoreError
from imaging.service.notify import Mailer
from imaging.service.settings import Settings, secret_env_names
from imaging.service.store import Actor, ImageRequest, Store

log = logging.getLogger("imaging.service.worker")

_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1
# How long a stopped run gets to clean up (the CLI's own grace is 30 s) before it is killed.
_STOP_GRACE = 60.0


def _term_with_parent() -> None:
    # In the child before exec: when the worker thread that started it dies, even by SIGKILL,
    # the run gets SIGTERM and cleans up like any interrupted CLI run.
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def command(settings: Settings, req: ImageRequest) -> list[str]:
    """The CLI run of a request: a new run, or the existing one resumed."""
    base = [sys.executable, "-m", "imaging"]
    if (config.runs_dir() / req.id / "request.json").exists():
        return [*base, "resume", req.id]
    try:
        source = settings.source_of(req.instance)
    except ParameterError:
        raise StoreError(f"instance {req.instance} is no longer configured", 409) from None
    # --option=value throughout: a value may start with '-' (a name, a clean operation to drop).
    argv = [*base, "export", source, f"--name={req.name}", f"--format={req.disk_format}",
            f"--target={req.target}", f"--run={req.id}"]  # fmt: skip
    options = dict(req.options or {})
    for key, flag in (("profile", "--profile"), ("layout", "--layout"), ("destination", "--destination"),
                      ("boot_marker", "--boot-marker")):  # fmt: skip
        if options.get(key):
            argv.append(f"{flag}={options[key]}")
    for key, flag in (
        ("clean", "--clean"),
        ("packages_install", "--install"),
        ("packages_remove", "--remove"),
    ):
        if options.get(key):
            argv.append(f"{flag}={','.join(options[key])}")
    if req.kind == "image":
        argv += ["--kind=image", f"--vis={req.vis or 'private'}"]
        argv += [f"--shared-with={name}" for name in req.shared_with]
    return argv


def child_env(settings: Settings, req: ImageRequest) -> dict[str, str]:
    """The run's environment: no secret of the service but those of the clouds the request uses
    (its source's, its destination's) and the object store's keys for a run that publishes there
    (boto3 reads them); none of them is a notebook parameter."""
    hidden = secret_env_names()
    env = {k: v for k, v in os.environ.items() if k not in hidden}
    env.update(IMAGING_RUNS=str(config.runs_dir()), IMAGING_PROGRESS="0")
    env.pop("AWS_ACCESS_KEY_ID", None)
    env.pop("AWS_SECRET_ACCESS_KEY", None)
    destination = (req.options or {}).get("destination") if req.kind == "image" else None
    with contextlib.suppress(ParameterError):
        used = settings.clouds_used(settings.source_of(req.instance), destination)
        if used:
            env[cloud_settings.ENV] = cloud_settings.dump_clouds(used)
    if req.kind == "image" and destination in (None, "s3"):
        p = settings.publish
        env.update(
            IMAGING_S3_BUCKET=p.bucket,
            IMAGING_S3_ENDPOINT=p.endpoint_url,
            IMAGING_S3_REGION=p.region,
            IMAGING_S3_PREFIX=p.prefix,
        )
        if p.access_key_id.get_secret_value():
            env["AWS_ACCESS_KEY_ID"] = p.access_key_id.get_secret_value()
            env["AWS_SECRET_ACCESS_KEY"] = p.secret_access_key.get_secret_value()
    return env


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _last_error(log_path: Path) -> str:
    with contextlib.suppress(OSError):
        for line in reversed(log_path.read_text(encoding="utf-8", errors="replace").splitlines()):
            if line.startswith("imaging: error: "):
                return line.removeprefix("imaging: error: ")
    return ""


class Worker:
    def __init__(self, settings: Settings, store: Store, mailer: Mailer | None = None, *,
                 concurrency: int | None = None) -> None:  # fmt: skip
        self.settings = settings
        self.store = store
        self.mailer = mailer or Mailer(settings, store)
        # 0: no claiming, only the housekeeping of leases (a `serve` without its own worker).
        self.concurrency = settings.worker.concurrency if concurrency is None else concurrency
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.logs = settings.state_dir / "logs"

    def start(self) -> None:
        """Start the claim loops; with a concurrency of 0, only the lease housekeeping."""
        self.logs.mkdir(parents=True, exist_ok=True)
        for slot in range(max(self.concurrency, 1)):
            name = f"{socket.gethostname()}:{os.getpid()}:{slot}"
            t = threading.Thread(target=self.loop, args=(name, self.concurrency > 0), name=f"worker-{slot}",
                                 daemon=True)  # fmt: skip
            t.start()
            self.threads.append(t)

    def shutdown(self) -> None:
        """Stop claiming, stop the running children (they clean up), wait for them."""
        self.stop.set()
        for t in self.threads:
            t.join()

    def loop(self, name: str, claim: bool = True) -> None:
        if claim:
            log.info("worker %s started", name)
        while not self.stop.is_set():
            try:
                self.housekeeping()
                req = self.store.claim(name, self.settings.worker.lease_seconds) if claim else None
            except Exception:  # the database may be away for a moment: keep trying
                log.exception("worker %s: cannot claim", name)
                req = None
            if req is None:
                self.stop.wait(self.settings.worker.poll_seconds)
                continue
            try:
                self.run(req, name)
            except Exception:
                log.exception("worker %s: request %s", name, req.id)
                self.finish(req.id, name, "fail", "the worker failed: see the service log")
        if claim:
            log.info("worker %s stopped", name)

    def housekeeping(self) -> None:
        """Requests whose worker was lost go to error, and the admins hear of it."""
        for request_id in self.store.expire_leases():
            log.warning("request %s: its worker was lost; it is in error now", request_id)
            self.mailer.request_finished(self.store.get(request_id))

    def run(self, req: ImageRequest, name: str) -> None:
        lease = self.settings.worker.lease_seconds
        run_dir = config.runs_dir() / req.id
        log_path = self.logs / f"{req.id}.log"
        argv = command(self.settings, req)
        log.info("request %s: %s (worker %s)", req.id, " ".join(argv[3:5]), name)
        with open(log_path, "a", encoding="utf-8") as log_file:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log_file,
                env=child_env(self.settings, req),
                cwd=config.PROJECT,
                start_new_session=True,
                preexec_fn=_term_with_parent,
            )
            stage, beat, lost = req.stage, time.monotonic(), False
            renewed = beat  # when the database last renewed our lease
            while proc.poll() is None:
                if self.stop.wait(0.5) or lost:
                    break
                # Only a running run's stage: a resumed run's state.json names the old failure first.
                now = _read_json(run_dir / "state.json")
                if now.get("state") == "running" and now.get("stage") not in (None, stage):
                    stage = self._moved(req.id, name, str(now["stage"]), stage)
                # The lease is renewed well before it runs out, and often enough that a request
                # cancelled while it runs stops within seconds (the renewal is refused then).
                if time.monotonic() - beat > min(lease / 3, 5.0):
                    beat = time.monotonic()
                    try:
                        lost = not self.store.heartbeat(req.id, name, lease)
                        renewed = beat
                    except Exception as e:  # the database is away (a restart): keep supervising...
                        log.warning(
                            "request %s: cannot renew the lease (%s); the run goes on", req.id, _brief(e)
                        )
                        # ...until the lease has run out: the request is then no longer ours (the
                        # service moves it to error, an approval may resume it elsewhere).
                        if time.monotonic() - renewed >= lease:
                            log.error("request %s: the lease ran out while the database was away: "
                                      "stopping the run", req.id)  # fmt: skip
                            lost = True
            code = self._wait_or_stop(proc)
        state = _read_json(run_dir / "state.json")
        if state.get("stage") not in (None, stage) and not lost:  # a stage too short to be seen
            self._moved(req.id, name, str(state["stage"]))
        if lost:
            log.info("request %s was cancelled or lost: run stopped", req.id)
        elif code in (0, 3) and (run_dir / "result.json").exists():  # 3: made, but its boot was degraded
            result = _read_json(run_dir / "result.json")
            result["audit_head"] = _read_json(run_dir / "audit.json").get("head")
            self.finish(req.id, name, "complete", f"completed ({(result.get('boot') or {}).get('verdict')})",
                        result=result)  # fmt: skip
        elif self.stop.is_set():
            self.finish(req.id, name, "fail", "interrupted: the worker was stopped; approve again to resume")
        else:
            error = state.get("error") if code == 1 else _last_error(log_path)
            self.finish(req.id, name, "fail", error or f"the run exited with code {code} (see {log_path})")

    def _wait_or_stop(self, proc: subprocess.Popen[bytes]) -> int:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=_STOP_GRACE)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return int(proc.returncode)

    def _moved(self, request_id: str, name: str, stage: str, before: str | None = None) -> str:
        """The request follows the run to ``stage``; if the database is away, it is tried again
        on the next look (the stage the request is known to be in is returned)."""
        try:
            self.store.transition(request_id, "stage", Actor(name, "worker"), f"stage {stage}", worker=name,
                                  stage=stage)  # fmt: skip
        except StoreError:
            pass
        except Exception as e:
            log.warning("request %s: cannot record stage %s yet (%s)", request_id, stage, _brief(e))
            return before or stage
        return stage

    def finish(self, request_id: str, name: str, action: str, message: str, *,
               result: dict[str, Any] | None = None) -> None:  # fmt: skip
        """The request's end as the run's: tried again while the database is away, for as long
        as our lease holds; after that the lease's expiry says the worker was lost, which is
        what happened, and approving again finds the run as it is."""
        error = None if action == "complete" else message
        deadline = time.monotonic() + self.settings.worker.lease_seconds
        while True:
            try:
                req = self.store.transition(request_id, action, Actor(name, "worker"), message, worker=name,
                                            error=error, result=result)  # fmt: skip
                break
            except StoreError as e:
                log.warning("request %s: %s", request_id, e)
                return
            except Exception as e:
                if time.monotonic() >= deadline:
                    log.error("request %s: could not record %r (%s): its lease will expire into error",
                              request_id, message, _brief(e))  # fmt: skip
                    return
                log.warning(
                    "request %s: cannot record its end yet (%s); trying again", request_id, _brief(e)
                )
                time.sleep(1.0)
        log.info("request %s: %s", request_id, message)
        self.mailer.request_finished(req)


def _brief(e: BaseException) -> str:
    """A database error in one line (SQLAlchemy's own run over many)."""
    text = " ".join(str(getattr(e, "orig", None) or e).split())
    return f"{type(e).__name__}: {text[:200]}"


def serve_forever(settings: Settings, store: Store, concurrency: int | None = None) -> int:
    """``python -m imaging worker``: run until SIGTERM or Ctrl-C, then stop cleanly."""
    if concurrency is not None and not 1 <= concurrency <= 16:
        raise ParameterError(f"--concurrency must be 1 to 16, not {concurrency}")
    worker = Worker(settings, store, concurrency=concurrency)

    def stop(signum: int, frame: Any) -> None:
        log.info("signal %d: stopping (running requests are interrupted and go to error)", signum)
        worker.stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    worker.start()
    while any(t.is_alive() for t in worker.threads):
        for t in worker.threads:
            t.join(timeout=0.5)
    return 0
