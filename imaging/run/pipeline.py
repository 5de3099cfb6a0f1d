"""Stages as data, each one notebook run by papermill; resume at the stage that failed.

A run executes the notebooks its kind lists in ``parameters/defaults.yaml``, in order, each with
the request's values for the parameters that notebook declares (papermill's ``inspect_notebook``
tells which), into ``runs/<id>/notebooks/``. A stage is complete when its executed notebook sits
at its final name; it is renamed there only on success. Running a failed run again skips the
completed stages and starts at the failed one. After every stage, whatever a dead kernel could
have left (partial files, mounts) is swept up, and the kernel itself is always shut down. Before
an executed notebook gets its final name, its HTML render and its place on the audit chain, the
summary of what the stage did (or of how it failed) goes in under its title (``summary.py``).
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import fcntl
import functools
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from imaging import config, sparse
from imaging.clouds.settings import is_cloud_source
from imaging.disk import mounts
from imaging.errors import ImagingError, ParameterError
from imaging.guest import limits
from imaging.run import audit, full, killed, lineage, pages, record, scraps, summary, zygote
from imaging.run.request import Request
from imaging.samples import catalog
from imaging.workspace import Workspace, write_json

KERNEL_NAME = "imaging"
# How long an interrupted stage gets to clean up before its kernel is shut down.
_CLEANUP_GRACE = 30.0


class StageFailed(ImagingError):
    def __init__(self, stage: str, message: str, run: str) -> None:
        super().__init__(f"{stage}: {message}")
        self.stage = stage
        self.run = run


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class State:
    """``state.json``: where a run is, and every transition it went through."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.data: dict[str, Any] = (
            json.loads(ws.state_file.read_text())
            if ws.state_file.exists()
            else {"state": "new", "history": []}
        )

    def set(self, state: str, stage: str | None = None, error: str | None = None) -> None:
        # root: where this host keeps the run (another host relocates its results from it)
        self.data.update(state=state, stage=stage, error=error, updated=_now(), root=str(self.ws.root))
        self.data["history"].append({"time": _now(), "state": state, "stage": stage, "error": error})
        write_json(self.ws.state_file, self.data)

    @property
    def state(self) -> str:
        return str(self.data["state"])


def notebook_path(stage: str) -> Path:
    path = config.notebooks_dir() / f"{stage}.ipynb"
    if not path.is_file():
        raise ParameterError(f"stage {stage} has no notebook at {path}")
    return path


def declared_parameters(stage: str) -> dict[str, Any]:
    import papermill as pm

    return dict(pm.inspect_notebook(str(notebook_path(stage))))


@contextlib.contextmanager
def _run_lock(ws: Workspace) -> Iterator[None]:
    with open(ws.root / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ImagingError(f"run {ws.id} is being worked on by another process") from None
        yield


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler stopping us) takes the same path as Ctrl-C. Once: a second SIGTERM
    must not cut short the clean-up the first started (the interrupted notebook's render, the
    audit chain, the record's last files in its store), as the stage kernel's does not."""
    stopping = False

    def handler(signum: int, frame: Any) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGTERM, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, old)
    else:
        yield


def _stop_kernel(km: Any) -> None:
    """SIGTERM the kernel: its running cell raises, cleans up (stops tools, unmounts, removes
    partial files) and the kernel exits (see stage.py). Wait for that, then make sure.

    Plain signals and Popen.wait, not the kernel client: after a KeyboardInterrupt inside
    papermill's event loop, jupyter_client's sync wrappers are no longer usable.
    """
    process = getattr(km.provisioner, "process", None)
    if process is None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=_CLEANUP_GRACE + 5)
    except subprocess.TimeoutExpired:
        zygote.signal_group(process, signal.SIGKILL)
        process.wait()
    # Only the synchronous cleanups: anything async would run the interrupted event loop again.
    with contextlib.suppress(Exception):
        km.cleanup_connection_file()
        km.cleanup_ipc_files()


def _shutdown(km: Any) -> None:
    from jupyter_core.utils import run_sync

    with contextlib.suppress(Exception):
        run_sync(km.shutdown_kernel)(now=False)


# While cells run, the executed notebook is saved at most this often (and always at its start
# and end): papermill saves it at every cell's start and end, 27 saves of a serialized and
# schema-validated notebook for 40-export, about a third of a stage's fixed cost.
SAVE_EVERY = 1.0


@functools.cache
def _engine() -> str:
    """papermill's nbclient engine, saving the notebook as SAVE_EVERY says; its name."""
    from papermill.engines import NBClientEngine, NotebookExecutionManager, papermill_engines

    class Saves(NotebookExecutionManager):
        _force = False

        def save(self, **kwargs: Any) -> None:
            if self._force or (self.now() - self.last_save_time).total_seconds() >= SAVE_EVERY:
                super().save(**kwargs)

        def notebook_start(self, **kwargs: Any) -> None:
            self._force = True
            try:
                super().notebook_start(**kwargs)
            finally:
                self._force = False

        def notebook_complete(self, **kwargs: Any) -> None:
            self._force = True
            super().notebook_complete(**kwargs)

    class Engine(NBClientEngine):
        @classmethod
        def execute_notebook(cls, nb: Any, kernel_name: str, output_path: str | None = None,
                             progress_bar: bool = True, log_output: bool = False, autosave_cell_every: int = 30,
                             **kwargs: Any) -> Any:  # fmt: skip
            # papermill's Engine.execute_notebook, with Saves for its execution manager.
            nb_man = Saves(nb, output_path=output_path, progress_bar=progress_bar, log_output=log_output,
                           autosave_cell_every=autosave_cell_every)  # fmt: skip
            nb_man.notebook_start()
            try:
                cls.execute_managed_notebook(nb_man, kernel_name, log_output=log_output, **kwargs)
            finally:
                nb_man.cleanup_pbar()
                nb_man.notebook_complete()
            return nb_man.nb

    papermill_engines.register("imaging", Engine)
    return "imaging"


def stage_imports(stage: str) -> str:
    """The import statements of a stage notebook's code cells, as one line of code."""
    nb = json.loads(notebook_path(stage).read_text(encoding="utf-8"))
    found: list[str] = []
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        try:
            tree = ast.parse("".join(cell["source"]))
        except SyntaxError:
            continue
        found += [ast.unparse(n) for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    return "; ".join(dict.fromkeys(found))


_KERNELS = itertools.count(1)


class Kernel:
    """A stage's Jupyter kernel, started ahead of its stage: while the stage before it works,
    the kernel process starts and imports what the stage's notebook imports (its import
    statements run as the kernel's ``exec_lines``), so the stage itself begins at once.

    IPC sockets in the run directory, not TCP on loopback: nothing for other local users to
    reach. A socket's path holds 107 bytes at most: for a deep run directory, a private one
    (0700) in /tmp instead (not $TMPDIR, which may be as deep).
    """

    def __init__(
        self, ws: Workspace, stage: str, live: list[Kernel], forks: zygote.Zygote | None = None
    ) -> None:
        """Start the kernel, forked by ``forks`` where it can (zygote.py); it joins ``live`` (the
        run's kernels, which it stops) as it starts."""
        from jupyter_client.manager import AsyncKernelManager
        from jupyter_core.utils import run_sync

        self.stage = stage
        self.private = len(str(ws.root / ".kernel-0000000000")) > 100
        self.sockets = (
            Path(tempfile.mkdtemp(prefix="imaging-kernel-", dir="/tmp")) if self.private else ws.root
        )
        # Each kernel its own socket names: jupyter_client numbers IPC sockets from 1 up to the
        # first name not taken on disk, and a kernel makes its sockets only once it runs, so two
        # kernels started together under one name would bind the same sockets.
        # The asynchronous manager: nbclient's client of a synchronous one waits for the kernel's
        # output in a blocking call that never returns once the kernel is gone (a kernel stopped
        # by its stage's time limit while idle hung the run), where the asynchronous one lets
        # nbclient see that the kernel died.
        self.km = AsyncKernelManager(kernel_name=KERNEL_NAME, transport="ipc",
                                ip=str(self.sockets / f".kernel{next(_KERNELS)}"))  # fmt: skip
        if forks is not None:
            self.km.provisioner = forks.provisioner(self.km)
        # independent: no ipykernel parent poller, which would os._exit() the kernel without
        # cleanup when we die; the stage's own watchdog (stage.py, started first thing) cleans
        # up first, then exits. An idle kernel started ahead exits the same way.
        # Nor the record store's keys: a stage has no business with them.
        env = {k: v for k, v in os.environ.items() if k not in ("JPY_PARENT_PID", record.ENV)}
        env[lineage.OWNER] = str(os.getpid())  # whom it watches (stage.guard)
        ahead = f"import imaging.run.stage as _stage; _stage.guard(); {stage_imports(stage)}"
        # A kernel without a parent handle prints how to connect to it on our stdout; CRITICAL quiets it.
        # No IPython history: a stage's cells are in its notebook, and the SQLite file shared by
        # every kernel on the host cost each start 0.1 s.
        self._stopper: threading.Thread | None = None
        # The kernel runs in a session of its own, out of reach of the terminal's Ctrl-C: an
        # interrupt between its fork and the moment it is in ``live`` would leave it running
        # (holding our stderr, which a scheduler then waits on). Ctrl-C and SIGTERM wait till then.
        with _signals_held() as held:
            run_sync(self.km.start_kernel)(cwd=str(config.PROJECT), env=env, independent=True, **_tied(),
                                 extra_arguments=["--IPKernelApp.log_level=CRITICAL", "--HistoryManager.enabled=False",
                                                  f"--IPKernelApp.exec_lines={ahead}"])  # fmt: skip
            live.append(self)
        if held:
            self.kill()
            signal.raise_signal(held[0])

    def shutdown(self, *, wait: bool = True) -> None:
        """Shut the kernel down; ``wait=False`` lets it exit while the next stage starts (the
        stage's work is complete and recorded; only the process is left to go)."""

        def stop() -> None:
            _shutdown(self.km)
            if self.private:  # after the kernel is gone: it talks through them
                shutil.rmtree(self.sockets, ignore_errors=True)

        self._stopper = threading.Thread(target=stop, name=f"stop kernel {self.stage}", daemon=True)
        self._stopper.start()
        if wait:
            self.join()

    def join(self) -> None:
        if self._stopper is not None:
            self._stopper.join()

    def kill(self) -> None:
        _stop_kernel(self.km)
        if self.private:
            shutil.rmtree(self.sockets, ignore_errors=True)

    def stop(self) -> None:
        """Gone for good: a kernel shutting down waited for, any other killed (again: harmless)."""
        if self._stopper is not None:
            self.join()
        else:
            self.kill()


def _tied() -> dict[str, Any]:
    """``preexec_fn`` for a kernel's Popen: SIGTERM (its clean-up path) when we die, however we
    die (lineage.py). Only where the thread that forks it lives as long as this process: Linux
    sends the signal when that thread ends. Ours is the main thread, or, where an event loop
    runs in this thread (a notebook's kernel, explore.ipynb), jupyter_core's runner thread,
    which runs the start for it and is never stopped. Elsewhere the kernel's own watch of its
    parent is left to do it (stage.guard)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        if threading.current_thread() is not threading.main_thread():
            return {}
    return {"preexec_fn": lineage.die_with_parent(signal.SIGTERM)}


@contextlib.contextmanager
def _signals_held() -> Iterator[list[int]]:
    """SIGINT and SIGTERM noted rather than acted on inside the block (the main thread's
    handlers; elsewhere signals never run): the caller delivers them once it is safe."""
    held: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield held
        return
    old = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum in old:
        signal.signal(signum, lambda signum, frame: held.append(signum))
    try:
        yield held
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)


def sweep(ws: Workspace, out: Path | None, request: Request | None = None) -> list[str]:
    """Remove what a failed or killed stage may have left: partial files, mounts, and the
    control groups of sandboxed tools. In the run's own directories every partial file is the
    run's; in ``out``, which other runs (and the user) share, only this run's artifact's."""
    removed = mounts.release_leftovers(ws.root / "mounts.json") + limits.release_leftovers()
    parts: list[Path] = []
    for directory in (ws.work, ws.notebooks):
        if directory.is_dir():
            parts += [*directory.glob(".*.part"), *directory.glob(".*.part.ipynb")]
    if out is not None and request is not None:
        # Named as 40-export names it: after the name's slug, not the name as the user wrote it.
        artifact = out / f"{request.slug}.{config.check_format(request.format).extension}"
        parts += [
            sparse.part_path(artifact, ws.id),
            sparse.part_path(artifact.with_name(artifact.name + ".sha256"), ws.id),
        ]
    for part in parts:
        # A cloud copy cut mid-way (clouds/resume.py: its record beside it) is kept for imaging
        # resume, which fetches only the rest; the copy itself drops it when it cannot be resumed.
        if part.with_name(part.name + ".json").exists():
            continue
        if part.exists():
            part.unlink(missing_ok=True)
            removed.append(str(part))
    return removed


def _cells_seconds(nb_path: Path) -> tuple[float, float]:
    """(seconds in all code cells, seconds in the first code cell: imports and stage.open)."""
    nb = json.loads(nb_path.read_text())
    durations = [
        float(c.get("metadata", {}).get("papermill", {}).get("duration") or 0.0)
        for c in nb["cells"]
        if c["cell_type"] == "code" and "injected-parameters" not in c.get("metadata", {}).get("tags", [])
        and "parameters" not in c.get("metadata", {}).get("tags", [])
    ]  # fmt: skip
    return sum(durations), (durations[0] if durations else 0.0)


def run_stage(
    ws: Workspace,
    stage: str,
    request: Request,
    index: int,
    total: int,
    err: TextIO,
    kernel: Kernel,
    pusher: record.Pusher | None = None,
) -> dict[str, Any]:
    """Execute one stage's notebook in ``kernel`` (started for it, usually ahead of it)."""
    import papermill as pm

    declared = declared_parameters(stage)
    # The pipeline digests the source itself, beside all the stages (see SourceDigest).
    values = {**request.notebook_parameters(), "RUN_DIR": str(ws.root), "HASH_SOURCE": False}
    params = {k: v for k, v in values.items() if k in declared}
    final = ws.notebooks / f"{stage}.ipynb"
    tmp = ws.notebooks / f".{stage}.part.ipynb"  # papermill wants .ipynb
    print(f"imaging: [{index}/{total}] {stage} ...", file=err, flush=True)
    t0 = time.monotonic()
    km = kernel.km
    limit = stage_limit(stage, ws, request)
    clock = _StageClock(km, limit)
    try:
        pm.execute_notebook(
            str(notebook_path(stage)),
            str(tmp),
            parameters=params,
            km=km,
            kernel_name=KERNEL_NAME,
            engine_name=_engine(),
            progress_bar=False,
            stderr_file=err,
            coalesce_streams=True,
            request_save_on_cell_execute=True,
            cwd=str(config.PROJECT),
        )
    except BaseException as e:
        clock.cancel()
        if clock.expired.is_set():  # the kernel was stopped (cleaning up as on SIGTERM) by the clock
            kernel.kill()
            shown = f"{limit:.0f}" if limit >= 1 else f"{limit:.1f}"
            message = (f"took longer than its time limit of {shown} s (stage_time in parameters/defaults.yaml, "
                       "which grows with the source's size); resume runs it again")  # fmt: skip
            _keep_failed(ws, stage, tmp, message, pusher)
            raise StageFailed(stage, message, ws.id) from None
        if isinstance(e, KeyboardInterrupt):
            kernel.kill()
            _keep_failed(ws, stage, tmp, "interrupted", pusher)
            raise
        if (error := _full_disk(ws, stage, request, e)) is not None:
            # Saving the notebook fails as a cell may still run: stopped the way SIGTERM stops it.
            if full.is_full(e):
                kernel.kill()
            else:
                kernel.shutdown()
            _keep_failed(ws, stage, tmp, error, pusher)
            raise StageFailed(stage, error, ws.id) from None
        kernel.shutdown()
        if isinstance(e, pm.PapermillExecutionError):
            _keep_failed(ws, stage, tmp, _one_line(e.ename, e.evalue), pusher)
            raise StageFailed(stage, _one_line(e.ename, e.evalue), ws.id) from None
        raise
    else:
        clock.cancel()
        kernel.shutdown(wait=False)
    wall = time.monotonic() - t0
    recorded = scraps.read(tmp)
    if stage not in recorded:
        _keep_failed(ws, stage, tmp, "the notebook did not record its result", pusher)
        raise StageFailed(stage, "the notebook did not record its result", ws.id)
    # The summary goes in before the notebook takes its final name, is rendered and hashed.
    summary.insert(tmp, summary.completed(stage, recorded[stage]))
    os.replace(tmp, final)
    cells, first = _cells_seconds(final)
    timing = {"seconds": round(wall, 3), "overhead": round(wall - cells + first, 3)}
    print(f"imaging: [{index}/{total}] {stage} done in {wall:.1f} s", file=err, flush=True)
    return {"result": recorded[stage], "timing": timing}


def stage_limit(stage: str, ws: Workspace, request: Request) -> float:
    """The stage's time limit in seconds: its ``stage_time`` (parameters/defaults.yaml) for the
    source's size; 50-verify also gets the boot check's own time limit."""
    rule = config.load_defaults().stage_time.get(stage, config.StageTime(seconds=3600, per_gib=120))
    extra = request.boot_timeout if stage == "50-verify" else 0
    return rule.limit(_source_bytes(ws, request)) + extra


def _source_bytes(ws: Workspace, request: Request) -> int:
    """The source's data: as 00-acquire measured it, or the blocks its file takes."""
    if ws.has_result("00-acquire"):
        return int(ws.result("00-acquire").get("data_bytes") or 0)
    if is_cloud_source(request.source):
        # 00-acquire copies a cloud's disk over the network: its limit grows with the disk's
        # size as the cloud tells it (its data is known only once it is here).
        from imaging.clouds import acquire

        try:
            return acquire.inspect(request.source).virtual_size
        except ImagingError:
            return 0
    try:
        st = catalog.resolve(request.source).stat()
    except (OSError, ImagingError):
        return 0
    return st.st_blocks * 512 if st.st_blocks else st.st_size


class _StageClock:
    """Stops a stage that runs past its limit the way SIGTERM stops it: the running cell raises,
    its with-blocks stop the tools, unmount and remove partial files, and the kernel exits; a
    kernel that has not gone after the grace is killed with its process group."""

    def __init__(self, km: Any, limit: float) -> None:
        self.km = km
        self.expired = threading.Event()
        self._timers = [
            threading.Timer(limit, self._term),
            threading.Timer(limit + _CLEANUP_GRACE + 5, self._kill),
        ]
        for timer in self._timers:
            timer.daemon = True
            timer.start()

    def _process(self) -> Any:
        return getattr(self.km.provisioner, "process", None)

    def _term(self) -> None:
        self.expired.set()
        if (process := self._process()) is not None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)

    def _kill(self) -> None:
        if (process := self._process()) is not None:
            zygote.signal_group(process, signal.SIGKILL)

    def cancel(self) -> None:
        for timer in self._timers:
            timer.cancel()


def _full_disk(ws: Workspace, stage: str, request: Request, e: BaseException) -> str | None:
    """A stage's full disk (papermill saving its notebook here, or a cell or a tool in its
    kernel) as its one-line error; None for any other failure. A stage's own check
    (SpaceError) already says it all."""
    import papermill as pm

    if full.is_full(e):
        assert isinstance(e, OSError)
        path = e.filename2 or e.filename
    elif isinstance(e, pm.PapermillExecutionError) and e.ename != "SpaceError" and full.said_full(e.evalue):
        path = full.path_in(e.evalue)
    else:
        return None
    full.give_room(ws)  # for the records of this failure
    out = out_dir(ws, request)
    return full.message(ws, stage, out, _source_bytes(ws, request), request.format, path and str(path))


def _one_line(ename: str, evalue: str) -> str:
    text = " ".join(str(evalue).split())
    known = ("Error", "Failed", "Missing", "Interrupted")
    return text if ename.endswith(known) or ename in ("ImagingError",) else f"{ename}: {text}"


def _keep_failed(
    ws: Workspace, stage: str, tmp: Path, error: str, pusher: record.Pusher | None = None
) -> Path | None:
    """The executed notebook of a failed attempt stays, numbered, for the record, with the error
    as its summary; returns it (None: the attempt had not written one)."""
    if not tmp.exists():
        return None
    try:
        summary.insert(tmp, summary.failed(stage, error))
    except Exception as e:  # a notebook a dying kernel left unreadable is still kept as it is
        print(f"imaging: no summary in the failed {stage} notebook: {_one_line(type(e).__name__, str(e))}",
              file=sys.stderr, flush=True)  # fmt: skip
    n = 1 + len(list(ws.notebooks.glob(f"{stage}.failed-*.ipynb")))
    failed = ws.notebooks / f"{stage}.failed-{n}.ipynb"
    os.replace(tmp, failed)
    _record(ws, failed, pusher)
    return failed


def _record(ws: Workspace, notebook: Path, pusher: record.Pusher | None = None) -> None:
    """The executed notebook's HTML render, and both onto the run's audit chain, then the
    record to its store, if it has one. A render that fails must not hide the stage's own
    outcome: the chain then says so."""
    _wait_records(ws)  # the chain stays in stage order
    try:
        audit.record_notebook(ws, notebook)
    except Exception as e:  # nbconvert raises many kinds; none may mask the stage's result
        print(f"imaging: no HTML render of {notebook.name}: {_one_line(type(e).__name__, str(e))}",
              file=sys.stderr, flush=True)  # fmt: skip
        try:
            audit.append(ws, notebook, "notebook")
        except OSError as e:
            if not full.is_full(e):
                raise
            # A full disk: the notebook stays, off the chain (the failure is what matters now).
            print(
                f"imaging: {notebook.name} not on the audit chain: {e.strerror}", file=sys.stderr, flush=True
            )
    if pusher is not None:
        pusher.push()


def _chain_left(ws: Workspace) -> None:
    """What a process killed outright wrote into ``notebooks/`` but did not chain, chained now,
    oldest first: a stage's notebook renamed to its final name (or a failed attempt's to its
    ``failed-N`` name) is rendered and chained after the rename, on a thread that overlaps the
    next stage's start; a killed attempt's record is written, then chained."""
    left = [p for p in ws.notebooks.iterdir() if not p.name.startswith(".") and not audit.chained(ws, p)]
    for path in sorted(left, key=lambda p: p.stat().st_mtime_ns):
        if path.suffix == ".ipynb":
            if path.with_suffix(".html") in left or not path.with_suffix(".html").exists():
                _record(ws, path)  # renders it again: a render a kill cut short is not kept
            else:
                audit.append(ws, path, "notebook")
        elif path.suffix == ".html":
            if path.with_suffix(".ipynb") not in left:  # else chained with its notebook above
                audit.append(ws, path, "html")
        elif ".killed-" in path.name:
            audit.append(ws, path, "killed")


# Runs whose last stage's HTML render is still running (see _record_later).
_rendering: dict[Path, threading.Thread] = {}


def _record_later(ws: Workspace, notebook: Path, pusher: record.Pusher | None = None) -> None:
    """:func:`_record` on a thread of its own: the render (0.4 s, and nbconvert's imports on
    the first) then overlaps the next stage's kernel start, or the wait for the source's hash
    after the last stage. Waited for before anything else goes onto the chain."""
    _wait_records(ws)
    thread = threading.Thread(target=_record, args=(ws, notebook, pusher), name=f"render {notebook.name}")
    _rendering[ws.root] = thread
    thread.start()


def _wait_records(ws: Workspace) -> None:
    thread = _rendering.get(ws.root)
    if thread is None or thread is threading.current_thread():
        return
    thread.join()
    del _rendering[ws.root]


class SourceDigest:
    """The source's content digest (``sha256-1MiB-list:...``, :func:`imaging.sparse.content_digest`),
    computed beside the whole run (``imaging/run/source_digest.py``); it costs the source's data,
    not its virtual size. Kept in ``source.digest`` beside the run, so a resumed run does not
    digest again. For a cloud's instance, 00-acquire writes the digest of the disk as it arrived.
    """

    def __init__(self, ws: Workspace, source: str) -> None:
        self.file = ws.root / "source.digest"
        self.digest: str | None = None
        self.error: str | None = None
        self._process: subprocess.Popen[bytes] | None = None
        if self.file.exists():
            self.digest = self.file.read_text().split()[0]
        elif is_cloud_source(source):
            pass  # 00-acquire writes it: the digest of the disk as it came out of the cloud
        else:
            argv = [sys.executable, "-m", "imaging.run.source_digest", str(catalog.resolve(source)), str(self.file),
                    str(os.getpid())]  # fmt: skip
            self._process = subprocess.Popen(argv, cwd=config.PROJECT, stdin=subprocess.DEVNULL,
                                             stdout=subprocess.DEVNULL, start_new_session=True)  # fmt: skip

    def result(self) -> str | None:
        if self.digest is None and self._process is None and self.file.exists():
            self.digest = self.file.read_text().split()[0]
        if self._process is not None:
            code = self._process.wait()
            if self.file.exists():
                self.digest = self.file.read_text().split()[0]
            else:
                self.error = f"cannot digest the source (exit code {code})"
            self._process = None
        return self.digest

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            self._process.wait()


def _summary(
    ws: Workspace,
    request: Request,
    results: dict[str, Any],
    timings: dict[str, Any],
    source_digest: str | None,
) -> dict[str, Any]:
    artifact = results.get("40-export", {})
    boot = results.get("50-verify", {})
    checked = "50-verify" in config.pipeline_stages(request.kind)
    return {
        "path": artifact.get("path"),
        "sha256": artifact.get("sha256"),
        "format": request.format,
        "target": request.target,
        "run": ws.id,
        # null: this kind of run does not boot its artifact (convert without --verify)
        "verified": boot.get("verdict") == "booted" if checked else None,
        "name": request.name,
        "slug": request.slug,
        "kind": request.kind,
        "size_bytes": artifact.get("size_bytes"),
        "boot": {
            k: boot.get(k)
            for k in (
                "verdict",
                "reason",
                "reasons",
                "matched",
                "accel",
                "controller",
                "nic",
                "dhcp",
                "ssh",
                "ssh_host_keys",
                "seconds",
                "boots",
            )
            if k != "boots" or boot.get(k)
        },  # fmt: skip
        "source": request.source,
        "source_digest": source_digest,
        **(
            {"fetched": results["00-acquire"]["fetched"]}
            if (results.get("00-acquire") or {}).get("fetched")
            else {}
        ),
        **({"published": results["60-publish"]} if "60-publish" in results else {}),
        "run_dir": str(ws.root),
        "timings": timings,
    }


def open_run(run_id: str | None, request: Request | None) -> tuple[Workspace, Request]:
    """The run to work on: a new one for a request, or an existing one to resume."""
    if run_id is None:
        assert request is not None
        run_id = _fresh_run_id(request.name)
    config.check_run_id(run_id)
    root = config.runs_dir() / run_id
    if root.is_symlink():  # a completed run removes <run>/work: it must be the run's own
        raise ParameterError(
            f"{root} is a symbolic link: a run is a directory of its own under {config.runs_dir()}"
        )
    if root.exists() and (root / "request.json").exists():
        stored = Request(**json.loads((root / "request.json").read_text()))
        if request is not None and request != stored:
            raise ParameterError(f"run {run_id} exists with other parameters; choose another --run")
        return Workspace.open(root), stored
    if request is None:
        raise ParameterError(f"no run {run_id} under {config.runs_dir()}")
    ws = Workspace.open(root)
    write_json(ws.request_file, request.model_dump(mode="json"))
    return ws, request


def _fresh_run_id(name: str) -> str:
    """``<name>-<UTC time>``, with ``-2``, ``-3``... when that run exists: two requests made in
    the same second must never share (or resume) one run. The directory is claimed by mkdir."""
    runs = config.runs_dir()
    runs.mkdir(parents=True, exist_ok=True)
    # Run ids are names too (at most 80 characters): a long request name is shortened in the id.
    base = f"{config.slug(name)[:60]}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"
    for n in range(1, 1000):
        run_id = base if n == 1 else f"{base}-{n}"
        try:
            (runs / run_id).mkdir()
        except FileExistsError:
            continue
        return run_id
    raise ParameterError(f"no free run id for {name} under {runs}")


def out_dir(ws: Workspace, request: Request) -> Path:
    return Path(request.out).resolve() if request.out else ws.root / "out"


@functools.cache
def _warm() -> None:
    """papermill imported (0.7 s), nbconvert's exporter made and its templates compiled (0.7 s):
    done once, while the first kernel starts, when this process would only wait for it. In this
    thread, not beside it: two threads importing at once can deadlock inside Python's import
    system (IPython, which both nbconvert's lexers and jupyter_client's kernel specs import, then
    vanished from under the other: ``KeyError: 'IPython'`` ended two runs of the test suite)."""
    import papermill  # noqa: F401

    with contextlib.suppress(Exception):  # the render itself will say what is wrong
        pages.warm()


class Runner:
    """One run's stages, one at a time: ``execute`` runs them all, explore.ipynb one per click.

    Either way each stage goes through :func:`run_stage` into the same run directory, with the
    same state transitions, sweep on failure, HTML render and audit chain, so a run made step
    by step is indistinguishable from an ``export`` run.
    """

    def __init__(self, ws: Workspace, request: Request, *, err: TextIO = sys.stderr) -> None:
        self.ws = ws
        self.request = request
        self.err = err
        self.stages = config.pipeline_stages(request.kind)
        self.state = State(ws)
        self.out = out_dir(ws, request)
        self.results: dict[str, Any] = {}
        self.timings: dict[str, Any] = dict(self.state.data.get("timings", {}))
        self._source_digest: SourceDigest | None = None
        self._ahead: Kernel | None = None  # the next stage's kernel, started while a stage runs
        self._kernels: list[Kernel] = []  # every kernel of the run not yet gone
        # What the run's kernels are forked from (zygote.py): whatever any of its stages imports.
        self._zygote = zygote.Zygote(lambda: "; ".join(dict.fromkeys(stage_imports(s) for s in self.stages)))
        self._held = False
        self._taken_over = False  # what a killed process of the run left is seen to once
        # The record's copy in the object store, when the run is given one (IMAGING_RECORDS).
        self.pusher = record.pusher(ws)
        os.environ["IMAGING_MOUNT_LEDGER"] = str(ws.root / "mounts.json")
        os.environ["IMAGING_PIPELINE"] = "1"
        os.environ[lineage.MARK] = str(ws.root)  # on every process the run starts

    def done(self, stage: str) -> bool:
        return (self.ws.notebooks / f"{stage}.ipynb").exists()

    def next_stage(self) -> str | None:
        return next((s for s in self.stages if not self.done(s)), None)

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """The run's lock, and SIGTERM taken as Ctrl-C, for one stage or for all of them."""
        if self._held:
            yield
            return
        with _run_lock(self.ws), _terminate_as_interrupt():
            self._held = True
            try:
                if not self._taken_over:
                    self._take_over()
                yield
            finally:
                _wait_records(self.ws)  # nothing of the run goes on once its lock is let go
                self._reap(keep=self._ahead)
                self._held = False

    def _take_over(self) -> None:
        """What the run's last process could not do if it was killed outright (SIGKILL, the OOM
        killer), done by the next one to hold the run: its processes still running ended,
        after their own clean-up (lineage.py); the stage it was in recorded as a killed attempt,
        its partial notebook kept, as a failed one's is (killed.py); what it left swept up."""
        self._taken_over = True
        ended = lineage.end(self.ws.root, _CLEANUP_GRACE + 5)
        _chain_left(self.ws)
        self.state = State(self.ws)  # as that process left it, now that it is gone
        if self.state.state != "running":
            return
        found = killed.unended(self.state.data, self.done)
        if found is None:  # killed between two stages: the one it names is complete
            sweep(self.ws, self.out, self.request)
            return
        stage, started = found
        error = killed.message(started)
        # The partial notebook kept before the sweep, which removes partial files.
        notebook = _keep_failed(self.ws, stage, self.ws.notebooks / f".{stage}.part.ipynb", error)
        sweep(self.ws, self.out, self.request)
        killed.record(self.ws, stage, started, notebook, ended)
        self.state.set("killed", stage, error)
        print(f"imaging: {stage} {error}", file=self.err, flush=True)
        if self.pusher is not None:
            self.pusher.push()

    def step(self) -> str:
        """Run the next stage (a completed one is read back, not repeated); return its name."""
        stage = self.next_stage()
        if stage is None:
            raise ImagingError(f"run {self.ws.id} has no stage left to run")
        index = self.stages.index(stage) + 1
        for earlier in self.stages[: index - 1]:
            self.results.setdefault(earlier, self.ws.result(earlier))
        with self.holding():
            if self._source_digest is None:
                self._source_digest = SourceDigest(self.ws, self.request.source)
            full.keep_room(self.ws)
            try:
                self.state.set("running", stage)
            except OSError as e:
                if (error := _full_disk(self.ws, stage, self.request, e)) is None:
                    raise
                self._failed(stage, error)
                raise StageFailed(stage, error, self.ws.id) from None
            try:  # an interrupt while the record goes to its store fails the stage too
                if self.pusher is not None:
                    self.pusher.push(wait=False)
                kernel = self._kernel_for(stage)
                # The stage before's kernel gone (its shutdown began as that stage ended) before
                # another starts: two kernels at most, or three overlapped now and then (the
                # pipeline's peak memory went from 275 to 320 MiB on a loaded machine).
                self._reap(keep=kernel)
                self._start_ahead(index)
                _warm()
                done = run_stage(
                    self.ws, stage, self.request, index, len(self.stages), self.err, kernel, self.pusher
                )
            except KeyboardInterrupt:
                self._failed(stage, "interrupted")
                raise
            except ImagingError as e:
                self._failed(stage, str(e))
                raise
            _record_later(self.ws, self.ws.notebooks / f"{stage}.ipynb", self.pusher)
            self.timings[stage] = done["timing"]
            self.state.data["timings"] = self.timings
            write_json(
                self.ws.state_file, self.state.data
            )  # a run killed before its next transition keeps them
            following = self.next_stage()
            if self.pusher is not None:
                try:
                    self.pusher.keep_inputs(following)
                except KeyboardInterrupt:  # the stage is done; the next one was about to start
                    self._failed(following or stage, "interrupted")
                    raise
        self.results[stage] = done["result"]
        return stage

    def _kernel_for(self, stage: str) -> Kernel:
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead.stage == stage:
            return ahead
        if ahead is not None:
            ahead.kill()
        return Kernel(self.ws, stage, self._kernels, self._zygote)

    def _start_ahead(self, index: int) -> None:
        """The kernel of the stage after this one (``index`` counts from 1), started now."""
        if index < len(self.stages) and os.environ.get("IMAGING_KERNEL_AHEAD", "1") != "0":
            self._ahead = Kernel(self.ws, self.stages[index], self._kernels, self._zygote)

    def stop_kernels(self) -> None:
        """No kernel of this run outlives it: the finished stages' kernels are waited for, any
        other (the one started ahead, an interrupted stage's) is stopped; then their zygote."""
        self._ahead = None
        self._reap(keep=None)

    def _reap(self, keep: Kernel | None) -> None:
        for kernel in self._kernels:
            if kernel is not keep:
                kernel.stop()
        self._kernels = [keep] if keep is not None and keep in self._kernels else []
        if keep is None:  # no kernel kept for a stage to come (explore.ipynb's last step): none to fork
            self._zygote.stop()

    def _failed(self, stage: str, error: str) -> None:
        self.stop_kernels()
        if self._source_digest is not None:
            self._source_digest.stop()
            self._source_digest = None
        sweep(self.ws, self.out, self.request)
        try:
            self.state.set("error", stage, error)
        except OSError as e:
            if not full.is_full(e):
                raise
            # Still "running" on disk: the next process to hold the run records the attempt.
            print(f"imaging: {stage}'s failure not in state.json: {e.strerror}", file=self.err, flush=True)
        if self.pusher is not None:
            _wait_records(self.ws)
            self.pusher.push()

    def finish(self) -> dict[str, Any]:
        """Once every stage is done: the run's result (result.json), the audit chain sealed."""
        if self.state.state == "completed" and self.ws.result_file.exists():
            return dict(json.loads(self.ws.result_file.read_text()))
        if (left := self.next_stage()) is not None:
            raise ImagingError(f"run {self.ws.id} is not finished: {left} has not run")
        for stage in self.stages:
            self.results.setdefault(stage, self.ws.result(stage))
        with self.holding():
            _wait_records(self.ws)
            if self.ws.result_file.exists() and audit.chained(self.ws, self.ws.result_file):
                # Chained by a process killed while it sealed the run: that is the result.
                summary = dict(json.loads(self.ws.result_file.read_text()))
            else:
                source_digest = self._source_digest or SourceDigest(self.ws, self.request.source)
                summary = _summary(self.ws, self.request, self.results, self.timings, source_digest.result())
                write_json(self.ws.result_file, summary)
            audit.seal(self.ws, summary)
            self.state.set("completed")
            full.give_room(self.ws)
            _drop_work(self.ws, self.request)
        if self.pusher is not None:
            self.pusher.keep_inputs(None)  # the kept disks go: nothing is left to resume
            if not self.pusher.push():
                raise ImagingError(
                    f"run {self.ws.id} completed, but its record is not all in the store: {self.pusher.error}"
                )
        return summary

    def amend(self, **fields: Any) -> Request:
        """:func:`amend` this run's request."""
        self.request = amend(self.ws, self.request, **fields)
        return self.request


def amend(ws: Workspace, request: Request, **fields: Any) -> Request:
    """Change parameters that no completed stage has used yet (explore.ipynb: the clean
    operations before 10-clean, the target before 20-migrate; resume: an admin's answer to
    25-secrets); request.json follows."""
    stages = config.pipeline_stages(request.kind)
    used = {p for s in stages if (ws.notebooks / f"{s}.ipynb").exists() for p in declared_parameters(s)}
    fixed = [k for k, v in fields.items() if k.upper() in used and v != getattr(request, k)]
    if fixed:
        raise ParameterError(f"{', '.join(fixed)}: already used by a completed stage of run {ws.id}")
    request = Request.create(**{**request.model_dump(), **fields})
    write_json(ws.request_file, request.model_dump(mode="json"))
    return request


def restart(ws: Workspace, reason: str) -> int:
    """Start a run again from its first stage (another host abandoned it, and the disk of the
    stage it was in is gone with that host), keeping the abandoned attempt in the record: each
    completed stage's notebook and render renamed ``<stage>.attempt-N`` (chained as moves),
    failed attempts as they are, results, work disks and artifacts dropped. Returns N."""
    attempts = {p.stem.rpartition(".attempt-")[2] for p in ws.notebooks.glob("*.attempt-*.ipynb")}
    n = 1 + len(attempts)
    for notebook in sorted(ws.notebooks.glob("[0-9][0-9]-*.ipynb")):
        if "." in notebook.stem:  # a failed attempt, or an earlier attempt's
            continue
        for path in (notebook, notebook.with_suffix(".html")):
            if path.exists():
                audit.move(ws, path, path.with_name(f"{notebook.stem}.attempt-{n}{path.suffix}"))
    for path in [*ws.results.glob("*.json"), ws.result_file]:
        path.unlink(missing_ok=True)
    for directory in (ws.work, ws.root / "out"):
        shutil.rmtree(directory, ignore_errors=True)
    ws.work.mkdir()
    state = State(ws)
    state.data.pop("timings", None)
    state.set("restarted", None, f"{reason}: attempt {n} is kept in the record, the run starts again")
    return n


def push_record(ws: Workspace) -> str | None:
    """Put what changed in the run's record into its store, if it has one; the error if not."""
    pusher = record.pusher(ws)
    if pusher is None or pusher.push():
        return None
    return pusher.error


def _drop_work(ws: Workspace, request: Request) -> None:
    """A completed run's work disks go, unless the request keeps them."""
    if not request.keep_work and _own_work(ws):
        shutil.rmtree(ws.work, ignore_errors=True)


def _own_work(ws: Workspace) -> bool:
    """``work/`` of a run under the runs directory, a directory of its own (what a completed
    run may remove): never a path a request or a link leads elsewhere."""
    runs = config.runs_dir().resolve()
    return ws.root.resolve().parent == runs and ws.work.is_dir() and not ws.work.is_symlink()


def execute(ws: Workspace, request: Request, *, err: TextIO = sys.stderr) -> dict[str, Any]:
    """Run (or resume) the run's stages; return the run's result (also in result.json)."""
    state = State(ws)
    if state.state == "completed" and ws.result_file.exists():
        _drop_work(ws, request)  # a process killed as it completed the run left them
        return dict(json.loads(ws.result_file.read_text()))
    runner = Runner(ws, request, err=err)
    try:
        with runner.holding():
            if runner.pusher is not None:
                runner.pusher.push()
            for index, stage in enumerate(runner.stages, 1):
                if runner.done(stage):
                    runner.results[stage] = ws.result(stage)
                    print(
                        f"imaging: [{index}/{len(runner.stages)}] {stage} already done", file=err, flush=True
                    )
            while runner.next_stage() is not None:
                runner.step()
            return runner.finish()
    finally:
        runner.stop_kernels()
