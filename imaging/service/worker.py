"""The worker of a conversion host (``python -m imaging worker``): Procrastinate's worker takes
requests' jobs from the shared database, and each request's pipeline runs in a child process
that this module supervises.

A request runs as ``python -m imaging export SOURCE ... --run <request id>`` (or ``resume <id>``
when its run exists), so the run id is the request id and a run that crashes or is killed is
isolated from the worker. Before it starts, the run's record is brought from the record store
when another host made its latest state (``takeover.py``). While it runs, the request's stage
follows the run's ``state.json``, and every few seconds the worker checks that the request is
still its own: a request cancelled, or taken over by another host (this worker's heartbeats
stopped reaching the database for longer than ``stalled_seconds``), has its run stopped.

Stopping: SIGTERM (or Ctrl-C) stops the worker's runs the way the CLI stops (tools killed,
mounts released, partial files removed, the interrupted attempt kept in the record) and queues
their requests again, for another worker or this one restarted. A worker killed outright takes
its runs along (they get SIGTERM from the kernel, PR_SET_PDEATHSIG) and its heartbeats stop:
``stalled_seconds`` later any other worker (or the API) queues its requests again.

A database that stops answering mid-run (a restart, a failover, a cut network) does not stop
the worker: its runs go on, supervised, for as long as no other host may take their requests
over (``stalled_seconds`` after the last heartbeat, less a heartbeat: the lease); past that
they are stopped. The worker goes on sending heartbeats, listening and fetching, and records
how each run ended (completed, failed, stopped and queued again) once the database answers:
a request never says ``running`` on a worker that is not running it for longer than its lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hmac
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import procrastinate
from procrastinate.job_context import AbortReason
from procrastinate.worker import Worker

from imaging import config
from imaging.clouds import settings as cloud_settings
from imaging.errors import ImagingError, ParameterError, StoreError
from imaging.guest import secrets
from imaging.run import lineage
from imaging.service import jobs, retention, space, takeover
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
    options = dict(req.options or {})
    # The site's secret policy unless an admin set this request's; the fingerprints allowed.
    scan = [f"--secrets={options.get('secrets') or settings.secrets}",
            *(f"--allow-secret={f}" for f in options.get("secrets_allow") or [])]  # fmt: skip
    if (config.runs_dir() / req.id / "request.json").exists():
        return [*base, "resume", req.id, *scan]
    try:
        source = settings.source_of(req.instance)
    except ParameterError:
        raise StoreError(f"instance {req.instance} is no longer configured", 409) from None
    # --option=value throughout: a value may start with '-' (a name, a clean operation to drop).
    argv = [*base, "export", source, f"--name={req.name}", f"--format={req.disk_format}",
            f"--target={req.target}", f"--run={req.id}", *scan]  # fmt: skip
    for key, flag in (("profile", "--profile"), ("layout", "--layout"), ("firmware", "--firmware"),
                      ("destination", "--destination"),
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
    (its source's, its destination's), the object store's keys for a run that publishes there
    (boto3 reads them) and the record store's (``IMAGING_RECORDS``); none of them is a notebook
    parameter, and the stage kernels do not get the record store's."""
    hidden = secret_env_names()
    env = {k: v for k, v in os.environ.items() if k not in hidden}
    env.update(IMAGING_RUNS=str(config.runs_dir()), IMAGING_PROGRESS="0")
    # Fingerprints of secret findings, the same on every host (an allow list holds wherever the
    # run resumes), and of no use to test a guessed password without the service's key.
    env[secrets.KEY_ENV] = hmac.new(
        settings.signing_key().encode(), b"secret fingerprints", "sha256"
    ).hexdigest()
    env.pop("AWS_ACCESS_KEY_ID", None)
    env.pop("AWS_SECRET_ACCESS_KEY", None)
    if settings.records.bucket:
        env["IMAGING_RECORDS"] = settings.records.env()
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


class RequestRunner:
    """What a job of :data:`imaging.service.jobs.TASK` does, on a thread of the worker.

    The database may go away while a request runs (a restart, a failover, a cut network). The
    run goes on meanwhile, supervised as before, for as long as no other host may take the
    request over: ``stalled_seconds`` after this worker's last heartbeat, less one heartbeat
    for the margin (its *lease*). Past that it is stopped, since another host may be starting it
    again. Either way the job does not end before the request says how its run ended (claimed,
    completed, failed, queued again): a job that ended while its request still said ``running``
    would leave the request running on no worker, or approved with no job.
    """

    def __init__(self, settings: Settings, store: Store, mailer: Mailer, name: str) -> None:
        self.settings = settings
        self.store = store
        self.mailer = mailer
        self.name = name
        self.actor = Actor(name, "worker")
        self.logs = settings.state_dir / "logs"
        w = settings.worker
        self.lease = w.stalled_seconds - w.heartbeat_seconds
        self.active: set[str] = set()  # the requests this worker runs now

    def run(self, context: procrastinate.JobContext, request_id: str) -> None:
        job = context.job.id
        if self._no_room(request_id, job):
            return
        try:
            req = self._recorded(context, request_id, "claim",
                                 lambda: self.store.transition(request_id, "claim", self.actor, worker=self.name, job=job))  # fmt: skip
        except StoreError as e:  # cancelled, or queued again meanwhile: this job has nothing to do
            log.info("request %s: not claimed: %s", request_id, e)
            return
        if req is None:
            return
        log.info("request %s claimed by %s (job %s)", request_id, self.name, job)
        try:
            self._run(context, req)
        except Exception as e:
            log.exception("request %s: the worker failed", request_id)
            self.finish(context, request_id, "fail", f"the worker failed: {' '.join(str(e).split())[:300]}")

    def _no_room(self, request_id: str, job: int | None) -> bool:
        """Whether this host cannot hold the request's run: then it goes back to the queue
        unclaimed, for a host with room (see space.py). Any doubt (the database away, a
        request moved on) is left to the claim, which says so."""
        try:
            req = self.store.get(request_id)
            short = space.check(self.settings, req) if req.state == "approved" else None
            if short is None or job is None:
                return False
            reason = short.reason(self.name)
            left = self.store.leave_for_space(request_id, job, self.actor, reason,
                                              self.settings.worker.space_wait_seconds)  # fmt: skip
        except StoreError:
            return False
        except Exception:  # a bug of the check must not leave the request approved with no job
            log.exception("request %s: the space check failed; claimed without it", request_id)
            return False
        if left:
            log.warning("request %s: %s (asked again in %g s)", request_id, reason,
                        self.settings.worker.space_wait_seconds)  # fmt: skip
        return left

    def _run(self, context: procrastinate.JobContext, req: ImageRequest) -> None:
        self.active.add(req.id)  # retention never touches it meanwhile
        try:
            self._run_here(context, req)
        finally:
            self.active.discard(req.id)

    def _run_here(self, context: procrastinate.JobContext, req: ImageRequest) -> None:
        run_dir = config.runs_dir() / req.id
        if self.settings.records.bucket:
            try:
                how = takeover.prepare(self.settings.records, req.id)
            except (ImagingError, OSError) as e:
                self.finish(context, req.id, "fail", f"cannot bring the run's record to this host: {e}")
                return
            log.info("request %s: run %s (%s)", req.id, req.id, how)
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{req.id}.log"
        argv = command(self.settings, req)
        log.info("request %s: %s (worker %s)", req.id, " ".join(argv[3:5]), self.name)
        with contextlib.ExitStack() as stack, open(log_path, "a", encoding="utf-8") as log_file:
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
            stage, why = self._supervise(context, req, proc, run_dir)
            if why == "shutdown":
                stack.enter_context(self._beating(context))
            code = _wait_or_stop(proc)
            _end_leftovers(req.id, run_dir)
            self._end(context, req, run_dir, log_path, stage, why, code)

    def _end(
        self,
        context: procrastinate.JobContext,
        req: ImageRequest,
        run_dir: Path,
        log_path: Path,
        stage: str | None,
        why: str | None,
        code: int,
    ) -> None:
        """Record how the run ended: completed, failed, stopped and queued again."""
        state = _read_json(run_dir / "state.json")
        if why is None and state.get("stage") not in (None, stage):  # a stage too short to be seen
            with contextlib.suppress(StoreError):
                stage = self._moved(context, req.id, str(state["stage"]))
        if why == "lost":
            log.info("request %s is no longer this worker's (cancelled, or taken over): run stopped", req.id)
        elif why in ("shutdown", "database"):
            self._requeue(context, req.id, why, state.get("stage") or stage)
        elif code in (0, 3) and (run_dir / "result.json").exists():  # 3: made, but its boot was degraded
            result = _read_json(run_dir / "result.json")
            result["audit_head"] = _read_json(run_dir / "audit.json").get("head")
            # A site's pipeline may end without the boot check (parameters' pipelines).
            verdict = (result.get("boot") or {}).get("verdict") or "not booted"
            self.finish(context, req.id, "complete", f"completed ({verdict})", result=result)
        else:
            error = state.get("error") if code == 1 else ""
            error = error or _last_error(log_path) or f"the run exited with code {code} (see {log_path})"
            self.finish(context, req.id, "fail", error)

    def _supervise(
        self,
        context: procrastinate.JobContext,
        req: ImageRequest,
        proc: subprocess.Popen[bytes],
        run_dir: Path,
    ) -> tuple[str | None, str | None]:
        """Follow the run until it exits, or until it must stop: returns (its stage, why it was
        stopped: ``shutdown``, ``lost``, ``database``, or None when it ended by itself)."""
        stage, checked = req.stage, 0.0
        reached, away, away_since = time.monotonic(), False, 0.0  # when the database last answered
        while proc.poll() is None:
            time.sleep(0.5)
            if _stopping(context):  # the worker stops; a cancelled job's request is seen below
                return stage, "shutdown"
            now = _read_json(run_dir / "state.json")
            try:
                # Only a running run's stage: a resumed run's state.json names the old failure first.
                if now.get("state") == "running" and now.get("stage") not in (None, stage):
                    stage = self._moved(context, req.id, str(now["stage"]))
                    reached = time.monotonic()
                if time.monotonic() - checked > self.settings.worker.check_seconds:
                    checked = time.monotonic()
                    if not self.store.held_by(req.id, self.name, context.job.id):
                        return stage, "lost"
                    reached = time.monotonic()
                if away and reached > away_since:
                    log.info("request %s: the database answers again; the run went on", req.id)
                    away = False
            except StoreError as e:
                if e.status < 500:  # the request moved on (the stage could not be recorded)
                    return stage, "lost"
                if not away:
                    away, away_since = True, time.monotonic()
                    log.warning("request %s: %s; the run goes on for up to %g s", req.id, e, self.lease)
                if time.monotonic() - reached > self.lease:
                    log.warning("request %s: the database was away for %.0f s, past this worker's lease: "
                                "run stopped", req.id, time.monotonic() - reached)  # fmt: skip
                    return stage, "database"
        return stage, None

    @contextlib.contextmanager
    def _beating(self, context: procrastinate.JobContext) -> Iterator[None]:
        """This worker's heartbeat, kept alive while its stopped run cleans up and its request is
        queued again. Procrastinate stops the heartbeat as soon as the worker is told to stop,
        then waits for its jobs: a run whose clean-up outlasted ``stalled_seconds`` had its
        request queued again by the API as a *lost* worker's, at the stage the database last
        knew, and counted against ``max_lost``."""
        if context.job.worker_id is None:
            yield
            return
        worker_id: int = context.job.worker_id
        stop = threading.Event()

        def beat() -> None:
            while True:
                with contextlib.suppress(StoreError):  # the database away: the lease runs out
                    self.store.heartbeat(worker_id)
                if stop.wait(self.settings.worker.heartbeat_seconds):
                    return

        thread = threading.Thread(target=beat, name="heartbeat while stopping", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def _moved(self, context: procrastinate.JobContext, request_id: str, stage: str) -> str:
        self.store.transition(request_id, "stage", self.actor, f"stage {stage}", worker=self.name,
                              job=context.job.id, stage=stage)  # fmt: skip
        return stage

    def _recorded(
        self,
        context: procrastinate.JobContext,
        request_id: str,
        what: str,
        change: Callable[[], ImageRequest],
    ) -> ImageRequest | None:
        """``change`` made, tried again while the database is away (see the class); StoreError
        when refused (the request moved on). None only when the worker stops and the database
        has been away for ``stalled_seconds``: the request is then left to the recovery of this
        worker's stalled job by the first host that reaches the database."""
        since = None
        while True:
            try:
                return change()
            except StoreError as e:
                if e.status < 500:
                    raise
                if since is None:
                    since = time.monotonic()
                    log.warning("request %s: cannot record %s yet (%s); trying again", request_id, what, e)
                if _stopping(context) and time.monotonic() - since > self.settings.worker.stalled_seconds:
                    log.warning("request %s: %s not recorded: the database is still away; another host "
                                "will find this worker's job stalled", request_id, what)  # fmt: skip
                    return None
            time.sleep(2)

    def _requeue(
        self, context: procrastinate.JobContext, request_id: str, why: str, stage: str | None
    ) -> None:
        at = stage or "the start"
        reason = {
            "shutdown": f"worker {self.name} stopped: its run was interrupted at {at}; queued again",
            "database": f"the database was unreachable from worker {self.name} for over {self.lease:g} s: "
            f"its run was stopped at {at}; queued again",
        }[why]  # fmt: skip
        try:
            done = self._recorded(context, request_id, "its requeue", lambda: self.store.transition(
                request_id, "requeue", self.actor, reason, worker=self.name, job=context.job.id, stage=stage))  # fmt: skip
        except StoreError as e:  # taken over already
            log.warning("request %s: not queued again by this worker: %s", request_id, e)
            return
        if done is not None:
            log.info("request %s: %s", request_id, reason)

    def finish(
        self,
        context: procrastinate.JobContext,
        request_id: str,
        action: str,
        message: str,
        *,
        result: dict[str, Any] | None = None,
    ) -> None:
        error = None if action == "complete" else message
        try:
            req = self._recorded(context, request_id, f"its end ({message})", lambda: self.store.transition(
                request_id, action, self.actor, message, worker=self.name, job=context.job.id, error=error,
                result=result))  # fmt: skip
        except StoreError as e:
            log.warning("request %s: %s", request_id, e)
            return
        if req is None:
            return
        log.info("request %s: %s", request_id, message)
        try:
            self.mailer.request_finished(req)
        except StoreError as e:
            log.warning("request %s: no mail sent: %s", request_id, e)


def _stopping(context: procrastinate.JobContext) -> bool:
    return context.should_abort() and context.abort_reason() == AbortReason.SHUTDOWN


def _wait_or_stop(proc: subprocess.Popen[bytes]) -> int:
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


def _end_leftovers(request_id: str, run_dir: Path) -> None:
    """Whatever the run started that still runs now that the run's process has exited, ended:
    a run killed outright (on a host short of memory the OOM killer's pick is often the run)
    could not stop it, and it must not wait for a resume that may never come (lineage.py)."""
    left = lineage.end(run_dir.resolve(), _STOP_GRACE)
    if left:
        log.warning("request %s: its run left %d processes running, ended now: %s", request_id, len(left),
                    "; ".join(left)[:1000])  # fmt: skip


def recover(store: Store, mailer: Mailer, settings: Settings) -> None:
    """Queue again the requests of workers whose heartbeats stopped (see Store.recover_stalled);
    the admins hear of those that went to error."""
    for req in store.recover_stalled(settings.worker.stalled_seconds, settings.worker.max_lost):
        log.warning("request %s: %s", req.id, req.transitions[-1].reason)
        if req.state == "error":
            mailer.request_finished(req)


async def _recovery_loop(store: Store, mailer: Mailer, settings: Settings) -> None:
    said = _Once()
    while True:
        try:
            await asyncio.to_thread(recover, store, mailer, settings)
            said.clear()
        except Exception as e:  # the database is away: the next round tries again
            said.warn("recovering stalled requests: %s", _brief(e))
        await asyncio.sleep(settings.worker.heartbeat_seconds)


async def _retention_loop(store: Store, settings: Settings, runner: RequestRunner) -> None:
    """Finished runs past their retention removed, and taken-over runs' old directories
    (retention.py): at start, then every ``retention.every``; nothing to do without a
    retention or a record store."""
    r = settings.retention
    if not settings.records.bucket and all(r.store_seconds(state) is None for state in retention.FINAL):
        return
    said = _Once()
    while True:
        try:
            done = await asyncio.to_thread(retention.sweep, settings, store, set(runner.active))
            if any(done.values()):
                log.info(
                    "retention: %s", ", ".join(f"{len(v)} {k.replace('_', ' ')}" for k, v in done.items())
                )
            said.clear()
        except Exception as e:  # the database away: the next round tries again
            said.warn("retention: %s", _brief(e))
        await asyncio.sleep(r.every)


class _Once:
    """A warning said once while a problem lasts (and again each minute), not at every try."""

    def __init__(self) -> None:
        self.last: float | None = None

    def warn(self, message: str, *args: Any) -> None:
        if self.last is None or time.monotonic() - self.last > 60:
            self.last = time.monotonic()
            log.warning(message, *args)

    def clear(self) -> None:
        self.last = None


def _brief(e: BaseException) -> str:
    """An error in one line (a database's run over several)."""
    return " ".join(str(e.__cause__ or e).split())[:300] or type(e).__name__


def _database_away(e: BaseException) -> bool:
    """Whether ``e`` says the database could not be reached (as Procrastinate wraps psycopg's)."""
    import psycopg

    return isinstance(e, psycopg.OperationalError) or isinstance(e.__cause__, psycopg.OperationalError)


# Procrastinate's own heartbeat query, told whether this worker's row is still there (another
# worker starting prunes the rows of workers whose heartbeats stopped for stalled_seconds).
_HEARTBEAT = "UPDATE procrastinate_workers SET last_heartbeat = now() WHERE id = %(worker_id)s RETURNING id"


class _Worker(Worker):
    """Procrastinate's worker, made to outlive a database that goes away for a while.

    As it comes (3.10), a failed fetch stops the worker, which aborts every running job, and a
    failed heartbeat ends its heartbeats for good (the side-task monitor stops watching once
    the periodic deferrer, which has nothing to do here, returns): a worker still running its
    jobs would then be taken for lost. Here the heartbeat, the listener and the fetch try again
    instead, the end of a job is recorded once the database is back, and a worker whose row was
    pruned meanwhile (taken for lost: its requests were queued again elsewhere) starts again.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fetching = _Once()

    async def _update_heartbeat(self) -> None:
        away = False
        while True:
            await asyncio.sleep(self.update_heartbeat_interval)
            try:
                rows = await self.app.connector.execute_query_all_async(_HEARTBEAT, worker_id=self.worker_id)
            except Exception as e:
                if not away:
                    log.warning("worker %s: no heartbeat written (%s); its runs go on", self.worker_name,
                                _brief(e))  # fmt: skip
                away = True
                continue
            if away:
                log.info("worker %s: heartbeats written again", self.worker_name)
                away = False
            if not rows:
                log.warning("worker %s was taken for lost while the database was away: starting again",
                            self.worker_name)  # fmt: skip
                self.stop()
                return

    async def _listen(self) -> None:
        said = _Once()
        while True:
            try:
                await self.app.job_manager.listen_for_jobs(
                    on_notification=self._handle_notification, queues=self.queues
                )
            except Exception as e:
                said.warn("worker %s: not listening for jobs (%s); polling", self.worker_name, _brief(e))
            await asyncio.sleep(self.fetch_job_polling_interval)
            self._new_job_event.set()  # a job may have been queued while nobody listened

    def _start_side_tasks(self) -> list[asyncio.Task[Any]]:
        # No periodic deferrer: there are no periodic tasks.
        return [
            asyncio.create_task(self._update_heartbeat(), name="update_heartbeats"),
            asyncio.create_task(self._poll_jobs_to_abort(), name="poll_jobs_to_abort"),
            asyncio.create_task(self._listen(), name="listener"),
        ]

    async def _fetch_and_process_jobs(self) -> None:
        try:
            await super()._fetch_and_process_jobs()
        except Exception as e:
            if not _database_away(e):
                log.exception("worker %s: cannot fetch jobs", self.worker_name)
            self._fetching.warn("worker %s: cannot fetch jobs (%s); trying again every %g s", self.worker_name,
                                _brief(e), self.fetch_job_polling_interval)  # fmt: skip
        else:
            self._fetching.clear()

    async def _persist_job_status(self, *args: Any, **kwargs: Any) -> None:
        delay, since = 1.0, time.monotonic()
        while True:
            try:
                await super()._persist_job_status(*args, **kwargs)
                return
            except Exception as e:
                if not _database_away(e):  # ended already (a recovery that found it stalled)
                    log.warning("worker %s: a job's end not recorded: %s", self.worker_name, _brief(e))
                    return
                if self._stop_event.is_set() and time.monotonic() - since > self.stalled_worker_timeout:
                    log.warning("worker %s: a job's end not recorded, the database is away: it will be "
                                "found stalled", self.worker_name)  # fmt: skip
                    return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)


async def _serve(settings: Settings, store: Store, concurrency: int, stopping: asyncio.Event) -> None:
    """One Procrastinate worker, and the recovery of other workers' stalled requests beside it,
    until asked to stop (returns), taken for lost (returns, to start again), or it cannot start
    (raises: the database is away)."""
    name = f"{socket.gethostname()}:{os.getpid()}"
    mailer = Mailer(settings, store)
    runner = RequestRunner(settings, store, mailer, name)
    w = settings.worker
    app = jobs.connect(settings.sqlalchemy_url, concurrency)
    async with app.open_async():
        worker = _Worker(
            app,
            queues=[jobs.QUEUE],
            name=name,
            concurrency=concurrency,
            additional_context={"runner": runner},
            install_signal_handlers=False,  # ours (serve_forever) outlive one worker
            shutdown_graceful_timeout=0,  # on stop, running jobs are told at once (they requeue)
            update_heartbeat_interval=w.heartbeat_seconds,
            stalled_worker_timeout=w.stalled_seconds,
            fetch_job_polling_interval=w.poll_seconds,
            abort_job_polling_interval=w.check_seconds,
            delete_jobs="successful",
        )
        run = asyncio.create_task(worker.run())
        recovery = asyncio.create_task(_recovery_loop(store, mailer, settings))
        sweeping = asyncio.create_task(_retention_loop(store, settings, runner))
        stop = asyncio.create_task(stopping.wait())
        log.info("worker %s started (%d at once)", name, concurrency)
        try:
            await asyncio.wait([run, stop], return_when=asyncio.FIRST_COMPLETED)
            if not run.done():
                worker.stop()
            await run  # raises what stopped it, if not us
        finally:
            recovery.cancel()
            sweeping.cancel()
            stop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await recovery
            with contextlib.suppress(asyncio.CancelledError):
                await sweeping


def serve_forever(settings: Settings, store: Store, concurrency: int | None = None) -> int:
    """``python -m imaging worker``: run until SIGTERM or Ctrl-C; a database that cannot be
    reached when the worker starts is waited for."""
    concurrency = settings.worker.concurrency if concurrency is None else concurrency
    if not 1 <= concurrency <= 16:
        raise ParameterError(f"--concurrency must be 1 to 16, not {concurrency}")

    async def main() -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stopping.set)
        delay = 2.0
        while not stopping.is_set():
            try:
                await _serve(settings, store, concurrency, stopping)
                delay = 2.0
            except Exception as e:  # the database is away (psycopg's, procrastinate's, ours)
                log.warning(
                    "worker stopped: %s; starting again in %.0f s", " ".join(str(e).split())[:300], delay
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), delay)
                delay = min(delay * 2, 60.0)
        log.info("worker stopped")

    asyncio.run(main())
    return 0
